//! Registration: every kind of thread (std, raw pthread, the test's own) finds a
//! registered area, the very one the kernel knows; a child of `fork()` keeps it.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{current_cpu_agrees_with_sched_getcpu, delay_shared, expected_mechanism};
use crate::abi::{self, Rseq};
use crate::sys::{self, Errno};
use crate::{thread, Counter, Mechanism, Registrar};

/// The length the area's registrar registered it with.
pub(super) fn registered_len(registrar: Registrar) -> u32 {
    match registrar {
        // glibc 2.35–2.40 register `sizeof (struct rseq_area)`, 32 bytes.
        Registrar::Glibc => abi::ORIG_RSEQ_SIZE,
        Registrar::Own => abi::ORIG_RSEQ_SIZE.max(thread::feature_size()),
    }
}

/// Asks the kernel whether `area` is the calling thread's registration: registering
/// the same area, length and signature again fails with EBUSY exactly then.
pub(super) fn kernel_registration_of(
    area: NonNull<Rseq>,
    registrar: Registrar,
) -> Result<(), Errno> {
    let len = registered_len(registrar);
    // SAFETY: if the thread has a registration this fails without effect. If it has
    // none (the bug this probe looks for) the area — live TLS of this thread — gets
    // registered and is unregistered at once, before anything else runs.
    let r = unsafe { sys::rseq(area.as_ptr(), len, 0, abi::RSEQ_SIG) };
    if r.is_ok() {
        // SAFETY: undoes the registration just made, with the same arguments.
        let _ = unsafe { sys::rseq(area.as_ptr(), len, abi::RSEQ_FLAG_UNREGISTER, abi::RSEQ_SIG) };
    }
    r
}

/// What a thread sees of its own registration.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Seen {
    mechanism: Mechanism,
    registered: bool,
    /// The kernel's answer to registering the area again (EBUSY: it is this thread's).
    kernel: Option<Result<(), Errno>>,
    /// With glibc's registration: whether the area is at `__rseq_offset` from the
    /// thread pointer.
    is_glibcs_area: Option<bool>,
    cpu_agrees: bool,
}

pub(super) fn observe() -> Seen {
    let mechanism = crate::mechanism();
    let area = thread::current();
    let (kernel, is_glibcs_area) = match (area, mechanism) {
        (Some(area), Mechanism::Rseq { registrar, .. }) => {
            let glibcs = (registrar == Registrar::Glibc).then(|| {
                let offset = thread::glibc_rseq().map_or(0, |g| g.offset);
                crate::arch::thread_pointer().wrapping_offset(offset) == area.as_ptr().cast()
            });
            (Some(kernel_registration_of(area, registrar)), glibcs)
        }
        _ => (None, None),
    };
    Seen {
        mechanism,
        registered: thread::is_registered(),
        kernel,
        is_glibcs_area,
        cpu_agrees: current_cpu_agrees_with_sched_getcpu().is_ok(),
    }
}

/// What every thread must see in this process.
pub(super) fn expected_seen() -> Seen {
    let mechanism = expected_mechanism();
    let rseq = matches!(mechanism, Mechanism::Rseq { .. });
    let glibc = matches!(
        mechanism,
        Mechanism::Rseq {
            registrar: Registrar::Glibc,
            ..
        }
    );
    Seen {
        mechanism,
        registered: rseq,
        kernel: rseq.then_some(Err(Errno(libc::EBUSY))),
        is_glibcs_area: glibc.then_some(true),
        cpu_agrees: true,
    }
}

extern "C" fn raw_pthread_main(out: *mut libc::c_void) -> *mut libc::c_void {
    let seen = observe();
    // SAFETY: `out` points to the `Option<Seen>` the creating thread owns and does not
    // touch until `pthread_join` returns.
    unsafe { out.cast::<Option<Seen>>().write(Some(seen)) };
    core::ptr::null_mut()
}

/// Runs `main(arg)` on a thread made with `pthread_create` directly, not through std,
/// and joins it.
///
/// # Safety
///
/// `main` may use `arg` as its contract with the caller says; whatever `arg` points to
/// outlives the thread (it is joined before this returns).
unsafe fn run_on_raw_pthread(
    main: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void,
    arg: *mut libc::c_void,
) {
    let mut tid = core::mem::MaybeUninit::<libc::pthread_t>::uninit();
    // SAFETY: `tid` is a live out-parameter, default attributes; `arg` as the caller
    // vouches.
    let r = unsafe { libc::pthread_create(tid.as_mut_ptr(), core::ptr::null(), main, arg) };
    assert_eq!(r, 0, "pthread_create: {:?}", Errno(r));
    // SAFETY: pthread_create succeeded, so it wrote `tid`.
    let tid = unsafe { tid.assume_init() };
    // SAFETY: `tid` is a joinable thread created above, joined once.
    let r = unsafe { libc::pthread_join(tid, core::ptr::null_mut()) };
    assert_eq!(r, 0, "pthread_join: {:?}", Errno(r));
}

/// Runs `observe` on a thread made with `pthread_create` directly, not through std.
pub(super) fn observe_on_raw_pthread() -> Seen {
    let mut out: Option<Seen> = None;
    // SAFETY: `raw_pthread_main` writes an `Option<Seen>` through its argument, `out`,
    // which lives until the thread is joined.
    unsafe { run_on_raw_pthread(raw_pthread_main, (&raw mut out).cast()) };
    out.expect("the raw pthread reported")
}

#[test]
fn every_kind_of_thread_sees_a_registered_area() {
    let _delay = delay_shared();
    let expected = expected_seen();
    assert_eq!(observe(), expected, "the test's own thread");
    let from_std = std::thread::spawn(observe).join().expect("std thread");
    assert_eq!(from_std, expected, "a std thread");
    assert_eq!(observe_on_raw_pthread(), expected, "a raw pthread");
    // And a thread whose first use of cpulocal is reading the CPU.
    let cpu_first = std::thread::spawn(|| {
        let cpu = crate::current_cpu();
        (cpu, observe())
    })
    .join()
    .expect("std thread");
    assert!((cpu_first.0 as usize) < crate::possible_cpus());
    assert_eq!(
        cpu_first.1, expected,
        "a thread that first asked for its CPU"
    );
}

/// Why a fork child failed; its exit code.
#[derive(Clone, Copy, Debug)]
#[repr(i32)]
enum ForkFailure {
    Panicked = 10,
    RegistrationChanged = 11,
    KernelForgotTheArea = 12,
    CpuDisagrees = 13,
    CounterInexact = 14,
}

/// The child's checks: no allocation, no locks, no panics (a forked child of a
/// multithreaded process may only rely on what the forking thread owned).
fn fork_child_checks(
    counter: &Counter,
    area_before: Option<NonNull<Rseq>>,
) -> Result<(), ForkFailure> {
    const ADDS: u64 = 100_000;
    if thread::current() != area_before {
        return Err(ForkFailure::RegistrationChanged);
    }
    if let (Some(area), Mechanism::Rseq { registrar, .. }) = (area_before, crate::mechanism()) {
        if kernel_registration_of(area, registrar) != Err(Errno(libc::EBUSY)) {
            return Err(ForkFailure::KernelForgotTheArea);
        }
    }
    if current_cpu_agrees_with_sched_getcpu().is_err() {
        return Err(ForkFailure::CpuDisagrees);
    }
    let before = counter.sum();
    for _ in 0..ADDS {
        counter.add(1);
    }
    if counter.sum() != before + ADDS {
        return Err(ForkFailure::CounterInexact);
    }
    Ok(())
}

#[test]
fn fork_child_keeps_a_working_registration() {
    let _delay = delay_shared();
    let counter = Counter::new();
    counter.add(5);
    let area = thread::current();
    assert_eq!(
        area.is_some(),
        matches!(expected_mechanism(), Mechanism::Rseq { .. })
    );

    // Other threads busy in cpulocal when the process forks.
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let c = Counter::new();
                while !stop.load(Ordering::Relaxed) {
                    c.add(1);
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(5));

    // SAFETY: the child runs only `fork_child_checks` (no allocation, locks or output)
    // and leaves with `_exit`, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = match std::panic::catch_unwind(|| fork_child_checks(&counter, area)) {
            Ok(Ok(())) => 0,
            Ok(Err(why)) => why as i32,
            Err(_) => ForkFailure::Panicked as i32,
        };
        // SAFETY: ends the child without running the parent's atexit handlers or
        // flushing its buffers.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork: {:?}", Errno::last());
    stop.store(true, Ordering::Relaxed);
    busy.into_iter()
        .for_each(|t| t.join().expect("busy thread"));

    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a live out-parameter.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {:?}", Errno::last());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "fork child failed: status {status:#x} (exit codes: {:?})",
        [
            ForkFailure::Panicked,
            ForkFailure::RegistrationChanged,
            ForkFailure::KernelForgotTheArea,
            ForkFailure::CpuDisagrees,
            ForkFailure::CounterInexact,
        ]
        .map(|f| (f, f as i32))
    );
    // The parent's counter is untouched by the child's adds.
    assert_eq!(counter.sum(), 5);
}

/// An add of 1 on the first slot of `table`, read as `u16::MAX` slots one byte apart, on
/// `area`.
fn add_on(area: NonNull<Rseq>, table: &mut [u8]) -> crate::arch::Outcome {
    assert!(table.len() >= usize::from(u16::MAX) + 8);
    // SAFETY: every slot below `len` is inside `table`, which only this thread reaches;
    // `area` comes from `area_or_refusing`.
    unsafe {
        crate::arch::add_on_current_cpu::<0>(
            area.as_ptr(),
            table.as_mut_ptr(),
            usize::from(u16::MAX),
            1,
        )
    }
}

/// What a raw pthread saw, for [`first_use_runs_on_a_refusing_area`].
struct FirstUse {
    /// The table the thread adds on (allocated by the parent: the thread's first
    /// allocation would register it when the tests allocate through `CpuCache`).
    table: *mut u8,
    table_len: usize,
    /// A counter the parent has used already: its slot table is published, so the
    /// thread's first `inc` and `add` run their sequences on a real table.
    counter: *const Counter,
    before: Option<crate::arch::Outcome>,
    stored_before: bool,
    before_area: usize,
    after_area: usize,
    /// `Some(outcome)` of an add on the area after the first use when the thread has no
    /// registered area (the fallback), `None` when it has one.
    after_fallback: Option<crate::arch::Outcome>,
    stored_after: bool,
    after_is_registered: bool,
}

extern "C" fn first_use_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: the parent passes a `FirstUse` it does not touch until `pthread_join`.
    let seen = unsafe { &mut *arg.cast::<FirstUse>() };
    // SAFETY: a table of `table_len` bytes that only this thread reaches until the join.
    let table = unsafe { core::slice::from_raw_parts_mut(seen.table, seen.table_len) };
    // First, before anything of ours runs (or allocates) on this thread.
    let before = thread::area_or_refusing();
    seen.before_area = before.as_ptr() as usize;
    seen.before = Some(add_on(before, table));
    seen.stored_before = table.iter().any(|&b| b != 0);
    // SAFETY: the parent keeps the counter alive until the join.
    let counter = unsafe { &*seen.counter };
    // The thread's first uses: `inc`'s path (the constant count) and `add`'s.
    counter.inc();
    counter.add(5);
    let after = thread::area_or_refusing();
    seen.after_area = after.as_ptr() as usize;
    match thread::current() {
        Some(area) => seen.after_is_registered = after == area,
        None => {
            seen.after_fallback = Some(add_on(after, table));
            seen.stored_after = table.iter().any(|&b| b != 0);
        }
    }
    core::ptr::null_mut()
}

/// Before its first use of cpulocal a thread's sequences see an area whose CPU no bound
/// admits: the add below does not commit (it would if that area said CPU 0); the first
/// `Counter::inc` and `add` take the slow path, register the thread and count once
/// each; from then on the sequences use the registered area (or, in the fallback, the
/// thread's own refusing area, which refuses as well). A raw pthread, so that nothing
/// of ours runs on it before the first check.
fn first_use_runs_on_a_refusing_area() {
    let counter = Counter::new();
    counter.add(1); // publishes the slot table
    let mut table = vec![0u8; 1 << 17];
    let mut seen = FirstUse {
        table: table.as_mut_ptr(),
        table_len: table.len(),
        counter: &counter,
        before: None,
        stored_before: false,
        before_area: 0,
        after_area: 0,
        after_fallback: None,
        stored_after: false,
        after_is_registered: false,
    };
    // SAFETY: `first_use_main` takes a `FirstUse` whose table and counter live until the
    // thread is joined, as `seen`, `table` and `counter` do.
    unsafe { run_on_raw_pthread(first_use_main, (&raw mut seen).cast()) };
    assert_eq!(seen.before, Some(crate::arch::Outcome::Aborted));
    assert!(!seen.stored_before, "a refused sequence stored");
    assert_eq!(counter.sum(), 1 + 1 + 5);
    assert_ne!(
        seen.after_area, seen.before_area,
        "the first use left the shared area"
    );
    match seen.after_fallback {
        None => assert!(
            seen.after_is_registered,
            "the sequences' area is not the registered one"
        ),
        Some(outcome) => {
            assert_eq!(outcome, crate::arch::Outcome::Aborted);
            assert!(!seen.stored_after, "a refused sequence stored");
        }
    }
}

#[test]
fn a_thread_without_an_area_runs_its_sequences_on_one_every_bound_refuses() {
    first_use_runs_on_a_refusing_area();
}

/// [`first_use_runs_on_a_refusing_area`] in a child process (the test `name`) whose
/// environment has `var` set as given.
fn first_use_in_child(name: &str, var: (&'static str, &'static str)) {
    let setup = super::child::Setup {
        env: vec![var],
        ..super::child::Setup::default()
    };
    super::child::in_child(name, setup, first_use_runs_on_a_refusing_area);
}

/// The same with cpulocal's own registration (glibc registers none).
#[test]
fn a_thread_without_an_area_is_refused_with_own_registration() {
    first_use_in_child(
        super::child::test_name!(a_thread_without_an_area_is_refused_with_own_registration),
        ("GLIBC_TUNABLES", "glibc.pthread.rseq=0"),
    );
}

/// The same in the fallback: the thread ends on its own refusing area.
#[test]
fn a_thread_without_an_area_is_refused_in_the_fallback() {
    first_use_in_child(
        super::child::test_name!(a_thread_without_an_area_is_refused_in_the_fallback),
        ("CPULOCAL_DISABLE_RSEQ", "1"),
    );
}
