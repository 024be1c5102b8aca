//! `PerCpu`'s by-value views: `for_each` visits the slots in CPU order, `iter_mut` yields
//! the slots used so far, and `into_vec` gives one value per possible CPU, in CPU order,
//! with `init()` for the slots a lazy `PerCpu` never used (all of them if it was never
//! used at all).

use super::delay_shared;
use crate::{Index, PerCpu};

#[test]
fn for_each_and_into_vec_go_in_cpu_order() {
    let _delay = delay_shared();
    let cpus = crate::possible_cpus();
    for index in [Index::Cpu, Index::MmCid] {
        let p = PerCpu::with_index(index, |cpu| cpu);
        let mut seen = Vec::new();
        p.for_each(|cpu, v| seen.push((cpu, *v)));
        assert_eq!(seen, (0..cpus).map(|c| (c, c)).collect::<Vec<_>>());
        assert_eq!(p.into_vec(), (0..cpus).collect::<Vec<_>>());
    }
}

#[test]
fn a_never_used_lazy_per_cpu_gives_init_for_every_slot_and_iterates_nothing() {
    let _delay = delay_shared();
    let mut p: PerCpu<u32> = PerCpu::new_lazy(|| 7);
    assert_eq!(p.iter_mut().count(), 0, "no slot used, none yielded");
    let all = p.into_vec();
    assert_eq!(all, vec![7; crate::possible_cpus()]);
}

#[test]
fn iter_mut_of_a_lazy_per_cpu_yields_the_slots_used_so_far() {
    let _delay = delay_shared();
    let mut p: PerCpu<u32> = PerCpu::with_index_lazy(Index::Cpu, || 1);
    p.on_cpu(0, |v| *v += 10).unwrap();
    let last = p.slots() - 1;
    p.on_cpu(last, |v| *v += 20).unwrap();
    let mut got: Vec<u32> = p.iter_mut().map(|v| *v).collect();
    got.sort();
    let expected = if last == 0 { vec![31] } else { vec![11, 21] };
    assert_eq!(got, expected);
    // `iter_mut` writes reach the slots.
    p.iter_mut().for_each(|v| *v = 0);
    let mut total = 0;
    p.for_each(|_, v| total += *v);
    assert_eq!(total, 0);
}
