//! The sequences of this architecture, run directly on a fake `struct rseq`.
//!
//! The fake area is never registered, so the kernel never reads it and never restarts a
//! sequence: every outcome is decided by the values the tests put in it and in the
//! target words. That makes each path of each primitive (commit, compare failure, CPU
//! mismatch) deterministic, and it works where the rseq syscall does not exist (under
//! qemu-user the whole process runs the fallback, but these sequences still run). The
//! descriptor a sequence arms is read back through the fake area's `rseq_cs`.

use core::mem::offset_of;

use super::Outcome;
use crate::abi::{
    Rseq, RseqCs, RSEQ_CPU_ID_REGISTRATION_FAILED, RSEQ_CPU_ID_UNINITIALIZED, RSEQ_SIG,
};
use crate::arch;

/// The CPU the fake area claims the thread is on.
const CPU: u32 = 3;
/// Another CPU: a caller that read a stale CPU number.
const OTHER_CPU: u32 = CPU + 1;

/// A fake area that says the thread runs on `cpu_id`.
fn area(cpu_id: u32) -> Rseq {
    Rseq {
        cpu_id_start: cpu_id,
        cpu_id,
        rseq_cs: 0,
        flags: 0,
        node_id: 7,
        mm_cid: 5,
        slice_ctrl: 0,
    }
}

// Safe wrappers: the words are exclusively borrowed and the area is a fake one, which
// the kernel never reads; a sequence writes nothing in it but `rseq_cs`.

fn add(area: &mut Rseq, v: &mut usize, count: usize, cpu: u32) -> Outcome {
    let _delay = crate::tests::delay_shared();
    // SAFETY: (1) `area` is live and exclusively borrowed; unregistered, so no kernel
    // restart is needed for this single-threaded use; (2) `v` is exclusively borrowed.
    unsafe { arch::add(area, v, count, cpu) }
}

fn add_without_restart(area: &mut Rseq, v: &mut usize, count: usize, cpu: u32) -> Outcome {
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add`.
    unsafe { arch::add_without_restart(area, v, count, cpu) }
}

fn compare_store(area: &mut Rseq, v: &mut usize, expect: usize, newv: usize, cpu: u32) -> Outcome {
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add`.
    unsafe { arch::compare_store::<{ arch::CPU_ID_FIELD }>(area, v, expect, newv, cpu) }
}

fn compare_try_store_release(
    area: &mut Rseq,
    v: &mut usize,
    expect: usize,
    v2: &mut usize,
    newv2: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add`; `v2` is exclusively borrowed too.
    unsafe { arch::compare_try_store_release(area, v, expect, v2, newv2, newv, cpu) }
}

#[allow(clippy::too_many_arguments)]
fn compare_memcpy_store_release(
    area: &mut Rseq,
    v: &mut usize,
    expect: usize,
    dst: &mut [u8],
    src: &[u8],
    newv: usize,
    cpu: u32,
) -> Outcome {
    assert!(dst.len() >= src.len());
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add`; `dst` is exclusively borrowed and at least as long as `src`,
    // so they cannot overlap and both ranges are valid for `src.len()` bytes.
    unsafe {
        arch::compare_memcpy_store_release(
            area,
            v,
            expect,
            dst.as_mut_ptr(),
            src.as_ptr(),
            src.len(),
            newv,
            cpu,
        )
    }
}

fn compare_store_guarded(
    area: &mut Rseq,
    guard: &usize,
    v: &mut usize,
    expect: usize,
    newv: usize,
    cpu: u32,
) -> Outcome {
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add`; `guard` is a live word, only read.
    unsafe { arch::compare_store_guarded(area, guard, v, expect, newv, cpu) }
}

/// A list node with its link after a payload, so that `offset` is not 0.
#[repr(C)]
struct Node {
    payload: u64,
    next: usize,
}

const NEXT: isize = offset_of!(Node, next) as isize;

/// Pops from the list whose head is `*head`, linked through `Node::next`.
///
/// # Safety
///
/// Every value of `*head` other than `expect_not` is the address of a live `Node`, and
/// so is every `next` reachable from it, up to `expect_not`.
unsafe fn pop_node(
    area: &mut Rseq,
    head: &mut usize,
    expect_not: usize,
    cpu: u32,
) -> Outcome<usize> {
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add`, and the caller's contract makes `head + NEXT` readable.
    unsafe { arch::pop(area, head, expect_not, NEXT, cpu) }
}

/// Reads the descriptor the last sequence armed in `area` and checks it against the
/// layout of `arch/mod.rs`; returns its address.
fn armed_descriptor(area: &Rseq) -> usize {
    let addr = area.rseq_cs as usize;
    assert_ne!(addr, 0, "the sequence did not arm rseq_cs");
    assert_eq!(addr % 32, 0, "descriptors are 32-byte aligned");
    // SAFETY: the sequence stored the address of its descriptor, a static in
    // `__rseq_cs` that lives as long as the program.
    let cs: &RseqCs = unsafe { &*(addr as *const RseqCs) };
    assert_eq!(cs.version, 0);
    assert_eq!(cs.flags, 0);
    assert_ne!(cs.start_ip, 0);
    assert!(
        cs.post_commit_offset > 0 && cs.post_commit_offset < 4096,
        "a sequence is a few instructions, not {} bytes",
        cs.post_commit_offset
    );
    let end = cs.start_ip + cs.post_commit_offset;
    assert!(
        cs.abort_ip < cs.start_ip || cs.abort_ip >= end,
        "abort_ip {:#x} lies inside the section [{:#x}, {end:#x})",
        cs.abort_ip,
        cs.start_ip
    );
    // SAFETY: the 4 bytes before abort_ip are the signature the sequence emitted in
    // `__rseq_failure`, mapped readable (and executable) with the program's code.
    let sig = unsafe { ((cs.abort_ip - 4) as usize as *const u32).read_unaligned() };
    assert_eq!(
        sig, RSEQ_SIG,
        "the 4 bytes before abort_ip must be RSEQ_SIG"
    );
    addr
}

/// The fields of an area that only the kernel may write, and `flags`.
fn kernel_fields(a: &Rseq) -> [u32; 5] {
    [a.cpu_id_start, a.cpu_id, a.flags, a.node_id, a.mm_cid]
}

/// The kernel-owned fields of `area` are still those of `area(cpu_id)`.
fn assert_kernel_fields_untouched(area: &Rseq, cpu_id: u32) {
    assert_eq!(kernel_fields(area), kernel_fields(&self::area(cpu_id)));
}

// add

#[test]
fn add_commits_the_sum_on_the_expected_cpu() {
    let mut a = area(CPU);
    let mut v = 40;
    assert_eq!(add(&mut a, &mut v, 2, CPU), Outcome::Committed(()));
    assert_eq!(v, 42);
}

#[test]
fn add_wraps_around() {
    let mut a = area(CPU);
    let mut v = usize::MAX;
    assert_eq!(add(&mut a, &mut v, 2, CPU), Outcome::Committed(()));
    assert_eq!(v, 1);
}

#[test]
fn add_on_another_cpu_aborts_and_stores_nothing() {
    let mut a = area(CPU);
    let mut v = 40;
    assert_eq!(add(&mut a, &mut v, 2, OTHER_CPU), Outcome::Aborted);
    assert_eq!(v, 40);
}

// compare_store

#[test]
fn compare_store_commits_newv_when_the_word_holds_expect() {
    let mut a = area(CPU);
    let mut v = 10;
    assert_eq!(
        compare_store(&mut a, &mut v, 10, 11, CPU),
        Outcome::Committed(())
    );
    assert_eq!(v, 11);
}

#[test]
fn compare_store_fails_and_stores_nothing_when_the_word_differs() {
    let mut a = area(CPU);
    let mut v = 10;
    assert_eq!(
        compare_store(&mut a, &mut v, 9, 11, CPU),
        Outcome::CompareFailed
    );
    assert_eq!(v, 10);
}

#[test]
fn compare_store_on_another_cpu_aborts_and_stores_nothing() {
    let mut a = area(CPU);
    let mut v = 10;
    assert_eq!(
        compare_store(&mut a, &mut v, 10, 11, OTHER_CPU),
        Outcome::Aborted
    );
    assert_eq!(v, 10);
}

/// The mm_cid variant checks `mm_cid` (5 in the fake area), not `cpu_id`.
#[test]
fn compare_store_by_mm_cid_checks_the_mm_cid_not_the_cpu() {
    let by_mm_cid = |a: &mut Rseq, v: &mut usize, cid: u32| {
        let _delay = crate::tests::delay_shared();
        // SAFETY: as in `add`; the fake area has an mm_cid.
        unsafe { arch::compare_store::<{ arch::MM_CID_FIELD }>(a, v, 10, 11, cid) }
    };
    let mut a = area(CPU);
    let mut v = 10;
    assert_eq!(by_mm_cid(&mut a, &mut v, CPU), Outcome::Aborted);
    assert_eq!(v, 10);
    assert_eq!(by_mm_cid(&mut a, &mut v, 5), Outcome::Committed(()));
    assert_eq!(v, 11);
}

// pop

#[test]
fn pop_returns_the_old_head_and_links_the_head_to_its_next() {
    let mut a = area(CPU);
    let second = Node {
        payload: 2,
        next: 0,
    };
    let first = Node {
        payload: 1,
        next: &raw const second as usize,
    };
    let mut head = &raw const first as usize;
    // SAFETY: `head` and every `next` are live nodes up to 0.
    let popped = unsafe { pop_node(&mut a, &mut head, 0, CPU) };
    assert_eq!(popped, Outcome::Committed(&raw const first as usize));
    assert_eq!(head, &raw const second as usize);
    // SAFETY: as above.
    let popped = unsafe { pop_node(&mut a, &mut head, 0, CPU) };
    assert_eq!(popped, Outcome::Committed(&raw const second as usize));
    assert_eq!(head, 0);
    assert_eq!((first.payload, second.payload), (1, 2));
}

#[test]
fn pop_follows_a_negative_offset() {
    let mut a = area(CPU);
    // The list links point at `payload`, the link word is 8 bytes before it.
    #[repr(C)]
    struct Back {
        next: usize,
        payload: u64,
    }
    let back = -(offset_of!(Back, payload) as isize);
    let second = Back {
        next: 0,
        payload: 2,
    };
    let first = Back {
        next: &raw const second.payload as usize,
        payload: 1,
    };
    let mut head = &raw const first.payload as usize;
    let _delay = crate::tests::delay_shared();
    // SAFETY: `head` and `first.next` point `back` bytes past a live `usize`.
    let popped = unsafe { arch::pop(&mut a, &mut head, 0, back, CPU) };
    assert_eq!(
        popped,
        Outcome::Committed(&raw const first.payload as usize)
    );
    assert_eq!(head, &raw const second.payload as usize);
}

#[test]
fn pop_of_an_empty_list_fails_the_compare_and_stores_nothing() {
    let mut a = area(CPU);
    let mut head = 0;
    // SAFETY: the list is empty: `*head` is `expect_not`.
    let popped = unsafe { pop_node(&mut a, &mut head, 0, CPU) };
    assert_eq!(popped, Outcome::CompareFailed);
    assert_eq!(head, 0);
}

#[test]
fn pop_treats_any_expect_not_as_the_empty_list() {
    let mut a = area(CPU);
    let sentinel = usize::MAX;
    let only = Node {
        payload: 1,
        next: sentinel,
    };
    let mut head = &raw const only as usize;
    // SAFETY: `head` is a live node whose `next` is the sentinel.
    let popped = unsafe { pop_node(&mut a, &mut head, sentinel, CPU) };
    assert_eq!(popped, Outcome::Committed(&raw const only as usize));
    assert_eq!(head, sentinel);
    // SAFETY: the list is empty.
    let popped = unsafe { pop_node(&mut a, &mut head, sentinel, CPU) };
    assert_eq!(popped, Outcome::CompareFailed);
    assert_eq!(head, sentinel);
}

#[test]
fn pop_on_another_cpu_aborts_and_leaves_the_list_alone() {
    let mut a = area(CPU);
    let only = Node {
        payload: 1,
        next: 0,
    };
    let mut head = &raw const only as usize;
    // SAFETY: `head` is a live node whose `next` is 0.
    let popped = unsafe { pop_node(&mut a, &mut head, 0, OTHER_CPU) };
    assert_eq!(popped, Outcome::Aborted);
    assert_eq!(head, &raw const only as usize);
}

// compare_try_store_release

#[test]
fn try_store_commits_v2_then_v_when_the_word_holds_expect() {
    let mut a = area(CPU);
    let (mut v, mut v2) = (1, 100);
    let outcome = compare_try_store_release(&mut a, &mut v, 1, &mut v2, 200, 2, CPU);
    assert_eq!(outcome, Outcome::Committed(()));
    assert_eq!((v, v2), (2, 200));
}

#[test]
fn try_store_fails_and_stores_neither_word_when_the_word_differs() {
    let mut a = area(CPU);
    let (mut v, mut v2) = (1, 100);
    let outcome = compare_try_store_release(&mut a, &mut v, 0, &mut v2, 200, 2, CPU);
    assert_eq!(outcome, Outcome::CompareFailed);
    assert_eq!((v, v2), (1, 100));
}

#[test]
fn try_store_on_another_cpu_aborts_and_stores_neither_word() {
    let mut a = area(CPU);
    let (mut v, mut v2) = (1, 100);
    let outcome = compare_try_store_release(&mut a, &mut v, 1, &mut v2, 200, 2, OTHER_CPU);
    assert_eq!(outcome, Outcome::Aborted);
    assert_eq!((v, v2), (1, 100));
}

// compare_memcpy_store_release

/// Guard bytes on each side of the destination, to catch a copy of the wrong length.
const GUARD: usize = 16;
const GUARD_BYTE: u8 = 0xAA;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

#[test]
fn memcpy_copies_exactly_len_bytes_then_commits() {
    for len in [0, 1, 7, 64, 300] {
        let mut a = area(CPU);
        let src = pattern(len);
        let mut buf = vec![GUARD_BYTE; GUARD + len + GUARD];
        let mut v = 5;
        let outcome = compare_memcpy_store_release(
            &mut a,
            &mut v,
            5,
            &mut buf[GUARD..GUARD + len],
            &src,
            6,
            CPU,
        );
        assert_eq!(outcome, Outcome::Committed(()), "len {len}");
        assert_eq!(v, 6, "len {len}");
        assert_eq!(&buf[GUARD..GUARD + len], &src[..], "len {len}");
        assert!(
            buf[..GUARD].iter().all(|&b| b == GUARD_BYTE),
            "len {len}: wrote before dst"
        );
        assert!(
            buf[GUARD + len..].iter().all(|&b| b == GUARD_BYTE),
            "len {len}: wrote past len"
        );
    }
}

#[test]
fn memcpy_fails_and_copies_nothing_when_the_word_differs() {
    let mut a = area(CPU);
    let src = pattern(64);
    let mut dst = [GUARD_BYTE; 64];
    let mut v = 5;
    let outcome = compare_memcpy_store_release(&mut a, &mut v, 4, &mut dst, &src, 6, CPU);
    assert_eq!(outcome, Outcome::CompareFailed);
    assert_eq!(v, 5);
    assert!(dst.iter().all(|&b| b == GUARD_BYTE));
}

#[test]
fn memcpy_on_another_cpu_aborts_and_copies_nothing() {
    let mut a = area(CPU);
    let src = pattern(64);
    let mut dst = [GUARD_BYTE; 64];
    let mut v = 5;
    let outcome = compare_memcpy_store_release(&mut a, &mut v, 5, &mut dst, &src, 6, OTHER_CPU);
    assert_eq!(outcome, Outcome::Aborted);
    assert_eq!(v, 5);
    assert!(dst.iter().all(|&b| b == GUARD_BYTE));
}

// add_without_restart (the deliberately broken sequence of the stress tests)

#[test]
fn broken_add_still_adds_on_the_expected_cpu_and_checks_the_cpu() {
    let mut a = area(CPU);
    let mut v = 40;
    assert_eq!(
        add_without_restart(&mut a, &mut v, 2, CPU),
        Outcome::Committed(())
    );
    assert_eq!(v, 42);
    assert_eq!(
        add_without_restart(&mut a, &mut v, 2, OTHER_CPU),
        Outcome::Aborted
    );
    assert_eq!(v, 42);
    assert_eq!(a.rseq_cs, 0, "the broken add arms no critical section");
}

// Every primitive together

/// Runs every primitive once, each on a fresh fake area that says `cpu_id`, passing
/// `cpu` and words in which it would commit; returns for each its name, the descriptor
/// it armed (checked by `armed_descriptor`) and whether it committed. Checks after each
/// that the kernel-owned fields of the area are untouched.
fn run_every_primitive(cpu_id: u32, cpu: u32) -> Vec<(&'static str, usize, bool)> {
    let mut out = Vec::new();
    let mut record = |name, a: &Rseq, committed: bool| {
        out.push((name, armed_descriptor(a), committed));
        assert_kernel_fields_untouched(a, cpu_id);
    };

    let mut a = area(cpu_id);
    let mut v = 0;
    let o = add(&mut a, &mut v, 1, cpu);
    record("add", &a, o == Outcome::Committed(()));

    let mut a = area(cpu_id);
    let mut v = 0;
    let o = compare_store(&mut a, &mut v, 0, 9, cpu);
    record("compare_store", &a, o == Outcome::Committed(()));

    let mut a = area(cpu_id);
    let node = Node {
        payload: 0,
        next: 0,
    };
    let mut head = &raw const node as usize;
    // SAFETY: `head` is a live node whose `next` is 0.
    let o = unsafe { pop_node(&mut a, &mut head, 0, cpu) };
    record("pop", &a, o == Outcome::Committed(&raw const node as usize));

    let mut a = area(cpu_id);
    let (mut v, mut v2) = (0, 0);
    let o = compare_try_store_release(&mut a, &mut v, 0, &mut v2, 1, 2, cpu);
    record("compare_try_store_release", &a, o == Outcome::Committed(()));

    let mut a = area(cpu_id);
    let (mut v, mut dst) = (0, [0u8; 8]);
    let o = compare_memcpy_store_release(&mut a, &mut v, 0, &mut dst, &[1; 8], 3, cpu);
    record(
        "compare_memcpy_store_release",
        &a,
        o == Outcome::Committed(()),
    );

    let mut a = area(cpu_id);
    let mut entries = [0usize; 1];
    let mut hdr = slab_header(&mut entries, 0);
    let o = slab_push(&mut a, &mut hdr, 0, 5, cpu);
    record("slab_push", &a, o == Outcome::Committed(()));

    let mut a = area(cpu_id);
    let mut entries = [6usize; 1];
    let mut hdr = slab_header(&mut entries, 1);
    let o = slab_pop(&mut a, &mut hdr, 0, cpu);
    record("slab_pop", &a, o == Outcome::Committed(6));

    let mut a = area(cpu_id);
    let (mut v, mut dst, guard) = (0usize, [0u8; 8], 0usize);
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add`; `dst` and the source are distinct live 8-byte arrays.
    let o = unsafe {
        arch::compare_memcpy_store_guarded(
            &mut a,
            &guard,
            &mut v,
            0,
            dst.as_mut_ptr(),
            [1u8; 8].as_ptr(),
            8,
            3,
            cpu,
        )
    };
    drop(_delay);
    record(
        "compare_memcpy_store_guarded",
        &a,
        o == Outcome::Committed(()),
    );

    out
}

#[test]
fn every_sequence_arms_a_well_formed_descriptor_with_the_signature_before_abort_ip() {
    for (name, _, committed) in run_every_primitive(CPU, CPU) {
        assert!(committed, "{name} did not commit");
    }
}

#[test]
fn every_sequence_has_its_own_descriptor() {
    let descriptors = run_every_primitive(CPU, CPU);
    for (i, (name, addr, _)) in descriptors.iter().enumerate() {
        for (other, other_addr, _) in &descriptors[i + 1..] {
            assert_ne!(addr, other_addr, "{name} and {other} share a descriptor");
        }
    }
}

#[test]
fn every_sequence_arms_its_descriptor_before_checking_the_cpu() {
    for (name, _, committed) in run_every_primitive(CPU, OTHER_CPU) {
        assert!(!committed, "{name} committed on the wrong CPU");
    }
}

#[test]
fn no_sequence_commits_on_an_area_that_is_not_registered_yet_or_failed() {
    for cpu_id in [RSEQ_CPU_ID_UNINITIALIZED, RSEQ_CPU_ID_REGISTRATION_FAILED] {
        for cpu in [0, CPU] {
            for (name, _, committed) in run_every_primitive(cpu_id, cpu) {
                assert!(!committed, "{name} committed with cpu_id {cpu_id:#x}");
            }
        }
    }
}

#[test]
fn sequences_write_nothing_in_the_area_but_rseq_cs() {
    // `run_every_primitive` checks the kernel-owned fields after each primitive, on
    // every path; this test names the promise.
    let _ = run_every_primitive(CPU, CPU);
    let _ = run_every_primitive(CPU, OTHER_CPU);
}

#[test]
fn guarded_compare_store_commits_only_while_the_guard_is_free() {
    let mut a = area(CPU);
    let mut v = 5;
    assert_eq!(
        compare_store_guarded(&mut a, &0, &mut v, 5, 6, CPU),
        Outcome::Committed(())
    );
    assert_eq!(v, 6);
    armed_descriptor(&a);
    // A held guard (a remote owner's token) aborts before any store.
    assert_eq!(
        compare_store_guarded(&mut a, &0x1234, &mut v, 6, 7, CPU),
        Outcome::Aborted
    );
    assert_eq!(v, 6);
    assert_eq!(
        compare_store_guarded(&mut a, &0, &mut v, 5, 7, CPU),
        Outcome::CompareFailed
    );
    assert_eq!(v, 6);
    assert_eq!(
        compare_store_guarded(&mut a, &0, &mut v, 6, 7, OTHER_CPU),
        Outcome::Aborted
    );
    assert_eq!(v, 6);
}

mod on_current_cpu;
mod slab;

use slab::{slab_header, slab_pop, slab_push};
