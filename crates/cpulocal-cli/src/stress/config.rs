//! What a run is told ([`Config`]) and the checks of its knobs.

use std::time::Duration;

use super::registry::list;
use super::Structure;

/// The most threads a run may start at once.
pub const MAX_THREADS: usize = 4096;
/// What the error messages say when a knob needs the `test-hooks` feature.
pub const NEEDS_TEST_HOOKS: &str = "rebuild with --features test-hooks";
/// Whether this build has cpulocal's test hooks (`--delay`, `--broken`, abort counts).
pub const HAS_TEST_HOOKS: bool = cfg!(feature = "test-hooks");

/// How long a run lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    /// This many worker operations in total, shared out among the workers as they go.
    Ops(u64),
    /// Until this much time has passed (workers finish the batch they are in).
    Duration(Duration),
}

/// `--sleep-us`: a `nanosleep` inside the window every `every` operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sleep {
    /// How long each sleep lasts.
    pub duration: Duration,
    /// Operations between two sleeps of one worker.
    pub every: u64,
}

/// Everything a run is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// What to torture.
    pub structure: Structure,
    /// Workers running at once.
    pub threads: usize,
    /// How long the run lasts.
    pub amount: Amount,
    /// `sched_yield` inside the window every this many operations of a worker.
    pub yield_every: Option<u64>,
    /// An occasional sleep inside the window.
    pub sleep: Option<Sleep>,
    /// One `SIGUSR1` to the next worker in turn at this interval.
    pub signal_interval: Option<Duration>,
    /// Spin loops inside every sequence (needs the `test-hooks` feature).
    pub delay_loops: Option<usize>,
    /// Move one worker to another CPU (or back to all) at this interval.
    pub affinity_interval: Option<Duration>,
    /// Each worker exits after this many operations and is replaced.
    pub thread_churn: Option<u64>,
    /// Torture a deliberately broken variant (needs the `test-hooks` feature).
    pub broken: bool,
}

impl Config {
    /// `threads` workers on `structure` for `amount`, with no injection.
    ///
    /// ```
    /// use cpulocal_cli::stress::{Amount, Config};
    /// let config = Config::new("counter".parse().unwrap(), 2, Amount::Ops(1000));
    /// assert!(config.validate().is_ok());
    /// let report = cpulocal_cli::stress::run(&config, |_| ()).unwrap();
    /// assert_eq!(report.operations, 1000);
    /// assert!(report.passed);
    /// ```
    pub fn new(structure: Structure, threads: usize, amount: Amount) -> Config {
        Config {
            structure,
            threads,
            amount,
            yield_every: None,
            sleep: None,
            signal_interval: None,
            delay_loops: None,
            affinity_interval: None,
            thread_churn: None,
            broken: false,
        }
    }

    /// Checks the knobs, with a message naming the option at fault.
    ///
    /// # Errors
    ///
    /// A knob out of range, or one that needs the `test-hooks` feature in a build
    /// without it.
    ///
    /// ```
    /// use cpulocal_cli::stress::{Amount, Config};
    /// let mut config = Config::new("ring".parse().unwrap(), 2, Amount::Ops(10));
    /// config.broken = true;
    /// assert!(config.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(format!(
                "--threads must be from 1 to {MAX_THREADS}, not {}",
                self.threads
            ));
        }
        match self.amount {
            Amount::Ops(0) => return Err("--ops must be at least 1".into()),
            Amount::Duration(d) if d.is_zero() => {
                return Err("--duration must be more than 0 seconds".into())
            }
            _ => {}
        }
        if self.yield_every == Some(0) {
            return Err("--yield-every must be at least 1".into());
        }
        if self.sleep.is_some_and(|s| s.every == 0) {
            return Err("--sleep-every must be at least 1".into());
        }
        if self.thread_churn == Some(0) {
            return Err("--churn-ops must be at least 1".into());
        }
        if self.signal_interval.is_some_and(|d| d.is_zero()) {
            return Err("--signal-interval-us must be at least 1".into());
        }
        if self.affinity_interval.is_some_and(|d| d.is_zero()) {
            return Err("--affinity-interval-us must be at least 1".into());
        }
        if self.delay_loops.is_some() && !HAS_TEST_HOOKS {
            return Err(format!(
                "--delay needs cpulocal's test hooks, which this build lacks: {NEEDS_TEST_HOOKS}"
            ));
        }
        if self.broken {
            if !HAS_TEST_HOOKS {
                return Err(format!(
                    "--broken needs cpulocal's test hooks, which this build lacks: {NEEDS_TEST_HOOKS}"
                ));
            }
            if !self.structure.has_mutation() {
                return Err(broken_error(self.structure));
            }
        }
        Ok(())
    }
}

/// The refusal of `--broken` for `structure`, which has no broken variant: "--broken has
/// mutations for a and b (and c, d), not for e", the structures of one part first, then
/// the ones made of several.
fn broken_error(structure: Structure) -> String {
    let with = |one: bool| -> Vec<&str> {
        Structure::ALL
            .iter()
            .filter(|s| s.has_mutation() && (s.def().parts.len() == 1) == one)
            .map(|s| s.name())
            .collect()
    };
    let composites = with(false);
    let also = if composites.is_empty() {
        String::new()
    } else {
        format!(" (and {})", composites.join(", "))
    };
    format!(
        "--broken has mutations for {}{also}, not for {structure}",
        list(&with(true), "and")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Structure {
        name.parse().expect("a registered structure")
    }

    #[test]
    fn knobs_that_need_test_hooks_say_how_to_get_them() {
        let mut config = Config::new(named("counter"), 1, Amount::Ops(1));
        config.delay_loops = Some(10);
        assert_eq!(config.validate().is_ok(), HAS_TEST_HOOKS);
        if !HAS_TEST_HOOKS {
            assert!(config.validate().unwrap_err().contains(NEEDS_TEST_HOOKS));
        }
        let mut config = Config::new(named("lock"), 1, Amount::Ops(1));
        config.broken = true;
        assert_eq!(
            config.validate().unwrap_err(),
            if HAS_TEST_HOOKS {
                "--broken has mutations for counter and stack (and remote, mix), not for lock"
                    .to_string()
            } else {
                format!("--broken needs cpulocal's test hooks, which this build lacks: {NEEDS_TEST_HOOKS}")
            }
        );
    }
}
