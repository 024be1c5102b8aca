//! The primitives without rseq: the same meaning, serialised by striped spinlocks.
//!
//! Used when the *process* cannot use rseq ([`crate::Mechanism::Fallback`]). Every
//! primitive takes the spinlock of the stripe its target word `v` hashes to, does its
//! loads and stores with atomics (the commit a `Release` store), and releases the lock.
//! Because every writer of `v` takes the same lock, each primitive is atomic with respect
//! to every other primitive on `v`, from any CPU: the "expected CPU" is not needed and is
//! ignored. A lock rather than one `compare_exchange` per primitive is what keeps the
//! multi-word primitives (two-store commit, buffer push) and the list pop (ABA) correct.
//!
//! A signal handler that interrupts a primitive and needs the same stripe on the same
//! thread gets [`Outcome::Aborted`] instead of a deadlock. In a process that *does* use
//! rseq, a thread that could not register also gets `Aborted`: atomics here would not
//! exclude the plain stores of the sequences on other threads.

use core::cell::Cell;
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicUsize, Ordering};

use crate::arch::Outcome;
use crate::cache_padded::CachePadded;
use crate::thread;

const STRIPES: usize = 64;

#[allow(clippy::declare_interior_mutable_const)]
const UNLOCKED: CachePadded<AtomicBool> = CachePadded::new(AtomicBool::new(false));
static LOCKS: [CachePadded<AtomicBool>; STRIPES] = [UNLOCKED; STRIPES];

thread_local! {
    /// The stripe this thread holds (`usize::MAX`: none), to detect re-entry from a
    /// signal handler.
    static HELD: Cell<usize> = const { Cell::new(usize::MAX) };
}

struct StripeGuard {
    stripe: usize,
    previously_held: usize,
}

impl StripeGuard {
    /// Locks the stripe of `v`, or `None` when this primitive must report `Aborted`.
    fn lock(v: *const usize) -> Option<Self> {
        if thread::usable_size_now() != 0 {
            // The process uses rseq; this thread alone cannot.
            return None;
        }
        // Words of one cache line share a stripe; the multiply spreads lines.
        let stripe = ((v as usize >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) % STRIPES;
        let previously_held = HELD.get();
        if previously_held == stripe {
            return None;
        }
        let lock = &LOCKS[stripe];
        // Noted before the lock is taken, and restored after it is given back: a handler
        // arriving anywhere in between finds the stripe noted and gets `Aborted`. (Noted
        // after the exchange, a handler between the two spun for ever on a lock its own
        // thread held.) A handler arriving while the stripe is only waited for gets
        // `Aborted` too: it cannot tell, and waiting could be for ever.
        HELD.set(stripe);
        compiler_fence(Ordering::SeqCst);
        let mut spins = 0u32;
        // Acquire: pairs with the Release store in `drop`, so the previous holder's
        // writes to the word are visible here.
        while lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                core::hint::spin_loop();
            } else {
                // The holder may be preempted (2 CPUs, many threads): let it run.
                std::thread::yield_now();
            }
        }
        #[cfg(any(test, feature = "__test-hooks"))]
        crate::test_hooks::stripe_window();
        Some(StripeGuard {
            stripe,
            previously_held,
        })
    }
}

impl Drop for StripeGuard {
    fn drop(&mut self) {
        #[cfg(any(test, feature = "__test-hooks"))]
        crate::test_hooks::stripe_window();
        // Release: pairs with the Acquire in `lock`.
        LOCKS[self.stripe].store(false, Ordering::Release);
        // After the release: see `lock`.
        compiler_fence(Ordering::SeqCst);
        HELD.set(self.previously_held);
    }
}

/// # Safety
///
/// `v` is valid for atomic access as a `usize` for the duration of the call.
unsafe fn word<'a>(v: *mut usize) -> &'a AtomicUsize {
    // SAFETY: the caller's contract; AtomicUsize has the layout of usize.
    unsafe { AtomicUsize::from_ptr(v) }
}

/// Fallback of [`crate::ops::add`].
///
/// # Safety
///
/// As for [`crate::ops::add`].
pub(crate) unsafe fn add(v: *mut usize, count: usize) -> Outcome {
    let Some(_guard) = StripeGuard::lock(v) else {
        return Outcome::Aborted;
    };
    // SAFETY: the caller's contract.
    let w = unsafe { word(v) };
    w.store(
        w.load(Ordering::Relaxed).wrapping_add(count),
        Ordering::Release,
    );
    Outcome::Committed(())
}

/// Fallback of [`crate::ops::compare_store`].
///
/// # Safety
///
/// As for [`crate::ops::compare_store`].
pub(crate) unsafe fn compare_store(v: *mut usize, expect: usize, newv: usize) -> Outcome {
    let Some(_guard) = StripeGuard::lock(v) else {
        return Outcome::Aborted;
    };
    // SAFETY: the caller's contract.
    let w = unsafe { word(v) };
    if w.load(Ordering::Relaxed) != expect {
        return Outcome::CompareFailed;
    }
    w.store(newv, Ordering::Release);
    Outcome::Committed(())
}

/// Fallback of [`crate::ops::pop`].
///
/// # Safety
///
/// As for [`crate::ops::pop`].
pub(crate) unsafe fn pop(v: *mut usize, expect_not: usize, offset: isize) -> Outcome<usize> {
    let Some(_guard) = StripeGuard::lock(v) else {
        return Outcome::Aborted;
    };
    // SAFETY: the caller's contract.
    let w = unsafe { word(v) };
    let head = w.load(Ordering::Acquire);
    if head == expect_not {
        return Outcome::CompareFailed;
    }
    // SAFETY: the caller guarantees `head + offset` is readable; the node is not
    // freed while it is on the list, and the lock keeps it on the list.
    let next = unsafe { word((head as *mut u8).wrapping_offset(offset).cast()) };
    w.store(next.load(Ordering::Relaxed), Ordering::Release);
    Outcome::Committed(head)
}

/// Fallback of [`crate::ops::compare_try_store_release`].
///
/// # Safety
///
/// As for [`crate::ops::compare_try_store_release`].
pub(crate) unsafe fn compare_try_store_release(
    v: *mut usize,
    expect: usize,
    v2: *mut usize,
    newv2: usize,
    newv: usize,
) -> Outcome {
    let Some(_guard) = StripeGuard::lock(v) else {
        return Outcome::Aborted;
    };
    // SAFETY: the caller's contract covers both words.
    let (w, w2) = unsafe { (word(v), word(v2)) };
    if w.load(Ordering::Relaxed) != expect {
        return Outcome::CompareFailed;
    }
    w2.store(newv2, Ordering::Relaxed);
    // Release: orders the try-store before the commit, for readers that Acquire `v`.
    w.store(newv, Ordering::Release);
    Outcome::Committed(())
}

/// Fallback of [`crate::ops::compare_memcpy_store_release`].
///
/// # Safety
///
/// As for [`crate::ops::compare_memcpy_store_release`].
pub(crate) unsafe fn compare_memcpy_store_release(
    v: *mut usize,
    expect: usize,
    dst: *mut u8,
    src: *const u8,
    len: usize,
    newv: usize,
) -> Outcome {
    let Some(_guard) = StripeGuard::lock(v) else {
        return Outcome::Aborted;
    };
    // SAFETY: the caller's contract.
    let w = unsafe { word(v) };
    if w.load(Ordering::Relaxed) != expect {
        return Outcome::CompareFailed;
    }
    // SAFETY: the caller guarantees both ranges and that they do not overlap; nobody
    // reads `dst` as final before the Release store below.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, len) };
    w.store(newv, Ordering::Release);
    Outcome::Committed(())
}

/// Fallback of [`crate::ops::slab_push`].
///
/// # Safety
///
/// As for [`crate::ops::slab_push`].
pub(crate) unsafe fn slab_push(hdr: *mut usize, guard: *const usize, item: usize) -> Outcome {
    let Some(_guard) = StripeGuard::lock(hdr) else {
        return Outcome::Aborted;
    };
    // SAFETY: the caller's contract covers the header words and the guard.
    let (current, end, lock) = unsafe { (word(hdr), word(hdr.add(1)), word(guard.cast_mut())) };
    if lock.load(Ordering::Acquire) != 0 {
        return Outcome::Aborted;
    }
    let cur = current.load(Ordering::Relaxed);
    if cur >= end.load(Ordering::Relaxed) {
        return Outcome::CompareFailed;
    }
    // SAFETY: `cur` is a free entry (below `end`), written only under this stripe.
    unsafe { word(cur as *mut usize) }.store(item, Ordering::Relaxed);
    current.store(cur + 8, Ordering::Release);
    Outcome::Committed(())
}

/// Fallback of [`crate::ops::slab_pop`].
///
/// # Safety
///
/// As for [`crate::ops::slab_pop`].
pub(crate) unsafe fn slab_pop(hdr: *mut usize, guard: *const usize) -> Outcome<usize> {
    let Some(_guard) = StripeGuard::lock(hdr) else {
        return Outcome::Aborted;
    };
    // SAFETY: the caller's contract covers the header words and the guard.
    let (current, begin, lock) = unsafe { (word(hdr), word(hdr.add(2)), word(guard.cast_mut())) };
    if lock.load(Ordering::Acquire) != 0 {
        return Outcome::Aborted;
    }
    let cur = current.load(Ordering::Relaxed);
    if cur <= begin.load(Ordering::Relaxed) {
        return Outcome::CompareFailed;
    }
    // SAFETY: `cur - 8` is an entry holding an item, written only under this stripe.
    let item = unsafe { word((cur - 8) as *mut usize) }.load(Ordering::Relaxed);
    current.store(cur - 8, Ordering::Release);
    Outcome::Committed(item)
}
