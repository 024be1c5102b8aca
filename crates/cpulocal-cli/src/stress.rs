//! `cpulocal stress`: torture runs that hunt the windows in which a restartable sequence
//! could go wrong, followed by an exact check of every structure.
//!
//! # Method
//!
//! In the spirit of the kernel's rseq `param_test`: more threads than CPUs (preemption
//! and migration inside sequences), with optional injections — `sched_yield` or a short
//! sleep every K operations, placed *inside* each operation's window; a signal storm
//! whose handler itself adds to a [`Counter`] that is part of the checked total; a thread
//! moving the workers between CPUs with `sched_setaffinity`; workers that exit and are
//! replaced; and, in builds with the `test-hooks` feature, a spin loop inside every
//! sequence (`--delay`) that makes all of these land inside sequences.
//!
//! | structure | a worker's operation (the window) | racing it | the exact check |
//! |---|---|---|---|
//! | `counter` | `Counter::add(1)` | the signal handler adds to the same counter | sum = worker adds + handler adds |
//! | `stack` | pop, (window), push back; steal from another CPU when empty and every 64th op; `pop_all` and push back every 1021st | the other workers' steals | every node id on exactly one list at the end, never held twice |
//! | `lock` | `PerCpu::with_cpu`: read the slot's count, (window), write it + 1 | the other workers on the CPU | each slot's count = the increments tallied for that slot |
//! | `ring` | reserve a 20–46 byte record, fill it (writer, sequence number, filler, checksum), (window), commit | a consumer thread reading and flushing | every committed record read exactly once with a good checksum; refusals = `discarded` |
//! | `remote` | lock, stack, ring in turn | a remote thread: `on_cpu`, `steal` / `pop_all_on`, `flush` on random CPUs | as above |
//! | `mix` | counter, stack, lock, ring in turn | the remote thread | all of the above |
//!
//! Whatever the structure, with `--signals` the handler adds 1 to a `Counter` per signal
//! and counts its runs: the counter part's counter when there is one, else a counter of
//! its own; either way its sum must equal the handler's runs. Every thread that can be
//! signalled has used cpulocal (registered) before it can be signalled.
//!
//! # Mutations
//!
//! A stress test that never fails proves little. With `--broken` (builds with
//! `test-hooks` only) the run tortures a deliberately broken variant and must report
//! losses or duplicates:
//!
//! - `counter`: `cpulocal::test_hooks::break_counter_sequence(true)` makes
//!   `Counter::add` run cpulocal's own sequence with its critical section unarmed
//!   (load, delay, store): a preemption, migration or signal between its load and its
//!   store loses updates.
//! - `stack`: `cpulocal::test_hooks::break_stack_guard(true)` makes the push and pop
//!   sequences ignore a remote owner's lock, so steals racing them lose or duplicate
//!   nodes. Duplicates are detected (a node held twice is never pushed back nor freed);
//!   the broken run leaks what it cannot account for. Use a short `--delay` (0–10):
//!   the steal's membarrier fence restarts the victim's sequence, and a long delay
//!   keeps the restarted sequence from reaching the list head until the steal is over.

use core::fmt;
use core::str::FromStr;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cpulocal::ring::{Mode, ReserveError, RingBuffer, RingConfig};
use cpulocal::{sys, Counter, Node, NodeList, PerCpu, Stack};
use serde::Serialize;

/// The signal of `--signals`.
const STORM: libc::c_int = libc::SIGUSR1;
/// Operations a worker claims from the budget at a time.
const BATCH: u64 = 256;
/// A stack worker steals from another CPU every this many operations (and when empty).
const STEAL_EVERY: u64 = 64;
/// A stack worker detaches its CPU's whole list every this many operations.
const POP_ALL_EVERY: u64 = 1021;
/// The ring consumer flushes the rings it reads this often.
const FLUSH_EVERY: Duration = Duration::from_millis(1);
/// The most threads a run may start at once.
pub const MAX_THREADS: usize = 4096;
/// What the error messages say when a knob needs the `test-hooks` feature.
pub const NEEDS_TEST_HOOKS: &str = "rebuild with --features test-hooks";
/// Whether this build has cpulocal's test hooks (`--delay`, `--broken`, abort counts).
pub const HAS_TEST_HOOKS: bool = cfg!(feature = "test-hooks");

/// What a run tortures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Structure {
    /// [`Counter`]: one restartable add per operation.
    Counter,
    /// [`Stack`]: pop and push on the thread's CPU, steals from other CPUs.
    Stack,
    /// [`PerCpu::with_cpu`]: the per-CPU lock around a read-modify-write.
    Lock,
    /// [`RingBuffer`]: reserve, fill and commit records, with a concurrent consumer.
    Ring,
    /// `on_cpu`, `Stack::steal` / `pop_all_on` and `RingBuffer::flush` from a remote
    /// thread racing the local fast paths of lock, stack and ring.
    Remote,
    /// Every structure at once, with the remote thread.
    Mix,
}

impl Structure {
    /// Every structure.
    pub const ALL: [Structure; 6] = [
        Structure::Counter,
        Structure::Stack,
        Structure::Lock,
        Structure::Ring,
        Structure::Remote,
        Structure::Mix,
    ];

    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Structure::Counter => "counter",
            Structure::Stack => "stack",
            Structure::Lock => "lock",
            Structure::Ring => "ring",
            Structure::Remote => "remote",
            Structure::Mix => "mix",
        }
    }

    /// The operations the workers take turns at.
    fn kinds(self) -> &'static [Kind] {
        match self {
            Structure::Counter => &[Kind::Counter],
            Structure::Stack => &[Kind::Stack],
            Structure::Lock => &[Kind::Lock],
            Structure::Ring => &[Kind::Ring],
            Structure::Remote => &[Kind::Lock, Kind::Stack, Kind::Ring],
            Structure::Mix => &[Kind::Counter, Kind::Stack, Kind::Lock, Kind::Ring],
        }
    }

    /// The operations the remote thread takes turns at (none: no remote thread).
    fn remote_kinds(self) -> &'static [Kind] {
        match self {
            Structure::Remote | Structure::Mix => &[Kind::Lock, Kind::Stack, Kind::Ring],
            _ => &[],
        }
    }
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Structure {
    type Err = String;

    /// ```
    /// use cpulocal_cli::stress::Structure;
    /// assert_eq!("ring".parse::<Structure>(), Ok(Structure::Ring));
    /// assert!("queue".parse::<Structure>().unwrap_err().contains("counter"));
    /// ```
    fn from_str(s: &str) -> Result<Structure, String> {
        Structure::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Structure::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown structure '{s}' (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// One kind of worker operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Stack,
    Lock,
    Ring,
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    /// This many worker operations in total, shared out among the workers as they go.
    Ops(u64),
    /// Until this much time has passed (workers finish the batch they are in).
    Duration(Duration),
}

/// `--sleep-us`: a `nanosleep` inside the window every `every` operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sleep {
    /// How long each sleep lasts.
    pub duration: Duration,
    /// Operations between two sleeps of one worker.
    pub every: u64,
}

/// Everything a run is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// What to torture.
    pub structure: Structure,
    /// Workers running at once.
    pub threads: usize,
    /// How long the run lasts.
    pub amount: Amount,
    /// `sched_yield` inside the window every this many operations of a worker.
    pub yield_every: Option<u64>,
    /// An occasional sleep inside the window.
    pub sleep: Option<Sleep>,
    /// One `SIGUSR1` to the next worker in turn at this interval.
    pub signal_interval: Option<Duration>,
    /// Spin loops inside every sequence (needs the `test-hooks` feature).
    pub delay_loops: Option<usize>,
    /// Move one worker to another CPU (or back to all) at this interval.
    pub affinity_interval: Option<Duration>,
    /// Each worker exits after this many operations and is replaced.
    pub thread_churn: Option<u64>,
    /// Torture a deliberately broken variant (needs the `test-hooks` feature).
    pub broken: bool,
}

impl Config {
    /// `threads` workers on `structure` for `amount`, with no injection.
    ///
    /// ```
    /// use cpulocal_cli::stress::{Amount, Config, Structure};
    /// let config = Config::new(Structure::Counter, 2, Amount::Ops(1000));
    /// assert!(config.validate().is_ok());
    /// let report = cpulocal_cli::stress::run(&config, |_| ()).unwrap();
    /// assert_eq!(report.operations, 1000);
    /// assert!(report.passed);
    /// ```
    pub fn new(structure: Structure, threads: usize, amount: Amount) -> Config {
        Config {
            structure,
            threads,
            amount,
            yield_every: None,
            sleep: None,
            signal_interval: None,
            delay_loops: None,
            affinity_interval: None,
            thread_churn: None,
            broken: false,
        }
    }

    /// Checks the knobs, with a message naming the option at fault.
    ///
    /// # Errors
    ///
    /// A knob out of range, or one that needs the `test-hooks` feature in a build
    /// without it.
    ///
    /// ```
    /// use cpulocal_cli::stress::{Amount, Config, Structure};
    /// let mut config = Config::new(Structure::Ring, 2, Amount::Ops(10));
    /// config.broken = true;
    /// assert!(config.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(format!(
                "--threads must be from 1 to {MAX_THREADS}, not {}",
                self.threads
            ));
        }
        match self.amount {
            Amount::Ops(0) => return Err("--ops must be at least 1".into()),
            Amount::Duration(d) if d.is_zero() => {
                return Err("--duration must be more than 0 seconds".into())
            }
            _ => {}
        }
        if self.yield_every == Some(0) {
            return Err("--yield-every must be at least 1".into());
        }
        if self.sleep.is_some_and(|s| s.every == 0) {
            return Err("--sleep-every must be at least 1".into());
        }
        if self.thread_churn == Some(0) {
            return Err("--churn-ops must be at least 1".into());
        }
        if self.signal_interval.is_some_and(|d| d.is_zero()) {
            return Err("--signal-interval-us must be at least 1".into());
        }
        if self.affinity_interval.is_some_and(|d| d.is_zero()) {
            return Err("--affinity-interval-us must be at least 1".into());
        }
        if self.delay_loops.is_some() && !HAS_TEST_HOOKS {
            return Err(format!(
                "--delay needs cpulocal's test hooks, which this build lacks: {NEEDS_TEST_HOOKS}"
            ));
        }
        if self.broken {
            if !HAS_TEST_HOOKS {
                return Err(format!(
                    "--broken needs cpulocal's test hooks, which this build lacks: {NEEDS_TEST_HOOKS}"
                ));
            }
            let kinds = self.structure.kinds();
            if !kinds.contains(&Kind::Counter) && !kinds.contains(&Kind::Stack) {
                return Err(format!(
                    "--broken has mutations for counter and stack (and remote, mix), not for {}",
                    self.structure
                ));
            }
        }
        Ok(())
    }
}

/// Where a run stands, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Worker operations done so far.
    pub operations: u64,
    /// Time since the workers started.
    pub elapsed: Duration,
    /// How long the run lasts.
    pub amount: Amount,
}

/// The counter check: the sum against the adds made.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CounterCheck {
    /// Adds made by the workers.
    pub worker_adds: u64,
    /// Adds made by the signal handler.
    pub handler_adds: u64,
    /// `worker_adds + handler_adds`.
    pub expected: u64,
    /// What the counter says.
    pub sum: u64,
    /// `Counter::slow_path_sum` (absent for the broken counter).
    pub slow_path: Option<u64>,
    /// Adds missing from the sum.
    pub lost: u64,
    /// Adds counted more than once.
    pub duplicated: u64,
}

impl CounterCheck {
    fn new(worker_adds: u64, handler_adds: u64, sum: u64, slow_path: Option<u64>) -> Self {
        let expected = worker_adds + handler_adds;
        CounterCheck {
            worker_adds,
            handler_adds,
            expected,
            sum,
            slow_path,
            lost: expected.saturating_sub(sum),
            duplicated: sum.saturating_sub(expected),
        }
    }
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

/// The lock check: per-slot totals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LockCheck {
    /// Slots that received increments.
    pub slots_used: u64,
    /// Increments made under `with_cpu`.
    pub local: u64,
    /// Increments made under `on_cpu` by the remote thread.
    pub remote: u64,
    /// The slots' counts, added up.
    pub found: u64,
    /// Slots whose count differs from its tally.
    pub slots_wrong: u64,
    /// Increments missing from their slot.
    pub lost: u64,
    /// Increments found beyond their slot's tally.
    pub duplicated: u64,
}

/// The ring check: every committed record read exactly once, intact.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RingCheck {
    /// Records the workers committed.
    pub records: u64,
    /// Records the consumer read (intact or not).
    pub read: u64,
    /// `RingStats::remote_commits`: commits that landed from another CPU.
    pub remote_commits: u64,
    /// `RingStats::discarded`.
    pub discarded: u64,
    /// Reservations the workers saw refused as full (must equal `discarded`).
    pub refused: u64,
    /// `RingStats::overwritten` (0: the run discards the newest).
    pub overwritten: u64,
    /// `RingStats::abandoned` (0: every reservation is committed).
    pub abandoned: u64,
    /// Flushes by the consumer and the remote thread.
    pub flushes: u64,
    /// Records whose length, filler or checksum is wrong, or that no writer wrote.
    pub corrupt: u64,
    /// Committed records never read, and refusals missing from `discarded`.
    pub lost: u64,
    /// Records read more than once, and `discarded` beyond the refusals.
    pub duplicated: u64,
}

/// What a run did and found. [`fmt::Display`] gives the text verdict, serde the JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The structure's name.
    pub structure: &'static str,
    /// Workers running at once.
    pub threads: usize,
    /// Workers started over the run (more than `threads` with thread churn).
    pub threads_started: u64,
    /// `cpulocal::mechanism()`.
    pub mechanism: String,
    /// `cpulocal::remote_scheme()`.
    pub remote_scheme: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPUs online.
    pub online_cpus: usize,
    /// CPUs the run could use (its affinity at the start).
    pub usable_cpus: usize,
    /// Wall time of the workers.
    pub seconds: f64,
    /// Worker operations.
    pub operations: u64,
    /// Operations of the remote thread (`remote`, `mix`).
    pub remote_operations: u64,
    /// Spin loops inside every sequence.
    pub delay_loops: usize,
    /// Whether a deliberately broken variant ran.
    pub broken: bool,
    /// Sequences the kernel restarted during the run; `None` in builds without the
    /// `test-hooks` feature, which do not count them.
    pub kernel_aborts: Option<u64>,
    /// Adds that went through `Counter`'s slow path (`None`: no real `Counter` part).
    pub slow_path: Option<u64>,
    /// Signals sent to workers.
    pub signals_sent: u64,
    /// Signal handler runs.
    pub signals_handled: u64,
    /// Successful `sched_setaffinity` moves.
    pub affinity_moves: u64,
    /// Refused moves (e.g. the thread had just exited).
    pub affinity_failures: u64,
    /// The counter part's check.
    pub counter: Option<CounterCheck>,
    /// The signal handler's own counter, when the structure has no counter part.
    pub signal_counter: Option<CounterCheck>,
    /// The stack part's check.
    pub stack: Option<StackCheck>,
    /// The lock part's check.
    pub lock: Option<LockCheck>,
    /// The ring part's check.
    pub ring: Option<RingCheck>,
    /// Updates, nodes, increments or records lost, over every part.
    pub lost: u64,
    /// Ones counted, held or read more than once, over every part.
    pub duplicated: u64,
    /// Values that are not what any thread wrote.
    pub corrupt: u64,
    /// Nothing lost, duplicated or corrupt.
    pub passed: bool,
}

impl Report {
    /// One JSON object, on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("Report serialises")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "operations: {} in {:.2} s ({:.1} M/s){}",
            self.operations,
            self.seconds,
            self.operations as f64 / self.seconds.max(1e-9) / 1e6,
            if self.remote_operations > 0 {
                format!("; remote operations: {}", self.remote_operations)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "threads: {} at once, {} started; signals: {} sent, {} handled; affinity moves: {} ({} refused); delay: {} loops{}",
            self.threads,
            self.threads_started,
            self.signals_sent,
            self.signals_handled,
            self.affinity_moves,
            self.affinity_failures,
            self.delay_loops,
            if self.broken { "; BROKEN variant" } else { "" }
        )?;
        match self.kernel_aborts {
            Some(n) => writeln!(f, "kernel aborts: {n}")?,
            None => writeln!(
                f,
                "kernel aborts: not counted (build with --features test-hooks)"
            )?,
        }
        match self.slow_path {
            Some(n) => writeln!(f, "slow path: {n} adds (Counter::slow_path_sum)")?,
            None => writeln!(f, "slow path: n/a (no cpulocal Counter in this run)")?,
        }
        if let Some(c) = &self.counter {
            writeln!(
                f,
                "counter: sum {} of {} expected ({} worker adds + {} handler adds)",
                c.sum, c.expected, c.worker_adds, c.handler_adds
            )?;
        }
        if let Some(c) = &self.signal_counter {
            writeln!(
                f,
                "signal counter: sum {} of {} handler adds",
                c.sum, c.expected
            )?;
        }
        if let Some(s) = &self.stack {
            writeln!(
                f,
                "stack: {} nodes; {} pops ({} empty), {} steals + {} remote ({} nodes), {} pop_all ({} nodes); held twice {}; at the end {} found, {} twice, {} missing",
                s.nodes,
                s.pops,
                s.empty_pops,
                s.steals,
                s.remote_steals,
                s.stolen,
                s.pop_alls,
                s.pop_all_nodes,
                s.held_twice,
                s.found,
                s.found_twice,
                s.missing
            )?;
        }
        if let Some(l) = &self.lock {
            writeln!(
                f,
                "lock: {} slots used; {} increments ({} with_cpu + {} on_cpu), {} found; {} slots wrong",
                l.slots_used,
                l.local + l.remote,
                l.local,
                l.remote,
                l.found,
                l.slots_wrong
            )?;
        }
        if let Some(r) = &self.ring {
            writeln!(
                f,
                "ring: {} records committed, {} read; remote commits {}; discarded {} ({} refusals seen); overwritten {}; abandoned {}; flushes {}",
                r.records,
                r.read,
                r.remote_commits,
                r.discarded,
                r.refused,
                r.overwritten,
                r.abandoned,
                r.flushes
            )?;
        }
        writeln!(f, "lost: {}", self.lost)?;
        writeln!(f, "duplicated: {}", self.duplicated)?;
        writeln!(f, "corrupt: {}", self.corrupt)?;
        write!(
            f,
            "verdict: {}",
            if self.passed {
                "PASS"
            } else {
                "FAIL (lost, duplicated or corrupt)"
            }
        )
    }
}

/// The line printed before a run: what runs, on what.
pub fn header(config: &Config) -> String {
    let mut knobs = Vec::new();
    match config.amount {
        Amount::Ops(n) => knobs.push(format!("{n} operations in total")),
        Amount::Duration(d) => knobs.push(format!("{:.1} s", d.as_secs_f64())),
    }
    if let Some(k) = config.yield_every {
        knobs.push(format!("yield every {k}"));
    }
    if let Some(s) = config.sleep {
        knobs.push(format!(
            "sleep {} µs every {}",
            s.duration.as_micros(),
            s.every
        ));
    }
    if let Some(i) = config.signal_interval {
        knobs.push(format!("SIGUSR1 every {} µs", i.as_micros()));
    }
    if let Some(i) = config.affinity_interval {
        knobs.push(format!("affinity churn every {} µs", i.as_micros()));
    }
    if let Some(n) = config.thread_churn {
        knobs.push(format!("thread churn every {n} ops"));
    }
    if let Some(d) = config.delay_loops {
        knobs.push(format!("delay {d} loops"));
    }
    if config.broken {
        knobs.push("BROKEN variant".into());
    }
    format!(
        "cpulocal stress: {}, {} threads; {}; {}; kernel {}; {} online CPUs",
        config.structure,
        config.threads,
        knobs.join(", "),
        cpulocal::mechanism(),
        sys::kernel_release(),
        sys::online_cpus(),
    )
}

/// The test hooks of cpulocal, or what stands in for them in builds without.
mod hooks {
    #[cfg(feature = "test-hooks")]
    pub(super) fn set_delay_loops(loops: usize) {
        cpulocal::test_hooks::set_delay_loops(loops);
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(super) fn set_delay_loops(_: usize) {}

    #[cfg(feature = "test-hooks")]
    pub(super) fn break_counter_sequence(broken: bool) {
        cpulocal::test_hooks::break_counter_sequence(broken);
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(super) fn break_counter_sequence(_: bool) {}

    #[cfg(feature = "test-hooks")]
    pub(super) fn break_stack_guard(broken: bool) {
        cpulocal::test_hooks::break_stack_guard(broken);
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(super) fn break_stack_guard(_: bool) {}

    #[cfg(feature = "test-hooks")]
    pub(super) fn kernel_aborts() -> Option<u64> {
        Some(cpulocal::test_hooks::kernel_aborts())
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(super) fn kernel_aborts() -> Option<u64> {
        None
    }
}

/// A stack node's value.
struct Item {
    id: usize,
    /// Set by the thread that holds the node (off every list), cleared before it pushes
    /// the node back: a node handed out while set is held twice.
    held: AtomicBool,
}

/// A per-CPU slot of the lock part.
struct LockSlot {
    /// The slot's index, so `with_cpu` can say which slot it ran on.
    index: usize,
    /// Increments made under the slot's lock.
    count: u64,
}

/// What one worker (or the remote thread) did.
#[derive(Default)]
struct Tally {
    ops: u64,
    remote_ops: u64,
    counter_adds: u64,
    stack: StackCheck,
    /// Increments per lock slot.
    lock_slots: Vec<u64>,
    lock_remote: u64,
    writer: u32,
    ring_committed: u64,
    ring_refused: u64,
    flushes: u64,
}

/// Everything the threads of a run share.
struct Shared {
    config: Config,
    kinds: &'static [Kind],
    remote_kinds: &'static [Kind],
    counter: Option<Counter>,
    /// The handler's counter when there is no counter part.
    signal_counter: Counter,
    /// Runs of the signal handler.
    handled: AtomicU64,
    stack: Option<Stack<Item>>,
    nodes: usize,
    lock: Option<PerCpu<LockSlot>>,
    ring: Option<RingBuffer>,
    /// The CPUs the run may use: victims of remote operations, targets of moves.
    cpus: Vec<usize>,
    /// Operations left to hand out (`Amount::Ops`).
    remaining: AtomicU64,
    /// No more operations: the duration is over.
    stop: AtomicBool,
    /// The initial workers may start.
    go: AtomicBool,
    /// Initial workers registered and ready.
    ready: AtomicUsize,
    /// Operations done, for progress.
    done: AtomicU64,
    /// Every worker has exited: the remote thread stops.
    workers_finished: AtomicBool,
    /// The signaller and the affinity churner stop.
    aux_stop: AtomicBool,
    /// The ring consumer drains and stops.
    consumer_stop: AtomicBool,
    /// Kernel thread ids of the threads that may be signalled and moved: each has used
    /// cpulocal before it enters, and leaves before it exits.
    participants: Mutex<Vec<libc::pid_t>>,
    next_writer: AtomicU32,
}

/// The run in progress, for the signal handler; null outside runs.
static SINK: AtomicPtr<Shared> = AtomicPtr::new(core::ptr::null_mut());

/// One run at a time per process: the handler, the delay and the guard are global.
static RUN: Mutex<()> = Mutex::new(());

extern "C" fn on_signal(_: libc::c_int) {
    // SAFETY: reading the calling thread's errno location is always allowed.
    let errno = unsafe { *libc::__errno_location() };
    // Acquire: pairs with the Release store in `run` that published the run.
    let shared = SINK.load(Ordering::Acquire);
    if !shared.is_null() {
        // SAFETY: `run` stores a live `Shared` (kept alive by its `Arc`) before the first
        // signal can be sent, and clears it only after every signalled thread is joined.
        let shared = unsafe { &*shared };
        match &shared.counter {
            Some(counter) => counter.add(1),
            None => shared.signal_counter.add(1),
        }
        // Relaxed: read after every thread is joined.
        shared.handled.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: as above; restoring errno keeps the handler invisible to the worker.
    unsafe { *libc::__errno_location() = errno };
}

/// The kernel id of the calling thread.
fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Sets `signal` to run `on_signal`.
fn install_handler(signal: libc::c_int) -> Result<(), String> {
    // SAFETY: sigaction is plain old data; all-zero is a valid (empty) value.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a live sigset_t.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is initialised; the handler does async-signal-safe work only
    // (atomics and `Counter::add`, which is safe in handlers on registered threads).
    if unsafe { libc::sigaction(signal, &action, core::ptr::null_mut()) } != 0 {
        return Err(format!("sigaction: {:?}", sys::Errno::last()));
    }
    Ok(())
}

/// Sets `signal` to ignored: a late one must not kill the process.
fn ignore_signal(signal: libc::c_int) {
    // SAFETY: SIG_IGN is a valid disposition for SIGUSR1.
    unsafe { libc::signal(signal, libc::SIG_IGN) };
}

/// Blocks `signal` in the calling thread (before it exits: a pending one is dropped).
fn block_signal(signal: libc::c_int) {
    // SAFETY: sigset_t is plain old data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t; the old mask is not wanted.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, core::ptr::null_mut());
    }
}

/// The CPUs the calling thread may run on (all possible CPUs if that is unknown).
fn usable_cpus() -> Vec<usize> {
    let possible = cpulocal::possible_cpus();
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let ok =
        unsafe { libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    let cpus: Vec<usize> = if ok {
        (0..possible.min(libc::CPU_SETSIZE as usize))
            // SAFETY: `c` is below CPU_SETSIZE.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        (0..possible).collect()
    } else {
        cpus
    }
}

/// Moves thread `tid` to `cpus`.
fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> bool {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    for &c in cpus {
        // SAFETY: `c` is below CPU_SETSIZE (`usable_cpus` keeps no other).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t of the size passed; `tid` names a live thread
    // of this process (the caller holds the participants' lock).
    unsafe { libc::sched_setaffinity(tid, core::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// xorshift64*: victims, targets, nothing that needs quality.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A seed that differs between threads and runs.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (gettid() as u64) << 32
}

/// The payload length of ring record `seq`: 20 to 46 bytes, not always a multiple of 8.
fn record_len(seq: u64) -> usize {
    20 + (seq % 4) as usize * 8 + (seq % 3) as usize
}

/// Filler byte `i` of record (`writer`, `seq`).
fn filler(writer: u32, seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(i as u8) ^ writer as u8
}

/// FNV-1a, 64 bits.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes record (`writer`, `seq`): writer, seq, filler, checksum of all before it.
fn fill_record(payload: &mut [u8], writer: u32, seq: u64) {
    let n = payload.len();
    payload[..4].copy_from_slice(&writer.to_le_bytes());
    payload[4..12].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in payload[12..n - 8].iter_mut().enumerate() {
        *b = filler(writer, seq, i);
    }
    let sum = checksum(&payload[..n - 8]);
    payload[n - 8..].copy_from_slice(&sum.to_le_bytes());
}

/// The (writer, seq) of an intact record; `None` when anything is off.
fn parse_record(data: &[u8]) -> Option<(u32, u64)> {
    let n = data.len();
    if n < 20 {
        return None;
    }
    let writer = u32::from_le_bytes(data[..4].try_into().ok()?);
    let seq = u64::from_le_bytes(data[4..12].try_into().ok()?);
    let sum = u64::from_le_bytes(data[n - 8..].try_into().ok()?);
    let intact = n == record_len(seq)
        && sum == checksum(&data[..n - 8])
        && data[12..n - 8]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == filler(writer, seq, i));
    intact.then_some((writer, seq))
}

/// What the ring consumer saw.
#[derive(Default)]
struct RingSeen {
    /// Per writer, one bit per sequence number read.
    bits: Vec<Vec<u64>>,
    read: u64,
    duplicated: u64,
    corrupt: u64,
    flushes: u64,
}

impl RingSeen {
    fn check(&mut self, data: &[u8], writers: u32) {
        self.read += 1;
        let Some((writer, seq)) = parse_record(data) else {
            self.corrupt += 1;
            return;
        };
        if writer >= writers || seq >= 1 << 40 {
            self.corrupt += 1;
            return;
        }
        let (w, s) = (writer as usize, seq as usize);
        if self.bits.len() <= w {
            self.bits.resize_with(w + 1, Vec::new);
        }
        let bits = &mut self.bits[w];
        if bits.len() <= s / 64 {
            bits.resize((s / 64 + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << (s % 64);
        if bits[s / 64] & mask != 0 {
            self.duplicated += 1;
        } else {
            bits[s / 64] |= mask;
        }
    }

    /// (records of `0..committed` never read, records read beyond `committed`) for
    /// `writer`.
    fn missing_and_phantom(&self, writer: usize, committed: u64) -> (u64, u64) {
        let bits = self.bits.get(writer).map_or(&[][..], |b| &b[..]);
        let (mut found, mut phantom) = (0u64, 0u64);
        for (i, &word) in bits.iter().enumerate() {
            let base = i as u64 * 64;
            let inside = committed.saturating_sub(base).min(64);
            let mask = if inside == 64 {
                u64::MAX
            } else {
                (1u64 << inside) - 1
            };
            found += u64::from((word & mask).count_ones());
            phantom += u64::from((word & !mask).count_ones());
        }
        (committed - found, phantom)
    }
}

impl Shared {
    fn new(config: &Config) -> Shared {
        let kinds = config.structure.kinds();
        let has = |k| kinds.contains(&k);
        let nodes = (config.threads * 64).clamp(1024, 1 << 20);
        let cpus = usable_cpus();
        Shared {
            config: config.clone(),
            kinds,
            remote_kinds: config.structure.remote_kinds(),
            counter: has(Kind::Counter).then(Counter::new),
            signal_counter: Counter::new(),
            handled: AtomicU64::new(0),
            stack: has(Kind::Stack).then(Stack::new),
            nodes,
            lock: has(Kind::Lock).then(|| PerCpu::new(|index| LockSlot { index, count: 0 })),
            ring: has(Kind::Ring).then(|| {
                RingBuffer::new(RingConfig {
                    sub_buffer_size: 4096,
                    sub_buffers: 16,
                    mode: Mode::DiscardNewest,
                    timestamps: true,
                })
                .expect("a valid ring configuration")
            }),
            cpus,
            remaining: AtomicU64::new(match config.amount {
                Amount::Ops(n) => n,
                Amount::Duration(_) => 0,
            }),
            stop: AtomicBool::new(false),
            go: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
            done: AtomicU64::new(0),
            workers_finished: AtomicBool::new(false),
            aux_stop: AtomicBool::new(false),
            consumer_stop: AtomicBool::new(false),
            participants: Mutex::new(Vec::new()),
            next_writer: AtomicU32::new(0),
        }
    }

    fn participants(&self) -> MutexGuard<'_, Vec<libc::pid_t>> {
        self.participants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enter(&self, tid: libc::pid_t) {
        self.participants().push(tid);
    }

    fn leave(&self, tid: libc::pid_t) {
        let mut p = self.participants();
        if let Some(i) = p.iter().position(|&t| t == tid) {
            p.swap_remove(i);
        }
        drop(p);
        if self.config.signal_interval.is_some() {
            block_signal(STORM);
        }
    }

    /// Takes up to `want` operations from the budget; 0 when the run is over.
    fn claim(&self, want: u64) -> u64 {
        // Relaxed: a flag polled between batches; the join orders the results.
        if self.stop.load(Ordering::Relaxed) {
            return 0;
        }
        match self.config.amount {
            Amount::Duration(_) => want,
            // Relaxed: a budget; nothing else is published through it.
            Amount::Ops(_) => self
                .remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    (r > 0).then(|| r - r.min(want))
                })
                .map_or(0, |before| before.min(want)),
        }
    }

    /// Whether operations remain to be done (for replacing a worker that exited).
    fn has_work(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && match self.config.amount {
                Amount::Duration(_) => true,
                Amount::Ops(_) => self.remaining.load(Ordering::Relaxed) > 0,
            }
    }

    /// `--yield` and `--sleep-us`, inside the window of operation `i`.
    #[inline]
    fn inject(&self, i: u64) {
        if let Some(k) = self.config.yield_every {
            if i % k == k - 1 {
                std::thread::yield_now();
            }
        }
        if let Some(s) = self.config.sleep {
            if i % s.every == s.every - 1 {
                std::thread::sleep(s.duration);
            }
        }
    }

    /// A CPU to reach remotely, preferably not the caller's.
    fn victim(&self, rng: &mut Rng) -> usize {
        let i = rng.below(self.cpus.len());
        if self.cpus.len() > 1 && self.cpus[i] == cpulocal::current_cpu() as usize {
            self.cpus[(i + 1) % self.cpus.len()]
        } else {
            self.cpus[i]
        }
    }

    fn new_tally(&self) -> Tally {
        Tally {
            lock_slots: vec![0; self.lock.as_ref().map_or(0, PerCpu::len)],
            // Relaxed: a unique id is all that is needed.
            writer: self.next_writer.fetch_add(1, Ordering::Relaxed),
            ..Tally::default()
        }
    }

    /// Operation `i` of a worker.
    #[inline]
    fn op(&self, i: u64, t: &mut Tally, rng: &mut Rng) {
        let kind = self.kinds[(i % self.kinds.len() as u64) as usize];
        match kind {
            Kind::Counter => {
                self.counter.as_ref().expect("counter part").add(1);
                t.counter_adds += 1;
                self.inject(i);
            }
            Kind::Stack => self.stack_op(i, t, rng),
            Kind::Lock => {
                let lock = self.lock.as_ref().expect("lock part");
                let index = lock.with_cpu(|slot| {
                    let count = black_box(slot.count);
                    self.inject(i);
                    slot.count = black_box(count + 1);
                    slot.index
                });
                t.lock_slots[index] += 1;
            }
            Kind::Ring => {
                let ring = self.ring.as_ref().expect("ring part");
                let seq = t.ring_committed;
                match ring.reserve(record_len(seq)) {
                    Ok(mut r) => {
                        fill_record(r.payload_mut(), t.writer, seq);
                        self.inject(i);
                        r.commit();
                        t.ring_committed += 1;
                    }
                    Err(ReserveError::Full) => {
                        t.ring_refused += 1;
                        self.inject(i);
                        // Let the consumer catch up.
                        std::thread::yield_now();
                    }
                    Err(e @ ReserveError::TooLarge { .. }) => unreachable!("{e}"),
                }
            }
        }
    }

    fn stack_op(&self, i: u64, t: &mut Tally, rng: &mut Rng) {
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
    fn claim_list(&self, mut list: NodeList<Item>, s: &mut StackCheck) -> Vec<Box<Node<Item>>> {
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

/// A worker: registers, enters the participants, does operations in batches until the
/// budget, the duration or its lifetime is over, leaves.
fn worker(
    shared: Arc<Shared>,
    initial_nodes: core::ops::Range<usize>,
    lifetime: Option<u64>,
) -> Tally {
    cpulocal::register_current_thread();
    let tid = gettid();
    let mut rng = Rng::new(seed());
    let mut t = shared.new_tally();
    if let Some(stack) = &shared.stack {
        for id in initial_nodes {
            stack.push(Node::new(Item {
                id,
                held: AtomicBool::new(false),
            }));
        }
    }
    shared.enter(tid);
    // Release: pairs with the Acquire in `run`, which then sees our nodes pushed.
    shared.ready.fetch_add(1, Ordering::Release);
    // Acquire: pairs with the Release store of `go`, after the hooks are set.
    while !shared.go.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let mut i = 0u64;
    loop {
        let want = lifetime.map_or(BATCH, |l| BATCH.min(l - t.ops));
        let n = if want == 0 { 0 } else { shared.claim(want) };
        if n == 0 {
            break;
        }
        for _ in 0..n {
            shared.op(i, &mut t, &mut rng);
            i += 1;
        }
        t.ops += n;
        // Relaxed: progress only.
        shared.done.fetch_add(n, Ordering::Relaxed);
    }
    shared.leave(tid);
    t
}

/// The remote thread: operations on random CPUs' slots, racing the workers' fast paths.
fn remote(shared: Arc<Shared>) -> Tally {
    cpulocal::register_current_thread();
    let tid = gettid();
    let mut rng = Rng::new(seed());
    let mut t = shared.new_tally();
    shared.enter(tid);
    let kinds = shared.remote_kinds;
    let mut i = 0u64;
    // Acquire: pairs with the Release in `run` once every worker is joined.
    while !shared.workers_finished.load(Ordering::Acquire) {
        let victim = shared.victim(&mut rng);
        match kinds[(i % kinds.len() as u64) as usize] {
            Kind::Lock => {
                let lock = shared.lock.as_ref().expect("lock part");
                lock.on_cpu(victim, |slot| slot.count += 1)
                    .expect("victims are below the slots");
                t.lock_slots[victim] += 1;
                t.lock_remote += 1;
            }
            Kind::Stack => {
                let stack = shared.stack.as_ref().expect("stack part");
                let nodes = if (i / kinds.len() as u64) % 16 == 15 {
                    t.stack.pop_alls += 1;
                    let list = stack
                        .pop_all_on(victim)
                        .expect("victims are below the CPUs");
                    let nodes = shared.claim_list(list, &mut t.stack);
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
            Kind::Ring => {
                let ring = shared.ring.as_ref().expect("ring part");
                ring.flush(victim).expect("victims are below the CPUs");
                t.flushes += 1;
            }
            Kind::Counter => unreachable!("the remote thread does not count"),
        }
        t.remote_ops += 1;
        i += 1;
    }
    shared.leave(tid);
    t
}

/// The ring consumer: reads (and flushes) while the workers write, then drains.
fn consumer(shared: Arc<Shared>) -> RingSeen {
    let ring = shared.ring.as_ref().expect("ring part");
    let mut seen = RingSeen::default();
    let mut last_flush = Instant::now();
    loop {
        // Acquire: pairs with the Release in `run` after every writer is joined, so the
        // last pass sees every commit.
        let last = shared.consumer_stop.load(Ordering::Acquire);
        if last || last_flush.elapsed() >= FLUSH_EVERY {
            let cpus: Vec<usize> = if last {
                (0..ring.cpus()).collect()
            } else {
                shared.cpus.clone()
            };
            for cpu in cpus {
                ring.flush(cpu).expect("cpu below the rings");
                seen.flushes += 1;
            }
            last_flush = Instant::now();
        }
        let mut read = 0;
        for cpu in 0..ring.cpus() {
            read += ring
                .consume(cpu, |rec| {
                    // Relaxed: a writer takes its id before it reserves, and the record
                    // reached us through the ring's Release/Acquire, so this load sees
                    // that id at least (coherence).
                    seen.check(rec.data, shared.next_writer.load(Ordering::Relaxed))
                })
                .expect("cpu below the rings");
        }
        if last {
            return seen;
        }
        if read == 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// The signaller: one signal to the next participant in turn, every `interval`.
fn signaller(shared: Arc<Shared>, interval: Duration) -> u64 {
    // Fine-grained sleeps: the default 50 µs timer slack would stretch the interval.
    // SAFETY: PR_SET_TIMERSLACK takes integers only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let (mut next, mut sent) = (0usize, 0u64);
    // Relaxed: a stop flag; the join orders the result.
    while !shared.aux_stop.load(Ordering::Relaxed) {
        {
            let p = shared.participants();
            if !p.is_empty() {
                let tid = p[next % p.len()];
                next = next.wrapping_add(1);
                // SAFETY: `tid` is a live thread of this process: participants leave the
                // list (under this lock) before they exit.
                if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, STORM) } == 0 {
                    sent += 1;
                }
            }
        }
        std::thread::sleep(interval);
    }
    sent
}

/// The affinity churner: moves the next participant in turn to one random CPU (or back
/// to all of them, one time in four) every `interval`.
fn churner(shared: Arc<Shared>, interval: Duration) -> (u64, u64) {
    let mut rng = Rng::new(seed());
    let (mut next, mut moves, mut failures) = (0usize, 0u64, 0u64);
    // Relaxed: a stop flag; the join orders the result.
    while !shared.aux_stop.load(Ordering::Relaxed) {
        std::thread::sleep(interval);
        let p = shared.participants();
        if p.is_empty() {
            continue;
        }
        let tid = p[next % p.len()];
        next = next.wrapping_add(1);
        let one = [shared.cpus[rng.below(shared.cpus.len())]];
        let target: &[usize] = if rng.below(4) == 0 {
            &shared.cpus
        } else {
            &one
        };
        if set_affinity(tid, target) {
            moves += 1;
        } else {
            failures += 1;
        }
    }
    (moves, failures)
}

fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start a {name} thread: {e}"))
}

fn join<T>(handle: JoinHandle<T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs the stress `config` describes and checks every structure, calling `progress`
/// about ten times a second from the calling thread.
///
/// # Errors
///
/// An invalid `config` ([`Config::validate`]), or a signal handler that cannot be
/// installed.
///
/// # Panics
///
/// When a thread cannot be started, or panicked.
pub fn run(config: &Config, mut progress: impl FnMut(&Progress)) -> Result<Report, String> {
    config.validate()?;
    let _one_at_a_time = RUN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cpulocal::register_current_thread();
    let remote_scheme = cpulocal::remote_scheme().to_string();
    let shared = Arc::new(Shared::new(config));
    if config.signal_interval.is_some() {
        // The handler does nothing while SINK is null, so it can be installed first.
        install_handler(STORM)?;
        // Release: pairs with the handler's Acquire.
        SINK.store(Arc::as_ptr(&shared).cast_mut(), Ordering::Release);
    }

    let threads = config.threads;
    let share = |w: usize| w * shared.nodes / threads..(w + 1) * shared.nodes / threads;
    let lifetime = config.thread_churn;
    let mut workers: Vec<Option<JoinHandle<Tally>>> = (0..threads)
        .map(|w| {
            let (s, nodes) = (Arc::clone(&shared), share(w));
            Some(spawn("stress-worker", move || worker(s, nodes, lifetime)))
        })
        .collect();
    let mut started = threads as u64;
    // Acquire: pairs with the workers' Release: their nodes are pushed.
    while shared.ready.load(Ordering::Acquire) < threads {
        std::thread::sleep(Duration::from_micros(100));
    }

    let delay = config.delay_loops.unwrap_or(0);
    hooks::set_delay_loops(delay);
    hooks::break_stack_guard(config.broken && shared.stack.is_some());
    hooks::break_counter_sequence(config.broken && shared.counter.is_some());
    let aborts_before = hooks::kernel_aborts();
    let start = Instant::now();
    // Release: the hooks are set before any worker starts.
    shared.go.store(true, Ordering::Release);

    let remote_thread = (!shared.remote_kinds.is_empty()).then(|| {
        let s = Arc::clone(&shared);
        spawn("stress-remote", move || remote(s))
    });
    let consumer_thread = shared.ring.is_some().then(|| {
        let s = Arc::clone(&shared);
        spawn("stress-consumer", move || consumer(s))
    });
    let signaller_thread = config.signal_interval.map(|interval| {
        let s = Arc::clone(&shared);
        spawn("stress-signals", move || signaller(s, interval))
    });
    let churner_thread = config.affinity_interval.map(|interval| {
        let s = Arc::clone(&shared);
        spawn("stress-affinity", move || churner(s, interval))
    });

    // Supervise: join workers that exit, replace them under thread churn, stop at the
    // deadline, report progress.
    let mut tallies = Vec::new();
    let mut last_progress = Instant::now();
    loop {
        for slot in workers.iter_mut() {
            if slot.as_ref().is_some_and(JoinHandle::is_finished) {
                tallies.push(join(slot.take().expect("checked")));
                if config.thread_churn.is_some() && shared.has_work() {
                    let s = Arc::clone(&shared);
                    *slot = Some(spawn("stress-worker", move || worker(s, 0..0, lifetime)));
                    started += 1;
                }
            }
        }
        if workers.iter().all(Option::is_none) {
            break;
        }
        if let Amount::Duration(d) = config.amount {
            if start.elapsed() >= d {
                // Relaxed: polled between batches.
                shared.stop.store(true, Ordering::Relaxed);
            }
        }
        if last_progress.elapsed() >= Duration::from_millis(100) {
            last_progress = Instant::now();
            progress(&Progress {
                operations: shared.done.load(Ordering::Relaxed),
                elapsed: start.elapsed(),
                amount: config.amount,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Release: the remote thread stops once every worker is out.
    shared.workers_finished.store(true, Ordering::Release);
    if let Some(handle) = remote_thread {
        tallies.push(join(handle));
    }
    let elapsed = start.elapsed();
    shared.aux_stop.store(true, Ordering::Relaxed);
    let signals_sent = signaller_thread.map_or(0, join);
    let (affinity_moves, affinity_failures) = churner_thread.map_or((0, 0), join);
    let kernel_aborts = hooks::kernel_aborts()
        .zip(aborts_before)
        .map(|(after, before)| after - before);
    hooks::set_delay_loops(0);
    hooks::break_stack_guard(false);
    hooks::break_counter_sequence(false);
    // Release: every writer is joined; the consumer's last pass sees all commits.
    shared.consumer_stop.store(true, Ordering::Release);
    let seen = consumer_thread.map(join);
    if config.signal_interval.is_some() {
        ignore_signal(STORM);
        SINK.store(core::ptr::null_mut(), Ordering::Release);
    }
    progress(&Progress {
        operations: shared.done.load(Ordering::Relaxed),
        elapsed,
        amount: config.amount,
    });

    Ok(check(
        config,
        &shared,
        &tallies,
        seen,
        Facts {
            remote_scheme,
            started,
            elapsed,
            kernel_aborts,
            signals_sent,
            affinity_moves,
            affinity_failures,
        },
    ))
}

/// What the run measured besides the tallies.
struct Facts {
    remote_scheme: String,
    started: u64,
    elapsed: Duration,
    kernel_aborts: Option<u64>,
    signals_sent: u64,
    affinity_moves: u64,
    affinity_failures: u64,
}

/// The exact checks, once every thread is joined.
fn check(
    config: &Config,
    shared: &Shared,
    tallies: &[Tally],
    seen: Option<RingSeen>,
    facts: Facts,
) -> Report {
    let sum = |f: &dyn Fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    // Relaxed: every thread that touched it is joined.
    let handled = shared.handled.load(Ordering::Relaxed);
    let counter = shared.counter.as_ref().map(|c| {
        CounterCheck::new(
            sum(&|t| t.counter_adds),
            handled,
            c.sum(),
            Some(c.slow_path_sum()),
        )
    });
    let signal_counter =
        (shared.counter.is_none() && config.signal_interval.is_some()).then(|| {
            CounterCheck::new(
                0,
                handled,
                shared.signal_counter.sum(),
                Some(shared.signal_counter.slow_path_sum()),
            )
        });
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
    let lock = shared.lock.as_ref().map(|lock| {
        let mut expected = vec![0u64; lock.len()];
        for t in tallies {
            for (e, n) in expected.iter_mut().zip(&t.lock_slots) {
                *e += n;
            }
        }
        let mut l = LockCheck {
            local: sum(&|t| t.lock_slots.iter().sum::<u64>() - t.lock_remote),
            remote: sum(&|t| t.lock_remote),
            ..LockCheck::default()
        };
        lock.for_each(|cpu, slot| {
            let want = expected[cpu];
            l.found += slot.count;
            l.slots_used += u64::from(want > 0 || slot.count > 0);
            l.slots_wrong += u64::from(slot.count != want);
            l.lost += want.saturating_sub(slot.count);
            l.duplicated += slot.count.saturating_sub(want);
        });
        l
    });
    let ring = shared.ring.as_ref().map(|ring| {
        let seen = seen.unwrap_or_default();
        let stats = ring.stats();
        let mut r = RingCheck {
            records: sum(&|t| t.ring_committed),
            read: seen.read,
            remote_commits: stats.remote_commits,
            discarded: stats.discarded,
            refused: sum(&|t| t.ring_refused),
            overwritten: stats.overwritten,
            abandoned: stats.abandoned,
            flushes: seen.flushes + sum(&|t| t.flushes),
            corrupt: seen.corrupt + stats.overwritten + stats.abandoned,
            duplicated: seen.duplicated,
            ..RingCheck::default()
        };
        let mut committed = vec![0u64; seen.bits.len()];
        for t in tallies {
            let w = t.writer as usize;
            if committed.len() <= w {
                committed.resize(w + 1, 0);
            }
            committed[w] += t.ring_committed;
        }
        for (w, &c) in committed.iter().enumerate() {
            let (missing, phantom) = seen.missing_and_phantom(w, c);
            r.lost += missing;
            r.corrupt += phantom;
        }
        // `discarded` is a Counter too: it must match the refusals exactly.
        r.lost += r.refused.saturating_sub(r.discarded);
        r.duplicated += r.discarded.saturating_sub(r.refused);
        r
    });

    let parts_lost = counter.as_ref().map_or(0, |c| c.lost)
        + signal_counter.as_ref().map_or(0, |c| c.lost)
        + stack.as_ref().map_or(0, |s| s.lost)
        + lock.as_ref().map_or(0, |l| l.lost)
        + ring.as_ref().map_or(0, |r| r.lost);
    let parts_duplicated = counter.as_ref().map_or(0, |c| c.duplicated)
        + signal_counter.as_ref().map_or(0, |c| c.duplicated)
        + stack.as_ref().map_or(0, |s| s.duplicated)
        + lock.as_ref().map_or(0, |l| l.duplicated)
        + ring.as_ref().map_or(0, |r| r.duplicated);
    let corrupt = stack.as_ref().map_or(0, |s| s.corrupt) + ring.as_ref().map_or(0, |r| r.corrupt);
    Report {
        structure: config.structure.name(),
        threads: config.threads,
        threads_started: facts.started,
        mechanism: cpulocal::mechanism().to_string(),
        remote_scheme: facts.remote_scheme,
        kernel: sys::kernel_release(),
        online_cpus: sys::online_cpus(),
        usable_cpus: shared.cpus.len(),
        seconds: facts.elapsed.as_secs_f64(),
        operations: sum(&|t| t.ops),
        remote_operations: sum(&|t| t.remote_ops),
        delay_loops: config.delay_loops.unwrap_or(0),
        broken: config.broken,
        kernel_aborts: facts.kernel_aborts,
        slow_path: shared
            .counter
            .as_ref()
            .map(Counter::slow_path_sum)
            .or_else(|| signal_counter.as_ref().and_then(|c| c.slow_path)),
        signals_sent: facts.signals_sent,
        signals_handled: handled,
        affinity_moves: facts.affinity_moves,
        affinity_failures: facts.affinity_failures,
        counter,
        signal_counter,
        stack,
        lock,
        ring,
        lost: parts_lost,
        duplicated: parts_duplicated,
        corrupt,
        passed: parts_lost == 0 && parts_duplicated == 0 && corrupt == 0,
    }
}

/// Detaches every CPU's list and counts each node id. Nodes are freed only when every
/// id was found exactly once; otherwise (a broken run) they are leaked, since a node
/// might still be reachable twice.
fn drain_stack(stack: &Stack<Item>, nodes: usize, s: &mut StackCheck) {
    let mut times = vec![0u8; nodes];
    let mut kept = Vec::with_capacity(nodes);
    for cpu in 0..stack.cpus() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_any_flipped_byte_is_caught() {
        for seq in 0..12u64 {
            let mut buf = vec![0u8; record_len(seq)];
            fill_record(&mut buf, 7, seq);
            assert_eq!(parse_record(&buf), Some((7, seq)));
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x10;
                assert_eq!(parse_record(&bad), None, "seq {seq}, byte {i}");
            }
        }
    }

    #[test]
    fn ring_bookkeeping_counts_missing_duplicate_and_phantom_records() {
        let mut seen = RingSeen::default();
        for seq in [0u64, 1, 3, 3, 70] {
            let mut buf = vec![0u8; record_len(seq)];
            fill_record(&mut buf, 0, seq);
            seen.check(&buf, 1);
        }
        assert_eq!(seen.duplicated, 1);
        // Committed 0..5: 2 and 4 missing; 70 was never committed.
        assert_eq!(seen.missing_and_phantom(0, 5), (2, 1));
        assert_eq!(seen.missing_and_phantom(1, 3), (3, 0));
        let mut buf = vec![0u8; record_len(0)];
        fill_record(&mut buf, 5, 0);
        seen.check(&buf, 1);
        assert_eq!(seen.corrupt, 1, "an unknown writer is corrupt");
    }

    #[test]
    fn knobs_that_need_test_hooks_say_how_to_get_them() {
        let mut config = Config::new(Structure::Counter, 1, Amount::Ops(1));
        config.delay_loops = Some(10);
        assert_eq!(config.validate().is_ok(), HAS_TEST_HOOKS);
        if !HAS_TEST_HOOKS {
            assert!(config.validate().unwrap_err().contains(NEEDS_TEST_HOOKS));
        }
        let mut config = Config::new(Structure::Lock, 1, Amount::Ops(1));
        config.broken = true;
        assert!(config.validate().is_err());
    }

    #[test]
    fn every_structure_is_exact_in_a_small_run() {
        for structure in Structure::ALL {
            let mut config = Config::new(structure, 3, Amount::Ops(20_000));
            config.yield_every = Some(50);
            config.signal_interval = Some(Duration::from_micros(200));
            config.affinity_interval = Some(Duration::from_micros(500));
            let report = run(&config, |_| ()).expect("valid config");
            assert!(report.passed, "{structure}: {report}");
            assert_eq!(report.operations, 20_000, "{structure}");
        }
    }
}
