//! The work behind the `cpulocal` command line: what the machine offers ([`info`]), the
//! side-by-side measurements ([`bench`](mod@bench)), and the torture runs that check
//! every structure exactly ([`stress`]). `main.rs` only parses arguments and prints.

mod arch;
pub mod bench;
pub mod info;
pub mod stress;
