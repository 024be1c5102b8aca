//! `RingBuffer::wait` and `notify`: a consumer sleeps until there is data and is woken
//! by the producers whose commits fill a sub-buffer, by a consumer that hands a claimed
//! sub-buffer back unread, or by `notify`; `wait` returns at once when data is there and
//! times out when none comes.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cpulocal::ring::{Mode, RingBuffer, RingConfig};

use common::ring::{config, write_pinned, Pinned};
use common::serial;

/// A consumer asleep in `wait` with a long timeout is woken by the producer whose
/// commit fills a sub-buffer, round after round (a lost wake-up would leave it asleep
/// until its timeout).
#[test]
fn a_sleeping_consumer_is_woken_when_a_sub_buffer_fills() {
    let _serial = serial();
    const TIMEOUT: Duration = Duration::from_secs(5);
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            let mut records = 0;
            let mut rounds = 0;
            while records < 16 * 50 {
                let start = Instant::now();
                let ready = ring.wait(TIMEOUT);
                assert!(
                    start.elapsed() < TIMEOUT,
                    "a wake-up was lost: the consumer slept until its timeout"
                );
                if ready {
                    rounds += 1;
                }
                for cpu in 0..ring.slots() {
                    records += ring.consume(cpu, |_| {}).expect("cpu < cpus");
                }
            }
            done.store(true, Ordering::Relaxed);
            rounds
        });
        // 50 sub-buffers of 16 records, one at a time, with pauses that let the
        // consumer fall asleep between them.
        let _pinned = Pinned::new();
        'produce: for round in 0..50u8 {
            std::thread::sleep(Duration::from_millis(2));
            for i in 0..16u8 {
                while ring.write(&[round, i]).is_err() {
                    if consumer.is_finished() {
                        break 'produce; // it failed: report its panic below
                    }
                    std::thread::yield_now(); // full: the consumer catches up
                }
            }
        }
        let rounds = consumer.join().expect("the consumer");
        assert!(rounds >= 1);
        assert!(done.load(Ordering::Relaxed));
    });
}

/// The scheduler state of thread `tid` of this process ('S': asleep).
fn thread_state(tid: libc::pid_t) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // The state is the first field after the parenthesised thread name.
    stat.rsplit_once(") ")?.1.chars().next()
}

/// A consumer that calls `wait` while another holds the claim on the only complete
/// sub-buffer, and then hands it back unread (its callback panicked), sees the
/// sub-buffer once it is handed back: no producer commit is left to wake it, so it must
/// not sleep its whole timeout (before the fix it did: the claimed sub-buffer counted
/// neither as complete nor as pending).
#[test]
fn a_waiting_consumer_sees_a_sub_buffer_handed_back_unread_by_another() {
    let _serial = serial();
    const TIMEOUT: Duration = Duration::from_secs(10);
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    // The callback fails on the first record: the second stays unread.
    let cpu = write_pinned(&ring, 2);
    ring.flush(cpu).expect("cpu < cpus");
    let waiter_tid = std::sync::atomic::AtomicI32::new(0);
    let (claimed, claimed_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let holder = s.spawn(|| {
            catch_unwind(AssertUnwindSafe(|| {
                ring.consume(cpu, |_| {
                    claimed.send(()).expect("the waiter");
                    // Hand the claim back only once the waiter sleeps in `wait`, so
                    // that nothing but the hand-back can show it the sub-buffer.
                    loop {
                        let tid = waiter_tid.load(Ordering::Acquire);
                        if tid != 0 && thread_state(tid) == Some('S') {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    panic!("the consumer's callback failed");
                })
            }))
        });
        claimed_rx
            .recv()
            .expect("the holder claimed the sub-buffer");
        waiter_tid.store(common::gettid(), Ordering::Release);
        let start = Instant::now();
        let ready = ring.wait(TIMEOUT);
        let slept = start.elapsed();
        assert!(holder.join().expect("the holder").is_err());
        assert!(ready, "wait timed out with a complete sub-buffer there");
        assert!(
            slept < TIMEOUT / 2,
            "the waiter slept {slept:?} through the hand-back"
        );
    });
    let mut unread = Vec::new();
    ring.consume(cpu, |rec| unread.push(rec.data[0]))
        .expect("cpu < cpus");
    assert_eq!(unread, [1]);
}

#[test]
fn notify_wakes_a_sleeping_consumer() {
    let _serial = serial();
    let ring = RingBuffer::new(RingConfig::default()).expect("valid config");
    std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            let start = Instant::now();
            let ready = ring.wait(Duration::from_secs(20));
            (ready, start.elapsed())
        });
        while !consumer.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
            ring.notify();
        }
        let (ready, slept) = consumer.join().expect("the consumer");
        assert!(!ready);
        assert!(slept < Duration::from_secs(10), "notify did not wake it");
    });
}

#[test]
fn wait_returns_at_once_when_data_is_there_and_times_out_when_not() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    assert!(!ring.wait(Duration::from_millis(1)));
    assert!(!ring.wait(Duration::ZERO));
    let cpu = write_pinned(&ring, 1);
    assert!(
        !ring.wait(Duration::from_millis(1)),
        "an open sub-buffer is not ready"
    );
    ring.flush(cpu).expect("cpu < cpus");
    assert!(ring.wait(Duration::ZERO));
    assert!(ring.wait(Duration::MAX));
}
