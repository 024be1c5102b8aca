//! The auto traits the docs promise, checked at compile time: like `Mutex<T>`, the
//! per-CPU structures are `Send` and `Sync` when `T: Send` alone (a `Cell`, which is not
//! `Sync`, is fine inside), because a `T` is only reached by one thread at a time. (That
//! a `PerCpuGuard` is not `Send` is a `compile_fail` example in its docs.)

use core::cell::Cell;

use crate::ring::RingBuffer;
use crate::{Counter, Lock, NodeList, ObjectPool, PerCpu, Pooled, Stack};

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>() {}

#[test]
fn structures_are_send_and_sync_when_their_values_are_send() {
    send_sync::<Counter>();
    send_sync::<Lock>();
    send_sync::<PerCpu<Cell<u64>>>();
    send_sync::<Stack<Cell<u64>>>();
    send_sync::<ObjectPool<Cell<u64>>>();
    send_sync::<RingBuffer>();
    send::<NodeList<Cell<u64>>>();
    send::<Pooled<'static, Cell<u64>>>();
}
