//! The producer side: reserve (a restartable compare-and-store on the CPU's ring, or
//! under its lock), [`Reservation`], and the commit (a restartable add, or a remote atomic
//! add after a migration) that wakes sleeping consumers when it closes a sub-buffer.

use core::fmt;
use core::sync::atomic::{fence, Ordering};
use std::io;

use super::consume::{claim, resume_point};
use super::{
    header_word, monotonic_ns, Held, Mode, Ring, RingBuffer, SubBuffer, CLAIMED, HEADER,
    KIND_PADDING, KIND_RECORD,
};
use crate::arch::{self, Outcome};
use crate::remote::{self, Attempt, CpuLock};
use crate::sys;

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

/// What [`RingBuffer::reserve_slow`] returns: two words, so that they come back in
/// registers. `cpu` is [`CPU_FULL`] or [`CPU_TOO_LARGE`] for the errors.
struct SlowReserve {
    pos: usize,
    cpu: usize,
}

/// [`SlowReserve::cpu`] for [`ReserveError::Full`] (no CPU has this number).
const CPU_FULL: usize = usize::MAX;
/// [`SlowReserve::cpu`] for [`ReserveError::TooLarge`].
const CPU_TOO_LARGE: usize = usize::MAX - 1;

impl SlowReserve {
    const FULL: SlowReserve = SlowReserve {
        pos: 0,
        cpu: CPU_FULL,
    };
    const TOO_LARGE: SlowReserve = SlowReserve {
        pos: 0,
        cpu: CPU_TOO_LARGE,
    };
}

impl RingBuffer {
    /// Reserves room for a `len`-byte record in the calling thread's CPU's ring.
    ///
    /// # Errors
    ///
    /// [`ReserveError::TooLarge`] when no sub-buffer can hold it;
    /// [`ReserveError::Full`] when the ring is full (the record is counted as
    /// discarded).
    #[inline(always)]
    pub fn reserve(&self, len: usize) -> Result<Reservation<'_>, ReserveError> {
        // The common case inline, everything else (a sub-buffer boundary, a full ring,
        // timestamps, an abort, the first use) out of line: the inline part is one
        // sequence and a header store, with no loop or result plumbing to spill around.
        if let Some(r) = self.try_reserve_fast(len) {
            return Ok(r);
        }
        // The out-of-line path returns two words, in registers, and the reservation is
        // made here: had it returned the reservation (through memory), the inline path's
        // would go through memory too, to meet it.
        let SlowReserve { pos, cpu } = self.reserve_slow(len);
        match cpu {
            CPU_FULL => Err(ReserveError::Full),
            CPU_TOO_LARGE => Err(ReserveError::TooLarge {
                len,
                max: self.max_payload(),
            }),
            _ => Ok(self.reservation(cpu, pos, len)),
        }
    }

    /// The reservation of the `len`-byte record at `pos` in `cpu`'s ring, whose headers
    /// are written, made out of line: its commit takes the out-of-line path too.
    #[inline(always)]
    fn reservation(&self, cpu: usize, pos: usize, len: usize) -> Reservation<'_> {
        let ring = &self.rings[cpu];
        Reservation {
            buffer: self,
            payload: self.at(ring, pos + self.header_len()),
            counts: self.sub(ring, pos),
            // All three fit: a record is at most one sub-buffer (2^30 bytes).
            cpu: cpu as u32,
            size_and_flag: self.record_size(len) as u32,
            len: len as u32,
            written: 0,
        }
    }

    /// One attempt at the common reserve: a record without timestamp that fits in the
    /// current sub-buffer, which has room; `None` for everything else, which
    /// [`reserve_slow`](Self::reserve_slow) handles from scratch.
    #[inline(always)]
    fn try_reserve_fast(&self, len: usize) -> Option<Reservation<'_>> {
        let fast_len_end = self.fast_len_end;
        if len >= fast_len_end {
            return None;
        }
        // `sub_buffer_size`, derived from the bound just loaded rather than loaded too:
        // the bound is `sub - HEADER + 1` whenever this point is reached.
        let sub = fast_len_end + HEADER - 1;
        debug_assert_eq!(sub, self.config.sub_buffer_size);
        let rseq = remote::fast_path_area()?;
        let cpu = crate::cpu::cpu_id_start(rseq) as usize;
        let ring = self.rings.get(cpu)?;
        // `record_size` without its timestamp test: this path runs only without
        // timestamps (`fast_len_end` is 0 otherwise). Cannot overflow: `len` is below a
        // sub-buffer (2^30).
        let size = HEADER + len.next_multiple_of(8);
        debug_assert_eq!(size, self.record_size(len));
        // Relaxed: the sequence compares it again.
        let old = ring.write.load(Ordering::Relaxed);
        // The record fits in the sub-buffer of `old` (else it moves on: out of line), and
        // that sub-buffer is free. Only a record that opens a sub-buffer looks at the
        // consumer's position: one inside it follows a reservation that opened it after
        // that look (every path that moves `write` into a sub-buffer does it), and the
        // consumer's position only moves on, so the sub-buffer is still free. (That look's
        // Acquire was on this CPU's ring, by a sequence or under its lock, before the
        // reservations that followed on this CPU, so it also orders our writes after the
        // consumer's last reads.)
        let used = old & (sub - 1);
        let end_in_sub = used + size;
        if end_in_sub > sub || (used == 0 && !self.has_room_cold(ring, old)) {
            return None;
        }
        // Before the sequence, whose memory clobber would make the compiler load the
        // buffer's fields again after it.
        let record = self.at(ring, old);
        let counts = self.sub(ring, old);
        // SAFETY: as in `reserve_slow`.
        let outcome = unsafe {
            arch::compare_store_guarded(
                rseq.as_ptr(),
                ring.lock.guard(),
                ring.write.as_ptr(),
                old,
                old + size,
                cpu as u32,
            )
        };
        if outcome != Outcome::Committed(()) {
            return None;
        }
        // SAFETY: [old, old + size) was reserved by us; `old` is 8-aligned.
        unsafe {
            record
                .cast::<u64>()
                .write(header_word(KIND_RECORD, len, size))
        };
        Some(Reservation {
            buffer: self,
            // Inside the ring (the record fits in its sub-buffer), or one past its end for
            // an empty payload whose header ends the ring.
            payload: record.wrapping_add(HEADER),
            counts,
            // All three fit: a record is at most one sub-buffer (2^30 bytes).
            cpu: cpu as u32,
            // The inline commit may run: the scheme allows restartable sequences (we
            // just ran one), and if the sub-buffer goes on after this record, its commit
            // wakes nobody.
            size_and_flag: size as u32 | (u32::from(end_in_sub < sub) * INLINE_COMMIT),
            len: len as u32,
            written: 0,
        })
    }

    /// [`reserve`](Self::reserve) in full: every case, retries and the locked path.
    /// Writes the record's headers and returns where it is, or the error as
    /// [`CPU_FULL`] or [`CPU_TOO_LARGE`].
    #[cold]
    #[inline(never)]
    fn reserve_slow(&self, len: usize) -> SlowReserve {
        if len > self.max_payload() {
            return SlowReserve::TOO_LARGE;
        }
        // Cannot overflow: `len` is at most a sub-buffer (2^30).
        let size = self.record_size(len);
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
            // Read after `old` and before the sequence (as LTTng reads its clock inside
            // its reserve loop): a reserve that lands on this ring in between, on this
            // CPU while the thread is preempted or signalled, or by a lock holder, moves
            // `write`, the compare fails and the clock is read again. So one ring's
            // timestamps never decrease (`Record::timestamp`). Across CPUs (a lock holder,
            // a thread that migrated) this also rests on the vDSO ordering its counter
            // read after earlier loads (`lfence; rdtsc` or `rdtscp` on x86, `isb` before
            // the counter on aarch64) and on CLOCK_MONOTONIC agreeing between CPUs.
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
                self.write_headers(cpu, old, begin, len, timestamp)
            }
            Some(Err(ReserveError::Full)) => {
                self.discarded.add(1);
                SlowReserve::FULL
            }
            Some(Err(ReserveError::TooLarge { .. })) => unreachable!("checked above"),
            None => self.reserve_locked(size, len),
        }
    }

    /// The reserve without a sequence: under the CPU's lock.
    #[cold]
    fn reserve_locked(&self, size: usize, len: usize) -> SlowReserve {
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
                return self.write_headers(cpu, old, begin, len, timestamp);
            }
            drop(held);
            if !self.make_room(ring) {
                self.discarded.add(1);
                return SlowReserve::FULL;
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
        // Acquire: pairs with the consumer's Release when it hands a sub-buffer back,
        // so its reads of that space are over before we write to it.
        let consumed = ring.consumed.load(Ordering::Acquire) & !CLAIMED;
        // The sub-buffer of `begin` ends at or before `consumed + capacity`; both are
        // sub-buffer aligned, so that is `begin` being below it (one comparison, no
        // rounding).
        begin < consumed + self.capacity
    }

    /// [`has_room`](Self::has_room), out of the way of the inline reserve, which needs
    /// it only for a record that opens a sub-buffer.
    #[cold]
    #[inline(never)]
    fn has_room_cold(&self, ring: &Ring, begin: usize) -> bool {
        self.has_room(ring, begin)
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
        self.parse(ring, consumed, from, |_, _, _payload| {
            records += 1;
            #[cfg(any(test, feature = "__test-hooks"))]
            crate::test_hooks::overwritten_record(self, _payload);
        });
        // Release: our reads of the sub-buffer are over before producers reuse it.
        ring.consumed
            .store(consumed + self.config.sub_buffer_size, Ordering::Release);
        self.overwritten.add(records);
        true
    }

    /// Writes the headers of a fresh reservation (and of the padding before it).
    fn write_headers(
        &self,
        cpu: usize,
        old: usize,
        begin: usize,
        len: usize,
        timestamp: Option<u64>,
    ) -> SlowReserve {
        let ring = &self.rings[cpu];
        if begin > old {
            // The tail of the previous sub-buffer becomes padding, committed at once.
            // SAFETY: [old, begin) was reserved by us, so no other thread writes to it.
            unsafe { self.write_header(ring, old, KIND_PADDING, begin - old - HEADER, None) };
            self.commit_bytes(cpu, old, begin - old, false);
        }
        // SAFETY: [begin, begin + size) was reserved by us.
        unsafe { self.write_header(ring, begin, KIND_RECORD, len, timestamp) };
        SlowReserve { pos: begin, cpu }
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

    /// [`Reservation::commit`] when [`try_commit_inline`] did not.
    #[cold]
    #[inline(never)]
    fn commit_bytes_slow(&self, cpu: usize, pos: usize, bytes: usize) {
        self.commit_bytes(cpu, pos, bytes, true);
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
    pub(super) fn sub_buffer_closed(&self) {
        // SeqCst: with the consumer's SeqCst increment of `sleepers` before its last
        // look at the rings (Dekker): either we see it sleeping, or it sees our commit.
        fence(Ordering::SeqCst);
        if self.waiters.sleepers.load(Ordering::Relaxed) != 0 {
            self.wake_all();
        }
    }

    pub(super) fn wake_all(&self) {
        // Release: a consumer that sees the new epoch sees the commits before it.
        self.waiters.epoch.fetch_add(1, Ordering::Release);
        sys::futex_wake(&self.waiters.epoch, i32::MAX);
    }

    /// Reserves, copies `data` and commits: one record.
    ///
    /// # Errors
    ///
    /// As for [`reserve`](RingBuffer::reserve).
    #[inline]
    pub fn write(&self, data: &[u8]) -> Result<(), ReserveError> {
        let r = self.reserve(data.len())?;
        // A copy that cannot panic: `copy_from_slice`'s length check could, and the
        // reservation would then have to be kept in memory for its drop.
        // SAFETY: the reservation owns its `data.len()` payload bytes until it commits, and
        // no live reference covers them (records handed to consumers are in sub-buffers
        // that no reservation can cover), so `data` cannot overlap them.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), r.payload, data.len()) };
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
    /// [`RingStats::abandoned`]: super::RingStats::abandoned
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

/// Room for one record in one CPU's ring, reserved and not yet committed. Write the
/// payload ([`payload_mut`](Reservation::payload_mut), or [`io::Write`], which fills it
/// from the start), then [`commit`](Reservation::commit) — from any CPU: a thread that
/// migrated since the reserve commits to the reserving CPU's ring through its remote
/// counter. [`truncate`](Reservation::truncate) publishes fewer bytes than reserved.
/// Dropped without a commit, the room is committed as padding (counted in
/// [`RingStats::abandoned`]). Leaked instead (`mem::forget`), it is never committed:
/// its sub-buffer never completes, and the consumer of that CPU's ring stops there for
/// good. Do not leak reservations.
///
/// [`RingStats::abandoned`]: super::RingStats::abandoned
pub struct Reservation<'a> {
    buffer: &'a RingBuffer,
    /// The payload's first byte (computed once, at the reserve).
    payload: *mut u8,
    /// The commit counts of the record's sub-buffer (also computed at the reserve).
    counts: &'a SubBuffer,
    cpu: u32,
    /// The record's bytes, headers and padding included (a multiple of 8), with
    /// [`INLINE_COMMIT`] in bit 0. The record's position is not kept: the cold paths
    /// that need it find it from `payload` ([`pos`](Reservation::pos)). Two words
    /// fewer to store: the reservation lives in memory wherever the payload's writer
    /// might panic (its drop needs it), which is most callers.
    size_and_flag: u32,
    len: u32,
    /// Bytes written through [`io::Write`], from the payload's start.
    written: u32,
}

/// [`Reservation`]'s flag (in its size's bit 0, free as sizes are multiples of 8):
/// [`commit`](Reservation::commit) may try the inline add without looking at the scheme
/// or the sub-buffer's end, both settled at the reserve.
const INLINE_COMMIT: u32 = 1;

// SAFETY: a reservation owns its bytes exclusively until it commits or drops, from
// whatever thread (a commit from another CPU takes the remote path).
unsafe impl Send for Reservation<'_> {}

impl Reservation<'_> {
    /// The record's bytes, headers and padding included.
    #[inline(always)]
    fn size(&self) -> usize {
        (self.size_and_flag & !INLINE_COMMIT) as usize
    }

    /// The record's position in its ring, modulo the ring's capacity (which is all its
    /// users need), from the payload's address: the payload follows the headers. For a
    /// header-only record that ends the ring, that address is one past the ring's end
    /// (made by the inline reserve) or wrapped to its start (the out-of-line one): the
    /// mask covers both.
    fn pos(&self) -> usize {
        let buffer = self.buffer;
        let data = buffer.rings[self.cpu as usize].data.as_ptr() as usize;
        (self.payload as usize).wrapping_sub(data + buffer.header_len()) & (buffer.capacity - 1)
    }

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
        let record = buffer.record_size(len);
        let rest = self.size() - record;
        let pos = self.pos();
        // SAFETY: the reservation owns [pos, pos + size): the header word (the timestamp
        // after it is kept: `None` leaves it), and the padding header at `pos + record`,
        // which is 8-aligned and, `rest` being a non-zero multiple of 8, inside the room.
        unsafe {
            buffer.write_header(ring, pos, KIND_RECORD, len, None);
            if rest > 0 {
                buffer.write_header(ring, pos + record, KIND_PADDING, rest - HEADER, None);
            }
        }
        self.len = len as u32;
        self.written = self.written.min(self.len);
    }

    /// Publishes the record.
    #[inline]
    pub fn commit(self) {
        let this = core::mem::ManuallyDrop::new(self);
        let (cpu, size) = (this.cpu as usize, this.size());
        let inline = this.size_and_flag & INLINE_COMMIT != 0;
        if !(inline && try_commit_inline(this.counts, cpu, size)) {
            this.buffer.commit_bytes_slow(cpu, this.pos(), size);
        }
    }
}

impl Drop for Reservation<'_> {
    /// Not committed: the room becomes padding, so the consumer never stalls on it.
    fn drop(&mut self) {
        let ring = &self.buffer.rings[self.cpu as usize];
        let (pos, size) = (self.pos(), self.size());
        // SAFETY: the reservation still owns its bytes.
        unsafe {
            self.buffer
                .write_header(ring, pos, KIND_PADDING, size - HEADER, None)
        };
        self.buffer.abandoned.add(1);
        self.buffer
            .commit_bytes(self.cpu as usize, pos, size, false);
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

/// The common commit: one restartable add to `counts.commit_local` on `cpu`, for a
/// reservation whose [`INLINE_COMMIT`] flag is set. False (nothing done) when the
/// thread is not on `cpu`, the add aborted, or the thread is not registered (another
/// thread commits it): the sequence's own check of `cpu` settles all three, on the
/// thread's area or on a refusing one, so there is nothing to test before it.
#[inline(always)]
fn try_commit_inline(counts: &SubBuffer, cpu: usize, bytes: usize) -> bool {
    let rseq = crate::thread::area_or_refusing();
    // Release: as in `add_commit`.
    fence(Ordering::Release);
    // SAFETY: (1) `rseq` is this thread's area, or a refusing one, whose `cpu_id` no ring's
    // CPU has; (2) as in `add_commit`: `counts` are the record's sub-buffer's, in the ring
    // of `cpu`.
    let outcome = unsafe {
        arch::add(
            rseq.as_ptr(),
            counts.commit_local.as_ptr(),
            bytes,
            cpu as u32,
        )
    };
    outcome == Outcome::Committed(())
}
