//! cpulocal counters behind the `metrics` facade, in front of an existing recorder.
//!
//! Four threads count requests with `metrics::counter!`; the counters handed out by
//! `PerCpuRecorder` add on the caller's CPU, and a flush moves the counts into the
//! wrapped recorder (here a minimal exporter that renders the Prometheus text format;
//! `PrometheusBuilder::new().build_recorder()` or any other recorder plugs in the same
//! way). The example checks that the exporter sees every increment exactly once.
//!
//! ```text
//! cargo run --release -p cpulocal --features metrics --example metrics_counter
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

const THREADS: u64 = 4;
const REQUESTS: u64 = 250_000;

/// Stands for your exporter: one `AtomicU64` per counter key, rendered as text.
#[derive(Clone, Default)]
struct TextExporter(Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>);

impl TextExporter {
    fn render(&self) -> String {
        let counters = self.0.lock().unwrap();
        counters
            .iter()
            .map(|(name, value)| format!("{name} {}\n", value.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Recorder for TextExporter {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.0.lock().unwrap();
        let name = format!("{}_total", key.name());
        Counter::from_arc(Arc::clone(counters.entry(name).or_default()))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn main() {
    let exporter = TextExporter::default();
    // The one line: per-CPU counters in front of the exporter, flushed every second
    // (and once more when `flush` is dropped).
    let flush = cpulocal::metrics::install(exporter.clone(), std::time::Duration::from_secs(1))
        .expect("no other global recorder");

    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                // Hold the handle in hot loops; `counter!` looks the key up each time.
                let requests = metrics::counter!("requests");
                for _ in 0..REQUESTS {
                    requests.increment(1);
                }
                metrics::counter!("batches").increment(1);
            });
        }
    });
    drop(flush); // the last flush

    let text = exporter.render();
    print!("{text}");
    assert!(text.contains(&format!("requests_total {}\n", THREADS * REQUESTS)));
    assert!(text.contains(&format!("batches_total {THREADS}\n")));
    println!("every increment reached the exporter exactly once");
}
