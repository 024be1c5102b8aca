//! `PerCpu<T>`: one slot of any `T` per CPU (or per mm_cid), each behind a per-CPU lock
//! that the owning CPU takes with a restartable sequence and any other CPU can take
//! remotely.

use core::alloc::Layout;
use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::arch::Outcome;
use crate::pool::{self, Item, Pool};
use crate::remote::{self, CpuLock, InvalidCpu};
use crate::{arch, cpu, sys};

#[cfg(feature = "__bench")]
mod bench;
mod guard;
pub use guard::PerCpuGuard;

/// How a [`PerCpu`] picks the calling thread's slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Index {
    /// By CPU number. The owning CPU takes the slot's lock with a restartable
    /// compare-and-store (no `lock` prefix); [`PerCpu::on_cpu`] reaches any slot.
    #[default]
    Cpu,
    /// By memory-map concurrency id ([`current_mm_cid`](crate::current_mm_cid)): the
    /// threads running at one time use the lowest slots, so the slots touched (and
    /// whatever `T` allocates on first use) stay proportional to the process's
    /// concurrency, not to the machine. The slots live in the mm_cid pool
    /// ([`crate::pool`]), where the ranges of mm_cids never used stay unpopulated: with
    /// a lazy [`PerCpu::with_index_lazy`], a 4-thread process on a 256-CPU host
    /// populates at most 4 ranges.
    ///
    /// The owning thread takes the slot's lock with the same restartable
    /// compare-and-store as [`Index::Cpu`], which checks the thread's mm_cid instead of
    /// its CPU: a thread keeps its mm_cid while it runs, and every preemption, where the
    /// kernel may hand it another, restarts the section. Every other acquisition
    /// ([`PerCpu::on_cpu`], [`PerCpu::lock_cpu`], [`PerCpu::for_each`], and a thread's
    /// own slot after repeated aborts or while it waits) cannot name the CPU where that
    /// mm_cid's sequences run, so it fences *every* CPU running a thread of the process
    /// (`membarrier(PRIVATE_EXPEDITED_RSEQ)` without `FLAG_CPU`, as tcmalloc's
    /// virtual-CPU mode does): an IPI to each, several microseconds that grow with the
    /// CPUs, against one IPI for a per-CPU slot. Choose it for data reached mostly from
    /// its own thread.
    ///
    /// Where the kernel does not keep `mm_cid` in the thread's area (feature size below
    /// 28: before Linux 6.3), mm_cid slots are indexed by CPU, as
    /// [`current_mm_cid`](crate::current_mm_cid) is; the other acquisitions still fence
    /// every CPU.
    MmCid,
}

/// A bare per-CPU lock: a [`PerCpu`] with nothing in its slots. Guard your own per-CPU
/// data with it when it cannot live inside a `PerCpu`: a per-CPU lock is enough to
/// build any per-CPU logic.
///
/// ```
/// let lock = cpulocal::Lock::new(|_| ());
/// let held = lock.lock();          // this CPU's lock: one restartable compare-and-store
/// let cpu = held.cpu();
/// drop(held);                      // released with a store
/// drop(lock.lock_cpu(cpu).unwrap()); // any CPU's lock, from any thread
/// ```
pub type Lock = PerCpu<()>;

/// One CPU's slot, in the pool: the lock word right next to the data it guards.
#[repr(C)]
struct Slot<T> {
    /// The slot's lock; its [`flag`](CpuLock::flag) says whether `value` holds a `T`: set
    /// once, under the lock, for lazily created slots; at construction for the others.
    /// Zero (false) in a fresh pool item. Once set, the free lock word says it too
    /// ([`READY`](remote::READY)), which is all `with_cpu`'s fast path reads.
    lock: CpuLock,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// One `T` per possible CPU (or mm_cid), each behind its own lock, packed in the per-CPU
/// memory pool ([`crate::pool`]): a slot costs its lock word, a flag and its `T` per
/// CPU, with no padding, and the slots of two CPUs never share a cache line.
///
/// [`with_cpu`](PerCpu::with_cpu) runs a closure on the calling thread's slot under
/// that slot's lock; [`on_cpu`](PerCpu::on_cpu) on any chosen slot, from any thread,
/// without touching the caller's affinity. The lock
/// is taken with one restartable sequence when the thread is on the slot's CPU; see
/// [`crate::remote`] for how a remote owner excludes those sequences.
///
/// [`new`](PerCpu::new) creates every slot at once; [`new_lazy`](PerCpu::new_lazy) is a
/// `const fn` that creates each slot on its first use, so a `PerCpu` can be a `static`
/// and the CPUs that never use it cost no memory:
///
/// ```
/// static LATENCY: cpulocal::PerCpu<[u64; 4]> = cpulocal::PerCpu::new_lazy(|| [0; 4]);
/// LATENCY.with_cpu(|h| h[2] += 1);
/// let mut total = 0;
/// LATENCY.for_each(|_cpu, h| total += h.iter().sum::<u64>());
/// assert_eq!(total, 1);
/// ```
///
/// `PerCpu<T>` is `Send` and `Sync` when `T: Send`, like a `Mutex<T>`: a slot's `T` is
/// only reached through its lock, from one thread at a time.
///
/// # Waiting
///
/// A thread that needs a slot somebody holds spins briefly (not at all for its own
/// CPU's slot, whose holder then cannot be running beside it), yields a few times, and
/// then sleeps on a futex until the holder releases; a release makes a system call only
/// when somebody sleeps (see "Waiting" in the source's `remote/lock.rs`).
///
/// # Panics and poisoning
///
/// A panic inside [`with_cpu`](PerCpu::with_cpu), [`on_cpu`](PerCpu::on_cpu),
/// [`for_each`](PerCpu::for_each), or while a [`PerCpuGuard`] lives, releases the slot as
/// it unwinds. There is no poisoning, as in `parking_lot`: the slot keeps whatever the
/// panicking code left in it, and the next holder gets it as it is. Keep a slot's `T`
/// valid at every point where your code can panic, or catch the panic and repair it.
///
/// # Alignment
///
/// `T`'s alignment may be at most 4096 (a page), the pool's placement unit; a larger
/// one fails to compile:
///
/// ```compile_fail
/// #[repr(align(8192))]
/// struct Huge(u8);
/// let _ = cpulocal::PerCpu::new(|_| Huge(0));
/// ```
///
/// # Nesting
///
/// A thread may hold slots of up to 2047 `PerCpu`s at once, but never two of one
/// `PerCpu`: every locking method panics when asked to (see their "Panics") rather
/// than deadlock, and when asked for a 2048th slot, before it locks anything. The check is free while the thread holds no `PerCpu`
/// slot; nested inside another `PerCpu`'s slot, it reads this `PerCpu`'s lock words once.
///
/// ```
/// use std::sync::Arc;
/// // Per-CPU histograms: each thread records into its CPU's slot.
/// let hist = Arc::new(cpulocal::PerCpu::new(|_cpu| [0u64; 4]));
/// let threads: Vec<_> = (0..4)
///     .map(|t| {
///         let hist = Arc::clone(&hist);
///         std::thread::spawn(move || {
///             for i in 0..100 {
///                 hist.with_cpu(|h| h[(t + i) % 4] += 1);
///             }
///         })
///     })
///     .collect();
/// threads.into_iter().for_each(|t| t.join().unwrap());
/// let mut total = 0;
/// hist.for_each(|_cpu, h| total += h.iter().sum::<u64>());
/// assert_eq!(total, 400);
/// // A chosen CPU's slot, from here:
/// hist.on_cpu(0, |h| *h = [0; 4]).unwrap();
/// assert!(hist.on_cpu(usize::MAX, |_| ()).is_err());
/// ```
pub struct PerCpu<T> {
    /// CPU 0's slot in the pool; CPU `c`'s is `c << SHIFT` bytes further. Null until
    /// the first use of a lazy `PerCpu`.
    slots: AtomicPtr<Slot<T>>,
    /// The number of slots: 0 until `slots` is set, then stored with Release after it.
    len: AtomicU32,
    /// `len` when the slots are indexed by CPU, else 0 (stored with it): the fast path's
    /// bound, first-use and index-mode checks in one load and one compare.
    cpu_len: AtomicU32,
    index: Index,
    /// Creates a lazy slot's `T` on its first use; `None` when every slot was created
    /// with the `PerCpu`.
    init: Option<fn() -> T>,
    _owns: PhantomData<T>,
}

// SAFETY: a slot's `T` is only reached by the holder of its lock, one thread at a time,
// so sending or sharing the PerCpu moves `T`s between threads but never shares them:
// `T: Send` is enough, as for `Mutex<T>`.
unsafe impl<T: Send> Sync for PerCpu<T> {}
// SAFETY: as above; the struct owns its `T`s.
unsafe impl<T: Send> Send for PerCpu<T> {}

impl<T> PerCpu<T> {
    /// The layout of one CPU's slot in the pool.
    const SLOT: Layout = {
        assert!(
            core::mem::align_of::<Slot<T>>() <= 4096,
            "PerCpu<T>: T's alignment may be at most 4096 (a page)"
        );
        Layout::new::<Slot<T>>()
    };
    /// log2 of the distance between two CPUs' slots.
    const SHIFT: u32 = pool::shift_for(Self::SLOT);

    /// The bytes a `PerCpu<T>` takes per CPU in the pool: the lock word, the flag and the
    /// `T` (no padding to a cache line).
    ///
    /// ```
    /// assert_eq!(cpulocal::PerCpu::<u64>::BYTES_PER_CPU, 24);
    /// ```
    pub const BYTES_PER_CPU: usize = Self::SLOT.size();

    /// One slot per possible CPU, slot `i` initialised with `init(i)`.
    pub fn new(init: impl FnMut(usize) -> T) -> Self {
        Self::with_index(Index::Cpu, init)
    }

    /// One slot per possible CPU, picked by `index`, slot `i` initialised with `init(i)`
    /// now (which writes every CPU's slot; see [`with_index_lazy`](PerCpu::with_index_lazy)
    /// for slots created on first use).
    ///
    /// ```
    /// use cpulocal::{Index, PerCpu};
    /// let caches = PerCpu::with_index(Index::MmCid, |_| Vec::<u32>::new());
    /// caches.with_cpu(|c| c.push(7));
    /// let mut n = 0;
    /// caches.for_each(|_, c| n += c.len());
    /// assert_eq!(n, 1);
    /// ```
    pub fn with_index(index: Index, mut init: impl FnMut(usize) -> T) -> Self {
        let item = Pool::for_index(index).alloc(Self::SLOT);
        // Built first, so that a panicking `init` drops the slots made so far.
        let per_cpu = PerCpu {
            slots: AtomicPtr::new(item.base().as_ptr().cast()),
            len: AtomicU32::new(pool::ranges() as u32),
            cpu_len: AtomicU32::new(cpu_len(index, pool::ranges())),
            index,
            init: None,
            _owns: PhantomData,
        };
        for cpu in 0..sys::possible_cpus() {
            // SAFETY: the item is ours alone (not shared yet) and `cpu` is below the ranges.
            let slot = unsafe { &*per_cpu.slot_at(item.base().as_ptr().cast(), cpu) };
            // SAFETY: as above: nobody else reaches the slot.
            unsafe { (*slot.value.get()).write(init(cpu)) };
            slot.lock.set_flag_unshared();
        }
        per_cpu
    }

    /// One slot per possible CPU, each created with `init()` on its first use (the
    /// calling thread's slot in [`lock`](PerCpu::lock), a chosen one in
    /// [`lock_cpu`](PerCpu::lock_cpu)). A `const fn`: usable for `static`s. Takes no
    /// memory before its first use; then the slots of CPUs that never use it stay
    /// unpopulated pages.
    ///
    /// ```
    /// static SEEN: cpulocal::PerCpu<Vec<u32>> = cpulocal::PerCpu::new_lazy(Vec::new);
    /// SEEN.with_cpu(|v| v.push(1));
    /// let mut all = Vec::new();
    /// SEEN.for_each(|_, v| all.extend_from_slice(v));
    /// assert_eq!(all, [1]);
    /// ```
    pub const fn new_lazy(init: fn() -> T) -> Self {
        Self::with_index_lazy(Index::Cpu, init)
    }

    /// [`new_lazy`](PerCpu::new_lazy) with slots picked by `index`. With
    /// [`Index::MmCid`] only the ranges of the mm_cids the process really uses get
    /// populated: at most as many as its threads ever running at once.
    ///
    /// ```
    /// use cpulocal::{Index, PerCpu};
    /// static SCRATCH: PerCpu<Vec<u8>> = PerCpu::with_index_lazy(Index::MmCid, Vec::new);
    /// SCRATCH.with_cpu(|buf| buf.extend_from_slice(b"abc"));
    /// let mut n = 0;
    /// SCRATCH.for_each(|_, buf| n += buf.len());
    /// assert_eq!(n, 3);
    /// ```
    pub const fn with_index_lazy(index: Index, init: fn() -> T) -> Self {
        PerCpu {
            slots: AtomicPtr::new(ptr::null_mut()),
            len: AtomicU32::new(0),
            cpu_len: AtomicU32::new(0),
            index,
            init: Some(init),
            _owns: PhantomData,
        }
    }

    /// CPU 0's slot, or null before the first use of a lazy `PerCpu`.
    #[inline(always)]
    fn base(&self) -> *mut Slot<T> {
        // Acquire: pairs with the Release of `len` (see `base_and_len`); a null read
        // means no slot exists yet.
        if self.len.load(Ordering::Acquire) == 0 {
            return ptr::null_mut();
        }
        // Relaxed: ordered by the load of `len` above.
        self.slots.load(Ordering::Relaxed)
    }

    /// CPU 0's slot and the number of slots, taking the slots from the pool on first use.
    #[inline(always)]
    fn base_and_len(&self) -> (*mut Slot<T>, usize) {
        // Acquire: pairs with the Release store of `len` in `alloc_slots`: a non-zero
        // `len` means `slots` is set and the pool's zeroing is visible.
        let len = self.len.load(Ordering::Acquire) as usize;
        if len == 0 {
            return self.alloc_slots();
        }
        // Relaxed: ordered by the load of `len` above.
        (self.slots.load(Ordering::Relaxed), len)
    }

    #[cold]
    #[inline(never)]
    fn alloc_slots(&self) -> (*mut Slot<T>, usize) {
        let base = Pool::for_index(self.index)
            .alloc_once(&self.slots, Self::SLOT)
            .as_ptr();
        let len = pool::ranges();
        // Release: pairs with the Acquire in `base_and_len`. Every thread that uses the
        // slots stores it (the same value) before its first use.
        self.len.store(len as u32, Ordering::Release);
        // Release: as `len`, for the fast path's Acquire in `lock_local`.
        self.cpu_len
            .store(cpu_len(self.index, len), Ordering::Release);
        (base, len)
    }

    /// The address of slot `cpu` (taking the slots from the pool if needed), for tests.
    #[cfg(test)]
    pub(crate) fn slot_address(&self, cpu: usize) -> usize {
        let (base, _) = self.base_and_len();
        self.slot_at(base, cpu) as usize
    }

    /// The slot of `cpu` given CPU 0's (pure arithmetic).
    #[inline(always)]
    fn slot_at(&self, base: *mut Slot<T>, cpu: usize) -> *mut Slot<T> {
        base.wrapping_byte_add(cpu << Self::SHIFT)
    }

    /// Slot `cpu`.
    ///
    /// # Safety
    ///
    /// `base` is this `PerCpu`'s non-null CPU-0 slot and `cpu` is below
    /// [`slots`](PerCpu::slots).
    #[inline(always)]
    unsafe fn slot(&self, base: *mut Slot<T>, cpu: usize) -> &Slot<T> {
        // SAFETY: the caller's contract: a live slot of ours, which lives as long as
        // `self`; its fields are atomics and an `UnsafeCell`.
        unsafe { &*self.slot_at(base, cpu) }
    }

    /// Makes a locked slot ready: creates its `T` if it has none yet.
    #[inline(always)]
    fn ensure_ready(&self, slot: &Slot<T>) {
        // Relaxed: written under the lock we hold.
        if !slot.lock.flag().load(Ordering::Relaxed) {
            self.fill(slot);
        }
    }

    /// Creates the `T` of a slot whose guard the caller holds: if `init` panics, that
    /// guard releases the lock as the panic unwinds, and the slot stays without a `T`.
    #[cold]
    #[inline(never)]
    fn fill(&self, slot: &Slot<T>) {
        let init = self
            .init
            .expect("a PerCpu made by `with_index` has every slot ready");
        let value = init();
        // SAFETY: we hold the slot's lock and it has no `T` yet.
        unsafe { (*slot.value.get()).write(value) };
        // Release: for `for_each`, which reads the flag without the lock before locking.
        slot.lock.flag().store(true, Ordering::Release);
    }

    /// The number of slots (the possible CPUs): every CPU number below it is valid, and
    /// [`current_cpu`](crate::current_cpu) is always below it. The same name as
    /// [`Stack::slots`](crate::Stack::slots) and
    /// [`RingBuffer::slots`](crate::ring::RingBuffer::slots).
    #[inline]
    pub fn slots(&self) -> usize {
        sys::possible_cpus()
    }

    /// How the calling thread's slot is picked.
    pub fn index(&self) -> Index {
        self.index
    }

    /// Locks the calling thread's slot and returns a guard that derefs to its `T`.
    ///
    /// The thread may migrate while it holds the guard: the slot stays locked, so
    /// nothing is lost, and the next thread on that CPU waits until the guard drops
    /// (see [waiting](PerCpu#waiting)). Keep critical sections short. The guard is not
    /// `Send`. A panic while the guard lives releases the slot when the guard drops.
    ///
    /// # Panics
    ///
    /// If the calling thread already holds a slot of this `PerCpu` (any slot: it may
    /// have migrated since it took it), because nesting would never finish: on the same
    /// slot the thread would wait for itself, and two threads nesting on two CPUs would
    /// wait for each other. Nest different `PerCpu`s instead.
    ///
    /// ```
    /// let counts = cpulocal::PerCpu::new(|_| 0u64);
    /// let mut slot = counts.lock();
    /// *slot += 1;
    /// assert!(slot.cpu() < counts.slots());
    /// ```
    #[inline]
    pub fn lock(&self) -> PerCpuGuard<'_, T> {
        self.lock_current("lock")
    }

    /// [`lock`](PerCpu::lock), for the public method `method` (named in the re-entry
    /// panic).
    #[inline(always)]
    fn lock_current(&self, method: &'static str) -> PerCpuGuard<'_, T> {
        if let Some(area) = remote::percpu_fast_area() {
            // Counted before the sequence, so that a signal handler arriving anywhere
            // after its commit finds the thread holding a slot (see "Held locks" in
            // `remote`); a handler that arrives before the commit aborts the sequence,
            // and restores the count itself before it returns.
            remote::note_held_fast();
            if let Outcome::Committed((slot, index)) = self.lock_local(area) {
                #[cfg(any(test, feature = "__test-hooks"))]
                crate::test_hooks::fast_lock_taken();
                // No `ensure_ready`: the sequence took a `READY` word, whose slot has its
                // `T` (see `lock_local`).
                return PerCpuGuard {
                    slot,
                    index,
                    fast_area: area.as_ptr() as usize,
                    _not_send: PhantomData,
                };
            }
            remote::note_fast_lock_failed(area);
        }
        // Returned in registers, with the guard made here: a guard returned by the call
        // would go through memory, and so would the fast path's to meet it.
        let (slot, index) = self.lock_current_slow(method);
        self.guard(slot, index)
    }

    /// The fast path of [`lock`](PerCpu::lock) and [`with_cpu`](PerCpu::with_cpu): one
    /// restartable compare-and-store on the slot of the CPU the thread runs on (or of its
    /// mm_cid), with the `area` of [`remote::percpu_fast_area`] (so the thread holds no
    /// slot of any `PerCpu` and the scheme is
    /// [`Scheme::Membarrier`](remote::Scheme::Membarrier)). `Aborted` also when this
    /// `PerCpu` has no fast path now (a lazy `PerCpu` before its first use);
    /// `CompareFailed` when the slot is held, or has no `T` yet: the sequence expects the
    /// word [`READY`](remote::READY), which only a slot with its `T` is released to, so a
    /// committed slot needs no readiness check.
    #[inline(always)]
    fn lock_local(&self, area: NonNull<crate::abi::Rseq>) -> Outcome<(&Slot<T>, usize)> {
        let cpu = cpu::cpu_id_start(area);
        // Acquire: as `len` in `base_and_len`. One field for three checks: the slots are
        // indexed by CPU, they exist (a lazy `PerCpu` after its first use), and this CPU
        // has one.
        let cpu_len = self.cpu_len.load(Ordering::Acquire) as usize;
        if (cpu as usize) < cpu_len {
            return self.lock_local_at::<{ arch::CPU_ID_FIELD }>(area, cpu, cpu_len);
        }
        if self.index == Index::Cpu {
            return Outcome::Aborted; // before a lazy `PerCpu`'s first use
        }
        // Laid out after the CPU-indexed path, which then runs straight through. As a
        // `match`, the compiler put this first and the usual case jumped over it:
        // `with_cpu` took 1.36 / 1.87 ns at 1 / 2 threads against 1.33 / 1.50 now; mm_cid
        // slots pay for the empty call instead (1.55 ns then, 2.09 now).
        mm_cid_path();
        // Acquire: as in `base_and_len`; 0 until a lazy PerCpu's first use.
        let len = self.len.load(Ordering::Acquire) as usize;
        match cpu::mm_cid_in_area(area) {
            Some(cid) => self.lock_local_at::<{ arch::MM_CID_FIELD }>(area, cid, len),
            // No mm_cid in this process's areas: mm_cid slots are indexed by CPU, as
            // `current_mm_cid` does for every thread.
            None => self.lock_local_at::<{ arch::CPU_ID_FIELD }>(area, cpu, len),
        }
    }

    /// [`lock_local`](PerCpu::lock_local) on slot `index`, which the field of the area at
    /// `INDEX_FIELD` (`cpu_id` or `mm_cid`) must still hold when the sequence commits.
    /// `len` is the slot count the caller loaded with Acquire (`len` or `cpu_len`): 0
    /// until a lazy PerCpu's first use.
    #[inline(always)]
    fn lock_local_at<const INDEX_FIELD: usize>(
        &self,
        area: NonNull<crate::abi::Rseq>,
        index: u32,
        len: usize,
    ) -> Outcome<(&Slot<T>, usize)> {
        if index as usize >= len {
            return Outcome::Aborted;
        }
        // Relaxed: ordered by the caller's Acquire load of `len`.
        let base = self.slots.load(Ordering::Relaxed);
        // SAFETY: `index < len`.
        let slot = unsafe { self.slot(base, index as usize) };
        match slot
            .lock
            .try_lock_local::<INDEX_FIELD>(area.as_ptr(), index, remote::READY)
        {
            Outcome::Committed(()) => Outcome::Committed((slot, index as usize)),
            Outcome::CompareFailed => Outcome::CompareFailed,
            Outcome::Aborted => Outcome::Aborted,
        }
    }

    /// Every other way to lock the calling thread's slot: the re-entry check while the
    /// thread holds a slot of some `PerCpu`, first use, the locked scheme,
    /// a held slot (waiting), repeated aborts.
    #[cold]
    #[inline(never)]
    fn lock_current_slow(&self, method: &'static str) -> (&Slot<T>, usize) {
        let counted = remote::Counted::before_taking(|| self.locks(), method);
        let (base, slots) = self.base_and_len();
        let index = match self.index {
            Index::Cpu => CpuLock::lock_current(slots, |i| {
                // SAFETY: `lock_current` passes indexes below `slots`.
                unsafe { &self.slot(base, i).lock }
            }),
            Index::MmCid => {
                let mut i = cpu::current_mm_cid();
                if i >= slots {
                    i %= slots; // cannot happen: the kernel keeps mm_cids below the CPUs
                }
                // SAFETY: `i < slots`.
                unsafe { self.slot(base, i) }.lock.lock_mm_cid_slot();
                i
            }
        };
        counted.taken();
        // SAFETY: `index < slots`.
        (unsafe { self.slot(base, index) }, index)
    }

    /// The guard of `slot` (slot `index`), whose lock the calling thread has just taken,
    /// by any path but the fast one, and counted; creates the slot's `T` first if it has
    /// none (under the guard, which releases the lock should `init` panic).
    #[inline(always)]
    fn guard<'a>(&'a self, slot: &'a Slot<T>, index: usize) -> PerCpuGuard<'a, T> {
        let guard = PerCpuGuard {
            slot,
            index,
            fast_area: 0,
            _not_send: PhantomData,
        };
        self.ensure_ready(slot);
        guard
    }

    /// Every slot's lock (none before a lazy `PerCpu`'s first use), for the re-entry
    /// check.
    #[inline]
    fn locks(&self) -> impl Iterator<Item = &CpuLock> + '_ {
        let base = self.base();
        let n = if base.is_null() { 0 } else { self.slots() };
        // SAFETY: `base` is non-null when `n > 0`, and `i < n = len`.
        (0..n).map(move |i| unsafe { &self.slot(base, i).lock })
    }

    /// Runs `f` on the calling thread's slot, under its lock. If `f` panics, the lock is
    /// released as the panic unwinds, and the slot keeps what `f` had written (no
    /// poisoning).
    ///
    /// # Panics
    ///
    /// If the calling thread already holds a slot of this `PerCpu` (any slot: it may
    /// have migrated since it took it), because nesting would never finish: on the same
    /// slot the thread would wait for itself, and two threads nesting on two CPUs would
    /// wait for each other. Nest different `PerCpu`s instead.
    ///
    /// ```
    /// let sums = cpulocal::PerCpu::new(|_| 0u64);
    /// sums.with_cpu(|s| *s += 5);
    /// let mut total = 0;
    /// sums.for_each(|_, s| total += *s);
    /// assert_eq!(total, 5);
    /// ```
    // Always: given a function item, not a closure, the compiler stopped inlining it into
    // a loop (a call per operation: 2.75 ns against 1.63 on an Intel Xeon, 2026-12-05).
    #[inline(always)]
    pub fn with_cpu<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut guard = self.lock_current("with_cpu");
        f(&mut guard)
    }

    /// Locks slot `cpu` from any thread, without changing the caller's affinity, and
    /// returns a guard. Every fast path on that CPU waits (or restarts) until it drops.
    /// A panic while the guard lives releases the slot when the guard drops.
    ///
    /// # Panics
    ///
    /// If the calling thread already holds a slot of this `PerCpu` (any slot: it may
    /// have migrated since it took it), because nesting would never finish: on the same
    /// slot the thread would wait for itself, and two threads nesting on two CPUs would
    /// wait for each other. Nest different `PerCpu`s instead.
    ///
    /// Also if the kernel refuses this thread the membarrier fence that excludes the
    /// CPU's sequences (a seccomp filter on this thread only); the slot stays free.
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`slots`](PerCpu::slots).
    pub fn lock_cpu(&self, cpu: usize) -> Result<PerCpuGuard<'_, T>, InvalidCpu> {
        self.lock_chosen(cpu, "lock_cpu")
    }

    /// [`lock_cpu`](PerCpu::lock_cpu), for the public method `method`.
    fn lock_chosen(
        &self,
        cpu: usize,
        method: &'static str,
    ) -> Result<PerCpuGuard<'_, T>, InvalidCpu> {
        let slots = self.slots();
        if cpu >= slots {
            return Err(InvalidCpu { cpu, slots });
        }
        let counted = remote::Counted::before_taking(|| self.locks(), method);
        let (base, _) = self.base_and_len();
        // SAFETY: `cpu < slots`.
        let slot = unsafe { self.slot(base, cpu) };
        // The free word replaced (0 or READY) says nothing the flag does not.
        let _ = match self.index {
            Index::Cpu => slot.lock.lock_remote(cpu as u32),
            Index::MmCid => slot.lock.lock_mm_cid_slot(),
        };
        counted.taken();
        Ok(self.guard(slot, cpu))
    }

    /// Runs `f` on slot `cpu`, from any thread, atomically with respect to every other
    /// access to that slot, without changing the caller's affinity. If `f` panics, the
    /// lock is released as the panic unwinds (no poisoning).
    ///
    /// # Panics
    ///
    /// If the calling thread already holds a slot of this `PerCpu` (any slot: it may
    /// have migrated since it took it), because nesting would never finish: on the same
    /// slot the thread would wait for itself, and two threads nesting on two CPUs would
    /// wait for each other. Nest different `PerCpu`s instead.
    ///
    /// Also as [`lock_cpu`](PerCpu::lock_cpu) when the membarrier fence is refused.
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`slots`](PerCpu::slots); `f` is not run.
    ///
    /// ```
    /// let q = cpulocal::PerCpu::new(|_| Vec::<u32>::new());
    /// q.with_cpu(|v| v.push(1));
    /// // Drain every CPU's slot from this thread (e.g. after a cpuset shrink):
    /// let mut drained = Vec::new();
    /// for cpu in 0..q.slots() {
    ///     q.on_cpu(cpu, |v| drained.append(v)).unwrap();
    /// }
    /// assert_eq!(drained, [1]);
    /// let err = q.on_cpu(q.slots(), |_| ()).unwrap_err();
    /// assert_eq!(err.cpu, q.slots());
    /// ```
    pub fn on_cpu<R>(&self, cpu: usize, f: impl FnOnce(&mut T) -> R) -> Result<R, InvalidCpu> {
        let mut guard = self.lock_chosen(cpu, "on_cpu")?;
        Ok(f(&mut guard))
    }

    /// Runs `f` on every slot in turn, each under its lock: an aggregate read (or
    /// update) that is exact per slot while other threads keep working. The slots of a
    /// lazy `PerCpu` that were never used are skipped (they would hold `init()`), so
    /// visiting creates nothing and populates no page.
    /// If `f` panics, the slot it was given is released as the panic unwinds (no
    /// poisoning) and the remaining slots are not visited.
    ///
    /// # Panics
    ///
    /// If the calling thread already holds a slot of this `PerCpu` (any slot: it may
    /// have migrated since it took it), because nesting would never finish: on the same
    /// slot the thread would wait for itself, and two threads nesting on two CPUs would
    /// wait for each other. Nest different `PerCpu`s instead.
    ///
    /// Also as [`lock_cpu`](PerCpu::lock_cpu) when the membarrier fence is refused.
    pub fn for_each(&self, mut f: impl FnMut(usize, &mut T)) {
        let base = self.base();
        if base.is_null() {
            return;
        }
        for cpu in 0..self.slots() {
            // SAFETY: `cpu < len`.
            let slot = unsafe { self.slot(base, cpu) };
            // Acquire: pairs with the Release in `fill` (a hint; the lock orders the data).
            if !slot.lock.flag().load(Ordering::Acquire) {
                continue;
            }
            let mut guard = self.lock_chosen(cpu, "for_each").expect("cpu < len");
            f(cpu, &mut guard);
        }
    }

    /// Every slot's `T` (of a lazy `PerCpu`: every slot used so far), without locking:
    /// `&mut self` proves nobody else holds one.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        let base = *self.slots.get_mut();
        let n = if base.is_null() { 0 } else { self.slots() };
        (0..n).filter_map(move |cpu| {
            // SAFETY: `base` is ours and non-null, `cpu < len`; `&mut self` is held for
            // the iterator's life and every `cpu` is visited once, so the `&mut T`s
            // are disjoint.
            let slot = unsafe { &*base.wrapping_byte_add(cpu << Self::SHIFT) };
            if slot.lock.flag().load(Ordering::Relaxed) {
                // SAFETY: as above, and the slot holds a `T`.
                Some(unsafe { (*slot.value.get()).assume_init_mut() })
            } else {
                None
            }
        })
    }

    /// The slots' values, in CPU order (`init()` for the never-used slots of a lazy
    /// `PerCpu`).
    pub fn into_vec(mut self) -> Vec<T> {
        let base = *self.slots.get_mut();
        (0..self.slots())
            .map(|cpu| {
                if base.is_null() {
                    return (self.init.expect("only lazy PerCpus have no slots"))();
                }
                // SAFETY: `base` is ours and non-null, `cpu < len`, `self` is owned.
                let slot = unsafe { self.slot(base, cpu) };
                if slot.lock.flag().swap(false, Ordering::Relaxed) {
                    // SAFETY: the slot holds a `T`, which we move out; its flag is now
                    // false, so `Drop` will not drop it again.
                    unsafe { (*slot.value.get()).assume_init_read() }
                } else {
                    (self
                        .init
                        .expect("a PerCpu made by `with_index` has every slot ready"))(
                    )
                }
            })
            .collect()
    }
}

impl<T> Drop for PerCpu<T> {
    fn drop(&mut self) {
        let Some(base) = NonNull::new(*self.slots.get_mut()) else {
            return;
        };
        for cpu in 0..self.slots() {
            // SAFETY: `base` is ours and non-null, `cpu < len`, `&mut self`.
            let slot = unsafe { self.slot(base.as_ptr(), cpu) };
            if slot.lock.flag().load(Ordering::Relaxed) {
                // SAFETY: the slot holds a `T`, nobody else can reach it (`&mut self`).
                unsafe { (*slot.value.get()).assume_init_drop() };
            }
        }
        // SAFETY: `base` is the item we got from `alloc(SLOT)` of this index's pool,
        // and every `T` in it has been dropped.
        unsafe {
            let item = Item::from_base(base.cast(), Self::SLOT);
            Pool::for_index(self.index).free(item, Self::SLOT);
        }
    }
}

/// ```
/// let hist: cpulocal::PerCpu<[u64; 4]> = Default::default();
/// hist.with_cpu(|h| h[1] += 1);
/// let mut total = 0;
/// hist.for_each(|_, h| total += h[1]);
/// assert_eq!(total, 1);
/// ```
impl<T: Default> Default for PerCpu<T> {
    /// `PerCpu::new(|_| T::default())`.
    fn default() -> Self {
        PerCpu::new(|_| T::default())
    }
}

impl<T: fmt::Debug> fmt::Debug for PerCpu<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerCpu")
            .field("slots", &self.slots())
            .field("lazy", &self.init.is_some())
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// [`PerCpu`]'s `cpu_len` for `len` slots indexed by `index`: `len` when they are indexed
/// by CPU, else 0 (the fast path's CPU-indexed branch never runs).
fn cpu_len(index: Index, len: usize) -> u32 {
    match index {
        Index::Cpu => len as u32,
        Index::MmCid => 0,
    }
}

/// Marks the path that calls it as the unlikely one, so the compiler lays it out of the
/// way (a stable stand-in for a branch hint); it does nothing.
#[cold]
#[inline(never)]
fn mm_cid_path() {}
