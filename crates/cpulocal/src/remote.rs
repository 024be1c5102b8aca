//! Operating on a chosen CPU's data: the per-CPU lock word, its local and remote
//! acquisition, and the process-wide choice of scheme: how a thread works on another
//! CPU's data without moving there, with no help from the kernel beyond `membarrier`.
//!
//! # The lock word
//!
//! Every per-CPU slot that may be reached from another CPU carries one lock word: its
//! states, its local and remote acquisition, and how waiters sleep are in `remote/lock.rs`.
//!
//! # Held locks
//!
//! A thread that asks for a slot of a [`crate::PerCpu`] while it holds one of the same
//! `PerCpu` panics instead of waiting for itself: one thread-local word per thread counts
//! the slots it holds (its address is the thread's lock token), and a thread that holds
//! any searches the lock words for its token (`src/remote/held.rs`).

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::abi::membarrier as mb;
use crate::sys::{self, Errno};
use crate::thread;

mod held;
mod lock;
#[cfg(feature = "__bench")]
pub(crate) use held::prepare_percpu_fast_path;
pub(crate) use held::{
    forget_percpu_fast_path, note_fast_lock_failed, note_held_fast, note_released,
    note_released_fast, percpu_fast_area, Counted,
};
pub(crate) use lock::{CpuLock, READY};

/// How many consecutive aborts a fast path tolerates before it takes its slow path
/// (a remote acquisition, which needs no successful sequence). Rare preemptions never
/// reach it; a debugger single-stepping through a sequence, which aborts it at every
/// step, reaches it at once.
pub(crate) const MAX_ABORTS: u32 = 8;

/// How a thread reaches a CPU's data from another CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Remote owners take the lock word atomically and fence with
    /// `membarrier(PRIVATE_EXPEDITED_RSEQ)`; local fast paths stay free of `lock`
    /// prefixes.
    Membarrier,
    /// Every acquisition is an atomic compare-exchange and structures work under the
    /// lock. Used when the process runs the fallback, when the kernel lacks
    /// membarrier-rseq (before Linux 5.10), or when forced.
    Locked(LockedReason),
}

/// Why [`Scheme::Locked`] is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockedReason {
    /// The process runs the fallback: there are no sequences to fence.
    NoRseq,
    /// `membarrier` does not offer `PRIVATE_EXPEDITED_RSEQ` (or refused registration).
    NoMembarrier(Errno),
    /// `CPULOCAL_DISABLE_MEMBARRIER` is set in the environment.
    Disabled,
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::Membarrier => f.write_str(
                "membarrier: remote owners take the lock word atomically and restart the CPU's sequences",
            ),
            Scheme::Locked(LockedReason::NoRseq) => {
                f.write_str("locked: every operation takes its CPU's lock (no rseq)")
            }
            Scheme::Locked(LockedReason::NoMembarrier(e)) => write!(
                f,
                "locked: every operation takes its CPU's lock (membarrier-rseq unavailable: {e:?})"
            ),
            Scheme::Locked(LockedReason::Disabled) => f.write_str(
                "locked: every operation takes its CPU's lock (CPULOCAL_DISABLE_MEMBARRIER is set)",
            ),
        }
    }
}

static SCHEME: OnceLock<Scheme> = OnceLock::new();

/// Whether the scheme is [`Scheme::Membarrier`]: the fast paths of the structures read
/// this one flag instead of the `OnceLock`. Set once, after the process registered for
/// membarrier-rseq, and never cleared.
static MEMBARRIER_SCHEME: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The thread's area once [`on_current_cpu`] has run with the scheme decided as
    /// [`Scheme::Membarrier`] and the thread registered; 0 before that and after the
    /// thread's unregistration. [`fast_path_area`] reads this one word, not the scheme
    /// flag and then the area: one load less on every guarded fast path (6 % of a
    /// `Stack` push+pop, measured on a Zen 4 VM, where those paths are bound by loads).
    static GUARDED_AREA: core::cell::Cell<usize> = const { core::cell::Cell::new(0) };
}

/// The calling thread's area when the structures' guarded fast paths may run at once:
/// the scheme is [`Scheme::Membarrier`] and the thread is registered. `None` sends the
/// caller to its out-of-line path, which decides the scheme, registers the thread and
/// sets this up on first use ([`on_current_cpu`]).
#[inline(always)]
pub(crate) fn fast_path_area() -> Option<core::ptr::NonNull<crate::abi::Rseq>> {
    #[cfg(any(test, feature = "__test-hooks"))]
    if crate::test_hooks::slow_paths_forced() {
        return None;
    }
    core::ptr::NonNull::new(GUARDED_AREA.get() as *mut crate::abi::Rseq)
}

/// The calling thread's area was unregistered (its thread is exiting): the guarded fast
/// paths must not use it again.
pub(crate) fn forget_fast_path_area() {
    GUARDED_AREA.set(0);
}

/// The scheme of this process for reaching other CPUs' data, deciding it (and
/// registering the process for membarrier-rseq) on first use.
///
/// ```
/// let scheme = cpulocal::remote_scheme();
/// println!("{scheme}");
/// ```
pub fn scheme() -> Scheme {
    *SCHEME.get_or_init(decide)
}

/// Whether the scheme is decided already (without deciding it).
#[cfg(test)]
pub(crate) fn scheme_decided() -> bool {
    SCHEME.get().is_some()
}

fn decide() -> Scheme {
    if !matches!(thread::mechanism(), thread::Mechanism::Rseq { .. }) {
        return Scheme::Locked(LockedReason::NoRseq);
    }
    if sys::env_flag(c"CPULOCAL_DISABLE_MEMBARRIER") {
        return Scheme::Locked(LockedReason::Disabled);
    }
    match membarrier_rseq_available() {
        Ok(()) => match sys::membarrier(mb::CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0) {
            Ok(_) => {
                // Waiters fence with membarrier, releasers with a compiler fence
                // (`lock.rs`, "Waiting"). Relaxed: published by SCHEME's initialisation, which
                // every lock user passes through before it releases or waits.
                let asymmetric = sys::membarrier(mb::CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0);
                ASYMMETRIC.store(asymmetric.is_ok(), Ordering::Relaxed);
                // Relaxed: see `fast_path_area`.
                MEMBARRIER_SCHEME.store(true, Ordering::Relaxed);
                Scheme::Membarrier
            }
            Err(e) => Scheme::Locked(LockedReason::NoMembarrier(e)),
        },
        Err(e) => Scheme::Locked(LockedReason::NoMembarrier(e)),
    }
}

/// Whether sleepers fence with `membarrier(PRIVATE_EXPEDITED)`, so that releases need
/// only a compiler fence (false: both sides use `SeqCst` fences).
static ASYMMETRIC: AtomicBool = AtomicBool::new(false);

/// Whether the kernel offers `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ` (without
/// registering for it).
pub fn membarrier_rseq_available() -> Result<(), Errno> {
    let cmds = sys::membarrier(mb::CMD_QUERY, 0, 0)?;
    if cmds & i64::from(mb::CMD_PRIVATE_EXPEDITED_RSEQ) != 0 {
        Ok(())
    } else {
        Err(Errno(libc::EINVAL))
    }
}

/// An invalid CPU number was passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InvalidCpu {
    /// The CPU asked for.
    pub cpu: usize,
    /// The number of slots (possible CPUs, or mm_cids) the structure has.
    pub slots: usize,
}

impl fmt::Display for InvalidCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CPU {} does not exist: this structure has slots 0..{}",
            self.cpu, self.slots
        )
    }
}

impl std::error::Error for InvalidCpu {}

/// `membarrier(PRIVATE_EXPEDITED_RSEQ)` on `cpu` (or, should the per-CPU form fail, on
/// every CPU, which is at least as strong).
///
/// # Errors
///
/// [`FenceRefused`] when the kernel refuses both after the process registered for them
/// (a sandbox that filters the command for some threads only): without the fence no
/// remote owner can exclude that CPU's sequences. The caller must give the lock word
/// back and then call [`FenceRefused::panic`]: continuing would silently break mutual
/// exclusion, and unwinding with the word held would wedge the slot process-wide.
pub(crate) fn fence_sequences_on(cpu: u32) -> Result<(), FenceRefused> {
    #[cfg(any(test, feature = "__test-hooks"))]
    crate::test_hooks::note_fence();
    let per_cpu = sys::membarrier(mb::CMD_PRIVATE_EXPEDITED_RSEQ, mb::CMD_FLAG_CPU, cpu as i32);
    match per_cpu {
        Ok(_) => Ok(()),
        Err(first) => fence_sequences_everywhere().map_err(|refused| FenceRefused {
            cpu: Some(cpu),
            first: Some(first),
            ..refused
        }),
    }
}

/// `membarrier(PRIVATE_EXPEDITED_RSEQ)` on every CPU that runs a thread of the process:
/// the fence for slots indexed by mm_cid, whose sequences may run on any CPU. An IPI to
/// each of those CPUs (microseconds, growing with them), against one for
/// [`fence_sequences_on`].
///
/// # Errors
///
/// As for [`fence_sequences_on`].
pub(crate) fn fence_sequences_everywhere() -> Result<(), FenceRefused> {
    #[cfg(any(test, feature = "__test-hooks"))]
    crate::test_hooks::note_fence();
    match sys::membarrier(mb::CMD_PRIVATE_EXPEDITED_RSEQ, 0, 0) {
        Ok(_) => Ok(()),
        Err(second) => Err(FenceRefused {
            cpu: None,
            first: None,
            second,
        }),
    }
}

/// The kernel refused the membarrier fence to this thread after the process registered
/// for it.
#[derive(Debug)]
pub(crate) struct FenceRefused {
    /// The CPU fenced, or `None` for every CPU (mm_cid slots).
    cpu: Option<u32>,
    /// The error of the per-CPU form, if it was tried.
    first: Option<Errno>,
    /// The error of the all-CPU form.
    second: Errno,
}

impl FenceRefused {
    /// Panics with the reason; called once the lock word is released.
    #[cold]
    fn panic(self) -> ! {
        let FenceRefused { cpu, first, second } = self;
        let whose = match cpu {
            Some(cpu) => format!("CPU {cpu}'s"),
            None => "the mm_cid slots'".to_string(),
        };
        let tried = match first {
            Some(first) => format!("{first:?} on one CPU, then {second:?}"),
            None => format!("{second:?}"),
        };
        panic!(
            "membarrier(PRIVATE_EXPEDITED_RSEQ) failed ({tried}) after registration (a seccomp \
             filter on this thread?): this thread cannot exclude {whose} restartable sequences, \
             so it cannot operate on another CPU's data; the lock was released and nothing was \
             changed"
        );
    }
}

/// What one attempt of a fast path did.
pub(crate) enum Attempt<R> {
    /// Finished, with this result.
    Done(R),
    /// Not finished, for a reason that goes away by itself (a compare failed because
    /// the data moved): try again at once.
    Retry,
    /// The sequence aborted (or met a held lock word): counts towards [`MAX_ABORTS`].
    Aborted,
}

/// Drives a per-CPU fast path: calls `attempt(rseq, cpu)` with the CPU the calling
/// thread runs on (read from `cpu_id_start` before each attempt) until it is done.
///
/// Returns `None` when the fast path cannot finish and the caller must take its slow
/// path (which needs no successful sequence): the scheme is [`Scheme::Locked`], the
/// thread has no rseq, the CPU is beyond `slots`, or [`MAX_ABORTS`] attempts in a row
/// aborted (a debugger single-stepping aborts every one).
#[inline(always)]
pub(crate) fn on_current_cpu<R>(
    slots: usize,
    mut attempt: impl FnMut(*mut crate::abi::Rseq, u32) -> Attempt<R>,
) -> Option<R> {
    // The flag first (one load); the `OnceLock` only until the scheme is decided.
    // Relaxed: see `fast_path_area`.
    if !MEMBARRIER_SCHEME.load(Ordering::Relaxed) && scheme() != Scheme::Membarrier {
        return None;
    }
    #[cfg(any(test, feature = "__test-hooks"))]
    if crate::test_hooks::slow_paths_forced() {
        return None;
    }
    let rseq = thread::current()?;
    // The scheme is Membarrier and the thread registered: its fast paths may run from
    // now on (a thread that registered before the scheme was decided learns it here).
    GUARDED_AREA.set(rseq.as_ptr() as usize);
    let mut aborts = 0;
    while aborts < MAX_ABORTS {
        let cpu = crate::cpu::cpu_id_start(rseq);
        if cpu as usize >= slots {
            return None;
        }
        match attempt(rseq.as_ptr(), cpu) {
            Attempt::Done(r) => return Some(r),
            Attempt::Retry => {}
            Attempt::Aborted => aborts += 1,
        }
    }
    None
}
