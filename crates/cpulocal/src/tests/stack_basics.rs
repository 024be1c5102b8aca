//! `Stack`'s small promises: one CPU's list is LIFO through every way out (`pop`,
//! `steal`, `pop_all`, `pop_all_on`: "the most recently pushed", "most recently pushed
//! first"), a list detached whole is empty afterwards and takes pushes again, and every
//! node still on a list or in a `NodeList` is freed once when that is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{allowed_cpus, delay_shared, pin_to};
use crate::{Node, NodeList, Stack};

/// The values of a detached list, in the order it hands its nodes back.
fn values(list: NodeList<u32>) -> Vec<u32> {
    list.map(Node::into_inner).collect()
}

/// On one CPU (the thread pinned there, so every push lands on one list), each way out
/// takes the most recently pushed node first, and a push after a whole list was
/// detached starts a new list.
#[test]
fn push_after_pop_all_on_returns_the_nodes_in_lifo_order() {
    let _delay = delay_shared();
    // A thread of its own, pinned: no affinity to restore afterwards.
    std::thread::spawn(|| {
        let cpu = crate::current_cpu();
        if !pin_to(cpu) || crate::current_cpu() != cpu {
            println!("skipped: cannot pin the thread to CPU {cpu}");
            return;
        }
        let stack = Stack::new();
        for v in 1..=6u32 {
            stack.push(Node::new(v));
        }
        assert_eq!(stack.pop().map(Node::into_inner), Some(6), "pop");
        assert_eq!(
            stack.steal(cpu).unwrap().map(Node::into_inner),
            Some(5),
            "steal"
        );
        assert_eq!(stack.pop_value(), Some(4), "pop_value");
        let rest = stack.pop_all_on(cpu).unwrap();
        assert!(!rest.is_empty());
        assert_eq!(values(rest), [3, 2, 1], "pop_all_on");
        assert!(stack.pop().is_none(), "pop_all_on left nodes behind");
        assert!(stack.pop_all_on(cpu).unwrap().is_empty());
        // Pushes after the detach form a new list, LIFO again.
        for v in 7..=9u32 {
            stack.push_value(v);
        }
        assert_eq!(values(stack.pop_all()), [9, 8, 7], "pop_all");
        assert!(stack.pop_all().is_empty());
        stack.push(Node::new(10));
        assert_eq!(stack.pop_or_steal_value(), Some(10));
        assert_eq!(stack.pop_or_steal_value(), None);
    })
    .join()
    .expect("pinned thread");
}

/// Counts its drops.
struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        // Relaxed: read by the same thread (or after a join).
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A stack with 100 nodes pushed by 4 threads (with more than one CPU, likely on
/// several lists).
fn stack_of_100(drops: &Arc<AtomicUsize>) -> Stack<Tracked> {
    let stack = Arc::new(Stack::new());
    let pushers: Vec<_> = (0..4)
        .map(|_| {
            let (stack, drops) = (Arc::clone(&stack), Arc::clone(drops));
            std::thread::spawn(move || {
                for _ in 0..25 {
                    stack.push(Node::new(Tracked(Arc::clone(&drops))));
                }
            })
        })
        .collect();
    pushers.into_iter().for_each(|t| t.join().expect("pusher"));
    Arc::into_inner(stack).expect("the pushers are gone")
}

/// Dropping a `NodeList` frees the nodes it still holds, and dropping a `Stack` frees
/// the nodes left on its lists (every CPU's, not only the caller's): each once.
#[test]
fn dropping_a_stack_or_a_node_list_frees_every_node_left_once() {
    let _delay = delay_shared();
    let drops = Arc::new(AtomicUsize::new(0));

    let stack = stack_of_100(&drops);
    let lists: Vec<_> = (0..stack.slots())
        .map(|cpu| stack.pop_all_on(cpu).unwrap())
        .collect();
    drop(stack); // empty now: frees nothing
    assert_eq!(drops.load(Ordering::Relaxed), 0);
    // One node out of each list, the rest dropped with its list.
    let mut taken = Vec::new();
    for mut list in lists {
        taken.extend(list.next());
    }
    assert!(!taken.is_empty());
    assert_eq!(
        drops.load(Ordering::Relaxed),
        100 - taken.len(),
        "dropped lists"
    );
    drop(taken);
    assert_eq!(drops.load(Ordering::Relaxed), 100);

    let stack = stack_of_100(&drops);
    drop(stack);
    assert_eq!(drops.load(Ordering::Relaxed), 200, "dropped stack");
}

/// `pop_or_steal` on an empty list steals from the other CPUs "in turn (the next CPU
/// first)": up from the caller's CPU, wrapping around past the last. Needs three CPUs to
/// tell an order from its reverse: on fewer (this 2-CPU VM) it checks nothing and says
/// so; CI's VM lane runs it on 8.
#[test]
fn pop_or_steal_takes_from_the_next_cpus_in_turn_wrapping_around() {
    let cpus = allowed_cpus();
    if cpus.len() < 3 {
        println!("needs 3 CPUs to see an order, has {cpus:?}: nothing checked");
        return;
    }
    let (low, mid, high) = (cpus[0], cpus[1], cpus[2]);
    std::thread::spawn(move || {
        let stack = Stack::new();
        let push_on = |cpu: usize, value: u32| {
            assert!(pin_to(cpu), "pin to CPU {cpu}");
            stack.push_value(value);
        };
        // From `low`: `mid` comes before `high`.
        push_on(high, 3);
        push_on(mid, 2);
        assert!(pin_to(low), "pin to CPU {low}");
        assert_eq!(stack.pop_or_steal_value(), Some(2), "from CPU {low}");
        assert_eq!(stack.pop_or_steal_value(), Some(3), "from CPU {low}");
        // From `high`: around past the last CPU, so `low` comes before `mid`.
        push_on(mid, 2);
        push_on(low, 1);
        assert!(pin_to(high), "pin to CPU {high}");
        assert_eq!(stack.pop_or_steal_value(), Some(1), "from CPU {high}");
        assert_eq!(stack.pop_or_steal_value(), Some(2), "from CPU {high}");
        assert_eq!(stack.pop_or_steal_value(), None);
    })
    .join()
    .expect("the pinned thread");
}
