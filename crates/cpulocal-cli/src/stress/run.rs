//! The run: its threads started, supervised and joined, then the exact checks that make
//! its [`Report`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cpulocal::sys;

use super::harness::{
    churner, hooks, ignore_signal, install_handler, join, remote, signaller, spawn, worker, Shared,
    Tally, RUN, SINK, STORM,
};
use super::part::{self, Sections};
use super::registry::registered_parts;
use super::{Amount, Config, Report};

/// Where a run stands, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Worker operations done so far.
    pub operations: u64,
    /// Time since the workers started.
    pub elapsed: Duration,
    /// How long the run lasts.
    pub amount: Amount,
}

/// Runs the stress `config` describes and checks every structure, calling `progress`
/// about ten times a second from the calling thread.
///
/// # Errors
///
/// An invalid `config` ([`Config::validate`]), or a signal handler that cannot be
/// installed.
///
/// A thread of the run that panics fails the run: the report says so, with the panic's
/// message ([`Report::panics`]), and its other checks go on.
///
/// # Panics
///
/// When a thread cannot be started.
pub fn run(config: &Config, mut progress: impl FnMut(&Progress)) -> Result<Report, String> {
    config.validate()?;
    let _one_at_a_time = RUN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cpulocal::register_current_thread();
    let remote_scheme = cpulocal::remote_scheme().to_string();
    let shared = Arc::new(Shared::new(config));
    if config.signal_interval.is_some() {
        // The handler does nothing while SINK is null, so it can be installed first.
        install_handler(STORM)?;
        // Release: pairs with the handler's Acquire.
        SINK.store(Arc::as_ptr(&shared).cast_mut(), Ordering::Release);
    }

    let threads = config.threads;
    let lifetime = config.thread_churn;
    let mut workers: Vec<Option<JoinHandle<Tally>>> = (0..threads)
        .map(|w| {
            let s = Arc::clone(&shared);
            Some(spawn("stress-worker", move || {
                worker(s, Some((w, threads)), lifetime)
            }))
        })
        .collect();
    let mut started = threads as u64;
    // Acquire: pairs with the workers' Release: the parts are seeded. A worker that
    // panicked before it was ready never will be: go without it.
    while shared.ready.load(Ordering::Acquire) + finished(&workers) < threads {
        std::thread::sleep(Duration::from_micros(100));
    }

    let delay = config.delay_loops.unwrap_or(0);
    hooks::set_delay_loops(delay);
    set_mutations(&shared, config.broken);
    let aborts_before = hooks::kernel_aborts();
    let start = Instant::now();
    // Release: the hooks are set before any worker starts.
    shared.go.store(true, Ordering::Release);

    let remote_thread = (!shared.remote_turns.is_empty()).then(|| {
        let s = Arc::clone(&shared);
        spawn("stress-remote", move || remote(s))
    });
    let background_threads: Vec<JoinHandle<()>> = (0..shared.parts.len())
        .filter_map(|k| {
            let name = shared.parts[k].1.background_thread()?;
            let s = Arc::clone(&shared);
            Some(spawn(name, move || s.parts[k].1.background(&s)))
        })
        .collect();
    let signaller_thread = config.signal_interval.map(|interval| {
        let s = Arc::clone(&shared);
        spawn("stress-signals", move || signaller(s, interval))
    });
    let churner_thread = config.affinity_interval.map(|interval| {
        let s = Arc::clone(&shared);
        spawn("stress-affinity", move || churner(s, interval))
    });

    // Supervise: join workers that exit, replace them under thread churn, stop at the
    // deadline, report progress.
    let mut tallies = Vec::new();
    let mut panics = Vec::new();
    let mut joined = |result: Result<Tally, String>| match result {
        Ok(t) => tallies.push(t),
        Err(panic) => panics.push(panic),
    };
    let mut last_progress = Instant::now();
    loop {
        for slot in workers.iter_mut() {
            if slot.as_ref().is_some_and(JoinHandle::is_finished) {
                joined(join(slot.take().expect("checked")));
                if config.thread_churn.is_some() && shared.has_work() {
                    let s = Arc::clone(&shared);
                    *slot = Some(spawn("stress-worker", move || worker(s, None, lifetime)));
                    started += 1;
                }
            }
        }
        if workers.iter().all(Option::is_none) {
            break;
        }
        if let Amount::Duration(d) = config.amount {
            if start.elapsed() >= d {
                // Relaxed: polled between batches.
                shared.stop.store(true, Ordering::Relaxed);
            }
        }
        if last_progress.elapsed() >= Duration::from_millis(100) {
            last_progress = Instant::now();
            progress(&Progress {
                operations: shared.done.load(Ordering::Relaxed),
                elapsed: start.elapsed(),
                amount: config.amount,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Release: the remote thread stops once every worker is out.
    shared.workers_finished.store(true, Ordering::Release);
    if let Some(handle) = remote_thread {
        joined(join(handle));
    }
    let elapsed = start.elapsed();
    shared.aux_stop.store(true, Ordering::Relaxed);
    let signals_sent = signaller_thread.map_or(0, |h| or_default(join(h), &mut panics));
    let (affinity_moves, affinity_failures) =
        churner_thread.map_or((0, 0), |h| or_default(join(h), &mut panics));
    let kernel_aborts = hooks::kernel_aborts()
        .zip(aborts_before)
        .map(|(after, before)| after - before);
    hooks::set_delay_loops(0);
    set_mutations(&shared, false);
    // Release: every writer is joined; the consumer's last pass sees all commits.
    shared.background_stop.store(true, Ordering::Release);
    for handle in background_threads {
        if let Err(panic) = join(handle) {
            panics.push(panic);
        }
    }
    if config.signal_interval.is_some() {
        ignore_signal(STORM);
        SINK.store(core::ptr::null_mut(), Ordering::Release);
    }
    progress(&Progress {
        operations: shared.done.load(Ordering::Relaxed),
        elapsed,
        amount: config.amount,
    });

    Ok(check(
        config,
        &shared,
        &tallies,
        Facts {
            remote_scheme,
            started,
            elapsed,
            kernel_aborts,
            signals_sent,
            affinity_moves,
            affinity_failures,
            panics,
        },
    ))
}

/// A helper thread's result, or its default (zero counts) when it panicked, noted in
/// `panics`.
fn or_default<T: Default>(result: Result<T, String>, panics: &mut Vec<String>) -> T {
    result.unwrap_or_else(|panic| {
        panics.push(panic);
        T::default()
    })
}

/// The workers that have exited (or panicked) and are not joined yet.
fn finished(workers: &[Option<JoinHandle<Tally>>]) -> usize {
    workers
        .iter()
        .filter(|w| w.as_ref().is_some_and(JoinHandle::is_finished))
        .count()
}

/// Switches the broken variant of every registered part on (`broken`: those of the run)
/// or off.
fn set_mutations(shared: &Shared, broken: bool) {
    for def in registered_parts() {
        if let Some(mutation) = def.mutation {
            let in_run = shared.parts.iter().find(|(p, _)| p.name == def.name);
            mutation(in_run.filter(|_| broken).map(|(_, part)| &**part));
        }
    }
}

/// What the run measured besides the tallies.
struct Facts {
    remote_scheme: String,
    started: u64,
    elapsed: Duration,
    kernel_aborts: Option<u64>,
    signals_sent: u64,
    affinity_moves: u64,
    affinity_failures: u64,
    panics: Vec<String>,
}

/// The exact checks, once every thread is joined.
fn check(config: &Config, shared: &Shared, tallies: &[Tally], facts: Facts) -> Report {
    let sum = |f: &dyn Fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let mut entries = Vec::new();
    for def in registered_parts() {
        match shared.parts.iter().position(|(p, _)| p.name == def.name) {
            Some(k) => {
                let part_tallies: Vec<_> = tallies.iter().map(|t| &*t.parts[k]).collect();
                entries.extend(shared.parts[k].1.check(shared, &part_tallies));
            }
            None => match def.absent {
                Some(absent) => entries.extend(absent(shared)),
                None => entries.push(part::Entry::null(def.name)),
            },
        }
    }
    let sections = Sections(entries);
    let lost = sections.present().map(|s| s.faults.lost).sum();
    let duplicated = sections.present().map(|s| s.faults.duplicated).sum();
    let corrupt = sections.present().map(|s| s.faults.corrupt).sum();
    let slow_path = sections.present().find_map(|s| s.slow_path);
    Report {
        structure: config.structure.name(),
        threads: config.threads,
        threads_started: facts.started,
        mechanism: cpulocal::mechanism().to_string(),
        remote_scheme: facts.remote_scheme,
        kernel: sys::kernel_release(),
        online_cpus: sys::online_cpus(),
        usable_cpus: shared.cpus.len(),
        seconds: facts.elapsed.as_secs_f64(),
        operations: sum(&|t| t.ops),
        remote_operations: sum(&|t| t.remote_ops),
        delay_loops: config.delay_loops.unwrap_or(0),
        broken: config.broken,
        kernel_aborts: facts.kernel_aborts,
        slow_path,
        signals_sent: facts.signals_sent,
        signals_handled: shared.handled(),
        affinity_moves: facts.affinity_moves,
        affinity_failures: facts.affinity_failures,
        sections,
        lost,
        duplicated,
        corrupt,
        passed: lost == 0 && duplicated == 0 && corrupt == 0 && facts.panics.is_empty(),
        panics: facts.panics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::Structure;

    #[test]
    fn every_structure_is_exact_in_a_small_run() {
        for &structure in Structure::ALL {
            let mut config = Config::new(structure, 3, Amount::Ops(20_000));
            config.yield_every = Some(50);
            config.signal_interval = Some(Duration::from_micros(200));
            config.affinity_interval = Some(Duration::from_micros(500));
            let report = run(&config, |_| ()).expect("valid config");
            assert!(report.passed, "{structure}: {report}");
            assert_eq!(report.operations, 20_000, "{structure}");
        }
    }
}
