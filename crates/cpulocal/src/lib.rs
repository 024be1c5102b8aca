//! Per-CPU data for Rust on Linux, at the speed of a thread-local variable.
//!
//! ```
//! use std::sync::Arc;
//!
//! // Which CPU am I on? One load from the thread's `struct rseq`.
//! let cpu = cpulocal::current_cpu();
//! assert!(cpu < cpulocal::possible_cpus());
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
//! Counters and per-CPU data can be `static`s (their memory comes from the per-CPU pool,
//! [`pool`], on first use):
//!
//! ```
//! static HITS: cpulocal::Counter = cpulocal::Counter::new();
//! static SEEN: cpulocal::PerCpu<u64> = cpulocal::PerCpu::new_lazy(|| 0);
//!
//! HITS.add(1);
//! SEEN.with_cpu(|n| *n += 1);
//! assert_eq!(HITS.sum(), 1);
//! ```
//!
//! # How
//!
//! Every thread shares a `struct rseq` with the kernel: glibc's (≥ 2.35)
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
//! | [`ring::RingBuffer`] | per-CPU trace buffers with a migration-safe commit; consumers sleep in [`wait`](ring::RingBuffer::wait) |
//! | [`alloc::CpuCache`] | a per-CPU caching `GlobalAlloc` in front of the system allocator |
//! | [`ObjectPool`] | reusable boxed objects (buffers): per-CPU caches, batches between CPUs |
//! | [`ops`] | the raw restartable primitives, for experts |
//! | [`pool`] | where per-CPU items live: packed per CPU, pages populated only where used |
//! | [`mechanism`], [`remote_scheme`] | what this process runs on, and why |
//! | [`guide`] | which structure to choose (against thread-locals, queues, mutexes, with figures), and recipes |
//!
//! # Choosing
//!
//! In short (details and figures in [`guide`]): [`Counter`] against per-thread shards
//! costs less per `add` (0.66 ns against 1.25 ns for `ThreadLocal<Cell<u64>>` here)
//! and keeps one slot per CPU however many threads come and go, takes the total exactly
//! while others add, and adds from signal handlers; [`Stack`] against a shared queue is
//! for objects freed and reused on the same CPU (2.0 ns a push and pop with 2 threads,
//! against 19 ns for `ArrayQueue`), not for handing values to other CPUs; [`PerCpu`]
//! against one mutex is for state that splits per CPU (1.7 ns a critical section with 2
//! threads, against 35 ns for `std::sync::Mutex`), not for state that must be
//! consistent as a whole.
//!
//! # Platforms
//!
//! Linux only (x86_64 and aarch64): the crate does not compile elsewhere. A portable
//! crate depends on it under `[target.'cfg(target_os = "linux")'.dependencies]` and
//! keeps its own path for other systems ([`guide`#platforms](guide#platforms)).
//!
//! # Layers
//!
//! `abi` and `sys` (kernel layouts, raw syscalls; internal) → `thread` (registration;
//! internal) →
//! `arch` (the asm sequences) → [`ops`] (primitives with a fallback) and [`remote`]
//! (operating on a chosen CPU's data) → the per-CPU memory [`pool`] → structures
//! ([`Counter`], [`PerCpu`], [`Stack`], [`ring`]).
//!
//! # Early initialisation
//!
//! Everything cpulocal decides once per process (the mechanism, the remote scheme and
//! its membarrier registration, the CPU count, pinning the library in memory) is decided
//! by a constructor in `.init_array` while the program loads, on the main thread, before
//! `main`: then no later call waits for it (the membarrier registration alone stalls
//! for ~12 ms, and every thread arriving meanwhile with it, once the process has
//! threads), and no signal handler can enter a one-time initialiser. Set
//! `CPULOCAL_NO_EARLY_INIT=1` ([`NO_EARLY_INIT_ENV`]) to turn the constructor off; then
//! call [`register_current_thread`] early yourself.
//!
//! # Signal handlers
//!
//! A handler may use cpulocal once the process-wide decisions are made (by the
//! constructor, or by [`register_current_thread`] before the handler is installed) and
//! the interrupted thread is registered (its first use of cpulocal, or
//! [`register_current_thread`] on it, came first). Then:
//!
//! - [`current_cpu`] and [`Counter::add`] (and `inc`) are async-signal-safe: wait-free
//!   on every path once the counter has its slots. A counter's first use takes them from
//!   the [`pool`] under a lock held with every signal blocked, calling `mmap` at most and
//!   never the system allocator: safe in a handler too (tested with a handler that
//!   interrupted the pool's lock, and one that interrupted `malloc`).
//! - The other structures' operations may wait for a per-CPU lock (their slow paths,
//!   `with_cpu`, `steal`, `flush`). A handler that uses the *same* structure as the code
//!   it interrupted can meet a lock its own thread holds, or is taking: cpulocal detects
//!   that and panics rather than wait for itself. A panic cannot unwind out of a
//!   handler, so the process aborts, but the panic allocates its message first: if the
//!   interrupted code was inside `malloc` (a `with_cpu` closure that allocates, say),
//!   the handler blocks there for ever instead. So a handler must not use a structure
//!   whose operations it can interrupt. Different structures are independent as far as
//!   the handler's own thread goes: a handler may use any structure the interrupted code
//!   is not inside (it may still wait for another thread's lock, as any lock user does).
//! - Not async-signal-safe, because they allocate or take a `Mutex`: `Stack`'s `*_value`
//!   methods (they box and free nodes), [`ObjectPool::get_or_else`], a lazy `PerCpu`
//!   slot's first use (it runs `init`), [`Counter::take`] and [`Counter::reset`] (a
//!   mutex serialises takers), and dropping any structure (its pool memory is given
//!   back, which may allocate).

//! # Fork
//!
//! A child of `fork` keeps its own copy of everything: the thread's registration, the
//! process's membarrier registration, every structure's per-CPU memory (counts included,
//! which then go their own way in each process). The pool's lock is taken around `fork`
//! (`pthread_atfork`), so the child can always create and drop structures, and the
//! allocator's locks are only ever tried. Like a `Mutex`, any other lock that another
//! thread of the parent held at the fork stays held in the child, which has no such
//! thread to release it: a `PerCpu` slot, a `Stack`'s or a ring's CPU lock, a ring
//! reservation in flight (its sub-buffer never completes), `Counter::take`'s mutex. A
//! thread of the child that asks for such a lock waits for ever, or panics: glibc may
//! give a thread the child starts the stack and thread-local block of a parent thread
//! that held one (at the same addresses, freshly initialised), and with them its lock
//! token, so that the lock looks held by the asker itself. Either way it never gets the slot (or the list, or the ring). A
//! multithreaded parent's child should use only structures no other thread was inside,
//! or exec (std's `Command` runs no cpulocal code in the child).
//!
//! The process-wide decisions are one-time initialisers too: one that another thread
//! was making at the fork stays in progress in the child, whose first use then waits
//! for it for ever. The load-time constructor makes them all before `main` ([early
//! initialisation](crate#early-initialisation)), so a program's fork cannot meet one
//! in progress. A plugin's constructor runs during its `dlopen` instead: a host that
//! already has threads must not fork from another thread meanwhile. With the
//! constructor turned off, call [`register_current_thread`] before the process starts
//! threads: otherwise a fork while another thread makes the process's first use (about
//! 12 ms, for the membarrier registration, once there are threads) can leave the child
//! waiting.
//!
//! # Debuggers
//!
//! A debugger single-stepping through a sequence aborts it at every step. Every
//! operation gives up its sequence after a few aborts in a row and completes through a
//! slow path that needs none (an atomic add, or the CPU's lock taken as a remote owner),
//! so a single-stepped program makes progress (tested with `PTRACE_SINGLESTEP` on x86_64
//! and on aarch64). On aarch64 the debugger must run each load-exclusive/store-exclusive
//! loop as a whole, as GDB does, since a step between the two makes the store fail;
//! cpulocal's sequences contain none.
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(target_os = "linux"))]
compile_error!("cpulocal needs Linux: restartable sequences are a Linux system call");
#[cfg(not(target_pointer_width = "64"))]
compile_error!("cpulocal supports 64-bit targets only");

// Internal layers: public for the CLI and the tests, hidden from the documentation.
#[doc(hidden)]
pub mod abi;
// Public and documented: the allocator front-end.
pub mod alloc;
mod arch;
mod cache_padded;
mod counter;
mod cpu;
mod fallback;
pub mod guide;
#[cfg(feature = "metrics")]
pub mod metrics;
mod object_pool;
pub mod ops;
mod percpu;
pub mod pool;
#[cfg(feature = "prometheus-client")]
pub mod prometheus;
pub mod remote;
pub mod ring;
mod stack;
#[doc(hidden)]
pub mod sys;
#[doc(hidden)]
pub mod thread;
#[cfg(feature = "tracing")]
pub mod tracing;

#[cfg(any(test, feature = "__test-hooks"))]
pub mod test_hooks;

#[cfg(test)]
mod tests;

/// With the `__global-cpu-cache` feature the library's own tests allocate through
/// [`alloc::CpuCache`].
#[cfg(all(test, feature = "__global-cpu-cache"))]
#[global_allocator]
static TEST_GLOBAL: alloc::CpuCache = alloc::CpuCache::new();

pub use cache_padded::CachePadded;
pub use counter::Counter;
pub use cpu::{current_cpu, current_mm_cid, current_node, possible_cpus};
pub use object_pool::{ObjectPool, Pooled};
pub use percpu::{Index, Lock, PerCpu, PerCpuGuard};
pub use remote::{scheme as remote_scheme, InvalidCpu};
pub use stack::{Node, NodeList, Stack};
pub use sys::Errno;
pub use thread::{mechanism, FallbackReason, Mechanism, Registrar};

/// Makes every process-wide decision now and registers the calling thread: the
/// [`mechanism`], the [`remote_scheme`] (with the process's membarrier registration),
/// the number of [`possible_cpus`], and pinning the library in memory (so that a
/// `dlclose` cannot unmap code a thread's `struct rseq` may still point to). Returns whether the thread uses rseq (false: the
/// fallback serves it).
///
/// cpulocal calls this from a load-time constructor (see [early
/// initialisation](crate#early-initialisation)), so nothing is left to decide later;
/// call it yourself when that constructor is turned off, before the process starts
/// threads (the membarrier registration is cheap then, and blocks every thread that
/// waits for it for milliseconds later), and before installing a signal handler that
/// uses cpulocal. Each decision is a one-time initialiser, which a handler must never
/// enter: one that interrupted the same initialiser on its own thread would wait for
/// itself forever.
///
/// In other threads, the first use registers the thread (without any process-wide
/// work); call this first in a thread whose signal handlers use cpulocal, so that
/// their first use is not the thread's.
///
/// ```
/// let uses_rseq = cpulocal::register_current_thread();
/// assert_eq!(uses_rseq, matches!(cpulocal::mechanism(), cpulocal::Mechanism::Rseq { .. }));
/// ```
pub fn register_current_thread() -> bool {
    thread::mechanism();
    remote::scheme();
    sys::possible_cpus();
    pool::install_fork_handlers();
    thread::is_registered()
}

/// The environment variable that turns the load-time constructor off: set it to `1`
/// and cpulocal decides everything on first use, or when you call
/// [`register_current_thread`].
pub const NO_EARLY_INIT_ENV: &str = "CPULOCAL_NO_EARLY_INIT";

/// Runs [`register_current_thread`] on the main thread while the process loads (from
/// `.init_array`, before `main` or during `dlopen`), unless [`NO_EARLY_INIT_ENV`] says not
/// to.
extern "C" fn early_init() {
    if std::env::var_os(NO_EARLY_INIT_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        return;
    }
    // Nothing in it panics by design; should it, a panic must not unwind into the loader.
    let _ = std::panic::catch_unwind(register_current_thread);
}

/// The constructor's entry in `.init_array`, called by the dynamic loader (or the static
/// start-up code) with the process still single-threaded, unless loaded by `dlopen`.
#[used]
#[link_section = ".init_array"]
static EARLY_INIT: extern "C" fn() = early_init;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
