//! A `tracing` layer that records events into per-CPU ring buffers as compact binary
//! records and formats them on a background writer thread (feature `tracing`).
//!
//! LTTng-UST's design: the thread that emits an event does not format it. It encodes
//! the event into a short binary record — the callsite (which gives level, target,
//! name, file, line and field names), the spans in scope (id, callsite and field
//! values), and the field values — and writes it with one reserve and one commit into its CPU's
//! [`RingBuffer`], stamped with `CLOCK_MONOTONIC`. A writer
//! thread reads the rings, orders each batch by time, formats the records in the
//! `tracing-subscriber` fmt style ([`Format::Full`]) or as JSON lines
//! ([`Format::Json`]), and writes them to any `io::Write`.
//!
//! ```
//! use tracing_subscriber::prelude::*;
//!
//! let out = cpulocal::tracing::SharedBuffer::default();
//! let (layer, guard) = cpulocal::tracing::layer(out.clone());
//! let subscriber = tracing_subscriber::registry().with(layer);
//! tracing::subscriber::with_default(subscriber, || {
//!     let _span = tracing::info_span!("request", id = 7_u64).entered();
//!     tracing::info!(target: "app", user = "ada", bytes = 512_u64, ok = true, "served");
//! });
//! drop(guard); // flushes everything and stops the writer
//! let text = out.text();
//! assert!(
//!     text.contains(" INFO request{id=7}: app: served user=\"ada\" bytes=512 ok=true\n"),
//!     "{text}"
//! );
//! ```
//!
//! # What the producer pays, and what it does not
//!
//! Integers, floats, booleans and `&str` values are copied as they are, in binary.
//! Values recorded with `?` or `%` (and a message with format arguments) are rendered
//! into the record with their `Debug`/`Display` impl on the producer: they borrow data
//! that is gone once the event returns, so they cannot wait for the writer. A message
//! without arguments is copied. Level, target, file, line, span names and field names
//! are never copied: the writer finds them through the callsite. (tracing-core dispatches
//! a callsite's events on other threads while one thread is still registering it; the
//! producer therefore makes each callsite known to the writer itself, before the first
//! record that names it, through a per-thread cache: no shared lock once a thread has
//! seen the callsite.)
//!
//! A span's fields are encoded the same way once, when the span is created (and when
//! `Span::record` adds to them, appended as the fmt layer appends), and kept in the
//! span's extensions; an event inside the span copies those bytes into its record, with
//! no formatting. So an event pays, per span in scope, a look-up of the span (the
//! registry's) and a copy of its encoded fields.
//!
//! # When the rings fill
//!
//! A record that finds its CPU's ring full is discarded and counted (the ring's
//! `discarded` counter, which is exact); a record larger than a sub-buffer is counted as
//! too large; a record the output refused, as a write error. Nothing is lost silently:
//! the writer writes a `WARN` line with the counts whenever they grew since its last
//! report, and [`WriterGuard::stats`] returns them (with the sub-buffers that
//! [`WriterGuard::sync`] or the guard's drop gave up waiting for, see
//! [`TracingStats::stalled_sub_buffers`]).
//! Producers never wait for the writer. Size the rings ([`Builder::ring`]) for your
//! bursts.
//!
//! # Ordering, flushing, the end
//!
//! Records come out in time order within each batch the writer reads; a record that
//! reaches the writer late (its sub-buffer completed after a later one) can come out
//! after records stamped later than it. Partly filled sub-buffers are flushed every
//! [`Builder::flush_interval`], and on [`WriterGuard::sync`] and on the guard's drop,
//! which writes everything recorded before it and stops the writer (both wait for a
//! record whose producer is between its reserve and its commit, for 1 s at most: see
//! [`WriterGuard::sync`]). Events recorded
//! after the guard is dropped are not written: keep the guard alive (e.g. in `main`).
//!
//! # The writer sleeps
//!
//! With nothing to read, the writer sleeps in [`RingBuffer::wait`]: a producer whose
//! commit completes a sub-buffer wakes it (a fence per sub-buffer, and a system call only
//! while it sleeps: see the ring's [Who waits](crate::ring#who-waits)), as do
//! [`WriterGuard::sync`] and the guard's drop; otherwise it wakes for the next periodic
//! flush. An idle writer wakes once per [`Builder::flush_interval`] and uses no CPU in
//! between.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_core::Metadata;

use crate::ring::{ConfigError, Mode, RingBuffer, RingConfig};
use crate::Counter;
use writer::Writer;

mod produce;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_promises;
mod writer;

/// How the writer formats records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Format {
    /// `tracing-subscriber`'s default fmt style, without colours:
    /// `2026-12-03T10:24:04.123456Z  INFO span1{a=1}:span2: target: message k=v`
    /// (byte for byte what `tracing_subscriber::fmt` 0.3.23 writes for the same event
    /// with its default settings and `with_ansi(false)`, the time stamp aside: an
    /// error's source chain as `error.sources=[..]`, and the control characters of
    /// messages and error texts that a terminal acts on escaped, as `\x1b`, as its
    /// default ANSI sanitization escapes them). Two differences: spans deeper than 32
    /// are left out, and an event that `tracing-log`'s bridge makes of a `log` record
    /// is written as the bridge's callsite says (target `log`, fields `log.target`,
    /// `log.module_path`, ...), where the fmt layer (with its default `tracing-log`
    /// feature) writes the record's own target and leaves those fields out.
    #[default]
    Full,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`),
    /// `target`, and when the event is inside spans, as `tracing-subscriber`'s JSON
    /// format writes them, `span` (the innermost one written) and `spans` (outermost
    /// first), each an object of the span's fields and its `name`. As in `Full`, spans
    /// deeper than 32 are left out (`span` is then the 32nd from the outermost).
    Json,
}

/// The settings of a [`RingLayer`] and its writer.
#[derive(Clone, Copy, Debug)]
pub struct Builder {
    ring: RingConfig,
    format: Format,
    flush_interval: Duration,
}

impl Default for Builder {
    /// 8 sub-buffers of 64 KiB per CPU, fmt style, flushed every 100 ms.
    fn default() -> Self {
        Builder {
            ring: RingConfig {
                sub_buffer_size: 64 << 10,
                sub_buffers: 8,
                mode: Mode::DiscardNewest,
                timestamps: true,
            },
            format: Format::Full,
            flush_interval: Duration::from_millis(100),
        }
    }
}

impl Builder {
    /// The default settings.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The shape of the per-CPU rings. Timestamps are always on, and a full ring always
    /// discards the new record (counted): whatever `ring` says about either is ignored.
    pub fn ring(mut self, ring: RingConfig) -> Builder {
        self.ring = RingConfig {
            mode: Mode::DiscardNewest,
            timestamps: true,
            ..ring
        };
        self
    }

    /// The output format.
    pub fn format(mut self, format: Format) -> Builder {
        self.format = format;
        self
    }

    /// How often the writer flushes the sub-buffers being filled, so that a quiet CPU's
    /// records still come out: the longest a record waits in a sub-buffer that is not
    /// full, and how often an idle writer wakes up.
    pub fn flush_interval(mut self, interval: Duration) -> Builder {
        self.flush_interval = interval;
        self
    }

    /// The layer, and the guard of the writer thread that formats its records into
    /// `out`.
    ///
    /// # Errors
    ///
    /// When the ring configuration is invalid (see [`RingBuffer::new`]).
    pub fn build<W: Write + Send + 'static>(
        self,
        out: W,
    ) -> Result<(RingLayer, WriterGuard), ConfigError> {
        let shared = Arc::new(Shared {
            ring: RingBuffer::new(self.ring)?,
            too_large: Counter::new(),
            written: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            callsites: RwLock::default(),
            control: Mutex::default(),
            done: Condvar::new(),
            #[cfg(test)]
            writer_tid: std::sync::atomic::AtomicI32::new(0),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            let settings = self;
            std::thread::Builder::new()
                .name("cpulocal-tracing".into())
                .spawn(move || Writer::new(shared, settings, out).run())
                .expect("cannot start the tracing writer thread")
        };
        Ok((
            RingLayer {
                shared: Arc::clone(&shared),
            },
            WriterGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

/// [`Builder::default`]`.build(out)`: the layer, and the guard of its writer.
///
/// # Panics
///
/// Never: the default ring configuration is valid.
pub fn layer<W: Write + Send + 'static>(out: W) -> (RingLayer, WriterGuard) {
    Builder::default()
        .build(out)
        .expect("the default ring configuration is valid")
}

/// What the writer was told to do, under `Shared::control`.
#[derive(Debug, Default)]
struct Control {
    /// `sync` calls so far; the writer answers each with a full pass.
    syncs_requested: u64,
    /// The last `sync` answered.
    syncs_done: u64,
    /// The guard was dropped: a last full pass, then the writer exits.
    stop: bool,
    /// The writer saw `stop` and no longer sleeps.
    stopped: bool,
}

/// How long `sync` and the guard's drop first wait before they wake the writer again
/// (doubling each time up to [`NOTIFY_AGAIN_LAST`]): only a wake-up that raced the
/// writer's going to sleep needs a second one.
const NOTIFY_AGAIN_FIRST: Duration = Duration::from_millis(1);
/// The longest wait between two wake-ups of the writer by `sync` or the guard's drop.
const NOTIFY_AGAIN_LAST: Duration = Duration::from_millis(64);

/// How long [`WriterGuard::sync`] and the guard's drop wait, reading none of the records
/// recorded before them, for a record reserved before them whose producer has not
/// committed it yet. Such a producer was preempted for a moment (milliseconds at most,
/// on a loaded machine) or is stopped for good (in a debugger, between its reserve and
/// its commit): a wait without a bound would hang the drop. The bound of
/// `tracing-appender`'s `WorkerGuard`.
const STALLED_RECORD_WAIT: Duration = Duration::from_secs(1);

/// What the layer and the writer share.
struct Shared {
    ring: RingBuffer,
    /// Events larger than a sub-buffer.
    too_large: Counter,
    /// Records written out.
    written: AtomicU64,
    /// Records lost because the output returned an error.
    write_errors: AtomicU64,
    /// Sub-buffers that `sync` or the guard's drop gave up waiting for.
    stalled: AtomicU64,
    /// This layer's number, never reused in the process: what marks its spans' encoded
    /// fields and keys the producers' per-thread cache of the callsites they made known
    /// (see [`Shared::learn`]).
    id: u64,
    /// Every callsite a record of this layer can name, by address: how the writer finds
    /// the metadata. A producer adds its event's (and its spans') before it writes the
    /// record, so the writer finds every one.
    callsites: RwLock<HashMap<usize, &'static Metadata<'static>>>,
    control: Mutex<Control>,
    /// Wakes `sync` callers.
    done: Condvar,
    /// The writer thread's kernel id, for the tests that watch it sleep.
    #[cfg(test)]
    writer_tid: std::sync::atomic::AtomicI32,
}

/// The next [`Shared::id`].
static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);

impl Shared {
    /// Adds `metadata` to the callsites the writer can decode.
    fn learn(&self, metadata: &'static Metadata<'static>) {
        let address = metadata as *const Metadata<'static> as usize;
        let known = self
            .callsites
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&address);
        if !known {
            self.callsites
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(address, metadata);
        }
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> TracingStats {
        TracingStats {
            written: self.written.load(Ordering::Acquire),
            dropped_full: self.ring.stats().discarded,
            dropped_too_large: self.too_large.sum(),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            stalled_sub_buffers: self.stalled.load(Ordering::Relaxed),
        }
    }
}

/// The record counts of a [`RingLayer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TracingStats {
    /// Records the writer wrote out: the write of their bytes to the output, and the
    /// flush after it, succeeded.
    pub written: u64,
    /// Events discarded because their CPU's ring was full.
    pub dropped_full: u64,
    /// Events discarded because their record was larger than a sub-buffer.
    pub dropped_too_large: u64,
    /// Records lost because the output returned an error, on their write or on the
    /// flush after it.
    pub write_errors: u64,
    /// Sub-buffers that [`WriterGuard::sync`] or the guard's drop gave up waiting for:
    /// after 1 s in which no record recorded before the call could be read, a record
    /// was still reserved and not committed (its thread stopped in between, e.g. in a
    /// debugger) in the first of them, which holds up the ones after it on its CPU
    /// (each is counted once, however many calls give up on it). Their events
    /// (how many is not known until the sub-buffer is complete) were not written when
    /// the call returned: they come out later if the writer still runs, and are lost
    /// if it stops (the drop). Not part of [`dropped`](TracingStats::dropped), which
    /// counts events.
    pub stalled_sub_buffers: u64,
}

impl TracingStats {
    /// Every event that was not written out.
    pub fn dropped(&self) -> u64 {
        self.dropped_full + self.dropped_too_large + self.write_errors
    }
}

/// The `tracing_subscriber::Layer` that records events into the per-CPU rings. Made by
/// [`layer`] or [`Builder::build`], with the [`WriterGuard`] of its writer.
pub struct RingLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for RingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingLayer")
            .field("stats", &self.shared.stats())
            .finish_non_exhaustive()
    }
}

// Record layout (little-endian): the callsite's address (u64); the number of spans in
// scope (u8); per span, outermost first, its id (u64), its callsite's address (u64), and
// its fields (u32 length, then encoded as an event's fields are, against the span's
// callsite: encoded once when the span was created or recorded to, copied here); then per
// field of the event: its index in the callsite's field set (u8), a tag (u8), the value.
const TAG_U64: u8 = 0;
const TAG_I64: u8 = 1;
const TAG_F64: u8 = 2;
const TAG_BOOL: u8 = 3;
/// A `&str` value: u32 length, bytes.
const TAG_STR: u8 = 4;
/// A value rendered with `Debug` or `Display`: u32 length, bytes.
const TAG_RENDERED: u8 = 5;
const TAG_U128: u8 = 6;
const TAG_I128: u8 = 7;
/// An error (`record_error`): u32 length, then its `Display` and that of each error in
/// its source chain, in order, each as u32 length and bytes.
const TAG_ERROR: u8 = 8;

/// Owns the writer thread: [`sync`](WriterGuard::sync) waits until everything recorded
/// so far is written; dropping it writes everything recorded before the drop, flushes
/// the output and stops the thread.
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WriterGuard {
    /// The counts so far.
    pub fn stats(&self) -> TracingStats {
        self.shared.stats()
    }

    /// Returns once every event recorded before the call (on any thread that the call
    /// is synchronised with) is written and the output flushed, or counted as dropped.
    ///
    /// An event whose thread is between its reserve and its commit (preempted) is waited
    /// for, at most 1 s in which none of the events recorded before the call could be
    /// read (what other threads log meanwhile does not extend it): a thread stopped there for longer
    /// (in a debugger) must not hang the call. When that bound expires, `sync` returns
    /// without the events of the sub-buffers it could not read, and counts those in
    /// [`TracingStats::stalled_sub_buffers`] (with a `WARN` line); they come out once
    /// the thread commits.
    pub fn sync(&self) {
        let mut control = self.shared.control();
        control.syncs_requested += 1;
        let mine = control.syncs_requested;
        let mut again = NOTIFY_AGAIN_FIRST;
        while control.syncs_done < mine && self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            // The writer sleeps in the ring's `wait`; a notify that lands just before it
            // starts to wait is missed, hence the repeats.
            self.shared.ring.notify();
            control = self
                .shared
                .done
                .wait_timeout(control, again)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            again = (again * 2).min(NOTIFY_AGAIN_LAST);
        }
    }
}

impl Drop for WriterGuard {
    /// Writes every event recorded before the drop, flushes the output and stops the
    /// writer. As [`sync`](WriterGuard::sync), it waits at most 1 s (without progress on
    /// the events recorded before it) for an event whose thread is stopped between
    /// reserve and commit; the
    /// events of the sub-buffers it then gives up on are lost, counted in
    /// [`TracingStats::stalled_sub_buffers`] and reported in a `WARN` line.
    fn drop(&mut self) {
        self.shared.control().stop = true;
        if let Some(thread) = self.thread.take() {
            // As in `sync`: notify until the writer has seen the stop.
            let mut again = NOTIFY_AGAIN_FIRST;
            while !thread.is_finished() {
                self.shared.ring.notify();
                let control = self.shared.control();
                if control.stopped {
                    break;
                }
                drop(
                    self.shared
                        .done
                        .wait_timeout(control, again)
                        .unwrap_or_else(|p| p.into_inner()),
                );
                again = (again * 2).min(NOTIFY_AGAIN_LAST);
            }
            // A panic of the writer (a panicking output) is not re-raised in a drop.
            let _ = thread.join();
        }
    }
}

impl fmt::Debug for WriterGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriterGuard")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// An `io::Write` into a shared, growing buffer: for tests and examples that read back
/// what the writer wrote.
#[derive(Clone, Debug, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// What was written so far, as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
