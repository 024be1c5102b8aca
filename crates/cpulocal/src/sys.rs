//! Raw system calls and process facts, with typed errors.
//!
//! Everything here is a thin, documented wrapper over `libc`; callers above this layer
//! never see a raw return code or `errno`.

use core::fmt;

use crate::abi;

/// An error number returned by the kernel.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's `errno`.
    #[inline]
    pub fn last() -> Self {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// The symbolic name (`"ENOSYS"`), or `"E?"` for numbers cpulocal does not expect.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::ENOSYS => "ENOSYS",
            libc::EPERM => "EPERM",
            libc::EINVAL => "EINVAL",
            libc::EBUSY => "EBUSY",
            libc::EFAULT => "EFAULT",
            libc::EACCES => "EACCES",
            libc::ENOMEM => "ENOMEM",
            libc::EAGAIN => "EAGAIN",
            _ => "E?",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            self.name(),
            std::io::Error::from_raw_os_error(self.0)
        )
    }
}

impl std::error::Error for Errno {}

/// `rseq(2)`: register (`flags == 0`) or unregister ([`abi::RSEQ_FLAG_UNREGISTER`]) `area`.
///
/// # Safety
///
/// On registration `area` must point to `len` writable bytes that stay valid, and are
/// not reused for anything else, until the same area is unregistered or the thread
/// exits: the kernel writes into them on every return to user space.
pub unsafe fn rseq(area: *mut abi::Rseq, len: u32, flags: i32, sig: u32) -> Result<(), Errno> {
    // SAFETY: the caller guarantees the lifetime of `area`; the syscall only reads its
    // integer arguments and writes `len` bytes at `area`.
    let r = unsafe { libc::syscall(libc::SYS_rseq, area, len, flags, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// `membarrier(2)`. Returns the kernel's non-negative result.
pub fn membarrier(cmd: i32, flags: u32, cpu: i32) -> Result<i64, Errno> {
    // SAFETY: membarrier takes integers only and touches no user memory.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd, flags, cpu) };
    if r >= 0 {
        Ok(r)
    } else {
        Err(Errno::last())
    }
}

/// The address of the low 32 bits of `word`: the futex of a word wider than a futex.
fn low_half(word: &core::sync::atomic::AtomicUsize) -> *const u32 {
    let p = word.as_ptr().cast::<u32>();
    if cfg!(target_endian = "big") {
        p.wrapping_add(1)
    } else {
        p
    }
}

/// [`futex_wait`] on the low 32 bits of a `usize` word (a lock word): sleeps while they
/// hold `expected`, until a [`futex_wake_low_half`] on the same word (or a signal, or a
/// spurious wake-up: callers re-check). The kernel compares and queues atomically, so a
/// wake that follows a change of those bits cannot be missed.
///
/// # Errors
///
/// `EAGAIN` when the bits did not hold `expected`; `EINTR` when a signal woke the
/// thread.
pub fn futex_wait_low_half(
    word: &core::sync::atomic::AtomicUsize,
    expected: u32,
) -> Result<(), Errno> {
    // SAFETY: FUTEX_WAIT reads the live, aligned u32 inside `word` and writes no user
    // memory; the timeout pointer is null (no time limit).
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            low_half(word),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            core::ptr::null::<libc::timespec>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// [`futex_wake`] for [`futex_wait_low_half`]: wakes up to `n` threads asleep on the low
/// 32 bits of `word`; returns how many it woke.
pub fn futex_wake_low_half(word: &core::sync::atomic::AtomicUsize, n: i32) -> Result<usize, Errno> {
    // SAFETY: FUTEX_WAKE uses the address as a key only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            low_half(word),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        )
    };
    if r >= 0 {
        Ok(r as usize)
    } else {
        Err(Errno::last())
    }
}

/// The `getcpu` system call itself (not the vDSO): `(cpu, node)`.
pub fn getcpu_syscall() -> Result<(u32, u32), Errno> {
    let mut cpu: u32 = 0;
    let mut node: u32 = 0;
    // SAFETY: both pointers are to live locals; the third argument (tcache) is unused
    // by the kernel and may be null.
    let r = unsafe {
        libc::syscall(
            libc::SYS_getcpu,
            &mut cpu as *mut u32,
            &mut node as *mut u32,
            core::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r == 0 {
        Ok((cpu, node))
    } else {
        Err(Errno::last())
    }
}

/// glibc's `sched_getcpu()` (the vDSO, or the syscall where there is no vDSO).
#[inline]
pub fn sched_getcpu() -> Result<u32, Errno> {
    // SAFETY: sched_getcpu has no preconditions.
    let r = unsafe { libc::sched_getcpu() };
    if r >= 0 {
        Ok(r as u32)
    } else {
        Err(Errno::last())
    }
}

/// `getauxval(key)`, 0 when the kernel did not supply the key.
pub fn getauxval(key: u64) -> u64 {
    // SAFETY: getauxval has no preconditions; unknown keys return 0.
    unsafe { libc::getauxval(key as libc::c_ulong) as u64 }
}

/// Address of a symbol of the running process, looked up at run time so the crate
/// links where the symbol does not exist (musl, glibc before 2.35, static builds).
pub fn lookup_symbol(name: &core::ffi::CStr) -> Option<core::ptr::NonNull<u8>> {
    // SAFETY: `name` is NUL-terminated; RTLD_DEFAULT searches the global scope and
    // returns null when the symbol is absent.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    core::ptr::NonNull::new(p.cast())
}

/// Keeps the shared object that contains cpulocal loaded for the rest of the process:
/// `dlopen(itself, RTLD_NOLOAD | RTLD_NODELETE)`, the object found with `dladdr` on one
/// of its functions. A later `dlclose` by the program that loaded it then unmaps
/// nothing. Returns whether an object was pinned (false in the main program, which is
/// never unloaded, or where the loader does not know the object).
pub fn pin_own_object() -> bool {
    // SAFETY: Dl_info is plain old data; all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    let this = pin_own_object as fn() -> bool as *const libc::c_void;
    // SAFETY: `this` is an address in our own code; `info` is a live out-parameter.
    if unsafe { libc::dladdr(this, &mut info) } == 0 || info.dli_fname.is_null() {
        return false;
    }
    // The main program needs no pin, and its name from `dladdr` is `argv[0]`, which the
    // exec's caller chose: `dlopen` would open that path (a FIFO there blocked the
    // process before `main`) or search the library path for a bare name. Its program
    // headers, from the auxiliary vector, lie in its first mapped page.
    // SAFETY: getauxval has no preconditions; 0 means the entry is absent.
    let main_headers = unsafe { libc::getauxval(libc::AT_PHDR) } as *const libc::c_void;
    if !main_headers.is_null() {
        // SAFETY: as above.
        let mut main: libc::Dl_info = unsafe { core::mem::zeroed() };
        // SAFETY: a live out-parameter; `dladdr` only looks the address up.
        let found = unsafe { libc::dladdr(main_headers, &mut main) } != 0;
        if found && main.dli_fbase == info.dli_fbase {
            return false;
        }
    }
    // RTLD_NOLOAD loads nothing new; RTLD_NODELETE marks the object as never to be
    // unloaded. The handle is deliberately never closed.
    // SAFETY: `dli_fname` is the NUL-terminated name the loader keeps for the object,
    // alive while the object is loaded (it is: we run its code).
    let handle = unsafe {
        libc::dlopen(
            info.dli_fname,
            libc::RTLD_LAZY | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
        )
    };
    !handle.is_null()
}

/// Parses a kernel CPU list such as `0-3,8,10-11` into the number of the highest CPU
/// plus one. `None` for text that is not such a list.
pub fn cpu_list_span(list: &str) -> Option<usize> {
    let mut max: Option<usize> = None;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let hi = match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?);
                if lo > hi {
                    return None;
                }
                hi
            }
            None => part.parse::<usize>().ok()?,
        };
        max = Some(max.map_or(hi, |m| m.max(hi)));
    }
    max.map(|m| m + 1)
}

/// Counts the CPUs in a kernel CPU list such as `0-3,8`.
pub fn cpu_list_count(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?);
                hi.checked_sub(lo)? + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    Some(n)
}

/// The number of CPU ids the kernel may ever report (`/sys/.../cpu/possible`, the
/// highest id plus one): the length of every per-CPU array. Read once per process.
///
/// It is a bound the kernel keeps: every CPU number it reports (`cpu_id_start`,
/// `cpu_id`, `getcpu`) is below it, so per-CPU tables of this length cover every CPU
/// (the sequences still compare the CPU with the table length, in a register, so memory
/// safety never rests on this bound). Where `/sys` cannot be read, the bound is the
/// larger of the configured CPUs and the bits of the kernel's CPU mask (the size
/// `sched_getaffinity` reports, which covers every CPU id the kernel has).
///
/// Never allocates (the file is read into a buffer on the stack), so that a global
/// allocator built on cpulocal ([`crate::alloc::CpuCache`]) can call it.
pub fn possible_cpus() -> usize {
    use core::sync::atomic::{AtomicUsize, Ordering};
    /// 0: not read yet. Racing first readers compute the same value.
    static POSSIBLE: AtomicUsize = AtomicUsize::new(0);
    // Relaxed: a plain value, the same whoever computed it.
    match POSSIBLE.load(Ordering::Relaxed) {
        0 => {
            let mut buf = [0u8; 256];
            let n = read_small_file(c"/sys/devices/system/cpu/possible", &mut buf)
                .and_then(cpu_list_span)
                .unwrap_or_else(|| {
                    // SAFETY: sysconf has no preconditions.
                    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
                    (configured.max(1) as usize).max(kernel_cpumask_bits())
                })
                .max(1);
            POSSIBLE.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// The number of bits in the kernel's CPU masks (`nr_cpu_ids` rounded up to a whole
/// `long`): what the raw `sched_getaffinity` system call copies out, times 8. Every CPU
/// id is below it. 0 if the call keeps failing (or the mask is larger than 32768 CPUs).
///
/// Never allocates (the mask is a buffer on the stack), like [`possible_cpus`].
pub fn kernel_cpumask_bits() -> usize {
    /// 32768 CPUs, four times the kernel's largest `NR_CPUS` today.
    const MAX_WORDS: usize = 512;
    let mut mask = [0u64; MAX_WORDS];
    let mut words = 16usize; // 1024 CPUs, doubled while the kernel's mask is larger
    while words <= MAX_WORDS {
        // SAFETY: the raw system call writes at most `words * 8` bytes into `mask`,
        // which has room for `MAX_WORDS >= words` words.
        let copied =
            unsafe { libc::syscall(libc::SYS_sched_getaffinity, 0, words * 8, mask.as_mut_ptr()) };
        if copied > 0 {
            return copied as usize * 8;
        }
        if Errno::last().0 != libc::EINVAL {
            return 0;
        }
        words *= 2;
    }
    0
}

/// Reads a small text file into `buf` without allocating; `None` on any error, or when
/// the file does not fit or is not UTF-8.
fn read_small_file<'a>(path: &core::ffi::CStr, buf: &'a mut [u8]) -> Option<&'a str> {
    // SAFETY: `path` is NUL-terminated; the flags ask for no file creation.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut len = 0;
    let ok = loop {
        if len == buf.len() {
            break false;
        }
        // SAFETY: `buf[len..]` is writable for `buf.len() - len` bytes; `fd` is open.
        let r = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        match r {
            0 => break true,
            r if r > 0 => len += r as usize,
            _ if Errno::last().0 == libc::EINTR => {}
            _ => break false,
        }
    };
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    if ok {
        core::str::from_utf8(&buf[..len]).ok()
    } else {
        None
    }
}

/// Whether the environment variable `name` is set to something other than empty or
/// `0`. Never allocates (reads the environment with `getenv`), so registration can use
/// it inside a global allocator.
pub fn env_flag(name: &core::ffi::CStr) -> bool {
    // SAFETY: `name` is NUL-terminated; getenv returns null or a NUL-terminated string
    // that stays valid while nobody modifies the environment (cpulocal reads it only on
    // its first use in the process, like `std::env::var_os` would).
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return false;
    }
    // SAFETY: non-null values from getenv are NUL-terminated strings.
    let bytes = unsafe { core::ffi::CStr::from_ptr(value) }.to_bytes();
    !bytes.is_empty() && bytes != b"0"
}

/// The number of CPUs online now (`/sys/.../cpu/online`).
pub fn online_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| cpu_list_count(&s))
        .unwrap_or_else(|| {
            // SAFETY: sysconf has no preconditions.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
            n.max(1) as usize
        })
}

/// This process's resident memory in bytes (`/proc/self/statm`, second field), or
/// `None` where `/proc` is not mounted.
pub fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { core::mem::zeroed() };
    // SAFETY: `u` is a live, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::from("unknown");
    }
    // SAFETY: uname NUL-terminates `release`.
    let c = unsafe { core::ffi::CStr::from_ptr(u.release.as_ptr()) };
    c.to_string_lossy().into_owned()
}

/// Every signal blocked in the calling thread until dropped (then its mask is restored):
/// for the few places that hold a lock a signal handler may need, so that the handler
/// runs after the lock is given back instead of waiting for it forever.
pub(crate) struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    /// Blocks every signal (SIGKILL and SIGSTOP excepted, by the kernel).
    pub(crate) fn new() -> SignalsBlocked {
        // SAFETY: sigset_t is plain old data; both are initialised by the calls below.
        let mut all: libc::sigset_t = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { core::mem::zeroed() };
        // SAFETY: `all` is a live sigset_t.
        unsafe { libc::sigfillset(&mut all) };
        // SAFETY: both sets are live; SIG_BLOCK with a valid set cannot fail.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) };
        SignalsBlocked { old }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: `old` is the mask `new` saved; restoring it cannot fail. A signal that
        // arrived meanwhile is delivered now.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, core::ptr::null_mut()) };
    }
}

/// Reserves `len` bytes of address space, readable and writable, whose pages the kernel
/// populates (with zeros) only when first touched: `mmap(MAP_PRIVATE | MAP_ANONYMOUS |
/// MAP_NORESERVE)`. Untouched pages cost no memory, and no swap is set aside for them
/// (under `vm.overcommit_memory=2` the kernel charges the whole range anyway, and may
/// refuse it with `ENOMEM`). Release it with [`unmap`].
///
/// The range is marked `MADV_NOHUGEPAGE`: with transparent huge pages set to `always`
/// (Debian's kernels), the first write into a 2 MiB-aligned region would populate all of
/// it, that is two or more CPUs' 1 MiB ranges of the per-CPU pool, and whole rings of CPUs
/// that never ran the process.
pub fn map_lazy(len: usize) -> Result<core::ptr::NonNull<u8>, Errno> {
    // SAFETY: an anonymous mapping at an address of the kernel's choosing touches no
    // existing memory.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    // SAFETY: advice on our own fresh mapping; it changes no contents. EINVAL (a kernel
    // without transparent huge pages) leaves nothing to avoid.
    let _ = unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
    core::ptr::NonNull::new(p.cast()).ok_or(Errno(libc::ENOMEM))
}

/// Unmaps `len` bytes at `addr`.
///
/// # Safety
///
/// `[addr, addr + len)` is a mapping from [`map_lazy`] that nothing uses any more.
pub unsafe fn unmap(addr: core::ptr::NonNull<u8>, len: usize) {
    // SAFETY: the caller's contract; munmap of a whole mapping of ours cannot fail.
    unsafe { libc::munmap(addr.as_ptr().cast(), len) };
}

/// The process's address-space limit (`RLIMIT_AS`, soft), `None` when unlimited.
pub fn address_space_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0 {
        return None;
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// The page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// `futex(FUTEX_WAIT_PRIVATE)`: sleeps while `*word == expected`, until a
/// [`futex_wake`] on `word`, a signal, or `timeout` (relative; `None`: no limit).
/// Returns at once when `*word != expected`. Spurious returns are possible: callers
/// re-check their condition.
pub fn futex_wait(
    word: &core::sync::atomic::AtomicU32,
    expected: u32,
    timeout: Option<std::time::Duration>,
) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as _,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(core::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, 4-byte aligned u32 for the call; `ts_ptr` is null or
    // points to a live timespec. The kernel only reads both.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            ts_ptr,
        )
    };
}

/// `futex(FUTEX_WAKE_PRIVATE)`: wakes up to `count` threads sleeping in [`futex_wait`]
/// on `word`.
pub fn futex_wake(word: &core::sync::atomic::AtomicU32, count: i32) {
    // SAFETY: `word` is a live u32; FUTEX_WAKE does not access it beyond its address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            count,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        assert_eq!(cpu_list_span("0-1\n"), Some(2));
        assert_eq!(cpu_list_span("0"), Some(1));
        assert_eq!(cpu_list_span("0-3,8,10-11"), Some(12));
        assert_eq!(cpu_list_count("0-3,8,10-11"), Some(7));
        assert_eq!(cpu_list_span("3-1"), None);
        assert_eq!(cpu_list_span("x"), None);
        assert_eq!(cpu_list_span(""), None);
    }

    #[test]
    fn the_kernel_cpu_mask_covers_the_possible_cpus() {
        // The fallback bound of `possible_cpus` must never be below the real one.
        assert!(kernel_cpumask_bits() >= possible_cpus());
        assert_eq!(kernel_cpumask_bits() % 64, 0);
    }

    #[test]
    fn every_cpu_the_kernel_reports_is_below_possible_cpus() {
        // The promise that tables of `possible_cpus` slots cover every CPU (so the
        // sequences' length compare never sends a thread to the slow path for good): on
        // every CPU this process may run on, the CPU number read is below `possible_cpus`.
        std::thread::spawn(|| {
            // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
            let mut allowed: libc::cpu_set_t = unsafe { core::mem::zeroed() };
            // SAFETY: `allowed` is a live cpu_set_t of the size passed.
            let got = unsafe {
                libc::sched_getaffinity(0, core::mem::size_of_val(&allowed), &mut allowed)
            };
            assert_eq!(got, 0);
            let mut checked = 0;
            for cpu in 0..libc::CPU_SETSIZE as usize {
                // SAFETY: `cpu` is below CPU_SETSIZE.
                if !unsafe { libc::CPU_ISSET(cpu, &allowed) } {
                    continue;
                }
                // SAFETY: as above.
                let mut one: libc::cpu_set_t = unsafe { core::mem::zeroed() };
                // SAFETY: `cpu` is below CPU_SETSIZE.
                unsafe { libc::CPU_SET(cpu, &mut one) };
                // SAFETY: `one` is a live cpu_set_t of the size passed.
                if unsafe { libc::sched_setaffinity(0, core::mem::size_of_val(&one), &one) } != 0 {
                    continue; // e.g. a CPU that went offline meanwhile
                }
                let seen = crate::current_cpu();
                assert!(
                    seen < possible_cpus(),
                    "CPU {seen} with {} possible",
                    possible_cpus()
                );
                checked += 1;
            }
            assert!(checked >= 1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn possible_cpus_cover_online_cpus() {
        assert!(possible_cpus() >= online_cpus());
        assert!(possible_cpus() >= 1);
    }
}
