//! The `lock` structure: `PerCpu::with_cpu` reads the slot's count, (window), writes
//! it plus one; in `remote` and `mix` the remote thread increments other CPUs' slots
//! with `on_cpu`. Each slot's count must equal the increments tallied for that slot.

use core::fmt;
use std::hint::black_box;

use cpulocal::PerCpu;
use serde::Serialize;

use super::harness::{Rng, Shared};
use super::part::{Check, Entry, ErasedPart, Faults, Part, PartDef, StructureDef, Turn};

/// `--structure lock`.
pub(super) const STRUCTURE: StructureDef = StructureDef {
    name: "lock",
    help: Some("PerCpu::with_cpu"),
    parts: &[&PART],
    remote: &[],
};

/// The lock part.
pub(super) const PART: PartDef = PartDef {
    name: "lock",
    new: |_| -> Box<dyn ErasedPart> {
        Box::new(LockPart {
            slots: PerCpu::new(|index| LockSlot { index, count: 0 }),
        })
    },
    mutation: None,
    absent: None,
};

/// A per-CPU slot of the lock part.
struct LockSlot {
    /// The slot's index, so `with_cpu` can say which slot it ran on.
    index: usize,
    /// Increments made under the slot's lock.
    count: u64,
}

/// The lock check: per-slot totals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LockCheck {
    /// Slots that received increments.
    pub slots_used: u64,
    /// Increments made under `with_cpu`.
    pub local: u64,
    /// Increments made under `on_cpu` by the remote thread.
    pub remote: u64,
    /// The slots' counts, added up.
    pub found: u64,
    /// Slots whose count differs from its tally.
    pub slots_wrong: u64,
    /// Increments missing from their slot.
    pub lost: u64,
    /// Increments found beyond their slot's tally.
    pub duplicated: u64,
}

impl fmt::Display for LockCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lock: {} slots used; {} increments ({} with_cpu + {} on_cpu), {} found; {} slots wrong",
            self.slots_used,
            self.local + self.remote,
            self.local,
            self.remote,
            self.found,
            self.slots_wrong
        )
    }
}

impl Check for LockCheck {
    fn faults(&self) -> Faults {
        Faults {
            corrupt: 0,
            lost: self.lost,
            duplicated: self.duplicated,
        }
    }
}

/// A run's slots, one per CPU, each knowing its index.
struct LockPart {
    slots: PerCpu<LockSlot>,
}

/// What a thread did to the slots.
struct LockTally {
    /// Increments per slot.
    slots: Vec<u64>,
    /// Of which under `on_cpu`.
    remote: u64,
}

impl Part for LockPart {
    type Tally = LockTally;

    fn new_tally(&self) -> LockTally {
        LockTally {
            slots: vec![0; self.slots.slots()],
            remote: 0,
        }
    }

    /// Read-modify-write of the CPU's slot with the window in the middle, under the
    /// slot's lock.
    #[inline]
    fn op(&self, run: &Shared, turn: Turn, t: &mut LockTally, _: &mut Rng) {
        let index = self.slots.with_cpu(|slot| {
            let count = black_box(slot.count);
            run.inject(turn.i);
            slot.count = black_box(count + 1);
            slot.index
        });
        t.slots[index] += 1;
    }

    /// An increment of `victim`'s slot under `on_cpu`.
    fn remote_op(&self, _: &Shared, victim: usize, _: u64, t: &mut LockTally) {
        self.slots
            .on_cpu(victim, |slot| slot.count += 1)
            .expect("victims are below the slots");
        t.slots[victim] += 1;
        t.remote += 1;
    }

    /// Each slot against its tally.
    fn check(&self, _: &Shared, tallies: &[&LockTally]) -> Vec<Entry> {
        let mut expected = vec![0u64; self.slots.slots()];
        for t in tallies {
            for (e, n) in expected.iter_mut().zip(&t.slots) {
                *e += n;
            }
        }
        let remote: u64 = tallies.iter().map(|t| t.remote).sum();
        let mut l = LockCheck {
            local: expected.iter().sum::<u64>() - remote,
            remote,
            ..LockCheck::default()
        };
        self.slots.for_each(|cpu, slot| {
            let want = expected[cpu];
            l.found += slot.count;
            l.slots_used += u64::from(want > 0 || slot.count > 0);
            l.slots_wrong += u64::from(slot.count != want);
            l.lost += want.saturating_sub(slot.count);
            l.duplicated += slot.count.saturating_sub(want);
        });
        vec![Entry::new("lock", Some(&l))]
    }
}
