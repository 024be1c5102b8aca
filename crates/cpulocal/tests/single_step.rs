//! Forward progress under a debugger: a child process single-stepped with
//! `PTRACE_SINGLESTEP` through `Counter::add`, `Stack::push`/`pop`,
//! `PerCpu::with_cpu` and `CpuCache`'s `alloc`/`dealloc` finishes with the right results.
//!
//! Every single-step traps into the kernel and back, and the kernel aborts a critical
//! section on every such return: without a slow path that needs no successful sequence,
//! the child would loop forever (the reason `cpu_opv` was proposed).
//!
//! On aarch64 the tracer runs load-exclusive/store-exclusive loops (LL/SC atomics, e.g.
//! in musl's `free`) in one go, as debuggers do: no single-stepped LL/SC loop ends there.
//! A child that stops progressing is reported with the program counters it loops at.

use std::sync::atomic::{AtomicUsize, Ordering};

use std::alloc::{GlobalAlloc, Layout};

use cpulocal::alloc::CpuCache;
use cpulocal::{Counter, Node, PerCpu, Stack};

/// The blocks the child allocates from `CpuCache` (a 48-byte class).
const BLOCK: Layout = match Layout::from_size_align(40, 8) {
    Ok(l) => l,
    Err(_) => panic!("a valid layout"),
};

/// The child stops itself with this signal when the region to single-step starts...
const START: libc::c_int = libc::SIGSTOP;
/// ...and raises this one when it ends; the tracer then lets it run freely.
const END: libc::c_int = libc::SIGUSR2;

const ROUNDS: usize = 3;

/// The region takes about 50,000 steps with its slow paths; a child stuck retrying
/// aborted sequences hits this bound instead of hanging the test.
const STEP_LIMIT: usize = 400_000;

/// How many single-steps the tracer made inside the region (reported for the record).
static STEPS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn operations_complete_when_single_stepped_through_their_sequences() {
    if std::env::var_os("CPULOCAL_TEST_VALGRIND").is_some() {
        eprintln!("skipped: valgrind does not support ptrace of its guest");
        return;
    }
    // Everything that allocates or initialises lazily happens before the fork: the
    // child of a multithreaded process may only do simple things.
    let counter = Counter::new();
    counter.add(1);
    let stack = Stack::new();
    let nodes: Vec<Box<Node<u32>>> = (0..ROUNDS as u32).map(Node::new).collect();
    let per_cpu = PerCpu::new(|_| 0u64);
    per_cpu.with_cpu(|v| *v += 1);
    // The allocator's region and this CPU's slab exist before the fork.
    let cache = CpuCache::new();
    // SAFETY: non-zero size, freed with the same layout.
    unsafe { cache.dealloc(cache.alloc(BLOCK), BLOCK) };
    let mechanism = cpulocal::mechanism();
    let scheme = cpulocal::remote_scheme();

    // SAFETY: fork has no preconditions; the child runs only the code below and leaves
    // with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        child(counter, stack, nodes, per_cpu, cache);
    }

    let reaper = KillOnDrop(pid);
    let steps = trace(pid);
    let status = wait(pid);
    core::mem::forget(reaper);
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally: status {status:#x}"
    );
    let code = libc::WEXITSTATUS(status);
    assert_eq!(
        code, 0,
        "child reported failure {code} (see child_failure codes)"
    );
    eprintln!("{steps} single-steps; mechanism {mechanism}; scheme {scheme}");
    if matches!(mechanism, cpulocal::Mechanism::Rseq { .. }) {
        assert!(steps > 0, "the region was not single-stepped");
    }
}

/// The traced child: runs the operations between the START stop and the END signal.
#[allow(clippy::vec_box, reason = "a Stack takes its nodes boxed")]
fn child(
    counter: Counter,
    stack: Stack<u32>,
    nodes: Vec<Box<Node<u32>>>,
    per_cpu: PerCpu<u64>,
    cache: CpuCache,
) -> ! {
    // SAFETY: PTRACE_TRACEME takes no pointers; raise stops us until the tracer resumes.
    unsafe {
        libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
        libc::raise(START);
    }
    let mut nodes = nodes;
    for _ in 0..ROUNDS {
        counter.add(2);
        stack.push(nodes.pop().expect("one node per round"));
        per_cpu.with_cpu(|v| *v += 1);
    }
    let mut blocks = [core::ptr::null_mut::<u8>(); ROUNDS];
    for b in &mut blocks {
        // SAFETY: non-zero size; freed below with the same layout.
        *b = unsafe { cache.alloc(BLOCK) };
        if !b.is_null() {
            // SAFETY: a live block of BLOCK's size.
            unsafe { b.write_bytes(0x5a, BLOCK.size()) };
        }
    }
    let blocks_ok = blocks.iter().all(|b| !b.is_null())
        && (1..ROUNDS).all(|i| !blocks[..i].contains(&blocks[i]));
    for b in blocks.into_iter().filter(|b| !b.is_null()) {
        // SAFETY: allocated above with BLOCK.
        unsafe { cache.dealloc(b, BLOCK) };
    }
    let mut popped = 0;
    for _ in 0..ROUNDS {
        // The thread cannot migrate while stopped, but it may have between pushes:
        // pop what this CPU has, then steal the rest.
        if stack.pop().is_some() {
            popped += 1;
        }
    }
    // SAFETY: raise only sends a signal to ourselves.
    unsafe { libc::raise(END) };

    for cpu in 0..stack.slots() {
        while let Ok(Some(_)) = stack.steal(cpu) {
            popped += 1;
        }
    }
    let mut per_cpu_total = 0;
    per_cpu.for_each(|_, v| per_cpu_total += *v);
    let code = if counter.sum() != 1 + 2 * ROUNDS as u64 {
        1
    } else if popped != ROUNDS {
        2
    } else if per_cpu_total != 1 + ROUNDS as u64 {
        3
    } else if !blocks_ok {
        5
    } else if matches!(cpulocal::mechanism(), cpulocal::Mechanism::Rseq { .. })
        && counter.slow_path_sum() == 0
    {
        // Single-stepping aborts every sequence: the adds can only have landed
        // through the slow path.
        4
    } else {
        0
    };
    // SAFETY: _exit ends the child without running the parent's atexit handlers.
    unsafe { libc::_exit(code) }
}

/// Single-steps `pid` from its START stop until it raises END, then lets it run.
fn trace(pid: libc::pid_t) -> usize {
    let status = wait(pid);
    assert!(
        libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == START,
        "child did not stop at the start: {status:#x}"
    );
    let mut steps = 0usize;
    let mut last_pcs = Vec::new();
    loop {
        let status = if let Some(status) = step_over_exclusive_sequence(pid) {
            status
        } else {
            // SAFETY: `pid` is our stopped tracee; PTRACE_SINGLESTEP takes no pointers.
            let r = unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, pid, 0, 0) };
            assert_eq!(r, 0, "PTRACE_SINGLESTEP failed");
            wait(pid)
        };
        assert!(
            libc::WIFSTOPPED(status),
            "child left while single-stepped: {status:#x}"
        );
        match libc::WSTOPSIG(status) {
            libc::SIGTRAP => steps += 1,
            sig if sig == END => break,
            sig => panic!("unexpected signal {sig} in the single-stepped region"),
        }
        // Where a stuck child loops is the diagnosis: the last steps' program counters
        // are sampled (only then, so a passing run pays no extra syscall per step).
        if steps > STEP_LIMIT - PCS_SAMPLED {
            last_pcs.push(program_counter(pid));
        }
        assert!(
            steps < STEP_LIMIT,
            "no progress after {steps} single-steps; the child loops at:\n{}",
            where_it_loops(pid, &last_pcs)
        );
    }
    STEPS.store(steps, Ordering::Relaxed);
    // SAFETY: `pid` is our stopped tracee; the END signal is dropped (data 0).
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) };
    assert_eq!(r, 0, "PTRACE_CONT failed");
    steps
}

/// x86_64 single-steps everything: its atomics are single instructions.
#[cfg(not(target_arch = "aarch64"))]
fn step_over_exclusive_sequence(_pid: libc::pid_t) -> Option<libc::c_int> {
    None
}

/// On aarch64 the tracee stopped at a load-exclusive (`ldxr`/`ldaxr`, the first half of
/// an LL/SC atomic such as musl's `__lock` in `free`) is run to the end of its sequence
/// in one go, as debuggers do (GDB's `aarch64_software_single_step`): a single-step
/// between the load- and the store-exclusive clears the exclusive monitor, so the store
/// always fails and the loop never ends, whatever cpulocal does. Returns the stop's
/// wait status, or `None` when the tracee is not at a load-exclusive.
///
/// Breakpoints (`brk #0`) go after the store-exclusive and at the targets of the
/// sequence's conditional branches that leave it; the tracee continues to the first.
/// cpulocal's own sequences contain no exclusives and are still stepped one by one.
#[cfg(target_arch = "aarch64")]
fn step_over_exclusive_sequence(pid: libc::pid_t) -> Option<libc::c_int> {
    const BRK: u32 = 0xd420_0000;
    let is_load_exclusive = |insn: u32| insn & 0x3fc0_0000 == 0x0840_0000;
    let is_store_exclusive = |insn: u32| insn & 0x3fc0_0000 == 0x0800_0000;
    // The target of a conditional branch (b.cond, cbz/cbnz, tbz/tbnz) at `pc`, if `insn` is one.
    let branch_target = |pc: u64, insn: u32| -> Option<u64> {
        let (imm, bits) = if insn & 0xff00_0010 == 0x5400_0000 || insn & 0x7e00_0000 == 0x3400_0000
        {
            ((insn >> 5) & 0x7ffff, 19)
        } else if insn & 0x7e00_0000 == 0x3600_0000 {
            ((insn >> 5) & 0x3fff, 14)
        } else {
            return None;
        };
        // Sign-extend the word offset, then scale it to bytes.
        let offset = ((i64::from(imm) << (64 - bits)) >> (64 - bits)) * 4;
        Some(pc.wrapping_add_signed(offset))
    };

    let pc = program_counter(pid);
    if !is_load_exclusive(peek_insn(pid, pc)) {
        return None;
    }
    let mut stops = Vec::new();
    let mut store = None;
    for i in 1..16 {
        let at = pc + 4 * i;
        let insn = peek_insn(pid, at);
        if is_store_exclusive(insn) {
            store = Some(at);
            break;
        }
        stops.extend(branch_target(at, insn).filter(|t| !(pc..=at).contains(t)));
    }
    // No store-exclusive close by: not a sequence this knows; single-step it.
    let store = store?;
    stops.push(store + 4);
    stops.sort_unstable();
    stops.dedup();
    let saved: Vec<(u64, u64)> = stops.iter().map(|&at| (at, peek(pid, at))).collect();
    for &(at, word) in &saved {
        poke(pid, at, (word & !0xffff_ffff) | u64::from(BRK));
    }
    // SAFETY: `pid` is our stopped tracee; PTRACE_CONT takes no pointers.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) };
    assert_eq!(r, 0, "PTRACE_CONT failed");
    let status = wait(pid);
    // Restored in reverse, in case two breakpoints share a word.
    for &(at, word) in saved.iter().rev() {
        poke(pid, at, word);
    }
    Some(status)
}

/// The 8 bytes of the stopped tracee's memory at `at`.
#[cfg(target_arch = "aarch64")]
fn peek(pid: libc::pid_t, at: u64) -> u64 {
    // SAFETY: PEEKTEXT reads the stopped tracee's memory; no pointer of ours.
    unsafe { libc::ptrace(libc::PTRACE_PEEKTEXT, pid, at as usize, 0) as u64 }
}

/// The instruction at `at` in the stopped tracee.
#[cfg(target_arch = "aarch64")]
fn peek_insn(pid: libc::pid_t, at: u64) -> u32 {
    peek(pid, at) as u32
}

/// Writes 8 bytes of the stopped tracee's text at `at`.
#[cfg(target_arch = "aarch64")]
fn poke(pid: libc::pid_t, at: u64, word: u64) {
    // SAFETY: POKETEXT writes the stopped tracee's (private, copied-on-write) text.
    let r = unsafe { libc::ptrace(libc::PTRACE_POKETEXT, pid, at as usize, word as usize) };
    assert_eq!(r, 0, "PTRACE_POKETEXT failed");
}

/// How many of the last steps before `STEP_LIMIT` have their program counter recorded.
const PCS_SAMPLED: usize = 4096;

/// The stopped tracee's program counter.
fn program_counter(pid: libc::pid_t) -> u64 {
    // SAFETY: an all-zero register block is a valid value of this plain-integer struct.
    let mut regs: libc::user_regs_struct = unsafe { core::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: (&raw mut regs).cast(),
        iov_len: core::mem::size_of::<libc::user_regs_struct>(),
    };
    // SAFETY: `pid` is our stopped tracee; `iov` describes `regs`, live for the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            pid,
            libc::NT_PRSTATUS as usize,
            &raw mut iov,
        )
    };
    assert_eq!(r, 0, "PTRACE_GETREGSET failed");
    #[cfg(target_arch = "x86_64")]
    return regs.rip;
    #[cfg(target_arch = "aarch64")]
    return regs.pc;
}

/// The most frequent program counters among `pcs`, each with its count, the
/// instruction word there and the mapping it falls in (to look it up in a disassembly).
fn where_it_loops(pid: libc::pid_t, pcs: &[u64]) -> String {
    let mut counts = std::collections::BTreeMap::<u64, usize>::new();
    for &pc in pcs {
        *counts.entry(pc).or_default() += 1;
    }
    let mut by_count: Vec<_> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut out = String::new();
    for (pc, count) in by_count.into_iter().take(24) {
        // SAFETY: PEEKTEXT reads one word of the stopped tracee; no pointer of ours.
        let word = unsafe { libc::ptrace(libc::PTRACE_PEEKTEXT, pid, pc as usize, 0) };
        let mapping = maps
            .lines()
            .find_map(|line| {
                let (range, rest) = line.split_once(' ')?;
                let (lo, hi) = range.split_once('-')?;
                let (lo, hi) = (
                    u64::from_str_radix(lo, 16).ok()?,
                    u64::from_str_radix(hi, 16).ok()?,
                );
                let offset = rest.split_whitespace().nth(1)?;
                let offset = u64::from_str_radix(offset, 16).ok()?;
                (lo..hi).contains(&pc).then(|| {
                    let file = rest.split_whitespace().nth(4).unwrap_or("[anon]");
                    format!("{file} + {:#x}", pc - lo + offset)
                })
            })
            .unwrap_or_else(|| "unmapped".into());
        out += &format!(
            "  {pc:#x} x{count}: insn {:#010x}  ({mapping})\n",
            word as u32
        );
    }
    out
}

/// Kills the child if the test fails before reaping it, so no stuck tracee outlives us.
struct KillOnDrop(libc::pid_t);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid take no pointers that outlive the call.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, core::ptr::null_mut(), 0);
        }
    }
}

fn wait(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    // SAFETY: `status` is a live out-parameter.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid failed");
    status
}
