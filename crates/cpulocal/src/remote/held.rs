//! Held locks: what `PerCpu` slots the calling thread holds, in one thread-local word,
//! and the re-entry check built on it.
//!
//! A thread that asks for a slot of a [`crate::PerCpu`] while it holds one of the same
//! `PerCpu` — on its own CPU or, after a migration, on another — must panic instead of
//! waiting for itself (or, on two CPUs, for another nested thread) forever. The
//! thread-local whose address is the token (`HELD`) keeps the thread's `PerCpu` state in
//! one word:
//!
//! | value | meaning |
//! |---|---|
//! | `0` | holds no `PerCpu` slot; `with_cpu`'s fast path is not set up (yet) |
//! | `1 ..= 2047` | holds that many `PerCpu` slots |
//! | `2048 + n` | holds `n` slots, and its area was unregistered meanwhile: `0` after the last release |
//! | from `4096` up | holds none, and may take the fast path: the value is its `rseq` area |
//!
//! So `with_cpu`'s fast path reads one word for three questions: is anything held (the
//! re-entry check), is the scheme [`Scheme::Membarrier`](super::Scheme::Membarrier) with the asymmetric fence (so
//! the release needs only a compiler fence), and where is the thread's area. It writes
//! `1` *before* its sequence (and the area back if the sequence does not commit), and
//! its release writes the area back when the word still says `1` (guards may be dropped
//! in any order: otherwise it counts down). These are a load and two plain stores, none
//! of which depends on the value loaded, so back-to-back critical sections carry no
//! chain through memory. The other paths count up and down, and whenever the count
//! returns to 0 the word is set to the area again if the fast path may run. While the
//! thread holds a slot, a request for another slot of the same `PerCpu` searches its
//! lock words for the thread's token, which only the holder of a slot (or a thread in
//! the middle of taking it remotely) leaves there.
//!
//! Why `1` goes first: a signal handler runs on the thread it interrupts. Were the word
//! written after the commit, a handler arriving between the two would find the thread
//! holding nothing and could take a second slot of the same `PerCpu` unchecked (on
//! another CPU, after a migration; on the same slot, the wait finds the thread's own
//! token and refuses). Written first, the word says `1` at every instruction after the
//! commit; a handler arriving before the commit makes the search, finds no token, takes
//! its slot, and returns with the word as it found it; the interrupted sequence aborts.
//! The count is checked before any lock is taken, so its limit panics with no slot left
//! locked.
//!
//! Other layouts measured slower (`with_cpu` inlined in a loop on Zen 4, fastest runs of
//! seven interleaved rounds; this layout 1.69–1.73 ns):
//! - the area read from the registration word, the word holding only constants (no
//!   value carried from one call to the next through it): 1.96–2.02 ns, one load more;
//! - the release storing the area read from the registration word: 1.85 ns (on an
//!   Intel Xeon, 2026-12-05: 1.83 against 1.63 for this layout);
//! - the word pointing at the lock word last taken by the fast path, which the release
//!   leaves alone (the thread holds a slot if that lock word holds its token): 2.05 ns,
//!   from a load of the lock word the previous release had just stored.

use core::cell::Cell;
use core::sync::atomic::{compiler_fence, Ordering};

use super::{CpuLock, ASYMMETRIC, MEMBARRIER_SCHEME};
use crate::thread;

thread_local! {
    /// Its address is the thread's lock token; its value, the thread's `PerCpu` state
    /// (see the module docs).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// [`HELD`] values from here up are the thread's area (ready for the fast path); below
/// it, the number of `PerCpu` slots held. No area is mapped in the first page.
const FAST_PATH_READY: usize = 4096;

/// Added to the count of a thread whose area was unregistered while it held slots: no
/// release may then set the area back (see [`forget_percpu_fast_path`]). Also the limit
/// of slots held at once.
const FORGOTTEN: usize = 2048;

/// The calling thread's lock token.
#[inline]
pub(super) fn token() -> usize {
    // `| 1`: the address is at least 8-aligned, so this stays unique, and the token is
    // odd: its low 32 bits (which the futex compares) are never a free word (0, READY).
    HELD.with(|h| h as *const Cell<usize> as usize | 1)
}

/// The calling thread's area if it holds no `PerCpu` slot and may take `with_cpu`'s
/// fast path: the scheme is [`Scheme::Membarrier`](super::Scheme::Membarrier) with the asymmetric fence, and the
/// thread is registered. One thread-local load: the re-entry check, the scheme check
/// and the area in one.
#[inline(always)]
pub(crate) fn percpu_fast_area() -> Option<core::ptr::NonNull<crate::abi::Rseq>> {
    #[cfg(any(test, feature = "__test-hooks"))]
    if crate::test_hooks::slow_paths_forced() {
        return None;
    }
    let state = HELD.get();
    if state >= FAST_PATH_READY {
        // SAFETY: only `fast_path_state` stores such values, from a registered area.
        Some(unsafe { core::ptr::NonNull::new_unchecked(state as *mut crate::abi::Rseq) })
    } else {
        None
    }
}

/// [`HELD`]'s value for a thread that holds no `PerCpu` slot: its area when the fast
/// path may run, else 0.
fn fast_path_state() -> usize {
    // Relaxed: see `fast_path_area`. A thread that reads the scheme flag before
    // ASYMMETRIC's final value just stays on the slow paths a while longer; the waiters
    // that rely on ASYMMETRIC read it after the scheme's `OnceLock`.
    if MEMBARRIER_SCHEME.load(Ordering::Relaxed) && ASYMMETRIC.load(Ordering::Relaxed) {
        if let Some(area) = thread::current_if_registered() {
            let area = area.as_ptr() as usize;
            if area >= FAST_PATH_READY {
                return area;
            }
        }
    }
    0
}

/// Sets up `with_cpu`'s fast path for the calling thread if it holds no `PerCpu` slot
/// (deciding the scheme and registering the thread first). Returns whether the fast
/// path may now run.
#[cfg(feature = "__bench")]
#[cold]
pub(crate) fn prepare_percpu_fast_path() -> bool {
    if HELD.get() == 0 {
        super::scheme();
        thread::current();
        HELD.set(fast_path_state());
    }
    percpu_fast_area().is_some()
}

/// The calling thread's area was unregistered (its thread is exiting): the fast path
/// must not be set up with it again. A thread that holds slots meanwhile (a guard kept
/// across the unregistration by a later thread-local destructor) is marked
/// [`FORGOTTEN`], so that the fast path's release of the last one does not set the area
/// back: an mm_cid-indexed fast path would then commit on it, since the kernel leaves
/// `mm_cid` at 0 there (a CPU-indexed one finds `cpu_id` unset and aborts), and nothing
/// would restart that sequence.
pub(crate) fn forget_percpu_fast_path() {
    let state = HELD.get();
    if state >= FAST_PATH_READY {
        HELD.set(0);
    } else if state != 0 && state < FORGOTTEN {
        HELD.set(state + FORGOTTEN);
    }
}

/// Panics if the calling thread holds one of `locks` (the slot locks of one
/// `PerCpu`): asking for another would wait forever for itself (on the same slot), or
/// deadlock with another thread doing the same on a second CPU. `method` is the public
/// method asked, for the message. (Called by [`Counted::before_taking`], so that no
/// path counts a slot it has not checked.)
///
/// A thread that holds no `PerCpu` lock at all (the usual case) pays one thread-local
/// load and a predicted branch; one that holds some reads the lock words of `locks`,
/// looking for its token.
#[inline(always)]
fn check_not_held<'a, I: Iterator<Item = &'a CpuLock>>(locks: impl FnOnce() -> I, method: &str) {
    let state = HELD.get();
    if state != 0 && state < FAST_PATH_READY {
        // `locks` is only called here: finding the lock words takes loads (atomic ones,
        // which the compiler may not move) that the usual case must not pay.
        check_not_held_nested(state, locks(), method);
    }
}

#[cold]
#[inline(never)]
fn check_not_held_nested<'a>(
    held: usize,
    mut locks: impl Iterator<Item = &'a CpuLock>,
    method: &str,
) {
    // Before the lock is taken: a panic after it would leave the slot locked for ever.
    assert!(
        held % FORGOTTEN < FORGOTTEN - 1,
        "PerCpu::{method}: a thread may hold at most {} PerCpu slots at once",
        FORGOTTEN - 1
    );
    let me = token();
    if locks.any(|l| l.holds(me)) {
        panic!(
            "PerCpu::{method} called by a thread that already holds a slot of the same PerCpu \
             (nested with_cpu/lock/on_cpu/lock_cpu/for_each, or a signal handler interrupting \
             one): it would wait for itself forever, or deadlock with another thread nesting on \
             another CPU. Release the first slot before taking another, or use two PerCpus"
        );
    }
}

/// A `PerCpu` slot lock the calling thread is about to take by a path other than the
/// fast one, counted before it waits for or takes it, for the reason the fast path
/// writes `1` first (see "Why `1` goes first"): a signal handler that arrives while
/// the word holds the thread's token must find the thread counted, or it would take a
/// second slot of the same `PerCpu` unchecked (the slow paths' window is wide: a signal
/// that arrives during the fence is delivered as it returns). Until then the count says
/// one slot more than the thread holds, which only sends a handler to the search, which
/// finds no token. Dropped without [`taken`](Self::taken) (taking the lock panicked),
/// it counts the slot back.
pub(crate) struct Counted(());

impl Counted {
    /// Counts the slot lock about to be taken, after the re-entry check
    /// ([`check_not_held`] with `locks` and `method`): the check first, so that its panic
    /// leaves the count as it was.
    #[inline]
    pub(crate) fn before_taking<'a, I: Iterator<Item = &'a CpuLock>>(
        locks: impl FnOnce() -> I,
        method: &str,
    ) -> Counted {
        check_not_held(locks, method);
        note_held();
        Counted(())
    }

    /// The lock was taken: the count stays until the guard's release.
    #[inline]
    pub(crate) fn taken(self) {
        #[cfg(any(test, feature = "__test-hooks"))]
        crate::test_hooks::slow_lock_taken();
        core::mem::forget(self);
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        note_released();
    }
}

/// Counts a `PerCpu` slot lock the calling thread is about to take by any path but the
/// fast one (see [`Counted`]).
#[inline]
fn note_held() {
    let state = HELD.get();
    let held = if state >= FAST_PATH_READY {
        1
    } else {
        state + 1
    };
    // `check_not_held`, before the lock was taken, refused a thread with no room left.
    debug_assert!(!held.is_multiple_of(FORGOTTEN) && held < FAST_PATH_READY);
    HELD.set(held);
}

/// Notes the slot lock the calling thread is about to take by the fast path (which runs
/// because it holds none). Noted before the sequence: between its commit and a store
/// after it, a signal handler would find the thread holding nothing and could take a
/// second slot of the same `PerCpu` unchecked.
#[inline(always)]
pub(crate) fn note_held_fast() {
    HELD.set(1);
    // The handler that could read the count runs on this thread: a compiler fence is
    // all that keeps the store ahead of the sequence.
    compiler_fence(Ordering::SeqCst);
}

/// The fast path noted by [`note_held_fast`] did not take the lock: the thread holds
/// nothing again, with its `area`.
#[inline(always)]
pub(crate) fn note_fast_lock_failed(area: core::ptr::NonNull<crate::abi::Rseq>) {
    HELD.set(area.as_ptr() as usize);
}

/// Counts a `PerCpu` slot lock the calling thread has just released, taken by any path
/// but the fast one.
#[inline]
pub(crate) fn note_released() {
    match HELD.get() {
        1 => HELD.set(fast_path_state()),
        held => count_down(held),
    }
}

/// Notes the release of a slot lock taken by the fast path, with the `area` it ran with.
#[inline(always)]
pub(crate) fn note_released_fast(area: usize) {
    // A branch, not a select: the stores then depend on nothing loaded.
    if HELD.get() == 1 {
        HELD.set(area);
    } else {
        note_released_nested();
    }
}

/// [`note_released_fast`] while other slots are held (guards dropped out of order).
#[cold]
#[inline(never)]
fn note_released_nested() {
    count_down(HELD.get());
}

/// One slot fewer than `held` (a count, above 1 unless [`FORGOTTEN`]).
fn count_down(held: usize) {
    debug_assert!(!held.is_multiple_of(FORGOTTEN) && held < FAST_PATH_READY);
    HELD.set(if held == FORGOTTEN + 1 { 0 } else { held - 1 });
}
