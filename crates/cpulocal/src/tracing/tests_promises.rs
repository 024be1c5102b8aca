//! The promises of the module's and its items' docs that `tests.rs` does not cover (kept
//! apart: that file is near the 800-line limit).

use super::*;
use tracing_subscriber::prelude::*;

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
