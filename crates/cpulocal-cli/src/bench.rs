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
//! hold exactly `threads × ops`, a CPU number must be below the possible CPUs, a
//! container must hand back every item it was given exactly once, and a queue of records
//! must deliver every record that was not counted as discarded. A row that fails panics
//! with the group, the row and the numbers, so a broken primitive cannot hide behind a
//! good time.
//!
//! What a row needs before it can run (items to push, prefilled lists, a consumer
//! thread) is set up between runs, outside the timing; no row allocates in its loop
//! unless allocating is part of what it stands for (the records of a channel). Each
//! group's section below says what its rows include.
//!
//! Every row's ratio is to the cpulocal row of its *class*: the group's one cpulocal row,
//! except in the `ring` group, where each record size is a class of its own.

use core::fmt;
use core::str::FromStr;
use std::cell::Cell;
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use cpulocal::ops::{self, Outcome};
use cpulocal::remote::Scheme;
use cpulocal::ring::{Mode, ReserveError, RingBuffer, RingConfig};
use cpulocal::{sys, CachePadded, Counter, Node, PerCpu, Stack};
use crossbeam_queue::{ArrayQueue, SegQueue};
use serde::Serialize;
use thread_local::ThreadLocal;

/// A set of rows measured side by side, with one cpulocal row the others are compared to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    /// "Which CPU am I on": `current_cpu()` against glibc, the system call, the
    /// instructions and a plain thread-local load.
    CpuNumber,
    /// Counting from many threads: `Counter::add` against atomics, a mutex, the bare
    /// rseq primitive, the `thread_local` crate and a plain thread-local increment.
    Counter,
    /// A push then a pop per operation: `Stack` against mutex-guarded `Vec`s (one
    /// global, one per CPU) and crossbeam's `SegQueue` and `ArrayQueue`.
    Stack,
    /// A short critical section per operation: `PerCpu::with_cpu` against a global
    /// `Mutex` and one `Mutex` per CPU.
    Lock,
    /// Reaching another CPU's data: `PerCpu::on_cpu` and `Stack::steal` (a membarrier
    /// system call each, under the membarrier scheme), against a local push+pop.
    Remote,
    /// Records of 16, 64 and 256 bytes: `RingBuffer` reserve+write+commit against a
    /// `Mutex<VecDeque<Vec<u8>>>`, a crossbeam channel and a thread-local `Vec<u8>`.
    Ring,
}

impl Group {
    /// Every group, in the order the bench runs them.
    pub const ALL: [Group; 6] = [
        Group::CpuNumber,
        Group::Counter,
        Group::Stack,
        Group::Lock,
        Group::Remote,
        Group::Ring,
    ];

    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Group::CpuNumber => "cpu-number",
            Group::Counter => "counter",
            Group::Stack => "stack",
            Group::Lock => "lock",
            Group::Remote => "remote",
            Group::Ring => "ring",
        }
    }

    /// Whether the group's cpulocal rows depend on [`cpulocal::remote_scheme`] (its
    /// fast paths check, or take, a per-CPU lock).
    fn uses_remote_scheme(self) -> bool {
        matches!(
            self,
            Group::Stack | Group::Lock | Group::Remote | Group::Ring
        )
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
    /// Whether this is a cpulocal row its group's ratios are taken to (its ratio is 1).
    pub cpulocal: bool,
    /// Threads running the operation at once.
    pub threads: usize,
    /// Median over the runs of the per-thread time per operation, in ns.
    pub ns_per_op: f64,
    /// The fastest run's ns/op.
    pub min_ns_per_op: f64,
    /// `ns_per_op` divided by the cpulocal row's (below 1: faster than cpulocal); in the
    /// `ring` group, by the cpulocal row of the same record size.
    pub ratio_to_cpulocal: f64,
    /// How many runs the median is taken over.
    pub runs: usize,
    /// Operations each thread performed in each run.
    pub ops_per_thread: u64,
    /// Records per second, all threads together (`threads × 10⁹ / ns_per_op`): the
    /// `ring` group's rows only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records_per_s: Option<f64>,
    /// For rows that count something besides their time (records refused by a full
    /// ring, pops that found their CPU's list empty, …): the count over the measured
    /// runs. `note` says what it counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// What `events` counts when it is not 0, and in the `remote` group the active
    /// [`cpulocal::remote_scheme`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
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

    /// One line of the text table; the cpulocal row is marked with `*`; records/s and
    /// the note follow when the row has them.
    pub fn table_line(&self) -> String {
        let name = if self.cpulocal {
            format!("{} *", self.name)
        } else {
            self.name.to_string()
        };
        let mut line = format!(
            "{:<11} {:<18} {:>7} {:>10.2} {:>10.2} {:>10.2}x",
            self.group,
            name,
            self.threads,
            self.ns_per_op,
            self.min_ns_per_op,
            self.ratio_to_cpulocal
        );
        if let Some(r) = self.records_per_s {
            line += &format!(" {:>8.1} M records/s", r / 1e6);
        }
        if let Some(note) = &self.note {
            line += &format!("  ({note})");
        }
        line
    }
}

/// The line printed above the table: mechanism, kernel, CPUs, method; and a second line
/// with the remote scheme when a configured group depends on it.
pub fn header(config: &Config) -> String {
    let mut header = format!(
        "cpulocal bench: {}; kernel {}; {} online CPUs ({} possible); median of {} runs of ~{} ms per row",
        cpulocal::mechanism(),
        sys::kernel_release(),
        sys::online_cpus(),
        cpulocal::possible_cpus(),
        config.runs,
        config.target_run.as_millis(),
    );
    if config.groups.iter().any(|g| g.uses_remote_scheme()) {
        header += &format!("\nremote scheme: {}", cpulocal::remote_scheme());
    }
    header
}

/// The active remote scheme in one word, for the `remote` group's notes.
fn scheme_name() -> &'static str {
    match cpulocal::remote_scheme() {
        Scheme::Membarrier => "membarrier",
        Scheme::Locked(_) => "locked",
    }
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
    let mut events: Vec<Option<(u64, &'static str)>> = vec![None; rows.len()];
    for _ in 0..config.runs {
        for (i, row) in rows.iter_mut().enumerate() {
            samples[i].push(checked_run(group, row, threads, ops[i]));
            if let Some((n, what)) = row.subject.events() {
                events[i].get_or_insert((0, what)).0 += n;
            }
        }
    }
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    let base = |class: usize| {
        rows.iter()
            .position(|r| r.cpulocal && r.class == class)
            .map(|i| medians[i])
            .expect("every class of rows has a cpulocal row")
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let mut note = Vec::new();
            if group == Group::Remote {
                note.push(format!("scheme: {}", scheme_name()));
            }
            if let Some((n @ 1.., what)) = events[i] {
                note.push(format!("{n} {what} in {} runs", config.runs));
            }
            RowResult {
                group: group.name(),
                name: row.name,
                cpulocal: row.cpulocal,
                threads,
                ns_per_op: medians[i],
                min_ns_per_op: samples[i].iter().copied().fold(f64::INFINITY, f64::min),
                ratio_to_cpulocal: medians[i] / base(row.class),
                runs: config.runs,
                ops_per_thread: ops[i],
                records_per_s: (group == Group::Ring).then(|| threads as f64 * 1e9 / medians[i]),
                events: events[i].map(|(n, _)| n),
                note: (!note.is_empty()).then(|| note.join("; ")),
            }
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

struct Row {
    name: &'static str,
    cpulocal: bool,
    /// The rows whose ratios are taken to the same cpulocal row share a class.
    class: usize,
    subject: Box<dyn Subject>,
}

impl Row {
    fn new(name: &'static str, subject: impl Subject + 'static) -> Row {
        Row {
            name,
            cpulocal: false,
            class: 0,
            subject: Box::new(subject),
        }
    }

    fn cpulocal(name: &'static str, subject: impl Subject + 'static) -> Row {
        Row {
            cpulocal: true,
            ..Row::new(name, subject)
        }
    }

    fn in_class(self, class: usize) -> Row {
        Row { class, ..self }
    }
}

/// The rows of `group` on this machine; rows that cannot run here add a note instead.
fn rows(group: Group, notes: &mut Vec<String>) -> Vec<Row> {
    match group {
        Group::CpuNumber => cpu_number_rows(notes),
        Group::Counter => counter_rows(),
        Group::Stack => stack_rows(),
        Group::Lock => lock_rows(),
        Group::Remote => remote_rows(),
        Group::Ring => ring_rows(),
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

    fn reset(&mut self, _threads: usize, _ops: u64) {}

    fn check(&mut self, _expected: u64) -> Result<(), String> {
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

    fn reset(&mut self, _threads: usize, _ops: u64) {}

    fn check(&mut self, _expected: u64) -> Result<(), String> {
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
        Row::new("ThreadLocal<Cell>", ThreadLocalAdd::default()),
        Row::new("tls_add", TlsAdd::default()),
    ]
}

// ---------------------------------------------------------------------------------
// stack
//
// One operation is a push then a pop, of one item, by every row: the thread pushes the
// item it holds and pops one (its own, in a LIFO, unless another thread got there
// first). Every item is a `Box<Node<u64>>` (one pointer to move, the same for every
// row), numbered when created. `reset` hands each thread one item from a pool made
// before the run, so no row allocates in its loop; `SegQueue` still allocates a
// 31-slot block every 31 pushes, which is how it works.
//
// A pop that finds nothing (cpulocal `Stack` and the per-CPU mutexes: the thread
// migrated between its push and its pop, so its item is on another CPU's list) takes
// an item from another CPU instead (`Stack::steal`, or the other mutexes) and is
// counted; the row's events report them. After each run the check drains the container
// and counts every item exactly once: none lost, none duplicated.

/// What the stack group moves.
type Item = Box<Node<u64>>;

/// A container that items are pushed to and popped from.
trait Container: Sync {
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

impl Container for Stack<u64> {
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
            .or_else(|| (0..self.cpus()).find_map(|cpu| self.steal(cpu).expect("cpu < cpus")))
    }

    fn drain(&self, into: &mut Vec<Item>) {
        for cpu in 0..self.cpus() {
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
        &self.0[cpulocal::current_cpu() as usize % self.0.len()]
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
struct PushPop<C> {
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
}

impl<C: Container> PushPop<C> {
    fn new(container: C) -> PushPop<C> {
        PushPop {
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
        for _ in 0..ops {
            self.container.push(black_box(held));
            held = match self.container.pop() {
                Some(item) => item,
                None => {
                    empty += 1;
                    self.pop_elsewhere()
                }
            };
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
            pool.push(Node::new(self.created));
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
fn each_item_once<'a>(items: impl Iterator<Item = &'a Item>, created: u64) -> Result<(), String> {
    let mut seen = vec![false; created as usize];
    let mut count = 0u64;
    for item in items {
        let id = ***item;
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

fn stack_rows() -> Vec<Row> {
    vec![
        Row::cpulocal("Stack::push+pop", PushPop::new(Stack::<u64>::new())),
        Row::new("global_mutex_vec", PushPop::new(GlobalMutexVec::default())),
        Row::new("percpu_mutex_vec", PushPop::new(PerCpuMutexVec::new())),
        Row::new("SegQueue", PushPop::new(SegQueue::<Item>::new())),
        Row::new("ArrayQueue", PushPop::new(ArrayQueue::<Item>::new(1))),
    ]
}

// ---------------------------------------------------------------------------------
// lock
//
// One operation is a critical section that adds 1 to a `u64`: under the calling
// thread's `PerCpu` slot lock (a restartable compare-and-store to take it, a store to
// release it), under one global `Mutex`, or under the `Mutex` of the thread's CPU. The
// check adds the slots up.

/// `PerCpu::with_cpu` adding 1 to the calling thread's slot.
struct WithCpu {
    slots: PerCpu<u64>,
}

impl Subject for WithCpu {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            self.slots.with_cpu(|v| *v += black_box(1));
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.slots.iter_mut().for_each(|v| *v = 0);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "the sum of the PerCpu slots",
            percpu_sum(&self.slots),
            expected,
        )
    }
}

/// The slots of `slots` added up, each read under its lock.
fn percpu_sum(slots: &PerCpu<u64>) -> u64 {
    let mut sum = 0u64;
    slots.for_each(|_, v| sum = sum.wrapping_add(*v));
    sum
}

/// One cache-padded `Mutex<u64>` per possible CPU, picked with `current_cpu()`.
struct PerCpuMutex {
    slots: Box<[CachePadded<Mutex<u64>>]>,
}

impl Subject for PerCpuMutex {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            let slot = &self.slots[cpulocal::current_cpu() as usize % self.slots.len()];
            *slot.lock().expect("bench mutex poisoned") += black_box(1);
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        for s in self.slots.iter_mut() {
            *s.get_mut().expect("bench mutex poisoned") = 0;
        }
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let sum = self.slots.iter().fold(0u64, |acc, s| {
            acc.wrapping_add(*s.lock().expect("bench mutex poisoned"))
        });
        sum_check("the sum of the per-CPU mutexes", sum, expected)
    }
}

fn lock_rows() -> Vec<Row> {
    vec![
        Row::cpulocal(
            "PerCpu::with_cpu",
            WithCpu {
                slots: PerCpu::new(|_| 0),
            },
        ),
        Row::new("global_mutex", Locked::default()),
        Row::new(
            "percpu_mutex",
            PerCpuMutex {
                slots: per_cpu_slots(),
            },
        ),
    ]
}

// ---------------------------------------------------------------------------------
// remote
//
// Reaching another CPU's slot. Under the membarrier scheme each `on_cpu` and each
// `steal` takes the slot's lock word with a compare-exchange, then calls
// `membarrier(PRIVATE_EXPEDITED_RSEQ, CPU)` to restart the sequences in flight on that
// CPU: a system call, plus an IPI when a thread of this process runs there (the kernel
// skips CPUs that run none, so with one bench thread the targets are idle and no IPI is
// sent). The target CPU goes round-robin over every CPU but the caller's (its own, when
// there is only one). The reference row is a local push+pop on a `Stack` (the stack
// group's cpulocal row). Under the locked scheme there is no system call: every access
// is a compare-exchange.

/// The next CPU after `*next` that is not `me` (unless there is only one), advancing
/// `*next`.
#[inline]
fn next_other_cpu(next: &mut usize, me: usize, cpus: usize) -> usize {
    let mut cpu = *next % cpus;
    if cpu == me && cpus > 1 {
        cpu = (cpu + 1) % cpus;
    }
    *next = cpu + 1;
    cpu
}

/// `PerCpu::on_cpu` adding 1 to another CPU's slot.
struct OnCpu {
    slots: PerCpu<u64>,
}

impl Subject for OnCpu {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let cpus = self.slots.len();
        let mut next = 0;
        for _ in 0..ops {
            let cpu = next_other_cpu(&mut next, cpulocal::current_cpu() as usize, cpus);
            self.slots
                .on_cpu(cpu, |v| *v += black_box(1))
                .expect("cpu < len");
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.slots.iter_mut().for_each(|v| *v = 0);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "the sum of the PerCpu slots",
            percpu_sum(&self.slots),
            expected,
        )
    }
}

/// The most nodes the steal row prefills each CPU's list with: enough for a run of
/// 20 ms at 80 ns a steal (a membarrier that sends no IPI takes about 150 ns); cheaper
/// steals (the locked scheme) may empty a list, and are counted.
const STEAL_PREFILL_MAX: u64 = 1 << 18;

/// `Stack::steal` from another CPU's list; the node stolen is pushed on the caller's own
/// list (a local push, nanoseconds next to the steal). `reset` prefills every CPU's list
/// with as many nodes as the run can steal from it (at most [`STEAL_PREFILL_MAX`]), by
/// pinning the resetting thread to each CPU in turn, so the steals find nodes even with
/// one thread. A steal that finds the list empty still takes the lock and fences; it is
/// counted.
#[derive(Default)]
struct Steal {
    stack: Stack<u64>,
    /// Nodes off the lists, between `check` and `reset`.
    spare: Mutex<Vec<Item>>,
    created: u64,
    done: AtomicU64,
    empty_steals: AtomicU64,
}

impl Subject for Steal {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let cpus = self.stack.cpus();
        let mut next = 0;
        let mut empty = 0;
        for _ in 0..ops {
            let cpu = next_other_cpu(&mut next, cpulocal::current_cpu() as usize, cpus);
            match self.stack.steal(cpu).expect("cpu < cpus") {
                Some(node) => self.stack.push(black_box(node)),
                None => empty += 1,
            }
        }
        self.done.fetch_add(ops, Ordering::Relaxed);
        self.empty_steals.fetch_add(empty, Ordering::Relaxed);
    }

    fn reset(&mut self, threads: usize, ops: u64) {
        let mut nodes = core::mem::take(self.spare.get_mut().expect("bench mutex poisoned"));
        self.stack.drain(&mut nodes);
        let per_cpu = (threads as u64).saturating_mul(ops).min(STEAL_PREFILL_MAX);
        let cpus = self.stack.cpus();
        while (nodes.len() as u64) < per_cpu * cpus as u64 {
            nodes.push(Node::new(self.created));
            self.created += 1;
        }
        let stack = &self.stack;
        on_each_cpu(cpus, || {
            for _ in 0..per_cpu {
                if let Some(node) = nodes.pop() {
                    stack.push(node);
                }
            }
        });
        *self.spare.get_mut().expect("bench mutex poisoned") = nodes;
        *self.done.get_mut() = 0;
        *self.empty_steals.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("the steals", self.done.load(Ordering::Relaxed), expected)?;
        let mut spare = self.spare.lock().expect("bench mutex poisoned");
        self.stack.drain(&mut spare);
        each_item_once(spare.iter(), self.created)
    }

    fn events(&self) -> Option<(u64, &'static str)> {
        Some((
            self.empty_steals.load(Ordering::Relaxed),
            "steals found the list empty",
        ))
    }
}

/// Runs `f` with the calling thread pinned to each possible CPU in turn, then gives the
/// thread its affinity back. CPUs it cannot be pinned to (offline, outside its cpuset)
/// are skipped; if its affinity cannot be read, `f` runs once, unpinned.
fn on_each_cpu(cpus: usize, mut f: impl FnMut()) {
    let size = core::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is an array of integers: all zeroes is the empty set.
    let mut saved: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `saved` is a live cpu_set_t of `size` bytes; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut saved) } != 0 {
        f();
        return;
    }
    for cpu in 0..cpus.min(libc::CPU_SETSIZE as usize) {
        // SAFETY: as above.
        let mut one: libc::cpu_set_t = unsafe { core::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE, the bits a cpu_set_t holds.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        // SAFETY: `one` is a live cpu_set_t of `size` bytes; pid 0 is the calling thread.
        if unsafe { libc::sched_setaffinity(0, size, &one) } == 0 {
            f();
        }
    }
    // SAFETY: `saved` is the mask read above, `size` bytes. A failure leaves the thread
    // pinned to the last CPU, which costs later rows speed, not correctness.
    unsafe { libc::sched_setaffinity(0, size, &saved) };
}

fn remote_rows() -> Vec<Row> {
    vec![
        Row::cpulocal("Stack::push+pop", PushPop::new(Stack::<u64>::new())),
        Row::new(
            "PerCpu::on_cpu",
            OnCpu {
                slots: PerCpu::new(|_| 0),
            },
        ),
        Row::new("Stack::steal", Steal::default()),
    ]
}

// ---------------------------------------------------------------------------------
// ring
//
// One operation is one record of 16, 64 or 256 payload bytes (a class per size: each
// size's rows are compared to its `RingBuffer` row), written by the producer threads
// and read by a consumer. What each row includes:
//
// - `RingBuffer`: reserve + `payload_mut` copy + commit, on a ring without timestamps
//   (with them, every record would add a `clock_gettime` the other rows do not pay).
//   Every `RING_BATCH` records the producer consumes its CPU's ring (the CPU of its
//   last record): the consumer's work is in the producer's time, amortised, and no
//   other thread runs. The rings are sized so that this keeps them from filling;
//   records refused by a full ring are counted (events) and the check accepts them as
//   discarded, not lost. After the run the check flushes and consumes every CPU's
//   ring: consumed + discarded must equal the records written.
// - `mutex_deque`: a `Vec<u8>` allocated per record (as an owned record needs), pushed
//   on one `Mutex<VecDeque<Vec<u8>>>`; every `RING_BATCH` records the producer swaps the
//   deque for an empty one under the lock and reads and frees what it took, outside
//   the lock. Same consumer arrangement as the ring.
// - `channel`: a `Vec<u8>` allocated per record, sent on a
//   `crossbeam_channel::bounded(CHANNEL_CAP)`; a dedicated consumer thread receives and
//   frees the records (started before the first run, parked when idle). Producers
//   block when it falls behind. It is one more thread than the others run: with as
//   many producers as CPUs it competes with them for the CPUs.
// - `tls_vec` (the floor): each thread appends a length word and the payload to its
//   own `Vec<u8>` (taken from a pool, so its memory is warm) and parses and clears it
//   every `RING_BATCH` records. Nothing is shared.
//
// Every consumer reads each record's length and checks it; none reads the payload.

/// The payload sizes measured.
const RING_SIZES: [usize; 3] = [16, 64, 256];

/// Records a producer writes between two rounds of consuming.
const RING_BATCH: u64 = 64;

/// The channel's capacity.
const CHANNEL_CAP: usize = 1024;

/// The bytes every record's payload is copied from.
static PAYLOAD: [u8; 256] = [0xa5; 256];

/// `RingBuffer` rows: see the section's comment.
struct Ring {
    ring: RingBuffer,
    size: usize,
    consumed: AtomicU64,
    bad: AtomicU64,
    /// `stats().discarded` when the run started.
    discarded_before: u64,
    /// Records the last run's check found discarded.
    discarded: AtomicU64,
}

impl Ring {
    fn new(size: usize) -> Ring {
        // 8 sub-buffers of 32 KiB per CPU: a batch of the largest records (64 × 264
        // bytes) fills about half a sub-buffer, so a ring whose producer consumes every
        // batch holds two or three sub-buffers at most.
        let config = RingConfig {
            sub_buffer_size: 32 << 10,
            sub_buffers: 8,
            mode: Mode::DiscardNewest,
            timestamps: false,
        };
        Ring {
            ring: RingBuffer::new(config).expect("a valid ring configuration"),
            size,
            consumed: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            discarded_before: 0,
            discarded: AtomicU64::new(0),
        }
    }

    /// Consumes CPU `cpu`'s complete sub-buffers; returns the records read and the
    /// records of the wrong length.
    fn consume(&self, cpu: usize) -> (u64, u64) {
        let (mut read, mut bad) = (0, 0);
        self.ring
            .consume(cpu, |rec| {
                read += 1;
                bad += u64::from(rec.data.len() != self.size);
            })
            .expect("cpu < cpus");
        (read, bad)
    }
}

impl Subject for Ring {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let payload = &PAYLOAD[..self.size];
        let (mut read, mut bad) = (0, 0);
        let mut cpu = 0;
        for i in 0..ops {
            match self.ring.reserve(black_box(self.size)) {
                Ok(mut r) => {
                    cpu = r.cpu();
                    r.payload_mut().copy_from_slice(payload);
                    r.commit();
                }
                Err(ReserveError::Full) => {}
                Err(e) => panic!("{e}"),
            }
            if i % RING_BATCH == RING_BATCH - 1 {
                let (r, b) = self.consume(cpu);
                read += r;
                bad += b;
            }
        }
        self.consumed.fetch_add(read, Ordering::Relaxed);
        self.bad.fetch_add(bad, Ordering::Relaxed);
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        // The last check flushed and consumed every ring: they are empty.
        self.discarded_before = self.ring.stats().discarded;
        *self.consumed.get_mut() = 0;
        *self.bad.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let (mut read, mut bad) = (
            self.consumed.load(Ordering::Relaxed),
            self.bad.load(Ordering::Relaxed),
        );
        for cpu in 0..self.ring.cpus() {
            self.ring.flush(cpu).expect("cpu < cpus");
            let (r, b) = self.consume(cpu);
            read += r;
            bad += b;
        }
        let stats = self.ring.stats();
        let discarded = stats.discarded - self.discarded_before;
        self.discarded.store(discarded, Ordering::Relaxed);
        sum_check("records of the wrong length", bad, 0)?;
        sum_check("abandoned reservations", stats.abandoned, 0)?;
        sum_check("records consumed + discarded", read + discarded, expected)
    }

    fn events(&self) -> Option<(u64, &'static str)> {
        Some((
            self.discarded.load(Ordering::Relaxed),
            "records discarded (ring full)",
        ))
    }
}

/// `mutex_deque` rows: see the section's comment.
struct MutexDeque {
    deque: Mutex<VecDeque<Vec<u8>>>,
    size: usize,
    consumed: AtomicU64,
    bad: AtomicU64,
}

impl MutexDeque {
    fn new(size: usize) -> MutexDeque {
        MutexDeque {
            deque: Mutex::default(),
            size,
            consumed: AtomicU64::new(0),
            bad: AtomicU64::new(0),
        }
    }

    /// Reads and frees the records of `taken`; returns how many, and how many had the
    /// wrong length.
    fn read(&self, taken: &mut VecDeque<Vec<u8>>) -> (u64, u64) {
        let (mut read, mut bad) = (0, 0);
        for rec in taken.drain(..) {
            read += 1;
            bad += u64::from(rec.len() != self.size);
        }
        (read, bad)
    }
}

impl Subject for MutexDeque {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let payload = &PAYLOAD[..self.size];
        let mut taken = VecDeque::with_capacity(4 * RING_BATCH as usize);
        let (mut read, mut bad) = (0, 0);
        for i in 0..ops {
            let rec = black_box(payload).to_vec();
            self.deque
                .lock()
                .expect("bench mutex poisoned")
                .push_back(rec);
            if i % RING_BATCH == RING_BATCH - 1 {
                core::mem::swap(
                    &mut *self.deque.lock().expect("bench mutex poisoned"),
                    &mut taken,
                );
                let (r, b) = self.read(&mut taken);
                read += r;
                bad += b;
            }
        }
        self.consumed.fetch_add(read, Ordering::Relaxed);
        self.bad.fetch_add(bad, Ordering::Relaxed);
    }

    fn reset(&mut self, threads: usize, _ops: u64) {
        let deque = self.deque.get_mut().expect("bench mutex poisoned");
        deque.clear();
        deque.reserve(2 * threads * RING_BATCH as usize);
        *self.consumed.get_mut() = 0;
        *self.bad.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let mut rest = core::mem::take(&mut *self.deque.lock().expect("bench mutex poisoned"));
        let (r, b) = self.read(&mut rest);
        sum_check(
            "records of the wrong length",
            self.bad.load(Ordering::Relaxed) + b,
            0,
        )?;
        sum_check(
            "records consumed",
            self.consumed.load(Ordering::Relaxed) + r,
            expected,
        )
    }
}

/// `channel` rows: see the section's comment.
struct Channel {
    size: usize,
    /// The sending side and the consumer thread, from the first `reset` on.
    tx: Option<crossbeam_channel::Sender<Vec<u8>>>,
    consumer: Option<std::thread::JoinHandle<()>>,
    /// Records the consumer received since it started.
    received: Arc<AtomicU64>,
    /// Records of the wrong length it received.
    bad: Arc<AtomicU64>,
    /// `received` when the run started.
    received_before: u64,
}

/// How long `check` waits for the channel's consumer to catch up.
const CONSUMER_TIMEOUT: Duration = Duration::from_secs(30);

impl Channel {
    fn new(size: usize) -> Channel {
        Channel {
            size,
            tx: None,
            consumer: None,
            received: Arc::default(),
            bad: Arc::default(),
            received_before: 0,
        }
    }
}

impl Subject for Channel {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let tx = self.tx.as_ref().expect("reset started the consumer");
        let payload = &PAYLOAD[..self.size];
        for _ in 0..ops {
            tx.send(black_box(payload).to_vec())
                .expect("the consumer runs until the row is dropped");
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        if self.tx.is_none() {
            let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(CHANNEL_CAP);
            let (received, bad, size) =
                (Arc::clone(&self.received), Arc::clone(&self.bad), self.size);
            let consumer = std::thread::Builder::new()
                .name("bench-consumer".into())
                .spawn(move || {
                    let mut total = 0u64;
                    for rec in rx.iter() {
                        total += 1;
                        if rec.len() != size {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(rec);
                        // Published when the channel runs dry (always at the end of a
                        // run) and every 256 records; Release pairs with `check`.
                        if total.is_multiple_of(256) || rx.is_empty() {
                            received.store(total, Ordering::Release);
                        }
                    }
                })
                .expect("the consumer thread starts");
            self.tx = Some(tx);
            self.consumer = Some(consumer);
        }
        self.received_before = self.received.load(Ordering::Acquire);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        // The producers' sends are done; the consumer may still be reading the last
        // CHANNEL_CAP records.
        let start = Instant::now();
        let got = loop {
            // Acquire: pairs with the consumer's Release store.
            let got = self.received.load(Ordering::Acquire) - self.received_before;
            if got >= expected || start.elapsed() > CONSUMER_TIMEOUT {
                break got;
            }
            std::thread::yield_now();
        };
        sum_check(
            "records of the wrong length",
            self.bad.load(Ordering::Relaxed),
            0,
        )?;
        sum_check("records received", got, expected)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // Dropping the sender ends the consumer's loop.
        self.tx = None;
        if let Some(consumer) = self.consumer.take() {
            consumer.join().expect("the consumer thread panicked");
        }
    }
}

/// `tls_vec` rows: see the section's comment.
struct TlsVec {
    size: usize,
    /// Buffers waiting for a thread (warm: each run reuses the last run's).
    pool: Mutex<Vec<Vec<u8>>>,
    consumed: AtomicU64,
    bad: AtomicU64,
}

impl TlsVec {
    fn new(size: usize) -> TlsVec {
        TlsVec {
            size,
            pool: Mutex::default(),
            consumed: AtomicU64::new(0),
            bad: AtomicU64::new(0),
        }
    }

    /// Walks the records of `buf`; returns how many, and how many had the wrong length.
    fn parse(&self, buf: &[u8]) -> (u64, u64) {
        let (mut read, mut bad, mut at) = (0, 0, 0);
        while at < buf.len() {
            let len = u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
            read += 1;
            bad += u64::from(len != self.size as u64);
            at += 8 + len as usize;
        }
        (read, bad)
    }
}

impl Subject for TlsVec {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let mut buf = self
            .pool
            .lock()
            .expect("bench mutex poisoned")
            .pop()
            .expect("reset leaves a buffer for every thread");
        let payload = &PAYLOAD[..self.size];
        let header = (self.size as u64).to_le_bytes();
        let (mut read, mut bad) = (0, 0);
        for i in 0..ops {
            buf.extend_from_slice(&header);
            buf.extend_from_slice(black_box(payload));
            if i % RING_BATCH == RING_BATCH - 1 {
                let (r, b) = self.parse(&buf);
                read += r;
                bad += b;
                buf.clear();
            }
        }
        let (r, b) = self.parse(&buf);
        buf.clear();
        self.pool.lock().expect("bench mutex poisoned").push(buf);
        self.consumed.fetch_add(read + r, Ordering::Relaxed);
        self.bad.fetch_add(bad + b, Ordering::Relaxed);
    }

    fn reset(&mut self, threads: usize, _ops: u64) {
        let pool = self.pool.get_mut().expect("bench mutex poisoned");
        while pool.len() < threads {
            pool.push(vec![0; RING_BATCH as usize * (8 + self.size)]);
        }
        for buf in pool.iter_mut() {
            buf.clear();
        }
        *self.consumed.get_mut() = 0;
        *self.bad.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "records of the wrong length",
            self.bad.load(Ordering::Relaxed),
            0,
        )?;
        sum_check(
            "records parsed",
            self.consumed.load(Ordering::Relaxed),
            expected,
        )
    }
}

fn ring_rows() -> Vec<Row> {
    RING_SIZES
        .into_iter()
        .flat_map(|size| {
            let [ring, deque, channel, tls] = ring_names(size);
            [
                Row::cpulocal(ring, Ring::new(size)),
                Row::new(deque, MutexDeque::new(size)),
                Row::new(channel, Channel::new(size)),
                Row::new(tls, TlsVec::new(size)),
            ]
            .map(|row| row.in_class(size))
        })
        .collect()
}

/// The names of the ring rows of records of `size` bytes.
fn ring_names(size: usize) -> [&'static str; 4] {
    match size {
        16 => [
            "RingBuffer 16B",
            "mutex_deque 16B",
            "channel 16B",
            "tls_vec 16B",
        ],
        64 => [
            "RingBuffer 64B",
            "mutex_deque 64B",
            "channel 64B",
            "tls_vec 64B",
        ],
        256 => [
            "RingBuffer 256B",
            "mutex_deque 256B",
            "channel 256B",
            "tls_vec 256B",
        ],
        _ => unreachable!("RING_SIZES has names for each size"),
    }
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
        "ThreadLocal<Cell>",
        "thread_local crate: ThreadLocal<Cell<u64>>::get_or, then increment",
    ),
    (
        "tls_add",
        "const thread_local! Cell<u64> increment (the floor)",
    ),
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
    (
        "PerCpu::with_cpu",
        "cpulocal::PerCpu<u64>::with_cpu(|v| *v += 1)",
    ),
    ("global_mutex", "one Mutex<u64>: lock, += 1"),
    (
        "percpu_mutex",
        "Mutex<u64> per CPU at current_cpu(): lock, += 1",
    ),
    (
        "PerCpu::on_cpu",
        "cpulocal::PerCpu<u64>::on_cpu(another CPU, |v| *v += 1), round-robin",
    ),
    (
        "Stack::steal",
        "cpulocal::Stack::steal(another CPU), round-robin, + local push of the node",
    ),
    RING_LEGEND[0],
    RING_LEGEND[1],
    RING_LEGEND[2],
    RING_LEGEND[3],
    RING_LEGEND[4],
    RING_LEGEND[5],
    RING_LEGEND[6],
    RING_LEGEND[7],
    RING_LEGEND[8],
    RING_LEGEND[9],
    RING_LEGEND[10],
    RING_LEGEND[11],
];

const RING_RB: &str =
    "cpulocal RingBuffer reserve + payload copy + commit; the producer consumes its CPU's ring every 64 records";
const RING_DEQUE: &str =
    "Mutex<VecDeque<Vec<u8>>>: malloc + push_back; the producer drains the deque every 64 records";
const RING_CHANNEL: &str =
    "crossbeam_channel::bounded(1024) of Vec<u8>: malloc + send; a consumer thread receives and frees";
const RING_TLS: &str =
    "per-thread Vec<u8>: append length + payload, parse and clear every 64 records (the floor)";

/// The ring rows' legend: one entry per row name, so per size.
const RING_LEGEND: [(&str, &str); 12] = [
    ("RingBuffer 16B", RING_RB),
    ("mutex_deque 16B", RING_DEQUE),
    ("channel 16B", RING_CHANNEL),
    ("tls_vec 16B", RING_TLS),
    ("RingBuffer 64B", RING_RB),
    ("mutex_deque 64B", RING_DEQUE),
    ("channel 64B", RING_CHANNEL),
    ("tls_vec 64B", RING_TLS),
    ("RingBuffer 256B", RING_RB),
    ("mutex_deque 256B", RING_DEQUE),
    ("channel 256B", RING_CHANNEL),
    ("tls_vec 256B", RING_TLS),
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

const TARGETS: [TargetSpec; 7] = [
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
    TargetSpec {
        target: "Stack push+pop at least 3x faster than a Mutex<Vec>",
        group: Group::Stack,
        threads: 2,
        numerator: "global_mutex_vec",
        denominator: "Stack::push+pop",
        bound: 3.0,
        at_most: false,
    },
    TargetSpec {
        target: "PerCpu::with_cpu at least 2x faster than a global Mutex",
        group: Group::Lock,
        threads: 2,
        numerator: "global_mutex",
        denominator: "PerCpu::with_cpu",
        bound: 2.0,
        at_most: false,
    },
    TargetSpec {
        target: "RingBuffer 64B records at least 5x faster than a crossbeam channel",
        group: Group::Ring,
        threads: 2,
        numerator: "channel 64B",
        denominator: "RingBuffer 64B",
        bound: 5.0,
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
            fn reset(&mut self, _threads: usize, _ops: u64) {}
            fn check(&mut self, expected: u64) -> Result<(), String> {
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
    fn every_class_has_one_cpulocal_row_and_every_row_a_legend_entry() {
        for group in Group::ALL {
            let rows = rows(group, &mut Vec::new());
            for class in rows.iter().map(|r| r.class) {
                assert_eq!(
                    rows.iter()
                        .filter(|r| r.cpulocal && r.class == class)
                        .count(),
                    1,
                    "{group} class {class}"
                );
            }
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
            records_per_s: None,
            events: None,
            note: None,
        };
        let results = [
            row(Group::CpuNumber, "current_cpu", 1, 1.0),
            row(Group::CpuNumber, "tls_load", 1, 0.5),
            row(Group::Counter, "Counter::add", 2, 1.0),
            row(Group::Counter, "shared_fetch_add", 2, 10.0),
            row(Group::Counter, "percpu_fetch_add", 2, 1.5),
            row(Group::Stack, "Stack::push+pop", 2, 2.0),
            row(Group::Stack, "global_mutex_vec", 2, 7.0),
            row(Group::Lock, "PerCpu::with_cpu", 2, 2.0),
            row(Group::Lock, "global_mutex", 2, 3.0),
            row(Group::Ring, "RingBuffer 64B", 2, 10.0),
            row(Group::Ring, "channel 64B", 2, 60.0),
            // The right names in the wrong group or at the wrong thread count are ignored.
            row(Group::Ring, "RingBuffer 16B", 2, 1.0),
            row(Group::Ring, "channel 64B", 1, 1.0),
        ];
        let t = targets(&results);
        assert_eq!(t[0].pass, Some(false));
        assert_eq!(t[0].measured, Some(2.0));
        assert_eq!(t[1].pass, None);
        assert_eq!(t[2].pass, Some(true));
        assert_eq!(t[3].pass, Some(false));
        assert_eq!((t[4].measured, t[4].pass), (Some(3.5), Some(true)));
        assert_eq!((t[5].measured, t[5].pass), (Some(1.5), Some(false)));
        assert_eq!((t[6].measured, t[6].pass), (Some(6.0), Some(true)));
    }

    /// A container that replaces every 100th item pushed with one nobody created.
    struct Leaky {
        inner: GlobalMutexVec,
        pushes: AtomicU64,
    }

    impl Container for Leaky {
        fn push(&self, item: Item) {
            if self.pushes.fetch_add(1, Ordering::Relaxed) % 100 == 99 {
                // Lost, but kept alive so the pop side still finds an item.
                self.inner.push(Node::new(**item + 1_000_000));
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
            Group::Stack,
            &mut Row::new("leaky", PushPop::new(leaky)),
            2,
            1_000,
        );
    }

    #[test]
    fn each_item_once_counts_lost_and_doubled_items() {
        let items: Vec<Item> = (0..3).map(Node::new).collect();
        assert!(each_item_once(items.iter(), 3).is_ok());
        let lost = each_item_once(items.iter().take(2), 3).unwrap_err();
        assert!(lost.contains("1 lost"), "{lost}");
        let twice = each_item_once(items.iter().chain(&items[..1]), 3).unwrap_err();
        assert!(twice.contains("item 0 is there twice"), "{twice}");
    }

    #[test]
    fn other_cpus_go_round_robin_around_the_caller() {
        let mut next = 0;
        let got: Vec<_> = (0..6).map(|_| next_other_cpu(&mut next, 1, 4)).collect();
        assert_eq!(got, [0, 2, 3, 0, 2, 3]);
        let mut next = 0;
        assert_eq!(next_other_cpu(&mut next, 0, 1), 0, "one CPU: its own");
    }

    #[test]
    fn ring_rows_are_compared_within_their_record_size() {
        let rows = rows(Group::Ring, &mut Vec::new());
        for size in RING_SIZES {
            let class: Vec<_> = rows.iter().filter(|r| r.class == size).collect();
            assert_eq!(class.len(), 4);
            assert!(class.iter().all(|r| r.name.ends_with(&format!(" {size}B"))));
        }
    }
}
