//! aarch64 restartable sequences.
//!
//! Register use: `{rseq}` holds the thread's `struct rseq`, `{cpu}` the CPU (the caller
//! read it from `cpu_id_start`, or the `*_on_current_cpu` sequences read it from `cpu_id`
//! once their section is open); `{tmp}` is scratch. The signature is the instruction
//! `brk #0x45e0` (`0xd428bc00`), emitted with `.inst` so a stray jump into it traps
//! instead of running data. Plain `str`s may be reordered, so the `*_release` commits
//! are `stlr`: every earlier load and store of the thread is ordered before them.
//!
//! Two differences from the x86_64 layout, both about branch range:
//!
//! - The in-line CPU and guard checks branch to the Rust label `{moved}` (as on x86_64),
//!   never to label `6`: a conditional branch reaches ±1 MiB only, and `__rseq_failure`
//!   may be linked farther than that from the code, while `{moved}` is in the same
//!   function. Label `6` is the kernel's `abort_ip`.
//! - Label `6` leaves `__rseq_failure` with an unconditional `b` (±128 MiB). Beyond
//!   that, linkers insert a veneer, which may clobber the intra-procedure-call scratch
//!   registers x16 and x17: every sequence declares them clobbered.
//!
//! Big-endian aarch64 runs the fallback only ([`HAS_RSEQ`] is false there): its code is
//! little-endian while its data is not, so the signature the kernel reads as data would
//! differ from [`RSEQ_SIG`].

use core::arch::asm;

use super::Outcome;
use crate::abi::{Rseq, RSEQ_SIG};

/// Little-endian aarch64 has sequences; big-endian runs the fallback (see the module
/// documentation).
pub(crate) const HAS_RSEQ: bool = cfg!(target_endian = "little");

/// Emits the descriptor of a critical section `[4, 5)` with abort label `6` (label `3`,
/// in `__rseq_cs`).
macro_rules! rseq_descriptor {
    () => {
        concat!(
            ".pushsection __rseq_cs, \"aw\"\n",
            ".balign 32\n",
            "3:\n",
            ".long 0x0, 0x0\n",
            ".quad 4f, (5f - 4f), 6f\n",
            ".popsection\n",
            // For debuggers and tools that enumerate sequences (as librseq does); `R`
            // (retain) keeps the linker's `--gc-sections` from dropping it: nothing refers
            // to it.
            ".pushsection __rseq_cs_ptr_array, \"awR\"\n",
            ".balign 8\n",
            ".quad 3b\n",
            ".popsection\n",
        )
    };
}

/// Arms `rseq->rseq_cs` with the descriptor `3` and opens the section (label `4`).
///
/// Operands used: `{rseq}`, `{tmp}`.
macro_rules! rseq_arm {
    () => {
        concat!(
            "adrp {tmp}, 3b\n",
            "add {tmp}, {tmp}, :lo12:3b\n",
            "str {tmp}, [{rseq}, #8]\n",
            "4:\n",
        )
    };
}

/// Arms `rseq->rseq_cs` with the descriptor `3`, opens the section (label `4`) and
/// checks that the thread is still on `{cpu}`: that `rseq->cpu_id` (byte 4) still
/// holds it, or, given a field's byte offset (`"{index_field}"`, a `const` operand),
/// that this field does (`mm_cid`, for slots indexed by mm_cid).
///
/// Operands used: `{rseq}`, `{cpu}`, `{tmp}`, `{moved}` (the Rust label for "not on `{cpu}`").
macro_rules! rseq_arm_and_check_cpu {
    () => {
        rseq_arm_and_check_cpu!("4")
    };
    ($field:literal) => {
        concat!(
            rseq_arm!(),
            "ldr {tmp:w}, [{rseq}, #",
            $field,
            "]\n",
            "cmp {tmp:w}, {cpu:w}\n",
            // `{moved}`, not `6f`: see the module documentation (branch range).
            "b.ne {moved}\n",
            rseq_test_delay!(),
        )
    };
}

/// Opens a critical section `[4, 5)` with abort label `6`: emits its descriptor, arms
/// `rseq->rseq_cs`, and checks that the thread is still on `{cpu}` (or, given a field,
/// as in [`rseq_arm_and_check_cpu!`]).
///
/// Operands used: `{rseq}`, `{cpu}`, `{tmp}`, `{moved}` (the Rust label for "not on `{cpu}`").
macro_rules! rseq_start {
    () => {
        concat!(rseq_descriptor!(), rseq_arm_and_check_cpu!())
    };
    ($field:literal) => {
        concat!(rseq_descriptor!(), rseq_arm_and_check_cpu!($field))
    };
}

/// Opens a critical section on the CPU the thread runs on, all in the one asm block:
/// emits the descriptor, arms `rseq->rseq_cs`, and inside the section (label `4`) reads
/// `cpu_id` into `{cpu}`, leaves for `{moved}` unless `{cpu} < {len}`, and points
/// `{slot}` at `{base} + ({cpu} << {shift})` (one `add` with a shifted operand).
///
/// As on x86_64, the CPU is read once, after the section opens, so no check against a
/// second read is needed: a migration after the read restarts the section.
///
/// Operands used: `{rseq}`, `{base}`, `{len}`, `{shift}` (a `const`), `{cpu}`, `{slot}`,
/// `{tmp}`, `{moved}`. Given an instruction, runs it first, right after the section
/// opens (the table's load of [`rseq_start_on_current_cpu_table!`]).
macro_rules! rseq_start_on_current_cpu {
    () => {
        rseq_start_on_current_cpu!("")
    };
    ($load_table:literal) => {
        concat!(
            rseq_descriptor!(),
            rseq_arm!(),
            $load_table,
            "ldr {cpu:w}, [{rseq}, #4]\n",
            "cmp {cpu}, {len}\n",
            // `{moved}`, not `6f`: see the module documentation (branch range).
            "b.hs {moved}\n",
            "add {slot}, {base}, {cpu}, lsl #{shift}\n",
            rseq_test_delay!(),
        )
    };
}

/// [`rseq_start_on_current_cpu!`] with the table in memory: `{table}` points to a
/// [`SlotTable`](crate::pool::SlotTable) (first slot, then slot count), which one `ldp`
/// inside the section loads into `{base}` and `{len}` (scratch registers here).
///
/// Operands used: `{rseq}`, `{table}`, `{base}`, `{len}`, `{shift}` (a `const`),
/// `{cpu}`, `{slot}`, `{tmp}`, `{moved}`.
macro_rules! rseq_start_on_current_cpu_table {
    () => {
        rseq_start_on_current_cpu!("ldp {base}, {len}, [{table}]\n")
    };
}

/// Test builds only: spins `CPULOCAL_TEST_DELAY_LOOPS` times inside the section, right
/// after the CPU check, so that preemption, migration and signals land inside it and
/// the abort path really runs (see [`crate::test_hooks`]). Uses `{tmp}`.
#[cfg(any(test, feature = "__test-hooks"))]
macro_rules! rseq_test_delay {
    () => {
        concat!(
            "adrp {tmp}, CPULOCAL_TEST_DELAY_LOOPS\n",
            "ldr {tmp}, [{tmp}, :lo12:CPULOCAL_TEST_DELAY_LOOPS]\n",
            "7:\n",
            "cbz {tmp}, 8f\n",
            "yield\n",
            "sub {tmp}, {tmp}, #1\n",
            "b 7b\n",
            "8:\n",
        )
    };
}

/// Normal builds: no delay.
#[cfg(not(any(test, feature = "__test-hooks")))]
macro_rules! rseq_test_delay {
    () => {
        ""
    };
}

/// Closes the section opened by [`rseq_start!`]: label `5` right after the commit, and
/// in `__rseq_failure` the signature followed by the abort label `6`, which jumps to
/// the Rust label `{abort}`.
///
/// Operands used: `{sig}`, `{abort}`.
macro_rules! rseq_end {
    () => {
        concat!(
            "5:\n",
            ".pushsection __rseq_failure, \"ax\"\n",
            ".inst {sig}\n",
            "6:\n",
            "b {abort}\n",
            ".popsection\n",
        )
    };
}

/// The thread pointer: `tpidr_el0`, which points at the TCB on aarch64 Linux.
#[inline(always)]
pub(crate) fn thread_pointer() -> *mut u8 {
    let tp: *mut u8;
    // SAFETY: reading tpidr_el0 is allowed at EL0, touches no memory and has no side
    // effect; the kernel keeps it per thread.
    unsafe {
        asm!("mrs {tp}, tpidr_el0", tp = out(reg) tp,
             options(nomem, nostack, preserves_flags, pure))
    };
    tp
}

/// `*v += count` on `cpu`.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// tmp = *v
/// tmp += count
/// *v = tmp                          commit
/// ```
///
/// # Safety
///
/// 1. `rseq` is the calling thread's registered area, or a refusing area of the calling
///    thread or of the process (`thread::area_or_refusing`: writable, 32-byte aligned, its
///    `cpu_id` `u32::MAX`, which `cpu` is not), on which the sequence stores `rseq_cs`
///    and leaves (moved) before its commit.
/// 2. `v` is valid for reads and writes of a `usize`, aligned, and every other write to
///    it is made by a sequence that runs on `cpu` (or under a lock that excludes them).
#[inline(always)]
pub(crate) unsafe fn add(rseq: *mut Rseq, v: *mut usize, count: usize, cpu: u32) -> Outcome {
    // The kernel restarts the section rather than letting it finish on another CPU, so
    // the load-add-store is atomic with respect to every sequence on `cpu`.
    // SAFETY: (1) descriptor, signature and labels follow the layout of `arch/mod.rs`;
    // (2) the only store is the commit, to `v`, which the caller vouches for.
    unsafe {
        asm!(
            rseq_start!(),
            "ldr {tmp}, [{v}]",
            "add {tmp}, {tmp}, {count}",
            "str {tmp}, [{v}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            count = in(reg) count,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// `if *v == expect { *v = newv }` on `cpu`: on the CPU numbered `cpu`, or, with
/// `INDEX_FIELD` = [`MM_CID_FIELD`](super::MM_CID_FIELD), while the thread's mm_cid is
/// `cpu` (the field the kernel keeps current that the section checks, as a byte offset
/// in `struct rseq`).
///
/// ```text
/// if rseq->cpu_id (or ->mm_cid) != cpu: abort
/// if *v != expect: compare failed
/// *v = newv                         commit
/// ```
///
/// # Safety
///
/// As for [`add`], and: the thread's area has the field at `INDEX_FIELD`, kept current
/// by the kernel (for `mm_cid`: the registered feature size covers it).
#[inline(always)]
pub(crate) unsafe fn compare_store<const INDEX_FIELD: usize>(
    rseq: *mut Rseq,
    v: *mut usize,
    expect: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    // SAFETY: as in `add`; the compare branches out of the section before any store.
    unsafe {
        asm!(
            rseq_start!("{index_field}"),
            "ldr {tmp}, [{v}]",
            "cmp {tmp}, {expect}",
            "b.ne {fail}",
            "str {newv}, [{v}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            expect = in(reg) expect,
            newv = in(reg) newv,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            index_field = const INDEX_FIELD,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// List pop: `head = *v; if head != expect_not { *v = *(head + offset); return head }`.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// head = *v
/// if head == expect_not: compare failed
/// next = *(head + offset)           load at offset
/// *v = next                         commit
/// ```
///
/// The pop is free of ABA on `cpu`: no other sequence on `cpu` can run between the
/// load of `head` and the commit without restarting this one.
///
/// # Safety
///
/// As for [`add`], and: every value other than `expect_not` that `*v` can hold is an
/// address at which `offset` bytes further a `usize` is readable.
#[inline(always)]
pub(crate) unsafe fn pop(
    rseq: *mut Rseq,
    v: *mut usize,
    expect_not: usize,
    offset: isize,
    cpu: u32,
) -> Outcome<usize> {
    let mut head: usize = 0;
    // SAFETY: as in `add`; the stores before the commit go to the local `head` only,
    // which no other thread can see.
    unsafe {
        asm!(
            rseq_start!(),
            "ldr {tmp}, [{v}]",
            "cmp {tmp}, {expect_not}",
            "b.eq {fail}",
            "str {tmp}, [{head}]",
            "ldr {tmp}, [{tmp}, {offset}]",
            "str {tmp}, [{v}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            expect_not = in(reg) expect_not,
            offset = in(reg) offset,
            head = in(reg) &mut head,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(head)
}

/// Two-store commit: `if *v == expect { *v2 = newv2; *v = newv (release) }`.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *v != expect: compare failed
/// *v2 = newv2                       try-store: tentative, may be left behind by an abort
/// *v = newv                         commit, stlr (orders the try-store before it)
/// ```
///
/// # Safety
///
/// As for [`add`], and `v2` is valid for a `usize` write that nobody reads as final
/// until they have seen the commit of `v`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn compare_try_store_release(
    rseq: *mut Rseq,
    v: *mut usize,
    expect: usize,
    v2: *mut usize,
    newv2: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    // SAFETY: as in `add`; the try-store is invisible as a result until the commit
    // publishes it (the caller's contract), and the `stlr` commit is ordered after it,
    // pairing with the reader's acquire load of `v`.
    unsafe {
        asm!(
            rseq_start!(),
            "ldr {tmp}, [{v}]",
            "cmp {tmp}, {expect}",
            "b.ne {fail}",
            "str {newv2}, [{v2}]",
            "stlr {newv}, [{v}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            expect = in(reg) expect,
            v2 = in(reg) v2,
            newv2 = in(reg) newv2,
            newv = in(reg) newv,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// Buffer push: `if *v == expect { memcpy(dst, src, len); *v = newv (release) }`.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *v != expect: compare failed
/// while len != 0:                   byte loop: tentative, restartable mid-copy
///     *dst++ = *src++; len -= 1
/// *v = newv                         commit, stlr
/// ```
///
/// # Safety
///
/// As for [`add`], and: `src` is readable and `dst` writable for `len` bytes, they do
/// not overlap, and nobody reads `dst` as final before seeing the commit of `v`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn compare_memcpy_store_release(
    rseq: *mut Rseq,
    v: *mut usize,
    expect: usize,
    dst: *mut u8,
    src: *const u8,
    len: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    // The copy lies inside the section: an interruption mid-copy aborts it and the
    // commit never runs. The `stlr` commit orders the copied bytes before it, pairing
    // with the reader's acquire load of `v`.
    // SAFETY: as in `add`; the loop writes only `dst..dst+len` (the caller's contract).
    unsafe {
        asm!(
            rseq_start!(),
            "ldr {tmp}, [{v}]",
            "cmp {tmp}, {expect}",
            "b.ne {fail}",
            "cbz {len}, 10f",
            "9:",
            "ldrb {tmp:w}, [{src}], #1",
            "strb {tmp:w}, [{dst}], #1",
            "subs {len}, {len}, #1",
            "b.ne 9b",
            "10:",
            "stlr {newv}, [{v}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            expect = in(reg) expect,
            newv = in(reg) newv,
            dst = inout(reg) dst => _,
            src = inout(reg) src => _,
            len = inout(reg) len => _,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// Guarded compare-and-store: `if *guard == 0 && *v == expect { *v = newv }`.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *guard != 0: abort             ldar: the CPU's lock is held (by a remote owner)
/// if *v != expect: compare failed
/// *v = newv                         commit
/// ```
///
/// The guard is read with `ldar` so that the loads after it cannot be satisfied before
/// it: a remote owner's writes to the list, released with its unlock, are seen whenever
/// its unlock is.
///
/// # Safety
///
/// As for [`add`], and `guard` is valid for reads of a `usize`.
#[inline(always)]
pub(crate) unsafe fn compare_store_guarded(
    rseq: *mut Rseq,
    guard: *const usize,
    v: *mut usize,
    expect: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    // SAFETY: as in `compare_store`; the guard is only read.
    unsafe {
        asm!(
            rseq_start!(),
            "ldar {tmp}, [{guard}]",
            "cbnz {tmp}, {moved}",
            "ldr {tmp}, [{v}]",
            "cmp {tmp}, {expect}",
            "b.ne {fail}",
            "str {newv}, [{v}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            v = in(reg) v,
            expect = in(reg) expect,
            newv = in(reg) newv,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// Slab push: stores `item` in the next free slot of a per-CPU slab array and moves
/// its `current` pointer on, unless the array is full or the CPU's slab is locked.
///
/// The slab header `hdr` is three words: `current` (address of the next free slot) at
/// 0, `end` (one past the last slot) at 8, `begin` (the first slot) at 16.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *guard != 0: abort             load-acquire; the slab is locked (by a remote owner)
/// cur = hdr->current
/// if cur >= hdr->end: compare failed (full)
/// *cur = item                       try-store: the slot is free, nobody reads it yet
/// hdr->current = cur + 8            commit
/// ```
///
/// # Safety
///
/// As for [`add`] (for `hdr->current`), and: `guard` is readable; `hdr` is a slab
/// header whose `begin..end` slots are writable and are read only by sequences on
/// `cpu` (or under the guard, after the fence).
#[inline(always)]
pub(crate) unsafe fn slab_push(
    rseq: *mut Rseq,
    guard: *const usize,
    hdr: *mut usize,
    item: usize,
    cpu: u32,
) -> Outcome {
    // SAFETY: as in `add`; the slot store is tentative: no sequence reads a slot at or
    // above `current` before the commit moves `current` past it.
    unsafe {
        asm!(
            rseq_start!(),
            "ldar {tmp}, [{guard}]",
            "cbnz {tmp}, {moved}",
            "ldr {tmp}, [{hdr}]",
            "ldr {val}, [{hdr}, #8]",
            "cmp {tmp}, {val}",
            "b.hs {fail}",
            "str {item}, [{tmp}]",
            "add {tmp}, {tmp}, #8",
            "str {tmp}, [{hdr}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            hdr = in(reg) hdr,
            item = in(reg) item,
            tmp = out(reg) _,
            val = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// Slab pop: takes the item below `current` of a per-CPU slab array, unless the array
/// is empty or the CPU's slab is locked. Header layout as in [`slab_push`].
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *guard != 0: abort             load-acquire; the slab is locked (by a remote owner)
/// cur = hdr->current
/// if cur <= hdr->begin: compare failed (empty)
/// item = *(cur - 8)                 load (into a local of the caller)
/// hdr->current = cur - 8            commit
/// ```
///
/// # Safety
///
/// As for [`slab_push`].
#[inline(always)]
pub(crate) unsafe fn slab_pop(
    rseq: *mut Rseq,
    guard: *const usize,
    hdr: *mut usize,
    cpu: u32,
) -> Outcome<usize> {
    let mut item: usize = 0;
    // SAFETY: as in `add`; the store before the commit goes to the local `item` only.
    unsafe {
        asm!(
            rseq_start!(),
            "ldar {tmp}, [{guard}]",
            "cbnz {tmp}, {moved}",
            "ldr {tmp}, [{hdr}]",
            "ldr {val}, [{hdr}, #16]",
            "cmp {tmp}, {val}",
            "b.ls {fail}",
            "ldr {val}, [{tmp}, #-8]",
            "str {val}, [{out}]",
            "sub {tmp}, {tmp}, #8",
            "str {tmp}, [{hdr}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            hdr = in(reg) hdr,
            out = in(reg) &mut item,
            tmp = out(reg) _,
            val = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(item)
}

/// [`slab_push`] on the slab of the CPU the thread runs on: the header is
/// `base + (cpu << SHIFT)`, and the sequence reads the CPU itself, once its section is
/// open (as [`add_on_current_cpu`] does). It reads no guard: a locked slab's header has
/// `end` 0, so the bound check fails; `end` is loaded first, with acquire, so that a
/// header unlocked meanwhile (by a release store of `end`) is seen with the `current`
/// its lock holder left.
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// cpu = rseq->cpu_id
/// if cpu >= len: abort (moved)
/// hdr = base + (cpu << SHIFT)
/// end = hdr->end                    load-acquire; 0 while the slab is locked
/// cur = hdr->current
/// if cur >= end: compare failed (full, or locked)
/// *cur = item                       try-store: the slot is free, nobody reads it yet
/// hdr->current = cur + 8            commit
/// ```
///
/// # Safety
///
/// As for [`slab_push`], for the header `base + (c << SHIFT)` of every CPU `c < len`,
/// whose lock holders set `end` to 0 (and fence the CPU) before they write the header or
/// its entries, and release it with a release store.
#[inline(always)]
pub(crate) unsafe fn slab_push_on_current_cpu<const SHIFT: u32>(
    rseq: *mut Rseq,
    base: *mut u8,
    len: usize,
    item: usize,
) -> Outcome {
    // SAFETY: as in `slab_push`.
    unsafe {
        asm!(
            rseq_start_on_current_cpu!(),
            "add {tmp}, {slot}, #8",
            "ldar {val}, [{tmp}]",
            // Test builds: a second delay, between the two loads whose order matters.
            rseq_test_delay!(),
            "ldr {tmp}, [{slot}]",
            "cmp {tmp}, {val}",
            "b.hs {fail}",
            "str {item}, [{tmp}]",
            "add {tmp}, {tmp}, #8",
            "str {tmp}, [{slot}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            base = in(reg) base,
            len = in(reg) len,
            shift = const SHIFT,
            item = in(reg) item,
            cpu = out(reg) _,
            slot = out(reg) _,
            tmp = out(reg) _,
            val = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// [`slab_pop`] on the slab of the CPU the thread runs on (header, CPU and lock as in
/// [`slab_push_on_current_cpu`]: a locked header's `begin` is `usize::MAX`, loaded
/// first, with acquire).
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// cpu = rseq->cpu_id
/// if cpu >= len: abort (moved)
/// hdr = base + (cpu << SHIFT)
/// begin = hdr->begin                load-acquire; usize::MAX while the slab is locked
/// cur = hdr->current
/// if cur <= begin: compare failed (empty, or locked)
/// item = *(cur - 8)                 load (into a local of this function)
/// hdr->current = cur - 8            commit
/// ```
///
/// # Safety
///
/// As for [`slab_push_on_current_cpu`] (its lock holders also set `begin` to
/// `usize::MAX`).
#[inline(always)]
pub(crate) unsafe fn slab_pop_on_current_cpu<const SHIFT: u32>(
    rseq: *mut Rseq,
    base: *mut u8,
    len: usize,
) -> Outcome<usize> {
    let mut item: usize = 0;
    // SAFETY: as in `slab_pop`; the store before the commit goes to the local `item` only.
    unsafe {
        asm!(
            rseq_start_on_current_cpu!(),
            "add {tmp}, {slot}, #16",
            "ldar {val}, [{tmp}]",
            // Test builds: a second delay, between the two loads whose order matters.
            rseq_test_delay!(),
            "ldr {tmp}, [{slot}]",
            "cmp {tmp}, {val}",
            "b.ls {fail}",
            "ldr {val}, [{tmp}, #-8]",
            "str {val}, [{out}]",
            "sub {tmp}, {tmp}, #8",
            "str {tmp}, [{slot}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            base = in(reg) base,
            len = in(reg) len,
            shift = const SHIFT,
            out = in(reg) &mut item,
            cpu = out(reg) _,
            slot = out(reg) _,
            tmp = out(reg) _,
            val = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(item)
}

/// Guarded buffer move: `if *guard == 0 && *v == expect { memcpy(dst, src, len); *v =
/// newv }`, for moving a batch of slab slots in or out in one section.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *guard != 0: abort             load-acquire; the slab is locked (by a remote owner)
/// if *v != expect: compare failed
/// memcpy(dst, src, len)             byte loop: tentative, restartable mid-copy
/// *v = newv                         commit, release
/// ```
///
/// # Safety
///
/// As for [`compare_memcpy_store_release`], and `guard` is readable.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn compare_memcpy_store_guarded(
    rseq: *mut Rseq,
    guard: *const usize,
    v: *mut usize,
    expect: usize,
    dst: *mut u8,
    src: *const u8,
    len: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    // SAFETY: as in `compare_memcpy_store_release`; the guard is only read.
    unsafe {
        asm!(
            rseq_start!(),
            "ldar {tmp}, [{guard}]",
            "cbnz {tmp}, {moved}",
            "ldr {tmp}, [{v}]",
            "cmp {tmp}, {expect}",
            "b.ne {fail}",
            "cbz {len}, 10f",
            "9:",
            "ldrb {tmp:w}, [{src}], #1",
            "strb {tmp:w}, [{dst}], #1",
            "subs {len}, {len}, #1",
            "b.ne 9b",
            "10:",
            "stlr {newv}, [{v}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            v = in(reg) v,
            expect = in(reg) expect,
            newv = in(reg) newv,
            dst = inout(reg) dst => _,
            src = inout(reg) src => _,
            len = inout(reg) len => _,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// Test builds only: a deliberately *broken* slab pop — the loads, the delay and the
/// store of [`slab_pop`] with no critical section armed, so two threads preempted on
/// one CPU can take the same item. Exists so the allocator's stress test can show it
/// catches a broken sequence.
///
/// # Safety
///
/// As for [`slab_pop`].
#[cfg(any(test, feature = "__test-hooks"))]
#[inline(always)]
pub(crate) unsafe fn slab_pop_without_restart(
    rseq: *mut Rseq,
    guard: *const usize,
    hdr: *mut usize,
    cpu: u32,
) -> Outcome<usize> {
    let mut item: usize = 0;
    // SAFETY: the same loads and stores as `slab_pop`; it is the atomicity that is
    // missing, on purpose, and the callers are tests that detect double issues.
    unsafe {
        asm!(
            "ldr {val:w}, [{rseq}, #4]",
            "cmp {val:w}, {cpu:w}",
            "b.ne {moved}",
            "ldar {val}, [{guard}]",
            "cbnz {val}, {moved}",
            "ldr {val}, [{hdr}]",
            "ldr {item}, [{hdr}, #16]",
            "cmp {val}, {item}",
            "b.ls {fail}",
            "ldr {item}, [{val}, #-8]",
            rseq_test_delay!(),
            "str {item}, [{out}]",
            "sub {val}, {val}, #8",
            "str {val}, [{hdr}]",
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            hdr = in(reg) hdr,
            out = in(reg) &mut item,
            val = out(reg) _,
            item = out(reg) _,
            tmp = out(reg) _,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            options(nostack),
        );
    }
    Outcome::Committed(item)
}

/// `*(base + (cpu << SHIFT)) += count`, where `cpu` is the CPU the thread runs on,
/// read from `cpu_id` inside the same asm block, once its section is open.
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// cpu = rseq->cpu_id
/// if cpu >= len: abort (moved)
/// slot = base + (cpu << SHIFT)
/// tmp = *slot
/// tmp += count
/// *slot = tmp                       commit
/// ```
///
/// # Safety
///
/// 1. `rseq` is the calling thread's registered area, or a refusing area of the calling
///    thread or of the process (`thread::area_or_refusing`: writable, 32-byte aligned, its
///    `cpu_id` beyond every `len`), on which the sequence stores `rseq_cs` and leaves
///    (moved) before its commit.
/// 2. For every `c < len`, `base + (c << SHIFT)` is valid for reads and writes of a
///    `usize`, aligned, and every other write to it is made by a sequence that runs on
///    `c` (or under a lock that excludes them). A CPU at or beyond `len` aborts (moved)
///    before any store.
#[inline(always)]
pub(crate) unsafe fn add_on_current_cpu<const SHIFT: u32>(
    rseq: *mut Rseq,
    base: *mut u8,
    len: usize,
    count: usize,
) -> Outcome {
    // SAFETY: (1) descriptor, signature and labels follow the layout of `arch/mod.rs`;
    // (2) the only store is the commit, to the slot of the CPU read, which the caller
    // vouches for; the kernel restarts the section rather than let it finish elsewhere.
    unsafe {
        asm!(
            rseq_start_on_current_cpu!(),
            "ldr {tmp}, [{slot}]",
            "add {tmp}, {tmp}, {count}",
            "str {tmp}, [{slot}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            base = in(reg) base,
            len = in(reg) len,
            shift = const SHIFT,
            count = in(reg) count,
            cpu = out(reg) _,
            slot = out(reg) _,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// [`add_on_current_cpu`] with a compile-time count (at most `i32::MAX`, as on x86_64).
/// aarch64 adds in a register either way (load, add, store), so the count is simply
/// passed in one.
///
/// # Safety
///
/// As for [`add_on_current_cpu`].
#[inline(always)]
pub(crate) unsafe fn add_const_on_current_cpu<const SHIFT: u32, const COUNT: u32>(
    rseq: *mut Rseq,
    base: *mut u8,
    len: usize,
) -> Outcome {
    const {
        assert!(
            COUNT <= i32::MAX as u32,
            "the count must fit in an i32 immediate"
        )
    };
    // SAFETY: the caller's contract, which is `add_on_current_cpu`'s.
    unsafe { add_on_current_cpu::<SHIFT>(rseq, base, len, COUNT as usize) }
}

/// Guarded list push on the CPU the thread runs on: the slot is
/// `table.base + (cpu << SHIFT)`, and its word `HEAD` bytes into it is the list head, or,
/// when odd, the token of the holder of the CPU's lock (a remote owner).
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// base, len = table.base, table.len  ldp
/// cpu = rseq->cpu_id
/// if cpu >= len: abort (moved)
/// slot = base + (cpu << SHIFT)
/// head = slot.head                   ldar
/// if head is odd: abort (moved)      the CPU's lock is held
/// *node = head                       tentative: the node is still the caller's
/// slot.head = node                   commit
/// ```
///
/// The head is read with `ldar`, as the guard of [`compare_store_guarded`] is: a
/// holder's release (`stlr`) and everything it wrote before are seen together. It is
/// read inside the section, so no compare is needed.
///
/// # Safety
///
/// As for [`add_on_current_cpu`] for the head word of every slot of `table` (valid for
/// reads, and not written while the sequence runs), and: `node` is valid for a `usize`
/// write, even, and nobody reads it as a list link before seeing the commit.
#[inline(always)]
pub(crate) unsafe fn push_guarded_on_current_cpu<const SHIFT: u32, const HEAD: i32>(
    rseq: *mut Rseq,
    table: *const crate::pool::SlotTable,
    node: *mut usize,
) -> Outcome {
    // SAFETY: as in `add_on_current_cpu`; the store before the commit goes to `node`,
    // which is invisible as a link until the commit publishes it.
    unsafe {
        asm!(
            rseq_start_on_current_cpu_table!(),
            "add {tmp}, {slot}, #{head}",
            "ldar {tmp}, [{tmp}]",
            "tst {tmp}, #1",
            "b.ne {moved}",
            "str {tmp}, [{node}]",
            "str {node}, [{slot}, #{head}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            table = in(reg) table,
            base = out(reg) _,
            len = out(reg) _,
            shift = const SHIFT,
            head = const HEAD,
            node = in(reg) node,
            cpu = out(reg) _,
            slot = out(reg) _,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(())
}

/// Guarded list pop on the CPU the thread runs on (slot layout as for
/// [`push_guarded_on_current_cpu`]; a node's link is `NEXT` bytes into it).
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// base, len = table.base, table.len  ldp
/// cpu = rseq->cpu_id
/// if cpu >= len: abort (moved)
/// slot = base + (cpu << SHIFT)
/// head = slot.head                   ldar
/// if head == 0: compare failed       the list is empty
/// if head is odd: abort (moved)      the CPU's lock is held
/// slot.head = *(head + NEXT)         commit
/// ```
///
/// # Safety
///
/// As for [`push_guarded_on_current_cpu`], and: every non-zero even head is an address
/// at which `NEXT` bytes further a `usize` is readable.
#[inline(always)]
pub(crate) unsafe fn pop_guarded_on_current_cpu<
    const SHIFT: u32,
    const HEAD: i32,
    const NEXT: i32,
>(
    rseq: *mut Rseq,
    table: *const crate::pool::SlotTable,
) -> Outcome<usize> {
    let mut head: usize = 0;
    // SAFETY: as in `add_on_current_cpu`; the store before the commit goes to the local
    // `head` only, which no other thread can see.
    unsafe {
        asm!(
            rseq_start_on_current_cpu_table!(),
            "add {tmp}, {slot}, #{head_off}",
            "ldar {tmp}, [{tmp}]",
            "cbz {tmp}, {empty}",
            "tst {tmp}, #1",
            "b.ne {moved}",
            "str {tmp}, [{out}]",
            "ldr {tmp}, [{tmp}, #{next}]",
            "str {tmp}, [{slot}, #{head_off}]",
            rseq_end!(),
            rseq = in(reg) rseq,
            table = in(reg) table,
            base = out(reg) _,
            len = out(reg) _,
            shift = const SHIFT,
            head_off = const HEAD,
            next = const NEXT,
            out = in(reg) &mut head,
            cpu = out(reg) _,
            slot = out(reg) _,
            tmp = out(reg) _,
            // A linker veneer for `b {abort}` (see the module docs) may use these.
            out("x16") _,
            out("x17") _,
            sig = const RSEQ_SIG,
            empty = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(nostack),
        );
    }
    Outcome::Committed(head)
}

/// Test builds only: a deliberately *broken* add — load, delay, add, store, with no
/// critical section armed, so a preemption or signal between the load and the store
/// loses updates. Exists so the stress tests can show they catch a broken sequence.
///
/// # Safety
///
/// As for [`add`].
#[cfg(any(test, feature = "__test-hooks"))]
#[inline(always)]
pub(crate) unsafe fn add_without_restart(
    rseq: *mut Rseq,
    v: *mut usize,
    count: usize,
    cpu: u32,
) -> Outcome {
    // SAFETY: writes only `v`, as `add` does; it is the atomicity that is missing, on
    // purpose, and the callers are tests that count the losses.
    unsafe {
        asm!(
            "ldr {val:w}, [{rseq}, #4]",
            "cmp {val:w}, {cpu:w}",
            "b.ne {moved}",
            "ldr {val}, [{v}]",
            rseq_test_delay!(),
            "add {val}, {val}, {count}",
            "str {val}, [{v}]",
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            count = in(reg) count,
            val = out(reg) _,
            tmp = out(reg) _,
            moved = label { return Outcome::Aborted; },
            options(nostack),
        );
    }
    Outcome::Committed(())
}
