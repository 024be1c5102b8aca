//! The kernel's rseq ABI, as `include/uapi/linux/rseq.h` defines it.
//!
//! Only layouts and constants live here; nothing in this module touches memory. Every
//! offset, size and alignment the kernel relies on is checked at compile time at the
//! bottom of the file, so a mistaken edit fails the build instead of corrupting a
//! thread's registration.
#![deny(unsafe_code)]

use core::mem::{align_of, offset_of, size_of};

/// The per-thread area shared with the kernel (`struct rseq`).
///
/// The kernel writes `cpu_id_start`, `cpu_id`, `node_id` and `mm_cid` whenever the
/// thread returns to user space after a preemption, migration or signal; user space
/// writes only `rseq_cs` (and, by convention, `flags`). The struct may grow in later
/// kernels (`slice_ctrl` at offset 28 in 7.0): code must never assume it ends at 32.
#[repr(C, align(32))]
#[derive(Debug)]
pub struct Rseq {
    /// Always a valid CPU number, even before registration (then 0). Read at the start
    /// of a sequence to pick the per-CPU slot.
    pub cpu_id_start: u32,
    /// The current CPU number, or [`RSEQ_CPU_ID_UNINITIALIZED`] /
    /// [`RSEQ_CPU_ID_REGISTRATION_FAILED`]. Compared inside a sequence.
    pub cpu_id: u32,
    /// Address of the [`RseqCs`] descriptor of the critical section in progress, or 0.
    pub rseq_cs: u64,
    /// Deprecated per-thread restart-inhibit flags; must stay 0.
    pub flags: u32,
    /// NUMA node of `cpu_id` (valid when the feature size reaches offset 24).
    pub node_id: u32,
    /// Concurrency id of the thread within its mm (valid when the feature size reaches 28).
    pub mm_cid: u32,
    /// Kernel-owned from Linux 7.0 (time-slice extension control); padding before.
    /// Never written by cpulocal.
    pub slice_ctrl: u32,
}

/// A critical-section descriptor (`struct rseq_cs`). Static, 32-byte aligned, in its own
/// section; the 4 bytes before `abort_ip` hold [`RSEQ_SIG`].
#[repr(C, align(32))]
#[derive(Debug)]
pub struct RseqCs {
    /// Always 0.
    pub version: u32,
    /// Deprecated restart-inhibit flags; 0.
    pub flags: u32,
    /// First instruction of the critical section.
    pub start_ip: u64,
    /// Length of the critical section in bytes: the commit instruction is its last one.
    pub post_commit_offset: u64,
    /// Where the kernel sends the thread when the section is interrupted.
    pub abort_ip: u64,
}

/// `cpu_id` before the thread registered.
pub const RSEQ_CPU_ID_UNINITIALIZED: u32 = -1i32 as u32;
/// `cpu_id` after a registration attempt failed (glibc writes it too).
pub const RSEQ_CPU_ID_REGISTRATION_FAILED: u32 = -2i32 as u32;

/// `flags` argument of `rseq(2)` that removes the registration.
pub const RSEQ_FLAG_UNREGISTER: i32 = 1;

/// Auxiliary vector key: how many bytes of [`Rseq`] the kernel fills (the feature size).
pub const AT_RSEQ_FEATURE_SIZE: u64 = 27;
/// Auxiliary vector key: the alignment the kernel wants for [`Rseq`].
pub const AT_RSEQ_ALIGN: u64 = 28;

/// Size of the original (Linux 4.18) registration: the legacy, always-accepted length.
pub const ORIG_RSEQ_SIZE: u32 = 32;
/// The feature size of kernels that predate `AT_RSEQ_FEATURE_SIZE`: up to `flags`.
pub const ORIG_RSEQ_FEATURE_SIZE: u32 = 20;

/// The abort signature, as an instruction that traps if ever executed.
///
/// x86_64: the 4-byte immediate of `ud1 0x53053053(%rip), %edi`.
#[cfg(target_arch = "x86_64")]
pub const RSEQ_SIG: u32 = 0x5305_3053;
/// The abort signature, as an instruction that traps if ever executed.
///
/// aarch64: `brk #0x45e0`.
#[cfg(target_arch = "aarch64")]
pub const RSEQ_SIG: u32 = 0xd428_bc00;
/// The abort signature. Other architectures run the fallback only, but the constant
/// keeps one meaning everywhere.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const RSEQ_SIG: u32 = 0;

/// `membarrier(2)` commands used by cpulocal.
pub mod membarrier {
    /// Ask which commands the kernel supports.
    pub const CMD_QUERY: i32 = 0;
    /// A full memory barrier on every CPU running a thread of the process.
    pub const CMD_PRIVATE_EXPEDITED: i32 = 1 << 3;
    /// Register the process for [`CMD_PRIVATE_EXPEDITED`].
    pub const CMD_REGISTER_PRIVATE_EXPEDITED: i32 = 1 << 4;
    /// Restart the rseq critical sections running on the target CPUs.
    pub const CMD_PRIVATE_EXPEDITED_RSEQ: i32 = 1 << 7;
    /// Register the process for [`CMD_PRIVATE_EXPEDITED_RSEQ`].
    pub const CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ: i32 = 1 << 8;
    /// Flag: the third argument names one CPU.
    pub const CMD_FLAG_CPU: u32 = 1 << 0;
}

/// Offset of the end of `node_id`: a feature size at least this large fills it.
pub const NODE_ID_END: u32 = (offset_of!(Rseq, node_id) + size_of::<u32>()) as u32;
/// Offset of the end of `mm_cid`: a feature size at least this large fills it.
pub const MM_CID_END: u32 = (offset_of!(Rseq, mm_cid) + size_of::<u32>()) as u32;

// The kernel ABI, checked at compile time.
const _: () = {
    assert!(offset_of!(Rseq, cpu_id_start) == 0);
    assert!(offset_of!(Rseq, cpu_id) == 4);
    assert!(offset_of!(Rseq, rseq_cs) == 8);
    assert!(offset_of!(Rseq, flags) == 16);
    assert!(offset_of!(Rseq, node_id) == 20);
    assert!(offset_of!(Rseq, mm_cid) == 24);
    assert!(size_of::<Rseq>() == ORIG_RSEQ_SIZE as usize);
    assert!(align_of::<Rseq>() == 32);
    assert!(offset_of!(RseqCs, version) == 0);
    assert!(offset_of!(RseqCs, flags) == 4);
    assert!(offset_of!(RseqCs, start_ip) == 8);
    assert!(offset_of!(RseqCs, post_commit_offset) == 16);
    assert!(offset_of!(RseqCs, abort_ip) == 24);
    assert!(size_of::<RseqCs>() == 32);
    assert!(align_of::<RseqCs>() == 32);
    assert!(NODE_ID_END == 24);
    assert!(MM_CID_END == 28);
};
