//! The `alloc` group: `cpulocal::alloc::CpuCache` (in front of glibc's allocator)
//! against mimalloc, jemalloc and glibc itself, on four workloads.
//!
//! Only one `#[global_allocator]` exists per binary, so every row calls its allocator's
//! `GlobalAlloc` implementation directly, as a value (`mimalloc::MiMalloc.alloc(l)`,
//! `System.alloc(l)`, …): the same code a program using it as its global allocator
//! runs. Each workload is generic over the allocator, so no row pays a dynamic call.
//!
//! - `pairs-N`: one operation is `alloc(N bytes)`, a write into the block, `dealloc`
//!   (the pointer goes through `black_box`: the pair cannot be optimised away).
//! - `prodcons`: xmalloc-test's pattern. Threads pair up: one allocates blocks of
//!   16–256 bytes in batches of 64 and hands each batch over (through a lock-free
//!   queue of batch buffers made before the run), the other frees them; one operation is
//!   one block allocated (producer) or freed (consumer). A single thread does both.
//! - `larson`: a shared array of 4096 slots; one operation allocates a block of a
//!   random size (16–1024 bytes), writes its size into it, swaps it into a random slot
//!   and frees the block it displaced, which another thread allocated as often as not.
//! - `scratch`: cache-scratch's pattern. Before the run the main thread allocates one
//!   8-byte block per worker, back to back; each worker frees the one it is given, then
//!   each operation allocates 8 bytes, writes the block 64 times and frees it. An
//!   allocator that hands a worker the block it just freed, next to another worker's,
//!   makes the workers write to one cache line (false sharing).
//!
//! The check after each run counts the blocks: every block allocated in the run was
//! freed (the rows keep a count of both), and every row's ratio is to the `cpulocal` row
//! of its workload. Peak resident memory cannot be told apart per row inside one
//! process: `cargo run --release -p cpulocal-cli --example alloc_compare` runs each
//! allocator as the global allocator of a process of its own and reports time and peak
//! resident memory (`VmHWM`), with a serde_json and a `BTreeMap` workload besides.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use cpulocal::alloc::CpuCache;
use crossbeam_queue::ArrayQueue;

use super::harness::{sum_check, GroupDef, Row, Subject, TargetSpec};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "alloc",
    uses_remote_scheme: true,
    rows,
    layout_rows: None,
    legend: &LEGEND,
    targets: &TARGETS,
    records_per_s: false,
    note: None,
    untimed: None,
};

/// The `CpuCache` the rows measure (a second instance beside the program's allocator).
pub(crate) static CPU_CACHE: CpuCache = CpuCache::new();
/// mimalloc, called as a value.
#[cfg(feature = "peer-allocators")]
pub(crate) static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
/// jemalloc (tikv-jemallocator, prefixed symbols: it does not replace `malloc`).
#[cfg(feature = "peer-allocators")]
pub(crate) static JEMALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// glibc's `malloc`, through `std::alloc::System`.
pub(crate) static GLIBC: System = System;

/// A `GlobalAlloc` a row can hold as `&'static`.
pub(crate) trait Allocator: GlobalAlloc + Sync + 'static {}
impl<A: GlobalAlloc + Sync + 'static> Allocator for A {}

/// Counts of one run: blocks allocated and freed.
#[derive(Default)]
struct Tally {
    allocated: AtomicU64,
    freed: AtomicU64,
}

impl Tally {
    fn reset(&self) {
        self.allocated.store(0, Ordering::Relaxed);
        self.freed.store(0, Ordering::Relaxed);
    }

    fn add(&self, allocated: u64, freed: u64) {
        self.allocated.fetch_add(allocated, Ordering::Relaxed);
        self.freed.fetch_add(freed, Ordering::Relaxed);
    }

    fn check(&self, expected_allocs: u64) -> Result<(), String> {
        let (a, f) = (
            self.allocated.load(Ordering::Relaxed),
            self.freed.load(Ordering::Relaxed),
        );
        sum_check("blocks allocated", a, expected_allocs)?;
        sum_check("blocks freed", f, a)
    }
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).expect("a valid bench layout")
}

// ---------------------------------------------------------------------------------
// pairs
// ---------------------------------------------------------------------------------

struct Pairs<A: Allocator> {
    alloc: &'static A,
    size: usize,
    tally: Tally,
}

impl<A: Allocator> Subject for Pairs<A> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let layout = layout(self.size);
        for i in 0..ops {
            // SAFETY: non-zero size; the block is freed with the same layout.
            unsafe {
                let p = self.alloc.alloc(layout);
                assert!(!p.is_null(), "out of memory");
                p.write(i as u8);
                self.alloc.dealloc(black_box(p), layout);
            }
        }
        self.tally.add(ops, ops);
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.tally.reset();
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        self.tally.check(expected)
    }
}

// ---------------------------------------------------------------------------------
// producer / consumer
// ---------------------------------------------------------------------------------

const BATCH: usize = 64;

/// The size of the `j`-th block of a batch (16–256 bytes).
fn prodcons_size(j: usize) -> usize {
    [16, 64, 128, 256][j % 4]
}

/// A batch buffer, written by one thread at a time (the queues hand it over).
struct BatchBuf(UnsafeCell<[usize; BATCH]>);
// SAFETY: a buffer index is in exactly one queue or held by one thread; the queues'
// push/pop order the writes before the reads.
unsafe impl Sync for BatchBuf {}

/// One producer/consumer pair's queues of batch indices.
struct Channel {
    full: ArrayQueue<usize>,
    empty: ArrayQueue<usize>,
}

struct ProdCons<A: Allocator> {
    alloc: &'static A,
    threads: usize,
    next_role: AtomicUsize,
    channels: Vec<Channel>,
    bufs: Vec<Vec<BatchBuf>>,
    tally: Tally,
}

const BUFS_PER_PAIR: usize = 16;

impl<A: Allocator> ProdCons<A> {
    fn new(alloc: &'static A) -> Self {
        ProdCons {
            alloc,
            threads: 1,
            next_role: AtomicUsize::new(0),
            channels: Vec::new(),
            bufs: Vec::new(),
            tally: Tally::default(),
        }
    }

    fn produce(&self, pair: usize, batches: u64) {
        let (ch, bufs) = (&self.channels[pair], &self.bufs[pair]);
        for _ in 0..batches {
            let idx = wait_pop(&ch.empty);
            // SAFETY: we hold buffer `idx` (popped from the queue).
            let buf = unsafe { &mut *bufs[idx].0.get() };
            for (j, slot) in buf.iter_mut().enumerate() {
                // SAFETY: non-zero size; the consumer frees it with the same layout.
                let p = unsafe { self.alloc.alloc(layout(prodcons_size(j))) };
                assert!(!p.is_null(), "out of memory");
                // SAFETY: at least 16 bytes.
                unsafe { p.write(j as u8) };
                *slot = p as usize;
            }
            ch.full.push(idx).expect("room for every buffer");
        }
        self.tally.add(batches * BATCH as u64, 0);
    }

    fn consume(&self, pair: usize, batches: u64) {
        let (ch, bufs) = (&self.channels[pair], &self.bufs[pair]);
        for _ in 0..batches {
            let idx = wait_pop(&ch.full);
            // SAFETY: we hold buffer `idx`.
            let buf = unsafe { &*bufs[idx].0.get() };
            for (j, &p) in buf.iter().enumerate() {
                // SAFETY: allocated by the producer with this layout.
                unsafe { self.alloc.dealloc(p as *mut u8, layout(prodcons_size(j))) };
            }
            ch.empty.push(idx).expect("room for every buffer");
        }
        self.tally.add(0, batches * BATCH as u64);
    }
}

/// Pops from `q`, spinning briefly, then yielding (4 threads share 2 CPUs).
fn wait_pop(q: &ArrayQueue<usize>) -> usize {
    let mut spins = 0u32;
    loop {
        if let Some(i) = q.pop() {
            return i;
        }
        spins += 1;
        if spins < 64 {
            core::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

impl<A: Allocator> Subject for ProdCons<A> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let batches = ops / BATCH as u64;
        let role = self.next_role.fetch_add(1, Ordering::Relaxed);
        let pairs = self.threads / 2;
        if role / 2 < pairs {
            if role.is_multiple_of(2) {
                self.produce(role / 2, batches);
            } else {
                self.consume(role / 2, batches);
            }
        } else {
            // The odd thread out (or a single thread): both roles, on its own channel.
            for _ in 0..batches {
                self.produce(pairs, 1);
                self.consume(pairs, 1);
            }
        }
        // Operations that do not fill a batch: plain pairs.
        let rest = ops % BATCH as u64;
        for _ in 0..rest {
            // SAFETY: non-zero size, freed with the same layout.
            unsafe {
                self.alloc
                    .dealloc(black_box(self.alloc.alloc(layout(64))), layout(64))
            };
        }
        self.tally.add(rest, rest);
    }

    fn reset(&mut self, threads: usize, _ops: u64) {
        self.threads = threads;
        self.next_role.store(0, Ordering::Relaxed);
        let channels = threads / 2 + 1;
        self.channels = (0..channels)
            .map(|_| {
                let ch = Channel {
                    full: ArrayQueue::new(BUFS_PER_PAIR),
                    empty: ArrayQueue::new(BUFS_PER_PAIR),
                };
                (0..BUFS_PER_PAIR).for_each(|i| ch.empty.push(i).expect("room"));
                ch
            })
            .collect();
        self.bufs = (0..channels)
            .map(|_| {
                (0..BUFS_PER_PAIR)
                    .map(|_| BatchBuf(UnsafeCell::new([0; BATCH])))
                    .collect()
            })
            .collect();
        self.tally.reset();
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        // Each thread performs `ops` operations; a producer's are allocations, a
        // consumer's frees, a single thread's both: count blocks, not operations.
        let a = self.tally.allocated.load(Ordering::Relaxed);
        let f = self.tally.freed.load(Ordering::Relaxed);
        sum_check("blocks freed", f, a)?;
        if a == 0 || a > expected {
            return Err(format!("{a} blocks allocated for {expected} operations"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// larson
// ---------------------------------------------------------------------------------

const LARSON_SLOTS: usize = 4096;

struct Larson<A: Allocator> {
    alloc: &'static A,
    slots: Vec<AtomicUsize>,
    seed: AtomicU64,
    tally: Tally,
}

impl<A: Allocator> Larson<A> {
    fn new(alloc: &'static A) -> Self {
        Larson {
            alloc,
            slots: (0..LARSON_SLOTS).map(|_| AtomicUsize::new(0)).collect(),
            seed: AtomicU64::new(1),
            tally: Tally::default(),
        }
    }

    fn free_block(&self, p: usize) {
        // SAFETY: a block this row allocated, with its size in its first word.
        unsafe {
            let size = (p as *const usize).read();
            self.alloc.dealloc(p as *mut u8, layout(size));
        }
    }
}

impl<A: Allocator> Subject for Larson<A> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let mut x = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            | 1;
        let mut freed = 0;
        for _ in 0..ops {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let size = 16 + (x as usize >> 20) % 1009;
            let slot = (x as usize >> 40) % LARSON_SLOTS;
            // SAFETY: non-zero size; freed by `free_block` with the size written here.
            let p = unsafe { self.alloc.alloc(layout(size)) };
            assert!(!p.is_null(), "out of memory");
            // SAFETY: at least 16 bytes, aligned to 8.
            unsafe { p.cast::<usize>().write(size) };
            let old = self.slots[slot].swap(p as usize, Ordering::AcqRel);
            if old != 0 {
                self.free_block(old);
                freed += 1;
            }
        }
        self.tally.add(ops, freed);
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.tally.reset();
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        // Free what the slots still hold, then every block must be accounted for.
        let mut left = 0;
        for s in &self.slots {
            let p = s.swap(0, Ordering::AcqRel);
            if p != 0 {
                self.free_block(p);
                left += 1;
            }
        }
        self.tally.add(0, left);
        self.tally.check(expected)
    }
}

// ---------------------------------------------------------------------------------
// scratch (false sharing)
// ---------------------------------------------------------------------------------

const SCRATCH_WRITES: usize = 64;

struct Scratch<A: Allocator> {
    alloc: &'static A,
    handed: Vec<usize>,
    next: AtomicUsize,
    tally: Tally,
}

impl<A: Allocator> Subject for Scratch<A> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let me = self.next.fetch_add(1, Ordering::Relaxed);
        let l = layout(8);
        // SAFETY: allocated by the main thread in `reset` with this layout.
        unsafe { self.alloc.dealloc(self.handed[me] as *mut u8, l) };
        for _ in 0..ops {
            // SAFETY: non-zero size; freed with the same layout.
            unsafe {
                let p = self.alloc.alloc(l);
                assert!(!p.is_null(), "out of memory");
                for w in 0..SCRATCH_WRITES {
                    core::ptr::write_volatile(p, w as u8);
                }
                self.alloc.dealloc(black_box(p), l);
            }
        }
        self.tally.add(ops, ops + 1);
    }

    fn reset(&mut self, threads: usize, _ops: u64) {
        self.next.store(0, Ordering::Relaxed);
        self.handed = (0..threads)
            // SAFETY: non-zero size; each block is freed by the worker it is handed to.
            .map(|_| unsafe { self.alloc.alloc(layout(8)) } as usize)
            .collect();
        self.tally.reset();
        self.tally.add(threads as u64, 0);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let a = self.tally.allocated.load(Ordering::Relaxed);
        self.tally.check(a.max(expected + self.handed.len() as u64))
    }
}

// ---------------------------------------------------------------------------------
// rows
// ---------------------------------------------------------------------------------

macro_rules! row_names {
    ($($w:literal),*) => {
        [$([
            concat!($w, " cpulocal"),
            concat!($w, " mimalloc"),
            concat!($w, " jemalloc"),
            concat!($w, " glibc"),
        ]),*]
    };
}

/// Row names by workload, in class order (the rows of workload `i` are class `i`), then
/// allocator (cpulocal, mimalloc, jemalloc, glibc).
const NAMES: [[&str; 4]; 7] = row_names!(
    "pairs-16",
    "pairs-64",
    "pairs-256",
    "pairs-1024",
    "prodcons",
    "larson",
    "scratch"
);

fn workload_rows<A: Allocator>(alloc: &'static A, column: usize, rows: &mut Vec<Row>) {
    for (class, size) in [16, 64, 256, 1024].into_iter().enumerate() {
        rows.push(
            named(
                NAMES[class][column],
                column == 0,
                Pairs {
                    alloc,
                    size,
                    tally: Tally::default(),
                },
            )
            .in_class(class),
        );
    }
    rows.push(named(NAMES[4][column], column == 0, ProdCons::new(alloc)).in_class(4));
    rows.push(named(NAMES[5][column], column == 0, Larson::new(alloc)).in_class(5));
    rows.push(
        named(
            NAMES[6][column],
            column == 0,
            Scratch {
                alloc,
                handed: Vec::new(),
                next: AtomicUsize::new(0),
                tally: Tally::default(),
            },
        )
        .in_class(6),
    );
}

fn named(name: &'static str, cpulocal: bool, subject: impl Subject + 'static) -> Row {
    if cpulocal {
        Row::cpulocal(name, subject)
    } else {
        Row::new(name, subject)
    }
}

fn rows(notes: &mut Vec<String>) -> Vec<Row> {
    let mut rows = Vec::new();
    workload_rows(&CPU_CACHE, 0, &mut rows);
    #[cfg(feature = "peer-allocators")]
    {
        let _ = notes;
        workload_rows(&MIMALLOC, 1, &mut rows);
        workload_rows(&JEMALLOC, 2, &mut rows);
    }
    #[cfg(not(feature = "peer-allocators"))]
    notes.push("built without feature `peer-allocators`: no mimalloc or jemalloc rows".into());
    workload_rows(&GLIBC, 3, &mut rows);
    rows
}

macro_rules! legend {
    ($($w:literal: $what:literal),*) => {
        [$(
            (concat!($w, " cpulocal"), concat!("cpulocal::alloc::CpuCache (over glibc): ", $what)),
            (concat!($w, " mimalloc"), concat!("mimalloc::MiMalloc: ", $what)),
            (concat!($w, " jemalloc"), concat!("tikv_jemallocator::Jemalloc: ", $what)),
            (concat!($w, " glibc"), concat!("std::alloc::System (glibc malloc): ", $what)),
        )*]
    };
}

/// What each row name stands for, for the legend under the table.
const LEGEND: [(&str, &str); 28] = legend!(
    "pairs-16": "alloc 16 B, write, free",
    "pairs-64": "alloc 64 B, write, free",
    "pairs-256": "alloc 256 B, write, free",
    "pairs-1024": "alloc 1024 B, write, free",
    "prodcons": "one block of 16-256 B allocated by a producer or freed by its consumer (batches of 64)",
    "larson": "alloc 16-1024 B, swap into a shared slot, free the displaced block",
    "scratch": "alloc 8 B, 64 writes, free; after freeing a block the main thread allocated"
);

macro_rules! targets {
    ($($t:literal, $threads:literal, $num:expr, $den:expr, $bound:literal, $at_most:literal;)*) => {
        [$(TargetSpec {
            target: $t,
            threads: $threads,
            numerator: $num,
            denominator: $den,
            bound: $bound,
            at_most: $at_most,
        }),*]
    };
}

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 12] = targets!(
    "pairs-16: CpuCache at most 1.0x mimalloc at 1 thread", 1, NAMES[0][0], NAMES[0][1], 1.0, true;
    "pairs-64: CpuCache at most 1.0x mimalloc at 1 thread", 1, NAMES[1][0], NAMES[1][1], 1.0, true;
    "pairs-256: CpuCache at most 1.0x mimalloc at 1 thread", 1, NAMES[2][0], NAMES[2][1], 1.0, true;
    "pairs-1024: CpuCache at most 1.0x mimalloc at 1 thread", 1, NAMES[3][0], NAMES[3][1], 1.0, true;
    "pairs-16: CpuCache at least 3x faster than glibc at 2 threads", 2, NAMES[0][3], NAMES[0][0], 3.0, false;
    "pairs-64: CpuCache at least 3x faster than glibc at 2 threads", 2, NAMES[1][3], NAMES[1][0], 3.0, false;
    "pairs-256: CpuCache at least 3x faster than glibc at 2 threads", 2, NAMES[2][3], NAMES[2][0], 3.0, false;
    "pairs-1024: CpuCache at least 3x faster than glibc at 2 threads", 2, NAMES[3][3], NAMES[3][0], 3.0, false;
    "prodcons: CpuCache at most 1.0x mimalloc at 2 threads", 2, NAMES[4][0], NAMES[4][1], 1.0, true;
    "prodcons: CpuCache at least 2x faster than glibc at 2 threads", 2, NAMES[4][3], NAMES[4][0], 2.0, false;
    "scratch: no false-sharing penalty beyond mimalloc's at 2 threads", 2, NAMES[6][0], NAMES[6][1], 1.0, true;
    "larson: CpuCache at most 1.0x mimalloc at 2 threads", 2, NAMES[5][0], NAMES[5][1], 1.0, true;
);
