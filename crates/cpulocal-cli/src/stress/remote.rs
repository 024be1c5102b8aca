//! The `remote` structure: the lock, stack and ring parts in turn, with a remote thread
//! racing their local fast paths from other CPUs (`on_cpu`, `Stack::steal` /
//! `pop_all_on`, `RingBuffer::flush` on random CPUs). Each part's check, as alone.

use super::part::StructureDef;
use super::{lock, ring, stack};

/// `--structure remote`.
pub(super) const STRUCTURE: StructureDef = StructureDef {
    name: "remote",
    help: Some("on_cpu, steal, flush racing the fast paths"),
    parts: &[&lock::PART, &stack::PART, &ring::PART],
    remote: &[&lock::PART, &stack::PART, &ring::PART],
};
