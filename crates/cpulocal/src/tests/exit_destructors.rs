//! A thread's last destructors may use every structure: a `thread_local!` destructor
//! (armed before or after the thread's first use of cpulocal, or making that first use
//! itself), and a pthread-key destructor created after cpulocal's key that asks for
//! every round glibc gives (so that its last rounds run after cpulocal's own
//! registration was undone). `Counter::add`, `PerCpu::with_cpu`/`lock_cpu` and
//! `Stack::push`/`pop` keep their meaning there (through the slow paths once the area
//! is gone), and an area registered by a late destructor is undone in a later round
//! (one registered in the very last round stays registered until the thread exits: see
//! `thread`'s Limits). Checked with glibc's registration in process, and with
//! cpulocal's own in a child.

use core::cell::RefCell;
use core::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::child::{in_child, test_name, Setup};
use super::{delay_shared, expected_mechanism};
use crate::{Counter, Mechanism, Node, PerCpu, Registrar, Stack};

/// The structures every late destructor uses, and how many uses it made.
#[derive(Clone)]
struct Shared {
    counter: Arc<Counter>,
    percpu: Arc<PerCpu<u64>>,
    stack: Arc<Stack<u64>>,
    uses: Arc<AtomicU64>,
    /// Uses by a thread that was no longer registered (its own area undone).
    unregistered: Arc<AtomicU64>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            counter: Arc::new(Counter::new()),
            percpu: Arc::new(PerCpu::new(|_| 0)),
            stack: Arc::new(Stack::new()),
            uses: Arc::new(AtomicU64::new(0)),
            unregistered: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One use of each structure: +1 to the counter, +1 to a slot of the `PerCpu`
    /// through `with_cpu` and +1 through `lock_cpu`, two nodes pushed and one popped.
    fn use_all(&self) {
        self.counter.add(1);
        self.percpu.with_cpu(|v| *v += 1);
        let cpu = crate::current_cpu() % self.percpu.slots();
        *self.percpu.lock_cpu(cpu).expect("a CPU below slots") += 1;
        self.stack.push(Node::new(1));
        self.stack.push(Node::new(2));
        drop(self.stack.pop_or_steal().expect("a node was just pushed"));
        self.uses.fetch_add(1, Ordering::SeqCst);
        if !crate::thread::is_registered() {
            self.unregistered.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Every use was counted exactly once by every structure. Returns how many uses
    /// found the thread unregistered.
    fn check(&self, label: &str) -> u64 {
        let uses = self.uses.load(Ordering::SeqCst);
        assert!(uses > 0, "{label}: no destructor ran");
        assert_eq!(self.counter.sum(), uses, "{label}: Counter::add");
        let mut slots = 0;
        self.percpu.for_each(|_, v| slots += *v);
        assert_eq!(slots, 2 * uses, "{label}: PerCpu::with_cpu and lock_cpu");
        let mut nodes = 0;
        while self.stack.pop_or_steal().is_some() {
            nodes += 1;
        }
        assert_eq!(nodes, uses, "{label}: Stack::push and pop");
        let unregistered = self.unregistered.load(Ordering::SeqCst);
        println!("{label}: {uses} uses in threads' last destructors ({unregistered} unregistered), all counted");
        unregistered
    }
}

struct UseAtExit(Shared);

impl Drop for UseAtExit {
    fn drop(&mut self) {
        self.0.use_all();
    }
}

thread_local! {
    static AT_EXIT: RefCell<Option<UseAtExit>> = const { RefCell::new(None) };
}

/// The value of [`late_key`]'s key: the structures, and the rounds left to ask for.
struct LateKey {
    shared: Shared,
    key: libc::pthread_key_t,
    rounds_left: u32,
}

/// A pthread-key destructor that uses every structure in each round and asks for the
/// next while glibc gives one (`PTHREAD_DESTRUCTOR_ITERATIONS` is 4): its later rounds
/// come after cpulocal's own registration was undone.
unsafe extern "C" fn late_key(value: *mut libc::c_void) {
    // SAFETY: the value is a `Box<LateKey>` leaked by `arm_late_key` or by this
    // destructor's previous round; this destructor is its only user.
    let mut late = unsafe { Box::from_raw(value.cast::<LateKey>()) };
    late.shared.use_all();
    if late.rounds_left > 0 {
        late.rounds_left -= 1;
        let key = late.key;
        // SAFETY: `key` is live; the value comes back to this destructor (or leaks if
        // glibc runs no further round, which the test tolerates).
        unsafe { libc::pthread_setspecific(key, Box::into_raw(late).cast()) };
    }
}

fn arm_late_key(key: libc::pthread_key_t, shared: &Shared) {
    let late = Box::new(LateKey {
        shared: shared.clone(),
        key,
        rounds_left: 8,
    });
    // SAFETY: `key` is live; `late_key` takes the box back.
    let r = unsafe { libc::pthread_setspecific(key, Box::into_raw(late).cast()) };
    assert_eq!(r, 0);
}

/// Threads of every kind: the `thread_local!` armed before or after the first use, or
/// the destructor making the first use; with or without the late pthread key. Returns
/// how many uses found the thread unregistered.
fn every_late_destructor_keeps_its_updates() -> u64 {
    // After cpulocal's key (the mechanism is decided, its key created if it has one).
    let _ = crate::mechanism();
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a live out-parameter; the destructor is a plain extern fn.
    let r = unsafe { libc::pthread_key_create(&mut key, Some(late_key)) };
    assert_eq!(r, 0);
    let shared = Shared::new();
    for kind in 0..6u32 {
        for _ in 0..8 {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let arm = |s: &Shared| {
                    AT_EXIT.with(|slot| *slot.borrow_mut() = Some(UseAtExit(s.clone())))
                };
                match kind % 3 {
                    0 => {
                        // Armed before the thread's first use.
                        arm(&shared);
                        shared.use_all();
                    }
                    1 => {
                        // Armed after it.
                        shared.use_all();
                        arm(&shared);
                    }
                    _ => arm(&shared), // the destructor is the first use
                }
                if kind >= 3 {
                    arm_late_key(key, &shared);
                }
            })
            .join()
            .expect("a thread whose exit destructors use cpulocal");
        }
    }
    shared.check(&format!("{}", crate::mechanism()))
}

#[test]
fn exit_destructors_keep_every_structures_updates() {
    let _delay = delay_shared();
    let unregistered = every_late_destructor_keeps_its_updates();
    if matches!(
        expected_mechanism(),
        Mechanism::Rseq {
            registrar: Registrar::Glibc,
            ..
        }
    ) {
        // glibc's registration lasts as long as the thread (musl has none: cpulocal's
        // own is undone at exit, as in the next test).
        assert_eq!(unregistered, 0, "a thread lost glibc's registration");
    }
}

#[test]
fn exit_destructors_keep_every_structures_updates_with_own_registration() {
    let name = test_name!(exit_destructors_keep_every_structures_updates_with_own_registration);
    let setup = Setup {
        env: vec![("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
        ..Setup::default()
    };
    in_child(name, setup, || {
        assert_eq!(crate::mechanism(), expected_mechanism());
        let unregistered = every_late_destructor_keeps_its_updates();
        assert!(
            unregistered > 0,
            "no destructor ran after cpulocal's own registration was undone"
        );
    });
}
