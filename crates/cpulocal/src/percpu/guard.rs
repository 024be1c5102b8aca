//! [`PerCpuGuard`]: a held slot of a [`PerCpu`], and its release.

use core::fmt;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

#[cfg(doc)]
use super::PerCpu;
use super::Slot;
use crate::remote;

/// The lock of one [`PerCpu`] slot, held; derefs to the slot's `T`. Unlocks on drop.
/// Not `Send`: the lock token is the owning thread's, so the guard cannot move to
/// another thread (nor be dropped there):
///
/// ```compile_fail
/// let counts = cpulocal::PerCpu::new(|_| 0u64);
/// let guard = counts.lock();
/// std::thread::scope(|s| {
///     s.spawn(move || drop(guard));
/// });
/// ```
pub struct PerCpuGuard<'a, T> {
    pub(super) slot: &'a Slot<T>,
    pub(super) index: usize,
    /// The thread's area if the fast path took the slot (which runs only with the
    /// asymmetric fence and when the thread held no other slot); 0 for every other path.
    pub(super) fast_area: usize,
    pub(super) _not_send: PhantomData<*const ()>,
}

// SAFETY: sharing the guard shares `&T` only (through Deref), which needs `T: Sync`.
unsafe impl<T: Sync> Sync for PerCpuGuard<'_, T> {}

impl<T> PerCpuGuard<'_, T> {
    /// The slot's index: the CPU (or mm_cid) it belongs to.
    pub fn cpu(&self) -> usize {
        self.index
    }
}

impl<T> Deref for PerCpuGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: we hold the slot's lock, so no other reference to its `T` exists, and
        // the slot is ready: `ensure_ready` ran before the guard was returned, or the fast
        // path took a `READY` word, which only a slot with its `T` is released to.
        unsafe { (*self.slot.value.get()).assume_init_ref() }
    }
}

impl<T> DerefMut for PerCpuGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: we hold the slot's lock, and `&mut self` makes this the only
        // reference through the guard; the slot is ready (as in `deref`).
        unsafe { (*self.slot.value.get()).assume_init_mut() }
    }
}

impl<T> Drop for PerCpuGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        if self.fast_area != 0 {
            self.slot.lock.unlock_ready_asymmetric();
            remote::note_released_fast(self.fast_area);
        } else {
            release_slow(&self.slot.lock);
        }
    }
}

/// The release of a slot taken by any path but the fast one. Out of line, so that the
/// drop stays small enough to be inlined where `with_cpu` is: with this inlined too, a
/// small change to the held-slot count made the compiler call the drop out of line, and
/// `with_cpu` took 2.23 ns instead of 1.69. (The lock, not the guard, is passed: a
/// guard passed by reference would have to live in memory.)
#[inline(never)]
fn release_slow(lock: &remote::CpuLock) {
    lock.unlock();
    remote::note_released();
}

impl<T: fmt::Debug> fmt::Debug for PerCpuGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerCpuGuard")
            .field("cpu", &self.index)
            .field("value", &**self)
            .finish()
    }
}
