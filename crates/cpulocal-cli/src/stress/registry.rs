//! The registry of structures ([`Structure::ALL`]): what `--structure` accepts, its
//! help, and the parts a run may check, in the order of the report.

use core::fmt;
use core::str::FromStr;

use super::part::{PartDef, StructureDef};
use super::{counter, lock, mix, remote, ring, stack};

/// What a run tortures: one cpulocal structure, or several in turn. Each structure is a
/// module of its own; [`Structure::ALL`] lists them.
#[derive(Clone, Copy)]
pub struct Structure(&'static StructureDef);

impl Structure {
    /// Every structure, in the order `--help` and the report list them. A new structure:
    /// its module, and one line here.
    pub const ALL: &'static [Structure] = &[
        Structure(&counter::STRUCTURE),
        Structure(&stack::STRUCTURE),
        Structure(&lock::STRUCTURE),
        Structure(&ring::STRUCTURE),
        Structure(&remote::STRUCTURE),
        Structure(&mix::STRUCTURE),
    ];

    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        self.0.name
    }

    pub(super) fn def(self) -> &'static StructureDef {
        self.0
    }

    /// Whether `--broken` has a deliberately broken variant of one of its parts.
    pub(super) fn has_mutation(self) -> bool {
        self.0.parts.iter().any(|p| p.mutation.is_some())
    }
}

/// Every part of the registered structures, each once, in the order of the registry:
/// the order of the report.
pub(super) fn registered_parts() -> Vec<&'static PartDef> {
    let mut parts: Vec<&'static PartDef> = Vec::new();
    for s in Structure::ALL {
        for &p in s.0.parts.iter().chain(s.0.remote) {
            if !parts.iter().any(|q| q.name == p.name) {
                parts.push(p);
            }
        }
    }
    parts
}

/// "a", "a and b", "a, b and c" (with `conjunction` "and").
pub(super) fn list(names: &[&str], conjunction: &str) -> String {
    match names.split_last() {
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} {conjunction} {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The help of `--structure`: "What to torture: a, b (what b is) or c"
///
/// ```
/// let help = cpulocal_cli::stress::structure_help();
/// assert!(help.starts_with("What to torture: counter, stack, lock (PerCpu::with_cpu)"));
/// ```
pub fn structure_help() -> String {
    let names: Vec<String> = Structure::ALL
        .iter()
        .map(|s| match s.0.help {
            Some(help) => format!("{} ({help})", s.name()),
            None => s.name().to_string(),
        })
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    format!("What to torture: {}", list(&names, "or"))
}

impl PartialEq for Structure {
    fn eq(&self, other: &Structure) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Structure {}

impl core::hash::Hash for Structure {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl fmt::Debug for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Structure").field(&self.name()).finish()
    }
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Structure {
    type Err = String;

    /// ```
    /// use cpulocal_cli::stress::Structure;
    /// assert_eq!("ring".parse::<Structure>().unwrap().name(), "ring");
    /// assert!("queue".parse::<Structure>().unwrap_err().contains("counter"));
    /// ```
    fn from_str(s: &str) -> Result<Structure, String> {
        Structure::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Structure::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown structure '{s}' (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_names_every_structure_with_its_note() {
        assert_eq!(
            structure_help(),
            "What to torture: counter, stack, lock (PerCpu::with_cpu), ring, remote (on_cpu, \
             steal, flush racing the fast paths) or mix"
        );
    }
}
