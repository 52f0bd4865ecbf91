//! Who still needs the blobs the runtime makes (checkpoints and snapshot records), and freeing
//! them the moment nobody does.
//!
//! The store's gc frees the chunks of blobs whose manifest is gone, and keeps every manifest; so
//! the runtime removes the manifests of what it made once no holder is left. A holder is a
//! sandbox (`hold:sandbox:<id>:…`: its paused state, or the snapshot a running sandbox still
//! reads lazily) or a named snapshot (`hold:snapshot:<name>:…`). A hold is a store name pointing
//! at the blob, so a blob with any name at all (an image's `keep:`, a user's name) is never
//! removed here. Changes of holds and the removals they allow happen under one lock file, so a
//! blob another holder just took is never removed under it.

use crate::error::{IoCtx, Result};
use kiln_blockstore::names::HOLD;
use kiln_blockstore::{BlobId, Store};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Whoever keeps blobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A sandbox, by id: released when it is removed.
    Sandbox(String),
    /// A named snapshot: released when its name is removed or moves to another snapshot.
    Snapshot(String),
    /// A fork under way, by the forked sandbox's id: keeps the fork's snapshot until every
    /// fork has taken its own hold.
    Fork(String),
    /// The blobs of a checkpoint being stored, by sandbox id: named as each is made (before
    /// its manifest is visible), so a caller killed at any moment leaves no blob nobody
    /// names; released once a snapshot holds them, the checkpoint failed, or the sandbox goes.
    Checkpoint(String),
}

impl Holder {
    fn prefix(&self) -> String {
        match self {
            Holder::Sandbox(id) => format!("{}sandbox:{id}:", HOLD.prefix()),
            Holder::Snapshot(n) => format!("{}snapshot:{n}:", HOLD.prefix()),
            Holder::Fork(id) => format!("{}fork:{id}:", HOLD.prefix()),
            Holder::Checkpoint(id) => format!("{}ckpt:{id}:", HOLD.prefix()),
        }
    }

    /// A store name is at most 120 bytes: 32 hex digits (128 bits) of the blob id name it
    /// uniquely within one holder (the name's content is the full id).
    fn name(&self, blob: &BlobId) -> String {
        format!("{}{}", self.prefix(), &blob.to_hex()[..32])
    }
}

/// The runtime's holds on store blobs.
#[derive(Clone)]
pub struct Holds {
    store: Store,
    lock: PathBuf,
}

impl Holds {
    /// `lock`: a file serializing hold changes among every process of this home.
    pub fn new(store: Store, lock: PathBuf) -> Holds {
        Holds { store, lock }
    }

    /// The holds of the kiln home `home`, shared by every process and driver using it.
    pub fn of_home(store: Store, home: &std::path::Path) -> Holds {
        Holds::new(store, home.join("sandboxes").join(".holds.lock"))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Makes `holder` keep exactly `blobs`: new holds first, then the old ones go, and blobs
    /// nobody names any more are removed (their chunks go with the next gc).
    pub fn set(&self, holder: &Holder, blobs: &[BlobId]) -> Result<()> {
        let _lock = self.lock()?;
        let want: BTreeSet<BlobId> = blobs.iter().copied().collect();
        for b in &want {
            let name = holder.name(b);
            if self.store.lookup_name(&name)? != Some(*b) {
                self.store.set_name(&name, b)?;
            }
        }
        let all = self.store.names()?;
        for (name, id) in self.store.names_with_prefix(&holder.prefix())? {
            if want.contains(&id) {
                continue;
            }
            let named_elsewhere = all.iter().any(|(n, i)| *i == id && *n != name);
            if named_elsewhere || !self.store.contains(&id) {
                self.store.remove_name(&name)?;
                continue;
            }
            // Its last name: the blob goes first (then its names), so a kill in between
            // leaves a name to nothing, never a blob nobody names.
            match self.store.remove_blob(&id) {
                Ok(()) | Err(kiln_blockstore::Error::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.store.remove_name(&name)?;
            tracing::debug!(%id, "released blob removed");
        }
        Ok(())
    }

    /// Drops every hold of `holder`.
    pub fn release(&self, holder: &Holder) -> Result<()> {
        self.set(holder, &[])
    }

    /// Adds holds without dropping any (a step that must not lose the old ones yet).
    pub fn add(&self, holder: &Holder, blobs: &[BlobId]) -> Result<()> {
        let _lock = self.lock()?;
        for b in blobs {
            self.store.set_name(&holder.name(b), b)?;
        }
        Ok(())
    }

    /// Makes `holder` keep `blob` before the blob exists: for a put's announce hook
    /// ([`Store::put_file_announced`]). Under the lock, so a holder releasing a blob of the
    /// same content either finished removing it before (the put then writes its manifest
    /// again) or sees this name and keeps it.
    pub fn add_ahead(&self, holder: &Holder, blob: &BlobId) -> Result<()> {
        let _lock = self.lock()?;
        self.store.set_name_ahead(&holder.name(blob), blob)?;
        Ok(())
    }

    /// Removes `blobs` (a checkpoint made and then not kept) unless something names them.
    pub fn discard(&self, blobs: &[BlobId]) -> Result<()> {
        let _lock = self.lock()?;
        self.remove_unnamed(blobs)
    }

    /// The blobs `holder` keeps.
    pub fn of(&self, holder: &Holder) -> Result<Vec<BlobId>> {
        Ok(self
            .store
            .names_with_prefix(&holder.prefix())?
            .into_iter()
            .map(|(_, id)| id)
            .collect())
    }

    /// Removes blobs that were made and held only by the runtime and that no name keeps now.
    /// `candidates` must come from holds just released (under the lock).
    fn remove_unnamed(&self, candidates: &[BlobId]) -> Result<()> {
        if candidates.is_empty() {
            return Ok(());
        }
        let named: BTreeSet<BlobId> = self.store.names()?.into_iter().map(|(_, id)| id).collect();
        for id in candidates {
            if !named.contains(id) && self.store.contains(id) {
                match self.store.remove_blob(id) {
                    Ok(()) | Err(kiln_blockstore::Error::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                tracing::debug!(%id, "released blob removed");
            }
        }
        Ok(())
    }

    fn lock(&self) -> Result<HoldLock> {
        if let Some(d) = self.lock.parent() {
            std::fs::create_dir_all(d).ctx("create", d)?;
        }
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)
            .ctx("open", &self.lock)?;
        // SAFETY: flock on a descriptor we own; blocks until the other holder is done (every
        // holder keeps it for a few store name operations).
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).ctx("lock", &self.lock);
        }
        Ok(HoldLock { _file: f })
    }
}

struct HoldLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_blockstore::PutOptions;

    fn setup() -> (tempfile::TempDir, Store, Holds) {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("store")).unwrap();
        let holds = Holds::new(store.clone(), d.path().join("holds.lock"));
        (d, store, holds)
    }

    fn blob(store: &Store, s: &str) -> BlobId {
        store
            .put_bytes(s.as_bytes(), &PutOptions::default())
            .unwrap()
    }

    #[test]
    fn last_holder_gone_removes_the_blob() {
        let (_d, store, holds) = setup();
        let (a, b) = (blob(&store, "a"), blob(&store, "b"));
        let sb = Holder::Sandbox("s1".into());
        let snap = Holder::Snapshot("warm".into());
        holds.set(&sb, &[a, b]).unwrap();
        holds.set(&snap, &[b]).unwrap();
        // Replacing the sandbox's set releases a; b is still the snapshot's.
        holds.set(&sb, &[b]).unwrap();
        assert!(!store.contains(&a));
        assert!(store.contains(&b));
        holds.release(&sb).unwrap();
        assert!(store.contains(&b));
        holds.release(&snap).unwrap();
        assert!(!store.contains(&b));
        assert!(store.names().unwrap().is_empty());
    }

    #[test]
    fn a_blob_with_another_name_stays() {
        let (_d, store, holds) = setup();
        let a = blob(&store, "a");
        store.set_name("keep:image-disk", &a).unwrap();
        let sb = Holder::Sandbox("s1".into());
        holds.set(&sb, &[a]).unwrap();
        assert_eq!(holds.of(&sb).unwrap(), vec![a]);
        holds.release(&sb).unwrap();
        assert!(store.contains(&a));
        assert!(holds.of(&sb).unwrap().is_empty());
    }

    #[test]
    fn holders_with_similar_names_are_apart() {
        let (_d, store, holds) = setup();
        let (a, b) = (blob(&store, "a"), blob(&store, "b"));
        holds.set(&Holder::Sandbox("s1".into()), &[a]).unwrap();
        holds.set(&Holder::Sandbox("s10".into()), &[b]).unwrap();
        holds.release(&Holder::Sandbox("s1".into())).unwrap();
        assert!(!store.contains(&a));
        assert!(store.contains(&b));
    }

    #[test]
    fn longest_names_fit_the_store() {
        let (_d, store, holds) = setup();
        let a = blob(&store, "a");
        let name = "n".repeat(64);
        holds.set(&Holder::Snapshot(name.clone()), &[a]).unwrap();
        assert_eq!(holds.of(&Holder::Snapshot(name)).unwrap(), vec![a]);
    }
}
