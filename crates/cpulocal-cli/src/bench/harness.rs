//! What every group shares: the [`Subject`] a row measures, the [`Row`] around it, the
//! [`GroupDef`] a group registers, and the timed, calibrated, checked runs.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cpulocal::CachePadded;

/// A group as its module defines it; [`super::Group::ALL`] lists them.
pub(crate) struct GroupDef {
    /// The name used on the command line and in the output.
    pub(crate) name: &'static str,
    /// Whether the group's cpulocal rows depend on [`cpulocal::remote_scheme`] (its
    /// fast paths check, or take, a per-CPU lock).
    pub(crate) uses_remote_scheme: bool,
    /// The group's rows on this machine; rows that cannot run here add a note instead.
    pub(crate) rows: fn(&mut Vec<String>) -> Vec<Row>,
    /// With `--layout`: rows measuring the group's cpulocal operation (and its floor) in
    /// the other caller [`Shape`]s, appended to [`rows`](GroupDef::rows).
    pub(crate) layout_rows: Option<fn() -> Vec<Row>>,
    /// What each row name stands for, for the legend under the table.
    pub(crate) legend: &'static [(&'static str, &'static str)],
    /// The targets on the group's rows.
    pub(crate) targets: &'static [TargetSpec],
    /// Whether the rows report records per second (one operation is one record).
    pub(crate) records_per_s: bool,
    /// A note for every row of the group (e.g. the remote scheme).
    pub(crate) note: Option<fn() -> String>,
    /// For a group measured once instead of timed per thread count (`memory`): runs it
    /// (`true`: the quick version) and returns its report as text and as one JSON line.
    pub(crate) untimed: Option<fn(bool) -> (String, String)>,
}

/// A target: the ratio `numerator ns / denominator ns` of two rows of the group at
/// `threads` threads is at most (`at_most`) or at least `bound`.
pub(crate) struct TargetSpec {
    pub(crate) target: &'static str,
    pub(crate) threads: usize,
    pub(crate) numerator: &'static str,
    pub(crate) denominator: &'static str,
    pub(crate) bound: f64,
    pub(crate) at_most: bool,
}

/// How a row's loop reaches its operation (`cpulocal bench --layout` shows all three):
/// the same operation can cost differently depending on the code around it, and a fast
/// path must be fast in each, not only in the tightest loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// The operation inlined in a tight loop (the default rows).
    Inline,
    /// Each operation a call through a function pointer to an `#[inline(never)]`
    /// function: nothing is hoisted out of the loop, every call starts afresh.
    Call,
    /// [`other_work`] between two operations: the operation overlaps with unrelated
    /// dependent arithmetic, as in a program that does something besides counting.
    Work,
}

impl Shape {
    /// The class of the rows of this shape: each shape's rows are compared with the
    /// cpulocal row of the same shape.
    pub(crate) fn class(self) -> usize {
        // Apart from the classes groups use for their own rows (small numbers).
        match self {
            Shape::Inline => 0,
            Shape::Call => 101,
            Shape::Work => 102,
        }
    }
}

/// The work between two operations in [`Shape::Work`]: two xorshift steps, a chain of 12
/// dependent register operations that touch no memory.
#[inline(always)]
pub(crate) fn other_work(mut x: u64) -> u64 {
    for _ in 0..2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// One operation of a row, for [`run_shaped`]. Implementations mark `op`
/// `#[inline(always)]`, so each shape's loop gets its own inlined copy (the
/// [`Shape::Call`] loop calls [`call_out_of_line`], which holds that copy).
pub(crate) trait Op {
    /// Performs one operation.
    fn op(&self);
}

/// A closure as an [`Op`] (for small operations, which the compiler inlines anyway).
pub(crate) struct OpFn<F>(pub(crate) F);

impl<F: Fn()> Op for OpFn<F> {
    #[inline(always)]
    fn op(&self) {
        (self.0)();
    }
}

/// The state [`other_work`] starts from.
pub(crate) const WORK_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// Runs `o.op()` `ops` times in `shape`.
#[inline(always)]
pub(crate) fn run_shaped<O: Op>(shape: Shape, ops: u64, o: &O) {
    match shape {
        Shape::Inline => {
            for _ in 0..ops {
                o.op();
            }
        }
        Shape::Call => {
            // Through `black_box`, so the call cannot be inlined or devirtualised.
            let call: fn(&O) = black_box(call_out_of_line::<O>);
            for _ in 0..ops {
                call(o);
            }
        }
        Shape::Work => {
            let mut x = black_box(WORK_SEED);
            for _ in 0..ops {
                x = other_work(x);
                o.op();
            }
            black_box(x);
        }
    }
}

/// `o.op()`, never inlined: the [`Shape::Call`] of [`run_shaped`].
#[inline(never)]
pub(crate) fn call_out_of_line<O: Op>(o: &O) {
    o.op();
}

/// The cost of [`Shape::Work`]'s work alone (one "operation" is one [`other_work`]), to
/// read the `[work]` rows against.
pub(crate) struct WorkOnly;

impl Subject for WorkOnly {
    #[inline(never)]
    fn work(&self, ops: u64) {
        run_shaped(Shape::Work, ops, &OpFn(|| {}));
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {}

    fn check(&mut self, _expected: u64) -> Result<(), String> {
        Ok(())
    }
}

/// Finds the operations per thread that make one run of `row` last about `target`.
pub(crate) fn calibrate(group: &str, row: &mut Row, threads: usize, target: Duration) -> u64 {
    const MIN_OPS: u64 = 1_000;
    const MAX_OPS: u64 = 1 << 36;
    let target_ns = target.as_nanos() as f64;
    let mut ops = 1_024u64;
    loop {
        let took_ns = checked_run(group, row, threads, ops) * ops as f64;
        if took_ns >= target_ns / 8.0 || ops >= MAX_OPS {
            let scaled = ops as f64 * target_ns / took_ns.max(1.0);
            return (scaled as u64).clamp(MIN_OPS, MAX_OPS);
        }
        ops = (ops * 8).min(MAX_OPS);
    }
}

/// One run of `row`, then the check of its state. Returns ns/op.
pub(crate) fn checked_run(group: &str, row: &mut Row, threads: usize, ops: u64) -> f64 {
    row.subject.reset(threads, ops);
    let ns = timed_run(&*row.subject, threads, ops);
    let expected = threads as u64 * ops;
    if let Err(e) = row.subject.check(expected) {
        panic!(
            "bench row {group}/{} is broken on {threads} threads × {ops} ops: {e}",
            row.name
        );
    }
    ns
}

/// Starts `threads` threads at a barrier; each performs `ops` operations and times
/// itself. Returns the mean per-thread ns/op.
pub(crate) fn timed_run(subject: &dyn Subject, threads: usize, ops: u64) -> f64 {
    let barrier = Barrier::new(threads);
    let elapsed: Vec<Duration> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    // Registration (and any first-use cost) stays out of the timing.
                    cpulocal::register_current_thread();
                    barrier.wait();
                    let start = Instant::now();
                    subject.work(ops);
                    start.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a bench thread panicked"))
            .collect()
    });
    let total_ns: f64 = elapsed.iter().map(|d| d.as_nanos() as f64).sum();
    total_ns / threads as f64 / ops as f64
}

/// The median of `samples` (sorted in place); NaN for none.
pub(crate) fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    match samples.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => samples[n / 2],
        n => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

/// What a row measures.
pub(crate) trait Subject: Sync {
    /// Performs `ops` operations on the calling thread.
    fn work(&self, ops: u64);
    /// Forgets earlier runs and prepares the next: `threads` threads performing `ops`
    /// operations each (items to hand out, lists to prefill, a consumer to start).
    fn reset(&mut self, threads: usize, ops: u64);
    /// Checks the state after `expected` operations in all (the threads have joined:
    /// the check has the state to itself).
    fn check(&mut self, expected: u64) -> Result<(), String>;
    /// For rows that count something besides their time: the count of the last run
    /// (after its check) and what it counts.
    fn events(&self) -> Option<(u64, &'static str)> {
        None
    }
}

pub(crate) struct Row {
    pub(crate) name: &'static str,
    pub(crate) cpulocal: bool,
    /// The rows whose ratios are taken to the same cpulocal row share a class.
    pub(crate) class: usize,
    /// One operation is one record: the row reports records per second.
    pub(crate) records: bool,
    pub(crate) subject: Box<dyn Subject>,
}

impl Row {
    pub(crate) fn new(name: &'static str, subject: impl Subject + 'static) -> Row {
        Row {
            name,
            cpulocal: false,
            class: 0,
            records: false,
            subject: Box::new(subject),
        }
    }

    pub(crate) fn cpulocal(name: &'static str, subject: impl Subject + 'static) -> Row {
        Row {
            cpulocal: true,
            ..Row::new(name, subject)
        }
    }

    pub(crate) fn in_class(self, class: usize) -> Row {
        Row { class, ..self }
    }

    /// The row reports records per second (its group's other rows need not).
    pub(crate) fn per_record(self) -> Row {
        Row {
            records: true,
            ..self
        }
    }
}

/// `Ok` when the count `got` of `what` is `expected`.
pub(crate) fn sum_check(what: &str, got: u64, expected: u64) -> Result<(), String> {
    if got == expected {
        Ok(())
    } else {
        Err(format!("{what} is {got}, expected {expected}"))
    }
}

/// One cache-padded `T::default()` per possible CPU.
pub(crate) fn per_cpu_slots<T: Default>() -> Box<[CachePadded<T>]> {
    (0..cpulocal::possible_cpus())
        .map(|_| CachePadded::new(T::default()))
        .collect()
}

/// The floor's increment, `tls_add`'s: a volatile load, `+ black_box(1)`, a volatile
/// store. The lock group's critical sections, and the counter group's `mutex` row, run it
/// too, so that a row's ratio to the floor is what the row adds around the same
/// increment, not the compiler's choice of instruction for `*v += black_box(1)`: a
/// memory-destination `add` from a register, which in a loop on the Intel Xeon VM of
/// 2026-12-05 (family 6 model 167) costs about 0.6 ns more than a load, add and store (a
/// C replica of `with_cpu`'s loop, only that instruction changed: 1.97 against 1.37 ns).
#[inline(always)]
pub(crate) fn floor_increment(v: &mut u64) {
    let v: *mut u64 = v;
    // SAFETY: `v` comes from a `&mut u64`: valid, aligned and not accessed otherwise.
    unsafe { v.write_volatile(v.read_volatile() + black_box(1)) };
}

/// The address of the calling thread's instance of a thread-local cell. The floors
/// access it with volatile loads and stores: exactly one `mov` each per operation,
/// which the compiler may neither keep in a register across iterations nor fold into
/// the constant initial value.
pub(crate) fn tls_ptr<T>(key: &'static std::thread::LocalKey<Cell<T>>) -> *mut T {
    key.with(Cell::as_ptr)
}
