//! The `remote` group: reaching another CPU's data: `PerCpu::on_cpu` and `Stack::steal`
//! (a membarrier system call each, under the membarrier scheme), against a local
//! push+pop.
//!
//! Reaching another CPU's slot. Under the membarrier scheme each `on_cpu` and each
//! `steal` takes the slot's lock word with a compare-exchange, then calls
//! `membarrier(PRIVATE_EXPEDITED_RSEQ, CPU)` to restart the sequences in flight on that
//! CPU: a system call, plus an IPI when a thread of this process runs there (the kernel
//! skips CPUs that run none, so with one bench thread the targets are idle and no IPI is
//! sent). The target CPU goes round-robin over every CPU but the caller's (its own, when
//! there is only one). The reference row is a local push+pop on a `Stack` (the stack
//! group's cpulocal row). Under the locked scheme there is no system call: every access
//! is a compare-exchange.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cpulocal::remote::Scheme;
use cpulocal::{Index, PerCpu, Stack};

use super::harness::{sum_check, GroupDef, Row, Subject, TargetSpec};
use super::lock::percpu_sum;
use super::stack::{each_item_once, new_item, Container, Item, ItemValue, PushPop};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "remote",
    uses_remote_scheme: true,
    rows,
    layout_rows: None,
    legend: &LEGEND,
    targets: &TARGETS,
    records_per_s: false,
    note: Some(scheme_note),
    untimed: None,
};

/// The next CPU after `*next` that is not `me` (unless there is only one), advancing
/// `*next`.
#[inline]
fn next_other_cpu(next: &mut usize, me: usize, cpus: usize) -> usize {
    let mut cpu = *next % cpus;
    if cpu == me && cpus > 1 {
        cpu = (cpu + 1) % cpus;
    }
    *next = cpu + 1;
    cpu
}

/// `PerCpu::on_cpu` adding 1 to another CPU's slot.
struct OnCpu {
    slots: PerCpu<u64>,
}

impl Subject for OnCpu {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let cpus = self.slots.slots();
        let mut next = 0;
        for _ in 0..ops {
            let cpu = next_other_cpu(&mut next, cpulocal::current_cpu(), cpus);
            self.slots
                .on_cpu(cpu, |v| *v += black_box(1))
                .expect("cpu < len");
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {
        self.slots.iter_mut().for_each(|v| *v = 0);
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check(
            "the sum of the PerCpu slots",
            percpu_sum(&self.slots),
            expected,
        )
    }
}

/// The most nodes the steal row prefills each CPU's list with: enough for a run of
/// 20 ms at 80 ns a steal (a membarrier that sends no IPI takes about 150 ns); cheaper
/// steals (the locked scheme) may empty a list, and are counted.
const STEAL_PREFILL_MAX: u64 = 1 << 18;

/// `Stack::steal` from another CPU's list; the node stolen is pushed on the caller's own
/// list (a local push, nanoseconds next to the steal). `reset` prefills every CPU's list
/// with as many nodes as the run can steal from it (at most [`STEAL_PREFILL_MAX`]), by
/// pinning the resetting thread to each CPU in turn, so the steals find nodes even with
/// one thread. A steal that finds the list empty still takes the lock and fences; it is
/// counted.
#[derive(Default)]
struct Steal {
    stack: Stack<ItemValue>,
    /// Nodes off the lists, between `check` and `reset`.
    spare: Mutex<Vec<Item>>,
    created: u64,
    done: AtomicU64,
    empty_steals: AtomicU64,
}

impl Subject for Steal {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let cpus = self.stack.slots();
        let mut next = 0;
        let mut empty = 0;
        for _ in 0..ops {
            let cpu = next_other_cpu(&mut next, cpulocal::current_cpu(), cpus);
            match self.stack.steal(cpu).expect("cpu < cpus") {
                Some(node) => self.stack.push(black_box(node)),
                None => empty += 1,
            }
        }
        self.done.fetch_add(ops, Ordering::Relaxed);
        self.empty_steals.fetch_add(empty, Ordering::Relaxed);
    }

    fn reset(&mut self, threads: usize, ops: u64) {
        let mut nodes = core::mem::take(self.spare.get_mut().expect("bench mutex poisoned"));
        self.stack.drain(&mut nodes);
        let per_cpu = (threads as u64).saturating_mul(ops).min(STEAL_PREFILL_MAX);
        let cpus = self.stack.slots();
        while (nodes.len() as u64) < per_cpu * cpus as u64 {
            nodes.push(new_item(self.created));
            self.created += 1;
        }
        let stack = &self.stack;
        on_each_cpu(cpus, || {
            for _ in 0..per_cpu {
                if let Some(node) = nodes.pop() {
                    stack.push(node);
                }
            }
        });
        *self.spare.get_mut().expect("bench mutex poisoned") = nodes;
        *self.done.get_mut() = 0;
        *self.empty_steals.get_mut() = 0;
    }

    fn check(&mut self, expected: u64) -> Result<(), String> {
        sum_check("the steals", self.done.load(Ordering::Relaxed), expected)?;
        let mut spare = self.spare.lock().expect("bench mutex poisoned");
        self.stack.drain(&mut spare);
        each_item_once(spare.iter(), self.created)
    }

    fn events(&self) -> Option<(u64, &'static str)> {
        Some((
            self.empty_steals.load(Ordering::Relaxed),
            "steals found the list empty",
        ))
    }
}

/// Runs `f` with the calling thread pinned to each possible CPU in turn, then gives the
/// thread its affinity back. CPUs it cannot be pinned to (offline, outside its cpuset)
/// are skipped; if its affinity cannot be read, `f` runs once, unpinned.
fn on_each_cpu(cpus: usize, mut f: impl FnMut()) {
    let size = core::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is an array of integers: all zeroes is the empty set.
    let mut saved: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `saved` is a live cpu_set_t of `size` bytes; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut saved) } != 0 {
        f();
        return;
    }
    for cpu in 0..cpus.min(libc::CPU_SETSIZE as usize) {
        // SAFETY: as above.
        let mut one: libc::cpu_set_t = unsafe { core::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE, the bits a cpu_set_t holds.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        // SAFETY: `one` is a live cpu_set_t of `size` bytes; pid 0 is the calling thread.
        if unsafe { libc::sched_setaffinity(0, size, &one) } == 0 {
            f();
        }
    }
    // SAFETY: `saved` is the mask read above, `size` bytes. A failure leaves the thread
    // pinned to the last CPU, which costs later rows speed, not correctness.
    unsafe { libc::sched_setaffinity(0, size, &saved) };
}

fn rows(_notes: &mut Vec<String>) -> Vec<Row> {
    vec![
        Row::cpulocal("Stack::push+pop", PushPop::new(Stack::<ItemValue>::new())),
        Row::new(
            "PerCpu::on_cpu",
            OnCpu {
                slots: PerCpu::new(|_| 0),
            },
        ),
        Row::new(
            "on_cpu (mm_cid)",
            OnCpu {
                slots: PerCpu::with_index(Index::MmCid, |_| 0),
            },
        ),
        Row::new("Stack::steal", Steal::default()),
    ]
}

/// What each row name stands for, for the legend under the table.
const LEGEND: [(&str, &str); 4] = [
    (
        "Stack::push+pop",
        "cpulocal::Stack push then pop of a node (an empty pop steals from another CPU)",
    ),
    (
        "PerCpu::on_cpu",
        "cpulocal::PerCpu<u64>::on_cpu(another CPU, |v| *v += black_box(1)), round-robin",
    ),
    (
        "on_cpu (mm_cid)",
        "the same on a PerCpu indexed by mm_cid: its fence restarts every CPU's sequences",
    ),
    (
        "Stack::steal",
        "cpulocal::Stack::steal(another CPU), round-robin, + local push of the node",
    ),
];

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 0] = [];

/// The active remote scheme, noted on every row of the group.
fn scheme_note() -> String {
    let scheme = match cpulocal::remote_scheme() {
        Scheme::Membarrier => "membarrier",
        Scheme::Locked(_) => "locked",
    };
    format!("scheme: {scheme}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_cpus_go_round_robin_around_the_caller() {
        let mut next = 0;
        let got: Vec<_> = (0..6).map(|_| next_other_cpu(&mut next, 1, 4)).collect();
        assert_eq!(got, [0, 2, 3, 0, 2, 3]);
        let mut next = 0;
        assert_eq!(next_other_cpu(&mut next, 0, 1), 0, "one CPU: its own");
    }
}
