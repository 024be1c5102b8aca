//! `Counter`'s small promises.

use std::sync::Arc;

use super::delay_shared;
use crate::Counter;

#[test]
fn default_counter_is_zero() {
    let _delay = delay_shared();
    let c = Counter::default();
    assert_eq!(c.sum(), 0);
    assert_eq!(c.slow_path_sum(), 0);
}

#[test]
fn sum_is_zero_after_reset_and_counts_again() {
    let _delay = delay_shared();
    let c = Counter::new();
    for i in 0..1000 {
        c.add(i);
    }
    assert_eq!(c.sum(), 999 * 1000 / 2);
    c.reset();
    assert_eq!(c.sum(), 0);
    assert_eq!(c.slow_path_sum(), 0);
    c.add(7);
    assert_eq!(c.sum(), 7);
}

#[test]
fn sum_is_zero_after_reset_of_slots_written_by_many_threads() {
    let _delay = delay_shared();
    let c = Arc::new(Counter::new());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || (0..10_000).for_each(|_| c.add(3)))
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().expect("adder"));
    let c = Arc::into_inner(c).expect("the adders are gone");
    assert_eq!(c.sum(), 120_000);
    c.reset();
    assert_eq!(c.sum(), 0);
}

#[test]
fn sum_wraps_at_two_to_the_64() {
    let _delay = delay_shared();
    let c = Counter::new();
    c.add(u64::MAX);
    c.add(2);
    assert_eq!(c.sum(), 1);
    // Adding 2^64 - 1 subtracts one.
    c.add(10);
    c.add(u64::MAX);
    assert_eq!(c.sum(), 10);
    // Wrapping also across slots: adds from other threads (likely other CPUs).
    let c = Arc::new(Counter::new());
    let far = {
        let c = Arc::clone(&c);
        std::thread::spawn(move || c.add(u64::MAX - 1))
    };
    far.join().expect("adder");
    c.add(5);
    assert_eq!(c.sum(), 3);
}

#[test]
fn debug_shows_the_sum_and_the_slot_count() {
    let _delay = delay_shared();
    let c = Counter::new();
    c.add(41);
    c.add(1);
    assert_eq!(
        format!("{c:?}"),
        format!("Counter {{ sum: 42, slots: {} }}", crate::possible_cpus())
    );
}
