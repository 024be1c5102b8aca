//! Process-wide decisions are made early and never inside a signal handler: the load-time
//! constructor makes them before `main` (so the first operation of a process that
//! already runs threads does not stall), `register_current_thread` makes every one of
//! them when the constructor is turned off, and a handler's registration nested in its
//! own thread's registration is that same registration.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::child::{in_child, test_name, Setup};
use super::{ignore_signal, install_handler, under_valgrind, watchdog};
use crate::{remote, thread, PerCpu, Stack, NO_EARLY_INIT_ENV};

/// Threads that exist (blocked) until dropped, so that the process is multithreaded.
struct IdleThreads {
    release: Arc<Barrier>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl IdleThreads {
    fn start(n: usize) -> Self {
        let started = Arc::new(Barrier::new(n + 1));
        let release = Arc::new(Barrier::new(n + 1));
        let threads = (0..n)
            .map(|_| {
                let (started, release) = (started.clone(), release.clone());
                std::thread::spawn(move || {
                    started.wait();
                    release.wait();
                })
            })
            .collect();
        started.wait();
        IdleThreads { release, threads }
    }
}

impl Drop for IdleThreads {
    fn drop(&mut self) {
        self.release.wait();
        for t in self.threads.drain(..) {
            t.join().expect("idle thread");
        }
    }
}

/// The first per-CPU operations of a process with 8 threads running: how long they take.
fn first_operations_after_8_threads() -> Duration {
    let _threads = IdleThreads::start(8);
    let start = Instant::now();
    let stack = Stack::new();
    stack.push(crate::Node::new(1u32));
    let percpu = PerCpu::new(|_| 0u32);
    percpu.with_cpu(|v| *v += 1);
    percpu.on_cpu(0, |v| *v += 1).unwrap();
    start.elapsed()
}

#[test]
fn the_constructor_decides_everything_before_main() {
    let name = test_name!(the_constructor_decides_everything_before_main);
    in_child(name, Setup::default(), || {
        assert!(
            remote::scheme_decided(),
            "the scheme is decided before the first use"
        );
        let took = first_operations_after_8_threads();
        println!("first operations after 8 threads started (constructor on): {took:?}");
    });
}

#[test]
fn without_the_constructor_the_first_use_decides() {
    if cfg!(feature = "__global-cpu-cache") {
        println!("skipped: with CpuCache as the global allocator the first allocation, before main, is the first use");
        return;
    }
    let name = test_name!(without_the_constructor_the_first_use_decides);
    let setup = Setup {
        env: vec![(NO_EARLY_INIT_ENV, "1")],
        ..Setup::default()
    };
    in_child(name, setup, || {
        assert!(!remote::scheme_decided(), "the constructor is turned off");
        let took = first_operations_after_8_threads();
        println!("first operations after 8 threads started (constructor off): {took:?}");
    });
}

/// The stack the storm's handler uses; null until the handler may use it.
static HANDLER_STACK: AtomicPtr<Stack<u32>> = AtomicPtr::new(core::ptr::null_mut());
/// Operations the handler completed.
static HANDLED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn use_a_stack(_: libc::c_int) {
    // SAFETY: the pointer is null or a leaked, never-freed stack.
    if let Some(stack) = unsafe { HANDLER_STACK.load(Ordering::Acquire).as_ref() } {
        // No allocation here (malloc is not async-signal-safe): the nodes move between
        // the lists.
        let node = stack
            .pop()
            .or_else(|| (0..stack.slots()).find_map(|cpu| stack.steal(cpu).unwrap()));
        if let Some(node) = node {
            stack.push(node);
        }
        // Relaxed: a statistic.
        HANDLED.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn register_current_thread_decides_everything_a_handler_could_meet() {
    if cfg!(feature = "__global-cpu-cache") {
        println!("skipped: with CpuCache as the global allocator the first allocation, before main, is the first use");
        return;
    }
    if under_valgrind() {
        println!("skipped under valgrind: children run natively anyway");
        return;
    }
    let name = test_name!(register_current_thread_decides_everything_a_handler_could_meet);
    let setup = Setup {
        env: vec![(NO_EARLY_INIT_ENV, "1")],
        ..Setup::default()
    };
    in_child(name, setup, || {
        let done = watchdog(Duration::from_secs(20));
        // Threads first: the membarrier registration is then slow (milliseconds), a wide
        // window for a signal.
        let _threads = IdleThreads::start(4);
        assert!(!remote::scheme_decided());
        crate::register_current_thread();
        assert!(
            remote::scheme_decided(),
            "register_current_thread left the remote scheme undecided"
        );

        install_handler(libc::SIGUSR2, use_a_stack);
        // SAFETY: pthread_self has no preconditions.
        let main = unsafe { libc::pthread_self() } as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let storm = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Relaxed: a stop flag.
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: `main` is the live main thread of this child (joined below
                    // before it could exit).
                    unsafe { libc::pthread_kill(main as libc::pthread_t, libc::SIGUSR2) };
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        };
        let handler_stack = Box::new(Stack::new());
        (0..4).for_each(|i| handler_stack.push(crate::Node::new(i)));
        HANDLER_STACK.store(Box::into_raw(handler_stack), Ordering::Release);
        // The main thread's own structures, used while the handler uses its stack.
        let stack = Stack::new();
        let percpu = PerCpu::new(|_| 0u64);
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            stack.push(crate::Node::new(1u32));
            for cpu in 0..stack.slots() {
                while stack.steal(cpu).unwrap().is_some() {}
            }
            percpu.with_cpu(|v| *v += 1);
        }
        // Relaxed: a stop flag.
        stop.store(true, Ordering::Relaxed);
        storm.join().expect("storm");
        ignore_signal(libc::SIGUSR2);
        println!("handler ran {} times", HANDLED.load(Ordering::Relaxed));
        assert!(HANDLED.load(Ordering::Relaxed) > 0);
        done.store(true, Ordering::Relaxed);
    });
}

#[test]
fn a_nested_own_registration_is_the_same_registration() {
    if under_valgrind() {
        println!("skipped under valgrind: children run natively anyway");
        return;
    }
    let name = test_name!(a_nested_own_registration_is_the_same_registration);
    let setup = Setup {
        env: vec![("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
        ..Setup::default()
    };
    in_child(name, setup, || {
        std::thread::spawn(|| {
            // What a handler's first use does when it interrupts its thread's own first
            // use right after the kernel accepted the area: register the same area again.
            let first = thread::register_own().expect("own registration");
            let nested = thread::register_own();
            assert_eq!(nested, Ok(first), "the nested registration failed");
            assert!(thread::is_registered());
        })
        .join()
        .expect("registering thread");
    });
}
