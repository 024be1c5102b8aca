//! The transfer caches (one bounded stack of blocks per class, behind a try-lock) and the
//! slow paths that move batches between a CPU's slab, its class's transfer cache and the
//! backend.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::slab::{Region, Step, LOCK_TRIES, MAX_BATCH};
use super::Backend;
use crate::arch::{self, Outcome};
use crate::remote::Attempt;

/// Batches a transfer cache holds per class.
pub(super) const TRANSFER_BATCHES: usize = 8;

/// Entries of a transfer cache (the largest batch times the batches).
pub(super) const TRANSFER_SLOTS: usize = MAX_BATCH * TRANSFER_BATCHES;

/// One class's transfer cache: a bounded stack of blocks behind a try-lock.
#[repr(C, align(64))]
pub(super) struct Transfer {
    pub(super) locked: AtomicBool,
    /// Entries in use; written under `locked`.
    pub(super) len: AtomicUsize,
    slots: [AtomicUsize; TRANSFER_SLOTS],
}

impl Region {
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
