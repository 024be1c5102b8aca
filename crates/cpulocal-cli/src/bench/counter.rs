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

use super::harness::{per_cpu_slots, sum_check, tls_ptr, GroupDef, Row, Subject, TargetSpec};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "counter",
    uses_remote_scheme: false,
    rows,
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

/// The floor: a thread-local `Cell<u64>` incremented; each thread adds its count to
/// `total` when done.
#[derive(Default)]
struct TlsAdd {
    total: AtomicU64,
}

impl Subject for TlsAdd {
    #[inline(never)]
    fn work(&self, ops: u64) {
        TLS_COUNT.set(0);
        let cell = tls_ptr(&TLS_COUNT);
        for _ in 0..ops {
            // SAFETY: `cell` is this thread's live `TLS_COUNT`, which nothing else
            // references while the loop runs.
            unsafe { cell.write_volatile(cell.read_volatile() + black_box(1)) };
        }
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
            *self.v.lock().expect("bench mutex poisoned") += black_box(1);
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

/// cpulocal's `Counter`.
#[derive(Default)]
struct CounterAdd {
    counter: Counter,
}

impl Subject for CounterAdd {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            self.counter.add(black_box(1));
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
        Row::cpulocal("Counter::add", CounterAdd::default()),
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
        Row::new("tls_add", TlsAdd::default()),
        Row::cpulocal("Counter::sum", CounterSum::default()).in_class(1),
        Row::new("padded_sum", PaddedSum::default()).in_class(1),
    ]
}

/// What each row name stands for, for the legend under the table.
const LEGEND: [(&str, &str); 10] = [
    ("Counter::add", "cpulocal::Counter::add"),
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
    ("mutex", "Mutex<u64>"),
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
const TARGETS: [TargetSpec; 3] = [
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
];
