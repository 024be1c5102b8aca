//! `Counter`: a sum that many threads bump, one restartable add per update.
#![deny(unsafe_op_in_unsafe_fn)]

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::abi::Rseq;
use crate::arch::{self, Outcome};
use crate::cache_padded::CachePadded;
use crate::remote::MAX_ABORTS;
use crate::{cpu, sys, thread};

/// One CPU's part of the sum.
#[derive(Default)]
struct Slot {
    /// Written only by restartable adds running on this slot's CPU.
    local: AtomicUsize,
    /// Written with `lock xadd` by every update that did not go through a sequence
    /// (the fallback, the slow path), from any CPU. Kept apart from `local` because an
    /// atomic add racing a sequence's plain store would be lost.
    remote: AtomicU64,
    /// The slow-path updates since creation or the last `take`, for `slow_path_sum`
    /// only: `remote` also holds what `take` cancelled, so it cannot serve.
    slow: AtomicU64,
}

/// A counter that many threads add to, at the cost of a thread-local increment.
///
/// Each possible CPU has its own cache-padded slot. [`add`](Counter::add) adds to the
/// slot of the CPU the thread runs on with one restartable sequence: a plain `add`
/// to memory, with no `lock` prefix and no cache line shared between CPUs.
/// [`sum`](Counter::sum) adds the slots up.
///
/// Without rseq (see [`crate::mechanism`]) each update is a `lock xadd` on the slot of
/// the CPU `sched_getcpu()` names: still per-CPU, so rarely contended, and exact.
///
/// `Counter` is `Send` and `Sync`: every slot is written only by atomics or by sequences
/// that the kernel makes atomic per CPU, and read with atomic loads.
///
/// ```
/// use std::sync::Arc;
/// let hits = Arc::new(cpulocal::Counter::new());
/// let threads: Vec<_> = (0..4)
///     .map(|_| {
///         let hits = Arc::clone(&hits);
///         std::thread::spawn(move || {
///             for _ in 0..1000 {
///                 hits.add(1);
///             }
///         })
///     })
///     .collect();
/// for t in threads {
///     t.join().unwrap();
/// }
/// assert_eq!(hits.sum(), 4000);
/// ```
pub struct Counter {
    slots: Box<[CachePadded<Slot>]>,
    /// Serialises [`Counter::take`]; adds never touch it.
    takers: Mutex<()>,
}

impl Counter {
    /// A counter at zero, with one slot per possible CPU (128 bytes each).
    pub fn new() -> Self {
        Counter {
            slots: (0..sys::possible_cpus())
                .map(|_| CachePadded::new(Slot::default()))
                .collect(),
            takers: Mutex::new(()),
        }
    }

    /// Adds `n` (wrapping at 2^64).
    ///
    /// Lock-free; wait-free on the fast path. Safe to call from a signal handler on a
    /// thread that has already used cpulocal.
    #[inline]
    pub fn add(&self, n: u64) {
        // One attempt inline; the first registration, retries and the slow path stay out
        // of line (a tail call), so every call site carries only the sequence itself.
        if let Some(rseq) = thread::current_if_registered() {
            if self.try_add(rseq, n) {
                return;
            }
        }
        self.add_retry(n);
    }

    /// One restartable add to the current CPU's slot; false when it did not commit.
    #[inline(always)]
    fn try_add(&self, rseq: NonNull<Rseq>, n: u64) -> bool {
        let cpu = cpu::cpu_id_start(rseq);
        let Some(slot) = self.slots.get(cpu as usize) else {
            return false; // a CPU beyond `possible` (cannot happen): the slow path takes it
        };
        #[cfg(any(test, feature = "__test-hooks"))]
        if crate::test_hooks::counter_sequence_broken() {
            // SAFETY: as below; the mutation loses updates, it touches no other memory.
            let outcome = unsafe {
                arch::add_without_restart(rseq.as_ptr(), slot.local.as_ptr(), n as usize, cpu)
            };
            return outcome == Outcome::Committed(());
        }
        // SAFETY: (1) `rseq` is this thread's area; (2) `slot.local` is written only by
        // this sequence, always with the CPU whose slot it is, so the kernel serialises
        // all its writers; readers use atomic loads.
        let outcome = unsafe { arch::add(rseq.as_ptr(), slot.local.as_ptr(), n as usize, cpu) };
        outcome == Outcome::Committed(())
    }

    /// After an abort (or before the thread's first registration): retry a few times,
    /// then take the slow path.
    #[cold]
    #[inline(never)]
    fn add_retry(&self, n: u64) {
        if let Some(rseq) = thread::current() {
            for _ in 1..MAX_ABORTS {
                if self.try_add(rseq, n) {
                    return;
                }
            }
        }
        self.add_slow(n);
    }

    /// The update without a sequence: an atomic add to the current CPU's `remote`.
    fn add_slow(&self, n: u64) {
        let cpu = cpu::current_cpu() as usize;
        let slot = &self.slots[cpu % self.slots.len()];
        // Relaxed: a counter orders nothing; `sum` is exact once writers are joined.
        slot.remote.fetch_add(n, Ordering::Relaxed);
        // Relaxed: a diagnostic, exact once writers are joined.
        slot.slow.fetch_add(n, Ordering::Relaxed);
    }

    /// The sum of the updates (wrapping at 2^64).
    ///
    /// Exact once the writers have stopped and are synchronised with (e.g. joined).
    /// While they run it is a sum of per-slot snapshots taken one after the other, not
    /// one instant's value.
    pub fn sum(&self) -> u64 {
        self.slots.iter().fold(0u64, |acc, s| {
            // `remote` first, with Acquire (pairs with the Release swap in `take`): a sum
            // that sees `-local` written by a take also sees a `local` at least as large
            // as the one that take read, so a slot never reads as negative.
            let remote = s.remote.load(Ordering::Acquire);
            acc.wrapping_add(s.local.load(Ordering::Relaxed) as u64)
                .wrapping_add(remote)
        })
    }

    /// Returns the sum and sets the counter back to zero, exactly, even while other
    /// threads add: every update is counted either in the value returned or in later
    /// sums, never in both and never in neither. Concurrent takes are serialised by a
    /// mutex (so `take` is not for signal handlers); adds never wait for it.
    ///
    /// How: a slot's value is `local + remote`. `take` reads `local` (written only by
    /// sequences on the slot's CPU, so it cannot be changed from here) and atomically
    /// swaps `remote` for `-local`: the slot then holds exactly the updates made since
    /// the read, and the old `remote` plus the read `local` is what was taken.
    ///
    /// ```
    /// let c = cpulocal::Counter::new();
    /// c.add(3);
    /// assert_eq!(c.take(), 3);
    /// c.add(4);
    /// assert_eq!(c.sum(), 4);
    /// ```
    pub fn take(&self) -> u64 {
        // Takers are serialised: two interleaved takes of one slot could each cancel a
        // different `local`, and return wrapped values. Takes are rare; adds never wait.
        let _one_taker = self.takers.lock().unwrap_or_else(|p| p.into_inner());
        self.slots.iter().fold(0u64, |acc, s| {
            // Relaxed: the value read is the very value cancelled below, whenever the
            // read happens, so exactness needs no ordering.
            let local = s.local.load(Ordering::Relaxed) as u64;
            // Release: pairs with the Acquire in `sum` (see there).
            let remote = s.remote.swap(local.wrapping_neg(), Ordering::Release);
            // A diagnostic: an `add_slow` racing this may be counted before or after.
            s.slow.store(0, Ordering::Relaxed);
            acc.wrapping_add(local).wrapping_add(remote)
        })
    }

    /// Sets the counter back to zero: [`take`](Counter::take) without the value, and as
    /// exact.
    ///
    /// ```
    /// let c = cpulocal::Counter::new();
    /// c.add(3);
    /// c.reset();
    /// assert_eq!(c.sum(), 0);
    /// ```
    pub fn reset(&self) {
        self.take();
    }

    /// The sum of the updates that went through the slow path (fallback, or repeated
    /// aborts) since creation or the last [`take`](Counter::take) / [`reset`](Counter::reset):
    /// a diagnostic for tests and `cpulocal stress`.
    pub fn slow_path_sum(&self) -> u64 {
        self.slots.iter().fold(0u64, |acc, s| {
            acc.wrapping_add(s.slow.load(Ordering::Relaxed))
        })
    }
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new()
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counter")
            .field("sum", &self.sum())
            .field("slots", &self.slots.len())
            .finish()
    }
}
