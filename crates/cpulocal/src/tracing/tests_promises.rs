//! The promises of the module's and its items' docs that `tests.rs` does not cover (kept
//! apart: that file is near the 800-line limit).

use super::*;
use crate::ring::Mode;
use crate::tests::allowed_cpus;
use std::sync::mpsc;
use std::time::SystemTime;
use tracing_subscriber::prelude::*;

/// The time stamp that starts a Full line.
fn line_time(line: &str) -> SystemTime {
    let (timestamp, _) = line.split_once(' ').unwrap();
    humantime::parse_rfc3339(timestamp).unwrap()
}

/// `Builder::ring` keeps the ring's shape but not its mode or its timestamps: a full ring
/// discards the new record, and every record is stamped, whatever the caller asked.
#[test]
fn builder_ring_ignores_the_mode_and_the_timestamps_it_is_given() {
    let out = SharedBuffer::default();
    let ring = RingConfig {
        sub_buffer_size: 4096,
        sub_buffers: 4,
        mode: Mode::OverwriteOldest,
        timestamps: false,
    };
    let (layer, guard) = Builder::new().ring(ring).build(out.clone()).unwrap();
    let config = layer.shared.ring.config();
    assert_eq!(
        (config.mode, config.timestamps),
        (Mode::DiscardNewest, true),
        "{config:?}"
    );
    assert_eq!((config.sub_buffer_size, config.sub_buffers), (4096, 4));
    // Without time stamps the writer would date every record at its zero (boot time).
    // One second of slack for the clocks' offset, measured once by the writer.
    let before = SystemTime::now() - Duration::from_secs(1);
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || tracing::info!("stamped"));
    drop(guard);
    let text = out.text();
    let line = text.lines().find(|l| l.ends_with(" stamped")).expect(&text);
    assert!(line_time(line) >= before, "{line}");
}

/// "Records come out in time order within each batch": events recorded in turn on two
/// CPUs, read in one batch (the guard's drop, no periodic flush), come out in the order
/// they were recorded, not ring by ring.
#[test]
fn records_of_one_batch_come_out_in_time_order_across_cpus() {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!("skipped: needs two CPUs, has {cpus:?}");
        return;
    }
    let out = SharedBuffer::default();
    let (layer, guard) = Builder::new()
        .flush_interval(Duration::from_secs(3600))
        .build(out.clone())
        .unwrap();
    let dispatch = tracing_core::Dispatch::new(tracing_subscriber::registry().with(layer));
    const EVENTS: u64 = 20;
    // Each thread, pinned to its CPU, records when it holds the turn and passes it on:
    // every event is recorded (and stamped) after the one before it.
    let (to_a, a_turn) = mpsc::channel::<u64>();
    let (to_b, b_turn) = mpsc::channel::<u64>();
    std::thread::scope(|s| {
        for (cpu, turn, next) in [(cpus[0], a_turn, to_b), (cpus[1], b_turn, to_a.clone())] {
            let dispatch = &dispatch;
            s.spawn(move || {
                assert!(crate::tests::pin_to(cpu), "pinning to CPU {cpu}");
                tracing_core::dispatcher::with_default(dispatch, || {
                    for seq in turn.iter() {
                        if seq >= EVENTS {
                            let _ = next.send(seq);
                            return;
                        }
                        tracing::info!(seq, "turn");
                        let _ = next.send(seq + 1);
                    }
                });
            });
        }
        to_a.send(0).unwrap();
    });
    drop(guard);
    let text = out.text();
    let seqs: Vec<u64> = text
        .lines()
        .map(|l| l.rsplit_once("seq=").expect(&text).1.parse().unwrap())
        .collect();
    assert_eq!(seqs, (0..EVENTS).collect::<Vec<_>>(), "{text}");
}

/// `Format::Json`: an object per line with `timestamp` (RFC 3339), `level`, `fields`
/// (with `message`) and `target`, and nothing else outside spans.
#[test]
fn json_lines_hold_the_timestamp_the_level_the_fields_and_the_target() {
    let out = SharedBuffer::default();
    let (layer, guard) = Builder::new()
        .format(Format::Json)
        .build(out.clone())
        .unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        tracing::warn!(target: "app::db", n = 3_u64, "slow query");
    });
    drop(guard);
    let text = out.text();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().expect(&text)).unwrap();
    let keys: Vec<&str> = line.as_object().unwrap().keys().map(|k| &**k).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["fields", "level", "target", "timestamp"], "{text}");
    assert_eq!(line["level"], "WARN", "{text}");
    assert_eq!(line["target"], "app::db", "{text}");
    assert_eq!(
        line["fields"],
        serde_json::json!({ "message": "slow query", "n": 3 }),
        "{text}"
    );
    assert!(
        humantime::parse_rfc3339(line["timestamp"].as_str().unwrap()).is_ok(),
        "{text}"
    );
}

/// Spans deeper than 32 are left out: the 32 outermost are written, in Full and in JSON
/// (whose `span` is then the 32nd, the innermost one written).
#[test]
fn spans_deeper_than_32_are_left_out() {
    for format in [Format::Full, Format::Json] {
        let out = SharedBuffer::default();
        let (layer, guard) = Builder::new().format(format).build(out.clone()).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let spans: Vec<_> = (0..34_u64)
                .map(|depth| tracing::info_span!("s", depth).entered())
                .collect();
            tracing::info!("deep");
            drop(spans);
        });
        drop(guard);
        let text = out.text();
        let line = text.lines().next().expect(&text);
        match format {
            Format::Full => {
                let written: String = (0..32).map(|d| format!("s{{depth={d}}}:")).collect();
                assert!(line.contains(&format!(" {written} ")), "{line}");
                assert!(!line.contains("depth=32"), "{line}");
            }
            Format::Json => {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["spans"].as_array().unwrap().len(), 32, "{line}");
                assert_eq!(v["span"]["depth"], 31, "{line}");
            }
        }
    }
}
