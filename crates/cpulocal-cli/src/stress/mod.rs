//! `cpulocal stress`: torture runs that hunt the windows in which a restartable sequence
//! could go wrong, followed by an exact check of every structure.
//!
//! # Method
//!
//! In the spirit of the kernel's rseq `param_test`: more threads than CPUs (preemption
//! and migration inside sequences), with optional injections — `sched_yield` or a short
//! sleep every K operations, placed *inside* each operation's window; a signal storm
//! whose handler itself adds to a [`Counter`](cpulocal::Counter) that is part of the checked total; a thread
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
//!
//! # Layout
//!
//! One module per structure: `counter.rs`, `stack.rs`, `lock.rs` and `ring.rs` each
//! define a *part* (its state for a run, its operation, its remote operation, its check
//! and its report) and the structure of that part alone; `remote.rs` and `mix.rs` define
//! structures made of those parts. `part.rs` is the contract between them and the
//! harness; `harness.rs` holds the state a run shares and its threads (workers, remote
//! thread, signaller, churner); this module the registry ([`Structure::ALL`]), the
//! configuration, the run and the report. A new structure is one new module and one
//! line in [`Structure::ALL`]: the harness, the command line's `--structure`, the
//! report (text and JSON) and `--broken` take their cue from the registry.

use core::fmt;
use core::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cpulocal::sys;
use serde::Serialize;

use harness::{
    churner, hooks, ignore_signal, install_handler, join, remote, signaller, spawn, worker, Shared,
    Tally, RUN, SINK, STORM,
};
use part::{PartDef, Sections, StructureDef};

mod harness;
mod part;

mod counter;
mod lock;
mod mix;
mod remote;
mod ring;
mod stack;

pub use counter::CounterCheck;
pub use lock::LockCheck;
pub use ring::RingCheck;
pub use stack::StackCheck;

/// The most threads a run may start at once.
pub const MAX_THREADS: usize = 4096;
/// What the error messages say when a knob needs the `test-hooks` feature.
pub const NEEDS_TEST_HOOKS: &str = "rebuild with --features test-hooks";
/// Whether this build has cpulocal's test hooks (`--delay`, `--broken`, abort counts).
pub const HAS_TEST_HOOKS: bool = cfg!(feature = "test-hooks");

/// What a run tortures: one cpulocal structure, or several in turn. Each structure is a
/// module of its own; [`Structure::ALL`] lists them.
#[derive(Clone, Copy)]
pub struct Structure(&'static StructureDef);

impl Structure {
    /// Every structure, in the order `--help` and the report list them. A new structure:
    /// its module, and one line here.
    pub const ALL: &'static [Structure] = &[
        Structure(&counter::STRUCTURE),
        Structure(&stack::STRUCTURE),
        Structure(&lock::STRUCTURE),
        Structure(&ring::STRUCTURE),
        Structure(&remote::STRUCTURE),
        Structure(&mix::STRUCTURE),
    ];

    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        self.0.name
    }

    fn def(self) -> &'static StructureDef {
        self.0
    }

    /// Whether `--broken` has a deliberately broken variant of one of its parts.
    fn has_mutation(self) -> bool {
        self.0.parts.iter().any(|p| p.mutation.is_some())
    }
}

/// Every part of the registered structures, each once, in the order of the registry:
/// the order of the report.
fn registered_parts() -> Vec<&'static PartDef> {
    let mut parts: Vec<&'static PartDef> = Vec::new();
    for s in Structure::ALL {
        for &p in s.0.parts.iter().chain(s.0.remote) {
            if !parts.iter().any(|q| q.name == p.name) {
                parts.push(p);
            }
        }
    }
    parts
}

/// "a", "a and b", "a, b and c" (with `conjunction` "and").
fn list(names: &[&str], conjunction: &str) -> String {
    match names.split_last() {
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} {conjunction} {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The help of `--structure`: "What to torture: a, b (what b is) or c"
///
/// ```
/// let help = cpulocal_cli::stress::structure_help();
/// assert!(help.starts_with("What to torture: counter, stack, lock (PerCpu::with_cpu)"));
/// ```
pub fn structure_help() -> String {
    let names: Vec<String> = Structure::ALL
        .iter()
        .map(|s| match s.0.help {
            Some(help) => format!("{} ({help})", s.name()),
            None => s.name().to_string(),
        })
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    format!("What to torture: {}", list(&names, "or"))
}

impl PartialEq for Structure {
    fn eq(&self, other: &Structure) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Structure {}

impl core::hash::Hash for Structure {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl fmt::Debug for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Structure").field(&self.name()).finish()
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
    /// assert_eq!("ring".parse::<Structure>().unwrap().name(), "ring");
    /// assert!("queue".parse::<Structure>().unwrap_err().contains("counter"));
    /// ```
    fn from_str(s: &str) -> Result<Structure, String> {
        Structure::ALL
            .iter()
            .copied()
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
    /// use cpulocal_cli::stress::{Amount, Config};
    /// let config = Config::new("counter".parse().unwrap(), 2, Amount::Ops(1000));
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
    /// use cpulocal_cli::stress::{Amount, Config};
    /// let mut config = Config::new("ring".parse().unwrap(), 2, Amount::Ops(10));
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
            if !self.structure.has_mutation() {
                return Err(broken_error(self.structure));
            }
        }
        Ok(())
    }
}

/// The refusal of `--broken` for `structure`, which has no broken variant: "--broken has
/// mutations for a and b (and c, d), not for e", the structures of one part first, then
/// the ones made of several.
fn broken_error(structure: Structure) -> String {
    let with = |one: bool| -> Vec<&str> {
        Structure::ALL
            .iter()
            .filter(|s| s.has_mutation() && (s.0.parts.len() == 1) == one)
            .map(|s| s.name())
            .collect()
    };
    let composites = with(false);
    let also = if composites.is_empty() {
        String::new()
    } else {
        format!(" (and {})", composites.join(", "))
    };
    format!(
        "--broken has mutations for {}{also}, not for {structure}",
        list(&with(true), "and")
    )
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
    /// Each part's check under its name, null when the run has no such part, in the
    /// order of the registry: `counter` ([`CounterCheck`]), `signal_counter` (a
    /// [`CounterCheck`] of the signal handler's own counter, when the structure has no
    /// counter part), `stack` ([`StackCheck`]), `lock` ([`LockCheck`]), `ring`
    /// ([`RingCheck`]).
    #[serde(flatten)]
    sections: Sections,
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
        for line in self.sections.lines() {
            writeln!(f, "{line}")?;
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
    let lifetime = config.thread_churn;
    let mut workers: Vec<Option<JoinHandle<Tally>>> = (0..threads)
        .map(|w| {
            let s = Arc::clone(&shared);
            Some(spawn("stress-worker", move || {
                worker(s, Some((w, threads)), lifetime)
            }))
        })
        .collect();
    let mut started = threads as u64;
    // Acquire: pairs with the workers' Release: the parts are seeded.
    while shared.ready.load(Ordering::Acquire) < threads {
        std::thread::sleep(Duration::from_micros(100));
    }

    let delay = config.delay_loops.unwrap_or(0);
    hooks::set_delay_loops(delay);
    set_mutations(&shared, config.broken);
    let aborts_before = hooks::kernel_aborts();
    let start = Instant::now();
    // Release: the hooks are set before any worker starts.
    shared.go.store(true, Ordering::Release);

    let remote_thread = (!shared.remote_turns.is_empty()).then(|| {
        let s = Arc::clone(&shared);
        spawn("stress-remote", move || remote(s))
    });
    let background_threads: Vec<JoinHandle<()>> = (0..shared.parts.len())
        .filter_map(|k| {
            let name = shared.parts[k].1.background_thread()?;
            let s = Arc::clone(&shared);
            Some(spawn(name, move || s.parts[k].1.background(&s)))
        })
        .collect();
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
                    *slot = Some(spawn("stress-worker", move || worker(s, None, lifetime)));
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
    set_mutations(&shared, false);
    // Release: every writer is joined; the consumer's last pass sees all commits.
    shared.background_stop.store(true, Ordering::Release);
    background_threads.into_iter().for_each(join);
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

/// Switches the broken variant of every registered part on (`broken`: those of the run)
/// or off.
fn set_mutations(shared: &Shared, broken: bool) {
    for def in registered_parts() {
        if let Some(mutation) = def.mutation {
            let in_run = shared.parts.iter().any(|(p, _)| p.name == def.name);
            mutation(broken && in_run);
        }
    }
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
fn check(config: &Config, shared: &Shared, tallies: &[Tally], facts: Facts) -> Report {
    let sum = |f: &dyn Fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let mut entries = Vec::new();
    for def in registered_parts() {
        match shared.parts.iter().position(|(p, _)| p.name == def.name) {
            Some(k) => {
                let part_tallies: Vec<_> = tallies.iter().map(|t| &*t.parts[k]).collect();
                entries.extend(shared.parts[k].1.check(shared, &part_tallies));
            }
            None => match def.absent {
                Some(absent) => entries.extend(absent(shared)),
                None => entries.push(part::Entry::null(def.name)),
            },
        }
    }
    let sections = Sections(entries);
    let lost = sections.present().map(|s| s.lost).sum();
    let duplicated = sections.present().map(|s| s.duplicated).sum();
    let corrupt = sections.present().map(|s| s.corrupt).sum();
    let slow_path = sections.present().find_map(|s| s.slow_path);
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
        slow_path,
        signals_sent: facts.signals_sent,
        signals_handled: shared.handled(),
        affinity_moves: facts.affinity_moves,
        affinity_failures: facts.affinity_failures,
        sections,
        lost,
        duplicated,
        corrupt,
        passed: lost == 0 && duplicated == 0 && corrupt == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Structure {
        name.parse().expect("a registered structure")
    }

    #[test]
    fn knobs_that_need_test_hooks_say_how_to_get_them() {
        let mut config = Config::new(named("counter"), 1, Amount::Ops(1));
        config.delay_loops = Some(10);
        assert_eq!(config.validate().is_ok(), HAS_TEST_HOOKS);
        if !HAS_TEST_HOOKS {
            assert!(config.validate().unwrap_err().contains(NEEDS_TEST_HOOKS));
        }
        let mut config = Config::new(named("lock"), 1, Amount::Ops(1));
        config.broken = true;
        assert_eq!(
            config.validate().unwrap_err(),
            if HAS_TEST_HOOKS {
                "--broken has mutations for counter and stack (and remote, mix), not for lock"
                    .to_string()
            } else {
                format!("--broken needs cpulocal's test hooks, which this build lacks: {NEEDS_TEST_HOOKS}")
            }
        );
    }

    #[test]
    fn the_report_has_every_part_under_its_key_in_registry_order() {
        let mut config = Config::new(named("ring"), 2, Amount::Ops(1000));
        config.signal_interval = Some(Duration::from_micros(200));
        let report = run(&config, |_| ()).expect("valid config");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let text = report.to_json();
        // The last occurrence: the top-level key (`lost` is also a key of every check).
        let at = |key: &str| text.rfind(&format!("\"{key}\":")).expect(key);
        let keys = [
            "affinity_failures",
            "counter",
            "signal_counter",
            "stack",
            "lock",
            "ring",
            "lost",
        ];
        assert!(keys.windows(2).all(|w| at(w[0]) < at(w[1])), "{text}");
        assert!(json["counter"].is_null() && json["stack"].is_null() && json["lock"].is_null());
        assert_eq!(json["ring"]["lost"], 0, "{text}");
        assert_eq!(json["signal_counter"]["expected"], json["signals_handled"]);
        let text = report.to_string();
        let labels: Vec<&str> = text.lines().filter_map(|l| l.split(':').next()).collect();
        assert!(
            labels.contains(&"signal counter") && labels.contains(&"ring"),
            "{report}"
        );
    }

    #[test]
    fn help_names_every_structure_with_its_note() {
        assert_eq!(
            structure_help(),
            "What to torture: counter, stack, lock (PerCpu::with_cpu), ring, remote (on_cpu, \
             steal, flush racing the fast paths) or mix"
        );
    }

    #[test]
    fn every_structure_is_exact_in_a_small_run() {
        for &structure in Structure::ALL {
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
