//! CPU hotplug: what a thread left on a CPU's slot stays reachable from any thread after
//! that CPU goes offline — `PerCpu::on_cpu`, `Stack::steal`/`pop_all_on`,
//! `RingBuffer::flush`/`consume` aimed at the offline CPU return their documented
//! results (`Ok`, with the data) and `Counter::sum`/`take` count its slot — and the
//! CPU's slots work again, not stuck, when it comes back online.
//!
//! Taking a CPU offline needs root and a hotpluggable CPU: the VM lane's guests
//! (`.ci/vm.sh`) run this with `CPULOCAL_TEST_HOTPLUG=1`; elsewhere the test says it is
//! skipped.

mod common;

use std::time::{Duration, Instant};

use cpulocal::ring::{RingBuffer, RingConfig};
use cpulocal::{Counter, Node, PerCpu, Stack};

/// `/sys/devices/system/cpu/cpu<N>/online`.
fn online_file(cpu: usize) -> String {
    format!("/sys/devices/system/cpu/cpu{cpu}/online")
}

fn set_online(cpu: usize, online: bool) {
    std::fs::write(online_file(cpu), if online { "1" } else { "0" })
        .unwrap_or_else(|e| panic!("cpu{cpu} online={online}: {e}"));
}

fn is_online(cpu: usize) -> bool {
    std::fs::read_to_string(online_file(cpu)).is_ok_and(|s| s.trim() == "1")
}

/// Runs `f` on a thread pinned to `cpu`, checking that it runs there.
fn on_pinned_thread<R: Send>(cpu: usize, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            common::set_affinity(0, &[cpu]).expect("pin");
            assert_eq!(cpulocal::current_cpu() as usize, cpu, "pinned thread's CPU");
            f()
        })
        .join()
        .expect("pinned thread")
    })
}

#[test]
fn an_offline_cpus_slots_stay_reachable_and_work_again_when_it_returns() {
    if std::env::var_os("CPULOCAL_TEST_HOTPLUG").is_none_or(|v| v != "1") {
        println!("skipped: set CPULOCAL_TEST_HOTPLUG=1 (root, hotpluggable CPUs: the VM lane)");
        return;
    }
    // The highest online CPU whose online switch exists (CPU 0 usually has none).
    let cpu = (1..cpulocal::possible_cpus())
        .rev()
        .find(|&c| is_online(c) && std::fs::metadata(online_file(c)).is_ok())
        .expect("a hotpluggable online CPU");
    // The VM lane's x86_64 guests hot-add a vCPU before this runs: it is the highest.
    println!("taking cpu{cpu} offline and back");
    let counter = Counter::new();
    let lists = PerCpu::new(|_| Vec::<u64>::new());
    let stack = Stack::new();
    let ring = RingBuffer::new(RingConfig::default()).expect("ring");
    const N: u64 = 100;

    on_pinned_thread(cpu, || {
        for i in 0..N {
            counter.add(1);
            lists.with_cpu(|v| v.push(i));
            stack.push(Node::new(i));
            ring.write(&i.to_le_bytes()).expect("room for 100 records");
        }
    });
    set_online(cpu, false);
    assert!(!is_online(cpu), "cpu{cpu} went offline");

    // Every remote operation aimed at the offline CPU returns Ok with the data.
    assert_eq!(counter.sum(), N, "the offline CPU's counter slot is summed");
    let on_list = lists.on_cpu(cpu, std::mem::take).expect("on_cpu(offline)");
    assert_eq!(on_list, (0..N).collect::<Vec<_>>());
    let top = stack.steal(cpu).expect("steal(offline)").expect("a node");
    assert_eq!(top.into_inner(), N - 1, "steal takes the newest node");
    let mut rest: Vec<u64> = stack
        .pop_all_on(cpu)
        .expect("pop_all_on(offline)")
        .map(|node| node.into_inner())
        .collect();
    rest.sort_unstable();
    assert_eq!(rest, (0..N - 1).collect::<Vec<_>>());
    ring.flush(cpu).expect("flush(offline)");
    let mut records = Vec::new();
    let read = ring
        .consume(cpu, |r| {
            records.push(u64::from_le_bytes(r.data.try_into().expect("8 bytes")));
        })
        .expect("consume(offline)");
    assert_eq!(read, N as usize);
    assert_eq!(records, (0..N).collect::<Vec<_>>());
    // And again, from another thread, while the CPU is still offline: nothing stuck.
    std::thread::scope(|s| {
        s.spawn(|| {
            lists.on_cpu(cpu, |v| v.push(7)).expect("on_cpu(offline)");
            assert!(stack.steal(cpu).expect("steal").is_none());
            ring.flush(cpu).expect("flush(offline)");
        });
    });
    assert_eq!(counter.take(), N);

    set_online(cpu, true);
    // The kernel may need a moment before the CPU takes threads again.
    let start = Instant::now();
    while !is_online(cpu) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    on_pinned_thread(cpu, || {
        counter.add(1);
        lists.with_cpu(|v| v.push(8));
        stack.push(Node::new(9));
        assert_eq!(stack.pop().map(|n| n.into_inner()), Some(9));
        ring.write(b"back").expect("room");
    });
    assert_eq!(counter.take(), 1);
    assert_eq!(lists.on_cpu(cpu, std::mem::take).expect("on_cpu"), [7, 8]);
    ring.flush(cpu).expect("flush");
    assert_eq!(ring.consume(cpu, |r| assert_eq!(r.data, b"back")), Ok(1));
}
