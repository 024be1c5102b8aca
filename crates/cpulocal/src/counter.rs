//! `Counter`: a sum that many threads bump, one restartable add per update.
#![deny(unsafe_op_in_unsafe_fn)]

use core::alloc::Layout;
use core::fmt;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::abi::Rseq;
use crate::arch::{self, Outcome};
use crate::pool::{self, Item, PackedTable, Pool, STRIDE_SHIFT};
use crate::remote::MAX_ABORTS;
use crate::{cpu, thread, Index};

/// One CPU's part of the sum: 16 bytes in the per-CPU pool, 16-byte aligned, so it
/// never straddles a cache line. `local` comes first: the add sequence commits to the
/// slot's own address.
#[repr(C, align(16))]
struct Slot {
    /// Written only by restartable adds running on this slot's CPU.
    local: AtomicUsize,
    /// Written with `lock xadd` by every update that did not go through a sequence
    /// (the fallback, the slow path), from any CPU, and by `take`. Kept apart from
    /// `local` because an atomic add racing a sequence's plain store would be lost.
    remote: AtomicU64,
}

/// The layout of a [`Slot`] in the pool.
const SLOT: Layout = Layout::new::<Slot>();

// Counters are pooled items with the pool's stride (the fast path shifts by it).
const _: () = assert!(pool::shift_for(SLOT) == STRIDE_SHIFT);
const _: () = assert!(core::mem::offset_of!(Slot, local) == 0);

/// A counter that many threads add to, at the cost of a thread-local increment.
///
/// Each possible CPU has its own 16-byte slot in the per-CPU memory pool
/// ([`crate::pool`]): the slots of one CPU are packed together, the slots of two CPUs
/// never share a cache line, and a CPU that never adds costs no memory.
/// [`add`](Counter::add) adds to the slot of the CPU the thread runs on with one
/// restartable sequence: a plain `add` to memory, with no `lock` prefix.
/// [`sum`](Counter::sum) adds the slots up.
///
/// Without rseq (see [`crate::mechanism`]) each update is a `lock xadd` on the slot of
/// the CPU `sched_getcpu()` names: still per-CPU, so rarely contended, and exact.
///
/// [`Counter::new`] is a `const fn`, so a counter can be a `static`; its slots are taken
/// from the pool on first use (and given back when a non-static counter drops):
///
/// ```
/// static HITS: cpulocal::Counter = cpulocal::Counter::new();
/// HITS.add(1);
/// HITS.add(2);
/// assert_eq!(HITS.sum(), 3);
/// ```
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
    /// CPU 0's slot, in the pool; CPU `c`'s is `c << STRIDE_SHIFT` bytes further. Null
    /// until the first use.
    slots: AtomicPtr<Slot>,
    /// `slots` and their number (the pool's ranges) in one word ([`PackedTable`]), for
    /// the fast paths' bound and first-use checks: one load. 0 (no slot) until `slots`
    /// is set, then stored with Release after it.
    table: AtomicUsize,
    /// The updates that went through the slow path since creation or the last `take`,
    /// for [`Counter::slow_path_sum`] only (`remote` also holds what `take` cancelled).
    /// One word for all CPUs: slow paths are rare.
    slow: AtomicU64,
    /// Serialises [`Counter::take`]; adds never touch it.
    takers: Mutex<()>,
}

impl Counter {
    /// The bytes a counter takes per CPU in the pool (the slot's size).
    pub const BYTES_PER_CPU: usize = SLOT.size();

    /// A counter at zero. Takes no memory until its first use, when it gets a slot per
    /// possible CPU from the pool (16 bytes each, populated only on the CPUs that add).
    pub const fn new() -> Self {
        Counter {
            slots: AtomicPtr::new(ptr::null_mut()),
            table: AtomicUsize::new(0),
            slow: AtomicU64::new(0),
            takers: Mutex::new(()),
        }
    }

    /// CPU 0's slot and the number of slots; `(null, 0)` before the first use.
    #[inline(always)]
    fn base(&self) -> (*mut Slot, usize) {
        // Acquire: pairs with the AcqRel exchange in `base_or_alloc`: the pool's zeroing
        // of the slots is visible.
        let base = self.slots.load(Ordering::Acquire);
        // Every item of the pool has `ranges()` slots (a value fixed before any item).
        (base, if base.is_null() { 0 } else { pool::ranges() })
    }

    /// CPU 0's slot, taking the slots from the pool on first use.
    #[cold]
    fn base_or_alloc(&self) -> NonNull<Slot> {
        // Acquire: pairs with the AcqRel exchange below, in the thread that won it.
        if let Some(base) = NonNull::new(self.slots.load(Ordering::Acquire)) {
            self.publish_table();
            return base;
        }
        // The first use of all threads that race here allocates once: no loser frees an
        // item, which could call the system allocator (from a signal handler, too).
        let base = Pool::for_index(Index::Cpu).alloc_once(&self.slots, SLOT);
        self.publish_table();
        base
    }

    /// Stores `table` once `slots` is set. Every thread that uses the slots stores it
    /// (the same value) before its first update, so its own fast paths find the slots
    /// even if the thread that set `slots` has not stored it yet.
    fn publish_table(&self) {
        // Relaxed: `slots` is set, by us or seen through the Acquire load that found it.
        let table = PackedTable::new(self.slots.load(Ordering::Relaxed).cast(), pool::ranges());
        // Release: pairs with the Acquire in `fast_table`: the slots' zeroing is visible
        // to whoever reads the table.
        self.table.store(table.to_bits(), Ordering::Release);
    }

    /// [`base`](Counter::base) for the fast paths, from one load: CPU 0's slot and the
    /// number of slots the sequences may use (all of them, but 0 before the thread's
    /// first use and if the table cannot be packed: see [`PackedTable`]).
    #[inline(always)]
    fn fast_table(&self) -> (*mut u8, usize) {
        // Acquire: pairs with the Release store in `publish_table`.
        PackedTable::from_bits(self.table.load(Ordering::Acquire)).get()
    }

    /// The slot of `cpu`, given CPU 0's.
    ///
    /// # Safety
    ///
    /// `base` is this counter's non-null CPU-0 slot and `cpu` is below [`pool::ranges`].
    #[inline(always)]
    unsafe fn slot_at(base: *mut Slot, cpu: usize) -> *mut Slot {
        base.wrapping_byte_add(cpu << STRIDE_SHIFT)
    }

    /// The address of `cpu`'s slot (allocating the slots if needed), for address checks.
    #[cfg(test)]
    pub(crate) fn slot_address(&self, cpu: usize) -> usize {
        self.base_or_alloc().as_ptr() as usize + (cpu << STRIDE_SHIFT)
    }

    /// Every CPU's slot, in CPU order (none before the first use).
    fn slots(&self) -> impl Iterator<Item = &Slot> + '_ {
        let (base, n) = self.base();
        (0..n).map(move |cpu| {
            // SAFETY: `base` is ours and non-null (else `n` is 0), `cpu < n`; the
            // slot lives as long as `self`, and is only accessed through atomics.
            unsafe { &*Self::slot_at(base, cpu) }
        })
    }

    /// Adds `n` (wrapping at 2^64).
    ///
    /// Lock-free; wait-free on the fast path. Safe to call from a signal handler on a
    /// thread that has already used cpulocal, even as the counter's first use (which
    /// takes its slots from the pool: the pool blocks signals while it holds its lock,
    /// and allocates without the system allocator, so a handler that interrupted the
    /// pool runs once the pool is done, and one that interrupted `malloc` is not
    /// blocked by it).
    ///
    /// A count of 1 takes [`inc`](Counter::inc)'s path, with the count in the
    /// instruction instead of a register: once inlined with a literal 1 the test
    /// disappears, and `add(1)` costs what `inc()` does (0.64 ns against 0.72 on the
    /// Zen 4 VM of the README). For other counts known at compile time,
    /// [`add_const`](Counter::add_const) does the same; a count known only at run time
    /// pays for the test (0.80 → 0.82 ns).
    #[inline]
    pub fn add(&self, n: u64) {
        if n == 1 {
            return self.inc();
        }
        // One attempt inline; the first registration, retries and the slow path stay out
        // of line (a tail call), so every call site carries only the sequence itself.
        // No check for a registered area: a thread without one gets an area every
        // sequence refuses (see `thread::area_or_refusing`), so its attempt fails.
        if self.try_add(thread::area_or_refusing(), n) {
            return;
        }
        self.add_retry(n);
    }

    /// Adds 1: [`add`](Counter::add)`(1)`, with the count in the instruction.
    ///
    /// ```
    /// let c = cpulocal::Counter::new();
    /// c.inc();
    /// c.inc();
    /// assert_eq!(c.sum(), 2);
    /// ```
    #[inline]
    pub fn inc(&self) {
        self.add_const::<1>();
    }

    /// Adds `N`, a count known at compile time: [`add`](Counter::add)`(N)`, with the
    /// count in the instruction (`add $N, (slot)` on x86_64) instead of a register. `N`
    /// is at most `i32::MAX`, the largest immediate an add takes; a larger `N` fails to
    /// compile.
    ///
    /// ```
    /// let c = cpulocal::Counter::new();
    /// c.add_const::<5>();
    /// c.add_const::<{ i32::MAX as u32 }>();
    /// assert_eq!(c.sum(), 5 + i32::MAX as u64);
    /// ```
    ///
    /// ```compile_fail
    /// let c = cpulocal::Counter::new();
    /// c.add_const::<{ i32::MAX as u32 + 1 }>();
    /// ```
    #[inline]
    pub fn add_const<const N: u32>(&self) {
        // As in `add`: no check for a registered area.
        if self.try_commit(
            thread::area_or_refusing(),
            u64::from(N),
            |rseq, base, len| {
                // SAFETY: the contract of `try_commit`'s closure, which `try_commit` upholds
                // (see there).
                unsafe { arch::add_const_on_current_cpu::<STRIDE_SHIFT, N>(rseq, base, len) }
            },
        ) {
            return;
        }
        self.add_retry(u64::from(N));
    }

    /// One restartable add to the current CPU's slot; false when it did not commit (or
    /// the counter has no slots yet).
    #[inline(always)]
    fn try_add(&self, rseq: NonNull<Rseq>, n: u64) -> bool {
        self.try_commit(rseq, n, |rseq, base, len| {
            // SAFETY: the contract of `try_commit`'s closure, which `try_commit` upholds.
            unsafe { arch::add_on_current_cpu::<STRIDE_SHIFT>(rseq, base, len, n as usize) }
        })
    }

    /// Runs `commit(rseq, base, len)`: one restartable add of `n` to `local` of the slot
    /// of the CPU the thread runs on, `base + (cpu << STRIDE_SHIFT)`, which the sequence
    /// reads itself (and refuses when it is not below `len`); true when it committed.
    ///
    /// `commit` is called with (1) `rseq`, this thread's area or a refusing one (see
    /// `thread::area_or_refusing`: its `cpu_id` is beyond every `len`, so the sequence
    /// leaves before its commit), and (2) `base` and `len`, this counter's CPU-0 slot
    /// and slot count: every slot below `len` is live, its `local` is at offset 0 and is
    /// written only by sequences on its CPU, so the kernel serialises all its writers;
    /// readers use atomic loads. Before the first use `len` is 0 and every CPU is
    /// refused.
    #[inline(always)]
    fn try_commit(
        &self,
        rseq: NonNull<Rseq>,
        n: u64,
        commit: impl FnOnce(*mut Rseq, *mut u8, usize) -> Outcome,
    ) -> bool {
        let (base, len) = self.fast_table();
        #[cfg(any(test, feature = "__test-hooks"))]
        if crate::test_hooks::counter_sequence_broken(self) {
            let cpu = cpu::cpu_id_start(rseq);
            if cpu as usize >= len {
                return false;
            }
            // SAFETY: `len > cpu`, so `base` is set, and `cpu < len`.
            let local = unsafe { (*Self::slot_at(base.cast(), cpu as usize)).local.as_ptr() };
            // SAFETY: as below; the mutation loses updates, it touches no other memory.
            let outcome =
                unsafe { arch::add_without_restart(rseq.as_ptr(), local, n as usize, cpu) };
            return outcome == Outcome::Committed(());
        }
        let _ = n;
        commit(rseq.as_ptr(), base, len) == Outcome::Committed(())
    }

    /// After an abort (or before the thread's first registration): retry a few times,
    /// then take the slow path.
    #[cold]
    #[inline(never)]
    fn add_retry(&self, n: u64) {
        self.base_or_alloc();
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
        let base = self.base_or_alloc().as_ptr();
        let cpu = cpu::current_cpu() % pool::ranges();
        // SAFETY: `base` is ours and non-null, `cpu < ranges`; atomics only.
        let slot = unsafe { &*Self::slot_at(base, cpu) };
        // Relaxed: a counter orders nothing; `sum` is exact once writers are joined.
        slot.remote.fetch_add(n, Ordering::Relaxed);
        // Relaxed: a diagnostic, exact once writers are joined.
        self.slow.fetch_add(n, Ordering::Relaxed);
    }

    /// The sum of the updates (wrapping at 2^64).
    ///
    /// Exact once the writers have stopped and are synchronised with (e.g. joined).
    /// While they run it is a sum of per-slot snapshots taken one after the other, not
    /// one instant's value.
    pub fn sum(&self) -> u64 {
        self.slots().fold(0u64, |acc, s| {
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
        // A diagnostic: an `add_slow` racing this may be counted before or after.
        self.slow.store(0, Ordering::Relaxed);
        self.slots().fold(0u64, |acc, s| {
            // Relaxed: the value read is the very value cancelled below, whenever the
            // read happens, so exactness needs no ordering.
            let local = s.local.load(Ordering::Relaxed) as u64;
            // A slot that holds nothing stays unwritten: a CPU that never added keeps its
            // page unpopulated (a swap of 0 for 0 would write it). Relaxed: a remote add
            // after this load is the next take's, as if it came after the swap.
            if local == 0 && s.remote.load(Ordering::Relaxed) == 0 {
                return acc;
            }
            // Release: pairs with the Acquire in `sum` (see there).
            let remote = s.remote.swap(local.wrapping_neg(), Ordering::Release);
            acc.wrapping_add(local).wrapping_add(remote)
        })
    }

    /// Sets the counter back to zero: [`take`](Counter::take) without the value, and as
    /// exact (and, like it, not for signal handlers).
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
        // Relaxed: a diagnostic, exact once writers are joined.
        self.slow.load(Ordering::Relaxed)
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
            .field("slots", &self.slots().count())
            .finish()
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        if let Some(base) = NonNull::new(*self.slots.get_mut()) {
            // SAFETY: `base` is the item this counter got from `alloc(SLOT)` of the CPU
            // pool, and `&mut self` means nobody uses it any more.
            unsafe {
                let item = Item::from_base(base.cast(), SLOT);
                Pool::for_index(Index::Cpu).free(item, SLOT);
            }
        }
    }
}
