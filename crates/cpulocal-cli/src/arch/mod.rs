//! Architecture-specific instructions for the bench; the only place with `asm!`.
//!
//! One file per architecture. Where a file is missing, the rows that need it are
//! simply absent from the bench.

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;
