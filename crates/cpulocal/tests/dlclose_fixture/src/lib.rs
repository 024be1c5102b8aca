//! The plugin of `tests/dlclose.rs`: one exported function that runs cpulocal's
//! sequences (which leave the thread's `rseq_cs` pointing into this library) on the
//! calling thread.

use std::sync::OnceLock;

/// Runs a few of every structure's sequences on the calling thread; returns the
/// counter's sum (`rounds` after the first call).
#[no_mangle]
pub extern "C" fn cpulocal_fixture_run(rounds: u64) -> u64 {
    static COUNTER: OnceLock<cpulocal::Counter> = OnceLock::new();
    let counter = COUNTER.get_or_init(cpulocal::Counter::new);
    let slots = cpulocal::PerCpu::new(|_| 0u64);
    let stack = cpulocal::Stack::new();
    for i in 0..rounds {
        slots.with_cpu(|v| *v += i);
        stack.push(cpulocal::Node::new(i));
        drop(stack.pop());
        counter.add(1);
    }
    counter.sum()
}

/// Whether this library's copy of cpulocal registered the calling thread (1) or serves
/// it through its slow paths (0): with a host that has its own copy, the copy whose use
/// came first on a thread holds the thread's one registration.
#[no_mangle]
pub extern "C" fn cpulocal_fixture_registered() -> u32 {
    u32::from(cpulocal::thread::is_registered())
}

/// The CPU this library's copy of cpulocal says the calling thread runs on.
#[no_mangle]
pub extern "C" fn cpulocal_fixture_cpu() -> u32 {
    cpulocal::current_cpu() as u32
}
