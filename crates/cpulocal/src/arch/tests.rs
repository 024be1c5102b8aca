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
    unsafe { arch::compare_store(area, v, expect, newv, cpu) }
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

/// [`pop_node`], checking `guard` first.
///
/// # Safety
///
/// As for [`pop_node`].
unsafe fn pop_node_guarded(
    area: &mut Rseq,
    guard: &usize,
    head: &mut usize,
    expect_not: usize,
    cpu: u32,
) -> Outcome<usize> {
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `pop_node`; `guard` is a live word, only read.
    unsafe { arch::pop_guarded(area, guard, head, expect_not, NEXT, cpu) }
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

#[test]
fn guarded_pop_commits_only_while_the_guard_is_free() {
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
    let held = unsafe { pop_node_guarded(&mut a, &1, &mut head, 0, CPU) };
    assert_eq!(held, Outcome::Aborted);
    assert_eq!(head, &raw const first as usize);
    // SAFETY: as above.
    let popped = unsafe { pop_node_guarded(&mut a, &0, &mut head, 0, CPU) };
    assert_eq!(popped, Outcome::Committed(&raw const first as usize));
    assert_eq!(head, &raw const second as usize);
    armed_descriptor(&a);
    // SAFETY: as above.
    let moved = unsafe { pop_node_guarded(&mut a, &0, &mut head, 0, OTHER_CPU) };
    assert_eq!(moved, Outcome::Aborted);
    // SAFETY: as above.
    let popped = unsafe { pop_node_guarded(&mut a, &0, &mut head, 0, CPU) };
    assert_eq!(popped, Outcome::Committed(&raw const second as usize));
    // SAFETY: the list is empty.
    let empty = unsafe { pop_node_guarded(&mut a, &0, &mut head, 0, CPU) };
    assert_eq!(empty, Outcome::CompareFailed);
}

// The slab sequences (the allocator's per-CPU arrays)

/// A slab header `{current, end, begin, guard}` over `entries`.
fn slab_header(entries: &mut [usize], used: usize) -> [usize; 4] {
    let begin = entries.as_mut_ptr() as usize;
    [begin + used * 8, begin + entries.len() * 8, begin, 0]
}

fn slab_push(
    area: &mut Rseq,
    hdr: &mut [usize; 4],
    guard: usize,
    item: usize,
    cpu: u32,
) -> Outcome {
    let _delay = crate::tests::delay_shared();
    hdr[3] = guard;
    let h = hdr.as_mut_ptr();
    // SAFETY: as in `add`; the header's entries are an exclusively borrowed array of
    // the caller (`slab_header`), and the guard is the header's last word.
    unsafe { arch::slab_push(area, h.add(3), h, item, cpu) }
}

fn slab_pop(area: &mut Rseq, hdr: &mut [usize; 4], guard: usize, cpu: u32) -> Outcome<usize> {
    let _delay = crate::tests::delay_shared();
    hdr[3] = guard;
    let h = hdr.as_mut_ptr();
    // SAFETY: as in `slab_push`.
    unsafe { arch::slab_pop(area, h.add(3), h, cpu) }
}

#[test]
fn slab_push_stores_the_item_and_advances_current_until_full() {
    let mut entries = [0usize; 2];
    let mut hdr = slab_header(&mut entries, 0);
    let begin = hdr[2];
    let mut a = area(CPU);
    assert_eq!(
        slab_push(&mut a, &mut hdr, 0, 11, CPU),
        Outcome::Committed(())
    );
    armed_descriptor(&a);
    assert_eq!(
        slab_push(&mut a, &mut hdr, 0, 12, CPU),
        Outcome::Committed(())
    );
    assert_eq!(hdr[0], begin + 16);
    assert_eq!(
        slab_push(&mut a, &mut hdr, 0, 13, CPU),
        Outcome::CompareFailed
    );
    assert_eq!(hdr[0], begin + 16);
    assert_eq!(entries, [11, 12]);
}

#[test]
fn slab_push_aborts_with_the_guard_held_or_on_another_cpu_and_stores_nothing() {
    let mut entries = [0usize; 2];
    let mut hdr = slab_header(&mut entries, 0);
    let mut a = area(CPU);
    assert_eq!(slab_push(&mut a, &mut hdr, 1, 11, CPU), Outcome::Aborted);
    assert_eq!(
        slab_push(&mut a, &mut hdr, 0, 11, OTHER_CPU),
        Outcome::Aborted
    );
    assert_eq!(hdr[0], hdr[2]);
    assert_eq!(entries, [0, 0]);
}

#[test]
fn slab_pop_returns_the_last_item_and_moves_current_back_until_empty() {
    let mut entries = [21usize, 22];
    let mut hdr = slab_header(&mut entries, 2);
    let mut a = area(CPU);
    assert_eq!(slab_pop(&mut a, &mut hdr, 1, CPU), Outcome::Aborted);
    assert_eq!(slab_pop(&mut a, &mut hdr, 0, OTHER_CPU), Outcome::Aborted);
    assert_eq!(slab_pop(&mut a, &mut hdr, 0, CPU), Outcome::Committed(22));
    armed_descriptor(&a);
    assert_eq!(slab_pop(&mut a, &mut hdr, 0, CPU), Outcome::Committed(21));
    assert_eq!(hdr[0], hdr[2]);
    assert_eq!(slab_pop(&mut a, &mut hdr, 0, CPU), Outcome::CompareFailed);
    assert_eq!(hdr[0], hdr[2]);
}

#[test]
fn guarded_memcpy_moves_a_batch_only_while_the_guard_is_free() {
    let mut a = area(CPU);
    let (mut v, mut dst) = (5usize, [0u8; 16]);
    let src = [7u8; 16];
    let run = |a: &mut Rseq, v: &mut usize, dst: &mut [u8; 16], guard: usize, expect, cpu| {
        let _delay = crate::tests::delay_shared();
        // SAFETY: as in `add`; `dst` and `src` are distinct live arrays of 16 bytes,
        // `guard` a live local, only read.
        unsafe {
            arch::compare_memcpy_store_guarded(
                a,
                &guard,
                v,
                expect,
                dst.as_mut_ptr(),
                src.as_ptr(),
                16,
                9,
                cpu,
            )
        }
    };
    assert_eq!(run(&mut a, &mut v, &mut dst, 1, 5, CPU), Outcome::Aborted);
    assert_eq!(
        run(&mut a, &mut v, &mut dst, 0, 5, OTHER_CPU),
        Outcome::Aborted
    );
    assert_eq!(
        run(&mut a, &mut v, &mut dst, 0, 4, CPU),
        Outcome::CompareFailed
    );
    assert_eq!((v, dst), (5, [0; 16]));
    assert_eq!(
        run(&mut a, &mut v, &mut dst, 0, 5, CPU),
        Outcome::Committed(())
    );
    armed_descriptor(&a);
    assert_eq!((v, dst), (9, [7; 16]));
}

#[cfg(any(test, feature = "__test-hooks"))]
#[test]
fn broken_slab_pop_still_pops_on_the_expected_cpu() {
    let mut entries = [31usize];
    let mut hdr = slab_header(&mut entries, 1);
    let mut a = area(CPU);
    let h = hdr.as_mut_ptr();
    // SAFETY: as in `slab_pop`.
    let other = unsafe { arch::slab_pop_without_restart(&mut a, h.add(3), h, OTHER_CPU) };
    assert_eq!(other, Outcome::Aborted);
    // SAFETY: as in `slab_pop`.
    let popped = unsafe { arch::slab_pop_without_restart(&mut a, h.add(3), h, CPU) };
    assert_eq!(popped, Outcome::Committed(31));
    assert_eq!(hdr[0], hdr[2]);
}

// The sequences that read the CPU themselves (`*_on_current_cpu`)

/// Slots of 128 bytes (`SHIFT` 7) for CPUs `0..=OTHER_CPU`, each a lock word then a
/// word (a counter, or a list head), as `Counter` and `Stack` lay theirs out.
const SHIFT: u32 = 7;
const GUARD_AT: i32 = 0;
const HEAD_AT: i32 = 8;

#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct CpuSlot {
    guard: usize,
    word: usize,
    _pad: [usize; 14],
}

const _: () = assert!(core::mem::size_of::<CpuSlot>() == 1 << SHIFT);

/// A list node with its link first, as `Stack`'s nodes have it: the list holds node
/// addresses, which are link addresses.
#[repr(C)]
struct Linked {
    next: usize,
    payload: u64,
}

fn cpu_slots() -> Vec<CpuSlot> {
    vec![CpuSlot::default(); OTHER_CPU as usize + 1]
}

/// A fake area whose `cpu_id_start` is `start` and `cpu_id` is `id`: the thread moved
/// between the two reads when they differ.
fn area_moved(start: u32, id: u32) -> Rseq {
    Rseq {
        cpu_id_start: start,
        ..area(id)
    }
}

/// The word of each slot the add sequence targets is the second one: the table starts
/// at `&slots[0].word`.
fn add_current(a: &mut Rseq, slots: &mut [CpuSlot], count: usize) -> Outcome {
    let base = slots
        .as_mut_ptr()
        .cast::<u8>()
        .wrapping_add(offset_of!(CpuSlot, word));
    let _delay = crate::tests::delay_shared();
    // SAFETY: (1) the fake area is live and unregistered; (2) every slot below
    // `slots.len()` is in `slots`, exclusively borrowed.
    unsafe { arch::add_on_current_cpu::<SHIFT>(a, base, slots.len(), count) }
}

fn add_const_current<const N: u32>(a: &mut Rseq, slots: &mut [CpuSlot]) -> Outcome {
    let base = slots
        .as_mut_ptr()
        .cast::<u8>()
        .wrapping_add(offset_of!(CpuSlot, word));
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add_current`.
    unsafe { arch::add_const_on_current_cpu::<SHIFT, N>(a, base, slots.len()) }
}

fn push_current(a: &mut Rseq, slots: &mut [CpuSlot], node: &mut Linked) -> Outcome {
    let (base, len) = (slots.as_mut_ptr().cast::<u8>(), slots.len());
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add_current`; `node.next` is exclusively borrowed.
    unsafe {
        arch::push_guarded_on_current_cpu::<SHIFT, GUARD_AT, HEAD_AT>(
            a,
            base,
            len,
            &raw mut node.next,
        )
    }
}

/// # Safety
///
/// Every non-zero head in `slots` is a live `Linked`.
unsafe fn pop_current(a: &mut Rseq, slots: &mut [CpuSlot]) -> Outcome<usize> {
    let (base, len) = (slots.as_mut_ptr().cast::<u8>(), slots.len());
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add_current`, and the caller's contract for the heads.
    unsafe { arch::pop_guarded_on_current_cpu::<SHIFT, GUARD_AT, HEAD_AT, 0>(a, base, len) }
}

#[test]
fn add_on_current_cpu_adds_to_the_slot_of_cpu_id_start_only() {
    let mut a = area(CPU);
    let mut slots = cpu_slots();
    assert_eq!(add_current(&mut a, &mut slots, 5), Outcome::Committed(()));
    assert_eq!(
        add_const_current::<2>(&mut a, &mut slots),
        Outcome::Committed(())
    );
    for (cpu, s) in slots.iter().enumerate() {
        let expect = if cpu == CPU as usize { 7 } else { 0 };
        assert_eq!((s.guard, s.word), (0, expect), "slot {cpu}");
    }
    armed_descriptor(&a);
    assert_kernel_fields_untouched(&a, CPU);
}

#[test]
fn sequences_on_current_cpu_refuse_a_cpu_beyond_the_table_and_store_nothing() {
    // The table stops before CPU: the sequences abort before any store, whatever the
    // area says.
    let mut a = area(CPU);
    let mut slots = vec![CpuSlot::default(); CPU as usize];
    assert_eq!(add_current(&mut a, &mut slots, 5), Outcome::Aborted);
    assert_eq!(add_const_current::<1>(&mut a, &mut slots), Outcome::Aborted);
    let mut node = Linked {
        payload: 1,
        next: 77,
    };
    assert_eq!(
        push_current(&mut a, &mut slots, &mut node),
        Outcome::Aborted
    );
    // SAFETY: every head is 0.
    assert_eq!(unsafe { pop_current(&mut a, &mut slots) }, Outcome::Aborted);
    assert_eq!(node.next, 77);
    assert!(slots.iter().all(|s| *s == CpuSlot::default()));
    // An empty table (a counter before its first use) refuses every CPU, even 0.
    let mut a = area(0);
    assert_eq!(add_current(&mut a, &mut [], 5), Outcome::Aborted);
}

#[test]
fn add_on_current_cpu_wraps_around() {
    let mut a = area(CPU);
    let mut slots = cpu_slots();
    slots[CPU as usize].word = usize::MAX;
    assert_eq!(add_current(&mut a, &mut slots, 2), Outcome::Committed(()));
    assert_eq!(slots[CPU as usize].word, 1);
}

#[test]
fn add_const_takes_the_largest_immediate() {
    let mut a = area(CPU);
    let mut slots = cpu_slots();
    assert_eq!(
        add_const_current::<{ i32::MAX as u32 }>(&mut a, &mut slots),
        Outcome::Committed(())
    );
    assert_eq!(slots[CPU as usize].word, i32::MAX as usize);
}

#[test]
fn sequences_on_current_cpu_abort_and_store_nothing_when_the_thread_moved() {
    let mut a = area_moved(CPU, OTHER_CPU);
    let mut slots = cpu_slots();
    assert_eq!(add_current(&mut a, &mut slots, 5), Outcome::Aborted);
    assert_eq!(add_const_current::<1>(&mut a, &mut slots), Outcome::Aborted);
    let mut node = Linked {
        payload: 1,
        next: 77,
    };
    assert_eq!(
        push_current(&mut a, &mut slots, &mut node),
        Outcome::Aborted
    );
    assert_eq!(slots, cpu_slots());
    let mut only = Linked {
        payload: 2,
        next: 0,
    };
    slots[CPU as usize].word = &raw mut only as usize;
    // SAFETY: the only non-zero head is `only`.
    assert_eq!(unsafe { pop_current(&mut a, &mut slots) }, Outcome::Aborted);
    assert_eq!(slots[CPU as usize].word, &raw mut only as usize);
    armed_descriptor(&a);
    assert_eq!(
        kernel_fields(&a),
        kernel_fields(&area_moved(CPU, OTHER_CPU))
    );
}

#[test]
fn sequences_on_current_cpu_never_commit_on_an_area_that_is_not_registered_yet_or_failed() {
    for cpu_id in [RSEQ_CPU_ID_UNINITIALIZED, RSEQ_CPU_ID_REGISTRATION_FAILED] {
        // Before (or without) a registration `cpu_id_start` reads 0.
        let mut a = area_moved(0, cpu_id);
        let mut slots = cpu_slots();
        assert_eq!(add_current(&mut a, &mut slots, 1), Outcome::Aborted);
        assert_eq!(add_const_current::<1>(&mut a, &mut slots), Outcome::Aborted);
        let mut node = Linked {
            payload: 1,
            next: 0,
        };
        assert_eq!(
            push_current(&mut a, &mut slots, &mut node),
            Outcome::Aborted
        );
        // SAFETY: every head is 0.
        assert_eq!(unsafe { pop_current(&mut a, &mut slots) }, Outcome::Aborted);
        assert_eq!(slots, cpu_slots());
    }
}

#[test]
fn guarded_push_and_pop_on_current_cpu_use_the_slot_of_cpu_id_start_while_its_guard_is_free() {
    let mut a = area(CPU);
    let mut slots = cpu_slots();
    let mut first = Linked {
        payload: 1,
        next: 99,
    };
    let mut second = Linked {
        payload: 2,
        next: 99,
    };
    assert_eq!(
        push_current(&mut a, &mut slots, &mut first),
        Outcome::Committed(())
    );
    armed_descriptor(&a);
    assert_eq!(first.next, 0, "the push links the node to the old head");
    assert_eq!(
        push_current(&mut a, &mut slots, &mut second),
        Outcome::Committed(())
    );
    assert_eq!(second.next, &raw mut first as usize);
    assert_eq!(slots[CPU as usize].word, &raw mut second as usize);
    for (cpu, s) in slots.iter().enumerate().filter(|&(c, _)| c != CPU as usize) {
        assert_eq!(*s, CpuSlot::default(), "slot {cpu}");
    }

    // A held guard (a remote owner's token) aborts both, before any store.
    slots[CPU as usize].guard = 0x1234;
    let mut third = Linked {
        payload: 3,
        next: 99,
    };
    assert_eq!(
        push_current(&mut a, &mut slots, &mut third),
        Outcome::Aborted
    );
    assert_eq!(third.next, 99);
    // SAFETY: the heads are live nodes linked to 0.
    assert_eq!(unsafe { pop_current(&mut a, &mut slots) }, Outcome::Aborted);
    assert_eq!(slots[CPU as usize].word, &raw mut second as usize);
    // The guard of another CPU's slot does not matter.
    slots[CPU as usize].guard = 0;
    slots[OTHER_CPU as usize].guard = 0x1234;

    // SAFETY: as above.
    let popped = unsafe { pop_current(&mut a, &mut slots) };
    assert_eq!(popped, Outcome::Committed(&raw mut second as usize));
    // SAFETY: as above.
    let popped = unsafe { pop_current(&mut a, &mut slots) };
    assert_eq!(popped, Outcome::Committed(&raw mut first as usize));
    // SAFETY: the list is empty.
    let empty = unsafe { pop_current(&mut a, &mut slots) };
    assert_eq!(empty, Outcome::CompareFailed);
    assert_eq!(slots[CPU as usize].word, 0);
    assert_eq!((first.payload, second.payload), (1, 2));
    assert_kernel_fields_untouched(&a, CPU);
}

#[test]
fn every_sequence_on_current_cpu_has_its_own_descriptor() {
    let mut descriptors = Vec::new();
    let mut slots = cpu_slots();
    let mut a = area(CPU);
    let _ = add_current(&mut a, &mut slots, 1);
    descriptors.push(armed_descriptor(&a));
    let mut a = area(CPU);
    let _ = add_const_current::<1>(&mut a, &mut slots);
    descriptors.push(armed_descriptor(&a));
    let mut a = area(CPU);
    let mut node = Linked {
        payload: 1,
        next: 0,
    };
    let _ = push_current(&mut a, &mut slots, &mut node);
    descriptors.push(armed_descriptor(&a));
    let mut a = area(CPU);
    // SAFETY: the head is `node`, linked to 0.
    let _ = unsafe { pop_current(&mut a, &mut slots) };
    descriptors.push(armed_descriptor(&a));
    descriptors.extend(run_every_primitive(CPU, CPU).into_iter().map(|(_, d, _)| d));
    for (i, d) in descriptors.iter().enumerate() {
        assert!(
            !descriptors[i + 1..].contains(d),
            "descriptor {d:#x} is shared"
        );
    }
}
