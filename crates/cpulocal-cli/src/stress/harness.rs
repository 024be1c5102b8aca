//! The shared harness of `cpulocal stress`: the state every thread of a run shares
//! ([`Shared`]), what each thread did ([`Tally`]), the workers, the remote thread, the
//! signaller and the affinity churner. Each structure's part (its state, its operation,
//! its remote operation, its check) is in a module of its own, reached through
//! [`ErasedPart`].

use core::any::Any;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cpulocal::{sys, Counter};

use super::part::{ErasedPart, PartDef, Turn};
use super::registry::registered_parts;
use super::{Amount, Config};

/// The signal of `--signals`.
pub(super) const STORM: libc::c_int = libc::SIGUSR1;
/// Operations a worker claims from the budget at a time.
pub(super) const BATCH: u64 = 256;

/// The test hooks of cpulocal, or what stands in for them in builds without.
pub(super) mod hooks {
    #[cfg(feature = "test-hooks")]
    pub(in crate::stress) fn set_delay_loops(loops: usize) {
        cpulocal::test_hooks::set_delay_loops(loops);
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(in crate::stress) fn set_delay_loops(_: usize) {}

    #[cfg(feature = "test-hooks")]
    pub(in crate::stress) fn break_counter_sequence(counter: Option<&cpulocal::Counter>) {
        cpulocal::test_hooks::break_counter_sequence(counter);
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(in crate::stress) fn break_counter_sequence(_: Option<&cpulocal::Counter>) {}

    #[cfg(feature = "test-hooks")]
    pub(in crate::stress) fn break_stack_guard(broken: bool) {
        cpulocal::test_hooks::break_stack_guard(broken);
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(in crate::stress) fn break_stack_guard(_: bool) {}

    #[cfg(feature = "test-hooks")]
    pub(in crate::stress) fn on_overwritten_record(hook: fn(&cpulocal::ring::RingBuffer, &[u8])) {
        cpulocal::test_hooks::on_overwritten_record(hook);
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(in crate::stress) fn on_overwritten_record(_: fn(&cpulocal::ring::RingBuffer, &[u8])) {}

    #[cfg(feature = "test-hooks")]
    pub(in crate::stress) fn kernel_aborts() -> Option<u64> {
        Some(cpulocal::test_hooks::kernel_aborts())
    }
    #[cfg(not(feature = "test-hooks"))]
    pub(in crate::stress) fn kernel_aborts() -> Option<u64> {
        None
    }
}

/// What one worker (or the remote thread) did.
pub(super) struct Tally {
    pub(super) ops: u64,
    pub(super) remote_ops: u64,
    /// Per part of the run (as in [`Shared::parts`]), that part's tally.
    pub(super) parts: Vec<Box<dyn Any + Send>>,
}

/// Everything the threads of a run share.
pub(super) struct Shared {
    pub(super) config: Config,
    /// The parts of the run (each once, in the order of the registry) and their state.
    pub(super) parts: Vec<(&'static PartDef, Box<dyn ErasedPart>)>,
    /// The workers' turns: indices into `parts`.
    turns: Vec<usize>,
    /// The remote thread's turns: indices into `parts`; empty: no remote thread.
    pub(super) remote_turns: Vec<usize>,
    /// The handler's counter when no part offers one.
    pub(super) signal_counter: Counter,
    /// Runs of the signal handler.
    handled: AtomicU64,
    /// The CPUs the run may use: victims of remote operations, targets of moves.
    pub(super) cpus: Vec<usize>,
    /// Operations left to hand out (`Amount::Ops`).
    pub(super) remaining: AtomicU64,
    /// No more operations: the duration is over.
    pub(super) stop: AtomicBool,
    /// The initial workers may start.
    pub(super) go: AtomicBool,
    /// Initial workers registered and ready.
    pub(super) ready: AtomicUsize,
    /// Operations done, for progress.
    pub(super) done: AtomicU64,
    /// Every worker has exited: the remote thread stops.
    pub(super) workers_finished: AtomicBool,
    /// The signaller and the affinity churner stop.
    pub(super) aux_stop: AtomicBool,
    /// The parts' background threads (the ring's consumer) finish their work and stop.
    pub(super) background_stop: AtomicBool,
    /// Kernel thread ids of the threads that may be signalled and moved: each has used
    /// cpulocal before it enters, and leaves before it exits.
    pub(super) participants: Mutex<Vec<libc::pid_t>>,
}

/// The run in progress, for the signal handler; null outside runs.
pub(super) static SINK: AtomicPtr<Shared> = AtomicPtr::new(core::ptr::null_mut());

/// One run at a time per process: the handler, the delay and the guard are global.
pub(super) static RUN: Mutex<()> = Mutex::new(());

extern "C" fn on_signal(_: libc::c_int) {
    // SAFETY: reading the calling thread's errno location is always allowed.
    let errno = unsafe { *libc::__errno_location() };
    // Acquire: pairs with the Release store in `run` that published the run.
    let shared = SINK.load(Ordering::Acquire);
    if !shared.is_null() {
        // SAFETY: `run` stores a live `Shared` (kept alive by its `Arc`) before the first
        // signal can be sent, and clears it only after every signalled thread is joined.
        let shared = unsafe { &*shared };
        shared.signal_target().add(1);
        // Relaxed: read after every thread is joined.
        shared.handled.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: as above; restoring errno keeps the handler invisible to the worker.
    unsafe { *libc::__errno_location() = errno };
}

/// The kernel id of the calling thread.
pub(super) fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Sets `signal` to run `on_signal`.
pub(super) fn install_handler(signal: libc::c_int) -> Result<(), String> {
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
pub(super) fn ignore_signal(signal: libc::c_int) {
    // SAFETY: SIG_IGN is a valid disposition for SIGUSR1.
    unsafe { libc::signal(signal, libc::SIG_IGN) };
}

/// Blocks `signal` in the calling thread (before it exits: a pending one is dropped).
pub(super) fn block_signal(signal: libc::c_int) {
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
pub(super) fn usable_cpus() -> Vec<usize> {
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
pub(super) fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> bool {
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
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A seed that differs between threads and runs.
pub(super) fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (gettid() as u64) << 32
}

impl Shared {
    pub(super) fn new(config: &Config) -> Shared {
        let structure = config.structure.def();
        let uses = |def: &PartDef| {
            let named = |p: &&PartDef| p.name == def.name;
            structure.parts.iter().any(named) || structure.remote.iter().any(named)
        };
        let parts: Vec<(&'static PartDef, Box<dyn ErasedPart>)> = registered_parts()
            .into_iter()
            .filter(|def| uses(def))
            .map(|def| (def, (def.new)(config)))
            .collect();
        let index = |def: &&PartDef| {
            parts
                .iter()
                .position(|(p, _)| p.name == def.name)
                .expect("a part of the run")
        };
        Shared {
            config: config.clone(),
            turns: structure.parts.iter().map(index).collect(),
            remote_turns: structure.remote.iter().map(index).collect(),
            parts,
            signal_counter: Counter::new(),
            handled: AtomicU64::new(0),
            cpus: usable_cpus(),
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
            background_stop: AtomicBool::new(false),
            participants: Mutex::new(Vec::new()),
        }
    }

    /// The counter the signal handler adds to: a part's (the counter part's), else the
    /// harness's own. Async-signal-safe: no allocation, no lock.
    pub(super) fn signal_target(&self) -> &Counter {
        self.parts
            .iter()
            .find_map(|(_, part)| part.signal_counter())
            .unwrap_or(&self.signal_counter)
    }

    /// Runs of the signal handler so far (all of them once every thread is joined).
    pub(super) fn handled(&self) -> u64 {
        // Relaxed: read after every thread that touched it is joined.
        self.handled.load(Ordering::Relaxed)
    }

    pub(super) fn participants(&self) -> MutexGuard<'_, Vec<libc::pid_t>> {
        self.participants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes thread `tid` a target of the signaller and the churner until the guard
    /// drops: also when the thread panics, so that they never aim at a thread that has
    /// exited (whose id the kernel may hand to a new thread not yet registered).
    pub(super) fn participate(&self, tid: libc::pid_t) -> Participant<'_> {
        self.participants().push(tid);
        Participant(self, tid)
    }

    /// What [`Participant`]'s drop does.
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
    pub(super) fn claim(&self, want: u64) -> u64 {
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
    pub(super) fn has_work(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && match self.config.amount {
                Amount::Duration(_) => true,
                Amount::Ops(_) => self.remaining.load(Ordering::Relaxed) > 0,
            }
    }

    /// `--yield` and `--sleep-us`, inside the window of operation `i`.
    #[inline]
    pub(super) fn inject(&self, i: u64) {
        if let Some(k) = self.config.yield_every {
            if i % k == k - 1 {
                std::thread::yield_now();
            }
        }
        if let Some(s) = self.config.sleep {
            if i % s.every == s.every - 1 {
                self.sleep_unless_stopped(s.duration);
            }
        }
    }

    /// Sleeps `duration` in slices of at most a millisecond, returning early once the
    /// run is stopped: a run ends at its `--duration` whatever `--sleep-us` says.
    fn sleep_unless_stopped(&self, duration: Duration) {
        const SLICE: Duration = Duration::from_millis(1);
        let end = Instant::now() + duration;
        // Relaxed: a flag polled between slices.
        while !self.stop.load(Ordering::Relaxed) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }

    /// A CPU to reach remotely, preferably not the caller's.
    pub(super) fn victim(&self, rng: &mut Rng) -> usize {
        let i = rng.below(self.cpus.len());
        if self.cpus.len() > 1 && self.cpus[i] == cpulocal::current_cpu() {
            self.cpus[(i + 1) % self.cpus.len()]
        } else {
            self.cpus[i]
        }
    }

    pub(super) fn new_tally(&self) -> Tally {
        Tally {
            ops: 0,
            remote_ops: 0,
            parts: self.parts.iter().map(|(_, p)| p.new_tally()).collect(),
        }
    }

    /// Operation `i` of a worker: the part whose turn it is.
    #[inline]
    pub(super) fn op(&self, i: u64, t: &mut Tally, rng: &mut Rng) {
        let turns = self.turns.len() as u64;
        let k = self.turns[(i % turns) as usize];
        let turn = Turn { i, n: i / turns };
        self.parts[k].1.op(self, turn, &mut *t.parts[k], rng);
    }
}

/// A participant of [`Shared`], until dropped ([`Shared::participate`]).
pub(super) struct Participant<'a>(&'a Shared, libc::pid_t);

impl Drop for Participant<'_> {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

/// A worker: registers, enters the participants, does operations in batches until the
/// budget, the duration or its lifetime is over, leaves.
///
/// `initial`: (this worker, of how many) for the workers that start the run, which
/// seed the parts (e.g. push their share of the stack's nodes); `None` for replacements.
pub(super) fn worker(
    shared: Arc<Shared>,
    initial: Option<(usize, usize)>,
    lifetime: Option<u64>,
) -> Tally {
    cpulocal::register_current_thread();
    let tid = gettid();
    let mut rng = Rng::new(seed());
    let mut t = shared.new_tally();
    if let Some((w, workers)) = initial {
        for (_, part) in &shared.parts {
            part.seed(w, workers);
        }
    }
    let participant = shared.participate(tid);
    // Release: pairs with the Acquire in `run`, which then sees the parts seeded.
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
    drop(participant);
    t
}

/// The remote thread: operations on random CPUs' slots, racing the workers' fast paths.
pub(super) fn remote(shared: Arc<Shared>) -> Tally {
    cpulocal::register_current_thread();
    let tid = gettid();
    let mut rng = Rng::new(seed());
    let mut t = shared.new_tally();
    let participant = shared.participate(tid);
    let turns = shared.remote_turns.len() as u64;
    let mut i = 0u64;
    // Acquire: pairs with the Release in `run` once every worker is joined.
    while !shared.workers_finished.load(Ordering::Acquire) {
        let victim = shared.victim(&mut rng);
        let k = shared.remote_turns[(i % turns) as usize];
        shared.parts[k]
            .1
            .remote_op(&shared, victim, i / turns, &mut *t.parts[k]);
        t.remote_ops += 1;
        i += 1;
    }
    drop(participant);
    t
}

/// The signaller: one signal to the next participant in turn, every `interval`.
pub(super) fn signaller(shared: Arc<Shared>, interval: Duration) -> u64 {
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
pub(super) fn churner(shared: Arc<Shared>, interval: Duration) -> (u64, u64) {
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

pub(super) fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start a {name} thread: {e}"))
}

/// Joins `handle`: its result, or what its panic said (with the thread's name), for
/// the report. A panicking thread fails the run with a report rather than taking the
/// process down without one.
pub(super) fn join<T>(handle: JoinHandle<T>) -> Result<T, String> {
    let name = handle
        .thread()
        .name()
        .unwrap_or("a stress thread")
        .to_owned();
    handle
        .join()
        .map_err(|panic| format!("{name} panicked: {}", panic_message(&*panic)))
}

/// The message of a panic's payload (`panic!` makes a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a payload that is not a string)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_is_joined_as_its_name_and_message() {
        let handle = spawn("stress-worker", || -> u64 { panic!("record {} torn", 7) });
        assert_eq!(
            join(handle),
            Err("stress-worker panicked: record 7 torn".to_owned())
        );
        assert_eq!(join(spawn("stress-worker", || 5)), Ok(5));
    }

    #[test]
    fn a_participant_that_panics_leaves() {
        let shared = Arc::new(Shared::new(&Config::new(
            "ring".parse().expect("a registered structure"),
            1,
            Amount::Ops(1),
        )));
        let s = Arc::clone(&shared);
        let handle = spawn("stress-worker", move || {
            let _participant = s.participate(gettid());
            assert_eq!(s.participants().len(), 1);
            panic!("mid-run");
        });
        assert!(join(handle).is_err());
        assert!(shared.participants().is_empty(), "its id is still a target");
    }
}
