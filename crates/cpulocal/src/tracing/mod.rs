//! A `tracing` layer that records events into per-CPU ring buffers as compact binary
//! records and formats them on a background writer thread (feature `tracing`).
//!
//! LTTng-UST's design: the thread that emits an event does not format it. It encodes
//! the event into a short binary record — the callsite (which gives level, target,
//! name, file, line and field names), the spans in scope (id and callsite), and the
//! field values — and writes it with one reserve and one commit into its CPU's
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
//!     let _span = tracing::info_span!("request").entered();
//!     tracing::info!(target: "app", user = "ada", bytes = 512_u64, ok = true, "served");
//! });
//! drop(guard); // flushes everything and stops the writer
//! let text = out.text();
//! assert!(text.contains(" INFO request: app: served user=\"ada\" bytes=512 ok=true\n"), "{text}");
//! ```
//!
//! # What the producer pays, and what it does not
//!
//! Integers, floats, booleans and `&str` values are copied as they are, in binary.
//! Values recorded with `?` or `%` (and a message with format arguments) are rendered
//! into the record with their `Debug`/`Display` impl on the producer: they borrow data
//! that is gone once the event returns, so they cannot wait for the writer. A message
//! without arguments is copied. Level, target, file, line, span names and field names
//! are never copied: the writer finds them through the callsite.
//!
//! # When the rings fill
//!
//! A record that finds its CPU's ring full is discarded and counted (the ring's
//! `discarded` counter, which is exact); a record larger than a sub-buffer is counted as
//! too large. Nothing is lost silently: the writer writes a `WARN` line with the counts
//! whenever they grew since its last report, and [`WriterGuard::stats`] returns them.
//! Producers never wait for the writer. Size the rings ([`Builder::ring`]) for your
//! bursts.
//!
//! # Ordering, flushing, the end
//!
//! Records come out in time order within each batch the writer reads; a record that
//! reaches the writer late (its sub-buffer completed after a later one) can come out
//! after records stamped later than it. Partly filled sub-buffers are flushed every
//! [`Builder::flush_interval`], and on [`WriterGuard::sync`] and on the guard's drop,
//! which writes everything recorded before it and stops the writer. Events recorded
//! after the guard is dropped are not written: keep the guard alive (e.g. in `main`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing_core::field::{Field, Visit};
use tracing_core::subscriber::Interest;
use tracing_core::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::ring::{ConfigError, Mode, ReserveError, RingBuffer, RingConfig};
use crate::Counter;

/// How the writer formats records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Format {
    /// `tracing-subscriber`'s default fmt style, without colours:
    /// `2026-12-03T10:24:04.123456Z  INFO span1:span2: target: message k=v`.
    #[default]
    Full,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`),
    /// `target`, and `spans` (names, outermost first) when there are any.
    Json,
}

/// The settings of a [`RingLayer`] and its writer.
#[derive(Clone, Copy, Debug)]
pub struct Builder {
    ring: RingConfig,
    format: Format,
    flush_interval: Duration,
    idle_wait: Duration,
}

impl Default for Builder {
    /// 8 sub-buffers of 64 KiB per CPU, fmt style, flushed every 100 ms, the writer
    /// looking again every 2 ms when it found nothing.
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
            idle_wait: Duration::from_millis(2),
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
    /// records still come out.
    pub fn flush_interval(mut self, interval: Duration) -> Builder {
        self.flush_interval = interval;
        self
    }

    /// How long the writer waits when it found nothing to read.
    pub fn idle_wait(mut self, wait: Duration) -> Builder {
        self.idle_wait = wait;
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
            callsites: RwLock::default(),
            control: Mutex::default(),
            wake: Condvar::new(),
            done: Condvar::new(),
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
}

/// What the layer and the writer share.
struct Shared {
    ring: RingBuffer,
    /// Events larger than a sub-buffer.
    too_large: Counter,
    /// Records written out.
    written: AtomicU64,
    /// Records lost because the output returned an error.
    write_errors: AtomicU64,
    /// Every callsite the layer was told of, by address: how the writer finds the
    /// metadata a record names.
    callsites: RwLock<HashMap<usize, &'static Metadata<'static>>>,
    control: Mutex<Control>,
    /// Wakes the writer (a `sync`, the stop).
    wake: Condvar,
    /// Wakes `sync` callers.
    done: Condvar,
}

impl Shared {
    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> TracingStats {
        TracingStats {
            written: self.written.load(Ordering::Acquire),
            dropped_full: self.ring.stats().discarded,
            dropped_too_large: self.too_large.sum(),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// The record counts of a [`RingLayer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TracingStats {
    /// Records the writer wrote out.
    pub written: u64,
    /// Events discarded because their CPU's ring was full.
    pub dropped_full: u64,
    /// Events discarded because their record was larger than a sub-buffer.
    pub dropped_too_large: u64,
    /// Records lost because the output returned an error.
    pub write_errors: u64,
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
// scope (u8); per span, outermost first, its id (u64) and its callsite's address (u64);
// then per field: its index in the callsite's field set (u8), a tag (u8), the value.
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
/// Spans beyond this depth are left out of a record.
const MAX_SPANS: usize = 32;
/// Flush-and-read rounds of a full pass (`sync`, the guard's drop) at most.
const FULL_PASS_ROUNDS: usize = 8;

thread_local! {
    /// Where the calling thread encodes its events before the copy into the ring.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes field values into a record.
struct Encoder<'a>(&'a mut Vec<u8>);

impl Encoder<'_> {
    #[inline]
    fn head(&mut self, field: &Field, tag: u8) {
        // A callsite has at most 32 fields (tracing's limit), so the index fits.
        self.0.push(field.index() as u8);
        self.0.push(tag);
    }

    #[inline]
    fn bytes(&mut self, field: &Field, tag: u8, bytes: &[u8]) {
        self.head(field, tag);
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(&bytes[..len as usize]);
    }
}

impl Visit for Encoder<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.head(field, TAG_U64);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.head(field, TAG_I64);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.head(field, TAG_F64);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.head(field, TAG_BOOL);
        self.0.push(u8::from(value));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.head(field, TAG_U128);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.head(field, TAG_I128);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.bytes(field, TAG_STR, value.as_bytes());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.head(field, TAG_RENDERED);
        let at = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        // Writing into a Vec cannot fail; a Debug impl that errors leaves what it wrote.
        let _ = write!(self.0, "{value:?}");
        let len = u32::try_from(self.0.len() - at - 4).unwrap_or(u32::MAX);
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

impl RingLayer {
    /// The counts so far (the [`WriterGuard`] has the same).
    pub fn stats(&self) -> TracingStats {
        self.shared.stats()
    }

    /// Encodes `event` into `buf` and writes it into the calling CPU's ring.
    #[inline]
    fn record<S>(&self, buf: &mut Vec<u8>, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        buf.clear();
        let metadata: &'static Metadata<'static> = event.metadata();
        buf.extend_from_slice(&(metadata as *const Metadata<'static> as u64).to_le_bytes());
        let count_at = buf.len();
        buf.push(0);
        if let Some(scope) = ctx.event_scope(event) {
            let mut spans = 0u8;
            for span in scope.from_root().take(MAX_SPANS) {
                buf.extend_from_slice(&span.id().into_u64().to_le_bytes());
                let callsite = span.metadata() as *const Metadata<'static> as u64;
                buf.extend_from_slice(&callsite.to_le_bytes());
                spans += 1;
            }
            buf[count_at] = spans;
        }
        event.record(&mut Encoder(buf));
        match self.shared.ring.write(buf) {
            // A full ring counted the record as discarded.
            Ok(()) | Err(ReserveError::Full) => {}
            Err(ReserveError::TooLarge { .. }) => self.shared.too_large.add(1),
        }
    }
}

impl<S> Layer<S> for RingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        let address = metadata as *const Metadata<'static> as usize;
        self.shared
            .callsites
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(address, metadata);
        Interest::always()
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // A re-entrant event (a Debug impl that logs) or one during thread exit gets a
        // buffer of its own.
        let reused = SCRATCH.try_with(|scratch| {
            scratch
                .try_borrow_mut()
                .map(|mut buf| self.record(&mut buf, event, &ctx))
                .is_ok()
        });
        if reused != Ok(true) {
            self.record(&mut Vec::new(), event, &ctx);
        }
    }
}

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
    pub fn sync(&self) {
        let mut control = self.shared.control();
        control.syncs_requested += 1;
        let mine = control.syncs_requested;
        self.shared.wake.notify_all();
        while control.syncs_done < mine && self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            control = self
                .shared
                .done
                .wait_timeout(control, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.control().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
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

/// A record read from a ring, waiting in a batch to be ordered and formatted.
struct Pending {
    timestamp: u64,
    cpu: usize,
    start: usize,
    end: usize,
}

/// The writer thread's state.
struct Writer<W: Write> {
    shared: Arc<Shared>,
    settings: Builder,
    out: io::BufWriter<W>,
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, in ns, measured at the start.
    realtime_offset: i128,
    /// The bytes of the records of the batch being read.
    bytes: Vec<u8>,
    batch: Vec<Pending>,
    /// One formatted line.
    line: Vec<u8>,
    /// The drop counts last reported.
    reported: (u64, u64, u64),
}

impl<W: Write> Writer<W> {
    fn new(shared: Arc<Shared>, settings: Builder, out: W) -> Self {
        let realtime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let realtime_offset = realtime - i128::from(crate::ring::monotonic_ns());
        Writer {
            shared,
            settings,
            out: io::BufWriter::with_capacity(64 << 10, out),
            realtime_offset,
            bytes: Vec::new(),
            batch: Vec::new(),
            line: Vec::new(),
            reported: (0, 0, 0),
        }
    }

    fn run(mut self) {
        let mut last_flush = Instant::now();
        loop {
            let (stop, requested, done) = {
                let control = self.shared.control();
                (control.stop, control.syncs_requested, control.syncs_done)
            };
            if stop || requested > done {
                // Everything committed so far: hand over the sub-buffers being filled and
                // read until nothing is left (a few rounds at most: a reservation still
                // in flight keeps its sub-buffer incomplete for a moment).
                for _ in 0..FULL_PASS_ROUNDS {
                    self.shared.ring.flush_all();
                    if self.pass() == 0 {
                        break;
                    }
                }
                last_flush = Instant::now();
                self.report_drops();
                self.flush_out();
                if stop {
                    return;
                }
                let mut control = self.shared.control();
                control.syncs_done = control.syncs_done.max(requested);
                self.shared.done.notify_all();
                continue;
            }
            if last_flush.elapsed() >= self.settings.flush_interval {
                self.shared.ring.flush_all();
                last_flush = Instant::now();
            }
            if self.pass() == 0 {
                self.report_drops();
                self.flush_out();
                let control = self.shared.control();
                if !control.stop && control.syncs_requested == control.syncs_done {
                    drop(
                        self.shared
                            .wake
                            .wait_timeout(control, self.settings.idle_wait)
                            .unwrap_or_else(|p| p.into_inner()),
                    );
                }
            }
        }
    }

    /// Reads every complete sub-buffer of every ring, orders the records by time and
    /// writes them. Returns the records read.
    fn pass(&mut self) -> usize {
        self.bytes.clear();
        self.batch.clear();
        let (bytes, batch) = (&mut self.bytes, &mut self.batch);
        self.shared.ring.consume_all(|record| {
            let start = bytes.len();
            bytes.extend_from_slice(record.data);
            batch.push(Pending {
                timestamp: record.timestamp.unwrap_or(0),
                cpu: record.cpu,
                start,
                end: bytes.len(),
            });
        });
        self.batch.sort_by_key(|p| p.timestamp);
        let batch = std::mem::take(&mut self.batch);
        for p in &batch {
            self.line.clear();
            let decoded = Decoded::parse(&self.bytes[p.start..p.end], &self.shared.callsites);
            let wall = self.wall_clock(p.timestamp);
            match self.settings.format {
                Format::Full => decoded.write_full(&mut self.line, wall, p.cpu),
                Format::Json => decoded.write_json(&mut self.line, wall, p.cpu),
            }
            self.emit_line(1);
        }
        let read = batch.len();
        self.batch = batch;
        read
    }

    /// Writes `self.line`, counting it as `records` records written (or lost).
    fn emit_line(&mut self, records: u64) {
        if self.out.write_all(&self.line).is_ok() {
            self.shared.written.fetch_add(records, Ordering::Release);
        } else {
            self.shared
                .write_errors
                .fetch_add(records, Ordering::Relaxed);
        }
    }

    fn flush_out(&mut self) {
        let _ = self.out.flush();
    }

    fn wall_clock(&self, monotonic: u64) -> SystemTime {
        let ns = i128::from(monotonic) + self.realtime_offset;
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
    }

    /// Writes a `WARN` line when events were dropped since the last report.
    fn report_drops(&mut self) {
        let s = self.shared.stats();
        let now = (s.dropped_full, s.dropped_too_large, s.write_errors);
        if now == self.reported {
            return;
        }
        let new = (now.0 - self.reported.0) + (now.1 - self.reported.1) + (now.2 - self.reported.2);
        self.reported = now;
        let wall = self.wall_clock(crate::ring::monotonic_ns());
        let message = format!(
            "{new} events dropped (in total: {} ring full, {} too large, {} write errors)",
            now.0, now.1, now.2
        );
        self.line.clear();
        match self.settings.format {
            Format::Full => {
                let _ = writeln!(
                    self.line,
                    "{}  WARN cpulocal::tracing: {message}",
                    humantime::format_rfc3339_micros(wall)
                );
            }
            Format::Json => {
                let object = serde_json::json!({
                    "timestamp": humantime::format_rfc3339_micros(wall).to_string(),
                    "level": "WARN",
                    "fields": {
                        "message": message,
                        "dropped": new,
                        "dropped_full": now.0,
                        "dropped_too_large": now.1,
                        "write_errors": now.2,
                    },
                    "target": "cpulocal::tracing",
                });
                let _ = writeln!(self.line, "{object}");
            }
        }
        // A report is not a record: it is not counted as written.
        let _ = self.out.write_all(&self.line);
    }
}

/// A field value read back from a record.
enum Value<'a> {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(&'a str),
    Rendered(&'a str),
    U128(u128),
    I128(i128),
}

impl fmt::Display for Value<'_> {
    /// As `tracing-subscriber`'s fmt layer shows a field value (`Debug`), strings quoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U64(v) => write!(f, "{v:?}"),
            Value::I64(v) => write!(f, "{v:?}"),
            Value::F64(v) => write!(f, "{v:?}"),
            Value::Bool(v) => write!(f, "{v:?}"),
            Value::Str(v) => write!(f, "{v:?}"),
            Value::Rendered(v) => f.write_str(v),
            Value::U128(v) => write!(f, "{v:?}"),
            Value::I128(v) => write!(f, "{v:?}"),
        }
    }
}

impl Value<'_> {
    fn to_json(&self) -> serde_json::Value {
        match *self {
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            Value::F64(v) => v.into(),
            Value::Bool(v) => v.into(),
            Value::Str(v) | Value::Rendered(v) => v.into(),
            Value::U128(v) => v.to_string().into(),
            Value::I128(v) => v.to_string().into(),
        }
    }
}

/// A record decoded against its callsite.
struct Decoded<'a> {
    metadata: Option<&'static Metadata<'static>>,
    /// Span names, outermost first (`?` for an unknown callsite).
    spans: Vec<&'static str>,
    fields: Vec<(&'static str, Value<'a>)>,
    /// The record was cut short or malformed (never by this writer's own producers).
    corrupt: bool,
}

/// Reads little-endian values off the front of a record.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn text(&mut self) -> Option<&'a str> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        // Rendered values are valid UTF-8 (written by `fmt`); a `&str` was too.
        std::str::from_utf8(self.take(len)?).ok()
    }
}

impl<'a> Decoded<'a> {
    fn parse(
        data: &'a [u8],
        callsites: &RwLock<HashMap<usize, &'static Metadata<'static>>>,
    ) -> Self {
        let callsites = callsites.read().unwrap_or_else(|p| p.into_inner());
        let lookup = |address: u64| callsites.get(&(address as usize)).copied();
        let mut decoded = Decoded {
            metadata: None,
            spans: Vec::new(),
            fields: Vec::new(),
            corrupt: false,
        };
        let mut r = Reader(data);
        let parsed = (|| {
            decoded.metadata = lookup(r.u64()?);
            for _ in 0..r.u8()? {
                let _id = r.u64()?;
                decoded
                    .spans
                    .push(lookup(r.u64()?).map_or("?", |m| m.name()));
            }
            while !r.0.is_empty() {
                let index = usize::from(r.u8()?);
                let value = match r.u8()? {
                    TAG_U64 => Value::U64(u64::from_le_bytes(r.array()?)),
                    TAG_I64 => Value::I64(i64::from_le_bytes(r.array()?)),
                    TAG_F64 => Value::F64(f64::from_le_bytes(r.array()?)),
                    TAG_BOOL => Value::Bool(r.u8()? != 0),
                    TAG_STR => Value::Str(r.text()?),
                    TAG_RENDERED => Value::Rendered(r.text()?),
                    TAG_U128 => Value::U128(u128::from_le_bytes(r.array()?)),
                    TAG_I128 => Value::I128(i128::from_le_bytes(r.array()?)),
                    _ => return None,
                };
                let name = decoded
                    .metadata
                    .and_then(|m| m.fields().iter().nth(index))
                    .map_or("?", |f| f.name());
                decoded.fields.push((name, value));
            }
            Some(())
        })();
        decoded.corrupt = parsed.is_none();
        decoded
    }

    fn level(&self) -> &'static str {
        match self.metadata.map(|m| *m.level()) {
            Some(Level::TRACE) => "TRACE",
            Some(Level::DEBUG) => "DEBUG",
            Some(Level::INFO) => "INFO",
            Some(Level::WARN) => "WARN",
            Some(Level::ERROR) => "ERROR",
            None => "?",
        }
    }

    fn target(&self) -> &'static str {
        self.metadata.map_or("?", |m| m.target())
    }

    /// `timestamp LEVEL span1:span2: target: message k=v …`
    fn write_full(&self, line: &mut Vec<u8>, wall: SystemTime, cpu: usize) {
        let _ = write!(
            line,
            "{} {:>5} ",
            humantime::format_rfc3339_micros(wall),
            self.level()
        );
        if !self.spans.is_empty() {
            let _ = write!(line, "{}: ", self.spans.join(":"));
        }
        let _ = write!(line, "{}:", self.target());
        for (name, value) in &self.fields {
            let _ = match (name, value) {
                (&"message", Value::Str(v)) => write!(line, " {v}"),
                (&"message", v) => write!(line, " {v}"),
                (name, v) => write!(line, " {name}={v}"),
            };
        }
        if self.corrupt {
            let _ = write!(line, " [corrupt record from CPU {cpu}]");
        }
        line.push(b'\n');
    }

    /// One JSON object.
    fn write_json(&self, line: &mut Vec<u8>, wall: SystemTime, cpu: usize) {
        let mut fields = serde_json::Map::new();
        for (name, value) in &self.fields {
            fields.insert((*name).to_owned(), value.to_json());
        }
        let mut object = serde_json::Map::new();
        object.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(wall).to_string().into(),
        );
        object.insert("level".into(), self.level().into());
        object.insert("fields".into(), fields.into());
        object.insert("target".into(), self.target().into());
        if !self.spans.is_empty() {
            let spans: Vec<serde_json::Value> = self
                .spans
                .iter()
                .map(|name| serde_json::json!({ "name": name }))
                .collect();
            object.insert("spans".into(), spans.into());
        }
        if self.corrupt {
            object.insert("corrupt_record_from_cpu".into(), cpu.into());
        }
        let _ = serde_json::to_writer(&mut *line, &object);
        line.push(b'\n');
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_core::Dispatch;
    use tracing_subscriber::prelude::*;

    /// Runs `f` on `threads` threads, each with `layer` as its subscriber.
    fn on_threads(layer: RingLayer, threads: usize, f: impl Fn(usize) + Sync) {
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
        std::thread::scope(|s| {
            for t in 0..threads {
                let (dispatch, f) = (&dispatch, &f);
                s.spawn(move || tracing_core::dispatcher::with_default(dispatch, || f(t)));
            }
        });
    }

    #[test]
    fn every_event_is_written_once_from_many_threads() {
        let out = SharedBuffer::default();
        // Room for every event (4 MiB per CPU), so that none should be dropped; a loaded
        // machine may still starve the writer, and then the counts must add up.
        let ring = RingConfig {
            sub_buffer_size: 64 << 10,
            sub_buffers: 64,
            ..RingConfig::default()
        };
        let (layer, guard) = Builder::new()
            .ring(ring)
            .format(Format::Json)
            .build(out.clone())
            .unwrap();
        // Fewer under valgrind, which runs the threads one at a time, slowly.
        let per_thread = if crate::tests::under_valgrind() {
            200
        } else {
            5_000
        };
        on_threads(layer, 4, |t| {
            for i in 0..per_thread {
                tracing::info!(thread = t as u64, seq = i, name = "x", "event");
            }
        });
        guard.sync();
        let stats = guard.stats();
        drop(guard);
        let mut seen = std::collections::HashSet::new();
        for line in out.text().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["target"] == "cpulocal::tracing" {
                continue; // a drop report
            }
            assert_eq!(v["fields"]["message"], "event", "{line}");
            assert_eq!(v["fields"]["name"], "x", "{line}");
            let key = (
                v["fields"]["thread"].as_u64().unwrap(),
                v["fields"]["seq"].as_u64().unwrap(),
            );
            assert!(seen.insert(key), "written twice: {line}");
        }
        assert_eq!(seen.len() as u64, stats.written, "{stats:?}");
        assert_eq!(stats.written + stats.dropped(), 4 * per_thread, "{stats:?}");
    }

    #[test]
    fn full_rings_drop_events_counted_and_reported() {
        let out = SharedBuffer::default();
        // Two sub-buffers of 256 bytes per CPU and a writer that rarely looks.
        let ring = RingConfig {
            sub_buffer_size: 256,
            sub_buffers: 2,
            ..RingConfig::default()
        };
        let (layer, guard) = Builder::new()
            .ring(ring)
            .idle_wait(Duration::from_secs(1))
            .flush_interval(Duration::from_secs(1))
            .build(out.clone())
            .unwrap();
        on_threads(layer, 2, |_| {
            for i in 0..400u64 {
                tracing::warn!(seq = i, "burst");
            }
        });
        guard.sync();
        let stats = guard.stats();
        drop(guard);
        assert!(stats.dropped_full > 0, "{stats:?}");
        assert_eq!(stats.written + stats.dropped(), 800, "{stats:?}");
        let text = out.text();
        let records = text.lines().filter(|l| l.contains(" burst seq=")).count() as u64;
        assert_eq!(records, stats.written);
        assert!(
            text.contains(&format!(
                "events dropped (in total: {} ring full, 0 too large",
                stats.dropped_full
            )),
            "{text}"
        );
    }

    #[test]
    fn an_event_larger_than_a_sub_buffer_is_counted() {
        let out = SharedBuffer::default();
        let ring = RingConfig {
            sub_buffer_size: 128,
            sub_buffers: 2,
            ..RingConfig::default()
        };
        let (layer, guard) = Builder::new().ring(ring).build(out.clone()).unwrap();
        on_threads(layer, 1, |_| {
            tracing::info!(big = "y".repeat(500).as_str(), "too big");
            tracing::info!("small");
        });
        guard.sync();
        assert_eq!(guard.stats().dropped_too_large, 1);
        assert_eq!(guard.stats().written, 1);
        drop(guard);
        assert!(
            out.text().contains("0 ring full, 1 too large"),
            "{}",
            out.text()
        );
    }

    /// A `tracing_subscriber::fmt` writer into a `SharedBuffer`.
    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SharedBuffer {
        type Writer = SharedBuffer;
        fn make_writer(&'a self) -> SharedBuffer {
            self.clone()
        }
    }

    #[test]
    fn fields_format_as_the_fmt_layer_formats_them() {
        let ours = SharedBuffer::default();
        let theirs = SharedBuffer::default();
        let (layer, guard) = layer(ours.clone());
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(theirs.clone())
            .with_ansi(false);
        let emit = || {
            // Span fields are not recorded (see the module documentation): none here.
            let _outer = tracing::info_span!("outer").entered();
            let _inner = tracing::debug_span!("inner").entered();
            let shown = vec![1, 2];
            tracing::warn!(
                target: "app::db",
                n = 3_u64,
                neg = -4_i64,
                f = 0.5,
                yes = false,
                s = "quo\"ted",
                dbg = ?shown,
                disp = %"as is",
                big = 1_u128 << 100,
                "message {}",
                7
            );
            tracing::error!("no fields");
        };
        let subscriber = tracing_subscriber::registry().with(layer).with(fmt);
        tracing::subscriber::with_default(subscriber, emit);
        drop(guard);
        let without_timestamps = |text: String| -> Vec<String> {
            text.lines()
                .map(|line| {
                    let (timestamp, rest) = line.split_once(' ').unwrap();
                    assert!(humantime::parse_rfc3339(timestamp).is_ok(), "{line}");
                    rest.to_owned()
                })
                .collect()
        };
        let ours = without_timestamps(ours.text());
        assert_eq!(ours, without_timestamps(theirs.text()));
        assert_eq!(
            ours[0],
            " WARN outer:inner: app::db: message 7 n=3 neg=-4 f=0.5 yes=false \
             s=\"quo\\\"ted\" dbg=[1, 2] disp=as is big=1267650600228229401496703205376"
        );
    }

    #[test]
    fn sync_waits_for_what_was_recorded_before_it() {
        let out = SharedBuffer::default();
        let (layer, guard) = Builder::new()
            .idle_wait(Duration::from_secs(10))
            .flush_interval(Duration::from_secs(10))
            .build(out.clone())
            .unwrap();
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
        tracing_core::dispatcher::with_default(&dispatch, || tracing::info!("one"));
        guard.sync();
        assert!(out.text().contains(" one\n"), "{}", out.text());
        assert_eq!(guard.stats().written, 1);
    }
}
