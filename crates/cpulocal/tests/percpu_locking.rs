//! `PerCpu`'s locking promises that are not about throughput:
//!
//! - re-entry is detected: a thread that asks for a slot of a `PerCpu` whose slot it
//!   already holds panics with a message naming the mistake, whichever method it uses
//!   and whether or not it migrated in between; nesting two different `PerCpu`s works;
//! - panic safety: a panic in every method that runs user code (or while a guard lives)
//!   releases the slot, which the next holder gets as the panicking code left it;
//! - waiters sleep: four threads waiting for a slot held for 300 ms burn a small part
//!   of that in CPU time (with the membarrier scheme, the locked scheme and without
//!   rseq).
//!
//! Every check that could hang runs on a helper thread with a time limit.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cpulocal::{Index, PerCpu};

use common::{
    allowed_cpus, in_fallback_child, in_locked_scheme_child, serial, set_affinity, within_10s,
};

/// The message of a caught panic.
fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Asks a `PerCpu` for a slot (while the caller may hold one).
type Nested = fn(&PerCpu<u64>) -> u64;
/// Holds a slot of a `PerCpu` while running a [`Nested`] on it.
type Holder = fn(&PerCpu<u64>, Nested);
/// Does something with a `PerCpu` that panics.
type Panicking = fn(&PerCpu<u64>);

/// Runs `nested` (which asks `percpu` for a second slot) inside each way of holding a
/// first one, and checks that it panics naming the re-entry, and that the first slot
/// is free again afterwards.
fn nested_use_panics(index: Index, nested: Nested, name: &'static str) {
    within_10s(name, move || {
        let percpu = PerCpu::with_index(index, |_| 0u64);
        let holders: [(&str, Holder); 5] = [
            ("with_cpu", |p, n| {
                p.with_cpu(|_| n(p));
            }),
            ("lock", |p, n| {
                let _g = p.lock();
                n(p);
            }),
            ("on_cpu", |p, n| {
                p.on_cpu(0, |_| n(p)).unwrap();
            }),
            ("lock_cpu", |p, n| {
                let _g = p.lock_cpu(p.slots() - 1).unwrap();
                n(p);
            }),
            ("for_each", |p, n| {
                p.for_each(|_, _| {
                    n(p);
                })
            }),
        ];
        for (holder, hold) in holders {
            let err = catch_unwind(AssertUnwindSafe(|| hold(&percpu, nested)))
                .expect_err("nested use of one PerCpu must panic");
            let msg = message(&*err);
            assert!(
                msg.contains("already holds a slot of the same PerCpu"),
                "{name} inside {holder}: {msg}"
            );
            // The outer slot was released by the unwind.
            percpu.with_cpu(|v| *v += 1);
            for cpu in 0..percpu.slots() {
                percpu.on_cpu(cpu, |v| *v += 1).unwrap();
            }
        }
    });
}

#[test]
fn nested_with_cpu_panics_instead_of_hanging() {
    let _serial = serial();
    nested_use_panics(Index::Cpu, |p| p.with_cpu(|v| *v), "with_cpu");
    nested_use_panics(Index::MmCid, |p| p.with_cpu(|v| *v), "with_cpu (mm_cid)");
}

#[test]
fn nested_on_cpu_of_the_current_cpu_panics_instead_of_hanging() {
    let _serial = serial();
    nested_use_panics(
        Index::Cpu,
        |p| p.on_cpu(cpulocal::current_cpu(), |v| *v).unwrap(),
        "on_cpu(current_cpu())",
    );
}

#[test]
fn nested_for_each_and_lock_panic_instead_of_hanging() {
    let _serial = serial();
    nested_use_panics(
        Index::Cpu,
        |p| {
            let mut n = 0;
            p.for_each(|_, v| n += *v);
            n
        },
        "for_each",
    );
    nested_use_panics(Index::Cpu, |p| *p.lock(), "lock");
}

#[test]
fn nesting_after_a_migration_panics_too() {
    let _serial = serial();
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        println!("skipped: one allowed CPU, no migration possible");
        return;
    }
    within_10s("nested after migration", move || {
        let percpu = PerCpu::new(|_| 0u64);
        set_affinity(0, &[cpus[0]]).unwrap();
        let outer = percpu.lock();
        assert_eq!(outer.cpu(), cpus[0]);
        // Now on another CPU: its slot is free, so without the check this would lock it
        // and return (and hang only when the thread did not migrate).
        set_affinity(0, &[cpus[1]]).unwrap();
        assert_eq!(cpulocal::current_cpu(), cpus[1]);
        let err = catch_unwind(AssertUnwindSafe(|| drop(percpu.lock())))
            .expect_err("a second slot of one PerCpu must panic after a migration too");
        assert!(message(&*err).contains("already holds a slot"));
        drop(outer);
        set_affinity(0, &cpus).unwrap();
        percpu.with_cpu(|v| *v += 1);
    });
}

/// A guard taken by `with_cpu`'s fast path (the thread held nothing), dropped while a
/// slot of another `PerCpu` taken after it is still held: the re-entry check must keep
/// seeing that slot, also after a migration (where the current CPU's slot is free).
#[test]
fn nesting_is_detected_after_guards_dropped_out_of_order() {
    let _serial = serial();
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        println!("skipped: one allowed CPU, no migration possible");
        return;
    }
    within_10s("nesting after out-of-order drops", move || {
        let a = PerCpu::new(|_| 0u64);
        let b = PerCpu::new(|_| 0u64);
        set_affinity(0, &[cpus[0]]).unwrap();
        a.with_cpu(|v| *v += 1); // first use: sets the fast path up
        let ga = a.lock(); // the fast path
        let gb = b.lock(); // nested: the other path
        assert_eq!(gb.cpu(), cpus[0]);
        drop(ga); // b's slot is still held
        set_affinity(0, &[cpus[1]]).unwrap();
        assert_eq!(cpulocal::current_cpu(), cpus[1]);
        let err = catch_unwind(AssertUnwindSafe(|| drop(b.lock())))
            .expect_err("b's slot is held: a second slot of b must panic");
        assert!(message(&*err).contains("already holds a slot"));
        drop(gb);
        set_affinity(0, &cpus).unwrap();
        // Everything released: both work again, on whatever path.
        for _ in 0..3 {
            a.with_cpu(|v| *v += 1);
            b.with_cpu(|v| *v += 1);
        }
        let (mut ta, mut tb) = (0, 0);
        a.for_each(|_, v| ta += *v);
        b.for_each(|_, v| tb += *v);
        assert_eq!((ta, tb), (4, 3));
    });
}

/// The `PerCpu` of [`a_handler_right_after_a_fast_lock_is_refused_another_slot`].
#[cfg(feature = "__test-hooks")]
static WINDOW: PerCpu<u64> = PerCpu::new_lazy(|| 0);
/// What the handler there saw: `None` until it ran, then the panic's message, or
/// "no panic" if it got a second slot.
#[cfg(feature = "__test-hooks")]
static WINDOW_SEEN: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// A signal handler that arrives right after `with_cpu`'s fast path committed its lock
/// (before the lock is returned) and asks for *another* slot of the same `PerCpu` must
/// be refused like any nested request: two threads doing so on two CPUs would wait for
/// each other forever. (The same slot is refused by the wait, which finds the thread's
/// own token.) The test hook runs the "handler" at exactly that instruction.
/// (Needs the test hooks: `--features __test-hooks`, which CI's test run enables.)
#[test]
#[cfg(feature = "__test-hooks")]
fn a_handler_right_after_a_fast_lock_is_refused_another_slot() {
    let _serial = serial();
    within_10s("a handler right after a fast lock", || {
        WINDOW.with_cpu(|v| *v += 1); // first use: sets the fast path up
        fn handler() {
            let other = (cpulocal::current_cpu() + 1) % WINDOW.slots();
            let seen = match catch_unwind(AssertUnwindSafe(|| drop(WINDOW.lock_cpu(other)))) {
                Ok(()) => "no panic".to_string(),
                Err(panic) => message(&*panic),
            };
            *WINDOW_SEEN.lock().unwrap() = Some(seen);
        }
        cpulocal::test_hooks::run_after_fast_lock(handler);
        WINDOW.with_cpu(|v| *v += 1);
        match WINDOW_SEEN.lock().unwrap().take() {
            // No fast path here (no rseq, or the locked scheme): the window does not exist.
            None => println!(
                "skipped: with_cpu took no fast path (scheme {})",
                cpulocal::remote_scheme()
            ),
            Some(seen) => assert!(
                seen.contains("already holds a slot"),
                "a second slot taken right after a fast lock: {seen}"
            ),
        }
        let mut total = 0;
        WINDOW.for_each(|_, v| total += *v);
        assert_eq!(total, 2);
    });
}

/// The `PerCpu`s of [`a_handler_right_after_a_slow_lock_is_refused_another_slot`], and
/// what the handler there saw (as for the fast path's test above).
#[cfg(feature = "__test-hooks")]
static SLOW_WINDOW: PerCpu<u64> = PerCpu::new_lazy(|| 0);
#[cfg(feature = "__test-hooks")]
static SLOW_WINDOW_SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The same as [`a_handler_right_after_a_fast_lock_is_refused_another_slot`] for the
/// slow paths (`lock_cpu`, and `with_cpu` while another `PerCpu`'s slot is held), whose
/// window is wide: a signal that arrives during the membarrier fence of a remote
/// acquisition is delivered as the fence returns, with the token already in the word.
/// Two threads whose handlers nest there on two CPUs deadlocked (a reviewer's
/// reproducer, in 5 s) before the slow paths counted the slot before taking it.
#[test]
#[cfg(feature = "__test-hooks")]
fn a_handler_right_after_a_slow_lock_is_refused_another_slot() {
    let _serial = serial();
    within_10s("a handler right after a slow lock", || {
        fn handler() {
            let here = cpulocal::current_cpu() % SLOW_WINDOW.slots();
            let seen = [here, (here + 1) % SLOW_WINDOW.slots()].map(|cpu| {
                match catch_unwind(AssertUnwindSafe(|| drop(SLOW_WINDOW.lock_cpu(cpu)))) {
                    Ok(()) => format!("no panic for slot {cpu}"),
                    Err(panic) => message(&*panic),
                }
            });
            let fast = catch_unwind(AssertUnwindSafe(|| SLOW_WINDOW.with_cpu(|v| *v += 1)));
            let mut all = SLOW_WINDOW_SEEN.lock().unwrap();
            all.extend(seen);
            all.push(fast.map_or_else(|p| message(&*p), |()| "no panic for with_cpu".into()));
        }
        SLOW_WINDOW.with_cpu(|v| *v += 1); // first use
                                           // `lock_cpu` of each slot: the remote acquisition.
        for cpu in 0..SLOW_WINDOW.slots().min(2) {
            cpulocal::test_hooks::run_after_slow_lock(handler);
            drop(SLOW_WINDOW.lock_cpu(cpu).unwrap());
        }
        // `with_cpu` while another PerCpu's slot is held: its slow path.
        let other = PerCpu::new(|_| 0u64);
        other.with_cpu(|_| {
            cpulocal::test_hooks::run_after_slow_lock(handler);
            SLOW_WINDOW.with_cpu(|v| *v += 1);
        });
        let seen = std::mem::take(&mut *SLOW_WINDOW_SEEN.lock().unwrap());
        assert_eq!(seen.len(), 3 * (SLOW_WINDOW.slots().min(2) + 1), "{seen:?}");
        for s in &seen {
            assert!(
                s.contains("already holds a slot"),
                "a second slot taken right after a slow lock: {seen:?}"
            );
        }
        let mut total = 0;
        SLOW_WINDOW.for_each(|_, v| total += *v);
        assert_eq!(total, 2);
    });
}

/// A thread may hold 2,047 `PerCpu` slots at once; asking for one more panics *before*
/// taking it, so the slot stays free for every other thread.
#[test]
fn one_slot_too_many_panics_before_locking_it() {
    let _serial = serial();
    within_10s("one slot too many", || {
        let percpus: Vec<PerCpu<u64>> = (0..2048).map(|_| PerCpu::new(|_| 0u64)).collect();
        let (held, last) = percpus.split_at(2047);
        let guards: Vec<_> = held.iter().map(|p| p.lock()).collect();
        let err = catch_unwind(AssertUnwindSafe(|| drop(last[0].lock())))
            .expect_err("a 2,048th slot must be refused");
        assert!(
            message(&*err).contains("at most 2047"),
            "{}",
            message(&*err)
        );
        drop(guards);
        // Every slot of the refused PerCpu is free: another thread locks them all.
        let last = Arc::new(percpus.into_iter().last().unwrap());
        let other = Arc::clone(&last);
        std::thread::spawn(move || other.for_each(|_, v| *v += 1))
            .join()
            .unwrap();
        let mut total = 0;
        last.for_each(|_, v| total += *v);
        assert_eq!(total, last.slots() as u64);
    });
}

#[test]
fn different_percpus_nest() {
    let _serial = serial();
    within_10s("nesting two PerCpus", || {
        let a = PerCpu::new(|_| 0u64);
        let b = PerCpu::new(|_| 0u64);
        a.with_cpu(|x| {
            b.with_cpu(|y| *y += 1);
            for cpu in 0..b.slots() {
                b.on_cpu(cpu, |y| *y += 1).unwrap();
            }
            *x += 1;
        });
        // Guards of two PerCpus, dropped out of order.
        let ga = a.lock_cpu(0).unwrap();
        let gb = b.lock();
        drop(ga);
        a.with_cpu(|x| *x += 1);
        drop(gb);
        let (mut ta, mut tb) = (0, 0);
        a.for_each(|_, x| {
            ta += *x;
            b.for_each(|_, y| tb += *y);
        });
        assert_eq!(ta, 2);
        assert_eq!(tb, (1 + b.slots() as u64) * a.slots() as u64);
    });
}

/// A panic in each method that runs user code, or while a guard lives, releases the
/// slot; the next holder (this thread, and another) finds what the panicking code
/// wrote.
#[test]
fn a_panic_releases_the_slot_without_poisoning() {
    let _serial = serial();
    within_10s("panic safety", || {
        let percpu = Arc::new(PerCpu::new(|_| 0u64));
        let panics: [(&str, Panicking); 5] = [
            ("with_cpu", |p| {
                p.with_cpu(|v| {
                    *v += 1;
                    panic!("inside with_cpu")
                })
            }),
            ("lock", |p| {
                let mut g = p.lock();
                *g += 1;
                panic!("guard of lock alive")
            }),
            ("on_cpu", |p| {
                p.on_cpu(0, |v| {
                    *v += 1;
                    panic!("inside on_cpu")
                })
                .unwrap();
            }),
            ("lock_cpu", |p| {
                let mut g = p.lock_cpu(0).unwrap();
                *g += 1;
                panic!("guard of lock_cpu alive")
            }),
            ("for_each", |p| {
                p.for_each(|cpu, v| {
                    *v += 1;
                    if cpu + 1 == p.slots() {
                        panic!("inside for_each")
                    }
                })
            }),
        ];
        let mut expected = 0;
        for (method, panicking) in panics {
            catch_unwind(AssertUnwindSafe(|| panicking(&percpu)))
                .expect_err("the closure panicked");
            expected += if method == "for_each" {
                percpu.slots() as u64
            } else {
                1
            };
            // This thread may take every slot again (no stale "held" record) ...
            percpu.with_cpu(|_| ());
            // ... and so may another thread; the writes before the panic are kept.
            let other = Arc::clone(&percpu);
            let total = std::thread::spawn(move || {
                let mut total = 0;
                other.for_each(|_, v| total += *v);
                total
            })
            .join()
            .unwrap();
            assert_eq!(total, expected, "after a panic in {method}");
        }
    });
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    // SAFETY: timespec is plain old data.
    let mut ts: libc::timespec = unsafe { core::mem::zeroed() };
    // SAFETY: `ts` is a live timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Holds slot 0 for `hold` while four threads wait for it (two through `on_cpu(0)`, two
/// through `with_cpu` pinned to CPU 0 where CPU 0 may be used); returns the CPU time
/// they used in total.
fn waiters_cpu_time(hold: Duration) -> Duration {
    let percpu = Arc::new(PerCpu::new(|_| 0u64));
    let pin_to_0 = allowed_cpus().contains(&0);
    let guard = percpu.lock_cpu(0).unwrap();
    let ready = Arc::new(Barrier::new(5));
    let waiters: Vec<_> = (0..4)
        .map(|i| {
            let (percpu, ready) = (Arc::clone(&percpu), Arc::clone(&ready));
            std::thread::spawn(move || {
                let local = i % 2 == 1 && pin_to_0;
                if local {
                    set_affinity(0, &[0]).unwrap();
                }
                cpulocal::register_current_thread();
                ready.wait();
                let before = thread_cpu_time();
                if local {
                    percpu.with_cpu(|v| *v += 1);
                } else {
                    percpu.on_cpu(0, |v| *v += 1).unwrap();
                }
                thread_cpu_time() - before
            })
        })
        .collect();
    ready.wait();
    let start = Instant::now();
    std::thread::sleep(hold);
    drop(guard);
    let used: Duration = waiters.into_iter().map(|w| w.join().unwrap()).sum();
    let wall = start.elapsed();
    let mut total = 0;
    percpu.for_each(|_, v| total += *v);
    assert_eq!(total, 4);
    println!(
        "4 waiters on a slot held {wall:?}: {used:?} CPU in total ({:.1} % of the hold, scheme: {})",
        used.as_secs_f64() * 100.0 / wall.as_secs_f64(),
        cpulocal::remote_scheme()
    );
    used
}

/// What four waiters that spin and yield (`sched_yield`) instead of sleeping use over
/// `hold`, placed as in [`waiters_cpu_time`]: the yardstick for it in the same run.
fn yielding_waiters_cpu_time(hold: Duration) -> Duration {
    use std::sync::atomic::{AtomicBool, Ordering};
    let released = Arc::new(AtomicBool::new(false));
    let pin_to_0 = allowed_cpus().contains(&0);
    let ready = Arc::new(Barrier::new(5));
    let waiters: Vec<_> = (0..4)
        .map(|i| {
            let (released, ready) = (Arc::clone(&released), Arc::clone(&ready));
            std::thread::spawn(move || {
                if i % 2 == 1 && pin_to_0 {
                    set_affinity(0, &[0]).unwrap();
                }
                ready.wait();
                let before = thread_cpu_time();
                // Acquire: pairs with the Release store below.
                while !released.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                thread_cpu_time() - before
            })
        })
        .collect();
    ready.wait();
    std::thread::sleep(hold);
    released.store(true, Ordering::Release);
    let used = waiters.into_iter().map(|w| w.join().unwrap()).sum();
    println!("4 yielding waiters over {hold:?}: {used:?} CPU in total");
    used
}

/// Sleeping waiters use well under 1 % of the hold on an idle host (issue 8's target is
/// 5 %), but 5–13 % in the VM lane's emulated 16-vCPU arm64 guest, where the bounded
/// spin before sleeping is slow and the host is shared; waiters that spin and yield use
/// 25–200 %. So the bound is relative to yielding waiters measured in the same run: a
/// quarter of what they use (or 12.5 % of the hold, whichever is larger, for a machine
/// so loaded that the yielding waiters barely ran).
fn assert_waiters_sleep() {
    let hold = Duration::from_millis(300);
    let yielding = yielding_waiters_cpu_time(hold);
    let used = waiters_cpu_time(hold);
    let bound = (yielding / 4).max(hold / 8);
    assert!(
        used < bound,
        "4 waiters used {used:?} of CPU while the slot was held {hold:?} (yielding waiters: \
         {yielding:?}; bound {bound:?}): they do not sleep"
    );
}

#[test]
fn waiters_sleep_while_a_slot_is_held() {
    let _serial = serial();
    assert_waiters_sleep();
}

#[test]
fn waiters_sleep_with_the_locked_scheme() {
    let _serial = serial();
    in_locked_scheme_child("waiters_sleep_with_the_locked_scheme", assert_waiters_sleep);
}

#[test]
fn waiters_sleep_without_rseq() {
    let _serial = serial();
    in_fallback_child("waiters_sleep_without_rseq", assert_waiters_sleep);
}

/// One CPU number type and one name for the slot count across the structures: what
/// `current_cpu()` returns is what `on_cpu`, `lock_cpu`, `steal` and `consume` take, and
/// it is always below `slots()`.
#[test]
fn one_cpu_type_and_one_slot_count_everywhere() {
    let _serial = serial();
    let percpu: PerCpu<u64> = PerCpu::default();
    let stack = cpulocal::Stack::<u32>::new();
    let ring = cpulocal::ring::RingBuffer::new(cpulocal::ring::RingConfig::default()).unwrap();
    assert_eq!(percpu.slots(), stack.slots());
    assert_eq!(stack.slots(), ring.slots());
    assert_eq!(ring.slots(), cpulocal::possible_cpus());
    let cpu: usize = cpulocal::current_cpu();
    assert!(cpu < percpu.slots());
    percpu.on_cpu(cpu, |v| *v += 1).unwrap();
    drop(percpu.lock_cpu(cpu).unwrap());
    assert!(stack.steal(cpu).unwrap().is_none());
    assert_eq!(ring.consume(cpu, |_| ()).unwrap(), 0);
    let mid: usize = cpulocal::current_mm_cid();
    assert!(mid < percpu.slots());
}

/// `Stack`'s value API, and `pop_or_steal` finding what another CPU's list holds.
#[test]
fn pop_or_steal_takes_from_other_cpus_when_the_local_list_is_empty() {
    let _serial = serial();
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        println!("skipped: one allowed CPU");
        return;
    }
    within_10s("pop_or_steal", move || {
        let stack = cpulocal::Stack::new();
        set_affinity(0, &[cpus[0]]).unwrap();
        stack.push_value(String::from("made on the first CPU"));
        set_affinity(0, &[cpus[1]]).unwrap();
        assert_eq!(stack.pop_value(), None, "the second CPU's list is empty");
        assert_eq!(
            stack.pop_or_steal_value().as_deref(),
            Some("made on the first CPU")
        );
        assert_eq!(stack.pop_or_steal_value(), None);
        set_affinity(0, &cpus).unwrap();
    });
}
