//! A thread whose membarrier fence the kernel refuses after the process registered for
//! it (a seccomp filter on that thread alone, as some sandboxes install) cannot operate
//! on another CPU's data: its remote acquisitions panic. They must give the lock word
//! back first, as it was (a `Stack`'s list head is that word), so every other thread
//! keeps using that CPU's slot and list, and a `Stack::push` that panics there frees its
//! node instead of leaking it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::child::{in_child, install_seccomp, syscall_error_filter, test_name, Setup};
use super::{under_valgrind, watchdog, within};
use crate::remote::Scheme;
use crate::{test_hooks, Node, PerCpu, Stack};

/// Counts its drops: a node freed, not leaked.
#[derive(Debug)]
struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        // Relaxed: read after the thread that drops is joined.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// The panic message of a caught panic.
fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn a_refused_fence_releases_the_lock_and_frees_the_node() {
    if under_valgrind() {
        println!("skipped under valgrind: no seccomp(2)");
        return;
    }
    let name = test_name!(a_refused_fence_releases_the_lock_and_frees_the_node);
    in_child(name, Setup::default(), || {
        if crate::remote_scheme() != Scheme::Membarrier {
            println!("skipped: the remote scheme is {}", crate::remote_scheme());
            return;
        }
        let done = watchdog(Duration::from_secs(20));
        let percpu = Arc::new(PerCpu::new(|_| 0u64));
        let stack = Arc::new(Stack::<Tracked>::new());
        let drops = Arc::new(AtomicUsize::new(0));
        let slots = percpu.slots();
        // A node on some CPU's list, which the refused steals must leave there.
        let kept_drops = Arc::new(AtomicUsize::new(0));
        stack.push(Node::new(Tracked(kept_drops.clone())));

        let sandboxed = {
            let (percpu, stack, drops) = (percpu.clone(), stack.clone(), drops.clone());
            std::thread::spawn(move || {
                let filter = syscall_error_filter(libc::SYS_membarrier, libc::EPERM);
                install_seccomp(&filter).expect("seccomp on this thread");
                for cpu in 0..slots {
                    let err = catch_unwind(AssertUnwindSafe(|| {
                        drop(percpu.lock_cpu(cpu));
                    }))
                    .expect_err("a remote acquisition without the fence must panic");
                    assert!(message(&*err).contains("membarrier"), "{}", message(&*err));
                    catch_unwind(AssertUnwindSafe(|| stack.steal(cpu)))
                        .expect_err("steal without the fence must panic");
                }
                // The push slow path takes this CPU's lock as a remote owner.
                test_hooks::force_slow_paths(true);
                catch_unwind(AssertUnwindSafe(|| {
                    stack.push(Node::new(Tracked(drops.clone())));
                }))
                .expect_err("the push slow path without the fence must panic");
                test_hooks::force_slow_paths(false);
                // The fast paths need no fence: they still work here.
                percpu.with_cpu(|v| *v += 1);
            })
        };
        sandboxed.join().expect("the sandboxed thread's checks");
        assert_eq!(
            drops.load(Ordering::Relaxed),
            1,
            "the node of the panicking push was leaked"
        );
        // Every slot is usable by the other threads, and the lists are whole.
        let (total, kept) = within(Duration::from_secs(10), move || {
            let mut kept = 0;
            for cpu in 0..slots {
                percpu.on_cpu(cpu, |v| *v += 1).unwrap();
                kept += stack.pop_all_on(cpu).unwrap().count();
            }
            let mut total = 0;
            percpu.for_each(|_, v| total += *v);
            (total, kept)
        })
        .expect("a CPU's slot stayed locked after the refused fence");
        assert_eq!(total, slots as u64 + 1);
        assert_eq!(kept, 1, "a refused steal lost the list it found");
        assert_eq!(kept_drops.load(Ordering::Relaxed), 1);
        done.store(true, Ordering::Relaxed);
    });
}
