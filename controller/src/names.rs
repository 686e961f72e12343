//! Kubernetes object names and the `NAMESPACE/SERVICE` reference that ployzctl takes.
//!
//! The rules mirror apimachinery's DNS-1123 validation. The same rules appear as `pattern`s in
//! the generated CRD schema (see [`crate::api`]); a unit test checks that both agree.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Longest DNS-1123 label (namespaces, label values).
pub const DNS1123_LABEL_MAX: usize = 63;
/// Longest DNS-1123 subdomain (most object names, node names).
pub const DNS1123_SUBDOMAIN_MAX: usize = 253;
/// Longest machine name: a DNS-1123 subdomain that is also a valid label value, since
/// Migrations carry their source machine as a label (`ployz.dev/source`).
pub const MACHINE_NAME_MAX: usize = 63;
/// Schema pattern for a DNS-1123 label.
pub const DNS1123_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Schema pattern for a DNS-1123 subdomain.
pub const DNS1123_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

const LABEL_RULE: &str = "lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters";
const SUBDOMAIN_RULE: &str = "lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit, at most 253 characters";
const MACHINE_RULE: &str = "lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit, at most 63 characters since it is also a label value; run the agent with --machine-name for a node whose name is longer";

fn is_label_body(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(&f), Some(&l)) => alnum(f) && alnum(l) && b.iter().all(|&c| alnum(c) || c == b'-'),
        _ => false,
    }
}

/// True when `s` is a DNS-1123 label.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= DNS1123_LABEL_MAX && is_label_body(s)
}

/// True when `s` is a DNS-1123 subdomain.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= DNS1123_SUBDOMAIN_MAX && s.split('.').all(is_label_body)
}

/// What kind of name a value must be, for error messages that name the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Namespace,
    Service,
    Machine,
    Migration,
}

impl NameKind {
    fn what(self) -> &'static str {
        match self {
            NameKind::Namespace => "namespace",
            NameKind::Service => "service",
            NameKind::Machine => "machine",
            NameKind::Migration => "Migration name",
        }
    }

    fn is_valid(self, s: &str) -> bool {
        match self {
            NameKind::Namespace => is_dns1123_label(s),
            NameKind::Service | NameKind::Migration => is_dns1123_subdomain(s),
            NameKind::Machine => s.len() <= MACHINE_NAME_MAX && is_dns1123_subdomain(s),
        }
    }

    fn rule(self) -> &'static str {
        match self {
            NameKind::Namespace => LABEL_RULE,
            NameKind::Service | NameKind::Migration => SUBDOMAIN_RULE,
            NameKind::Machine => MACHINE_RULE,
        }
    }
}

/// A name that breaks the DNS-1123 rules; the message names the rule and, when lower-casing
/// would fix it, the likely intended name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {value:?} is not a valid name ({}){}", kind.what(), kind.rule(), hint(*kind, value))]
pub struct InvalidName {
    pub kind: NameKind,
    pub value: String,
}

fn hint(kind: NameKind, value: &str) -> String {
    let lower = value.to_ascii_lowercase();
    if lower != value && kind.is_valid(&lower) {
        format!("; did you mean {lower:?}?")
    } else {
        String::new()
    }
}

/// Checks `value` against the rules for `kind`.
pub fn validate(kind: NameKind, value: &str) -> Result<(), InvalidName> {
    if kind.is_valid(value) {
        Ok(())
    } else {
        Err(InvalidName {
            kind,
            value: value.to_string(),
        })
    }
}

/// A machine name, validated (machines are named after their nodes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineName(String);

impl MachineName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for MachineName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        validate(NameKind::Machine, s)?;
        Ok(Self(s.to_string()))
    }
}

impl fmt::Display for MachineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `NAMESPACE/SERVICE`: the workload a migration moves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub service: String,
}

/// Why a `NAMESPACE/SERVICE` reference was refused. Every message ends with the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceRefError {
    #[error("empty reference; {EXPECTED}")]
    Empty,
    #[error("{0:?} has no namespace; {EXPECTED}")]
    NoNamespace(String),
    #[error("{0:?} has {1} parts; {EXPECTED}")]
    TooManyParts(String, usize),
    #[error("{0}; {EXPECTED}")]
    InvalidName(#[from] InvalidName),
}

const EXPECTED: &str = "expected NAMESPACE/SERVICE, for example production/web";

impl FromStr for ServiceRef {
    type Err = ServiceRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(ServiceRefError::Empty);
        }
        let parts: Vec<&str> = s.split('/').collect();
        let (namespace, service) = match parts.as_slice() {
            [_] => return Err(ServiceRefError::NoNamespace(s.to_string())),
            [ns, svc] => (*ns, *svc),
            _ => return Err(ServiceRefError::TooManyParts(s.to_string(), parts.len())),
        };
        validate(NameKind::Namespace, namespace)?;
        validate(NameKind::Service, service)?;
        Ok(Self {
            namespace: namespace.to_string(),
            service: service.to_string(),
        })
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service)
    }
}

/// `NAME` or `NAMESPACE/NAME`, as kubectl takes an object on its command line: without a
/// namespace, [`Ref::resolve`] takes the one from `-n` or the kubeconfig context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    pub kind: NameKind,
    pub namespace: Option<String>,
    pub name: String,
}

/// Why a `NAME` or `NAMESPACE/NAME` argument was refused; every message ends with the
/// expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("empty {}; {}", kind.what(), expected(*kind))]
    Empty { kind: NameKind },
    #[error("{value:?} has {parts} parts; {}", expected(*kind))]
    TooManyParts {
        kind: NameKind,
        value: String,
        parts: usize,
    },
    #[error("{error}; {}", expected(*kind))]
    InvalidName { kind: NameKind, error: InvalidName },
    #[error(
        "{name:?} names namespace {given:?} but -n says {flag:?}; drop one of them, or make them agree"
    )]
    Conflict {
        name: String,
        given: String,
        flag: String,
    },
}

fn expected(kind: NameKind) -> String {
    let (upper, example) = match kind {
        NameKind::Migration => ("MIGRATION", "web-to-machine-b"),
        NameKind::Machine => ("MACHINE", "machine-b"),
        NameKind::Namespace => ("NAMESPACE", "production"),
        NameKind::Service => ("SERVICE", "web"),
    };
    format!("expected {upper} or NAMESPACE/{upper}, for example {example} or production/{example}")
}

impl Ref {
    /// Parses `s` as a `kind` name, optionally prefixed by its namespace.
    pub fn parse(kind: NameKind, s: &str) -> Result<Self, RefError> {
        if s.trim().is_empty() {
            return Err(RefError::Empty { kind });
        }
        let parts: Vec<&str> = s.split('/').collect();
        let (namespace, name) = match parts.as_slice() {
            [name] => (None, *name),
            [ns, name] => (Some(*ns), *name),
            _ => {
                return Err(RefError::TooManyParts {
                    kind,
                    value: s.to_string(),
                    parts: parts.len(),
                });
            }
        };
        let invalid = |error| RefError::InvalidName { kind, error };
        if let Some(ns) = namespace {
            validate(NameKind::Namespace, ns).map_err(invalid)?;
        }
        validate(kind, name).map_err(invalid)?;
        Ok(Self {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        })
    }

    /// The object's namespace: its own, else `flag` (`-n`), else `default` (the kubeconfig
    /// context's). Its own and `-n` must agree, as kubectl requires.
    pub fn resolve(&self, flag: Option<&str>, default: &str) -> Result<ServiceRef, RefError> {
        let namespace = match (&self.namespace, flag) {
            (Some(own), Some(flag)) if own != flag => {
                return Err(RefError::Conflict {
                    name: format!("{own}/{}", self.name),
                    given: own.clone(),
                    flag: flag.to_string(),
                });
            }
            (Some(own), _) => own.clone(),
            (None, Some(flag)) => flag.to_string(),
            (None, None) => default.to_string(),
        };
        Ok(ServiceRef {
            namespace,
            service: self.name.clone(),
        })
    }
}

/// The name ployzctl gives a Migration: `SERVICE-to-MACHINE`, predictable so that GitOps diffs
/// and `kubectl get migration web-to-machine-b` work. Names that would exceed the subdomain limit
/// are cut and suffixed with a hash of the full name, so they stay unique and deterministic.
pub fn migration_name(service: &str, to: &MachineName) -> String {
    let full = format!("{service}-to-{to}");
    if full.len() <= DNS1123_SUBDOMAIN_MAX {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let suffix: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let keep = DNS1123_SUBDOMAIN_MAX - suffix.len() - 1;
    // Names are ASCII (validated), so byte slicing is on char boundaries.
    let prefix = full[..keep].trim_end_matches(['-', '.']);
    format!("{prefix}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_reference() {
        let r: ServiceRef = "production/web".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.namespace, "production");
        assert_eq!(r.service, "web");
        assert_eq!(r.to_string(), "production/web");
        let dotted: ServiceRef = "a/db.primary-0".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dotted.service, "db.primary-0");
    }

    #[test]
    fn refuses_malformed_references_with_the_expected_form() {
        let cases = [
            ("", "empty reference"),
            ("   ", "empty reference"),
            ("web", "\"web\" has no namespace"),
            ("a/b/c", "\"a/b/c\" has 3 parts"),
            ("/web", "namespace \"\" is not a valid name"),
            ("prod/", "service \"\" is not a valid name"),
            ("Prod/web", "did you mean \"prod\"?"),
            ("prod/Web", "did you mean \"web\"?"),
            ("prod/-web", "service \"-web\" is not a valid name"),
            ("prod/we_b", "service \"we_b\" is not a valid name"),
            ("prod.x/web", "namespace \"prod.x\" is not a valid name"),
        ];
        for (input, want) in cases {
            let err = input
                .parse::<ServiceRef>()
                .err()
                .unwrap_or_else(|| panic!("{input:?} was accepted"));
            let msg = err.to_string();
            assert!(msg.contains(want), "{input:?}: {msg}");
            assert!(
                msg.contains("expected NAMESPACE/SERVICE"),
                "{input:?}: {msg}"
            );
        }
    }

    #[test]
    fn refs_take_the_namespace_from_themselves_the_flag_or_the_context() {
        let parse = |s| Ref::parse(NameKind::Service, s).unwrap_or_else(|e| panic!("{e}"));
        let ns = |r: Ref, flag, default| {
            r.resolve(flag, default)
                .map(|r| r.to_string())
                .unwrap_or_else(|e| e.to_string())
        };
        assert_eq!(ns(parse("web"), None, "ctx"), "ctx/web");
        assert_eq!(ns(parse("web"), Some("prod"), "ctx"), "prod/web");
        assert_eq!(ns(parse("prod/web"), None, "ctx"), "prod/web");
        assert_eq!(ns(parse("prod/web"), Some("prod"), "ctx"), "prod/web");
        let conflict = ns(parse("prod/web"), Some("dev"), "ctx");
        assert!(conflict.contains("-n says \"dev\""), "{conflict}");
    }

    #[test]
    fn refs_refuse_malformed_input_naming_what_they_expected() {
        let cases = [
            (NameKind::Service, "", "empty service"),
            (NameKind::Service, "a/b/c", "has 3 parts"),
            (NameKind::Service, "Prod/web", "did you mean \"prod\"?"),
            (
                NameKind::Service,
                "prod/",
                "service \"\" is not a valid name",
            ),
            (
                NameKind::Migration,
                "p/Web_Move",
                "Migration name \"Web_Move\" is not a valid name",
            ),
        ];
        for (kind, input, want) in cases {
            let msg = Ref::parse(kind, input)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| panic!("{input:?} was accepted"));
            assert!(msg.contains(want), "{input:?}: {msg}");
            assert!(msg.contains("or NAMESPACE/"), "{input:?}: {msg}");
        }
    }

    #[test]
    fn label_and_subdomain_limits() {
        assert!(is_dns1123_label(&"a".repeat(63)));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain(&format!(
            "{}.{}",
            "a".repeat(63),
            "b".repeat(63)
        )));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_subdomain("a."));
        assert!(!is_dns1123_label("a.b"));
    }

    #[test]
    fn machine_names_are_validated() {
        assert!("machine-b".parse::<MachineName>().is_ok());
        let err = "Machine-B"
            .parse::<MachineName>()
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "machine \"Machine-B\" is not a valid name (lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit, at most 63 characters since it is also a label value; run the agent with --machine-name for a node whose name is longer); did you mean \"machine-b\"?"
            )
        );
    }

    #[test]
    fn migration_names_are_predictable_and_bounded() {
        let to: MachineName = "machine-b".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(migration_name("web", &to), "web-to-machine-b");

        let long_service = format!("{}.{}", "s".repeat(200), "t".repeat(52));
        let long = migration_name(&long_service, &to);
        assert_eq!(long.len(), DNS1123_SUBDOMAIN_MAX);
        assert!(is_dns1123_subdomain(&long), "{long}");
        assert_eq!(long, migration_name(&long_service, &to), "deterministic");
        let other = format!("{}.{}", "s".repeat(200), "u".repeat(52));
        assert_ne!(
            long,
            migration_name(&other, &to),
            "hash keeps long names apart"
        );
    }
}
