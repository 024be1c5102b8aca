//! The producer side: [`RingLayer`]'s `Layer` impl, which encodes each event into a
//! binary record on the emitting thread and writes it into its CPU's ring.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::Write;

use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::subscriber::Interest;
use tracing_core::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::{
    RingLayer, TracingStats, TAG_BOOL, TAG_ERROR, TAG_F64, TAG_I128, TAG_I64, TAG_RENDERED,
    TAG_STR, TAG_U128, TAG_U64,
};
use crate::ring::ReserveError;

/// Spans beyond this depth are left out of a record.
const MAX_SPANS: usize = 32;

/// The entries of [`KNOWN`].
const KNOWN_SLOTS: usize = 64;

thread_local! {
    /// Where the calling thread encodes its events before the copy into the ring.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };

    /// Callsites this thread made known to a layer's writer, as (layer id, metadata
    /// address), direct-mapped by address: what spares an event the shared map's lock
    /// (see [`RingLayer::make_known`]). Layer ids start at 1, so the zeroed slots match
    /// nothing.
    static KNOWN: [Cell<(u64, usize)>; KNOWN_SLOTS] =
        const { [const { Cell::new((0, 0)) }; KNOWN_SLOTS] };
}

/// A span's field values, encoded once when the span is created (and appended to by
/// `Span::record`), kept in the span's extensions: each event inside the span copies
/// these bytes into its record.
struct SpanFields {
    /// The id of the [`RingLayer`] that encoded them: with two cpulocal layers on one
    /// subscriber, only one records.
    owner: u64,
    bytes: Vec<u8>,
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

    /// Renders `value` with its `Display` impl as u32 length and bytes.
    #[inline]
    fn rendered(&mut self, value: impl fmt::Display) {
        let at = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        // Writing into a Vec cannot fail; a Display impl that errors leaves what it wrote.
        let _ = write!(self.0, "{value}");
        let len = u32::try_from(self.0.len() - at - 4).unwrap_or(u32::MAX);
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
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

    /// The error and its source chain, each rendered on its own: the fmt format writes
    /// the chain as `error.sources=[..]`, the JSON format the error alone.
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.head(field, TAG_ERROR);
        let at = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        let mut error = Some(value);
        while let Some(e) = error {
            self.rendered(e);
            error = e.source();
        }
        let len = u32::try_from(self.0.len() - at - 4).unwrap_or(u32::MAX);
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.head(field, TAG_RENDERED);
        self.rendered(format_args!("{value:?}"));
    }
}

impl RingLayer {
    /// The counts so far (the [`WriterGuard`] has the same).
    ///
    /// [`WriterGuard`]: super::WriterGuard
    pub fn stats(&self) -> TracingStats {
        self.shared.stats()
    }

    /// The id that tells this layer's [`SpanFields`] (and cached callsites) from
    /// another's.
    fn owner(&self) -> u64 {
        self.shared.id
    }

    /// Makes sure the writer can decode `metadata` before a record names it.
    ///
    /// `register_callsite` alone is not enough: while one thread registers a callsite,
    /// tracing-core dispatches the same callsite's events on other threads (it answers
    /// `Interest::sometimes()` meanwhile), so an event can reach the layer before its
    /// callsite does, and the writer would print its record as `?`. Each thread checks
    /// its own cache first, so in the steady state this takes no shared lock.
    #[inline]
    fn make_known(&self, metadata: &'static Metadata<'static>) {
        let key = (self.owner(), metadata as *const Metadata<'static> as usize);
        // Metadata are at least 8-byte aligned: the bits above give the slot.
        let cached = KNOWN.try_with(|known| {
            let slot = &known[(key.1 >> 3) % KNOWN_SLOTS];
            if slot.get() != key {
                self.shared.learn(metadata);
                slot.set(key);
            }
        });
        if cached.is_err() {
            // During the thread's exit: no cache left.
            self.shared.learn(metadata);
        }
    }

    /// Encodes `event` into `buf` and writes it into the calling CPU's ring.
    #[inline]
    fn record<S>(&self, buf: &mut Vec<u8>, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        buf.clear();
        let metadata: &'static Metadata<'static> = event.metadata();
        self.make_known(metadata);
        buf.extend_from_slice(&(metadata as *const Metadata<'static> as u64).to_le_bytes());
        let count_at = buf.len();
        buf.push(0);
        if let Some(scope) = ctx.event_scope(event) {
            let mut spans = 0u8;
            for span in scope.from_root().take(MAX_SPANS) {
                buf.extend_from_slice(&span.id().into_u64().to_le_bytes());
                self.make_known(span.metadata());
                let callsite = span.metadata() as *const Metadata<'static> as u64;
                buf.extend_from_slice(&callsite.to_le_bytes());
                // The span's fields as encoded when it was created: copied, not formatted.
                // A span whose callsite declares no field has none to copy (the common
                // `info_span!("name")`): no look-up of its extensions.
                if span.metadata().fields().is_empty() {
                    buf.extend_from_slice(&0u32.to_le_bytes());
                } else {
                    let extensions = span.extensions();
                    let fields = extensions.get::<SpanFields>().map_or(&[][..], |f| &f.bytes);
                    let len = u32::try_from(fields.len()).unwrap_or(u32::MAX);
                    buf.extend_from_slice(&len.to_le_bytes());
                    buf.extend_from_slice(&fields[..len as usize]);
                }
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
        // Not the only way in: see `make_known`.
        self.shared.learn(metadata);
        Interest::always()
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if extensions.get_mut::<SpanFields>().is_none() {
            let mut bytes = Vec::new();
            attrs.record(&mut Encoder(&mut bytes));
            extensions.insert(SpanFields {
                owner: self.owner(),
                bytes,
            });
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            if fields.owner == self.owner() {
                // Appended, as the fmt layer appends: a field recorded twice shows twice.
                values.record(&mut Encoder(&mut fields.bytes));
            }
        }
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
