//! Running one test again in a child process, in an environment the parent cannot
//! change for itself (the mechanism is decided once per process, glibc registers rseq
//! at start-up).
//!
//! A test calls [`in_child`] with its own name: in the parent, that re-executes the
//! test binary with `--exact <name> --nocapture --test-threads=1` and
//! [`CHILD_ENV`]`=<name>`, and checks the exit status and output; in the child, it runs
//! the body and prints a marker the parent looks for.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Set in a child to the name of the test it runs.
const CHILD_ENV: &str = "CPULOCAL_TEST_CHILD";
/// Printed by a child whose body returned.
const MARKER: &str = "cpulocal-child-ok";

/// The full libtest name of a test function in the calling module
/// (`tests::refused::some_test`).
macro_rules! test_name {
    ($f:ident) => {{
        let _ = $f; // the function must exist
        crate::tests::child::strip_crate(concat!(module_path!(), "::", stringify!($f)))
    }};
}
pub(crate) use test_name;

/// `cpulocal::tests::x::f` → `tests::x::f`, the name libtest gives a unit test.
pub(crate) fn strip_crate(path: &'static str) -> &'static str {
    path.split_once("::").map_or(path, |(_, rest)| rest)
}

/// How the child process differs from the parent.
#[derive(Debug, Default)]
pub(crate) struct Setup {
    /// Extra environment variables.
    pub(crate) env: Vec<(&'static str, &'static str)>,
    /// Install a seccomp filter that makes `rseq(2)` fail with ENOSYS, after the fork
    /// and before the exec, so that glibc's own registration fails at start-up.
    pub(crate) deny_rseq: bool,
}

/// Whether this process is the child running `name`.
pub(crate) fn is_child(name: &str) -> bool {
    match std::env::var(CHILD_ENV) {
        Ok(running) => {
            assert_eq!(running, name, "a child runs exactly one test");
            true
        }
        Err(_) => false,
    }
}

/// In the parent: runs the test `name` in a child set up as `setup` and asserts that it
/// passed. In the child: runs `body`.
pub(crate) fn in_child(name: &str, setup: Setup, body: impl FnOnce()) {
    if is_child(name) {
        body();
        println!("{MARKER} {name}");
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        // The child runs natively even when the parent runs under valgrind.
        .env_remove("CPULOCAL_TEST_VALGRIND")
        .env_remove("CPULOCAL_DISABLE_RSEQ")
        .env_remove("GLIBC_TUNABLES");
    for (k, v) in &setup.env {
        cmd.env(k, v);
    }
    if setup.deny_rseq {
        let filter = syscall_error_filter(libc::SYS_rseq, libc::ENOSYS);
        // SAFETY: the closure runs in the forked child before exec: it only makes two
        // system calls on data built before the fork (no allocation, no locks), which
        // is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || install_seccomp(&filter));
        }
    }
    let out = cmd.output().expect("spawn the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown by libtest for a failing test, or with --nocapture.
    println!(
        "--- child {name} ({:?}) ---\n{stdout}{stderr}--- end child ---",
        out.status
    );
    assert!(
        out.status.success(),
        "child {name} failed: {:?}",
        out.status
    );
    assert!(
        stdout.contains(&format!("{MARKER} {name}")) && stdout.contains("1 passed"),
        "child {name} did not run its body"
    );
}

/// The `arch` a seccomp filter sees: `AUDIT_ARCH_X86_64` (`EM_X86_64 |
/// __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// The `arch` a seccomp filter sees: `AUDIT_ARCH_AARCH64` (`EM_AARCH64 |
/// __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;

const fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// A classic-BPF seccomp program: kill on a foreign architecture, system call `nr` fails
/// with `errno`, everything else is allowed.
pub(crate) fn syscall_error_filter(nr: libc::c_long, errno: libc::c_int) -> [libc::sock_filter; 7] {
    // Offsets in `struct seccomp_data`.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const RET_K: u32 = libc::BPF_RET | libc::BPF_K;
    const LD_W: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    const JEQ_K: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    [
        stmt(LD_W, ARCH),
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W, NR),
        jump(JEQ_K, nr as u32, 0, 1),
        stmt(RET_K, libc::SECCOMP_RET_ERRNO | errno as u32),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// `PR_SET_NO_NEW_PRIVS` (so an unprivileged process may install a filter), then the
/// filter, for the calling thread only. In a forked child before exec, both survive the
/// exec; in a thread of a running process, its other threads keep running unfiltered.
pub(crate) fn install_seccomp(filter: &[libc::sock_filter; 7]) -> std::io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points to a valid program of `len` instructions, alive for the
    // call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
