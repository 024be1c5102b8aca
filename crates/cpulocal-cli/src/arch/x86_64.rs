//! x86_64: the CPU-number instructions the bench compares with `current_cpu()`.
//!
//! Linux writes `(node << 12) | cpu` into the `IA32_TSC_AUX` MSR of every CPU; `RDTSCP`
//! returns it next to the time stamp, `RDPID` (Ice Lake, Zen 2 and later) alone. The
//! CPU is its low 12 bits.

use core::arch::asm;
use core::arch::x86_64::{__cpuid, __cpuid_count, __rdtscp, CpuidResult};

/// Mask of the CPU number in `TSC_AUX` as Linux fills it.
const TSC_AUX_CPU_MASK: u32 = 0xfff;

/// `CPUID` leaf `leaf`, sub-leaf `sub`.
fn cpuid(leaf: u32, sub: u32) -> CpuidResult {
    // Older toolchains declare these intrinsics `unsafe`, newer ones safe.
    #[allow(unused_unsafe)]
    // SAFETY: every x86_64 CPU has `CPUID`; it only reads identification registers.
    unsafe {
        if sub == 0 {
            __cpuid(leaf)
        } else {
            __cpuid_count(leaf, sub)
        }
    }
}

/// Whether the CPU has `RDPID` (`CPUID.(EAX=7,ECX=0):ECX` bit 22).
pub(crate) fn has_rdpid() -> bool {
    cpuid(0, 0).eax >= 7 && cpuid(7, 0).ecx & (1 << 22) != 0
}

/// Whether the CPU has `RDTSCP` (`CPUID.80000001H:EDX` bit 27).
pub(crate) fn has_rdtscp() -> bool {
    cpuid(0x8000_0000, 0).eax >= 0x8000_0001 && cpuid(0x8000_0001, 0).edx & (1 << 27) != 0
}

/// The CPU number through `RDPID`.
///
/// # Safety
///
/// The CPU has `RDPID` ([`has_rdpid`]); elsewhere the instruction raises `#UD`.
#[inline(always)]
pub(crate) unsafe fn rdpid_cpu() -> u32 {
    let aux: u64;
    // SAFETY: 1. the caller checked that the CPU implements RDPID; 2. it writes only
    // its register operand and reads no memory, touches no flags, uses no stack.
    unsafe {
        asm!(
            "rdpid {aux}",
            aux = out(reg) aux,
            options(nomem, nostack, preserves_flags),
        )
    };
    aux as u32 & TSC_AUX_CPU_MASK
}

/// The CPU number through `RDTSCP` (the time stamp is discarded).
///
/// # Safety
///
/// The CPU has `RDTSCP` ([`has_rdtscp`]); elsewhere the instruction raises `#UD`.
#[inline(always)]
pub(crate) unsafe fn rdtscp_cpu() -> u32 {
    let mut aux: u32 = 0;
    // SAFETY: 1. the caller checked that the CPU implements RDTSCP; 2. `aux` is a live
    // local the intrinsic writes TSC_AUX into.
    let _tsc = unsafe { __rdtscp(&mut aux) };
    aux & TSC_AUX_CPU_MASK
}
