//! Exact totals under everything that aborts a sequence, in the spirit of the kernel's
//! `param_test`: more threads than CPUs (preemption, migration), some threads yielding
//! between adds, a signal storm whose handler adds to the same counter, and the delay
//! hook widening every sequence so that all of these land inside them.
//!
//! The same harness runs over [`Counter`], over a tiny counter built directly on
//! `arch::add` (which counts its aborts), and over one built on the deliberately broken
//! `arch::add_without_restart`: the first two must be exact, the last must lose updates
//! — which shows the harness can see a broken sequence.

use core::cell::Cell;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::{delay_exclusive, ignore_signal, install_handler, under_valgrind};
use crate::arch::{self, Outcome};
use crate::{test_hooks, thread, CachePadded, Counter};

/// The signal of the storm.
const STORM: libc::c_int = libc::SIGUSR2;

/// What the harness adds to.
pub(crate) trait Target: Sync + Send + 'static {
    /// Adds `n`; must be callable from a signal handler on a registered thread.
    fn add(&self, n: u64);
    /// The total, exact once every writer has stopped.
    fn sum(&self) -> u64;
}

impl Target for Counter {
    fn add(&self, n: u64) {
        Counter::add(self, n);
    }

    fn sum(&self) -> u64 {
        Counter::sum(self)
    }
}

/// One word per possible CPU, each written only by sequences naming its CPU.
struct Slots(Vec<CachePadded<AtomicUsize>>);

impl Slots {
    fn new() -> Self {
        Slots(
            (0..crate::possible_cpus())
                .map(|_| CachePadded::new(AtomicUsize::new(0)))
                .collect(),
        )
    }

    fn sum(&self) -> u64 {
        self.0
            .iter()
            .map(|s| s.load(Ordering::Relaxed) as u64)
            .fold(0, u64::wrapping_add)
    }

    /// Retries `add` until it commits, counting the aborts.
    fn add_with(
        &self,
        n: u64,
        aborts: &AtomicU64,
        add: unsafe fn(*mut crate::abi::Rseq, *mut usize, usize, u32) -> Outcome,
    ) {
        let rseq = thread::current().expect("the tiny counters need rseq");
        loop {
            let cpu = crate::current_cpu() as u32;
            // SAFETY: (1) `rseq` is this thread's area; (2) the word of `cpu` is
            // written only by adds naming `cpu` (atomically only if `add` restarts).
            match unsafe {
                add(
                    rseq.as_ptr(),
                    self.0[cpu as usize].as_ptr(),
                    n as usize,
                    cpu,
                )
            } {
                Outcome::Committed(()) => return,
                _ => {
                    aborts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Adds through the real restartable sequence (`arch::add`) and counts its aborts.
struct RestartingTiny {
    slots: Slots,
    aborts: AtomicU64,
}

/// `arch::add`, as a plain `unsafe fn` pointer.
///
/// # Safety
///
/// As for `arch::add`.
unsafe fn restarting_add(
    rseq: *mut crate::abi::Rseq,
    v: *mut usize,
    n: usize,
    cpu: u32,
) -> Outcome {
    // SAFETY: the caller's contract is `arch::add`'s.
    unsafe { arch::add(rseq, v, n, cpu) }
}

/// `arch::add_without_restart`, as a plain `unsafe fn` pointer.
///
/// # Safety
///
/// As for `arch::add`.
unsafe fn broken_add(rseq: *mut crate::abi::Rseq, v: *mut usize, n: usize, cpu: u32) -> Outcome {
    // SAFETY: the caller's contract is `arch::add`'s; the missing atomicity is what the
    // test measures.
    unsafe { arch::add_without_restart(rseq, v, n, cpu) }
}

impl Target for RestartingTiny {
    fn add(&self, n: u64) {
        self.slots.add_with(n, &self.aborts, restarting_add);
    }

    fn sum(&self) -> u64 {
        self.slots.sum()
    }
}

/// Adds through the broken, non-restartable sequence.
struct BrokenTiny {
    slots: Slots,
    aborts: AtomicU64,
}

impl Target for BrokenTiny {
    fn add(&self, n: u64) {
        self.slots.add_with(n, &self.aborts, broken_add);
    }

    fn sum(&self) -> u64 {
        self.slots.sum()
    }
}

/// The harness's knobs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Storm {
    pub(crate) workers: usize,
    pub(crate) duration: Duration,
    /// Time between two signals (each to the next worker in turn).
    pub(crate) signal_every: Duration,
    /// `pause` loops inside every sequence.
    pub(crate) delay: usize,
}

impl Storm {
    /// 8 workers (4× the CPUs of the test machines), a signal every ~50 µs.
    pub(crate) fn new(duration: Duration, delay: usize) -> Self {
        Storm {
            workers: 8,
            duration,
            signal_every: Duration::from_micros(50),
            delay,
        }
    }
}

/// What a run of the harness saw.
#[derive(Debug)]
pub(crate) struct StormReport {
    pub(crate) worker_adds: u64,
    pub(crate) handler_adds: u64,
    pub(crate) signals_sent: u64,
    pub(crate) sum: u64,
    pub(crate) elapsed: Duration,
}

impl StormReport {
    pub(crate) fn expected(&self) -> u64 {
        self.worker_adds + self.handler_adds
    }
}

/// The target of the handler: a `*const T` of the running harness, or null.
static TARGET: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

thread_local! {
    /// Adds made by the storm handler on this thread: a plain count, touched only by
    /// the handler (which cannot nest: its own signal is blocked while it runs).
    static HANDLER_ADDS: Cell<u64> = const { Cell::new(0) };
}

extern "C" fn storm_handler<T: Target>(_: libc::c_int) {
    // SAFETY: reading the calling thread's errno location is always allowed.
    let errno = unsafe { *libc::__errno_location() };
    let target = TARGET.load(Ordering::Acquire).cast_const().cast::<T>();
    if !target.is_null() {
        // SAFETY: the harness stores a live `T` before any signal is sent and clears it
        // only after the last worker (the only threads signalled) has been joined.
        unsafe { (*target).add(1) };
        HANDLER_ADDS.set(HANDLER_ADDS.get() + 1);
    }
    // SAFETY: as above; restoring errno keeps the handler invisible to the worker.
    unsafe { *libc::__errno_location() = errno };
}

/// Runs the storm over `target`. Hold [`delay_exclusive`]: the harness sets the delay
/// and installs a process-wide handler.
pub(crate) fn run_storm<T: Target>(target: &Arc<T>, storm: Storm) -> StormReport {
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_signals = Arc::new(AtomicBool::new(false));
    // Phases: registered → handler installed → loops done → storm over.
    let barrier = Arc::new(Barrier::new(storm.workers + 1));
    let workers: Vec<_> = (0..storm.workers)
        .map(|w| {
            let (target, stop, barrier) =
                (Arc::clone(target), Arc::clone(&stop), Arc::clone(&barrier));
            std::thread::spawn(move || {
                // Register before any handler can run on this thread.
                crate::register_current_thread();
                barrier.wait();
                barrier.wait();
                let mut adds = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        target.add(1);
                        adds += 1;
                    }
                    if w % 2 == 1 {
                        // SAFETY: sched_yield has no preconditions.
                        unsafe { libc::sched_yield() };
                    }
                }
                barrier.wait();
                barrier.wait();
                // The storm is over; a system call delivers any signal still pending.
                // SAFETY: as above.
                unsafe { libc::sched_yield() };
                (adds, HANDLER_ADDS.get())
            })
        })
        .collect();
    let tids: Vec<std::os::unix::thread::RawPthread> =
        workers.iter().map(|w| w.as_pthread_t()).collect();

    barrier.wait();
    test_hooks::set_delay_loops(storm.delay);
    TARGET.store(Arc::as_ptr(target).cast_mut().cast(), Ordering::Release);
    install_handler(STORM, storm_handler::<T>);
    let signaller = {
        let stop_signals = Arc::clone(&stop_signals);
        std::thread::spawn(move || {
            // Fine-grained sleeps: the default 50 µs timer slack would double the period.
            // SAFETY: PR_SET_TIMERSLACK takes integers only.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
            let mut sent = 0u64;
            // Paced by deadlines: a late wake-up is made up for by sending without
            // sleeping, so the average period stays `signal_every`.
            let mut next = Instant::now();
            'storm: loop {
                for &tid in &tids {
                    if stop_signals.load(Ordering::Relaxed) {
                        break 'storm;
                    }
                    // SAFETY: every worker stays alive until the signaller is joined.
                    if unsafe { libc::pthread_kill(tid as libc::pthread_t, STORM) } == 0 {
                        sent += 1;
                    }
                    next += storm.signal_every;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else if now - next > storm.signal_every * 16 {
                        next = now; // far behind (descheduled): do not burst
                    }
                }
            }
            sent
        })
    };
    barrier.wait();
    std::thread::sleep(storm.duration);
    stop.store(true, Ordering::Relaxed);
    barrier.wait();
    stop_signals.store(true, Ordering::Relaxed);
    let signals_sent = signaller.join().expect("signaller");
    barrier.wait();
    let (mut worker_adds, mut handler_adds) = (0, 0);
    for w in workers {
        let (adds, handled) = w.join().expect("worker");
        worker_adds += adds;
        handler_adds += handled;
    }
    ignore_signal(STORM);
    TARGET.store(core::ptr::null_mut(), Ordering::Release);
    test_hooks::set_delay_loops(0);
    StormReport {
        worker_adds,
        handler_adds,
        signals_sent,
        sum: target.sum(),
        elapsed: start.elapsed(),
    }
}

/// The `Counter` storm, shared with the child processes that run it without rseq.
pub(crate) fn counter_storm(duration: Duration) {
    let counter = Arc::new(Counter::new());
    let kernel_aborts = test_hooks::kernel_aborts();
    let report = run_storm(&counter, Storm::new(duration, 200));
    println!(
        "Counter storm under {}: {report:?}; {} sequences restarted by the kernel, {} added through the slow path",
        crate::mechanism(),
        test_hooks::kernel_aborts() - kernel_aborts,
        counter.slow_path_sum()
    );
    assert!(report.handler_adds > 0, "the storm reached no handler");
    assert!(
        report.handler_adds <= report.signals_sent,
        "more handler runs than signals"
    );
    // Valgrind runs one thread at a time, slowly: the workers' joins take longer there.
    let slack = Duration::from_secs(if under_valgrind() { 120 } else { 10 });
    assert!(
        report.elapsed < duration + slack,
        "the harness is bounded: {:?}",
        report.elapsed
    );
    assert_eq!(
        report.sum,
        report.expected(),
        "Counter lost or invented updates: {report:?}"
    );
}

#[test]
fn counter_sum_is_exact_under_preemption_yields_and_a_signal_storm() {
    let _delay = delay_exclusive();
    counter_storm(if under_valgrind() {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    });
}

#[test]
fn restarting_tiny_counter_is_exact_under_the_same_storm() {
    if under_valgrind() {
        println!("skipped under valgrind: needs rseq");
        return;
    }
    let _delay = delay_exclusive();
    let tiny = Arc::new(RestartingTiny {
        slots: Slots::new(),
        aborts: AtomicU64::new(0),
    });
    let kernel_aborts = test_hooks::kernel_aborts();
    let report = run_storm(&tiny, Storm::new(Duration::from_millis(1500), 200));
    let kernel_aborts = test_hooks::kernel_aborts() - kernel_aborts;
    let aborts = tiny.aborts.load(Ordering::Relaxed);
    println!(
        "restarting tiny counter: {report:?}, {aborts} aborts ({kernel_aborts} by the kernel)"
    );
    assert!(
        kernel_aborts > 0,
        "the kernel restarted no sequence: the abort path was not exercised"
    );
    assert_eq!(report.sum, report.expected(), "{report:?}");
}

#[test]
fn the_storm_catches_a_sequence_without_restart() {
    if under_valgrind() {
        println!("skipped under valgrind: needs rseq");
        return;
    }
    let _delay = delay_exclusive();
    let limit = Instant::now() + Duration::from_secs(8);
    let mut rounds = 0;
    let lost = loop {
        rounds += 1;
        let broken = Arc::new(BrokenTiny {
            slots: Slots::new(),
            aborts: AtomicU64::new(0),
        });
        let report = run_storm(&broken, Storm::new(Duration::from_millis(250), 200));
        if report.sum != report.expected() {
            println!(
                "round {rounds}: the broken add lost {} of {} updates: {report:?}",
                report.expected().wrapping_sub(report.sum),
                report.expected()
            );
            break true;
        }
        if Instant::now() > limit {
            break false;
        }
    };
    assert!(
        lost,
        "{rounds} rounds of the storm saw no lost update from a sequence without restart"
    );
}
