//! Registration of the calling thread's `struct rseq`, and the process-wide choice of
//! mechanism.
//!
//! # The state of a thread
//!
//! Each thread keeps one word in a const-initialised thread-local, `AREA`:
//!
//! | value | meaning |
//! |---|---|
//! | `0` (`UNKNOWN`) | the thread has not used cpulocal yet |
//! | `1` (`UNAVAILABLE`) | this thread cannot use rseq: the fallback (or the slow path) serves it |
//! | any other | address of the thread's registered `struct rseq` |
//!
//! The fast path (`current`) is one thread-local load and one compare that is always
//! predicted the same way after the first call; everything else is out of line.
//!
//! A second word, `SEQUENCE_AREA`, serves the fast paths whose sequences check the CPU
//! they read against their table's bound (`Counter`'s): it holds the registered area,
//! or, for a thread that has none (yet), a *refusing area*, laid out like `struct rseq`
//! with every CPU field at `u32::MAX`, which no bound admits. Those fast paths load it
//! and run their sequence without a compare: on a refusing area the sequence exits
//! before its commit, as after a migration, and the slow path registers the thread or
//! serves it. A thread that cannot use rseq has a refusing area of its own in its TLS
//! (the sequence stores `rseq_cs` into it); a thread's first call uses one static area
//! shared by all threads, and then never again.
//!
//! # Whose area
//!
//! The kernel accepts one registration per thread. glibc ≥ 2.35 registers one for every
//! thread it creates and exports `__rseq_offset` (from the thread pointer) and
//! `__rseq_size`; when `__rseq_size > 0` cpulocal uses that area and never registers.
//! Otherwise (glibc told not to with `GLIBC_TUNABLES=glibc.pthread.rseq=0`, musl, an
//! old glibc) cpulocal registers an area of its own in its own TLS, lazily, on the first
//! use in each thread, and unregisters it from a pthread-key destructor. With glibc,
//! those run after every C++ and Rust `thread_local!` destructor (`start_thread` calls
//! `__call_tls_dtors` first), so the area stays registered for destructors that still
//! use cpulocal, and is unregistered before the thread's TLS is freed. (On musl, Rust's
//! destructors are pthread-key destructors too, in no fixed order with ours; one that
//! runs later finds the thread unregistered and is served by the slow paths.)
//!
//! The symbols are looked up with `dlsym` rather than linked, so the crate links and
//! runs where they do not exist.
//!
//! # Limits
//!
//! - A statically linked glibc ≥ 2.35 registers every thread, but `dlsym` cannot find
//!   its symbols: cpulocal's own registration then fails with EINVAL and the process runs
//!   the fallback (correct, not fast). Set `GLIBC_TUNABLES=glibc.pthread.rseq=0` there.
//! - A thread whose *first* use comes in the last round of pthread-key destructors
//!   (after three rounds that each set a key again) exits with its own area still
//!   registered: no round is left to undo it. glibc frees a thread's memory only after
//!   it has exited, so that is harmless there. musl unmaps a detached thread's stack
//!   and TLS just before its exit system call: a preemption in between makes the
//!   kernel's next update of the area fault, and the kernel kills the process. A thread
//!   that may first use cpulocal that late should call
//!   [`register_current_thread`](crate::register_current_thread) when it starts.
//!
//! # Unloading
//!
//! A plugin that contains cpulocal may be `dlopen`ed and `dlclose`d by its host. Unmapping
//! cpulocal's code would kill the process: a thread's `rseq_cs` keeps pointing at the
//! descriptor of its last sequence until the kernel clears it lazily (on its next
//! preemption or signal *outside* the sequence, when it reads the unmapped descriptor
//! and kills the thread), our own areas live in the library's TLS, and the pthread-key
//! destructor that unregisters them is library code. So the first process-wide
//! decision pins the object that contains cpulocal (`dlopen(itself, RTLD_NOLOAD |
//! RTLD_NODELETE)`): `dlclose` then leaves it mapped, at the cost of its memory staying in
//! the process. Clearing `rseq_cs` after every sequence instead would add a store to
//! every operation and still leave the areas and the destructor in unmapped memory.

//! # The mechanism
//!
//! The first thread to use cpulocal decides for the process ([`mechanism`]): glibc's
//! area, our own, or the fallback when rseq is missing or refused (ENOSYS under
//! valgrind, gVisor or qemu-user; EPERM from seccomp; EINVAL). A later thread that
//! still cannot register (a seccomp filter installed on it alone, or a destructor that
//! runs after the unregistration) is marked `UNAVAILABLE`; the primitives report
//! `Aborted` to it and the structures serve it through their slow paths, which are
//! correct next to threads that do use rseq.

use core::cell::{Cell, UnsafeCell};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::abi::{self, Rseq};
use crate::arch;
use crate::sys::{self, Errno};

/// [`AREA`] of a thread that has not used cpulocal yet.
const UNKNOWN: usize = 0;
/// [`AREA`] of a thread that cannot use rseq.
const UNAVAILABLE: usize = 1;

/// A stand-in for `struct rseq` that no sequence accepts: `cpu_id_start`, `cpu_id` and
/// `mm_cid` are `u32::MAX`, beyond every table's bound, so a sequence that reads its CPU
/// from it leaves before its commit. Atomics, because the sequences store `rseq_cs` into
/// it, and the static one is shared by the threads that have not used cpulocal yet.
#[repr(C, align(32))]
struct RefusingArea {
    cpu_id_start: AtomicU32,
    cpu_id: AtomicU32,
    rseq_cs: AtomicU64,
    flags: AtomicU32,
    node_id: AtomicU32,
    mm_cid: AtomicU32,
    slice_ctrl: AtomicU32,
}

impl RefusingArea {
    const fn new() -> Self {
        RefusingArea {
            cpu_id_start: AtomicU32::new(u32::MAX),
            cpu_id: AtomicU32::new(u32::MAX),
            rseq_cs: AtomicU64::new(0),
            flags: AtomicU32::new(0),
            node_id: AtomicU32::new(u32::MAX),
            mm_cid: AtomicU32::new(u32::MAX),
            slice_ctrl: AtomicU32::new(0),
        }
    }
}

// The sequences address it as a `struct rseq`.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RefusingArea>() == size_of::<Rseq>());
    assert!(align_of::<RefusingArea>() == align_of::<Rseq>());
    assert!(offset_of!(RefusingArea, cpu_id_start) == offset_of!(Rseq, cpu_id_start));
    assert!(offset_of!(RefusingArea, cpu_id) == offset_of!(Rseq, cpu_id));
    assert!(offset_of!(RefusingArea, rseq_cs) == offset_of!(Rseq, rseq_cs));
    assert!(offset_of!(RefusingArea, mm_cid) == offset_of!(Rseq, mm_cid));
};

/// The refusing area of the threads that have not used cpulocal yet.
static REFUSING_BEFORE_FIRST_USE: RefusingArea = RefusingArea::new();

/// Room reserved for our own registration: enough for every field the kernel defines
/// today plus later growth. A feature size beyond it falls back to the 32-byte legacy
/// registration, which every kernel accepts.
const OWN_AREA_SIZE: usize = 128;
/// Alignment of our own area (`AT_RSEQ_ALIGN` is 32 before Linux 7.0, 64 from 7.0).
const OWN_AREA_ALIGN: u32 = 64;

#[repr(C, align(64))]
struct OwnArea(UnsafeCell<[u8; OWN_AREA_SIZE]>);

const _: () = assert!(core::mem::align_of::<OwnArea>() == OWN_AREA_ALIGN as usize);

thread_local! {
    /// The state of the calling thread; see the module documentation.
    static AREA: Cell<usize> = const { Cell::new(UNKNOWN) };
    /// The thread's registered area, or a refusing area (see the module docs).
    static SEQUENCE_AREA: Cell<*mut Rseq> = const {
        Cell::new((&raw const REFUSING_BEFORE_FIRST_USE).cast_mut().cast())
    };
    /// The refusing area of a thread that cannot use rseq.
    static REFUSING_AREA: RefusingArea = const { RefusingArea::new() };
    /// The area we register when glibc did not. Zeroed: `cpu_id_start` reads 0 until
    /// the kernel fills it, and `rseq_cs` is null.
    static OWN_AREA: OwnArea = const { OwnArea(UnsafeCell::new([0; OWN_AREA_SIZE])) };
}

/// Who registered the areas this process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registrar {
    /// glibc registered every thread; cpulocal reads its area at `__rseq_offset`.
    Glibc,
    /// cpulocal registers an area of its own in each thread that uses it.
    Own,
}

/// Why the process runs the fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// The `rseq` system call failed with this error (ENOSYS: no rseq, as under
    /// valgrind, gVisor, qemu-user or before Linux 4.18; EPERM: refused by seccomp).
    Refused(Errno),
    /// `CPULOCAL_DISABLE_RSEQ` is set in the environment.
    Disabled,
    /// cpulocal has no restartable sequences for this architecture.
    UnsupportedArch,
}

/// The mechanism every cpulocal operation uses in this process.
///
/// ```
/// match cpulocal::mechanism() {
///     cpulocal::Mechanism::Rseq { registrar, usable_size } => {
///         assert!(usable_size >= 20);
///         println!("rseq, area registered by {registrar:?}");
///     }
///     cpulocal::Mechanism::Fallback(why) => println!("fallback: {why}"),
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// Restartable sequences: per-CPU updates with plain loads and stores.
    Rseq {
        /// Whose registration the threads use.
        registrar: Registrar,
        /// How many bytes of `struct rseq` the kernel keeps current: fields that end
        /// beyond it (`node_id` at 24, `mm_cid` at 28) are substituted.
        usable_size: u32,
    },
    /// Atomics: every operation keeps its meaning, at the price of `lock`-prefixed
    /// instructions (see [`crate::ops`] for which).
    Fallback(FallbackReason),
}

impl core::fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FallbackReason::Refused(e) => write!(f, "the rseq system call failed with {e:?}"),
            FallbackReason::Disabled => f.write_str("CPULOCAL_DISABLE_RSEQ is set"),
            FallbackReason::UnsupportedArch => {
                f.write_str("no restartable sequences for this architecture")
            }
        }
    }
}

impl core::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Mechanism::Rseq {
                registrar: Registrar::Glibc,
                usable_size,
            } => write!(
                f,
                "rseq (glibc's registration, {usable_size} bytes kept current)"
            ),
            Mechanism::Rseq {
                registrar: Registrar::Own,
                usable_size,
            } => write!(
                f,
                "rseq (cpulocal's own registration, {usable_size} bytes kept current)"
            ),
            Mechanism::Fallback(why) => write!(f, "fallback (atomics): {why}"),
        }
    }
}

/// What glibc exports about its registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlibcRseq {
    /// `__rseq_offset`: the area's offset from the thread pointer.
    pub offset: isize,
    /// `__rseq_size`: 0 when glibc did not register (2.35–2.40 report 20 or 32 for 32).
    pub size: u32,
    /// `__rseq_flags`.
    pub flags: u32,
}

/// Reads glibc's `__rseq_*` symbols, `None` where the C library does not export them.
pub fn glibc_rseq() -> Option<GlibcRseq> {
    static GLIBC: OnceLock<Option<GlibcRseq>> = OnceLock::new();
    *GLIBC.get_or_init(|| {
        let offset = sys::lookup_symbol(c"__rseq_offset")?;
        let size = sys::lookup_symbol(c"__rseq_size")?;
        let flags = sys::lookup_symbol(c"__rseq_flags");
        // SAFETY: glibc defines these as `const ptrdiff_t __rseq_offset` and
        // `const unsigned int __rseq_size, __rseq_flags`, set before any user code runs
        // and never written again.
        unsafe {
            Some(GlibcRseq {
                offset: offset.cast::<isize>().as_ptr().read(),
                size: size.cast::<u32>().as_ptr().read(),
                flags: flags.map_or(0, |f| f.cast::<u32>().as_ptr().read()),
            })
        }
    })
}

/// `AT_RSEQ_FEATURE_SIZE`, or the original 20 bytes on kernels that predate the key.
pub fn feature_size() -> u32 {
    match sys::getauxval(abi::AT_RSEQ_FEATURE_SIZE) {
        0 => abi::ORIG_RSEQ_FEATURE_SIZE,
        n => n as u32,
    }
}

/// `AT_RSEQ_ALIGN`, or 32 on kernels that predate the key.
pub fn required_align() -> u32 {
    match sys::getauxval(abi::AT_RSEQ_ALIGN) {
        0 => abi::ORIG_RSEQ_SIZE,
        n => n as u32,
    }
}

/// The length of our own registration: `max(32, feature size)` when that fits our area,
/// else the legacy 32 bytes.
fn own_registration_len() -> u32 {
    let len = abi::ORIG_RSEQ_SIZE.max(feature_size());
    if len as usize <= OWN_AREA_SIZE && required_align() <= OWN_AREA_ALIGN {
        len
    } else {
        abi::ORIG_RSEQ_SIZE
    }
}

/// How many bytes of the area the kernel keeps current.
fn usable_size(registrar: Registrar) -> u32 {
    let registered = match registrar {
        // glibc 2.35–2.40 register 32 bytes but report 20 or 32.
        Registrar::Glibc => match glibc_rseq().map_or(0, |g| g.size) {
            20 | 32 => abi::ORIG_RSEQ_SIZE,
            n => n,
        },
        Registrar::Own => own_registration_len(),
    };
    registered.min(feature_size())
}

/// How many bytes of `struct rseq` the mechanism's registrar registered with the kernel:
/// glibc's reported size (2.35–2.40 register 32 bytes but report 20 or 32), or the length
/// of cpulocal's own registration. `None` in the fallback. Decides the mechanism first,
/// like [`mechanism`].
pub fn registration_len() -> Option<u32> {
    match mechanism() {
        Mechanism::Rseq {
            registrar: Registrar::Glibc,
            ..
        } => Some(match glibc_rseq().map_or(0, |g| g.size) {
            0..=32 => abi::ORIG_RSEQ_SIZE,
            n => n,
        }),
        Mechanism::Rseq {
            registrar: Registrar::Own,
            ..
        } => Some(own_registration_len()),
        Mechanism::Fallback(_) => None,
    }
}

/// Which of the kernel's two rseq behaviours the registration in use gets (Linux 7.x,
/// kernel docs "Optimized RSEQ V2"). cpulocal works in both: it never relies on the
/// kernel rewriting a field, and never writes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RseqMode {
    /// The original behaviour: the ID fields are rewritten and `rseq_cs` checked on
    /// every preemption, migration and signal. Every kernel before the V2 mode, and a
    /// registration shorter than the feature size on the kernels that have it.
    Legacy,
    /// A registration at least as long as a feature size beyond the original 32 bytes
    /// (33 on Debian's 7.x kernels): IDs rewritten only when they change, `rseq_cs`
    /// checked only after the thread was scheduled out or signalled, and a write to a
    /// kernel-owned field kills the process.
    V2,
}

impl core::fmt::Display for RseqMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RseqMode::Legacy => "legacy",
            RseqMode::V2 => "V2",
        })
    }
}

/// The kernel's rseq mode for the registration in use, derived from the feature size
/// and the registration's length ([`registration_len`]); `None` in the fallback.
///
/// ```
/// if let Some(mode) = cpulocal::thread::rseq_mode() {
///     let len = cpulocal::thread::registration_len().unwrap();
///     let v2 = cpulocal::thread::feature_size() > 32 && len >= cpulocal::thread::feature_size();
///     assert_eq!(mode == cpulocal::thread::RseqMode::V2, v2);
/// }
/// ```
pub fn rseq_mode() -> Option<RseqMode> {
    let len = registration_len()?;
    let feature_size = feature_size();
    Some(
        if feature_size > abi::ORIG_RSEQ_SIZE && len >= feature_size {
            RseqMode::V2
        } else {
            RseqMode::Legacy
        },
    )
}

/// The process-wide decision; made by the first thread that uses cpulocal.
static MECHANISM: OnceLock<Mechanism> = OnceLock::new();

/// `usable_size` of the decided mechanism (0 for the fallback), for the field readers'
/// fast paths. Written once, before any thread can see a registered area: the
/// `OnceLock` that publishes the mechanism orders it.
static USABLE_SIZE: AtomicU32 = AtomicU32::new(0);

/// How many bytes of the calling thread's area the kernel keeps current (0 before the
/// mechanism is decided and in the fallback).
#[inline]
pub(crate) fn usable_size_now() -> u32 {
    // Relaxed: pairs with nothing; a thread that holds a registered area has passed
    // through `MECHANISM.get_or_init`, which synchronises with the store.
    USABLE_SIZE.load(Ordering::Relaxed)
}

/// The mechanism cpulocal uses in this process, deciding it (and registering the
/// calling thread) if no thread has yet.
pub fn mechanism() -> Mechanism {
    current();
    *MECHANISM.get().expect("current() decides the mechanism")
}

/// The calling thread's registered area, or `None` when this thread cannot use rseq.
///
/// One thread-local load and one compare on the fast path.
#[inline(always)]
pub(crate) fn current() -> Option<NonNull<Rseq>> {
    let state = AREA.get();
    if state > UNAVAILABLE {
        // SAFETY: values above UNAVAILABLE are only ever stored from a non-null
        // area address (see `register_current`).
        Some(unsafe { NonNull::new_unchecked(state as *mut Rseq) })
    } else {
        current_slow(state)
    }
}

/// The calling thread's registered area if it already has one; `None` otherwise,
/// without registering. For fast paths whose out-of-line slow path calls [`current`]:
/// they then need nothing saved across a call.
#[inline(always)]
pub(crate) fn current_if_registered() -> Option<NonNull<Rseq>> {
    let state = AREA.get();
    // SAFETY: as in `current`.
    (state > UNAVAILABLE).then(|| unsafe { NonNull::new_unchecked(state as *mut Rseq) })
}

/// The calling thread's registered area, or, if it has none (yet), an area on which
/// every sequence that checks the CPU it reads against its table's bound exits before
/// its commit (see the module docs). One thread-local load, no branch: for fast paths
/// whose slow path calls [`current`], and whose every sequence makes that check.
#[inline(always)]
pub(crate) fn area_or_refusing() -> NonNull<Rseq> {
    // SAFETY: only ever set from a registered area or a refusing one, never null.
    unsafe { NonNull::new_unchecked(SEQUENCE_AREA.get()) }
}

/// The refusing area of the calling thread.
fn own_refusing_area() -> *mut Rseq {
    REFUSING_AREA.with(|r| (r as *const RefusingArea).cast_mut().cast())
}

#[cold]
#[inline(never)]
fn current_slow(state: usize) -> Option<NonNull<Rseq>> {
    if state == UNAVAILABLE {
        return None;
    }
    let area = register_current();
    AREA.set(area.map_or(UNAVAILABLE, |a| a.as_ptr() as usize));
    SEQUENCE_AREA.set(area.map_or_else(own_refusing_area, NonNull::as_ptr));
    area
}

/// Finds or makes the calling thread's registration, deciding the process mechanism
/// on first use.
fn register_current() -> Option<NonNull<Rseq>> {
    let mut first = None;
    let mechanism = *MECHANISM.get_or_init(|| {
        let (m, area) = decide();
        if let Mechanism::Rseq { usable_size, .. } = m {
            USABLE_SIZE.store(usable_size, Ordering::Relaxed);
        }
        first = Some(area);
        m
    });
    if let Some(area) = first {
        return area;
    }
    match mechanism {
        Mechanism::Fallback(_) => None,
        Mechanism::Rseq {
            registrar: Registrar::Glibc,
            ..
        } => glibc_area(),
        Mechanism::Rseq {
            registrar: Registrar::Own,
            ..
        } => register_own().ok(),
    }
}

fn decide() -> (Mechanism, Option<NonNull<Rseq>>) {
    // Before any sequence can arm `rseq_cs` with one of our descriptors, and before our
    // own area or its unregistration destructor can exist: a library that contains
    // cpulocal stays mapped even after `dlclose` (see "Unloading" above).
    sys::pin_own_object();
    if !arch::HAS_RSEQ {
        return (Mechanism::Fallback(FallbackReason::UnsupportedArch), None);
    }
    if sys::env_flag(c"CPULOCAL_DISABLE_RSEQ") {
        return (Mechanism::Fallback(FallbackReason::Disabled), None);
    }
    if glibc_rseq().is_some_and(|g| g.size > 0) {
        let registrar = Registrar::Glibc;
        let m = Mechanism::Rseq {
            registrar,
            usable_size: usable_size(registrar),
        };
        return (m, glibc_area());
    }
    match register_own() {
        Ok(area) => {
            let registrar = Registrar::Own;
            let m = Mechanism::Rseq {
                registrar,
                usable_size: usable_size(registrar),
            };
            (m, Some(area))
        }
        Err(e) => (Mechanism::Fallback(FallbackReason::Refused(e)), None),
    }
}

/// glibc's area for the calling thread, if glibc's registration of this thread worked.
fn glibc_area() -> Option<NonNull<Rseq>> {
    let offset = glibc_rseq()?.offset;
    let area = arch::thread_pointer()
        .wrapping_offset(offset)
        .cast::<Rseq>();
    let area = NonNull::new(area)?;
    // SAFETY: glibc placed this thread's `struct rseq` at `__rseq_offset` from the
    // thread pointer; it lives as long as the thread. The kernel writes `cpu_id`, so
    // it is read atomically.
    let cpu_id = unsafe { crate::cpu::load_u32(&raw const (*area.as_ptr()).cpu_id) };
    match cpu_id {
        abi::RSEQ_CPU_ID_UNINITIALIZED | abi::RSEQ_CPU_ID_REGISTRATION_FAILED => None,
        _ => Some(area),
    }
}

/// Registers the calling thread's own area and arranges its unregistration at thread
/// exit. Nothing is registered unless the unregistration can be armed: an area left
/// registered when the thread's TLS is freed would let the kernel write into freed
/// memory.
pub(crate) fn register_own() -> Result<NonNull<Rseq>, Errno> {
    let key = unregistration_key()?;
    let area = OWN_AREA.with(|a| a.0.get().cast::<Rseq>());
    let len = own_registration_len();
    // `area` is OWN_AREA_SIZE (≥ len) bytes, aligned to 64 (≥ the required alignment,
    // checked in `own_registration_len`), and used for nothing else.
    // SAFETY: this thread's OWN_AREA lives until the thread exits, and the pthread-key
    // destructor armed below unregisters it before glibc frees the thread's TLS.
    match unsafe { sys::rseq(area, len, 0, abi::RSEQ_SIG) } {
        Ok(()) => {}
        // EBUSY: exactly this area is already registered for this thread. That happens
        // when a signal handler on this thread registered it while this registration was
        // under way (the handler's first use of cpulocal interrupted the thread's). The
        // handler armed the unregistration too; arming it again below is harmless. Taking
        // it as a failure would leave the thread registered but on slow paths for life.
        Err(Errno(libc::EBUSY)) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: `key` is a live key; the value is only passed back to `unregister_own`.
    let armed = unsafe { libc::pthread_setspecific(key, area.cast()) };
    if armed != 0 {
        // SAFETY: the area we just registered, with the same length and signature.
        let _ = unsafe { sys::rseq(area, len, abi::RSEQ_FLAG_UNREGISTER, abi::RSEQ_SIG) };
        return Err(Errno(armed));
    }
    // SAFETY: the kernel accepted the area, so it is not null.
    Ok(unsafe { NonNull::new_unchecked(area) })
}

/// The pthread key whose destructor unregisters a thread's own area (created once).
fn unregistration_key() -> Result<libc::pthread_key_t, Errno> {
    static KEY: OnceLock<Result<libc::pthread_key_t, Errno>> = OnceLock::new();
    *KEY.get_or_init(|| {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a live out-parameter; the destructor is a plain extern fn.
        match unsafe { libc::pthread_key_create(&mut key, Some(unregister_own)) } {
            0 => Ok(key),
            e => Err(Errno(e)),
        }
    })
}

/// Set in the unregistration key's value once its destructor has deferred itself (the
/// area is 64-byte aligned, so bit 0 of its address is free).
const UNREGISTRATION_DEFERRED: usize = 1;

/// The unregistration key's destructor. pthread-key destructors run in rounds, in key
/// order within a round (glibc and musl alike), and a key created after ours — a C
/// library's, or on musl std's own key, which runs every Rust `thread_local!` destructor
/// (musl has no `__cxa_thread_atexit_impl`) — comes after ours. The load-time
/// constructor registers the main thread early, so our key is usually the first. So the
/// first call only re-arms the key, which asks for another round, and the unregistration
/// runs then, after every destructor of the first round has used the area. (glibc runs
/// Rust's `thread_local!` destructors before any key destructor; the extra round costs
/// nothing there.)
unsafe extern "C" fn unregister_own(value: *mut libc::c_void) {
    if value.addr() & UNREGISTRATION_DEFERRED == 0 {
        if let Ok(key) = unregistration_key() {
            let deferred = value.map_addr(|a| a | UNREGISTRATION_DEFERRED);
            // SAFETY: `key` is a live key; a value set from a destructor asks for one
            // more round of destructors, which passes it back to this function.
            if unsafe { libc::pthread_setspecific(key, deferred) } == 0 {
                return;
            }
        }
    }
    let area = value
        .map_addr(|a| a & !UNREGISTRATION_DEFERRED)
        .cast::<Rseq>();
    AREA.set(UNAVAILABLE);
    SEQUENCE_AREA.set(own_refusing_area());
    crate::remote::forget_percpu_fast_path();
    crate::remote::forget_fast_path_area();
    // SAFETY: `area` is the area this thread registered with exactly this length and
    // signature (the length cannot change within a process).
    let _ = unsafe {
        sys::rseq(
            area,
            own_registration_len(),
            abi::RSEQ_FLAG_UNREGISTER,
            abi::RSEQ_SIG,
        )
    };
}

/// For tests and `cpulocal info`: whether the calling thread is registered.
pub fn is_registered() -> bool {
    current().is_some()
}
