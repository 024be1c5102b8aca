//! `cpulocal bench --plot FILE.svg`: the run as a chart. One panel per thread count,
//! side by side; in each, one horizontal bar per row, in the order of the table (group
//! by group), its length the median ns/op on a log scale, the value at its end. The
//! cpulocal rows (the ones the ratios are taken to) are drawn in red, the others in grey.
//! SVG only, drawn by `plotters` without any system library.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::RowResult;

/// The colour of the cpulocal rows.
const CPULOCAL: RGBColor = RGBColor(200, 30, 45);
/// The colour of the other rows.
const OTHER: RGBColor = RGBColor(130, 140, 155);
/// Pixels per bar.
const ROW_HEIGHT: u32 = 22;

/// The label of a row in the chart: `group: row`.
fn label(r: &RowResult) -> String {
    format!("{}: {}", r.group, r.name)
}

/// Draws `results` into the SVG file `path`, with `title` above the panels.
///
/// # Errors
///
/// No results, or a failure to draw or to write the file.
pub fn plot(results: &[RowResult], title: &str, path: &Path) -> Result<(), String> {
    let mut threads: Vec<usize> = results.iter().map(|r| r.threads).collect();
    threads.dedup();
    threads.sort_unstable();
    threads.dedup();
    if threads.is_empty() {
        return Err("no rows to plot".into());
    }
    let rows_per_panel = threads
        .iter()
        .map(|&t| results.iter().filter(|r| r.threads == t).count())
        .max()
        .unwrap_or(0) as u32;
    let label_chars = results.iter().map(|r| label(r).len()).max().unwrap_or(10) as u32;
    let label_width = 40 + label_chars * 7;
    let panel_width = label_width + 480;
    let size = (
        panel_width * threads.len() as u32,
        rows_per_panel * ROW_HEIGHT + 140,
    );
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 18))?;
        let panels = root.split_evenly((1, threads.len()));
        // One scale for every panel, so that bars compare across thread counts.
        let finite = results
            .iter()
            .map(|r| r.ns_per_op)
            .filter(|v| v.is_finite() && *v > 0.0);
        let lo = finite.clone().fold(f64::INFINITY, f64::min) / 2.0;
        let hi = finite.fold(0.0, f64::max) * 8.0;
        for (panel, &t) in panels.iter().zip(&threads) {
            let rows: Vec<&RowResult> = results.iter().filter(|r| r.threads == t).collect();
            let n = rows.len();
            // Segment 0 is at the bottom: the first row goes to the top.
            let segment = |i: usize| n - 1 - i;
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    format!("{t} thread{}", if t == 1 { "" } else { "s" }),
                    ("sans-serif", 16),
                )
                .margin(8)
                .x_label_area_size(36)
                .y_label_area_size(label_width)
                .build_cartesian_2d((lo..hi).log_scale(), (0..n).into_segmented())?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(n)
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(s) if *s < n => label(rows[n - 1 - s]),
                    _ => String::new(),
                })
                .x_desc("ns/op (median, log scale)")
                .label_style(("sans-serif", 12))
                .draw()?;
            chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
                let colour = if r.cpulocal { CPULOCAL } else { OTHER };
                let s = segment(i);
                let mut bar = Rectangle::new(
                    [
                        (lo, SegmentValue::Exact(s)),
                        (r.ns_per_op.max(lo), SegmentValue::Exact(s + 1)),
                    ],
                    colour.filled(),
                );
                bar.set_margin(3, 3, 0, 0);
                bar
            }))?;
            chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
                Text::new(
                    format!(" {:.1}", r.ns_per_op),
                    (r.ns_per_op.max(lo), SegmentValue::CenterOf(segment(i))),
                    TextStyle::from(("sans-serif", 11).into_font())
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                )
            }))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("cannot draw {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        group: &'static str,
        name: &'static str,
        cpulocal: bool,
        threads: usize,
        ns: f64,
    ) -> RowResult {
        RowResult {
            group,
            name,
            cpulocal,
            threads,
            ns_per_op: ns,
            min_ns_per_op: ns,
            ratio_to_cpulocal: 1.0,
            runs: 1,
            ops_per_thread: 1,
            records_per_s: None,
            events: None,
            note: None,
        }
    }

    #[test]
    fn the_plot_has_a_bar_per_row_and_the_cpulocal_rows_in_red() {
        let results = [
            row("counter", "Counter::add", true, 1, 1.5),
            row("counter", "mutex", false, 1, 20.0),
            row("counter", "Counter::add", true, 2, 1.6),
            row("counter", "mutex", false, 2, 90.0),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        plot(&results, "test", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in [
            "counter: Counter::add",
            "counter: mutex",
            "1 thread",
            "2 threads",
            " 90.0",
        ] {
            assert!(svg.contains(text), "no {text:?} in the plot");
        }
        let red = format!("#{:02X}{:02X}{:02X}", CPULOCAL.0, CPULOCAL.1, CPULOCAL.2);
        let grey = format!("#{:02X}{:02X}{:02X}", OTHER.0, OTHER.1, OTHER.2);
        assert_eq!(svg.matches(&red).count(), 2, "one red bar per cpulocal row");
        assert_eq!(svg.matches(&grey).count(), 2, "one grey bar per other row");
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(plot(&[], "t", &dir.path().join("x.svg")).is_err());
    }
}
