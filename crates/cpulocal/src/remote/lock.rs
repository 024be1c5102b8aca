//! The per-CPU lock word: its states, its local and remote acquisition, and waiting.
//!
//! # States
//!
//! Every per-CPU slot that may be reached from another CPU carries one word:
//!
//! | value | meaning |
//! |---|---|
//! | `0` | free: a `RingBuffer`'s fast paths may run; a `PerCpu` slot without its value yet |
//! | `READY` (2) | free, and the owner's flag is set: a `PerCpu` slot that holds its value |
//! | another even value | free: a `Stack`'s list head (a node's address, 8-byte aligned; 0 when empty) |
//! | a token (odd) | held by the thread whose token it is (unique among live threads) |
//!
//! Free words are even, held ones odd. `READY` lets `with_cpu`'s fast path learn from the
//! one word it compares that the slot holds a value (it compares with `READY`, so a slot
//! without one goes to the slow path, which creates it): a flag read less. A release
//! writes `READY` when the flag is set, 0 otherwise; `RingBuffer`, which never sets the
//! flag and whose sequences check the word against 0, never sees it.
//!
//! A `Stack` keeps its list head in the word itself while the lock is free: its push and
//! pop load one word, which is both their guard (odd: held) and the head, and commit the
//! new head into it. A holder takes the head with the lock (the acquisitions return the
//! free word they replaced), works on the list privately, and releases the lock to the
//! new head ([`CpuLock::unlock_to`]).
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
//! - Fast paths that do not take the lock check the word inside their sequence and abort
//!   while it is held: the same fence argument covers them. A `Stack` push or pop that
//!   read the word (its list head) before our exchange and committed before the fence
//!   overwrote our token with a new head: the lock is then free, with a consistent list,
//!   and we try again.
//! - Release is a `Release` store of the free value (0 or `READY`, or a `Stack`'s new list
//!   head), paired with the `Acquire` of the next owner (the remote compare-exchange, or
//!   the fence after a local acquisition).
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
//! in the word would be lost with it. A `Stack` push or pop that overwrites a token
//! frees the word without waking anybody; the remote owner it overwrote tries again and
//! its release wakes them (and if its fence is refused, it wakes them before it panics).
//! Every wake wakes all sleepers; they re-check and go back to sleep if another thread
//! took the lock first.
//!
//! Without the membarrier command (the locked scheme, older kernels) the release pays
//! a `SeqCst` fence instead of the compiler fence: those acquisitions are atomic
//! read-modify-writes already. A thread whose membarrier a sandbox refuses yields
//! instead of sleeping.

use core::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};

use super::held::token;
use super::{
    fence_sequences_everywhere, fence_sequences_on, on_current_cpu, scheme, Attempt, Scheme,
    ASYMMETRIC,
};
use crate::abi::membarrier as mb;
use crate::arch::{self, Outcome};
use crate::sys;

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
    /// Where the word is in the lock, for sequences that address it from a slot's base.
    pub(crate) const WORD_OFFSET: usize = core::mem::offset_of!(CpuLock, word);

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
    /// compare-and-store from the free word `free` (any even value the caller read: 0,
    /// [`READY`] or a `Stack`'s list head; `CompareFailed` when the word holds anything
    /// else), from a thread that believes it runs on `cpu`, or,
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
    /// survived it. Waits while somebody else holds it. Returns the free word it
    /// replaced (a [`Stack`](crate::Stack)'s list head: see "States" in the module docs).
    pub(crate) fn lock_remote(&self, cpu: u32) -> usize {
        self.lock_fenced(Some(cpu))
    }

    /// [`lock_remote`](CpuLock::lock_remote) for a slot indexed by mm_cid, whose
    /// sequences may run on any CPU: the fence is [`fence_sequences_everywhere`].
    pub(crate) fn lock_mm_cid_slot(&self) -> usize {
        self.lock_fenced(None)
    }

    /// [`lock_remote`](CpuLock::lock_remote) on `cpu`, or on every CPU (`None`).
    fn lock_fenced(&self, cpu: Option<u32>) -> usize {
        if scheme() != Scheme::Membarrier {
            return self.lock_atomic();
        }
        let me = token();
        let slot_cpu = cpu.map(|c| c as usize);
        loop {
            let replaced = self.acquire_word(me, slot_cpu);
            // Restart every sequence in flight on `cpu` (on every CPU): any that read the
            // word as free before our exchange either committed already or never will.
            let fenced = match cpu {
                Some(cpu) => fence_sequences_on(cpu),
                None => fence_sequences_everywhere(),
            };
            if let Err(refused) = fenced {
                // Without the fence we cannot exclude `cpu`'s sequences. The word holds
                // our token, a local owner's (which overwrote it), or a list head that a
                // `Stack` push or pop committed over it: give ours back, with the free
                // word it replaced, before unwinding, so the slot stays usable (and a
                // list whole) for every other thread. Wake the sleepers either way: a
                // push or pop that freed the word wakes nobody itself.
                let _ =
                    self.word
                        .compare_exchange(me, replaced, Ordering::Release, Ordering::Relaxed);
                self.wake_sleepers();
                refused.panic();
            }
            // Acquire: a local owner that overwrote our token released with a Release
            // store; we must see its writes before ours.
            if self.word.load(Ordering::Acquire) == me {
                return replaced;
            }
            // A local sequence committed before the fence and overwrote our token: a
            // compare-and-store that took the lock (wait for its owner's release), or a
            // `Stack` push or pop that read the list head we replaced (the lock is free
            // again, with the list as that sequence left it). Then try again.
            self.wait_while_held(slot_cpu);
        }
    }

    /// Takes the lock with a compare-exchange alone: for slots that no sequence ever
    /// locks ([`Scheme::Locked`]). Returns the free word it replaced.
    pub(crate) fn lock_atomic(&self) -> usize {
        // Decided before any lock is taken: releases and waits read ASYMMETRIC.
        scheme();
        self.acquire_word(token(), None)
    }

    /// Compare-exchanges the word from free (any even value) to `me`, waiting while it
    /// is held; returns the free word replaced. `cpu`: the CPU whose slot this is
    /// (`None` for mm_cid slots).
    fn acquire_word(&self, me: usize, cpu: Option<usize>) -> usize {
        // Relaxed: only a guess at the free value; the exchange checks it.
        let mut seen = self.word.load(Ordering::Relaxed);
        loop {
            if !is_token(seen) {
                // Acquire: pairs with the Release store of the previous owner.
                match self
                    .word
                    .compare_exchange(seen, me, Ordering::Acquire, Ordering::Relaxed)
                {
                    Ok(_) => return seen,
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
        if self.holds(me) {
            refuse_own_token_panic();
        }
    }

    /// Whether the word holds `me`, the calling thread's token.
    #[inline]
    pub(super) fn holds(&self, me: usize) -> bool {
        // Relaxed: only this thread ever stores its own token.
        self.word.load(Ordering::Relaxed) == me
    }

    /// Takes the lock of the calling thread's current CPU's slot, by whatever means
    /// works: local sequences first; the remote acquisition after
    /// [`MAX_ABORTS`](super::MAX_ABORTS) aborts in a row, or under [`Scheme::Locked`].
    /// `lock_of(i)` is slot `i`'s lock, for `i` below `slots`. Returns the index of the
    /// slot whose lock is now held.
    pub(crate) fn lock_current<'a>(slots: usize, lock_of: impl Fn(usize) -> &'a CpuLock) -> usize {
        Self::lock_current_taking(slots, lock_of).0
    }

    /// [`lock_current`](CpuLock::lock_current), returning with the slot's index the free
    /// word the lock replaced (a [`Stack`](crate::Stack)'s list head).
    pub(crate) fn lock_current_taking<'a>(
        slots: usize,
        lock_of: impl Fn(usize) -> &'a CpuLock,
    ) -> (usize, usize) {
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
                Outcome::Committed(()) => Attempt::Done((cpu as usize, seen)),
                Outcome::CompareFailed => {
                    lock.refuse_own_token(token());
                    lock.wait_while_held(Some(cpu as usize));
                    Attempt::Retry
                }
                Outcome::Aborted => Attempt::Aborted,
            }
        });
        if let Some(taken) = local {
            return taken;
        }
        // The slow path: no successful sequence needed. Slot `i` belongs to CPU `i`, so
        // the fence goes to the CPU whose sequences use the slot we lock.
        let index = crate::cpu::current_cpu() % slots;
        (index, lock_of(index).lock_remote(index as u32))
    }

    /// The [`Attempt`] of a guarded sequence that aborted: if the abort came from this
    /// lock being held, waits until it looks free first, so the retries are not spent
    /// while a remote owner works.
    ///
    /// # Panics
    ///
    /// If the calling thread holds this lock itself (a signal handler that interrupted
    /// the holder, e.g. a `steal`, and uses the same structure on that CPU): it would
    /// wait for itself forever.
    #[inline]
    pub(crate) fn aborted<R>(&self) -> Attempt<R> {
        if self.is_held() {
            self.refuse_own_token(token());
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
        // The dispatch of `unlock_to`, not a call to it: with that call the compiler
        // stopped inlining `PerCpuGuard`'s drop into `with_cpu` callers (1.70 -> 2.20 ns
        // a `with_cpu`, the same loop otherwise).
        let free = self.free_word();
        // Relaxed: ASYMMETRIC is fixed before any lock is taken (module docs).
        if ASYMMETRIC.load(Ordering::Relaxed) {
            self.unlock_asymmetric_to(free);
        } else {
            self.unlock_symmetric_to(free);
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

    /// Releases the lock to the free word `free`, which must be even (a
    /// [`Stack`](crate::Stack)'s list head), waking its sleepers if there are any.
    #[inline]
    pub(crate) fn unlock_to(&self, free: usize) {
        debug_assert!(!is_token(free));
        // Relaxed: ASYMMETRIC is fixed before any lock is taken (module docs).
        if ASYMMETRIC.load(Ordering::Relaxed) {
            self.unlock_asymmetric_to(free);
        } else {
            self.unlock_symmetric_to(free);
        }
    }

    /// The word of a lock that nobody else can reach any more (its structure is being
    /// dropped), set to 0: the free word it held.
    pub(crate) fn take_unshared(&self) -> usize {
        // Relaxed: nobody else uses the lock.
        self.word.swap(0, Ordering::Relaxed)
    }

    /// The release to the free word `free` when the sleepers fence with a `SeqCst` fence
    /// (no membarrier command).
    #[inline(always)]
    fn unlock_symmetric_to(&self, free: usize) {
        // R1. Release: pairs with the Acquire of the next owner.
        self.word.store(free, Ordering::Release);
        // R2: R3 must not be hoisted above R1.
        fence(Ordering::SeqCst);
        self.wake_if_sleepers();
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

/// Whether a lock word is held: tokens are odd, free words (0, [`READY`], a `Stack`'s list
/// head) even.
#[inline(always)]
fn is_token(word: usize) -> bool {
    word & 1 != 0
}

#[cold]
#[inline(never)]
fn refuse_own_token_panic() -> ! {
    panic!(
        "a thread asked for a per-CPU lock it already holds (it already holds a slot of the \
         same PerCpu, Stack or RingBuffer: a signal handler interrupting the holder, or nested \
         use; or, in a fork child, the lock was held at the fork by a parent thread whose \
         thread-local addresses, and so its lock token, this thread inherited): it would \
         wait for itself forever"
    );
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

    /// A signal handler that interrupts a holder (a `Stack::steal`, say) and whose fast
    /// path on the same slot aborts finds the word held by its own thread: the retry
    /// must panic, not wait for itself.
    #[test]
    fn an_abort_on_a_lock_the_thread_holds_panics_instead_of_waiting_for_itself() {
        let _delay = crate::tests::delay_shared();
        let outcome = crate::tests::within(Duration::from_secs(60), || {
            let lock = CpuLock::new();
            let free = lock.lock_atomic();
            let retried = catch_unwind(AssertUnwindSafe(|| lock.aborted::<()>()));
            lock.unlock_to(free);
            retried.is_err()
        });
        let panicked = outcome.expect("still waiting after 60 s: the thread waits for itself");
        assert!(panicked, "aborted() on a lock the thread holds returned");
    }
}
