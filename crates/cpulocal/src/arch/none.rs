//! Architectures without restartable sequences in cpulocal: the fallback serves every
//! operation, so these items exist only to keep one interface and are never reached.
#![deny(unsafe_code)]

use super::Outcome;
use crate::abi::Rseq;

/// No sequences here: [`crate::mechanism`] reports the fallback.
pub(crate) const HAS_RSEQ: bool = false;

/// Unused without sequences.
pub(crate) fn thread_pointer() -> *mut u8 {
    core::ptr::null_mut()
}

macro_rules! unreachable_primitive {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {$(
        /// Never called: without sequences no thread holds a registered area.
        #[allow(clippy::too_many_arguments, clippy::missing_safety_doc)]
        pub(crate) unsafe fn $name(_rseq: *mut Rseq, $($arg: $ty),*) -> $out {
            $(let _ = $arg;)*
            Outcome::Aborted
        }
    )*};
}

unreachable_primitive! {
    add(v: *mut usize, count: usize, cpu: u32) -> Outcome;
    pop(v: *mut usize, expect_not: usize, offset: isize, cpu: u32) -> Outcome<usize>;
    compare_try_store_release(v: *mut usize, expect: usize, v2: *mut usize, newv2: usize, newv: usize, cpu: u32) -> Outcome;
    compare_store_guarded(guard: *const usize, v: *mut usize, expect: usize, newv: usize, cpu: u32) -> Outcome;
    compare_memcpy_store_release(v: *mut usize, expect: usize, dst: *mut u8, src: *const u8, len: usize, newv: usize, cpu: u32) -> Outcome;
    slab_push(guard: *const usize, hdr: *mut usize, item: usize, cpu: u32) -> Outcome;
    slab_pop(guard: *const usize, hdr: *mut usize, cpu: u32) -> Outcome<usize>;
    compare_memcpy_store_guarded(guard: *const usize, v: *mut usize, expect: usize, dst: *mut u8, src: *const u8, len: usize, newv: usize, cpu: u32) -> Outcome;
}

#[cfg(any(test, feature = "__test-hooks"))]
unreachable_primitive! {
    slab_pop_without_restart(guard: *const usize, hdr: *mut usize, cpu: u32) -> Outcome<usize>;
}

/// Never called: without sequences no thread holds a registered area.
#[allow(clippy::missing_safety_doc)]
pub(crate) unsafe fn compare_store<const INDEX_FIELD: usize>(
    _rseq: *mut Rseq,
    _v: *mut usize,
    _expect: usize,
    _newv: usize,
    _cpu: u32,
) -> Outcome {
    Outcome::Aborted
}

/// Never called: without sequences no thread holds a registered area.
#[allow(clippy::missing_safety_doc)]
pub(crate) unsafe fn add_on_current_cpu<const SHIFT: u32>(
    _rseq: *mut Rseq,
    _base: *mut u8,
    _len: usize,
    _count: usize,
) -> Outcome {
    Outcome::Aborted
}

/// Never called: without sequences no thread holds a registered area.
#[allow(clippy::missing_safety_doc)]
pub(crate) unsafe fn add_const_on_current_cpu<const SHIFT: u32, const COUNT: u32>(
    _rseq: *mut Rseq,
    _base: *mut u8,
    _len: usize,
) -> Outcome {
    // The same limit as the architectures with sequences, so that a count that compiles
    // on one compiles on all.
    const {
        assert!(
            COUNT <= i32::MAX as u32,
            "the count must fit in an i32 immediate"
        )
    };
    Outcome::Aborted
}

/// Never called: without sequences no thread holds a registered area.
#[allow(clippy::missing_safety_doc)]
pub(crate) unsafe fn push_guarded_on_current_cpu<const SHIFT: u32, const HEAD: i32>(
    _rseq: *mut Rseq,
    _table: *const crate::pool::SlotTable,
    _node: *mut usize,
) -> Outcome {
    Outcome::Aborted
}

/// Never called: without sequences no thread holds a registered area.
#[allow(clippy::missing_safety_doc)]
pub(crate) unsafe fn pop_guarded_on_current_cpu<
    const SHIFT: u32,
    const HEAD: i32,
    const NEXT: i32,
>(
    _rseq: *mut Rseq,
    _table: *const crate::pool::SlotTable,
) -> Outcome<usize> {
    Outcome::Aborted
}

/// Never called: without sequences no thread holds a registered area.
#[allow(clippy::missing_safety_doc)]
pub(crate) unsafe fn slab_push_on_current_cpu<const SHIFT: u32>(
    _rseq: *mut Rseq,
    _base: *mut u8,
    _len: usize,
    _item: usize,
) -> Outcome {
    Outcome::Aborted
}

/// Never called: without sequences no thread holds a registered area.
#[allow(clippy::missing_safety_doc)]
pub(crate) unsafe fn slab_pop_on_current_cpu<const SHIFT: u32>(
    _rseq: *mut Rseq,
    _base: *mut u8,
    _len: usize,
) -> Outcome<usize> {
    Outcome::Aborted
}
