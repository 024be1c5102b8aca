//! The `counter` part of a stress run: `Counter::add(1)` per operation, racing the
//! signal handler's adds to the same counter; the sum must equal every add made.

use serde::Serialize;

use super::harness::{Shared, Tally};
use super::Config;

/// The counter check: the sum against the adds made.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CounterCheck {
    /// Adds made by the workers.
    pub worker_adds: u64,
    /// Adds made by the signal handler.
    pub handler_adds: u64,
    /// `worker_adds + handler_adds`.
    pub expected: u64,
    /// What the counter says.
    pub sum: u64,
    /// `Counter::slow_path_sum` (absent for the broken counter).
    pub slow_path: Option<u64>,
    /// Adds missing from the sum.
    pub lost: u64,
    /// Adds counted more than once.
    pub duplicated: u64,
}

impl CounterCheck {
    fn new(worker_adds: u64, handler_adds: u64, sum: u64, slow_path: Option<u64>) -> Self {
        let expected = worker_adds + handler_adds;
        CounterCheck {
            worker_adds,
            handler_adds,
            expected,
            sum,
            slow_path,
            lost: expected.saturating_sub(sum),
            duplicated: sum.saturating_sub(expected),
        }
    }
}

/// A worker's counter operation: one add, then the window.
#[inline]
pub(super) fn op(shared: &Shared, i: u64, t: &mut Tally) {
    shared.counter.as_ref().expect("counter part").add(1);
    t.counter_adds += 1;
    shared.inject(i);
}

/// The counter part's check and, when the run has no counter part but signals, the
/// signal handler's own counter's: `handled` handler runs, each one add.
pub(super) fn check(
    config: &Config,
    shared: &Shared,
    tallies: &[Tally],
    handled: u64,
) -> (Option<CounterCheck>, Option<CounterCheck>) {
    let sum = |f: &dyn Fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let counter = shared.counter.as_ref().map(|c| {
        CounterCheck::new(
            sum(&|t| t.counter_adds),
            handled,
            c.sum(),
            Some(c.slow_path_sum()),
        )
    });
    let signal_counter =
        (shared.counter.is_none() && config.signal_interval.is_some()).then(|| {
            CounterCheck::new(
                0,
                handled,
                shared.signal_counter.sum(),
                Some(shared.signal_counter.slow_path_sum()),
            )
        });
    (counter, signal_counter)
}
