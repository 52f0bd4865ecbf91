//! Copy-on-write overlays over blobs.
//!
//! Layout of an overlay directory:
//! ```text
//! meta.json        {"base": hex id or null, "size": N, "chunk_size": N}   (tmp + rename)
//! base.<hex>       a copy of the base manifest (so gc keeps its chunks even if the blob is removed)
//! data             sparse file, `size` bytes: the overlay's own sectors
//! dirty            bitmap, one bit per 4 KiB sector that lives in `data` (tmp + rename on flush)
//! ```
//! Writes are 4 KiB-sector granular: a write covering whole sectors needs no copy-up; a partial
//! sector is first copied up from the base. `flush` makes data durable before the dirty map that
//! refers to it, so after a crash every sector marked dirty has its flushed bytes, and writes not
//! yet flushed may be lost (a disk's volatile write cache has the same contract).
//!
//! The store keeps a pin (`<store>/pins/<hash of dir>`) naming the directory, so gc keeps the
//! base's chunks while the overlay exists.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::id::{BlobId, ChunkId, Digest};
use crate::manifest::{chunk_count, Manifest};
use crate::store::{is_zero, Store};
use crate::DEFAULT_CHUNK_SIZE;

/// Dirty-map granularity.
pub const SECTOR: u64 = 4096;

#[derive(Serialize, Deserialize)]
struct Meta {
    base: Option<BlobId>,
    size: u64,
    chunk_size: u32,
}

struct State {
    base_id: Option<BlobId>,
    base: Option<Arc<Manifest>>,
    dirty: Vec<u64>,
}

impl State {
    fn is_dirty(&self, sector: u64) -> bool {
        self.dirty[(sector / 64) as usize] & (1 << (sector % 64)) != 0
    }
    fn set_dirty(&mut self, sector: u64) {
        self.dirty[(sector / 64) as usize] |= 1 << (sector % 64);
    }
    fn any_dirty(&self, first: u64, end: u64) -> bool {
        (first..end).any(|s| self.is_dirty(s))
    }
}

/// A writable view of a blob: writes land in a sparse scratch file in the overlay's directory
/// plus a persisted dirty map of 4 KiB sectors; reads merge scratch and base. `Send + Sync`;
/// all methods take `&self` so VMM I/O threads can share one overlay.
pub struct Overlay {
    store: Store,
    dir: PathBuf,
    data: File,
    size: u64,
    chunk_size: u32,
    state: RwLock<State>,
    /// Dirty bits were added since the map was last persisted.
    map_changed: AtomicBool,
    /// Whether the pin, base copy and meta.json are known durable (see `make_durable`).
    durable: AtomicBool,
    /// Serializes flushes (so an older map never replaces a newer one).
    flush_lock: Mutex<()>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Overlay({}, {} bytes)", self.dir.display(), self.size)
    }
}

fn pin_path(store: &Store, dir: &Path) -> PathBuf {
    store
        .pins_dir()
        .join(Digest::of(dir.as_os_str().as_encoded_bytes()).to_hex())
}

fn bitmap_words(size: u64) -> usize {
    size.div_ceil(SECTOR).div_ceil(64) as usize
}

impl Overlay {
    pub(crate) fn create(
        store: &Store,
        base: Option<&BlobId>,
        size: u64,
        dir: &Path,
    ) -> Result<Overlay> {
        let base_m = base.map(|id| store.manifest_arc(id)).transpose()?;
        let chunk_size = base_m
            .as_ref()
            .map(|m| m.chunk_size)
            .unwrap_or(DEFAULT_CHUNK_SIZE);
        std::fs::create_dir_all(dir).ctx("create dir", dir)?;
        let dir = dir.canonicalize().ctx("canonicalize", dir)?;
        if dir.join("meta.json").exists() {
            return Err(Error::Invalid(format!(
                "{} already holds an overlay (open it instead)",
                dir.display()
            )));
        }
        let tmp = fsutil::tmp_name(&dir);
        // Nothing here is fsynced: the files are made durable by the first flush or commit
        // (`make_durable`). Until the guest asks for durability a crash may lose the whole
        // overlay, which is what a disk write cache promises anyway, and a restore or fork does
        // not pay ~30 ms of fsyncs per disk. Pin first: from here on gc keeps the base's chunks.
        fsutil::write_visible(
            &fsutil::tmp_name(&store.inner.local.tmp),
            &pin_path(store, &dir),
            dir.as_os_str().as_encoded_bytes(),
        )?;
        if let (Some(id), Some(m)) = (base, &base_m) {
            fsutil::write_visible(
                &tmp,
                &dir.join(format!("base.{}", id.to_hex())),
                &m.to_bytes(),
            )?;
        }
        let data_path = dir.join("data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .ctx("create", &data_path)?;
        data.set_len(size).ctx("truncate", &data_path)?;
        let _ = fsutil::remove_opt(&dir.join("dirty"));
        let meta = Meta {
            base: base.copied(),
            size,
            chunk_size,
        };
        // meta.json last: its presence marks a complete overlay.
        fsutil::write_visible(
            &tmp,
            &dir.join("meta.json"),
            &serde_json::to_vec(&meta).unwrap(),
        )?;
        debug!(dir = %dir.display(), ?base, size, "created overlay");
        Ok(Overlay {
            store: store.clone(),
            dir,
            data,
            size,
            chunk_size,
            state: RwLock::new(State {
                base_id: base.copied(),
                base: base_m,
                dirty: vec![0; bitmap_words(size)],
            }),
            map_changed: AtomicBool::new(false),
            durable: AtomicBool::new(false),
            flush_lock: Mutex::new(()),
        })
    }

    pub(crate) fn open(store: &Store, dir: &Path) -> Result<Overlay> {
        let dir = dir.canonicalize().ctx("open overlay", dir)?;
        let corrupt = |reason: String| Error::CorruptOverlay {
            path: dir.clone(),
            reason,
        };
        let meta_b = fsutil::read_opt(&dir.join("meta.json"))?
            .ok_or_else(|| corrupt("no meta.json (not an overlay directory)".into()))?;
        let meta: Meta =
            serde_json::from_slice(&meta_b).map_err(|e| corrupt(format!("meta.json: {e}")))?;
        let base = match meta.base {
            None => None,
            Some(id) => Some(Arc::new(load_base(store, &dir, &id)?)),
        };
        let data_path = dir.join("data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .ctx("open", &data_path)?;
        if data.metadata().ctx("stat", &data_path)?.len() < meta.size {
            data.set_len(meta.size).ctx("truncate", &data_path)?;
        }
        let words = bitmap_words(meta.size);
        let mut dirty = vec![0u64; words];
        if let Some(b) = fsutil::read_opt(&dir.join("dirty"))? {
            if b.len() != words * 8 {
                return Err(corrupt(format!(
                    "dirty map has {} bytes, expected {}",
                    b.len(),
                    words * 8
                )));
            }
            for (w, c) in dirty.iter_mut().zip(b.chunks_exact(8)) {
                *w = u64::from_le_bytes(c.try_into().unwrap());
            }
        }
        // Re-pin (the pin may have been removed by a gc that saw the directory missing).
        let pin = pin_path(store, &dir);
        if !pin.exists() {
            fsutil::write_durable(
                &fsutil::tmp_name(&store.inner.local.tmp),
                &pin,
                dir.as_os_str().as_encoded_bytes(),
            )?;
        }
        Ok(Overlay {
            store: store.clone(),
            dir,
            data,
            size: meta.size,
            chunk_size: meta.chunk_size,
            state: RwLock::new(State {
                base_id: meta.base,
                base,
                dirty,
            }),
            map_changed: AtomicBool::new(false),
            // Possibly created by another process that never flushed: check once more.
            durable: AtomicBool::new(false),
            flush_lock: Mutex::new(()),
        })
    }

    /// Size of the virtual disk in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// True for a zero-length overlay.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The overlay's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The blob the overlay currently sits on (changes after `commit`).
    pub fn base(&self) -> Option<BlobId> {
        self.state.read().unwrap().base_id
    }

    /// Bytes of the overlay that differ from (or were written over) the base.
    pub fn dirty_bytes(&self) -> u64 {
        let st = self.state.read().unwrap();
        st.dirty.iter().map(|w| w.count_ones() as u64).sum::<u64>() * SECTOR
    }

    /// Read at `off`; returns bytes read (short only at the end).
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let st = self.state.read().unwrap();
        self.read_locked(&st, off, buf)
    }

    fn read_locked(&self, st: &State, off: u64, buf: &mut [u8]) -> Result<usize> {
        if off >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - off) as usize;
        let mut done = 0usize;
        while done < n {
            let pos = off + done as u64;
            let sector = pos / SECTOR;
            let dirty = st.is_dirty(sector);
            // Extend the run while sectors have the same state.
            let mut end = ((sector + 1) * SECTOR).min(off + n as u64);
            while end < off + n as u64 && st.is_dirty(end / SECTOR) == dirty {
                end = ((end / SECTOR + 1) * SECTOR).min(off + n as u64);
            }
            let dst = &mut buf[done..done + (end - pos) as usize];
            if dirty {
                self.data
                    .read_exact_at(dst, pos)
                    .ctx("read", &self.dir.join("data"))?;
            } else {
                self.read_base(st, pos, dst)?;
            }
            done += dst.len();
        }
        Ok(n)
    }

    fn read_base(&self, st: &State, pos: u64, dst: &mut [u8]) -> Result<()> {
        let got = match &st.base {
            Some(m) => self.store.read_manifest_at(m, pos, dst)?,
            None => 0,
        };
        dst[got..].fill(0);
        Ok(())
    }

    /// Write all of `data` at `off` (must lie within `len()`).
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "write of {} bytes at {off} is beyond the overlay's {} bytes",
                    data.len(),
                    self.size
                ))
            })?;
        let path = || self.dir.join("data");
        let mut st = self.state.write().unwrap();
        let first = off / SECTOR;
        let last = (end - 1) / SECTOR;
        // Copy up partially covered sectors that still live in the base.
        let mut sec = vec![0u8; SECTOR as usize];
        let mut added = false;
        for s in [first, last] {
            let s_start = s * SECTOR;
            let s_end = (s_start + SECTOR).min(self.size);
            let covered = off <= s_start && end >= s_end;
            if !covered && !st.is_dirty(s) {
                let len = (s_end - s_start) as usize;
                self.read_base(&st, s_start, &mut sec[..len])?;
                self.data
                    .write_all_at(&sec[..len], s_start)
                    .ctx("write", &path())?;
                st.set_dirty(s);
                added = true;
            }
        }
        self.data.write_all_at(data, off).ctx("write", &path())?;
        for s in first..=last {
            if !st.is_dirty(s) {
                st.set_dirty(s);
                added = true;
            }
        }
        if added {
            self.map_changed.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Once per overlay made by `create`: the pin, then the base copy and meta.json, so that a
    /// durable overlay never depends on a pin that a crash could lose. Caller holds flush_lock.
    fn make_durable(&self) -> Result<()> {
        if self.durable.load(Ordering::Acquire) {
            return Ok(());
        }
        let pin = pin_path(&self.store, &self.dir);
        fsutil::fsync_file(&pin)?;
        fsutil::fsync_dir(pin.parent().unwrap_or(Path::new(".")))?;
        let base = self.state.read().unwrap().base_id;
        if let Some(id) = base {
            fsutil::fsync_file(&self.dir.join(format!("base.{}", id.to_hex())))?;
        }
        fsutil::fsync_file(&self.dir.join("meta.json"))?;
        fsutil::fsync_dir(&self.dir)?;
        self.durable.store(true, Ordering::Release);
        Ok(())
    }

    /// Make every completed write durable (data, then the dirty map).
    pub fn flush(&self) -> Result<()> {
        let _f = self.flush_lock.lock().unwrap();
        self.make_durable()?;
        let map = if self.map_changed.swap(false, Ordering::AcqRel) {
            let st = self.state.read().unwrap();
            Some(
                st.dirty
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
        } else {
            None
        };
        self.data.sync_data().ctx("fsync", &self.dir.join("data"))?;
        if let Some(map) = map {
            if let Err(e) =
                fsutil::write_durable(&fsutil::tmp_name(&self.dir), &self.dir.join("dirty"), &map)
            {
                self.map_changed.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Turn the current contents into a new blob sharing every unchanged chunk with the base.
    /// The overlay stays usable: it is rebased onto the new blob with an empty dirty map.
    pub fn commit(&self) -> Result<BlobId> {
        let _f = self.flush_lock.lock().unwrap();
        self.make_durable()?;
        let mut st = self.state.write().unwrap();
        let _gc = self.store.gc_lock(false)?;
        let cs = self.chunk_size as u64;
        let count = chunk_count(self.size, self.chunk_size) as usize;
        let sectors_per_chunk = cs / SECTOR;
        let new_len = |i: usize| (self.size - i as u64 * cs).min(cs) as usize;
        let local = &self.store.inner.local;
        let mut chunks: Vec<Option<ChunkId>> = Vec::with_capacity(count);
        let pack = local.writer()?;
        local.catch_up();
        let mut added = HashSet::new();
        let mut buf = vec![0u8; cs as usize];
        let mut enc = crate::frame::ChunkEncoder::new()?;
        let mut frame = Vec::new();
        let res = (|| {
            for i in 0..count {
                let first = i as u64 * sectors_per_chunk;
                let end_sector = (first + sectors_per_chunk).min(self.size.div_ceil(SECTOR));
                let reusable = !st.any_dirty(first, end_sector)
                    && st
                        .base
                        .as_ref()
                        .is_some_and(|b| i < b.chunks.len() && b.chunk_len(i) == new_len(i));
                if reusable {
                    chunks.push(st.base.as_ref().unwrap().chunks[i]);
                    continue;
                }
                if !st.any_dirty(first, end_sector)
                    && st.base.as_ref().is_none_or(|b| i >= b.chunks.len())
                {
                    chunks.push(None); // beyond the base and never written: zeros
                    continue;
                }
                let len = new_len(i);
                self.read_locked(&st, i as u64 * cs, &mut buf[..len])?;
                let data = &buf[..len];
                if is_zero(data) {
                    chunks.push(None);
                    continue;
                }
                let id = Digest::of(data);
                chunks.push(Some(id));
                if local.indexed(&id) || !added.insert(id) {
                    continue;
                }
                enc.encode(data, &mut frame)?;
                pack.add(&id, &frame)?;
                // Counted like put's chunk bytes, so callers can report what a commit stored.
                self.store
                    .inner
                    .stats
                    .bytes_written
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            Ok(())
        })();
        // On error, dropping the uncommitted pack removes it.
        res?;
        let new_chunks = crate::put::install_chunks(&self.store, pack)?;
        let m = Manifest {
            size: self.size,
            chunk_size: self.chunk_size,
            chunks,
        };
        let id = self.store.write_manifest(&m)?;
        debug!(dir = %self.dir.display(), blob = %id, new_chunks, "committed overlay");

        // Rebase: new base copy, then meta, then an empty dirty map, then drop the scratch data.
        // A crash in between leaves dirty sectors whose bytes equal the new base: still correct.
        let tmp = fsutil::tmp_name(&self.dir);
        fsutil::write_durable(
            &tmp,
            &self.dir.join(format!("base.{}", id.to_hex())),
            &m.to_bytes(),
        )?;
        let meta = Meta {
            base: Some(id),
            size: self.size,
            chunk_size: self.chunk_size,
        };
        fsutil::write_durable(
            &tmp,
            &self.dir.join("meta.json"),
            &serde_json::to_vec(&meta).unwrap(),
        )?;
        st.dirty.iter_mut().for_each(|w| *w = 0);
        fsutil::write_durable(
            &tmp,
            &self.dir.join("dirty"),
            &vec![0u8; st.dirty.len() * 8],
        )?;
        self.map_changed.store(false, Ordering::Release);
        punch_hole(&self.data, self.size);
        if let Some(old) = st.base_id.filter(|o| *o != id) {
            let _ = fsutil::remove_opt(&self.dir.join(format!("base.{}", old.to_hex())));
        }
        st.base_id = Some(id);
        st.base = Some(Arc::new(m));
        Ok(id)
    }

    /// Delete the overlay's scratch files and release its pin on the base.
    pub fn discard(self) -> Result<()> {
        fsutil::remove_opt(&pin_path(&self.store, &self.dir))?;
        remove_overlay_files(&self.dir)
    }
}

/// The base manifest: the copy in the overlay dir, else the store's.
fn load_base(store: &Store, dir: &Path, id: &BlobId) -> Result<Manifest> {
    if let Some(b) = fsutil::read_opt(&dir.join(format!("base.{}", id.to_hex())))? {
        if let Ok(m) = Manifest::from_bytes(id, &b) {
            return Ok(m);
        }
    }
    store.manifest(id)
}

/// Base manifests of a pinned overlay directory (for gc). `None` when the directory is gone.
pub(crate) fn pinned_bases(store: &Store, dir: &Path) -> Option<Vec<Manifest>> {
    let meta_b = std::fs::read(dir.join("meta.json")).ok()?;
    let mut out = Vec::new();
    // Keep every base copy present: a crash mid-rebase may leave two.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_prefix("base.")) else {
                continue;
            };
            if let (Ok(id), Ok(b)) = (hex.parse::<BlobId>(), std::fs::read(e.path())) {
                if let Ok(m) = Manifest::from_bytes(&id, &b) {
                    out.push(m);
                }
            }
        }
    }
    if let Ok(meta) = serde_json::from_slice::<Meta>(&meta_b) {
        if let Some(id) = meta.base {
            if let Ok(m) = store.manifest(&id) {
                out.push(m);
            }
        }
    }
    Some(out)
}

fn remove_overlay_files(dir: &Path) -> Result<()> {
    let rd = std::fs::read_dir(dir).ctx("read dir", dir)?;
    for e in rd.flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n == "meta.json"
            || n == "data"
            || n == "dirty"
            || n.starts_with("base.")
            || n.ends_with(".tmp")
        {
            fsutil::remove_opt(&e.path())?;
        }
    }
    // Only removes the directory if nothing else lives in it.
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Free the scratch file's blocks (best effort: a filesystem without hole punching keeps them).
fn punch_hole(f: &File, len: u64) {
    if len == 0 {
        return;
    }
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        )
    };
    if r != 0 {
        debug!("punch hole failed: {}", std::io::Error::last_os_error());
    }
}
