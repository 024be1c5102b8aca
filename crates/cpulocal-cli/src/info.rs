//! `cpulocal info`: what this machine and process offer, and the mechanism in use.
#![deny(unsafe_code)]

use core::fmt;

use cpulocal::abi::{self, membarrier};
use cpulocal::thread::{self, GlibcRseq};
use cpulocal::{sys, FallbackReason, Mechanism, Registrar};
use serde::Serialize;

/// Everything `cpulocal info` reports; [`fmt::Display`] gives the text form, serde the
/// JSON one.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// `uname -r`.
    pub kernel_release: String,
    /// What glibc exports about its rseq registration.
    pub glibc: GlibcInfo,
    /// `AT_RSEQ_FEATURE_SIZE` and `AT_RSEQ_ALIGN`.
    pub auxv: AuxvInfo,
    /// How many bytes of `struct rseq` the active mechanism keeps current (0: fallback).
    pub usable_size: u32,
    /// How many bytes the registration in use registered (`None`: fallback).
    pub registration_len: Option<u32>,
    /// The kernel's rseq mode for that registration: `"legacy"` or `"V2"` (`None`:
    /// fallback).
    pub rseq_mode: Option<String>,
    /// Whether `node_id` is filled (the usable size reaches [`abi::NODE_ID_END`]).
    pub node_id_filled: bool,
    /// Whether `mm_cid` is filled (the usable size reaches [`abi::MM_CID_END`]).
    pub mm_cid_filled: bool,
    /// What `membarrier(MEMBARRIER_CMD_QUERY)` says.
    pub membarrier: MembarrierInfo,
    /// Highest possible CPU + 1 (the length of per-CPU arrays).
    pub possible_cpus: usize,
    /// CPUs online now.
    pub online_cpus: usize,
    /// The calling thread's CPU.
    pub cpu: usize,
    /// The calling thread's NUMA node.
    pub node: u32,
    /// Where `node` came from: `"rseq node_id"` or `"getcpu system call"`.
    pub node_source: &'static str,
    /// The calling thread's concurrency id.
    pub mm_cid: usize,
    /// Where `mm_cid` came from: `"rseq mm_cid"` or `"current_cpu() (substitute)"`.
    pub mm_cid_source: &'static str,
    /// Whether the calling thread uses rseq.
    pub thread_registered: bool,
    /// The active mechanism, as `cpulocal::mechanism()` displays it.
    pub mechanism: String,
    /// `"rseq"` or `"fallback"`.
    pub mechanism_kind: &'static str,
    /// Why this mechanism was chosen.
    pub mechanism_why: String,
    /// How operations on a chosen CPU's data work here, as
    /// `cpulocal::remote_scheme()` displays it.
    pub remote_scheme: String,
}

/// glibc's `__rseq_*` symbols.
#[derive(Debug, Clone, Serialize)]
pub struct GlibcInfo {
    /// Whether the C library exports them at all (glibc ≥ 2.35, dynamically linked).
    pub symbols_present: bool,
    /// Whether glibc registered an area for each thread (`__rseq_size > 0`).
    pub registered: bool,
    /// `__rseq_size`.
    pub rseq_size: Option<u32>,
    /// `__rseq_offset`.
    pub rseq_offset: Option<isize>,
    /// `__rseq_flags`.
    pub rseq_flags: Option<u32>,
}

/// The rseq keys of the auxiliary vector.
#[derive(Debug, Clone, Serialize)]
pub struct AuxvInfo {
    /// The feature size cpulocal uses (20 when the key is absent).
    pub rseq_feature_size: u32,
    /// The raw `getauxval(AT_RSEQ_FEATURE_SIZE)`, `None` when the key is absent.
    pub rseq_feature_size_raw: Option<u64>,
    /// The alignment cpulocal uses (32 when the key is absent).
    pub rseq_align: u32,
    /// The raw `getauxval(AT_RSEQ_ALIGN)`, `None` when the key is absent.
    pub rseq_align_raw: Option<u64>,
}

/// `membarrier` support; nothing is registered to find out.
#[derive(Debug, Clone, Serialize)]
pub struct MembarrierInfo {
    /// The bitmask of supported commands, `None` when the query failed.
    pub query_mask: Option<i64>,
    /// The error of the query, when it failed.
    pub error: Option<String>,
    /// Whether `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ` is in the mask (Linux 5.10+).
    pub private_expedited_rseq: bool,
}

impl Info {
    /// Gathers the facts. Registers the calling thread (through `cpulocal::mechanism()`)
    /// if it was not yet, and the process for membarrier-rseq (through
    /// `cpulocal::remote_scheme()`), as any use of `on_cpu` would.
    pub fn gather() -> Info {
        let mechanism = cpulocal::mechanism();
        let glibc = glibc_info(thread::glibc_rseq());
        let usable_size = match mechanism {
            Mechanism::Rseq { usable_size, .. } => usable_size,
            Mechanism::Fallback(_) => 0,
        };
        let raw = |key| match sys::getauxval(key) {
            0 => None,
            n => Some(n),
        };
        let membarrier = match sys::membarrier(membarrier::CMD_QUERY, 0, 0) {
            Ok(mask) => MembarrierInfo {
                query_mask: Some(mask),
                error: None,
                private_expedited_rseq: mask & i64::from(membarrier::CMD_PRIVATE_EXPEDITED_RSEQ)
                    != 0,
            },
            Err(e) => MembarrierInfo {
                query_mask: None,
                error: Some(e.to_string()),
                private_expedited_rseq: false,
            },
        };
        let node_id_filled = usable_size >= abi::NODE_ID_END;
        let mm_cid_filled = usable_size >= abi::MM_CID_END;
        let (mechanism_kind, mechanism_why) = why(mechanism, &glibc);
        Info {
            kernel_release: sys::kernel_release(),
            glibc,
            auxv: AuxvInfo {
                rseq_feature_size: thread::feature_size(),
                rseq_feature_size_raw: raw(abi::AT_RSEQ_FEATURE_SIZE),
                rseq_align: thread::required_align(),
                rseq_align_raw: raw(abi::AT_RSEQ_ALIGN),
            },
            usable_size,
            registration_len: thread::registration_len(),
            rseq_mode: thread::rseq_mode().map(|m| m.to_string()),
            node_id_filled,
            mm_cid_filled,
            membarrier,
            possible_cpus: cpulocal::possible_cpus(),
            online_cpus: sys::online_cpus(),
            cpu: cpulocal::current_cpu(),
            node: cpulocal::current_node(),
            node_source: if node_id_filled {
                "rseq node_id"
            } else {
                "getcpu system call"
            },
            mm_cid: cpulocal::current_mm_cid(),
            mm_cid_source: if mm_cid_filled {
                "rseq mm_cid"
            } else {
                "current_cpu() (substitute)"
            },
            thread_registered: thread::is_registered(),
            mechanism: mechanism.to_string(),
            mechanism_kind,
            mechanism_why,
            remote_scheme: cpulocal::remote_scheme().to_string(),
        }
    }

    /// The single-line JSON object `cpulocal info --json` prints.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("Info serialises")
    }
}

fn glibc_info(g: Option<GlibcRseq>) -> GlibcInfo {
    GlibcInfo {
        symbols_present: g.is_some(),
        registered: g.is_some_and(|g| g.size > 0),
        rseq_size: g.map(|g| g.size),
        rseq_offset: g.map(|g| g.offset),
        rseq_flags: g.map(|g| g.flags),
    }
}

fn why(m: Mechanism, glibc: &GlibcInfo) -> (&'static str, String) {
    match m {
        Mechanism::Rseq {
            registrar: Registrar::Glibc,
            ..
        } => (
            "rseq",
            format!(
                "glibc registered an area for every thread (__rseq_size = {}); cpulocal uses it",
                glibc.rseq_size.unwrap_or(0)
            ),
        ),
        Mechanism::Rseq {
            registrar: Registrar::Own,
            ..
        } => {
            let glibc_says = if glibc.symbols_present {
                "glibc did not register (__rseq_size = 0)"
            } else {
                "the C library exports no __rseq_* symbols"
            };
            (
                "rseq",
                format!("{glibc_says}, so cpulocal registers its own area per thread"),
            )
        }
        Mechanism::Fallback(reason) => {
            let hint = match reason {
                FallbackReason::Refused(_) => {
                    " (valgrind, gVisor, qemu-user, seccomp or a kernel before 4.18)"
                }
                FallbackReason::Disabled | FallbackReason::UnsupportedArch => "",
            };
            ("fallback", format!("{reason}{hint}"))
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn raw_key(raw: Option<u64>, name: &str, used: u32) -> String {
    match raw {
        Some(n) => format!("{n}"),
        None => format!("{used} ({name} absent from the auxiliary vector: kernel before 6.3)"),
    }
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.glibc;
        writeln!(f, "kernel release       {}", self.kernel_release)?;
        match (g.symbols_present, g.registered) {
            (false, _) => writeln!(
                f,
                "glibc rseq           no __rseq_* symbols (not glibc >= 2.35, or static)"
            )?,
            (true, registered) => writeln!(
                f,
                "glibc rseq           {} (__rseq_size {}, __rseq_offset {}, __rseq_flags {})",
                if registered {
                    "registered"
                } else {
                    "not registered"
                },
                g.rseq_size.unwrap_or(0),
                g.rseq_offset.unwrap_or(0),
                g.rseq_flags.unwrap_or(0),
            )?,
        }
        writeln!(
            f,
            "AT_RSEQ_FEATURE_SIZE {}",
            raw_key(
                self.auxv.rseq_feature_size_raw,
                "AT_RSEQ_FEATURE_SIZE",
                self.auxv.rseq_feature_size
            )
        )?;
        writeln!(
            f,
            "AT_RSEQ_ALIGN        {}",
            raw_key(
                self.auxv.rseq_align_raw,
                "AT_RSEQ_ALIGN",
                self.auxv.rseq_align
            )
        )?;
        writeln!(f, "usable size          {} bytes", self.usable_size)?;
        match (self.registration_len, &self.rseq_mode) {
            (Some(len), Some(mode)) => writeln!(
                f,
                "rseq mode            {mode} ({len}-byte registration, feature size {})",
                self.auxv.rseq_feature_size
            )?,
            _ => writeln!(f, "rseq mode            none (fallback)")?,
        }
        writeln!(
            f,
            "node_id filled       {} (needs {} bytes)",
            yes_no(self.node_id_filled),
            abi::NODE_ID_END
        )?;
        writeln!(
            f,
            "mm_cid filled        {} (needs {} bytes)",
            yes_no(self.mm_cid_filled),
            abi::MM_CID_END
        )?;
        match (&self.membarrier.query_mask, &self.membarrier.error) {
            (Some(mask), _) => writeln!(
                f,
                "membarrier           PRIVATE_EXPEDITED_RSEQ {} (query mask {mask:#x})",
                if self.membarrier.private_expedited_rseq {
                    "available"
                } else {
                    "not available"
                },
            )?,
            (None, e) => writeln!(
                f,
                "membarrier           query failed: {}",
                e.as_deref().unwrap_or("unknown error")
            )?,
        }
        writeln!(f, "possible CPUs        {}", self.possible_cpus)?;
        writeln!(f, "online CPUs          {}", self.online_cpus)?;
        writeln!(
            f,
            "this thread          cpu {}, node {} ({}), mm_cid {} ({}), uses rseq: {}",
            self.cpu,
            self.node,
            self.node_source,
            self.mm_cid,
            self.mm_cid_source,
            yes_no(self.thread_registered)
        )?;
        writeln!(f, "mechanism            {}", self.mechanism)?;
        writeln!(f, "why                  {}", self.mechanism_why)?;
        write!(f, "remote (on_cpu)      {}", self.remote_scheme)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_agree_with_the_mechanism() {
        let info = Info::gather();
        assert_eq!(info.mechanism, cpulocal::mechanism().to_string());
        assert!(info.possible_cpus >= info.online_cpus);
        assert!(info.cpu < info.possible_cpus);
        assert!(!info.node_id_filled || info.usable_size >= 24);
        assert!(!info.mm_cid_filled || info.node_id_filled);
        assert_eq!(info.registration_len.is_some(), info.usable_size > 0);
        assert_eq!(info.rseq_mode.is_some(), info.usable_size > 0);
        // Legacy on this machine (glibc 2.36 registers 32 bytes on 6.18).
        if info.auxv.rseq_feature_size <= 32 {
            assert!(info.rseq_mode.as_deref().is_none_or(|m| m == "legacy"));
        }
        assert_eq!(
            info.glibc.registered,
            info.glibc.rseq_size.is_some_and(|s| s > 0)
        );
    }

    #[test]
    fn json_is_one_object_with_the_mechanism() {
        let info = Info::gather();
        let v: serde_json::Value = serde_json::from_str(&info.to_json()).unwrap();
        assert_eq!(v["mechanism"], info.mechanism.as_str());
        assert!(v["auxv"]["rseq_feature_size"].is_u64());
        assert!(!info.to_json().contains('\n'));
    }
}
