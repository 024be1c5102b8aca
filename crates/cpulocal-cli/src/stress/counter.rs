//! The `counter` structure: `Counter::add(1)` per operation, racing the signal
//! handler's adds to the same counter; the sum must equal every add made.
//!
//! Also the report of the signal handler's own counter, which the harness keeps for runs
//! without a counter part (`signal_counter`): its sum must equal the handler's runs.

use core::fmt;

use cpulocal::Counter;
use serde::Serialize;

use super::harness::{hooks, Rng, Shared};
use super::part::{Check, Entry, ErasedPart, Faults, Part, PartDef, StructureDef, Turn};

/// `--structure counter`.
pub(super) const STRUCTURE: StructureDef = StructureDef {
    name: "counter",
    help: None,
    parts: &[&PART],
    remote: &[],
};

/// The counter part.
pub(super) const PART: PartDef = PartDef {
    name: "counter",
    new: |_| -> Box<dyn ErasedPart> {
        Box::new(CounterPart {
            counter: Counter::new(),
        })
    },
    // This part's counter only: the ring part's statistics are counters too.
    mutation: Some(|part| hooks::break_counter_sequence(part.and_then(|p| p.signal_counter()))),
    absent: Some(|run| vec![Entry::null("counter"), signal_counter_entry(run)]),
};

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
    fn new(worker_adds: u64, handler_adds: u64, counter: &Counter) -> Self {
        let expected = worker_adds + handler_adds;
        let sum = counter.sum();
        CounterCheck {
            worker_adds,
            handler_adds,
            expected,
            sum,
            slow_path: Some(counter.slow_path_sum()),
            lost: expected.saturating_sub(sum),
            duplicated: sum.saturating_sub(expected),
        }
    }
}

impl fmt::Display for CounterCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "counter: sum {} of {} expected ({} worker adds + {} handler adds)",
            self.sum, self.expected, self.worker_adds, self.handler_adds
        )
    }
}

impl Check for CounterCheck {
    fn faults(&self) -> Faults {
        Faults {
            corrupt: 0,
            lost: self.lost,
            duplicated: self.duplicated,
        }
    }
    fn slow_path(&self) -> Option<u64> {
        self.slow_path
    }
}

/// The check of the signal handler's own counter (no worker adds to it).
struct SignalCounterCheck(CounterCheck);

impl Serialize for SignalCounterCheck {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl fmt::Display for SignalCounterCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "signal counter: sum {} of {} handler adds",
            self.0.sum, self.0.expected
        )
    }
}

impl Check for SignalCounterCheck {
    fn faults(&self) -> Faults {
        self.0.faults()
    }
    fn slow_path(&self) -> Option<u64> {
        self.0.slow_path
    }
}

/// The harness's signal counter, under `signal_counter`: checked when the run sends
/// signals (and has no counter part, whose counter the handler then adds to).
fn signal_counter_entry(run: &Shared) -> Entry {
    let check = run
        .config
        .signal_interval
        .is_some()
        .then(|| SignalCounterCheck(CounterCheck::new(0, run.handled(), &run.signal_counter)));
    Entry::new("signal_counter", check.as_ref())
}

/// A run's counter.
struct CounterPart {
    counter: Counter,
}

impl Part for CounterPart {
    /// Adds made.
    type Tally = u64;

    fn new_tally(&self) -> u64 {
        0
    }

    /// One add, then the window.
    #[inline]
    fn op(&self, run: &Shared, turn: Turn, adds: &mut u64, _: &mut Rng) {
        self.counter.add(1);
        *adds += 1;
        run.inject(turn.i);
    }

    fn signal_counter(&self) -> Option<&Counter> {
        Some(&self.counter)
    }

    fn check(&self, run: &Shared, tallies: &[&u64]) -> Vec<Entry> {
        let worker_adds = tallies.iter().copied().sum();
        let check = CounterCheck::new(worker_adds, run.handled(), &self.counter);
        vec![
            Entry::new("counter", Some(&check)),
            Entry::null("signal_counter"),
        ]
    }
}
