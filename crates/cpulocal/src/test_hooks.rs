//! Hooks for tests and `cpulocal stress`, compiled only into test builds and builds with
//! the `__test-hooks` feature. Never enable them in production: they slow every
//! sequence down.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// How many `pause` iterations every restartable sequence spins right after its CPU
/// check, inside the critical section. Widening the window makes preemption, migration
/// and signals land inside sequences, so their abort paths run. Read by the asm in
/// `arch/` by symbol name.
// Unmangled so the asm can name it; only test builds define it, so two copies of
// cpulocal in one production binary cannot collide.
#[no_mangle]
#[used]
static CPULOCAL_TEST_DELAY_LOOPS: AtomicUsize = AtomicUsize::new(0);

/// Sets the spin count inside every sequence (0: no delay).
///
/// ```
/// cpulocal::test_hooks::set_delay_loops(0);
/// assert_eq!(cpulocal::test_hooks::delay_loops(), 0);
/// ```
pub fn set_delay_loops(loops: usize) {
    // Relaxed: a tuning knob; a sequence that reads the old value is still correct.
    CPULOCAL_TEST_DELAY_LOOPS.store(loops, Ordering::Relaxed);
}

/// The current spin count inside every sequence.
pub fn delay_loops() -> usize {
    CPULOCAL_TEST_DELAY_LOOPS.load(Ordering::Relaxed)
}

/// Sequences the kernel restarted (their abort handler ran), since the process started.
static KERNEL_ABORTS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn note_kernel_abort() {
    // Relaxed: a statistic.
    KERNEL_ABORTS.fetch_add(1, Ordering::Relaxed);
}

/// How many sequences the kernel has restarted in this process (their abort handler
/// ran because of a preemption, migration or signal inside them). Sequences that found
/// the thread on another CPU before they started are not counted.
///
/// ```
/// let before = cpulocal::test_hooks::kernel_aborts();
/// assert!(cpulocal::test_hooks::kernel_aborts() >= before);
/// ```
pub fn kernel_aborts() -> u64 {
    KERNEL_ABORTS.load(Ordering::Relaxed)
}

static STACK_GUARD_BROKEN: AtomicBool = AtomicBool::new(false);

/// Breaks (`true`) or restores (`false`) the guard of [`Stack`](crate::Stack)'s lists:
/// `steal` and `pop_all_on` then take a CPU's lock without the membarrier fence (and
/// without checking that their token survived it), so a push or pop in flight on that
/// CPU still commits over the token, and tests can show that remote operations racing
/// the fast paths then lose or duplicate nodes.
pub fn break_stack_guard(broken: bool) {
    // Relaxed: a test switch, set while no stack is in use.
    STACK_GUARD_BROKEN.store(broken, Ordering::Relaxed);
}

#[inline(always)]
pub(crate) fn stack_guard_broken() -> bool {
    STACK_GUARD_BROKEN.load(Ordering::Relaxed)
}

/// The signal the pool raises on itself, once, while it holds its lock (0: none).
static SIGNAL_INSIDE_POOL_LOCK: core::sync::atomic::AtomicI32 =
    core::sync::atomic::AtomicI32::new(0);

/// Makes the next allocation or free of the per-CPU pool raise `signal` on the calling
/// thread while it holds the pool's lock (once), so that tests can show a handler that
/// uses a new counter there does not wait for that lock forever.
pub fn raise_inside_pool_lock(signal: libc::c_int) {
    // Relaxed: a test switch, set and used by the same thread.
    SIGNAL_INSIDE_POOL_LOCK.store(signal, Ordering::Relaxed);
}

/// Microseconds the next holder of the per-CPU pool's lock sleeps with it held (0: none).
static SLEEP_INSIDE_POOL_LOCK_US: core::sync::atomic::AtomicU64 =
    core::sync::atomic::AtomicU64::new(0);

/// Makes the next holder of the per-CPU pool's lock (any thread) sleep `micros` with it
/// held, once: a window in which other threads' first uses wait for the lock, so that
/// tests can show they do not allocate a second item.
pub fn sleep_inside_pool_lock(micros: u64) {
    // Relaxed: a test switch; the sleep only widens a window.
    SLEEP_INSIDE_POOL_LOCK_US.store(micros, Ordering::Relaxed);
}

/// Called by the pool with its lock held.
pub(crate) fn pool_lock_taken() {
    // Relaxed: as above.
    let signal = SIGNAL_INSIDE_POOL_LOCK.swap(0, Ordering::Relaxed);
    if signal != 0 {
        // SAFETY: raise has no memory preconditions.
        unsafe { libc::raise(signal) };
    }
    // Relaxed: as in `sleep_inside_pool_lock`.
    let micros = SLEEP_INSIDE_POOL_LOCK_US.swap(0, Ordering::Relaxed);
    if micros != 0 {
        std::thread::sleep(std::time::Duration::from_micros(micros));
    }
}

/// The hook [`on_overwritten_record`] set.
static OVERWRITTEN_RECORD: std::sync::OnceLock<fn(&crate::ring::RingBuffer, &[u8])> =
    std::sync::OnceLock::new();

/// Calls `hook(ring, payload)` for every record an overwriting ring drops unread, as it
/// drops it; set once per process (later calls change nothing). For the stress checker,
/// which then knows *which* records were overwritten, not only how many
/// ([`RingStats::overwritten`](crate::ring::RingStats::overwritten)), so that a lost
/// record and a delivered-and-counted one cannot balance each other.
pub fn on_overwritten_record(hook: fn(&crate::ring::RingBuffer, &[u8])) {
    let _ = OVERWRITTEN_RECORD.set(hook);
}

/// Tells the hook of [`on_overwritten_record`], if any, that `ring` drops `payload`.
pub(crate) fn overwritten_record(ring: &crate::ring::RingBuffer, payload: &[u8]) {
    if let Some(hook) = OVERWRITTEN_RECORD.get() {
        hook(ring, payload);
    }
}

/// The address of the one [`Counter`](crate::Counter) whose add is broken; 0: none.
static BROKEN_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Breaks the add of `counter` (`Some`) or restores every counter's (`None`): while
/// broken, it runs a load, the delay, and a store with no critical section armed, so a
/// preemption, migration or signal between the load and the store loses updates. The
/// mutation `cpulocal stress --broken` must catch. One counter, not all: the ring's and
/// the allocator's statistics are counters too, and must stay exact meanwhile.
pub fn break_counter_sequence(counter: Option<&crate::Counter>) {
    let address = counter.map_or(0, |c| c as *const crate::Counter as usize);
    // Relaxed: a test switch, set before the workers start.
    BROKEN_COUNTER.store(address, Ordering::Relaxed);
}

#[inline(always)]
pub(crate) fn counter_sequence_broken(counter: &crate::Counter) -> bool {
    // Relaxed: as in `break_counter_sequence`.
    BROKEN_COUNTER.load(Ordering::Relaxed) == counter as *const crate::Counter as usize
}

std::thread_local! {
    static SLOW_PATHS_FORCED: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Makes every per-CPU fast path of the calling thread give up at once (`true`), so its
/// operations take their slow paths (the lock taken as a remote owner), or restores them
/// (`false`).
pub fn force_slow_paths(forced: bool) {
    SLOW_PATHS_FORCED.set(forced);
}

#[inline(always)]
pub(crate) fn slow_paths_forced() -> bool {
    SLOW_PATHS_FORCED.get()
}

static SLAB_POP_BROKEN: AtomicBool = AtomicBool::new(false);

/// Breaks (`true`) or restores (`false`) the fast pop of
/// [`CpuCache`](crate::alloc::CpuCache): while broken, it runs the pop's loads, the
/// delay and its store with no critical section armed, so two threads preempted on one
/// CPU can be handed the same block. The mutation the allocator stress test must catch.
pub fn break_slab_pop(broken: bool) {
    // Relaxed: a test switch, set before the workers start.
    SLAB_POP_BROKEN.store(broken, Ordering::Relaxed);
}

#[inline(always)]
pub(crate) fn slab_pop_broken() -> bool {
    SLAB_POP_BROKEN.load(Ordering::Relaxed)
}

std::thread_local! {
    static AFTER_FAST_LOCK: core::cell::Cell<Option<fn()>> = const { core::cell::Cell::new(None) };
    static AFTER_SLOW_LOCK: core::cell::Cell<Option<fn()>> = const { core::cell::Cell::new(None) };
    static IN_STRIPE_WINDOW: core::cell::Cell<Option<fn()>> = const { core::cell::Cell::new(None) };
}

/// Makes the calling thread run `f` at the next two points of a fallback primitive where
/// it holds its stripe's lock: right after taking it, and right before giving it back
/// (each once, `f` being taken before it runs), as a signal handler arriving there would.
pub fn run_in_stripe_windows(f: fn()) {
    IN_STRIPE_WINDOW.set(Some(f));
}

/// Called by the fallback's stripe lock at those two points.
pub(crate) fn stripe_window() {
    if let Some(f) = IN_STRIPE_WINDOW.take() {
        f();
    }
}

/// Makes the calling thread's next `PerCpu` lock taken by a slow path (`lock_cpu`,
/// `on_cpu`, `for_each`, or `with_cpu`/`lock` when the fast path cannot run) run `f`
/// right after the lock word took the thread's token, before the lock is returned
/// (once), as a signal handler arriving there would (a signal during the fence is
/// delivered as the fence returns).
pub fn run_after_slow_lock(f: fn()) {
    AFTER_SLOW_LOCK.set(Some(f));
}

/// Called by `PerCpu`'s slow paths right after they took a lock.
pub(crate) fn slow_lock_taken() {
    if let Some(f) = AFTER_SLOW_LOCK.take() {
        f();
    }
}

/// Makes the calling thread's next `PerCpu` lock taken by the fast path run `f` right
/// after the sequence commits, before the lock is returned (once), as a signal handler
/// arriving at that instruction would: tests use it to show that a handler which asks
/// for another slot of the same `PerCpu` there is refused, not left to deadlock.
pub fn run_after_fast_lock(f: fn()) {
    AFTER_FAST_LOCK.set(Some(f));
}

/// Called by `PerCpu`'s fast path right after its sequence committed.
#[inline(always)]
pub(crate) fn fast_lock_taken() {
    if let Some(f) = AFTER_FAST_LOCK.take() {
        f();
    }
}

/// `membarrier` fences cpulocal has issued to restart other CPUs' sequences.
static FENCES: AtomicU64 = AtomicU64::new(0);

pub(crate) fn note_fence() {
    // Relaxed: a statistic.
    FENCES.fetch_add(1, Ordering::Relaxed);
}

/// How many fences against other CPUs' sequences (`membarrier(PRIVATE_EXPEDITED_RSEQ)`,
/// one CPU or all) this process has issued, so that tests can show which operations
/// interrupt other CPUs and which do not.
///
/// ```
/// let before = cpulocal::test_hooks::fences();
/// assert!(cpulocal::test_hooks::fences() >= before);
/// ```
pub fn fences() -> u64 {
    FENCES.load(Ordering::Relaxed)
}
