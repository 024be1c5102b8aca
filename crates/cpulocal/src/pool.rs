//! The per-CPU memory pool: where [`Counter`](crate::Counter), [`PerCpu`](crate::PerCpu)
//! and [`Stack`](crate::Stack) keep their per-CPU items, packed, with no padding per
//! item.
//!
//! # Layout
//!
//! Like librseq's `rseq_mempool`, a pool reserves address space in *chunks* of
//! `ranges × STRIDE` bytes: one range of [`STRIDE`] bytes per possible CPU (or per
//! mm_cid, see [`crate::Index`]). An item is handed out as one *offset*, valid in every
//! range, so its copy for CPU `c` lives at
//!
//! ```text
//! item(c) = chunk_base + offset + (c << STRIDE_SHIFT)        (one shift, one add)
//! ```
//!
//! and the crate keeps only `chunk_base + offset` (the CPU-0 address). Items are placed
//! with their own size and alignment, one after the other; an item of 64 bytes or less
//! never straddles a cache line (it moves to the next line instead), so reading one CPU's
//! copy (as `Counter::sum` does) touches one line. [`STRIDE`] is a multiple of the page
//! size, so the copies of two CPUs never share a cache line, nor even a page.
//!
//! # Memory
//!
//! Chunks are mapped `PROT_READ | PROT_WRITE`, `MAP_PRIVATE | MAP_ANONYMOUS |
//! MAP_NORESERVE`: a page costs nothing until a CPU first writes into it. A CPU (or an
//! mm_cid) that never runs the process's code leaves its ranges unpopulated; reading an
//! untouched page maps the kernel's shared zero page, which is not resident memory of
//! the process. An item costs its own size per CPU that really uses it.
//!
//! # Free offsets
//!
//! Freed offsets go to a free list per (size, alignment) and are handed out again before
//! the bump pointer moves. A freed item is zeroed in every range first (only the bytes
//! that are not zero already are written, so freeing populates nothing), which keeps the
//! promise that a new item reads as zero on every CPU. The free lists live on the heap,
//! not in the ranges, so they populate no range either; their storage is allocated
//! *before* the lock is taken (see `Pool::free`), never while it is held.
//!
//! # Growth
//!
//! When the current chunk is full, the pool maps another one; live items never move.
//! Chunks are never unmapped: the two pools are process-wide and statics may point into
//! them until exit. An item larger than [`STRIDE`]` / 8` gets a chunk of its own, with
//! a stride of its own (the next power of two that holds it, at least a page), which is
//! unmapped when it is freed.
//!
//! # Fork
//!
//! A private anonymous mapping is copied into a child of `fork`, so every item stays
//! valid there. The pool's lock is a spin lock that `pthread_atfork` handlers take
//! before `fork` and release in both processes afterwards, so a fork while another
//! thread allocates cannot leave the child with a lock nobody will release.
//!
//! # The internal API (for structures inside the crate)
//!
//! - `Pool::for_index(index)`: the process-wide pool of an [`Index`].
//! - `Pool::alloc(layout) -> Item`: an item zeroed in every range.
//! - `Pool::alloc_once(&dest, layout)`: the item `dest` points to, allocated and stored
//!   there under the lock if `dest` is still null: a first use that races another
//!   never allocates an item it must then free.
//! - `Item::at(cpu)`: the item's address for a CPU (or mm_cid); `shift_for(layout)`
//!   gives the shift of a layout as a constant, for fast paths that keep only the CPU-0
//!   address (`Item::base`) and rebuild the item with `Item::from_base`.
//! - `unsafe Pool::free(item, layout)`: gives the offset back.
//!
//! Allocation and freeing take the pool's lock, with every signal blocked while it is
//! held: a handler that makes a counter's first use (an allocation, see
//! [`Counter::add`](crate::Counter::add)) then runs after the lock is given back, instead
//! of waiting forever for a lock its own thread holds. Nothing calls the system allocator
//! while the lock is held: a global allocator that counts with cpulocal, or one whose
//! `pthread_atfork` handler takes its own lock before cpulocal's, would otherwise wait for
//! itself (or for the thread that waits for it). Allocation calls `mmap` for a new chunk
//! and never the system allocator; freeing may call it, before it takes the lock; getting
//! an item's address is arithmetic only.

use core::alloc::Layout;
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

use crate::percpu::Index;
use crate::sys;

/// log2 of [`STRIDE`].
pub const STRIDE_SHIFT: u32 = 20;

/// The bytes each CPU's range of a chunk spans (1 MiB): how far apart the copies of one
/// item are. A power of two (addresses are computed with a shift) and a multiple of the
/// page size.
pub const STRIDE: usize = 1 << STRIDE_SHIFT;

/// Items larger than this get a chunk of their own.
const LARGE: usize = STRIDE / 8;

/// The cache line size assumed for placing small items (x86_64 and most aarch64).
const LINE: usize = 64;

/// The stride shift of an item of `layout`: [`STRIDE_SHIFT`] for pooled items, the
/// shift of their own chunk's stride for large ones.
#[inline(always)]
pub(crate) const fn shift_for(layout: Layout) -> u32 {
    if layout.size() <= LARGE {
        STRIDE_SHIFT
    } else {
        // At least a page (4 KiB on the architectures cpulocal supports; larger pages
        // only make `LARGE` items, which are bigger than 4 KiB anyway, round up).
        let size = layout.size().next_power_of_two();
        size.trailing_zeros()
    }
}

/// A per-CPU table's first slot and slot count in one word (the count in the top 16
/// bits), for fast paths that read both with one load: one load fewer than two fields,
/// about 3 % of a `Counter::add` and 4-6 % of a `Stack` push+pop on the Zen 4 VM. Only
/// `Counter` uses it since cd1f54a; a `Stack` reads a [`SlotTable`] in place.
///
/// User addresses are below 2^48 unless a mapping asked for more (5-level paging, 52-bit
/// aarch64 addresses). A first slot that does not fit packs as [`EMPTY`](Self::EMPTY)
/// (no slot: every fast path refuses, the slow paths run), and a count beyond 16 bits as
/// what fits (the CPUs beyond it take the slow paths): never a wrong slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PackedTable(usize);

impl PackedTable {
    const LEN_SHIFT: u32 = 48;
    const BASE_MASK: usize = (1 << Self::LEN_SHIFT) - 1;

    /// No slot.
    pub(crate) const EMPTY: PackedTable = PackedTable(0);

    /// `len` slots from `base`.
    pub(crate) fn new(base: *mut u8, len: usize) -> PackedTable {
        let base = base as usize;
        if base & !Self::BASE_MASK != 0 {
            return Self::EMPTY;
        }
        PackedTable(base | (len.min(usize::MAX >> Self::LEN_SHIFT) << Self::LEN_SHIFT))
    }

    /// The first slot and the slot count (at most the count packed).
    #[inline(always)]
    pub(crate) fn get(self) -> (*mut u8, usize) {
        (
            (self.0 & Self::BASE_MASK) as *mut u8,
            self.0 >> Self::LEN_SHIFT,
        )
    }

    /// The word, for an atomic.
    pub(crate) fn to_bits(self) -> usize {
        self.0
    }

    /// The table of a word from [`to_bits`](Self::to_bits).
    #[inline(always)]
    pub(crate) fn from_bits(bits: usize) -> PackedTable {
        PackedTable(bits)
    }
}

/// A per-CPU table's first slot and slot count, as the sequences read them in place:
/// as memory operands of the bound check and of the address computation on x86_64
/// (no register and no instruction to unpack them), with one pair load on aarch64.
/// Against a [`PackedTable`] read into a register and unpacked there, a `Stack`
/// push+pop went from 1.97 to 1.69 ns on the Intel Xeon VM of 2026-12-05 (family 6 model
/// 167; five interleaved rounds; 2.11 before the pop's one-compare decode).
/// A `Stack`'s table is set once, before the stack is shared; a `Counter` keeps its
/// packed word, which its first use publishes with one atomic store.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotTable {
    /// The first slot (CPU 0's).
    pub(crate) base: *mut u8,
    /// The slot count: the sequences refuse a CPU at or beyond it.
    pub(crate) len: usize,
}

// The sequences read the two words at these byte offsets (8 on the 64-bit architectures
// that have sequences).
const _: () = assert!(
    core::mem::offset_of!(SlotTable, base) == 0
        && core::mem::offset_of!(SlotTable, len) == core::mem::size_of::<usize>()
);

/// One item of a pool: its CPU-0 address and its stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Item {
    base: NonNull<u8>,
    shift: u32,
}

// SAFETY: an `Item` is an address in a process-wide mapping that lives until exit (or,
// for a large item, until `free`, which takes the item by value); handing the address
// to another thread is as safe as handing it a `Box`'s. Accesses through it are the
// owner's business (unsafe, argued where they happen).
unsafe impl Send for Item {}

impl Item {
    /// The item's copy for `cpu` (a CPU number or an mm_cid, below the pool's ranges).
    #[inline(always)]
    pub(crate) fn at(self, cpu: usize) -> *mut u8 {
        self.base.as_ptr().wrapping_add(cpu << self.shift)
    }

    /// The CPU-0 address, which identifies the item.
    #[inline(always)]
    pub(crate) fn base(self) -> NonNull<u8> {
        self.base
    }

    /// Rebuilds an item from its CPU-0 address, for a `layout` it was allocated with.
    ///
    /// # Safety
    ///
    /// `base` was returned by [`Item::base`] for an item of `layout`.
    #[inline(always)]
    pub(crate) const unsafe fn from_base(base: NonNull<u8>, layout: Layout) -> Item {
        Item {
            base,
            shift: shift_for(layout),
        }
    }
}

/// What a pool holds, for `cpulocal bench --group memory` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// The ranges per chunk: the possible CPUs (0 before the first allocation).
    pub ranges: usize,
    /// Chunks of [`STRIDE`] per range mapped so far (shared by small items).
    pub chunks: usize,
    /// Chunks of their own, for large items, mapped now.
    pub large_chunks: usize,
    /// Items allocated and not yet freed.
    pub live_items: usize,
    /// The bytes per CPU that live items take, alignment gaps excluded.
    pub live_bytes_per_cpu: usize,
    /// Offsets freed and waiting for reuse.
    pub free_items: usize,
    /// Address space reserved, in bytes (not memory: see the module docs).
    pub reserved_bytes: usize,
}

/// The mutable state of a pool, behind its lock.
struct State {
    /// `ranges` of the pool (the possible CPUs), read at the first allocation.
    ranges: usize,
    /// The base address of the newest shared chunk (0: none yet). Older chunks need no
    /// record: they are never unmapped, and their freed offsets are in `free`.
    newest_chunk: usize,
    /// The shared chunks mapped so far.
    chunks: usize,
    /// The first free offset of the newest chunk.
    next: usize,
    /// Freed offsets, one list per (size, alignment) (a handful: one per item type).
    free: Vec<FreeList>,
    live_items: usize,
    live_bytes: usize,
    large_chunks: usize,
    /// The address space the large chunks reserve.
    large_bytes: usize,
    free_items: usize,
}

/// The freed offsets (CPU-0 addresses) of items of one size and alignment.
struct FreeList {
    key: (usize, usize),
    offsets: Vec<usize>,
}

/// A per-CPU memory pool. See the module documentation.
pub(crate) struct Pool {
    /// How the ranges are indexed (for documentation and stats; the arithmetic is the same).
    index: Index,
    /// The spin lock over `state` (true: held).
    locked: AtomicBool,
    state: UnsafeCell<State>,
}

// SAFETY: `state` is only reached under `locked` (see `Pool::lock`), which orders every
// access (Acquire on taking, Release on giving back).
unsafe impl Sync for Pool {}

/// The pool of CPU-indexed items.
static BY_CPU: Pool = Pool::new(Index::Cpu);
/// The pool of mm_cid-indexed items.
static BY_MM_CID: Pool = Pool::new(Index::MmCid);

/// The ranges per chunk (possible CPUs), published before any item exists, for fast
/// paths that check a CPU number against it.
static RANGES: AtomicUsize = AtomicUsize::new(0);

/// The number of ranges per chunk, once any item exists (0 before): every CPU number the
/// kernel reports, and every mm_cid, is below it.
#[inline(always)]
pub(crate) fn ranges() -> usize {
    // Relaxed: written once, before the first item is published; every reader got an
    // item through an Acquire load that this store happens before.
    RANGES.load(Ordering::Relaxed)
}

/// The statistics of the pool of an [`Index`].
///
/// ```
/// let c = cpulocal::Counter::new();
/// c.add(1);
/// let s = cpulocal::pool::stats(cpulocal::Index::Cpu);
/// assert!(s.live_items >= 1);
/// assert_eq!(s.ranges, cpulocal::possible_cpus());
/// ```
pub fn stats(index: Index) -> Stats {
    Pool::for_index(index).stats()
}

/// A held pool lock, with the holder's signals blocked.
struct Locked<'a> {
    pool: &'a Pool,
    /// Dropped after the lock is given back (see `Drop`): a signal that arrived while it
    /// was held is delivered then.
    _signals: sys::SignalsBlocked,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire of the next holder.
        self.pool.locked.store(false, Ordering::Release);
        // `_signals` is dropped after this body: the mask comes back with the lock free.
    }
}

impl core::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        // SAFETY: the lock is held: nobody else reaches `state`.
        unsafe { &*self.pool.state.get() }
    }
}

impl core::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        // SAFETY: the lock is held, and `&mut self` makes this the only reference.
        unsafe { &mut *self.pool.state.get() }
    }
}

impl Pool {
    const fn new(index: Index) -> Pool {
        Pool {
            index,
            locked: AtomicBool::new(false),
            state: UnsafeCell::new(State {
                ranges: 0,
                newest_chunk: 0,
                chunks: 0,
                next: 0,
                free: Vec::new(),
                live_items: 0,
                live_bytes: 0,
                large_chunks: 0,
                large_bytes: 0,
                free_items: 0,
            }),
        }
    }

    /// The process-wide pool of `index`.
    #[inline]
    pub(crate) fn for_index(index: Index) -> &'static Pool {
        match index {
            Index::Cpu => &BY_CPU,
            Index::MmCid => &BY_MM_CID,
        }
    }

    /// Takes the lock: spins briefly, then yields. Held for a few hundred instructions
    /// (plus an `mmap` when a chunk is added), so it rarely waits. Signals are blocked
    /// first: a handler that allocates (a counter's first use) must never interrupt the
    /// holder, as it would wait for its own thread.
    fn lock(&self) -> Locked<'_> {
        install_fork_handlers();
        let signals = sys::SignalsBlocked::new();
        let mut spins = 0u32;
        // Acquire: pairs with the Release in `Locked::drop`.
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                core::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let mut state = Locked {
            pool: self,
            _signals: signals,
        };
        #[cfg(any(test, feature = "__test-hooks"))]
        crate::test_hooks::pool_lock_taken();
        if state.ranges == 0 {
            state.ranges = sys::possible_cpus();
            // Relaxed: see `ranges`; the item that makes a reader look is published
            // later, with Release.
            RANGES.store(state.ranges, Ordering::Relaxed);
        }
        state
    }

    /// A new item of `layout`, zero in every range.
    ///
    /// # Panics
    ///
    /// If the alignment is larger than a page, or the address space is exhausted
    /// (`mmap` fails).
    pub(crate) fn alloc(&self, layout: Layout) -> Item {
        Self::check_align(layout);
        let mut state = self.lock();
        let item = Self::alloc_locked(&mut state, layout);
        drop(state);
        item.unwrap_or_else(|refused| address_space_exhausted(refused))
    }

    /// The item `dest` points to, allocating one of `layout` and storing its CPU-0
    /// address there (Release: its zeroing is visible to whoever reads it with Acquire)
    /// if `dest` is still null. Checked and stored under the lock, so of two first uses
    /// that race, one allocates and the other finds its item: neither frees an item,
    /// which could call the system allocator (see the module docs), from a signal
    /// handler too.
    ///
    /// # Panics
    ///
    /// As [`alloc`](Pool::alloc).
    pub(crate) fn alloc_once<P>(&self, dest: &AtomicPtr<P>, layout: Layout) -> NonNull<P> {
        Self::check_align(layout);
        // Acquire (both): pairs with the Release store below, made by an earlier holder.
        if let Some(found) = NonNull::new(dest.load(Ordering::Acquire)) {
            return found; // no lock, no system calls
        }
        let mut state = self.lock();
        if let Some(found) = NonNull::new(dest.load(Ordering::Acquire)) {
            return found;
        }
        let item = Self::alloc_locked(&mut state, layout);
        let base = item.map(|item| item.base().cast::<P>());
        if let Ok(base) = base {
            // Release: the item's zeroing before its address.
            dest.store(base.as_ptr(), Ordering::Release);
        }
        drop(state);
        base.unwrap_or_else(|refused| address_space_exhausted(refused))
    }

    fn check_align(layout: Layout) {
        assert!(
            layout.align() <= 4096,
            "cpulocal pool: alignment {} is larger than a page",
            layout.align()
        );
    }

    /// [`alloc`](Pool::alloc) under the lock, or the bytes that `mmap` refused and why:
    /// the caller panics once it gave the lock back (formatting the message allocates).
    fn alloc_locked(state: &mut Locked<'_>, layout: Layout) -> Result<Item, (usize, sys::Errno)> {
        let size = layout.size().max(1);
        let shift = shift_for(layout);
        let ranges = state.ranges;
        if shift != STRIDE_SHIFT {
            let stride = 1usize << shift;
            let base = sys::map_lazy(stride * ranges).map_err(|e| (stride * ranges, e))?;
            state.large_chunks += 1;
            state.large_bytes += stride * ranges;
            state.live_items += 1;
            state.live_bytes += size;
            return Ok(Item { base, shift });
        }
        let key = (size, layout.align());
        let reused = state
            .free
            .iter_mut()
            .find(|list| list.key == key)
            .and_then(|list| list.offsets.pop());
        let base = match reused {
            Some(base) => {
                state.free_items -= 1;
                base
            }
            None => {
                let mut offset = state.next.next_multiple_of(layout.align());
                if size <= LINE && offset / LINE != (offset + size - 1) / LINE {
                    offset = offset.next_multiple_of(LINE);
                }
                if state.newest_chunk == 0 || offset + size > STRIDE {
                    let chunk = sys::map_lazy(STRIDE * ranges).map_err(|e| (STRIDE * ranges, e))?;
                    state.newest_chunk = chunk.as_ptr() as usize;
                    state.chunks += 1;
                    offset = 0;
                }
                state.next = offset + size;
                state.newest_chunk + offset
            }
        };
        state.live_items += 1;
        state.live_bytes += size;
        Ok(Item {
            // SAFETY: chunk bases come from `mmap`, which never returns null, and
            // offsets stay inside the chunk.
            base: unsafe { NonNull::new_unchecked(base as *mut u8) },
            shift,
        })
    }

    /// Gives `item` back: zeroes it in every range and makes its offset available again.
    ///
    /// # Safety
    ///
    /// `item` came from [`alloc`](Pool::alloc) of this pool with this `layout`, was not
    /// freed since, and nothing uses any of its copies any more (their values, if they
    /// need dropping, have been dropped).
    pub(crate) unsafe fn free(&self, item: Item, layout: Layout) {
        let size = layout.size().max(1);
        // Set before any item existed (see `ranges`).
        let ranges = ranges();
        if item.shift != STRIDE_SHIFT {
            let mut state = self.lock();
            state.live_items -= 1;
            state.live_bytes -= size;
            state.large_chunks -= 1;
            state.large_bytes -= (1usize << item.shift) * ranges;
            drop(state);
            // SAFETY: a large item is its own mapping of `ranges` strides, unused now
            // (the caller's contract).
            unsafe { sys::unmap(item.base, (1usize << item.shift) * ranges) };
            return;
        }
        // Outside the lock: the item is ours alone (the caller's contract).
        for cpu in 0..ranges {
            // SAFETY: the copy for `cpu` lies inside the chunk (offset + size <= STRIDE),
            // and nobody uses it any more (the caller's contract).
            unsafe { zero_if_needed(item.at(cpu), size) };
        }
        let key = (size, layout.align());
        // Storage for the free lists, allocated with the lock free whenever the lists
        // need more, and then the look again; what they no longer need is freed after
        // the lock is given back.
        let mut spare_lists: Vec<FreeList> = Vec::new();
        let mut spare_offsets: Vec<usize> = Vec::new();
        loop {
            let mut state = self.lock();
            let lists = &mut state.free;
            let found = lists.iter().position(|list| list.key == key);
            if found.is_none() {
                if let Err(want) = room_for_one_more(lists, &mut spare_lists, 4) {
                    drop(state);
                    spare_lists = Vec::with_capacity(want);
                    continue;
                }
            }
            let index = found.unwrap_or_else(|| {
                lists.push(FreeList {
                    key,
                    offsets: core::mem::take(&mut spare_offsets),
                });
                lists.len() - 1
            });
            let offsets = &mut lists[index].offsets;
            if let Err(want) = room_for_one_more(offsets, &mut spare_offsets, 8) {
                drop(state);
                spare_offsets = Vec::with_capacity(want);
                continue;
            }
            offsets.push(item.base.as_ptr() as usize);
            state.free_items += 1;
            state.live_items -= 1;
            state.live_bytes -= size;
            drop(state);
            return;
        }
    }

    fn stats(&self) -> Stats {
        let state = self.lock();
        Stats {
            ranges: state.ranges,
            chunks: state.chunks,
            large_chunks: state.large_chunks,
            live_items: state.live_items,
            live_bytes_per_cpu: state.live_bytes,
            free_items: state.free_items,
            reserved_bytes: state.chunks * STRIDE * state.ranges + state.large_bytes,
        }
    }

    /// How the pool's ranges are indexed.
    #[allow(dead_code)]
    pub(crate) fn index(&self) -> Index {
        self.index
    }
}

impl core::fmt::Debug for Pool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Pool")
            .field("index", &self.index)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Makes room in `v` for one more element without allocating: if `v` is full, its
/// elements move into `spare` (empty, allocated beforehand) when that has room for them
/// and one more, and the two swap (`spare` then holds the old storage, to be freed
/// after the lock is given back). `Err(capacity)`: `spare` is too small; allocate one
/// of that capacity with the lock free and try again.
fn room_for_one_more<T>(v: &mut Vec<T>, spare: &mut Vec<T>, least: usize) -> Result<(), usize> {
    if v.len() < v.capacity() {
        return Ok(());
    }
    if spare.capacity() <= v.len() {
        return Err((v.len() * 2).max(least));
    }
    spare.append(v);
    core::mem::swap(v, spare);
    Ok(())
}

/// The panic of an allocation whose `mmap` of `bytes` failed, raised with the lock free.
#[cold]
fn address_space_exhausted((bytes, error): (usize, sys::Errno)) -> ! {
    panic!("cpulocal pool: cannot reserve {bytes} bytes: {error}")
}

/// Zeroes `size` bytes at `p`, writing only if some byte is not zero already, so a page
/// that was never written stays unpopulated.
///
/// # Safety
///
/// `p` is valid for reads and writes of `size` bytes, and nobody else accesses them.
unsafe fn zero_if_needed(p: *mut u8, size: usize) {
    // SAFETY: the caller's contract.
    let bytes = unsafe { core::slice::from_raw_parts(p, size) };
    if bytes.iter().any(|&b| b != 0) {
        // SAFETY: the caller's contract.
        unsafe { p.write_bytes(0, size) };
    }
}

/// Registers (once per process) the `pthread_atfork` handlers that keep the pools'
/// locks consistent across `fork`.
pub(crate) fn install_fork_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are `extern "C"` functions without arguments that only
        // touch the pools' lock words; registering them has no other precondition.
        let r =
            unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork)) };
        // Without the handlers a fork racing an allocation could wedge the child's
        // next allocation; pthread_atfork fails only when out of memory.
        assert_eq!(r, 0, "pthread_atfork failed");
    });
}

/// The signal mask `before_fork` saved: it blocks every signal while it holds the locks,
/// as `Pool::lock` does.
struct ForkSignals(UnsafeCell<Option<sys::SignalsBlocked>>);

// SAFETY: only the thread that holds both pools' locks (between `before_fork` and
// `after_fork`) touches the cell.
unsafe impl Sync for ForkSignals {}

static FORK_SIGNALS: ForkSignals = ForkSignals(UnsafeCell::new(None));

/// Before `fork`: takes both pools' locks (always in this order), so neither is held by
/// a thread that will not exist in the child.
extern "C" fn before_fork() {
    let signals = sys::SignalsBlocked::new();
    for pool in [&BY_CPU, &BY_MM_CID] {
        // Acquire: pairs with the Release of the last holder.
        while pool
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
    }
    // SAFETY: this thread holds both locks (see `ForkSignals`).
    unsafe { *FORK_SIGNALS.0.get() = Some(signals) };
}

/// After `fork`, in the parent and in the child: releases what `before_fork` took, then
/// restores the signal mask.
extern "C" fn after_fork() {
    // SAFETY: this thread holds both locks (see `ForkSignals`).
    let signals = unsafe { (*FORK_SIGNALS.0.get()).take() };
    for pool in [&BY_MM_CID, &BY_CPU] {
        // Release: pairs with the Acquire of the next holder.
        pool.locked.store(false, Ordering::Release);
    }
    drop(signals);
}
