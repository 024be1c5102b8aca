//! The `ring` group: records of 16, 64 and 256 bytes: `RingBuffer` reserve+write+commit
//! against a `Mutex<VecDeque<Vec<u8>>>`, a crossbeam channel and a thread-local
//! `Vec<u8>`.
//!
//! One operation is one record of 16, 64 or 256 payload bytes (a class per size: each
//! size's rows are compared to its `RingBuffer` row), written by the producer threads
//! and read by a consumer. What each row includes:
//!
//! - `RingBuffer`: reserve + `payload_mut` copy + commit, on a ring without timestamps
//!   (with them, every record would add a `clock_gettime` the other rows do not pay).
//!   Every `RING_BATCH` records the producer consumes its CPU's ring (the CPU of its
//!   last record): the consumer's work is in the producer's time, amortised, and no
//!   other thread runs. The rings are sized so that this keeps them from filling;
//!   records refused by a full ring are counted (events) and the check accepts them as
//!   discarded, not lost. After the run the check flushes and consumes every CPU's
//!   ring: consumed + discarded must equal the records written.
//! - `mutex_deque`: a `Vec<u8>` allocated per record (as an owned record needs), pushed
//!   on one `Mutex<VecDeque<Vec<u8>>>`; every `RING_BATCH` records the producer swaps the
//!   deque for an empty one under the lock and reads and frees what it took, outside
//!   the lock. Same consumer arrangement as the ring.
//! - `channel`: a `Vec<u8>` allocated per record, sent on a
//!   `crossbeam_channel::bounded(CHANNEL_CAP)`; a dedicated consumer thread receives and
//!   frees the records (started before the first run, parked when idle). Producers
//!   block when it falls behind. It is one more thread than the others run: with as
//!   many producers as CPUs it competes with them for the CPUs.
//! - `tls_vec` (the floor): each thread appends a length word and the payload to its
//!   own `Vec<u8>` (taken from a pool, so its memory is warm) and parses and clears it
//!   every `RING_BATCH` records. Nothing is shared.
//!
//! Every consumer reads each record's length and checks it; none reads the payload.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpulocal::ring::{Mode, ReserveError, RingBuffer, RingConfig};

use super::harness::{sum_check, GroupDef, Row, Subject, TargetSpec};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "ring",
    uses_remote_scheme: true,
    rows,
    layout_rows: None,
    legend: &LEGEND,
    targets: &TARGETS,
    records_per_s: true,
    note: None,
    untimed: None,
};

/// The payload sizes measured.
const RING_SIZES: [usize; 3] = [16, 64, 256];

/// Records a producer writes between two rounds of consuming.
const RING_BATCH: u64 = 64;

/// The channel's capacity.
const CHANNEL_CAP: usize = 1024;

/// The bytes every record's payload is copied from.
static PAYLOAD: [u8; 256] = [0xa5; 256];

/// `RingBuffer` rows: see the section's comment.
struct Ring {
    ring: RingBuffer,
    size: usize,
    consumed: AtomicU64,
    bad: AtomicU64,
    /// `stats().discarded` when the run started.
    discarded_before: u64,
    /// Records the last run's check found discarded.
    discarded: AtomicU64,
}

impl Ring {
    fn new(size: usize) -> Ring {
        // 8 sub-buffers of 32 KiB per CPU: a batch of the largest records (64 × 264
        // bytes) fills about half a sub-buffer, so a ring whose producer consumes every
        // batch holds two or three sub-buffers at most.
        let config = RingConfig {
            sub_buffer_size: 32 << 10,
            sub_buffers: 8,
            mode: Mode::DiscardNewest,
            timestamps: false,
        };
        Ring {
            ring: RingBuffer::new(config).expect("a valid ring configuration"),
            size,
            consumed: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            discarded_before: 0,
            discarded: AtomicU64::new(0),
        }
    }

    /// Consumes CPU `cpu`'s complete sub-buffers; returns the records read and the
    /// records of the wrong length.
    fn consume(&self, cpu: usize) -> (u64, u64) {
        let (mut read, mut bad) = (0, 0);
        self.ring
            .consume(cpu, |rec| {
                read += 1;
                bad += u64::from(rec.data.len() != self.size);
            })
            .expect("cpu < cpus");
        (read, bad)
    }
}

impl Subject for Ring {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let payload = &PAYLOAD[..self.size];
        let (mut read, mut bad) = (0, 0);
        let mut cpu = 0;
        for i in 0..ops {
            match self.ring.reserve(black_box(self.size)) {
                Ok(mut r) => {
                    cpu = r.cpu();
                    r.payload_mut().copy_from_slice(payload);
                    r.commit();
                }
                Err(ReserveError::Full) => {}
                Err(e) => panic!("{e}"),
            }
            if i % RING_BATCH == RING_BATCH - 1 {
                let (r, b) = self.consume(cpu);
                read += r;
                bad += b;
            }
        }
        self.consumed.fetch_add(read, Ordering::Relaxed);
        self.bad.fetch_add(bad, Ordering::Relaxed);
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        // The last check flushed and consumed every ring: they are empty.
        self.discarded_before = self.ring.stats().discarded;
        *self.consumed.get_mut() = 0;
        *self.bad.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let (mut read, mut bad) = (
            self.consumed.load(Ordering::Relaxed),
            self.bad.load(Ordering::Relaxed),
        );
        for cpu in 0..self.ring.slots() {
            self.ring.flush(cpu).expect("cpu < cpus");
            let (r, b) = self.consume(cpu);
            read += r;
            bad += b;
        }
        let stats = self.ring.stats();
        let discarded = stats.discarded - self.discarded_before;
        self.discarded.store(discarded, Ordering::Relaxed);
        sum_check("records of the wrong length", bad, 0)?;
        sum_check("abandoned reservations", stats.abandoned, 0)?;
        sum_check("records consumed + discarded", read + discarded, expected)
    }

    fn events(&self) -> Option<(u64, &'static str)> {
        Some((
            self.discarded.load(Ordering::Relaxed),
            "records discarded (ring full)",
        ))
    }
}

/// `mutex_deque` rows: see the section's comment.
struct MutexDeque {
    deque: Mutex<VecDeque<Vec<u8>>>,
    size: usize,
    consumed: AtomicU64,
    bad: AtomicU64,
}

impl MutexDeque {
    fn new(size: usize) -> MutexDeque {
        MutexDeque {
            deque: Mutex::default(),
            size,
            consumed: AtomicU64::new(0),
            bad: AtomicU64::new(0),
        }
    }

    /// Reads and frees the records of `taken`; returns how many, and how many had the
    /// wrong length.
    fn read(&self, taken: &mut VecDeque<Vec<u8>>) -> (u64, u64) {
        let (mut read, mut bad) = (0, 0);
        for rec in taken.drain(..) {
            read += 1;
            bad += u64::from(rec.len() != self.size);
        }
        (read, bad)
    }
}

impl Subject for MutexDeque {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let payload = &PAYLOAD[..self.size];
        let mut taken = VecDeque::with_capacity(4 * RING_BATCH as usize);
        let (mut read, mut bad) = (0, 0);
        for i in 0..ops {
            let rec = black_box(payload).to_vec();
            self.deque
                .lock()
                .expect("bench mutex poisoned")
                .push_back(rec);
            if i % RING_BATCH == RING_BATCH - 1 {
                core::mem::swap(
                    &mut *self.deque.lock().expect("bench mutex poisoned"),
                    &mut taken,
                );
                let (r, b) = self.read(&mut taken);
                read += r;
                bad += b;
            }
        }
        self.consumed.fetch_add(read, Ordering::Relaxed);
        self.bad.fetch_add(bad, Ordering::Relaxed);
    }

    fn reset(&mut self, threads: usize, _ops: u64) {
        let deque = self.deque.get_mut().expect("bench mutex poisoned");
        deque.clear();
        deque.reserve(2 * threads * RING_BATCH as usize);
        *self.consumed.get_mut() = 0;
        *self.bad.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let mut rest = core::mem::take(&mut *self.deque.lock().expect("bench mutex poisoned"));
        let (r, b) = self.read(&mut rest);
        sum_check(
            "records of the wrong length",
            self.bad.load(Ordering::Relaxed) + b,
            0,
        )?;
        sum_check(
            "records consumed",
            self.consumed.load(Ordering::Relaxed) + r,
            expected,
        )
    }
}

/// `channel` rows: see the section's comment.
struct Channel {
    size: usize,
    /// The sending side and the consumer thread, from the first `reset` on.
    tx: Option<crossbeam_channel::Sender<Vec<u8>>>,
    consumer: Option<std::thread::JoinHandle<()>>,
    /// Records the consumer received since it started.
    received: Arc<AtomicU64>,
    /// Records of the wrong length it received.
    bad: Arc<AtomicU64>,
    /// `received` when the run started.
    received_before: u64,
}

/// How long `check` waits for the channel's consumer to catch up.
const CONSUMER_TIMEOUT: Duration = Duration::from_secs(30);

impl Channel {
    fn new(size: usize) -> Channel {
        Channel {
            size,
            tx: None,
            consumer: None,
            received: Arc::default(),
            bad: Arc::default(),
            received_before: 0,
        }
    }
}

impl Subject for Channel {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let tx = self.tx.as_ref().expect("reset started the consumer");
        let payload = &PAYLOAD[..self.size];
        for _ in 0..ops {
            tx.send(black_box(payload).to_vec())
                .expect("the consumer runs until the row is dropped");
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        if self.tx.is_none() {
            let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(CHANNEL_CAP);
            let (received, bad, size) =
                (Arc::clone(&self.received), Arc::clone(&self.bad), self.size);
            let consumer = std::thread::Builder::new()
                .name("bench-consumer".into())
                .spawn(move || {
                    let mut total = 0u64;
                    for rec in rx.iter() {
                        total += 1;
                        if rec.len() != size {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(rec);
                        // Published when the channel runs dry (always at the end of a
                        // run) and every 256 records; Release pairs with `check`.
                        if total.is_multiple_of(256) || rx.is_empty() {
                            received.store(total, Ordering::Release);
                        }
                    }
                })
                .expect("the consumer thread starts");
            self.tx = Some(tx);
            self.consumer = Some(consumer);
        }
        self.received_before = self.received.load(Ordering::Acquire);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        // The producers' sends are done; the consumer may still be reading the last
        // CHANNEL_CAP records.
        let start = Instant::now();
        let got = loop {
            // Acquire: pairs with the consumer's Release store.
            let got = self.received.load(Ordering::Acquire) - self.received_before;
            if got >= expected || start.elapsed() > CONSUMER_TIMEOUT {
                break got;
            }
            std::thread::yield_now();
        };
        sum_check(
            "records of the wrong length",
            self.bad.load(Ordering::Relaxed),
            0,
        )?;
        sum_check("records received", got, expected)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // Dropping the sender ends the consumer's loop.
        self.tx = None;
        if let Some(consumer) = self.consumer.take() {
            consumer.join().expect("the consumer thread panicked");
        }
    }
}

/// `tls_vec` rows: see the section's comment.
struct TlsVec {
    size: usize,
    /// Buffers waiting for a thread (warm: each run reuses the last run's).
    pool: Mutex<Vec<Vec<u8>>>,
    consumed: AtomicU64,
    bad: AtomicU64,
}

impl TlsVec {
    fn new(size: usize) -> TlsVec {
        TlsVec {
            size,
            pool: Mutex::default(),
            consumed: AtomicU64::new(0),
            bad: AtomicU64::new(0),
        }
    }

    /// Walks the records of `buf`; returns how many, and how many had the wrong length.
    fn parse(&self, buf: &[u8]) -> (u64, u64) {
        let (mut read, mut bad, mut at) = (0, 0, 0);
        while at < buf.len() {
            let len = u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
            read += 1;
            bad += u64::from(len != self.size as u64);
            at += 8 + len as usize;
        }
        (read, bad)
    }
}

impl Subject for TlsVec {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let mut buf = self
            .pool
            .lock()
            .expect("bench mutex poisoned")
            .pop()
            .expect("reset leaves a buffer for every thread");
        let payload = &PAYLOAD[..self.size];
        let header = (self.size as u64).to_le_bytes();
        let (mut read, mut bad) = (0, 0);
        for i in 0..ops {
            buf.extend_from_slice(&header);
            buf.extend_from_slice(black_box(payload));
            if i % RING_BATCH == RING_BATCH - 1 {
                let (r, b) = self.parse(&buf);
                read += r;
                bad += b;
                buf.clear();
            }
        }
        let (r, b) = self.parse(&buf);
        buf.clear();
        self.pool.lock().expect("bench mutex poisoned").push(buf);
        self.consumed.fetch_add(read + r, Ordering::Relaxed);
        self.bad.fetch_add(bad + b, Ordering::Relaxed);
    }

    fn reset(&mut self, threads: usize, _ops: u64) {
        let pool = self.pool.get_mut().expect("bench mutex poisoned");
        while pool.len() < threads {
            pool.push(vec![0; RING_BATCH as usize * (8 + self.size)]);
        }
        for buf in pool.iter_mut() {
            buf.clear();
        }
        *self.consumed.get_mut() = 0;
        *self.bad.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "records of the wrong length",
            self.bad.load(Ordering::Relaxed),
            0,
        )?;
        sum_check(
            "records parsed",
            self.consumed.load(Ordering::Relaxed),
            expected,
        )
    }
}

fn rows(_notes: &mut Vec<String>) -> Vec<Row> {
    RING_SIZES
        .into_iter()
        .flat_map(|size| {
            let [ring, deque, channel, tls] = ring_names(size);
            [
                Row::cpulocal(ring, Ring::new(size)),
                Row::new(deque, MutexDeque::new(size)),
                Row::new(channel, Channel::new(size)),
                Row::new(tls, TlsVec::new(size)),
            ]
            .map(|row| row.in_class(size))
        })
        .collect()
}

/// The names of the ring rows of records of `size` bytes.
fn ring_names(size: usize) -> [&'static str; 4] {
    match size {
        16 => [
            "RingBuffer 16B",
            "mutex_deque 16B",
            "channel 16B",
            "tls_vec 16B",
        ],
        64 => [
            "RingBuffer 64B",
            "mutex_deque 64B",
            "channel 64B",
            "tls_vec 64B",
        ],
        256 => [
            "RingBuffer 256B",
            "mutex_deque 256B",
            "channel 256B",
            "tls_vec 256B",
        ],
        _ => unreachable!("RING_SIZES has names for each size"),
    }
}

const RING_RB: &str =
    "cpulocal RingBuffer reserve + payload copy + commit; the producer consumes its CPU's ring every 64 records";
const RING_DEQUE: &str =
    "Mutex<VecDeque<Vec<u8>>>: malloc + push_back; the producer drains the deque every 64 records";
const RING_CHANNEL: &str =
    "crossbeam_channel::bounded(1024) of Vec<u8>: malloc + send; a consumer thread receives and frees";
const RING_TLS: &str =
    "per-thread Vec<u8>: append length + payload, parse and clear every 64 records (the floor)";

/// The ring rows' legend: one entry per row name, so per size.
const LEGEND: [(&str, &str); 12] = [
    ("RingBuffer 16B", RING_RB),
    ("mutex_deque 16B", RING_DEQUE),
    ("channel 16B", RING_CHANNEL),
    ("tls_vec 16B", RING_TLS),
    ("RingBuffer 64B", RING_RB),
    ("mutex_deque 64B", RING_DEQUE),
    ("channel 64B", RING_CHANNEL),
    ("tls_vec 64B", RING_TLS),
    ("RingBuffer 256B", RING_RB),
    ("mutex_deque 256B", RING_DEQUE),
    ("channel 256B", RING_CHANNEL),
    ("tls_vec 256B", RING_TLS),
];

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 2] = [
    TargetSpec {
        target: "RingBuffer 64B records at least 5x faster than a crossbeam channel",
        threads: 2,
        numerator: "channel 64B",
        denominator: "RingBuffer 64B",
        bound: 5.0,
        at_most: false,
    },
    TargetSpec {
        target: "RingBuffer 64B records within 2x of appending to a thread-local Vec",
        threads: 1,
        numerator: "RingBuffer 64B",
        denominator: "tls_vec 64B",
        bound: 2.0,
        at_most: true,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_rows_are_compared_within_their_record_size() {
        let rows = rows(&mut Vec::new());
        for size in RING_SIZES {
            let class: Vec<_> = rows.iter().filter(|r| r.class == size).collect();
            assert_eq!(class.len(), 4);
            assert!(class.iter().all(|r| r.name.ends_with(&format!(" {size}B"))));
        }
    }
}
