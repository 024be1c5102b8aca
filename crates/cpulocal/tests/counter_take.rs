//! `Counter::take` and `Counter::sum` while other threads add and take: every take and
//! every sum is a plausible value (never a wrapped negative), and takes plus what is
//! left account for every add exactly once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpulocal::Counter;

/// Far above anything this test can add: a value beyond it is a wrapped negative.
const PLAUSIBLE: u64 = 1 << 62;

#[test]
fn concurrent_takes_and_sums_never_see_a_negative_slot_and_lose_nothing() {
    let counter = Arc::new(Counter::new());
    let stop = Arc::new(AtomicBool::new(false));
    let added = Arc::new(AtomicU64::new(0));
    let adders: Vec<_> = (0..2)
        .map(|_| {
            let (counter, stop, added) = (counter.clone(), stop.clone(), added.clone());
            std::thread::spawn(move || {
                let mut mine = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        counter.add(1);
                    }
                    mine += 64;
                }
                added.fetch_add(mine, Ordering::Relaxed);
            })
        })
        .collect();
    let takers: Vec<_> = (0..2)
        .map(|_| {
            let (counter, stop) = (counter.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut taken, mut bad) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let t = counter.take();
                    bad += u64::from(t > PLAUSIBLE);
                    taken = taken.wrapping_add(t);
                    bad += u64::from(counter.sum() > PLAUSIBLE);
                }
                (taken, bad)
            })
        })
        .collect();
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    adders.into_iter().for_each(|a| a.join().unwrap());
    let (mut taken, mut bad) = (0u64, 0u64);
    for t in takers {
        let (t, b) = t.join().unwrap();
        taken = taken.wrapping_add(t);
        bad += b;
    }
    let added = added.load(Ordering::Relaxed);
    assert_eq!(bad, 0, "takes or sums returned wrapped (negative) values");
    assert_eq!(
        taken.wrapping_add(counter.sum()),
        added,
        "takes + rest == adds"
    );
    assert!(added > 0);
}
