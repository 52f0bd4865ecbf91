//! The namespaces of store names, all in one table. Every crate that names a blob picks one of
//! these prefixes, so `names_with_prefix` lists one kind of thing and a reader sees in one place
//! which layer owns which names. The spellings are on disk and on remotes (stores already
//! written must still read): never change one, only add. Remote names take no `:`, so what a
//! remote holds uses `/`.

/// One namespace: a fixed prefix before the owner's part of the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace(&'static str);

impl Namespace {
    /// The prefix itself (for [`crate::Store::names_with_prefix`]).
    pub const fn prefix(self) -> &'static str {
        self.0
    }

    /// The full store name of `rest` in this namespace.
    pub fn name(self, rest: impl std::fmt::Display) -> String {
        format!("{}{rest}", self.0)
    }

    /// The owner's part of `name` if it is in this namespace.
    pub fn strip(self, name: &str) -> Option<&str> {
        name.strip_prefix(self.0)
    }

    /// Whether `name` is in this namespace.
    pub fn contains(self, name: &str) -> bool {
        name.starts_with(self.0)
    }
}

/// `image:<name>` -> an image record (kiln-imagebuilder).
pub const IMAGE: Namespace = Namespace("image:");
/// `keep:<blob id>` -> a blob an image needs kept while any image names it (kiln-imagebuilder).
pub const KEEP: Namespace = Namespace("keep:");
/// `cache:<key hex>` -> a build step's or a whole build's cached result (kiln-imagebuilder).
pub const BUILD_CACHE: Namespace = Namespace("cache:");
/// `build-cache/<key hex>`: [`BUILD_CACHE`] as pushed to a remote.
pub const REMOTE_BUILD_CACHE: Namespace = Namespace("build-cache/");
/// `hold:<holder>:<blob id>` -> a blob a sandbox, snapshot, fork or checkpoint keeps
/// (kiln-runtime's holds).
pub const HOLD: Namespace = Namespace("hold:");
/// `sandbox-snapshot:<name>` -> a named sandbox snapshot record (kiln-runtime).
pub const SANDBOX_SNAPSHOT: Namespace = Namespace("sandbox-snapshot:");
/// `sandbox-snapshots/<name>`: [`SANDBOX_SNAPSHOT`] as pushed to a remote (remote names
/// take no `:`).
pub const REMOTE_SANDBOX_SNAPSHOT: Namespace = Namespace("sandbox-snapshots/");
/// `snapshot/<name>` -> a VM snapshot record (kiln-snapshotter).
pub const VM_SNAPSHOT: Namespace = Namespace("snapshot/");
/// `workingset/<snapshot id>` -> the pages a restored VM touched first (kiln-snapshotter).
pub const WORKING_SET: Namespace = Namespace("workingset/");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_distinct_and_none_is_a_prefix_of_another() {
        let all = [
            IMAGE,
            KEEP,
            BUILD_CACHE,
            REMOTE_BUILD_CACHE,
            HOLD,
            SANDBOX_SNAPSHOT,
            REMOTE_SANDBOX_SNAPSHOT,
            VM_SNAPSHOT,
            WORKING_SET,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert!(
                    !a.0.starts_with(b.0) && !b.0.starts_with(a.0),
                    "{a:?} vs {b:?}"
                );
            }
        }
        assert_eq!(IMAGE.name("x"), "image:x");
        assert_eq!(IMAGE.strip("image:x"), Some("x"));
        assert_eq!(IMAGE.strip("keep:x"), None);
    }
}
