//! `CpuCache` as the process's global allocator: the test harness, std's thread
//! machinery and these tests all allocate through it. Covered: blocks freed by other
//! threads and after their allocating thread exited, `realloc` across classes and to
//! and from large sizes, zero-sized and over-aligned layouts, `fork` while other threads
//! allocate (the child allocates freely), a single-threaded child that never registers
//! before allocating, and the fallback (`CPULOCAL_DISABLE_RSEQ`).

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use cpulocal::alloc::CpuCache;

/// The global allocator (with the `__global-cpu-cache` feature, `tests/common` declares
/// an identical one, and this instance serves the direct calls only).
#[cfg_attr(not(feature = "__global-cpu-cache"), global_allocator)]
static GLOBAL: CpuCache = CpuCache::new();

/// Allocation-heavy work with a checkable result: a map of strings, grown, read and
/// shrunk again.
fn churn(seed: u64, rounds: u64) -> u64 {
    let mut map = BTreeMap::new();
    let mut sum = 0u64;
    for i in 0..rounds {
        let k = (i.wrapping_mul(0x9e37_79b9) ^ seed) % 512;
        map.insert(k, format!("value {k} {}", "x".repeat((k % 40) as usize)));
        if i % 3 == 0 {
            if let Some(v) = map.remove(&((k + 7) % 512)) {
                sum += v.len() as u64;
            }
        }
    }
    sum + map.values().map(|v| v.len() as u64).sum::<u64>()
}

#[test]
fn work_gives_the_same_result_on_every_thread_and_across_threads() {
    let _serial = common::serial();
    let expected = churn(1, 20_000);
    let (tx, rx) = mpsc::channel::<Vec<String>>();
    let consumer = std::thread::spawn(move || {
        // Frees what the producers allocated.
        rx.iter()
            .map(|v| v.iter().map(String::len).sum::<usize>())
            .sum::<usize>()
    });
    let producers: Vec<_> = (0..3)
        .map(|t| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    tx.send((0..8).map(|j| format!("{t}-{i}-{j}")).collect())
                        .unwrap();
                }
                churn(1, 20_000)
            })
        })
        .collect();
    drop(tx);
    for p in producers {
        assert_eq!(p.join().unwrap(), expected);
    }
    assert!(consumer.join().unwrap() > 0);
}

#[test]
fn blocks_outlive_the_threads_that_allocated_them() {
    let _serial = common::serial();
    for _ in 0..50 {
        let handles: Vec<_> = (0..4)
            .map(|t| std::thread::spawn(move || vec![t as u8; 100 + t * 300]))
            .collect();
        let blocks: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (t, b) in blocks.iter().enumerate() {
            assert!(b.iter().all(|&x| x == t as u8));
        }
    }
}

#[test]
fn realloc_keeps_the_contents_across_classes_and_large_sizes() {
    let _serial = common::serial();
    let mut v: Vec<u8> = Vec::new();
    for i in 0..100_000u32 {
        v.push(i as u8);
    }
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u8));
    while v.len() > 3 {
        v.truncate(v.len() / 2);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u8));
    }
    // Within a class `realloc` keeps the block.
    let layout = Layout::from_size_align(40, 8).unwrap();
    // SAFETY: non-zero size; realloc and free with the layouts in force.
    unsafe {
        let p = GLOBAL.alloc(layout);
        p.write_bytes(7, 40);
        let q = GLOBAL.realloc(p, layout, 48);
        assert_eq!(p, q, "40 and 48 bytes share a class");
        assert!((0..40).all(|i| *q.add(i) == 7));
        GLOBAL.dealloc(q, Layout::from_size_align(48, 8).unwrap());
    }
}

#[test]
fn zero_sized_and_over_aligned_layouts_are_served() {
    let _serial = common::serial();
    for align in [1, 8, 16, 32, 64, 4096] {
        for size in [0, 1, 24, 100, 5000, 70_000] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: `GlobalAlloc` forbids zero sizes to callers in general, but
            // `CpuCache` documents that it serves them (as a 16-byte class block).
            unsafe {
                let p = GLOBAL.alloc(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "{layout:?}");
                p.write_bytes(1, size);
                GLOBAL.dealloc(p, layout);
                let z = GLOBAL.alloc_zeroed(layout);
                assert!((0..size).all(|i| *z.add(i) == 0), "{layout:?}");
                GLOBAL.dealloc(z, layout);
            }
        }
    }
    #[repr(align(128))]
    struct Padded(#[allow(dead_code)] u8);
    let boxes: Vec<Box<Padded>> = (0..100).map(|i| Box::new(Padded(i))).collect();
    assert!(boxes
        .iter()
        .all(|b| ((&raw const **b) as usize).is_multiple_of(128)));
}

#[test]
fn fork_while_other_threads_allocate() {
    let _serial = common::serial();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2 {
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(churn(t, 500));
                }
            });
        }
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(2));
            // SAFETY: the child only allocates (through the global allocator, which is
            // fork-safe: try-locks only), computes and leaves with `_exit`.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let ok = churn(5, 5_000) == churn(5, 5_000);
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "child status {status:#x}"
            );
        }
        stop.store(true, Ordering::Relaxed);
    });
}

#[test]
fn allocation_works_in_the_fallback() {
    let _serial = common::serial();
    common::in_fallback_child("allocation_works_in_the_fallback", || {
        let handles: Vec<_> = (0..3)
            .map(|t| std::thread::spawn(move || churn(t, 10_000)))
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), churn(t as u64, 10_000));
        }
    });
}

#[test]
fn allocation_works_with_cpulocals_own_registration_and_after_its_undoing_at_thread_exit() {
    let _serial = common::serial();
    let name =
        "allocation_works_with_cpulocals_own_registration_and_after_its_undoing_at_thread_exit";
    common::in_child(name, &[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")], || {
        // Thread-local destructors that free blocks run after cpulocal's own area may
        // have been unregistered; they are served by the slow paths.
        thread_local! {
            static KEEP: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let handles: Vec<_> = (0..3)
            .map(|t| {
                std::thread::spawn(move || {
                    KEEP.with(|k| k.borrow_mut().extend((0..100).map(|i| format!("{t}/{i}"))));
                    churn(t, 5_000)
                })
            })
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), churn(t as u64, 5_000));
        }
        if let cpulocal::Mechanism::Rseq { registrar, .. } = cpulocal::mechanism() {
            assert_eq!(registrar, cpulocal::Registrar::Own);
        }
    });
}
