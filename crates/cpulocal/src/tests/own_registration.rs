//! cpulocal's own registration, in child processes started with
//! `GLIBC_TUNABLES=glibc.pthread.rseq=0` (glibc then registers nothing): it is chosen,
//! it survives thread churn with exact totals, it is unregistered by the pthread-key
//! destructor at thread exit, and `thread_local!` destructors (which run before that)
//! can still count. The destructor promise is also checked with glibc's registration,
//! in process.

use core::cell::RefCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::child::{in_child, test_name, Setup};
use super::registration::{expected_seen, kernel_registration_of, observe, observe_on_raw_pthread};
use super::{
    current_cpu_agrees_with_sched_getcpu, delay_exclusive, delay_shared, expected_mechanism,
};
use crate::ops::{self, Outcome};
use crate::sys::Errno;
use crate::{abi, test_hooks, thread, Counter, Mechanism, Registrar};

fn glibc_registers_none() -> Setup {
    Setup {
        env: vec![("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
        ..Setup::default()
    }
}

#[test]
fn own_registration_is_chosen_when_glibc_registers_none() {
    in_child(
        test_name!(own_registration_is_chosen_when_glibc_registers_none),
        glibc_registers_none(),
        || {
            assert_eq!(
                thread::glibc_rseq().map(|g| g.size),
                super::glibc_size_when_unregistered(),
                "glibc was told not to register"
            );
            let mechanism = crate::mechanism();
            assert!(
                matches!(
                    mechanism,
                    Mechanism::Rseq {
                        registrar: Registrar::Own,
                        ..
                    }
                ),
                "{mechanism:?}"
            );
            assert_eq!(mechanism, expected_mechanism());
            let expected = expected_seen();
            assert_eq!(observe(), expected, "the test's own thread");
            assert_eq!(
                std::thread::spawn(observe).join().expect("std thread"),
                expected,
                "a std thread"
            );
            assert_eq!(observe_on_raw_pthread(), expected, "a raw pthread");
            println!("own registration: {mechanism}");
        },
    );
}

/// Counts an add made by a `thread_local!` destructor at thread exit.
struct AddAtExit {
    counter: Arc<Counter>,
    /// Destructors that ran, and those that found the thread registered.
    ran: Arc<AtomicU64>,
    registered: Arc<AtomicU64>,
}

impl Drop for AddAtExit {
    fn drop(&mut self) {
        self.counter.add(1);
        if thread::is_registered() {
            self.registered.fetch_add(1, Ordering::SeqCst);
        }
        self.ran.fetch_add(1, Ordering::SeqCst);
    }
}

thread_local! {
    static AT_EXIT: RefCell<Option<AddAtExit>> = const { RefCell::new(None) };
}

/// Exit-time bookkeeping shared by the threads of one test.
#[derive(Clone, Default)]
struct ExitTally {
    ran: Arc<AtomicU64>,
    registered: Arc<AtomicU64>,
}

impl ExitTally {
    /// Arms the calling thread's `thread_local!` destructor to add 1 to `counter`.
    fn arm(&self, counter: &Arc<Counter>) {
        AT_EXIT.with(|slot| {
            *slot.borrow_mut() = Some(AddAtExit {
                counter: Arc::clone(counter),
                ran: Arc::clone(&self.ran),
                registered: Arc::clone(&self.registered),
            })
        });
    }
}

/// Threads that used cpulocal (or did not yet) add from a `thread_local!` destructor;
/// every add is counted, and the destructors find the area still registered.
fn destructor_adds_are_counted(threads: u64) {
    let counter = Arc::new(Counter::new());
    let tally = ExitTally::default();
    for i in 0..threads {
        let (counter, tally) = (Arc::clone(&counter), tally.clone());
        std::thread::spawn(move || {
            // Half the threads use cpulocal first; the others first use it at exit.
            if i % 2 == 0 {
                (0..100).for_each(|_| counter.add(1));
            }
            tally.arm(&counter);
        })
        .join()
        .expect("thread");
    }
    let used = threads.div_ceil(2) * 100;
    assert_eq!(
        tally.ran.load(Ordering::SeqCst),
        threads,
        "every destructor ran"
    );
    assert_eq!(
        counter.sum(),
        used + threads,
        "every destructor's add is counted"
    );
    let rseq = matches!(expected_mechanism(), Mechanism::Rseq { .. });
    let expected_registered = if rseq { threads } else { 0 };
    assert_eq!(
        tally.registered.load(Ordering::SeqCst),
        expected_registered,
        "thread_local! destructors run before the unregistration"
    );
}

#[test]
fn thread_local_destructor_can_still_count_at_thread_exit() {
    let _delay = delay_shared();
    destructor_adds_are_counted(50);
}

#[test]
fn thread_local_destructor_can_still_count_at_thread_exit_with_own_registration() {
    let name =
        test_name!(thread_local_destructor_can_still_count_at_thread_exit_with_own_registration);
    in_child(name, glibc_registers_none(), || {
        assert_eq!(crate::mechanism(), expected_mechanism());
        destructor_adds_are_counted(200);
    });
}

/// The destructor of a pthread key created after cpulocal's unregistration key (as a C
/// library's, or musl's std's own key for `thread_local!` destructors, would be): adds 1
/// and notes whether the thread was still registered.
unsafe extern "C" fn add_from_a_later_key(value: *mut libc::c_void) {
    // SAFETY: the value is the `Box<AddAtExit>` leaked by the thread that set it.
    drop(unsafe { Box::from_raw(value.cast::<AddAtExit>()) });
}

/// Regression: the unregistration ran in the first round of pthread-key destructors, so a
/// later key's destructor (on musl, every `thread_local!` destructor: the VM lane's
/// guests found it) saw the area unregistered. Fails without the deferral in
/// `thread::unregister_own`.
#[test]
fn a_later_pthread_keys_destructor_finds_the_area_registered_with_own_registration() {
    let name =
        test_name!(a_later_pthread_keys_destructor_finds_the_area_registered_with_own_registration);
    in_child(name, glibc_registers_none(), || {
        assert_eq!(crate::mechanism(), expected_mechanism());
        // cpulocal's key exists (this thread is registered); this one comes after it.
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a live out-parameter; the destructor is a plain extern fn.
        let r = unsafe { libc::pthread_key_create(&mut key, Some(add_from_a_later_key)) };
        assert_eq!(r, 0);
        const THREADS: u64 = 20;
        let counter = Arc::new(Counter::new());
        let tally = ExitTally::default();
        for _ in 0..THREADS {
            let (counter, tally) = (Arc::clone(&counter), tally.clone());
            std::thread::spawn(move || {
                counter.add(1);
                let at_exit = Box::new(AddAtExit {
                    counter,
                    ran: tally.ran,
                    registered: tally.registered,
                });
                // SAFETY: `key` is live; the destructor takes the box back.
                let r = unsafe { libc::pthread_setspecific(key, Box::into_raw(at_exit).cast()) };
                assert_eq!(r, 0);
            })
            .join()
            .expect("thread");
        }
        assert_eq!(tally.ran.load(Ordering::SeqCst), THREADS);
        assert_eq!(
            counter.sum(),
            2 * THREADS,
            "every destructor's add is counted"
        );
        assert_eq!(
            tally.registered.load(Ordering::SeqCst),
            THREADS,
            "the later key's destructors run before the unregistration"
        );
    });
}

#[test]
fn threads_that_used_cpulocal_exit_cleanly_many_times() {
    in_child(
        test_name!(threads_that_used_cpulocal_exit_cleanly_many_times),
        glibc_registers_none(),
        || {
            const THREADS: u64 = 2000;
            let counter = Arc::new(Counter::new());
            let mut agreed = 0;
            for _ in 0..THREADS / 4 {
                let batch: Vec<_> = (0..4)
                    .map(|_| {
                        let counter = Arc::clone(&counter);
                        std::thread::spawn(move || {
                            counter.add(1);
                            (
                                thread::is_registered(),
                                current_cpu_agrees_with_sched_getcpu().is_ok(),
                            )
                        })
                    })
                    .collect();
                for t in batch {
                    let (registered, cpu_ok) =
                        t.join().expect("a thread that used cpulocal exits cleanly");
                    assert!(registered);
                    agreed += u64::from(cpu_ok);
                }
            }
            assert_eq!(agreed, THREADS, "current_cpu agrees with sched_getcpu");
            assert_eq!(counter.sum(), THREADS);
            println!("{THREADS} threads registered, used cpulocal and exited");
        },
    );
}

#[test]
fn counter_is_exact_under_thread_churn_with_own_registration() {
    in_child(
        test_name!(counter_is_exact_under_thread_churn_with_own_registration),
        glibc_registers_none(),
        || {
            assert_eq!(crate::mechanism(), expected_mechanism());
            let _delay = delay_exclusive();
            test_hooks::set_delay_loops(100);
            let counter = Arc::new(Counter::new());
            let stop = Arc::new(AtomicBool::new(false));
            let steady: Vec<_> = (0..3)
                .map(|_| {
                    let (counter, stop) = (Arc::clone(&counter), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        let mut adds = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            counter.add(1);
                            adds += 1;
                        }
                        adds
                    })
                })
                .collect();
            let tally = ExitTally::default();
            let mut churned = 0u64;
            let mut threads = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_millis(1500);
            while std::time::Instant::now() < deadline {
                let batch: Vec<_> = (0..4u64)
                    .map(|k| {
                        let (counter, tally) = (Arc::clone(&counter), tally.clone());
                        std::thread::spawn(move || {
                            // Some threads first use cpulocal in their exit destructor.
                            let adds = if k == 0 { 0 } else { 500 * k };
                            (0..adds).for_each(|_| counter.add(1));
                            tally.arm(&counter);
                            adds
                        })
                    })
                    .collect();
                for t in batch {
                    churned += t.join().expect("churned thread");
                    threads += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            let steady: u64 = steady
                .into_iter()
                .map(|t| t.join().expect("steady thread"))
                .sum();
            test_hooks::set_delay_loops(0);
            let expected = steady + churned + threads;
            println!(
                "churn: {threads} short-lived threads, {expected} adds, slow path {}",
                counter.slow_path_sum()
            );
            assert_eq!(tally.ran.load(Ordering::SeqCst), threads);
            assert_eq!(tally.registered.load(Ordering::SeqCst), threads);
            assert_eq!(
                counter.sum(),
                expected,
                "no update lost or invented under thread churn"
            );
        },
    );
}

/// What the late key destructor found.
#[derive(Debug, Default, PartialEq, Eq)]
struct LateExit {
    /// Rounds of key destructors it waited for cpulocal's to run.
    rounds: u32,
    registered: bool,
    /// The kernel's answer to registering the thread's old area again.
    kernel: Option<Result<(), Errno>>,
    /// Whether `ops::add` reported `Aborted` (the contract for unregistered threads in
    /// a process that uses rseq).
    primitive_aborted: bool,
    cpu_agrees: bool,
    done: bool,
}

/// Passed to the late key destructor.
struct LateProbe {
    area: core::ptr::NonNull<abi::Rseq>,
    counter: Arc<Counter>,
    key: libc::pthread_key_t,
    out: Arc<Mutex<LateExit>>,
}

/// A pthread-key destructor created after cpulocal's key: glibc runs key destructors in
/// key order, and again in later rounds for keys set anew, so by the time it gives up
/// waiting cpulocal's destructor has run.
unsafe extern "C" fn late_key_destructor(probe: *mut libc::c_void) {
    // SAFETY: the value is the `Box<LateProbe>` leaked by the thread below; this
    // destructor is its only user and either passes it on or frees it.
    let probe = unsafe { Box::from_raw(probe.cast::<LateProbe>()) };
    let mut out = probe.out.lock().unwrap_or_else(|p| p.into_inner());
    if thread::is_registered() && out.rounds < 3 {
        // cpulocal's destructor has not run yet: ask for another round.
        out.rounds += 1;
        let key = probe.key;
        drop(out);
        // SAFETY: `key` is a live key; the value comes back to this destructor.
        unsafe { libc::pthread_setspecific(key, Box::into_raw(probe).cast()) };
        return;
    }
    out.registered = thread::is_registered();
    out.kernel = Some(kernel_registration_of(probe.area, Registrar::Own));
    probe.counter.add(1);
    let word = core::sync::atomic::AtomicUsize::new(0);
    // SAFETY: `word` is a local written only through this primitive.
    out.primitive_aborted =
        unsafe { ops::add(word.as_ptr(), 1, crate::current_cpu() as u32) } == Outcome::Aborted;
    out.cpu_agrees = current_cpu_agrees_with_sched_getcpu().is_ok();
    out.done = true;
}

#[test]
fn own_area_is_unregistered_at_thread_exit_and_later_destructors_still_count() {
    let name =
        test_name!(own_area_is_unregistered_at_thread_exit_and_later_destructors_still_count);
    in_child(name, glibc_registers_none(), || {
        // Decides the mechanism, creating cpulocal's key, before ours.
        assert_eq!(crate::mechanism(), expected_mechanism());
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a live out-parameter; the destructor is an extern fn.
        let r = unsafe { libc::pthread_key_create(&mut key, Some(late_key_destructor)) };
        assert_eq!(r, 0);
        let counter = Arc::new(Counter::new());
        let out = Arc::new(Mutex::new(LateExit::default()));
        {
            let (counter, out) = (Arc::clone(&counter), Arc::clone(&out));
            std::thread::spawn(move || {
                counter.add(1);
                let area = thread::current().expect("registered");
                let probe = Box::new(LateProbe {
                    area,
                    counter,
                    key,
                    out,
                });
                // SAFETY: `key` is live; the destructor takes the box back.
                unsafe { libc::pthread_setspecific(key, Box::into_raw(probe).cast()) };
            })
            .join()
            .expect("thread");
        }
        let seen = std::mem::take(&mut *out.lock().expect("probe result"));
        println!("late key destructor saw {seen:?}");
        assert!(seen.done, "the late destructor ran to the end: {seen:?}");
        assert!(
            !seen.registered,
            "cpulocal considers the thread unregistered: {seen:?}"
        );
        // Registering the old area succeeds only if the kernel no longer has it
        // (EBUSY would mean it was never unregistered). The probe undoes its own
        // registration.
        assert_eq!(
            seen.kernel,
            Some(Ok(())),
            "the kernel forgot the area: {seen:?}"
        );
        assert!(
            seen.primitive_aborted,
            "unregistered thread in an rseq process gets Aborted"
        );
        assert!(seen.cpu_agrees);
        assert_eq!(counter.sum(), 2, "the add after unregistration is counted");
        assert_eq!(counter.slow_path_sum(), 1, "through the slow path");
        // SAFETY: the key is ours and no thread uses it any more.
        unsafe { libc::pthread_key_delete(key) };
    });
}

/// The `PerCpu`s of [`a_guard_kept_across_unregistration_gives_no_fast_path_the_old_area`].
static KEPT_BY_CPU: crate::PerCpu<u64> = crate::PerCpu::new_lazy(|| 0);
static KEPT_BY_MM_CID: crate::PerCpu<u64> =
    crate::PerCpu::with_index_lazy(crate::Index::MmCid, || 0);
/// What the late destructor there saw: rounds, and whether a fast path committed after
/// the unregistration.
static KEPT_SEEN: Mutex<(u32, bool, bool)> = Mutex::new((0, false, false));

/// A later key's destructor: takes a `PerCpu` slot by the fast path while the thread is
/// registered and keeps its guard (in the key's value) until cpulocal's destructor has
/// unregistered the area; then drops it and uses an mm_cid-indexed `PerCpu`.
unsafe extern "C" fn keep_a_guard_across_unregistration(value: *mut libc::c_void) {
    type Kept = Option<crate::PerCpuGuard<'static, u64>>;
    // SAFETY: the value is a leaked `Box<(key, Kept)>`, passed on or freed here only.
    let mut kept = unsafe { Box::from_raw(value.cast::<(libc::pthread_key_t, Kept)>()) };
    let mut seen = KEPT_SEEN.lock().unwrap_or_else(|p| p.into_inner());
    seen.0 += 1;
    if thread::is_registered() && seen.0 < 4 {
        if kept.1.is_none() {
            kept.1 = Some(KEPT_BY_CPU.lock());
        }
        drop(seen);
        // SAFETY: the key is live; the value comes back to this destructor.
        unsafe { libc::pthread_setspecific(kept.0, Box::into_raw(kept).cast()) };
        return;
    }
    seen.1 = kept.1.is_some() && !thread::is_registered();
    drop(seen);
    drop(kept); // the guard's release, after the unregistration
    fn committed() {
        KEPT_SEEN.lock().unwrap_or_else(|p| p.into_inner()).2 = true;
    }
    test_hooks::run_after_fast_lock(committed);
    KEPT_BY_MM_CID.with_cpu(|v| *v += 1);
    KEPT_BY_CPU.with_cpu(|v| *v += 1);
}

/// A fast-path guard kept across the thread's unregistration (by a later key's
/// destructor) must not give the fast path the unregistered area back when it drops:
/// an mm_cid-indexed `PerCpu`'s sequence would accept that area (the kernel leaves its
/// `mm_cid` at 0) and commit with nothing to restart it. Later uses take the slow
/// paths, and count.
#[test]
fn a_guard_kept_across_unregistration_gives_no_fast_path_the_old_area() {
    let name = test_name!(a_guard_kept_across_unregistration_gives_no_fast_path_the_old_area);
    in_child(name, glibc_registers_none(), || {
        assert_eq!(crate::mechanism(), expected_mechanism());
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a live out-parameter; the destructor is an extern fn.
        let r =
            unsafe { libc::pthread_key_create(&mut key, Some(keep_a_guard_across_unregistration)) };
        assert_eq!(r, 0);
        // A few threads: the unregistered area's `mm_cid` is not always one the sequence
        // accepts (before the fix, 3 runs of 4 committed with one thread).
        for round in 0..5 {
            *KEPT_SEEN.lock().unwrap() = (0, false, false);
            std::thread::spawn(move || {
                // Sets the fast path up (and both PerCpus' slots).
                KEPT_BY_CPU.with_cpu(|v| *v += 1);
                KEPT_BY_MM_CID.with_cpu(|v| *v += 1);
                let value: Box<(
                    libc::pthread_key_t,
                    Option<crate::PerCpuGuard<'static, u64>>,
                )> = Box::new((key, None));
                // SAFETY: `key` is live; the destructor takes the box back.
                unsafe { libc::pthread_setspecific(key, Box::into_raw(value).cast()) };
            })
            .join()
            .expect("thread");
            let seen = *KEPT_SEEN.lock().unwrap();
            assert!(
                seen.1,
                "round {round}: the guard was kept past the unregistration: {seen:?}"
            );
            assert!(
                !seen.2,
                "round {round}: a fast path committed on the unregistered area: {seen:?}"
            );
        }
        let (mut by_cpu, mut by_mm_cid) = (0, 0);
        KEPT_BY_CPU.for_each(|_, v| by_cpu += *v);
        KEPT_BY_MM_CID.for_each(|_, v| by_mm_cid += *v);
        assert_eq!((by_cpu, by_mm_cid), (10, 10));
        // SAFETY: the key is ours and no thread uses it any more.
        unsafe { libc::pthread_key_delete(key) };
    });
}
