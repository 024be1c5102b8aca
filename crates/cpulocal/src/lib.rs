//! Per-CPU data for Rust on Linux, at the speed of a thread-local variable.
//!
//! ```
//! use std::sync::Arc;
//!
//! // Which CPU am I on? One load from the thread's `struct rseq`.
//! let cpu = cpulocal::current_cpu();
//! assert!((cpu as usize) < cpulocal::possible_cpus());
//!
//! // A counter many threads bump without `lock`-prefixed instructions.
//! let requests = Arc::new(cpulocal::Counter::new());
//! let workers: Vec<_> = (0..4)
//!     .map(|_| {
//!         let requests = Arc::clone(&requests);
//!         std::thread::spawn(move || (0..10_000).for_each(|_| requests.add(1)))
//!     })
//!     .collect();
//! workers.into_iter().for_each(|w| w.join().unwrap());
//! assert_eq!(requests.sum(), 40_000);
//!
//! // Works everywhere: with rseq, or through the fallback where it is missing.
//! println!("{}", cpulocal::mechanism());
//! ```
//!
//! # How
//!
//! Every thread shares a `struct rseq` with the kernel ([`abi::Rseq`]): glibc's (≥ 2.35)
//! when glibc registered one, else one cpulocal registers. The kernel keeps the CPU
//! number in it current, and restarts a *critical section* — a short asm sequence
//! described by a descriptor — when the thread is preempted, migrated or signalled
//! inside it. Per-CPU data is then updated with plain loads and stores ([`ops`]).
//!
//! Where rseq is missing (valgrind, gVisor, qemu-user, seccomp, kernels before 4.18)
//! every operation still works, through atomics; [`mechanism`] says which is active
//! and why.
//!
//! # What there is
//!
//! | item | for |
//! |---|---|
//! | [`current_cpu`], [`current_node`], [`current_mm_cid`] | where the thread runs, in one load |
//! | [`Counter`] | a sum many threads bump; exact [`Counter::take`] while they do |
//! | [`PerCpu`] | any `T` per CPU (or per mm_cid) behind a per-CPU lock: [`PerCpu::with_cpu`], and [`PerCpu::on_cpu`] for a chosen CPU |
//! | [`Stack`] | per-CPU intrusive freelists / object caches, with [`Stack::steal`] |
//! | [`ring::RingBuffer`] | per-CPU trace buffers with a migration-safe commit |
//! | [`ops`] | the raw restartable primitives, for experts |
//! | [`mechanism`], [`remote_scheme`] | what this process runs on, and why |
//!
//! # Layers
//!
//! [`abi`] and [`sys`] (kernel layouts, raw syscalls) → [`thread`] (registration) →
//! `arch` (the asm sequences) → [`ops`] (primitives with a fallback) and [`remote`]
//! (operating on a chosen CPU's data) → structures ([`Counter`], [`PerCpu`], [`Stack`],
//! [`ring`]).
//!
//! # Signal handlers
//!
//! On a thread that has already used cpulocal (see [`register_current_thread`]),
//! [`current_cpu`] and [`Counter::add`] are async-signal-safe: they are wait-free on
//! every path. The other structures' fast paths are too, but their slow paths take a
//! per-CPU lock: a handler that interrupts its own thread while that thread holds the
//! lock of the same structure (inside `with_cpu`, a `steal`, a `flush`, or a slow path)
//! would wait forever. Use them from a handler only when the interrupted code cannot be
//! inside the same structure.
//!
//! # Debuggers
//!
//! A debugger single-stepping through a sequence aborts it at every step. Every
//! operation gives up its sequence after a few aborts in a row and completes through a
//! slow path that needs none (an atomic add, or the CPU's lock taken as a remote owner),
//! so a single-stepped program makes progress (tested with `PTRACE_SINGLESTEP`).
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(target_os = "linux"))]
compile_error!("cpulocal needs Linux: restartable sequences are a Linux system call");
#[cfg(not(target_pointer_width = "64"))]
compile_error!("cpulocal supports 64-bit targets only");

pub mod abi;
mod arch;
mod cache_padded;
mod counter;
mod cpu;
mod fallback;
pub mod ops;
mod percpu;
pub mod remote;
pub mod ring;
mod stack;
pub mod sys;
pub mod thread;

#[cfg(any(test, feature = "__test-hooks"))]
pub mod test_hooks;

#[cfg(test)]
mod tests;

pub use cache_padded::CachePadded;
pub use counter::Counter;
pub use cpu::{current_cpu, current_mm_cid, current_node, possible_cpus};
pub use percpu::{Index, Lock, PerCpu, PerCpuGuard};
pub use remote::{scheme as remote_scheme, InvalidCpu};
pub use stack::{Node, NodeList, Stack};
pub use thread::{mechanism, FallbackReason, Mechanism, Registrar};

/// Registers the calling thread now instead of on its first use of cpulocal, e.g.
/// before installing a signal handler that uses cpulocal. Returns whether the thread
/// uses rseq (false: the fallback serves it).
///
/// ```
/// let uses_rseq = cpulocal::register_current_thread();
/// assert_eq!(uses_rseq, matches!(cpulocal::mechanism(), cpulocal::Mechanism::Rseq { .. }));
/// ```
pub fn register_current_thread() -> bool {
    thread::is_registered()
}

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
