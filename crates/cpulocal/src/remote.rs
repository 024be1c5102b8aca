//! Operating on a chosen CPU's data: the per-CPU lock word, its local and remote
//! acquisition, and the process-wide choice of scheme: how a thread works on another
//! CPU's data without moving there, with no help from the kernel beyond `membarrier`.
//!
//! # The lock word
//!
//! Every per-CPU slot that may be reached from another CPU carries one word:
//!
//! | value | meaning |
//! |---|---|
//! | `0` | free: a `Stack`'s or `RingBuffer`'s fast paths may run; a `PerCpu` slot without its value yet |
//! | `READY` (2) | free, and the owner's flag is set: a `PerCpu` slot that holds its value |
//! | a token (odd) | held by the thread whose token it is (unique among live threads) |
//!
//! Free words are even, held ones odd. `READY` lets `with_cpu`'s fast path learn from the
//! one word it compares that the slot holds a value (it compares with `READY`, so a slot
//! without one goes to the slow path, which creates it): a flag read less. A release
//! writes `READY` when the flag is set, 0 otherwise; structures that never set the flag
//! (`Stack`, `RingBuffer`, whose sequences check the word against 0) never see it.
//!
//! Under the [`Scheme::Membarrier`] scheme:
//!
//! - A thread on CPU `c` takes `c`'s word **locally** with a restartable compare-and-store
//!   `free → token` (no `lock` prefix): the kernel serialises it with every other sequence
//!   on `c`.
//! - Any thread takes it **remotely** with an atomic compare-exchange `free → token`, then
//!   `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, MEMBARRIER_CMD_FLAG_CPU, c)`,
//!   which restarts every sequence in flight on `c`. After the fence, no sequence that
//!   read the word as free can still commit, so if the word still holds the token the
//!   lock is ours; if a local compare-and-store committed before the fence it overwrote
//!   our token with its own, and that thread owns the lock: we wait and retry. Tokens
//!   are unique, so two remote owners can never both find "their" token.
//! - Fast paths that do not take the lock (a `Stack` push or pop) check the word inside
//!   their sequence and abort while it is held: the same fence argument covers them.
//! - Release is a `Release` store of the free value (0 or `READY`), paired with the
//!   `Acquire` of the next owner (the remote compare-exchange, or the fence after a local
//!   acquisition).
//!
//! Under [`Scheme::Locked`] (no rseq, no membarrier-rseq, or forced for tests) every
//! acquisition is the atomic compare-exchange, and structures do all their work under
//! the lock: slower (a `lock cmpxchg` per operation) but correct with nothing from the
//! kernel.
//!
//! Tokens are the address of a thread-local with its lowest bit set: unique among live
//! threads, and odd, so their low 32 bits (which the futex below compares) are never a
//! free word (0 or `READY`).
//!
//! # Waiting
//!
//! A thread that finds the word held spins briefly (not at all when the slot is its own
//! CPU's: the holder then is not running, or not on this CPU, and spinning only delays
//! it), yields a few times, then sleeps on a futex on the word's low 32 bits. Beside
//! the word, `sleepers` counts the threads that are (about to be) asleep. The release
//! must learn of sleepers without slowing the uncontended case, which is a plain store;
//! so the two sides form an *asymmetric* Dekker pair:
//!
//! | releaser (every unlock) | sleeper (only when it waits) |
//! |---|---|
//! | R1 store `word = free` (Release) | S1 `sleepers += 1` |
//! | R2 compiler fence only | S2 `membarrier(PRIVATE_EXPEDITED)`: a full barrier on every CPU running a thread of ours |
//! | R3 load `sleepers`; if non-zero, R4 wake every sleeper | S3 load `word`; if held (odd), S4 `futex_wait(word, low 32 bits seen)` |
//!
//! The membarrier puts a full barrier into the releaser's program order (or the
//! releaser was not running, and its context switch was one). If that barrier falls
//! before R3, R3 sees S1 and wakes; if after, R1 came before it and S3 sees it free (or a
//! newer holder's token, whose own release repeats the argument). The futex compares
//! and queues atomically, and a token's low 32 bits are never a free word, so a wake that comes
//! between S3 and S4 makes S4 return at once. Sleepers are counted beside the word, not
//! in it, because a local sequence may overwrite a remote owner's token (above): a flag
//! in the word would be lost with it. Every wake wakes all sleepers; they re-check and
//! go back to sleep if another thread took the lock first.
//!
//! Without the membarrier command (the locked scheme, older kernels) the release pays
//! a `SeqCst` fence instead of the compiler fence: those acquisitions are atomic
//! read-modify-writes already. A thread whose membarrier a sandbox refuses yields
//! instead of sleeping.
//!
//! # Held locks
//!
//! A thread that asks for a slot of a [`crate::PerCpu`] while it holds one of the same
//! `PerCpu` panics instead of waiting for itself: one thread-local word per thread counts
//! the slots it holds (its address is the thread's lock token), and a thread that holds
//! any searches the lock words for its token (`src/remote/held.rs`).

use core::fmt;
use core::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::abi::membarrier as mb;
use crate::arch::{self, Outcome};
use crate::sys::{self, Errno};
use crate::thread;

mod held;
#[cfg(feature = "__bench")]
pub(crate) use held::prepare_percpu_fast_path;
use held::token;
pub(crate) use held::{
    check_not_held, forget_percpu_fast_path, note_fast_lock_failed, note_held, note_held_fast,
    note_released, note_released_fast, percpu_fast_area,
};

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
                // Waiters fence with membarrier, releasers with a compiler fence (module
                // docs, "Waiting"). Relaxed: published by SCHEME's initialisation, which
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

/// The word of a free lock whose owner's [flag](CpuLock::flag) is set (see "The lock
/// word" in the module docs). Even, like every free word; tokens are odd.
pub(crate) const READY: usize = 2;

/// The lock word of one CPU's slot. See the module documentation for its states.
#[derive(Debug, Default)]
pub(crate) struct CpuLock {
    word: AtomicUsize,
    /// Threads asleep (or about to sleep) on the word; see "Waiting" in the module docs.
    sleepers: AtomicU32,
    /// A flag of the structure that owns the lock, kept here because it costs no room:
    /// the word's alignment leaves these bytes as padding anyway (see [`CpuLock::flag`]).
    flag: AtomicBool,
}

// The pool packs slots without padding: the lock must stay 16 bytes with its flag.
const _: () = assert!(core::mem::size_of::<CpuLock>() == 16);

impl CpuLock {
    /// A free lock.
    pub(crate) const fn new() -> Self {
        CpuLock {
            word: AtomicUsize::new(0),
            sleepers: AtomicU32::new(0),
            flag: AtomicBool::new(false),
        }
    }

    /// A flag for the structure's own use (e.g. "this slot holds a value"). It lives in
    /// what would be the lock's padding, so a slot that needs one costs no more than the
    /// lock. Set it only while holding the lock (or before the lock is shared, with
    /// [`set_flag_unshared`](CpuLock::set_flag_unshared)), and never clear it while the
    /// lock is shared: the releases copy it into the word (as [`READY`]).
    #[inline(always)]
    pub(crate) fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// Sets the flag of a lock nobody else can reach yet (its word is free), and the
    /// word to [`READY`] to match.
    pub(crate) fn set_flag_unshared(&self) {
        // Relaxed: the lock is not shared yet; sharing it synchronises.
        self.flag.store(true, Ordering::Relaxed);
        self.word.store(READY, Ordering::Relaxed);
    }

    /// The word this lock is released to: [`READY`] if the flag is set, else 0.
    #[inline]
    fn free_word(&self) -> usize {
        // Relaxed: the flag is only set by the holder (us, or an earlier holder whose
        // release our acquisition synchronised with).
        if self.flag.load(Ordering::Relaxed) {
            READY
        } else {
            0
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
        is_token(self.word.load(Ordering::Relaxed))
    }

    /// Tries to take the lock of `cpu` (whose slot this is) with one restartable
    /// compare-and-store from the free word `free` (0 or [`READY`]: `CompareFailed` when
    /// the word holds anything else), from a thread that believes it runs on `cpu`, or,
    /// with `INDEX_FIELD` = [`arch::MM_CID_FIELD`], whose mm_cid is `cpu`.
    ///
    /// Only under [`Scheme::Membarrier`], with the calling thread's `rseq` area, which
    /// has the field (for mm_cid: the feature size covers it).
    #[inline(always)]
    pub(crate) fn try_lock_local<const INDEX_FIELD: usize>(
        &self,
        rseq: *mut crate::abi::Rseq,
        cpu: u32,
        free: usize,
    ) -> Outcome {
        debug_assert!(!is_token(free));
        // The word is written only by sequences expecting `cpu`, by remote owners whose
        // compare-exchange is fenced by membarrier against them, by the release, and
        // (before the lock is shared) by `set_flag_unshared`.
        // SAFETY: `rseq` is the calling thread's area with the field (the caller's
        // contract), and the word's writers are all excluded as above; readers use
        // atomics.
        let outcome = unsafe {
            arch::compare_store::<INDEX_FIELD>(rseq, self.word.as_ptr(), free, token(), cpu)
        };
        if outcome == Outcome::Committed(()) {
            // Acquire: pairs with the Release store of the previous owner, which may
            // have run on another CPU.
            fence(Ordering::Acquire);
        }
        outcome
    }

    /// Takes the lock from any thread, on any CPU: compare-exchange, then (under
    /// [`Scheme::Membarrier`]) the membarrier fence on `cpu` and the check that our token
    /// survived it. Waits while somebody else holds it.
    pub(crate) fn lock_remote(&self, cpu: u32) {
        self.lock_fenced(Some(cpu));
    }

    /// [`lock_remote`](CpuLock::lock_remote) for a slot indexed by mm_cid, whose
    /// sequences may run on any CPU: the fence is [`fence_sequences_everywhere`].
    pub(crate) fn lock_mm_cid_slot(&self) {
        self.lock_fenced(None);
    }

    /// [`lock_remote`](CpuLock::lock_remote) on `cpu`, or on every CPU (`None`).
    fn lock_fenced(&self, cpu: Option<u32>) {
        if scheme() != Scheme::Membarrier {
            return self.lock_atomic();
        }
        let me = token();
        let slot_cpu = cpu.map(|c| c as usize);
        loop {
            self.acquire_word(me, slot_cpu);
            // Restart every sequence in flight on `cpu` (on every CPU): any that read the
            // word as free before our exchange either committed already or never will.
            let fenced = match cpu {
                Some(cpu) => fence_sequences_on(cpu),
                None => fence_sequences_everywhere(),
            };
            if let Err(refused) = fenced {
                // Without the fence we cannot exclude `cpu`'s sequences. Our token (or a
                // local owner's, which overwrote it) is in the word: give it back before
                // unwinding, so the slot stays usable for every other thread.
                if self
                    .word
                    .compare_exchange(me, self.free_word(), Ordering::Release, Ordering::Relaxed)
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
            self.wait_while_held(slot_cpu);
        }
    }

    /// Takes the lock with a compare-exchange alone: for slots that no sequence ever
    /// locks ([`Scheme::Locked`]).
    pub(crate) fn lock_atomic(&self) {
        // Decided before any lock is taken: releases and waits read ASYMMETRIC.
        scheme();
        self.acquire_word(token(), None);
    }

    /// Compare-exchanges the word from free (0 or [`READY`]) to `me`, waiting while it
    /// is held. `cpu`: the CPU whose slot this is (`None` for mm_cid slots).
    fn acquire_word(&self, me: usize, cpu: Option<usize>) {
        // Relaxed: only a guess at the free value; the exchange checks it.
        let mut seen = self.word.load(Ordering::Relaxed);
        loop {
            if !is_token(seen) {
                // Acquire: pairs with the Release store of the previous owner.
                match self
                    .word
                    .compare_exchange(seen, me, Ordering::Acquire, Ordering::Relaxed)
                {
                    Ok(_) => return,
                    Err(now) => seen = now,
                }
                continue;
            }
            self.refuse_own_token(me);
            self.wait_while_held(cpu);
            // Relaxed: as above.
            seen = self.word.load(Ordering::Relaxed);
        }
    }

    /// Panics if the word holds `me`, the calling thread's token: the thread already
    /// holds this lock (a signal handler interrupting its holder, or nesting that no
    /// earlier check saw), and waiting would never end.
    #[inline]
    fn refuse_own_token(&self, me: usize) {
        // Relaxed: only this thread ever stores its own token.
        if self.word.load(Ordering::Relaxed) == me {
            refuse_own_token_panic();
        }
    }

    /// Takes the lock of the calling thread's current CPU's slot, by whatever means
    /// works: local sequences first; the remote acquisition after [`MAX_ABORTS`] aborts
    /// in a row, or under [`Scheme::Locked`]. `lock_of(i)` is slot `i`'s lock, for `i`
    /// below `slots`. Returns the index of the slot whose lock is now held.
    pub(crate) fn lock_current<'a>(slots: usize, lock_of: impl Fn(usize) -> &'a CpuLock) -> usize {
        let local = on_current_cpu(slots, |rseq, cpu| {
            let lock = lock_of(cpu as usize);
            // Relaxed: the free value to expect; the sequence compares it again.
            let seen = lock.word.load(Ordering::Relaxed);
            let outcome = if is_token(seen) {
                Outcome::CompareFailed
            } else {
                lock.try_lock_local::<{ arch::CPU_ID_FIELD }>(rseq, cpu, seen)
            };
            match outcome {
                Outcome::Committed(()) => Attempt::Done(cpu as usize),
                Outcome::CompareFailed => {
                    lock.refuse_own_token(token());
                    lock.wait_while_held(Some(cpu as usize));
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
        let index = crate::cpu::current_cpu() % slots;
        lock_of(index).lock_remote(index as u32);
        index
    }

    /// The [`Attempt`] of a guarded sequence that aborted: if the abort came from this
    /// lock being held, waits until it looks free first, so the retries are not spent
    /// while a remote owner works.
    #[inline]
    pub(crate) fn aborted<R>(&self) -> Attempt<R> {
        if self.is_held() {
            // The fast paths run on the slot's own CPU.
            self.wait_while_held(Some(crate::cpu::current_cpu()));
        }
        Attempt::Aborted
    }

    /// Releases the lock (to [`READY`] if the flag is set, else to 0), and wakes its
    /// sleepers if there are any (no system call otherwise). See "Waiting" in the module
    /// docs for the fences.
    #[inline]
    pub(crate) fn unlock(&self) {
        let free = self.free_word();
        // Relaxed: ASYMMETRIC is fixed before any lock is taken (module docs).
        if ASYMMETRIC.load(Ordering::Relaxed) {
            self.unlock_asymmetric_to(free);
        } else {
            // R1. Release: pairs with the Acquire of the next owner.
            self.word.store(free, Ordering::Release);
            // R2: R3 must not be hoisted above R1.
            fence(Ordering::SeqCst);
            self.wake_if_sleepers();
        }
    }

    /// [`unlock`](CpuLock::unlock) of a lock whose flag is set, when the sleepers fence
    /// with membarrier (`ASYMMETRIC`), both of which the caller knows: `with_cpu`'s fast
    /// path only runs with the asymmetric fence, and only takes a [`READY`] word.
    #[inline(always)]
    pub(crate) fn unlock_ready_asymmetric(&self) {
        debug_assert!(self.flag.load(Ordering::Relaxed));
        self.unlock_asymmetric_to(READY);
    }

    /// The release to the free word `free` when the sleepers fence with membarrier.
    #[inline(always)]
    fn unlock_asymmetric_to(&self, free: usize) {
        // R1. Release: pairs with the Acquire of the next owner.
        self.word.store(free, Ordering::Release);
        // R2: R3 must not be hoisted above R1; the sleepers' membarrier does the rest.
        compiler_fence(Ordering::SeqCst);
        self.wake_if_sleepers();
    }

    /// The release of [`crate::PerCpu::with_cpu_bench_baseline`] (of a lock whose flag
    /// is set, as for [`unlock_ready_asymmetric`](CpuLock::unlock_ready_asymmetric)): the
    /// store alone, with no look for sleepers (that method's waiters never sleep).
    #[cfg(feature = "__bench")]
    #[inline(always)]
    pub(crate) fn unlock_without_parking(&self) {
        // Release: pairs with the Acquire of the next owner.
        self.word.store(READY, Ordering::Release);
    }

    /// R3 and R4 of the release.
    #[inline(always)]
    fn wake_if_sleepers(&self) {
        // R3. Relaxed: ordered by the fences of both sides (module docs).
        if self.sleepers.load(Ordering::Relaxed) != 0 {
            self.wake_sleepers();
        }
    }

    /// R4: wakes every thread asleep on this lock.
    #[cold]
    #[inline(never)]
    fn wake_sleepers(&self) {
        // An error (EFAULT cannot happen: the word is ours) leaves nobody asleep that a
        // later release would not wake either way; sleepers re-check in any case.
        let _ = sys::futex_wake_low_half(&self.word, i32::MAX);
    }

    /// Waits until the lock looks free: spins (unless the slot is the calling thread's
    /// own CPU's, `cpu`, where the holder cannot be running alongside), yields a few
    /// times, then sleeps until a release wakes it.
    #[cold]
    #[inline(never)]
    pub(crate) fn wait_while_held(&self, cpu: Option<usize>) {
        let holder_elsewhere = cpu != Some(crate::cpu::current_cpu());
        let spins = if holder_elsewhere { SPINS } else { 0 };
        for _ in 0..spins {
            if !self.is_held() {
                return;
            }
            core::hint::spin_loop();
        }
        for _ in 0..YIELDS {
            if !self.is_held() {
                return;
            }
            std::thread::yield_now();
        }
        while self.is_held() {
            if !self.sleep() {
                // Our fence is refused: we may not sleep, as a release could miss us.
                std::thread::yield_now();
            }
        }
    }

    /// S1–S4 of "Waiting" (module docs): sleeps once, unless the lock is free by then.
    /// Returns false, without sleeping, if the membarrier fence is refused to this
    /// thread.
    fn sleep(&self) -> bool {
        // S1. SeqCst: with the fence below, ordered before S3.
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // S2. Relaxed: ASYMMETRIC is fixed before any lock is taken.
        let fenced = if ASYMMETRIC.load(Ordering::Relaxed) {
            sys::membarrier(mb::CMD_PRIVATE_EXPEDITED, 0, 0).is_ok()
        } else {
            fence(Ordering::SeqCst);
            true
        };
        if fenced {
            // S3. Relaxed: ordered after S1 by the fence; the caller re-reads the word
            // before it acts on it.
            let held = self.word.load(Ordering::Relaxed);
            if is_token(held) {
                // S4. EAGAIN (the word changed), EINTR, or a wake: the caller re-checks.
                let _ = sys::futex_wait_low_half(&self.word, held as u32);
            }
        }
        // Relaxed: only a release that raced S1 needed to see it.
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
        fenced
    }
}

/// Whether a lock word is held: tokens are odd, free words (0, [`READY`]) even.
#[inline(always)]
fn is_token(word: usize) -> bool {
    word & 1 != 0
}

#[cold]
#[inline(never)]
fn refuse_own_token_panic() -> ! {
    panic!(
        "a thread asked for a per-CPU lock it already holds (it already holds a slot of the \
         same PerCpu: a signal handler interrupting the holder, or nested use): it would wait \
         for itself forever"
    );
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

/// How many times a waiter spins before yielding, when the holder may run on another
/// CPU: per-CPU critical sections are short, so a holder that runs releases within a
/// few hundred nanoseconds.
const SPINS: u32 = 100;
/// How many times a waiter yields before it sleeps: a preempted holder on the waiter's
/// own CPU gets to run and release.
const YIELDS: u32 = 3;

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::time::Duration;

    use super::*;

    /// The window a signal handler can hit: the word holds the thread's own token (a
    /// lock it took and has not counted yet). Asking for that lock again, locally
    /// (where the compare fails) or atomically, must panic, not wait for itself.
    #[test]
    fn asking_for_a_lock_the_thread_holds_panics_instead_of_waiting_for_itself() {
        let _delay = crate::tests::delay_shared();
        // 60 s, not 10: the two expected panics print backtraces, which under valgrind
        // on a loaded CI machine took over 10 s (a false "hang" in CI, 2026-12-04).
        let outcome = crate::tests::within(Duration::from_secs(60), || {
            let locks: Vec<CpuLock> = (0..sys::possible_cpus()).map(|_| CpuLock::new()).collect();
            let index = CpuLock::lock_current(locks.len(), |i| &locks[i]);
            let local = catch_unwind(AssertUnwindSafe(|| {
                // Pinned by nothing: a migration lands on a free lock and returns.
                let again = CpuLock::lock_current(locks.len(), |i| &locks[i]);
                if again != index {
                    locks[again].unlock();
                    return false;
                }
                true
            }));
            let atomic = catch_unwind(AssertUnwindSafe(|| locks[index].lock_atomic()));
            locks[index].unlock();
            (local.map_err(|_| ()), atomic.is_err())
        });
        let (local, atomic) =
            outcome.expect("still waiting after 60 s: the thread waits for itself");
        assert!(atomic, "lock_atomic of a lock the thread holds returned");
        // Ok(false): the thread migrated between the two calls (nothing to check).
        assert!(
            local.is_err() || local == Ok(false),
            "lock_current of its own CPU's lock returned"
        );
    }
}
