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
//! Each pair is a class of its own (its ratios are to its cpulocal row). The check reads
//! the value through the crate's own interface (`get`, the histogram's count and
//! buckets) and wants every operation counted.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::harness::{sum_check, GroupDef, Row, Subject, TargetSpec};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "ecosystem",
    uses_remote_scheme: true,
    rows,
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
    ]
}

/// What each row name stands for, for the legend under the table.
const LEGEND: [(&str, &str); 6] = [
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
];

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 2] = [
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
];
