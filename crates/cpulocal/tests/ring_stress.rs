//! `RingBuffer` delivers every committed record exactly once, intact: more producers
//! than CPUs, a signal storm, the delay inside every sequence, and producers that move
//! themselves to another CPU between reserve and commit (so commits really land on
//! another CPU's ring through its remote counter), while a consumer reads and flushes
//! every CPU's ring. Every record carries its producer, its sequence number and a
//! checksum of its payload; the consumer checks each, and the final tally accounts for
//! every attempt: read once, refused as full (`discarded`), dropped unread by
//! `OverwriteOldest` (`overwritten`), or dropped by its producer (`abandoned`).
//!
//! The stress runs again in child processes with the locked scheme and without rseq.
//! Smaller promises: oversized payloads are refused with `TooLarge`, and a dropped
//! reservation is counted and skipped.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use cpulocal::remote::Scheme;
use cpulocal::ring::{Mode, Record, ReserveError, RingBuffer, RingConfig, RingStats};

use common::{
    allowed_cpus, in_child, install_handler, kernel_aborts, serial, set_affinity, ErrnoGuard,
    SignalStorm,
};

/// The signal of the storm.
const STORM: libc::c_int = libc::SIGUSR1;
/// Bytes before a record's body: producer (u32), sequence (u32), checksum (u64).
const HEAD: usize = 16;
/// Records whose sequence number is this modulo [`ABANDON_EVERY`] are dropped unread.
const ABANDON_EVERY: u32 = 97;
/// One record in this many moves its producer to another CPU before the commit.
const MIGRATE_EVERY: u32 = 32;

/// What became of an attempt, as its producer saw it.
const NOT_TRIED: u8 = 0;
const COMMITTED: u8 = 1;
const FULL: u8 = 2;
const ABANDONED: u8 = 3;

/// The body length of record `seq` of `producer`: 0 to 40 bytes.
fn body_len(producer: u32, seq: u32) -> usize {
    ((seq.wrapping_mul(13) ^ producer.wrapping_mul(7)) % 41) as usize
}

/// Byte `i` of the body of record `seq` of `producer`.
fn body_byte(producer: u32, seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(31) ^ producer.wrapping_mul(131) ^ (i as u32).wrapping_mul(7)) as u8
}

/// FNV-1a over the record's identity and body.
fn checksum(producer: u32, seq: u32, body: &[u8]) -> u64 {
    producer
        .to_le_bytes()
        .iter()
        .chain(&seq.to_le_bytes())
        .chain(body)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// Fills `payload` (of `HEAD + body_len` bytes) with record `seq` of `producer`.
fn fill(payload: &mut [u8], producer: u32, seq: u32) {
    let (head, body) = payload.split_at_mut(HEAD);
    for (i, b) in body.iter_mut().enumerate() {
        *b = body_byte(producer, seq, i);
    }
    head[0..4].copy_from_slice(&producer.to_le_bytes());
    head[4..8].copy_from_slice(&seq.to_le_bytes());
    head[8..16].copy_from_slice(&checksum(producer, seq, body).to_le_bytes());
}

/// The consumer's side: what it read, checked record by record.
#[derive(Debug)]
struct Checker {
    /// Per producer, per sequence number: how many times it was read.
    seen: Vec<Vec<u8>>,
    read: u64,
    /// Records that failed a check (length, identity, checksum, body, timestamp).
    corrupt: u64,
    duplicates: u64,
    per_cpu: Vec<u64>,
}

impl Checker {
    fn new(producers: usize, per_producer: usize, cpus: usize) -> Checker {
        Checker {
            seen: vec![vec![0; per_producer]; producers],
            read: 0,
            corrupt: 0,
            duplicates: 0,
            per_cpu: vec![0; cpus],
        }
    }

    fn check(&mut self, rec: Record<'_>) {
        self.read += 1;
        self.per_cpu[rec.cpu] += 1;
        let data = rec.data;
        if data.len() < HEAD || rec.timestamp.is_none() {
            self.corrupt += 1;
            return;
        }
        let word = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().expect("4 bytes"));
        let (producer, seq) = (word(0), word(4));
        let sum = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        let body = &data[HEAD..];
        let intact = (producer as usize) < self.seen.len()
            && (seq as usize) < self.seen[0].len()
            && body.len() == body_len(producer, seq)
            && sum == checksum(producer, seq, body)
            && body
                .iter()
                .enumerate()
                .all(|(i, &b)| b == body_byte(producer, seq, i));
        if !intact {
            self.corrupt += 1;
            return;
        }
        let n = &mut self.seen[producer as usize][seq as usize];
        if *n > 0 {
            self.duplicates += 1;
        }
        *n = n.saturating_add(1);
    }

    /// Reads every complete sub-buffer of every CPU; returns the records read.
    fn consume_all(&mut self, ring: &RingBuffer) -> usize {
        (0..ring.slots())
            .map(|cpu| {
                ring.consume(cpu, |rec| self.check(rec))
                    .expect("cpu < cpus")
            })
            .sum()
    }
}

/// A producer's side: the outcome of each attempt, and the migrations it forced.
#[derive(Debug, Default)]
struct ProducerEnd {
    outcomes: Vec<u8>,
    /// Commits made from another CPU than the reserve's, by a forced migration.
    migrated_commits: u64,
}

/// Signals the handler ran for, in this run.
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// The storm's handler only counts (a reserve from a handler could wait for a lock
/// held by the thread it interrupted).
extern "C" fn count_signal(_: libc::c_int) {
    let _errno = ErrnoGuard::save();
    // Relaxed: statistics.
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// What a run saw.
#[derive(Debug)]
struct Report {
    mode: Mode,
    attempted: u64,
    committed: u64,
    full: u64,
    abandoned: u64,
    read: u64,
    read_per_cpu: Vec<u64>,
    lost: u64,
    /// Records read that their producer never committed.
    phantom: u64,
    duplicates: u64,
    corrupt: u64,
    migrated_commits: u64,
    stats: RingStats,
    signals_sent: u64,
    signals_handled: u64,
    kernel_aborts: Option<u64>,
    elapsed: Duration,
}

/// One producer: `per_producer` attempts, a few of them abandoned or migrated.
fn produce(ring: &RingBuffer, id: u32, per_producer: usize, deadline: Instant) -> ProducerEnd {
    let cpus = allowed_cpus();
    let mut end = ProducerEnd {
        outcomes: vec![NOT_TRIED; per_producer],
        migrated_commits: 0,
    };
    for seq in 0..per_producer as u32 {
        if seq.is_multiple_of(256) && Instant::now() > deadline {
            break;
        }
        let len = HEAD + body_len(id, seq);
        let mut r = match ring.reserve(len) {
            Ok(r) => r,
            Err(ReserveError::Full) => {
                end.outcomes[seq as usize] = FULL;
                // Let the consumer catch up a little.
                if seq.is_multiple_of(8) {
                    common::sched_yield();
                }
                continue;
            }
            Err(e) => panic!("reserve({len}): {e}"),
        };
        if seq % ABANDON_EVERY == ABANDON_EVERY / 2 {
            r.payload_mut()[..HEAD].fill(0xab);
            drop(r);
            end.outcomes[seq as usize] = ABANDONED;
            continue;
        }
        fill(r.payload_mut(), id, seq);
        let migrate = seq % MIGRATE_EVERY == id % MIGRATE_EVERY && cpus.len() > 1;
        if migrate {
            // Move to another allowed CPU than the ring's, then commit from there.
            let other = cpus
                .iter()
                .copied()
                .find(|&c| c != r.cpu())
                .expect("two allowed CPUs");
            set_affinity(0, &[other]).expect("sched_setaffinity");
            if cpulocal::sys::sched_getcpu().is_ok_and(|c| c as usize != r.cpu()) {
                end.migrated_commits += 1;
            }
        }
        r.commit();
        end.outcomes[seq as usize] = COMMITTED;
        if migrate {
            set_affinity(0, &cpus).expect("sched_setaffinity");
        }
    }
    end
}

/// Runs `producers` producers of `per_producer` attempts each against a consumer
/// thread. Hold [`serial`].
fn run(mode: Mode, producers: usize, per_producer: usize) -> Report {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(8);
    let ring = RingBuffer::new(RingConfig {
        sub_buffer_size: 512,
        sub_buffers: 4,
        mode,
        timestamps: true,
    })
    .expect("valid config");
    let producing = AtomicBool::new(true);
    let finished = AtomicUsize::new(0);
    let registered = Barrier::new(producers + 1);
    let done = Barrier::new(producers + 1);
    let pthreads = Mutex::new(Vec::new());
    let aborts_before = kernel_aborts();
    // Relaxed: reset before any signal is sent.
    HANDLED.store(0, Ordering::Relaxed);
    let mut signals_sent = 0;

    let (ends, mut checker) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..producers as u32)
            .map(|id| {
                let (ring, registered, done, pthreads) = (&ring, &registered, &done, &pthreads);
                let finished = &finished;
                s.spawn(move || {
                    cpulocal::register_current_thread();
                    // SAFETY: pthread_self has no preconditions.
                    let me = unsafe { libc::pthread_self() };
                    pthreads
                        .lock()
                        .expect("pthreads")
                        .push(me as std::os::unix::thread::RawPthread);
                    registered.wait();
                    let end = produce(ring, id, per_producer, deadline);
                    // Release: pairs with the Acquire poll of the main thread.
                    finished.fetch_add(1, Ordering::Release);
                    done.wait();
                    end
                })
            })
            .collect();
        let consumer = s.spawn(|| {
            let mut checker = Checker::new(producers, per_producer, ring.slots());
            let mut pass = 0u64;
            // Relaxed: a stop request; the join synchronises.
            while producing.load(Ordering::Relaxed) {
                pass += 1;
                if pass.is_multiple_of(64) {
                    // A flush takes each CPU's lock remotely, racing the reserves.
                    for cpu in 0..ring.slots() {
                        ring.flush(cpu).expect("cpu < cpus");
                    }
                }
                let n = checker.consume_all(&ring);
                match mode {
                    // Fall behind on purpose, so that the oldest sub-buffers get
                    // overwritten.
                    Mode::OverwriteOldest => std::thread::sleep(Duration::from_micros(500)),
                    _ if n == 0 => common::sched_yield(),
                    _ => {}
                }
            }
            checker
        });

        registered.wait();
        install_handler(STORM, count_signal);
        let delay = common::Delay::set(50);
        let targets = pthreads.lock().expect("pthreads").clone();
        // SAFETY: the producers stay alive until they pass `done`, which they reach
        // only after the storm has been stopped below.
        let storm = unsafe { SignalStorm::start(targets, STORM, Duration::from_micros(100)) };
        // The producers finish on their own, then wait in `done` until the storm is
        // over (a signal must not target a thread that has exited).
        // Acquire: pairs with the producers' Release increments.
        while finished.load(Ordering::Acquire) < producers {
            std::thread::sleep(Duration::from_millis(2));
        }
        signals_sent = storm.stop();
        drop(delay);
        done.wait();
        let ends: Vec<ProducerEnd> = workers
            .into_iter()
            .map(|w| w.join().expect("producer"))
            .collect();
        // Relaxed: the join synchronises.
        producing.store(false, Ordering::Relaxed);
        (ends, consumer.join().expect("consumer"))
    });
    common::ignore_signal(STORM);

    // Every producer is done: hand over the partial sub-buffers and read the rest.
    loop {
        for cpu in 0..ring.slots() {
            ring.flush(cpu).expect("cpu < cpus");
        }
        if checker.consume_all(&ring) == 0 {
            break;
        }
    }

    let mut report = Report {
        mode,
        attempted: 0,
        committed: 0,
        full: 0,
        abandoned: 0,
        read: checker.read,
        read_per_cpu: checker.per_cpu.clone(),
        lost: 0,
        phantom: 0,
        duplicates: checker.duplicates,
        corrupt: checker.corrupt,
        migrated_commits: ends.iter().map(|e| e.migrated_commits).sum(),
        stats: ring.stats(),
        signals_sent,
        // Relaxed: the threads are joined.
        signals_handled: HANDLED.load(Ordering::Relaxed),
        kernel_aborts: kernel_aborts()
            .zip(aborts_before)
            .map(|(after, before)| after - before),
        elapsed: start.elapsed(),
    };
    for (end, seen) in ends.iter().zip(&checker.seen) {
        for (&outcome, &n) in end.outcomes.iter().zip(seen) {
            match outcome {
                NOT_TRIED => {}
                COMMITTED => report.committed += 1,
                FULL => report.full += 1,
                _ => report.abandoned += 1,
            }
            report.attempted += u64::from(outcome != NOT_TRIED);
            if outcome == COMMITTED {
                if n == 0 && mode == Mode::DiscardNewest {
                    report.lost += 1;
                }
            } else if n > 0 {
                report.phantom += 1;
            }
        }
    }
    if mode == Mode::OverwriteOldest {
        // Records are overwritten anonymously: what was neither read nor overwritten
        // is lost.
        report.lost = report
            .committed
            .saturating_sub(report.read - report.duplicates - report.corrupt)
            .saturating_sub(report.stats.overwritten);
    }
    report
}

fn assert_accounted(report: &Report) {
    println!(
        "RingBuffer {:?} under {} / {}: {report:#?}",
        report.mode,
        cpulocal::mechanism(),
        cpulocal::remote_scheme()
    );
    println!(
        "TOTALS {:?}: attempted {}, records read {} (per CPU {:?}), discarded {}, \
         overwritten {}, abandoned {}, remote commits {} ({} commits after a forced \
         migration), lost {}, duplicated {}, corrupt {}; {} signals sent, {} handled, \
         {} kernel aborts, {:?}",
        report.mode,
        report.attempted,
        report.read,
        report.read_per_cpu,
        report.stats.discarded,
        report.stats.overwritten,
        report.stats.abandoned,
        report.stats.remote_commits,
        report.migrated_commits,
        report.lost,
        report.duplicates,
        report.corrupt,
        report.signals_sent,
        report.signals_handled,
        report
            .kernel_aborts
            .map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
        report.elapsed,
    );
    let s = &report.stats;
    assert_eq!(report.corrupt, 0, "torn or corrupt records were read");
    assert_eq!(report.duplicates, 0, "records were read twice");
    assert_eq!(report.phantom, 0, "records never committed were read");
    assert_eq!(report.lost, 0, "committed records were lost");
    assert_eq!(
        s.discarded, report.full,
        "Full results vs stats().discarded"
    );
    assert_eq!(
        s.abandoned, report.abandoned,
        "dropped reservations vs stats().abandoned"
    );
    match report.mode {
        Mode::DiscardNewest => {
            assert_eq!(s.overwritten, 0);
            assert_eq!(report.read, report.committed);
            assert_eq!(
                report.read + s.discarded + s.abandoned,
                report.attempted,
                "read + discarded + abandoned != attempted"
            );
        }
        Mode::OverwriteOldest => {
            assert_eq!(report.read + s.overwritten, report.committed);
            assert_eq!(
                report.read + s.overwritten + s.discarded + s.abandoned,
                report.attempted,
                "read + overwritten + discarded + abandoned != attempted"
            );
            assert!(s.overwritten > 0, "the consumer never fell behind");
        }
    }
    assert!(report.read > 0, "nothing was read");
    assert!(report.abandoned > 0, "no reservation was dropped");
    if allowed_cpus().len() > 1 {
        assert!(
            report.migrated_commits > 0,
            "no producer committed from another CPU"
        );
        assert!(s.remote_commits > 0, "no remote commit was counted");
        assert!(
            s.remote_commits >= report.migrated_commits,
            "a commit from another CPU was not counted as remote"
        );
    }
    if cpulocal::remote_scheme() == Scheme::Membarrier {
        assert!(s.remote_commits <= report.committed);
    } else {
        // Documented: under the locked scheme every commit uses the atomic counter.
        assert_eq!(s.remote_commits, report.committed);
    }
    assert!(report.signals_handled > 0, "the storm reached no handler");
}

const PRODUCERS: usize = 6;
const PER_PRODUCER: usize = 100_000;

#[test]
fn every_record_is_read_once_or_counted_discarded() {
    let _serial = serial();
    assert_accounted(&run(Mode::DiscardNewest, PRODUCERS, PER_PRODUCER));
}

#[test]
fn every_record_is_read_once_overwritten_or_discarded() {
    let _serial = serial();
    assert_accounted(&run(Mode::OverwriteOldest, PRODUCERS, PER_PRODUCER));
}

#[test]
fn ring_is_exact_with_the_locked_scheme() {
    let _serial = serial();
    common::in_locked_scheme_child("ring_is_exact_with_the_locked_scheme", || {
        assert_accounted(&run(Mode::DiscardNewest, PRODUCERS, PER_PRODUCER / 2));
        assert_accounted(&run(Mode::OverwriteOldest, PRODUCERS, PER_PRODUCER / 2));
    });
}

#[test]
fn ring_is_exact_without_rseq() {
    let _serial = serial();
    common::in_fallback_child("ring_is_exact_without_rseq", || {
        assert_accounted(&run(Mode::DiscardNewest, PRODUCERS, PER_PRODUCER / 2));
        assert_accounted(&run(Mode::OverwriteOldest, PRODUCERS, PER_PRODUCER / 2));
    });
}

/// Reads every record of every CPU (after a flush), as payloads.
fn drain(ring: &RingBuffer) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for cpu in 0..ring.slots() {
        ring.flush(cpu).expect("cpu < cpus");
        ring.consume(cpu, |rec| out.push(rec.data.to_vec()))
            .expect("cpu < cpus");
    }
    out
}

#[test]
fn a_payload_beyond_max_payload_is_refused_as_too_large() {
    for timestamps in [false, true] {
        let ring = RingBuffer::new(RingConfig {
            sub_buffer_size: 256,
            timestamps,
            ..RingConfig::default()
        })
        .expect("valid config");
        let max = ring.max_payload();
        assert_eq!(max, 256 - if timestamps { 16 } else { 8 });
        let err = ring.reserve(max + 1).expect_err("one byte too many");
        assert_eq!(err, ReserveError::TooLarge { len: max + 1, max });
        let text = err.to_string();
        assert!(
            text.contains(&(max + 1).to_string()) && text.contains(&max.to_string()),
            "the message names both sizes: {text}"
        );
        assert_eq!(
            ring.write(&vec![7; max + 1]),
            Err(ReserveError::TooLarge { len: max + 1, max })
        );
        // The largest payload fits, whole.
        ring.write(&vec![9; max]).expect("max_payload fits");
        assert_eq!(drain(&ring), [vec![9; max]]);
        let stats = ring.stats();
        assert_eq!(
            (stats.discarded, stats.overwritten, stats.abandoned),
            (0, 0, 0),
            "a refusal is not a discard: {stats:?}"
        );
    }
}

/// A length near `usize::MAX` is as oversized as `max_payload() + 1`: it must be
/// refused, not overflow while the record's size is computed.
#[test]
fn a_payload_of_usize_max_is_refused_as_too_large() {
    let ring = RingBuffer::new(RingConfig::default()).expect("valid config");
    let max = ring.max_payload();
    for len in [usize::MAX, usize::MAX - 7, usize::MAX / 2 + 1] {
        // AssertUnwindSafe: after a panic the ring is only dropped.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ring.reserve(len).map(|_| ())
        }));
        assert_eq!(
            outcome.ok(),
            Some(Err(ReserveError::TooLarge { len, max })),
            "reserve({len}) must return TooLarge (it panicked, or returned something else)"
        );
    }
}

#[test]
fn a_dropped_reservation_is_counted_abandoned_and_skipped() {
    let ring = RingBuffer::new(RingConfig::default()).expect("valid config");
    let mut dropped = ring.reserve(24).expect("room");
    dropped.payload_mut().fill(0xee);
    // A record committed after the dropped one, possibly in the same sub-buffer: the
    // consumer must not stall on the hole.
    ring.write(b"after").expect("room");
    drop(dropped);
    let mut before_commit = ring.reserve(3).expect("room");
    before_commit.payload_mut().copy_from_slice(b"end");
    before_commit.commit();
    let mut got = drain(&ring);
    got.sort();
    assert_eq!(got, [b"after".to_vec(), b"end".to_vec()]);
    assert_eq!(
        ring.stats(),
        RingStats {
            abandoned: 1,
            ..ring.stats()
        }
    );
    assert_eq!(ring.stats().abandoned, 1);
    assert_eq!(ring.stats().discarded, 0);
}

/// A header-only record that ends the ring has its payload's address one past the ring's
/// end (inline reserve, without timestamps here) or wrapped to its start (out-of-line
/// reserve, with them); committed (out of line: it closes its sub-buffer) or dropped, it
/// must still land at its own position, so that both records before it are read.
#[test]
fn a_header_only_record_that_ends_the_ring_is_committed_or_dropped_in_place() {
    let _serial = serial();
    let cpus = allowed_cpus();
    set_affinity(0, &cpus[..1]).expect("sched_setaffinity");
    for timestamps in [false, true] {
        for commit in [true, false] {
            let ring = RingBuffer::new(RingConfig {
                sub_buffer_size: 64,
                sub_buffers: 2,
                timestamps,
                ..RingConfig::default()
            })
            .expect("valid config");
            let header = if timestamps { 16 } else { 8 };
            // The first sub-buffer full, the second up to one header from its end.
            let first = vec![1; 64 - header];
            let second = vec![2; 64 - 2 * header];
            ring.write(&first).expect("room");
            ring.write(&second).expect("room");
            let last = ring.reserve(0).expect("room for a header");
            if commit {
                last.commit();
            } else {
                drop(last);
            }
            let mut expected = vec![first, second];
            if commit {
                expected.push(Vec::new());
            }
            let case = format!("timestamps {timestamps}, commit {commit}");
            assert_eq!(drain(&ring), expected, "{case}");
            assert_eq!(ring.stats().abandoned, u64::from(!commit), "{case}");
            assert_eq!(ring.stats().discarded, 0, "{case}");
        }
    }
    set_affinity(0, &cpus).expect("sched_setaffinity");
}

/// Writes `n` records from a thread pinned to one CPU: no commit can land on another
/// CPU's ring. Returns the ring's stats.
fn pinned_writes(n: u8) -> RingStats {
    let cpus = allowed_cpus();
    set_affinity(0, &cpus[..1]).expect("sched_setaffinity");
    let ring = RingBuffer::new(RingConfig::default()).expect("valid config");
    for i in 0..n {
        ring.write(&[i; 8]).expect("room");
    }
    set_affinity(0, &cpus).expect("sched_setaffinity");
    let read = drain(&ring).len();
    assert_eq!(read, usize::from(n));
    ring.stats()
}

/// Under the membarrier scheme `remote_commits` counts commits that could not use the
/// restartable add on the reserving CPU: a thread that cannot migrate between reserve
/// and commit makes none.
#[test]
fn a_thread_that_never_migrates_makes_no_remote_commits() {
    let _serial = serial();
    let stats = pinned_writes(100);
    if cpulocal::remote_scheme() == Scheme::Membarrier {
        assert_eq!(stats.remote_commits, 0, "{stats:?}");
    } else {
        assert_eq!(stats.remote_commits, 100, "{stats:?}");
    }
}

/// Under the locked scheme every commit uses the atomic counter, and `RingStats`
/// documents that each one counts as remote, migrated or not.
#[test]
fn every_commit_counts_as_remote_with_the_locked_scheme() {
    let _serial = serial();
    in_child(
        "every_commit_counts_as_remote_with_the_locked_scheme",
        &[("CPULOCAL_DISABLE_MEMBARRIER", "1")],
        || {
            let stats = pinned_writes(100);
            assert_eq!(stats.remote_commits, 100, "{stats:?}");
        },
    );
}

#[test]
fn every_commit_counts_as_remote_without_rseq() {
    let _serial = serial();
    in_child(
        "every_commit_counts_as_remote_without_rseq",
        &[("CPULOCAL_DISABLE_RSEQ", "1")],
        || {
            let stats = pinned_writes(100);
            assert_eq!(stats.remote_commits, 100, "{stats:?}");
        },
    );
}
