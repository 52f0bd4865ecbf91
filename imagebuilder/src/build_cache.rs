//! The build cache's entries and names: a step record (the layer and disk a step made) or an
//! image record, named `cache:<key>` here and `build-cache/<key>` on a remote
//! ([`kiln_blockstore::names`]); keys chain from the stage's base. Image removal asks this
//! module what the cache keeps, not how.

use crate::error::{Error, IoCtx, Result};
use crate::image;
use kiln_blockstore::names::{BUILD_CACHE, REMOTE_BUILD_CACHE};
use kiln_blockstore::{BlobId, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A cached step result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub layer: Option<BlobId>,
    pub layer_bytes: u64,
    /// The stage's ext4 disk after this step (without the final config), when the stage has
    /// one (a base image) and the step could update it.
    #[serde(default)]
    pub disk: Option<BlobId>,
}

impl StepRecord {
    pub(crate) fn referenced(&self) -> Vec<BlobId> {
        self.layer.into_iter().chain(self.disk).collect()
    }
}

/// The local store's name for the step or image of a key.
pub(crate) fn local_name(key: &blake3::Hash) -> String {
    BUILD_CACHE.name(key.to_hex())
}

/// The remote's name for the step or image of a key (remote names take no `:`).
pub(crate) fn remote_name(key: &blake3::Hash) -> String {
    REMOTE_BUILD_CACHE.name(key.to_hex())
}

pub(crate) fn get_step(store: &Store, id: &BlobId) -> Result<StepRecord> {
    let mut r = image::BlobRead::open(store, id)?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut buf).ctx("read", "step record")?;
    serde_json::from_slice(&buf).map_err(|e| Error::Invalid(format!("not a step record: {e}")))
}

/// The next key of a chain: the parent key and this step's parts.
pub(crate) fn chain(parent: &blake3::Hash, parts: &[&[u8]]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"kiln-step-v1");
    h.update(parent.as_bytes());
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()
}

/// Blobs the build cache keeps: every entry, and what each step or image record refers to
/// (for [`crate::image::remove`]).
pub(crate) fn kept_blobs(store: &Store, names: &[(String, BlobId)]) -> BTreeSet<BlobId> {
    let mut live = BTreeSet::new();
    for (n, id) in names {
        if BUILD_CACHE.contains(n) {
            live.insert(*id);
            if let Ok(rec) = image::get_record(store, id) {
                live.insert(rec.disk);
                live.extend(rec.layers);
            } else if let Ok(step) = get_step(store, id) {
                live.extend(step.referenced());
            }
        }
    }
    live
}
