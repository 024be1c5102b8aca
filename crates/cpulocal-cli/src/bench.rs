//! `cpulocal bench`: cpulocal measured side by side with what it replaces.
//!
//! # Method
//!
//! For each thread count and each [`Group`], every row is a *subject*: some state and
//! one operation. A *run* of a row starts `threads` threads, lets them all pass a
//! barrier, and has each perform the same number of operations in a tight loop
//! (results and operands go through [`black_box`], so nothing is optimised away). Each
//! thread times its own loop; the run's ns/op is the mean of the threads' elapsed times
//! divided by the operations per thread.
//!
//! The operations per thread are calibrated once per row and thread count so that a run
//! lasts about [`Config::target_run`]. Then the rows are run interleaved (row A run 1,
//! row B run 1, …, row A run 2, …) so that a slow phase of the machine hits every row
//! alike, and each row reports the median of its runs (and the minimum).
//!
//! After every run (calibration included) the row's state is checked: the counters must
//! hold exactly `threads × ops`, and a CPU number must be below the possible CPUs. A row
//! that fails panics with the group, the row and the numbers, so a broken primitive
//! cannot hide behind a good time.

use core::fmt;
use core::str::FromStr;
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use cpulocal::ops::{self, Outcome};
use cpulocal::{sys, CachePadded, Counter};
use serde::Serialize;

/// A set of rows measured side by side, with one cpulocal row the others are compared to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    /// "Which CPU am I on": `current_cpu()` against glibc, the system call, the
    /// instructions and a plain thread-local load.
    CpuNumber,
    /// Counting from many threads: `Counter::add` against atomics, a mutex, the bare
    /// rseq primitive and a plain thread-local increment.
    Counter,
}

impl Group {
    /// Every group, in the order the bench runs them.
    pub const ALL: [Group; 2] = [Group::CpuNumber, Group::Counter];

    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Group::CpuNumber => "cpu-number",
            Group::Counter => "counter",
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Group {
    type Err = String;

    fn from_str(s: &str) -> Result<Group, String> {
        Group::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Group::ALL.iter().map(|g| g.name()).collect();
                format!(
                    "unknown group '{s}' (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// A list of thread counts, as `--threads 1,2,4` gives it: each at least 1, in the
/// order given, duplicates removed.
///
/// ```
/// use cpulocal_cli::bench::ThreadCounts;
/// assert_eq!("1,2,2,4".parse::<ThreadCounts>().unwrap().0, vec![1, 2, 4]);
/// assert!("0".parse::<ThreadCounts>().is_err());
/// assert!("".parse::<ThreadCounts>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadCounts(pub Vec<usize>);

/// The most threads one row may start.
pub const MAX_THREADS: usize = 4096;

impl FromStr for ThreadCounts {
    type Err = String;

    fn from_str(s: &str) -> Result<ThreadCounts, String> {
        if s.trim().is_empty() {
            return Err("expected a comma-separated list of thread counts, e.g. 1,2,4".into());
        }
        let mut counts = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let n: usize = part.parse().map_err(|_| {
                format!("'{part}' is not a thread count (expected a list such as 1,2,4)")
            })?;
            if n == 0 {
                return Err("thread counts must be at least 1".into());
            }
            if n > MAX_THREADS {
                return Err(format!(
                    "{n} threads is more than the limit of {MAX_THREADS}"
                ));
            }
            if !counts.contains(&n) {
                counts.push(n);
            }
        }
        Ok(ThreadCounts(counts))
    }
}

/// The default thread counts: 1 and the number of online CPUs (once if that is 1).
pub fn default_threads() -> Vec<usize> {
    let online = sys::online_cpus().clamp(1, MAX_THREADS);
    if online == 1 {
        vec![1]
    } else {
        vec![1, online]
    }
}

/// What to measure, and how long.
#[derive(Clone, Debug)]
pub struct Config {
    /// Thread counts, each measured in turn.
    pub threads: Vec<usize>,
    /// Groups, each measured in turn for every thread count.
    pub groups: Vec<Group>,
    /// Runs per row (the median is reported).
    pub runs: usize,
    /// Wall time one run of one row aims at.
    pub target_run: Duration,
}

impl Config {
    /// The settings of the command line: `threads` defaults to [`default_threads`],
    /// `group` to all; `quick` (for CI) cuts the runs and their length so the whole
    /// bench takes well under a few seconds.
    pub fn new(threads: Option<Vec<usize>>, quick: bool, group: Option<Group>) -> Config {
        Config {
            threads: threads.unwrap_or_else(default_threads),
            groups: group.map_or_else(|| Group::ALL.to_vec(), |g| vec![g]),
            runs: if quick { 3 } else { 7 },
            target_run: if quick {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(20)
            },
        }
    }
}

/// The measurement of one row at one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct RowResult {
    /// The group's name.
    pub group: &'static str,
    /// The row's name.
    pub name: &'static str,
    /// Whether this is the group's cpulocal row (its ratio is 1).
    pub cpulocal: bool,
    /// Threads running the operation at once.
    pub threads: usize,
    /// Median over the runs of the per-thread time per operation, in ns.
    pub ns_per_op: f64,
    /// The fastest run's ns/op.
    pub min_ns_per_op: f64,
    /// `ns_per_op` divided by the cpulocal row's (below 1: faster than cpulocal).
    pub ratio_to_cpulocal: f64,
    /// How many runs the median is taken over.
    pub runs: usize,
    /// Operations each thread performed in each run.
    pub ops_per_thread: u64,
}

impl RowResult {
    /// One JSON object, on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("RowResult serialises")
    }

    /// The heading of [`table_line`](Self::table_line)'s columns.
    pub fn table_heading() -> String {
        format!(
            "{:<11} {:<18} {:>7} {:>10} {:>10} {:>11}",
            "group", "row", "threads", "ns/op", "min", "vs cpulocal"
        )
    }

    /// One line of the text table; the cpulocal row is marked with `*`.
    pub fn table_line(&self) -> String {
        let name = if self.cpulocal {
            format!("{} *", self.name)
        } else {
            self.name.to_string()
        };
        format!(
            "{:<11} {:<18} {:>7} {:>10.2} {:>10.2} {:>10.2}x",
            self.group,
            name,
            self.threads,
            self.ns_per_op,
            self.min_ns_per_op,
            self.ratio_to_cpulocal
        )
    }
}

/// The line printed above the table: mechanism, kernel, CPUs, method.
pub fn header(config: &Config) -> String {
    format!(
        "cpulocal bench: {}; kernel {}; {} online CPUs ({} possible); median of {} runs of ~{} ms per row",
        cpulocal::mechanism(),
        sys::kernel_release(),
        sys::online_cpus(),
        cpulocal::possible_cpus(),
        config.runs,
        config.target_run.as_millis(),
    )
}

/// The rows of `group` this machine cannot run, with the reason (e.g. a CPU without
/// `RDPID`). Rows that exist only on other architectures are not listed.
pub fn skipped_rows(group: Group) -> Vec<String> {
    let mut notes = Vec::new();
    rows(group, &mut notes);
    notes
}

/// Measures every configured group at every thread count, calling `report` with the
/// rows of each (thread count, group) as soon as they are measured, and returns them
/// all.
///
/// # Panics
///
/// When a row's state is wrong after a run (see the [module documentation](self)).
pub fn run(config: &Config, mut report: impl FnMut(&[RowResult])) -> Vec<RowResult> {
    let mut all = Vec::new();
    for &threads in &config.threads {
        for &group in &config.groups {
            let results = measure_group(group, threads, config);
            report(&results);
            all.extend(results);
        }
    }
    all
}

fn measure_group(group: Group, threads: usize, config: &Config) -> Vec<RowResult> {
    let mut rows = rows(group, &mut Vec::new());
    let ops: Vec<u64> = rows
        .iter_mut()
        .map(|row| calibrate(group, row, threads, config.target_run))
        .collect();
    let mut samples = vec![Vec::with_capacity(config.runs); rows.len()];
    for _ in 0..config.runs {
        for (i, row) in rows.iter_mut().enumerate() {
            samples[i].push(checked_run(group, row, threads, ops[i]));
        }
    }
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    let base = rows
        .iter()
        .position(|r| r.cpulocal)
        .map(|i| medians[i])
        .expect("every group has a cpulocal row");
    rows.iter()
        .enumerate()
        .map(|(i, row)| RowResult {
            group: group.name(),
            name: row.name,
            cpulocal: row.cpulocal,
            threads,
            ns_per_op: medians[i],
            min_ns_per_op: samples[i].iter().copied().fold(f64::INFINITY, f64::min),
            ratio_to_cpulocal: medians[i] / base,
            runs: config.runs,
            ops_per_thread: ops[i],
        })
        .collect()
}

/// Finds the operations per thread that make one run of `row` last about `target`.
fn calibrate(group: Group, row: &mut Row, threads: usize, target: Duration) -> u64 {
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
fn checked_run(group: Group, row: &mut Row, threads: usize, ops: u64) -> f64 {
    row.subject.reset();
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
fn timed_run(subject: &dyn Subject, threads: usize, ops: u64) -> f64 {
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
fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    match samples.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => samples[n / 2],
        n => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

/// What a row measures.
trait Subject: Sync {
    /// Performs `ops` operations on the calling thread.
    fn work(&self, ops: u64);
    /// Forgets earlier runs.
    fn reset(&mut self);
    /// Checks the state after `expected` operations in all.
    fn check(&self, expected: u64) -> Result<(), String>;
}

struct Row {
    name: &'static str,
    cpulocal: bool,
    subject: Box<dyn Subject>,
}

impl Row {
    fn new(name: &'static str, subject: impl Subject + 'static) -> Row {
        Row {
            name,
            cpulocal: false,
            subject: Box::new(subject),
        }
    }

    fn cpulocal(name: &'static str, subject: impl Subject + 'static) -> Row {
        Row {
            cpulocal: true,
            ..Row::new(name, subject)
        }
    }
}

/// The rows of `group` on this machine; rows that cannot run here add a note instead.
fn rows(group: Group, notes: &mut Vec<String>) -> Vec<Row> {
    match group {
        Group::CpuNumber => cpu_number_rows(notes),
        Group::Counter => counter_rows(),
    }
}

// ---------------------------------------------------------------------------------
// cpu-number

thread_local! {
    /// The floor of the cpu-number group: a plain thread-local `u32`.
    static TLS_CPU: Cell<u32> = const { Cell::new(0) };
    /// The floor of the counter group: a plain thread-local `u64`.
    static TLS_COUNT: Cell<u64> = const { Cell::new(0) };
}

/// A source of the CPU number, called in the loop (inlined: `F` is a closure type).
struct CpuSource<F>(F);

impl<F: Fn() -> u32 + Sync> Subject for CpuSource<F> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            black_box((self.0)());
        }
    }

    fn reset(&mut self) {}

    fn check(&self, _expected: u64) -> Result<(), String> {
        let cpu = (self.0)();
        let possible = cpulocal::possible_cpus();
        if (cpu as usize) < possible {
            Ok(())
        } else {
            Err(format!(
                "returned CPU {cpu}, but only {possible} CPUs are possible"
            ))
        }
    }
}

fn glibc_sched_getcpu() -> u32 {
    // SAFETY: sched_getcpu has no preconditions. A failure (-1) becomes u32::MAX,
    // which the row's check rejects.
    unsafe { libc::sched_getcpu() as u32 }
}

fn getcpu_syscall() -> u32 {
    let mut cpu = u32::MAX;
    // SAFETY: `cpu` is a live local; the node and cache pointers may be null. A failure
    // leaves u32::MAX, which the row's check rejects.
    unsafe {
        libc::syscall(
            libc::SYS_getcpu,
            &mut cpu as *mut u32,
            core::ptr::null_mut::<u32>(),
            core::ptr::null_mut::<libc::c_void>(),
        )
    };
    cpu
}

fn cpu_number_rows(notes: &mut Vec<String>) -> Vec<Row> {
    let mut rows = vec![Row::cpulocal(
        "current_cpu",
        CpuSource(cpulocal::current_cpu),
    )];
    match sys::sched_getcpu() {
        Ok(_) => rows.push(Row::new("sched_getcpu", CpuSource(glibc_sched_getcpu))),
        Err(e) => notes.push(format!("sched_getcpu: fails here ({e:?})")),
    }
    match sys::getcpu_syscall() {
        Ok(_) => rows.push(Row::new("getcpu_syscall", CpuSource(getcpu_syscall))),
        Err(e) => notes.push(format!(
            "getcpu_syscall: the system call fails here ({e:?})"
        )),
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::arch::x86_64 as arch;
        if arch::has_rdpid() {
            rows.push(Row::new(
                "rdpid",
                // SAFETY: CPUID says the CPU has RDPID.
                CpuSource(|| unsafe { arch::rdpid_cpu() }),
            ));
        } else {
            notes.push("rdpid: the CPU lacks RDPID".into());
        }
        if arch::has_rdtscp() {
            rows.push(Row::new(
                "rdtscp",
                // SAFETY: CPUID says the CPU has RDTSCP.
                CpuSource(|| unsafe { arch::rdtscp_cpu() }),
            ));
        } else {
            notes.push("rdtscp: the CPU lacks RDTSCP".into());
        }
    }
    rows.push(Row::new("tls_load", TlsLoad));
    rows
}

/// The address of the calling thread's instance of a thread-local cell. The floors
/// access it with volatile loads and stores: exactly one `mov` each per operation,
/// which the compiler may neither keep in a register across iterations nor fold into
/// the constant initial value.
fn tls_ptr<T>(key: &'static std::thread::LocalKey<Cell<T>>) -> *mut T {
    key.with(Cell::as_ptr)
}

/// The floor of the cpu-number group: one load of a thread-local `u32`.
struct TlsLoad;

impl Subject for TlsLoad {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let cell = tls_ptr(&TLS_CPU);
        for _ in 0..ops {
            // SAFETY: `cell` is this thread's live `TLS_CPU`, which nothing else
            // references while the loop runs.
            black_box(unsafe { cell.read_volatile() });
        }
    }

    fn reset(&mut self) {}

    fn check(&self, _expected: u64) -> Result<(), String> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// counter

fn sum_check(what: &str, got: u64, expected: u64) -> Result<(), String> {
    if got == expected {
        Ok(())
    } else {
        Err(format!("{what} is {got}, expected {expected}"))
    }
}

fn per_cpu_slots<T: Default>() -> Box<[CachePadded<T>]> {
    (0..cpulocal::possible_cpus())
        .map(|_| CachePadded::new(T::default()))
        .collect()
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

    fn reset(&mut self) {
        *self.total.get_mut() = 0;
    }

    fn check(&self, expected: u64) -> Result<(), String> {
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

    fn reset(&mut self) {
        *self.v.get_mut() = 0;
    }

    fn check(&self, expected: u64) -> Result<(), String> {
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
            self.slots[cpulocal::current_cpu() as usize].fetch_add(black_box(1), Ordering::Relaxed);
        }
    }

    #[inline(always)]
    fn cas_loop(&self, ops: u64) {
        for _ in 0..ops {
            loop {
                let slot = &self.slots[cpulocal::current_cpu() as usize];
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

    fn reset(&mut self) {
        self.slots.iter_mut().for_each(|s| *s.get_mut() = 0);
    }

    fn check(&self, expected: u64) -> Result<(), String> {
        let sum = self
            .slots
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.load(Ordering::Relaxed)));
        sum_check("the sum of the per-CPU slots", sum, expected)
    }
}

/// A `Mutex<u64>` every thread adds to.
#[derive(Default)]
struct Locked {
    v: Mutex<u64>,
}

impl Subject for Locked {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            *self.v.lock().expect("bench mutex poisoned") += black_box(1);
        }
    }

    fn reset(&mut self) {
        *self.v.get_mut().expect("bench mutex poisoned") = 0;
    }

    fn check(&self, expected: u64) -> Result<(), String> {
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

    fn reset(&mut self) {
        self.counter.reset();
    }

    fn check(&self, expected: u64) -> Result<(), String> {
        sum_check("Counter::sum()", self.counter.sum(), expected)
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
                let cpu = cpulocal::current_cpu();
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

    fn reset(&mut self) {
        self.words.iter_mut().for_each(|w| *w.get_mut() = 0);
    }

    fn check(&self, expected: u64) -> Result<(), String> {
        let sum = self.words.iter().fold(0u64, |acc, w| {
            acc.wrapping_add(w.load(Ordering::Relaxed) as u64)
        });
        sum_check("the sum of the per-CPU words", sum, expected)
    }
}

fn counter_rows() -> Vec<Row> {
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
        Row::new("tls_add", TlsAdd::default()),
    ]
}

/// What each row name stands for, for the legend under the table.
pub const LEGEND: &[(&str, &str)] = &[
    (
        "current_cpu",
        "cpulocal::current_cpu(): one load from the thread's struct rseq",
    ),
    ("sched_getcpu", "glibc sched_getcpu() (vDSO)"),
    ("getcpu_syscall", "syscall(SYS_getcpu)"),
    ("rdpid", "RDPID instruction, CPU = TSC_AUX & 0xfff"),
    ("rdtscp", "RDTSCP instruction, CPU = TSC_AUX & 0xfff"),
    ("tls_load", "const thread_local! Cell<u32> read (the floor)"),
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
        "tls_add",
        "const thread_local! Cell<u64> increment (the floor)",
    ),
];

// ---------------------------------------------------------------------------------
// targets

/// One target from the issue, with what was measured. Reported, never asserted.
#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    /// What is promised.
    pub target: &'static str,
    /// The thread count the target is about.
    pub threads: usize,
    /// The measured ratio, `None` when the rows were not measured.
    pub measured: Option<f64>,
    /// `Some(true)`: met; `Some(false)`: missed; `None`: not measured.
    pub pass: Option<bool>,
}

impl fmt::Display for TargetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pass, self.measured) {
            (Some(pass), Some(m)) => write!(
                f,
                "{}  {} ({} thread{}): {m:.2}x",
                if pass { "PASS" } else { "MISS" },
                self.target,
                self.threads,
                if self.threads == 1 { "" } else { "s" }
            ),
            _ => write!(
                f,
                "----  {} ({} thread{}): not measured (needs that thread count and group)",
                self.target,
                self.threads,
                if self.threads == 1 { "" } else { "s" }
            ),
        }
    }
}

/// A target: the ratio `numerator ns / denominator ns` of two rows of `group` at
/// `threads` threads is at most (`at_most`) or at least `bound`.
struct TargetSpec {
    target: &'static str,
    group: Group,
    threads: usize,
    numerator: &'static str,
    denominator: &'static str,
    bound: f64,
    at_most: bool,
}

const TARGETS: [TargetSpec; 4] = [
    TargetSpec {
        target: "current_cpu() within 1.3x of a plain thread-local load",
        group: Group::CpuNumber,
        threads: 1,
        numerator: "current_cpu",
        denominator: "tls_load",
        bound: 1.3,
        at_most: true,
    },
    TargetSpec {
        target: "Counter::add within 1.2x of the hand-written rseq add",
        group: Group::Counter,
        threads: 1,
        numerator: "Counter::add",
        denominator: "rseq_add",
        bound: 1.2,
        at_most: true,
    },
    TargetSpec {
        target: "Counter::add at least 5x faster than a shared AtomicU64::fetch_add",
        group: Group::Counter,
        threads: 2,
        numerator: "shared_fetch_add",
        denominator: "Counter::add",
        bound: 5.0,
        at_most: false,
    },
    TargetSpec {
        target: "Counter::add at least 1.7x faster than per-CPU lock xadd",
        group: Group::Counter,
        threads: 2,
        numerator: "percpu_fetch_add",
        denominator: "Counter::add",
        bound: 1.7,
        at_most: false,
    },
];

/// The targets of the issue, evaluated on `results`.
pub fn targets(results: &[RowResult]) -> Vec<TargetReport> {
    let ns = |group: Group, name: &str, threads: usize| {
        results
            .iter()
            .find(|r| r.group == group.name() && r.name == name && r.threads == threads)
            .map(|r| r.ns_per_op)
    };
    TARGETS
        .iter()
        .map(|t| {
            let measured = ns(t.group, t.numerator, t.threads)
                .zip(ns(t.group, t.denominator, t.threads))
                .map(|(n, d)| n / d);
            TargetReport {
                target: t.target,
                threads: t.threads,
                measured,
                pass: measured.map(|m| {
                    if t.at_most {
                        m <= t.bound
                    } else {
                        m >= t.bound
                    }
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_lists_reject_zero_words_and_empty_items() {
        assert_eq!("4".parse::<ThreadCounts>().unwrap().0, vec![4]);
        assert_eq!(" 2, 1 ,2".parse::<ThreadCounts>().unwrap().0, vec![2, 1]);
        for bad in ["", " ", "0", "x", "1,,2", "1,", "-1", "1.5", "1,0", "99999"] {
            assert!(bad.parse::<ThreadCounts>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn groups_parse_by_their_names() {
        for g in Group::ALL {
            assert_eq!(g.name().parse::<Group>(), Ok(g));
        }
        assert!("cpu".parse::<Group>().is_err());
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn every_row_counts_exactly_on_two_threads() {
        for group in Group::ALL {
            for mut row in rows(group, &mut Vec::new()) {
                checked_run(group, &mut row, 2, 10_000);
            }
        }
    }

    #[test]
    #[should_panic(expected = "bench row counter/broken is broken")]
    fn a_row_that_loses_updates_is_noticed() {
        struct Lossy(AtomicU64);
        impl Subject for Lossy {
            fn work(&self, ops: u64) {
                self.0.fetch_add(ops - 1, Ordering::Relaxed);
            }
            fn reset(&mut self) {}
            fn check(&self, expected: u64) -> Result<(), String> {
                sum_check("lossy", self.0.load(Ordering::Relaxed), expected)
            }
        }
        checked_run(
            Group::Counter,
            &mut Row::new("broken", Lossy(AtomicU64::new(0))),
            1,
            10,
        );
    }

    #[test]
    fn every_group_has_one_cpulocal_row_and_legend_entries() {
        for group in Group::ALL {
            let rows = rows(group, &mut Vec::new());
            assert_eq!(rows.iter().filter(|r| r.cpulocal).count(), 1);
            for r in &rows {
                assert!(
                    LEGEND.iter().any(|(n, _)| *n == r.name),
                    "{} has no legend",
                    r.name
                );
            }
        }
    }

    #[test]
    fn targets_compare_the_right_rows() {
        let row = |group: Group, name, threads, ns| RowResult {
            group: group.name(),
            name,
            cpulocal: false,
            threads,
            ns_per_op: ns,
            min_ns_per_op: ns,
            ratio_to_cpulocal: 1.0,
            runs: 1,
            ops_per_thread: 1,
        };
        let results = [
            row(Group::CpuNumber, "current_cpu", 1, 1.0),
            row(Group::CpuNumber, "tls_load", 1, 0.5),
            row(Group::Counter, "Counter::add", 2, 1.0),
            row(Group::Counter, "shared_fetch_add", 2, 10.0),
            row(Group::Counter, "percpu_fetch_add", 2, 1.5),
        ];
        let t = targets(&results);
        assert_eq!(t[0].pass, Some(false));
        assert_eq!(t[0].measured, Some(2.0));
        assert_eq!(t[1].pass, None);
        assert_eq!(t[2].pass, Some(true));
        assert_eq!(t[3].pass, Some(false));
    }
}
