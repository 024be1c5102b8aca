//! The `ecosystem` group: cpulocal behind the crates people already instrument with,
//! against those crates' own defaults.
//!
//! - `metrics`: `metrics::Counter::increment(1)` on a handle made with
//!   `Counter::from_arc`, over a `cpulocal::Counter` or over the `AtomicU64` that
//!   `metrics` recorders hand out by default.
//! - `prometheus-client`: `inc()` on `cpulocal::prometheus::Counter` or on the built-in
//!   `Counter<u64, AtomicU64>`; `observe(v)` on `cpulocal::prometheus::Histogram` or on
//!   the built-in `Histogram` (an `RwLock` per observation), 10 buckets.
//!
//! - `tracing`: `tracing::info!(seq = i, user = "ada", ok = true, "request")` (a message
//!   and 3 fields) through `cpulocal::tracing`'s layer (binary records into per-CPU
//!   rings, formatted by its writer thread) or through `tracing_subscriber::fmt`'s layer
//!   writing to `tracing_appender::non_blocking` (formatted on the producer, sent as a
//!   line over a channel to its worker thread). Both write to a file in a temporary
//!   directory through a `BufWriter` (the appender's worker would otherwise make one
//!   `write` call per line) and a wrapper that counts the lines. Both drop events when
//!   full (the rings; the appender's channel of 128 000 lines, its default lossy mode)
//!   and count the drops; the check wants every event written or counted as dropped.
//!   The producer rows time the `info!` calls only. The end-to-end rows (`… e2e`) time
//!   each thread until everything emitted so far by every thread is written or dropped:
//!   their records/s is the rate the pipeline sustains.
//!
//! Each pair is a class of its own (its ratios are to its cpulocal row). The check reads
//! the value through the crate's own interface (`get`, the histogram's count and
//! buckets) and wants every operation counted.

use std::fs::File;
use std::hint::black_box;
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Dispatch;
use tracing_subscriber::layer::SubscriberExt;

use super::harness::{sum_check, GroupDef, Row, Subject, TargetSpec};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "ecosystem",
    uses_remote_scheme: true,
    rows,
    layout_rows: None,
    legend: &LEGEND,
    targets: &TARGETS,
    records_per_s: false,
    note: None,
    untimed: None,
};

/// A `metrics::Counter` handle and the value behind it, read back by `check`.
struct MetricsCounter<T> {
    value: Arc<T>,
    handle: metrics::Counter,
}

impl<T: metrics::CounterFn + Send + Sync + Default + 'static> MetricsCounter<T> {
    fn new() -> Self {
        let value = Arc::new(T::default());
        MetricsCounter {
            handle: metrics::Counter::from_arc(Arc::clone(&value)),
            value,
        }
    }
}

/// Reading back what a `metrics` counter counted.
trait Total {
    fn total(&self) -> u64;
    fn zero(&self);
}

impl Total for cpulocal::Counter {
    fn total(&self) -> u64 {
        self.sum()
    }
    fn zero(&self) {
        self.reset();
    }
}

impl Total for AtomicU64 {
    fn total(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
    fn zero(&self) {
        self.store(0, Ordering::Relaxed);
    }
}

impl<T: Total + Send + Sync> Subject for MetricsCounter<T> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            self.handle.increment(black_box(1));
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.value.zero();
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("the metrics counter", self.value.total(), expected)
    }
}

/// `cpulocal::prometheus::Counter::inc`.
#[derive(Default)]
struct PromCpulocal(cpulocal::prometheus::Counter);

impl Subject for PromCpulocal {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            black_box(&self.0).inc();
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.0 = Default::default();
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("Counter::get()", self.0.get(), expected)
    }
}

/// The built-in `prometheus_client` counter's `inc`.
#[derive(Default)]
struct PromBuiltIn(prometheus_client::metrics::counter::Counter);

impl Subject for PromBuiltIn {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            black_box(&self.0).inc();
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.0 = Default::default();
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("Counter::get()", self.0.get(), expected)
    }
}

/// The histograms' bucket bounds: 1, 2, 4, … 512.
fn bounds() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 10)
}

/// The value observed by operation `i`: spread over the buckets.
#[inline(always)]
fn observed(i: u64) -> f64 {
    (i % 1024) as f64
}

/// `cpulocal::prometheus::Histogram::observe`.
struct HistCpulocal(cpulocal::prometheus::Histogram);

impl Subject for HistCpulocal {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for i in 0..ops {
            self.0.observe(black_box(observed(i)));
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.0 = cpulocal::prometheus::Histogram::new(bounds());
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let (_, count, buckets) = self.0.get();
        sum_check("the histogram's count", count, expected)?;
        sum_check(
            "the histogram's buckets",
            buckets.iter().map(|b| b.1).sum(),
            expected,
        )
    }
}

/// The built-in `prometheus_client` histogram's `observe`. Read back through the text
/// encoding (its `get` is not public): the `_count` line.
struct HistBuiltIn(prometheus_client::metrics::histogram::Histogram);

impl Subject for HistBuiltIn {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for i in 0..ops {
            self.0.observe(black_box(observed(i)));
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.0 = prometheus_client::metrics::histogram::Histogram::new(bounds());
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("h", "", self.0.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .map_err(|e| format!("encoding failed: {e}"))?;
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix("h_count "))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no h_count in {text}"))?;
        sum_check("the histogram's count", count, expected)
    }
}

/// Lines written to a file: a `BufWriter<File>` that counts the newlines it is given.
struct CountedFile {
    out: BufWriter<File>,
    lines: Arc<AtomicU64>,
}

impl Write for CountedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        let lines = buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        // Release: pairs with the Acquire of the waits, which then see the bytes counted.
        self.lines.fetch_add(lines, Ordering::Release);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A file in a temporary directory, opened for appending (so that `reset` can empty it
/// under the writer's feet), and the line count of what is written to it.
struct TraceFile {
    _dir: tempfile::TempDir,
    file: File,
    lines: Arc<AtomicU64>,
}

impl TraceFile {
    fn new() -> TraceFile {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = File::options()
            .create(true)
            .append(true)
            .open(dir.path().join("trace.log"))
            .expect("a trace file in the temporary directory");
        TraceFile {
            _dir: dir,
            file,
            lines: Arc::default(),
        }
    }

    /// The writer a pipeline writes through.
    fn writer(&self) -> CountedFile {
        CountedFile {
            out: BufWriter::with_capacity(
                64 << 10,
                self.file.try_clone().expect("a second handle"),
            ),
            lines: Arc::clone(&self.lines),
        }
    }

    /// Empties the file (the bench writes a lot).
    fn empty(&self) {
        self.file.set_len(0).expect("the trace file can be emptied");
    }
}

/// How long a check waits for a pipeline to write what it was given.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until `done()` reaches `target`; `Err` after [`DRAIN_TIMEOUT`].
fn wait_for(what: &str, target: u64, done: impl Fn() -> u64) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let now = done();
        if now >= target {
            return Ok(());
        }
        if start.elapsed() > DRAIN_TIMEOUT {
            return Err(format!("{what}: {now} of {target} after {DRAIN_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The event both tracing pipelines record: a message and 3 fields.
#[inline(always)]
fn emit(i: u64) {
    tracing::info!(seq = i, user = "ada", ok = true, "request");
}

/// `info!` through `cpulocal::tracing`'s layer, its writer writing to a file.
struct TraceCpulocal {
    dispatch: Dispatch,
    guard: cpulocal::tracing::WriterGuard,
    file: TraceFile,
    /// Whether `work` also waits for the writer (end to end).
    end_to_end: bool,
    /// Events handled (written or dropped) before this run.
    handled_before: u64,
    dropped_before: u64,
    dropped_in_run: u64,
}

impl TraceCpulocal {
    fn new(end_to_end: bool) -> TraceCpulocal {
        let file = TraceFile::new();
        // 16 MiB per CPU: room for a run's events, so that the writer's pace rather than
        // the rings' size decides what is dropped.
        let ring = cpulocal::ring::RingConfig {
            sub_buffer_size: 64 << 10,
            sub_buffers: 256,
            ..Default::default()
        };
        let (layer, guard) = cpulocal::tracing::Builder::new()
            .ring(ring)
            .build(file.writer())
            .expect("a valid ring configuration");
        TraceCpulocal {
            dispatch: Dispatch::new(tracing_subscriber::registry().with(layer)),
            guard,
            file,
            end_to_end,
            handled_before: 0,
            dropped_before: 0,
            dropped_in_run: 0,
        }
    }

    fn handled(&self) -> u64 {
        let s = self.guard.stats();
        s.written + s.dropped()
    }
}

impl Subject for TraceCpulocal {
    #[inline(never)]
    fn work(&self, ops: u64) {
        tracing::dispatcher::with_default(&self.dispatch, || {
            for i in 0..ops {
                emit(black_box(i));
            }
        });
        if self.end_to_end {
            // Everything this thread emitted (and what others emitted before) is written.
            self.guard.sync();
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.guard.sync();
        self.file.empty();
        self.handled_before = self.handled();
        self.dropped_before = self.guard.stats().dropped();
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        self.guard.sync();
        let handled = self.handled() - self.handled_before;
        self.dropped_in_run = self.guard.stats().dropped() - self.dropped_before;
        sum_check("events written + dropped", handled, expected)
    }

    fn events(&self) -> Option<(u64, &'static str)> {
        Some((self.dropped_in_run, "events dropped (rings full)"))
    }
}

/// `info!` through the fmt layer into `tracing_appender::non_blocking`, its worker
/// writing to a file.
struct TraceAppender {
    dispatch: Dispatch,
    dropped: tracing_appender::non_blocking::ErrorCounter,
    _guard: tracing_appender::non_blocking::WorkerGuard,
    file: TraceFile,
    end_to_end: bool,
    /// Events emitted in this run, by all threads (for the end-to-end wait).
    emitted: AtomicU64,
    lines_before: u64,
    dropped_before: u64,
    dropped_in_run: u64,
}

impl TraceAppender {
    fn new(end_to_end: bool) -> TraceAppender {
        let file = TraceFile::new();
        let (writer, guard) = tracing_appender::non_blocking(file.writer());
        let dropped = writer.error_counter();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(false);
        TraceAppender {
            dispatch: Dispatch::new(tracing_subscriber::registry().with(fmt)),
            dropped,
            _guard: guard,
            file,
            end_to_end,
            emitted: AtomicU64::new(0),
            lines_before: 0,
            dropped_before: 0,
            dropped_in_run: 0,
        }
    }

    /// Events written or dropped so far.
    fn handled(&self) -> u64 {
        self.file.lines.load(Ordering::Acquire) + self.dropped.dropped_lines() as u64
    }
}

impl Subject for TraceAppender {
    #[inline(never)]
    fn work(&self, ops: u64) {
        tracing::dispatcher::with_default(&self.dispatch, || {
            for i in 0..ops {
                emit(black_box(i));
            }
        });
        if self.end_to_end {
            let emitted = self.emitted.fetch_add(ops, Ordering::AcqRel) + ops;
            let target = self.lines_before + self.dropped_before + emitted;
            wait_for("appender lines", target, || self.handled()).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.file.empty();
        *self.emitted.get_mut() = 0;
        self.lines_before = self.file.lines.load(Ordering::Acquire);
        self.dropped_before = self.dropped.dropped_lines() as u64;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let target = self.lines_before + self.dropped_before + expected;
        wait_for("appender lines + dropped", target, || self.handled())?;
        self.dropped_in_run = self.dropped.dropped_lines() as u64 - self.dropped_before;
        sum_check(
            "events written + dropped",
            self.handled() - self.lines_before - self.dropped_before,
            expected,
        )
    }

    fn events(&self) -> Option<(u64, &'static str)> {
        Some((self.dropped_in_run, "events dropped (channel full)"))
    }
}

fn rows(_notes: &mut Vec<String>) -> Vec<Row> {
    vec![
        Row::cpulocal(
            "metrics cpulocal",
            MetricsCounter::<cpulocal::Counter>::new(),
        ),
        Row::new("metrics AtomicU64", MetricsCounter::<AtomicU64>::new()),
        Row::cpulocal("prom cpulocal", PromCpulocal::default()).in_class(1),
        Row::new("prom Counter", PromBuiltIn::default()).in_class(1),
        Row::cpulocal(
            "prom cpulocal hist",
            HistCpulocal(cpulocal::prometheus::Histogram::new(bounds())),
        )
        .in_class(2),
        Row::new(
            "prom Histogram",
            HistBuiltIn(prometheus_client::metrics::histogram::Histogram::new(
                bounds(),
            )),
        )
        .in_class(2),
        Row::cpulocal("tracing cpulocal", TraceCpulocal::new(false)).in_class(3),
        Row::new("tracing appender", TraceAppender::new(false)).in_class(3),
        Row::cpulocal("tracing cpulocal e2e", TraceCpulocal::new(true))
            .in_class(4)
            .per_record(),
        Row::new("tracing appender e2e", TraceAppender::new(true))
            .in_class(4)
            .per_record(),
    ]
}

/// What each row name stands for, for the legend under the table.
const LEGEND: [(&str, &str); 10] = [
    (
        "metrics cpulocal",
        "metrics::Counter::from_arc(Arc<cpulocal::Counter>).increment(1)",
    ),
    (
        "metrics AtomicU64",
        "metrics::Counter::from_arc(Arc<AtomicU64>).increment(1) (recorders' default)",
    ),
    ("prom cpulocal", "cpulocal::prometheus::Counter::inc()"),
    (
        "prom Counter",
        "prometheus_client Counter<u64, AtomicU64>::inc() (built-in)",
    ),
    (
        "prom cpulocal hist",
        "cpulocal::prometheus::Histogram::observe(v), 10 buckets (per-CPU lock)",
    ),
    (
        "prom Histogram",
        "prometheus_client Histogram::observe(v), 10 buckets (built-in, RwLock)",
    ),
    (
        "tracing cpulocal",
        "info! with 3 fields into cpulocal::tracing's layer (binary record, per-CPU ring): producer time",
    ),
    (
        "tracing appender",
        "info! with 3 fields into fmt layer + tracing_appender::non_blocking: producer time",
    ),
    (
        "tracing cpulocal e2e",
        "as tracing cpulocal, each thread timed until the writer wrote (or dropped) everything",
    ),
    (
        "tracing appender e2e",
        "as tracing appender, each thread timed until the worker wrote (or dropped) everything",
    ),
];

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 3] = [
    TargetSpec {
        target: "metrics: cpulocal counter at least 3x faster than the default AtomicU64",
        threads: 2,
        numerator: "metrics AtomicU64",
        denominator: "metrics cpulocal",
        bound: 3.0,
        at_most: false,
    },
    TargetSpec {
        target: "prometheus-client: cpulocal counter at least 3x faster than the built-in",
        threads: 2,
        numerator: "prom Counter",
        denominator: "prom cpulocal",
        bound: 3.0,
        at_most: false,
    },
    TargetSpec {
        target:
            "tracing: producer cost of an event through cpulocal at most 0.5x tracing-appender's",
        threads: 2,
        numerator: "tracing cpulocal",
        denominator: "tracing appender",
        bound: 0.5,
        at_most: true,
    },
];
