//! `cpulocal`: what this machine offers (`info`) and cpulocal measured against the
//! alternatives (`bench`). Parses arguments and prints; the work is in the library.
#![deny(unsafe_code)]

use std::io::Write;
use std::time::Instant;

use clap::{Parser, Subcommand};
use cpulocal_cli::bench::{self, Group, RowResult, ThreadCounts};
use cpulocal_cli::info::Info;

/// Per-CPU data on Linux through restartable sequences (rseq).
#[derive(Debug, Parser)]
#[command(name = "cpulocal", version, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Kernel, glibc and CPU facts, and the mechanism cpulocal uses here, and why.
    Info {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Measure cpulocal side by side with what it replaces.
    Bench {
        /// Thread counts to measure, comma-separated [default: 1 and the online CPUs].
        #[arg(long, value_name = "LIST")]
        threads: Option<ThreadCounts>,
        /// Print one JSON object per row and line (header and targets go to stderr).
        #[arg(long)]
        json: bool,
        /// Few, short runs: the whole bench in a few seconds (for CI).
        #[arg(long)]
        quick: bool,
        /// Measure only this group: cpu-number or counter.
        #[arg(long, value_name = "NAME")]
        group: Option<Group>,
    },
}

fn main() {
    match Cli::parse().command {
        Command::Info { json } => {
            let info = Info::gather();
            if json {
                println!("{}", info.to_json());
            } else {
                println!("{info}");
            }
        }
        Command::Bench {
            threads,
            json,
            quick,
            group,
        } => run_bench(bench::Config::new(threads.map(|t| t.0), quick, group), json),
    }
}

fn run_bench(config: bench::Config, json: bool) {
    // Text goes to stdout; with --json, stdout carries the rows alone.
    let mut text: Box<dyn Write> = if json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let started = Instant::now();
    writeln!(text, "{}", bench::header(&config)).ok();
    for &group in &config.groups {
        for note in bench::skipped_rows(group) {
            writeln!(text, "skipped: {note}").ok();
        }
    }
    if !json {
        writeln!(text, "{}", RowResult::table_heading()).ok();
    }
    let results = bench::run(&config, |rows| {
        for row in rows {
            if json {
                println!("{}", row.to_json());
            } else {
                println!("{}", row.table_line());
            }
        }
    });
    if !json {
        writeln!(
            text,
            "\n* the group's cpulocal row; vs cpulocal = row ns/op / cpulocal ns/op"
        )
        .ok();
        for (name, what) in bench::LEGEND {
            if results.iter().any(|r| r.name == *name) {
                writeln!(text, "  {name:<18} {what}").ok();
            }
        }
    }
    writeln!(text, "\ntargets (reported, not asserted):").ok();
    for target in bench::targets(&results) {
        writeln!(text, "  {target}").ok();
    }
    writeln!(text, "measured in {:.1} s", started.elapsed().as_secs_f64()).ok();
}
