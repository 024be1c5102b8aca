//! Operating on a chosen CPU's data: the per-CPU lock word, its local and remote
//! acquisition, and the process-wide choice of scheme. This is the user-space answer to
//! `cpu_opv`, the system call that was proposed for it and never merged.
//!
//! # The lock word
//!
//! Every per-CPU slot that may be reached from another CPU carries one word:
//!
//! | value | meaning |
//! |---|---|
//! | `0` | free: the slot's restartable fast paths may run |
//! | a token | held by the thread whose token it is (unique among live threads) |
//!
//! Under the [`Scheme::Membarrier`] scheme:
//!
//! - A thread on CPU `c` takes `c`'s word **locally** with a restartable compare-and-store
//!   `0 → token` (no `lock` prefix): the kernel serialises it with every other sequence on
//!   `c`.
//! - Any thread takes it **remotely** with an atomic compare-exchange `0 → token`, then
//!   `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, MEMBARRIER_CMD_FLAG_CPU, c)`,
//!   which restarts every sequence in flight on `c`. After the fence, no sequence that
//!   read the word as free can still commit, so if the word still holds the token the
//!   lock is ours; if a local compare-and-store committed before the fence it overwrote
//!   our token with its own, and that thread owns the lock: we wait and retry. Tokens
//!   are unique, so two remote owners can never both find "their" token.
//! - Fast paths that do not take the lock (a `Stack` push or pop) check the word inside
//!   their sequence and abort while it is held: the same fence argument covers them.
//! - Release is a `Release` store of 0, paired with the `Acquire` of the next owner
//!   (the remote compare-exchange, or the fence after a local acquisition).
//!
//! Under [`Scheme::Locked`] (no rseq, no membarrier-rseq, or forced for tests) every
//! acquisition is the atomic compare-exchange, and structures do all their work under
//! the lock: slower (a `lock cmpxchg` per operation) but correct with nothing from the
//! kernel.

use core::cell::Cell;
use core::fmt;
use core::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::abi::membarrier as mb;
use crate::arch::{self, Outcome};
use crate::sys::{self, Errno};
use crate::thread;

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
    if std::env::var_os("CPULOCAL_DISABLE_MEMBARRIER").is_some_and(|v| !v.is_empty() && v != "0") {
        return Scheme::Locked(LockedReason::Disabled);
    }
    match membarrier_rseq_available() {
        Ok(()) => match sys::membarrier(mb::CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0) {
            Ok(_) => Scheme::Membarrier,
            Err(e) => Scheme::Locked(LockedReason::NoMembarrier(e)),
        },
        Err(e) => Scheme::Locked(LockedReason::NoMembarrier(e)),
    }
}

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

thread_local! {
    /// Its address is the thread's lock token: non-zero and unique among live threads.
    static TOKEN: Cell<u8> = const { Cell::new(0) };
}

/// The calling thread's lock token.
#[inline]
fn token() -> usize {
    TOKEN.with(|t| t as *const Cell<u8> as usize)
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

/// The lock word of one CPU's slot. See the module documentation for its states.
#[derive(Debug, Default)]
pub(crate) struct CpuLock {
    word: AtomicUsize,
}

impl CpuLock {
    /// A free lock.
    pub(crate) const fn new() -> Self {
        CpuLock {
            word: AtomicUsize::new(0),
        }
    }

    /// The word, for sequences that check it as their guard.
    #[inline(always)]
    pub(crate) fn guard(&self) -> *const usize {
        self.word.as_ptr()
    }

    /// Whether anybody holds the lock (a snapshot).
    #[inline]
    pub(crate) fn is_held(&self) -> bool {
        // Relaxed: a hint for back-off only.
        self.word.load(Ordering::Relaxed) != 0
    }

    /// Tries to take the lock of `cpu` (whose slot this is) with one restartable
    /// compare-and-store, from a thread that believes it runs on `cpu`.
    ///
    /// Only under [`Scheme::Membarrier`], with the calling thread's `rseq` area.
    #[inline(always)]
    pub(crate) fn try_lock_local(&self, rseq: *mut crate::abi::Rseq, cpu: u32) -> Outcome {
        // The word is written only by sequences expecting `cpu`, by remote owners whose
        // compare-exchange is fenced by membarrier against them, and by the release.
        // SAFETY: `rseq` is the calling thread's area (the caller's contract), and the
        // word's writers are all excluded as above; readers use atomics.
        let outcome = unsafe { arch::compare_store(rseq, self.word.as_ptr(), 0, token(), cpu) };
        if outcome == Outcome::Committed(()) {
            // Acquire: pairs with the Release store of the previous owner, which may
            // have run on another CPU.
            fence(Ordering::Acquire);
        }
        outcome
    }

    /// Takes the lock from any thread, on any CPU: compare-exchange, then (under
    /// [`Scheme::Membarrier`]) the membarrier fence on `cpu` and the check that our token
    /// survived it. Spins, then yields, while somebody else holds it.
    pub(crate) fn lock_remote(&self, cpu: u32) {
        if scheme() != Scheme::Membarrier {
            return self.lock_atomic();
        }
        let me = token();
        loop {
            self.acquire_word(me);
            // Restart every sequence in flight on `cpu`: any that read the word as free
            // before our exchange either committed already or never will.
            if let Err(refused) = fence_sequences_on(cpu) {
                // Without the fence we cannot exclude `cpu`'s sequences. Our token (or a
                // local owner's, which overwrote it) is in the word: give it back before
                // unwinding, so the slot stays usable for every other thread.
                if self
                    .word
                    .compare_exchange(me, 0, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
                {
                    self.wake_sleepers();
                }
                refused.panic();
            }
            // Acquire: a local owner that overwrote our token released with a Release
            // store; we must see its writes before ours.
            if self.word.load(Ordering::Acquire) == me {
                return;
            }
            // A local compare-and-store committed before the fence: that thread owns the
            // lock now (it overwrote our token). Wait for its release, then try again.
            wait_while_held(self);
        }
    }

    /// Takes the lock with a compare-exchange alone: for slots that no sequence ever
    /// locks (mm_cid-indexed slots, [`Scheme::Locked`]).
    pub(crate) fn lock_atomic(&self) {
        self.acquire_word(token());
    }

    /// Compare-exchanges the word from 0 to `me`, spinning then yielding while it is held.
    fn acquire_word(&self, me: usize) {
        // Acquire: pairs with the Release store of the previous owner.
        while self
            .word
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            wait_while_held(self);
        }
    }

    /// Takes the lock of the calling thread's current CPU's slot, by whatever means
    /// works: local sequences first; the remote acquisition after [`MAX_ABORTS`] aborts
    /// in a row, or under [`Scheme::Locked`]. `lock_of(i)` is slot `i`'s lock, for `i`
    /// below `slots`. Returns the index of the slot whose lock is now held.
    pub(crate) fn lock_current<'a>(slots: usize, lock_of: impl Fn(usize) -> &'a CpuLock) -> usize {
        let local = on_current_cpu(slots, |rseq, cpu| {
            let lock = lock_of(cpu as usize);
            match lock.try_lock_local(rseq, cpu) {
                Outcome::Committed(()) => Attempt::Done(cpu as usize),
                Outcome::CompareFailed => {
                    wait_while_held(lock);
                    Attempt::Retry
                }
                Outcome::Aborted => Attempt::Aborted,
            }
        });
        if let Some(index) = local {
            return index;
        }
        // The slow path: no successful sequence needed. Slot `i` belongs to CPU `i`, so
        // the fence goes to the CPU whose sequences use the slot we lock.
        let index = crate::cpu::current_cpu() as usize % slots;
        lock_of(index).lock_remote(index as u32);
        index
    }

    /// The [`Attempt`] of a guarded sequence that aborted: if the abort came from this
    /// lock being held, waits until it looks free first, so the retries are not spent
    /// while a remote owner works.
    #[inline]
    pub(crate) fn aborted<R>(&self) -> Attempt<R> {
        if self.is_held() {
            wait_while_held(self);
        }
        Attempt::Aborted
    }

    /// Releases the lock.
    #[inline]
    pub(crate) fn unlock(&self) {
        // Release: pairs with the Acquire of the next owner.
        self.word.store(0, Ordering::Release);
    }

    /// Wakes the threads waiting for this lock (none sleep yet: waiters spin and yield).
    #[inline]
    fn wake_sleepers(&self) {}
}

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
fn fence_sequences_on(cpu: u32) -> Result<(), FenceRefused> {
    let per_cpu = sys::membarrier(mb::CMD_PRIVATE_EXPEDITED_RSEQ, mb::CMD_FLAG_CPU, cpu as i32);
    if let Err(first) = per_cpu {
        if let Err(second) = sys::membarrier(mb::CMD_PRIVATE_EXPEDITED_RSEQ, 0, 0) {
            return Err(FenceRefused { cpu, first, second });
        }
    }
    Ok(())
}

/// The kernel refused the membarrier fence to this thread after the process registered
/// for it.
#[derive(Debug)]
struct FenceRefused {
    cpu: u32,
    first: Errno,
    second: Errno,
}

impl FenceRefused {
    /// Panics with the reason; called once the lock word is released.
    #[cold]
    fn panic(self) -> ! {
        let FenceRefused { cpu, first, second } = self;
        panic!(
            "membarrier(PRIVATE_EXPEDITED_RSEQ) failed ({first:?} on CPU {cpu}, then {second:?}) \
             after registration (a seccomp filter on this thread?): this thread cannot exclude \
             CPU {cpu}'s restartable sequences, so it cannot operate on another CPU's data; \
             the lock was released and nothing was changed"
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
    if scheme() != Scheme::Membarrier {
        return None;
    }
    #[cfg(any(test, feature = "__test-hooks"))]
    if crate::test_hooks::slow_paths_forced() {
        return None;
    }
    let rseq = thread::current()?;
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

/// Spins, then yields, until `lock` looks free.
#[cold]
pub(crate) fn wait_while_held(lock: &CpuLock) {
    let mut spins = 0u32;
    while lock.is_held() {
        spins += 1;
        if spins < 32 {
            core::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}
