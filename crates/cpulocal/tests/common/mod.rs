//! Helpers shared by the integration tests. Every test binary compiles its own copy and
//! uses a subset of it:
//!
//! - [`serial`]: the delay hook, signal handlers and test switches are process-wide,
//!   and the test machines have 2 CPUs, so the tests of one binary run one at a time;
//! - [`in_child`]: re-runs one test in a child process with another environment
//!   (`CPULOCAL_DISABLE_RSEQ`, `CPULOCAL_DISABLE_MEMBARRIER` are read once per process);
//! - [`SignalStorm`]: a thread sending a signal to each worker in turn, every ~100 µs;
//! - [`AffinityChurn`]: a thread pinning each worker in turn to one CPU, forcing
//!   migrations;
//! - [`Delay`]: the `__test-hooks` delay inside every sequence (nothing without the
//!   feature), and [`kernel_aborts`].
#![allow(dead_code, reason = "each test binary uses a subset of the helpers")]

pub(crate) mod ring;

use std::os::unix::thread::{JoinHandleExt, RawPthread};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// With the `__global-cpu-cache` feature every integration test binary allocates
/// through `CpuCache` (then `alloc_global` uses its own instance beside it).
#[cfg(feature = "__global-cpu-cache")]
#[global_allocator]
static GLOBAL_CPU_CACHE: cpulocal::alloc::CpuCache = cpulocal::alloc::CpuCache::new();

static SERIAL: Mutex<()> = Mutex::new(());

/// Held by every test of a binary for its whole run (the parent of a child test too, so
/// that two stress runs never share the 2 CPUs).
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------

/// Set in a child to the name of the test it runs.
const CHILD_ENV: &str = "CPULOCAL_IT_CHILD";
/// Printed by a child whose body returned.
const MARKER: &str = "cpulocal-it-child-ok";
/// The variables that choose cpulocal's mechanisms: a child gets only those it asks for.
const CPULOCAL_ENV: [&str; 2] = ["CPULOCAL_DISABLE_RSEQ", "CPULOCAL_DISABLE_MEMBARRIER"];

/// Whether this process is the child that runs test `name`.
pub(crate) fn is_child(name: &str) -> bool {
    match std::env::var(CHILD_ENV) {
        Ok(running) => {
            assert_eq!(running, name, "a child runs exactly one test");
            true
        }
        Err(_) => false,
    }
}

/// [`in_child`] with `CPULOCAL_DISABLE_MEMBARRIER=1`: the child checks that rseq stays
/// on while remote access uses the locked scheme, then runs `body`.
pub(crate) fn in_locked_scheme_child(name: &str, body: impl FnOnce()) -> Option<String> {
    in_child(name, &[("CPULOCAL_DISABLE_MEMBARRIER", "1")], || {
        assert!(uses_sequences(), "rseq itself stays on");
        assert_eq!(
            cpulocal::remote_scheme(),
            cpulocal::remote::Scheme::Locked(cpulocal::remote::LockedReason::Disabled)
        );
        body();
    })
}

/// [`in_child`] with `CPULOCAL_DISABLE_RSEQ=1`: the child checks that the process runs
/// the fallback and the locked scheme, then runs `body`.
pub(crate) fn in_fallback_child(name: &str, body: impl FnOnce()) -> Option<String> {
    in_child(name, &[("CPULOCAL_DISABLE_RSEQ", "1")], || {
        assert_eq!(
            cpulocal::mechanism(),
            cpulocal::Mechanism::Fallback(cpulocal::FallbackReason::Disabled)
        );
        assert_eq!(
            cpulocal::remote_scheme(),
            cpulocal::remote::Scheme::Locked(cpulocal::remote::LockedReason::NoRseq)
        );
        body();
    })
}

/// In the parent: re-executes this test binary to run only the test `name` (which
/// must be the name libtest gives it: the function's name for a test at the root of
/// an integration test file), with `env` added to an environment cleared of
/// cpulocal's switches, and asserts that it passed. In the child: runs `body`.
///
/// Returns the child's standard output in the parent, `None` in the child.
pub(crate) fn in_child(name: &str, env: &[(&str, &str)], body: impl FnOnce()) -> Option<String> {
    if is_child(name) {
        body();
        println!("{MARKER} {name}");
        return None;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name);
    for var in CPULOCAL_ENV {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn the child test");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown by libtest for a failing test, or with --nocapture.
    println!(
        "--- child {name} {env:?} ({}) ---\n{stdout}{stderr}--- end child ---",
        out.status
    );
    assert!(out.status.success(), "child {name} failed: {}", out.status);
    assert!(
        stdout.contains(&format!("{MARKER} {name}")) && stdout.contains("1 passed"),
        "child {name} did not run its body (is the test name right?)"
    );
    Some(stdout)
}

// ---------------------------------------------------------------------------------
// Test hooks
// ---------------------------------------------------------------------------------

/// The delay inside every sequence, for as long as the value lives (0 afterwards).
/// Without the `__test-hooks` feature it does nothing: the tests still run, with the
/// windows they get.
#[derive(Debug)]
pub(crate) struct Delay(());

impl Delay {
    /// Sets `loops` `pause` iterations inside every sequence.
    pub(crate) fn set(loops: usize) -> Delay {
        #[cfg(feature = "__test-hooks")]
        cpulocal::test_hooks::set_delay_loops(loops);
        #[cfg(not(feature = "__test-hooks"))]
        let _ = loops;
        Delay(())
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        #[cfg(feature = "__test-hooks")]
        cpulocal::test_hooks::set_delay_loops(0);
    }
}

/// Sequences the kernel restarted in this process so far; `None` without the
/// `__test-hooks` feature.
#[cfg(feature = "__test-hooks")]
pub(crate) fn kernel_aborts() -> Option<u64> {
    Some(cpulocal::test_hooks::kernel_aborts())
}

/// Sequences the kernel restarted: unknown without the `__test-hooks` feature.
#[cfg(not(feature = "__test-hooks"))]
pub(crate) fn kernel_aborts() -> Option<u64> {
    None
}

/// Whether the process uses rseq sequences for its fast paths (and so whether kernel
/// aborts can happen at all).
pub(crate) fn uses_sequences() -> bool {
    matches!(cpulocal::mechanism(), cpulocal::Mechanism::Rseq { .. })
}

// ---------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------

/// Installs `handler` for `signal`, with `SA_RESTART` (so the workers' blocking calls
/// resume).
pub(crate) fn install_handler(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: sigaction is plain old data; all-zero is a valid (empty) value.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a live sigset_t.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: (1) `action` is fully initialised; (2) the handlers of these tests do
    // only async-signal-safe work (atomics, cpulocal operations on a thread that is not
    // inside one); (3) the old action is not wanted.
    let r = unsafe { libc::sigaction(signal, &action, core::ptr::null_mut()) };
    assert_eq!(r, 0, "sigaction: {}", std::io::Error::last_os_error());
}

/// Sets `signal` back to ignored (not to the default, which would kill the process if a
/// late signal were still pending).
pub(crate) fn ignore_signal(signal: libc::c_int) {
    // SAFETY: SIG_IGN is a valid disposition for the user signals used here.
    unsafe { libc::signal(signal, libc::SIG_IGN) };
}

/// A thread that sends `signal` to each target thread in turn, one every `every`.
#[derive(Debug)]
pub(crate) struct SignalStorm(Background);

impl SignalStorm {
    /// Starts the storm.
    ///
    /// # Safety
    ///
    /// Every thread of `targets` stays alive (not joined, not exited) until
    /// [`stop`](SignalStorm::stop) returns, and a handler for `signal` is installed.
    pub(crate) unsafe fn start(
        targets: Vec<RawPthread>,
        signal: libc::c_int,
        every: Duration,
    ) -> SignalStorm {
        SignalStorm(Background::spawn(move |stop| {
            // Fine-grained sleeps: the default 50 µs timer slack would double the
            // period.
            // SAFETY: PR_SET_TIMERSLACK takes integers only.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
            let mut sent = 0u64;
            'storm: loop {
                for &tid in &targets {
                    // Relaxed: a stop request; `stop` joins this thread.
                    if stop.load(Ordering::Relaxed) {
                        break 'storm;
                    }
                    // SAFETY: the caller keeps every target alive until `stop`
                    // has joined this thread.
                    if unsafe { libc::pthread_kill(tid as libc::pthread_t, signal) } == 0 {
                        sent += 1;
                    }
                    std::thread::sleep(every);
                }
            }
            sent
        }))
    }

    /// Stops the storm and returns how many signals it sent.
    pub(crate) fn stop(self) -> u64 {
        self.0.stop()
    }
}

/// The pthread handles of `threads`, for a [`SignalStorm`]. Kept as std's integer
/// `RawPthread` (musl's `libc::pthread_t` is a pointer, which is not `Send`).
pub(crate) fn pthreads<T>(threads: &[JoinHandle<T>]) -> Vec<RawPthread> {
    threads.iter().map(|t| t.as_pthread_t()).collect()
}

/// The calling thread's pthread handle as std's `RawPthread`, for a [`SignalStorm`] of
/// scoped threads (whose handles have no `as_pthread_t`).
#[allow(
    clippy::unnecessary_cast,
    reason = "a pointer on musl, an integer on glibc"
)]
pub(crate) fn current_pthread() -> RawPthread {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as RawPthread }
}

// ---------------------------------------------------------------------------------
// Affinity
// ---------------------------------------------------------------------------------

/// The calling thread's kernel thread id.
pub(crate) fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Runs `f` on a new thread and returns its result, or panics if it takes longer than
/// 10 s (a hang: the thread is left behind).
pub(crate) fn within_10s<R: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{what}: still waiting after 10 s (a hang)"),
    }
}

/// The CPUs the calling thread may run on.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(0, core::mem::size_of_val(&set), &mut set) };
    assert_eq!(
        r,
        0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the bits `set` holds.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`. When the calling thread
/// restricts itself to CPUs it is not on, the kernel migrates it before returning.
pub(crate) fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: as in `allowed_cpus`.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    for &cpu in cpus {
        assert!(
            cpu < libc::CPU_SETSIZE as usize,
            "CPU {cpu} beyond a cpu_set_t"
        );
        // SAFETY: `cpu` is below CPU_SETSIZE, the bits `set` holds.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(tid, core::mem::size_of_val(&set), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A thread that pins each registered thread in turn to one CPU (rotating over the
/// allowed ones) and unpins the previous one, one step every `every`: every step
/// migrates a worker, wherever it is in its sequences.
#[derive(Debug)]
pub(crate) struct AffinityChurn(Background);

impl AffinityChurn {
    /// Starts churning the threads whose kernel ids `tids` will hold (workers push
    /// theirs when they start).
    pub(crate) fn start(tids: Arc<Mutex<Vec<libc::pid_t>>>, every: Duration) -> AffinityChurn {
        AffinityChurn(Background::spawn(move |stop| {
            let cpus = allowed_cpus();
            let mut pinned: Option<libc::pid_t> = None;
            let mut moves = 0u64;
            let mut step = 0usize;
            // Relaxed: a stop request; `stop` joins this thread.
            while !stop.load(Ordering::Relaxed) {
                let tid = {
                    let tids = tids.lock().unwrap_or_else(|p| p.into_inner());
                    (!tids.is_empty()).then(|| tids[step % tids.len()])
                };
                if let (Some(tid), true) = (tid, cpus.len() > 1) {
                    if let Some(prev) = pinned.take() {
                        // ESRCH once a worker has exited: nothing to undo.
                        let _ = set_affinity(prev, &cpus);
                    }
                    let cpu = cpus[(step / 3) % cpus.len()];
                    if set_affinity(tid, &[cpu]).is_ok() {
                        pinned = Some(tid);
                        moves += 1;
                    }
                }
                step += 1;
                std::thread::sleep(every);
            }
            if let Some(prev) = pinned {
                let _ = set_affinity(prev, &cpus);
            }
            moves
        }))
    }

    /// Stops the churn, unpins the last pinned thread, returns the number of pinnings.
    pub(crate) fn stop(self) -> u64 {
        self.0.stop()
    }
}

/// A helper thread that runs until asked to stop, and returns a count. Stopped (and
/// joined) on drop too: a test that panics first must not leave it running against
/// threads that unwind and exit.
#[derive(Debug)]
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Background {
    /// Runs `body(stop)` on a new thread; `body` returns once `stop` is set.
    fn spawn(body: impl FnOnce(&AtomicBool) -> u64 + Send + 'static) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || body(&stop))
        };
        Background {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread and returns its count.
    fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        // Relaxed: the join below synchronises.
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map_or(0, |t| t.join().expect("background test thread"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.halt();
    }
}

// ---------------------------------------------------------------------------------
// Small things
// ---------------------------------------------------------------------------------

/// xorshift64*: cheap, deterministic per seed, good enough to pick operations.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` spin-loop hints: widens a window without a system call.
#[inline]
pub(crate) fn spin(n: u32) {
    for _ in 0..n {
        core::hint::spin_loop();
    }
}

/// Yields the CPU with the system call itself (no `std` bookkeeping).
#[inline]
pub(crate) fn sched_yield() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// Saves `errno` on creation and restores it on drop: a signal handler must leave it
/// as it found it.
#[derive(Debug)]
pub(crate) struct ErrnoGuard(libc::c_int);

impl ErrnoGuard {
    pub(crate) fn save() -> ErrnoGuard {
        // SAFETY: the calling thread's errno location is always readable.
        ErrnoGuard(unsafe { *libc::__errno_location() })
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: the calling thread's errno location is always writable.
        unsafe { *libc::__errno_location() = self.0 };
    }
}
