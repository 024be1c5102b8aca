//! What a run did and found ([`Report`]): its text verdict, its JSON, and the line
//! printed before a run ([`header`]).

use core::fmt;

use cpulocal::sys;
use serde::Serialize;

use super::part::Sections;
use super::{Amount, Config};

/// What a run did and found. [`fmt::Display`] gives the text verdict, serde the JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The structure's name.
    pub structure: &'static str,
    /// Workers running at once.
    pub threads: usize,
    /// Workers started over the run (more than `threads` with thread churn).
    pub threads_started: u64,
    /// `cpulocal::mechanism()`.
    pub mechanism: String,
    /// `cpulocal::remote_scheme()`.
    pub remote_scheme: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPUs online.
    pub online_cpus: usize,
    /// CPUs the run could use (its affinity at the start).
    pub usable_cpus: usize,
    /// Wall time of the workers.
    pub seconds: f64,
    /// Worker operations.
    pub operations: u64,
    /// Operations of the remote thread (`remote`, `mix`).
    pub remote_operations: u64,
    /// Spin loops inside every sequence.
    pub delay_loops: usize,
    /// Whether a deliberately broken variant ran.
    pub broken: bool,
    /// Sequences the kernel restarted during the run; `None` in builds without the
    /// `test-hooks` feature, which do not count them.
    pub kernel_aborts: Option<u64>,
    /// Adds that went through `Counter`'s slow path (`None`: no real `Counter` part).
    pub slow_path: Option<u64>,
    /// Signals sent to workers.
    pub signals_sent: u64,
    /// Signal handler runs.
    pub signals_handled: u64,
    /// Successful `sched_setaffinity` moves.
    pub affinity_moves: u64,
    /// Refused moves (e.g. the thread had just exited).
    pub affinity_failures: u64,
    /// Each part's check under its name, null when the run has no such part, in the
    /// order of the registry: `counter` ([`CounterCheck`]), `signal_counter` (a
    /// [`CounterCheck`] of the signal handler's own counter, when the structure has no
    /// counter part), `stack` ([`StackCheck`]), `lock` ([`LockCheck`]), `ring` and
    /// `ring_overwrite` (a [`RingCheck`] each: the discarding and the overwriting ring).
    ///
    /// [`CounterCheck`]: super::CounterCheck
    /// [`StackCheck`]: super::StackCheck
    /// [`LockCheck`]: super::LockCheck
    /// [`RingCheck`]: super::RingCheck
    #[serde(flatten)]
    pub(super) sections: Sections,
    /// Updates, nodes, increments or records lost, over every part.
    pub lost: u64,
    /// Ones counted, held or read more than once, over every part.
    pub duplicated: u64,
    /// Values that are not what any thread wrote.
    pub corrupt: u64,
    /// Nothing lost, duplicated or corrupt, and no thread panicked.
    pub passed: bool,
    /// What each thread of the run that panicked said (its tally, if a worker's, is
    /// missing from the checks).
    pub panics: Vec<String>,
}

impl Report {
    /// One JSON object, on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("Report serialises")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "operations: {} in {:.2} s ({:.1} M/s){}",
            self.operations,
            self.seconds,
            self.operations as f64 / self.seconds.max(1e-9) / 1e6,
            if self.remote_operations > 0 {
                format!("; remote operations: {}", self.remote_operations)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "threads: {} at once, {} started; signals: {} sent, {} handled; affinity moves: {} ({} refused); delay: {} loops{}",
            self.threads,
            self.threads_started,
            self.signals_sent,
            self.signals_handled,
            self.affinity_moves,
            self.affinity_failures,
            self.delay_loops,
            if self.broken { "; BROKEN variant" } else { "" }
        )?;
        match self.kernel_aborts {
            Some(n) => writeln!(f, "kernel aborts: {n}")?,
            None => writeln!(
                f,
                "kernel aborts: not counted (build with --features test-hooks)"
            )?,
        }
        match self.slow_path {
            Some(n) => writeln!(f, "slow path: {n} adds (Counter::slow_path_sum)")?,
            None => writeln!(f, "slow path: n/a (no cpulocal Counter in this run)")?,
        }
        for line in self.sections.lines() {
            writeln!(f, "{line}")?;
        }
        writeln!(f, "lost: {}", self.lost)?;
        writeln!(f, "duplicated: {}", self.duplicated)?;
        writeln!(f, "corrupt: {}", self.corrupt)?;
        for panic in &self.panics {
            writeln!(f, "panic: {panic}")?;
        }
        write!(
            f,
            "verdict: {}",
            if self.passed {
                "PASS"
            } else if !self.panics.is_empty() {
                "FAIL (a thread panicked)"
            } else {
                "FAIL (lost, duplicated or corrupt)"
            }
        )
    }
}

/// The line printed before a run: what runs, on what.
pub fn header(config: &Config) -> String {
    let mut knobs = Vec::new();
    match config.amount {
        Amount::Ops(n) => knobs.push(format!("{n} operations in total")),
        Amount::Duration(d) => knobs.push(format!("{:.1} s", d.as_secs_f64())),
    }
    if let Some(k) = config.yield_every {
        knobs.push(format!("yield every {k}"));
    }
    if let Some(s) = config.sleep {
        knobs.push(format!(
            "sleep {} µs every {}",
            s.duration.as_micros(),
            s.every
        ));
    }
    if let Some(i) = config.signal_interval {
        knobs.push(format!("SIGUSR1 every {} µs", i.as_micros()));
    }
    if let Some(i) = config.affinity_interval {
        knobs.push(format!("affinity churn every {} µs", i.as_micros()));
    }
    if let Some(n) = config.thread_churn {
        knobs.push(format!("thread churn every {n} ops"));
    }
    if let Some(d) = config.delay_loops {
        knobs.push(format!("delay {d} loops"));
    }
    if config.broken {
        knobs.push("BROKEN variant".into());
    }
    format!(
        "cpulocal stress: {}, {} threads; {}; {}; kernel {}; {} online CPUs",
        config.structure,
        config.threads,
        knobs.join(", "),
        cpulocal::mechanism(),
        sys::kernel_release(),
        sys::online_cpus(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::stress::{run, Amount, Config};

    #[test]
    fn the_report_has_every_part_under_its_key_in_registry_order() {
        let ring = "ring".parse().expect("a registered structure");
        let mut config = Config::new(ring, 2, Amount::Ops(1000));
        config.signal_interval = Some(Duration::from_micros(200));
        let report = run(&config, |_| ()).expect("valid config");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let text = report.to_json();
        // The last occurrence: the top-level key (`lost` is also a key of every check).
        let at = |key: &str| text.rfind(&format!("\"{key}\":")).expect(key);
        let keys = [
            "affinity_failures",
            "counter",
            "signal_counter",
            "stack",
            "lock",
            "ring",
            "ring_overwrite",
            "lost",
        ];
        assert!(keys.windows(2).all(|w| at(w[0]) < at(w[1])), "{text}");
        assert!(json["counter"].is_null() && json["stack"].is_null() && json["lock"].is_null());
        assert_eq!(json["ring"]["lost"], 0, "{text}");
        assert_eq!(json["signal_counter"]["expected"], json["signals_handled"]);
        let text = report.to_string();
        let labels: Vec<&str> = text.lines().filter_map(|l| l.split(':').next()).collect();
        assert!(
            labels.contains(&"signal counter") && labels.contains(&"ring"),
            "{report}"
        );
    }
}
