//! The per-CPU pool under a global allocator that itself counts with cpulocal, as an
//! allocator's statistics would, and that takes its own lock in a `pthread_atfork`
//! prepare handler, as jemalloc does. The pool must never call the system allocator
//! while it holds its lock (the allocator would then wait for that lock: on its own
//! thread, or, in `fork`, against the thread that holds it), and two first uses that
//! race must not allocate twice and free one (a free may allocate: from a signal
//! handler that interrupted the allocator, that waits forever).

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, Once};
use std::time::Duration;

use cpulocal::{Counter, PerCpu};

/// Allocations per size class (log2 of the size), counted by the allocator with
/// cpulocal: each class's counter makes its first use inside an allocation.
static BY_CLASS: [Counter; 24] = [const { Counter::new() }; 24];

/// The allocator's own lock, taken around every call and by its fork handler.
static LOCK: AtomicBool = AtomicBool::new(false);
static FORK_HANDLER: Once = Once::new();
/// Nanoseconds the next allocation sleeps before it takes the lock (0: none): a slow
/// allocation, to hold a window open.
static NEXT_SLOW_NS: AtomicU64 = AtomicU64::new(0);

fn lock() {
    while LOCK.swap(true, Ordering::Acquire) {
        std::hint::spin_loop();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

extern "C" fn before_fork() {
    lock();
}

extern "C" fn after_fork() {
    unlock();
}

struct CountingAllocator;

// SAFETY: every call goes to `System` with the caller's arguments; the rest is
// bookkeeping that allocates nothing.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // Registered at the first allocation, after cpulocal's pool registered its own
        // handlers (at load): prepare handlers run in reverse order, so this one runs
        // first, as jemalloc's does in a program that loads it late.
        FORK_HANDLER.call_once(|| {
            // SAFETY: the handlers only touch `LOCK`.
            let r = unsafe {
                libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork))
            };
            assert_eq!(r, 0);
        });
        let class = (usize::BITS - layout.size().max(1).leading_zeros()) as usize;
        BY_CLASS[class.min(BY_CLASS.len() - 1)].inc();
        let slow = NEXT_SLOW_NS.swap(0, Ordering::Relaxed);
        if slow != 0 {
            std::thread::sleep(Duration::from_nanos(slow));
        }
        lock();
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        unlock();
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        lock();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, layout) };
        unlock();
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// One test at a time: the race test reads the pool's statistics.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` on a thread and ends the process with a failure if it does not finish
/// within a minute. Not with a panic: formatting its message allocates, and the
/// allocator may be what is stuck.
fn finishes(what: &'static str, f: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    if finished.recv_timeout(Duration::from_secs(60)).is_err() {
        let message = b"not finished after 60 s (a deadlock in the pool's lock): ";
        // SAFETY: writes of valid buffers to stderr, then an exit without unwinding.
        unsafe {
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::write(2, what.as_ptr().cast(), what.len());
            libc::write(2, b"\n".as_ptr().cast(), 1);
            libc::_exit(1);
        }
    }
}

#[test]
fn dropping_items_never_calls_the_allocator_under_the_pool_lock() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    finishes("creating, using and dropping counters and PerCpus", || {
        // Each drop adds an offset to a free list, which grows from time to time: the
        // first drop of a size makes the list, the later ones grow it.
        for round in 0..3 {
            let counters: Vec<Counter> = (0..3000).map(|_| Counter::new()).collect();
            for c in &counters {
                c.add(round + 1);
            }
            let slots: Vec<PerCpu<u64>> = (0..500).map(|_| PerCpu::new(|_| 1)).collect();
            assert_eq!(
                counters.iter().map(Counter::sum).sum::<u64>(),
                3000 * (round + 1)
            );
            drop(counters);
            drop(slots);
        }
    });
    assert!(BY_CLASS.iter().map(Counter::sum).sum::<u64>() > 0);
}

#[test]
fn fork_while_another_thread_drops_an_item() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    finishes("a fork while another thread frees a pool item", || {
        // Each round a slot size nothing freed before, so that the drop needs a new free
        // list: an allocation, which sleeps 100 ms before it takes the allocator's lock.
        fork_while_dropping::<40>();
        fork_while_dropping::<48>();
        fork_while_dropping::<56>();
    });
}

/// A fork while another thread drops a `PerCpu<[u8; N]>` (the first of its size).
fn fork_while_dropping<const N: usize>() {
    let slots = PerCpu::new(|_| [0u8; N]);
    slots.with_cpu(|s| s[0] = 1);
    let dropper = std::thread::spawn(move || {
        NEXT_SLOW_NS.store(100_000_000, Ordering::Relaxed);
        drop(slots);
    });
    std::thread::sleep(Duration::from_millis(30));
    // `uid` makes std fork() instead of posix_spawn(): the fork handlers run.
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let status = std::process::Command::new("true")
        .uid(uid)
        .status()
        .expect("run true");
    assert!(status.success());
    dropper.join().unwrap();
}

#[cfg(feature = "__test-hooks")]
#[test]
fn racing_first_uses_allocate_one_item_and_free_none() {
    use cpulocal::Index;
    use std::sync::{Arc, Barrier};
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // A slot type of its own, and every item kept until the end: the pool's free list of
    // this size stays empty, so any free shows in its count. (`Counter`'s first use takes
    // the same path, `Pool::alloc_once`, but its size is every counter's: an allocation
    // reusing a freed offset would hide a free.)
    type Slot = [u64; 9];
    let frees = || cpulocal::pool::stats(Index::Cpu).free_items;
    let barrier = Arc::new(Barrier::new(2));
    let mut kept = Vec::new();
    for round in 0..20 {
        let slots = Arc::new(PerCpu::<Slot>::new_lazy(|| [0; 9]));
        let before = frees();
        let other = {
            let (barrier, slots) = (barrier.clone(), slots.clone());
            std::thread::spawn(move || {
                barrier.wait();
                slots.with_cpu(|v| v[0] += 1);
            })
        };
        // Whichever first use takes the pool's lock first holds it 20 ms: the other has
        // found the PerCpu without slots by then, and waits for the lock.
        cpulocal::test_hooks::sleep_inside_pool_lock(20_000);
        barrier.wait();
        slots.with_cpu(|v| v[0] += 1);
        other.join().unwrap();
        assert_eq!(
            frees(),
            before,
            "round {round}: a first use that lost the race freed the item it allocated"
        );
        let mut total = 0;
        slots.for_each(|_, v| total += v[0]);
        assert_eq!(total, 2);
        kept.push(slots);
    }
}
