//! x86_64 restartable sequences (AT&T syntax).
//!
//! Register use: `{rseq}` holds the thread's `struct rseq`, `{cpu}` the CPU the caller
//! read from `cpu_id_start` (the `*_on_current_cpu` sequences read `cpu_id` themselves,
//! once their section is open, into `{slot}`, which they turn into the slot's address);
//! `{tmp}` is scratch. The signature is the 4-byte immediate
//! of `ud1 0x53053053(%rip), %edi` (`0f b9 3d` + imm32), so a stray jump into it traps
//! instead of running data. Every store on x86_64 is a release store (TSO), so the
//! `*_release` commits are plain `mov`s.

use core::arch::asm;

use super::Outcome;
use crate::abi::{Rseq, RSEQ_SIG};

/// x86_64 has sequences.
pub(crate) const HAS_RSEQ: bool = true;

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
/// The descriptor is stored every time. Comparing `rseq_cs` with it first, inside the
/// section, and storing only when they differ (the kernel clears the field whenever it
/// preempts or signals the thread outside a section, so a match means it is armed)
/// measured slower on Zen 4 (`cpulocal bench`, five interleaved rounds, fastest runs):
/// `Counter::add` 0.78 → 0.83 ns, `with_cpu` 1.69 → 1.75 ns, `Stack` push+pop
/// 1.93 → 3.01 ns (a push and a pop have two descriptors, so each one then stores out
/// of line and jumps back).
///
/// Operands used: `{rseq}`, `{tmp}`.
macro_rules! rseq_arm {
    () => {
        concat!("leaq 3b(%rip), {tmp}\n", "movq {tmp}, 8({rseq})\n", "4:\n")
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
            "cmpl {cpu:e}, ",
            $field,
            "({rseq})\n",
            "jnz {moved}\n",
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
/// `cpu_id` into `{slot}`, leaves for `{moved}` (or the label given) unless it is below
/// `{len}` (a compare of two registers: the table's bound never rests on the kernel
/// alone), and turns it into `{base} + (cpu << {shift})` in place (one register: the
/// commit then addresses `({slot})`). In place rather than copied to a second register
/// first: one instruction fewer, and `Counter::add` inlined in a loop went from 0.78 to
/// 0.74 ns, `Counter::inc` from 0.73 to 0.69 ns (Zen 4, five interleaved rounds, both
/// builds with 64-byte aligned functions; `Stack` and the other shapes unchanged).
///
/// The CPU is read once, after the section opens, so it needs no check against a second
/// read (as the sequences given a CPU do): from label `4` on, a migration restarts the
/// section. `cpu_id`, not `cpu_id_start`: a registered area's `cpu_id` is a CPU, and
/// anything else fails the bound: `u32::MAX` in a refusing area (see
/// `thread::area_or_refusing`) or in an unregistered one. One load
/// and one compare fewer than reading `cpu_id_start` first: a `Stack` push+pop went
/// from 4.3x-4.5x to 4.0x-4.2x the `tls_add` floor in three interleaved runs;
/// `Counter::add` from 1.50x-1.59x to 1.43x-1.44x in two of them (the third, noisier,
/// showed no change).
///
/// Operands used: `{rseq}`, `{base}`, `{len}`, `{shift}` (a `const`), `{slot}`, `{tmp}`,
/// and `{moved}` unless another label is given. The bound and the first slot may also be
/// given as other operand texts ([`rseq_start_on_current_cpu_table!`]).
macro_rules! rseq_start_on_current_cpu {
    () => {
        rseq_start_on_current_cpu!("{moved}")
    };
    ($beyond:literal) => {
        rseq_start_on_current_cpu!($beyond, "{len}", "{base}")
    };
    ($beyond:literal, $len:literal, $base:literal) => {
        concat!(
            rseq_descriptor!(),
            rseq_arm!(),
            "movl 4({rseq}), {slot:e}\n",
            "cmpq ",
            $len,
            ", {slot}\n",
            "jae ",
            $beyond,
            "\n",
            "shlq ${shift}, {slot}\n",
            "addq ",
            $base,
            ", {slot}\n",
            rseq_test_delay!(),
        )
    };
}

/// [`rseq_start_on_current_cpu!`] with the table in memory: `{table}` points to a
/// [`SlotTable`](crate::pool::SlotTable) (first slot, then slot count), which the bound
/// check and the address computation take as memory operands, so nothing unpacks it
/// (see `SlotTable` for the figures). Leaves for the label given (`$beyond`) when the CPU
/// is not below the count.
///
/// Operands used: `{rseq}`, `{table}`, `{shift}` (a `const`), `{slot}`, `{tmp}`.
macro_rules! rseq_start_on_current_cpu_table {
    ($beyond:literal) => {
        rseq_start_on_current_cpu!($beyond, "8({table})", "({table})")
    };
}

/// Test builds only: spins `CPULOCAL_TEST_DELAY_LOOPS` times inside the section, right
/// after the CPU check, so that preemption, migration and signals land inside it and
/// the abort path really runs (see [`crate::test_hooks`]). Uses `{tmp}`.
#[cfg(any(test, feature = "__test-hooks"))]
macro_rules! rseq_test_delay {
    () => {
        concat!(
            "movq CPULOCAL_TEST_DELAY_LOOPS(%rip), {tmp}\n",
            "7:\n",
            "testq {tmp}, {tmp}\n",
            "jz 8f\n",
            "pause\n",
            "decq {tmp}\n",
            "jmp 7b\n",
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
            ".byte 0x0f, 0xb9, 0x3d\n",
            ".long {sig}\n",
            "6:\n",
            "jmp {abort}\n",
            ".popsection\n",
        )
    };
}

/// The thread pointer: `%fs:0` holds the TCB's own address on x86_64 Linux.
#[inline(always)]
pub(crate) fn thread_pointer() -> *mut u8 {
    let tp: *mut u8;
    // SAFETY: the x86_64 TLS ABI stores the thread control block's address in its first
    // word, reachable through %fs in every thread; reading it has no side effect.
    unsafe {
        asm!("movq %fs:0, {tp}", tp = out(reg) tp,
             options(att_syntax, nostack, preserves_flags, readonly, pure))
    };
    tp
}

/// `*v += count` on `cpu`.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// tmp = *v + count
/// *v = tmp                          commit (a plain store, no lock)
/// ```
///
/// Why a load, an add and a store rather than `addq {count}, (v)`: on an Emerald Rapids
/// Xeon (Golden Cove-class cores) an add to memory with a *register* source, or with an
/// indexed address, waits out the store-to-load forwarding latency when the same word
/// is added to back to back: 2.4 ns an add in a C loop of each form on a VM of that CPU,
/// where the three instructions, or `addq $1, (v)`, take 0.35 ns. AMD Zen 3 runs every
/// form at one add per cycle.
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
    // the add is atomic with respect to every sequence on `cpu`.
    // SAFETY: (1) descriptor, signature and labels follow the layout of `arch/mod.rs`;
    // (2) the only store is the commit, to `v`, which the caller vouches for.
    unsafe {
        asm!(
            rseq_start!(),
            "movq ({v}), {tmp}",
            "addq {count}, {tmp}",
            "movq {tmp}, ({v})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            count = in(reg) count,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
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
/// `PerCpu`'s lock reads `cpu_id_start` before the section and hands the CPU in, unlike
/// `Counter` and `Stack`, whose sequences read `cpu_id` inside
/// ([`rseq_start_on_current_cpu!`]). A lock sequence of that form, returning the slot in
/// a register, measured 1.70 → 1.70 ns for `with_cpu` and 1.37 → 1.65 ns for the bare
/// lock and release (`with_cpu unchecked`) on Zen 4, in seven interleaved rounds.
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
    // SAFETY: as in `add`; the compare jumps out of the section before any store.
    unsafe {
        asm!(
            rseq_start!("{index_field}"),
            "cmpq {expect}, ({v})",
            "jnz {fail}",
            "movq {newv}, ({v})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            expect = in(reg) expect,
            newv = in(reg) newv,
            tmp = out(reg) _,
            index_field = const INDEX_FIELD,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
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
            "movq ({v}), {tmp}",
            "cmpq {tmp}, {expect_not}",
            "jz {fail}",
            "movq {tmp}, ({head})",
            "movq ({tmp}, {offset}), {tmp}",
            "movq {tmp}, ({v})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            expect_not = in(reg) expect_not,
            offset = in(reg) offset,
            head = in(reg) &mut head,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
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
/// *v = newv                         commit, release (orders the try-store before it)
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
    // publishes it (the caller's contract), and TSO keeps it before the commit.
    unsafe {
        asm!(
            rseq_start!(),
            "cmpq {expect}, ({v})",
            "jnz {fail}",
            "movq {newv2}, ({v2})",
            "movq {newv}, ({v})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            expect = in(reg) expect,
            v2 = in(reg) v2,
            newv2 = in(reg) newv2,
            newv = in(reg) newv,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(())
}

/// Buffer push: `if *v == expect { memcpy(dst, src, len); *v = newv (release) }`.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *v != expect: compare failed
/// memcpy(dst, src, len)             rep movsb: tentative, restartable mid-copy
/// *v = newv                         commit, release
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
    // SAFETY: as in `add`; `rep movsb` writes only `dst..dst+len` (the caller's
    // contract) and, if interrupted, leaves the instruction pointer inside the
    // section, so the kernel aborts it and the commit never runs.
    unsafe {
        asm!(
            rseq_start!(),
            "cmpq {expect}, ({v})",
            "jnz {fail}",
            "rep movsb",
            "movq {newv}, ({v})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            expect = in(reg) expect,
            newv = in(reg) newv,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") len => _,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(())
}

/// Guarded compare-and-store: `if *guard == 0 && *v == expect { *v = newv }`.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *guard != 0: abort             the CPU's lock is held (by a remote owner)
/// if *v != expect: compare failed
/// *v = newv                         commit
/// ```
///
/// The guard is the CPU's lock word: a remote owner sets it, then fences with
/// `membarrier(PRIVATE_EXPEDITED_RSEQ)`, so every sequence that read it as free either
/// committed before the fence or restarts and sees it taken.
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
            "cmpq $0, ({guard})",
            "jnz {moved}",
            "cmpq {expect}, ({v})",
            "jnz {fail}",
            "movq {newv}, ({v})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            v = in(reg) v,
            expect = in(reg) expect,
            newv = in(reg) newv,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
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
/// if *guard != 0: abort             the CPU's slab is locked (by a remote owner)
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
            "cmpq $0, ({guard})",
            "jnz {moved}",
            "movq ({hdr}), {tmp}",
            "cmpq 8({hdr}), {tmp}",
            "jae {fail}",
            "movq {item}, ({tmp})",
            "addq $8, {tmp}",
            "movq {tmp}, ({hdr})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            hdr = in(reg) hdr,
            item = in(reg) item,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(())
}

/// `item` after a CPU beyond the table (the exits of [`slab_pop_on_current_cpu`]): the
/// three highest `usize` values, which no pointer has (user addresses are below 2^57,
/// and a dangling pointer to a zero-sized `T` is its alignment, at most 2^29).
const SLAB_POP_MOVED: usize = usize::MAX;
/// `item` after the kernel restarted the section.
const SLAB_POP_KERNEL_ABORT: usize = usize::MAX - 1;
/// `item` when the array is empty, or its header locked.
const SLAB_POP_EMPTY: usize = usize::MAX - 2;

/// Closes a section whose result comes back in a register (`$result`, e.g. `"{item}"`):
/// label `5` after the commit, and in `__rseq_failure` the exits that set it to the
/// `const` operand `{moved}` (label `12`), `{empty}` (label `13`, when asked for) or,
/// after the signature, `{kernel_abort}` (the abort label `6`); all leave by label `14`,
/// the end of the block. The `const`s are sign-extended 32-bit immediates (`movq`).
///
/// Operands used: the result register, `{moved}`, `{kernel_abort}`, `{empty}` (with the
/// `with_empty` arm), `{sig}`.
macro_rules! result_in_register_exits {
    ($result:literal) => {
        result_in_register_exits!($result, "")
    };
    ($result:literal, with_empty) => {
        result_in_register_exits!(
            $result,
            concat!("13:\n", "movq ${empty}, ", $result, "\n", "jmp 14f\n")
        )
    };
    ($result:literal, $empty_exit:expr) => {
        concat!(
            "5:\n",
            ".pushsection __rseq_failure, \"ax\"\n",
            "12:\n",
            "movq ${moved}, ",
            $result,
            "\n",
            "jmp 14f\n",
            $empty_exit,
            ".byte 0x0f, 0xb9, 0x3d\n",
            ".long {sig}\n",
            "6:\n",
            "movq ${kernel_abort}, ",
            $result,
            "\n",
            "jmp 14f\n",
            ".popsection\n",
            "14:\n",
        )
    };
}

/// The outcome of a slab pop from its `{item}` register.
#[inline(always)]
fn slab_pop_outcome(item: usize) -> Outcome<usize> {
    // One compare for the usual case.
    if item < SLAB_POP_EMPTY {
        return Outcome::Committed(item);
    }
    match item {
        SLAB_POP_KERNEL_ABORT => {
            super::note_kernel_abort();
            Outcome::Aborted
        }
        SLAB_POP_EMPTY => Outcome::CompareFailed,
        _ => Outcome::Aborted,
    }
}

/// Slab pop: takes the item below `current` of a per-CPU slab array, unless the array
/// is empty or the CPU's slab is locked. Header layout as in [`slab_push`].
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *guard != 0: abort             the CPU's slab is locked (by a remote owner)
/// cur = hdr->current
/// if cur <= hdr->begin: compare failed (empty)
/// item = *(cur - 8)                 load (into a local of the caller)
/// hdr->current = cur - 8            commit
/// ```
///
/// Any value can be an item here (the public `ops::slab_pop` takes any `usize`), so
/// the item goes through memory; the allocator's fast path,
/// [`slab_pop_on_current_cpu`], returns pointers in a register.
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
            "cmpq $0, ({guard})",
            "jnz {moved}",
            "movq ({hdr}), {tmp}",
            "cmpq 16({hdr}), {tmp}",
            "jbe {fail}",
            "movq -8({tmp}), {val}",
            "movq {val}, ({out})",
            "subq $8, {tmp}",
            "movq {tmp}, ({hdr})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            hdr = in(reg) hdr,
            out = in(reg) &mut item,
            tmp = out(reg) _,
            val = out(reg) _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(item)
}

/// [`slab_push`] on the slab of the CPU the thread runs on: the header is
/// `base + (cpu << SHIFT)`, and the sequence reads the CPU itself, once its section is
/// open (as [`add_on_current_cpu`] does). It reads no guard: a locked slab's header has
/// `end` 0, so the bound check fails; `end` is loaded before `current`, so that a
/// header unlocked meanwhile is seen with the `current` its lock holder left.
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// cpu = rseq->cpu_id
/// if cpu >= len: abort (moved)
/// hdr = base + (cpu << SHIFT)
/// end = hdr->end                    0 while the slab is locked (by a remote owner)
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
/// its entries.
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
            "movq 8({slot}), {end}",
            // Test builds: a second delay, between the two loads whose order matters.
            rseq_test_delay!(),
            "movq ({slot}), {tmp}",
            "cmpq {end}, {tmp}",
            "jae {fail}",
            "movq {item}, ({tmp})",
            "addq $8, {tmp}",
            "movq {tmp}, ({slot})",
            rseq_end!(),
            rseq = in(reg) rseq,
            base = in(reg) base,
            len = in(reg) len,
            shift = const SHIFT,
            item = in(reg) item,
            slot = out(reg) _,
            end = out(reg) _,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(())
}

/// [`slab_pop`] on the slab of the CPU the thread runs on (header, CPU and lock as in
/// [`slab_push_on_current_cpu`]: a locked header's `begin` is `usize::MAX`, loaded
/// before `current`).
///
/// The item comes back in a register, as [`pop_guarded_on_current_cpu`]'s head does:
/// the exits other than the commit set it to one of the three highest `usize` values,
/// which no pointer has. Through memory, it cost a store and a load on every
/// allocation, on the chain from a free to the next allocation.
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// cpu = rseq->cpu_id
/// if cpu >= len: item = MOVED, out
/// hdr = base + (cpu << SHIFT)
/// begin = hdr->begin                usize::MAX while the slab is locked
/// cur = hdr->current
/// if cur <= begin: item = EMPTY, out (empty, or locked)
/// item = *(cur - 8)
/// hdr->current = cur - 8            commit
/// abort (label 6): item = KERNEL_ABORT, out
/// ```
///
/// # Safety
///
/// As for [`slab_push_on_current_cpu`] (its lock holders also set `begin` to
/// `usize::MAX`), and every item in the arrays is a pointer: none is one of the three
/// highest `usize` values ([`SLAB_POP_MOVED`] and the others).
#[inline(always)]
pub(crate) unsafe fn slab_pop_on_current_cpu<const SHIFT: u32>(
    rseq: *mut Rseq,
    base: *mut u8,
    len: usize,
) -> Outcome<usize> {
    let item: usize;
    // SAFETY: as in `slab_pop`.
    unsafe {
        asm!(
            rseq_start_on_current_cpu!("12f"),
            "movq 16({slot}), {begin}",
            // Test builds: a second delay, between the two loads whose order matters.
            rseq_test_delay!(),
            "movq ({slot}), {tmp}",
            "cmpq {begin}, {tmp}",
            "jbe 13f",
            "movq -8({tmp}), {item}",
            "subq $8, {tmp}",
            "movq {tmp}, ({slot})",
            result_in_register_exits!("{item}", with_empty),
            rseq = in(reg) rseq,
            base = in(reg) base,
            len = in(reg) len,
            shift = const SHIFT,
            moved = const SLAB_POP_MOVED as isize,
            empty = const SLAB_POP_EMPTY as isize,
            kernel_abort = const SLAB_POP_KERNEL_ABORT as isize,
            item = out(reg) item,
            slot = out(reg) _,
            begin = out(reg) _,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            options(att_syntax, nostack),
        );
    }
    slab_pop_outcome(item)
}

/// Guarded buffer move: `if *guard == 0 && *v == expect { memcpy(dst, src, len); *v =
/// newv }`, for moving a batch of slab slots in or out in one section.
///
/// ```text
/// if rseq->cpu_id != cpu: abort
/// if *guard != 0: abort             the CPU's slab is locked (by a remote owner)
/// if *v != expect: compare failed
/// memcpy(dst, src, len)             rep movsb: tentative, restartable mid-copy
/// *v = newv                         commit
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
            "cmpq $0, ({guard})",
            "jnz {moved}",
            "cmpq {expect}, ({v})",
            "jnz {fail}",
            "rep movsb",
            "movq {newv}, ({v})",
            rseq_end!(),
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            guard = in(reg) guard,
            v = in(reg) v,
            expect = in(reg) expect,
            newv = in(reg) newv,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") len => _,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            fail = label { return Outcome::CompareFailed; },
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
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
            "cmpl {cpu:e}, 4({rseq})",
            "jnz {moved}",
            "cmpq $0, ({guard})",
            "jnz {moved}",
            "movq ({hdr}), {val}",
            "cmpq 16({hdr}), {val}",
            "jbe {fail}",
            "movq -8({val}), {item}",
            rseq_test_delay!(),
            "movq {item}, ({out})",
            "subq $8, {val}",
            "movq {val}, ({hdr})",
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
            options(att_syntax, nostack),
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
/// tmp = *slot + count
/// *slot = tmp                       commit (a plain store, no lock)
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
            // A load, add and store, not `addq {count}, ({slot})`: see `add`.
            "movq ({slot}), {tmp}",
            "addq {count}, {tmp}",
            "movq {tmp}, ({slot})",
            rseq_end!(),
            rseq = in(reg) rseq,
            base = in(reg) base,
            len = in(reg) len,
            shift = const SHIFT,
            count = in(reg) count,
            slot = out(reg) _,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(())
}

/// [`add_on_current_cpu`] with a compile-time count (at most `i32::MAX`, checked at
/// compile time): the commit is `addq $COUNT,
/// (slot)`, an immediate added to a base-register address (the form some Intel cores
/// forward fastest, and one register fewer).
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
    // `addq` sign-extends a 32-bit immediate.
    const {
        assert!(
            COUNT <= i32::MAX as u32,
            "the count must fit in an i32 immediate"
        )
    };
    // SAFETY: as in `add_on_current_cpu`.
    unsafe {
        asm!(
            rseq_start_on_current_cpu!(),
            "addq ${count}, ({slot})",
            rseq_end!(),
            rseq = in(reg) rseq,
            base = in(reg) base,
            len = in(reg) len,
            shift = const SHIFT,
            count = const COUNT,
            slot = out(reg) _,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(())
}

/// Guarded list push on the CPU the thread runs on: the slot is
/// `table.base + (cpu << SHIFT)`, and its word `HEAD` bytes into it is the list head, or,
/// when odd, the token of the holder of the CPU's lock (a remote owner).
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// cpu = rseq->cpu_id
/// if cpu >= table.len: abort (moved)
/// slot = table.base + (cpu << SHIFT)
/// head = slot.head
/// if head is odd: abort (moved)      the CPU's lock is held
/// *node = head                       tentative: the node is still the caller's
/// slot.head = node                   commit
/// ```
///
/// The head is read inside the section, so no compare is needed: nothing else on this
/// CPU can change it before the commit without restarting the section, and a remote
/// owner's exchange is followed by a fence that restarts it (see `remote::lock`).
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
            rseq_start_on_current_cpu_table!("{moved}"),
            "movq {head}({slot}), {tmp}",
            "testb $1, {tmp:l}",
            "jnz {moved}",
            "movq {tmp}, ({node})",
            "movq {node}, {head}({slot})",
            rseq_end!(),
            rseq = in(reg) rseq,
            table = in(reg) table,
            shift = const SHIFT,
            head = const HEAD,
            node = in(reg) node,
            slot = out(reg) _,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            moved = label { return Outcome::Aborted; },
            abort = label {
                super::note_kernel_abort();
                return Outcome::Aborted;
            },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(())
}

/// Guarded list pop on the CPU the thread runs on (slot layout as for
/// [`push_guarded_on_current_cpu`]; a node's link is `NEXT` bytes into it).
///
/// ```text
/// rseq->rseq_cs = descriptor         the section opens
/// cpu = rseq->cpu_id
/// if cpu >= table.len: head = MOVED, out
/// slot = table.base + (cpu << SHIFT)
/// head = slot.head
/// if head == 0: out                  the list is empty
/// if head is odd: head = MOVED, out  the CPU's lock is held
/// slot.head = *(head + NEXT)         commit
/// abort (label 6): head = KERNEL_ABORT, out
/// ```
///
/// Free of ABA on the CPU: no other sequence there can run between the load of `head`
/// and the commit without restarting this one.
///
/// Like [`slab_pop_on_current_cpu`], this one returns its result in a register (`asm!` cannot
/// combine outputs with Rust labels): the moved and abort exits set `head` to values no
/// node can have (nodes are at least 8-byte aligned) and leave through the end of the
/// block, so the popped node never goes through memory.
///
/// # Safety
///
/// As for [`push_guarded_on_current_cpu`], and: every non-zero even head is an address
/// at which `NEXT` bytes further a `usize` is readable, and is at least 4-byte aligned.
#[inline(always)]
pub(crate) unsafe fn pop_guarded_on_current_cpu<
    const SHIFT: u32,
    const HEAD: i32,
    const NEXT: i32,
>(
    rseq: *mut Rseq,
    table: *const crate::pool::SlotTable,
) -> Outcome<usize> {
    /// `head` after a CPU mismatch or a held lock.
    const MOVED: usize = 1;
    /// `head` after the kernel restarted the section.
    const KERNEL_ABORT: usize = 2;
    let head: usize;
    // SAFETY: descriptor, signature and labels as in `arch/mod.rs` (label 6 leaves by
    // label 14); the only store is the commit, to the slot head the caller vouches for.
    unsafe {
        asm!(
            rseq_start_on_current_cpu_table!("12f"),
            "movq {head_off}({slot}), {head}",
            "testq {head}, {head}",
            "jz 14f",
            "testb $1, {head:l}",
            "jnz 12f",
            "movq {next}({head}), {tmp}",
            "movq {tmp}, {head_off}({slot})",
            result_in_register_exits!("{head}"),
            rseq = in(reg) rseq,
            table = in(reg) table,
            shift = const SHIFT,
            head_off = const HEAD,
            next = const NEXT,
            moved = const MOVED,
            kernel_abort = const KERNEL_ABORT,
            head = out(reg) head,
            slot = out(reg) _,
            tmp = out(reg) _,
            sig = const RSEQ_SIG,
            options(att_syntax, nostack),
        );
    }
    // One compare for the usual case.
    if head > KERNEL_ABORT {
        return Outcome::Committed(head);
    }
    match head {
        0 => Outcome::CompareFailed,
        MOVED => Outcome::Aborted,
        _ => {
            super::note_kernel_abort();
            Outcome::Aborted
        }
    }
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
            "cmpl {cpu:e}, 4({rseq})",
            "jnz {moved}",
            "movq ({v}), {val}",
            rseq_test_delay!(),
            "addq {count}, {val}",
            "movq {val}, ({v})",
            rseq = in(reg) rseq,
            cpu = in(reg) cpu,
            v = in(reg) v,
            count = in(reg) count,
            val = out(reg) _,
            tmp = out(reg) _,
            moved = label { return Outcome::Aborted; },
            options(att_syntax, nostack),
        );
    }
    Outcome::Committed(())
}
