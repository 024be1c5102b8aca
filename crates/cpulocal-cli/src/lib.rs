//! The work behind the `cpulocal` command line: what the machine offers ([`info`]), the
//! side-by-side measurements ([`bench`](mod@bench)), and the torture runs that check
//! every structure exactly ([`stress`]). `main.rs` only parses arguments and prints.

mod arch;

/// With the `global-cpu-cache` feature the CLI and its tests allocate through
/// [`cpulocal::alloc::CpuCache`].
#[cfg(feature = "global-cpu-cache")]
#[global_allocator]
static GLOBAL: cpulocal::alloc::CpuCache = cpulocal::alloc::CpuCache::new();
pub mod bench;
pub mod info;
pub mod stress;
