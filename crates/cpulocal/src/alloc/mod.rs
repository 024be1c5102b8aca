//! A per-CPU allocator front-end: [`CpuCache`], a [`GlobalAlloc`] that keeps freed
//! blocks in per-CPU caches in front of another allocator (the system's by default).
//!
//! ```
//! use std::alloc::{GlobalAlloc, Layout};
//!
//! // As the program's allocator: `#[global_allocator] static A: CpuCache = CpuCache::new();`
//! // Here, a second instance, used directly.
//! let cache = cpulocal::alloc::CpuCache::new();
//! let layout = Layout::from_size_align(48, 8).unwrap();
//! // SAFETY: the layout has a non-zero size; the block is freed with the same layout.
//! unsafe {
//!     let p = cache.alloc(layout);
//!     assert!(!p.is_null());
//!     p.write_bytes(0xAB, 48);
//!     cache.dealloc(p, layout);
//!     // On the same CPU the next block of that size class is the one just freed.
//!     let q = cache.alloc(layout);
//!     assert!(!q.is_null());
//!     cache.dealloc(q, layout);
//! }
//! ```
//!
//! # Layout (tcmalloc's per-CPU slab)
//!
//! Requests of at most [`MAX_SMALL`] bytes with an alignment of at most [`CLASS_ALIGN`]
//! are rounded up to one of 32 *size classes*; everything else (large sizes, higher
//! alignments) goes straight to the backend `A`. A block of a class is always a block
//! the backend allocated with the class's layout (class size, [`CLASS_ALIGN`]), so any
//! block can be given back to `A` at any time, from any path.
//!
//! Each instance maps one region (lazily populated, like [`crate::pool`]'s chunks): a
//! header page with the transfer caches, then one *slab* per possible CPU, `2^shift`
//! bytes apart. A slab holds, per class, a 32-byte header `{current, end, begin,
//! guard}` and an array of block pointers `begin..end`; `current` points at the first
//! free entry. A CPU's slab is written only by restartable sequences running on that
//! CPU, or by a thread holding its lock (below):
//!
//! - `alloc`: [`slab_pop`](crate::ops::slab_pop), one sequence committed by the store
//!   of `current - 8`;
//! - `dealloc`: [`slab_push`](crate::ops::slab_push), a tentative store of the pointer
//!   into the free entry and one committing store of `current + 8`.
//!
//! When a CPU's array of a class is empty, the allocating thread takes a *batch* (up to
//! 32 blocks, fewer for large classes) from the class's transfer cache, or from `A`,
//! and stores it in one sequence (a guarded `memcpy` + commit). When it is full, the
//! freeing thread moves a batch out the same way and hands it to the transfer cache;
//! when that is full too, the batch goes back to `A`. So a producer/consumer pair on two
//! CPUs moves blocks a batch at a time, with one short lock per batch and no fence.
//!
//! # Memory bounds
//!
//! Per CPU and class at most `cap` blocks (`32 KiB / class size`, between 16 and 256);
//! per class at most 8 batches in the transfer cache. [`CpuCache::drain_cpu`] (and
//! [`CpuCache::drain_all`]) give a CPU's cached blocks back to `A` with the remote
//! protocol of [`crate::remote`]: lock the slab (set every header's guard), fence the
//! CPU with `membarrier(PRIVATE_EXPEDITED_RSEQ)`, move the blocks out, unlock; a
//! program calls it for CPUs it knows to be idle (from a housekeeping thread, say).
//!
//! # As a global allocator
//!
//! - Nothing here allocates through the global allocator: the region is one `mmap`,
//!   the thread's registration reads the environment with `getenv` and the possible
//!   CPUs with `read(2)` into a stack buffer, the state of a thread is a
//!   const-initialised thread-local without destructor, and the mechanism and scheme
//!   are decided once in `OnceLock`s whose initialisers do not allocate.
//! - A thread that has not used cpulocal yet is registered by its first slow path; a
//!   thread that cannot use rseq (the fallback, e.g. valgrind; or after its own
//!   registration was undone at thread exit; or single-stepped by a debugger, whose
//!   every step aborts the sequence) is served by the transfer caches and `A`, which
//!   need no sequence.
//! - Locks (the transfer caches', a slab's) are only ever *tried*: a thread that does
//!   not get one within a few hundred spins uses `A` instead. A `fork` child that
//!   inherits a lock held by a thread of the parent therefore never waits for it.
//! - Signal handlers: the fast paths are restartable sequences and safe in a handler;
//!   the slow paths call `A`, so `alloc`/`dealloc` are async-signal-safe only where
//!   `A` is (glibc's `malloc` is not).
//!
//! The slabs do not come from [`crate::pool`]'s shared chunks: the pool keeps its
//! bookkeeping on the heap, which a global allocator cannot call into. They use the
//! pool's layout (one range per CPU, `base + (cpu << shift)`, lazy pages).

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::alloc::System;

use crate::arch::{self, Outcome};
use crate::remote::{self, Attempt};
use crate::sys;

/// The largest request served from the size classes; larger ones go to the backend.
pub const MAX_SMALL: usize = 8192;

/// The largest alignment the size classes serve (every class block has it); requests
/// that need more go to the backend.
pub const CLASS_ALIGN: usize = 16;

/// Size classes of [`CpuCache`]: 16-byte steps to 128, then four per power of two.
const CLASS_SIZES: [usize; 32] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192,
];

/// The most classes one region supports.
pub(crate) const MAX_CLASSES: usize = 32;

/// The largest batch moved between a slab and a transfer cache.
pub(crate) const MAX_BATCH: usize = 32;

/// Batches a transfer cache holds per class.
const TRANSFER_BATCHES: usize = 8;

/// Entries of a transfer cache (the largest batch times the batches).
const TRANSFER_SLOTS: usize = MAX_BATCH * TRANSFER_BATCHES;

/// How many times a lock is tried before the caller takes another path.
const LOCK_TRIES: u32 = 256;

/// Class of a request of `size <= MAX_SMALL` bytes, indexed by `(size + 15) / 16`.
static SIZE_TO_CLASS: [u8; MAX_SMALL / 16 + 1] = size_to_class();

const fn size_to_class() -> [u8; MAX_SMALL / 16 + 1] {
    let mut table = [0u8; MAX_SMALL / 16 + 1];
    let mut i = 0;
    while i < table.len() {
        let size = if i == 0 { 1 } else { i * 16 };
        let mut c = 0;
        while CLASS_SIZES[c] < size {
            c += 1;
        }
        table[i] = c as u8;
        i += 1;
    }
    table
}

/// The class of a small request (`size <= MAX_SMALL`).
#[inline(always)]
fn class_of(size: usize) -> usize {
    SIZE_TO_CLASS[(size + 15) >> 4] as usize
}

/// Whether a request is served by the size classes.
#[inline(always)]
fn is_small(layout: Layout) -> bool {
    layout.size() <= MAX_SMALL && layout.align() <= CLASS_ALIGN
}

/// The layout of every block of `class`, as allocated from the backend.
#[inline]
fn class_layout(class: usize) -> Layout {
    // SAFETY: class sizes are non-zero multiples of CLASS_ALIGN, a power of two.
    unsafe { Layout::from_size_align_unchecked(CLASS_SIZES[class], CLASS_ALIGN) }
}

/// How many blocks one CPU caches of a class at most, and how many move per batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClassSpec {
    pub(crate) cap: usize,
    pub(crate) batch: usize,
}

const fn cpu_cache_specs() -> [ClassSpec; 32] {
    let mut specs = [ClassSpec { cap: 0, batch: 0 }; 32];
    let mut c = 0;
    while c < 32 {
        let mut cap = 32768 / CLASS_SIZES[c];
        if cap < 16 {
            cap = 16;
        }
        if cap > 256 {
            cap = 256;
        }
        let mut batch = cap / 4;
        if batch > MAX_BATCH {
            batch = MAX_BATCH;
        }
        specs[c] = ClassSpec { cap, batch };
        c += 1;
    }
    specs
}

/// The class specs of [`CpuCache`].
static CPU_CACHE_SPECS: [ClassSpec; 32] = cpu_cache_specs();

/// Where blocks come from when a cache is empty and go when it is full.
pub(crate) trait Backend {
    /// Fills `out` with new blocks of `class`; returns how many it made.
    fn refill(&self, class: usize, out: &mut [usize]) -> usize;
    /// Takes back blocks of `class` that no cache keeps.
    fn release(&self, class: usize, blocks: &[usize]);
}

/// A class header in a slab: `{current, end, begin, guard}`, the layout the slab
/// sequences expect (see [`crate::ops::slab_push`]).
const HEADER_WORDS: usize = 4;
/// Offset of the headers in a slab (the first line holds the slab's lock and ready words).
const HEADERS_OFFSET: usize = 64;

/// One class's transfer cache: a bounded stack of blocks behind a try-lock.
#[repr(C, align(64))]
struct Transfer {
    locked: AtomicBool,
    /// Entries in use; written under `locked`.
    len: AtomicUsize,
    slots: [AtomicUsize; TRANSFER_SLOTS],
}

/// The start of an instance's region (zeroed by `mmap`; every field is valid as zero).
#[repr(C)]
pub(crate) struct Region {
    /// The region's length in bytes, for `munmap`.
    len: usize,
    /// Slabs (possible CPUs).
    ranges: usize,
    /// log2 of the distance between two CPUs' slabs.
    shift: u32,
    classes: usize,
    specs: [ClassSpec; MAX_CLASSES],
    /// Offset of each class's entries in a slab.
    offsets: [usize; MAX_CLASSES],
    transfer: [Transfer; MAX_CLASSES],
}

/// The bytes before the first slab: the region header, rounded up to pages.
const SLABS_OFFSET: usize = core::mem::size_of::<Region>().next_multiple_of(4096);

/// What one slow-path attempt on the current CPU's slab found.
enum Step {
    Got(usize),
    Empty,
    Full,
    Pushed,
}

impl Region {
    /// Maps and initialises a region for `specs`; `None` when `mmap` fails.
    pub(crate) fn create(specs: &[ClassSpec]) -> Option<NonNull<Region>> {
        assert!(specs.len() <= MAX_CLASSES);
        let mut offsets = [0usize; MAX_CLASSES];
        let mut end = HEADERS_OFFSET + MAX_CLASSES * HEADER_WORDS * 8;
        for (c, spec) in specs.iter().enumerate() {
            assert!(spec.batch >= 1 && spec.batch <= MAX_BATCH && spec.batch <= spec.cap);
            offsets[c] = end;
            end += spec.cap * 8;
        }
        let shift = end.next_power_of_two().max(4096).trailing_zeros();
        let ranges = sys::possible_cpus();
        let len = SLABS_OFFSET + (ranges << shift);
        let base = sys::map_lazy(len).ok()?.cast::<Region>();
        // SAFETY: a fresh, zeroed, writable mapping at least `size_of::<Region>()` long
        // and page aligned; zero is a valid value of every field, and nobody else sees
        // it until it is published.
        unsafe {
            let r = &mut *base.as_ptr();
            r.len = len;
            r.ranges = ranges;
            r.shift = shift;
            r.classes = specs.len();
            r.specs[..specs.len()].copy_from_slice(specs);
            r.offsets = offsets;
        }
        Some(base)
    }

    /// Unmaps a region.
    ///
    /// # Safety
    ///
    /// Nobody uses the region any more, and its blocks were given back.
    pub(crate) unsafe fn destroy(region: NonNull<Region>) {
        // SAFETY: the caller's contract; `len` is the mapping's length.
        unsafe {
            let len = (*region.as_ptr()).len;
            sys::unmap(region.cast(), len);
        }
    }

    /// The slab of `cpu` (below `ranges`).
    #[inline(always)]
    fn slab(&self, cpu: u32) -> *mut u8 {
        (self as *const Region as *mut u8)
            .wrapping_add(SLABS_OFFSET + ((cpu as usize) << self.shift))
    }

    /// The header of `class` in `slab`.
    #[inline(always)]
    fn header(slab: *mut u8, class: usize) -> *mut usize {
        slab.wrapping_add(HEADERS_OFFSET + class * HEADER_WORDS * 8)
            .cast()
    }

    /// The guard word of a header: non-zero while the slab is locked.
    #[inline(always)]
    fn guard(header: *mut usize) -> *const usize {
        header.wrapping_add(3)
    }

    /// # Safety
    ///
    /// `slab` is a slab of a live region.
    unsafe fn word<'a>(slab: *mut u8, index: usize) -> &'a AtomicUsize {
        // SAFETY: the caller's contract; the first line of a slab holds plain words.
        unsafe { AtomicUsize::from_ptr(slab.cast::<usize>().add(index)) }
    }

    /// Whether `slab`'s headers are set up.
    #[inline]
    fn ready(slab: *mut u8) -> bool {
        // SAFETY: every slab passed here belongs to a live region.
        // Acquire: pairs with the Release store in `init_slab`.
        unsafe { Self::word(slab, 1) }.load(Ordering::Acquire) != 0
    }

    /// The fast pop: one sequence on the current CPU's slab; `None` on any failure.
    ///
    /// # Safety
    ///
    /// `rseq` is the calling thread's registered area and `cpu` was read from it.
    #[inline(always)]
    pub(crate) unsafe fn pop_fast(
        &self,
        rseq: *mut crate::abi::Rseq,
        cpu: u32,
        class: usize,
    ) -> Option<usize> {
        if cpu as usize >= self.ranges {
            return None;
        }
        let hdr = Self::header(self.slab(cpu), class);
        #[cfg(any(test, feature = "__test-hooks"))]
        if crate::test_hooks::slab_pop_broken() {
            // SAFETY: as below; the broken sequence touches the same words.
            return match unsafe { arch::slab_pop_without_restart(rseq, Self::guard(hdr), hdr, cpu) }
            {
                Outcome::Committed(p) => Some(p),
                _ => None,
            };
        }
        // The header and its entries are written only by sequences on `cpu` and by holders
        // of the slab's lock, which set the guard and fence `cpu` first; a zeroed header
        // (slab not ready) makes every sequence fail its bound check without a store.
        // SAFETY: `rseq` is this thread's area (the caller's contract); see above.
        match unsafe { arch::slab_pop(rseq, Self::guard(hdr), hdr, cpu) } {
            Outcome::Committed(p) => Some(p),
            _ => None,
        }
    }

    /// The fast push: one sequence on the current CPU's slab; `false` on any failure.
    ///
    /// # Safety
    ///
    /// As for [`Region::pop_fast`].
    #[inline(always)]
    pub(crate) unsafe fn push_fast(
        &self,
        rseq: *mut crate::abi::Rseq,
        cpu: u32,
        class: usize,
        block: usize,
    ) -> bool {
        if cpu as usize >= self.ranges {
            return false;
        }
        let hdr = Self::header(self.slab(cpu), class);
        // SAFETY: as in `pop_fast`.
        unsafe {
            arch::slab_push(rseq, Self::guard(hdr), hdr, block, cpu) == Outcome::Committed(())
        }
    }

    /// Takes the lock of `cpu`'s slab (try only), sets every header's guard and fences
    /// the CPU's sequences; `false` if somebody else holds it.
    fn lock_slab(&self, cpu: u32) -> bool {
        let slab = self.slab(cpu);
        // SAFETY: `cpu < ranges`: a slab of this live region.
        let lock = unsafe { Self::word(slab, 0) };
        let mut tries = 0;
        // Acquire: pairs with the Release in `unlock_slab`.
        while lock
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            tries += 1;
            if tries >= LOCK_TRIES {
                return false;
            }
            core::hint::spin_loop();
        }
        for c in 0..self.classes {
            let guard = Self::guard(Self::header(slab, c)).cast_mut();
            // SAFETY: a header word of this slab; sequences only read it.
            unsafe { AtomicUsize::from_ptr(guard) }.store(1, Ordering::Relaxed);
        }
        // Every sequence on `cpu` that read a guard as 0 either committed before this
        // returns or is restarted and then sees the guard set (see `crate::remote`).
        if remote::fence_sequences_on(cpu).is_err() {
            // Without the fence the slab cannot be excluded: leave it alone (the caller
            // then uses the transfer cache or the backend; nothing was changed).
            self.unlock_slab(cpu);
            return false;
        }
        true
    }

    fn unlock_slab(&self, cpu: u32) {
        let slab = self.slab(cpu);
        for c in 0..self.classes {
            let guard = Self::guard(Self::header(slab, c)).cast_mut();
            // SAFETY: as in `lock_slab`.
            // Release: pairs with the load-acquire of the guard in the sequences (on
            // x86_64 every load is one), so they see the headers written under the lock.
            unsafe { AtomicUsize::from_ptr(guard) }.store(0, Ordering::Release);
        }
        // SAFETY: as in `lock_slab`.
        // Release: pairs with the Acquire of the next locker.
        unsafe { Self::word(slab, 0) }.store(0, Ordering::Release);
    }

    /// Sets up the headers of `cpu`'s slab; `false` if its lock was busy.
    fn init_slab(&self, cpu: u32) -> bool {
        let slab = self.slab(cpu);
        if Self::ready(slab) {
            return true;
        }
        if !self.lock_slab(cpu) {
            return false;
        }
        if !Self::ready(slab) {
            for c in 0..self.classes {
                let hdr = Self::header(slab, c);
                let begin = slab as usize + self.offsets[c];
                let end = begin + self.specs[c].cap * 8;
                // SAFETY: the header words of this slab; the lock and the fence exclude
                // every sequence on `cpu`, and readers elsewhere load them atomically.
                unsafe {
                    AtomicUsize::from_ptr(hdr.add(2)).store(begin, Ordering::Relaxed);
                    AtomicUsize::from_ptr(hdr.add(1)).store(end, Ordering::Relaxed);
                    AtomicUsize::from_ptr(hdr).store(begin, Ordering::Relaxed);
                }
            }
            // SAFETY: as in `lock_slab`.
            // Release: pairs with the Acquire in `ready`.
            unsafe { Self::word(slab, 1) }.store(1, Ordering::Release);
        }
        self.unlock_slab(cpu);
        true
    }

    /// Runs `attempt` on the current CPU's (ready) slab through
    /// [`remote::on_current_cpu`]; `None` when the thread cannot use the slabs now.
    fn on_slab<R>(
        &self,
        mut attempt: impl FnMut(*mut crate::abi::Rseq, u32, *mut u8) -> Attempt<R>,
    ) -> Option<R> {
        let mut inited = false;
        loop {
            let step = remote::on_current_cpu(self.ranges, |rseq, cpu| {
                let slab = self.slab(cpu);
                if !Self::ready(slab) {
                    return Attempt::Done(Err(cpu));
                }
                match attempt(rseq, cpu, slab) {
                    Attempt::Done(r) => Attempt::Done(Ok(r)),
                    Attempt::Retry => Attempt::Retry,
                    Attempt::Aborted => Attempt::Aborted,
                }
            })?;
            match step {
                Ok(r) => return Some(r),
                Err(cpu) => {
                    if inited || !self.init_slab(cpu) {
                        return None;
                    }
                    inited = true;
                }
            }
        }
    }

    /// Moves up to `out.len()` blocks of `class` out of the current CPU's slab.
    fn pop_batch(&self, class: usize, out: &mut [usize]) -> usize {
        self.on_slab(|rseq, cpu, slab| {
            let hdr = Self::header(slab, class);
            // SAFETY: header words of a ready slab; read atomically, checked again by
            // the sequence's compare.
            let (cur, begin) = unsafe {
                (
                    AtomicUsize::from_ptr(hdr).load(Ordering::Relaxed),
                    AtomicUsize::from_ptr(hdr.add(2)).load(Ordering::Relaxed),
                )
            };
            let n = out.len().min(cur.saturating_sub(begin) / 8);
            if n == 0 {
                return Attempt::Done(0);
            }
            let new = cur - n * 8;
            // SAFETY: (1) `rseq`/`cpu` come from `on_current_cpu`; (2) if `current` still
            // is `cur`, entries `new..cur` hold blocks, and `out` is ours for `n` words;
            // the commit stores `current` only; the guard excludes lock holders.
            match unsafe {
                arch::compare_memcpy_store_guarded(
                    rseq,
                    Self::guard(hdr),
                    hdr,
                    cur,
                    out.as_mut_ptr().cast(),
                    new as *const u8,
                    n * 8,
                    new,
                    cpu,
                )
            } {
                Outcome::Committed(()) => Attempt::Done(n),
                Outcome::CompareFailed => Attempt::Retry,
                Outcome::Aborted => Attempt::Aborted,
            }
        })
        .unwrap_or(0)
    }

    /// Stores all of `blocks` in the current CPU's slab, or none; whether it did.
    fn push_batch(&self, class: usize, blocks: &[usize]) -> bool {
        if blocks.is_empty() {
            return true;
        }
        self.on_slab(|rseq, cpu, slab| {
            let hdr = Self::header(slab, class);
            // SAFETY: as in `pop_batch`.
            let (cur, end) = unsafe {
                (
                    AtomicUsize::from_ptr(hdr).load(Ordering::Relaxed),
                    AtomicUsize::from_ptr(hdr.add(1)).load(Ordering::Relaxed),
                )
            };
            let len = blocks.len() * 8;
            if end.saturating_sub(cur) < len {
                return Attempt::Done(false);
            }
            // SAFETY: (1) as in `pop_batch`; (2) if `current` still is `cur`, entries
            // `cur..cur+len` are free and nobody reads them before the commit.
            match unsafe {
                arch::compare_memcpy_store_guarded(
                    rseq,
                    Self::guard(hdr),
                    hdr,
                    cur,
                    cur as *mut u8,
                    blocks.as_ptr().cast(),
                    len,
                    cur + len,
                    cpu,
                )
            } {
                Outcome::Committed(()) => Attempt::Done(true),
                Outcome::CompareFailed => Attempt::Retry,
                Outcome::Aborted => Attempt::Aborted,
            }
        })
        .unwrap_or(false)
    }

    /// Takes up to `out.len()` blocks of `class` from its transfer cache.
    fn transfer_take(&self, class: usize, out: &mut [usize]) -> usize {
        let t = &self.transfer[class];
        if !try_lock(&t.locked) {
            return 0;
        }
        let len = t.len.load(Ordering::Relaxed);
        let n = out.len().min(len);
        for (i, o) in out[..n].iter_mut().enumerate() {
            *o = t.slots[len - n + i].load(Ordering::Relaxed);
        }
        t.len.store(len - n, Ordering::Relaxed);
        // Release: pairs with the Acquire of the next holder.
        t.locked.store(false, Ordering::Release);
        n
    }

    /// Gives all of `blocks` to the transfer cache of `class`, or none; whether it did.
    fn transfer_put(&self, class: usize, blocks: &[usize]) -> bool {
        let t = &self.transfer[class];
        let cap = self.specs[class].batch * TRANSFER_BATCHES;
        if !try_lock(&t.locked) {
            return false;
        }
        let len = t.len.load(Ordering::Relaxed);
        let fits = len + blocks.len() <= cap;
        if fits {
            for (i, &b) in blocks.iter().enumerate() {
                t.slots[len + i].store(b, Ordering::Relaxed);
            }
            t.len.store(len + blocks.len(), Ordering::Relaxed);
        }
        // Release: pairs with the Acquire of the next holder.
        t.locked.store(false, Ordering::Release);
        fits
    }

    /// The slow path of an allocation: the slab (initialising it), a batch from the
    /// transfer cache or the backend; `None` when the backend has nothing either.
    pub(crate) fn pop_slow(&self, class: usize, backend: &impl Backend) -> Option<usize> {
        let step = self.on_slab(|rseq, cpu, slab| {
            let hdr = Self::header(slab, class);
            // SAFETY: as in `pop_fast`; `on_slab` gives this thread's area and CPU.
            match unsafe { arch::slab_pop(rseq, Self::guard(hdr), hdr, cpu) } {
                Outcome::Committed(p) => Attempt::Done(Step::Got(p)),
                Outcome::CompareFailed => Attempt::Done(Step::Empty),
                Outcome::Aborted => Attempt::Aborted,
            }
        });
        match step {
            Some(Step::Got(p)) => Some(p),
            Some(_) => {
                let mut buf = [0usize; MAX_BATCH];
                let batch = &mut buf[..self.specs[class].batch];
                let mut n = self.transfer_take(class, batch);
                if n == 0 {
                    n = backend.refill(class, batch);
                }
                if n == 0 {
                    return None;
                }
                let rest = &batch[..n - 1];
                if !self.push_batch(class, rest) && !self.transfer_put(class, rest) {
                    backend.release(class, rest);
                }
                Some(batch[n - 1])
            }
            None => {
                // No slab for this thread now: the transfer cache or the backend.
                let mut one = [0usize; 1];
                let n = match self.transfer_take(class, &mut one) {
                    0 => backend.refill(class, &mut one),
                    n => n,
                };
                (n == 1).then_some(one[0])
            }
        }
    }

    /// The slow path of a free: the slab (moving a batch out when it is full), else the
    /// transfer cache, else the backend.
    pub(crate) fn push_slow(&self, class: usize, block: usize, backend: &impl Backend) {
        for _ in 0..3 {
            let step = self.on_slab(|rseq, cpu, slab| {
                let hdr = Self::header(slab, class);
                // SAFETY: as in `pop_slow`.
                match unsafe { arch::slab_push(rseq, Self::guard(hdr), hdr, block, cpu) } {
                    Outcome::Committed(()) => Attempt::Done(Step::Pushed),
                    Outcome::CompareFailed => Attempt::Done(Step::Full),
                    Outcome::Aborted => Attempt::Aborted,
                }
            });
            match step {
                Some(Step::Pushed) => return,
                Some(_) => {
                    let mut buf = [0usize; MAX_BATCH];
                    let batch = &mut buf[..self.specs[class].batch];
                    let n = self.pop_batch(class, batch);
                    let moved = &batch[..n];
                    if !self.transfer_put(class, moved) {
                        backend.release(class, moved);
                    }
                }
                None => break,
            }
        }
        if !self.transfer_put(class, &[block]) {
            backend.release(class, &[block]);
        }
    }

    /// Gives every block cached for `cpu` to `backend`; `false` if the slab's lock was
    /// busy (or `cpu` is not below the possible CPUs).
    pub(crate) fn drain_cpu(&self, cpu: u32, backend: &impl Backend) -> bool {
        if cpu as usize >= self.ranges {
            return false;
        }
        let slab = self.slab(cpu);
        if !Self::ready(slab) {
            return true;
        }
        if !self.lock_slab(cpu) {
            return false;
        }
        for c in 0..self.classes {
            let hdr = Self::header(slab, c);
            // SAFETY: the slab is locked and fenced: no sequence writes its headers or
            // entries until `unlock_slab`; the words are read and written atomically.
            unsafe {
                let current = AtomicUsize::from_ptr(hdr);
                let begin = AtomicUsize::from_ptr(hdr.add(2)).load(Ordering::Relaxed);
                let cur = current.load(Ordering::Relaxed);
                let mut p = begin;
                while p < cur {
                    let mut buf = [0usize; MAX_BATCH];
                    let n = ((cur - p) / 8).min(MAX_BATCH);
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = AtomicUsize::from_ptr((p + i * 8) as *mut usize)
                            .load(Ordering::Relaxed);
                    }
                    backend.release(c, &buf[..n]);
                    p += n * 8;
                }
                current.store(begin, Ordering::Relaxed);
            }
        }
        self.unlock_slab(cpu);
        true
    }

    /// Gives every block in the transfer caches to `backend` (those whose lock is busy
    /// stay).
    pub(crate) fn drain_transfer(&self, backend: &impl Backend) {
        for c in 0..self.classes {
            let mut buf = [0usize; MAX_BATCH];
            loop {
                let n = self.transfer_take(c, &mut buf);
                if n == 0 {
                    break;
                }
                backend.release(c, &buf[..n]);
            }
        }
    }

    /// Possible CPUs (slabs).
    pub(crate) fn ranges(&self) -> usize {
        self.ranges
    }

    /// Blocks of each class cached on `cpu` and in the transfer cache (a snapshot).
    pub(crate) fn cached(&self, class: usize) -> (usize, usize) {
        let mut on_cpus = 0;
        for cpu in 0..self.ranges as u32 {
            let slab = self.slab(cpu);
            if Self::ready(slab) {
                let hdr = Self::header(slab, class);
                // SAFETY: header words of a ready slab, read atomically.
                let (cur, begin) = unsafe {
                    (
                        AtomicUsize::from_ptr(hdr).load(Ordering::Relaxed),
                        AtomicUsize::from_ptr(hdr.add(2)).load(Ordering::Relaxed),
                    )
                };
                on_cpus += cur.saturating_sub(begin) / 8;
            }
        }
        (on_cpus, self.transfer[class].len.load(Ordering::Relaxed))
    }
}

/// Tries a spin lock a bounded number of times.
fn try_lock(lock: &AtomicBool) -> bool {
    for _ in 0..LOCK_TRIES {
        // Acquire: pairs with the Release of the previous holder.
        if lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// A lazily created region, shared by the users of one instance.
#[derive(Debug)]
pub(crate) struct LazyRegion {
    ptr: AtomicPtr<Region>,
}

impl LazyRegion {
    pub(crate) const fn new() -> Self {
        LazyRegion {
            ptr: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// The region if it exists.
    #[inline(always)]
    pub(crate) fn get(&self) -> Option<&Region> {
        // Acquire: pairs with the Release of the creator's compare-exchange.
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: a published region stays mapped until the owner is dropped.
        unsafe { p.as_ref() }
    }

    /// The region, created for `specs` if needed; `None` if `mmap` fails.
    #[cold]
    pub(crate) fn get_or_create(&self, specs: &[ClassSpec]) -> Option<&Region> {
        if let Some(r) = self.get() {
            return Some(r);
        }
        let mine = Region::create(specs)?;
        // Release: publishes the initialised header; Acquire: to read a winner's.
        match self.ptr.compare_exchange(
            core::ptr::null_mut(),
            mine.as_ptr(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: just published; lives as long as `self`.
            Ok(_) => Some(unsafe { &*mine.as_ptr() }),
            Err(theirs) => {
                // SAFETY: ours was never published.
                unsafe { Region::destroy(mine) };
                // SAFETY: as in `get`.
                unsafe { theirs.as_ref() }
            }
        }
    }

    /// Takes the region out (for drop).
    pub(crate) fn take(&mut self) -> Option<NonNull<Region>> {
        NonNull::new(core::mem::replace(
            self.ptr.get_mut(),
            core::ptr::null_mut(),
        ))
    }
}

/// A per-CPU caching front-end for the [`GlobalAlloc`] `A` (the system allocator by
/// default). See the [module documentation](self).
///
/// ```
/// use cpulocal::alloc::CpuCache;
///
/// #[global_allocator]
/// static GLOBAL: CpuCache = CpuCache::new();
///
/// let v: Vec<u64> = (0..1000).collect();
/// assert_eq!(v.iter().sum::<u64>(), 999 * 1000 / 2);
/// ```
///
/// `CpuCache` is `Send` and `Sync` when `A` is: its state is a region of atomics and
/// per-CPU words that only restartable sequences and lock holders write.
pub struct CpuCache<A: GlobalAlloc = System> {
    backend: A,
    region: LazyRegion,
}

impl CpuCache<System> {
    /// A cache in front of the system allocator. `const`: usable in a `static`.
    pub const fn new() -> Self {
        CpuCache::with_backend(System)
    }
}

impl Default for CpuCache<System> {
    fn default() -> Self {
        CpuCache::new()
    }
}

impl<A: GlobalAlloc> core::fmt::Debug for CpuCache<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CpuCache")
            .field("created", &self.region.get().is_some())
            .finish_non_exhaustive()
    }
}

/// [`Backend`] over a `GlobalAlloc`, allocating blocks with their class's layout.
struct Through<'a, A>(&'a A);

impl<A: GlobalAlloc> Backend for Through<'_, A> {
    fn refill(&self, class: usize, out: &mut [usize]) -> usize {
        let layout = class_layout(class);
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: class layouts have a non-zero size.
            let p = unsafe { self.0.alloc(layout) };
            if p.is_null() {
                return i;
            }
            *o = p as usize;
        }
        out.len()
    }

    fn release(&self, class: usize, blocks: &[usize]) {
        let layout = class_layout(class);
        for &b in blocks {
            // SAFETY: every block of a class was allocated from this backend with the
            // class layout, and nobody uses it any more.
            unsafe { self.0.dealloc(b as *mut u8, layout) };
        }
    }
}

impl<A: GlobalAlloc> CpuCache<A> {
    /// A cache in front of `backend`. `const`: usable in a `static`.
    pub const fn with_backend(backend: A) -> Self {
        CpuCache {
            backend,
            region: LazyRegion::new(),
        }
    }

    /// The allocator behind the cache.
    pub fn backend(&self) -> &A {
        &self.backend
    }

    /// Gives the blocks cached for `cpu` back to the backend, with the remote protocol
    /// (lock, `membarrier` fence, move, unlock); for CPUs the program knows to be idle.
    /// Returns `false` when the CPU's cache was busy (another drain) and nothing moved.
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    /// let cache = cpulocal::alloc::CpuCache::new();
    /// let layout = Layout::new::<[u64; 4]>();
    /// // SAFETY: non-zero size; freed with the same layout.
    /// unsafe { cache.dealloc(cache.alloc(layout), layout) };
    /// for cpu in 0..cpulocal::possible_cpus() {
    ///     assert!(cache.drain_cpu(cpu));
    /// }
    /// assert_eq!(cache.cached_blocks(), 0);
    /// ```
    pub fn drain_cpu(&self, cpu: usize) -> bool {
        match self.region.get() {
            Some(r) if cpu < r.ranges() => r.drain_cpu(cpu as u32, &Through(&self.backend)),
            _ => true,
        }
    }

    /// Gives every cached block back to the backend: every CPU's cache (see
    /// [`drain_cpu`](CpuCache::drain_cpu)) and the transfer caches. Returns `false` if
    /// some cache was busy.
    pub fn drain_all(&self) -> bool {
        let Some(r) = self.region.get() else {
            return true;
        };
        let backend = Through(&self.backend);
        let mut all = true;
        for cpu in 0..r.ranges() {
            all &= r.drain_cpu(cpu as u32, &backend);
        }
        r.drain_transfer(&backend);
        all
    }

    /// How many freed blocks the caches hold now (per-CPU and transfer caches; a
    /// snapshot while other threads work).
    pub fn cached_blocks(&self) -> usize {
        let Some(r) = self.region.get() else {
            return 0;
        };
        (0..CLASS_SIZES.len())
            .map(|c| {
                let (a, b) = r.cached(c);
                a + b
            })
            .sum()
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, class: usize) -> *mut u8 {
        let backend = Through(&self.backend);
        match self.region.get_or_create(&CPU_CACHE_SPECS) {
            Some(r) => r
                .pop_slow(class, &backend)
                .map_or(core::ptr::null_mut(), |p| p as *mut u8),
            None => {
                let mut one = [0usize];
                if backend.refill(class, &mut one) == 1 {
                    one[0] as *mut u8
                } else {
                    core::ptr::null_mut()
                }
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn dealloc_slow(&self, block: *mut u8, class: usize) {
        let backend = Through(&self.backend);
        match self.region.get_or_create(&CPU_CACHE_SPECS) {
            Some(r) => r.push_slow(class, block as usize, &backend),
            None => backend.release(class, &[block as usize]),
        }
    }
}

// SAFETY: (the GlobalAlloc contract) a block handed out is either the backend's (large or
// over-aligned requests, with the caller's layout) or a block of the request's class,
// allocated by the backend with the class layout, whose size and alignment cover the
// request; a cached block is in exactly one place (a slab entry below `current`, a
// transfer slot below `len`) because every move is one committed sequence or happens
// under a lock; `dealloc` finds the class from the layout alone, as `alloc` did.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CpuCache<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !is_small(layout) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { self.backend.alloc(layout) };
        }
        let class = class_of(layout.size());
        if let (Some(rseq), Some(r)) = (crate::thread::current_if_registered(), self.region.get()) {
            let cpu = crate::cpu::cpu_id_start(rseq);
            // SAFETY: this thread's area, and the CPU read from it.
            if let Some(p) = unsafe { r.pop_fast(rseq.as_ptr(), cpu, class) } {
                return p as *mut u8;
            }
        }
        self.alloc_slow(class)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !is_small(layout) {
            // SAFETY: the caller's contract: `ptr` came from `alloc` with `layout`,
            // which passed such layouts to the backend.
            return unsafe { self.backend.dealloc(ptr, layout) };
        }
        let class = class_of(layout.size());
        if let (Some(rseq), Some(r)) = (crate::thread::current_if_registered(), self.region.get()) {
            let cpu = crate::cpu::cpu_id_start(rseq);
            // SAFETY: this thread's area, and the CPU read from it.
            if unsafe { r.push_fast(rseq.as_ptr(), cpu, class, ptr as usize) } {
                return;
            }
        }
        self.dealloc_slow(ptr, class)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !is_small(layout) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { self.backend.alloc_zeroed(layout) };
        }
        // SAFETY: the caller's contract.
        let p = unsafe { self.alloc(layout) };
        if !p.is_null() {
            // SAFETY: a block of at least `layout.size()` bytes.
            unsafe { p.write_bytes(0, layout.size()) };
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, does
        // not overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_small(layout), is_small(new_layout)) {
            (true, true) if class_of(layout.size()) == class_of(new_size) => return ptr,
            // SAFETY: both are the backend's blocks with these layouts.
            (false, false) => return unsafe { self.backend.realloc(ptr, layout, new_size) },
            _ => {}
        }
        // SAFETY: the caller's contract (non-zero `new_size`).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks hold at least the smaller size and do not overlap;
            // `ptr` is freed with the layout it was allocated with.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

impl<A: GlobalAlloc> Drop for CpuCache<A> {
    fn drop(&mut self) {
        self.drain_all();
        if let Some(r) = self.region.take() {
            // SAFETY: `&mut self`: nobody uses the region; its blocks were given back
            // (a busy lock cannot exist without another user).
            unsafe { Region::destroy(r) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_small_size_maps_to_the_smallest_class_that_holds_it() {
        for size in 0..=MAX_SMALL {
            let c = class_of(size);
            assert!(CLASS_SIZES[c] >= size.max(1), "size {size}");
            if c > 0 {
                assert!(CLASS_SIZES[c - 1] < size, "size {size}");
            }
        }
    }

    #[test]
    fn class_specs_fit_a_batch_and_the_transfer_cache() {
        for s in CPU_CACHE_SPECS {
            assert!(s.batch >= 4 && s.batch <= MAX_BATCH && s.batch <= s.cap);
            assert!(s.batch * TRANSFER_BATCHES <= TRANSFER_SLOTS);
        }
    }
}
