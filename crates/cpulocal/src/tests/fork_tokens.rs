//! A fork child and the locks other threads of its parent held: a thread the child
//! starts may get the TLS block, and so the lock token, of a parent thread that held a
//! `PerCpu` slot at the fork (glibc hands the child the dead threads' stacks, TLS
//! included, from its stack cache). That thread must never get the slot: it panics
//! (the word holds its own token, which it cannot be waiting for) where a thread with
//! another token waits for ever, as the crate docs ("Fork") say.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::child::{in_child, test_name, Setup};
use crate::PerCpu;

/// A stack size no other thread of the test process uses, so that glibc's stack cache
/// hands the child's thread exactly the stack of the parent's holder.
const STACK: usize = 3 * 1024 * 1024 + 7 * 4096;

thread_local! {
    /// Its address tells whether two threads got the same TLS block (and so the same
    /// lock token, the address of another thread-local of the same block).
    static PROBE: u8 = const { 0 };
}

fn probe_address() -> usize {
    PROBE.with(|p| p as *const u8 as usize)
}

/// How the child's thread fared with the slot the parent's holder had locked.
#[repr(i32)]
enum Outcome {
    /// Same TLS block as the holder, and asking for the slot panicked.
    RefusedOwnToken = 10,
    /// Another TLS block, and still waiting after the timeout (the documented hang).
    Waited = 11,
    /// It got the slot a thread of the parent held: the failure.
    GotTheSlot = 12,
    /// Another TLS block, and it panicked: unexpected.
    PanickedWithAnotherToken = 13,
    /// The same TLS block, and still waiting: unexpected.
    WaitedWithOwnToken = 14,
}

#[test]
fn a_fork_child_thread_never_gets_a_slot_a_parent_thread_held_even_with_its_token() {
    if super::under_valgrind() {
        println!("skipped under valgrind: children run natively anyway");
        return;
    }
    let name =
        test_name!(a_fork_child_thread_never_gets_a_slot_a_parent_thread_held_even_with_its_token);
    in_child(name, Setup::default(), || {
        let percpu = Arc::new(PerCpu::new(|_| 0u64));
        let (locked, locked_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let holder = {
            let percpu = Arc::clone(&percpu);
            std::thread::Builder::new()
                .stack_size(STACK)
                .spawn(move || {
                    let guard = percpu.lock_cpu(0).expect("slot 0");
                    locked.send(probe_address()).unwrap();
                    release_rx.recv().unwrap();
                    drop(guard);
                })
                .expect("the holder")
        };
        let holder_probe = locked_rx.recv().unwrap();
        // SAFETY: the child uses only glibc's fork-safe malloc, thread creation and
        // cpulocal's slot lock (whose answer is what is tested), reports through its
        // exit status and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let (tx, rx) = mpsc::channel();
            let (tx2, rx2) = mpsc::channel();
            let percpu = Arc::clone(&percpu);
            let _ = std::thread::Builder::new()
                .stack_size(STACK)
                .spawn(move || {
                    tx2.send(probe_address()).unwrap();
                    let got = std::panic::catch_unwind(|| percpu.on_cpu(0, |v| *v += 1));
                    let _ = tx.send(got.is_ok());
                });
            let same_tls = rx2.recv() == Ok(holder_probe);
            let outcome = match (rx.recv_timeout(Duration::from_secs(3)), same_tls) {
                (Ok(true), _) => Outcome::GotTheSlot,
                (Ok(false), true) => Outcome::RefusedOwnToken,
                (Ok(false), false) => Outcome::PanickedWithAnotherToken,
                (Err(_), false) => Outcome::Waited,
                (Err(_), true) => Outcome::WaitedWithOwnToken,
            };
            // SAFETY: ends the child without running the parent's handlers.
            unsafe { libc::_exit(outcome as i32) };
        }
        assert!(pid > 0, "fork");
        let mut status = 0;
        // SAFETY: `pid` is our child (it ends itself after at most ~3 s).
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        release.send(()).unwrap();
        holder.join().expect("the holder");
        assert!(libc::WIFEXITED(status), "the child died: {status:#x}");
        let code = libc::WEXITSTATUS(status);
        println!("fork child outcome {code} (10: same token, refused; 11: waited)");
        assert_ne!(
            code,
            Outcome::GotTheSlot as i32,
            "a child thread got a slot a parent thread held at the fork"
        );
        assert!(
            code == Outcome::RefusedOwnToken as i32 || code == Outcome::Waited as i32,
            "unexpected outcome {code}"
        );
    });
}
