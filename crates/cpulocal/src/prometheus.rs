//! Per-CPU metrics for [`prometheus_client`] registries (feature `prometheus-client`).
//!
//! [`Counter`] and [`Histogram`] register in a
//! [`Registry`](prometheus_client::registry::Registry) like the built-in
//! `prometheus_client::metrics::counter::Counter` and `…::histogram::Histogram`, and
//! encode the same way (they call the same encoder methods). What changes is the update:
//!
//! - [`Counter::inc`] is one restartable add on the caller's CPU (a
//!   [`crate::Counter`]), where the built-in counter is a `lock xadd` on one shared
//!   cache line. Exact: every increment is in the encoded value once the incrementing
//!   thread is synchronised with the scrape, and in a later scrape otherwise.
//! - [`Histogram::observe`] updates the caller's CPU's slot (sum, count, bucket) under
//!   that CPU's per-CPU lock ([`PerCpu::with_cpu`]), where the built-in histogram takes
//!   one `RwLock` for writing. Bucket counts and the count are exact; the sum adds the
//!   same values in another order (floating-point addition is not associative, and the
//!   built-in one's order is the threads' arrival order anyway). A scrape reads each
//!   CPU's slot under its lock: every slot is consistent, the total is a sum of
//!   per-slot snapshots taken one after the other.
//!
//! ```
//! use prometheus_client::encoding::text::encode;
//! use prometheus_client::registry::Registry;
//!
//! let requests = cpulocal::prometheus::Counter::default();
//! let latency = cpulocal::prometheus::Histogram::new([0.01, 0.1, 1.0]);
//! let mut registry = Registry::default();
//! registry.register("requests", "Requests served", requests.clone());
//! registry.register("latency_seconds", "Time to serve", latency.clone());
//!
//! requests.inc();
//! latency.observe(0.05);
//!
//! let mut text = String::new();
//! encode(&mut text, &registry).unwrap();
//! assert!(text.contains("# TYPE requests counter\nrequests_total 1\n"), "{text}");
//! assert!(text.contains("latency_seconds_bucket{le=\"0.1\"} 1\n"), "{text}");
//! assert!(text.contains("latency_seconds_count 1\n"), "{text}");
//! ```

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::PerCpu;

/// A Prometheus counter counted per CPU. Clones share the count (as the built-in
/// counter's do).
///
/// ```
/// let c = cpulocal::prometheus::Counter::default();
/// let same = c.clone();
/// c.inc();
/// same.inc_by(4);
/// assert_eq!(c.get(), 5);
/// ```
#[derive(Clone, Default)]
pub struct Counter {
    count: Arc<crate::Counter>,
}

impl Counter {
    /// Adds 1.
    #[inline]
    pub fn inc(&self) {
        self.count.add(1);
    }

    /// Adds `v`.
    #[inline]
    pub fn inc_by(&self, v: u64) {
        self.count.add(v);
    }

    /// The count: exact once the incrementing threads are synchronised with the caller.
    pub fn get(&self) -> u64 {
        self.count.sum()
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counter")
            .field("value", &self.get())
            .finish()
    }
}

/// One CPU's part of a [`Histogram`].
#[derive(Debug)]
struct HistogramSlot {
    sum: f64,
    count: u64,
    /// Observations per bucket (not cumulative), in the order of the upper bounds.
    buckets: Box<[u64]>,
}

/// A Prometheus histogram kept per CPU. Clones share the data.
///
/// Buckets as the built-in one's: the upper bounds given, then a last one encoded as
/// `+Inf` whose bound is `f64::MAX`; an observation counts in the first bucket whose
/// bound is at least the value. So a NaN and `f64::INFINITY` count in no bucket (as in
/// the built-in histogram), but in the count and the sum: the `+Inf` bucket then falls
/// short of the count.
///
/// ```
/// let h = cpulocal::prometheus::Histogram::new([1.0, 2.0]);
/// h.observe(0.5);
/// h.observe(1.5);
/// h.observe(9.0);
/// let (sum, count, buckets) = h.get();
/// assert_eq!((sum, count), (11.0, 3));
/// assert_eq!(buckets, [(1.0, 1), (2.0, 1), (f64::MAX, 1)]);
/// ```
#[derive(Clone)]
pub struct Histogram {
    bounds: Arc<[f64]>,
    slots: Arc<PerCpu<HistogramSlot>>,
}

impl Histogram {
    /// A histogram with these bucket upper bounds (ascending), plus `+Inf`.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Histogram {
        let bounds: Arc<[f64]> = bounds
            .into_iter()
            .chain(std::iter::once(f64::MAX))
            .collect();
        let n = bounds.len();
        Histogram {
            bounds,
            slots: Arc::new(PerCpu::new(|_| HistogramSlot {
                sum: 0.0,
                count: 0,
                buckets: vec![0; n].into_boxed_slice(),
            })),
        }
    }

    /// Records `v` in the caller's CPU's slot.
    #[inline]
    pub fn observe(&self, v: f64) {
        let bucket = self.bounds.iter().position(|&bound| bound >= v);
        self.slots.with_cpu(|slot| {
            slot.sum += v;
            slot.count += 1;
            if let Some(i) = bucket {
                slot.buckets[i] += 1;
            }
        });
    }

    /// The sum, the count and each bucket's upper bound and count (not cumulative), as
    /// the built-in histogram reports them: every CPU's slot read under its lock and
    /// added up.
    pub fn get(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum = 0.0;
        let mut count = 0;
        let mut buckets: Vec<(f64, u64)> = self.bounds.iter().map(|&b| (b, 0)).collect();
        self.slots.for_each(|_, slot| {
            sum += slot.sum;
            count += slot.count;
            for (total, n) in buckets.iter_mut().zip(slot.buckets.iter()) {
                total.1 += n;
            }
        });
        (sum, count, buckets)
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let (sum, count, buckets) = self.get();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sum, count, buckets) = self.get();
        f.debug_struct("Histogram")
            .field("sum", &sum)
            .field("count", &count)
            .field("buckets", &buckets)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    /// The text a registry holding `metric` under `name` encodes to.
    fn encoded(name: &str, metric: impl prometheus_client::registry::Metric) -> String {
        let mut registry = Registry::default();
        registry.register(name, "help", metric);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn counter_encodes_like_the_built_in_counter() {
        let ours = Counter::default();
        let theirs = prometheus_client::metrics::counter::Counter::<u64>::default();
        ours.inc_by(41);
        ours.inc();
        theirs.inc_by(42);
        assert_eq!(encoded("c", ours), encoded("c", theirs));
    }

    #[test]
    fn histogram_encodes_like_the_built_in_histogram() {
        let bounds = [0.5, 1.0, 4.0];
        let ours = Histogram::new(bounds);
        let theirs = prometheus_client::metrics::histogram::Histogram::new(bounds);
        for v in [0.1, 0.5, 0.7, 3.0, 4.0, 100.0, f64::NAN, -1.0] {
            ours.observe(v);
            theirs.observe(v);
        }
        assert_eq!(encoded("h", ours), encoded("h", theirs));
    }

    /// The last bucket's bound is `f64::MAX`, not infinity: an infinite observation
    /// counts in no bucket, as in the built-in histogram (the docs said "one without
    /// bound", which it is not).
    #[test]
    fn an_infinite_observation_counts_in_no_bucket_as_in_the_built_in_histogram() {
        let ours = Histogram::new([1.0]);
        let theirs = prometheus_client::metrics::histogram::Histogram::new([1.0]);
        for v in [f64::INFINITY, f64::NEG_INFINITY, f64::MAX] {
            ours.observe(v);
            theirs.observe(v);
        }
        let (_, count, buckets) = ours.get();
        assert_eq!(count, 3);
        assert_eq!(buckets, [(1.0, 1), (f64::MAX, 1)]);
        assert_eq!(encoded("h", ours), encoded("h", theirs));
    }

    #[test]
    fn counts_are_exact_from_many_threads() {
        let counter = Counter::default();
        let histogram = Histogram::new([1.0, 2.0]);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (counter, histogram) = (&counter, &histogram);
                s.spawn(move || {
                    for i in 0..20_000u32 {
                        counter.inc();
                        histogram.observe(f64::from((i + t) % 3));
                    }
                });
            }
        });
        assert_eq!(counter.get(), 80_000);
        let (_, count, buckets) = histogram.get();
        assert_eq!(count, 80_000);
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 80_000);
        // Values 0 and 1 fall in the first bucket, 2 in the second.
        let twos = (0..4u32)
            .flat_map(|t| (0..20_000u32).map(move |i| (i + t) % 3))
            .filter(|&v| v == 2)
            .count() as u64;
        assert_eq!((buckets[0].1, buckets[1].1), (80_000 - twos, twos));
    }
}
