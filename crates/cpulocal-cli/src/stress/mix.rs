//! The `mix` structure: every part in turn (counter, stack, lock, ring), with the remote
//! thread of `remote` racing the lock, stack and ring parts. Each part's check, as alone.

use super::part::StructureDef;
use super::{counter, lock, ring, stack};

/// `--structure mix`.
pub(super) const STRUCTURE: StructureDef = StructureDef {
    name: "mix",
    help: None,
    parts: &[&counter::PART, &stack::PART, &lock::PART, &ring::PART],
    remote: &[&lock::PART, &stack::PART, &ring::PART],
};
