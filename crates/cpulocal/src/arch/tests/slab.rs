//! The slab sequences (the allocator's per-CPU arrays) on a fake area.

use super::*;

/// A slab header `{current, end, begin, guard}` over `entries`.
pub(super) fn slab_header(entries: &mut [usize], used: usize) -> [usize; 4] {
    let begin = entries.as_mut_ptr() as usize;
    [begin + used * 8, begin + entries.len() * 8, begin, 0]
}

pub(super) fn slab_push(
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

pub(super) fn slab_pop(
    area: &mut Rseq,
    hdr: &mut [usize; 4],
    guard: usize,
    cpu: u32,
) -> Outcome<usize> {
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

/// The explicit-CPU pop takes any value as an item (the public `ops::slab_pop` does),
/// the smallest ones included.
#[test]
fn slab_pop_returns_any_item_even_the_smallest_values() {
    let mut entries = [0usize, 1, 2, 3, usize::MAX];
    let mut hdr = slab_header(&mut entries, 5);
    let mut a = area(CPU);
    for item in [usize::MAX, 3, 2, 1, 0] {
        assert_eq!(slab_pop(&mut a, &mut hdr, 0, CPU), Outcome::Committed(item));
    }
    assert_eq!(slab_pop(&mut a, &mut hdr, 0, CPU), Outcome::CompareFailed);
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

// The slab sequences that read the CPU themselves (`slab_*_on_current_cpu`).

/// log2 of a fake slab's size: a header and 12 entries.
const SLAB_SHIFT: u32 = 7;

/// One CPU's fake slab: a header over its own entries.
#[repr(C, align(128))]
struct CpuSlab {
    hdr: [usize; 4],
    entries: [usize; 12],
}

const _: () = assert!(core::mem::size_of::<CpuSlab>() == 1 << SLAB_SHIFT);

/// Slabs for CPUs `0..=OTHER_CPU`, each header empty over its entries, boxed so the
/// headers' addresses stay valid.
fn cpu_slabs() -> Box<[CpuSlab]> {
    let mut slabs: Box<[CpuSlab]> = (0..=OTHER_CPU)
        .map(|_| CpuSlab {
            hdr: [0; 4],
            entries: [0; 12],
        })
        .collect();
    for s in slabs.iter_mut() {
        let begin = s.entries.as_mut_ptr() as usize;
        s.hdr = [begin, begin + 12 * 8, begin, 0];
    }
    slabs
}

fn slab_push_current(a: &mut Rseq, slabs: &mut [CpuSlab], item: usize) -> Outcome {
    let (base, len) = (slabs.as_mut_ptr().cast::<u8>(), slabs.len());
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add`; every slab below `len` is in `slabs`, exclusively borrowed,
    // its header over its own entries.
    unsafe { arch::slab_push_on_current_cpu::<SLAB_SHIFT>(a, base, len, item) }
}

fn slab_pop_current(a: &mut Rseq, slabs: &mut [CpuSlab]) -> Outcome<usize> {
    let (base, len) = (slabs.as_mut_ptr().cast::<u8>(), slabs.len());
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `slab_push_current`.
    unsafe { arch::slab_pop_on_current_cpu::<SLAB_SHIFT>(a, base, len) }
}

/// Items are pointers, dangling ones to zero-sized values included: the alignment, as
/// small as 1. The pop hands them all back.
#[test]
fn slab_pop_on_current_cpu_returns_the_smallest_pointers() {
    let mut a = area(CPU);
    let mut slabs = cpu_slabs();
    for item in [1, 2, 4, 8] {
        assert_eq!(
            slab_push_current(&mut a, &mut slabs, item),
            Outcome::Committed(())
        );
    }
    for item in [8, 4, 2, 1] {
        assert_eq!(
            slab_pop_current(&mut a, &mut slabs),
            Outcome::Committed(item)
        );
    }
    assert_eq!(slab_pop_current(&mut a, &mut slabs), Outcome::CompareFailed);
}

#[test]
fn slab_sequences_on_current_cpu_use_the_slab_of_cpu_id() {
    // `cpu_id_start` says another CPU: the sequences read `cpu_id` in their section.
    let mut a = Rseq {
        cpu_id_start: CPU,
        ..area(OTHER_CPU)
    };
    let mut slabs = cpu_slabs();
    for item in [8, 16] {
        assert_eq!(
            slab_push_current(&mut a, &mut slabs, item),
            Outcome::Committed(())
        );
    }
    armed_descriptor(&a);
    let other = &slabs[OTHER_CPU as usize];
    assert_eq!(other.entries[..2], [8, 16]);
    assert_eq!(other.hdr[0], other.hdr[2] + 16);
    let untouched = cpu_slabs();
    for c in 0..OTHER_CPU as usize {
        assert_eq!(slabs[c].entries, untouched[c].entries, "slab {c}");
        assert_eq!(slabs[c].hdr[0], slabs[c].hdr[2], "slab {c}");
    }
    assert_eq!(slab_pop_current(&mut a, &mut slabs), Outcome::Committed(16));
    assert_eq!(slab_pop_current(&mut a, &mut slabs), Outcome::Committed(8));
    assert_eq!(slab_pop_current(&mut a, &mut slabs), Outcome::CompareFailed);
    let fresh = Rseq {
        cpu_id_start: CPU,
        ..area(OTHER_CPU)
    };
    assert_eq!(kernel_fields(&a), kernel_fields(&fresh));
}

#[test]
fn slab_sequences_on_current_cpu_stop_at_a_full_slab_a_locked_header_or_a_cpu_beyond_the_table() {
    let mut a = area(CPU);
    let mut slabs = cpu_slabs();
    for item in 1..=12 {
        assert_eq!(
            slab_push_current(&mut a, &mut slabs, item * 8),
            Outcome::Committed(())
        );
    }
    assert_eq!(
        slab_push_current(&mut a, &mut slabs, 13 * 8),
        Outcome::CompareFailed
    );
    // A locked header (`end` 0, `begin` usize::MAX: the slab's lock holder works on it)
    // fails both bound checks, before any store.
    let cpu = CPU as usize;
    let unlocked = slabs[cpu].hdr;
    slabs[cpu].hdr[1] = 0;
    slabs[cpu].hdr[2] = usize::MAX;
    let locked = slabs[cpu].hdr;
    assert_eq!(slab_pop_current(&mut a, &mut slabs), Outcome::CompareFailed);
    slabs[cpu].hdr[0] -= 8;
    assert_eq!(
        slab_push_current(&mut a, &mut slabs, 99 * 8),
        Outcome::CompareFailed
    );
    assert_eq!(slabs[cpu].hdr, [locked[0] - 8, 0, usize::MAX, 0]);
    assert_eq!(slabs[cpu].entries[11], 12 * 8);
    // The guard word is the batch sequences' lock: these read only the bounds.
    slabs[cpu].hdr = unlocked;
    slabs[cpu].hdr[3] = 1;
    assert_eq!(
        slab_pop_current(&mut a, &mut slabs),
        Outcome::Committed(12 * 8)
    );
    // The table stops before CPU, or the area is not registered: nothing is touched.
    let mut short = cpu_slabs();
    let short = &mut short[..CPU as usize];
    assert_eq!(slab_push_current(&mut a, short, 8), Outcome::Aborted);
    assert_eq!(slab_pop_current(&mut a, short), Outcome::Aborted);
    for cpu_id in [RSEQ_CPU_ID_UNINITIALIZED, RSEQ_CPU_ID_REGISTRATION_FAILED] {
        let mut a = Rseq {
            cpu_id_start: 0,
            ..area(cpu_id)
        };
        let mut slabs = cpu_slabs();
        assert_eq!(slab_push_current(&mut a, &mut slabs, 8), Outcome::Aborted);
        assert_eq!(slab_pop_current(&mut a, &mut slabs), Outcome::Aborted);
        assert!(slabs.iter().all(|s| s.hdr[0] == s.hdr[2]));
    }
}
