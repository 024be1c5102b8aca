//! The library's own tests that need test builds (the delay hook, the broken sequence).
//!
//! | file | promise |
//! |---|---|
//! | `registration.rs` | every kind of thread gets a registered area; fork keeps it |
//! | `exit_destructors.rs` | a thread's last destructors (thread-locals, late pthread keys) keep every structure's updates |
//! | `fork_tokens.rs` | a fork child's thread never gets a slot a parent thread held, even with that thread's token |
//! | `own_registration.rs` | cpulocal's own registration: chosen, survives thread churn, unregistered at exit |
//! | `refused.rs` | rseq refused (seccomp) or disabled: every operation keeps its meaning |
//! | `model.rs` | every `ops` primitive against a naive single-threaded model |
//! | `abort_path.rs` | a signal inside a sequence restarts it, and the retry lands once |
//! | `stress.rs` | exact `Counter` totals under preemption, yields and a signal storm; the harness catches a broken sequence |
//! | `counter_basics.rs` | `Counter`'s small promises |
//! | `send_sync.rs` | the `Send` and `Sync` the structures' docs promise |
//! | `stack_basics.rs` | `Stack`'s order (LIFO through every way out) and that every node left is freed once |
//! | `percpu_basics.rs` | `PerCpu`'s by-value views: `for_each`, `iter_mut`, `into_vec` (lazy and never used) |
//! | `pool.rs` | the per-CPU pool: placement, reuse, growth, fork, statics, lazy and mm_cid slots |
//! | `child.rs` | re-running one test in a child process with another environment |
//!
//! # Shared state
//!
//! Tests run on parallel threads of one process, and the delay inside every sequence
//! ([`crate::test_hooks`]) is process-wide. Every in-process test that runs sequences
//! holds [`delay_shared`]; the tests that change the delay hold [`delay_exclusive`],
//! which also sets the delay back to 0 when dropped.
//!
//! Valgrind refuses rseq (ENOSYS): run the test binary under it with
//! `CPULOCAL_TEST_VALGRIND=1`, and the tests expect the fallback instead (the few that
//! need rseq itself say they are skipped). Child processes run natively.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::sys::Errno;
use crate::test_hooks;
use crate::{FallbackReason, Mechanism, Registrar};

mod abort_path;
mod child;
mod counter_basics;
mod early_init;
mod exit_destructors;
mod fence_refused;
mod fork_tokens;
mod model;
mod own_registration;
mod percpu_basics;
mod pool;
mod refused;
mod registration;
mod send_sync;
mod stack_basics;
mod stress;

/// Serialises the tests that change the sequences' delay against every other test.
static DELAY: RwLock<()> = RwLock::new(());

/// Held by tests that run sequences with the delay they find (normally 0).
pub(crate) fn delay_shared() -> RwLockReadGuard<'static, ()> {
    DELAY
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Held by tests that change the delay; sets it back to 0 when dropped.
pub(crate) struct DelayExclusive {
    _guard: RwLockWriteGuard<'static, ()>,
}

impl Drop for DelayExclusive {
    fn drop(&mut self) {
        test_hooks::set_delay_loops(0);
    }
}

/// Excludes every other in-process test while the caller changes the delay.
pub(crate) fn delay_exclusive() -> DelayExclusive {
    let guard = DELAY
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    test_hooks::set_delay_loops(0);
    DelayExclusive { _guard: guard }
}

/// Whether the test binary runs under valgrind (the runner says so with
/// `CPULOCAL_TEST_VALGRIND=1`).
pub(crate) fn under_valgrind() -> bool {
    std::env::var_os("CPULOCAL_TEST_VALGRIND").is_some_and(|v| v == "1")
}

/// Whether the C library registers rseq for every thread: glibc ≥ 2.35 does (as on the
/// test machines); musl, which the qemu guests' static test binaries use
/// (`.ci/vm.sh`), has no `__rseq_*` symbols, so cpulocal registers its own area there.
pub(crate) const LIBC_REGISTERS: bool = !cfg!(target_env = "musl");

/// What `thread::glibc_rseq()` reports as the size when glibc registered nothing:
/// `Some(0)`, or `None` where there are no glibc symbols at all (musl).
pub(crate) fn glibc_size_when_unregistered() -> Option<u32> {
    LIBC_REGISTERS.then_some(0)
}

/// The mechanism this process must have chosen, derived from the environment only:
/// valgrind refuses rseq; `GLIBC_TUNABLES=glibc.pthread.rseq=0` (or musl) makes the C
/// library register nothing; otherwise glibc (≥ 2.35, as on the test machines)
/// registered every thread.
pub(crate) fn expected_mechanism() -> Mechanism {
    if under_valgrind() {
        return Mechanism::Fallback(FallbackReason::Refused(Errno(libc::ENOSYS)));
    }
    if std::env::var("CPULOCAL_DISABLE_RSEQ").is_ok_and(|v| !v.is_empty() && v != "0") {
        return Mechanism::Fallback(FallbackReason::Disabled);
    }
    let glibc_off = !LIBC_REGISTERS
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.pthread.rseq=0"));
    let (registrar, registered) = if glibc_off {
        let own = crate::abi::ORIG_RSEQ_SIZE.max(crate::thread::feature_size());
        (Registrar::Own, own)
    } else {
        // glibc 2.35–2.40 register 32 bytes (and report 20 or 32).
        (Registrar::Glibc, crate::abi::ORIG_RSEQ_SIZE)
    };
    Mechanism::Rseq {
        registrar,
        usable_size: registered.min(crate::thread::feature_size()),
    }
}

/// Whether `current_cpu()` agrees with glibc's `sched_getcpu()`. The thread can migrate
/// between the two reads, so a reading counts only when the CPU is the same before and
/// after; a few attempts are allowed.
pub(crate) fn current_cpu_agrees_with_sched_getcpu() -> Result<usize, (usize, usize)> {
    let mut last = (0, 0);
    for _ in 0..100 {
        let before = crate::current_cpu();
        let Ok(theirs) = crate::sys::sched_getcpu().map(|c| c as usize) else {
            return Err((before, usize::MAX));
        };
        let after = crate::current_cpu();
        if before == theirs && theirs == after {
            return Ok(before);
        }
        last = (before, theirs);
        std::thread::yield_now();
    }
    Err(last)
}

/// The CPUs the calling thread may run on, lowest first.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is an array of integers: all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, core::mem::size_of_val(&set), &mut set) };
    assert_eq!(r, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the bits `set` holds.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`; false when the kernel refuses (a cpuset without
/// it).
pub(crate) fn pin_to(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is an array of integers: all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (the callers pass possible CPU numbers).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t; pid 0 is the calling thread.
    unsafe { libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Installs `handler` for `signal` (with `SA_RESTART`).
pub(crate) fn install_handler(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: sigaction is plain old data; all-zero is a valid (empty) value.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a live sigset_t.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised; the handler only does async-signal-safe
    // work (atomics, cpulocal's signal-safe updates); the old action is not wanted.
    let r = unsafe { libc::sigaction(signal, &action, core::ptr::null_mut()) };
    assert_eq!(r, 0, "sigaction: {:?}", Errno::last());
}

/// Sets `signal` back to ignored (not the default, which would kill the process should a
/// late signal still be pending somewhere).
pub(crate) fn ignore_signal(signal: libc::c_int) {
    // SAFETY: SIG_IGN is a valid disposition for the user signals used here.
    unsafe { libc::signal(signal, libc::SIG_IGN) };
}

/// In a child process: aborts it with a message if it is still running after `limit`,
/// so that a hang (the failure these tests look for) fails the test instead of stalling
/// it. Returns the switch that disarms it.
pub(crate) fn watchdog(
    limit: std::time::Duration,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&done);
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            std::thread::sleep(std::time::Duration::from_millis(20));
            // Relaxed: a flag polled; nothing else is published through it.
            if flag.load(Ordering::Relaxed) {
                return;
            }
        }
        eprintln!("watchdog: still running after {limit:?}: a hang");
        std::process::abort();
    });
    done
}

/// Runs `f` on a new thread and waits at most `limit` for it: `None` if it did not
/// finish (it keeps running, blocked).
pub(crate) fn within<R: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> R + Send + 'static,
) -> Option<R> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}
