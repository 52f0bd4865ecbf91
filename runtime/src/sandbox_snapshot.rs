//! Sandbox snapshots in the block store: a small JSON record (its blob id is the snapshot id)
//! naming the runtime, the image, the sandbox's settings and the driver's [`Checkpoint`].
//!
//! Store names: `sandbox-snapshot:<name>` -> a named snapshot (`kiln sandbox snapshot ID
//! --name N`, E2B's snapshots). What keeps a snapshot's blobs is [`crate::holds`]: the named
//! snapshot, the paused sandbox whose state it is, or the sandboxes still reading it; once none
//! is left its blobs are removed and the next gc frees their chunks.
//!
//! A snapshot pushed to a remote carries its image: restoring it in another home pulls the
//! image's record and layers lazily.

use crate::error::{Error, Result};
use crate::holds::{Holder, Holds};
use crate::record::{now_ms, ProcessDefaults, RuntimeKind, SandboxRecord};
use crate::Checkpoint;
use kiln_blockstore::names::{REMOTE_SANDBOX_SNAPSHOT, SANDBOX_SNAPSHOT};
use kiln_blockstore::{BlobId, PutOptions, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub schema: u32,
    pub runtime: RuntimeKind,
    pub image: BlobId,
    /// The snapshot the sandbox had been restored from, if any.
    pub parent: Option<BlobId>,
    /// The sandbox it was taken of.
    pub sandbox: String,
    pub created_ms: u64,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub defaults: ProcessDefaults,
    pub generation: u64,
    pub checkpoint: Checkpoint,
    /// The sandbox's egress policy (`None`: it had no network device); its restores and forks
    /// get a network of their own with this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<kiln_network::NetworkPolicy>,
}

impl SnapshotRecord {
    pub fn of(rec: &SandboxRecord, checkpoint: Checkpoint) -> SnapshotRecord {
        SnapshotRecord {
            schema: 1,
            runtime: rec.runtime,
            image: rec.image,
            parent: rec.snapshot,
            sandbox: rec.id.clone(),
            created_ms: now_ms(),
            cpus: rec.cpus,
            memory_mib: rec.memory_mib,
            disk_mib: rec.disk_mib,
            env: rec.env.clone(),
            metadata: rec.metadata.clone(),
            defaults: rec.defaults.clone(),
            generation: rec.generation,
            checkpoint,
            network: rec.network.clone(),
        }
    }
}

impl SnapshotRecord {
    /// Every blob the snapshot needs, its own record `id` included.
    pub fn blobs_with(&self, id: &BlobId) -> Vec<BlobId> {
        let mut v = self.checkpoint.blobs.clone();
        v.push(*id);
        v
    }
}

/// Stores the record (after its blobs, which the driver made durable) and makes `holder` keep
/// it with its blobs (replacing what `holder` kept before).
pub fn put(holds: &Holds, snap: &SnapshotRecord, holder: &Holder) -> Result<BlobId> {
    let id = put_record(holds, snap)?;
    holds.set(holder, &snap.blobs_with(&id))?;
    Ok(id)
}

/// Stores the record, held by its sandbox's [`Holder::Checkpoint`] before it is visible (as
/// the checkpoint's blobs are), so a caller killed before it holds the record otherwise
/// leaves nothing unnamed; the caller holds it and then releases that hold.
pub fn put_record(holds: &Holds, snap: &SnapshotRecord) -> Result<BlobId> {
    let bytes = serde_json::to_vec(snap).expect("records serialize");
    let holder = Holder::Checkpoint(snap.sandbox.clone());
    let announce = |id: &BlobId| {
        holds
            .add_ahead(&holder, id)
            .map_err(|e| kiln_blockstore::Error::Invalid(format!("holding a snapshot record: {e}")))
    };
    Ok(holds
        .store()
        .put_bytes_announced(&bytes, &PutOptions::default(), &announce)?)
}

/// Names snapshot `id` (an existing name moves to it; what only the old one needed goes).
pub fn name(holds: &Holds, name: &str, id: &BlobId, snap: &SnapshotRecord) -> Result<()> {
    crate::record::check_name(name)?;
    // Held before it is named, so a listed name never lacks its data.
    holds.set(&Holder::Snapshot(name.into()), &snap.blobs_with(id))?;
    holds.store().set_name(&SANDBOX_SNAPSHOT.name(name), id)?;
    Ok(())
}

/// Removes a named snapshot: its name, then its hold; its data goes once no sandbox needs it.
/// Returns whether the name existed.
pub fn remove(holds: &Holds, name: &str) -> Result<bool> {
    let existed = holds.store().remove_name(&SANDBOX_SNAPSHOT.name(name))?;
    holds.release(&Holder::Snapshot(name.into()))?;
    Ok(existed)
}

pub fn get(store: &Store, id: &BlobId) -> Result<SnapshotRecord> {
    let mut bytes = Vec::new();
    store.write_to(id, &mut bytes)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("snapshot {id} is not a sandbox snapshot: {e}")))
}

/// A snapshot by name, full id, or (locally) an id prefix of 8+ hex digits. A name or id this
/// home lacks is looked up on the default remote and pulled (the record and its blobs'
/// manifests; data stays lazy). The caller holds what it uses.
pub fn lookup(holds: &Holds, name_or_id: &str) -> Result<(BlobId, SnapshotRecord)> {
    let store = holds.store();
    let name = SANDBOX_SNAPSHOT.name(name_or_id);
    if let Some(id) = store.lookup_name(&name)? {
        return Ok((id, get(store, &id)?));
    }
    if let Ok(id) = name_or_id.parse::<BlobId>() {
        if !store.contains(&id) {
            store
                .pull(&id)
                .map_err(|_| Error::SnapshotNotFound(name_or_id.into()))?;
        }
        return Ok((id, get(store, &id)?));
    }
    if name_or_id.len() >= 8 && name_or_id.chars().all(|c| c.is_ascii_hexdigit()) {
        let prefix = name_or_id.to_ascii_lowercase();
        for (_, id) in list(store)? {
            if id.to_hex().starts_with(&prefix) {
                return Ok((id, get(store, &id)?));
            }
        }
    }
    // Another home may have pushed it under this name: it is named here too.
    if let Ok(Some(id)) = store.remote_name(&REMOTE_SANDBOX_SNAPSHOT.name(name_or_id)) {
        return Ok((id, pull(holds, name_or_id, &id)?));
    }
    Err(Error::SnapshotNotFound(name_or_id.into()))
}

/// Makes snapshot `id`, pushed by another home, this home's snapshot `name`: its record and
/// its blobs' manifests come from the remote (their data lazily, on read).
pub fn pull(holds: &Holds, name: &str, id: &BlobId) -> Result<SnapshotRecord> {
    let store = holds.store();
    store.pull(id)?;
    let snap = get(store, id)?;
    fetch_manifests(store, &snap)?;
    self::name(holds, name, id, &snap)?;
    Ok(snap)
}

/// Makes the manifests of a snapshot's blobs local (a snapshot pulled from another home
/// brings only its record); their data still comes lazily, on read.
pub fn fetch_manifests(store: &Store, snap: &SnapshotRecord) -> Result<()> {
    for b in &snap.checkpoint.blobs {
        if !store.contains(b) {
            store.pull(b)?;
        }
    }
    Ok(())
}

/// Named snapshots: (name, id).
pub fn list(store: &Store) -> Result<Vec<(String, BlobId)>> {
    Ok(store
        .names_with_prefix(SANDBOX_SNAPSHOT.prefix())?
        .into_iter()
        .filter_map(|(n, id)| Some((SANDBOX_SNAPSHOT.strip(&n)?.to_string(), id)))
        .collect())
}

/// Pushes a snapshot (its image, its blobs, then the record, then its name) to the remote.
pub fn push(store: &Store, id: &BlobId, name: Option<&str>) -> Result<u64> {
    let snap = get(store, id)?;
    let mut bytes = kiln_imagebuilder::image::push(store, &snap.image)?;
    for b in snap.checkpoint.blobs.iter().chain([id]) {
        bytes += store.push(b, &|_| {})?.bytes_uploaded;
    }
    if let Some(n) = name {
        store.push_name(&REMOTE_SANDBOX_SNAPSHOT.name(n), id)?;
    }
    Ok(bytes)
}
