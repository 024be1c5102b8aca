//! A tiny tracer on `cpulocal::ring::RingBuffer`.
//!
//! Several threads record events (thread id, sequence number, a short text) into
//! per-CPU ring buffers with timestamps; some of them hop to another CPU between
//! reserving a record and committing it, so their commit lands on the reserving CPU's
//! ring from elsewhere (a remote commit). A consumer thread drains every CPU's ring
//! while they run; at the end it flushes the partly filled sub-buffers, and the main
//! thread merges all CPUs' records by timestamp, prints them in order, checks that each
//! thread's events kept their order, and prints a summary.
//!
//! ```text
//! cargo run --release -p cpulocal --example trace
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cpulocal::ring::{RingBuffer, RingConfig};

const THREADS: u32 = 4;
const EVENTS: u32 = 24;
/// One event in this many hops to another CPU between reserve and commit.
const HOP_EVERY: u32 = 6;
const WHAT: [&str; 6] = ["open", "read", "parse", "write", "flush", "close"];

/// An event as recorded: a fixed little-endian header, then the text.
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | thread |
/// | 4..8 | sequence number |
/// | 8..12 | CPU the commit was made from, or `u32::MAX` when it stayed put |
/// | 12.. | text |
#[derive(Debug)]
struct Event {
    timestamp: u64,
    ring_cpu: usize,
    thread: u32,
    seq: u32,
    committed_from: Option<u32>,
    text: String,
}

impl Event {
    fn parse(cpu: usize, timestamp: u64, data: &[u8]) -> Event {
        let word = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().expect("4 bytes"));
        Event {
            timestamp,
            ring_cpu: cpu,
            thread: word(0),
            seq: word(4),
            committed_from: Some(word(8)).filter(|&c| c != u32::MAX),
            text: String::from_utf8_lossy(&data[12..]).into_owned(),
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is this thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(r, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the bits `set` holds.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Restricts the calling thread to `cpus`; the kernel moves it before returning.
fn run_on(cpus: &[usize]) {
    // SAFETY: as in `allowed_cpus`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` came from `allowed_cpus`, so it is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is this thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(r, 0, "sched_setaffinity");
}

/// Records `EVENTS` events of thread `thread`.
fn record(ring: &RingBuffer, thread: u32, cpus: &[usize]) {
    for seq in 0..EVENTS {
        let text = format!(
            "{} {}",
            WHAT[(seq as usize + thread as usize) % WHAT.len()],
            seq * 10
        );
        let mut r = match ring.reserve(12 + text.len()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("thread {thread} event {seq} dropped: {e}");
                continue;
            }
        };
        let mut committed_from = u32::MAX;
        if seq % HOP_EVERY == thread % HOP_EVERY && cpus.len() > 1 {
            // Hop to another CPU than the reserving one: the commit becomes remote.
            let other = *cpus.iter().find(|&&c| c != r.cpu()).expect("two CPUs");
            run_on(&[other]);
            committed_from = cpulocal::current_cpu() as u32;
        }
        let payload = r.payload_mut();
        payload[0..4].copy_from_slice(&thread.to_le_bytes());
        payload[4..8].copy_from_slice(&seq.to_le_bytes());
        payload[8..12].copy_from_slice(&committed_from.to_le_bytes());
        payload[12..].copy_from_slice(text.as_bytes());
        r.commit();
        if committed_from != u32::MAX {
            run_on(cpus);
        }
        std::thread::yield_now();
    }
}

fn main() {
    let started = Instant::now();
    let ring = RingBuffer::new(RingConfig {
        sub_buffer_size: 1024,
        sub_buffers: 4,
        ..RingConfig::default()
    })
    .expect("valid ring configuration");
    let cpus = allowed_cpus();
    let producing = AtomicBool::new(true);

    let mut events: Vec<Event> = std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            let mut events = Vec::new();
            let drain = |events: &mut Vec<Event>| {
                ring.consume_all(|rec| {
                    let ts = rec.timestamp.expect("the ring keeps timestamps");
                    events.push(Event::parse(rec.cpu, ts, rec.data));
                });
            };
            // Relaxed: a stop request; the scope's join synchronises.
            while producing.load(Ordering::Relaxed) {
                drain(&mut events);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            // The producers are done: hand over the partly filled sub-buffers too.
            ring.flush_all();
            drain(&mut events);
            events
        });
        let producers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (ring, cpus) = (&ring, &cpus);
                s.spawn(move || record(ring, t, cpus))
            })
            .collect();
        for p in producers {
            p.join().expect("producer");
        }
        // Relaxed: the join synchronises.
        producing.store(false, Ordering::Relaxed);
        consumer.join().expect("consumer")
    });

    // Merge the CPUs: one timeline.
    events.sort_by_key(|e| (e.timestamp, e.thread, e.seq));
    let t0 = events.first().map_or(0, |e| e.timestamp);
    println!(
        "{:>12}  {:>4}  {:>6}  {:>4}  event",
        "time (µs)", "ring", "thread", "seq"
    );
    for e in &events {
        let hop = e
            .committed_from
            .map(|c| format!("   (committed from CPU {c})"))
            .unwrap_or_default();
        println!(
            "{:>12.3}  {:>4}  {:>6}  {:>4}  {}{hop}",
            (e.timestamp - t0) as f64 / 1000.0,
            e.ring_cpu,
            e.thread,
            e.seq,
            e.text
        );
    }

    // Each thread's events come out in the order it recorded them.
    for t in 0..THREADS {
        let seqs: Vec<u32> = events
            .iter()
            .filter(|e| e.thread == t)
            .map(|e| e.seq)
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "thread {t}'s events out of order: {seqs:?}"
        );
    }
    let stats = ring.stats();
    let hops = events.iter().filter(|e| e.committed_from.is_some()).count();
    println!(
        "records {} ({} threads x {} events), remote commits {} ({} hops), discarded {}, \
         abandoned {}; {} CPUs; {}; {:.1?}",
        events.len(),
        THREADS,
        EVENTS,
        stats.remote_commits,
        hops,
        stats.discarded,
        stats.abandoned,
        ring.slots(),
        cpulocal::mechanism(),
        started.elapsed()
    );
}
