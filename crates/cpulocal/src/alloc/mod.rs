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
//! The fast paths run these as one sequence that also reads the CPU (once its section
//! is open) and finds the slab's header itself, with the slab stride a constant of the
//! class specs; the popped block comes back in a register; and they read no guard word:
//! a locked header's bounds (`end` 0, `begin` `usize::MAX`) fail their bound checks. On
//! the 2-vCPU Zen 4 VM that took an allocate-and-free pair of 64 bytes from 4.5 to
//! 3.2 ns at 1 thread (see the README's `alloc` rows).
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
//! Per CPU and class at most `cap` blocks (`32 KiB / class size`, between 16 and 2048:
//! so at most 32 KiB of blocks per class above 16 blocks, and about 1.4 MiB per CPU over
//! the 32 classes); per class at most 8 batches in the transfer cache. [`CpuCache::drain_cpu`] (and
//! [`CpuCache::drain_all`]) give a CPU's cached blocks back to `A` with the remote
//! protocol of [`crate::remote`]: lock the slab (lock every header: its bounds, which
//! the fast paths check, and its guard, which the batch sequences check), fence the
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
//!   need no sequence. So is every thread when the remote scheme is the locked one (a
//!   kernel without membarrier's rseq fence, before 5.10, or
//!   `CPULOCAL_DISABLE_MEMBARRIER`): draining a slab needs the fence, so no CPU gets one.
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

use core::alloc::GlobalAlloc;
use std::alloc::System;

mod classes;
mod global;
mod slab;
#[cfg(test)]
mod tests;
mod transfer;

pub(crate) use classes::ClassSpec;
use classes::{class_layout, CLASS_SIZES};
pub use classes::{CLASS_ALIGN, MAX_SMALL};
pub(crate) use slab::{slab_shift, LazyRegion, Region};

/// Where blocks come from when a cache is empty and go when it is full.
pub(crate) trait Backend {
    /// Fills `out` with new blocks of `class`; returns how many it made.
    fn refill(&self, class: usize, out: &mut [usize]) -> usize;
    /// Takes back blocks of `class` that no cache keeps.
    fn release(&self, class: usize, blocks: &[usize]);
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
    /// Returns `false` when nothing moved: another thread held the CPU's cache (a drain,
    /// or the setting up of its slab), or the kernel refused this thread the fence that
    /// excludes the CPU's sequences (a seccomp filter). Nothing is lost: try again later.
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
    /// // The transfer caches keep their blocks (and hold them all where the CPUs have no
    /// // slabs: see "As a global allocator"); `drain_all` empties them too.
    /// assert!(cache.drain_all());
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
    /// some CPU's cache could not be drained (for `drain_cpu`'s reasons).
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
}
