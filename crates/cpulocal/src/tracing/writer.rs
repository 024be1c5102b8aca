//! The writer thread: reads the rings, orders each batch by time, decodes the records
//! against their callsites and formats them (fmt style or JSON lines) into the output.

use std::collections::HashMap;
use std::fmt;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing_core::{Level, Metadata};

use crate::ring::{ReserveMark, PENDING_POLL};

use super::{
    Builder, Format, Shared, STALLED_RECORD_WAIT, TAG_BOOL, TAG_ERROR, TAG_F64, TAG_I128, TAG_I64,
    TAG_RENDERED, TAG_STR, TAG_U128, TAG_U64,
};

/// The bytes of formatted lines gathered before they are written to the output.
const OUT_BATCH_BYTES: usize = 64 << 10;

/// A record read from a ring, waiting in a batch to be ordered and formatted.
struct Pending {
    timestamp: u64,
    cpu: usize,
    start: usize,
    end: usize,
}

/// The writer thread's state.
pub(super) struct Writer<W: Write> {
    shared: Arc<Shared>,
    settings: Builder,
    out: W,
    /// Formatted lines not yet written to `out`, and the records among them: counted as
    /// written (or lost) once the write of these bytes and the flush after it returned.
    out_batch: Vec<u8>,
    out_batch_records: u64,
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, in ns, measured at the start.
    realtime_offset: i128,
    /// The bytes of the records of the batch being read.
    bytes: Vec<u8>,
    batch: Vec<Pending>,
    /// One formatted line.
    line: Vec<u8>,
    /// The drop counts last reported.
    reported: (u64, u64, u64),
    /// The stalled sub-buffers last reported.
    reported_stalled: u64,
    /// How far the stalled sub-buffers were counted (see [`RingBuffer::unread_below`]).
    ///
    /// [`RingBuffer::unread_below`]: crate::ring::RingBuffer::unread_below
    stalled_counted: ReserveMark,
}

impl<W: Write> Writer<W> {
    pub(super) fn new(shared: Arc<Shared>, settings: Builder, out: W) -> Self {
        let realtime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let realtime_offset = realtime - i128::from(crate::ring::monotonic_ns());
        Writer {
            shared,
            settings,
            out,
            out_batch: Vec::with_capacity(OUT_BATCH_BYTES),
            out_batch_records: 0,
            realtime_offset,
            bytes: Vec::new(),
            batch: Vec::new(),
            line: Vec::new(),
            reported: (0, 0, 0),
            reported_stalled: 0,
            stalled_counted: ReserveMark::default(),
        }
    }

    pub(super) fn run(mut self) {
        #[cfg(test)]
        self.shared.writer_tid.store(
            // SAFETY: gettid has no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_gettid) } as i32,
            Ordering::Release,
        );
        let mut last_flush = Instant::now();
        loop {
            let (stop, requested, done) = {
                let control = self.shared.control();
                (control.stop, control.syncs_requested, control.syncs_done)
            };
            if stop {
                let mut control = self.shared.control();
                control.stopped = true;
                drop(control);
                self.shared.done.notify_all();
            }
            if stop || requested > done {
                self.full_pass();
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
                // Sleep until a producer completes a sub-buffer, the next flush is due, or
                // `sync` / the guard's drop calls `notify`. The producers pay for this
                // only when they complete a sub-buffer (a fence, and a wake-up call only
                // while we sleep). A `notify` that lands between our look at `control`
                // and the start of the wait is missed: its caller notifies again.
                let due = self
                    .settings
                    .flush_interval
                    .saturating_sub(last_flush.elapsed());
                self.shared.ring.wait(due);
            }
        }
    }

    /// Reads every record reserved before the call, or counts its sub-buffer as stalled
    /// (below): hands over the sub-buffers being filled, then reads until every ring's
    /// consumer position reaches where its reserve position was at the start.
    ///
    /// A record reserved before that and not committed yet (its producer preempted
    /// between reserve and commit) keeps its sub-buffer incomplete, so the pass waits
    /// for it, looking again every [`PENDING_POLL`]. A producer that never commits (a
    /// thread stopped in a debugger there) would hold the pass forever, and the guard's
    /// drop with it: after [`STALLED_RECORD_WAIT`] without progress towards the mark
    /// (records read elsewhere do not count), the pass gives
    /// up and counts the sub-buffers it did not reach as stalled (their records come
    /// out later, if the writer still runs, or never).
    fn full_pass(&mut self) {
        let shared = Arc::clone(&self.shared);
        // Taken before the flush: the flush then closes the sub-buffers the mark ends in.
        let mark = shared.ring.reserve_mark();
        shared.ring.flush_all();
        let mut give_up = Instant::now() + STALLED_RECORD_WAIT;
        let mut short = usize::MAX;
        loop {
            self.pass();
            // The bound restarts only when records below the mark were read: reading
            // what other CPUs log meanwhile must not keep the pass waiting for ever.
            let now_short = shared.ring.short_of(&mark);
            if now_short == 0 {
                return;
            }
            if now_short < short {
                short = now_short;
                give_up = Instant::now() + STALLED_RECORD_WAIT;
            }
            if Instant::now() >= give_up {
                let stalled = shared.ring.unread_below(&mark, &mut self.stalled_counted);
                shared.stalled.fetch_add(stalled, Ordering::Relaxed);
                return;
            }
            // Woken early when a producer completes a sub-buffer.
            shared.ring.wait(PENDING_POLL);
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

    /// Adds `self.line`, which holds `records` records, to the lines to write out.
    fn emit_line(&mut self, records: u64) {
        self.out_batch.extend_from_slice(&self.line);
        self.out_batch_records += records;
        if self.out_batch.len() >= OUT_BATCH_BYTES {
            self.flush_out();
        }
    }

    /// Writes the gathered lines and flushes the output. Their records count as written
    /// only when both succeed: an output that accepts bytes into a buffer of its own
    /// and then fails to pass them on has not written them.
    fn flush_out(&mut self) {
        if self.out_batch.is_empty() {
            // Bytes an earlier flush failed to push out may still sit in the output's
            // own buffer (their records were counted as write errors then).
            let _ = self.out.flush();
        } else {
            let written = self.out.write_all(&self.out_batch).is_ok() && self.out.flush().is_ok();
            let records = std::mem::take(&mut self.out_batch_records);
            if written {
                self.shared.written.fetch_add(records, Ordering::Release);
            } else {
                self.shared
                    .write_errors
                    .fetch_add(records, Ordering::Relaxed);
            }
            self.out_batch.clear();
        }
    }

    fn wall_clock(&self, monotonic: u64) -> SystemTime {
        let ns = i128::from(monotonic) + self.realtime_offset;
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
    }

    /// Writes a `WARN` line when events were dropped, or sub-buffers stalled, since the
    /// last report.
    fn report_drops(&mut self) {
        let s = self.shared.stats();
        if s.stalled_sub_buffers != self.reported_stalled {
            let new = s.stalled_sub_buffers - self.reported_stalled;
            self.reported_stalled = s.stalled_sub_buffers;
            let message = format!(
                "{new} sub-buffers not read: a record reserved before them (or in them) was \
                 still not committed after {STALLED_RECORD_WAIT:?} without progress: their \
                 events come out late, or not at all if the writer stops (in total: {} \
                 stalled)",
                s.stalled_sub_buffers
            );
            self.warn(
                &message,
                serde_json::json!({ "stalled_sub_buffers": s.stalled_sub_buffers }),
            );
        }
        let now = (s.dropped_full, s.dropped_too_large, s.write_errors);
        if now == self.reported {
            return;
        }
        let new = (now.0 - self.reported.0) + (now.1 - self.reported.1) + (now.2 - self.reported.2);
        self.reported = now;
        let message = format!(
            "{new} events dropped (in total: {} ring full, {} too large, {} write errors)",
            now.0, now.1, now.2
        );
        let counts = serde_json::json!({
            "dropped": new,
            "dropped_full": now.0,
            "dropped_too_large": now.1,
            "write_errors": now.2,
        });
        self.warn(&message, counts);
    }

    /// Writes a `WARN` line of our own: `message`, and in JSON the fields of `counts`
    /// (an object) after it.
    fn warn(&mut self, message: &str, counts: serde_json::Value) {
        let wall = self.wall_clock(crate::ring::monotonic_ns());
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
                let mut fields = serde_json::Map::new();
                fields.insert("message".into(), message.into());
                if let serde_json::Value::Object(counts) = counts {
                    fields.extend(counts);
                }
                let object = serde_json::json!({
                    "timestamp": humantime::format_rfc3339_micros(wall).to_string(),
                    "level": "WARN",
                    "fields": fields,
                    "target": "cpulocal::tracing",
                });
                let _ = writeln!(self.line, "{object}");
            }
        }
        // A report is not a record: it is not counted as written.
        self.emit_line(0);
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
    /// An error of the field `field`: its rendering and its source chain's (see
    /// [`TAG_ERROR`]).
    Error {
        field: &'static str,
        chain: &'a [u8],
    },
}

impl fmt::Display for Value<'_> {
    /// As `tracing-subscriber`'s fmt layer shows a field value (`Debug`), strings quoted;
    /// an error as `error error.sources=[source, its source]` when it has sources, its
    /// texts escaped as the layer escapes them (see [`Escaping`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Error { field, chain } => {
                let mut texts = Reader(chain).texts();
                Escaping(&mut *f).write_str(texts.next().unwrap_or(""))?;
                if let Some(first) = texts.next() {
                    write!(f, " {field}.sources=[")?;
                    Escaping(&mut *f).write_str(first)?;
                    for source in texts {
                        f.write_str(", ")?;
                        Escaping(&mut *f).write_str(source)?;
                    }
                    f.write_str("]")?;
                }
                Ok(())
            }
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
            // The JSON format records an error with `Display`, as tracing-core's default
            // `record_error` does: no sources, no escaping (JSON escapes).
            Value::Error { chain, .. } => Reader(chain).texts().next().unwrap_or("").into(),
        }
    }
}

/// Escapes what `tracing-subscriber`'s fmt layer escapes in a message and an error's
/// texts, against terminal injection (its `EscapeGuard`, on by default): ESC, BEL, BS,
/// FF and DEL as `\x1b`, `\x07`, `\x08`, `\x0c`, `\x7f`, and the C1 controls
/// (U+0080 to U+009F) as `\u{80}`. Other control characters, newlines included, pass.
struct Escaping<W>(W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (at, c) in s.char_indices() {
            let escaped = matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            );
            if escaped {
                self.0.write_str(&s[plain..at])?;
                if c < '\u{80}' {
                    write!(self.0, "\\x{:02x}", c as u32)?;
                } else {
                    write!(self.0, "\\u{{{:x}}}", c as u32)?;
                }
                plain = at + c.len_utf8();
            }
        }
        self.0.write_str(&s[plain..])
    }
}

/// A line being formatted, as a `fmt::Write`.
struct LineWriter<'a>(&'a mut Vec<u8>);

impl fmt::Write for LineWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Field names (`?` for an unknown callsite) and values.
type Fields<'a> = Vec<(&'static str, Value<'a>)>;

/// A span in scope of an event, decoded against its callsite.
struct DecodedSpan<'a> {
    /// `?` for an unknown callsite.
    name: &'static str,
    fields: Fields<'a>,
}

/// A record decoded against its callsite.
struct Decoded<'a> {
    metadata: Option<&'static Metadata<'static>>,
    /// The spans in scope, outermost first.
    spans: Vec<DecodedSpan<'a>>,
    fields: Fields<'a>,
    /// The record was cut short or malformed (never by this writer's own producers).
    corrupt: bool,
}

/// Reads fields (index, tag, value) until `r` is empty, naming them after `metadata`'s.
fn parse_fields<'a>(
    r: &mut Reader<'a>,
    metadata: Option<&'static Metadata<'static>>,
    out: &mut Fields<'a>,
) -> Option<()> {
    while !r.0.is_empty() {
        let index = usize::from(r.u8()?);
        let name = metadata
            .and_then(|m| m.fields().iter().nth(index))
            .map_or("?", |f| f.name());
        let value = match r.u8()? {
            TAG_U64 => Value::U64(u64::from_le_bytes(r.array()?)),
            TAG_I64 => Value::I64(i64::from_le_bytes(r.array()?)),
            TAG_F64 => Value::F64(f64::from_le_bytes(r.array()?)),
            TAG_BOOL => Value::Bool(r.u8()? != 0),
            TAG_STR => Value::Str(r.text()?),
            TAG_RENDERED => Value::Rendered(r.text()?),
            TAG_U128 => Value::U128(u128::from_le_bytes(r.array()?)),
            TAG_I128 => Value::I128(i128::from_le_bytes(r.array()?)),
            TAG_ERROR => {
                let len = u32::from_le_bytes(r.array()?) as usize;
                let chain = r.take(len)?;
                // Checked here, so that formatting finds every text whole.
                let mut texts = Reader(chain);
                while !texts.0.is_empty() {
                    texts.text()?;
                }
                Value::Error { field: name, chain }
            }
            _ => return None,
        };
        out.push((name, value));
    }
    Some(())
}

/// Writes `fields` as the fmt layer does: `message` bare and escaped (see
/// [`Escaping`]), the others `name=value`, each after a space (but the first when
/// `leading_space` is false).
fn write_fields(line: &mut Vec<u8>, fields: &Fields<'_>, leading_space: bool) {
    for (i, (name, value)) in fields.iter().enumerate() {
        if leading_space || i > 0 {
            line.push(b' ');
        }
        // Writing into a Vec cannot fail.
        let _ = match (name, value) {
            (&"message", Value::Str(v)) => Escaping(LineWriter(line)).write_str(v),
            (&"message", v) => write!(Escaping(LineWriter(line)), "{v}"),
            (name, v) => write!(LineWriter(line), "{name}={v}"),
        };
    }
}

/// `fields` as a JSON object (a field recorded twice: the last value).
fn json_fields(fields: &Fields<'_>) -> serde_json::Map<String, serde_json::Value> {
    let mut object = serde_json::Map::new();
    for (name, value) in fields {
        object.insert((*name).to_owned(), value.to_json());
    }
    object
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

    /// The texts that fill the rest (an error's chain), until one is cut short.
    fn texts(mut self) -> impl Iterator<Item = &'a str> {
        std::iter::from_fn(move || self.text())
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
                let metadata = lookup(r.u64()?);
                let len = u32::from_le_bytes(r.array()?) as usize;
                let mut fields = Vec::new();
                parse_fields(&mut Reader(r.take(len)?), metadata, &mut fields)?;
                decoded.spans.push(DecodedSpan {
                    name: metadata.map_or("?", |m| m.name()),
                    fields,
                });
            }
            parse_fields(&mut r, decoded.metadata, &mut decoded.fields)
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

    /// `timestamp LEVEL span1{a=1}:span2: target: message k=v …`
    fn write_full(&self, line: &mut Vec<u8>, wall: SystemTime, cpu: usize) {
        let _ = write!(
            line,
            "{} {:>5} ",
            humantime::format_rfc3339_micros(wall),
            self.level()
        );
        for span in &self.spans {
            line.extend_from_slice(span.name.as_bytes());
            if !span.fields.is_empty() {
                line.push(b'{');
                write_fields(line, &span.fields, false);
                line.push(b'}');
            }
            line.push(b':');
        }
        if !self.spans.is_empty() {
            line.push(b' ');
        }
        let _ = write!(line, "{}:", self.target());
        write_fields(line, &self.fields, true);
        if self.corrupt {
            let _ = write!(line, " [corrupt record from CPU {cpu}]");
        }
        line.push(b'\n');
    }

    /// One JSON object, as `tracing-subscriber`'s JSON format writes it: `span` (the
    /// innermost span) and `spans` (outermost first) each with the span's fields and
    /// `name`.
    fn write_json(&self, line: &mut Vec<u8>, wall: SystemTime, cpu: usize) {
        let fields = json_fields(&self.fields);
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
                .map(|span| {
                    let mut object = json_fields(&span.fields);
                    object.insert("name".into(), span.name.into());
                    object.into()
                })
                .collect();
            object.insert("span".into(), spans[spans.len() - 1].clone());
            object.insert("spans".into(), spans.into());
        }
        if self.corrupt {
            object.insert("corrupt_record_from_cpu".into(), cpu.into());
        }
        let _ = serde_json::to_writer(&mut *line, &object);
        line.push(b'\n');
    }
}
