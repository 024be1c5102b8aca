//! `cpulocal bench`: cpulocal measured side by side with what it replaces.
//!
//! # Method
//!
//! For each thread count and each [`Group`], every row is a *subject*: some state and
//! one operation. A *run* of a row starts `threads` threads, lets them all pass a
//! barrier, and has each perform the same number of operations in a tight loop
//! (results and operands go through [`black_box`](std::hint::black_box), so nothing is optimised away). Each
//! thread times its own loop; the run's ns/op is the mean of the threads' elapsed times
//! divided by the operations per thread.
//!
//! The operations per thread are calibrated once per row and thread count so that a run
//! lasts about [`Config::target_run`]. Then the rows are run interleaved (row A run 1,
//! row B run 1, …, row A run 2, …) so that a slow phase of the machine hits every row
//! alike, and each row reports the median of its runs (and the minimum).
//!
//! After every run (calibration included) the row's state is checked: the counters must
//! hold exactly `threads × ops`, a CPU number must be below the possible CPUs, a
//! container must hand back every item it was given exactly once, and a queue of records
//! must deliver every record that was not counted as discarded. A row that fails panics
//! with the group, the row and the numbers, so a broken primitive cannot hide behind a
//! good time.
//!
//! What a row needs before it can run (items to push, prefilled lists, a consumer
//! thread) is set up between runs, outside the timing; no row allocates in its loop
//! unless allocating is part of what it stands for (the records of a channel). Each
//! group's module says what its rows include.
//!
//! Every row's ratio is to the cpulocal row of its *class*: the group's one cpulocal row,

use core::fmt;
use core::str::FromStr;
use std::time::Duration;

use cpulocal::sys;
use serde::Serialize;

use harness::{calibrate, checked_run, median, GroupDef};
pub use plot::plot;

mod harness;

mod alloc;
mod counter;
mod cpu_number;
mod ecosystem;
mod lock;
pub mod memory;
mod plot;
mod remote;
mod ring;
mod stack;

/// A set of rows measured side by side, with one cpulocal row the others are compared to
/// (one per class of rows: in the `ring` group, one per record size). Each group is a
/// module of its own; [`Group::ALL`] lists them.
#[derive(Clone, Copy)]
pub struct Group(&'static GroupDef);

impl Group {
    /// Every group, in the order the bench runs them. A new group: its module, and one
    /// line here.
    pub const ALL: &'static [Group] = &[
        Group(&cpu_number::GROUP),
        Group(&counter::GROUP),
        Group(&stack::GROUP),
        Group(&lock::GROUP),
        Group(&remote::GROUP),
        Group(&ring::GROUP),
        Group(&ecosystem::GROUP),
        Group(&memory::GROUP),
        Group(&alloc::GROUP),
    ];

    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// Whether the group's cpulocal rows depend on [`cpulocal::remote_scheme`] (its
    /// fast paths check, or take, a per-CPU lock).
    fn uses_remote_scheme(self) -> bool {
        self.0.uses_remote_scheme
    }
}

impl PartialEq for Group {
    fn eq(&self, other: &Group) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Group {}

impl core::hash::Hash for Group {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Group").field(&self.name()).finish()
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Group {
    type Err = String;

    /// ```
    /// use cpulocal_cli::bench::Group;
    /// assert_eq!("counter".parse::<Group>().unwrap().name(), "counter");
    /// assert!("cpu".parse::<Group>().unwrap_err().contains("cpu-number"));
    /// ```
    fn from_str(s: &str) -> Result<Group, String> {
        Group::ALL
            .iter()
            .copied()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Group::ALL.iter().map(|g| g.name()).collect();
                format!(
                    "unknown group '{s}' (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// The help of `--group`: "Measure only this group: a, b or c"
pub fn group_help() -> String {
    let names: Vec<_> = Group::ALL.iter().map(|g| g.name()).collect();
    match names.split_last() {
        Some((last, [])) => format!("Measure only this group: {last}"),
        Some((last, rest)) => format!("Measure only this group: {} or {last}", rest.join(", ")),
        None => "Measure only this group".into(),
    }
}

/// A list of thread counts, as `--threads 1,2,4` gives it: each at least 1, in the
/// order given, duplicates removed.
///
/// ```
/// use cpulocal_cli::bench::ThreadCounts;
/// assert_eq!("1,2,2,4".parse::<ThreadCounts>().unwrap().0, vec![1, 2, 4]);
/// assert!("0".parse::<ThreadCounts>().is_err());
/// assert!("".parse::<ThreadCounts>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadCounts(pub Vec<usize>);

/// The most threads one row may start.
pub const MAX_THREADS: usize = 4096;

impl FromStr for ThreadCounts {
    type Err = String;

    fn from_str(s: &str) -> Result<ThreadCounts, String> {
        if s.trim().is_empty() {
            return Err("expected a comma-separated list of thread counts, e.g. 1,2,4".into());
        }
        let mut counts = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let n: usize = part.parse().map_err(|_| {
                format!("'{part}' is not a thread count (expected a list such as 1,2,4)")
            })?;
            if n == 0 {
                return Err("thread counts must be at least 1".into());
            }
            if n > MAX_THREADS {
                return Err(format!(
                    "{n} threads is more than the limit of {MAX_THREADS}"
                ));
            }
            if !counts.contains(&n) {
                counts.push(n);
            }
        }
        Ok(ThreadCounts(counts))
    }
}

/// The default thread counts: 1 and the number of online CPUs (once if that is 1).
pub fn default_threads() -> Vec<usize> {
    let online = sys::online_cpus().clamp(1, MAX_THREADS);
    if online == 1 {
        vec![1]
    } else {
        vec![1, online]
    }
}

/// What to measure, and how long.
#[derive(Clone, Debug)]
pub struct Config {
    /// Thread counts, each measured in turn.
    pub threads: Vec<usize>,
    /// Groups, each measured in turn for every thread count.
    pub groups: Vec<Group>,
    /// Runs per row (the median is reported).
    pub runs: usize,
    /// Wall time one run of one row aims at.
    pub target_run: Duration,
    /// The quick version (for CI): fewer, shorter runs, smaller memory scenarios.
    pub quick: bool,
    /// Thread counts of the command line that `--quick` lowered to [`quick_threads`].
    pub capped: Vec<usize>,
    /// Also measure the counter, stack and lock groups' cpulocal rows (and floors) in every
    /// caller shape: inlined in a tight loop, called through a function pointer, and
    /// with other work between operations (`--layout`).
    pub layout: bool,
}

/// The most threads a `--quick` run starts per row: 4 per online CPU (at least 8).
/// Every run starts its threads anew and gives each at least a thousand operations, so
/// thousands of threads would take minutes; `--quick` is for CI, which needs seconds.
pub fn quick_threads() -> usize {
    (4 * sys::online_cpus()).clamp(8, MAX_THREADS)
}

impl Config {
    /// The settings of the command line: `threads` defaults to [`default_threads`],
    /// `group` to all; `quick` (for CI) cuts the runs and their length, and caps the
    /// thread counts at [`quick_threads`] (listed in `capped`, and said in the
    /// [`header`]), so the whole bench takes a few seconds whatever `threads` says.
    pub fn new(threads: Option<Vec<usize>>, quick: bool, group: Option<Group>) -> Config {
        let mut threads = threads.unwrap_or_else(default_threads);
        let mut capped = Vec::new();
        if quick {
            let cap = quick_threads();
            capped = threads.iter().copied().filter(|&t| t > cap).collect();
            let mut lowered = Vec::new();
            for t in threads.iter().map(|&t| t.min(cap)) {
                if !lowered.contains(&t) {
                    lowered.push(t);
                }
            }
            threads = lowered;
        }
        Config {
            threads,
            capped,
            groups: group.map_or_else(|| Group::ALL.to_vec(), |g| vec![g]),
            runs: if quick { 3 } else { 7 },
            target_run: if quick {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(20)
            },
            quick,
            layout: false,
        }
    }

    /// The same, with every caller shape of the counter, stack and lock groups (`--layout`).
    pub fn with_layout(self, layout: bool) -> Config {
        Config { layout, ..self }
    }
}

/// The measurement of one row at one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct RowResult {
    /// The group's name.
    pub group: &'static str,
    /// The row's name.
    pub name: &'static str,
    /// Whether this is a cpulocal row its group's ratios are taken to (its ratio is 1).
    pub cpulocal: bool,
    /// Threads running the operation at once.
    pub threads: usize,
    /// Median over the runs of the per-thread time per operation, in ns.
    pub ns_per_op: f64,
    /// The fastest run's ns/op.
    pub min_ns_per_op: f64,
    /// `ns_per_op` divided by the cpulocal row's (below 1: faster than cpulocal); in the
    /// `ring` group, by the cpulocal row of the same record size.
    pub ratio_to_cpulocal: f64,
    /// How many runs the median is taken over.
    pub runs: usize,
    /// Operations each thread performed in each run.
    pub ops_per_thread: u64,
    /// Records per second, all threads together (`threads × 10⁹ / ns_per_op`): the rows
    /// whose operation is one record only (the `ring` group, and the end-to-end rows of
    /// the `ecosystem` group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records_per_s: Option<f64>,
    /// For rows that count something besides their time (records refused by a full
    /// ring, pops that found their CPU's list empty, …): the count over the measured
    /// runs. `note` says what it counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// What `events` counts when it is not 0, and in the `remote` group the active
    /// [`cpulocal::remote_scheme`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl RowResult {
    /// One JSON object, on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("RowResult serialises")
    }

    /// The width of the row-name column: the longest name (`with_cpu unchecked
    /// [call]`) with room for the cpulocal row's mark.
    pub const NAME_WIDTH: usize = 27;

    /// The heading of [`table_line`](Self::table_line)'s columns.
    pub fn table_heading() -> String {
        format!(
            "{:<11} {:<w$} {:>7} {:>10} {:>10} {:>11}",
            "group",
            "row",
            "threads",
            "ns/op",
            "min",
            "vs cpulocal",
            w = Self::NAME_WIDTH
        )
    }

    /// One line of the text table; the cpulocal row is marked with `*`; records/s and
    /// the note follow when the row has them.
    pub fn table_line(&self) -> String {
        let name = if self.cpulocal {
            format!("{} *", self.name)
        } else {
            self.name.to_string()
        };
        let mut line = format!(
            "{:<11} {:<w$} {:>7} {:>10.2} {:>10.2} {:>10.2}x",
            self.group,
            name,
            self.threads,
            self.ns_per_op,
            self.min_ns_per_op,
            self.ratio_to_cpulocal,
            w = Self::NAME_WIDTH
        );
        if let Some(r) = self.records_per_s {
            line += &format!(" {:>8.1} M records/s", r / 1e6);
        }
        if let Some(note) = &self.note {
            line += &format!("  ({note})");
        }
        line
    }
}

/// The line printed above the table: mechanism, kernel, CPUs, method; and a second line
/// with the remote scheme when a configured group depends on it.
pub fn header(config: &Config) -> String {
    let mut header = format!(
        "cpulocal bench: {}; kernel {}; {} online CPUs ({} possible); median of {} runs of ~{} ms per row",
        cpulocal::mechanism(),
        sys::kernel_release(),
        sys::online_cpus(),
        cpulocal::possible_cpus(),
        config.runs,
        config.target_run.as_millis(),
    );
    if config.groups.iter().any(|g| g.uses_remote_scheme()) {
        header += &format!("\nremote scheme: {}", cpulocal::remote_scheme());
    }
    if !config.capped.is_empty() {
        let list: Vec<String> = config.capped.iter().map(ToString::to_string).collect();
        header += &format!(
            "\n--quick: {} threads capped at {} (4 per online CPU, at least 8); measure them without --quick",
            list.join(","),
            quick_threads()
        );
    }
    header
}

/// The rows of `group` this machine cannot run, with the reason (e.g. a CPU without
/// `RDPID`). Rows that exist only on other architectures are not listed.
pub fn skipped_rows(group: Group) -> Vec<String> {
    let mut notes = Vec::new();
    (group.0.rows)(&mut notes);
    notes
}

/// Measures every configured group at every thread count, calling `report` with the
/// rows of each (thread count, group) as soon as they are measured, and returns them
/// all.
///
/// # Panics
///
/// When a row's state is wrong after a run (see the [module documentation](self)).
pub fn run(config: &Config, mut report: impl FnMut(&[RowResult])) -> Vec<RowResult> {
    let mut all = Vec::new();
    for &threads in &config.threads {
        for &group in &config.groups {
            let results = measure_group(group, threads, config);
            report(&results);
            all.extend(results);
        }
    }
    all
}

fn measure_group(group: Group, threads: usize, config: &Config) -> Vec<RowResult> {
    let mut rows = (group.0.rows)(&mut Vec::new());
    if config.layout {
        rows.extend(group.0.layout_rows.map(|extra| extra()).unwrap_or_default());
    }
    let ops: Vec<u64> = rows
        .iter_mut()
        .map(|row| calibrate(group.name(), row, threads, config.target_run))
        .collect();
    let mut samples = vec![Vec::with_capacity(config.runs); rows.len()];
    let mut events: Vec<Option<(u64, &'static str)>> = vec![None; rows.len()];
    for _ in 0..config.runs {
        for (i, row) in rows.iter_mut().enumerate() {
            samples[i].push(checked_run(group.name(), row, threads, ops[i]));
            if let Some((n, what)) = row.subject.events() {
                events[i].get_or_insert((0, what)).0 += n;
            }
        }
    }
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    let base = |class: usize| {
        rows.iter()
            .position(|r| r.cpulocal && r.class == class)
            .map(|i| medians[i])
            .expect("every class of rows has a cpulocal row")
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let mut note = Vec::new();
            if let Some(group_note) = group.0.note {
                note.push(group_note());
            }
            if let Some((n @ 1.., what)) = events[i] {
                note.push(format!("{n} {what} in {} runs", config.runs));
            }
            RowResult {
                group: group.name(),
                name: row.name,
                cpulocal: row.cpulocal,
                threads,
                ns_per_op: medians[i],
                min_ns_per_op: samples[i].iter().copied().fold(f64::INFINITY, f64::min),
                ratio_to_cpulocal: medians[i] / base(row.class),
                runs: config.runs,
                ops_per_thread: ops[i],
                records_per_s: (group.0.records_per_s || row.records)
                    .then(|| threads as f64 * 1e9 / medians[i]),
                events: events[i].map(|(n, _)| n),
                note: (!note.is_empty()).then(|| note.join("; ")),
            }
        })
        .collect()
}

/// One target from the issue, with what was measured. Reported, never asserted.
#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    /// What is promised.
    pub target: &'static str,
    /// The thread count the target is about.
    pub threads: usize,
    /// The measured ratio, `None` when the rows were not measured.
    pub measured: Option<f64>,
    /// `Some(true)`: met; `Some(false)`: missed; `None`: not measured.
    pub pass: Option<bool>,
}

impl fmt::Display for TargetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pass, self.measured) {
            (Some(pass), Some(m)) => write!(
                f,
                "{}  {} ({} thread{}): {m:.2}x",
                if pass { "PASS" } else { "MISS" },
                self.target,
                self.threads,
                if self.threads == 1 { "" } else { "s" }
            ),
            _ => write!(
                f,
                "----  {} ({} thread{}): not measured (needs that thread count and group)",
                self.target,
                self.threads,
                if self.threads == 1 { "" } else { "s" }
            ),
        }
    }
}

/// The targets of the issue, evaluated on `results`, group by group.
pub fn targets(results: &[RowResult]) -> Vec<TargetReport> {
    let ns = |group: Group, name: &str, threads: usize| {
        results
            .iter()
            .find(|r| r.group == group.name() && r.name == name && r.threads == threads)
            .map(|r| r.ns_per_op)
    };
    Group::ALL
        .iter()
        .flat_map(|&group| group.0.targets.iter().map(move |t| (group, t)))
        .map(|(group, t)| {
            let measured = ns(group, t.numerator, t.threads)
                .zip(ns(group, t.denominator, t.threads))
                .map(|(n, d)| n / d);
            TargetReport {
                target: t.target,
                threads: t.threads,
                measured,
                pass: measured.map(|m| {
                    if t.at_most {
                        m <= t.bound
                    } else {
                        m >= t.bound
                    }
                }),
            }
        })
        .collect()
}

/// The reports of the configured groups that are measured once rather than timed
/// (`memory`): `(text, JSON line)` each.
pub fn untimed_reports(config: &Config) -> Vec<(String, String)> {
    config
        .groups
        .iter()
        .filter_map(|g| g.0.untimed)
        .map(|report| report(config.quick))
        .collect()
}

/// What each row name stands for, for the legend under the table: the groups' legends
/// in group order, each name once.
pub fn legend() -> Vec<(&'static str, &'static str)> {
    let mut legend: Vec<(&'static str, &'static str)> = Vec::new();
    for group in Group::ALL {
        for &(name, what) in group.0.legend {
            if !legend.iter().any(|(n, _)| *n == name) {
                legend.push((name, what));
            }
        }
    }
    legend
}

#[cfg(test)]
mod tests {
    use super::*;
    use harness::{sum_check, Row, Subject};
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn thread_lists_reject_zero_words_and_empty_items() {
        assert_eq!("4".parse::<ThreadCounts>().unwrap().0, vec![4]);
        assert_eq!(" 2, 1 ,2".parse::<ThreadCounts>().unwrap().0, vec![2, 1]);
        for bad in ["", " ", "0", "x", "1,,2", "1,", "-1", "1.5", "1,0", "99999"] {
            assert!(bad.parse::<ThreadCounts>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn groups_parse_by_their_names() {
        for &g in Group::ALL {
            assert_eq!(g.name().parse::<Group>(), Ok(g));
        }
        assert!("cpu".parse::<Group>().is_err());
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn every_row_counts_exactly_on_two_threads() {
        for group in Group::ALL {
            for mut row in (group.0.rows)(&mut Vec::new()) {
                checked_run(group.name(), &mut row, 2, 10_000);
            }
        }
    }

    #[test]
    #[should_panic(expected = "bench row counter/broken is broken")]
    fn a_row_that_loses_updates_is_noticed() {
        struct Lossy(AtomicU64);
        impl Subject for Lossy {
            fn work(&self, ops: u64) {
                self.0.fetch_add(ops - 1, Ordering::Relaxed);
            }
            fn reset(&mut self, _threads: usize, _ops: u64) {}
            fn check(&mut self, expected: u64) -> Result<(), String> {
                sum_check("lossy", self.0.load(Ordering::Relaxed), expected)
            }
        }
        checked_run(
            "counter",
            &mut Row::new("broken", Lossy(AtomicU64::new(0))),
            1,
            10,
        );
    }

    #[test]
    fn every_class_has_one_cpulocal_row_and_every_row_a_legend_entry() {
        for group in Group::ALL {
            let mut rows = (group.0.rows)(&mut Vec::new());
            // With `--layout`, every shape is a class with its own cpulocal row too.
            rows.extend(group.0.layout_rows.map(|extra| extra()).unwrap_or_default());
            for class in rows.iter().map(|r| r.class) {
                assert_eq!(
                    rows.iter()
                        .filter(|r| r.cpulocal && r.class == class)
                        .count(),
                    1,
                    "{group} class {class}"
                );
            }
            for r in &rows {
                assert!(
                    group.0.legend.iter().any(|(n, _)| *n == r.name),
                    "{} has no legend",
                    r.name
                );
            }
        }
    }

    #[test]
    fn targets_compare_the_right_rows() {
        let row = |group: &'static str, name, threads, ns| RowResult {
            group,
            name,
            cpulocal: false,
            threads,
            ns_per_op: ns,
            min_ns_per_op: ns,
            ratio_to_cpulocal: 1.0,
            runs: 1,
            ops_per_thread: 1,
            records_per_s: None,
            events: None,
            note: None,
        };
        let results = [
            row("cpu-number", "current_cpu", 1, 1.0),
            row("cpu-number", "tls_load", 1, 0.5),
            row("counter", "Counter::add", 2, 1.0),
            row("counter", "shared_fetch_add", 2, 10.0),
            row("counter", "percpu_fetch_add", 2, 1.5),
            row("stack", "Stack::push+pop", 2, 2.0),
            row("stack", "global_mutex_vec", 2, 7.0),
            row("lock", "PerCpu::with_cpu", 2, 2.0),
            row("lock", "global_mutex", 2, 3.0),
            row("ring", "RingBuffer 64B", 2, 10.0),
            row("ring", "channel 64B", 2, 60.0),
            // The right names in the wrong group or at the wrong thread count are ignored.
            row("ring", "RingBuffer 16B", 2, 1.0),
            row("ring", "channel 64B", 1, 1.0),
            // Issue 13's targets against the floors, at 1 thread.
            row("counter", "Counter::add", 1, 1.5),
            row("counter", "ThreadLocal<Cell>", 1, 2.0),
            row("counter", "tls_add", 1, 1.0),
            row("stack", "Stack::push+pop", 1, 3.0),
            row("stack", "tls_add", 1, 1.0),
            row("lock", "PerCpu::with_cpu", 1, 3.0),
            row("lock", "tls_add", 1, 1.0),
            // Issue 8's: the checked path against the bench-only unchecked baseline.
            row("lock", "with_cpu unchecked", 1, 2.0),
            // And the same without the re-entry check only.
            row("lock", "with_cpu park only", 1, 3.0),
            row("ring", "RingBuffer 64B", 1, 3.0),
            row("ring", "tls_vec 64B", 1, 2.0),
        ];
        let t = targets(&results);
        assert_eq!(t[0].pass, Some(false));
        assert_eq!(t[0].measured, Some(2.0));
        assert_eq!(t[1].pass, None);
        assert_eq!(t[2].pass, Some(true));
        assert_eq!(t[3].pass, Some(false));
        assert_eq!((t[4].measured, t[4].pass), (Some(0.75), Some(true)));
        assert_eq!((t[5].measured, t[5].pass), (Some(1.5), Some(false)));
        assert_eq!((t[6].measured, t[6].pass), (Some(3.5), Some(true)));
        assert_eq!((t[7].measured, t[7].pass), (Some(3.0), Some(true)));
        assert_eq!((t[8].measured, t[8].pass), (Some(1.5), Some(false)));
        assert_eq!((t[9].measured, t[9].pass), (Some(3.0), Some(false)));
        assert_eq!((t[10].measured, t[10].pass), (Some(1.0), Some(true)));
        assert_eq!((t[11].measured, t[11].pass), (Some(1.5), Some(false)));
        assert_eq!((t[12].measured, t[12].pass), (Some(6.0), Some(true)));
        assert_eq!((t[13].measured, t[13].pass), (Some(1.5), Some(true)));
    }
}
