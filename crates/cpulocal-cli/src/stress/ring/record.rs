//! The ring part's records: what a writer puts in a payload, and the consumer's check
//! that a payload is exactly such a record.
//!
//! A record carries what the consumer needs to check it on its own: who wrote it and
//! its sequence number (read exactly once), how it was written (an abandoned one must
//! never be read), the CPU the reservation said it was on (`Record::cpu` must agree), and
//! the clock read before the reserve and after it returned (`Record::timestamp`, read
//! during the reserve, must lie between). Its length is a function of its sequence
//! number, so a truncated record delivered with the wrong length is caught.

/// How a record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// `reserve`, fill, `commit`.
    Plain = 1,
    /// `reserve` of more than the record, fill, `truncate` to the record, `commit`.
    Truncated = 2,
    /// `write_with` reserving more than the record, the closure returning its length.
    WriteWith = 3,
    /// `reserve`, fill, dropped without a commit: must never be read.
    Abandoned = 4,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        [
            Kind::Plain,
            Kind::Truncated,
            Kind::WriteWith,
            Kind::Abandoned,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// `Stamp::cpu` of a record whose writer cannot know its reservation's CPU (`write_with`
/// hands the closure the payload only).
pub(super) const NO_CPU: u32 = u32::MAX;

/// What a record says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) writer: u32,
    pub(super) seq: u64,
    pub(super) kind: Kind,
    /// `Reservation::cpu`, or [`NO_CPU`].
    pub(super) cpu: u32,
    /// `CLOCK_MONOTONIC` before the writer called the reserve.
    pub(super) before: u64,
    /// `CLOCK_MONOTONIC` after the reserve returned.
    pub(super) after: u64,
}

/// writer, seq, kind, cpu, before, after.
const FIELDS: usize = 4 + 8 + 1 + 4 + 8 + 8;
const CHECKSUM: usize = 8;

/// The payload length of a record with sequence number `seq`: 41 to 68 bytes, not
/// always a multiple of 8 (the ring pads records to 8).
pub(super) fn record_len(seq: u64) -> usize {
    FIELDS + CHECKSUM + (seq % 4) as usize * 8 + (seq % 3) as usize
}

/// The room a truncated or `write_with` record `seq` reserves beyond its length: 1 to 13
/// bytes, so that the truncation sometimes stays inside the same 8-byte step and
/// sometimes gives a whole step back as padding.
pub(super) fn spare_len(seq: u64) -> usize {
    1 + (seq % 13) as usize
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

/// Writes the record `stamp` describes into `payload`, which is `record_len(stamp.seq)`
/// bytes: the fields, the filler, the checksum of all before it.
pub(super) fn fill_record(payload: &mut [u8], stamp: &Stamp) {
    let n = payload.len();
    debug_assert_eq!(n, record_len(stamp.seq));
    payload[..4].copy_from_slice(&stamp.writer.to_le_bytes());
    payload[4..12].copy_from_slice(&stamp.seq.to_le_bytes());
    payload[12] = stamp.kind as u8;
    payload[13..17].copy_from_slice(&stamp.cpu.to_le_bytes());
    payload[17..25].copy_from_slice(&stamp.before.to_le_bytes());
    payload[25..33].copy_from_slice(&stamp.after.to_le_bytes());
    for (i, b) in payload[FIELDS..n - CHECKSUM].iter_mut().enumerate() {
        *b = filler(stamp.writer, stamp.seq, i);
    }
    let sum = checksum(&payload[..n - CHECKSUM]);
    payload[n - CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
}

/// What an intact record says; `None` when anything is off, its length included.
pub(super) fn parse_record(data: &[u8]) -> Option<Stamp> {
    let n = data.len();
    if n < FIELDS + CHECKSUM {
        return None;
    }
    let u32_at = |i: usize| data[i..i + 4].try_into().ok().map(u32::from_le_bytes);
    let u64_at = |i: usize| data[i..i + 8].try_into().ok().map(u64::from_le_bytes);
    let stamp = Stamp {
        writer: u32_at(0)?,
        seq: u64_at(4)?,
        kind: Kind::from_byte(data[12])?,
        cpu: u32_at(13)?,
        before: u64_at(17)?,
        after: u64_at(25)?,
    };
    let intact = n == record_len(stamp.seq)
        && u64_at(n - CHECKSUM)? == checksum(&data[..n - CHECKSUM])
        && data[FIELDS..n - CHECKSUM]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == filler(stamp.writer, stamp.seq, i));
    intact.then_some(stamp)
}

/// A stamp for the tests: on CPU 1, the clock read at 100 and 200.
#[cfg(test)]
pub(super) fn stamp(writer: u32, seq: u64, kind: Kind) -> Stamp {
    Stamp {
        writer,
        seq,
        kind,
        cpu: 1,
        before: 100,
        after: 200,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_any_flipped_byte_or_other_length_is_caught() {
        for seq in 0..12u64 {
            let s = stamp(7, seq, Kind::Truncated);
            let mut buf = vec![0u8; record_len(seq)];
            fill_record(&mut buf, &s);
            assert_eq!(parse_record(&buf), Some(s));
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x10;
                assert_eq!(parse_record(&bad), None, "seq {seq}, byte {i}");
            }
            // A truncation delivered one byte too long or too short.
            let mut longer = buf.clone();
            longer.push(0);
            assert_eq!(parse_record(&longer), None, "seq {seq}");
            assert_eq!(parse_record(&buf[..buf.len() - 1]), None, "seq {seq}");
        }
    }

    #[test]
    fn spare_room_sometimes_crosses_an_eight_byte_step() {
        let steps =
            |seq| (record_len(seq) + spare_len(seq)).div_ceil(8) - record_len(seq).div_ceil(8);
        assert!((0..40).any(|s| steps(s) == 0) && (0..40).any(|s| steps(s) > 0));
    }
}
