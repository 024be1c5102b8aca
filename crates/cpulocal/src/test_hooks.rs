//! Hooks for tests and `cpulocal stress`, compiled only into test builds and builds with
//! the `__test-hooks` feature. Never enable them in production: they slow every
//! sequence down.


use core::sync::atomic::{AtomicUsize, Ordering};

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
