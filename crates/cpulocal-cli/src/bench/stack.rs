//! The `stack` group: a push then a pop per operation: `Stack` against mutex-guarded
//! `Vec`s (one global, one per CPU) and crossbeam's `SegQueue` and `ArrayQueue`.
//!
//! One operation is a push then a pop, of one item, by every row: the thread pushes the
//! item it holds and pops one (its own, in a LIFO, unless another thread got there
//! first). Every item is a `Box<Node<u64>>` (one pointer to move, the same for every
//! row), numbered when created. `reset` hands each thread one item from a pool made
//! before the run, so no row allocates in its loop; `SegQueue` still allocates a
//! 31-slot block every 31 pushes, which is how it works.
//!
//! A pop that finds nothing (cpulocal `Stack` and the per-CPU mutexes: the thread
//! migrated between its push and its pop, so its item is on another CPU's list) takes
//! an item from another CPU instead (`Stack::steal`, or the other mutexes) and is
//! counted; the row's events report them. After each run the check drains the container
//! and counts every item exactly once: none lost, none duplicated.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cpulocal::{CachePadded, Node, Stack};
use crossbeam_queue::{ArrayQueue, SegQueue};

use super::counter::TlsAdd;
use super::harness::{
    other_work, per_cpu_slots, sum_check, GroupDef, Row, Shape, Subject, TargetSpec, WorkOnly,
    WORK_SEED,
};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "stack",
    uses_remote_scheme: true,
    rows,
    layout_rows: Some(layout_rows),
    legend: &LEGEND,
    targets: &TARGETS,
    records_per_s: false,
    note: None,
    untimed: None,
};

/// What the stack group moves: a node numbered by its creation, alone on its cache
/// lines. The nodes are allocated one after another by the main thread, so 16-byte nodes
/// would share a line between the threads that each push and pop their own; `Stack`
/// writes its link into the node, and the 2-thread row measured that false sharing
/// (11 ns per push+pop against 3.3 at 1 thread), not the stack.
pub(super) type Item = Box<Node<ItemValue>>;

/// What an [`Item`] holds: its number.
pub(super) type ItemValue = CachePadded<u64>;

/// Item number `id`.
pub(super) fn new_item(id: u64) -> Item {
    Node::new(CachePadded::new(id))
}

/// A container that items are pushed to and popped from.
pub(super) trait Container: Sync {
    /// Puts `item` in.
    fn push(&self, item: Item);
    /// Takes an item out of the calling thread's part (the whole container, when it is
    /// not split); `None` when that part is empty.
    fn pop(&self) -> Option<Item>;
    /// After `pop` found nothing: one attempt at taking an item from anywhere.
    fn pop_elsewhere(&self) -> Option<Item> {
        self.pop()
    }
    /// Moves every item into `into`.
    fn drain(&self, into: &mut Vec<Item>);
    /// Makes room for the items of `threads` threads (called when the container is
    /// empty).
    fn prepare(&mut self, _threads: usize) {}
}

impl Container for Stack<ItemValue> {
    #[inline(always)]
    fn push(&self, item: Item) {
        Stack::push(self, item);
    }

    #[inline(always)]
    fn pop(&self) -> Option<Item> {
        Stack::pop(self)
    }

    fn pop_elsewhere(&self) -> Option<Item> {
        Stack::pop(self)
            .or_else(|| (0..self.slots()).find_map(|cpu| self.steal(cpu).expect("cpu < cpus")))
    }

    fn drain(&self, into: &mut Vec<Item>) {
        for cpu in 0..self.slots() {
            into.extend(self.pop_all_on(cpu).expect("cpu < cpus"));
        }
    }
}

/// One `Mutex<Vec>` for all threads.
#[derive(Default)]
struct GlobalMutexVec(Mutex<Vec<Item>>);

impl Container for GlobalMutexVec {
    #[inline(always)]
    fn push(&self, item: Item) {
        self.0.lock().expect("bench mutex poisoned").push(item);
    }

    #[inline(always)]
    fn pop(&self) -> Option<Item> {
        self.0.lock().expect("bench mutex poisoned").pop()
    }

    fn drain(&self, into: &mut Vec<Item>) {
        into.append(&mut self.0.lock().expect("bench mutex poisoned"));
    }

    fn prepare(&mut self, threads: usize) {
        self.0
            .get_mut()
            .expect("bench mutex poisoned")
            .reserve(threads);
    }
}

/// One cache-padded `Mutex<Vec>` per possible CPU, the calling thread's picked with
/// `current_cpu()` for each push and each pop.
struct PerCpuMutexVec(Box<[CachePadded<Mutex<Vec<Item>>>]>);

impl PerCpuMutexVec {
    fn new() -> PerCpuMutexVec {
        PerCpuMutexVec(per_cpu_slots())
    }

    #[inline(always)]
    fn mine(&self) -> &Mutex<Vec<Item>> {
        &self.0[cpulocal::current_cpu() % self.0.len()]
    }
}

impl Container for PerCpuMutexVec {
    #[inline(always)]
    fn push(&self, item: Item) {
        self.mine().lock().expect("bench mutex poisoned").push(item);
    }

    #[inline(always)]
    fn pop(&self) -> Option<Item> {
        self.mine().lock().expect("bench mutex poisoned").pop()
    }

    fn pop_elsewhere(&self) -> Option<Item> {
        self.0
            .iter()
            .find_map(|m| m.lock().expect("bench mutex poisoned").pop())
    }

    fn drain(&self, into: &mut Vec<Item>) {
        for m in self.0.iter() {
            into.append(&mut m.lock().expect("bench mutex poisoned"));
        }
    }

    fn prepare(&mut self, threads: usize) {
        for m in self.0.iter_mut() {
            m.get_mut().expect("bench mutex poisoned").reserve(threads);
        }
    }
}

impl Container for SegQueue<Item> {
    #[inline(always)]
    fn push(&self, item: Item) {
        SegQueue::push(self, item);
    }

    #[inline(always)]
    fn pop(&self) -> Option<Item> {
        SegQueue::pop(self)
    }

    fn drain(&self, into: &mut Vec<Item>) {
        while let Some(item) = SegQueue::pop(self) {
            into.push(item);
        }
    }
}

impl Container for ArrayQueue<Item> {
    #[inline(always)]
    fn push(&self, item: Item) {
        // Never full: it holds at most one item per thread, and has room for that many.
        ArrayQueue::push(self, item).expect("the ArrayQueue has room for every item");
    }

    #[inline(always)]
    fn pop(&self) -> Option<Item> {
        ArrayQueue::pop(self)
    }

    fn drain(&self, into: &mut Vec<Item>) {
        while let Some(item) = ArrayQueue::pop(self) {
            into.push(item);
        }
    }

    fn prepare(&mut self, threads: usize) {
        if self.capacity() < threads {
            *self = ArrayQueue::new(threads);
        }
    }
}

/// A push then a pop per operation on a [`Container`], each thread with one item.
pub(super) struct PushPop<C> {
    container: C,
    /// Items waiting for a thread: each takes one when it starts.
    pool: Mutex<Vec<Item>>,
    /// The items threads held when they finished, and what `check` drained.
    returned: Mutex<Vec<Item>>,
    /// Items created so far, numbered `0..created`.
    created: u64,
    /// Push+pop pairs done in this run.
    done: AtomicU64,
    /// Pops in this run that found the thread's part empty.
    empty_pops: AtomicU64,
    /// How the loop reaches the push and the pop.
    shape: Shape,
}

impl<C: Container> PushPop<C> {
    pub(super) fn new(container: C) -> PushPop<C> {
        PushPop::shaped(container, Shape::Inline)
    }

    /// Push+pop pairs in a caller [`Shape`].
    pub(super) fn shaped(container: C, shape: Shape) -> PushPop<C> {
        PushPop {
            shape,
            container,
            pool: Mutex::default(),
            returned: Mutex::default(),
            created: 0,
            done: AtomicU64::new(0),
            empty_pops: AtomicU64::new(0),
        }
    }

    /// After an empty pop: an item from anywhere. There is one: the thread holds none, so
    /// at most `threads - 1` of the `threads` items are held.
    #[cold]
    #[inline(never)]
    fn pop_elsewhere(&self) -> Item {
        let mut tries = 0u32;
        loop {
            if let Some(item) = self.container.pop_elsewhere() {
                return item;
            }
            tries += 1;
            if tries < 16 {
                core::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// [`Container::push`], never inlined: the push of [`Shape::Call`].
#[inline(never)]
fn push_out_of_line<C: Container>(container: &C, item: Item) {
    container.push(item);
}

/// [`Container::pop`], never inlined: the pop of [`Shape::Call`].
#[inline(never)]
fn pop_out_of_line<C: Container>(container: &C) -> Option<Item> {
    container.pop()
}

impl<C: Container> Subject for PushPop<C> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let mut held = self
            .pool
            .lock()
            .expect("bench mutex poisoned")
            .pop()
            .expect("reset leaves an item for every thread");
        let mut empty = 0;
        // One loop per shape (see `harness::run_shaped`), each keeping the item in a
        // register: push the item held, pop one (from anywhere if the part is empty).
        macro_rules! push_then_pop {
            ($push:expr, $pop:expr) => {{
                $push(&self.container, black_box(held));
                held = match $pop(&self.container) {
                    Some(item) => item,
                    None => {
                        empty += 1;
                        self.pop_elsewhere()
                    }
                };
            }};
        }
        match self.shape {
            Shape::Inline => {
                for _ in 0..ops {
                    push_then_pop!(C::push, C::pop);
                }
            }
            Shape::Call => {
                // Through `black_box`, so the calls cannot be inlined or devirtualised.
                let push: fn(&C, Item) = black_box(push_out_of_line::<C>);
                let pop: fn(&C) -> Option<Item> = black_box(pop_out_of_line::<C>);
                for _ in 0..ops {
                    push_then_pop!(push, pop);
                }
            }
            Shape::Work => {
                let mut x = black_box(WORK_SEED);
                for _ in 0..ops {
                    x = other_work(x);
                    push_then_pop!(C::push, C::pop);
                }
                black_box(x);
            }
        }
        self.returned
            .lock()
            .expect("bench mutex poisoned")
            .push(held);
        self.done.fetch_add(ops, Ordering::Relaxed);
        self.empty_pops.fetch_add(empty, Ordering::Relaxed);
    }

    fn reset(&mut self, threads: usize, _ops: u64) {
        let mut items = core::mem::take(self.returned.get_mut().expect("bench mutex poisoned"));
        self.container.drain(&mut items);
        let pool = self.pool.get_mut().expect("bench mutex poisoned");
        pool.append(&mut items);
        while pool.len() < threads {
            pool.push(new_item(self.created));
            self.created += 1;
        }
        self.container.prepare(threads);
        *self.done.get_mut() = 0;
        *self.empty_pops.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "the push+pop pairs",
            self.done.load(Ordering::Relaxed),
            expected,
        )?;
        let mut returned = self.returned.lock().expect("bench mutex poisoned");
        self.container.drain(&mut returned);
        let pool = self.pool.lock().expect("bench mutex poisoned");
        each_item_once(returned.iter().chain(pool.iter()), self.created)
    }

    fn events(&self) -> Option<(u64, &'static str)> {
        Some((
            self.empty_pops.load(Ordering::Relaxed),
            "pops found the CPU's part empty and took an item from another",
        ))
    }
}

/// Checks that `items` are exactly the items numbered `0..created`, each once.
pub(super) fn each_item_once<'a>(
    items: impl Iterator<Item = &'a Item>,
    created: u64,
) -> Result<(), String> {
    let mut seen = vec![false; created as usize];
    let mut count = 0u64;
    for item in items {
        let id = ****item;
        match seen.get_mut(id as usize) {
            Some(s) if !*s => *s = true,
            Some(_) => return Err(format!("item {id} is there twice")),
            None => return Err(format!("item {id} was never created")),
        }
        count += 1;
    }
    if count == created {
        Ok(())
    } else {
        Err(format!(
            "{count} items came back, expected {created}: {} lost",
            created - count
        ))
    }
}

fn rows(_notes: &mut Vec<String>) -> Vec<Row> {
    vec![
        Row::cpulocal("Stack::push+pop", PushPop::new(Stack::<ItemValue>::new())),
        Row::new("tls_add", TlsAdd::new(Shape::Inline)),
        Row::new("global_mutex_vec", PushPop::new(GlobalMutexVec::default())),
        Row::new("percpu_mutex_vec", PushPop::new(PerCpuMutexVec::new())),
        Row::new("SegQueue", PushPop::new(SegQueue::<Item>::new())),
        Row::new("ArrayQueue", PushPop::new(ArrayQueue::<Item>::new(1))),
    ]
}

/// What each row name stands for, for the legend under the table.
/// With `--layout`: `Stack` push+pop and the floor in the other caller shapes.
fn layout_rows() -> Vec<Row> {
    let stack = |shape| PushPop::shaped(Stack::<ItemValue>::new(), shape);
    vec![
        Row::cpulocal("Stack::push+pop [call]", stack(Shape::Call)).in_class(Shape::Call.class()),
        Row::new("tls_add [call]", TlsAdd::new(Shape::Call)).in_class(Shape::Call.class()),
        Row::cpulocal("Stack::push+pop [work]", stack(Shape::Work)).in_class(Shape::Work.class()),
        Row::new("tls_add [work]", TlsAdd::new(Shape::Work)).in_class(Shape::Work.class()),
        Row::new("work only", WorkOnly).in_class(Shape::Work.class()),
    ]
}

const LEGEND: [(&str, &str); 11] = [
    (
        "tls_add",
        "const thread_local! Cell<u64> increment (the floor of the counter group)",
    ),
    (
        "Stack::push+pop [call]",
        "the push and the pop each called through a function pointer, never inlined",
    ),
    (
        "Stack::push+pop [work]",
        "Stack push+pop with other work (12 dependent ALU ops) between pairs",
    ),
    (
        "tls_add [call]",
        "the floor, called through a function pointer",
    ),
    (
        "tls_add [work]",
        "the floor, with the same other work between increments",
    ),
    ("work only", "the other work of the [work] rows alone"),
    (
        "Stack::push+pop",
        "cpulocal::Stack push then pop of a node (an empty pop steals from another CPU)",
    ),
    (
        "global_mutex_vec",
        "one Mutex<Vec<Box<Node>>>: push, then pop",
    ),
    (
        "percpu_mutex_vec",
        "Mutex<Vec<Box<Node>>> per CPU at current_cpu(): push, then pop",
    ),
    ("SegQueue", "crossbeam_queue::SegQueue: push, then pop"),
    (
        "ArrayQueue",
        "crossbeam_queue::ArrayQueue (capacity: the threads): push, then pop",
    ),
];

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 2] = [
    TargetSpec {
        target: "Stack push+pop at least 3x faster than a Mutex<Vec>",
        threads: 2,
        numerator: "global_mutex_vec",
        denominator: "Stack::push+pop",
        bound: 3.0,
        at_most: false,
    },
    TargetSpec {
        target: "Stack push+pop within 3.6x of a thread-local increment (librseq's ratio)",
        threads: 1,
        numerator: "Stack::push+pop",
        denominator: "tls_add",
        bound: 3.6,
        at_most: true,
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::harness::checked_run;

    /// A container that replaces every 100th item pushed with one nobody created.
    struct Leaky {
        inner: GlobalMutexVec,
        pushes: AtomicU64,
    }

    impl Container for Leaky {
        fn push(&self, item: Item) {
            if self.pushes.fetch_add(1, Ordering::Relaxed) % 100 == 99 {
                // Lost, but kept alive so the pop side still finds an item.
                self.inner.push(new_item(***item + 1_000_000));
                drop(item);
            } else {
                self.inner.push(item);
            }
        }
        fn pop(&self) -> Option<Item> {
            self.inner.pop()
        }
        fn drain(&self, into: &mut Vec<Item>) {
            self.inner.drain(into);
        }
    }

    #[test]
    #[should_panic(expected = "was never created")]
    fn a_container_that_swaps_items_is_noticed() {
        let leaky = Leaky {
            inner: GlobalMutexVec::default(),
            pushes: AtomicU64::new(0),
        };
        checked_run(
            "stack",
            &mut Row::new("leaky", PushPop::new(leaky)),
            2,
            1_000,
        );
    }

    #[test]
    fn each_item_once_counts_lost_and_doubled_items() {
        let items: Vec<Item> = (0..3).map(new_item).collect();
        assert!(each_item_once(items.iter(), 3).is_ok());
        let lost = each_item_once(items.iter().take(2), 3).unwrap_err();
        assert!(lost.contains("1 lost"), "{lost}");
        let twice = each_item_once(items.iter().chain(&items[..1]), 3).unwrap_err();
        assert!(twice.contains("item 0 is there twice"), "{twice}");
    }
}
