//! The ring part's check: what the consumer saw of one ring ([`RingSeen`]), against
//! what the writers did to it and what the ring's statistics say ([`RingCheck`]).

use core::fmt;

use cpulocal::ring::{Mode, Record, RingStats};
use serde::Serialize;

use super::record::{parse_record, Kind, Stamp, NO_CPU};
use crate::stress::part::{Check, Faults};

/// The check of one of the ring part's rings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RingCheck {
    /// `discard_newest` (every committed record read exactly once) or `overwrite_oldest`
    /// (every committed record read or overwritten, exactly once: see
    /// `overwrites_identified`).
    pub mode: &'static str,
    /// Whether the ring named each record it overwrote (builds with test hooks): then
    /// each committed record must be read or overwritten, never both nor neither;
    /// otherwise only the totals are checked (read + `overwritten` = committed).
    pub overwrites_identified: bool,
    /// Records the workers committed (truncated and `write_with` ones included).
    pub records: u64,
    /// Records the consumer read (intact or not).
    pub read: u64,
    /// Of `records`, reserved longer and truncated before the commit.
    pub truncated: u64,
    /// Of `records`, written with `write_with` into a longer room.
    pub written_with: u64,
    /// Reservations the workers dropped without a commit (must equal `abandoned`).
    pub dropped: u64,
    /// `RingStats::abandoned`.
    pub abandoned: u64,
    /// `RingStats::remote_commits`: commits that landed from another CPU.
    pub remote_commits: u64,
    /// `RingStats::discarded`.
    pub discarded: u64,
    /// Reservations the workers saw refused as full (must equal `discarded`).
    pub refused: u64,
    /// `RingStats::overwritten` (0 in `discard_newest`).
    pub overwritten: u64,
    /// Flushes by the consumer and the remote thread.
    pub flushes: u64,
    /// Dropped reservations the consumer was handed (part of `corrupt`).
    pub abandoned_read: u64,
    /// Records whose `Record::cpu` is not the ring they were read from, not the CPU the
    /// reservation reported, or not one the run's threads may run on (part of
    /// `corrupt`).
    pub wrong_cpu: u64,
    /// Records without a timestamp, or whose timestamp was not read during their reserve
    /// (before the writer's clock read after it returned, after the one before the
    /// call) (part of `corrupt`).
    pub wrong_timestamp: u64,
    /// Records whose timestamp is below the one before it in the same ring (part of
    /// `corrupt`): a reserve retries when another one lands on its ring after it read the
    /// write position, so one ring's timestamps never decrease (`Record::timestamp`).
    pub timestamp_inversions: u64,
    /// `corrupt`: records whose length, filler or checksum is wrong, that no writer
    /// wrote or committed, dropped ones, and the wrong CPUs and timestamps; `lost`:
    /// committed records neither read nor counted as overwritten, refusals missing from
    /// `discarded`, drops missing from `abandoned`; `duplicated`: records read more than
    /// once, and the same counts the other way.
    #[serde(flatten)]
    pub faults: Faults,
}

impl fmt::Display for RingCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records committed ({} truncated, {} write_with), {} read; {} dropped uncommitted \
             (abandoned {}, {} of them read); remote commits {}; discarded {} ({} refusals seen); \
             overwritten {}{}; flushes {}; wrong cpu {}; wrong timestamp {}; timestamps below the one before {}",
            self.records,
            self.truncated,
            self.written_with,
            self.read,
            self.dropped,
            self.abandoned,
            self.abandoned_read,
            self.remote_commits,
            self.discarded,
            self.refused,
            self.overwritten,
            if self.overwrites_identified && self.overwritten > 0 {
                " (each one named)"
            } else {
                ""
            },
            self.flushes,
            self.wrong_cpu,
            self.wrong_timestamp,
            self.timestamp_inversions,
        )
    }
}

/// A [`RingCheck`] under its label: `ring` or `ring_overwrite`.
pub(super) struct Labelled(pub(super) &'static str, pub(super) RingCheck);

impl Serialize for Labelled {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.1.serialize(s)
    }
}

impl fmt::Display for Labelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0, self.1)
    }
}

impl Check for Labelled {
    fn faults(&self) -> Faults {
        self.1.faults
    }
}

/// What the consumer saw of one ring.
#[derive(Default)]
pub(super) struct RingSeen {
    /// Per writer, one bit per sequence number read.
    bits: Vec<Vec<u64>>,
    /// Per CPU, the timestamp of the last record read from its ring.
    last_timestamp: Vec<u64>,
    pub(super) read: u64,
    pub(super) duplicated: u64,
    pub(super) corrupt: u64,
    pub(super) abandoned_read: u64,
    pub(super) wrong_cpu: u64,
    pub(super) wrong_timestamp: u64,
    pub(super) timestamp_inversions: u64,
    pub(super) flushes: u64,
}

impl RingSeen {
    /// Checks `rec`, read from CPU `ring_cpu`'s ring, when `writers` writer ids have been
    /// handed out and the run's threads may run on `cpus`.
    pub(super) fn check(
        &mut self,
        ring_cpu: usize,
        rec: &Record<'_>,
        writers: u32,
        cpus: &[usize],
    ) {
        self.read += 1;
        if let Some(ts) = rec.timestamp {
            if self.last_timestamp.len() <= ring_cpu {
                self.last_timestamp.resize(ring_cpu + 1, 0);
            }
            let last = &mut self.last_timestamp[ring_cpu];
            self.timestamp_inversions += u64::from(ts < *last);
            *last = ts;
        }
        let Some(stamp) = parse_record(rec.data) else {
            self.corrupt += 1;
            return;
        };
        if stamp.writer >= writers || stamp.seq >= 1 << 40 {
            self.corrupt += 1;
            return;
        }
        if stamp.kind == Kind::Abandoned {
            self.abandoned_read += 1;
            return;
        }
        // Only `write_with` may carry no CPU: a reserved record saying NO_CPU (say, a
        // reservation whose `cpu()` came out as u32::MAX) would otherwise skip the check.
        let cpu_agrees = match stamp.kind {
            Kind::WriteWith => stamp.cpu == NO_CPU,
            _ => stamp.cpu as usize == rec.cpu,
        };
        if rec.cpu != ring_cpu || !cpu_agrees || !cpus.contains(&rec.cpu) {
            self.wrong_cpu += 1;
        }
        if !rec
            .timestamp
            .is_some_and(|ts| (stamp.before..=stamp.after).contains(&ts))
        {
            self.wrong_timestamp += 1;
        }
        self.mark(stamp.writer as usize, stamp.seq as usize);
    }

    /// Sets the bit of `writer`'s record `seq`; a second time, counts a duplicate.
    fn mark(&mut self, w: usize, s: usize) {
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

    /// Notes a record the ring overwrote (`stamp`: its parsed payload, `None` if it did
    /// not parse), in a `RingSeen` that holds only overwritten records, when `writers`
    /// writer ids have been handed out.
    pub(super) fn note_overwritten(&mut self, stamp: Option<Stamp>, writers: u32) {
        self.read += 1;
        match stamp {
            Some(s) if s.writer < writers && s.seq < 1 << 40 => {
                if s.kind == Kind::Abandoned {
                    self.abandoned_read += 1;
                } else {
                    self.mark(s.writer as usize, s.seq as usize);
                }
            }
            _ => self.corrupt += 1,
        }
    }

    /// For `writer`'s records `0..committed`: how many neither `self` (read) nor
    /// `over` (overwritten) holds, how many both hold, and how many `over` holds
    /// beyond `committed`.
    pub(super) fn missing_in_both(
        &self,
        over: &RingSeen,
        writer: usize,
        committed: u64,
    ) -> (u64, u64, u64) {
        let read = self.bits.get(writer).map_or(&[][..], |b| &b[..]);
        let dropped = over.bits.get(writer).map_or(&[][..], |b| &b[..]);
        let (mut found, mut both, mut phantom) = (0u64, 0u64, 0u64);
        for i in 0..read.len().max(dropped.len()) {
            let r = read.get(i).copied().unwrap_or(0);
            let d = dropped.get(i).copied().unwrap_or(0);
            let mask = committed_mask(committed, i);
            found += u64::from(((r | d) & mask).count_ones());
            both += u64::from((r & d).count_ones());
            phantom += u64::from((d & !mask).count_ones());
        }
        (committed - found, both, phantom)
    }

    /// (records of `0..committed` never read, records read beyond `committed`) for
    /// `writer`.
    pub(super) fn missing_and_phantom(&self, writer: usize, committed: u64) -> (u64, u64) {
        let bits = self.bits.get(writer).map_or(&[][..], |b| &b[..]);
        let (mut found, mut phantom) = (0u64, 0u64);
        for (i, &word) in bits.iter().enumerate() {
            let mask = committed_mask(committed, i);
            found += u64::from((word & mask).count_ones());
            phantom += u64::from((word & !mask).count_ones());
        }
        (committed - found, phantom)
    }
}

/// The bits of word `i` of a bitmap that stand for sequence numbers below `committed`.
fn committed_mask(committed: u64, i: usize) -> u64 {
    let inside = committed.saturating_sub(i as u64 * 64).min(64);
    if inside == 64 {
        u64::MAX
    } else {
        (1u64 << inside) - 1
    }
}

/// What the writers did to one ring, summed over them except `committed`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Written {
    pub(super) committed: u64,
    pub(super) truncated: u64,
    pub(super) written_with: u64,
    pub(super) dropped: u64,
    pub(super) refused: u64,
    pub(super) flushes: u64,
}

/// The check of a ring in `mode`: `seen` by the consumer, against `committed` (per
/// writer id), `written` (summed) and the ring's `stats`; `overwritten`: the records
/// the ring named as it overwrote them, when the build can tell (test hooks).
pub(super) fn ring_check(
    mode: Mode,
    seen: &RingSeen,
    committed: &[u64],
    written: Written,
    stats: RingStats,
    overwritten: Option<&RingSeen>,
) -> RingCheck {
    let overwrites = mode == Mode::OverwriteOldest;
    let (mut missing, mut phantom) = (0, 0);
    for (w, &c) in committed.iter().enumerate() {
        let (m, p) = seen.missing_and_phantom(w, c);
        missing += m;
        phantom += p;
    }
    // A writer id with records read but none committed: all phantoms.
    for w in committed.len()..seen.bits.len() {
        phantom += seen.missing_and_phantom(w, 0).1;
    }
    let mut faults = Faults {
        corrupt: seen.corrupt
            + phantom
            + seen.abandoned_read
            + seen.wrong_cpu
            + seen.wrong_timestamp
            + seen.timestamp_inversions
            // Never overwrites: any count is wrong.
            + if overwrites { 0 } else { stats.overwritten },
        lost: 0,
        duplicated: seen.duplicated,
    };
    match overwritten.filter(|_| overwrites) {
        // Each committed record read or overwritten, exactly once; and the count of
        // overwritten records is the number the ring named.
        Some(over) => {
            for (w, &c) in committed.iter().enumerate() {
                let (m, both, p) = seen.missing_in_both(over, w, c);
                faults.lost += m;
                faults.duplicated += both;
                faults.corrupt += p;
            }
            for w in committed.len()..over.bits.len() {
                faults.corrupt += over.missing_and_phantom(w, 0).1;
            }
            faults.corrupt += over.corrupt + over.abandoned_read;
            faults.duplicated += over.duplicated;
            faults.lost += over.read.saturating_sub(stats.overwritten);
            faults.duplicated += stats.overwritten.saturating_sub(over.read);
        }
        // Overwriting drops committed records unread, and counts them: the two must
        // match (a lost record and one both read and counted can balance: only the
        // named records above tell them apart).
        None => {
            let dropped_unread = if overwrites { stats.overwritten } else { 0 };
            faults.lost += missing.saturating_sub(dropped_unread);
            faults.duplicated += dropped_unread.saturating_sub(missing);
        }
    }
    // `discarded` and `abandoned` are Counters too: exact once the writers are joined.
    faults.lost += written.refused.saturating_sub(stats.discarded);
    faults.duplicated += stats.discarded.saturating_sub(written.refused);
    faults.lost += written.dropped.saturating_sub(stats.abandoned);
    faults.duplicated += stats.abandoned.saturating_sub(written.dropped);
    RingCheck {
        mode: if overwrites {
            "overwrite_oldest"
        } else {
            "discard_newest"
        },
        records: written.committed,
        read: seen.read,
        truncated: written.truncated,
        written_with: written.written_with,
        dropped: written.dropped,
        abandoned: stats.abandoned,
        remote_commits: stats.remote_commits,
        discarded: stats.discarded,
        refused: written.refused,
        overwrites_identified: overwrites && overwritten.is_some(),
        overwritten: stats.overwritten,
        flushes: seen.flushes + written.flushes,
        abandoned_read: seen.abandoned_read,
        wrong_cpu: seen.wrong_cpu,
        wrong_timestamp: seen.wrong_timestamp,
        timestamp_inversions: seen.timestamp_inversions,
        faults,
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{fill_record, record_len, stamp, Stamp};
    use super::*;

    fn record_of(s: &Stamp) -> Vec<u8> {
        let mut buf = vec![0u8; record_len(s.seq)];
        fill_record(&mut buf, s);
        buf
    }

    fn read(seen: &mut RingSeen, s: &Stamp, cpu: usize, timestamp: Option<u64>) {
        let data = record_of(s);
        let rec = Record {
            cpu,
            timestamp,
            data: &data,
        };
        seen.check(cpu, &rec, 2, &[0, 1]);
    }

    #[test]
    fn ring_bookkeeping_counts_missing_duplicate_and_phantom_records() {
        let mut seen = RingSeen::default();
        for seq in [0u64, 1, 3, 3, 70] {
            read(&mut seen, &stamp(0, seq, Kind::Plain), 1, Some(150));
        }
        assert_eq!(seen.duplicated, 1);
        // Committed 0..5: 2 and 4 missing; 70 was never committed.
        assert_eq!(seen.missing_and_phantom(0, 5), (2, 1));
        assert_eq!(seen.missing_and_phantom(1, 3), (3, 0));
        read(&mut seen, &stamp(5, 0, Kind::Plain), 1, Some(150));
        assert_eq!(seen.corrupt, 1, "an unknown writer is corrupt");
        assert_eq!((seen.wrong_cpu, seen.wrong_timestamp), (0, 0));
    }

    #[test]
    fn dropped_records_wrong_cpus_and_timestamps_are_caught() {
        let mut seen = RingSeen::default();
        read(&mut seen, &stamp(0, 0, Kind::Abandoned), 1, Some(150));
        assert_eq!(seen.abandoned_read, 1);
        // The reservation said CPU 1; read from ring 0.
        read(&mut seen, &stamp(0, 1, Kind::Plain), 0, Some(150));
        // `write_with` knows no CPU, but ring 5 is not one the run may use.
        let with = Stamp {
            cpu: NO_CPU,
            ..stamp(0, 2, Kind::WriteWith)
        };
        read(&mut seen, &with, 5, Some(150));
        assert_eq!(seen.wrong_cpu, 2);
        read(&mut seen, &stamp(0, 3, Kind::Plain), 1, Some(99));
        read(&mut seen, &stamp(0, 4, Kind::Plain), 1, Some(201));
        read(&mut seen, &stamp(0, 5, Kind::Plain), 1, None);
        read(&mut seen, &stamp(0, 6, Kind::Truncated), 1, Some(100));
        assert_eq!(seen.wrong_timestamp, 3);
        assert_eq!(
            seen.timestamp_inversions, 2,
            "99 after 150, 100 after 201 on ring 1"
        );
    }

    #[test]
    fn only_write_with_records_may_carry_no_cpu() {
        let mut seen = RingSeen::default();
        let no_cpu = |kind| Stamp {
            cpu: NO_CPU,
            ..stamp(0, 0, kind)
        };
        read(&mut seen, &no_cpu(Kind::Plain), 1, Some(150));
        read(&mut seen, &no_cpu(Kind::Truncated), 1, Some(150));
        assert_eq!(seen.wrong_cpu, 2, "a reserved record must name its CPU");
        read(&mut seen, &no_cpu(Kind::WriteWith), 1, Some(150));
        assert_eq!(seen.wrong_cpu, 2);
        // A `write_with` record cannot know its CPU: one that names one is not it.
        read(&mut seen, &stamp(0, 1, Kind::WriteWith), 1, Some(150));
        assert_eq!(seen.wrong_cpu, 3);
    }

    #[test]
    fn overwrite_mode_balances_reads_and_overwritten_against_commits() {
        let mut seen = RingSeen::default();
        for seq in [0u64, 1, 4] {
            read(&mut seen, &stamp(0, seq, Kind::Plain), 1, Some(150));
        }
        let written = Written {
            committed: 5,
            ..Written::default()
        };
        let stats = |overwritten| RingStats {
            overwritten,
            ..RingStats::default()
        };
        let check =
            |mode, overwritten| ring_check(mode, &seen, &[5], written, stats(overwritten), None);
        let f = check(Mode::OverwriteOldest, 2).faults;
        assert_eq!((f.lost, f.duplicated, f.corrupt), (0, 0, 0));
        assert_eq!(check(Mode::OverwriteOldest, 1).faults.lost, 1);
        assert_eq!(check(Mode::OverwriteOldest, 3).faults.duplicated, 1);
        let f = check(Mode::DiscardNewest, 0).faults;
        assert_eq!((f.lost, f.corrupt), (2, 0), "nothing may go missing");
        assert_eq!(check(Mode::DiscardNewest, 2).faults.corrupt, 2);
    }

    /// With the overwritten records named, a record lost uncounted and another both read
    /// and counted as overwritten no longer balance (the totals alone cannot tell).
    #[test]
    fn named_overwrites_catch_a_lost_record_balanced_by_a_read_one() {
        let mut seen = RingSeen::default();
        for seq in 0..4 {
            read(&mut seen, &stamp(0, seq, Kind::Plain), 1, Some(150));
        }
        let written = Written {
            committed: 5,
            ..Written::default()
        };
        let stats = RingStats {
            overwritten: 1,
            ..RingStats::default()
        };
        // Totals: 4 read + 1 overwritten = 5 committed, nothing seen wrong.
        let f = ring_check(Mode::OverwriteOldest, &seen, &[5], written, stats, None).faults;
        assert_eq!((f.lost, f.duplicated, f.corrupt), (0, 0, 0));
        // Named: record 3 was read and overwritten, record 4 is nowhere.
        let mut over = RingSeen::default();
        over.note_overwritten(Some(stamp(0, 3, Kind::Plain)), 2);
        let check = |over: &RingSeen| {
            ring_check(
                Mode::OverwriteOldest,
                &seen,
                &[5],
                written,
                stats,
                Some(over),
            )
            .faults
        };
        let f = check(&over);
        assert_eq!((f.lost, f.duplicated, f.corrupt), (1, 1, 0));
        // The honest case: record 4 overwritten, 0..=3 read.
        let mut over = RingSeen::default();
        over.note_overwritten(Some(stamp(0, 4, Kind::Plain)), 2);
        let f = check(&over);
        assert_eq!((f.lost, f.duplicated, f.corrupt), (0, 0, 0));
        // A payload that does not parse, and a writer never handed out, are corrupt.
        over.note_overwritten(None, 2);
        over.note_overwritten(Some(stamp(7, 0, Kind::Plain)), 2);
        assert_eq!(check(&over).corrupt, 2);
    }
}
