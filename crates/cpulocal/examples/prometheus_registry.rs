//! cpulocal's per-CPU counter and histogram in a `prometheus_client` registry.
//!
//! Four threads serve fake requests, counting them and observing their latency; the
//! registry then encodes both metrics in the OpenMetrics text format, exactly as it
//! encodes its built-in counter and histogram.
//!
//! ```text
//! cargo run --release -p cpulocal --features prometheus-client --example prometheus_registry
//! ```

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

const THREADS: u32 = 4;
const REQUESTS: u32 = 100_000;

fn main() {
    let requests = cpulocal::prometheus::Counter::default();
    let latency = cpulocal::prometheus::Histogram::new(exponential_buckets(0.001, 4.0, 6));
    let mut registry = Registry::default();
    registry.register("requests", "Requests served", requests.clone());
    registry.register(
        "latency_seconds",
        "Time to serve a request",
        latency.clone(),
    );

    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (requests, latency) = (&requests, &latency);
            s.spawn(move || {
                for i in 0..REQUESTS {
                    requests.inc();
                    // A made-up latency between 0.5 ms and ~1 s.
                    latency.observe(0.0005 * f64::from(1 + (i * 7 + t) % 2000));
                }
            });
        }
    });

    let mut text = String::new();
    encode(&mut text, &registry).expect("encoding into a String");
    print!("{text}");
    let total = u64::from(THREADS * REQUESTS);
    assert!(text.contains(&format!("requests_total {total}\n")));
    assert!(text.contains(&format!("latency_seconds_count {total}\n")));
    assert!(text.contains(&format!("latency_seconds_bucket{{le=\"+Inf\"}} {total}\n")));
    println!("# every request counted and observed once");
}
