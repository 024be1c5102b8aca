//! `PerCpu<T>` gives one holder at a time per slot, wherever the holder runs: threads
//! updating their own CPU's slot with `with_cpu` (more threads than CPUs, yields,
//! forced migrations while they hold a slot, a signal storm, the delay inside every
//! sequence) race a thread updating every slot with `on_cpu` and a thread reading them
//! all with `for_each`; no holder ever sees another's half-done update, and the final
//! total is exact. The same holds with slots picked by mm_cid, with the locked scheme
//! and without rseq (child processes).
//!
//! Also: invalid CPUs are refused, and `Counter::take` racing adds (and a signal
//! handler's adds) accounts for every update exactly once.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use cpulocal::remote::Scheme;
use cpulocal::{Counter, Index, PerCpu};

use common::{
    install_handler, kernel_aborts, serial, uses_sequences, AffinityChurn, Delay, ErrnoGuard, Rng,
    SignalStorm,
};

/// The signal of the storms.
const STORM: libc::c_int = libc::SIGUSR1;

/// A slot's value: two copies of one count, updated one after the other with a window
/// in between. A holder that finds them different entered while another holder was
/// half-way through its update: the slot's lock failed.
#[derive(Debug, Default)]
struct Pair {
    a: u64,
    b: u64,
}

/// `*x += 1` as a volatile read and write, so the compiler keeps the two halves of an
/// update apart (and in memory) around the window between them.
fn volatile_inc(x: &mut u64) {
    let p: *mut u64 = x;
    // SAFETY: `p` comes from a live `&mut u64`, valid and aligned for the access.
    unsafe { p.write_volatile(p.read_volatile() + 1) };
}

/// Updates `pair` under its slot's lock; returns false if it found it half-updated.
fn bump(pair: &mut Pair) -> bool {
    let whole = pair.a == pair.b;
    volatile_inc(&mut pair.a);
    common::spin(16);
    volatile_inc(&mut pair.b);
    whole
}

/// Signals the handler ran for, in this run.
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// The storm's handler only counts: `with_cpu` from a handler could wait for a lock
/// held by the very thread it interrupted.
extern "C" fn count_signal(_: libc::c_int) {
    let _errno = ErrnoGuard::save();
    // Relaxed: statistics.
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// What a run saw.
#[derive(Debug, Default)]
struct Report {
    index: Index,
    slots: usize,
    local_updates: u64,
    remote_updates: u64,
    reads: u64,
    /// Holders that found a slot half-updated.
    torn: u64,
    /// `for_each` totals that went down from one read to the next.
    non_monotonic: u64,
    final_total: u64,
    signals_sent: u64,
    signals_handled: u64,
    migrations_forced: u64,
    kernel_aborts: Option<u64>,
    elapsed: Duration,
}

/// Runs the race for `duration` with `workers` local updaters. Hold [`serial`].
fn run(index: Index, workers: usize, duration: Duration) -> Report {
    let start = Instant::now();
    let per_cpu = PerCpu::with_index(index, |_| Pair::default());
    let stop = AtomicBool::new(false);
    let torn = AtomicU64::new(0);
    let registered = Barrier::new(workers + 1);
    let done = Barrier::new(workers + 1);
    let pthreads = Mutex::new(Vec::new());
    let tids = Arc::new(Mutex::new(Vec::new()));
    let aborts_before = kernel_aborts();
    // Relaxed: reset before any signal is sent.
    HANDLED.store(0, Ordering::Relaxed);
    let mut report = Report {
        index,
        slots: per_cpu.slots(),
        ..Report::default()
    };

    std::thread::scope(|s| {
        let locals: Vec<_> = (0..workers)
            .map(|w| {
                let (per_cpu, stop, torn) = (&per_cpu, &stop, &torn);
                let (registered, done, pthreads, tids) = (&registered, &done, &pthreads, &tids);
                s.spawn(move || {
                    cpulocal::register_current_thread();
                    // SAFETY: pthread_self has no preconditions.
                    let me = unsafe { libc::pthread_self() };
                    pthreads
                        .lock()
                        .expect("pthreads")
                        .push(me as std::os::unix::thread::RawPthread);
                    tids.lock().expect("tids").push(common::gettid());
                    registered.wait();
                    let mut updates = 0u64;
                    // Relaxed: a stop request; the barrier synchronises.
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..32 {
                            if !per_cpu.with_cpu(bump) {
                                // Relaxed: statistics.
                                torn.fetch_add(1, Ordering::Relaxed);
                            }
                            updates += 1;
                        }
                        if w % 2 == 1 {
                            common::sched_yield();
                        }
                    }
                    done.wait();
                    updates
                })
            })
            .collect();
        let remote = s.spawn(|| {
            let mut updates = 0u64;
            let mut cpu = 0;
            // Relaxed: a stop request; the join synchronises.
            while !stop.load(Ordering::Relaxed) {
                let whole = if updates.is_multiple_of(4) {
                    // The guard form, held across a yield.
                    let mut guard = per_cpu.lock_cpu(cpu).expect("cpu < len");
                    assert_eq!(guard.cpu(), cpu);
                    let whole = bump(&mut guard);
                    common::sched_yield();
                    whole
                } else {
                    per_cpu.on_cpu(cpu, bump).expect("cpu < len")
                };
                if !whole {
                    // Relaxed: statistics.
                    torn.fetch_add(1, Ordering::Relaxed);
                }
                updates += 1;
                cpu = (cpu + 1) % per_cpu.slots();
            }
            updates
        });
        let reader = s.spawn(|| {
            let (mut reads, mut non_monotonic, mut last) = (0u64, 0u64, 0u64);
            // Relaxed: a stop request; the join synchronises.
            while !stop.load(Ordering::Relaxed) {
                let mut total = 0;
                per_cpu.for_each(|_, pair| {
                    if pair.a != pair.b {
                        // Relaxed: statistics.
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                    total += pair.a;
                });
                // Every slot only grows and is read after the previous pass read it.
                if total < last {
                    non_monotonic += 1;
                }
                last = total;
                reads += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            (reads, non_monotonic)
        });

        registered.wait();
        install_handler(STORM, count_signal);
        let delay = Delay::set(100);
        let targets = pthreads.lock().expect("pthreads").clone();
        // SAFETY: the workers stay alive until they pass `done`, which they reach only
        // after the storm has been stopped below.
        let storm = unsafe { SignalStorm::start(targets, STORM, Duration::from_micros(100)) };
        let churn = AffinityChurn::start(Arc::clone(&tids), Duration::from_micros(500));
        std::thread::sleep(duration);
        // Relaxed: the barrier and the joins synchronise.
        stop.store(true, Ordering::Relaxed);
        report.signals_sent = storm.stop();
        report.migrations_forced = churn.stop();
        drop(delay);
        done.wait();
        report.local_updates = locals.into_iter().map(|t| t.join().expect("local")).sum();
        report.remote_updates = remote.join().expect("remote");
        (report.reads, report.non_monotonic) = reader.join().expect("reader");
    });
    common::ignore_signal(STORM);

    per_cpu.for_each(|_, pair| {
        assert_eq!(pair.a, pair.b, "a slot was left half-updated");
        report.final_total += pair.a;
    });
    let by_value: u64 = per_cpu.into_vec().iter().map(|p| p.a).sum();
    assert_eq!(
        by_value, report.final_total,
        "into_vec disagrees with for_each"
    );
    // Relaxed: the threads are joined.
    report.torn = torn.load(Ordering::Relaxed);
    report.signals_handled = HANDLED.load(Ordering::Relaxed);
    report.kernel_aborts = kernel_aborts()
        .zip(aborts_before)
        .map(|(after, before)| after - before);
    report.elapsed = start.elapsed();
    report
}

fn assert_exact(report: &Report) {
    println!(
        "PerCpu by {:?} ({} slots) under {} / {}: {report:#?}",
        report.index,
        report.slots,
        cpulocal::mechanism(),
        cpulocal::remote_scheme()
    );
    assert_eq!(report.slots, cpulocal::possible_cpus());
    assert_eq!(report.torn, 0, "a holder found a slot half-updated");
    assert_eq!(report.non_monotonic, 0, "for_each totals went down");
    assert_eq!(
        report.final_total,
        report.local_updates + report.remote_updates,
        "updates were lost or invented"
    );
    assert!(report.local_updates > 0 && report.remote_updates > 0 && report.reads > 0);
    assert!(report.signals_handled > 0, "the storm reached no handler");
}

#[test]
fn per_cpu_total_is_exact_with_remote_updates_and_readers() {
    let _serial = serial();
    let report = run(Index::Cpu, 8, Duration::from_secs(2));
    assert_exact(&report);
    if uses_sequences() && cpulocal::remote_scheme() == Scheme::Membarrier {
        if let Some(aborts) = report.kernel_aborts {
            assert!(
                aborts > 0,
                "no sequence was aborted: the windows were not hit"
            );
        }
    }
}

#[test]
fn per_cpu_by_mm_cid_total_is_exact_with_remote_updates_and_readers() {
    let _serial = serial();
    assert_exact(&run(Index::MmCid, 8, Duration::from_millis(1500)));
}

/// The test above with cpulocal's own registration instead of glibc's: where the kernel
/// keeps `mm_cid` in the area (Linux 6.3+), `with_cpu` on mm_cid slots commits with a
/// sequence that checks the mm_cid, and `on_cpu`/`for_each` fence every CPU.
#[test]
fn per_cpu_by_mm_cid_is_exact_with_mm_cid_sequences() {
    let _serial = serial();
    let name = "per_cpu_by_mm_cid_is_exact_with_mm_cid_sequences";
    common::in_child(name, &[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")], || {
        let cpulocal::Mechanism::Rseq { usable_size, .. } = cpulocal::mechanism() else {
            println!("skipped: no rseq ({})", cpulocal::mechanism());
            return;
        };
        if usable_size < 28 {
            println!("skipped: the kernel keeps no mm_cid (usable size {usable_size})");
            return;
        }
        let report = run(Index::MmCid, 8, Duration::from_millis(1500));
        assert_exact(&report);
        if cpulocal::remote_scheme() == Scheme::Membarrier {
            if let Some(aborts) = report.kernel_aborts {
                assert!(
                    aborts > 0,
                    "no sequence was aborted: the windows were not hit"
                );
            }
        }
    });
}

#[test]
fn per_cpu_is_exact_with_the_locked_scheme() {
    let _serial = serial();
    common::in_locked_scheme_child("per_cpu_is_exact_with_the_locked_scheme", || {
        assert_exact(&run(Index::Cpu, 8, Duration::from_millis(1500)));
        assert_exact(&run(Index::MmCid, 8, Duration::from_millis(500)));
        take_race(Duration::from_millis(500));
    });
}

#[test]
fn per_cpu_is_exact_without_rseq() {
    let _serial = serial();
    common::in_fallback_child("per_cpu_is_exact_without_rseq", || {
        assert_exact(&run(Index::Cpu, 8, Duration::from_millis(1500)));
        assert_exact(&run(Index::MmCid, 8, Duration::from_millis(500)));
        take_race(Duration::from_millis(500));
    });
}

#[test]
fn on_cpu_and_lock_cpu_refuse_an_invalid_cpu() {
    for index in [Index::Cpu, Index::MmCid] {
        let per_cpu = PerCpu::with_index(index, |cpu| cpu);
        let len = per_cpu.slots();
        assert_eq!(len, cpulocal::possible_cpus());
        assert_eq!(per_cpu.index(), index);
        let mut ran = false;
        let err = per_cpu
            .on_cpu(len, |_| ran = true)
            .expect_err("on_cpu(len)");
        assert!(!ran, "on_cpu ran its closure on an invalid CPU");
        assert_eq!((err.cpu, err.slots), (len, len));
        let err = per_cpu.lock_cpu(usize::MAX).expect_err("lock_cpu(MAX)");
        assert_eq!((err.cpu, err.slots), (usize::MAX, len));
        assert!(err.to_string().contains(&usize::MAX.to_string()), "{err}");
        // Every valid slot is reachable and holds its own initial value.
        for cpu in 0..len {
            assert_eq!(per_cpu.on_cpu(cpu, |v| *v), Ok(cpu));
            assert_eq!(*per_cpu.lock_cpu(cpu).expect("valid"), cpu);
        }
    }
}

/// Adds made by the storm handler of the `take` test.
static HANDLER_ADDS: AtomicU64 = AtomicU64::new(0);
/// The counter of the `take` test, for its handler.
static TAKE_COUNTER: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();

/// Adds 1 to the `take` test's counter (documented as signal-safe on a registered
/// thread) and counts it.
extern "C" fn add_from_handler(_: libc::c_int) {
    let _errno = ErrnoGuard::save();
    if let Some(counter) = TAKE_COUNTER.get() {
        counter.add(1);
        // Relaxed: statistics, read after the threads are joined.
        HANDLER_ADDS.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn counter_take_racing_adds_accounts_for_every_update_once() {
    let _serial = serial();
    take_race(Duration::from_millis(1500));
}

/// Adders (and a storm handler adding too) race a thread taking the counter's value;
/// asserts that the takes and what is left account for every add. Hold [`serial`].
fn take_race(duration: Duration) {
    const ADDERS: usize = 6;
    let counter = TAKE_COUNTER.get_or_init(Counter::new);
    counter.reset();
    // Relaxed: set before the storm.
    HANDLER_ADDS.store(0, Ordering::Relaxed);
    let stop = AtomicBool::new(false);
    let registered = Barrier::new(ADDERS + 1);
    let done = Barrier::new(ADDERS + 1);
    let pthreads = Mutex::new(Vec::new());
    let (mut added, mut taken, mut takes, mut signals) = (0u64, 0u64, 0u64, 0u64);
    std::thread::scope(|s| {
        let adders: Vec<_> = (0..ADDERS)
            .map(|w| {
                let (stop, registered, done, pthreads) = (&stop, &registered, &done, &pthreads);
                s.spawn(move || {
                    cpulocal::register_current_thread();
                    // SAFETY: pthread_self has no preconditions.
                    let me = unsafe { libc::pthread_self() };
                    pthreads
                        .lock()
                        .expect("pthreads")
                        .push(me as std::os::unix::thread::RawPthread);
                    registered.wait();
                    let mut rng = Rng::new(w as u64 + 100);
                    let mut added = 0u64;
                    // Relaxed: a stop request; the barrier synchronises.
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..64 {
                            let n = 1 + rng.below(8);
                            counter.add(n);
                            added += n;
                        }
                        if w % 2 == 1 {
                            common::sched_yield();
                        }
                    }
                    done.wait();
                    added
                })
            })
            .collect();
        let taker = s.spawn(|| {
            let (mut taken, mut takes) = (0u64, 0u64);
            // Relaxed: a stop request; the join synchronises.
            while !stop.load(Ordering::Relaxed) {
                taken += counter.take();
                takes += 1;
                if takes.is_multiple_of(16) {
                    common::sched_yield();
                }
            }
            (taken, takes)
        });
        registered.wait();
        install_handler(STORM, add_from_handler);
        let delay = Delay::set(100);
        let targets = pthreads.lock().expect("pthreads").clone();
        // SAFETY: the adders stay alive until they pass `done`, reached only after the
        // storm has been stopped below.
        let storm = unsafe { SignalStorm::start(targets, STORM, Duration::from_micros(100)) };
        std::thread::sleep(duration);
        // Relaxed: the barrier and the joins synchronise.
        stop.store(true, Ordering::Relaxed);
        signals = storm.stop();
        drop(delay);
        done.wait();
        added = adders.into_iter().map(|t| t.join().expect("adder")).sum();
        (taken, takes) = taker.join().expect("taker");
    });
    common::ignore_signal(STORM);
    // Relaxed: the threads are joined.
    let handler_adds = HANDLER_ADDS.load(Ordering::Relaxed);
    let rest = counter.sum();
    println!(
        "Counter::take under {}: added {added} + {handler_adds} by the handler \
         ({signals} signals); {takes} takes took {taken}, {rest} left; slow path {}",
        cpulocal::mechanism(),
        counter.slow_path_sum()
    );
    assert!(takes > 1 && taken > 0, "the taker did not race the adders");
    assert!(handler_adds > 0, "the storm reached no handler");
    assert_eq!(
        taken.wrapping_add(rest),
        added + handler_adds,
        "take lost or double-counted updates"
    );
    assert_eq!(counter.take(), rest);
    assert_eq!(counter.sum(), 0);
}
