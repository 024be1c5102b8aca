//! The promises of the module documentation about what reaches the backend: which
//! requests the classes serve, how many freed blocks the caches keep, and that a lock
//! is only ever tried (a fork child never waits for one its parent held).

use core::alloc::{GlobalAlloc, Layout};
use std::alloc::System;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::classes::{class_of, CPU_CACHE_SPECS};
use super::transfer::TRANSFER_BATCHES;
use super::CpuCache;

/// The system allocator, counting its blocks and noting the layouts it is asked for.
#[derive(Debug, Default)]
struct Recording {
    live: AtomicIsize,
    allocs: AtomicUsize,
    /// (size, align) of every `alloc`.
    layouts: Mutex<Vec<(usize, usize)>>,
}

impl Recording {
    fn take_layouts(&self) -> Vec<(usize, usize)> {
        std::mem::take(&mut *self.layouts.lock().unwrap())
    }
}

// SAFETY: passes every call to `System`; only counts and notes.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            self.live.fetch_add(1, Ordering::Relaxed);
            self.allocs.fetch_add(1, Ordering::Relaxed);
            self.layouts
                .lock()
                .unwrap()
                .push((layout.size(), layout.align()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocates `n` blocks of `layout` from `cache`, then frees them all.
fn alloc_then_free(cache: &CpuCache<Recording>, layout: Layout, n: usize) {
    // SAFETY: non-zero sizes; each block is freed once, with its layout.
    let blocks: Vec<*mut u8> = (0..n).map(|_| unsafe { cache.alloc(layout) }).collect();
    assert!(blocks.iter().all(|p| !p.is_null()));
    for p in blocks {
        // SAFETY: as above.
        unsafe { cache.dealloc(p, layout) };
    }
}

/// "Requests of at most `MAX_SMALL` bytes with an alignment of at most `CLASS_ALIGN` are
/// rounded up to one of 32 size classes; everything else goes straight to the backend",
/// and a class block is always one the backend allocated with the class's layout.
#[test]
fn large_and_over_aligned_requests_go_to_the_backend_as_they_are_and_class_blocks_with_the_class_layout(
) {
    let _delay = crate::tests::delay_shared();
    let cache = CpuCache::with_backend(Recording::default());
    let direct = [(8193, 8), (100_000, 16), (64, 32), (16, 4096)];
    for (size, align) in direct {
        alloc_then_free(&cache, Layout::from_size_align(size, align).unwrap(), 1);
        assert_eq!(cache.backend().take_layouts(), [(size, align)]);
    }
    // Served by a class: every block the backend makes for them (a batch at a time) has
    // the class's size and an alignment of 16.
    for (size, align, class_size) in [(40, 8, 48), (8192, 1, 8192), (1, 16, 16), (130, 2, 160)] {
        alloc_then_free(&cache, Layout::from_size_align(size, align).unwrap(), 1);
        let layouts = cache.backend().take_layouts();
        assert!(
            !layouts.is_empty() && layouts.iter().all(|&l| l == (class_size, 16)),
            "{size} bytes aligned to {align}: {layouts:?}"
        );
    }
    assert!(cache.drain_all());
    assert_eq!(cache.backend().live.load(Ordering::Relaxed), 0);
}

/// "Per CPU and class at most `cap` blocks; per class at most 8 batches in the transfer
/// cache": of many blocks freed, the caches keep at most that, every other block goes
/// back to the backend at once; `drain_cpu` of every CPU leaves the transfer caches'
/// blocks only, and `drain_all` none.
#[test]
fn the_caches_keep_at_most_cap_blocks_per_cpu_and_8_batches_per_class_the_rest_goes_back() {
    let _delay = crate::tests::delay_shared();
    let cache = CpuCache::with_backend(Recording::default());
    let cpus = crate::possible_cpus();
    // The largest class (cap 16, batch 4) and a small one (cap 512, batch 32).
    for size in [8192, 64] {
        let spec = CPU_CACHE_SPECS[class_of(size)];
        let in_transfer = spec.batch * TRANSFER_BATCHES;
        let bound = spec.cap * cpus + in_transfer;
        alloc_then_free(
            &cache,
            Layout::from_size_align(size, 8).unwrap(),
            bound + 500,
        );
        let cached = cache.cached_blocks();
        assert!(cached <= bound, "{size}: {cached} cached, bound {bound}");
        let live = cache.backend().live.load(Ordering::Relaxed);
        assert_eq!(
            live, cached as isize,
            "{size}: every block not cached is back"
        );
        for cpu in 0..cpus {
            assert!(cache.drain_cpu(cpu));
        }
        let cached = cache.cached_blocks();
        assert!(
            cached <= in_transfer,
            "{size}: {cached} left after drain_cpu"
        );
        assert_eq!(
            cache.backend().live.load(Ordering::Relaxed),
            cached as isize
        );
        assert!(cache.drain_all());
        assert_eq!(cache.backend().live.load(Ordering::Relaxed), 0);
        cache.backend().take_layouts();
    }
}

/// "Locks are only ever tried: a thread that does not get one within a few hundred
/// spins uses `A` instead. A `fork` child that inherits a lock held by a thread of the
/// parent therefore never waits for it." With every CPU's slab and the class's transfer
/// cache locked at the fork, the child's allocations and frees of that class all go to
/// the backend, and none waits.
#[test]
fn a_fork_child_never_waits_for_a_lock_its_parent_held() {
    let _delay = crate::tests::delay_shared();
    let cache = CpuCache::with_backend(Recording::default());
    let layout = Layout::from_size_align(64, 8).unwrap();
    // Creates the region, the slab of this CPU and cached blocks in it.
    alloc_then_free(&cache, layout, 100);
    let region = cache
        .region
        .get()
        .expect("the region exists after an allocation");
    let locked: Vec<u32> = (0..region.ranges() as u32)
        .filter(|&cpu| region.lock_slab(cpu))
        .collect();
    let transfer = &region.transfer[class_of(64)].locked;
    // Relaxed: only the child, a copy of this process, looks at it.
    transfer.store(true, Ordering::Relaxed);
    let allocs_before = cache.backend().allocs.load(Ordering::Relaxed);
    let live_before = cache.backend().live.load(Ordering::Relaxed);
    // SAFETY: the child only allocates and frees through `cache` (the backend is glibc's
    // malloc, which is fork-safe, and a mutex no other thread touches), then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        alloc_then_free(&cache, layout, 100);
        let allocs = cache.backend().allocs.load(Ordering::Relaxed) - allocs_before;
        let live = cache.backend().live.load(Ordering::Relaxed) - live_before;
        // Every block from the backend and back to it: no cache could be used.
        let ok = allocs == 100 && live == 0;
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    // A child that waits for a lock never ends: give it far more than it needs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = 0;
    let ended = loop {
        // SAFETY: waits for our own child, without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break true;
        }
        assert_eq!(r, 0, "waitpid");
        if Instant::now() >= deadline {
            // SAFETY: our own child, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    transfer.store(false, Ordering::Release);
    locked.iter().for_each(|&cpu| region.unlock_slab(cpu));
    assert!(ended, "the fork child waited for a lock its parent held");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child's blocks did not all come from the backend: status {status:#x}"
    );
    assert!(cache.drain_all());
    assert_eq!(cache.backend().live.load(Ordering::Relaxed), 0);
}
