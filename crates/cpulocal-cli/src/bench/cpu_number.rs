//! The `cpu-number` group: "which CPU am I on": `current_cpu()` against glibc, the
//! system call, the instructions and a plain thread-local load.

use std::cell::Cell;
use std::hint::black_box;

use cpulocal::sys;

use super::harness::{tls_ptr, GroupDef, Row, Subject, TargetSpec};

/// The group, as [`super::Group::ALL`] lists it.
pub(crate) const GROUP: GroupDef = GroupDef {
    name: "cpu-number",
    uses_remote_scheme: false,
    rows,
    layout_rows: None,
    legend: &LEGEND,
    targets: &TARGETS,
    records_per_s: false,
    note: None,
    untimed: None,
};

thread_local! {
    /// The floor of the cpu-number group: a plain thread-local `u32`.
    static TLS_CPU: Cell<u32> = const { Cell::new(0) };
}

/// A source of the CPU number, called in the loop (inlined: `F` is a closure type).
struct CpuSource<F>(F);

impl<F: Fn() -> u32 + Sync> Subject for CpuSource<F> {
    #[inline(never)]
    fn work(&self, ops: u64) {
        for _ in 0..ops {
            black_box((self.0)());
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {}

    fn check(&mut self, _expected: u64) -> Result<(), String> {
        let cpu = (self.0)();
        let possible = cpulocal::possible_cpus();
        if (cpu as usize) < possible {
            Ok(())
        } else {
            Err(format!(
                "returned CPU {cpu}, but only {possible} CPUs are possible"
            ))
        }
    }
}

fn glibc_sched_getcpu() -> u32 {
    // SAFETY: sched_getcpu has no preconditions. A failure (-1) becomes u32::MAX,
    // which the row's check rejects.
    unsafe { libc::sched_getcpu() as u32 }
}

fn getcpu_syscall() -> u32 {
    let mut cpu = u32::MAX;
    // SAFETY: `cpu` is a live local; the node and cache pointers may be null. A failure
    // leaves u32::MAX, which the row's check rejects.
    unsafe {
        libc::syscall(
            libc::SYS_getcpu,
            &mut cpu as *mut u32,
            core::ptr::null_mut::<u32>(),
            core::ptr::null_mut::<libc::c_void>(),
        )
    };
    cpu
}

fn rows(notes: &mut Vec<String>) -> Vec<Row> {
    let mut rows = vec![Row::cpulocal(
        "current_cpu",
        CpuSource(|| cpulocal::current_cpu() as u32),
    )];
    match sys::sched_getcpu() {
        Ok(_) => rows.push(Row::new("sched_getcpu", CpuSource(glibc_sched_getcpu))),
        Err(e) => notes.push(format!("sched_getcpu: fails here ({e:?})")),
    }
    match sys::getcpu_syscall() {
        Ok(_) => rows.push(Row::new("getcpu_syscall", CpuSource(getcpu_syscall))),
        Err(e) => notes.push(format!(
            "getcpu_syscall: the system call fails here ({e:?})"
        )),
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::arch::x86_64 as arch;
        if arch::has_rdpid() {
            rows.push(Row::new(
                "rdpid",
                // SAFETY: CPUID says the CPU has RDPID.
                CpuSource(|| unsafe { arch::rdpid_cpu() }),
            ));
        } else {
            notes.push("rdpid: the CPU lacks RDPID".into());
        }
        if arch::has_rdtscp() {
            rows.push(Row::new(
                "rdtscp",
                // SAFETY: CPUID says the CPU has RDTSCP.
                CpuSource(|| unsafe { arch::rdtscp_cpu() }),
            ));
        } else {
            notes.push("rdtscp: the CPU lacks RDTSCP".into());
        }
    }
    rows.push(Row::new("tls_load", TlsLoad));
    rows
}

/// The floor of the cpu-number group: one load of a thread-local `u32`.
struct TlsLoad;

impl Subject for TlsLoad {
    #[inline(never)]
    fn work(&self, ops: u64) {
        let cell = tls_ptr(&TLS_CPU);
        for _ in 0..ops {
            // SAFETY: `cell` is this thread's live `TLS_CPU`, which nothing else
            // references while the loop runs.
            black_box(unsafe { cell.read_volatile() });
        }
    }

    fn reset(&mut self, _threads: usize, _ops: u64) {}

    fn check(&mut self, _expected: u64) -> Result<(), String> {
        Ok(())
    }
}

/// What each row name stands for, for the legend under the table.
const LEGEND: [(&str, &str); 6] = [
    (
        "current_cpu",
        "cpulocal::current_cpu(): one load from the thread's struct rseq",
    ),
    ("sched_getcpu", "glibc sched_getcpu() (vDSO)"),
    ("getcpu_syscall", "syscall(SYS_getcpu)"),
    ("rdpid", "RDPID instruction, CPU = TSC_AUX & 0xfff"),
    ("rdtscp", "RDTSCP instruction, CPU = TSC_AUX & 0xfff"),
    ("tls_load", "const thread_local! Cell<u32> read (the floor)"),
];

/// The targets on this group's rows.
const TARGETS: [TargetSpec; 1] = [TargetSpec {
    target: "current_cpu() within 1.3x of a plain thread-local load",
    threads: 1,
    numerator: "current_cpu",
    denominator: "tls_load",
    bound: 1.3,
    at_most: true,
}];
