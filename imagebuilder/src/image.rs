//! Images in the block store: a disk blob (ext4), the layer blobs it was made from, and an
//! OCI-style config, recorded as a small JSON blob.
//!
//! Names (store names, one file each, written atomically by the store):
//! - `image:<name>` -> the image record blob (the image id is that blob's id);
//! - `keep:<blob id>` -> the blob itself, for every disk and layer blob an image or a cached
//!   build step refers to, so a name-rooted gc never drops them.

use crate::error::{Error, IoCtx, Result};
use kiln_blockstore::{names, BlobId, PutOptions, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// What a VM needs to run an image's process (the OCI image config subset kiln uses).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub exposed_ports: Vec<String>,
    #[serde(default)]
    pub shell: Option<Vec<String>>,
}

impl ImageConfig {
    /// From an OCI image config JSON document (the `config` object inside it).
    pub fn from_oci_json(bytes: &[u8]) -> Result<ImageConfig> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::BadSource(format!("image config is not JSON: {e}")))?;
        let c = v.get("config").cloned().unwrap_or_default();
        let strs = |k: &str| -> Option<Vec<String>> {
            c.get(k)?.as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
        };
        let s = |k: &str| {
            c.get(k)
                .and_then(|x| x.as_str())
                .filter(|x| !x.is_empty())
                .map(String::from)
        };
        Ok(ImageConfig {
            env: strs("Env").unwrap_or_default(),
            entrypoint: strs("Entrypoint"),
            cmd: strs("Cmd"),
            workdir: s("WorkingDir"),
            user: s("User"),
            labels: c
                .get("Labels")
                .and_then(|l| l.as_object())
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            exposed_ports: c
                .get("ExposedPorts")
                .and_then(|l| l.as_object())
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default(),
            shell: strs("Shell"),
        })
    }

    /// The value of `key` in env, if set.
    pub fn env_get(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// Sets `key=value` in env, replacing an earlier value.
    pub fn env_set(&mut self, key: &str, value: &str) {
        self.env
            .retain(|kv| kv.split_once('=').map(|(k, _)| k) != Some(key));
        self.env.push(format!("{key}={value}"));
    }
}

/// An image record (stored as JSON; its blob id is the image id).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// Format version of this record.
    pub schema: u32,
    /// The ext4 root file system.
    pub disk: BlobId,
    pub disk_size: u64,
    /// Layer tars (OCI format, possibly compressed) that make up the root file system, bottom
    /// first; applying them in order gives the tree the disk was made from.
    pub layers: Vec<BlobId>,
    pub config: ImageConfig,
    /// Where the image came from (its base image for builds).
    pub parent: Option<String>,
    /// How it was made, e.g. `pull 127.0.0.1:5000/busybox:1` or `build Dockerfile`.
    pub source: String,
    /// Per-step history for builds.
    #[serde(default)]
    pub history: Vec<String>,
}

/// Where the image config lives inside the disk, for the guest agent.
pub const CONFIG_PATH_IN_DISK: &str = ".kiln/config.json";

/// A row of `kiln image ls`.
#[derive(Clone, Debug, Serialize)]
pub struct ImageSummary {
    pub name: String,
    pub id: BlobId,
    pub disk: BlobId,
    pub disk_size: u64,
    pub layers: usize,
    pub source: String,
}

/// Image names: `[a-zA-Z0-9._/:@-]`, 1..100 bytes.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/:@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bad image name {name:?}: 1-100 characters from [a-zA-Z0-9._/:@-]"
        )))
    }
}

/// Stores a record and everything it refers to; returns the image id.
pub fn put_record(store: &Store, rec: &ImageRecord) -> Result<BlobId> {
    for id in rec.layers.iter().chain(std::iter::once(&rec.disk)) {
        keep(store, id)?;
    }
    let bytes = serde_json::to_vec(rec).expect("record serializes");
    let id = store.put_bytes(&bytes, &PutOptions::default())?;
    keep(store, &id)?;
    Ok(id)
}

/// Points `name` at `id` unless it already does: every name written is two fsyncs, and a
/// rebuild names mostly what is named already.
pub(crate) fn set_name_once(store: &Store, name: &str, id: &BlobId) -> Result<()> {
    if store.lookup_name(name)? != Some(*id) {
        store.set_name(name, id)?;
    }
    Ok(())
}

/// Reads an image record by id.
pub fn get_record(store: &Store, id: &BlobId) -> Result<ImageRecord> {
    let r = store.open_blob(id)?;
    let mut buf = vec![0u8; r.len() as usize];
    let mut off = 0;
    while off < buf.len() {
        let n = r.read_at(off as u64, &mut buf[off..])?;
        if n == 0 {
            break;
        }
        off += n;
    }
    serde_json::from_slice(&buf)
        .map_err(|e| Error::Invalid(format!("blob {id} is not an image record: {e}")))
}

/// Points `name` at image `id`.
pub fn tag(store: &Store, name: &str, id: &BlobId) -> Result<()> {
    check_name(name)?;
    set_name_once(store, &names::IMAGE.name(name), id)
}

/// The image a name (or an image id / unique id prefix) refers to.
pub fn lookup(store: &Store, name_or_id: &str) -> Result<(BlobId, ImageRecord)> {
    if let Some(id) = store.lookup_name(&names::IMAGE.name(name_or_id))? {
        return Ok((id, get_record(store, &id)?));
    }
    if name_or_id.len() >= 8 && name_or_id.chars().all(|c| c.is_ascii_hexdigit()) {
        for s in list(store)? {
            if s.id.to_hex().starts_with(&name_or_id.to_ascii_lowercase()) {
                return Ok((s.id, get_record(store, &s.id)?));
            }
        }
    }
    Err(Error::ImageNotFound(name_or_id.to_string()))
}

/// All tagged images.
pub fn list(store: &Store) -> Result<Vec<ImageSummary>> {
    let mut out = Vec::new();
    for (n, id) in store.names()? {
        let Some(name) = names::IMAGE.strip(&n) else {
            continue;
        };
        let rec = get_record(store, &id)?;
        out.push(ImageSummary {
            name: name.to_string(),
            id,
            disk: rec.disk,
            disk_size: rec.disk_size,
            layers: rec.layers.len(),
            source: rec.source,
        });
    }
    Ok(out)
}

/// Removes a tag, then drops `keep:` names no remaining image or cached step refers to.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    if !store.remove_name(&names::IMAGE.name(name))? {
        return Err(Error::ImageNotFound(name.to_string()));
    }
    let all = store.names()?;
    let mut live = crate::build_cache::kept_blobs(store, &all);
    for (n, id) in &all {
        if names::IMAGE.contains(n) {
            live.insert(*id);
            if let Ok(rec) = get_record(store, id) {
                live.insert(rec.disk);
                live.extend(rec.layers);
            }
        }
    }
    for (n, id) in &all {
        if names::KEEP.contains(n) && !live.contains(id) {
            store.remove_name(n)?;
        }
    }
    Ok(())
}

/// Marks a blob as referenced (see module docs).
pub(crate) fn keep(store: &Store, id: &BlobId) -> Result<()> {
    set_name_once(store, &names::KEEP.name(id), id)
}

/// Turns a staged root file system into a disk blob: writes the config at
/// [`CONFIG_PATH_IN_DISK`], makes a deterministic ext4 and puts it in the store.
/// Returns (disk id, disk size).
pub fn commit_rootfs(
    store: &Store,
    rootfs: &Path,
    config: &ImageConfig,
    layers: &[BlobId],
    scratch: &Path,
) -> Result<(BlobId, u64)> {
    write_config(rootfs, config)?;
    let (bytes, _) = crate::ext4::tree_bytes(rootfs)?;
    let size = crate::ext4::disk_size_for(bytes);
    let img = scratch.join("disk.ext4");
    let mut seed = Vec::new();
    for l in layers {
        seed.extend_from_slice(l.as_bytes());
    }
    seed.extend_from_slice(&serde_json::to_vec(config).expect("config serializes"));
    let t = std::time::Instant::now();
    crate::ext4::make_ext4(rootfs, &img, size, &seed)?;
    let mkfs_ms = t.elapsed().as_millis() as u64;
    let id = store.put_file(&img, &PutOptions::default())?;
    tracing::info!(
        mkfs_ms,
        put_ms = t.elapsed().as_millis() as u64 - mkfs_ms,
        size,
        "disk committed"
    );
    let _ = std::fs::remove_file(&img);
    keep(store, &id)?;
    Ok((id, size))
}

/// Writes the config for the guest agent at [`CONFIG_PATH_IN_DISK`], with fixed times.
pub(crate) fn write_config(rootfs: &Path, config: &ImageConfig) -> Result<()> {
    let kiln_dir = rootfs.join(".kiln");
    std::fs::create_dir_all(&kiln_dir).ctx("mkdir", &kiln_dir)?;
    let cfg_path = rootfs.join(CONFIG_PATH_IN_DISK);
    std::fs::write(
        &cfg_path,
        serde_json::to_vec_pretty(config).expect("config serializes"),
    )
    .ctx("write", &cfg_path)?;
    crate::layer::set_mtime(&cfg_path, crate::ext4::FIXED_TIME as i64)?;
    crate::layer::set_mtime(&kiln_dir, crate::ext4::FIXED_TIME as i64)?;
    Ok(())
}

/// Reads a blob as a stream (for applying layer blobs).
pub struct BlobRead {
    reader: kiln_blockstore::BlobReader,
    off: u64,
}

impl BlobRead {
    pub fn open(store: &Store, id: &BlobId) -> Result<BlobRead> {
        Ok(BlobRead {
            reader: store.open_blob(id)?,
            off: 0,
        })
    }
}

impl std::io::Read for BlobRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.off >= self.reader.len() {
            return Ok(0);
        }
        let n = self
            .reader
            .read_at(self.off, buf)
            .map_err(std::io::Error::other)?;
        self.off += n as u64;
        Ok(n)
    }
}

/// Applies an image's layers to an empty directory.
pub fn materialize(store: &Store, layers: &[BlobId], root: &Path) -> Result<()> {
    for l in layers {
        crate::layer::apply_layer(
            root,
            BlobRead::open(store, l)?,
            &crate::layer::ApplyOptions {
                allow_devices: true,
            },
        )?;
    }
    Ok(())
}

/// Pushes an image (its record, disk and layer blobs) to the store's remote; only chunks the
/// remote lacks are sent. Returns bytes uploaded.
pub fn push(store: &Store, id: &BlobId) -> Result<u64> {
    let rec = get_record(store, id)?;
    let mut bytes = 0;
    // Record last: a remote that has the record then has everything it refers to.
    for b in rec.layers.iter().chain([&rec.disk, id]) {
        bytes += store.push(b, &|_| {})?.bytes_uploaded;
    }
    Ok(bytes)
}

/// Makes an image pushed from another home usable here: fetches its record and the disk and
/// layer manifests (their data comes from the remote lazily, on read), keeps them and names
/// the image `name`.
pub fn pull(store: &Store, id: &BlobId, name: &str) -> Result<ImageRecord> {
    check_name(name)?;
    store.pull(id)?;
    let rec = get_record(store, id)?;
    for b in rec.layers.iter().chain([&rec.disk]) {
        store.pull(b)?;
        keep(store, b)?;
    }
    keep(store, id)?;
    tag(store, name, id)?;
    Ok(rec)
}
