//! The `stack` part of a stress run: pop, (window), push back on the thread's CPU;
//! steals from other CPUs when empty and every 64th operation, a `pop_all` every
//! 1021st; the remote thread steals and detaches other CPUs' lists. At the end every
//! node id must be on exactly one list, and no node may ever have been held twice.

use std::sync::atomic::{AtomicBool, Ordering};

use cpulocal::{Node, NodeList, Stack};
use serde::Serialize;

use super::harness::{Rng, Shared, Tally};

/// A stack worker steals from another CPU every this many operations (and when empty).
const STEAL_EVERY: u64 = 64;
/// A stack worker detaches its CPU's whole list every this many operations.
const POP_ALL_EVERY: u64 = 1021;

/// A stack node's value.
pub(super) struct Item {
    pub(super) id: usize,
    /// Set by the thread that holds the node (off every list), cleared before it pushes
    /// the node back: a node handed out while set is held twice.
    pub(super) held: AtomicBool,
}

/// The stack check: every node accounted for exactly once.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StackCheck {
    /// Nodes in circulation (ids `0..nodes`).
    pub nodes: u64,
    /// Pops that returned a node.
    pub pops: u64,
    /// Pops that found the CPU's list empty.
    pub empty_pops: u64,
    /// `steal` calls by the workers.
    pub steals: u64,
    /// `steal` calls by the remote thread.
    pub remote_steals: u64,
    /// Nodes that steals returned.
    pub stolen: u64,
    /// `pop_all` / `pop_all_on` calls.
    pub pop_alls: u64,
    /// Nodes those returned.
    pub pop_all_nodes: u64,
    /// Times a node was handed to a thread while another held it.
    pub held_twice: u64,
    /// Distinct node ids found on the lists at the end.
    pub found: u64,
    /// Ids found more than once at the end (or a list that loops).
    pub found_twice: u64,
    /// Ids never found at the end.
    pub missing: u64,
    /// Values that are no node id.
    pub corrupt: u64,
    /// `missing`.
    pub lost: u64,
    /// `held_twice + found_twice`.
    pub duplicated: u64,
}

impl Shared {
    pub(super) fn stack_op(&self, i: u64, t: &mut Tally, rng: &mut Rng) {
        let stack = self.stack.as_ref().expect("stack part");
        // Which operation of this kind this is, whatever the rotation.
        let n = i / self.kinds.len() as u64;
        if n % POP_ALL_EVERY == POP_ALL_EVERY - 1 {
            t.stack.pop_alls += 1;
            let nodes = self.claim_list(stack.pop_all(), &mut t.stack);
            t.stack.pop_all_nodes += nodes.len() as u64;
            self.inject(i);
            for node in nodes {
                put_back(stack, node);
            }
            return;
        }
        let node = if n % STEAL_EVERY == STEAL_EVERY - 1 {
            self.steal(stack, rng, &mut t.stack)
        } else {
            match stack.pop() {
                Some(node) => {
                    t.stack.pops += 1;
                    Some(node)
                }
                None => {
                    t.stack.empty_pops += 1;
                    self.steal(stack, rng, &mut t.stack)
                }
            }
        };
        let node = node.and_then(|node| claim_node(node, &mut t.stack));
        self.inject(i);
        if let Some(node) = node {
            put_back(stack, node);
        }
    }

    fn steal(
        &self,
        stack: &Stack<Item>,
        rng: &mut Rng,
        s: &mut StackCheck,
    ) -> Option<Box<Node<Item>>> {
        s.steals += 1;
        let node = stack
            .steal(self.victim(rng))
            .expect("victims are below the stack's CPUs");
        s.stolen += u64::from(node.is_some());
        node
    }

    /// Claims every node of `list`; stops at a node held twice (the list may loop) and
    /// leaks the rest rather than risk freeing a node twice.
    #[allow(
        clippy::vec_box,
        reason = "nodes travel as boxes, the stack's currency"
    )]
    pub(super) fn claim_list(
        &self,
        mut list: NodeList<Item>,
        s: &mut StackCheck,
    ) -> Vec<Box<Node<Item>>> {
        let mut nodes = Vec::new();
        while let Some(node) = list.next() {
            match claim_node(node, s) {
                Some(node) => nodes.push(node),
                None => {
                    core::mem::forget(list);
                    return nodes;
                }
            }
        }
        nodes
    }

    /// The remote thread's stack operation `n` on `victim`'s list: a steal, or every
    /// 16th time a `pop_all_on`; what it takes goes back on the caller's CPU's list.
    pub(super) fn remote_stack_op(&self, victim: usize, n: u64, t: &mut Tally) {
        let stack = self.stack.as_ref().expect("stack part");
        let nodes = if n % 16 == 15 {
            t.stack.pop_alls += 1;
            let list = stack
                .pop_all_on(victim)
                .expect("victims are below the CPUs");
            let nodes = self.claim_list(list, &mut t.stack);
            t.stack.pop_all_nodes += nodes.len() as u64;
            nodes
        } else {
            t.stack.remote_steals += 1;
            let node = stack.steal(victim).expect("victims are below the CPUs");
            t.stack.stolen += u64::from(node.is_some());
            node.and_then(|n| claim_node(n, &mut t.stack))
                .into_iter()
                .collect()
        };
        for node in nodes {
            put_back(stack, node);
        }
    }
}

/// Marks `node` held; `None` (and the box leaked, never pushed nor freed) when another
/// thread already holds it: a duplicate.
pub(super) fn claim_node(node: Box<Node<Item>>, s: &mut StackCheck) -> Option<Box<Node<Item>>> {
    // AcqRel: pairs with the Release in `put_back` of the previous holder.
    if node.held.swap(true, Ordering::AcqRel) {
        s.held_twice += 1;
        core::mem::forget(node);
        None
    } else {
        Some(node)
    }
}

/// Pushes a claimed node back on the caller's CPU's list.
pub(super) fn put_back(stack: &Stack<Item>, node: Box<Node<Item>>) {
    // Release: pairs with the AcqRel swap of the next holder.
    node.held.store(false, Ordering::Release);
    stack.push(node);
}

/// The stack part's check: the tallies added up, then every list drained and counted.
pub(super) fn check(shared: &Shared, tallies: &[Tally]) -> Option<StackCheck> {
    let stack = shared.stack.as_ref().map(|stack| {
        let mut s = StackCheck {
            nodes: shared.nodes as u64,
            ..StackCheck::default()
        };
        for t in tallies {
            s.pops += t.stack.pops;
            s.empty_pops += t.stack.empty_pops;
            s.steals += t.stack.steals;
            s.remote_steals += t.stack.remote_steals;
            s.stolen += t.stack.stolen;
            s.pop_alls += t.stack.pop_alls;
            s.pop_all_nodes += t.stack.pop_all_nodes;
            s.held_twice += t.stack.held_twice;
        }
        drain_stack(stack, shared.nodes, &mut s);
        s.lost = s.missing;
        s.duplicated = s.held_twice + s.found_twice;
        s
    });
    stack
}

/// Detaches every CPU's list and counts each node id. Nodes are freed only when every
/// id was found exactly once; otherwise (a broken run) they are leaked, since a node
/// might still be reachable twice.
fn drain_stack(stack: &Stack<Item>, nodes: usize, s: &mut StackCheck) {
    let mut times = vec![0u8; nodes];
    let mut kept = Vec::with_capacity(nodes);
    for cpu in 0..stack.slots() {
        let mut list = stack.pop_all_on(cpu).expect("cpu below the stack's CPUs");
        while let Some(node) = list.next() {
            match times.get_mut(node.id) {
                None => {
                    s.corrupt += 1;
                    core::mem::forget(node);
                    core::mem::forget(list);
                    break;
                }
                Some(n) if *n > 0 => {
                    // Found again: the lists share a node, or one loops.
                    s.found_twice += 1;
                    core::mem::forget(node);
                    core::mem::forget(list);
                    break;
                }
                Some(n) => {
                    *n = 1;
                    kept.push(node);
                }
            }
        }
    }
    s.found = kept.len() as u64;
    s.missing = times.iter().filter(|&&n| n == 0).count() as u64;
    if s.found_twice + s.held_twice + s.corrupt + s.missing > 0 {
        kept.into_iter().for_each(core::mem::forget);
    }
}
