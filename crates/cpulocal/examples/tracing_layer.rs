//! `tracing` events recorded into cpulocal's per-CPU rings and formatted by a writer
//! thread, into a log file.
//!
//! Four threads emit `info!` events with three fields inside a span; the producers only
//! encode binary records, the writer thread formats them in the fmt layer's style. The
//! example prints the first lines of the file and the counts, and checks that every
//! event was written or counted as dropped.
//!
//! ```text
//! cargo run --release -p cpulocal --features tracing --example tracing_layer
//! ```

use std::io::{BufRead, BufReader};

use tracing_subscriber::prelude::*;

const THREADS: u64 = 4;
const EVENTS: u64 = 10_000;

fn main() {
    let path = std::env::temp_dir().join(format!("cpulocal-tracing-{}.log", std::process::id()));
    let file = std::fs::File::create(&path).expect("a log file in the temporary directory");
    // 4 MiB of ring per CPU: room for this burst (the producers outrun the writer, which
    // formats). With less, the overflow is dropped and counted, never blocking them.
    let ring = cpulocal::ring::RingConfig {
        sub_buffer_size: 64 << 10,
        sub_buffers: 64,
        ..Default::default()
    };
    let (layer, guard) = cpulocal::tracing::Builder::new()
        .ring(ring)
        .build(file)
        .expect("a valid ring configuration");
    tracing_subscriber::registry().with(layer).init();

    std::thread::scope(|s| {
        for worker in 0..THREADS {
            s.spawn(move || {
                let _span = tracing::info_span!("worker").entered();
                for seq in 0..EVENTS {
                    tracing::info!(worker, seq, ok = seq % 7 != 0, "request served");
                }
            });
        }
    });
    guard.sync(); // everything so far is in the file
    let stats = guard.stats();
    drop(guard);

    let lines = BufReader::new(std::fs::File::open(&path).expect("the log file"))
        .lines()
        .map(|l| l.expect("UTF-8 lines"))
        .collect::<Vec<_>>();
    for line in lines.iter().take(3) {
        println!("{line}");
    }
    let records = lines
        .iter()
        .filter(|l| l.contains(" request served "))
        .count() as u64;
    println!(
        "{} lines in {}; written {}, dropped {} (ring full {}, too large {})",
        lines.len(),
        path.display(),
        stats.written,
        stats.dropped(),
        stats.dropped_full,
        stats.dropped_too_large
    );
    assert_eq!(records, stats.written);
    assert_eq!(stats.written + stats.dropped(), THREADS * EVENTS);
    std::fs::remove_file(&path).ok();
}
