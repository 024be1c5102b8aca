//! The `stack` structure: pop, (window), push back on the thread's CPU; steals from
//! other CPUs when empty and every 64th operation, a `pop_all` every 1021st; in `remote`
//! and `mix` the remote thread steals and detaches other CPUs' lists. At the end every
//! node id must be on exactly one list, and no node may ever have been held twice.

use core::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use cpulocal::{Node, NodeList, Stack};
use serde::Serialize;

use super::harness::{hooks, Rng, Shared};
use super::part::{Check, Entry, ErasedPart, Faults, Part, PartDef, StructureDef, Turn};

/// `--structure stack`.
pub(super) const STRUCTURE: StructureDef = StructureDef {
    name: "stack",
    help: None,
    parts: &[&PART],
    remote: &[],
};

/// The stack part.
pub(super) const PART: PartDef = PartDef {
    name: "stack",
    new: |config| -> Box<dyn ErasedPart> {
        Box::new(StackPart {
            stack: Stack::new(),
            nodes: (config.threads * 64).clamp(1024, 1 << 20),
        })
    },
    mutation: Some(|part| hooks::break_stack_guard(part.is_some())),
    absent: None,
};

/// A stack worker steals from another CPU every this many operations (and when empty).
const STEAL_EVERY: u64 = 64;
/// A stack worker detaches its CPU's whole list every this many operations.
const POP_ALL_EVERY: u64 = 1021;

/// A stack node's value.
struct Item {
    id: usize,
    /// Set by the thread that holds the node (off every list), cleared before it pushes
    /// the node back: a node handed out while set is held twice.
    held: AtomicBool,
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
    /// `corrupt`: values that are no node id; `lost`: `missing`; `duplicated`:
    /// `held_twice + found_twice`.
    #[serde(flatten)]
    pub faults: Faults,
}

impl fmt::Display for StackCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stack: {} nodes; {} pops ({} empty), {} steals + {} remote ({} nodes), {} pop_all ({} nodes); held twice {}; at the end {} found, {} twice, {} missing",
            self.nodes,
            self.pops,
            self.empty_pops,
            self.steals,
            self.remote_steals,
            self.stolen,
            self.pop_alls,
            self.pop_all_nodes,
            self.held_twice,
            self.found,
            self.found_twice,
            self.missing
        )
    }
}

impl Check for StackCheck {
    fn faults(&self) -> Faults {
        self.faults
    }
}

/// A run's stack and the number of nodes in circulation (ids `0..nodes`).
struct StackPart {
    stack: Stack<Item>,
    nodes: usize,
}

impl Part for StackPart {
    /// The counts of the check a thread contributes to.
    type Tally = StackCheck;

    fn new_tally(&self) -> StackCheck {
        StackCheck::default()
    }

    /// Initial worker `worker` pushes its share of the node ids.
    fn seed(&self, worker: usize, workers: usize) {
        for id in worker * self.nodes / workers..(worker + 1) * self.nodes / workers {
            self.stack.push(Node::new(Item {
                id,
                held: AtomicBool::new(false),
            }));
        }
    }

    fn op(&self, run: &Shared, turn: Turn, t: &mut StackCheck, rng: &mut Rng) {
        let stack = &self.stack;
        if turn.n % POP_ALL_EVERY == POP_ALL_EVERY - 1 {
            t.pop_alls += 1;
            let nodes = claim_list(stack.pop_all(), t);
            t.pop_all_nodes += nodes.len() as u64;
            run.inject(turn.i);
            for node in nodes {
                put_back(stack, node);
            }
            return;
        }
        let node = if turn.n % STEAL_EVERY == STEAL_EVERY - 1 {
            steal(run, stack, rng, t)
        } else {
            match stack.pop() {
                Some(node) => {
                    t.pops += 1;
                    Some(node)
                }
                None => {
                    t.empty_pops += 1;
                    steal(run, stack, rng, t)
                }
            }
        };
        let node = node.and_then(|node| claim_node(node, t));
        run.inject(turn.i);
        if let Some(node) = node {
            put_back(stack, node);
        }
    }

    /// A steal from `victim`, or every 16th time a `pop_all_on`; what it takes goes back
    /// on the caller's CPU's list.
    fn remote_op(&self, _: &Shared, victim: usize, n: u64, t: &mut StackCheck) {
        let stack = &self.stack;
        let nodes = if n % 16 == 15 {
            t.pop_alls += 1;
            let list = stack
                .pop_all_on(victim)
                .expect("victims are below the CPUs");
            let nodes = claim_list(list, t);
            t.pop_all_nodes += nodes.len() as u64;
            nodes
        } else {
            t.remote_steals += 1;
            let node = stack.steal(victim).expect("victims are below the CPUs");
            t.stolen += u64::from(node.is_some());
            node.and_then(|n| claim_node(n, t)).into_iter().collect()
        };
        for node in nodes {
            put_back(stack, node);
        }
    }

    /// The tallies added up, then every list drained and counted.
    fn check(&self, _: &Shared, tallies: &[&StackCheck]) -> Vec<Entry> {
        let mut s = StackCheck {
            nodes: self.nodes as u64,
            ..StackCheck::default()
        };
        for t in tallies {
            s.pops += t.pops;
            s.empty_pops += t.empty_pops;
            s.steals += t.steals;
            s.remote_steals += t.remote_steals;
            s.stolen += t.stolen;
            s.pop_alls += t.pop_alls;
            s.pop_all_nodes += t.pop_all_nodes;
            s.held_twice += t.held_twice;
        }
        drain_stack(&self.stack, self.nodes, &mut s);
        s.faults.lost = s.missing;
        s.faults.duplicated = s.held_twice + s.found_twice;
        vec![Entry::new("stack", Some(&s))]
    }
}

/// A worker's steal from another CPU.
fn steal(
    run: &Shared,
    stack: &Stack<Item>,
    rng: &mut Rng,
    s: &mut StackCheck,
) -> Option<Box<Node<Item>>> {
    s.steals += 1;
    let node = stack
        .steal(run.victim(rng))
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
fn claim_list(mut list: NodeList<Item>, s: &mut StackCheck) -> Vec<Box<Node<Item>>> {
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

/// Marks `node` held; `None` (and the box leaked, never pushed nor freed) when another
/// thread already holds it: a duplicate.
fn claim_node(node: Box<Node<Item>>, s: &mut StackCheck) -> Option<Box<Node<Item>>> {
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
fn put_back(stack: &Stack<Item>, node: Box<Node<Item>>) {
    // Release: pairs with the AcqRel swap of the next holder.
    node.held.store(false, Ordering::Release);
    stack.push(node);
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
                    s.faults.corrupt += 1;
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
    if s.found_twice + s.held_twice + s.faults.corrupt + s.missing > 0 {
        kept.into_iter().for_each(core::mem::forget);
    }
}
