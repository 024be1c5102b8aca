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
//! by the sleeping consumer within [`PENDING_POLL`], and so is a sub-buffer another
//! consumer claimed and hands back (consumers wake nobody: a claim costs them no fence).
//!
//! # Memory
//!
//! All rings live in one mapping that reserves address space and is populated on touch
//! (`MAP_NORESERVE`): a CPU that never runs a producer, and the sub-buffers a ring has
//! not reached yet, cost no memory. The address space reserved is checked up front
//! against [`MAX_RESERVED_BYTES`] and `RLIMIT_AS`, so a configuration too large for the
//! machine is a [`ConfigError`], never an allocation failure that aborts the process.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};

use crate::cache_padded::CachePadded;
use crate::remote::CpuLock;
use crate::sys;
use crate::Counter;

mod config;
mod consume;
mod produce;

pub use config::{ConfigError, Mode, RingConfig, MAX_RESERVED_BYTES, PENDING_POLL};
pub use consume::Record;
#[cfg(feature = "tracing")]
pub(crate) use consume::ReserveMark;
pub use produce::{Reservation, ReserveError};

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

/// Header: two `u32`s. The first is the bytes from this header to the next one (the
/// whole record or padding, a multiple of 8); the second holds the payload length (30
/// bits) and, in its top two bits, the kind. The distance is a word of its own because
/// it is the consumer's critical path: each header's position is known only once the
/// one before it is loaded, so the walk takes a 32-bit load and one add per record. (A
/// payload length there, rounded up to the next header, took three operations more:
/// `cpulocal bench`'s 64-byte ring row, whose producer also consumes, took 8.25 ns per
/// record before this layout and 7.80 with it, on an Intel Xeon, 2026-12-05.)
const HEADER: usize = 8;
const LEN_MASK: u32 = (1 << 30) - 1;
const KIND_SHIFT: u32 = 30;
const KIND_RECORD: u32 = 1;
const KIND_PADDING: u32 = 2;
/// A header: the `kind`, `len` (a payload length, or the bytes of padding after the
/// header) and `size` (the bytes to the next header), as one word to store. Both fit: a
/// sub-buffer is at most 2^30 bytes.
#[inline(always)]
const fn header_word(kind: u32, len: usize, size: usize) -> u64 {
    debug_assert!(len <= LEN_MASK as usize && size <= u32::MAX as usize);
    // The two `u32`s in memory order, as the consumer reads them back, whatever the
    // byte order.
    let [a, b, c, d] = (size as u32).to_ne_bytes();
    let [e, f, g, h] = ((kind << KIND_SHIFT) | len as u32).to_ne_bytes();
    u64::from_ne_bytes([a, b, c, d, e, f, g, h])
}
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
    /// The ring's bytes in the mapping (`capacity` of them, page-aligned), followed by
    /// its `sub_buffers` commit counts ([`SubBuffer`]). Each byte is written by the one
    /// reservation that owns it, and read only after its sub-buffer is complete.
    data: NonNull<u8>,
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
    /// Payloads shorter than this may take the inline reserve: those that fit in a
    /// sub-buffer, or none when records carry timestamps (one bound to check, not two).
    fast_len_end: usize,
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
                // SAFETY: `cpu * stride` is inside the mapping of `cpus * stride` bytes,
                // and so are the `capacity + counters` bytes from there (`stride` is at
                // least that).
                let data = unsafe { base.add(cpu * stride) };
                CachePadded::new(Ring {
                    lock: CpuLock::new(),
                    write: AtomicUsize::new(0),
                    consumed: AtomicUsize::new(0),
                    resume: AtomicUsize::new(0),
                    data,
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
            fast_len_end: if config.timestamps {
                0
            } else {
                sub - HEADER + 1
            },
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

    /// The bytes a record of `len` payload bytes takes: its headers and its payload,
    /// rounded up to 8 (records and padding start 8-aligned).
    #[inline]
    fn record_size(&self, len: usize) -> usize {
        self.header_len() + len.next_multiple_of(8)
    }

    /// Which sub-buffer of its ring position `pos` falls in.
    #[inline]
    fn sub_index(&self, pos: usize) -> usize {
        // The offset in the ring, then its sub-buffer: the same as masking the
        // sub-buffer number, with the mask `at` loads anyway (one field load less on the
        // reserve's fast path).
        (pos & (self.capacity - 1)) >> self.sub_shift
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
        // The counts follow the ring's bytes: one load (`data`) finds both.
        let subs = ring
            .data
            .as_ptr()
            .wrapping_add(self.capacity)
            .cast::<SubBuffer>();
        // `subs` points to `sub_buffers` counters in the mapping (see `new`), which lives
        // as long as `self`, 8-aligned (`capacity` is a multiple of the 64-byte minimum
        // sub-buffer); all-zero bytes (an untouched page) are valid counters.
        // SAFETY: as just said; they are only accessed atomically.
        unsafe { &*subs.add(self.sub_index(pos)) }
    }

    /// # Safety
    ///
    /// The caller owns `[pos, pos + header_len)` of `ring` (a reservation's bytes).
    unsafe fn write_header(&self, ring: &Ring, pos: usize, kind: u32, len: usize, ts: Option<u64>) {
        let p = self.at(ring, pos).cast::<u64>();
        // SAFETY: `pos` is 8-aligned (positions advance in multiples of 8), inside the
        // ring, and owned by the caller.
        unsafe {
            let size = match kind {
                KIND_PADDING => HEADER + len,
                _ => self.record_size(len),
            };
            p.write(header_word(kind, len, size));
            if let Some(ts) = ts {
                p.add(1).write(ts);
            }
        }
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

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of [`Record::timestamp`], for a
/// consumer that measures how old a record is (read through the vDSO: no system call).
///
/// ```
/// use cpulocal::ring::{monotonic_ns, RingBuffer, RingConfig};
///
/// let ring = RingBuffer::new(RingConfig::default()).unwrap();
/// let before = monotonic_ns();
/// ring.write(b"event").unwrap();
/// ring.flush_all();
/// ring.consume_all(|rec| {
///     let stamped = rec.timestamp.unwrap();
///     assert!(before <= stamped && stamped <= monotonic_ns());
/// });
/// ```
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live out-parameter; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
