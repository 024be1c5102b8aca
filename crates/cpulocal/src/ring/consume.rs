//! The consumer side: claiming and reading complete sub-buffers, [`flush`] of the
//! sub-buffer being filled, and [`wait`]/[`notify`].
//!
//! [`flush`]: RingBuffer::flush
//! [`wait`]: RingBuffer::wait
//! [`notify`]: RingBuffer::notify

use core::cell::Cell;
use core::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use super::{
    Held, Ring, RingBuffer, CLAIMED, HEADER, KIND_PADDING, KIND_RECORD, KIND_SHIFT, LEN_MASK,
    PENDING_POLL,
};
use crate::remote::InvalidCpu;
use crate::sys;

/// Every ring's reserve position at one moment, each rounded up to the end of its
/// sub-buffer: every record reserved before that moment lies below it. A consumer that
/// flushes after taking the mark has read everything reserved before it (or seen it
/// dropped) once every ring's consumer position has reached the mark
/// ([`RingBuffer::reached`]): a record still being written below the mark keeps its
/// sub-buffer, and so the consumer position, from getting there.
#[cfg(feature = "tracing")]
#[derive(Clone, Debug, Default)]
pub(crate) struct ReserveMark(Vec<usize>);

/// One record, as the consumer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Record<'a> {
    /// The CPU whose ring held it (where it was reserved).
    pub cpu: usize,
    /// `CLOCK_MONOTONIC` nanoseconds read during the reserve, when the ring keeps
    /// timestamps. Within one CPU's ring they never decrease (a reserve that another
    /// one overtakes reads the clock again), so a stable merge of the CPUs' records by
    /// timestamp keeps each CPU's order (two records may carry the same timestamp).
    pub timestamp: Option<u64>,
    /// The payload.
    pub data: &'a [u8],
}

impl RingBuffer {
    /// Whether the sub-buffer starting at `pos` (a consumer position) is fully committed.
    pub(super) fn is_complete(&self, ring: &Ring, pos: usize) -> bool {
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
    pub(super) fn parse(
        &self,
        ring: &Ring,
        pos: usize,
        from: usize,
        mut f: impl FnMut(usize, Option<u64>, &[u8]),
    ) {
        let pos = pos & !CLAIMED;
        let sub = self.config.sub_buffer_size;
        let header_len = self.header_len();
        debug_assert!((pos..=pos + sub).contains(&from));
        // A sub-buffer never wraps around the ring: walk it by address from its first
        // byte. The loop's critical path is the header load and the add of its low word
        // (the distance to the next header), which bounds how fast one consumer reads;
        // a plain pointer, not base plus offset, is the load's fastest addressing.
        let first = self.at(ring, pos);
        let end = first.wrapping_add(sub);
        let mut at = first.wrapping_add(from - pos);
        while at < end {
            // The sub-buffer is complete: every byte in it belongs to a committed record
            // or padding, whose writes the Acquire in `is_complete` made visible, and no
            // reservation can cover it until `consumed` moves past it.
            // SAFETY: as just said; `at` is 8-aligned and inside the sub-buffer.
            let [size, kind_len] = unsafe { at.cast::<[u32; 2]>().read() };
            let here = at;
            at = at.wrapping_add(size as usize);
            match kind_len >> KIND_SHIFT {
                KIND_RECORD => {
                    let len = (kind_len & LEN_MASK) as usize;
                    let timestamp = self.config.timestamps.then(|| {
                        // SAFETY: as above; records with timestamps have one after the
                        // header.
                        unsafe { here.add(HEADER).cast::<u64>().read() }
                    });
                    // SAFETY: as above; the payload is `len` bytes inside the sub-buffer.
                    let data = unsafe { core::slice::from_raw_parts(here.add(header_len), len) };
                    f(pos + (at as usize - first as usize), timestamp, data);
                }
                KIND_PADDING => {}
                kind => unreachable!(
                    "corrupt ring: kind {kind} at position {}",
                    pos + (here as usize - first as usize)
                ),
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

    /// The [`ReserveMark`] of now: what a consumer that wants every record reserved so
    /// far reads up to (after a [`flush_all`](Self::flush_all), which closes the
    /// sub-buffers the mark ends in).
    ///
    /// A record reserved before the call, on any thread the caller is synchronised with,
    /// lies below the mark: its reserve moved `write` past it before the call.
    #[cfg(feature = "tracing")]
    pub(crate) fn reserve_mark(&self) -> ReserveMark {
        let sub = self.config.sub_buffer_size;
        ReserveMark(
            self.rings
                .iter()
                // Relaxed: a reservation ordered before this call is seen (coherence
                // with what ordered it); one that races the call is not the caller's.
                .map(|ring| ring.write.load(Ordering::Relaxed).next_multiple_of(sub))
                .collect(),
        )
    }

    /// How many bytes the consumer positions are short of `mark`, over every ring: 0
    /// once every record reserved before the mark was taken has been read, or dropped
    /// unread by an overwriting producer (counted in
    /// [`overwritten`](super::RingStats::overwritten)). It shrinks only as the records
    /// below the mark are read, whatever else is.
    #[cfg(feature = "tracing")]
    pub(crate) fn short_of(&self, mark: &ReserveMark) -> usize {
        self.rings
            .iter()
            .zip(&mark.0)
            .map(|(ring, &end)| {
                // Relaxed: the consumer asking moved `consumed` itself, or an overwriting
                // producer did and counted what it dropped.
                end.saturating_sub(ring.consumed.load(Ordering::Relaxed) & !CLAIMED)
            })
            .sum()
    }

    /// The sub-buffers below `mark` not read yet, over every ring, leaving out those
    /// below `counted` (a mark whose unread sub-buffers were counted before, so that one
    /// stalled sub-buffer counts once); then raises `counted` to `mark`.
    #[cfg(feature = "tracing")]
    pub(crate) fn unread_below(&self, mark: &ReserveMark, counted: &mut ReserveMark) -> u64 {
        counted.0.resize(mark.0.len(), 0);
        let mut unread = 0;
        for ((ring, &end), counted) in self.rings.iter().zip(&mark.0).zip(&mut counted.0) {
            // Relaxed: as in `reached`.
            let consumed = ring.consumed.load(Ordering::Relaxed) & !CLAIMED;
            let from = consumed.max(*counted);
            unread += (end.saturating_sub(from) >> self.sub_shift) as u64;
            *counted = (*counted).max(end);
        }
        unread
    }

    /// Whether some CPU's ring has a complete sub-buffer no consumer is reading.
    fn has_complete(&self) -> bool {
        self.rings.iter().any(|ring| {
            // Acquire: see `has_room`.
            let consumed = ring.consumed.load(Ordering::Acquire);
            consumed & CLAIMED == 0 && self.is_complete(ring, consumed)
        })
    }

    /// Whether some CPU's oldest unread sub-buffer may become readable with no wake-up
    /// to say so: it is fully reserved but not yet fully committed (a producer is
    /// between its reserve and its commit, and its late commit wakes nobody), or another
    /// consumer claims it (a claim handed back unread, after a panicking callback, wakes
    /// nobody either; nor does a claim that ends with complete sub-buffers after it).
    fn has_pending(&self) -> bool {
        let sub = self.config.sub_buffer_size;
        self.rings.iter().any(|ring| {
            let consumed = ring.consumed.load(Ordering::Acquire);
            if consumed & CLAIMED != 0 {
                return true;
            }
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
    /// [Who waits](super#who-waits)).
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
        // Nothing open: no lock, no fence. An idle consumer that flushes on a timer then
        // costs each CPU nothing (the lock's membarrier interrupts the CPU when one of
        // the process's threads runs there). Relaxed: a reservation ordered before this
        // call (by whatever made the caller flush now) is seen; one that races it is
        // the next flush's, as it would be had it come just after.
        if ring.write.load(Ordering::Relaxed) & (sub - 1) == 0 {
            return;
        }
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
pub(super) fn resume_point(ring: &Ring, consumed: usize, sub_buffer_size: usize) -> usize {
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
pub(super) fn claim(ring: &Ring, consumed: usize) -> bool {
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
