//! `cpulocal`: what this machine offers (`info`), cpulocal measured against the
//! alternatives (`bench`), and torture runs with exact checks (`stress`). Parses
//! arguments and prints; the work is in the library.
#![deny(unsafe_code)]

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use cpulocal_cli::bench::{self, Group, RowResult, ThreadCounts};
use cpulocal_cli::info::Info;
use cpulocal_cli::stress::{self, Amount, Structure};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
        /// Few, short runs: the whole bench in a few seconds (for CI). Thread counts are
        /// capped at 4 per online CPU (at least 8), and the header says so.
        #[arg(long)]
        quick: bool,
        #[arg(long, value_name = "NAME", help = bench::group_help())]
        group: Option<Group>,
        /// Also draw the run as an SVG chart into FILE (ns/op per row, log scale).
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<std::path::PathBuf>,
        /// Also measure the counter, stack and lock groups' cpulocal rows (with the lock
        /// group's two bench-only baselines) and the floor in every caller shape: inlined
        /// in a tight loop, called through a function pointer (rows marked `[call]`), and
        /// with other work between operations (`[work]`).
        #[arg(long)]
        layout: bool,
    },
    /// Torture a structure (preemption, signals, migrations, thread churn) and check it
    /// exactly: exits 1 if anything was lost, duplicated or corrupted.
    Stress(StressArgs),
}

/// The knobs of `cpulocal stress` (see `cpulocal_cli::stress` for what each does).
#[derive(Debug, clap::Args)]
struct StressArgs {
    #[arg(long, value_name = "NAME", default_value = "counter", help = stress::structure_help())]
    structure: Structure,
    /// Workers running at once [default: 4 per online CPU].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=stress::MAX_THREADS as u64))]
    threads: Option<u64>,
    /// Worker operations in total, over all threads [default: 10000000].
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    ops: Option<u64>,
    /// Run for this many seconds instead of a number of operations.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// sched_yield inside each operation's window every --yield-every operations.
    #[arg(long = "yield")]
    yield_: bool,
    /// Operations of a worker between two yields.
    #[arg(long, value_name = "K", default_value_t = 100, requires = "yield_")]
    yield_every: u64,
    /// Sleep this many microseconds inside an operation's window every --sleep-every
    /// operations (cut short when --duration is over).
    #[arg(long, value_name = "N")]
    sleep_us: Option<u64>,
    /// Operations of a worker between two sleeps.
    #[arg(
        long,
        value_name = "K",
        default_value_t = 10_000,
        requires = "sleep_us"
    )]
    sleep_every: u64,
    /// Send SIGUSR1 to the workers in turn; the handler adds to a checked Counter.
    #[arg(long)]
    signals: bool,
    /// Microseconds between two signals.
    #[arg(long, value_name = "US", default_value_t = 100, requires = "signals")]
    signal_interval_us: u64,
    /// Spin this many loops inside every restartable sequence (needs a build with
    /// --features test-hooks).
    #[arg(long, value_name = "LOOPS")]
    delay: Option<usize>,
    /// Move workers between CPUs with sched_setaffinity.
    #[arg(long)]
    affinity_churn: bool,
    /// Microseconds between two moves.
    #[arg(
        long,
        value_name = "US",
        default_value_t = 1000,
        requires = "affinity_churn"
    )]
    affinity_interval_us: u64,
    /// Workers exit after --churn-ops operations and are replaced.
    #[arg(long)]
    thread_churn: bool,
    /// Operations in a worker's life under --thread-churn.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20_000,
        requires = "thread_churn"
    )]
    churn_ops: u64,
    /// Torture a deliberately broken variant (counter: an add without restart; stack: the
    /// guard against remote owners switched off); the run must then fail. Needs a build
    /// with --features test-hooks.
    #[arg(long)]
    broken: bool,
    /// Print one JSON object instead of text (and no progress bar).
    #[arg(long)]
    json: bool,
}

impl StressArgs {
    fn config(&self) -> Result<stress::Config, String> {
        let threads = self
            .threads
            .map_or_else(|| 4 * cpulocal::sys::online_cpus().max(1), |t| t as usize)
            .min(stress::MAX_THREADS);
        let amount = match self.duration {
            Some(secs) if secs > 0.0 && Duration::try_from_secs_f64(secs).is_ok() => {
                Amount::Duration(Duration::from_secs_f64(secs))
            }
            Some(secs) => {
                return Err(format!(
                    "--duration must be a positive, finite number of seconds, not {secs}"
                ))
            }
            None => Amount::Ops(self.ops.unwrap_or(10_000_000)),
        };
        let mut config = stress::Config::new(self.structure, threads, amount);
        config.yield_every = self.yield_.then_some(self.yield_every);
        config.sleep = self.sleep_us.map(|us| stress::Sleep {
            duration: Duration::from_micros(us),
            every: self.sleep_every,
        });
        config.signal_interval = self
            .signals
            .then(|| Duration::from_micros(self.signal_interval_us));
        config.delay_loops = self.delay;
        config.affinity_interval = self
            .affinity_churn
            .then(|| Duration::from_micros(self.affinity_interval_us));
        config.thread_churn = self.thread_churn.then_some(self.churn_ops);
        config.broken = self.broken;
        config.validate()?;
        Ok(config)
    }
}

/// `println!` that ends the program quietly (status 0) when stdout is a pipe whose
/// reader has gone (`cpulocal bench | head`), instead of panicking on `EPIPE`: Rust
/// ignores `SIGPIPE`, so the write reports the closed pipe as an error.
macro_rules! out {
    ($($arg:tt)*) => {
        written(writeln!(io::stdout(), $($arg)*))
    };
}

/// Ends the program on a failed write to stdout or stderr: quietly (status 0) when
/// the reader closed the pipe, with a message (status 1) otherwise.
fn written(result: io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            let _ = writeln!(io::stderr(), "error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    // A child of the memory group, running one scenario.
    if bench::memory::probe_if_asked() {
        return;
    }
    match Cli::parse().command {
        Command::Info { json } => {
            let info = Info::gather();
            if json {
                out!("{}", info.to_json());
            } else {
                out!("{info}");
            }
        }
        Command::Bench {
            threads,
            json,
            quick,
            group,
            plot,
            layout,
        } => run_bench(
            bench::Config::new(threads.map(|t| t.0), quick, group).with_layout(layout),
            json,
            plot.as_deref(),
        ),
        Command::Stress(args) => run_stress(&args),
    }
}

fn run_stress(args: &StressArgs) {
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if !args.json {
        // Not `out!`: a reader gone already must not end the run with status 0 before
        // it ran; the verdict's status comes at the end (`verdict_written`).
        verdict_written(writeln!(io::stdout(), "{}", stress::header(&config)), None);
    }
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let (len, template) = match config.amount {
            Amount::Ops(n) => (
                n,
                "{elapsed_precise} [{bar:30}] {human_pos}/{human_len} ops, ETA {eta}",
            ),
            Amount::Duration(d) => (d.as_millis() as u64, "{elapsed_precise} [{bar:30}] {msg}"),
        };
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    });
    let result = stress::run(&config, |p| {
        if let Some(bar) = &bar {
            match p.amount {
                Amount::Ops(_) => bar.set_position(p.operations),
                Amount::Duration(_) => {
                    bar.set_position(p.elapsed.as_millis() as u64);
                    bar.set_message(format!("{} ops", p.operations));
                }
            }
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let status = if report.passed { 0 } else { 1 };
    let shown = if args.json {
        writeln!(io::stdout(), "{}", report.to_json())
    } else {
        writeln!(io::stdout(), "{report}")
    };
    verdict_written(shown, Some(status));
    std::process::exit(status);
}

/// [`written`] for `stress`, whose exit status is its verdict (scripts and CI read it):
/// a reader that closed the pipe (`cpulocal stress | head`) must not turn a FAIL into
/// status 0, as `out!` would. `status`: the verdict's, once known (`None`: the run has
/// not run yet, so carry on to it). Other write errors still end with status 1.
fn verdict_written(result: io::Result<()>, status: Option<i32>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            if let Some(status) = status {
                std::process::exit(status);
            }
        }
        Err(e) => {
            let _ = writeln!(io::stderr(), "error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

fn run_bench(config: bench::Config, json: bool, plot: Option<&std::path::Path>) {
    // Text goes to stdout; with --json, stdout carries the rows alone.
    let mut text: Box<dyn Write> = if json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let started = Instant::now();
    written(writeln!(text, "{}", bench::header(&config)));
    for &group in &config.groups {
        for note in bench::skipped_rows(group) {
            written(writeln!(text, "skipped: {note}"));
        }
    }
    if !json {
        written(writeln!(text, "{}", RowResult::table_heading()));
    }
    let results = bench::run(&config, |rows| {
        for row in rows {
            if json {
                out!("{}", row.to_json());
            } else {
                out!("{}", row.table_line());
            }
        }
    });
    if !json {
        written(writeln!(
            text,
            "\n* the group's cpulocal row; vs cpulocal = row ns/op / cpulocal ns/op"
        ));
        for (name, what) in bench::legend() {
            if results.iter().any(|r| r.name == name) {
                written(writeln!(
                    text,
                    "  {name:<w$} {what}",
                    w = RowResult::NAME_WIDTH
                ));
            }
        }
    }
    for (report, json_line) in bench::untimed_reports(&config) {
        if json {
            out!("{json_line}");
        } else {
            written(writeln!(text, "\n{report}"));
        }
    }
    written(writeln!(text, "\ntargets (reported, not asserted):"));
    for target in bench::targets(&results) {
        written(writeln!(text, "  {target}"));
    }
    written(writeln!(
        text,
        "measured in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    if let Some(path) = plot {
        let title = format!(
            "cpulocal bench: {}; {} online CPUs; kernel {}",
            cpulocal::mechanism(),
            cpulocal::sys::online_cpus(),
            cpulocal::sys::kernel_release()
        );
        match bench::plot(&results, &title, path) {
            Ok(()) => written(writeln!(text, "plot: {}", path.display())),
            Err(e) => {
                let _ = writeln!(io::stderr(), "error: {e}");
                std::process::exit(1);
            }
        }
    }
}
