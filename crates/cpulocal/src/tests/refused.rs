//! Without rseq every operation keeps its meaning. Child processes where rseq is
//! refused by a seccomp filter (so glibc's own registration fails at start-up, as in a
//! sandbox) or disabled with `CPULOCAL_DISABLE_RSEQ=1` must report the right fallback,
//! and give the same results as rseq does: the single-threaded model comparison of
//! every primitive (also run with rseq, in `model.rs`), `current_cpu`, and exact
//! multithreaded `Counter` totals, under the same signal storm as with rseq.

use std::sync::Arc;
use std::time::Duration;

use super::child::{in_child, test_name, Setup};
use super::model::ops_agree_with_a_model;
use super::stress::counter_storm;
use super::{
    current_cpu_agrees_with_sched_getcpu, delay_exclusive, expected_mechanism, under_valgrind,
};
use crate::sys::Errno;
use crate::{thread, Counter, FallbackReason, Mechanism};

/// Everything a process without rseq must still get right.
fn fallback_keeps_every_promise() {
    assert!(
        !thread::is_registered(),
        "no thread is registered without rseq"
    );
    assert!(!crate::register_current_thread());
    assert_eq!(current_cpu_agrees_with_sched_getcpu().map(|_| ()), Ok(()));
    // Same seeds and lengths as the rseq run in `model.rs`.
    ops_agree_with_a_model(0x5eed, 20_000);

    // Many threads, more than CPUs, some yielding: exact.
    let counter = Arc::new(Counter::new());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                for i in 0..20_000 {
                    counter.add(1);
                    if t % 2 == 1 && i % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                thread::is_registered()
            })
        })
        .collect();
    for t in threads {
        assert!(
            !t.join().expect("adder"),
            "no thread is registered without rseq"
        );
    }
    assert_eq!(counter.sum(), 160_000);
    assert_eq!(
        counter.slow_path_sum(),
        160_000,
        "every update takes the atomic path"
    );

    let _delay = delay_exclusive();
    counter_storm(Duration::from_millis(1000));
}

#[test]
fn every_operation_keeps_its_meaning_when_seccomp_refuses_rseq() {
    if under_valgrind() {
        // Valgrind does not implement seccomp(2): the filter cannot be installed in the
        // child it forks. (Without rseq at all, the rest of this file's promises are
        // what every in-process test checks under valgrind.)
        println!("skipped under valgrind: no seccomp(2)");
        return;
    }
    let name = test_name!(every_operation_keeps_its_meaning_when_seccomp_refuses_rseq);
    let setup = Setup {
        deny_rseq: true,
        ..Setup::default()
    };
    in_child(name, setup, || {
        // glibc's registration failed at start-up, so it reports none.
        assert_eq!(
            thread::glibc_rseq().map(|g| g.size),
            super::glibc_size_when_unregistered()
        );
        let mechanism = crate::mechanism();
        assert_eq!(
            mechanism,
            Mechanism::Fallback(FallbackReason::Refused(Errno(libc::ENOSYS)))
        );
        println!("seccomp child: {mechanism}");
        fallback_keeps_every_promise();
    });
}

#[test]
fn every_operation_keeps_its_meaning_when_rseq_is_disabled() {
    let name = test_name!(every_operation_keeps_its_meaning_when_rseq_is_disabled);
    let setup = Setup {
        env: vec![("CPULOCAL_DISABLE_RSEQ", "1")],
        ..Setup::default()
    };
    in_child(name, setup, || {
        let mechanism = crate::mechanism();
        assert_eq!(mechanism, Mechanism::Fallback(FallbackReason::Disabled));
        assert_eq!(mechanism, expected_mechanism());
        println!("disabled child: {mechanism}");
        fallback_keeps_every_promise();
    });
}

/// The word of [`a_handler_inside_a_fallback_primitive_gets_aborted_not_a_deadlock`], and
/// what its "handler" got.
static STRIPE_WORD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static IN_WINDOW: std::sync::Mutex<Vec<crate::ops::Outcome>> = std::sync::Mutex::new(Vec::new());

/// A signal handler that interrupts a fallback primitive while it holds its stripe, and
/// needs the same stripe, gets `Aborted`, at both ends of the primitive's hold: right
/// after the lock is taken and right before it is given back. (The stripe was noted
/// after the first and forgotten before the second: a reviewer's signal storm hung in 3
/// of 3 runs, the handler spinning on its own thread's lock.) A test hook runs the
/// "handler" at exactly those two points; a watchdog turns a hang into a failure.
#[test]
fn a_handler_inside_a_fallback_primitive_gets_aborted_not_a_deadlock() {
    let name = test_name!(a_handler_inside_a_fallback_primitive_gets_aborted_not_a_deadlock);
    let setup = Setup {
        env: vec![("CPULOCAL_DISABLE_RSEQ", "1")],
        ..Setup::default()
    };
    in_child(name, setup, || {
        use crate::ops::{self, Outcome};
        fn handler() {
            // SAFETY: every writer of the word goes through the fallback's stripes.
            let got = unsafe { ops::add(STRIPE_WORD.as_ptr(), 1, 0) };
            let mut seen = IN_WINDOW.lock().unwrap();
            seen.push(got);
            if seen.len() == 1 {
                crate::test_hooks::run_in_stripe_windows(handler); // the release's end too
            }
        }
        let outer = super::within(Duration::from_secs(10), || {
            crate::test_hooks::run_in_stripe_windows(handler);
            // SAFETY: as in `handler`.
            unsafe { ops::add(STRIPE_WORD.as_ptr(), 1, 0) }
        });
        assert_eq!(outer, Some(Outcome::Committed(())), "the primitive hung");
        assert_eq!(
            *IN_WINDOW.lock().unwrap(),
            [Outcome::Aborted, Outcome::Aborted]
        );
        assert_eq!(STRIPE_WORD.load(std::sync::atomic::Ordering::Relaxed), 1);
    });
}
