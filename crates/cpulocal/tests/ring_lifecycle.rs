//! `RingBuffer` under real use: configurations too large for the machine are refused
//! with their reason (never an abort), a panic in any user code the ring runs leaves it
//! claimed by nobody and loses no record, flush padding is counted, records can be
//! written in place (`io::Write`, `write_with`, `truncate`), a configuration is checked
//! at each bound, a full ring refuses the newest record (also when overwriting, while
//! the oldest sub-buffer is being read), a second consumer of a ring being read returns
//! at once, a record's timestamp is its reserve's `CLOCK_MONOTONIC` time, and a
//! reservation may be committed by another thread. A consumer's wait for data is in
//! `ring_wait.rs`.

mod common;

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cpulocal::ring::{monotonic_ns, ConfigError, Mode, RingBuffer, RingConfig, MAX_RESERVED_BYTES};

use common::ring::{config, drain, write_pinned, Pinned};
use common::{allowed_cpus, in_child, serial, set_affinity, within_10s};

/// `flush_all` + `consume_all` read every CPU's records, each tagged with the CPU whose
/// ring held it, in order per CPU, once.
#[test]
fn consume_all_reads_every_cpus_records_once_in_order_per_cpu() {
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("ring");
    let cpus = allowed_cpus();
    std::thread::scope(|s| {
        for (i, &cpu) in cpus.iter().enumerate() {
            let ring = &ring;
            s.spawn(move || {
                set_affinity(0, &[cpu]).expect("sched_setaffinity");
                for n in 0..5u8 {
                    ring.write(&[i as u8, n]).expect("room");
                }
            });
        }
    });
    ring.flush_all();
    let mut by_writer = vec![Vec::new(); cpus.len()];
    let read = ring.consume_all(|rec| {
        let writer = usize::from(rec.data[0]);
        assert_eq!(rec.cpu, cpus[writer], "the record names its ring's CPU");
        by_writer[writer].push(rec.data[1]);
    });
    assert_eq!(read, 5 * cpus.len());
    for got in &by_writer {
        assert_eq!(got, &[0, 1, 2, 3, 4]);
    }
    assert_eq!(ring.consume_all(|_| {}), 0, "nothing is read twice");
}

#[test]
fn a_configuration_larger_than_the_address_space_is_refused_not_aborted() {
    // 2^30 × 2^20 bytes per CPU: used to abort the process ("memory allocation of
    // 1125899906842624 bytes failed").
    let huge = RingConfig {
        sub_buffer_size: 1 << 30,
        sub_buffers: 1 << 20,
        ..RingConfig::default()
    };
    let err = RingBuffer::new(huge).expect_err("2^50 bytes per CPU");
    assert!(
        matches!(err, ConfigError::TooLarge { bytes, .. } if bytes > u128::from(MAX_RESERVED_BYTES)),
        "{err:?}"
    );
    assert!(err.to_string().contains("address space"), "{err}");

    // 2^34 sub-buffers of 4 KiB: a power of two, so the message must not say it is not.
    let many = RingConfig {
        sub_buffer_size: 4096,
        sub_buffers: 1 << 34,
        ..RingConfig::default()
    };
    let err = RingBuffer::new(many).expect_err("2^46 bytes per CPU");
    assert!(matches!(err, ConfigError::TooLarge { .. }), "{err:?}");
    assert!(!err.to_string().contains("power of two"), "{err}");

    // Products that overflow a usize are refused the same way.
    let overflow = RingConfig {
        sub_buffer_size: 1 << 30,
        sub_buffers: 1 << 62,
        ..RingConfig::default()
    };
    assert!(matches!(
        RingBuffer::new(overflow),
        Err(ConfigError::TooLarge { .. })
    ));

    // Not a power of two: that reason.
    let odd = RingConfig {
        sub_buffers: 3,
        ..RingConfig::default()
    };
    assert_eq!(RingBuffer::new(odd).err(), Some(ConfigError::SubBuffers(3)));
}

#[test]
fn a_configuration_over_rlimit_as_is_refused_with_that_reason() {
    let _serial = serial();
    in_child(
        "a_configuration_over_rlimit_as_is_refused_with_that_reason",
        &[],
        || {
            // Below the stated limit, above an address-space rlimit of 16 GiB.
            let limit = libc::rlimit {
                rlim_cur: 16 << 30,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: `limit` is a live rlimit; lowering our own soft limit is allowed.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
            // About 32 GiB in all (at least 2 GiB per CPU), whatever the number of
            // possible CPUs up to 512: over the rlimit, under the 2^40 stated limit.
            let sub_buffers = (32 / cpulocal::possible_cpus()).next_power_of_two().max(2);
            let big = RingConfig {
                sub_buffer_size: 1 << 30,
                sub_buffers,
                ..RingConfig::default()
            };
            let err = RingBuffer::new(big).expect_err("32 GiB over a 16 GiB RLIMIT_AS");
            assert_eq!(
                err,
                ConfigError::OverAddressSpaceLimit {
                    bytes: match err {
                        ConfigError::OverAddressSpaceLimit { bytes, .. } => bytes,
                        _ => 0,
                    },
                    limit: 16 << 30
                },
                "{err}"
            );
            assert!(err.to_string().contains("RLIMIT_AS"), "{err}");
        },
    );
}

/// Flushing a ring with no sub-buffer open takes no lock and fences no CPU, so a consumer
/// that flushes on a timer costs idle CPUs nothing. (In the VM lane's 16-vCPU guests, an
/// idle tracing writer flushing 16 rings every 100 ms, a membarrier each, was never seen
/// asleep.) A ring with a record in an open sub-buffer still takes the lock and fences
/// that CPU.
#[test]
#[cfg(feature = "__test-hooks")]
fn flushing_idle_rings_fences_no_cpu() {
    let _serial = serial();
    in_child("flushing_idle_rings_fences_no_cpu", &[], || {
        use cpulocal::test_hooks::fences;
        if cpulocal::remote_scheme() != cpulocal::remote::Scheme::Membarrier {
            println!(
                "skipped: no membarrier fences here ({})",
                cpulocal::remote_scheme()
            );
            return;
        }
        let ring = RingBuffer::new(RingConfig::default()).unwrap();
        let before = fences();
        for _ in 0..10 {
            ring.flush_all();
        }
        assert_eq!(fences() - before, 0, "flushing idle rings fenced CPUs");
        let cpu = write_pinned(&ring, 1);
        let before = fences();
        ring.flush(cpu).unwrap();
        assert_eq!(
            fences() - before,
            1,
            "the open sub-buffer's flush fences its CPU"
        );
        ring.flush_all();
        assert_eq!(fences() - before, 1, "a flushed ring is idle again");
        let mut records = 0;
        ring.consume_all(|_| records += 1);
        assert_eq!(records, 1);
    });
}

fn panic_in_consume_leaves_nothing_claimed(mode: Mode) {
    let _serial = serial();
    let ring = RingBuffer::new(config(mode)).expect("valid config");
    // 20 records of 16 bytes (header and padded payload): two 256-byte sub-buffers.
    let cpu = write_pinned(&ring, 20);
    ring.flush(cpu).expect("cpu < cpus");
    let mut seen = Vec::new();
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        ring.consume(cpu, |rec| {
            seen.push(rec.data[0]);
            if rec.data[0] == 3 {
                panic!("the consumer's callback failed");
            }
        })
    }));
    assert!(panicked.is_err());
    assert_eq!(seen, [0, 1, 2, 3]);
    // The rest, once each, in order: nothing stays claimed.
    ring.consume(cpu, |rec| seen.push(rec.data[0]))
        .expect("cpu < cpus");
    assert_eq!(seen, (0..20).collect::<Vec<u8>>());
    // And the ring takes records again (it refused nearly all when a claim leaked).
    let refused = (0..200u8)
        .filter(|&i| {
            let cpu = write_pinned(&ring, 1);
            let ok = ring.write(&[i]).is_ok();
            ring.consume(cpu, |_| {}).expect("cpu < cpus");
            !ok
        })
        .count();
    assert_eq!(refused, 0, "{:?}", ring.stats());
    assert_eq!(ring.stats().overwritten, 0);
}

#[test]
fn a_panic_in_consume_leaves_nothing_claimed_and_the_rest_is_delivered() {
    panic_in_consume_leaves_nothing_claimed(Mode::DiscardNewest);
}

#[test]
fn a_panic_in_consume_leaves_nothing_claimed_when_overwriting() {
    panic_in_consume_leaves_nothing_claimed(Mode::OverwriteOldest);
}

/// After a panic mid-sub-buffer, an overwriting producer that drops that sub-buffer
/// counts only its unread records as overwritten.
#[test]
fn an_overwrite_after_a_panic_counts_only_unread_records() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::OverwriteOldest)).expect("valid config");
    let pinned = Pinned::new();
    let cpu = pinned.cpu();
    // 16 records fill exactly one 256-byte sub-buffer.
    for i in 0..16u8 {
        ring.write(&[i]).expect("room");
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        ring.consume(cpu, |rec| assert!(rec.data[0] < 5, "stop after 5 records"))
    }));
    // Fill the other three sub-buffers and one more record: the oldest is dropped.
    for i in 0..(3 * 16 + 1) {
        ring.write(&[i as u8]).expect("overwrite makes room");
    }
    drop(pinned);
    assert_eq!(ring.stats().overwritten, 10, "{:?}", ring.stats());
}

#[test]
fn a_panic_while_filling_a_reservation_abandons_it_and_the_ring_goes_on() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let pinned = Pinned::new();
    // Through `write_with`.
    let r = catch_unwind(AssertUnwindSafe(|| {
        ring.write_with(8, |_| panic!("formatting failed"))
    }));
    assert!(r.is_err());
    // Through a reservation held across a panic.
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut res = ring.reserve(8).expect("room");
        res.payload_mut().fill(1);
        panic!("the producer failed mid-record");
    }));
    assert!(r.is_err());
    // A closure that claims more than it reserved: a panic, and no harm.
    let r = catch_unwind(AssertUnwindSafe(|| ring.write_with(8, |_| 9)));
    assert!(r.is_err());
    ring.write(b"after").expect("room");
    drop(pinned);
    assert_eq!(drain(&ring), [b"after".to_vec()]);
    assert_eq!(ring.stats().abandoned, 3);
}

#[test]
fn flush_after_a_panic_in_consume_hands_over_the_open_sub_buffer() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let cpu = write_pinned(&ring, 20);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        ring.consume(cpu, |_| panic!("first record"))
    }));
    // The open sub-buffer (records 16..20) is handed over by the flush, and the rest of
    // the first one is still there.
    ring.flush(cpu).expect("cpu < cpus");
    let mut seen = Vec::new();
    ring.consume(cpu, |rec| seen.push(rec.data[0]))
        .expect("cpu < cpus");
    assert_eq!(seen, (1..20).collect::<Vec<u8>>());
}

#[test]
fn flush_padding_is_counted_in_the_stats() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let cpu = write_pinned(&ring, 3); // 48 bytes of a 256-byte sub-buffer
    ring.flush(cpu).expect("cpu < cpus");
    ring.flush(cpu).expect("cpu < cpus"); // nothing open: no padding
    let stats = ring.stats();
    assert_eq!(stats.flushes, 1, "{stats:?}");
    assert_eq!(stats.flush_padding_bytes, 256 - 48, "{stats:?}");
}

#[test]
fn records_are_written_in_place_with_io_write_and_truncate() {
    let _serial = serial();
    let ring = RingBuffer::new(RingConfig::default()).expect("valid config");
    let pinned = Pinned::new();
    let mut r = ring.reserve(40).expect("room");
    let (user, action) = (42, "login");
    write!(r, "user={user} action={action}").expect("fits");
    assert_eq!(r.written(), 20);
    let n = r.written();
    r.truncate(n);
    assert_eq!(r.len(), 20);
    r.commit();
    // Past the end: what fits, then WriteZero.
    let mut r = ring.reserve(4).expect("room");
    assert_eq!(r.write(b"abcdef").expect("a short write"), 4);
    assert_eq!(
        r.write_all(b"g").expect_err("full").kind(),
        std::io::ErrorKind::WriteZero
    );
    r.commit();
    let n = ring
        .write_with(16, |buf| {
            buf[..3].copy_from_slice(b"xyz");
            3
        })
        .expect("room");
    assert_eq!(n, 3);
    drop(pinned);
    assert_eq!(
        drain(&ring),
        [
            b"user=42 action=login".to_vec(),
            b"abcd".to_vec(),
            b"xyz".to_vec()
        ]
    );
}

/// Records whose size does not divide the sub-buffer: each one that would cross a
/// sub-buffer's end starts the next one instead (the tail becomes padding), on the
/// inline reserve and on the out-of-line one alike. Every record comes back once, in
/// order, intact, and the consumer never stops at a sub-buffer whose counts are wrong.
#[test]
fn records_that_do_not_divide_the_sub_buffer_move_to_the_next_one_and_none_is_lost() {
    let _serial = serial();
    let pinned = Pinned::new();
    // 256-byte sub-buffers; payload sizes 1..=60 give records of 16..=72 bytes.
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid configuration");
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for i in 0..5_000u32 {
        let len = 1 + (i as usize * 7) % 60;
        let mut rec = vec![(i % 251) as u8; len];
        rec[..4.min(len)].copy_from_slice(&i.to_le_bytes()[..4.min(len)]);
        ring.write(&rec).expect("the consumer keeps up: never full");
        sent.push(rec);
        // Reads only complete sub-buffers: the open one stays with the producer.
        ring.consume(pinned.cpu(), |r| got.push(r.data.to_vec()))
            .expect("a valid CPU");
    }
    got.extend(drain(&ring));
    assert_eq!(ring.stats().discarded, 0);
    assert_eq!(got.len(), sent.len(), "records lost or duplicated");
    assert!(got == sent, "records out of order or corrupted");
}

/// The bounds of a configuration, at each edge: a sub-buffer of 64 bytes to 2^30, a
/// power of two; at least 2 sub-buffers, a power of two. Each refusal names its field.
#[test]
fn a_configuration_is_accepted_up_to_each_bound_and_refused_one_step_beyond() {
    let with = |sub_buffer_size, sub_buffers| RingConfig {
        sub_buffer_size,
        sub_buffers,
        ..RingConfig::default()
    };
    for (size, subs) in [(64, 2), (1 << 30, 2)] {
        let ring = RingBuffer::new(with(size, subs)).expect("at the bounds");
        assert_eq!(ring.max_payload(), size - 16, "header and timestamp");
    }
    for size in [0, 32, 63, 65, 96, 1 << 31] {
        let err = RingBuffer::new(with(size, 2)).expect_err("sub_buffer_size");
        assert_eq!(err, ConfigError::SubBufferSize(size));
        assert!(err.to_string().contains(&size.to_string()), "{err}");
    }
    for subs in [0, 1, 3, 6] {
        let err = RingBuffer::new(with(64, subs)).expect_err("sub_buffers");
        assert_eq!(err, ConfigError::SubBuffers(subs));
        assert!(
            err.to_string().starts_with(&format!("{subs} sub-buffers")),
            "{err}"
        );
    }
}

/// `DiscardNewest`: a ring holds exactly its capacity, the next record is refused with
/// `Full` and counted as discarded, and the records already there are kept, in order.
#[test]
fn a_full_ring_refuses_the_newest_record_with_full_and_keeps_the_others() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let pinned = Pinned::new();
    // 16 records of 16 bytes fill a 256-byte sub-buffer: 64 fill the 4 of the ring.
    for i in 0..64u8 {
        ring.write(&[i]).expect("room");
    }
    let err = ring.write(&[64]).expect_err("the ring is full");
    assert_eq!(err, cpulocal::ring::ReserveError::Full);
    assert!(ring.reserve(1).is_err(), "still full");
    let stats = ring.stats();
    assert_eq!((stats.discarded, stats.overwritten), (2, 0), "{stats:?}");
    // A flush of exactly full sub-buffers pads nothing and is not counted.
    ring.flush(pinned.cpu()).expect("cpu < cpus");
    assert_eq!(
        (ring.stats().flushes, ring.stats().flush_padding_bytes),
        (0, 0)
    );
    let mut seen = Vec::new();
    ring.consume(pinned.cpu(), |rec| seen.push(rec.data[0]))
        .expect("cpu < cpus");
    assert_eq!(seen, (0..64).collect::<Vec<u8>>());
    // Read, the space is the producers' again.
    ring.write(&[65]).expect("room after the consumer");
}

/// `consume` of a ring another consumer is reading returns 0 at once: it neither waits
/// for that consumer nor reads the records a second time.
#[test]
fn consume_returns_0_at_once_while_another_consumer_reads_the_ring() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let cpu = write_pinned(&ring, 20); // one complete sub-buffer and an open one
    ring.flush(cpu).expect("cpu < cpus");
    let mut inner = Vec::new();
    // The inner `consume` runs while the outer one holds the ring's claim: waiting for
    // it would never end.
    let outer = ring
        .consume(cpu, |rec| {
            if rec.data[0] == 0 {
                inner.push(
                    ring.consume(cpu, |_| panic!("read twice"))
                        .expect("valid cpu"),
                );
                inner.push(ring.consume_all(|_| panic!("read twice")));
            }
        })
        .expect("cpu < cpus");
    assert_eq!(outer, 20);
    assert_eq!(inner, [0, 0]);
}

/// `truncate` to a length not shorter than the payload changes nothing: the whole
/// payload is published.
#[test]
fn truncate_to_the_length_or_beyond_keeps_the_whole_payload() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let pinned = Pinned::new();
    for extra in [0, 1, usize::MAX - 4] {
        let mut r = ring.reserve(4).expect("room");
        r.payload_mut().copy_from_slice(b"abcd");
        r.truncate(4 + extra);
        assert_eq!(r.len(), 4);
        r.commit();
    }
    drop(pinned);
    assert_eq!(
        drain(&ring),
        [b"abcd".to_vec(), b"abcd".to_vec(), b"abcd".to_vec()]
    );
}

/// `OverwriteOldest` never overwrites a sub-buffer a consumer is reading: a producer
/// short of room while the oldest one is claimed refuses the record (`Full`, counted as
/// discarded, nothing overwritten), and the reader gets every record intact.
#[test]
fn an_overwriting_producer_refuses_rather_than_overwrite_a_sub_buffer_being_read() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::OverwriteOldest)).expect("valid config");
    let pinned = Pinned::new();
    for i in 0..64u8 {
        ring.write(&[i]).expect("room"); // 64 records of 16 bytes fill the ring
    }
    let mut seen = Vec::new();
    let mut inside = None;
    ring.consume(pinned.cpu(), |rec| {
        if rec.data[0] == 0 {
            // The oldest sub-buffer is claimed by this very consumer.
            inside = Some(ring.write(&[200]));
        }
        seen.push(rec.data[0]);
    })
    .expect("cpu < cpus");
    assert_eq!(inside, Some(Err(cpulocal::ring::ReserveError::Full)));
    let stats = ring.stats();
    assert_eq!((stats.discarded, stats.overwritten), (1, 0), "{stats:?}");
    assert_eq!(seen, (0..64).collect::<Vec<u8>>());
}

/// A record's timestamp is the `CLOCK_MONOTONIC` time of its reserve when the ring keeps
/// timestamps, and `None` when it does not.
#[test]
fn a_record_carries_the_monotonic_time_of_its_reserve_only_when_timestamps_are_on() {
    let _serial = serial();
    for timestamps in [true, false] {
        let ring = RingBuffer::new(RingConfig {
            timestamps,
            ..config(Mode::DiscardNewest)
        })
        .expect("valid config");
        let before = monotonic_ns();
        ring.write(b"t").expect("room");
        let after = monotonic_ns();
        ring.flush_all();
        let mut stamps = Vec::new();
        ring.consume_all(|rec| stamps.push(rec.timestamp));
        assert_eq!(stamps.len(), 1);
        match stamps[0] {
            Some(t) => assert!(
                timestamps && (before..=after).contains(&t),
                "{t} not in {before}..={after}"
            ),
            None => assert!(!timestamps, "no timestamp on a ring that keeps them"),
        }
    }
}

/// The documented cost of leaking a reservation (`mem::forget`): its sub-buffer never
/// completes, so the consumer of that CPU's ring stops there for good; nothing hangs,
/// and the other rings go on.
#[test]
fn a_leaked_reservation_stops_its_rings_consumer_there_for_good() {
    let _serial = serial();
    // A hang must fail the test, not stall CI: flush and consume must return.
    within_10s(
        "a leaked reservation's ring",
        leaked_reservation_stops_its_consumer,
    );
}

fn leaked_reservation_stops_its_consumer() {
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let pinned = Pinned::new();
    let cpu = pinned.cpu();
    ring.write(b"before").expect("room");
    std::mem::forget(ring.reserve(8).expect("room"));
    // Enough records to fill the leaked one's sub-buffer and start the next.
    let mut written = 0;
    while ring.write(b"after").is_ok() {
        written += 1;
    }
    drop(pinned);
    assert!(written >= 16, "only {written} records fit after the leak");
    for _ in 0..3 {
        ring.flush_all();
        let mut seen = Vec::new();
        ring.consume(cpu, |rec| seen.push(rec.data.to_vec()))
            .expect("cpu < cpus");
        assert!(
            seen.iter().all(|r| r != b"after"),
            "a record after the leak was delivered: {seen:?}"
        );
    }
    // The other rings are not held up.
    let cpus = allowed_cpus();
    if let Some(&other) = cpus.iter().find(|&&c| c != cpu) {
        set_affinity(0, &[other]).expect("sched_setaffinity");
        ring.write(b"elsewhere").expect("room");
        set_affinity(0, &cpus).expect("sched_setaffinity");
        ring.flush_all();
        let mut seen = Vec::new();
        ring.consume(other, |rec| seen.push(rec.data.to_vec()))
            .expect("cpu < cpus");
        assert_eq!(seen, [b"elsewhere".to_vec()]);
    }
}

/// A reservation may be committed by any thread (it is `Send`): by one that has never
/// used cpulocal (its commit cannot take the reserving CPU's restartable add) and by one
/// on another CPU (it commits through the ring's remote counter). Each record is
/// delivered once, complete, in the order of the reservations.
#[test]
fn a_reservation_committed_by_another_thread_is_delivered_once() {
    let _serial = serial();
    let ring = RingBuffer::new(config(Mode::DiscardNewest)).expect("valid config");
    let cpus = allowed_cpus(); // before the pinning narrows them
    let pinned = Pinned::new();
    let mut first = ring.reserve(1).expect("room");
    let mut second = ring.reserve(1).expect("room");
    first.payload_mut()[0] = 1;
    second.payload_mut()[0] = 2;
    ring.write(&[3]).expect("room");
    let remote_before = ring.stats().remote_commits;
    let other = cpus.iter().copied().find(|&c| c != pinned.cpu());
    let ring = &ring;
    std::thread::scope(|s| {
        s.spawn(move || first.commit());
    });
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(other) = other {
                set_affinity(0, &[other]).expect("sched_setaffinity");
            }
            ring.write(&[4]).expect("room"); // this thread now uses cpulocal
            second.commit();
        });
    });
    drop(pinned);
    let mut got = drain(ring);
    got.sort(); // the record written by the second thread may be on another CPU
    assert_eq!(got, [vec![1], vec![2], vec![3], vec![4]]);
    if other.is_some() {
        assert!(
            ring.stats().remote_commits > remote_before,
            "{:?}",
            ring.stats()
        );
    }
}
