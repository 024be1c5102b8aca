//! The `memory` group (`cpulocal bench --group memory`): what per-CPU data costs in
//! resident memory. Measured once, not timed per thread count.
//!
//! # Method
//!
//! Every scenario runs in a fresh child process (this executable again, with
//! [`PROBE_ENV`] naming the scenario), so that one scenario's pages do not hide
//! another's. The child reads its resident set (`/proc/self/statm`) before and after the
//! work and prints one JSON line; the parent turns the lines into a table.
//!
//! - **live**: create `n` counters, then add 1 to each from every CPU the process may
//!   run on (the thread pinned to each in turn), so every CPU's slot of every counter is
//!   written; resident growth, per counter and per CPU. The `Vec` holding the counters'
//!   handles is allocated and touched before the first reading, so the growth is what the
//!   counters' per-CPU storage costs.
//! - **live, pinned to CPU 0**: the same with the child's affinity set to CPU 0 first
//!   (as `taskset -c 0` would): only CPU 0's ranges should be populated.
//! - **churn**: create, add to and drop 1,000,000 counters one after the other; resident
//!   growth after the first 10,000 and after all of them (flat: freed slots are reused).
//!
//! The figures for a machine with 256 possible CPUs are computed from the layout.

use core::fmt;
use std::process::Command;

use cpulocal::Counter;
use serde::{Deserialize, Serialize};

use super::harness::GroupDef;

/// The group, as [`super::Group::ALL`] lists it: no timed rows, one report.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "memory",
    uses_remote_scheme: false,
    rows: |_| Vec::new(),
    layout_rows: None,
    legend: &[],
    targets: &[],
    records_per_s: false,
    note: None,
    untimed: Some(report),
};

/// Runs the scenarios (100,000 live counters and 1,000,000 created and dropped; a tenth
/// of that when `quick`) and returns the report as text and as one JSON line.
fn report(quick: bool) -> (String, String) {
    let (live, churn) = if quick {
        (10_000, 100_000)
    } else {
        (100_000, 1_000_000)
    };
    match measure(live, churn) {
        Ok(r) => (
            r.to_string(),
            serde_json::to_string(&r).expect("a report serialises"),
        ),
        Err(e) => (
            format!("memory: not measured: {e}"),
            serde_json::json!({ "group": "memory", "error": e }).to_string(),
        ),
    }
}

/// The environment variable that makes this executable run one memory scenario and exit.
pub const PROBE_ENV: &str = "CPULOCAL_MEMORY_PROBE";

/// The bytes per CPU of a counter before the pool: one 128-byte cache-padded slot per
/// possible CPU, in one 128-byte-aligned heap allocation.
pub const TODAY_SLOT_BYTES: usize = 128;

/// What a child measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Probe {
    /// The scenario's name.
    pub scenario: String,
    /// The counters created.
    pub counters: usize,
    /// The CPUs the counters were written from.
    pub cpus_used: usize,
    /// Resident growth in bytes over the whole scenario.
    pub rss_growth: usize,
    /// churn only: resident growth after the first 10,000 counters.
    pub rss_growth_early: usize,
}

/// Runs the scenario named in [`PROBE_ENV`], if set, prints its [`Probe`] as JSON, and
/// returns true (the caller then exits). Returns false when the variable is not set.
pub fn probe_if_asked() -> bool {
    let Ok(spec) = std::env::var(PROBE_ENV) else {
        return false;
    };
    let probe = run_probe(&spec).unwrap_or_else(|e| panic!("memory probe {spec:?}: {e}"));
    println!(
        "{}",
        serde_json::to_string(&probe).expect("a probe serialises")
    );
    true
}

/// `live:<n>`, `live-cpu0:<n>` or `churn:<n>`.
fn run_probe(spec: &str) -> Result<Probe, String> {
    let (name, n) = spec.split_once(':').ok_or("expected <scenario>:<n>")?;
    let n: usize = n.parse().map_err(|e| format!("{e}"))?;
    if name == "live-cpu0" && !pin_to(0) {
        return Err("cannot pin to CPU 0".into());
    }
    // Register the thread and warm what every scenario uses, outside the readings.
    cpulocal::register_current_thread();
    let warm = Counter::new();
    warm.add(1);
    drop(warm);
    match name {
        "live" | "live-cpu0" => {
            let cpus = if name == "live-cpu0" {
                vec![0]
            } else {
                allowed_cpus()
            };
            let mut counters: Vec<Counter> = Vec::with_capacity(n);
            // Touch the handles' storage now: it is the caller's, not the counters'.
            counters.extend((0..n).map(|_| Counter::new()));
            let before = rss()?;
            for &cpu in &cpus {
                if cpus.len() > 1 && !pin_to(cpu) {
                    return Err(format!("cannot pin to CPU {cpu}"));
                }
                counters.iter().for_each(|c| c.add(1));
            }
            let after = rss()?;
            if let Some(bad) = counters.iter().find(|c| c.sum() != cpus.len() as u64) {
                return Err(format!("inexact counter: {}", bad.sum()));
            }
            Ok(Probe {
                scenario: name.into(),
                counters: n,
                cpus_used: cpus.len(),
                rss_growth: after.saturating_sub(before),
                rss_growth_early: 0,
            })
        }
        "churn" => {
            let before = rss()?;
            let mut early = 0;
            for i in 0..n {
                let c = Counter::new();
                c.add(1);
                if c.sum() != 1 {
                    return Err("inexact counter".into());
                }
                drop(c);
                if i + 1 == 10_000.min(n) {
                    early = rss()?.saturating_sub(before);
                }
            }
            Ok(Probe {
                scenario: name.into(),
                counters: n,
                cpus_used: 1,
                rss_growth: rss()?.saturating_sub(before),
                rss_growth_early: early,
            })
        }
        other => Err(format!("unknown scenario {other:?}")),
    }
}

fn rss() -> Result<usize, String> {
    cpulocal::sys::resident_bytes().ok_or_else(|| "no /proc/self/statm".into())
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    let size = core::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is an array of integers: all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of `size` bytes; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return vec![cpulocal::current_cpu()];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE; `set` is live.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`; false if the kernel refuses.
fn pin_to(cpu: usize) -> bool {
    let size = core::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is an array of integers: all zeroes is the empty set.
    let mut one: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: `cpu` is below CPU_SETSIZE, the bits a cpu_set_t holds.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // The CPU number the thread caches is refreshed on its next return to user space,
    // which this system call is.
    // SAFETY: `one` is a live cpu_set_t of `size` bytes; pid 0 is the calling thread.
    unsafe { libc::sched_setaffinity(0, size, &one) == 0 }
}

/// The memory report: the children's probes and the computed figures.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Always "memory" (for the JSON line).
    pub group: &'static str,
    /// The possible CPUs of this machine.
    pub possible_cpus: usize,
    /// `size_of::<Counter>()`: the handle, wherever the caller keeps it.
    pub handle_bytes: usize,
    /// The pool bytes per counter per CPU, from the layout.
    pub bytes_per_cpu: usize,
    /// live, live-cpu0, churn.
    pub probes: Vec<Probe>,
}

/// Runs the scenarios (`live_n` counters live; `churn_n` created and dropped), each in a
/// child process.
///
/// # Errors
///
/// When a child cannot be started or fails.
pub fn measure(live_n: usize, churn_n: usize) -> Result<Report, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut probes = Vec::new();
    for spec in [
        format!("live:{live_n}"),
        format!("live-cpu0:{live_n}"),
        format!("churn:{churn_n}"),
    ] {
        let out = Command::new(&exe)
            .env(PROBE_ENV, &spec)
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "memory probe {spec} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let probe: Probe = serde_json::from_str(line.trim())
            .map_err(|e| format!("memory probe {spec}: {e}: {line:?}"))?;
        probes.push(probe);
    }
    Ok(Report {
        group: "memory",
        possible_cpus: cpulocal::possible_cpus(),
        handle_bytes: core::mem::size_of::<Counter>(),
        bytes_per_cpu: Counter::BYTES_PER_CPU,
        probes,
    })
}

impl Report {
    fn probe(&self, name: &str) -> Option<&Probe> {
        self.probes.iter().find(|p| p.scenario == name)
    }

    /// Resident bytes per counter per CPU written, measured in scenario `name`.
    pub fn measured_per_cpu(&self, name: &str) -> Option<f64> {
        self.probe(name)
            .map(|p| p.rss_growth as f64 / (p.counters * p.cpus_used) as f64)
    }

    /// The targets of issue #10 (item 5), each with whether it was met.
    pub fn targets(&self) -> Vec<(String, bool)> {
        let mut t = vec![(
            format!(
                "bytes per Counter per CPU (layout) <= 16: {}",
                self.bytes_per_cpu
            ),
            self.bytes_per_cpu <= 16,
        )];
        // "Bounded pool overhead": a chunk's page tables and partly used pages, 256 KiB.
        const OVERHEAD: f64 = 256.0 * 1024.0;
        for name in ["live", "live-cpu0"] {
            if let Some(p) = self.probe(name) {
                let ideal = (p.counters * 16 * p.cpus_used) as f64;
                t.push((
                    format!(
                        "{name}: RSS growth of {} counters on {} CPU(s) within 1.2x of {} B + 256 KiB: {} B ({:.2}x)",
                        p.counters,
                        p.cpus_used,
                        ideal as u64,
                        p.rss_growth,
                        p.rss_growth as f64 / ideal
                    ),
                    (p.rss_growth as f64) <= 1.2 * ideal + OVERHEAD,
                ));
            }
        }
        if let Some(p) = self.probe("churn") {
            t.push((
                format!(
                    "churn: RSS flat over {} create+drop (growth after 10,000: {} B, after all: {} B)",
                    p.counters, p.rss_growth_early, p.rss_growth
                ),
                p.rss_growth <= p.rss_growth_early + 64 * 1024,
            ));
        }
        t
    }
}

/// Bytes in a human unit.
fn human(bytes: f64) -> String {
    const K: f64 = 1024.0;
    if bytes >= K * K * K {
        format!("{:.1} GiB", bytes / (K * K * K))
    } else if bytes >= K * K {
        format!("{:.1} MiB", bytes / (K * K))
    } else if bytes >= K {
        format!("{:.1} KiB", bytes / K)
    } else {
        format!("{bytes:.0} B")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "memory: {} possible CPUs; Counter handle {} B (wherever the caller keeps it); per-CPU slot {} B in the pool (before the pool: a {} B padded slot per possible CPU)",
            self.possible_cpus, self.handle_bytes, self.bytes_per_cpu, TODAY_SLOT_BYTES
        )?;
        writeln!(
            f,
            "{:<12} {:>10} {:>5} {:>12} {:>16}",
            "scenario", "counters", "cpus", "RSS growth", "B/counter/CPU"
        )?;
        for p in &self.probes {
            let per = p.rss_growth as f64 / (p.counters * p.cpus_used) as f64;
            writeln!(
                f,
                "{:<12} {:>10} {:>5} {:>12} {:>16.1}",
                p.scenario,
                p.counters,
                p.cpus_used,
                human(p.rss_growth as f64),
                per
            )?;
        }
        let n = 10_000f64;
        let slot = self.bytes_per_cpu as f64;
        writeln!(
            f,
            "computed, 256 possible CPUs, 10,000 counters: pool {} resident if all 256 CPUs add, {} if 4 do ({} of address space); 128-byte slots: {} whatever runs",
            human(n * slot * 256.0),
            human(n * slot * 4.0),
            human(n * slot * 256.0),
            human(n * TODAY_SLOT_BYTES as f64 * 256.0),
        )?;
        for (what, met) in self.targets() {
            writeln!(f, "  {}  {what}", if met { "PASS" } else { "MISS" })?;
        }
        Ok(())
    }
}
