//! The restartable primitives, for experts building their own per-CPU structures.
//!
//! Each primitive acts on words that belong to one CPU, takes the CPU the caller
//! believes it is on (read with [`current_cpu`](crate::current_cpu) just before), and
//! returns an [`Outcome`]: committed, compare failed, or aborted (retry after re-reading
//! the CPU). Nothing a primitive does before its final store is visible as a result to
//! other threads.
//!
//! | primitive | with rseq | in the fallback |
//! |---|---|---|
//! | [`add`] | one `add` to memory, no `lock` prefix | load + store under the word's stripe lock |
//! | [`compare_store`] | compare, store | the same, under the stripe lock |
//! | [`pop`] | load, compare-not-equal, load at offset, store | the same, under the stripe lock |
//! | [`compare_try_store_release`] | compare, try-store, store | the same, under the stripe lock |
//! | [`compare_memcpy_store_release`] | compare, `memcpy`, store | the same, under the stripe lock |
//! | [`slab_push`] | guard check, bound check, try-store, store | the same, under the stripe lock |
//! | [`slab_pop`] | guard check, bound check, load, store | the same, under the stripe lock |
//!
//! Which column runs is decided once per process ([`crate::mechanism`]); callers never
//! branch on it. Item 3 of the contract below is the one case where a primitive
//! reports [`Outcome::Aborted`] without being interrupted.
//!
//! ```
//! use core::sync::atomic::{AtomicUsize, Ordering};
//! use cpulocal::ops::{self, Outcome};
//!
//! // One word per possible CPU, each written only through primitives, and one shared
//! // word for the slow path (a debugger single-stepping aborts every attempt).
//! let words: Vec<AtomicUsize> = (0..cpulocal::possible_cpus()).map(|_| AtomicUsize::new(0)).collect();
//! let slow = AtomicUsize::new(0);
//! let mut committed = false;
//! for _attempt in 0..8 {
//!     let cpu = cpulocal::current_cpu();
//!     // SAFETY: every write to `words[cpu]` is made by a primitive that expects `cpu`.
//!     // (Primitives take the CPU as the kernel's `u32`, which they compare with
//!     // `cpu_id_start`; the structures' APIs take `usize`, like `current_cpu()`.)
//!     match unsafe { ops::add(words[cpu].as_ptr(), 5, cpu as u32) } {
//!         Outcome::Committed(()) => {
//!             committed = true;
//!             break;
//!         }
//!         Outcome::Aborted => continue,
//!         Outcome::CompareFailed => unreachable!("add does not compare"),
//!     }
//! }
//! if !committed {
//!     slow.fetch_add(5, Ordering::Relaxed);
//! }
//! let total: usize = words.iter().map(|w| w.load(Ordering::Relaxed)).sum::<usize>()
//!     + slow.load(Ordering::Relaxed);
//! assert_eq!(total, 5);
//! ```
//!
//! # The contract every primitive shares
//!
//! 1. Every word a primitive writes (`v`, and `v2` / `dst` where present) is valid,
//!    aligned, and written by nothing but primitives that name the same CPU `cpu` (or by
//!    code that excludes them, such as a per-CPU lock taken through them).
//! 2. Readers on other threads read those words atomically (e.g. through
//!    [`AtomicUsize`](core::sync::atomic::AtomicUsize)), and treat tentative stores
//!    (`v2`, `dst`) as final only after they have seen the commit of `v`.
//! 3. In a process that uses rseq, a thread that could not register gets
//!    [`Outcome::Aborted`] every time: loops must be bounded and end in a slow path that
//!    does not use the primitives (as cpulocal's structures do).

pub use crate::arch::Outcome;
use crate::{arch, fallback, thread};

/// `*v += count` (wrapping) on `cpu`.
///
/// # Safety
///
/// The [contract](self#the-contract-every-primitive-shares).
#[inline]
pub unsafe fn add(v: *mut usize, count: usize, cpu: u32) -> Outcome {
    match thread::current() {
        // SAFETY: `rseq` is this thread's area; the rest is the caller's contract.
        Some(rseq) => unsafe { arch::add(rseq.as_ptr(), v, count, cpu) },
        // SAFETY: the caller's contract.
        None => unsafe { fallback::add(v, count) },
    }
}

/// `if *v == expect { *v = newv }` on `cpu`; [`Outcome::CompareFailed`] otherwise.
///
/// # Safety
///
/// The [contract](self#the-contract-every-primitive-shares).
#[inline]
pub unsafe fn compare_store(v: *mut usize, expect: usize, newv: usize, cpu: u32) -> Outcome {
    match thread::current() {
        // SAFETY: `rseq` is this thread's area; the rest is the caller's contract.
        Some(rseq) => unsafe {
            arch::compare_store::<{ arch::CPU_ID_FIELD }>(rseq.as_ptr(), v, expect, newv, cpu)
        },
        // SAFETY: the caller's contract.
        None => unsafe { fallback::compare_store(v, expect, newv) },
    }
}

/// List pop on `cpu`: if `*v != expect_not`, sets `*v` to the word `offset` bytes past
/// the old `*v` and returns the old `*v`; [`Outcome::CompareFailed`] when `*v ==
/// expect_not` (the empty list).
///
/// Free of ABA: no other primitive on `cpu` can slip between the load of the head and
/// the commit.
///
/// # Safety
///
/// The [contract](self#the-contract-every-primitive-shares), and every value of `*v`
/// other than `expect_not` is an address with a readable, aligned `usize` at `offset`,
/// that stays readable while it is on the list.
#[inline]
pub unsafe fn pop(v: *mut usize, expect_not: usize, offset: isize, cpu: u32) -> Outcome<usize> {
    match thread::current() {
        // SAFETY: `rseq` is this thread's area; the rest is the caller's contract.
        Some(rseq) => unsafe { arch::pop(rseq.as_ptr(), v, expect_not, offset, cpu) },
        // SAFETY: the caller's contract.
        None => unsafe { fallback::pop(v, expect_not, offset) },
    }
}

/// Two-store commit on `cpu`: `if *v == expect { *v2 = newv2; *v = newv }`, the second
/// store with release ordering.
///
/// # Safety
///
/// The [contract](self#the-contract-every-primitive-shares).
#[inline]
pub unsafe fn compare_try_store_release(
    v: *mut usize,
    expect: usize,
    v2: *mut usize,
    newv2: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    match thread::current() {
        // SAFETY: `rseq` is this thread's area; the rest is the caller's contract.
        Some(rseq) => unsafe {
            arch::compare_try_store_release(rseq.as_ptr(), v, expect, v2, newv2, newv, cpu)
        },
        // SAFETY: the caller's contract.
        None => unsafe { fallback::compare_try_store_release(v, expect, v2, newv2, newv) },
    }
}

/// Buffer push on `cpu`: `if *v == expect { memcpy(dst, src, len); *v = newv }`, the
/// last store with release ordering.
///
/// # Safety
///
/// The [contract](self#the-contract-every-primitive-shares), and `src` is readable and
/// `dst` writable for `len` bytes, without overlap.
#[inline]
#[allow(clippy::too_many_arguments)]
pub unsafe fn compare_memcpy_store_release(
    v: *mut usize,
    expect: usize,
    dst: *mut u8,
    src: *const u8,
    len: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    match thread::current() {
        // SAFETY: `rseq` is this thread's area; the rest is the caller's contract.
        Some(rseq) => unsafe {
            arch::compare_memcpy_store_release(rseq.as_ptr(), v, expect, dst, src, len, newv, cpu)
        },
        // SAFETY: the caller's contract.
        None => unsafe { fallback::compare_memcpy_store_release(v, expect, dst, src, len, newv) },
    }
}

/// Per-CPU slab push on `cpu` (tcmalloc's layout): `hdr` is `{current, end, begin,
/// guard}`; unless `guard` is non-zero ([`Outcome::Aborted`]) or `current == end`
/// ([`Outcome::CompareFailed`], full), stores `item` at `current` and advances
/// `current` by one word (the commit).
///
/// ```
/// use cpulocal::ops::{self, Outcome};
/// let mut entries = [0usize; 2];
/// let begin = entries.as_mut_ptr() as usize;
/// let mut hdr = [begin, begin + 16, begin, 0];
/// let guard = &raw const hdr[3];
/// let mut pushed = 0;
/// for item in [7, 8, 9] {
///     for _attempt in 0..8 {
///         let cpu = cpulocal::current_cpu() as u32;
///         // SAFETY: `hdr` and `entries` are ours, written only through these primitives.
///         match unsafe { ops::slab_push(hdr.as_mut_ptr(), guard, item, cpu) } {
///             Outcome::Committed(()) => { pushed += 1; break }
///             Outcome::CompareFailed => break, // full
///             Outcome::Aborted => continue,
///         }
///     }
/// }
/// // A single-stepping debugger could abort every attempt; otherwise two fit.
/// assert!(pushed <= 2);
/// ```
///
/// # Safety
///
/// The [contract](self#the-contract-every-primitive-shares) for `hdr[0]`, and: `hdr`
/// points to four words, `guard` is readable, and the words `begin..end` are writable
/// entries written only by these primitives on `cpu` (or under a lock that sets
/// `guard` and excludes them).
#[inline]
pub unsafe fn slab_push(hdr: *mut usize, guard: *const usize, item: usize, cpu: u32) -> Outcome {
    match thread::current() {
        // SAFETY: `rseq` is this thread's area; the rest is the caller's contract.
        Some(rseq) => unsafe { arch::slab_push(rseq.as_ptr(), guard, hdr, item, cpu) },
        // SAFETY: the caller's contract.
        None => unsafe { fallback::slab_push(hdr, guard, item) },
    }
}

/// Per-CPU slab pop on `cpu`: unless `guard` is non-zero ([`Outcome::Aborted`]) or
/// `current == begin` ([`Outcome::CompareFailed`], empty), moves `current` back one
/// word (the commit) and returns the item stored there.
///
/// # Safety
///
/// As for [`slab_push`].
#[inline]
pub unsafe fn slab_pop(hdr: *mut usize, guard: *const usize, cpu: u32) -> Outcome<usize> {
    match thread::current() {
        // SAFETY: `rseq` is this thread's area; the rest is the caller's contract.
        Some(rseq) => unsafe { arch::slab_pop(rseq.as_ptr(), guard, hdr, cpu) },
        // SAFETY: the caller's contract.
        None => unsafe { fallback::slab_pop(hdr, guard) },
    }
}
