//! The `cpulocal` binary as a user runs it: arguments, exit codes, output formats.

use std::process::{Command, Output};

fn cpulocal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cpulocal"))
        .args(args)
        .output()
        .expect("the cpulocal binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("stderr is UTF-8")
}

#[test]
fn bad_thread_lists_are_clear_errors_with_a_nonzero_exit() {
    for (bad, says) in [
        ("0", "at least 1"),
        ("x", "'x' is not a thread count"),
        ("", "comma-separated list"),
        ("1,,2", "is not a thread count"),
        ("2,-1", "'-1' is not a thread count"),
    ] {
        let o = cpulocal(&["bench", "--quick", "--threads", bad]);
        assert!(!o.status.success(), "--threads {bad:?} was accepted");
        assert_eq!(o.status.code(), Some(2), "--threads {bad:?}");
        let err = stderr(&o);
        assert!(err.contains("--threads"), "--threads {bad:?}: {err}");
        assert!(err.contains(says), "--threads {bad:?}: {err}");
        assert!(o.stdout.is_empty(), "--threads {bad:?} still measured");
    }
}

#[test]
fn unknown_groups_and_commands_are_refused() {
    let o = cpulocal(&["bench", "--quick", "--group", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cpu-number"), "{}", stderr(&o));
    assert_eq!(cpulocal(&["frobnicate"]).status.code(), Some(2));
    assert!(!cpulocal(&[]).status.success());
}

#[test]
fn quick_json_bench_prints_one_well_formed_row_per_line_for_both_groups() {
    let o = cpulocal(&["bench", "--quick", "--json", "--threads", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let (memory, rows): (Vec<serde_json::Value>, Vec<serde_json::Value>) = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .partition(|r: &serde_json::Value| r["group"] == "memory");
    assert!(!rows.is_empty());
    // The memory group is measured once: one report, not rows.
    assert_eq!(memory.len(), 1, "{out}");
    assert!(memory[0]["probes"].is_array(), "{out}");
    for row in &rows {
        for field in ["group", "name"] {
            assert!(row[field].is_string(), "{field} in {row}");
        }
        assert_eq!(row["threads"], 1, "{row}");
        assert_measured(row);
        assert!(
            row["min_ns_per_op"].as_f64() <= row["ns_per_op"].as_f64(),
            "{row}"
        );
    }
    for (group, cpulocal_row) in [("cpu-number", "current_cpu"), ("counter", "Counter::add")] {
        let base = rows
            .iter()
            .find(|r| r["group"] == group && r["name"] == cpulocal_row)
            .unwrap_or_else(|| panic!("no {group}/{cpulocal_row} row in\n{out}"));
        assert_eq!(base["ratio_to_cpulocal"], 1.0);
        assert!(rows.iter().filter(|r| r["group"] == group).count() >= 3);
    }
    let err = stderr(&o);
    assert!(err.contains("cpulocal bench:"), "{err}");
    assert!(err.contains("targets"), "{err}");
}

/// The rows `bench --quick --json --threads 1 --group <group>` prints, each checked for
/// the fields every row has.
fn quick_json_rows_of(group: &str) -> Vec<serde_json::Value> {
    let o = cpulocal(&[
        "bench",
        "--quick",
        "--json",
        "--threads",
        "1",
        "--group",
        group,
    ]);
    assert!(o.status.success(), "--group {group}: {}", stderr(&o));
    let out = stdout(&o);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!rows.is_empty(), "--group {group} printed no rows");
    for row in &rows {
        assert_eq!(row["group"], group, "{row}");
        assert!(row["name"].is_string(), "{row}");
        assert!(row["cpulocal"].is_boolean(), "{row}");
        assert_eq!(row["threads"], 1, "{row}");
        assert_measured(row);
    }
    // Every group but the first two depends on how other CPUs' data is reached.
    let err = stderr(&o);
    if !["cpu-number", "counter"].contains(&group) {
        assert!(err.contains("remote scheme: "), "{err}");
    }
    rows
}

/// The row of `rows` named `name`, which must be there.
fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} row in {rows:?}"))
}

#[test]
fn stack_group_compares_the_stack_with_mutexes_and_crossbeam_queues() {
    let rows = quick_json_rows_of("stack");
    let base = row(&rows, "Stack::push+pop");
    assert_eq!(base["cpulocal"], true);
    assert_eq!(base["ratio_to_cpulocal"], 1.0);
    for name in [
        "global_mutex_vec",
        "percpu_mutex_vec",
        "SegQueue",
        "ArrayQueue",
    ] {
        assert_eq!(row(&rows, name)["cpulocal"], false, "{name}");
    }
    // Pops that found their CPU's list empty are counted, not hidden.
    assert!(base["events"].is_u64(), "{base}");
}

#[test]
fn lock_group_compares_with_cpu_with_global_and_per_cpu_mutexes() {
    let rows = quick_json_rows_of("lock");
    assert_eq!(row(&rows, "PerCpu::with_cpu")["ratio_to_cpulocal"], 1.0);
    row(&rows, "global_mutex");
    row(&rows, "parking_lot_mutex");
    row(&rows, "percpu_mutex");
    // The floor, for the target against a thread-local increment within one run.
    row(&rows, "tls_add");
    // The same lock sequence without the re-entry check and the parking (issue 8).
    assert_eq!(row(&rows, "with_cpu unchecked")["cpulocal"], false);
    // The same on a PerCpu indexed by mm_cid.
    assert_eq!(row(&rows, "with_cpu (mm_cid)")["cpulocal"], false);
    // Parking without the re-entry check: the two costs apart.
    assert_eq!(row(&rows, "with_cpu park only")["cpulocal"], false);
    assert_eq!(rows.len(), 8);
}

#[test]
fn remote_group_reports_on_cpu_and_steal_with_the_scheme() {
    let rows = quick_json_rows_of("remote");
    assert_eq!(row(&rows, "Stack::push+pop")["ratio_to_cpulocal"], 1.0);
    for name in ["PerCpu::on_cpu", "on_cpu (mm_cid)", "Stack::steal"] {
        let r = row(&rows, name);
        let note = r["note"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(note.starts_with("scheme: "), "{r}");
    }
}

#[test]
fn ring_group_compares_each_record_size_with_its_own_ring_row() {
    let rows = quick_json_rows_of("ring");
    assert_eq!(rows.len(), 12);
    for size in ["16B", "64B", "256B"] {
        let base = row(&rows, &format!("RingBuffer {size}"));
        assert_eq!(base["cpulocal"], true);
        assert_eq!(base["ratio_to_cpulocal"], 1.0);
        assert!(base["events"].is_u64(), "discards are reported: {base}");
        for kind in ["mutex_deque", "channel", "tls_vec"] {
            let r = row(&rows, &format!("{kind} {size}"));
            let expected = base["ns_per_op"].as_f64().unwrap() / r["ns_per_op"].as_f64().unwrap();
            let ratio = r["ratio_to_cpulocal"].as_f64().unwrap();
            assert!((ratio * expected - 1.0).abs() < 1e-9, "{r} against {base}");
        }
    }
    for r in &rows {
        let per_s = r["records_per_s"]
            .as_f64()
            .unwrap_or_else(|| panic!("records_per_s in {r}"));
        let ns = r["ns_per_op"].as_f64().unwrap();
        assert!((per_s * ns / 1e9 - 1.0).abs() < 1e-9, "{r}");
    }
}

#[test]
fn layout_shows_every_caller_shape_of_the_counter_stack_and_lock_rows() {
    for (group, op) in [
        ("counter", "Counter::add"),
        ("stack", "Stack::push+pop"),
        ("lock", "PerCpu::with_cpu"),
    ] {
        let o = cpulocal(&[
            "bench",
            "--quick",
            "--json",
            "--threads",
            "1",
            "--group",
            group,
            "--layout",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let rows: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        for shape in ["", " [call]", " [work]"] {
            // Each shape's cpulocal row is the base of its own ratios, beside the floor
            // in the same shape.
            let base = row(&rows, &format!("{op}{shape}"));
            assert_eq!(base["cpulocal"], true, "{base}");
            assert_eq!(base["ratio_to_cpulocal"], 1.0, "{base}");
            let floor = row(&rows, &format!("tls_add{shape}"));
            let expected =
                floor["ns_per_op"].as_f64().unwrap() / base["ns_per_op"].as_f64().unwrap();
            let ratio = floor["ratio_to_cpulocal"].as_f64().unwrap();
            assert!(
                (ratio / expected - 1.0).abs() < 1e-9,
                "{floor} against {base}"
            );
        }
        if group == "lock" {
            // The check's two baselines, in every shape, to read its cost there.
            for shape in ["", " [call]", " [work]"] {
                for variant in ["with_cpu unchecked", "with_cpu park only"] {
                    assert_eq!(row(&rows, &format!("{variant}{shape}"))["cpulocal"], false);
                }
            }
        }
        row(&rows, "work only");
    }
    // Without --layout, none of them.
    let rows = quick_json_rows_of("counter");
    assert!(rows
        .iter()
        .all(|r| !r["name"].as_str().unwrap().contains('[')));
}

#[test]
fn counter_group_has_the_thread_local_crate_row() {
    let rows = quick_json_rows_of("counter");
    assert_eq!(row(&rows, "ThreadLocal<Cell>")["cpulocal"], false);
    // records_per_s belongs to the ring group only.
    assert!(rows.iter().all(|r| r.get("records_per_s").is_none()));
}

#[test]
fn text_bench_of_one_group_prints_a_table_with_the_header() {
    let o = cpulocal(&["bench", "--quick", "--group", "counter", "--threads", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let mechanism = out.lines().next().unwrap();
    assert!(mechanism.starts_with("cpulocal bench: "), "{out}");
    assert!(
        mechanism.contains("kernel") && mechanism.contains("online CPUs"),
        "{out}"
    );
    assert!(out.contains("Counter::add *"), "{out}");
    assert!(out.contains("1.00x"), "{out}");
    assert!(!out.contains("cpu-number "), "{out}");
    assert!(out.contains("PASS") || out.contains("MISS"), "{out}");
}

#[test]
fn memory_group_reports_bytes_per_counter_and_flat_churn() {
    let o = cpulocal(&["bench", "--quick", "--group", "memory"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("B/counter/CPU"), "{out}");
    for scenario in ["live ", "live-cpu0 ", "churn "] {
        assert!(out.contains(scenario), "{scenario}: {out}");
    }
    assert!(out.contains("computed, 256 possible CPUs"), "{out}");
    assert!(
        out.contains("bytes per Counter per CPU (layout) <= 16: 16"),
        "{out}"
    );

    let o = cpulocal(&["bench", "--quick", "--json", "--group", "memory"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON line");
    assert_eq!(report["bytes_per_cpu"], 16);
    let probes = report["probes"].as_array().expect("probes");
    let live = probes
        .iter()
        .find(|p| p["scenario"] == "live")
        .expect("live");
    assert_eq!(live["counters"], 10_000);
    // Resident growth of live counters: their slots on every CPU used, and not much
    // more (a page per CPU of slack, and the pool's bookkeeping).
    let per = live["rss_growth"].as_f64().unwrap()
        / (live["counters"].as_f64().unwrap() * live["cpus_used"].as_f64().unwrap());
    assert!(per < 64.0, "{per} B per counter per CPU: {report}");
}

#[test]
fn info_mentions_the_mechanism() {
    let o = cpulocal(&["info"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("mechanism"), "{out}");
    assert!(out.contains("rseq") || out.contains("fallback"), "{out}");
    assert!(out.contains("AT_RSEQ_FEATURE_SIZE"), "{out}");
}

#[test]
fn info_json_is_one_object_with_the_mechanism() {
    let o = cpulocal(&["info", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = v["mechanism"].as_str().unwrap();
    assert!(m.starts_with("rseq") || m.starts_with("fallback"), "{m}");
    assert!(["rseq", "fallback"].contains(&v["mechanism_kind"].as_str().unwrap()));
    assert!(v["possible_cpus"].as_u64().unwrap() >= 1);
}

#[test]
fn disabling_rseq_is_reported_and_the_bench_still_counts_exactly() {
    let o = Command::new(env!("CARGO_BIN_EXE_cpulocal"))
        .args([
            "bench",
            "--quick",
            "--group",
            "counter",
            "--threads",
            "2",
            "--json",
        ])
        .env("CPULOCAL_DISABLE_RSEQ", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("CPULOCAL_DISABLE_RSEQ"),
        "{}",
        stderr(&o)
    );
}

/// The numbers every bench row carries are present, finite and positive.
fn assert_measured(row: &serde_json::Value) {
    for field in ["ns_per_op", "min_ns_per_op", "ratio_to_cpulocal"] {
        let v = row[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} in {row}"));
        assert!(v.is_finite() && v > 0.0, "{field} in {row}");
    }
    assert!(row["runs"].as_u64().unwrap() >= 1, "{row}");
    assert!(row["ops_per_thread"].as_u64().unwrap() >= 1, "{row}");
}

/// Runs `cpulocal args` with its stdout a pipe whose reader is closed at once, as
/// `cpulocal … | head -0` would; returns the status and stderr.
fn with_closed_stdout(args: &[&str]) -> (std::process::ExitStatus, String) {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cpulocal"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the cpulocal binary runs");
    drop(child.stdout.take()); // the reader goes away before the first line
    let out = child.wait_with_output().expect("cpulocal ends");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Exit 0, or killed by SIGPIPE (what C tools do), and no panic message.
fn assert_quiet_end(args: &[&str]) {
    use std::os::unix::process::ExitStatusExt;
    let (status, err) = with_closed_stdout(args);
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "cpulocal {args:?} into a closed pipe: {status}\n{err}"
    );
    assert!(!err.contains("panicked"), "cpulocal {args:?}: {err}");
}

#[test]
fn bench_into_a_closed_pipe_ends_quietly() {
    assert_quiet_end(&[
        "bench",
        "--quick",
        "--threads",
        "1",
        "--group",
        "cpu-number",
    ]);
    assert_quiet_end(&[
        "bench",
        "--quick",
        "--json",
        "--threads",
        "1",
        "--group",
        "cpu-number",
    ]);
}

/// `stress`'s exit status is its verdict also when nobody reads its report (`cpulocal
/// stress … | head -1` in a script): a FAIL into a closed pipe exits 1, not 0 (it did
/// before 6fc8fcf), and a PASS 0.
#[test]
fn stress_into_a_closed_pipe_exits_with_its_verdict() {
    // A second of the broken counter loses thousands of updates (13,000 to 66,000 in
    // three runs here); 20,000 operations lost 243 to 3,685 in twenty.
    let broken = [
        "--broken",
        "--delay",
        "50",
        "--threads",
        "4",
        "--signals",
        "--yield",
    ];
    for json in [&[][..], &["--json"][..]] {
        let mut args = vec!["stress", "--structure", "counter", "--ops", "20000"];
        args.extend(json);
        let (status, err) = with_closed_stdout(&args);
        assert_eq!(status.code(), Some(0), "{args:?}: {err}");
        if cpulocal_cli::stress::HAS_TEST_HOOKS {
            let mut args = vec!["stress", "--structure", "counter", "--duration", "1"];
            args.extend(json);
            args.extend(broken);
            let (status, err) = with_closed_stdout(&args);
            assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        }
    }
}

#[test]
fn info_into_a_closed_pipe_ends_quietly() {
    assert_quiet_end(&["info"]);
    assert_quiet_end(&["info", "--json"]);
}

/// `--sleep-us` longer than the whole run: the run still ends at its `--duration`
/// (before, every worker finished its 60 s sleep first).
#[test]
fn stress_ends_at_its_duration_whatever_sleep_us_says() {
    let start = std::time::Instant::now();
    let o = cpulocal(&[
        "stress",
        "--structure",
        "counter",
        "--threads",
        "2",
        "--duration",
        "0.5",
        "--sleep-us",
        "60000000",
        "--sleep-every",
        "1",
    ]);
    let took = start.elapsed();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        took < std::time::Duration::from_secs(30),
        "a 0.5 s run took {took:?}: it waited for the 60 s sleeps"
    );
}

/// `--quick` caps the thread counts (and says so), so a CI run stays short whatever
/// `--threads` asks for.
#[test]
fn quick_bench_caps_the_thread_counts_and_says_so() {
    let cap = (4 * cpulocal::sys::online_cpus()).clamp(8, 4096);
    let o = cpulocal(&[
        "bench",
        "--quick",
        "--json",
        "--threads",
        "1,4096",
        "--group",
        "cpu-number",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let threads: Vec<u64> = stdout(&o)
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).expect("a JSON row");
            row["threads"].as_u64().expect("threads")
        })
        .collect();
    assert!(
        threads.contains(&1) && threads.contains(&(cap as u64)),
        "{threads:?}"
    );
    assert!(threads.iter().all(|&t| t <= cap as u64), "{threads:?}");
    let err = stderr(&o);
    assert!(
        err.contains(&format!("4096 threads capped at {cap}")),
        "{err}"
    );
}

#[test]
fn plot_draws_the_run_into_an_svg_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.svg");
    let o = cpulocal(&[
        "bench",
        "--quick",
        "--group",
        "counter",
        "--threads",
        "1,2",
        "--plot",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("plot: {}", path.display())));
    let svg = std::fs::read_to_string(&path).unwrap();
    for text in [
        "<svg",
        "counter: Counter::add",
        "counter: mutex",
        "1 thread",
        "2 threads",
    ] {
        assert!(svg.contains(text), "no {text:?} in the plot");
    }

    let o = cpulocal(&[
        "bench",
        "--quick",
        "--group",
        "counter",
        "--threads",
        "1",
        "--plot",
        "/nonexistent-dir/x.svg",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot draw"), "{}", stderr(&o));
}
