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
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!rows.is_empty());
    for row in &rows {
        for field in ["group", "name"] {
            assert!(row[field].is_string(), "{field} in {row}");
        }
        assert_eq!(row["threads"], 1, "{row}");
        for field in ["ns_per_op", "min_ns_per_op", "ratio_to_cpulocal"] {
            let v = row[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} in {row}"));
            assert!(v.is_finite() && v > 0.0, "{field} in {row}");
        }
        assert!(row["runs"].as_u64().unwrap() >= 1, "{row}");
        assert!(row["ops_per_thread"].as_u64().unwrap() >= 1, "{row}");
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
