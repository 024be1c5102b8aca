//! The sequences that read the CPU themselves (`*_on_current_cpu`) on a fake area.

use super::*;
use crate::pool::SlotTable;

/// Slots of 128 bytes (`SHIFT` 7) for CPUs `0..=OTHER_CPU`, each a word no sequence
/// here may touch, then a word: a counter, or a list head that is a lock holder's token
/// when odd (as `Stack` keeps it).
const SHIFT: u32 = 7;
const HEAD_AT: i32 = 8;
/// A lock holder's token (odd).
const TOKEN: usize = 0x1235;

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

/// A fake area whose `cpu_id_start` is `start` and `cpu_id` is `id`.
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

/// `slots` as the list sequences read them.
fn table_of(slots: &mut [CpuSlot]) -> SlotTable {
    SlotTable {
        base: slots.as_mut_ptr().cast::<u8>(),
        len: slots.len(),
    }
}

fn push_current(a: &mut Rseq, slots: &mut [CpuSlot], node: &mut Linked) -> Outcome {
    let table = table_of(slots);
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add_current`; `node.next` is exclusively borrowed.
    unsafe { arch::push_guarded_on_current_cpu::<SHIFT, HEAD_AT>(a, &table, &raw mut node.next) }
}

/// # Safety
///
/// Every non-zero head in `slots` is a live `Linked`.
unsafe fn pop_current(a: &mut Rseq, slots: &mut [CpuSlot]) -> Outcome<usize> {
    let table = table_of(slots);
    let _delay = crate::tests::delay_shared();
    // SAFETY: as in `add_current`, and the caller's contract for the heads.
    unsafe { arch::pop_guarded_on_current_cpu::<SHIFT, HEAD_AT, 0>(a, &table) }
}

/// Runs add, add-const and push on `slots` from area `a`, each of which must abort;
/// returns the link the push left in its node (77 before).
fn add_and_push_all_abort(a: &mut Rseq, slots: &mut [CpuSlot], n: usize) -> usize {
    assert_eq!(add_current(a, slots, n), Outcome::Aborted);
    assert_eq!(add_const_current::<1>(a, slots), Outcome::Aborted);
    let mut node = Linked {
        payload: 1,
        next: 77,
    };
    assert_eq!(push_current(a, slots, &mut node), Outcome::Aborted);
    node.next
}

#[test]
fn add_on_current_cpu_adds_to_the_slot_of_cpu_id_only() {
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
    let next = add_and_push_all_abort(&mut a, &mut slots, 5);
    // SAFETY: every head is 0.
    assert_eq!(unsafe { pop_current(&mut a, &mut slots) }, Outcome::Aborted);
    assert_eq!(next, 77);
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

/// The sequences read the CPU once, from `cpu_id`, after their section opens (a
/// migration from there on restarts them), so `cpu_id_start` does not matter: with
/// the two apart, they work on `cpu_id`'s slot.
#[test]
fn sequences_on_current_cpu_use_the_slot_of_cpu_id_read_inside_the_section() {
    let mut a = area_moved(CPU, OTHER_CPU);
    let mut slots = cpu_slots();
    assert_eq!(add_current(&mut a, &mut slots, 5), Outcome::Committed(()));
    assert_eq!(
        add_const_current::<2>(&mut a, &mut slots),
        Outcome::Committed(())
    );
    assert_eq!(slots[OTHER_CPU as usize].word, 7);
    assert_eq!(slots[CPU as usize], CpuSlot::default());
    let mut slots = cpu_slots();
    let mut only = Linked {
        payload: 2,
        next: 99,
    };
    assert_eq!(
        push_current(&mut a, &mut slots, &mut only),
        Outcome::Committed(())
    );
    assert_eq!(only.next, 0);
    let on_other = slots[OTHER_CPU as usize];
    assert_eq!((on_other.guard, on_other.word), (0, &raw mut only as usize));
    assert_eq!(slots[CPU as usize], CpuSlot::default());
    // SAFETY: the only non-zero head is `only`, linked to 0.
    let popped = unsafe { pop_current(&mut a, &mut slots) };
    assert_eq!(popped, Outcome::Committed(&raw mut only as usize));
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
        add_and_push_all_abort(&mut a, &mut slots, 1);
        // SAFETY: every head is 0.
        assert_eq!(unsafe { pop_current(&mut a, &mut slots) }, Outcome::Aborted);
        assert_eq!(slots, cpu_slots());
    }
}

#[test]
fn guarded_push_and_pop_on_current_cpu_use_the_slot_of_cpu_id_while_its_head_holds_no_token() {
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

    // A held lock (a holder's token in the head word) aborts both, before any store.
    slots[CPU as usize].word = TOKEN;
    let mut third = Linked {
        payload: 3,
        next: 99,
    };
    assert_eq!(
        push_current(&mut a, &mut slots, &mut third),
        Outcome::Aborted
    );
    assert_eq!(third.next, 99);
    // SAFETY: the non-zero even heads are live nodes linked to 0.
    assert_eq!(unsafe { pop_current(&mut a, &mut slots) }, Outcome::Aborted);
    assert_eq!(slots[CPU as usize].word, TOKEN);
    // The holder releases to the list; another CPU's held lock does not matter.
    slots[CPU as usize].word = &raw mut second as usize;
    slots[OTHER_CPU as usize].word = TOKEN;

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
