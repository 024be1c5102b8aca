//! A plugin host that `dlopen`s a library containing cpulocal, calls it, `dlclose`s it
//! and keeps running (yielding, sleeping, taking signals, starting threads, ending the
//! thread that used the plugin) survives. Without pinning, the kernel kills it on the
//! first preemption after the `dlclose`: the threads' `rseq_cs` still point at a
//! descriptor in the unmapped library (and with cpulocal's own registration, the
//! registered areas live in the library's freed TLS).
//!
//! A host with its own copy of cpulocal and a plugin with another, used on the same
//! threads in both orders, both stay exact: with glibc's registration both copies use
//! its area; with their own, the copy that comes second on a thread is refused by the
//! kernel and serves that thread through its slow paths.
//!
//! The plugin is `tests/dlclose_fixture`, built here with cargo; each host runs in a
//! child process, so that its death is a failed test rather than a dead test binary.

mod common;

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{in_child, install_handler, is_child, serial};

/// Where the child finds the plugin.
const FIXTURE_ENV: &str = "CPULOCAL_DLCLOSE_FIXTURE";

/// Builds the plugin (in the parent) and returns its path.
fn build_fixture() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dlclose-fixture");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "--manifest-path"])
        .arg(manifest_dir.join("tests/dlclose_fixture/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .expect("run cargo to build the plugin");
    assert!(status.success(), "building the plugin failed: {status}");
    target_dir.join("debug/libcpulocal_dlclose_fixture.so")
}

static SIGNALS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    // Relaxed: a statistic.
    SIGNALS.fetch_add(1, Ordering::Relaxed);
}

/// The host: load, call on two threads, unload, then live on for a while.
fn host() {
    let path = std::env::var(FIXTURE_ENV).expect("the plugin's path");
    let c_path = CString::new(path).expect("no NUL in the path");
    // SAFETY: `c_path` is NUL-terminated; the plugin's constructors are cpulocal's.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen failed");
    // SAFETY: `handle` is live; the name is NUL-terminated.
    let sym = unsafe { libc::dlsym(handle, c"cpulocal_fixture_run".as_ptr()) };
    assert!(!sym.is_null(), "the plugin exports cpulocal_fixture_run");
    // SAFETY: the plugin defines it as `extern "C" fn(u64) -> u64`.
    let run: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(sym) };
    assert_eq!(run(1000), 1000);

    // A thread that used the plugin and lives on after the dlclose, then exits (with
    // cpulocal's own registration, its unregistration destructor is plugin code).
    let (used, used_rx) = mpsc::channel();
    let (exit, exit_rx) = mpsc::channel::<()>();
    let user = std::thread::spawn(move || {
        used.send(run(1000)).unwrap();
        exit_rx.recv().unwrap();
    });
    assert_eq!(used_rx.recv().unwrap(), 2000);

    // SAFETY: nothing of the plugin is used after this (the function pointer is dead).
    assert_eq!(unsafe { libc::dlclose(handle) }, 0, "dlclose failed");

    install_handler(libc::SIGUSR1, count_signal);
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        std::thread::yield_now();
        std::thread::sleep(Duration::from_micros(200));
        // SAFETY: `me` is this live thread; the handler only counts.
        unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
        std::thread::spawn(std::thread::yield_now).join().unwrap();
    }
    exit.send(()).unwrap();
    user.join().expect("the plugin's user thread exits");
    assert!(SIGNALS.load(Ordering::Relaxed) > 0);
    println!(
        "host alive after dlclose, {} signals",
        SIGNALS.load(Ordering::Relaxed)
    );
}

/// Runs `body` (a host that loads the fixture) in a child process, with `env` and the
/// fixture's path: the child is where the test itself runs again, and finds the path.
fn run_host(name: &str, env: &[(&str, &str)], body: fn()) {
    let _serial = serial();
    if is_child(name) {
        in_child(name, &[], body);
        return;
    }
    let fixture = build_fixture();
    let fixture = fixture.to_str().expect("a UTF-8 path");
    let mut env = env.to_vec();
    env.push((FIXTURE_ENV, fixture));
    in_child(name, &env, body);
}

fn host_survives(name: &str, env: &[(&str, &str)]) {
    run_host(name, env, host);
}

#[test]
fn a_host_survives_dlclose_of_a_plugin_using_glibc_registration() {
    host_survives(
        "a_host_survives_dlclose_of_a_plugin_using_glibc_registration",
        &[],
    );
}

#[test]
fn a_host_survives_dlclose_of_a_plugin_using_its_own_registration() {
    host_survives(
        "a_host_survives_dlclose_of_a_plugin_using_its_own_registration",
        &[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
    );
}

/// A program that links cpulocal does not open its own `argv[0]`: pinning the object
/// that contains cpulocal (the load-time constructor's `dlopen(.., RTLD_NODELETE)`) is
/// for shared objects, and in the main program `dladdr`'s name is `argv[0]`, which the
/// exec's caller chose. A FIFO there made the process block before `main` (in `open`),
/// for ever.
#[test]
fn a_program_whose_argv0_names_a_fifo_starts() {
    use std::os::unix::process::CommandExt;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("argv0-fifo");
    std::fs::create_dir_all(&dir).expect("a directory for the FIFO");
    let fifo = dir.join(format!("fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let path = CString::new(fifo.to_str().expect("a UTF-8 path")).unwrap();
    // SAFETY: `path` is NUL-terminated.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
    // This test binary again, named by the FIFO, only listing its tests.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg0(&fifo)
        .arg("--list")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the test binary");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_file(&fifo);
    assert!(
        status.is_some_and(|s| s.success()),
        "a program named by a FIFO did not start: {status:?}"
    );
}

/// A symbol of the plugin.
fn plugin_fn(handle: *mut libc::c_void, name: &std::ffi::CStr) -> *mut libc::c_void {
    // SAFETY: `handle` is live; the name is NUL-terminated.
    let sym = unsafe { libc::dlsym(handle, name.as_ptr()) };
    assert!(!sym.is_null(), "the plugin exports {name:?}");
    sym
}

/// The CPU `cpu()` reports, read when the thread stays on one CPU around it.
fn agrees_with_sched_getcpu(cpu: impl Fn() -> u32) -> bool {
    (0..100).any(|_| {
        // SAFETY: sched_getcpu has no preconditions.
        let before = unsafe { libc::sched_getcpu() };
        let ours = cpu() as i32;
        // SAFETY: as above.
        let after = unsafe { libc::sched_getcpu() };
        before == ours && ours == after
    })
}

/// The host: its own copy of cpulocal and the plugin's used on the same threads, in both
/// orders, the plugin loaded by a thread the host's copy never registered.
fn split_host() {
    let path = std::env::var(FIXTURE_ENV).expect("the plugin's path");
    let c_path = CString::new(path).expect("no NUL in the path");
    // Loaded on a fresh thread, so that the plugin's copy decides (and registers) there.
    let handle = std::thread::spawn(move || {
        // SAFETY: `c_path` is NUL-terminated; the plugin's constructors are cpulocal's.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen failed");
        handle as usize
    })
    .join()
    .expect("the loading thread") as *mut libc::c_void;
    // SAFETY: the plugin defines these with these signatures, and is never closed.
    let (run, registered, cpu) = unsafe {
        (
            core::mem::transmute::<*mut libc::c_void, extern "C" fn(u64) -> u64>(plugin_fn(
                handle,
                c"cpulocal_fixture_run",
            )),
            core::mem::transmute::<*mut libc::c_void, extern "C" fn() -> u32>(plugin_fn(
                handle,
                c"cpulocal_fixture_registered",
            )),
            core::mem::transmute::<*mut libc::c_void, extern "C" fn() -> u32>(plugin_fn(
                handle,
                c"cpulocal_fixture_cpu",
            )),
        )
    };
    let counter = std::sync::Arc::new(cpulocal::Counter::new());
    let slots = std::sync::Arc::new(cpulocal::PerCpu::new(|_| 0u64));
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 2000;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (counter, slots) = (counter.clone(), slots.clone());
            std::thread::spawn(move || {
                let host = || {
                    for _ in 0..ROUNDS {
                        counter.add(1);
                        slots.with_cpu(|v| *v += 1);
                    }
                };
                // Half the threads meet the plugin's copy first.
                if t % 2 == 0 {
                    run(ROUNDS);
                    host();
                } else {
                    host();
                    run(ROUNDS);
                }
                let copies = (cpulocal::thread::is_registered(), registered() == 1);
                let cpus = (
                    agrees_with_sched_getcpu(|| cpulocal::current_cpu() as u32),
                    agrees_with_sched_getcpu(|| cpu()),
                );
                (copies, cpus)
            })
        })
        .collect();
    let mechanism = cpulocal::mechanism();
    for (t, w) in workers.into_iter().enumerate() {
        let ((host_registered, plugin_registered), (host_cpu, plugin_cpu)) =
            w.join().expect("a worker using both copies");
        println!(
            "thread {t}: host copy registered {host_registered}, plugin copy registered \
             {plugin_registered}; current_cpu agrees: host {host_cpu}, plugin {plugin_cpu}"
        );
        assert!(host_cpu && plugin_cpu, "a copy reports a wrong CPU");
        // What the registrations must be follows from the host's mechanism, not from the
        // environment: musl and old glibc have no area of glibc's, the fallback none.
        let registrar = match mechanism {
            cpulocal::Mechanism::Rseq { registrar, .. } => registrar,
            cpulocal::Mechanism::Fallback(_) => {
                assert!(
                    !host_registered && !plugin_registered,
                    "the fallback registers"
                );
                continue;
            }
        };
        if registrar == cpulocal::Registrar::Own {
            // The kernel takes one area per thread: the copy that came second is refused
            // (EINVAL, another area) and serves the thread through its slow paths.
            assert!(
                host_registered != plugin_registered,
                "exactly one copy holds the thread's registration"
            );
        } else {
            assert!(
                host_registered && plugin_registered,
                "both use glibc's area"
            );
        }
    }
    assert_eq!(counter.sum(), THREADS * ROUNDS, "the host's Counter");
    let mut total = 0;
    slots.for_each(|_, v| total += *v);
    assert_eq!(total, THREADS * ROUNDS, "the host's PerCpu");
    assert_eq!(run(0), THREADS * ROUNDS, "the plugin's Counter");
    println!("host: {}", cpulocal::mechanism());
}

fn split_host_is_exact(name: &str, env: &[(&str, &str)]) {
    run_host(name, env, split_host);
}

#[test]
fn a_host_and_a_plugin_with_their_own_copies_are_both_exact_with_glibc_registration() {
    split_host_is_exact(
        "a_host_and_a_plugin_with_their_own_copies_are_both_exact_with_glibc_registration",
        &[],
    );
}

#[test]
fn a_host_and_a_plugin_with_their_own_copies_are_both_exact_with_their_own_registrations() {
    split_host_is_exact(
        "a_host_and_a_plugin_with_their_own_copies_are_both_exact_with_their_own_registrations",
        &[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
    );
}
