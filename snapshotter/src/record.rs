//! The snapshot record: everything needed to bring a VM back, as one JSON blob in the store.
//!
//! A snapshot is named in the store as `snapshot/<name>`; its record points at the memory
//! image (layers of memory blobs), the disks, the parent snapshot and the vCPU/device state.
//! Restoring checks the record's format, the kiln version that wrote it and the CPU it was
//! taken on before any VM is built, so no VM ever runs on state it cannot honour.

use crate::memory::MemoryImage;
use kiln_blockstore::names::{VM_SNAPSHOT, WORKING_SET};
use kiln_blockstore::{BlobId, PutOptions, Store};
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to the record or what it points at.
pub const SNAPSHOT_FORMAT: u32 = 2;

/// Which CPU a snapshot was taken on: restoring vCPU state (CPUID, MSRs, xsave layout) on a
/// different CPU model is unsafe, so restore refuses unless the identity hash matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    pub vendor: String,
    /// Family/model/stepping signature (CPUID.1:EAX).
    pub signature: u32,
    /// blake3 of the vendor, signature and feature words (APIC ids masked).
    pub hash: String,
}

impl CpuIdentity {
    /// This host's CPU.
    pub fn host() -> CpuIdentity {
        use std::arch::x86_64::__cpuid_count;
        // SAFETY: CPUID is available on every x86_64 CPU and has no side effects.
        let leaf = |l: u32, s: u32| __cpuid_count(l, s);
        let l0 = leaf(0, 0);
        let mut vendor = Vec::new();
        for r in [l0.ebx, l0.edx, l0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let vendor = String::from_utf8_lossy(&vendor)
            .trim_end_matches('\0')
            .to_string();
        let l1 = leaf(1, 0);
        let mut words = vec![l1.eax, l1.ecx & !(1 << 27), l1.edx]; // OSXSAVE follows the OS
        if l0.eax >= 7 {
            let l7 = leaf(7, 0);
            words.extend([l7.ebx, l7.ecx, l7.edx]);
        }
        if l0.eax >= 0xd {
            let ld = leaf(0xd, 0);
            words.extend([ld.eax, ld.edx]); // xsave features (sizes vary with XCR0)
        }
        let ext = leaf(0x8000_0000, 0).eax;
        if ext >= 0x8000_0001 {
            let e = leaf(0x8000_0001, 0);
            words.extend([e.ecx, e.edx]);
        }
        let mut bytes = vendor.as_bytes().to_vec();
        for w in &words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        CpuIdentity {
            vendor,
            signature: l1.eax,
            hash: blake3::hash(&bytes).to_hex()[..32].to_string(),
        }
    }
}

/// A disk of the snapshotted VM: the committed blob and how it was attached. Disks are listed
/// in the order of the VM's virtio-blk devices; a restore gives each restored VM a fresh
/// copy-on-write overlay over `blob`, which itself never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRef {
    pub blob: BlobId,
    #[serde(default)]
    pub read_only: bool,
}

/// The VM's shape: what a restore must rebuild before loading state into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    pub mem_bytes: u64,
    pub vcpus: u8,
    pub cmdline: String,
    /// Guest vsock CID (restored VMs keep it; each fork gets its own socket path).
    #[serde(default)]
    pub vsock_cid: Option<u64>,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub format: u32,
    pub kiln_version: String,
    pub cpu: CpuIdentity,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub vm: VmShape,
    /// `kiln_vmm::VmState` as JSON (kept opaque here; the VMM checks its own version).
    pub state: serde_json::Value,
    pub memory: MemoryImage,
    #[serde(default)]
    pub disks: Vec<DiskRef>,
    /// The snapshot this one is a diff of (its memory layers are a prefix of ours).
    #[serde(default)]
    pub parent: Option<BlobId>,
    /// The VM's generation when it was captured (`state.genid.generation`: 0 for a VM booted
    /// fresh, +1 per restore/fork); the VM restored from this snapshot runs at generation + 1.
    #[serde(default)]
    pub generation: u64,
}

/// Why a snapshot cannot be stored, found or used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("block store: {0}")]
    Store(#[from] kiln_blockstore::Error),
    #[error("snapshot {0} is corrupt or truncated: {1}")]
    Corrupt(String, String),
    #[error("snapshot {id} has format {found}; this kiln ({ours}) reads format {SNAPSHOT_FORMAT}")]
    Format {
        id: String,
        found: u32,
        ours: String,
    },
    #[error("snapshot {id} was taken on a different CPU ({theirs}) than this host's ({ours}); restoring it could crash or corrupt the guest")]
    Cpu {
        id: String,
        theirs: String,
        ours: String,
    },
    #[error("snapshot {id} is inconsistent: {reason}")]
    Inconsistent { id: String, reason: String },
}

impl SnapshotRecord {
    /// Refuses records this kiln or this CPU cannot honour.
    pub fn check_compatible(&self, id: &str) -> Result<(), RecordError> {
        if self.format != SNAPSHOT_FORMAT {
            return Err(RecordError::Format {
                id: id.into(),
                found: self.format,
                ours: env!("CARGO_PKG_VERSION").into(),
            });
        }
        let host = CpuIdentity::host();
        if self.cpu.hash != host.hash {
            return Err(RecordError::Cpu {
                id: id.into(),
                theirs: format!(
                    "{} {:#x} {}",
                    self.cpu.vendor, self.cpu.signature, self.cpu.hash
                ),
                ours: format!("{} {:#x} {}", host.vendor, host.signature, host.hash),
            });
        }
        let bad = |reason: String| {
            Err(RecordError::Inconsistent {
                id: id.into(),
                reason,
            })
        };
        if self.memory.size != self.vm.mem_bytes {
            return bad(format!(
                "memory image holds {} bytes, VM has {}",
                self.memory.size, self.vm.mem_bytes
            ));
        }
        if self.memory.layers.is_empty() || self.memory.layers[0].runs.is_some() {
            return bad("memory image has no full base layer".into());
        }
        if self.vm.vcpus == 0 {
            return bad("zero vCPUs".into());
        }
        let blk_devices = self.state["virtio"].as_array().map_or(0, |v| {
            v.iter()
                .filter(|d| d["device_type"] == kiln_vmm::devices::virtio::TYPE_BLOCK)
                .count()
        });
        if blk_devices != self.disks.len() {
            return bad(format!(
                "the VM had {blk_devices} disks but the record lists {} disk blobs",
                self.disks.len()
            ));
        }
        Ok(())
    }
}

/// Seconds since the epoch, now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Stores a record (and names it `snapshot/<name>` if a name is given); returns its id.
pub fn save(
    store: &Store,
    rec: &SnapshotRecord,
    name: Option<&str>,
) -> Result<BlobId, RecordError> {
    let json = serde_json::to_vec_pretty(rec)
        .map_err(|e| RecordError::Corrupt("(new)".into(), e.to_string()))?;
    let opts = PutOptions {
        name: name.map(|n| VM_SNAPSHOT.name(n)),
        ..Default::default()
    };
    Ok(store.put_bytes(&json, &opts)?)
}

/// Finds a snapshot by name (`NAME` or `snapshot/NAME`) or blob id (or unique id prefix).
pub fn resolve(store: &Store, name_or_id: &str) -> Result<BlobId, RecordError> {
    let full = if VM_SNAPSHOT.contains(name_or_id) {
        name_or_id.to_string()
    } else {
        VM_SNAPSHOT.name(name_or_id)
    };
    if let Some(id) = store.lookup_name(&full)? {
        return Ok(id);
    }
    Ok(store.resolve(name_or_id)?)
}

/// Loads and parses a record (integrity is the store's: a damaged blob fails to read).
pub fn load(store: &Store, id: &BlobId) -> Result<SnapshotRecord, RecordError> {
    let r = store.open_blob(id)?;
    if r.len() > 64 << 20 {
        return Err(RecordError::Corrupt(
            id.to_string(),
            format!("record of {} bytes", r.len()),
        ));
    }
    let mut buf = vec![0u8; r.len() as usize];
    let n = r.read_at(0, &mut buf)?;
    buf.truncate(n);
    serde_json::from_slice(&buf).map_err(|e| RecordError::Corrupt(id.to_string(), e.to_string()))
}

/// Loads, parses and checks a snapshot: the only way restore paths get a record.
pub fn load_checked(
    store: &Store,
    name_or_id: &str,
) -> Result<(BlobId, SnapshotRecord), RecordError> {
    let id = resolve(store, name_or_id)?;
    let rec = load(store, &id)?;
    rec.check_compatible(&id.to_string())?;
    Ok((id, rec))
}

/// Snapshots in the store: (name without prefix, id).
pub fn list(store: &Store) -> Result<Vec<(String, BlobId)>, RecordError> {
    Ok(store
        .names()?
        .into_iter()
        .filter_map(|(n, id)| VM_SNAPSHOT.strip(&n).map(|s| (s.to_string(), id)))
        .collect())
}

/// The working set recorded at a snapshot's first restore, as chunk indices in touch order.
pub fn working_set(store: &Store, snap: &BlobId) -> Result<Option<Vec<u32>>, RecordError> {
    let Some(id) = store.lookup_name(&WORKING_SET.name(snap))? else {
        return Ok(None);
    };
    let r = store.open_blob(&id)?;
    let mut buf = vec![0u8; r.len() as usize];
    r.read_at(0, &mut buf)?;
    let ws: Vec<u32> = buf
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok(Some(ws))
}

/// Stores a working set for `snap` (replacing any earlier one).
pub fn save_working_set(
    store: &Store,
    snap: &BlobId,
    chunks: &[u32],
) -> Result<BlobId, RecordError> {
    let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.to_le_bytes()).collect();
    let opts = PutOptions {
        name: Some(WORKING_SET.name(snap)),
        ..Default::default()
    };
    Ok(store.put_bytes(&bytes, &opts)?)
}

/// Every blob a snapshot needs: its record, memory layers, disks (and working set if any).
pub fn blobs(store: &Store, id: &BlobId, rec: &SnapshotRecord) -> Result<Vec<BlobId>, RecordError> {
    let mut out = vec![*id];
    out.extend(rec.memory.layers.iter().map(|l| l.blob));
    out.extend(rec.disks.iter().map(|d| d.blob));
    if let Some(ws) = store.lookup_name(&WORKING_SET.name(id))? {
        out.push(ws);
    }
    Ok(out)
}

/// Pushes a snapshot to the store's remote (only chunks the remote lacks). Returns bytes sent.
/// The working set (recorded later than the snapshot) travels under a remote name, pushed
/// after its blob.
pub fn push(store: &Store, id: &BlobId) -> Result<u64, RecordError> {
    let rec = load(store, id)?;
    let mut bytes = 0;
    for b in blobs(store, id, &rec)? {
        bytes += store.push(&b, &|_| {})?.bytes_uploaded;
    }
    let ws_name = WORKING_SET.name(id);
    if let Some(ws) = store.lookup_name(&ws_name)? {
        store.push_name(&ws_name, &ws)?;
    }
    Ok(bytes)
}

/// Makes a snapshot pushed from another home restorable here: fetches its record, the memory
/// and disk manifests and its working set if one was pushed; memory pages then come from the
/// remote lazily, as touched.
/// Names it `snapshot/<name>` if a name is given.
pub fn pull(store: &Store, id: &BlobId, name: Option<&str>) -> Result<SnapshotRecord, RecordError> {
    store.pull(id)?;
    let rec = load(store, id)?;
    for l in &rec.memory.layers {
        store.pull(&l.blob)?;
    }
    for d in &rec.disks {
        store.pull(&d.blob)?;
    }
    // The working set, if one was recorded and pushed: restores here prefetch it too.
    let ws_name = WORKING_SET.name(id);
    if store.lookup_name(&ws_name)?.is_none() {
        if let Some(ws) = store.remote_name(&ws_name)? {
            store.pull(&ws)?;
            store.set_name(&ws_name, &ws)?;
        }
    }
    if let Some(n) = name {
        store.set_name(&VM_SNAPSHOT.name(n), id)?;
    }
    Ok(rec)
}
