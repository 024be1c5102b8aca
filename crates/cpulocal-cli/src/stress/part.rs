//! What a structure's module hands the stress harness: a [`StructureDef`] (its name and
//! the parts its threads take turns at) and, for a cpulocal structure of its own, a
//! [`PartDef`] and a [`Part`] (its state for a run, its operations and its check).
//!
//! A *part* is one cpulocal structure as a run exercises it (`counter`, `stack`, `lock`,
//! `ring`); a *structure* is what `--structure` names: one part (`counter`), or several
//! that threads take turns at (`remote`, `mix`). The harness knows parts only through
//! [`ErasedPart`], so it keeps no per-part field: a new part, like a new composite, is
//! one module and one line in [`Structure::ALL`](super::Structure::ALL).

use core::any::Any;
use core::fmt;

use cpulocal::Counter;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;

use super::harness::{Rng, Shared};
use super::Config;

/// A structure `cpulocal stress` can torture.
pub(super) struct StructureDef {
    /// The name used on the command line and in the output.
    pub(super) name: &'static str,
    /// What the help of `--structure` says after the name, in parentheses.
    pub(super) help: Option<&'static str>,
    /// The parts the workers take turns at, in this order.
    pub(super) parts: &'static [&'static PartDef],
    /// The parts the remote thread takes turns at, in this order; none: no remote thread.
    pub(super) remote: &'static [&'static PartDef],
}

/// One cpulocal structure as a run exercises it.
pub(super) struct PartDef {
    /// Its key in the report (and its name).
    pub(super) name: &'static str,
    /// Its state for a run of `config`.
    pub(super) new: fn(&Config) -> Box<dyn ErasedPart>,
    /// Switches the deliberately broken variant of `--broken` on for the run's part
    /// (`Some`) or off (`None`); a no-op in builds without the `test-hooks` feature.
    /// `None`: the part has none.
    pub(super) mutation: Option<fn(Option<&dyn ErasedPart>)>,
    /// The report's entries when the run has no such part; `None`: its key, null.
    pub(super) absent: Option<fn(&Shared) -> Vec<Entry>>,
}

/// Which operation a worker is at.
#[derive(Clone, Copy)]
pub(super) struct Turn {
    /// The worker's operation number, over every part (the injections' clock).
    pub(super) i: u64,
    /// Which operation of this part it is for the worker.
    pub(super) n: u64,
}

/// A part's state for one run, its operations and its check.
pub(super) trait Part: Send + Sync + 'static {
    /// What one thread did to the part, checked against the part's state at the end.
    type Tally: Send + 'static;

    /// A thread's tally, before its first operation.
    fn new_tally(&self) -> Self::Tally;

    /// Called by initial worker `worker` of `workers` before the run starts (e.g. to put
    /// its share of the items in circulation).
    fn seed(&self, _worker: usize, _workers: usize) {}

    /// A worker's operation; the window is [`Shared::inject`] with `turn.i`.
    fn op(&self, run: &Shared, turn: Turn, t: &mut Self::Tally, rng: &mut Rng);

    /// The remote thread's operation `n` on `victim`'s slot. Only parts a structure
    /// lists in [`StructureDef::remote`] need one.
    fn remote_op(&self, _run: &Shared, _victim: usize, _n: u64, _t: &mut Self::Tally) {
        unreachable!("this part has no remote operation")
    }

    /// The counter the signal handler adds to, if the part wants signals to race it.
    fn signal_counter(&self) -> Option<&Counter> {
        None
    }

    /// The name of the part's background thread (e.g. a consumer), if it has one.
    const BACKGROUND: Option<&'static str> = None;

    /// The background thread's body: runs from the start until
    /// [`Shared::background_stop`] is set (after every worker and the remote thread
    /// are joined), then finishes its work and returns.
    fn background(&self, _run: &Shared) {}

    /// The exact check, once every thread is joined: the part's entries of the report.
    fn check(&self, run: &Shared, tallies: &[&Self::Tally]) -> Vec<Entry>;
}

/// [`Part`] with its tally type erased, as the harness holds parts.
pub(super) trait ErasedPart: Send + Sync {
    fn new_tally(&self) -> Box<dyn Any + Send>;
    fn seed(&self, worker: usize, workers: usize);
    fn op(&self, run: &Shared, turn: Turn, t: &mut (dyn Any + Send), rng: &mut Rng);
    fn remote_op(&self, run: &Shared, victim: usize, n: u64, t: &mut (dyn Any + Send));
    fn signal_counter(&self) -> Option<&Counter>;
    fn background_thread(&self) -> Option<&'static str>;
    fn background(&self, run: &Shared);
    fn check(&self, run: &Shared, tallies: &[&(dyn Any + Send)]) -> Vec<Entry>;
}

/// The tally a harness thread keeps for part `P`.
fn tally_of<P: Part>(t: &mut (dyn Any + Send)) -> &mut P::Tally {
    t.downcast_mut().expect("the tally of this part")
}

impl<P: Part> ErasedPart for P {
    fn new_tally(&self) -> Box<dyn Any + Send> {
        Box::new(Part::new_tally(self))
    }
    fn seed(&self, worker: usize, workers: usize) {
        Part::seed(self, worker, workers);
    }
    #[inline]
    fn op(&self, run: &Shared, turn: Turn, t: &mut (dyn Any + Send), rng: &mut Rng) {
        Part::op(self, run, turn, tally_of::<P>(t), rng);
    }
    fn remote_op(&self, run: &Shared, victim: usize, n: u64, t: &mut (dyn Any + Send)) {
        Part::remote_op(self, run, victim, n, tally_of::<P>(t));
    }
    fn signal_counter(&self) -> Option<&Counter> {
        Part::signal_counter(self)
    }
    fn background_thread(&self) -> Option<&'static str> {
        P::BACKGROUND
    }
    fn background(&self, run: &Shared) {
        Part::background(self, run);
    }
    fn check(&self, run: &Shared, tallies: &[&(dyn Any + Send)]) -> Vec<Entry> {
        let tallies: Vec<&P::Tally> = tallies
            .iter()
            .map(|t| t.downcast_ref().expect("the tally of this part"))
            .collect();
        Part::check(self, run, &tallies)
    }
}

/// What a part's check reports: its JSON object, its line of text and its verdict.
pub(super) trait Check: Serialize + fmt::Display {
    /// What the check found wrong.
    fn faults(&self) -> Faults;
    /// Adds that went through `Counter`'s slow path, for a part checking a `Counter`.
    fn slow_path(&self) -> Option<u64> {
        None
    }
}

/// The verdict of a check, the last keys of its JSON object (`#[serde(flatten)]`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Faults {
    /// Values that are not what any thread wrote.
    pub corrupt: u64,
    /// Updates, items or records lost.
    pub lost: u64,
    /// Ones counted, held or read more than once.
    pub duplicated: u64,
}

/// A check as the report keeps it.
#[derive(Clone, Debug)]
pub(super) struct Section {
    json: Box<RawValue>,
    text: String,
    pub(super) faults: Faults,
    pub(super) slow_path: Option<u64>,
}

/// One key of the report: a part's check, or null when the run has none.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    key: &'static str,
    pub(super) section: Option<Section>,
}

impl Entry {
    /// `check` (or null) under `key`.
    pub(super) fn new(key: &'static str, check: Option<&impl Check>) -> Entry {
        Entry {
            key,
            section: check.map(|c| Section {
                json: serde_json::value::to_raw_value(c).expect("a check serialises"),
                text: c.to_string(),
                faults: c.faults(),
                slow_path: c.slow_path(),
            }),
        }
    }

    /// Null under `key`.
    pub(super) fn null(key: &'static str) -> Entry {
        Entry { key, section: None }
    }
}

/// The parts' entries of a report, in the order of the registry, each key present:
/// serialised into the report's JSON object, one key per entry.
#[derive(Clone, Debug)]
pub(super) struct Sections(pub(super) Vec<Entry>);

impl Sections {
    /// The checks present, in order.
    pub(super) fn present(&self) -> impl Iterator<Item = &Section> {
        self.0.iter().filter_map(|e| e.section.as_ref())
    }

    /// The checks' lines of text, in order.
    pub(super) fn lines(&self) -> impl Iterator<Item = &str> {
        self.present().map(|s| s.text.as_str())
    }
}

impl Serialize for Sections {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for e in &self.0 {
            map.serialize_entry(e.key, &e.section.as_ref().map(|s| &s.json))?;
        }
        map.end()
    }
}
