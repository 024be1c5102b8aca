//! The `ring` structure: reserve a 20–46 byte record, fill it (writer, sequence number,
//! filler, checksum), (window), commit; a consumer thread reads and flushes, and in
//! `remote` and `mix` the remote thread flushes other CPUs' rings. Every committed record
//! must be read exactly once with a good checksum, and the refusals must equal
//! `discarded`.

use core::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cpulocal::ring::{Mode, ReserveError, RingBuffer, RingConfig};
use serde::Serialize;

use super::harness::{Rng, Shared};
use super::part::{Check, Entry, ErasedPart, Faults, Part, PartDef, StructureDef, Turn};

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
        Box::new(RingPart {
            ring: new_ring(),
            next_writer: AtomicU32::new(0),
            seen: Mutex::new(None),
        })
    },
    mutation: None,
    absent: None,
};

/// The ring consumer flushes the rings it reads this often.
const FLUSH_EVERY: Duration = Duration::from_millis(1);

/// The ring check: every committed record read exactly once, intact.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RingCheck {
    /// Records the workers committed.
    pub records: u64,
    /// Records the consumer read (intact or not).
    pub read: u64,
    /// `RingStats::remote_commits`: commits that landed from another CPU.
    pub remote_commits: u64,
    /// `RingStats::discarded`.
    pub discarded: u64,
    /// Reservations the workers saw refused as full (must equal `discarded`).
    pub refused: u64,
    /// `RingStats::overwritten` (0: the run discards the newest).
    pub overwritten: u64,
    /// `RingStats::abandoned` (0: every reservation is committed).
    pub abandoned: u64,
    /// Flushes by the consumer and the remote thread.
    pub flushes: u64,
    /// `corrupt`: records whose length, filler or checksum is wrong, or that no writer
    /// wrote; `lost`: committed records never read, and refusals missing from
    /// `discarded`; `duplicated`: records read more than once, and `discarded` beyond
    /// the refusals.
    #[serde(flatten)]
    pub faults: Faults,
}

/// The ring part's ring: small, so that it fills under load and refusals are checked.
fn new_ring() -> RingBuffer {
    RingBuffer::new(RingConfig {
        sub_buffer_size: 4096,
        sub_buffers: 16,
        mode: Mode::DiscardNewest,
        timestamps: true,
    })
    .expect("a valid ring configuration")
}

/// The payload length of ring record `seq`: 20 to 46 bytes, not always a multiple of 8.
fn record_len(seq: u64) -> usize {
    20 + (seq % 4) as usize * 8 + (seq % 3) as usize
}

/// Filler byte `i` of record (`writer`, `seq`).
fn filler(writer: u32, seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(i as u8) ^ writer as u8
}

/// FNV-1a, 64 bits.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes record (`writer`, `seq`): writer, seq, filler, checksum of all before it.
fn fill_record(payload: &mut [u8], writer: u32, seq: u64) {
    let n = payload.len();
    payload[..4].copy_from_slice(&writer.to_le_bytes());
    payload[4..12].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in payload[12..n - 8].iter_mut().enumerate() {
        *b = filler(writer, seq, i);
    }
    let sum = checksum(&payload[..n - 8]);
    payload[n - 8..].copy_from_slice(&sum.to_le_bytes());
}

/// The (writer, seq) of an intact record; `None` when anything is off.
fn parse_record(data: &[u8]) -> Option<(u32, u64)> {
    let n = data.len();
    if n < 20 {
        return None;
    }
    let writer = u32::from_le_bytes(data[..4].try_into().ok()?);
    let seq = u64::from_le_bytes(data[4..12].try_into().ok()?);
    let sum = u64::from_le_bytes(data[n - 8..].try_into().ok()?);
    let intact = n == record_len(seq)
        && sum == checksum(&data[..n - 8])
        && data[12..n - 8]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == filler(writer, seq, i));
    intact.then_some((writer, seq))
}

/// What the ring consumer saw.
#[derive(Default)]
struct RingSeen {
    /// Per writer, one bit per sequence number read.
    bits: Vec<Vec<u64>>,
    read: u64,
    duplicated: u64,
    corrupt: u64,
    flushes: u64,
}

impl RingSeen {
    fn check(&mut self, data: &[u8], writers: u32) {
        self.read += 1;
        let Some((writer, seq)) = parse_record(data) else {
            self.corrupt += 1;
            return;
        };
        if writer >= writers || seq >= 1 << 40 {
            self.corrupt += 1;
            return;
        }
        let (w, s) = (writer as usize, seq as usize);
        if self.bits.len() <= w {
            self.bits.resize_with(w + 1, Vec::new);
        }
        let bits = &mut self.bits[w];
        if bits.len() <= s / 64 {
            bits.resize((s / 64 + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << (s % 64);
        if bits[s / 64] & mask != 0 {
            self.duplicated += 1;
        } else {
            bits[s / 64] |= mask;
        }
    }

    /// (records of `0..committed` never read, records read beyond `committed`) for
    /// `writer`.
    fn missing_and_phantom(&self, writer: usize, committed: u64) -> (u64, u64) {
        let bits = self.bits.get(writer).map_or(&[][..], |b| &b[..]);
        let (mut found, mut phantom) = (0u64, 0u64);
        for (i, &word) in bits.iter().enumerate() {
            let base = i as u64 * 64;
            let inside = committed.saturating_sub(base).min(64);
            let mask = if inside == 64 {
                u64::MAX
            } else {
                (1u64 << inside) - 1
            };
            found += u64::from((word & mask).count_ones());
            phantom += u64::from((word & !mask).count_ones());
        }
        (committed - found, phantom)
    }
}

impl fmt::Display for RingCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ring: {} records committed, {} read; remote commits {}; discarded {} ({} refusals seen); overwritten {}; abandoned {}; flushes {}",
            self.records,
            self.read,
            self.remote_commits,
            self.discarded,
            self.refused,
            self.overwritten,
            self.abandoned,
            self.flushes
        )
    }
}

impl Check for RingCheck {
    fn faults(&self) -> Faults {
        self.faults
    }
}

/// A run's ring, the writer ids handed out, and what the consumer saw.
struct RingPart {
    ring: RingBuffer,
    next_writer: AtomicU32,
    seen: Mutex<Option<RingSeen>>,
}

/// What a thread wrote to the ring.
struct RingTally {
    /// The thread's writer id, in every record it writes.
    writer: u32,
    committed: u64,
    refused: u64,
    flushes: u64,
}

impl Part for RingPart {
    type Tally = RingTally;

    fn new_tally(&self) -> RingTally {
        RingTally {
            // Relaxed: a unique id is all that is needed.
            writer: self.next_writer.fetch_add(1, Ordering::Relaxed),
            committed: 0,
            refused: 0,
            flushes: 0,
        }
    }

    /// Reserve, fill, (window), commit; a refusal is counted.
    #[inline]
    fn op(&self, run: &Shared, turn: Turn, t: &mut RingTally, _: &mut Rng) {
        let seq = t.committed;
        match self.ring.reserve(record_len(seq)) {
            Ok(mut r) => {
                fill_record(r.payload_mut(), t.writer, seq);
                run.inject(turn.i);
                r.commit();
                t.committed += 1;
            }
            Err(ReserveError::Full) => {
                t.refused += 1;
                run.inject(turn.i);
                // Let the consumer catch up.
                std::thread::yield_now();
            }
            Err(e @ ReserveError::TooLarge { .. }) => unreachable!("{e}"),
        }
    }

    /// A flush of `victim`'s ring.
    fn remote_op(&self, _: &Shared, victim: usize, _: u64, t: &mut RingTally) {
        self.ring.flush(victim).expect("victims are below the CPUs");
        t.flushes += 1;
    }

    const BACKGROUND: Option<&'static str> = Some("stress-consumer");

    /// The consumer: reads (and flushes) while the workers write, then drains.
    fn background(&self, run: &Shared) {
        let ring = &self.ring;
        let mut seen = RingSeen::default();
        let mut last_flush = Instant::now();
        loop {
            // Acquire: pairs with the Release in `run` after every writer is joined, so
            // the last pass sees every commit.
            let last = run.background_stop.load(Ordering::Acquire);
            if last || last_flush.elapsed() >= FLUSH_EVERY {
                let cpus: Vec<usize> = if last {
                    (0..ring.slots()).collect()
                } else {
                    run.cpus.clone()
                };
                for cpu in cpus {
                    ring.flush(cpu).expect("cpu below the rings");
                    seen.flushes += 1;
                }
                last_flush = Instant::now();
            }
            let read = ring.consume_all(|rec| {
                // Relaxed: a writer takes its id before it reserves, and the record
                // reached us through the ring's Release/Acquire, so this load sees that
                // id at least (coherence).
                seen.check(rec.data, self.next_writer.load(Ordering::Relaxed))
            });
            if last {
                *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
                return;
            }
            if read == 0 {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// What the consumer saw against what the writers committed.
    fn check(&self, _: &Shared, tallies: &[&RingTally]) -> Vec<Entry> {
        let sum = |f: &dyn Fn(&RingTally) -> u64| tallies.iter().map(|t| f(t)).sum::<u64>();
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let stats = self.ring.stats();
        let mut r = RingCheck {
            records: sum(&|t| t.committed),
            read: seen.read,
            remote_commits: stats.remote_commits,
            discarded: stats.discarded,
            refused: sum(&|t| t.refused),
            overwritten: stats.overwritten,
            abandoned: stats.abandoned,
            flushes: seen.flushes + sum(&|t| t.flushes),
            faults: Faults {
                corrupt: seen.corrupt + stats.overwritten + stats.abandoned,
                lost: 0,
                duplicated: seen.duplicated,
            },
        };
        let mut committed = vec![0u64; seen.bits.len()];
        for t in tallies {
            let w = t.writer as usize;
            if committed.len() <= w {
                committed.resize(w + 1, 0);
            }
            committed[w] += t.committed;
        }
        for (w, &c) in committed.iter().enumerate() {
            let (missing, phantom) = seen.missing_and_phantom(w, c);
            r.faults.lost += missing;
            r.faults.corrupt += phantom;
        }
        // `discarded` is a Counter too: it must match the refusals exactly.
        r.faults.lost += r.refused.saturating_sub(r.discarded);
        r.faults.duplicated += r.discarded.saturating_sub(r.refused);
        vec![Entry::new("ring", Some(&r))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_any_flipped_byte_is_caught() {
        for seq in 0..12u64 {
            let mut buf = vec![0u8; record_len(seq)];
            fill_record(&mut buf, 7, seq);
            assert_eq!(parse_record(&buf), Some((7, seq)));
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x10;
                assert_eq!(parse_record(&bad), None, "seq {seq}, byte {i}");
            }
        }
    }

    #[test]
    fn ring_bookkeeping_counts_missing_duplicate_and_phantom_records() {
        let mut seen = RingSeen::default();
        for seq in [0u64, 1, 3, 3, 70] {
            let mut buf = vec![0u8; record_len(seq)];
            fill_record(&mut buf, 0, seq);
            seen.check(&buf, 1);
        }
        assert_eq!(seen.duplicated, 1);
        // Committed 0..5: 2 and 4 missing; 70 was never committed.
        assert_eq!(seen.missing_and_phantom(0, 5), (2, 1));
        assert_eq!(seen.missing_and_phantom(1, 3), (3, 0));
        let mut buf = vec![0u8; record_len(0)];
        fill_record(&mut buf, 5, 0);
        seen.check(&buf, 1);
        assert_eq!(seen.corrupt, 1, "an unknown writer is corrupt");
    }
}
