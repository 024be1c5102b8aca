//! The `counter` group: counting from many threads: `Counter::add` against atomics, a
//! mutex, the bare rseq primitive, the `thread_local` crate and a plain thread-local
//! increment.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use cpulocal::ops::{self, Outcome};
use cpulocal::{CachePadded, Counter};
use thread_local::ThreadLocal;

use super::harness::{
    floor_increment, per_cpu_slots, run_shaped, sum_check, tls_ptr, GroupDef, OpFn, Row, Shape,
    Subject, TargetSpec, WorkOnly,
};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "counter",
    uses_remote_scheme: false,
    rows,
    layout_rows: Some(layout_rows),
    legend: &LEGEND,
    targets: &TARGETS,
    records_per_s: false,
    note: None,
    untimed: None,
};

thread_local! {
    /// The floor of the counter group: a plain thread-local `u64`.
    static TLS_COUNT: Cell<u64> = const { Cell::new(0) };
}

/// The floor: a thread-local `Cell<u64>` incremented (in a caller [`Shape`]); each
/// thread adds its count to `total` when done. The stack and lock groups carry it too,
/// so their targets against the floor are ratios within one run.
pub(super) struct TlsAdd {
    total: AtomicU64,
    shape: Shape,
}

impl TlsAdd {
    pub(super) fn new(shape: Shape) -> TlsAdd {
        TlsAdd {
            total: AtomicU64::new(0),
            shape,
        }
    }
}

impl Subject for TlsAdd {
    #[inline(never)]
    fn work(&self, ops: u64) {
        TLS_COUNT.set(0);
        let cell = tls_ptr(&TLS_COUNT);
        run_shaped(
            self.shape,
            ops,
            &OpFn(|| {
                // SAFETY: `cell` is this thread's live `TLS_COUNT`, which nothing else
                // references while the loop runs.
                floor_increment(unsafe { &mut *cell });
            }),
        );
        self.total.fetch_add(TLS_COUNT.get(), Ordering::Relaxed);
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        *self.total.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "the sum of the thread-local counts",
            self.total.load(Ordering::Relaxed),
            expected,
        )
    }
}

/// One `AtomicU64` every thread adds to.
#[derive(Default)]
struct SharedAtomic {
    v: CachePadded<AtomicU64>,
}

impl Subject for SharedAtomic {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            self.v.fetch_add(black_box(1), Ordering::Relaxed);
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        *self.v.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "the shared atomic",
            self.v.load(Ordering::Relaxed),
            expected,
        )
    }
}

/// Per-CPU slots indexed by `current_cpu()`, updated with `fetch_add` (`lock xadd`)
/// or, with `cas`, a `compare_exchange` loop (`lock cmpxchg`).
struct PerCpuAtomic {
    slots: Box<[CachePadded<AtomicU64>]>,
    cas: bool,
}

impl PerCpuAtomic {
    fn new(cas: bool) -> PerCpuAtomic {
        PerCpuAtomic {
            slots: per_cpu_slots(),
            cas,
        }
    }

    #[inline(always)]
    fn fetch_add_loop(&self, ops: u64) {
        for _ in 0..ops {
            self.slots[cpulocal::current_cpu()].fetch_add(black_box(1), Ordering::Relaxed);
        }
    }

    #[inline(always)]
    fn cas_loop(&self, ops: u64) {
        for _ in 0..ops {
            loop {
                let slot = &self.slots[cpulocal::current_cpu()];
                let old = slot.load(Ordering::Relaxed);
                let new = old.wrapping_add(black_box(1));
                if slot
                    .compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    break;
                }
            }
        }
    }
}

impl Subject for PerCpuAtomic {
    #[inline(never)]
    fn work(&self, ops: u64) {
        if self.cas {
            self.cas_loop(ops)
        } else {
            self.fetch_add_loop(ops)
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.slots.iter_mut().for_each(|s| *s.get_mut() = 0);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let sum = self
            .slots
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.load(Ordering::Relaxed)));
        sum_check("the sum of the per-CPU slots", sum, expected)
    }
}

/// A `Mutex<u64>` every thread adds to.
#[derive(Default)]
pub(super) struct Locked {
    v: Mutex<u64>,
}

impl Subject for Locked {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            floor_increment(&mut self.v.lock().expect("bench mutex poisoned"));
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        *self.v.get_mut().expect("bench mutex poisoned") = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "the mutex's value",
            *self.v.lock().expect("bench mutex poisoned"),
            expected,
        )
    }
}

/// How a [`CounterAdd`] row adds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Count {
    /// `add(1)`: the count a caller writes, a constant.
    One,
    /// `inc()`: the count in the instruction.
    Inc,
    /// `add(n)` with `n` known only at run time (read once through `black_box`, then
    /// kept in a register).
    RunTime,
}

/// cpulocal's `Counter`, in a caller [`Shape`].
struct CounterAdd {
    counter: Counter,
    shape: Shape,
    count: Count,
}

impl CounterAdd {
    fn new(shape: Shape, count: Count) -> CounterAdd {
        CounterAdd {
            counter: Counter::new(),
            shape,
            count,
        }
    }
}

impl Subject for CounterAdd {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let c = &self.counter;
        match self.count {
            Count::One => run_shaped(self.shape, ops, &OpFn(|| c.add(1))),
            Count::Inc => run_shaped(self.shape, ops, &OpFn(|| c.inc())),
            Count::RunTime => {
                let n = black_box(1);
                run_shaped(self.shape, ops, &OpFn(|| c.add(n)));
            }
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.counter.reset();
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("Counter::sum()", self.counter.sum(), expected)
    }
}

/// `Counter::sum` of a counter holding 1 (class 1): one 16-byte slot read per CPU. Each
/// thread adds up what it read, so the check sees every sum was 1.
struct CounterSum {
    counter: Counter,
    total: AtomicU64,
}

impl Default for CounterSum {
    fn default() -> Self {
        let counter = Counter::new();
        counter.add(1);
        CounterSum {
            counter,
            total: AtomicU64::new(0),
        }
    }
}

impl Subject for CounterSum {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let mut total = 0u64;
        for _ in 0..ops {
            total += black_box(&self.counter).sum();
        }
        self.total.fetch_add(total, Ordering::Relaxed);
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        *self.total.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("the sums read", *self.total.get_mut(), expected)
    }
}

/// The floor of class 1, and the layout before the per-CPU pool: one cache-padded
/// `(local, remote)` pair per possible CPU, both words read, as `Counter::sum` did then.
struct PaddedSum {
    slots: Box<[CachePadded<[AtomicU64; 2]>]>,
    total: AtomicU64,
}

impl Default for PaddedSum {
    fn default() -> Self {
        let slots = per_cpu_slots::<[AtomicU64; 2]>();
        slots[0][0].store(1, Ordering::Relaxed);
        PaddedSum {
            slots,
            total: AtomicU64::new(0),
        }
    }
}

impl Subject for PaddedSum {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let mut total = 0u64;
        for _ in 0..ops {
            total += black_box(&self.slots).iter().fold(0u64, |acc, s| {
                acc.wrapping_add(s[1].load(Ordering::Acquire))
                    .wrapping_add(s[0].load(Ordering::Relaxed))
            });
        }
        self.total.fetch_add(total, Ordering::Relaxed);
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        *self.total.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("the sums read", *self.total.get_mut(), expected)
    }
}

/// The hand-written reference: `ops::add` on per-CPU words, retried until it commits.
/// The primitive without the structure (no slow path, no remote slot).
struct RseqAdd {
    words: Box<[CachePadded<AtomicUsize>]>,
}

/// Aborts in a row after which the reference row gives up: only a thread that cannot
/// use rseq in a process that does gets that many (see `cpulocal::ops`, contract item 3).
const MAX_ABORTS_IN_A_ROW: u32 = 1_000_000;

impl Subject for RseqAdd {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            let mut aborts = 0u32;
            loop {
                let cpu = cpulocal::current_cpu() as u32;
                let word = self.words[cpu as usize].as_ptr();
                // SAFETY: (contract of `cpulocal::ops`) 1. `words[cpu]` is written only
                // here, by `ops::add` naming `cpu`; 2. `check` reads the words
                // atomically, after the threads joined; 3. the loop is bounded below.
                match unsafe { ops::add(word, black_box(1), cpu) } {
                    Outcome::Committed(()) => break,
                    Outcome::Aborted => {
                        aborts += 1;
                        assert!(
                            aborts < MAX_ABORTS_IN_A_ROW,
                            "ops::add aborted {aborts} times in a row: this thread cannot use rseq"
                        );
                    }
                    Outcome::CompareFailed => unreachable!("ops::add does not compare"),
                }
            }
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.words.iter_mut().for_each(|w| *w.get_mut() = 0);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let sum = self.words.iter().fold(0u64, |acc, w| {
            acc.wrapping_add(w.load(Ordering::Relaxed) as u64)
        });
        sum_check("the sum of the per-CPU words", sum, expected)
    }
}

/// The `thread_local` crate: one `Cell<u64>` per thread in a `ThreadLocal`, looked up
/// with `get_or` on every operation (through `black_box`, so the lookup is not hoisted
/// out of the loop), then incremented. The check iterates the cells.
#[derive(Default)]
struct ThreadLocalAdd {
    cells: ThreadLocal<Cell<u64>>,
}

impl Subject for ThreadLocalAdd {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            let cell = black_box(&self.cells).get_or(|| Cell::new(0));
            cell.set(cell.get() + black_box(1));
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        // Zeroed, not cleared: the cells of finished threads are reused by the next
        // threads (the crate recycles thread ids), so no run allocates after the first.
        self.cells.iter_mut().for_each(|c| c.set(0));
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let sum = self
            .cells
            .iter_mut()
            .fold(0u64, |acc, c| acc.wrapping_add(c.get()));
        sum_check("the sum of the ThreadLocal cells", sum, expected)
    }
}

fn rows(_notes: &mut Vec<String>) -> Vec<Row> {
    vec![
        Row::cpulocal("Counter::add", CounterAdd::new(Shape::Inline, Count::One)),
        Row::new(
            "rseq_add",
            RseqAdd {
                words: per_cpu_slots(),
            },
        ),
        Row::new("percpu_fetch_add", PerCpuAtomic::new(false)),
        Row::new("percpu_cas", PerCpuAtomic::new(true)),
        Row::new("shared_fetch_add", SharedAtomic::default()),
        Row::new("mutex", Locked::default()),
        Row::new("ThreadLocal<Cell>", ThreadLocalAdd::default()),
        Row::new("tls_add", TlsAdd::new(Shape::Inline)),
        Row::cpulocal("Counter::sum", CounterSum::default()).in_class(1),
        Row::new("padded_sum", PaddedSum::default()).in_class(1),
    ]
}

/// With `--layout`: `Counter::add` and the floor in the other caller shapes, and the
/// other ways to pass the count.
fn layout_rows() -> Vec<Row> {
    vec![
        Row::new("Counter::inc", CounterAdd::new(Shape::Inline, Count::Inc)),
        Row::new(
            "Counter::add(n)",
            CounterAdd::new(Shape::Inline, Count::RunTime),
        ),
        Row::cpulocal(
            "Counter::add [call]",
            CounterAdd::new(Shape::Call, Count::One),
        )
        .in_class(Shape::Call.class()),
        Row::new("tls_add [call]", TlsAdd::new(Shape::Call)).in_class(Shape::Call.class()),
        Row::cpulocal(
            "Counter::add [work]",
            CounterAdd::new(Shape::Work, Count::One),
        )
        .in_class(Shape::Work.class()),
        Row::new("tls_add [work]", TlsAdd::new(Shape::Work)).in_class(Shape::Work.class()),
        Row::new("work only", WorkOnly).in_class(Shape::Work.class()),
    ]
}

/// What each row name stands for, for the legend under the table.
const LEGEND: [(&str, &str); 17] = [
    (
        "Counter::add",
        "cpulocal::Counter::add(1), inlined in a tight loop",
    ),
    (
        "Counter::inc",
        "cpulocal::Counter::inc (the count in the instruction)",
    ),
    (
        "Counter::add(n)",
        "cpulocal::Counter::add(n), n known at run time only (in a register)",
    ),
    (
        "Counter::add [call]",
        "Counter::add(1) called through a function pointer, never inlined",
    ),
    (
        "Counter::add [work]",
        "Counter::add(1) with other work (12 dependent ALU ops) between calls",
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
        "rseq_add",
        "cpulocal::ops::add on per-CPU words, retry loop (hand-written reference)",
    ),
    (
        "percpu_fetch_add",
        "per-CPU AtomicU64::fetch_add at current_cpu() (lock xadd)",
    ),
    (
        "percpu_cas",
        "per-CPU compare_exchange loop at current_cpu() (lock cmpxchg)",
    ),
    (
        "shared_fetch_add",
        "one AtomicU64::fetch_add shared by all threads",
    ),
    ("mutex", "Mutex<u64>: lock, add 1 as the floor does"),
    (
        "ThreadLocal<Cell>",
        "thread_local crate: ThreadLocal<Cell<u64>>::get_or, then increment",
    ),
    (
        "tls_add",
        "const thread_local! Cell<u64> increment (the floor)",
    ),
    (
        "Counter::sum",
        "cpulocal::Counter::sum of a counter (one 16-byte pool slot per CPU; its own class)",
    ),
    (
        "padded_sum",
        "sum of one 128-byte padded (local, remote) pair per CPU: Counter::sum's layout before the pool (the floor of Counter::sum)",
    ),
];

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 5] = [
    TargetSpec {
        target: "Counter::add within 1.2x of the hand-written rseq add",
        threads: 1,
        numerator: "Counter::add",
        denominator: "rseq_add",
        bound: 1.2,
        at_most: true,
    },
    TargetSpec {
        target: "Counter::add at least 5x faster than a shared AtomicU64::fetch_add",
        threads: 2,
        numerator: "shared_fetch_add",
        denominator: "Counter::add",
        bound: 5.0,
        at_most: false,
    },
    TargetSpec {
        target: "Counter::add at least 1.7x faster than per-CPU lock xadd",
        threads: 2,
        numerator: "percpu_fetch_add",
        denominator: "Counter::add",
        bound: 1.7,
        at_most: false,
    },
    TargetSpec {
        target: "Counter::add no slower than the thread_local crate's ThreadLocal<Cell>",
        threads: 1,
        numerator: "Counter::add",
        denominator: "ThreadLocal<Cell>",
        bound: 1.0,
        at_most: true,
    },
    TargetSpec {
        target: "Counter::add within 1.3x of a plain thread-local increment",
        threads: 1,
        numerator: "Counter::add",
        denominator: "tls_add",
        bound: 1.3,
        at_most: true,
    },
];
