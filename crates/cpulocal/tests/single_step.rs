//! Forward progress under a debugger: a child process single-stepped with
//! `PTRACE_SINGLESTEP` through `Counter::add`, `Stack::push`/`pop`,
//! `PerCpu::with_cpu` and `CpuCache`'s `alloc`/`dealloc` finishes with the right results.
//!
//! Every single-step traps into the kernel and back, and the kernel aborts a critical
//! section on every such return: without a slow path that needs no successful sequence,
//! the child would loop forever (the reason `cpu_opv` was proposed).

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
    loop {
        // SAFETY: `pid` is our stopped tracee; PTRACE_SINGLESTEP takes no pointers.
        let r = unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, pid, 0, 0) };
        assert_eq!(r, 0, "PTRACE_SINGLESTEP failed");
        let status = wait(pid);
        assert!(
            libc::WIFSTOPPED(status),
            "child left while single-stepped: {status:#x}"
        );
        match libc::WSTOPSIG(status) {
            libc::SIGTRAP => steps += 1,
            sig if sig == END => break,
            sig => panic!("unexpected signal {sig} in the single-stepped region"),
        }
        assert!(steps < STEP_LIMIT, "no progress after {steps} single-steps");
    }
    STEPS.store(steps, Ordering::Relaxed);
    // SAFETY: `pid` is our stopped tracee; the END signal is dropped (data 0).
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) };
    assert_eq!(r, 0, "PTRACE_CONT failed");
    steps
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
