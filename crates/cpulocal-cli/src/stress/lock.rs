//! The `lock` part of a stress run: `PerCpu::with_cpu` reads the slot's count,
//! (window), writes it + 1; the remote thread increments other CPUs' slots with
//! `on_cpu`. Each slot's count must equal the increments tallied for that slot.

use std::hint::black_box;

use cpulocal::PerCpu;
use serde::Serialize;

use super::harness::{Shared, Tally};

/// A per-CPU slot of the lock part.
pub(super) struct LockSlot {
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

/// The lock part's slots, one per CPU, each knowing its index.
pub(super) fn new_slots() -> PerCpu<LockSlot> {
    PerCpu::new(|index| LockSlot { index, count: 0 })
}

/// A worker's lock operation: read-modify-write of its CPU's slot with the window in
/// the middle, under the slot's lock.
#[inline]
pub(super) fn op(shared: &Shared, i: u64, t: &mut Tally) {
    let lock = shared.lock.as_ref().expect("lock part");
    let index = lock.with_cpu(|slot| {
        let count = black_box(slot.count);
        shared.inject(i);
        slot.count = black_box(count + 1);
        slot.index
    });
    t.lock_slots[index] += 1;
}

/// The remote thread's lock operation: an increment of `victim`'s slot under `on_cpu`.
pub(super) fn remote_op(shared: &Shared, victim: usize, t: &mut Tally) {
    let lock = shared.lock.as_ref().expect("lock part");
    lock.on_cpu(victim, |slot| slot.count += 1)
        .expect("victims are below the slots");
    t.lock_slots[victim] += 1;
    t.lock_remote += 1;
}

/// The lock part's check: each slot against its tally.
pub(super) fn check(shared: &Shared, tallies: &[Tally]) -> Option<LockCheck> {
    let sum = |f: &dyn Fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let lock = shared.lock.as_ref().map(|lock| {
        let mut expected = vec![0u64; lock.slots()];
        for t in tallies {
            for (e, n) in expected.iter_mut().zip(&t.lock_slots) {
                *e += n;
            }
        }
        let mut l = LockCheck {
            local: sum(&|t| t.lock_slots.iter().sum::<u64>() - t.lock_remote),
            remote: sum(&|t| t.lock_remote),
            ..LockCheck::default()
        };
        lock.for_each(|cpu, slot| {
            let want = expected[cpu];
            l.found += slot.count;
            l.slots_used += u64::from(want > 0 || slot.count > 0);
            l.slots_wrong += u64::from(slot.count != want);
            l.lost += want.saturating_sub(slot.count);
            l.duplicated += slot.count.saturating_sub(want);
        });
        l
    });
    lock
}
