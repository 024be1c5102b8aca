//! The work behind the `cpulocal` command line: what the machine offers ([`info`]) and
//! the side-by-side measurements ([`bench`](mod@bench)). `main.rs` only parses arguments and prints.

mod arch;
pub mod bench;
pub mod info;
