//! `Stack<T>` keeps every node exactly once: under more threads than CPUs, yields,
//! forced migrations, a signal storm whose handler pops and pushes too, and a thief
//! stealing and draining every CPU's list while their owners push and pop, each node
//! leaves a list once for every time it entered one, and a final drain of every CPU
//! finds exactly the nodes nobody holds.
//!
//! The same harness, run with the stack's guard deliberately broken
//! (`test_hooks::break_stack_guard`), must see nodes lost or duplicated: that shows it
//! can see the failure it hunts. And it runs again in child processes where the
//! membarrier scheme (`CPULOCAL_DISABLE_MEMBARRIER`) or rseq itself
//! (`CPULOCAL_DISABLE_RSEQ`) is switched off.
//!
//! How a broken run stays safe: every node is allocated before the run and nothing is
//! freed until the final tally shows each id exactly once, so a node that two threads
//! believe they own can corrupt the lists (which the tally reports) but never touch
//! freed memory; lists are walked with a bound, so a cycle cannot hang the test.

mod common;

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use cpulocal::remote::Scheme;
use cpulocal::{Node, NodeList, Stack};

use common::{
    install_handler, kernel_aborts, serial, uses_sequences, AffinityChurn, Delay, ErrnoGuard, Rng,
    SignalStorm,
};

/// The signal of the storm.
const STORM: libc::c_int = libc::SIGUSR1;
/// Mixed into every node's check word: a pointer to anything but a node of the run
/// fails the check.
const MAGIC: u64 = 0x5eed_f00d_cafe_d00d;
/// A worker pushes rather than pops once it holds this many nodes.
const HAND_MAX: usize = 48;

/// A node's payload: plain data, so an aliased node is harmless to read.
#[derive(Debug)]
struct Item {
    id: u64,
    check: u64,
}

type Ptr = NonNull<Node<Item>>;

/// Ownership states of an id.
const IN_STACK: u8 = 0;
const HELD: u8 = 1;

/// The harness's knobs.
#[derive(Clone, Copy, Debug)]
struct Config {
    workers: usize,
    nodes_per_worker: usize,
    duration: Duration,
    /// `pause` loops inside every sequence (with `__test-hooks`).
    delay: usize,
    /// One signal every this long, to each worker in turn.
    signal_every: Option<Duration>,
    /// One forced migration every this long.
    churn_every: Option<Duration>,
    /// End the run as soon as an ownership violation is seen (for the broken variant).
    stop_at_first_anomaly: bool,
}

impl Config {
    /// 8 workers on 2 CPUs, yields, a signal every ~100 µs, a migration every ~500 µs.
    fn storm(duration: Duration) -> Config {
        Config {
            workers: 8,
            nodes_per_worker: 64,
            duration,
            delay: 100,
            signal_every: Some(Duration::from_micros(100)),
            churn_every: Some(Duration::from_micros(500)),
            stop_at_first_anomaly: false,
        }
    }
}

/// What a run saw.
#[derive(Debug, Default)]
struct Report {
    nodes: usize,
    pushes: u64,
    pops: u64,
    empty_pops: u64,
    popped_all: u64,
    steals: u64,
    drained_while_running: u64,
    drained_at_end: u64,
    handler_moves: u64,
    signals_sent: u64,
    signals_handled: u64,
    migrations_forced: u64,
    kernel_aborts: Option<u64>,
    /// Ownership violations seen while running (a node taken that was not on a list,
    /// or pushed that was not held).
    anomalies: u64,
    /// Nodes whose payload failed its check.
    corrupt: u64,
    /// Ids found nowhere at the end.
    lost: usize,
    /// Extra copies of ids found at the end.
    duplicated: usize,
    elapsed: Duration,
}

impl Report {
    /// Nodes entered lists `pushes` times and left them `removed` times.
    fn removed(&self) -> u64 {
        self.pops
            + self.popped_all
            + self.steals
            + self.drained_while_running
            + self.drained_at_end
            + self.handler_moves
    }

    fn pushed(&self) -> u64 {
        self.pushes + self.handler_moves
    }

    fn exact(&self) -> bool {
        self.anomalies == 0
            && self.corrupt == 0
            && self.lost == 0
            && self.duplicated == 0
            && self.pushed() == self.removed()
    }
}

/// What every thread of a run shares.
struct Shared {
    stack: ManuallyDrop<Stack<Item>>,
    /// Per id: [`IN_STACK`] or [`HELD`].
    state: Vec<AtomicU8>,
    anomalies: AtomicU64,
    corrupt: AtomicU64,
    handler_moves: AtomicU64,
    stop: AtomicBool,
}

thread_local! {
    /// Set while the thread is inside a `Stack` operation: the storm's handler then
    /// leaves the stack alone (an operation interrupted on its slow path may hold its
    /// CPU's lock, which the handler would wait for forever).
    static IN_OP: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with [`IN_OP`] set.
fn in_op<R>(f: impl FnOnce() -> R) -> R {
    IN_OP.set(true);
    // The handler runs on this thread: keep the flag's stores around the operation.
    compiler_fence(Ordering::SeqCst);
    let r = f();
    compiler_fence(Ordering::SeqCst);
    IN_OP.set(false);
    r
}

impl Shared {
    /// The id of node `p`, if its payload is intact.
    fn id_of(&self, p: Ptr) -> Option<usize> {
        // Nothing is freed while a run goes on (nor ever, after a run that was not
        // exact); the payload is never written after creation, and `next` is atomic.
        // SAFETY: `p` came from a `Box` of this run or an earlier one, so it is live, and
        // a shared reference is sound even if another thread believes it owns the node.
        let item = unsafe { p.as_ref() };
        let id = item.id as usize;
        if id < self.state.len() && item.check == item.id ^ MAGIC {
            Some(id)
        } else {
            // Relaxed: statistics, read after the threads are joined.
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Records that the caller took `p` off a list.
    fn mark_taken(&self, p: Ptr) {
        if let Some(id) = self.id_of(p) {
            // AcqRel: pairs with the swap of whoever marked it last.
            if self.state[id].swap(HELD, Ordering::AcqRel) != IN_STACK {
                // Relaxed: statistics.
                self.anomalies.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records that the caller is about to push `p`.
    fn mark_pushed(&self, p: Ptr) {
        if let Some(id) = self.id_of(p) {
            // AcqRel: as in `mark_taken`.
            if self.state[id].swap(IN_STACK, Ordering::AcqRel) != HELD {
                // Relaxed: statistics.
                self.anomalies.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Pushes `p` on the calling thread's CPU's list.
    fn give(&self, p: Ptr) {
        self.mark_pushed(p);
        // In the broken variant another thread may hold the node too: nothing is freed
        // while the run goes on, so the aliasing can corrupt lists (which the harness
        // reports) but never reach freed memory.
        // SAFETY: `p` came from `Box::leak` of a node of this run the caller holds.
        let node = unsafe { Box::from_raw(p.as_ptr()) };
        in_op(|| self.stack.push(node));
    }

    /// Pops from the calling thread's CPU's list.
    fn take_local(&self) -> Option<Ptr> {
        let node = in_op(|| self.stack.pop())?;
        let p = NonNull::from(Box::leak(node));
        self.mark_taken(p);
        Some(p)
    }

    /// Takes the nodes of a detached list into `into`, walking at most one more node
    /// than exist (a longer list has a cycle: reported, and the rest is leaked).
    fn take_list(&self, mut list: NodeList<Item>, into: &mut Vec<Ptr>) -> u64 {
        let mut n = 0u64;
        while n <= self.state.len() as u64 {
            let Some(node) = list.next() else {
                return n;
            };
            let p = NonNull::from(Box::leak(node));
            self.mark_taken(p);
            into.push(p);
            n += 1;
        }
        // Relaxed: statistics.
        self.anomalies.fetch_add(1, Ordering::Relaxed);
        std::mem::forget(list);
        n
    }
}

/// The running harness, for the signal handler.
static HARNESS: AtomicPtr<Shared> = AtomicPtr::new(core::ptr::null_mut());
/// Signals the handler ran for, in this run.
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// The storm's handler: counts, and, unless it interrupted a stack operation, pops a
/// node of this CPU's list and pushes it back.
extern "C" fn on_storm(_: libc::c_int) {
    let _errno = ErrnoGuard::save();
    // Relaxed: statistics.
    HANDLED.fetch_add(1, Ordering::Relaxed);
    if IN_OP.get() {
        return;
    }
    // Acquire: pairs with the Release store in `run`.
    let shared = HARNESS.load(Ordering::Acquire);
    if shared.is_null() {
        return;
    }
    // SAFETY: `run` stores a live `Shared` before the storm starts and clears it only
    // after every worker (the only threads signalled) has been joined.
    let shared = unsafe { &*shared };
    if let Some(p) = shared.take_local() {
        shared.give(p);
        // Relaxed: statistics.
        shared.handler_moves.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a worker hands back: the nodes it holds and its counts.
#[derive(Debug, Default)]
struct WorkerEnd {
    hand: Vec<Ptr>,
    pushes: u64,
    pops: u64,
    empty_pops: u64,
    /// Nodes taken by `pop_all`.
    popped_all: u64,
}

// SAFETY: the pointers are nodes the worker held; they move to the thread that tallies.
unsafe impl Send for WorkerEnd {}

/// What the thief hands back.
#[derive(Debug, Default)]
struct ThiefEnd {
    hand: Vec<Ptr>,
    pushes: u64,
    steals: u64,
    drained: u64,
}

// SAFETY: as for `WorkerEnd`.
unsafe impl Send for ThiefEnd {}

/// The barriers and ids of a run.
struct Phases {
    /// Workers registered and listed: the storm may start.
    registered: Barrier,
    /// Everything is set up: go.
    go: Barrier,
    /// Workers stopped; they wait here until the storm and the churn are over.
    done: Barrier,
    pthreads: Mutex<Vec<std::os::unix::thread::RawPthread>>,
    tids: Arc<Mutex<Vec<libc::pid_t>>>,
}

/// Pushes and pops at random on its CPU's list, starting from the nodes of `end`.
fn worker(shared: &Shared, phases: &Phases, w: usize, mut end: WorkerEnd) -> WorkerEnd {
    // Registered before any handler can run on this thread.
    cpulocal::register_current_thread();
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    phases
        .pthreads
        .lock()
        .expect("pthreads")
        .push(me as std::os::unix::thread::RawPthread);
    phases.tids.lock().expect("tids").push(common::gettid());
    phases.registered.wait();
    phases.go.wait();
    let mut rng = Rng::new(w as u64 + 1);
    // Relaxed: a stop request; the barrier below synchronises.
    while !shared.stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            let r = rng.next();
            let push = !end.hand.is_empty() && (end.hand.len() >= HAND_MAX || r & 1 == 0);
            if r % 512 == 1 {
                // Now and then, this CPU's whole list.
                let list = in_op(|| shared.stack.pop_all());
                end.popped_all += shared.take_list(list, &mut end.hand);
            } else if push {
                let p = end.hand.pop().expect("not empty");
                shared.give(p);
                end.pushes += 1;
            } else if let Some(p) = shared.take_local() {
                end.hand.push(p);
                end.pops += 1;
            } else {
                end.empty_pops += 1;
            }
        }
        if w % 2 == 1 {
            common::sched_yield();
        }
    }
    phases.done.wait();
    end
}

/// Steals from every CPU in turn, sometimes drains a whole list, and pushes its loot
/// back (on whatever CPU it runs on) when it holds too much.
fn thief(shared: &Shared, phases: &Phases) -> ThiefEnd {
    cpulocal::register_current_thread();
    phases.go.wait();
    let cpus = shared.stack.slots();
    let mut end = ThiefEnd::default();
    let mut i = 0usize;
    // Relaxed: a stop request; the scope's join synchronises.
    while !shared.stop.load(Ordering::Relaxed) {
        let cpu = i % cpus;
        i += 1;
        if i.is_multiple_of(64) {
            let list = in_op(|| shared.stack.pop_all_on(cpu)).expect("cpu < cpus");
            end.drained += shared.take_list(list, &mut end.hand);
        } else if let Some(node) = in_op(|| shared.stack.steal(cpu)).expect("cpu < cpus") {
            let p = NonNull::from(Box::leak(node));
            shared.mark_taken(p);
            end.hand.push(p);
            end.steals += 1;
        }
        if end.hand.len() > 64 {
            for _ in 0..32 {
                let p = end.hand.pop().expect("more than 64");
                shared.give(p);
                end.pushes += 1;
            }
        }
    }
    end
}

/// Runs the harness once. Hold [`serial`]: it sets the delay and installs a handler.
fn run(config: Config) -> Report {
    let start = Instant::now();
    let nodes = config.workers * config.nodes_per_worker;
    let shared = Shared {
        stack: ManuallyDrop::new(Stack::new()),
        state: (0..nodes).map(|_| AtomicU8::new(HELD)).collect(),
        anomalies: AtomicU64::new(0),
        corrupt: AtomicU64::new(0),
        handler_moves: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let hands: Vec<WorkerEnd> = (0..config.workers)
        .map(|w| WorkerEnd {
            hand: (0..config.nodes_per_worker)
                .map(|i| {
                    let id = (w * config.nodes_per_worker + i) as u64;
                    NonNull::from(Box::leak(Node::new(Item {
                        id,
                        check: id ^ MAGIC,
                    })))
                })
                .collect(),
            ..WorkerEnd::default()
        })
        .collect();
    let phases = Phases {
        registered: Barrier::new(config.workers + 1),
        go: Barrier::new(config.workers + 2),
        done: Barrier::new(config.workers + 1),
        pthreads: Mutex::new(Vec::new()),
        tids: Arc::new(Mutex::new(Vec::new())),
    };
    let aborts_before = kernel_aborts();
    // Relaxed: reset before any signal is sent.
    HANDLED.store(0, Ordering::Relaxed);
    let mut report = Report {
        nodes,
        ..Report::default()
    };

    let (workers, thief_end) = std::thread::scope(|s| {
        let workers: Vec<_> = hands
            .into_iter()
            .enumerate()
            .map(|(w, hand)| {
                let (shared, phases) = (&shared, &phases);
                s.spawn(move || worker(shared, phases, w, hand))
            })
            .collect();
        let thief = s.spawn(|| thief(&shared, &phases));
        phases.registered.wait();

        // Release: pairs with the Acquire in the handler.
        HARNESS.store(core::ptr::from_ref(&shared).cast_mut(), Ordering::Release);
        install_handler(STORM, on_storm);
        let delay = Delay::set(config.delay);
        let targets = phases.pthreads.lock().expect("pthreads").clone();
        let storm = config.signal_every.map(|every| {
            // SAFETY: the workers stay alive until they pass `done`, which they reach
            // only after the storm has been stopped below.
            unsafe { SignalStorm::start(targets, STORM, every) }
        });
        let churn = config
            .churn_every
            .map(|every| AffinityChurn::start(Arc::clone(&phases.tids), every));
        phases.go.wait();

        let end = Instant::now() + config.duration;
        while Instant::now() < end {
            // Relaxed: a poll.
            if config.stop_at_first_anomaly && shared.anomalies.load(Ordering::Relaxed) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Relaxed: the barrier and the joins synchronise.
        shared.stop.store(true, Ordering::Relaxed);
        report.signals_sent = storm.map_or(0, SignalStorm::stop);
        report.migrations_forced = churn.map_or(0, AffinityChurn::stop);
        drop(delay);
        phases.done.wait();
        let workers: Vec<WorkerEnd> = workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect();
        (workers, thief.join().expect("thief"))
    });
    common::ignore_signal(STORM);
    HARNESS.store(core::ptr::null_mut(), Ordering::Release);

    // The final drain: every CPU's list, from this thread.
    let mut drained = Vec::new();
    for cpu in 0..shared.stack.slots() {
        let list = shared.stack.pop_all_on(cpu).expect("cpu < cpus");
        report.drained_at_end += shared.take_list(list, &mut drained);
    }

    // The tally: every id exactly once among the hands and the drained lists.
    let mut all: Vec<Ptr> = drained;
    for w in workers {
        report.pushes += w.pushes;
        report.pops += w.pops;
        report.empty_pops += w.empty_pops;
        report.popped_all += w.popped_all;
        all.extend(w.hand);
    }
    report.pushes += thief_end.pushes;
    report.steals = thief_end.steals;
    report.drained_while_running = thief_end.drained;
    all.extend(thief_end.hand);
    let mut seen = vec![0u32; nodes];
    for &p in &all {
        if let Some(id) = shared.id_of(p) {
            seen[id] += 1;
        }
    }
    report.lost = seen.iter().filter(|&&n| n == 0).count();
    report.duplicated = seen.iter().map(|&n| n.saturating_sub(1) as usize).sum();
    // Relaxed: the threads are joined.
    report.anomalies = shared.anomalies.load(Ordering::Relaxed);
    report.corrupt = shared.corrupt.load(Ordering::Relaxed);
    report.handler_moves = shared.handler_moves.load(Ordering::Relaxed);
    report.signals_handled = HANDLED.load(Ordering::Relaxed);
    report.kernel_aborts = kernel_aborts()
        .zip(aborts_before)
        .map(|(after, before)| after - before);
    report.elapsed = start.elapsed();

    if report.exact() {
        // Every id once: `all` holds each node exactly once, and the lists are empty.
        for p in all {
            // SAFETY: `p` came from `Box::leak`, and the tally shows it is the only
            // pointer to its node.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
        drop(ManuallyDrop::into_inner(shared.stack));
    }
    // Otherwise everything is leaked: some node may be reachable twice.
    report
}

/// Asserts that a run kept every node exactly once, and that its storm was real.
fn assert_exact(report: &Report) {
    println!(
        "Stack storm under {} / {}: {report:#?}",
        cpulocal::mechanism(),
        cpulocal::remote_scheme()
    );
    assert_eq!(
        report.anomalies, 0,
        "a node was taken twice or pushed unheld"
    );
    assert_eq!(report.corrupt, 0, "a node's payload was corrupted");
    assert_eq!(report.lost, 0, "nodes were lost");
    assert_eq!(report.duplicated, 0, "nodes were duplicated");
    assert_eq!(
        report.pushed(),
        report.removed(),
        "pushes and removals do not balance"
    );
    assert!(report.drained_at_end <= report.nodes as u64);
    assert!(
        report.steals > 0,
        "the thief stole nothing: no race was tried"
    );
    assert!(
        report.pops > 0 && report.pushes > 0,
        "the workers did nothing"
    );
    assert!(report.signals_handled > 0, "the storm reached no handler");
}

#[test]
fn every_node_is_popped_or_stolen_exactly_once_under_a_storm() {
    let _serial = serial();
    let report = run(Config::storm(Duration::from_millis(2500)));
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
fn stack_is_exact_with_the_locked_scheme() {
    let _serial = serial();
    common::in_locked_scheme_child("stack_is_exact_with_the_locked_scheme", || {
        assert_exact(&run(Config::storm(Duration::from_millis(1500))));
    });
}

#[test]
fn stack_is_exact_without_rseq() {
    let _serial = serial();
    common::in_fallback_child("stack_is_exact_without_rseq", || {
        assert_exact(&run(Config::storm(Duration::from_millis(1500))));
    });
}

/// The harness can see the failure it hunts: with the push and pop sequences blind to
/// the CPU's lock word, a thief's steal races them and nodes are lost or duplicated.
/// Runs in a child: the switch is process-wide, and a broken stack leaks its nodes.
#[cfg(feature = "__test-hooks")]
#[test]
fn a_stack_whose_remote_owners_skip_the_fence_loses_or_duplicates_nodes() {
    let _serial = serial();
    common::in_child(
        "a_stack_whose_remote_owners_skip_the_fence_loses_or_duplicates_nodes",
        &[],
        || {
            if cpulocal::remote_scheme() != Scheme::Membarrier {
                println!(
                    "skipped: the fence is only used under the membarrier scheme ({})",
                    cpulocal::remote_scheme()
                );
                return;
            }
            cpulocal::test_hooks::break_stack_guard(true);
            let limit = Instant::now() + Duration::from_secs(20);
            let mut rounds = 0;
            let seen = loop {
                rounds += 1;
                let report = run(Config {
                    stop_at_first_anomaly: true,
                    ..Config::storm(Duration::from_millis(500))
                });
                if !report.exact() {
                    println!(
                        "round {rounds} ({:?}): the broken stack lost {} and duplicated {} \
                         of {} nodes; {} ownership violations, {} corrupt, \
                         pushes {} vs removals {}; {} steals, {} kernel aborts",
                        report.elapsed,
                        report.lost,
                        report.duplicated,
                        report.nodes,
                        report.anomalies,
                        report.corrupt,
                        report.pushed(),
                        report.removed(),
                        report.steals,
                        report.kernel_aborts.unwrap_or(0),
                    );
                    break true;
                }
                if Instant::now() > limit {
                    break false;
                }
            };
            cpulocal::test_hooks::break_stack_guard(false);
            assert!(
                seen,
                "{rounds} rounds saw no lost or duplicated node with the guard broken"
            );
        },
    );
}

#[test]
fn steal_and_pop_all_on_refuse_a_cpu_beyond_the_last() {
    let stack = Stack::<u8>::new();
    let cpus = stack.slots();
    assert_eq!(cpus, cpulocal::possible_cpus());
    let err = stack.steal(cpus).expect_err("steal(cpus)");
    assert_eq!((err.cpu, err.slots), (cpus, cpus));
    let err = stack.pop_all_on(usize::MAX).expect_err("pop_all_on(MAX)");
    assert_eq!((err.cpu, err.slots), (usize::MAX, cpus));
}
