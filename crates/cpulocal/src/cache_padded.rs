//! A value alone on its cache line(s), so per-CPU slots never share one.
#![deny(unsafe_code)]

use core::ops::{Deref, DerefMut};

/// Pads and aligns `T` to 128 bytes: two 64-byte lines, because x86_64's adjacent-line
/// prefetcher and many aarch64 cores move lines in pairs, and a neighbour's slot on the
/// paired line would bounce as if shared.
///
/// ```
/// use cpulocal::CachePadded;
/// let slots = [CachePadded::new(1u64), CachePadded::new(2u64)];
/// assert_eq!(core::mem::align_of_val(&slots[0]), 128);
/// assert_eq!(*slots[1], 2);
/// ```
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, Hash)]
#[repr(align(128))]
pub struct CachePadded<T> {
    value: T,
}

impl<T> CachePadded<T> {
    /// Pads `value`.
    #[inline]
    pub const fn new(value: T) -> Self {
        CachePadded { value }
    }

    /// The padded value.
    #[inline]
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> Deref for CachePadded<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for CachePadded<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}
