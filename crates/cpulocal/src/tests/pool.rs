//! The per-CPU pool's promises: item placement, reuse, growth, fork, statics and the
//! structures built on it. These run under valgrind too (the fallback path).

use core::alloc::Layout;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::child::{in_child, test_name, Setup};
use super::{delay_shared, pin_to};
use crate::pool::{self, Item, Pool, STRIDE};
use crate::{Counter, Index, PerCpu};

/// The cache line size the address checks assume (the largest in use on x86_64 and
/// aarch64 servers is 128 with adjacent-line prefetch: checked with 128).
const LINE: usize = 128;

/// The lines `[p, p + len)` covers.
fn lines(p: usize, len: usize) -> core::ops::RangeInclusive<usize> {
    p / LINE..=(p + len.max(1) - 1) / LINE
}

#[test]
fn items_of_different_cpus_never_share_a_cache_line() {
    let _delay = delay_shared();
    let pool = Pool::for_index(Index::Cpu);
    let layouts = [
        Layout::new::<u8>(),
        Layout::new::<u64>(),
        Layout::new::<[u64; 3]>(),
        Layout::from_size_align(16, 16).unwrap(),
        Layout::from_size_align(100, 4).unwrap(),
        Layout::from_size_align(4000, 64).unwrap(),
    ];
    let items: Vec<(Item, Layout)> = (0..50)
        .flat_map(|_| layouts.iter().map(|&l| (pool.alloc(l), l)))
        .collect();
    let cpus = pool::ranges();
    // Every line touched by each CPU's copies: no line may belong to two CPUs.
    let mut owner = std::collections::HashMap::new();
    for &(item, layout) in &items {
        for cpu in 0..cpus {
            let p = item.at(cpu) as usize;
            assert_eq!(p % layout.align(), 0, "alignment of {layout:?}");
            if layout.size() <= 64 {
                assert_eq!(
                    lines(p, layout.size()).count(),
                    1,
                    "a small item straddles a line"
                );
            }
            for line in lines(p, layout.size()) {
                let first = *owner.entry(line).or_insert(cpu);
                assert_eq!(
                    first, cpu,
                    "line {line:#x} holds items of CPUs {first} and {cpu}"
                );
            }
        }
    }
    // Live items of one CPU never overlap.
    let mut spans: Vec<(usize, usize)> = items
        .iter()
        .map(|&(i, l)| (i.at(0) as usize, i.at(0) as usize + l.size()))
        .collect();
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "live items overlap"
    );
    for (item, layout) in items {
        // SAFETY: allocated above with this layout, unused.
        unsafe { pool.free(item, layout) };
    }
}

#[test]
fn a_counters_slots_are_one_stride_apart_and_one_line_each() {
    let _delay = delay_shared();
    let c = Counter::new();
    c.add(1);
    let base = c.slot_address(0);
    for cpu in 0..crate::possible_cpus() {
        let p = c.slot_address(cpu);
        assert_eq!(p, base + cpu * STRIDE);
        assert_eq!(lines(p, Counter::BYTES_PER_CPU).count(), 1);
    }
    assert_eq!(Counter::BYTES_PER_CPU, 16);
}

/// A `Stack`'s lists are pool items too: 16 bytes per CPU (the lock, whose word is the
/// head), one line each, one stride apart (a padded slot took 128 bytes per CPU).
#[test]
fn a_stacks_lists_are_one_stride_apart_and_one_line_each() {
    let _delay = delay_shared();
    let stack = crate::Stack::<u32>::new();
    stack.push_value(1);
    let bytes = crate::stack::tests_api::SLOT_BYTES;
    assert_eq!(bytes, 16);
    let base = crate::stack::tests_api::slot_address(&stack, 0);
    for cpu in 0..crate::possible_cpus() {
        let p = crate::stack::tests_api::slot_address(&stack, cpu);
        assert_eq!(p, base + cpu * STRIDE);
        assert_eq!(lines(p, bytes).count(), 1, "CPU {cpu}'s list at {p:#x}");
    }
    assert_eq!(stack.pop_or_steal_value(), Some(1));
}

/// The fast paths read a `Stack`'s first slot and slot count from its table: they must
/// be the first slot's address and the possible CPUs.
#[test]
fn a_stacks_fast_table_is_its_first_slot_and_its_slot_count() {
    let stack = crate::Stack::<u32>::new();
    let base = crate::stack::tests_api::slot_address(&stack, 0);
    assert_eq!(
        crate::stack::tests_api::fast_table(&stack),
        (base, crate::possible_cpus())
    );
}

/// `Counter`'s fast paths read its first slot and slot count from one packed word: both
/// must come back as they are, and what cannot be packed must leave no fast path rather
/// than a wrong one.
#[test]
fn a_counters_packed_table_gives_back_what_fits_and_no_wrong_slot() {
    use crate::pool::PackedTable;
    let at = |a: usize| a as *mut u8;
    // A base beyond 48 bits: no slot for the fast paths.
    assert_eq!(PackedTable::new(at(1 << 48), 4), PackedTable::EMPTY);
    assert_eq!(PackedTable::EMPTY.get(), (at(0), 0));
    // A count beyond 16 bits: what fits (CPUs beyond it take the slow paths).
    assert_eq!(
        PackedTable::new(at(0x1000), 1 << 16).get(),
        (at(0x1000), 0xffff)
    );
    assert_eq!(
        PackedTable::new(at((1 << 48) - 8), 3).get(),
        (at((1 << 48) - 8), 3)
    );
}

/// A `Stack` whose fast paths see no slot (a table with a slot count of 0) still keeps
/// every node: every push and pop takes the slow paths.
#[test]
fn a_stack_without_a_fast_table_keeps_every_node_on_the_slow_paths() {
    let _delay = delay_shared();
    let mut stack = crate::Stack::<u32>::new();
    crate::stack::tests_api::clear_fast_table(&mut stack);
    for round in 0..3 {
        for v in 0..100 {
            stack.push_value(v);
        }
        let mut got: Vec<u32> = core::iter::from_fn(|| stack.pop_or_steal_value()).collect();
        got.sort_unstable();
        assert_eq!(got, (0..100).collect::<Vec<_>>(), "round {round}");
    }
}

#[test]
fn a_reused_offset_reads_as_zero_on_every_cpu() {
    let _delay = delay_shared();
    let pool = Pool::for_index(Index::Cpu);
    let layout = Layout::from_size_align(40, 8).unwrap();
    let cpus = pool::ranges();
    let mut seen = HashSet::new();
    for round in 0..20u8 {
        let item = pool.alloc(layout);
        for cpu in 0..cpus {
            // SAFETY: a live item of 40 bytes, ours alone.
            let bytes = unsafe { core::slice::from_raw_parts_mut(item.at(cpu), 40) };
            assert!(bytes.iter().all(|&b| b == 0), "round {round}: not zero");
            bytes.fill(round | 1);
        }
        seen.insert(item.base());
        // SAFETY: allocated above with this layout; nothing uses it any more.
        unsafe { pool.free(item, layout) };
    }
    // Other tests allocate this layout too, but a freed offset is taken again soon.
    assert!(seen.len() < 20, "freed offsets are reused");
}

/// Many threads create, use and drop counters while others add to long-lived ones:
/// every sum is exact, and no offset is handed out twice while live.
#[test]
fn concurrent_create_and_drop_while_others_add_is_exact_and_never_reuses_a_live_offset() {
    let _delay = delay_shared();
    let valgrind = std::env::var_os("CPULOCAL_TEST_VALGRIND").is_some();
    let (churners, rounds, adders, adds) = if valgrind {
        (2, 200, 1, 20_000)
    } else {
        (4, 3_000, 2, 400_000)
    };
    let live: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let long_lived: Arc<Vec<Counter>> = Arc::new((0..4).map(|_| Counter::new()).collect());
    let start = Arc::new(Barrier::new(churners + adders));
    let mut threads = Vec::new();
    for t in 0..churners {
        let (live, start) = (Arc::clone(&live), Arc::clone(&start));
        threads.push(std::thread::spawn(move || {
            start.wait();
            for round in 0..rounds {
                let batch: Vec<Counter> =
                    (0..1 + (round + t) % 8).map(|_| Counter::new()).collect();
                for (i, c) in batch.iter().enumerate() {
                    c.add(i as u64 + 1);
                    let base = c.slot_address(0);
                    assert!(
                        live.lock().unwrap().insert(base),
                        "a live offset was handed out again"
                    );
                }
                for (i, c) in batch.iter().enumerate() {
                    c.add(1);
                    assert_eq!(c.sum(), i as u64 + 2, "a counter saw another's adds");
                }
                for c in batch {
                    assert!(live.lock().unwrap().remove(&c.slot_address(0)));
                    drop(c);
                }
            }
        }));
    }
    for _ in 0..adders {
        let (long_lived, start) = (Arc::clone(&long_lived), Arc::clone(&start));
        threads.push(std::thread::spawn(move || {
            start.wait();
            for i in 0..adds {
                long_lived[i % 4].add(1);
            }
        }));
    }
    threads.into_iter().for_each(|t| t.join().expect("worker"));
    let total: u64 = long_lived.iter().map(Counter::sum).sum();
    assert_eq!(total, (adders * adds) as u64);
}

/// Fills more than a chunk while other threads add to items of the first chunk: the pool
/// maps another chunk and no live item moves or loses an update.
#[test]
fn the_pool_grows_under_load_without_moving_live_items() {
    let _delay = delay_shared();
    let pool = Pool::for_index(Index::Cpu);
    // Large enough that a few dozen fill a chunk, small enough to stay pooled.
    let layout = Layout::from_size_align(STRIDE / 16, 64).unwrap();
    let before = pool::stats(Index::Cpu).chunks;
    let counter = Arc::new(Counter::new());
    counter.add(1);
    let first = counter.slot_address(0);
    let stop = Arc::new(AtomicBool::new(false));
    let adders: Vec<_> = (0..2)
        .map(|_| {
            let (counter, stop) = (Arc::clone(&counter), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    counter.add(1);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let growers: Vec<_> = (0..2u64)
        .map(|t| {
            std::thread::spawn(move || {
                let pool = Pool::for_index(Index::Cpu);
                let items: Vec<Item> = (0..24u64)
                    .map(|i| {
                        let item = pool.alloc(layout);
                        // A mark in CPU 0's copy, checked after the growth.
                        // SAFETY: a live item of STRIDE / 16 bytes, 64-aligned, ours.
                        unsafe { item.at(0).cast::<u64>().write(t << 32 | i) };
                        item
                    })
                    .collect();
                items
            })
        })
        .collect();
    let grown: Vec<(u64, Vec<Item>)> = growers
        .into_iter()
        .enumerate()
        .map(|(t, g)| (t as u64, g.join().expect("grower")))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let added: u64 = adders.into_iter().map(|a| a.join().expect("adder")).sum();
    assert!(
        pool::stats(Index::Cpu).chunks >= before + 2,
        "48 items of 1/16 chunk need 3 chunks"
    );
    assert_eq!(counter.slot_address(0), first, "a live counter moved");
    assert_eq!(counter.sum(), 1 + added);
    for (t, items) in grown {
        for (i, item) in items.into_iter().enumerate() {
            // SAFETY: live, written above.
            let mark = unsafe { item.at(0).cast::<u64>().read() };
            assert_eq!(mark, t << 32 | i as u64);
            // SAFETY: allocated with `layout`, unused now.
            unsafe { pool.free(item, layout) };
        }
    }
}

/// Large items get a chunk (and a stride) of their own, unmapped when freed.
#[test]
fn a_large_item_gets_its_own_chunk() {
    let _delay = delay_shared();
    let big = PerCpu::new(|cpu| vec![cpu as u8; 8].into_boxed_slice());
    let huge: PerCpu<[u64; 40_000]> = PerCpu::new(|cpu| [cpu as u64; 40_000]);
    let mut seen = 0;
    huge.for_each(|cpu, a| {
        assert!(a.iter().all(|&v| v == cpu as u64));
        seen += 1;
    });
    assert_eq!(seen, crate::possible_cpus());
    big.with_cpu(|b| assert_eq!(b.len(), 8));
}

/// The pool's statistics count a large item's own chunk in the address space reserved,
/// and give it back when the item is freed. In a child process: other tests allocate.
#[test]
fn the_reserved_bytes_count_large_chunks() {
    let name = test_name!(the_reserved_bytes_count_large_chunks);
    in_child(name, Setup::default(), || {
        let reserved = || pool::stats(Index::Cpu).reserved_bytes;
        let before = reserved();
        let huge: PerCpu<[u64; 40_000]> = PerCpu::new(|_| [0; 40_000]);
        let with_huge = reserved();
        assert!(
            with_huge - before >= 320_000 * crate::possible_cpus(),
            "{before} -> {with_huge}"
        );
        drop(huge);
        assert_eq!(reserved(), before);
    });
}

static STATIC_HITS: Counter = Counter::new();
static STATIC_SEEN: PerCpu<u64> = PerCpu::new_lazy(|| 0);

#[test]
fn static_counter_and_per_cpu_count_exactly_from_many_threads() {
    let _delay = delay_shared();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..5_000 {
                    STATIC_HITS.add(1);
                    STATIC_SEEN.with_cpu(|s| *s += 1);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().expect("worker"));
    assert_eq!(STATIC_HITS.sum(), 20_000);
    let mut total = 0;
    STATIC_SEEN.for_each(|_, s| total += *s);
    assert_eq!(total, 20_000);
}

#[test]
fn a_lazy_per_cpu_creates_only_the_slots_it_uses() {
    let _delay = delay_shared();
    static MADE: AtomicU64 = AtomicU64::new(0);
    let p: PerCpu<u64> = PerCpu::new_lazy(|| {
        MADE.fetch_add(1, Ordering::Relaxed);
        7
    });
    let mut visited = 0;
    p.for_each(|_, _| visited += 1);
    assert_eq!(visited, 0, "nothing used, nothing visited");
    p.on_cpu(0, |v| *v += 1).unwrap();
    let mut values = Vec::new();
    p.for_each(|cpu, v| values.push((cpu, *v)));
    assert_eq!(values, [(0, 8)]);
    assert_eq!(MADE.load(Ordering::Relaxed), 1);
    let all = p.into_vec();
    assert_eq!(all.len(), crate::possible_cpus());
    assert_eq!(all[0], 8);
    assert!(all[1..].iter().all(|&v| v == 7));
}

#[test]
fn a_panicking_lazy_init_leaves_the_slot_unlocked_and_unmade() {
    let _delay = delay_shared();
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let p: PerCpu<u64> = PerCpu::new_lazy(|| {
        if CALLS.fetch_add(1, Ordering::Relaxed) == 0 {
            panic!("first init fails");
        }
        3
    });
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.on_cpu(0, |v| *v)));
    assert!(r.is_err());
    // The lock was released and the next use creates the value.
    assert_eq!(p.on_cpu(0, |v| *v).unwrap(), 3);
}

/// A slot's lock word tells the fast path whether the slot holds its value (the word is
/// released to `READY` only then), so the fast path never takes a slot without one:
/// never used, or whose `init` panicked. The slow path makes it, whether the thread on
/// that CPU or a thread on another CPU (`on_cpu`) asks first; from then on the fast path
/// takes it.
#[test]
fn the_fast_path_takes_a_lazy_slot_only_once_it_holds_its_value() {
    let _delay = delay_shared();
    static CALLS: AtomicU64 = AtomicU64::new(0);
    static FAST: AtomicU64 = AtomicU64::new(0);
    fn count_fast() {
        FAST.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds 1 to the calling thread's slot until the fast path does it (a preemption or
    /// a signal in the sequence sends one attempt to the slow path), at most 100 times,
    /// if this thread may take fast paths now (not under valgrind, nor with the locked
    /// scheme). Returns the adds made.
    fn add_until_fast(p: &PerCpu<u64>) -> u64 {
        let fast = crate::remote::percpu_fast_area().is_some();
        FAST.store(0, Ordering::Relaxed);
        for adds in 1..=100 {
            crate::test_hooks::run_after_fast_lock(count_fast);
            p.with_cpu(|v| *v += 1);
            if !fast || FAST.load(Ordering::Relaxed) == 1 {
                return adds;
            }
        }
        panic!("the fast path never took a slot that holds its value");
    }
    let p: PerCpu<u64> = PerCpu::new_lazy(|| {
        if CALLS.fetch_add(1, Ordering::Relaxed) == 0 {
            panic!("first init fails");
        }
        10
    });
    let expected = std::thread::scope(|s| {
        s.spawn(|| {
            if !pin_to(0) {
                return None; // a cpuset without CPU 0
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.with_cpu(|v| *v)));
            assert!(r.is_err(), "the first init panics");
            // The slot has no value: the fast path must not take it (the hook would run).
            FAST.store(0, Ordering::Relaxed);
            crate::test_hooks::run_after_fast_lock(count_fast);
            assert_eq!(p.with_cpu(|v| *v), 10);
            assert_eq!(
                FAST.load(Ordering::Relaxed),
                0,
                "fast path on a slot without value"
            );
            assert_eq!(CALLS.load(Ordering::Relaxed), 2);
            let mut expected = vec![(0, 10 + add_until_fast(&p))];
            // CPU 1's slot made from CPU 0 (the remote lock), then taken on CPU 1.
            if crate::possible_cpus() >= 2 && crate::sys::online_cpus() >= 2 {
                assert_eq!(p.on_cpu(1, |v| *v).unwrap(), 10);
                assert_eq!(CALLS.load(Ordering::Relaxed), 3);
                if pin_to(1) {
                    expected.push((1, 10 + add_until_fast(&p)));
                } else {
                    expected.push((1, 10));
                }
            }
            Some(expected)
        })
        .join()
        .expect("the pinned thread")
    });
    let Some(expected) = expected else {
        return;
    };
    let mut values = Vec::new();
    p.for_each(|cpu, v| values.push((cpu, *v)));
    assert_eq!(values, expected);
}

#[test]
fn dropping_a_per_cpu_drops_each_value_once() {
    let _delay = delay_shared();
    let value = Arc::new(());
    let eager = PerCpu::new(|_| Arc::clone(&value));
    assert_eq!(Arc::strong_count(&value), 1 + crate::possible_cpus());
    drop(eager);
    assert_eq!(Arc::strong_count(&value), 1);
}

/// With more threads than CPUs, mm_cid-indexed slots stay exact and the slots used stay
/// below both the threads and the possible CPUs.
#[test]
fn mm_cid_indexing_is_exact_with_more_threads_than_cpus() {
    let _delay = delay_shared();
    let threads = 3 * crate::possible_cpus() + 1;
    let per_thread = if std::env::var_os("CPULOCAL_TEST_VALGRIND").is_some() {
        500
    } else {
        20_000
    };
    let slots = Arc::new(PerCpu::with_index_lazy(Index::MmCid, || 0u64));
    let start = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (slots, start) = (Arc::clone(&slots), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                for i in 0..per_thread {
                    slots.with_cpu(|s| *s += 1);
                    if i % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    workers.into_iter().for_each(|w| w.join().expect("worker"));
    let (mut total, mut used) = (0, 0);
    slots.for_each(|_, s| {
        total += *s;
        used += 1;
    });
    assert_eq!(total, (threads * per_thread) as u64);
    assert!(used <= crate::possible_cpus().min(threads));
}

/// Children of `fork` keep every live item and can allocate, even when the parent forks
/// while other threads allocate and free.
#[test]
fn fork_children_keep_live_items_and_can_allocate() {
    let _delay = delay_shared();
    if std::env::var_os("CPULOCAL_TEST_VALGRIND").is_some() {
        return; // valgrind's fork is slow; the native run covers it
    }
    let counter = Counter::new();
    counter.add(41);
    let stop = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let c = Counter::new();
                    c.add(1);
                    drop(c);
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for round in 0..20 {
        std::thread::sleep(Duration::from_micros(200));
        // SAFETY: the child only uses the pool (whose lock the fork handlers release)
        // and glibc's malloc (fork-safe), then leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = std::panic::catch_unwind(|| {
                let fresh = Counter::new();
                fresh.add(2);
                counter.add(1);
                fresh.sum() == 2 && counter.sum() == 42
            });
            // SAFETY: ends the child without running the parent's handlers.
            unsafe { libc::_exit(if matches!(ok, Ok(true)) { 0 } else { 1 }) };
        }
        assert!(pid > 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut status = 0;
        loop {
            // SAFETY: `pid` is our child; `status` is a live out-parameter.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                    failures.push(format!("round {round}: status {status:#x}"));
                }
                break;
            }
            if Instant::now() > deadline {
                // SAFETY: our child, wedged.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                // SAFETY: as above.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                failures.push(format!("round {round}: the child wedged"));
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.into_iter().for_each(|t| t.join().expect("churn"));
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        counter.sum(),
        41,
        "the children's adds stay in the children"
    );
}

/// Whether the page holding `p` is resident (`mincore`).
fn resident(p: usize) -> bool {
    let page = crate::sys::page_size();
    let mut v = 0u8;
    // SAFETY: the page-aligned address lies in a live pool mapping; `v` receives one byte
    // for the one page asked about.
    let r = unsafe { libc::mincore((p & !(page - 1)) as *mut libc::c_void, 1, &mut v) };
    assert_eq!(r, 0, "mincore: {:?}", crate::sys::Errno::last());
    v & 1 == 1
}

/// Whether the page holding `p` was written by this process since it was forked: a page
/// of its own (`/proc/self/pagemap`: present and mapped exclusively), not the shared
/// zero page that a read maps (which `mincore` counts as resident) and not a page still
/// shared with the parent.
fn written_here(p: usize) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let page = crate::sys::page_size();
    let mut map = std::fs::File::open("/proc/self/pagemap").expect("open pagemap");
    map.seek(SeekFrom::Start((p / page * 8) as u64))
        .expect("seek pagemap");
    let mut entry = [0u8; 8];
    map.read_exact(&mut entry).expect("read pagemap");
    let entry = u64::from_le_bytes(entry);
    let (present, exclusive) = (entry >> 63 & 1 == 1, entry >> 56 & 1 == 1);
    present && exclusive
}

/// A page of its own per CPU, so residency tells which CPUs wrote.
#[repr(C, align(4096))]
struct OwnPage([u8; 4096]);

/// A thread pinned to one CPU populates that CPU's range only: the other CPUs' copies of
/// its items stay unpopulated pages.
///
/// In a child process: in the test process, another test may have used (and freed) the
/// same offset on another CPU, whose page then stays resident; on 8 CPUs that happens.
#[test]
fn cpus_that_never_use_a_per_cpu_cost_no_resident_memory() {
    let name = test_name!(cpus_that_never_use_a_per_cpu_cost_no_resident_memory);
    in_child(name, Setup::default(), || {
        std::thread::spawn(|| {
            if !pin_to(0) {
                return; // a cpuset without CPU 0: nothing to show
            }
            let p: PerCpu<OwnPage> = PerCpu::new_lazy(|| OwnPage([0; 4096]));
            p.with_cpu(|page| page.0[100] = 1);
            assert!(resident(p.slot_address(0)), "CPU 0 wrote its slot");
            for cpu in 1..crate::possible_cpus() {
                assert!(
                    !resident(p.slot_address(cpu)),
                    "CPU {cpu}'s slot was populated"
                );
            }
        })
        .join()
        .expect("pinned thread")
    });
}

/// `take`, `reset` and `sum` of a counter used on one CPU write nothing on the others:
/// their ranges stay unpopulated (reads map the shared zero page). In a child process,
/// for the reason above; the counter is one whose pages on the other CPUs nothing in
/// the child wrote.
#[test]
fn taking_a_counter_populates_no_cpu_that_never_added() {
    let name = test_name!(taking_a_counter_populates_no_cpu_that_never_added);
    in_child(name, Setup::default(), || {
        std::thread::spawn(|| {
            if !pin_to(0) || crate::possible_cpus() < 2 {
                return; // nothing to show
            }
            let elsewhere_unpopulated = |c: &Counter| {
                (1..crate::possible_cpus()).all(|cpu| !written_here(c.slot_address(cpu)))
            };
            let mut kept = Vec::new();
            let counter = loop {
                let c = Counter::new();
                c.add(5);
                if elsewhere_unpopulated(&c) {
                    break c;
                }
                assert!(
                    kept.len() < 100_000,
                    "no counter with unpopulated pages found"
                );
                kept.push(c);
            };
            assert_eq!(counter.sum(), 5);
            assert_eq!(counter.take(), 5);
            counter.add(2);
            counter.reset();
            assert_eq!(counter.sum(), 0);
            assert!(
                elsewhere_unpopulated(&counter),
                "take, reset or sum wrote another CPU's range"
            );
        })
        .join()
        .expect("pinned thread")
    });
}

/// mm_cid indexing: one thread populates the range of one mm_cid at a time, whatever CPU
/// it runs on. In a child process, for the reason above.
#[test]
fn a_lazy_mm_cid_per_cpu_used_by_one_thread_populates_one_range() {
    let name = test_name!(a_lazy_mm_cid_per_cpu_used_by_one_thread_populates_one_range);
    in_child(name, Setup::default(), || {
        let p: PerCpu<OwnPage> = PerCpu::with_index_lazy(Index::MmCid, || OwnPage([0; 4096]));
        p.with_cpu(|page| page.0[7] = 1);
        let populated = (0..crate::possible_cpus())
            .filter(|&cid| resident(p.slot_address(cid)))
            .count();
        assert_eq!(populated, 1);
    });
}

/// The first use of a counter from a signal handler, where the handler interrupted its
/// own thread inside the pool's lock (a first use of another counter): the handler must
/// run once the lock is given back, not wait for it forever. In a child process, with a
/// watchdog: the broken version wedges the thread with the pool's lock held.
#[test]
fn a_counters_first_use_in_a_handler_that_interrupted_the_pool_does_not_wedge() {
    static FIRST_USED_IN_HANDLER: Counter = Counter::new();
    extern "C" fn first_use(_: libc::c_int) {
        FIRST_USED_IN_HANDLER.add(1);
    }
    let name =
        test_name!(a_counters_first_use_in_a_handler_that_interrupted_the_pool_does_not_wedge);
    in_child(name, Setup::default(), || {
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(20));
            println!("wedged: the handler waited for the pool's lock");
            // SAFETY: ends the process at once; nothing to clean up.
            unsafe { libc::_exit(3) };
        });
        super::install_handler(libc::SIGUSR2, first_use);
        crate::test_hooks::raise_inside_pool_lock(libc::SIGUSR2);
        let counter = Counter::new();
        counter.add(5); // allocates: the hook raises SIGUSR2 inside the pool's lock
        assert_eq!(FIRST_USED_IN_HANDLER.sum(), 1, "the handler ran once");
        assert_eq!(counter.sum(), 5);
        super::ignore_signal(libc::SIGUSR2);
    });
}
