//! Real programs on four global allocators: `cpulocal::alloc::CpuCache` (over glibc),
//! mimalloc, jemalloc and glibc, each as THE global allocator of a process of its own,
//! so that time and peak resident memory (`VmHWM`) belong to one allocator.
//!
//! ```text
//! cargo run --release -p cpulocal-cli --example alloc_compare [-- ROUNDS [WORKLOAD...]]
//! ```
//!
//! Without `ALLOC_COMPARE_CHILD` in the environment this is the driver: for every
//! workload and thread count (1, 2, 4) it runs the four allocators interleaved, ROUNDS
//! times (default 3), each in a child (this program again), and prints the median
//! ns/op and the median peak resident memory. Workloads:
//!
//! - `json`: each thread builds a serde_json document (200 records of strings, numbers
//!   and arrays), serialises it and parses it back, again and again;
//! - `btree`: each thread churns a `BTreeMap<u64, String>` (insert, overwrite, remove);
//! - `pairs64`: `Box<[u8; 64]>` made and dropped;
//! - `prodcons`: half the threads make `Vec<u8>`s of 16–256 bytes in batches of 64 and
//!   send them over a channel, the other half drop them (one thread: both);
//! - `larson`: a shared array of 4096 slots; each operation boxes 16–1024 bytes, swaps
//!   them into a random slot and drops what it displaced (freed by another thread than
//!   its allocator as often as not).
//!
//! The global allocator is chosen in the child at its first allocation, from
//! `ALLOC_COMPARE_ALLOCATOR`, read with `getenv` (no allocation), and never changes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::process::Command;
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
use std::time::Instant;

const ALLOCATORS: [&str; 4] = ["cpulocal", "mimalloc", "jemalloc", "glibc"];
const WORKLOADS: [&str; 5] = ["json", "btree", "pairs64", "prodcons", "larson"];
const THREADS: [usize; 3] = [1, 2, 4];

static CPU_CACHE: cpulocal::alloc::CpuCache = cpulocal::alloc::CpuCache::new();
static CHOICE: AtomicU8 = AtomicU8::new(0);

/// The global allocator: one of the four, fixed at the first allocation.
struct Switch;

#[inline(always)]
fn choice() -> u8 {
    match CHOICE.load(Ordering::Relaxed) {
        0 => decide(),
        c => c,
    }
}

#[cold]
fn decide() -> u8 {
    // SAFETY: a NUL-terminated name; getenv returns null or a NUL-terminated string.
    let value = unsafe { libc::getenv(c"ALLOC_COMPARE_ALLOCATOR".as_ptr()) };
    let c = if value.is_null() {
        4
    } else {
        // SAFETY: non-null getenv results are NUL-terminated.
        match unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes() {
            b"cpulocal" => 1,
            b"mimalloc" => 2,
            b"jemalloc" => 3,
            _ => 4,
        }
    };
    CHOICE.store(c, Ordering::Relaxed);
    c
}

macro_rules! dispatch {
    ($method:ident($($arg:expr),*)) => {
        match choice() {
            1 => CPU_CACHE.$method($($arg),*),
            2 => mimalloc::MiMalloc.$method($($arg),*),
            3 => tikv_jemallocator::Jemalloc.$method($($arg),*),
            _ => System.$method($($arg),*),
        }
    };
}

// SAFETY: every call goes to the same one of four allocators for the whole process
// (the choice is made before the first block exists and never changes).
unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { dispatch!(alloc(layout)) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { dispatch!(dealloc(ptr, layout)) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { dispatch!(alloc_zeroed(layout)) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { dispatch!(realloc(ptr, layout, new_size)) }
    }
}

#[global_allocator]
static GLOBAL: Switch = Switch;

fn main() {
    if let Ok(spec) = std::env::var("ALLOC_COMPARE_CHILD") {
        child(&spec);
        return;
    }
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let only: Vec<String> = args.collect();
    let exe = std::env::current_exe().expect("own path");
    println!(
        "{:<9} {:>3} {:<9} {:>10} {:>10} {:>13} {:>9}",
        "workload", "thr", "allocator", "ns/op", "vs cpuloc", "peak RSS KiB", "vs cpuloc"
    );
    for workload in WORKLOADS
        .iter()
        .filter(|w| only.is_empty() || only.iter().any(|o| o == *w))
    {
        for threads in THREADS {
            let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 4];
            for round in 0..rounds {
                // Interleaved, in a rotating order.
                for k in 0..4 {
                    let a = (k + round) % 4;
                    let out = Command::new(&exe)
                        .env("ALLOC_COMPARE_CHILD", format!("{workload} {threads}"))
                        .env("ALLOC_COMPARE_ALLOCATOR", ALLOCATORS[a])
                        .output()
                        .expect("run the child");
                    assert!(out.status.success(), "child failed: {out:?}");
                    let text = String::from_utf8_lossy(&out.stdout);
                    let mut f = text.split_whitespace().map(|x| x.parse::<f64>().unwrap());
                    samples[a].0.push(f.next().unwrap());
                    samples[a].1.push(f.next().unwrap());
                }
            }
            let medians: Vec<(f64, f64)> = samples
                .iter_mut()
                .map(|(ns, kib)| (median(ns), median(kib)))
                .collect();
            for (a, &(ns, kib)) in medians.iter().enumerate() {
                println!(
                    "{:<9} {:>3} {:<9} {:>10.1} {:>9.2}x {:>13.0} {:>8.2}x",
                    workload,
                    threads,
                    ALLOCATORS[a],
                    ns,
                    ns / medians[0].0,
                    kib,
                    kib / medians[0].1
                );
            }
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process so far, in KiB (`VmHWM`).
fn peak_rss_kib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

fn child(spec: &str) {
    let mut parts = spec.split_whitespace();
    let workload = parts.next().expect("workload").to_string();
    let threads: usize = parts.next().expect("threads").parse().expect("a number");
    let ops: u64 = match workload.as_str() {
        "json" => 300,
        "btree" => 200_000,
        "pairs64" => 2_000_000,
        "prodcons" => 500_000,
        "larson" => 500_000,
        other => panic!("unknown workload {other}"),
    };
    let start = Instant::now();
    match workload.as_str() {
        "prodcons" => prodcons(threads, ops),
        "larson" => larson(threads, ops),
        _ => std::thread::scope(|s| {
            for t in 0..threads {
                let workload = &workload;
                s.spawn(move || match workload.as_str() {
                    "json" => json(t as u64, ops),
                    "btree" => btree(t as u64, ops),
                    _ => pairs64(ops),
                });
            }
        }),
    }
    let ns = start.elapsed().as_nanos() as f64 / ops as f64;
    println!("{ns} {}", peak_rss_kib());
}

fn json(seed: u64, rounds: u64) {
    for r in 0..rounds {
        let records: Vec<serde_json::Value> = (0..200u64)
            .map(|i| {
                serde_json::json!({
                    "id": i ^ seed,
                    "name": format!("record {i} of round {r}"),
                    "tags": ["a", "bb", format!("t{}", i % 7)],
                    "scores": [i as f64 * 0.5, 1.25, (r + i) as f64],
                    "nested": { "ok": i % 2 == 0, "text": "x".repeat((i % 50) as usize) },
                })
            })
            .collect();
        let doc = serde_json::Value::Array(records);
        let text = serde_json::to_string(&doc).expect("serialise");
        let back: serde_json::Value = serde_json::from_str(&text).expect("parse");
        assert_eq!(back.as_array().map(Vec::len), Some(200));
        black_box(back);
    }
}

fn btree(seed: u64, ops: u64) {
    let mut map = BTreeMap::new();
    let mut x = seed | 1;
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = x % 4096;
        if x & 3 == 0 {
            map.remove(&k);
        } else {
            map.insert(k, format!("{k:x}-{}", "v".repeat((k % 32) as usize)));
        }
    }
    black_box(map.len());
}

fn pairs64(ops: u64) {
    for i in 0..ops {
        let b = black_box(Box::new([i as u8; 64]));
        drop(b);
    }
}

fn prodcons(threads: usize, ops: u64) {
    let pairs = (threads / 2).max(1);
    let batches = ops / 64;
    std::thread::scope(|s| {
        for _ in 0..pairs {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(16);
            let produce = move || {
                for b in 0..batches {
                    let batch: Vec<Vec<u8>> = (0..64)
                        .map(|j| vec![b as u8; [16, 64, 128, 256][j % 4]])
                        .collect();
                    tx.send(batch).expect("consumer alive");
                }
            };
            let consume = move || {
                for batch in rx {
                    drop(black_box(batch));
                }
            };
            if threads == 1 {
                s.spawn(move || {
                    std::thread::scope(|inner| {
                        inner.spawn(produce);
                        consume();
                    })
                });
            } else {
                s.spawn(produce);
                s.spawn(consume);
            }
        }
    });
}

fn larson(threads: usize, ops: u64) {
    let slots: Vec<AtomicPtr<Vec<u8>>> = (0..4096)
        .map(|_| AtomicPtr::new(std::ptr::null_mut()))
        .collect();
    std::thread::scope(|s| {
        for t in 0..threads {
            let slots = &slots;
            s.spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t as u64 + 1) | 1;
                for _ in 0..ops / threads as u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let size = 16 + (x as usize >> 20) % 1009;
                    let new = Box::into_raw(Box::new(vec![0u8; size]));
                    let old = slots[(x as usize >> 40) % 4096].swap(new, Ordering::AcqRel);
                    if !old.is_null() {
                        // SAFETY: every slot holds null or a box only this swap took.
                        drop(unsafe { Box::from_raw(old) });
                    }
                }
            });
        }
    });
    for s in &slots {
        let p = s.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !p.is_null() {
            // SAFETY: as above.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}
