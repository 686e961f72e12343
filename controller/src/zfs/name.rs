//! ZFS dataset and snapshot names, validated before they reach a command line: every
//! component uses only the characters ZFS allows, none starts with '-' (so a name can never be
//! read as an option), and the whole stays under ZFS's length limit.

use std::fmt;
use std::str::FromStr;

/// ZFS refuses names of 256 bytes or more.
const MAX_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ZFS name {name:?}: {why}")]
pub struct InvalidZfsName {
    pub name: String,
    pub why: &'static str,
}

fn component_ok(c: &str) -> bool {
    !c.is_empty()
        && !c.starts_with('-')
        && c != "."
        && c != ".."
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn invalid(name: &str, why: &'static str) -> InvalidZfsName {
    InvalidZfsName {
        name: name.to_string(),
        why,
    }
}

/// `pool/a/b`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DatasetName(String);

impl DatasetName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn pool(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    /// A child dataset; `child` must be one valid component.
    pub fn child(&self, child: &str) -> Result<DatasetName, InvalidZfsName> {
        if !component_ok(child) {
            return Err(invalid(child, "not a single valid dataset component"));
        }
        format!("{}/{child}", self.0).parse()
    }

    /// True when `self` is `other` or lies below it.
    pub fn is_within(&self, other: &DatasetName) -> bool {
        self.0 == other.0
            || (self.0.starts_with(other.as_str())
                && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    pub fn snapshot(&self, snap: &str) -> Result<SnapshotName, InvalidZfsName> {
        format!("{}@{snap}", self.0).parse()
    }

    pub fn bookmark(&self, mark: &str) -> Result<BookmarkName, InvalidZfsName> {
        format!("{}#{mark}", self.0).parse()
    }
}

impl FromStr for DatasetName {
    type Err = InvalidZfsName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_LEN {
            return Err(invalid(s, "longer than 255 bytes"));
        }
        if !s.split('/').all(component_ok) {
            return Err(invalid(
                s,
                "components must be non-empty, not start with '-', and use only letters, digits, '_', '-', '.', ':'",
            ));
        }
        Ok(Self(s.to_string()))
    }
}

/// `pool/a@snap`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotName {
    dataset: DatasetName,
    snap: String,
}

impl SnapshotName {
    pub fn dataset(&self) -> &DatasetName {
        &self.dataset
    }
    /// The part after '@'.
    pub fn short(&self) -> &str {
        &self.snap
    }
}

impl FromStr for SnapshotName {
    type Err = InvalidZfsName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ds, snap) = s
            .split_once('@')
            .ok_or_else(|| invalid(s, "a snapshot name needs '@'"))?;
        if s.len() > MAX_LEN || !component_ok(snap) {
            return Err(invalid(s, "invalid snapshot part"));
        }
        Ok(Self {
            dataset: ds.parse()?,
            snap: snap.to_string(),
        })
    }
}

/// `pool/a#mark`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BookmarkName {
    dataset: DatasetName,
    mark: String,
}

impl BookmarkName {
    pub fn dataset(&self) -> &DatasetName {
        &self.dataset
    }
    pub fn short(&self) -> &str {
        &self.mark
    }
}

impl FromStr for BookmarkName {
    type Err = InvalidZfsName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ds, mark) = s
            .split_once('#')
            .ok_or_else(|| invalid(s, "a bookmark name needs '#'"))?;
        if s.len() > MAX_LEN || !component_ok(mark) {
            return Err(invalid(s, "invalid bookmark part"));
        }
        Ok(Self {
            dataset: ds.parse()?,
            mark: mark.to_string(),
        })
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.dataset, self.snap)
    }
}
impl fmt::Display for BookmarkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.dataset, self.mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["tank", "tank/ployz/pvc-1", "a_b/c.d:e-f"] {
            assert!(ok.parse::<DatasetName>().is_ok(), "{ok}");
        }
        let s: SnapshotName = "tank/v@ployz-1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.dataset().as_str(), "tank/v");
        assert_eq!(s.short(), "ployz-1");
        assert_eq!(s.to_string(), "tank/v@ployz-1");
        let b: BookmarkName = "tank/v#m".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.to_string(), "tank/v#m");
    }

    #[test]
    fn refuses_names_that_could_escape_or_inject() {
        for bad in [
            "",
            "/tank",
            "tank/",
            "tank//x",
            "-rf",
            "tank/-x",
            "tank/../x",
            "tank/a b",
            "tank/$(x)",
            "tank/a;b",
            "tank\n",
            "tank/@s",
        ] {
            assert!(bad.parse::<DatasetName>().is_err(), "{bad:?}");
        }
        assert!("tank/v".parse::<SnapshotName>().is_err());
        assert!("tank/v@".parse::<SnapshotName>().is_err());
        assert!("tank/v@-x".parse::<SnapshotName>().is_err());
        assert!("tank/v@a@b".parse::<SnapshotName>().is_err());
        assert!(
            format!("tank/{}", "x".repeat(300))
                .parse::<DatasetName>()
                .is_err()
        );
    }

    #[test]
    fn containment_is_by_component() {
        let parent: DatasetName = "tank/ployz".parse().unwrap_or_else(|e| panic!("{e}"));
        let inside: DatasetName = "tank/ployz/v1".parse().unwrap_or_else(|e| panic!("{e}"));
        let sibling: DatasetName = "tank/ployzz/v1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(inside.is_within(&parent));
        assert!(parent.is_within(&parent));
        assert!(!sibling.is_within(&parent));
        assert!(parent.child("a/b").is_err(), "a child is one component");
        assert!(parent.child("..").is_err());
        assert_eq!(parent.child("v1").ok(), Some(inside));
    }
}
