//! The size classes: which class serves a request, the layout of a class's blocks, and
//! how many blocks of each class a CPU caches.

use core::alloc::Layout;

use super::slab::MAX_BATCH;

/// The largest request served from the size classes; larger ones go to the backend.
pub const MAX_SMALL: usize = 8192;

/// The largest alignment the size classes serve (every class block has it); requests
/// that need more go to the backend.
pub const CLASS_ALIGN: usize = 16;

/// Size classes of [`CpuCache`]: 16-byte steps to 128, then four per power of two.
///
/// [`CpuCache`]: super::CpuCache
pub(super) const CLASS_SIZES: [usize; 32] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192,
];

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
pub(super) fn class_of(size: usize) -> usize {
    SIZE_TO_CLASS[(size + 15) >> 4] as usize
}

/// Whether a request is served by the size classes.
#[inline(always)]
pub(super) fn is_small(layout: Layout) -> bool {
    layout.size() <= MAX_SMALL && layout.align() <= CLASS_ALIGN
}

/// The layout of every block of `class`, as allocated from the backend.
#[inline]
pub(super) fn class_layout(class: usize) -> Layout {
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
        // 32 KiB for the small classes too: a program that builds and drops a document
        // of a few thousand small blocks (alloc_compare's serde_json workload) then finds
        // them in the CPU's cache instead of going back to the backend. A cap of 256
        // (4 KiB of 16-byte blocks) made that workload 1.4x slower than glibc alone at 2
        // threads; with 2048, 1.05x.
        if cap > 2048 {
            cap = 2048;
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
///
/// [`CpuCache`]: super::CpuCache
pub(super) static CPU_CACHE_SPECS: [ClassSpec; 32] = cpu_cache_specs();

/// The slab stride of [`CPU_CACHE_SPECS`]'s regions, for the fast paths.
pub(super) const CPU_CACHE_SHIFT: u32 = super::slab::slab_shift(&cpu_cache_specs());

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::transfer::{TRANSFER_BATCHES, TRANSFER_SLOTS};

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
