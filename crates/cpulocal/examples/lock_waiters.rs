//! What waiting for a held `PerCpu` slot costs: one thread holds slot 0 for 500 ms
//! while four threads wait for it (two with `on_cpu(0)`, two pinned to CPU 0 with
//! `with_cpu`); prints the CPU time the waiters used, against the wall time of the hold.
//! The target is at most 5 % for the four together: they spin briefly, then sleep on a
//! futex until the release wakes them.
//!
//! ```text
//! cargo run --release -p cpulocal --example lock_waiters
//! ```

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cpulocal::PerCpu;

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    // SAFETY: timespec is plain old data; all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { core::mem::zeroed() };
    // SAFETY: `ts` is a live timespec for the call to fill.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Pins the calling thread to `cpu`; false where that is not allowed.
fn pin_to(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (it is 0 here).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(0, core::mem::size_of_val(&set), &set) == 0 }
}

fn main() {
    let hold = Duration::from_millis(500);
    let slots = Arc::new(PerCpu::new(|_| 0u64));
    let guard = slots.lock_cpu(0).expect("CPU 0 exists");
    let ready = Arc::new(Barrier::new(5));
    let waiters: Vec<_> = (0..4)
        .map(|i| {
            let (slots, ready) = (Arc::clone(&slots), Arc::clone(&ready));
            std::thread::spawn(move || {
                let local = i % 2 == 1 && pin_to(0);
                ready.wait();
                let before = thread_cpu_time();
                if local {
                    slots.with_cpu(|v| *v += 1);
                } else {
                    slots.on_cpu(0, |v| *v += 1).expect("CPU 0 exists");
                }
                thread_cpu_time() - before
            })
        })
        .collect();
    ready.wait();
    let start = Instant::now();
    std::thread::sleep(hold);
    drop(guard);
    let used: Vec<Duration> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    let wall = start.elapsed();
    let total: Duration = used.iter().sum();
    println!(
        "slot held for {wall:?}; remote scheme: {}",
        cpulocal::remote_scheme()
    );
    for (i, u) in used.iter().enumerate() {
        println!("  waiter {i}: {u:?} of CPU");
    }
    println!(
        "4 waiters: {total:?} of CPU = {:.2} % of the hold (target: at most 5 %)",
        total.as_secs_f64() * 100.0 / wall.as_secs_f64()
    );
}
