//! The CPU-number cache: which CPU, node and concurrency id the calling thread has, in
//! one load from its `struct rseq`.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::{abi, sys, thread};

/// Loads a kernel-written `u32` of a `struct rseq`.
///
/// # Safety
///
/// `p` points into the calling thread's registered area (or glibc's), which is alive.
#[inline(always)]
pub(crate) unsafe fn load_u32(p: *const u32) -> u32 {
    // SAFETY: the caller's contract. The kernel rewrites the field between any two
    // instructions of this thread (on return to user space), so it is read with a
    // single atomic load; Relaxed because it orders nothing else.
    unsafe { AtomicU32::from_ptr(p.cast_mut()).load(Ordering::Relaxed) }
}

/// The `cpu_id_start` of the calling thread's area: the CPU a sequence should expect.
#[inline(always)]
pub(crate) fn cpu_id_start(rseq: core::ptr::NonNull<crate::abi::Rseq>) -> u32 {
    // SAFETY: `rseq` comes from `thread::current` (the calling thread's live area) or
    // from `thread::area_or_refusing` (that, or a refusing area, which lives for ever).
    unsafe { load_u32(&raw const (*rseq.as_ptr()).cpu_id_start) }
}

/// The `mm_cid` of the calling thread's area, if the kernel keeps it current there (the
/// registered feature size covers it): the mm_cid a sequence should expect.
#[inline(always)]
pub(crate) fn mm_cid_in_area(rseq: core::ptr::NonNull<crate::abi::Rseq>) -> Option<u32> {
    if thread::usable_size_now() >= abi::MM_CID_END {
        // SAFETY: `rseq` comes from `thread::current`: the calling thread's live area,
        // whose `mm_cid` the kernel fills (the usable size covers it).
        Some(unsafe { load_u32(&raw const (*rseq.as_ptr()).mm_cid) })
    } else {
        None
    }
}

/// The CPU the calling thread is running on.
///
/// With rseq this is one load of `cpu_id_start`, which the kernel keeps current on every
/// return to user space. Without rseq it is glibc's `sched_getcpu()` (the vDSO); if even
/// that fails (a sandbox without `getcpu`), 0. The answer may be stale as soon as it is
/// returned (the thread can migrate); the restartable primitives take it as the CPU they
/// *expect*, and abort when it no longer holds.
///
/// The first call in each thread registers it (see [`crate::mechanism`]); make it
/// outside signal handlers, e.g. with [`register_current_thread`](crate::register_current_thread).
///
/// ```
/// let cpu = cpulocal::current_cpu();
/// assert!(cpu < cpulocal::possible_cpus());
/// ```
#[inline]
pub fn current_cpu() -> usize {
    match thread::current() {
        Some(rseq) => cpu_id_start(rseq) as usize,
        None => fallback_cpu() as usize,
    }
}

#[cold]
fn fallback_cpu() -> u32 {
    sys::sched_getcpu().unwrap_or(0)
}

/// The NUMA node of the CPU the calling thread is running on.
///
/// One load of `node_id` where the kernel fills it (feature size ≥ 24, Linux 6.3+);
/// otherwise the `getcpu` system call (slow: a few hundred ns), or 0 where that fails.
///
/// ```
/// let node = cpulocal::current_node();
/// assert!(node < 1024);
/// ```
#[inline]
pub fn current_node() -> u32 {
    if let Some(rseq) = thread::current() {
        if thread::usable_size_now() >= abi::NODE_ID_END {
            // SAFETY: `rseq` is the calling thread's live area, and the kernel fills
            // `node_id` (the usable size covers it).
            return unsafe { load_u32(&raw const (*rseq.as_ptr()).node_id) };
        }
    }
    sys::getcpu_syscall().map_or(0, |(_, node)| node)
}

/// The calling thread's memory-map concurrency id: a small number, unique among the
/// threads of this process that are running at the same time, below both the number of
/// threads and the number of possible CPUs. Per-"mm_cid" arrays stay as small as the
/// process's real concurrency.
///
/// One load of `mm_cid` where the kernel fills it (feature size ≥ 28, Linux 6.3+).
/// Elsewhere it returns [`current_cpu()`], which keeps the promise that matters (two
/// threads running at once never share it) but is bounded only by the possible CPUs.
///
/// ```
/// let cid = cpulocal::current_mm_cid();
/// assert!(cid < cpulocal::possible_cpus());
/// ```
#[inline]
pub fn current_mm_cid() -> usize {
    match thread::current().and_then(mm_cid_in_area) {
        Some(cid) => cid as usize,
        None => current_cpu(),
    }
}

/// The number of CPU ids the kernel may ever report (highest possible CPU + 1): the
/// length of every per-CPU array. Read once from `/sys/devices/system/cpu/possible`.
///
/// ```
/// assert!(cpulocal::possible_cpus() >= 1);
/// ```
#[inline]
pub fn possible_cpus() -> usize {
    sys::possible_cpus()
}
