//! The [`GlobalAlloc`] implementation of [`CpuCache`]: the fast paths, and the slow
//! paths that create the region and go through it to the backend.

use core::alloc::{GlobalAlloc, Layout};

use super::classes::{class_of, is_small, CPU_CACHE_SHIFT, CPU_CACHE_SPECS};
use super::{Backend, CpuCache, Region, Through};

impl<A: GlobalAlloc> CpuCache<A> {
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
            // SAFETY: this thread's registered area.
            if let Some(p) = unsafe { r.pop_fast::<CPU_CACHE_SHIFT>(rseq, class) } {
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
            // SAFETY: this thread's registered area.
            if unsafe { r.push_fast::<CPU_CACHE_SHIFT>(rseq, class, ptr as usize) } {
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
