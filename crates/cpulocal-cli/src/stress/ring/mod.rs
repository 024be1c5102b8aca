//! The `ring` structure: two rings, one that discards the newest record when full and
//! one that overwrites the oldest, written in turn. A worker's operation writes a 41–68
//! byte record (writer, sequence number, how it was written, the reservation's CPU, the
//! clock before and after the reserve, filler, checksum) one of four ways: reserve, fill,
//! (window), commit; reserve more, fill, (window), truncate, commit; `write_with` into
//! more room, (window) inside the closure; or reserve, fill, (window), drop uncommitted.
//! A consumer thread reads every CPU's ring and flushes, and in `remote` and `mix` the
//! remote thread flushes other CPUs' rings.
//!
//! The check ([`check`]): every committed record read at most once, intact and at its
//! (truncated) length, with `Record::cpu` the ring it was read from, the CPU its
//! reservation reported and one the run's threads may use, and a timestamp read during
//! its reserve; no dropped reservation ever read; refusals = `discarded`, drops =
//! `abandoned`. Discarding ring: every committed record read exactly once, nothing
//! overwritten. Overwriting ring: read + `overwritten` = committed.

mod check;
mod record;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cpulocal::ring::{monotonic_ns, Mode, ReserveError, RingBuffer, RingConfig};

pub use check::RingCheck;
use check::{ring_check, Labelled, RingSeen, Written};
use record::{fill_record, parse_record, record_len, spare_len, Kind, Stamp, NO_CPU};

use super::config::HAS_TEST_HOOKS;
use super::harness::{hooks, usable_cpus, Rng, Shared};
use super::part::{Entry, ErasedPart, Part, PartDef, StructureDef, Turn};

/// `--structure ring`.
pub(super) const STRUCTURE: StructureDef = StructureDef {
    name: "ring",
    help: None,
    parts: &[&PART],
    remote: &[],
};

/// The ring part.
pub(super) const PART: PartDef = PartDef {
    name: "ring",
    new: |_| -> Box<dyn ErasedPart> {
        hooks::on_overwritten_record(log_overwritten);
        Box::new(RingPart {
            rings: MODES.map(new_ring),
            next_writer: AtomicU32::new(0),
            seen: Mutex::new(None),
        })
    },
    mutation: None,
    absent: Some(|_| LABELS.map(Entry::null).into()),
};

/// The records overwriting rings dropped, each with its ring's address (builds with
/// test hooks): the check takes its own ring's out. Several runs may share the process
/// (the tests), so the address says whose a record is.
static OVERWRITTEN: Mutex<Vec<(usize, Option<Stamp>)>> = Mutex::new(Vec::new());

/// The hook an overwriting ring calls for each record it drops.
fn log_overwritten(ring: &RingBuffer, payload: &[u8]) {
    let stamp = parse_record(payload);
    let mut log = OVERWRITTEN.lock().unwrap_or_else(|p| p.into_inner());
    log.push((ring as *const RingBuffer as usize, stamp));
}

/// The records `ring` dropped, taken out of the log (`None` in builds without test
/// hooks, which cannot tell).
fn overwritten_by(ring: &RingBuffer, writers: u32) -> Option<RingSeen> {
    if !HAS_TEST_HOOKS {
        return None;
    }
    let me = ring as *const RingBuffer as usize;
    let mut over = RingSeen::default();
    OVERWRITTEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&(address, stamp)| {
            if address == me {
                over.note_overwritten(stamp, writers);
            }
            address != me
        });
    Some(over)
}

/// The modes of the part's rings, and their keys in the report.
const MODES: [Mode; 2] = [Mode::DiscardNewest, Mode::OverwriteOldest];
const LABELS: [&str; 2] = ["ring", "ring_overwrite"];

/// The ring consumer flushes the rings it reads this often.
const FLUSH_EVERY: Duration = Duration::from_millis(1);

/// A ring of the part: small, so that it fills under load and refusals (or overwrites)
/// are checked.
fn new_ring(mode: Mode) -> RingBuffer {
    RingBuffer::new(RingConfig {
        sub_buffer_size: 4096,
        sub_buffers: 16,
        mode,
        timestamps: true,
    })
    .expect("a valid ring configuration")
}

/// The part's rings, the writer ids handed out, and what the consumer saw of each ring.
struct RingPart {
    rings: [RingBuffer; 2],
    next_writer: AtomicU32,
    seen: Mutex<Option<[RingSeen; 2]>>,
}

/// What a thread wrote to the part's rings.
struct RingTally {
    /// The thread's writer id, in every record it writes.
    writer: u32,
    /// Per ring (as in [`RingPart::rings`]).
    rings: [Written; 2],
}

impl RingPart {
    /// Reserve, fill, (window), then commit, truncate and commit, or drop.
    #[inline]
    fn write_reserved(
        &self,
        ring: &RingBuffer,
        run: &Shared,
        i: u64,
        stamp: Stamp,
        w: &mut Written,
    ) {
        let len = record_len(stamp.seq);
        let room = match stamp.kind {
            Kind::Truncated => len + spare_len(stamp.seq),
            _ => len,
        };
        let mut r = match ring.reserve(room) {
            Ok(r) => r,
            Err(e) => return refused(e, run, i, w),
        };
        let stamp = Stamp {
            cpu: r.cpu() as u32,
            after: monotonic_ns(),
            ..stamp
        };
        let payload = r.payload_mut();
        fill_record(&mut payload[..len], &stamp);
        // What the truncation must cut off: never read.
        payload[len..].fill(0xa5);
        run.inject(i);
        match stamp.kind {
            Kind::Abandoned => {
                drop(r);
                w.dropped += 1;
                return;
            }
            Kind::Truncated => {
                r.truncate(len);
                w.truncated += 1;
            }
            Kind::Plain | Kind::WriteWith => {}
        }
        r.commit();
        w.committed += 1;
    }

    /// `write_with` into more room than the record, (window) inside the closure.
    #[inline]
    fn write_with(&self, ring: &RingBuffer, run: &Shared, i: u64, stamp: Stamp, w: &mut Written) {
        let len = record_len(stamp.seq);
        let written = ring.write_with(len + spare_len(stamp.seq), |payload| {
            let stamp = Stamp {
                after: monotonic_ns(),
                ..stamp
            };
            fill_record(&mut payload[..len], &stamp);
            payload[len..].fill(0xa5);
            run.inject(i);
            len
        });
        match written {
            Ok(n) => {
                assert_eq!(n, len, "write_with returns what the closure returned");
                w.committed += 1;
                w.written_with += 1;
            }
            Err(e) => refused(e, run, i, w),
        }
    }
}

/// A reserve refused: counted (it must match `discarded`), then (window) and a yield,
/// to let the consumer catch up. Only `Full` can happen: records fit a sub-buffer.
fn refused(e: ReserveError, run: &Shared, i: u64, w: &mut Written) {
    assert_eq!(e, ReserveError::Full, "{e}");
    w.refused += 1;
    run.inject(i);
    std::thread::yield_now();
}

impl Part for RingPart {
    type Tally = RingTally;

    fn new_tally(&self) -> RingTally {
        RingTally {
            // Relaxed: a unique id is all that is needed.
            writer: self.next_writer.fetch_add(1, Ordering::Relaxed),
            rings: [Written::default(); 2],
        }
    }

    /// One record on the rings in turn, written one of four ways (mostly plainly).
    #[inline]
    fn op(&self, run: &Shared, turn: Turn, t: &mut RingTally, rng: &mut Rng) {
        let k = (turn.n % 2) as usize;
        let (ring, w) = (&self.rings[k], &mut t.rings[k]);
        let kind = match rng.below(16) {
            0 => Kind::Abandoned,
            1 | 2 => Kind::Truncated,
            3 | 4 => Kind::WriteWith,
            _ => Kind::Plain,
        };
        let stamp = Stamp {
            writer: t.writer,
            // A dropped record takes the number of the next committed one: read, it
            // would be caught as dropped (its kind), not as that record.
            seq: w.committed,
            kind,
            cpu: NO_CPU,
            before: monotonic_ns(),
            after: 0,
        };
        if kind == Kind::WriteWith {
            self.write_with(ring, run, turn.i, stamp, w);
        } else {
            self.write_reserved(ring, run, turn.i, stamp, w);
        }
    }

    /// A flush of `victim`'s ring, of the rings in turn.
    fn remote_op(&self, _: &Shared, victim: usize, n: u64, t: &mut RingTally) {
        let k = (n % 2) as usize;
        self.rings[k]
            .flush(victim)
            .expect("victims are below the CPUs");
        t.rings[k].flushes += 1;
    }

    const BACKGROUND: Option<&'static str> = Some("stress-consumer");

    /// The consumer: reads (and flushes) while the workers write, then drains.
    fn background(&self, run: &Shared) {
        let mut seen: [RingSeen; 2] = Default::default();
        let mut last_flush = Instant::now();
        // The CPUs records may come from: the run's, and any hot-added since.
        let mut cpus = run.cpus.clone();
        loop {
            // Acquire: pairs with the Release in `run` after every writer is joined, so
            // the last pass sees every commit.
            let last = run.background_stop.load(Ordering::Acquire);
            if last || last_flush.elapsed() >= FLUSH_EVERY {
                for (ring, seen) in self.rings.iter().zip(&mut seen) {
                    let cpus: Vec<usize> = if last {
                        (0..ring.slots()).collect()
                    } else {
                        run.cpus.clone()
                    };
                    for cpu in cpus {
                        ring.flush(cpu).expect("cpu below the rings");
                        seen.flushes += 1;
                    }
                }
                last_flush = Instant::now();
            }
            let mut read = 0;
            for (ring, seen) in self.rings.iter().zip(&mut seen) {
                // Ring by ring rather than `consume_all`: the ring a record comes from
                // is what its `Record::cpu` must say.
                for cpu in 0..ring.slots() {
                    read += ring
                        .consume(cpu, |rec| {
                            // Relaxed: a writer takes its id before it reserves, and the
                            // record reached us through the ring's Release/Acquire, so
                            // this load sees that id at least (coherence). Loaded per
                            // record: a writer started after a load made before the
                            // consume would be taken for one that never was.
                            let writers = self.next_writer.load(Ordering::Relaxed);
                            if !cpus.contains(&rec.cpu) {
                                // A CPU hot-added during the run (the VM lane's hotadd
                                // step) is one the threads may run on from then on.
                                let added: Vec<usize> = usable_cpus()
                                    .into_iter()
                                    .filter(|c| !cpus.contains(c))
                                    .collect();
                                cpus.extend(added);
                            }
                            seen.check(cpu, &rec, writers, &cpus)
                        })
                        .expect("cpu below the rings");
                }
            }
            if last {
                *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
                return;
            }
            if read == 0 {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// What the consumer saw of each ring against what the writers did to it.
    fn check(&self, _: &Shared, tallies: &[&RingTally]) -> Vec<Entry> {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        (0..2)
            .map(|k| {
                let mut committed = Vec::new();
                let mut written = Written::default();
                for t in tallies {
                    let (w, mine) = (t.writer as usize, &t.rings[k]);
                    if committed.len() <= w {
                        committed.resize(w + 1, 0);
                    }
                    committed[w] += mine.committed;
                    written.committed += mine.committed;
                    written.truncated += mine.truncated;
                    written.written_with += mine.written_with;
                    written.dropped += mine.dropped;
                    written.refused += mine.refused;
                    written.flushes += mine.flushes;
                }
                // Every writer has been joined: the log holds all this ring dropped.
                let writers = self.next_writer.load(Ordering::Relaxed);
                let over = overwritten_by(&self.rings[k], writers);
                let r = ring_check(
                    MODES[k],
                    &seen[k],
                    &committed,
                    written,
                    self.rings[k].stats(),
                    over.as_ref(),
                );
                Entry::new(LABELS[k], Some(&Labelled(LABELS[k], r)))
            })
            .collect()
    }
}
