//! The shape of a [`RingBuffer`](super::RingBuffer): [`RingConfig`], [`Mode`], the limits
//! a configuration is checked against, and [`ConfigError`].

use core::fmt;
use std::time::Duration;

use crate::sys::Errno;

/// The most address space one [`RingBuffer`] may reserve: 1 TiB (2^40 bytes), all CPUs'
/// rings and their commit counters together. Far below the user address space of a
/// 64-bit Linux process (128 TiB on x86_64 and aarch64 with 4 KiB pages and 48-bit
/// addresses), so one buffer cannot exhaust it; only the pages written become resident.
///
/// [`RingBuffer`]: super::RingBuffer
pub const MAX_RESERVED_BYTES: u64 = 1 << 40;

/// How long a waiting consumer sleeps at most while a sub-buffer is fully reserved but
/// a producer has not committed its record yet (such a last commit wakes nobody), or
/// while another consumer claims the oldest unread sub-buffer (handing it back wakes
/// nobody).
pub const PENDING_POLL: Duration = Duration::from_millis(1);

/// What a full ring does with a new record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Refuse the new record ([`ReserveError::Full`]) and count it as discarded.
    ///
    /// [`ReserveError::Full`]: super::ReserveError::Full
    #[default]
    DiscardNewest,
    /// Drop the oldest complete sub-buffer that no consumer is reading, counting its
    /// records as overwritten; refuse (and count as discarded) only when that is not
    /// possible: the oldest sub-buffer is being read (or dropped by another producer),
    /// or still has uncommitted records.
    OverwriteOldest,
}

/// The shape of a [`RingBuffer`](super::RingBuffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingConfig {
    /// Bytes per sub-buffer: a power of two from 64 to 2^30. A record (header
    /// included) must fit in one. The consumer reads whole sub-buffers: a larger one
    /// means fewer hand-overs, and more records waiting for a [`RingBuffer::flush`].
    ///
    /// [`RingBuffer::flush`]: super::RingBuffer::flush
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
