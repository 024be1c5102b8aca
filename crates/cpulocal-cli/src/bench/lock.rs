//! The `lock` group: a short critical section per operation: `PerCpu::with_cpu` against
//! a global `Mutex` (std's and `parking_lot`'s) and one `Mutex` per CPU.
//!
//! One operation is a critical section that adds 1 to a `u64` with the floor's own
//! increment ([`floor_increment`]): under the calling thread's `PerCpu` slot lock (a
//! restartable compare-and-store to take it, a store to release it), under one global
//! `Mutex`, or under the `Mutex` of the thread's CPU. The check adds the slots up.

use std::marker::PhantomData;
use std::sync::Mutex;

use cpulocal::{CachePadded, Index, PerCpu};

use super::counter::{Locked, TlsAdd};
use super::harness::{
    floor_increment, per_cpu_slots, run_shaped, sum_check, GroupDef, OpFn, Row, Shape, Subject,
    TargetSpec, WorkOnly,
};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "lock",
    uses_remote_scheme: true,
    rows,
    layout_rows: Some(layout_rows),
    legend: &LEGEND,
    targets: &TARGETS,
    records_per_s: false,
    note: None,
    untimed: None,
};

/// A `PerCpu` slot lock adding 1 to the calling thread's slot, `L` the way it takes
/// the lock ([`Checked`] or [`Baseline`]): a zero-sized type, so that each row's
/// measured loop calls its lock method directly, inlined as if written out.
struct WithCpu<L> {
    slots: PerCpu<u64>,
    lock: PhantomData<fn() -> L>,
}

impl<L> WithCpu<L> {
    fn new(index: Index) -> Self {
        WithCpu {
            slots: PerCpu::with_index(index, |_| 0),
            lock: PhantomData,
        }
    }
}

/// How a [`WithCpu`] row takes its slot's lock.
trait SlotLock {
    /// What the row's check calls the sum it checks.
    const SUM: &'static str;
    /// `f` on the calling thread's slot, under its lock.
    fn with(slots: &PerCpu<u64>, f: impl FnOnce(&mut u64));
}

/// `PerCpu::with_cpu`.
struct Checked;

impl SlotLock for Checked {
    const SUM: &'static str = "the sum of the PerCpu slots";

    #[inline(always)]
    fn with(slots: &PerCpu<u64>, f: impl FnOnce(&mut u64)) {
        slots.with_cpu(f);
    }
}

/// The same lock sequence as [`Checked`] without the re-entry check and without the
/// parking bookkeeping (`PerCpu::with_cpu_bench_baseline`, behind cpulocal's internal
/// `__bench` feature): what issue 8's checks are measured against, in the same run.
struct Baseline;

impl SlotLock for Baseline {
    const SUM: &'static str = "the sum of the baseline's PerCpu slots";

    #[inline(always)]
    fn with(slots: &PerCpu<u64>, f: impl FnOnce(&mut u64)) {
        slots.with_cpu_bench_baseline(f);
    }
}

/// The same lock sequence with the release's look for sleepers but without the re-entry
/// bookkeeping (`PerCpu::with_cpu_bench_park_only`): between [`Baseline`] and
/// [`Checked`], it splits what parking and the re-entry check each cost.
struct ParkOnly;

impl SlotLock for ParkOnly {
    const SUM: &'static str = "the sum of the park-only row's PerCpu slots";

    #[inline(always)]
    fn with(slots: &PerCpu<u64>, f: impl FnOnce(&mut u64)) {
        slots.with_cpu_bench_park_only(f);
    }
}

impl<L: SlotLock> Subject for WithCpu<L> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            L::with(&self.slots, floor_increment);
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.slots.iter_mut().for_each(|v| *v = 0);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(L::SUM, percpu_sum(&self.slots), expected)
    }
}

/// A [`WithCpu`] row in another caller [`Shape`] (`--layout`). Its own type, so that the
/// default rows' loop stays the plain one above.
struct ShapedWithCpu<L> {
    inner: WithCpu<L>,
    shape: Shape,
}

impl<L: SlotLock> Subject for ShapedWithCpu<L> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let slots = &self.inner.slots;
        run_shaped(self.shape, ops, &OpFn(|| L::with(slots, floor_increment)));
    }

    fn reset(&mut self, threads: usize, ops: u64) {
        self.inner.reset(threads, ops);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        self.inner.check(expected)
    }
}

/// The slots of `slots` added up, each read under its lock.
pub(super) fn percpu_sum(slots: &PerCpu<u64>) -> u64 {
    let mut sum = 0u64;
    slots.for_each(|_, v| sum = sum.wrapping_add(*v));
    sum
}

/// One global `parking_lot::Mutex<u64>`.
#[derive(Default)]
struct ParkingLotMutex {
    value: parking_lot::Mutex<u64>,
}

impl Subject for ParkingLotMutex {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            floor_increment(&mut self.value.lock());
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        *self.value.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("the parking_lot mutex", *self.value.get_mut(), expected)
    }
}

/// One cache-padded `Mutex<u64>` per possible CPU, picked with `current_cpu()`.
struct PerCpuMutex {
    slots: Box<[CachePadded<Mutex<u64>>]>,
}

impl Subject for PerCpuMutex {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            let slot = &self.slots[cpulocal::current_cpu() % self.slots.len()];
            floor_increment(&mut slot.lock().expect("bench mutex poisoned"));
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        for s in self.slots.iter_mut() {
            *s.get_mut().expect("bench mutex poisoned") = 0;
        }
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        let sum = self.slots.iter().fold(0u64, |acc, s| {
            acc.wrapping_add(*s.lock().expect("bench mutex poisoned"))
        });
        sum_check("the sum of the per-CPU mutexes", sum, expected)
    }
}

fn rows(_notes: &mut Vec<String>) -> Vec<Row> {
    vec![
        Row::cpulocal("PerCpu::with_cpu", WithCpu::<Checked>::new(Index::Cpu)),
        Row::new("with_cpu unchecked", WithCpu::<Baseline>::new(Index::Cpu)),
        Row::new("with_cpu park only", WithCpu::<ParkOnly>::new(Index::Cpu)),
        Row::new("with_cpu (mm_cid)", WithCpu::<Checked>::new(Index::MmCid)),
        Row::new("global_mutex", Locked::default()),
        Row::new("parking_lot_mutex", ParkingLotMutex::default()),
        Row::new(
            "percpu_mutex",
            PerCpuMutex {
                slots: per_cpu_slots(),
            },
        ),
        Row::new("tls_add", TlsAdd::new(Shape::Inline)),
    ]
}

/// With `--layout`: `with_cpu`, its two bench-only baselines and the floor in the other
/// caller shapes, so that what the re-entry check and the parking cost can be read where
/// the operation is a call, and where it overlaps with other work.
fn layout_rows() -> Vec<Row> {
    fn shaped<L: SlotLock + 'static>(shape: Shape) -> ShapedWithCpu<L> {
        ShapedWithCpu {
            inner: WithCpu::new(Index::Cpu),
            shape,
        }
    }
    let mut rows = Vec::new();
    for (shape, names) in [
        (
            Shape::Call,
            [
                "PerCpu::with_cpu [call]",
                "with_cpu unchecked [call]",
                "with_cpu park only [call]",
                "tls_add [call]",
            ],
        ),
        (
            Shape::Work,
            [
                "PerCpu::with_cpu [work]",
                "with_cpu unchecked [work]",
                "with_cpu park only [work]",
                "tls_add [work]",
            ],
        ),
    ] {
        let class = shape.class();
        rows.push(Row::cpulocal(names[0], shaped::<Checked>(shape)).in_class(class));
        rows.push(Row::new(names[1], shaped::<Baseline>(shape)).in_class(class));
        rows.push(Row::new(names[2], shaped::<ParkOnly>(shape)).in_class(class));
        rows.push(Row::new(names[3], TlsAdd::new(shape)).in_class(class));
    }
    rows.push(Row::new("work only", WorkOnly).in_class(Shape::Work.class()));
    rows
}

/// What each row name stands for, for the legend under the table.
const LEGEND: [(&str, &str); 17] = [
    (
        "PerCpu::with_cpu [call]",
        "with_cpu called through a function pointer, never inlined",
    ),
    (
        "with_cpu unchecked [call]",
        "the unchecked baseline, called the same way",
    ),
    (
        "with_cpu park only [call]",
        "the park-only variant, called the same way",
    ),
    (
        "tls_add [call]",
        "the floor, called through a function pointer",
    ),
    (
        "PerCpu::with_cpu [work]",
        "with_cpu with other work (12 dependent ALU ops) between critical sections",
    ),
    (
        "with_cpu unchecked [work]",
        "the unchecked baseline with the same other work",
    ),
    (
        "with_cpu park only [work]",
        "the park-only variant with the same other work",
    ),
    (
        "tls_add [work]",
        "the floor, with the same other work between increments",
    ),
    ("work only", "the other work of the [work] rows alone"),
    (
        "tls_add",
        "const thread_local! Cell<u64> increment (the floor of the counter group)",
    ),
    (
        "PerCpu::with_cpu",
        "cpulocal::PerCpu<u64>::with_cpu, adding 1 as the floor does",
    ),
    (
        "with_cpu (mm_cid)",
        "the same on a PerCpu indexed by mm_cid (a sequence that checks the mm_cid)",
    ),
    (
        "with_cpu park only",
        "with_cpu's lock sequence and release (the look for sleepers) without the re-entry check",
    ),
    (
        "with_cpu unchecked",
        "with_cpu's lock sequence without the re-entry check and the parking bookkeeping (bench-only baseline; waiters yield)",
    ),
    ("global_mutex", "one Mutex<u64>: lock, add 1 as the floor does"),
    (
        "parking_lot_mutex",
        "one parking_lot::Mutex<u64>: lock, add 1 as the floor does",
    ),
    (
        "percpu_mutex",
        "Mutex<u64> per CPU at current_cpu(): lock, add 1 as the floor does",
    ),
];

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 4] = [
    TargetSpec {
        target: "PerCpu::with_cpu at least 2x faster than a global Mutex",
        threads: 2,
        numerator: "global_mutex",
        denominator: "PerCpu::with_cpu",
        bound: 2.0,
        at_most: false,
    },
    TargetSpec {
        target: "PerCpu::with_cpu within 2.5x of a thread-local increment",
        threads: 1,
        numerator: "PerCpu::with_cpu",
        denominator: "tls_add",
        bound: 2.5,
        at_most: true,
    },
    TargetSpec {
        target: "PerCpu::with_cpu's re-entry check costs nothing measurable",
        threads: 1,
        numerator: "PerCpu::with_cpu",
        denominator: "with_cpu park only",
        bound: 1.03,
        at_most: true,
    },
    TargetSpec {
        target: "PerCpu::with_cpu (re-entry check, parking) no slower than without them",
        threads: 1,
        numerator: "PerCpu::with_cpu",
        denominator: "with_cpu unchecked",
        bound: 1.0,
        at_most: true,
    },
];
