//! The restartable sequences, one file per architecture; the only place with `asm!`.
//!
//! Every architecture module provides the same items:
//!
//! - `HAS_RSEQ`: whether it has sequences at all (others run the fallback only);
//! - `thread_pointer()`: the thread pointer, from which glibc's area is found;
//! - the primitives, each `unsafe fn(rseq, …, cpu) -> Outcome<…>`, `#[inline(always)]`.
//!
//! A sequence is laid out the way the kernel's selftests and librseq lay theirs out:
//!
//! ```text
//!     .pushsection __rseq_cs, "aw"        descriptor (struct rseq_cs), 32-byte aligned
//! 3:  .long 0, 0                          version, flags
//!     .quad 4f, (5f - 4f), 6f             start_ip, post_commit_offset, abort_ip
//!     .popsection
//!     rseq->rseq_cs = &3b                 arm: from here the kernel watches [4, 5)
//! 4:  if rseq->cpu_id != cpu goto moved   the thread must still be on `cpu`
//!     …loads, compares, tentative stores…
//!     commit store                        the one store that publishes the update
//! 5:                                      post-commit: the section is over
//!     .pushsection __rseq_failure, "ax"
//!     <signature>                         the 4 bytes before abort_ip (RSEQ_SIG)
//! 6:  goto abort                          the kernel lands here on preemption,
//!     .popsection                         migration or signal delivery inside [4, 5)
//! ```
//!
//! Numeric labels keep each inlined copy of a sequence self-contained. `rseq_cs` is not
//! cleared after the commit: the kernel clears it lazily when it finds the instruction
//! pointer outside the section, as librseq relies on too.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::*;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub(crate) use aarch64::*;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod none;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) use none::*;

#[cfg(test)]
mod tests;

/// The field a sequence checks to know the thread is still where it started, as its
/// byte offset in `struct rseq`: `cpu_id`, for per-CPU slots.
pub(crate) const CPU_ID_FIELD: usize = core::mem::offset_of!(crate::abi::Rseq, cpu_id);
/// `mm_cid`, for slots indexed by mm_cid: a thread keeps its mm_cid while it runs, and
/// every preemption (where the kernel may give it another) aborts the section.
pub(crate) const MM_CID_FIELD: usize = core::mem::offset_of!(crate::abi::Rseq, mm_cid);

/// Called on the kernel's abort path only (label `6`, reached when the kernel restarted
/// a sequence): test builds count these so stress runs can show the abort path ran.
/// Sequences that find themselves on the wrong CPU, or a guard held, leave through the
/// `{moved}` label instead, which is not counted.
#[inline(always)]
pub(crate) fn note_kernel_abort() {
    #[cfg(any(test, feature = "__test-hooks"))]
    crate::test_hooks::note_kernel_abort();
}

/// The result of one restartable primitive.
///
/// Structures retry on [`Outcome::Aborted`] after re-reading the CPU number; their
/// callers never see an abort.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome<T = ()> {
    /// The commit store happened; carries the primitive's result.
    Committed(T),
    /// The comparison in the sequence failed; nothing was stored.
    CompareFailed,
    /// Nothing was committed: the thread was not on the expected CPU, or was preempted,
    /// migrated or signalled inside the sequence (the kernel restarted it), or this
    /// thread cannot use rseq in a process that does (see [`crate::thread`]). Tentative
    /// stores may have been made.
    Aborted,
}
