//! A `RingBuffer` costs resident memory only for what producers write: the rings of
//! CPUs that never run a producer, and sub-buffers not reached yet, stay unpopulated.
//! Alone in its test binary, so no other test's allocations move the process's RSS.

use cpulocal::ring::{RingBuffer, RingConfig};

/// The process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a VmRSS line")
}

#[test]
fn untouched_rings_and_sub_buffers_cost_no_resident_memory() {
    cpulocal::Counter::new().add(1); // registration and the scheme, outside the figures
    let _ = cpulocal::remote_scheme();
    let before = rss_kib();
    // 64 MiB per CPU (1024 sub-buffers of 64 KiB): filled eagerly, 2 CPUs cost 128 MiB.
    let ring = RingBuffer::new(RingConfig {
        sub_buffer_size: 64 << 10,
        sub_buffers: 1024,
        ..RingConfig::default()
    })
    .expect("64 MiB per CPU is a valid configuration");
    let after_new = rss_kib();
    // 1000 records of 100 bytes: about 2 sub-buffers of one or two CPUs' rings.
    for _ in 0..1000 {
        ring.write(&[7; 100]).expect("room");
    }
    let after_writes = rss_kib();
    let total_mib = ring.slots() as u64 * 64;
    println!(
        "{total_mib} MiB of rings: RSS +{} KiB after new, +{} KiB after 1000 writes",
        after_new.saturating_sub(before),
        after_writes.saturating_sub(before)
    );
    // Generous bounds (allocator noise, page tables), far below the 64 MiB of one ring.
    assert!(
        after_new.saturating_sub(before) < 4 << 10,
        "RingBuffer::new made {} KiB resident",
        after_new - before
    );
    assert!(
        after_writes.saturating_sub(before) < 8 << 10,
        "1000 records made {} KiB resident",
        after_writes - before
    );
}
