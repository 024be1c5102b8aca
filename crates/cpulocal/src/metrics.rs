//! [`Counter`] behind the `metrics` facade (feature `metrics`).
//!
//! Two ways in:
//!
//! - **A handle you hold.** `Counter` implements [`metrics::CounterFn`], so
//!   `metrics::Counter::from_arc(Arc::new(cpulocal::Counter::new()))` is a
//!   `metrics::Counter` whose `increment` is one restartable add on the caller's CPU,
//!   where the recorders' default counter (`Arc<AtomicU64>`) is a `lock xadd` on one
//!   cache line shared by every thread.
//! - **In front of the recorder you already export with.** [`PerCpuRecorder`] wraps any
//!   [`Recorder`]: the counters it hands out add on the caller's CPU, and a flush
//!   ([`PerCpuRecorder::flusher`], or the thread [`install`] starts) moves what they
//!   counted into the wrapped recorder's own counters with [`Counter::take`], exactly
//!   (every increment reaches the wrapped counter once, at the latest one flush
//!   interval later). Gauges and histograms pass straight through. One line, with any
//!   exporter:
//!
//!   ```
//!   # let exporter = metrics::NoopRecorder; // e.g. PrometheusBuilder::new().build_recorder()
//!   let _flush = cpulocal::metrics::install(exporter, std::time::Duration::from_secs(1)).unwrap();
//!   metrics::counter!("requests").increment(1); // per CPU, flushed every second
//!   ```
//!
//! # What is exact, and what is not
//!
//! - `increment`: exact, always (the sum of a [`Counter`] counts every add once).
//! - `absolute(v)` ("at least `v`"): on a bare `Counter`, the sum is raised to `v` by
//!   adding the difference to what it reads; two `absolute` calls racing each other (or
//!   an `increment`) can both add, so the result can exceed `v`. It is exact when nothing
//!   else updates the counter meanwhile. Through [`PerCpuRecorder`], `absolute` first
//!   flushes the pending increments, then calls the wrapped counter's `absolute`: exact
//!   as far as the wrapped counter is, increments racing it land before or after.
//! - Gauges: not offered per CPU. `set` replaces the value, which per-CPU slots cannot do
//!   without stopping every other CPU's updates, and `f64` increments summed per CPU
//!   round differently from one running sum. [`PerCpuRecorder`] passes gauges through.
//! - Histograms: their storage belongs to the exporter (buckets, summaries, sketches),
//!   so [`PerCpuRecorder`] passes them through. For a per-CPU histogram with exact bucket
//!   counts, see `cpulocal::prometheus::Histogram` (feature `prometheus-client`).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use ::metrics::{
    CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SetRecorderError, SharedString,
    Unit,
};

use crate::Counter;

impl CounterFn for Counter {
    /// [`Counter::add`]: exact.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let requests = Arc::new(cpulocal::Counter::new());
    /// let handle = metrics::Counter::from_arc(Arc::clone(&requests));
    /// handle.increment(2);
    /// handle.increment(3);
    /// assert_eq!(requests.sum(), 5);
    /// ```
    #[inline]
    fn increment(&self, value: u64) {
        self.add(value);
    }

    /// Raises the sum to `value` when it is below. Not exact under concurrent updates:
    /// see the [module documentation](self).
    ///
    /// ```
    /// use metrics::CounterFn;
    /// let c = cpulocal::Counter::new();
    /// c.absolute(10);
    /// c.absolute(4); // never lowers
    /// assert_eq!(c.sum(), 10);
    /// ```
    fn absolute(&self, value: u64) {
        let current = self.sum();
        if value > current {
            self.add(value - current);
        }
    }
}

/// A counter of [`PerCpuRecorder`]: per-CPU increments, flushed into the wrapped
/// recorder's counter.
struct FlushedCounter {
    pending: Counter,
    inner: ::metrics::Counter,
}

impl FlushedCounter {
    /// Moves the pending increments into the wrapped counter, exactly.
    fn flush(&self) {
        let taken = self.pending.take();
        if taken > 0 {
            self.inner.increment(taken);
        }
    }
}

impl CounterFn for FlushedCounter {
    #[inline]
    fn increment(&self, value: u64) {
        self.pending.add(value);
    }

    fn absolute(&self, value: u64) {
        self.flush();
        self.inner.absolute(value);
    }
}

/// The counters a [`PerCpuRecorder`] handed out, by key.
type CounterMap = RwLock<HashMap<Key, Arc<FlushedCounter>>>;

/// A [`Recorder`] in front of another: its counters count per CPU, and
/// [`flush`](Flusher::flush) hands what they counted to the wrapped recorder's counters.
/// Gauges, histograms and descriptions go straight to the wrapped recorder.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
///
/// /// Stands for an exporter: every counter is one shared `AtomicU64`.
/// #[derive(Default)]
/// struct OneAtomic(Arc<AtomicU64>);
///
/// impl Recorder for OneAtomic {
///     fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
///     fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
///     fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
///     fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
///         Counter::from_arc(Arc::clone(&self.0))
///     }
///     fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
///         Gauge::noop()
///     }
///     fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
///         Histogram::noop()
///     }
/// }
///
/// let exported = OneAtomic::default();
/// let seen_by_exporter = Arc::clone(&exported.0);
/// let recorder = cpulocal::metrics::PerCpuRecorder::new(exported);
/// let flusher = recorder.flusher();
/// metrics::with_local_recorder(&recorder, || {
///     for _ in 0..1000 {
///         metrics::counter!("requests").increment(1);
///     }
/// });
/// assert_eq!(seen_by_exporter.load(Ordering::Relaxed), 0, "not flushed yet");
/// flusher.flush();
/// assert_eq!(seen_by_exporter.load(Ordering::Relaxed), 1000);
/// ```
pub struct PerCpuRecorder<R> {
    inner: R,
    counters: Arc<CounterMap>,
}

impl<R: Recorder> PerCpuRecorder<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        PerCpuRecorder {
            inner,
            counters: Arc::default(),
        }
    }

    /// The wrapped recorder.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// A handle that flushes this recorder's counters, usable after the recorder is
    /// installed (moved into the facade).
    pub fn flusher(&self) -> Flusher {
        Flusher {
            counters: Arc::clone(&self.counters),
        }
    }
}

impl<R: Recorder> Recorder for PerCpuRecorder<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> ::metrics::Counter {
        let known = self
            .counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        let counter = known.unwrap_or_else(|| {
            let mut map = self.counters.write().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(key.clone()).or_insert_with(|| {
                Arc::new(FlushedCounter {
                    pending: Counter::new(),
                    inner: self.inner.register_counter(key, metadata),
                })
            }))
        });
        ::metrics::Counter::from_arc(counter)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.inner.register_histogram(key, metadata)
    }
}

impl<R> fmt::Debug for PerCpuRecorder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counters = self.counters.read().map_or(0, |m| m.len());
        f.debug_struct("PerCpuRecorder")
            .field("counters", &counters)
            .finish_non_exhaustive()
    }
}

/// Flushes the counters of one [`PerCpuRecorder`] into its wrapped recorder.
#[derive(Clone)]
pub struct Flusher {
    counters: Arc<CounterMap>,
}

impl Flusher {
    /// Moves every counter's increments so far into the wrapped recorder's counters:
    /// each increment exactly once, whatever runs concurrently.
    pub fn flush(&self) {
        let counters: Vec<_> = self
            .counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        counters.iter().for_each(|c| c.flush());
    }
}

impl fmt::Debug for Flusher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flusher").finish_non_exhaustive()
    }
}

/// Installs `PerCpuRecorder::new(inner)` as the global recorder and starts a thread
/// that flushes it every `interval`. The returned guard stops that thread and flushes
/// one last time when dropped (keep it alive as long as metrics are recorded).
///
/// # Errors
///
/// When a global recorder is already installed (`inner` is handed back inside).
///
/// ```
/// use std::time::Duration;
/// let _first = cpulocal::metrics::install(metrics::NoopRecorder, Duration::from_secs(1));
/// // The process has a global recorder now: a second is refused, and handed back.
/// let refused = cpulocal::metrics::install(metrics::NoopRecorder, Duration::from_secs(1))
///     .unwrap_err()
///     .into_inner();
/// let _: &metrics::NoopRecorder = refused.inner();
/// ```
pub fn install<R: Recorder + Sync + 'static>(
    inner: R,
    interval: Duration,
) -> Result<FlushGuard, SetRecorderError<PerCpuRecorder<R>>> {
    let recorder = PerCpuRecorder::new(inner);
    let flusher = recorder.flusher();
    ::metrics::set_global_recorder(recorder)?;
    Ok(FlushGuard::start(flusher, interval))
}

/// Flushes a [`PerCpuRecorder`] every interval on a thread of its own; flushes once
/// more and stops that thread when dropped.
pub struct FlushGuard {
    flusher: Flusher,
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl FlushGuard {
    /// Starts flushing with `flusher` every `interval`.
    pub fn start(flusher: Flusher, interval: Duration) -> FlushGuard {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let thread = {
            let (flusher, stop) = (flusher.clone(), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("cpulocal-metrics-flush".into())
                .spawn(move || {
                    let (stopped, wake) = &*stop;
                    let mut stopped = stopped.lock().unwrap_or_else(|p| p.into_inner());
                    while !*stopped {
                        stopped = wake
                            .wait_timeout(stopped, interval)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        flusher.flush();
                    }
                })
                .expect("cannot start the metrics flush thread")
        };
        FlushGuard {
            flusher,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.flusher.flush();
    }
}

impl fmt::Debug for FlushGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlushGuard").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A recorder whose counters are one `AtomicU64` per key, as most exporters keep.
    #[derive(Clone, Default)]
    struct Atomics(Arc<Mutex<HashMap<Key, Arc<AtomicU64>>>>);

    impl Atomics {
        fn value(&self, name: &'static str) -> u64 {
            let map = self.0.lock().unwrap();
            map.get(&Key::from_static_name(name))
                .map_or(0, |v| v.load(Ordering::Relaxed))
        }
    }

    impl Recorder for Atomics {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> ::metrics::Counter {
            let mut map = self.0.lock().unwrap();
            ::metrics::Counter::from_arc(Arc::clone(map.entry(key.clone()).or_default()))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn flushes_hand_every_increment_to_the_wrapped_recorder_once() {
        let exported = Atomics::default();
        let recorder = PerCpuRecorder::new(exported.clone());
        let flusher = recorder.flusher();
        let handle = ::metrics::with_local_recorder(&recorder, || ::metrics::counter!("requests"));
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            // A flusher racing the increments: nothing may be lost or counted twice.
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    flusher.flush();
                }
            });
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..50_000).for_each(|_| handle.increment(1))))
                .collect();
            workers.into_iter().for_each(|w| w.join().unwrap());
            stop.store(true, Ordering::Relaxed);
        });
        flusher.flush();
        assert_eq!(exported.value("requests"), 200_000);
    }

    #[test]
    fn absolute_through_the_recorder_comes_after_the_pending_increments() {
        let exported = Atomics::default();
        let recorder = PerCpuRecorder::new(exported.clone());
        let handle = ::metrics::with_local_recorder(&recorder, || ::metrics::counter!("c"));
        handle.increment(7);
        handle.absolute(5);
        // The 7 reached the wrapped counter first; an AtomicU64's absolute is a max.
        assert_eq!(exported.value("c"), 7);
        handle.absolute(9);
        assert_eq!(exported.value("c"), 9);
    }

    #[test]
    fn one_key_is_one_counter() {
        let exported = Atomics::default();
        let recorder = PerCpuRecorder::new(exported.clone());
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::counter!("a").increment(1);
            ::metrics::counter!("a").increment(2);
            ::metrics::counter!("b").increment(4);
        });
        recorder.flusher().flush();
        assert_eq!((exported.value("a"), exported.value("b")), (3, 4));
    }

    #[test]
    fn the_flush_guard_flushes_when_dropped() {
        let exported = Atomics::default();
        let recorder = PerCpuRecorder::new(exported.clone());
        let guard = FlushGuard::start(recorder.flusher(), Duration::from_secs(3600));
        ::metrics::with_local_recorder(&recorder, || ::metrics::counter!("x").increment(5));
        drop(guard);
        assert_eq!(exported.value("x"), 5);
    }

    /// A recorder that notes its `describe_*` calls and keeps each gauge and histogram.
    #[derive(Clone, Default)]
    struct Noting {
        described: Arc<Mutex<Vec<String>>>,
        gauges: Arc<Mutex<HashMap<Key, Arc<AtomicU64>>>>,
        histograms: Arc<Mutex<HashMap<Key, Arc<Samples>>>>,
    }

    /// A histogram's samples, in order.
    #[derive(Default)]
    struct Samples(Mutex<Vec<f64>>);

    impl ::metrics::HistogramFn for Samples {
        fn record(&self, value: f64) {
            self.0.lock().unwrap().push(value);
        }
    }

    impl Noting {
        fn note(&self, what: &str, key: KeyName, unit: Option<Unit>, text: SharedString) {
            let line = format!("{what} {} {unit:?} {text}", key.as_str());
            self.described.lock().unwrap().push(line);
        }
    }

    impl Recorder for Noting {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, text: SharedString) {
            self.note("counter", key, unit, text);
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, text: SharedString) {
            self.note("gauge", key, unit, text);
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, text: SharedString) {
            self.note("histogram", key, unit, text);
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> ::metrics::Counter {
            ::metrics::Counter::noop()
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            let mut map = self.gauges.lock().unwrap();
            Gauge::from_arc(Arc::clone(map.entry(key.clone()).or_default()))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            let mut map = self.histograms.lock().unwrap();
            Histogram::from_arc(Arc::clone(map.entry(key.clone()).or_default()))
        }
    }

    /// "Gauges, histograms and descriptions go straight to the wrapped recorder": each
    /// update reaches it at once, exactly, with no flush; the descriptions as given.
    #[test]
    fn gauges_histograms_and_descriptions_go_straight_to_the_wrapped_recorder() {
        let inner = Noting::default();
        let recorder = PerCpuRecorder::new(inner.clone());
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::describe_counter!("c", Unit::Bytes, "counted");
            ::metrics::describe_gauge!("g", "gauged");
            ::metrics::describe_histogram!("h", Unit::Seconds, "timed");
            let gauge = ::metrics::gauge!("g", "k" => "v");
            gauge.set(2.5);
            gauge.increment(1.25);
            gauge.decrement(0.5);
            ::metrics::histogram!("h").record(0.1);
            ::metrics::histogram!("h").record(7.0);
        });
        assert_eq!(
            *inner.described.lock().unwrap(),
            [
                "counter c Some(Bytes) counted",
                "gauge g None gauged",
                "histogram h Some(Seconds) timed"
            ]
        );
        let key = Key::from_parts("g", vec![::metrics::Label::new("k", "v")]);
        let gauge = Arc::clone(&inner.gauges.lock().unwrap()[&key]);
        assert_eq!(f64::from_bits(gauge.load(Ordering::Relaxed)), 3.25);
        let samples = Arc::clone(&inner.histograms.lock().unwrap()[&Key::from_name("h")]);
        assert_eq!(*samples.0.lock().unwrap(), [0.1, 7.0]);
    }

    /// A key is its name and its labels: counters of one name with other labels are
    /// other counters, flushed each to its own wrapped counter.
    #[test]
    fn counters_with_other_labels_are_other_counters() {
        let exported = Atomics::default();
        let recorder = PerCpuRecorder::new(exported.clone());
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::counter!("req", "code" => "200").increment(3);
            ::metrics::counter!("req", "code" => "500").increment(1);
            ::metrics::counter!("req", "code" => "200").increment(2);
        });
        recorder.flusher().flush();
        let value = |code: &'static str| {
            let key = Key::from_parts("req", vec![::metrics::Label::new("code", code)]);
            exported.0.lock().unwrap()[&key].load(Ordering::Relaxed)
        };
        assert_eq!((value("200"), value("500")), (5, 1));
    }

    #[test]
    fn counter_fn_increments_exactly_from_many_threads() {
        let c = Arc::new(Counter::new());
        let handle = ::metrics::Counter::from_arc(Arc::clone(&c));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..25_000).for_each(|_| handle.increment(1)));
            }
        });
        assert_eq!(c.sum(), 100_000);
    }
}
