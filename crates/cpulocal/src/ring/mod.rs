//! `RingBuffer`: per-CPU ring buffers for tracing, with a migration-safe commit.
//!
//! # The protocol
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
//!   atomic add to its `commit_remote` (as proposed on the kernel list for rseq). A `Release`
//!   fence before the add publishes the record's bytes.
//! - The **consumer** sums both counts: a sub-buffer is complete when `commit_local +
//!   commit_remote` reaches the bytes of every lap it has served, `(lap + 1) *
//!   sub_buffer_size`. Only then is it read; no producer waits for the consumer.
//! - The consumer claims the oldest sub-buffer by setting the low bit of the ring's
//!   `consumed` position, reads it, and moves `consumed` past it, handing the space back.
//!   In [`Mode::OverwriteOldest`] a producer short of space moves `consumed` past the
//!   oldest sub-buffer instead (when it is complete and not claimed), counting its
//!   records as overwritten; a claimed sub-buffer is never overwritten, so a reader never
//!   sees bytes change under it.
//! - A consumer whose callback panics hands the claim back with the position of the next
//!   unread record (`resume`), so the next [`consume`](RingBuffer::consume) carries on
//!   there: nothing stays claimed, nothing is read twice.
//!
//! A reservation dropped without [`commit`](Reservation::commit) is committed as padding:
//! the consumer skips it and never stalls.
//!
//! # Who waits
//!
//! A producer's reserve is one restartable compare-and-store and its commit one
//! restartable add (or one atomic add), with no lock taken and no waiting — except in
//! two cases: while a [`flush`](RingBuffer::flush) of its CPU's ring holds that ring's
//! lock (a few dozen instructions), its reserve waits; and after repeated aborts in a
//! row (a debugger single-stepping), or under the
//! [`Scheme::Locked`](crate::remote::Scheme::Locked) scheme, it takes its CPU's lock for
//! the reserve.
//!
//! A consumer can sleep until there is something to read ([`RingBuffer::wait`]). The
//! producer whose commit closes a sub-buffer (fills it to its end) checks, after a
//! `SeqCst` fence, whether a consumer sleeps, and only then bumps the futex word and
//! wakes it; the consumer announces itself (`SeqCst`) before its last look at the rings.
//! So a producer pays one fence per sub-buffer and a system call only when somebody
//! sleeps, and no wake-up is lost. A sub-buffer whose last commit lands after the one
//! that closed it (a producer preempted between its reserve and its commit) is noticed
//! by the sleeping consumer within [`PENDING_POLL`].
//!
//! # Memory
//!
//! All rings live in one mapping that reserves address space and is populated on touch
//! (`MAP_NORESERVE`): a CPU that never runs a producer, and the sub-buffers a ring has
//! not reached yet, cost no memory. The address space reserved is checked up front
//! against [`MAX_RESERVED_BYTES`] and `RLIMIT_AS`, so a configuration too large for the
//! machine is a [`ConfigError`], never an allocation failure that aborts the process.

use core::cell::Cell;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::io;
use std::time::{Duration, Instant};

use crate::arch::{self, Outcome};
use crate::cache_padded::CachePadded;
use crate::remote::{self, Attempt, CpuLock, InvalidCpu};
use crate::sys::{self, Errno};
use crate::Counter;

/// The most address space one [`RingBuffer`] may reserve: 1 TiB (2^40 bytes), all CPUs'
/// rings and their commit counters together. Far below the user address space of a
/// 64-bit Linux process (128 TiB on x86_64 and aarch64 with 4 KiB pages and 48-bit
/// addresses), so one buffer cannot exhaust it; only the pages written become resident.
pub const MAX_RESERVED_BYTES: u64 = 1 << 40;

/// How long a waiting consumer sleeps at most while a sub-buffer is fully reserved but
/// a producer has not committed its record yet (such a last commit wakes nobody).
pub const PENDING_POLL: Duration = Duration::from_millis(1);

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
    /// included) must fit in one. The consumer reads whole sub-buffers: a larger one
    /// means fewer hand-overs, and more records waiting for a [`RingBuffer::flush`].
    pub sub_buffer_size: usize,
    /// Sub-buffers per CPU: a power of two, at least 2 (positions map to sub-buffers
    /// with shifts and masks, never a division). The whole buffer,
    /// `sub_buffer_size * sub_buffers` per possible CPU, must fit in
    /// [`MAX_RESERVED_BYTES`] of address space; only what is written becomes resident.
    pub sub_buffers: usize,
    /// What a full ring does.
    pub mode: Mode,
    /// Whether every record carries a `CLOCK_MONOTONIC` timestamp (8 more bytes).
    pub timestamps: bool,
}

impl Default for RingConfig {
    /// 16 sub-buffers of 64 KiB per CPU (1 MiB of address space per CPU, resident only
    /// where written), discarding when full, with timestamps: room for a logger's
    /// bursts (about 10,000 records of 100 bytes per CPU) between two rounds of a
    /// consumer that wakes every few milliseconds.
    fn default() -> Self {
        RingConfig {
            sub_buffer_size: 64 << 10,
            sub_buffers: 16,
            mode: Mode::DiscardNewest,
            timestamps: true,
        }
    }
}

/// A [`RingConfig`] that cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConfigError {
    /// `sub_buffer_size` is not a power of two from 64 to 2^30.
    SubBufferSize(usize),
    /// `sub_buffers` is not a power of two of at least 2.
    SubBuffers(usize),
    /// The buffer would reserve more than [`MAX_RESERVED_BYTES`] of address space.
    TooLarge {
        /// The bytes of address space the configuration needs (all CPUs).
        bytes: u128,
        /// The possible CPUs, one ring each.
        cpus: usize,
    },
    /// The buffer would reserve more address space than the process's `RLIMIT_AS`.
    OverAddressSpaceLimit {
        /// The bytes of address space the configuration needs (all CPUs).
        bytes: u64,
        /// The soft `RLIMIT_AS`.
        limit: u64,
    },
    /// The kernel refused to reserve the address space (`mmap`: `ENOMEM` under
    /// `vm.overcommit_memory=2`, or no free range that large).
    Map {
        /// The bytes of address space asked for.
        bytes: u64,
        /// The kernel's error.
        errno: Errno,
    },
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
            ConfigError::TooLarge { bytes, cpus } => write!(
                f,
                "the rings of {cpus} CPUs need {bytes} bytes of address space, more than the \
                 limit of {MAX_RESERVED_BYTES} (2^40) bytes per ring buffer: use fewer or \
                 smaller sub-buffers"
            ),
            ConfigError::OverAddressSpaceLimit { bytes, limit } => write!(
                f,
                "the rings need {bytes} bytes of address space, more than this process's \
                 RLIMIT_AS of {limit} bytes"
            ),
            ConfigError::Map { bytes, errno } => write!(
                f,
                "the kernel refused to reserve {bytes} bytes of address space for the rings \
                 ({errno})"
            ),
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
    /// Flushes that closed a partly filled sub-buffer (flushes of an empty or exactly
    /// full one write nothing and are not counted).
    pub flushes: u64,
    /// Bytes of padding those flushes wrote: ring space that held no record. A consumer
    /// that flushes often, with large sub-buffers, wastes much of its ring here.
    pub flush_padding_bytes: u64,
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

/// The commit counts of one sub-buffer. Lives in the lazily populated mapping: all-zero
/// bytes are its initial value.
#[repr(C)]
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
    /// Where reading resumes inside the sub-buffer at `consumed` after a consumer's
    /// callback panicked; meaningful only while strictly inside that sub-buffer (stale
    /// values are behind `consumed`). Written by the claim holder only.
    resume: AtomicUsize,
    /// The ring's bytes in the mapping (`capacity` of them, page-aligned). Each byte is
    /// written by the one reservation that owns it, and read only after its sub-buffer
    /// is complete.
    data: NonNull<u8>,
    /// The ring's `sub_buffers` commit counts, in the mapping after `data`.
    subs: NonNull<SubBuffer>,
}

/// The lock of a ring, held: released when dropped, also on unwind.
struct Held<'a>(&'a CpuLock);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

/// The futex word and sleeper count through which consumers wait.
#[derive(Default)]
struct Waiters {
    /// Bumped by every wake-up; consumers sleep while it keeps the value they read.
    epoch: AtomicU32,
    /// Consumers announced in [`RingBuffer::wait`].
    sleepers: AtomicU32,
}

/// The mapping that holds every ring's bytes and counters; unmapped when dropped.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is our mapping from `sys::map_lazy`; the buffer that
        // owns it (and every reservation, which borrows the buffer) is gone.
        unsafe { sys::unmap(self.base, self.len) };
    }
}

/// Per-CPU ring buffers of variable-length records, for tracers, loggers and metrics
/// exporters: a producer reserves and commits with restartable sequences on its CPU's
/// ring (it waits only while a [`flush`](RingBuffer::flush) of that ring runs, see
/// [Who waits](self#who-waits)); a consumer reads complete records per CPU, in order,
/// while they keep writing, and can sleep until there are some
/// ([`wait`](RingBuffer::wait)).
///
/// No poisoning: a panic in a [`consume`](RingBuffer::consume) callback or while a
/// [`Reservation`] is open leaves the buffer consistent and usable (like `parking_lot`,
/// not like `std::sync::Mutex`).
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
/// ring.flush_all(); // hand over the partly filled sub-buffers too
/// ring.consume_all(|rec| seen.push(rec.data.to_vec()));
/// seen.sort();
/// assert_eq!(seen, [b"hello".to_vec(), b"world".to_vec()]);
/// ```
pub struct RingBuffer {
    rings: Box<[CachePadded<Ring>]>,
    waiters: CachePadded<Waiters>,
    /// Owns the memory `rings` point into; dropped after them.
    _mapping: Mapping,
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
    flushes: Counter,
    flush_padding_bytes: Counter,
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
    /// bytes of address space, populated as producers write (see [Memory](self#memory)).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the sizes are out of range, or the rings of all possible
    /// CPUs would need more than [`MAX_RESERVED_BYTES`] of address space, more than the
    /// process's `RLIMIT_AS`, or more than the kernel grants. Never aborts the process.
    ///
    /// ```
    /// use cpulocal::ring::{ConfigError, RingBuffer, RingConfig};
    /// let bad = RingConfig { sub_buffer_size: 100, ..RingConfig::default() };
    /// assert_eq!(RingBuffer::new(bad).err(), Some(ConfigError::SubBufferSize(100)));
    ///
    /// // 2^20 sub-buffers of 1 GiB per CPU: refused, with the reason.
    /// let huge = RingConfig { sub_buffer_size: 1 << 30, sub_buffers: 1 << 20, ..RingConfig::default() };
    /// assert!(matches!(RingBuffer::new(huge), Err(ConfigError::TooLarge { .. })));
    /// ```
    pub fn new(config: RingConfig) -> Result<Self, ConfigError> {
        let sub = config.sub_buffer_size;
        if !sub.is_power_of_two() || !(64..=1 << 30).contains(&sub) {
            return Err(ConfigError::SubBufferSize(sub));
        }
        if config.sub_buffers < 2 || !config.sub_buffers.is_power_of_two() {
            return Err(ConfigError::SubBuffers(config.sub_buffers));
        }
        let cpus = sys::possible_cpus();
        let page = sys::page_size() as u128;
        // In u128: no product of two usizes (and a CPU count) overflows it.
        let capacity = sub as u128 * config.sub_buffers as u128;
        let counters = config.sub_buffers as u128 * core::mem::size_of::<SubBuffer>() as u128;
        let stride = (capacity + counters).next_multiple_of(page);
        let bytes = stride * cpus as u128;
        if bytes > u128::from(MAX_RESERVED_BYTES) {
            return Err(ConfigError::TooLarge { bytes, cpus });
        }
        // All fit in a u64 and a usize (64-bit targets only) from here on.
        let bytes = bytes as u64;
        if let Some(limit) = sys::address_space_limit() {
            if bytes > limit {
                return Err(ConfigError::OverAddressSpaceLimit { bytes, limit });
            }
        }
        let (capacity, stride) = (capacity as usize, stride as usize);
        let base =
            sys::map_lazy(bytes as usize).map_err(|errno| ConfigError::Map { bytes, errno })?;
        let mapping = Mapping {
            base,
            len: bytes as usize,
        };
        let rings = (0..cpus)
            .map(|cpu| {
                // SAFETY: `cpu * stride + capacity` is inside the mapping of
                // `cpus * stride` bytes (and `stride >= capacity + counters`).
                let (data, subs) = unsafe {
                    let data = base.add(cpu * stride);
                    (data, data.add(capacity).cast::<SubBuffer>())
                };
                CachePadded::new(Ring {
                    lock: CpuLock::new(),
                    write: AtomicUsize::new(0),
                    consumed: AtomicUsize::new(0),
                    resume: AtomicUsize::new(0),
                    data,
                    subs,
                })
            })
            .collect();
        Ok(RingBuffer {
            rings,
            waiters: CachePadded::new(Waiters::default()),
            _mapping: mapping,
            config,
            capacity,
            sub_shift: sub.trailing_zeros(),
            cap_shift: capacity.trailing_zeros(),
            discarded: Counter::new(),
            overwritten: Counter::new(),
            remote_commits: Counter::new(),
            abandoned: Counter::new(),
            flushes: Counter::new(),
            flush_padding_bytes: Counter::new(),
        })
    }

    /// The configuration the buffer was built with.
    pub fn config(&self) -> RingConfig {
        self.config
    }

    /// The number of rings (the possible CPUs): every CPU number below it is valid. The
    /// same name as [`PerCpu::slots`](crate::PerCpu::slots).
    pub fn slots(&self) -> usize {
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
            flushes: self.flushes.sum(),
            flush_padding_bytes: self.flush_padding_bytes.sum(),
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
            let held = Held(&ring.lock);
            // Relaxed: we hold the lock, whose Acquire orders the previous writer.
            let old = ring.write.load(Ordering::Relaxed);
            let begin = self.placement(old, size);
            if self.has_room(ring, begin) {
                // Under the lock: in order with every other reservation of this ring.
                let timestamp = self.config.timestamps.then(monotonic_ns);
                ring.write.store(begin + size, Ordering::Relaxed);
                drop(held);
                return Ok(self.reserved(cpu, old, begin, size, len, timestamp));
            }
            drop(held);
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
        let from = resume_point(ring, consumed, self.config.sub_buffer_size);
        self.parse(ring, consumed, from, |_, _, _| records += 1);
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
            // All four fit: a record is at most one sub-buffer (2^30 bytes).
            cpu: cpu as u32,
            size: size as u32,
            len: len as u32,
            written: 0,
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
        // `data` is `capacity` bytes and `offset` is below capacity.
        ring.data.as_ptr().wrapping_add(offset)
    }

    /// The commit counts of the sub-buffer holding position `pos` in `ring`.
    #[inline]
    fn sub(&self, ring: &Ring, pos: usize) -> &SubBuffer {
        // SAFETY: `subs` points to `sub_buffers` counters in the mapping, which lives as
        // long as `self`; all-zero bytes (an untouched page) are valid counters, and
        // they are only accessed atomically.
        unsafe { &*ring.subs.as_ptr().add(self.sub_index(pos)) }
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
        self.add_commit(cpu, pos, bytes, count_remote);
        if (pos + bytes) & (self.config.sub_buffer_size - 1) == 0 {
            self.sub_buffer_closed();
        }
    }

    /// The add of [`commit_bytes`](Self::commit_bytes).
    #[inline]
    fn add_commit(&self, cpu: usize, pos: usize, bytes: usize, count_remote: bool) {
        let ring = &self.rings[cpu];
        let sub = self.sub(ring, pos);
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

    /// A commit filled a sub-buffer to its end: wakes the consumers sleeping in
    /// [`wait`](Self::wait), if any. Once per sub-buffer, so off the fast path.
    #[cold]
    fn sub_buffer_closed(&self) {
        // SeqCst: with the consumer's SeqCst increment of `sleepers` before its last
        // look at the rings (Dekker): either we see it sleeping, or it sees our commit.
        fence(Ordering::SeqCst);
        if self.waiters.sleepers.load(Ordering::Relaxed) != 0 {
            self.wake_all();
        }
    }

    fn wake_all(&self) {
        // Release: a consumer that sees the new epoch sees the commits before it.
        self.waiters.epoch.fetch_add(1, Ordering::Release);
        sys::futex_wake(&self.waiters.epoch, i32::MAX);
    }

    /// Whether the sub-buffer starting at `pos` (a consumer position) is fully committed.
    fn is_complete(&self, ring: &Ring, pos: usize) -> bool {
        let pos = pos & !CLAIMED;
        let sub = self.sub(ring, pos);
        let lap = (pos >> self.cap_shift) as u64;
        // Acquire: pairs with the producers' Release before their commits.
        let committed = (sub.commit_local.load(Ordering::Acquire) as u64)
            .wrapping_add(sub.commit_remote.load(Ordering::Acquire));
        committed == (lap + 1) * self.config.sub_buffer_size as u64
    }

    /// Calls `f(next, timestamp, payload)` for every record of the complete sub-buffer
    /// at `pos`, from position `from` on (a record boundary inside it), where `next` is
    /// the position after the record.
    fn parse(
        &self,
        ring: &Ring,
        pos: usize,
        from: usize,
        mut f: impl FnMut(usize, Option<u64>, &[u8]),
    ) {
        let pos = pos & !CLAIMED;
        let end = pos + self.config.sub_buffer_size;
        debug_assert!((pos..=end).contains(&from));
        let mut at = from;
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
                    at += self.header_len() + len.next_multiple_of(8);
                    f(at, timestamp, data);
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
    /// If `f` panics, the panic propagates after the ring is handed back: the record `f`
    /// was called with counts as read, and the next `consume` of the ring delivers the
    /// records after it (nothing stays claimed, nothing is delivered twice).
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`slots`](RingBuffer::slots).
    ///
    /// ```
    /// use cpulocal::ring::{RingBuffer, RingConfig};
    /// use std::panic::{catch_unwind, AssertUnwindSafe};
    ///
    /// let ring = RingBuffer::new(RingConfig::default()).unwrap();
    /// let cpu = {
    ///     let r = ring.reserve(1).unwrap();
    ///     let cpu = r.cpu();
    ///     r.commit();
    ///     cpu
    /// };
    /// ring.write(b"x").unwrap(); // usually the same CPU; a migration only splits them
    /// ring.flush_all();
    /// let panicked = catch_unwind(AssertUnwindSafe(|| {
    ///     ring.consume(cpu, |_| panic!("a bad record")).unwrap();
    /// }));
    /// assert!(panicked.is_err());
    /// assert_eq!(ring.consume_all(|_| {}), 1); // the record after the one that panicked
    /// ```
    pub fn consume(&self, cpu: usize, mut f: impl FnMut(Record<'_>)) -> Result<usize, InvalidCpu> {
        let ring = self.ring(cpu)?;
        Ok(self.consume_ring(cpu, ring, &mut f))
    }

    /// [`consume`](RingBuffer::consume) of every CPU's ring, in CPU order: for a consumer
    /// that reads everything (with [`flush_all`](RingBuffer::flush_all) first, when it
    /// wants the records of the sub-buffers being filled too). Returns the records read.
    ///
    /// Records come in order per CPU; merge by [`Record::timestamp`] for one order
    /// across CPUs.
    ///
    /// ```
    /// use cpulocal::ring::{RingBuffer, RingConfig};
    ///
    /// let ring = RingBuffer::new(RingConfig::default()).unwrap();
    /// ring.write(b"one").unwrap();
    /// ring.write(b"two").unwrap();
    /// ring.flush_all();
    /// let mut seen = Vec::new();
    /// assert_eq!(ring.consume_all(|r| seen.push(r.data.to_vec())), 2);
    /// assert_eq!(seen.len(), 2);
    /// assert_eq!(ring.consume_all(|_| {}), 0); // nothing twice
    /// ```
    pub fn consume_all(&self, mut f: impl FnMut(Record<'_>)) -> usize {
        let mut read = 0;
        for (cpu, ring) in self.rings.iter().enumerate() {
            read += self.consume_ring(cpu, ring, &mut f);
        }
        read
    }

    /// [`consume`](RingBuffer::consume) of `cpu`'s ring, `ring`.
    fn consume_ring(&self, cpu: usize, ring: &Ring, f: &mut impl FnMut(Record<'_>)) -> usize {
        let sub = self.config.sub_buffer_size;
        let mut read = 0;
        loop {
            // Acquire: see `has_room`.
            let consumed = ring.consumed.load(Ordering::Acquire);
            if consumed & CLAIMED != 0 || !self.is_complete(ring, consumed) {
                return read;
            }
            if !claim(ring, consumed) {
                continue;
            }
            let from = resume_point(ring, consumed, sub);
            // Hands the sub-buffer back when dropped, also if `f` panics.
            let reading = Claimed {
                ring,
                start: consumed,
                end: consumed + sub,
                next: Cell::new(from),
            };
            self.parse(ring, consumed, from, |next, timestamp, data| {
                reading.next.set(next);
                read += 1;
                f(Record {
                    cpu,
                    timestamp,
                    data,
                });
            });
            reading.next.set(reading.end); // read to its end: `reading` moves past it
        }
    }

    /// Whether some CPU's ring has a complete sub-buffer no consumer is reading.
    fn has_complete(&self) -> bool {
        self.rings.iter().any(|ring| {
            // Acquire: see `has_room`.
            let consumed = ring.consumed.load(Ordering::Acquire);
            consumed & CLAIMED == 0 && self.is_complete(ring, consumed)
        })
    }

    /// Whether some CPU's oldest unread sub-buffer is fully reserved but not yet fully
    /// committed: a producer is between its reserve and its commit.
    fn has_pending(&self) -> bool {
        let sub = self.config.sub_buffer_size;
        self.rings.iter().any(|ring| {
            let consumed = ring.consumed.load(Ordering::Acquire) & !CLAIMED;
            // Relaxed: a hint for the length of the sleep.
            ring.write.load(Ordering::Relaxed) >= consumed + sub
                && !self.is_complete(ring, consumed)
        })
    }

    /// Sleeps until some CPU's ring has a complete sub-buffer to
    /// [`consume`](RingBuffer::consume), `timeout` passes, or [`notify`](Self::notify)
    /// is called. Returns whether a complete sub-buffer is there (`false`: timed out or
    /// notified). Without a system call when one is there already.
    ///
    /// Producers wake a sleeping consumer when a commit fills a sub-buffer; records in
    /// the sub-buffer being filled are not "there" until a [`flush`](Self::flush), so a
    /// consumer loop flushes on timeout (its latency bound). Producers pay nothing for
    /// this while nobody sleeps but one fence per sub-buffer (see
    /// [Who waits](self#who-waits)).
    ///
    /// ```
    /// use cpulocal::ring::{RingBuffer, RingConfig};
    /// use std::time::Duration;
    ///
    /// let ring = RingBuffer::new(RingConfig { sub_buffer_size: 64, ..RingConfig::default() }).unwrap();
    /// assert!(!ring.wait(Duration::from_millis(1))); // nothing yet: times out
    /// std::thread::scope(|s| {
    ///     s.spawn(|| {
    ///         // A record of 8 bytes takes 24 (its header and timestamp take 16): the
    ///         // third does not fit in a 64-byte sub-buffer, so its reserve pads and
    ///         // closes the first one, and that commit wakes the consumer.
    ///         for _ in 0..4 {
    ///             ring.write(b"12345678").unwrap();
    ///         }
    ///     });
    ///     while !ring.wait(Duration::from_secs(10)) {}
    /// });
    /// assert!(ring.consume_all(|_| {}) >= 2);
    /// ```
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        // Acquire: pairs with the Release of `wake_all`.
        let epoch = self.waiters.epoch.load(Ordering::Acquire);
        loop {
            if self.has_complete() {
                return true;
            }
            // SeqCst: see `sub_buffer_closed`. Announced before the last look.
            self.waiters.sleepers.fetch_add(1, Ordering::SeqCst);
            let ready = self.has_complete();
            let now = Instant::now();
            let left = deadline.map(|d| d.saturating_duration_since(now));
            if ready || left == Some(Duration::ZERO) {
                self.waiters.sleepers.fetch_sub(1, Ordering::Relaxed);
                return ready;
            }
            let sleep = if self.has_pending() {
                Some(left.map_or(PENDING_POLL, |l| l.min(PENDING_POLL)))
            } else {
                left
            };
            sys::futex_wait(&self.waiters.epoch, epoch, sleep);
            self.waiters.sleepers.fetch_sub(1, Ordering::Relaxed);
            // Acquire: as above.
            if self.waiters.epoch.load(Ordering::Acquire) != epoch {
                // Woken by a producer or `notify`: report what is there now.
                return self.has_complete();
            }
        }
    }

    /// Wakes every consumer sleeping in [`wait`](Self::wait) (which then returns,
    /// `false` if there is nothing to read): for shutdown, or to make a consumer flush.
    ///
    /// ```
    /// use cpulocal::ring::{RingBuffer, RingConfig};
    /// use std::time::Duration;
    ///
    /// let ring = RingBuffer::new(RingConfig::default()).unwrap();
    /// std::thread::scope(|s| {
    ///     let consumer = s.spawn(|| ring.wait(Duration::from_secs(3600)));
    ///     std::thread::sleep(Duration::from_millis(10));
    ///     ring.notify();
    ///     // the consumer may have started waiting after the notify: wake it again.
    ///     while !consumer.is_finished() {
    ///         std::thread::sleep(Duration::from_millis(10));
    ///         ring.notify();
    ///     }
    ///     assert!(!consumer.join().unwrap());
    /// });
    /// ```
    pub fn notify(&self) {
        self.wake_all();
    }

    /// Closes the sub-buffer CPU `cpu`'s producers are filling, padding its rest, so
    /// that [`consume`](RingBuffer::consume) can read its records. Takes that CPU's lock
    /// as a remote owner (see [`crate::remote`]); producers on that CPU wait for it.
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`slots`](RingBuffer::slots).
    pub fn flush(&self, cpu: usize) -> Result<(), InvalidCpu> {
        let ring = self.ring(cpu)?;
        self.flush_ring(cpu, ring);
        Ok(())
    }

    /// [`flush`](RingBuffer::flush) of every CPU's ring, so that
    /// [`consume_all`](RingBuffer::consume_all) reads every record committed so far.
    pub fn flush_all(&self) {
        for (cpu, ring) in self.rings.iter().enumerate() {
            self.flush_ring(cpu, ring);
        }
    }

    /// [`flush`](RingBuffer::flush) of `cpu`'s ring, `ring`.
    fn flush_ring(&self, cpu: usize, ring: &Ring) {
        let sub = self.config.sub_buffer_size;
        ring.lock.lock_remote(cpu as u32);
        let held = Held(&ring.lock);
        // Relaxed: we hold the lock.
        let old = ring.write.load(Ordering::Relaxed);
        let used = old & (sub - 1);
        if used == 0 {
            return; // nothing open: the sub-buffer is empty or exactly full
        }
        let pad = sub - used;
        ring.write.store(old + pad, Ordering::Relaxed);
        drop(held);
        // SAFETY: [old, old + pad) is now reserved by us.
        unsafe { self.write_header(ring, old, KIND_PADDING, pad - HEADER, None) };
        fence(Ordering::Release);
        // Release: the padding header before the count.
        self.sub(ring, old)
            .commit_remote
            .fetch_add(pad as u64, Ordering::Release);
        self.flushes.add(1);
        self.flush_padding_bytes.add(pad as u64);
        self.sub_buffer_closed();
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

    /// Reserves `max_len` bytes, lets `fill` write the record into them in place, and
    /// commits the first `n` bytes, `n` being what `fill` returns (the rest of the room
    /// becomes padding). Returns `n`.
    ///
    /// If `fill` panics, the reservation is abandoned (committed as padding, counted in
    /// [`RingStats::abandoned`]) and the panic propagates: the ring stays usable.
    ///
    /// # Errors
    ///
    /// As for [`reserve`](RingBuffer::reserve) of `max_len` bytes.
    ///
    /// # Panics
    ///
    /// If `fill` returns more than `max_len`.
    ///
    /// ```
    /// use cpulocal::ring::{RingBuffer, RingConfig};
    /// use std::io::Write;
    ///
    /// let ring = RingBuffer::new(RingConfig::default()).unwrap();
    /// ring.write_with(64, |buf| {
    ///     let mut cursor = &mut buf[..];
    ///     write!(cursor, "request {} took {} us", 17, 250).unwrap();
    ///     64 - cursor.len()
    /// })
    /// .unwrap();
    /// let mut got = Vec::new();
    /// ring.flush_all();
    /// ring.consume_all(|rec| got.push(rec.data.to_vec()));
    /// assert_eq!(got, [b"request 17 took 250 us".to_vec()]);
    /// ```
    pub fn write_with(
        &self,
        max_len: usize,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, ReserveError> {
        let mut r = self.reserve(max_len)?;
        let n = fill(r.payload_mut());
        assert!(
            n <= max_len,
            "write_with: the closure returned {n}, more than the {max_len} bytes reserved"
        );
        r.truncate(n);
        r.commit();
        Ok(n)
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
/// payload ([`payload_mut`](Reservation::payload_mut), or [`io::Write`], which fills it
/// from the start), then [`commit`](Reservation::commit) — from any CPU: a thread that
/// migrated since the reserve commits to the reserving CPU's ring through its remote
/// counter. [`truncate`](Reservation::truncate) publishes fewer bytes than reserved.
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
    /// Bytes written through [`io::Write`], from the payload's start.
    written: u32,
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

    /// The payload's length: what [`commit`](Self::commit) publishes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes written so far through [`io::Write`].
    pub fn written(&self) -> usize {
        self.written as usize
    }

    /// Shortens the payload to its first `len` bytes (no effect if it is not longer);
    /// the rest of the room becomes padding, which the consumer skips.
    ///
    /// ```
    /// use cpulocal::ring::{RingBuffer, RingConfig};
    /// use std::io::Write;
    ///
    /// let ring = RingBuffer::new(RingConfig::default()).unwrap();
    /// let mut r = ring.reserve(100).unwrap();
    /// let (name, n) = ("a", 1);
    /// write!(r, "{name}-{n}").unwrap();
    /// let n = r.written();
    /// r.truncate(n);
    /// r.commit();
    /// let mut got = Vec::new();
    /// ring.flush_all();
    /// ring.consume_all(|rec| got.push(rec.data.to_vec()));
    /// assert_eq!(got, [b"a-1".to_vec()]);
    /// ```
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len as usize {
            return;
        }
        let buffer = self.buffer;
        let ring = &buffer.rings[self.cpu as usize];
        let record = buffer.header_len() + len.next_multiple_of(8);
        let rest = self.size as usize - record;
        // SAFETY: the reservation owns [pos, pos + size): the header word (the timestamp
        // after it is kept: `None` leaves it), and the padding header at `pos + record`,
        // which is 8-aligned and, `rest` being a non-zero multiple of 8, inside the room.
        unsafe {
            buffer.write_header(ring, self.pos, KIND_RECORD, len, None);
            if rest > 0 {
                buffer.write_header(ring, self.pos + record, KIND_PADDING, rest - HEADER, None);
            }
        }
        self.len = len as u32;
        self.written = self.written.min(self.len);
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

/// Writes into the payload from its start, as a cursor: a write past the payload's end
/// writes what fits (0 bytes when full, so `write_all` fails with
/// [`io::ErrorKind::WriteZero`]). [`commit`](Reservation::commit) still publishes the
/// whole payload: [`truncate`](Reservation::truncate) it to
/// [`written`](Reservation::written) first to publish only what was written.
impl io::Write for Reservation<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = self.written as usize;
        let payload = self.payload_mut();
        let n = buf.len().min(payload.len() - start);
        payload[start..start + n].copy_from_slice(&buf[..n]);
        // Fits: at most `len`, a u32.
        self.written += n as u32;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

/// A sub-buffer claimed by a consumer, handed back when dropped: moved past when read to
/// its end, otherwise (a callback panicked) released with `resume` set to the next
/// unread record.
struct Claimed<'a> {
    ring: &'a Ring,
    /// The sub-buffer's start (the claimed `consumed` value, without [`CLAIMED`]).
    start: usize,
    end: usize,
    /// The position after the last record handed to the callback.
    next: Cell<usize>,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        let next = self.next.get();
        if next >= self.end {
            // Release: our reads are over before producers reuse the space.
            self.ring.consumed.store(self.end, Ordering::Release);
        } else {
            // Relaxed: published by the Release store below, to the next claimer's
            // Acquire.
            self.ring.resume.store(next, Ordering::Relaxed);
            // Release: as above; the sub-buffer stays unread from `next` on.
            self.ring.consumed.store(self.start, Ordering::Release);
        }
    }
}

/// Where reading of the sub-buffer at `consumed` starts: its beginning, or where a
/// consumer whose callback panicked stopped.
fn resume_point(ring: &Ring, consumed: usize, sub_buffer_size: usize) -> usize {
    let start = consumed & !CLAIMED;
    // Relaxed: written before the Release that handed the claim back; our claim's
    // Acquire pairs with it.
    let resume = ring.resume.load(Ordering::Relaxed);
    if resume > start && resume < start + sub_buffer_size {
        resume
    } else {
        start
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
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live out-parameter; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
