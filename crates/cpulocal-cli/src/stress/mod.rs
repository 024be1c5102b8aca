//! `cpulocal stress`: torture runs that hunt the windows in which a restartable sequence
//! could go wrong, followed by an exact check of every structure.
//!
//! # Method
//!
//! In the spirit of the kernel's rseq `param_test`: more threads than CPUs (preemption
//! and migration inside sequences), with optional injections — `sched_yield` or a short
//! sleep every K operations, placed *inside* each operation's window; a signal storm
//! whose handler itself adds to a [`Counter`](cpulocal::Counter) that is part of the checked total; a thread
//! moving the workers between CPUs with `sched_setaffinity`; workers that exit and are
//! replaced; and, in builds with the `test-hooks` feature, a spin loop inside every
//! sequence (`--delay`) that makes all of these land inside sequences.
//!
//! | structure | a worker's operation (the window) | racing it | the exact check |
//! |---|---|---|---|
//! | `counter` | `Counter::add(1)` | the signal handler adds to the same counter | sum = worker adds + handler adds |
//! | `stack` | pop, (window), push back; steal from another CPU when empty and every 64th op; `pop_all` and push back every 1021st | the other workers' steals | every node id on exactly one list at the end, never held twice |
//! | `lock` | `PerCpu::with_cpu`: read the slot's count, (window), write it + 1 | the other workers on the CPU | each slot's count = the increments tallied for that slot |
//! | `ring` | on a discarding and an overwriting ring in turn, write a 41–68 byte record (writer, sequence number, how written, reservation's CPU, clock before and after the reserve, filler, checksum) one of four ways: reserve, fill, (window), commit; the same reserving more and truncating; `write_with` into more room, (window) in the closure; reserve, fill, (window), drop uncommitted | a consumer thread reading every CPU's ring and flushing | every committed record read at most once, intact, at its truncated length, with `Record::cpu` = the ring read = the reservation's CPU, a usable CPU, and its timestamp between the writer's clock reads around the reserve and not below the one before it in its ring; no dropped reservation read; refusals = `discarded`, drops = `abandoned`; discarding ring: every committed record read exactly once; overwriting ring: each committed record read or overwritten, exactly once, and `overwritten` = the records it named (with test hooks, where the ring names each record it overwrites; without, read + `overwritten` = committed) |
//! | `remote` | lock, stack, ring in turn | a remote thread: `on_cpu`, `steal` / `pop_all_on`, `flush` on random CPUs | as above |
//! | `mix` | counter, stack, lock, ring in turn | the remote thread | all of the above |
//!
//! Whatever the structure, with `--signals` the handler adds 1 to a `Counter` per signal
//! and counts its runs: the counter part's counter when there is one, else a counter of
//! its own; either way its sum must equal the handler's runs. Every thread that can be
//! signalled has used cpulocal (registered) before it can be signalled.
//!
//! # Mutations
//!
//! A stress test that never fails proves little. With `--broken` (builds with
//! `test-hooks` only) the run tortures a deliberately broken variant and must report
//! losses or duplicates:
//!
//! - `counter`: `cpulocal::test_hooks::break_counter_sequence(Some(&counter))` makes
//!   the part's `Counter::add` run cpulocal's own sequence with its critical section
//!   unarmed (load, delay, store): a preemption, migration or signal between its load
//!   and its store loses updates. That counter only: the ring part's statistics, also
//!   counters, stay exact, so in `mix --broken` only the counter and stack parts fail.
//! - `stack`: `cpulocal::test_hooks::break_stack_guard(true)` makes steals take a CPU's
//!   lock without the membarrier fence, so pushes and pops in flight on that CPU commit
//!   over the thief's token and steals racing them lose or duplicate nodes. Duplicates
//!   are detected (a node held twice is never pushed back nor freed); the broken run
//!   leaks what it cannot account for.
//!
//! # Layout
//!
//! One module per structure: `counter.rs`, `stack.rs`, `lock.rs` and `ring.rs` each
//! define a *part* (its state for a run, its operation, its remote operation, its check
//! and its report) and the structure of that part alone; `remote.rs` and `mix.rs` define
//! structures made of those parts. `part.rs` is the contract between them and the
//! harness; `harness.rs` holds the state a run shares and its threads (workers, remote
//! thread, signaller, churner). Around them: `registry.rs`, the registry
//! ([`Structure::ALL`]); `config.rs`, what a run is told and the checks of its knobs;
//! `run.rs`, the run and its exact checks; `report.rs`, what it found (text and JSON).
//! A new structure is one new module and one line in [`Structure::ALL`]: the harness,
//! the command line's `--structure`, the report (text and JSON) and `--broken` take
//! their cue from the registry.

mod config;
mod harness;
mod part;
mod registry;
mod report;
mod run;

mod counter;
mod lock;
mod mix;
mod remote;
mod ring;
mod stack;

pub use config::{Amount, Config, Sleep, HAS_TEST_HOOKS, MAX_THREADS, NEEDS_TEST_HOOKS};
pub use counter::CounterCheck;
pub use lock::LockCheck;
pub use part::Faults;
pub use registry::{structure_help, Structure};
pub use report::{header, Report};
pub use ring::RingCheck;
pub use run::{run, Progress};
pub use stack::StackCheck;
