//! The per-CPU slabs: the region that holds them, their fast paths (one restartable
//! sequence each), batch moves, and the remote protocol (lock, fence) that sets up and
//! drains a CPU's slab.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use super::transfer::Transfer;
use super::{Backend, ClassSpec};
use crate::arch::{self, Outcome};
use crate::remote::{self, Attempt};
use crate::sys;

/// The most classes one region supports.
pub(crate) const MAX_CLASSES: usize = 32;

/// The largest batch moved between a slab and a transfer cache.
pub(crate) const MAX_BATCH: usize = 32;

/// How many times a lock is tried before the caller takes another path.
pub(super) const LOCK_TRIES: u32 = 256;

/// A class header in a slab: `{current, end, begin, guard}`, the layout the slab
/// sequences expect (see [`crate::ops::slab_push`]). While the slab is locked, `end` is
/// [`LOCKED_END`] and `begin` [`LOCKED_BEGIN`], so that the fast paths' bound checks
/// fail (a push finds the array full, a pop finds it empty) without a guard load of
/// their own, and `guard` is set for the batch sequences.
const HEADER_WORDS: usize = 4;
/// The words of a header after `current` (word 0).
const END_WORD: usize = 1;
const BEGIN_WORD: usize = 2;
const GUARD_WORD: usize = 3;
/// `end` and `begin` of a locked header (every `current` is at least the one and at most
/// the other).
const LOCKED_END: usize = 0;
const LOCKED_BEGIN: usize = usize::MAX;
/// Offset of the headers in a slab (the first line holds the slab's lock and ready words).
const HEADERS_OFFSET: usize = 64;

/// The start of an instance's region (zeroed by `mmap`; every field is valid as zero).
#[repr(C)]
pub(crate) struct Region {
    /// The region's length in bytes, for `munmap`.
    len: usize,
    /// Slabs (possible CPUs).
    ranges: usize,
    /// log2 of the distance between two CPUs' slabs.
    shift: u32,
    pub(super) classes: usize,
    pub(super) specs: [ClassSpec; MAX_CLASSES],
    /// Offset of each class's entries in a slab.
    offsets: [usize; MAX_CLASSES],
    pub(super) transfer: [Transfer; MAX_CLASSES],
}

/// The bytes before the first slab: the region header, rounded up to pages.
const SLABS_OFFSET: usize = core::mem::size_of::<Region>().next_multiple_of(4096);

/// log2 of the distance between two CPUs' slabs in a region for `specs`: the headers and
/// every class's entries, rounded up to a power of two of at least a page. A `const fn`,
/// so that the fast paths take it as a constant ([`Region::pop_fast`]).
pub(crate) const fn slab_shift(specs: &[ClassSpec]) -> u32 {
    let mut end = HEADERS_OFFSET + MAX_CLASSES * HEADER_WORDS * 8;
    let mut c = 0;
    while c < specs.len() {
        end += specs[c].cap * 8;
        c += 1;
    }
    let size = end.next_power_of_two();
    if size < 4096 {
        12
    } else {
        size.trailing_zeros()
    }
}

/// What one slow-path attempt on the current CPU's slab found.
pub(super) enum Step {
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
        let shift = slab_shift(specs);
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
    pub(super) fn header(slab: *mut u8, class: usize) -> *mut usize {
        slab.wrapping_add(HEADERS_OFFSET + class * HEADER_WORDS * 8)
            .cast()
    }

    /// The guard word of a header: non-zero while the slab is locked.
    #[inline(always)]
    pub(super) fn guard(header: *mut usize) -> *const usize {
        header.wrapping_add(GUARD_WORD)
    }

    /// Writes the words of header `hdr` that say whether its slab is locked: its bounds
    /// (`begin`, `end`), which the fast sequences check, and its `guard`, which the
    /// batch and explicit-CPU sequences check; `end` first, the guard last.
    ///
    /// # Safety
    ///
    /// `hdr` is a header of a slab of a live region; sequences only read these words.
    unsafe fn set_lock_words(
        hdr: *mut usize,
        (begin, end): (usize, usize),
        guard: usize,
        order: Ordering,
    ) {
        // SAFETY: the caller's contract; every writer and reader of these words uses
        // atomics (the sequences only read them).
        unsafe {
            AtomicUsize::from_ptr(hdr.add(END_WORD)).store(end, order);
            AtomicUsize::from_ptr(hdr.add(BEGIN_WORD)).store(begin, order);
            AtomicUsize::from_ptr(hdr.add(GUARD_WORD)).store(guard, order);
        }
    }

    /// The fast sequences' table for `class`: CPU 0's header (CPU `c`'s is `c << shift`
    /// bytes further) and the number of slabs.
    #[inline(always)]
    fn class_table(&self, class: usize) -> (*mut u8, usize) {
        (Self::header(self.slab(0), class).cast(), self.ranges)
    }

    /// `begin` and `end` of `class`'s array in `slab`, from the layout: what an unlocked
    /// header of a ready slab holds.
    #[inline]
    fn bounds(&self, slab: *mut u8, class: usize) -> (usize, usize) {
        let begin = slab as usize + self.offsets[class];
        (begin, begin + self.specs[class].cap * 8)
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

    /// The fast pop: one sequence on the slab of the CPU the thread runs on, which the
    /// sequence reads itself once its section is open; `None` on any failure. `SHIFT`
    /// is the region's [`slab_shift`], as a constant.
    ///
    /// # Safety
    ///
    /// `rseq` is the calling thread's registered area; `SHIFT` is the [`slab_shift`] of
    /// the specs the region was created for; the region holds pointers only (blocks,
    /// or `Box` pointers, dangling ones included), as its users do.
    #[inline(always)]
    pub(crate) unsafe fn pop_fast<const SHIFT: u32>(
        &self,
        rseq: NonNull<crate::abi::Rseq>,
        class: usize,
    ) -> Option<usize> {
        #[cfg(any(test, feature = "__test-hooks"))]
        if crate::test_hooks::slab_pop_broken() {
            let cpu = crate::cpu::cpu_id_start(rseq);
            if cpu as usize >= self.ranges {
                return None;
            }
            let hdr = Self::header(self.slab(cpu), class);
            // SAFETY: as below; the broken sequence touches the same words.
            let outcome = unsafe {
                arch::slab_pop_without_restart(rseq.as_ptr(), Self::guard(hdr), hdr, cpu)
            };
            return match outcome {
                Outcome::Committed(p) => Some(p),
                _ => None,
            };
        }
        debug_assert_eq!(SHIFT, self.shift);
        let (first, slabs) = self.class_table(class);
        let area = rseq.as_ptr();
        // The header and its entries are written only by sequences on their CPU and by
        // holders of the slab's lock, which lock the header's bounds and fence the CPU
        // first; a locked header, like a zeroed one (slab not ready), makes every
        // sequence fail its bound check without a store.
        // SAFETY: `area` is this thread's area (the caller's contract); see above; the
        // header of class `class` in slab `c < ranges` is `c << SHIFT` bytes past slab
        // 0's, inside the live region.
        let outcome = unsafe { arch::slab_pop_on_current_cpu::<SHIFT>(area, first, slabs) };
        match outcome {
            Outcome::Committed(p) => Some(p),
            _ => None,
        }
    }

    /// The fast push: one sequence on the slab of the CPU the thread runs on (as for
    /// [`Region::pop_fast`]); `false` on any failure.
    ///
    /// # Safety
    ///
    /// As for [`Region::pop_fast`].
    #[inline(always)]
    pub(crate) unsafe fn push_fast<const SHIFT: u32>(
        &self,
        rseq: NonNull<crate::abi::Rseq>,
        class: usize,
        block: usize,
    ) -> bool {
        debug_assert_eq!(SHIFT, self.shift);
        let (first, slabs) = self.class_table(class);
        // SAFETY: as in `pop_fast`.
        let outcome =
            unsafe { arch::slab_push_on_current_cpu::<SHIFT>(rseq.as_ptr(), first, slabs, block) };
        outcome == Outcome::Committed(())
    }

    /// Takes the lock of `cpu`'s slab (try only), locks every header's bounds and guard
    /// ([`Region::set_lock_words`]) and fences the CPU's sequences; `false` if somebody
    /// else holds it.
    pub(super) fn lock_slab(&self, cpu: u32) -> bool {
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
            let hdr = Self::header(slab, c);
            // SAFETY: a header of this slab.
            unsafe { Self::set_lock_words(hdr, (LOCKED_BEGIN, LOCKED_END), 1, Ordering::Relaxed) };
        }
        // Every sequence on `cpu` that read a bound (or a guard) before it was locked
        // either committed before this returns or is restarted and then sees it locked
        // (see `crate::remote`).
        if remote::fence_sequences_on(cpu).is_err() {
            // Without the fence the slab cannot be excluded: leave it alone (the caller
            // then uses the transfer cache or the backend; nothing was changed).
            self.unlock_slab(cpu);
            return false;
        }
        true
    }

    pub(super) fn unlock_slab(&self, cpu: u32) {
        let slab = self.slab(cpu);
        // A slab that is not ready keeps zero bounds: its `current` is not set up.
        let ready = Self::ready(slab);
        for c in 0..self.classes {
            let hdr = Self::header(slab, c);
            let (begin, end) = if ready { self.bounds(slab, c) } else { (0, 0) };
            // Release: pairs with the load-acquire of the bound (or the guard) in the
            // sequences, which they load before `current` (on x86_64 every load is an
            // acquire), so they see the headers written under the lock.
            // SAFETY: a header of this slab.
            unsafe { Self::set_lock_words(hdr, (begin, end), 0, Ordering::Release) };
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
                let (begin, _) = self.bounds(slab, c);
                // SAFETY: a header word of this slab; the lock and the fence exclude
                // every sequence on `cpu`, and readers elsewhere load it atomically. The
                // bounds are set by `unlock_slab`, now that the slab is ready.
                unsafe { AtomicUsize::from_ptr(hdr) }.store(begin, Ordering::Relaxed);
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
    pub(super) fn on_slab<R>(
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
    pub(super) fn pop_batch(&self, class: usize, out: &mut [usize]) -> usize {
        self.on_slab(|rseq, cpu, slab| {
            let hdr = Self::header(slab, class);
            // SAFETY: header words of a ready slab; read atomically, checked again by
            // the sequence's compare.
            let (cur, begin) = unsafe {
                (
                    AtomicUsize::from_ptr(hdr).load(Ordering::Relaxed),
                    AtomicUsize::from_ptr(hdr.add(BEGIN_WORD)).load(Ordering::Relaxed),
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
    pub(super) fn push_batch(&self, class: usize, blocks: &[usize]) -> bool {
        if blocks.is_empty() {
            return true;
        }
        self.on_slab(|rseq, cpu, slab| {
            let hdr = Self::header(slab, class);
            // SAFETY: as in `pop_batch`.
            let (cur, end) = unsafe {
                (
                    AtomicUsize::from_ptr(hdr).load(Ordering::Relaxed),
                    AtomicUsize::from_ptr(hdr.add(END_WORD)).load(Ordering::Relaxed),
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
            // Its bounds are locked: the real `begin` comes from the layout.
            let (begin, _) = self.bounds(slab, c);
            // SAFETY: the slab is locked and fenced: no sequence writes its headers or
            // entries until `unlock_slab`; the words are read and written atomically.
            unsafe {
                let current = AtomicUsize::from_ptr(hdr);
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
                // (From the layout: a locked header's `begin` is `LOCKED_BEGIN`.)
                let (begin, _) = self.bounds(slab, class);
                // SAFETY: a header word of a ready slab, read atomically.
                let cur = unsafe { AtomicUsize::from_ptr(hdr) }.load(Ordering::Relaxed);
                on_cpus += cur.saturating_sub(begin) / 8;
            }
        }
        (on_cpus, self.transfer[class].len.load(Ordering::Relaxed))
    }
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
