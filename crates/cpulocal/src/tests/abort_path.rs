//! The abort path runs: a thread held inside a critical section by the delay hook is
//! signalled; the kernel must send it to the abort label (the attempt reports
//! `Aborted` and stores nothing), and the retry must land exactly once.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{delay_exclusive, ignore_signal, install_handler, under_valgrind};
use crate::arch::{self, Outcome};
use crate::{test_hooks, thread, CachePadded};

/// How many handler runs so far.
static HANDLED: AtomicUsize = AtomicUsize::new(0);

/// Lets the held sequence go: the retry after the abort reads a zero delay.
extern "C" fn release_the_delay(_: libc::c_int) {
    test_hooks::set_delay_loops(0);
    HANDLED.fetch_add(1, Ordering::SeqCst);
}

/// Spins until `flag` is set or `limit` passes; whether it was set.
fn wait_for(flag: &AtomicBool, limit: Duration) -> bool {
    let start = Instant::now();
    while !flag.load(Ordering::SeqCst) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

/// How many `pause` loops take about `d` (at least; the sequence's loop is tighter
/// than this one). The fastest of several timings: a preemption during one only makes
/// it slower, and a slow timing would make the delay short enough for the held sequence
/// to commit before the signal (as happened once on a loaded CI machine).
fn loops_lasting(d: Duration) -> usize {
    const N: u32 = 20_000;
    let fastest = (0..10)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..N {
                core::hint::spin_loop();
            }
            start.elapsed()
        })
        .min()
        .expect("ten timings");
    let per_loop_ps = (fastest.as_nanos() * 1000 / u128::from(N)).max(1);
    (d.as_nanos() * 1000 / per_loop_ps) as usize
}

#[test]
fn a_signal_inside_a_sequence_restarts_it_and_the_retry_lands_once() {
    if under_valgrind() {
        println!("skipped under valgrind: needs rseq");
        return;
    }
    const ROUNDS: usize = 3;
    let _delay = delay_exclusive();
    // Long enough that only the signal's abort gets the thread out in time, short
    // enough not to stall for long a test elsewhere that runs a sequence on an area the
    // kernel does not know (and so never aborts), and ignores the delay lock.
    let held = loops_lasting(Duration::from_secs(2));
    install_handler(libc::SIGUSR1, release_the_delay);
    let slots: Arc<Vec<CachePadded<AtomicUsize>>> = Arc::new(
        (0..crate::possible_cpus())
            .map(|_| CachePadded::new(AtomicUsize::new(0)))
            .collect(),
    );

    for round in 1..=ROUNDS {
        let entering = Arc::new(AtomicBool::new(false));
        let go = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let handled_before = HANDLED.load(Ordering::SeqCst);
        let kernel_aborts_before = test_hooks::kernel_aborts();
        let worker = {
            let (slots, entering, go, done) = (
                Arc::clone(&slots),
                Arc::clone(&entering),
                Arc::clone(&go),
                Arc::clone(&done),
            );
            std::thread::spawn(move || {
                let rseq = thread::current().expect("this test needs rseq");
                let mut outcomes = Vec::with_capacity(64);
                entering.store(true, Ordering::SeqCst);
                // No allocation from here on: the delay holds *every* sequence, the
                // allocator's too when `CpuCache` is the global allocator, and on an
                // idle machine nothing preempts them.
                while !go.load(Ordering::SeqCst) {
                    core::hint::spin_loop();
                }
                while outcomes.len() < 64 {
                    let cpu = crate::current_cpu() as u32;
                    // SAFETY: (1) `rseq` is this thread's area; (2) `slots[cpu]` is
                    // written only by this add naming `cpu`, and read atomically.
                    let outcome =
                        unsafe { arch::add(rseq.as_ptr(), slots[cpu as usize].as_ptr(), 1, cpu) };
                    outcomes.push(outcome);
                    if outcome == Outcome::Committed(()) {
                        break;
                    }
                }
                done.store(true, Ordering::SeqCst);
                outcomes
            })
        };
        let tid = worker.as_pthread_t();
        assert!(
            wait_for(&entering, Duration::from_secs(5)),
            "the worker did not start"
        );
        // The delay only once the worker's set-up (and the spawn's allocations) is done.
        test_hooks::set_delay_loops(held);
        go.store(true, Ordering::SeqCst);
        // Long enough for the worker to be deep inside the held sequence.
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: `tid` is the worker, alive until joined below.
        let sent = unsafe { libc::pthread_kill(tid as libc::pthread_t, libc::SIGUSR1) };
        assert_eq!(sent, 0);
        let released = wait_for(&done, Duration::from_secs(3));
        if !released {
            // Get the worker out before failing: no delay, and aborts until it commits.
            test_hooks::set_delay_loops(0);
            let start = Instant::now();
            while !done.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(2) {
                // SAFETY: as above.
                unsafe { libc::pthread_kill(tid as libc::pthread_t, libc::SIGUSR1) };
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let outcomes = worker.join().expect("worker");
        assert!(
            released,
            "round {round}: the signal did not release the held sequence: {outcomes:?}"
        );
        assert_eq!(
            HANDLED.load(Ordering::SeqCst),
            handled_before + 1,
            "one handler run"
        );
        assert_eq!(
            outcomes.first(),
            Some(&Outcome::Aborted),
            "round {round}: the first attempt must abort: {outcomes:?}"
        );
        assert_eq!(
            outcomes.last(),
            Some(&Outcome::Committed(())),
            "round {round}: {outcomes:?}"
        );
        assert!(
            outcomes[..outcomes.len() - 1]
                .iter()
                .all(|o| *o == Outcome::Aborted),
            "round {round}: {outcomes:?}"
        );
        // The abort came from the kernel (label 6), not from a CPU mismatch.
        let kernel_aborts = test_hooks::kernel_aborts() - kernel_aborts_before;
        assert!(
            kernel_aborts >= 1,
            "round {round}: the kernel restarted no sequence"
        );
        let total: usize = slots.iter().map(|s| s.load(Ordering::SeqCst)).sum();
        assert_eq!(
            total, round,
            "round {round}: the aborted attempts stored nothing, the retry stored once"
        );
        println!("round {round}: outcomes {outcomes:?}, {kernel_aborts} kernel aborts");
    }
    ignore_signal(libc::SIGUSR1);
}
