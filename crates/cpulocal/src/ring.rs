//! `RingBuffer`: per-CPU ring buffers for tracing, with a migration-safe commit.
//!
//! # The protocol (seed 004)
//!
//! Each CPU has a ring of `sub_buffers` sub-buffers of `sub_buffer_size` bytes. Positions
//! are byte counts that only grow; position `p` lives at `p % capacity`.
//!
//! - **Reserve** runs on the producer's CPU: one restartable compare-and-store moves the
//!   CPU's `write` position past the record (and past padding, when the record does not
//!   fit in what is left of the current sub-buffer: records never straddle two). The
//!   sequence checks the CPU's lock word, so a consumer's [`flush`](RingBuffer::flush),
//!   which takes that lock remotely, excludes it.
//! - The producer writes its record into the reserved bytes, which are its alone.
//! - **Commit** adds the record's size to its sub-buffer's commit count, *on the ring of
//!   the reserve* even if the thread migrated in between: with a restartable add to the
//!   sub-buffer's `commit_local` when the thread is still on that CPU, otherwise with an
//!   atomic add to its `commit_remote` (Peter Zijlstra's answer in seed 004). A `Release`
//!   fence before the add publishes the record's bytes.
//! - The **consumer** sums both counts: a sub-buffer is complete when `commit_local +
//!   commit_remote` reaches the bytes of every lap it has served, `(lap + 1) *
//!   sub_buffer_size`. Only then is it read; nothing on the producers' fast path waits.
//! - The consumer claims the oldest sub-buffer by setting the low bit of the ring's
//!   `consumed` position, reads it, and moves `consumed` past it, handing the space back.
//!   In [`Mode::OverwriteOldest`] a producer short of space moves `consumed` past the
//!   oldest sub-buffer instead (when it is complete and not claimed), counting its
//!   records as overwritten; a claimed sub-buffer is never overwritten, so a reader never
//!   sees bytes change under it.
//!
//! A reservation dropped without [`commit`](Reservation::commit) is committed as padding:
//! the consumer skips it and never stalls.

use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

use crate::arch::{self, Outcome};
use crate::cache_padded::CachePadded;
use crate::remote::{self, Attempt, CpuLock, InvalidCpu};
use crate::{sys, Counter};

/// What a full ring does with a new record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Refuse the new record ([`ReserveError::Full`]) and count it as discarded.
    #[default]
    DiscardNewest,
    /// Drop the oldest complete sub-buffer that no consumer is reading, counting its
    /// records as overwritten; refuse (and count as discarded) only when that is not
    /// possible: the oldest sub-buffer is being read (or dropped by another producer),
    /// or still has uncommitted records.
    OverwriteOldest,
}

/// The shape of a [`RingBuffer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingConfig {
    /// Bytes per sub-buffer: a power of two from 64 to 2^30. A record (header
    /// included) must fit in one.
    pub sub_buffer_size: usize,
    /// Sub-buffers per CPU: a power of two, at least 2 (positions map to sub-buffers
    /// with shifts and masks, never a division).
    pub sub_buffers: usize,
    /// What a full ring does.
    pub mode: Mode,
    /// Whether every record carries a `CLOCK_MONOTONIC` timestamp (8 more bytes).
    pub timestamps: bool,
}

impl Default for RingConfig {
    /// 4 sub-buffers of 4 KiB per CPU, discarding when full, with timestamps.
    fn default() -> Self {
        RingConfig {
            sub_buffer_size: 4096,
            sub_buffers: 4,
            mode: Mode::DiscardNewest,
            timestamps: true,
        }
    }
}

/// A [`RingConfig`] that cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConfigError {
    /// `sub_buffer_size` is not a power of two from 64 to 2^30.
    SubBufferSize(usize),
    /// `sub_buffers` is not a power of two of at least 2, or the ring would not fit in
    /// the address space.
    SubBuffers(usize),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::SubBufferSize(n) => write!(
                f,
                "sub-buffer size {n} is not a power of two from 64 to 2^30"
            ),
            ConfigError::SubBuffers(n) => {
                write!(f, "{n} sub-buffers: a power of two of at least 2 is needed")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why [`RingBuffer::reserve`] refused a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReserveError {
    /// The record can never fit: its payload is `len` bytes, a sub-buffer holds `max`.
    TooLarge {
        /// The payload length asked for.
        len: usize,
        /// The largest payload a sub-buffer holds (its size less the header).
        max: usize,
    },
    /// The ring of this CPU is full; the record was counted as discarded.
    Full,
}

impl fmt::Display for ReserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReserveError::TooLarge { len, max } => write!(
                f,
                "a {len}-byte record does not fit in a sub-buffer (at most {max} bytes of payload)"
            ),
            ReserveError::Full => f.write_str("the ring buffer of this CPU is full"),
        }
    }
}

impl std::error::Error for ReserveError {}

/// Counts kept by a [`RingBuffer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RingStats {
    /// Records refused with [`ReserveError::Full`].
    pub discarded: u64,
    /// Committed records dropped unread by [`Mode::OverwriteOldest`].
    pub overwritten: u64,
    /// Commits that used the atomic (remote) counter: the thread migrated between reserve
    /// and commit, or the restartable add kept aborting, or the process runs the
    /// [`Scheme::Locked`](crate::remote::Scheme::Locked) scheme, where every commit does.
    pub remote_commits: u64,
    /// Reservations dropped without a commit, turned into padding.
    pub abandoned: u64,
}

/// One record, as the consumer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Record<'a> {
    /// The CPU whose ring held it (where it was reserved).
    pub cpu: usize,
    /// `CLOCK_MONOTONIC` nanoseconds read just before the reserve, when the ring keeps
    /// timestamps.
    pub timestamp: Option<u64>,
    /// The payload.
    pub data: &'a [u8],
}

/// Header: payload length in the low 32 bits, kind above.
const HEADER: usize = 8;
const KIND_SHIFT: u32 = 32;
const KIND_RECORD: u64 = 1;
const KIND_PADDING: u64 = 2;
/// The low bit of `consumed`: a consumer is reading the sub-buffer at that position.
const CLAIMED: usize = 1;

struct SubBuffer {
    /// Bytes committed by restartable adds on the ring's CPU.
    commit_local: AtomicUsize,
    /// Bytes committed with atomic adds from other CPUs (and by flushes).
    commit_remote: AtomicU64,
}

struct Ring {
    /// The CPU's lock word: reserve sequences check it; flushes take it remotely.
    lock: CpuLock,
    /// Reserve position: written by reserve sequences on this CPU or under `lock`.
    write: AtomicUsize,
    /// Consumer position (a sub-buffer start), with [`CLAIMED`] while one is read.
    consumed: AtomicUsize,
    subs: Box<[SubBuffer]>,
    /// The bytes, as words for 8-byte alignment. Each byte is written by the one
    /// reservation that owns it, and read only after its sub-buffer is complete.
    data: Box<[UnsafeCell<u64>]>,
}

/// Per-CPU ring buffers of variable-length records, for tracers, loggers and metrics
/// exporters: producers never take a lock or wait; a consumer reads complete records per
/// CPU, in order, while they keep writing.
///
/// `RingBuffer` is `Send` and `Sync`: every byte of a ring is written by the one
/// reservation that owns it and read only once its sub-buffer is complete and claimed.
///
/// ```
/// use cpulocal::ring::{RingBuffer, RingConfig};
///
/// let ring = RingBuffer::new(RingConfig::default()).unwrap();
/// let mut r = ring.reserve(5).unwrap();
/// r.payload_mut().copy_from_slice(b"hello");
/// r.commit();
/// ring.write(b"world").unwrap();
///
/// let mut seen = Vec::new();
/// for cpu in 0..ring.cpus() {
///     ring.flush(cpu).unwrap(); // hand over the partly filled sub-buffer too
///     ring.consume(cpu, |rec| seen.push(rec.data.to_vec())).unwrap();
/// }
/// seen.sort();
/// assert_eq!(seen, [b"hello".to_vec(), b"world".to_vec()]);
/// ```
pub struct RingBuffer {
    rings: Box<[CachePadded<Ring>]>,
    config: RingConfig,
    capacity: usize,
    /// log2 of `sub_buffer_size`.
    sub_shift: u32,
    /// log2 of `capacity` (both sizes are powers of two).
    cap_shift: u32,
    discarded: Counter,
    overwritten: Counter,
    remote_commits: Counter,
    abandoned: Counter,
}

// SAFETY: the `UnsafeCell` bytes are written only through a reservation that owns them
// (handed out once by the reserve protocol) and read only after their sub-buffer is
// complete (all its bytes committed, with Release/Acquire) and claimed by one consumer,
// during which no reservation can cover them.
unsafe impl Sync for RingBuffer {}
// SAFETY: as above; the struct owns its memory.
unsafe impl Send for RingBuffer {}

impl RingBuffer {
    /// One ring per possible CPU, each `config.sub_buffers * config.sub_buffer_size`
    /// bytes.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the sizes are out of range.
    ///
    /// ```
    /// use cpulocal::ring::{ConfigError, RingBuffer, RingConfig};
    /// let bad = RingConfig { sub_buffer_size: 100, ..RingConfig::default() };
    /// assert_eq!(RingBuffer::new(bad).err(), Some(ConfigError::SubBufferSize(100)));
    /// ```
    pub fn new(config: RingConfig) -> Result<Self, ConfigError> {
        let sub = config.sub_buffer_size;
        if !sub.is_power_of_two() || !(64..=1 << 30).contains(&sub) {
            return Err(ConfigError::SubBufferSize(sub));
        }
        if config.sub_buffers < 2 || !config.sub_buffers.is_power_of_two() {
            return Err(ConfigError::SubBuffers(config.sub_buffers));
        }
        let capacity = sub
            .checked_mul(config.sub_buffers)
            .ok_or(ConfigError::SubBuffers(config.sub_buffers))?;
        let rings = (0..sys::possible_cpus())
            .map(|_| {
                CachePadded::new(Ring {
                    lock: CpuLock::new(),
                    write: AtomicUsize::new(0),
                    consumed: AtomicUsize::new(0),
                    subs: (0..config.sub_buffers)
                        .map(|_| SubBuffer {
                            commit_local: AtomicUsize::new(0),
                            commit_remote: AtomicU64::new(0),
                        })
                        .collect(),
                    data: (0..capacity / 8).map(|_| UnsafeCell::new(0)).collect(),
                })
            })
            .collect();
        Ok(RingBuffer {
            rings,
            config,
            capacity,
            sub_shift: sub.trailing_zeros(),
            cap_shift: capacity.trailing_zeros(),
            discarded: Counter::new(),
            overwritten: Counter::new(),
            remote_commits: Counter::new(),
            abandoned: Counter::new(),
        })
    }

    /// The configuration the buffer was built with.
    pub fn config(&self) -> RingConfig {
        self.config
    }

    /// The number of rings (the possible CPUs).
    pub fn cpus(&self) -> usize {
        self.rings.len()
    }

    /// The largest payload a record can have.
    pub fn max_payload(&self) -> usize {
        self.config.sub_buffer_size - self.header_len()
    }

    /// The counts kept so far.
    pub fn stats(&self) -> RingStats {
        RingStats {
            discarded: self.discarded.sum(),
            overwritten: self.overwritten.sum(),
            remote_commits: self.remote_commits.sum(),
            abandoned: self.abandoned.sum(),
        }
    }

    #[inline]
    fn header_len(&self) -> usize {
        if self.config.timestamps {
            HEADER + 8
        } else {
            HEADER
        }
    }

    /// Reserves room for a `len`-byte record in the calling thread's CPU's ring.
    ///
    /// # Errors
    ///
    /// [`ReserveError::TooLarge`] when no sub-buffer can hold it;
    /// [`ReserveError::Full`] when the ring is full (the record is counted as
    /// discarded).
    #[inline]
    pub fn reserve(&self, len: usize) -> Result<Reservation<'_>, ReserveError> {
        if len > self.max_payload() {
            return Err(ReserveError::TooLarge {
                len,
                max: self.max_payload(),
            });
        }
        // Cannot overflow: `len` is at most a sub-buffer (2^30).
        let size = self.header_len() + len.next_multiple_of(8);
        let reserved = remote::on_current_cpu(self.rings.len(), |rseq, cpu| {
            let ring = &self.rings[cpu as usize];
            // Relaxed: the sequence compares it again.
            let old = ring.write.load(Ordering::Relaxed);
            let begin = self.placement(old, size);
            if !self.has_room(ring, begin) {
                if self.make_room(ring) {
                    return Attempt::Retry;
                }
                return Attempt::Done(Err(ReserveError::Full));
            }
            // Read just before the sequence (as LTTng reads its clock inside its reserve
            // loop), so a ring's timestamps follow its reservation order unless the
            // thread is preempted in the few instructions between.
            let timestamp = self.config.timestamps.then(monotonic_ns);
            // SAFETY: (1) `rseq` is this thread's area; (2) `write` is written only by
            // sequences expecting this ring's CPU, which check `lock`, and by holders of
            // `lock`, which fence those sequences (crate::remote).
            let outcome = unsafe {
                arch::compare_store_guarded(
                    rseq,
                    ring.lock.guard(),
                    ring.write.as_ptr(),
                    old,
                    begin + size,
                    cpu,
                )
            };
            match outcome {
                Outcome::Committed(()) => Attempt::Done(Ok((cpu as usize, old, begin, timestamp))),
                Outcome::CompareFailed => Attempt::Retry,
                Outcome::Aborted => ring.lock.aborted(),
            }
        });
        match reserved {
            Some(Ok((cpu, old, begin, timestamp))) => {
                Ok(self.reserved(cpu, old, begin, size, len, timestamp))
            }
            Some(Err(full)) => {
                self.discarded.add(1);
                Err(full)
            }
            None => self.reserve_locked(size, len),
        }
    }

    /// The reserve without a sequence: under the CPU's lock.
    #[cold]
    fn reserve_locked(&self, size: usize, len: usize) -> Result<Reservation<'_>, ReserveError> {
        loop {
            let cpu = CpuLock::lock_current(self.rings.len(), |i| &self.rings[i].lock);
            let ring = &self.rings[cpu];
            // Relaxed: we hold the lock, whose Acquire orders the previous writer.
            let old = ring.write.load(Ordering::Relaxed);
            let begin = self.placement(old, size);
            if self.has_room(ring, begin) {
                // Under the lock: in order with every other reservation of this ring.
                let timestamp = self.config.timestamps.then(monotonic_ns);
                ring.write.store(begin + size, Ordering::Relaxed);
                ring.lock.unlock();
                return Ok(self.reserved(cpu, old, begin, size, len, timestamp));
            }
            ring.lock.unlock();
            if !self.make_room(ring) {
                self.discarded.add(1);
                return Err(ReserveError::Full);
            }
        }
    }

    /// Where a `size`-byte record reserved at `old` begins: at `old`, or at the next
    /// sub-buffer when it does not fit in the current one.
    #[inline]
    fn placement(&self, old: usize, size: usize) -> usize {
        let sub = self.config.sub_buffer_size;
        let used = old & (sub - 1);
        if used + size <= sub {
            old
        } else {
            old + (sub - used)
        }
    }

    /// Whether the sub-buffer that `begin` falls in is free (consumed, or never used).
    #[inline]
    fn has_room(&self, ring: &Ring, begin: usize) -> bool {
        let sub = self.config.sub_buffer_size;
        // Acquire: pairs with the consumer's Release when it hands a sub-buffer back,
        // so its reads of that space are over before we write to it.
        let consumed = ring.consumed.load(Ordering::Acquire) & !CLAIMED;
        (begin & !(sub - 1)) + sub <= consumed + self.capacity
    }

    /// In [`Mode::OverwriteOldest`], drops the oldest sub-buffer if it is complete and
    /// unclaimed. Returns whether the producer should try again.
    ///
    /// The drop claims the sub-buffer as a consumer would before counting its records:
    /// once `consumed` moves past it, producers may overwrite it at once, so it must not
    /// be read after that.
    #[cold]
    fn make_room(&self, ring: &Ring) -> bool {
        if self.config.mode != Mode::OverwriteOldest {
            return false;
        }
        // Acquire: see `has_room`.
        let consumed = ring.consumed.load(Ordering::Acquire);
        if consumed & CLAIMED != 0 || !self.is_complete(ring, consumed) {
            // Being read (or dropped by another producer), or still being written.
            return false;
        }
        if !claim(ring, consumed) {
            return true; // it moved: look again
        }
        let mut records = 0;
        self.parse(ring, consumed, |_, _| records += 1);
        // Release: our reads of the sub-buffer are over before producers reuse it.
        ring.consumed
            .store(consumed + self.config.sub_buffer_size, Ordering::Release);
        self.overwritten.add(records);
        true
    }

    /// Writes the headers of a fresh reservation (and of the padding before it).
    #[inline]
    fn reserved(
        &self,
        cpu: usize,
        old: usize,
        begin: usize,
        size: usize,
        len: usize,
        timestamp: Option<u64>,
    ) -> Reservation<'_> {
        let ring = &self.rings[cpu];
        if begin > old {
            // The tail of the previous sub-buffer becomes padding, committed at once.
            // SAFETY: [old, begin) was reserved by us, so no other thread writes to it.
            unsafe { self.write_header(ring, old, KIND_PADDING, begin - old - HEADER, None) };
            self.commit_bytes(cpu, old, begin - old, false);
        }
        // SAFETY: [begin, begin + size) was reserved by us.
        unsafe { self.write_header(ring, begin, KIND_RECORD, len, timestamp) };
        Reservation {
            buffer: self,
            payload: self.at(ring, begin + self.header_len()),
            pos: begin,
            // All three fit: a record is at most one sub-buffer (2^30 bytes).
            cpu: cpu as u32,
            size: size as u32,
            len: len as u32,
        }
    }

    /// Which sub-buffer of its ring position `pos` falls in.
    #[inline]
    fn sub_index(&self, pos: usize) -> usize {
        (pos >> self.sub_shift) & (self.config.sub_buffers - 1)
    }

    /// Address of position `pos` in `ring`.
    #[inline]
    fn at(&self, ring: &Ring, pos: usize) -> *mut u8 {
        let offset = pos & (self.capacity - 1);
        // `data` is capacity/8 words and `offset` is below capacity.
        ring.data
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(offset)
            .cast_mut()
    }

    /// # Safety
    ///
    /// The caller owns `[pos, pos + header_len)` of `ring` (a reservation's bytes).
    unsafe fn write_header(&self, ring: &Ring, pos: usize, kind: u64, len: usize, ts: Option<u64>) {
        let p = self.at(ring, pos).cast::<u64>();
        // SAFETY: `pos` is 8-aligned (positions advance in multiples of 8), inside the
        // ring, and owned by the caller.
        unsafe {
            p.write((kind << KIND_SHIFT) | len as u64);
            if let Some(ts) = ts {
                p.add(1).write(ts);
            }
        }
    }

    /// Adds `bytes` to the commit count of the sub-buffer holding `pos` in `cpu`'s ring:
    /// a restartable add while the thread is on `cpu`, the atomic remote count otherwise.
    #[inline]
    fn commit_bytes(&self, cpu: usize, pos: usize, bytes: usize, count_remote: bool) {
        let ring = &self.rings[cpu];
        let sub = &ring.subs[self.sub_index(pos)];
        // Release: the record's bytes are visible before the count that says they are
        // complete (the consumer loads the counts with Acquire).
        fence(Ordering::Release);
        let local = remote::on_current_cpu(self.rings.len(), |rseq, now| {
            if now as usize != cpu {
                return Attempt::Done(false); // migrated since the reserve: remote commit
            }
            // SAFETY: `commit_local` is written only by this sequence, always expecting
            // the ring's own CPU; readers use atomic loads.
            match unsafe { arch::add(rseq, sub.commit_local.as_ptr(), bytes, now) } {
                Outcome::Committed(()) => Attempt::Done(true),
                _ => Attempt::Aborted,
            }
        });
        if local == Some(true) {
            return;
        }
        // Release: as the fence above, for the consumer's Acquire.
        sub.commit_remote.fetch_add(bytes as u64, Ordering::Release);
        if count_remote {
            self.remote_commits.add(1);
        }
    }

    /// Whether the sub-buffer starting at `pos` (a consumer position) is fully committed.
    fn is_complete(&self, ring: &Ring, pos: usize) -> bool {
        let pos = pos & !CLAIMED;
        let sub = &ring.subs[self.sub_index(pos)];
        let lap = (pos >> self.cap_shift) as u64;
        // Acquire: pairs with the producers' Release before their commits.
        let committed = (sub.commit_local.load(Ordering::Acquire) as u64)
            .wrapping_add(sub.commit_remote.load(Ordering::Acquire));
        committed == (lap + 1) * self.config.sub_buffer_size as u64
    }

    /// Calls `f(timestamp, payload)` for every record of the complete sub-buffer at `pos`.
    fn parse(&self, ring: &Ring, pos: usize, mut f: impl FnMut(Option<u64>, &[u8])) {
        let pos = pos & !CLAIMED;
        let end = pos + self.config.sub_buffer_size;
        let mut at = pos;
        while at < end {
            let p = self.at(ring, at).cast::<u64>();
            // SAFETY: the sub-buffer is complete: every byte in it belongs to a committed
            // record or padding, whose writes the Acquire in `is_complete` made visible,
            // and no reservation can cover it until `consumed` moves past it.
            let header = unsafe { p.read() };
            let len = (header & u64::from(u32::MAX)) as usize;
            match header >> KIND_SHIFT {
                KIND_RECORD => {
                    let timestamp = self.config.timestamps.then(|| {
                        // SAFETY: as above; records with timestamps have one after the
                        // header.
                        unsafe { p.add(1).read() }
                    });
                    let payload = self.at(ring, at + self.header_len());
                    // SAFETY: as above; the payload is `len` bytes inside the sub-buffer.
                    let data = unsafe { core::slice::from_raw_parts(payload, len) };
                    f(timestamp, data);
                    at += self.header_len() + len.next_multiple_of(8);
                }
                KIND_PADDING => at += HEADER + len,
                kind => unreachable!("corrupt ring: kind {kind} at position {at}"),
            }
        }
        debug_assert_eq!(at, end, "records overran their sub-buffer");
    }

    /// Reads every complete sub-buffer of CPU `cpu`'s ring, oldest first, calling `f` on
    /// each record in order, and hands the space back to the producers. Returns the
    /// number of records read. Returns 0 at once if another consumer is reading the ring.
    ///
    /// Records of the sub-buffer being filled are not complete yet: call
    /// [`flush`](RingBuffer::flush) first to hand them over too.
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`cpus`](RingBuffer::cpus).
    pub fn consume(&self, cpu: usize, mut f: impl FnMut(Record<'_>)) -> Result<usize, InvalidCpu> {
        let ring = self.ring(cpu)?;
        let mut read = 0;
        loop {
            // Acquire: see `has_room`.
            let consumed = ring.consumed.load(Ordering::Acquire);
            if consumed & CLAIMED != 0 || !self.is_complete(ring, consumed) {
                return Ok(read);
            }
            if !claim(ring, consumed) {
                continue;
            }
            self.parse(ring, consumed, |timestamp, data| {
                read += 1;
                f(Record {
                    cpu,
                    timestamp,
                    data,
                });
            });
            // Release: our reads are over before producers reuse the space.
            ring.consumed
                .store(consumed + self.config.sub_buffer_size, Ordering::Release);
        }
    }

    /// Closes the sub-buffer CPU `cpu`'s producers are filling, padding its rest, so
    /// that [`consume`](RingBuffer::consume) can read its records. Takes that CPU's lock
    /// as a remote owner (see [`crate::remote`]); producers on that CPU wait for it.
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`cpus`](RingBuffer::cpus).
    pub fn flush(&self, cpu: usize) -> Result<(), InvalidCpu> {
        let ring = self.ring(cpu)?;
        let sub = self.config.sub_buffer_size;
        ring.lock.lock_remote(cpu as u32);
        // Relaxed: we hold the lock.
        let old = ring.write.load(Ordering::Relaxed);
        let used = old & (sub - 1);
        if used != 0 {
            let pad = sub - used;
            ring.write.store(old + pad, Ordering::Relaxed);
            ring.lock.unlock();
            // SAFETY: [old, old + pad) is now reserved by us.
            unsafe { self.write_header(ring, old, KIND_PADDING, pad - HEADER, None) };
            fence(Ordering::Release);
            let s = &ring.subs[self.sub_index(old)];
            // Release: the padding header before the count.
            s.commit_remote.fetch_add(pad as u64, Ordering::Release);
        } else {
            ring.lock.unlock();
        }
        Ok(())
    }

    fn ring(&self, cpu: usize) -> Result<&Ring, InvalidCpu> {
        self.rings.get(cpu).map(|r| &**r).ok_or(InvalidCpu {
            cpu,
            slots: self.rings.len(),
        })
    }

    /// Reserves, copies `data` and commits: one record.
    ///
    /// # Errors
    ///
    /// As for [`reserve`](RingBuffer::reserve).
    #[inline]
    pub fn write(&self, data: &[u8]) -> Result<(), ReserveError> {
        let mut r = self.reserve(data.len())?;
        r.payload_mut().copy_from_slice(data);
        r.commit();
        Ok(())
    }
}

impl fmt::Debug for RingBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingBuffer")
            .field("cpus", &self.rings.len())
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Room for one record in one CPU's ring, reserved and not yet committed. Write the
/// payload, then [`commit`](Reservation::commit) — from any CPU: a thread that migrated
/// since the reserve commits to the reserving CPU's ring through its remote counter.
/// Dropped without a commit, the room is committed as padding (counted in
/// [`RingStats::abandoned`]). Leaked instead (`mem::forget`), it is never committed:
/// its sub-buffer never completes, and the consumer of that CPU's ring stops there for
/// good. Do not leak reservations.
pub struct Reservation<'a> {
    buffer: &'a RingBuffer,
    /// The payload's first byte (computed once, at the reserve).
    payload: *mut u8,
    pos: usize,
    cpu: u32,
    size: u32,
    len: u32,
}

// SAFETY: a reservation owns its bytes exclusively until it commits or drops, from
// whatever thread (a commit from another CPU takes the remote path).
unsafe impl Send for Reservation<'_> {}

impl Reservation<'_> {
    /// The CPU whose ring holds the record.
    pub fn cpu(&self) -> usize {
        self.cpu as usize
    }

    /// The payload's bytes, to fill in (their old contents are unspecified).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        // SAFETY: the reservation owns these `len` bytes until it commits, and `&mut
        // self` makes this the only reference to them.
        unsafe { core::slice::from_raw_parts_mut(self.payload, self.len as usize) }
    }

    /// Publishes the record.
    #[inline]
    pub fn commit(self) {
        self.buffer
            .commit_bytes(self.cpu as usize, self.pos, self.size as usize, true);
        core::mem::forget(self);
    }
}

impl Drop for Reservation<'_> {
    /// Not committed: the room becomes padding, so the consumer never stalls on it.
    fn drop(&mut self) {
        let ring = &self.buffer.rings[self.cpu as usize];
        let padding = self.size as usize - HEADER;
        // SAFETY: the reservation still owns its bytes.
        unsafe {
            self.buffer
                .write_header(ring, self.pos, KIND_PADDING, padding, None)
        };
        self.buffer.abandoned.add(1);
        self.buffer
            .commit_bytes(self.cpu as usize, self.pos, self.size as usize, false);
    }
}

impl fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("cpu", &self.cpu)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Claims the unclaimed sub-buffer at `consumed` for reading: while claimed, no
/// producer can reserve or overwrite it. False when `consumed` moved meanwhile.
fn claim(ring: &Ring, consumed: usize) -> bool {
    // Acquire: pairs with the Release of whoever moved `consumed` last (a consumer or an
    // overwriting producer handing the space back).
    ring.consumed
        .compare_exchange(
            consumed,
            consumed | CLAIMED,
            Ordering::Acquire,
            Ordering::Relaxed,
        )
        .is_ok()
}

/// `CLOCK_MONOTONIC` in nanoseconds (the vDSO: no system call).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live out-parameter; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
