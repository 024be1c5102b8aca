//! Helpers of the ring tests: a thread pinned to one CPU (so that every record lands in
//! one ring, in order), a small ring configuration, and writing and draining records.

use cpulocal::ring::{Mode, RingBuffer, RingConfig};

use super::{allowed_cpus, set_affinity};

/// Pins the calling thread to its first allowed CPU while alive, so every record lands
/// in one ring, in order.
pub(crate) struct Pinned {
    cpus: Vec<usize>,
}

impl Pinned {
    pub(crate) fn new() -> Pinned {
        let cpus = allowed_cpus();
        set_affinity(0, &cpus[..1]).expect("sched_setaffinity");
        Pinned { cpus }
    }

    pub(crate) fn cpu(&self) -> usize {
        self.cpus[0]
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        set_affinity(0, &self.cpus).expect("sched_setaffinity");
    }
}

/// Four sub-buffers of 256 bytes: 16 one-byte records (16 bytes each) fill one.
pub(crate) fn config(mode: Mode) -> RingConfig {
    RingConfig {
        sub_buffer_size: 256,
        sub_buffers: 4,
        mode,
        timestamps: false,
    }
}

/// Every record of every ring, flushed first.
pub(crate) fn drain(ring: &RingBuffer) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    ring.flush_all();
    ring.consume_all(|rec| got.push(rec.data.to_vec()));
    got
}

/// Writes `n` one-byte records `0..n` from a thread pinned to one CPU; returns that CPU.
pub(crate) fn write_pinned(ring: &RingBuffer, n: u8) -> usize {
    let pinned = Pinned::new();
    for i in 0..n {
        ring.write(&[i]).expect("room");
    }
    pinned.cpu()
}
