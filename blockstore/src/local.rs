//! The local tier: chunk frames in pack files under `packs/` (see [`crate::pack`]), found
//! through an in-memory index of every pack. Packs are immutable: removing chunks rewrites a
//! pack without them. Other processes add and rewrite packs too, so the index rescans `packs/`
//! when its mtime moved, and always before it reports a chunk missing to a reader.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tracing::{info, warn};

use crate::error::{Error, IoContext, Result};
use crate::id::{ChunkId, Digest};
use crate::pack::{self, Entry, PackWriter};

/// Where the local tier keeps one chunk's frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The pack file.
    pub path: PathBuf,
    /// Byte offset of the frame in it.
    pub offset: u64,
    /// Length of the frame (compressed bytes).
    pub len: u64,
}

impl std::fmt::Display for ChunkLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.path.display(), self.offset)
    }
}

/// One pack as eviction sees it.
pub(crate) struct PackInfo {
    pub(crate) path: PathBuf,
    pub(crate) accessed: SystemTime,
    /// (chunk, stored size) of each frame.
    pub(crate) chunks: Vec<(ChunkId, u64)>,
}

#[derive(Clone)]
pub(crate) struct LocalTier {
    packs: PathBuf,
    pub(crate) tmp: PathBuf,
    index: Arc<RwLock<Index>>,
}

/// Open file handles kept for reads; past this many, all are closed and reopened on demand.
const MAX_OPEN_PACKS: usize = 128;

struct Pack {
    path: PathBuf,
    entries: Vec<Entry>,
    file: Option<Arc<File>>,
}

#[derive(Default)]
struct Index {
    loaded: bool,
    /// mtime of `packs/` at the last scan.
    stamp: Option<SystemTime>,
    packs: HashMap<String, Pack>,
    /// Files in `packs/` that are not complete packs (reported by verify, never deleted).
    bad: HashSet<String>,
    chunks: HashMap<ChunkId, (Arc<str>, u32), IdHashing>,
    open_files: usize,
}

/// Hashing for chunk ids in the index: they are blake3 digests, so 8 of their bytes, mixed
/// with a per-process key (crafted content cannot aim at buckets it cannot predict), are as
/// good a hash as SipHash over all 32 and several times cheaper; loading a large store's index
/// is mostly these insertions.
#[derive(Clone)]
struct IdHashing(u64);

impl Default for IdHashing {
    fn default() -> Self {
        let key = std::collections::hash_map::RandomState::new();
        IdHashing(std::hash::BuildHasher::hash_one(&key, 0u64) | 1)
    }
}

impl std::hash::BuildHasher for IdHashing {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut w = [0u8; 8];
        let n = bytes.len().min(8);
        w[..n].copy_from_slice(&bytes[..n]);
        self.0 = (self.0 ^ u64::from_le_bytes(w)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, _: usize) {} // the id's length prefix: always 32
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

impl Index {
    fn add(&mut self, name: &str, path: PathBuf, entries: Vec<Entry>) {
        let key: Arc<str> = Arc::from(name);
        for (i, e) in entries.iter().enumerate() {
            self.chunks
                .entry(e.id)
                .or_insert_with(|| (key.clone(), i as u32));
        }
        self.packs.insert(
            name.to_string(),
            Pack {
                path,
                entries,
                file: None,
            },
        );
    }

    fn lookup(&self, id: &ChunkId) -> Option<(&Pack, Entry)> {
        let (name, i) = self.chunks.get(id)?;
        let p = self.packs.get(&**name)?;
        Some((p, p.entries[*i as usize]))
    }

    fn rebuild(&mut self) {
        self.chunks.clear();
        let packs = std::mem::take(&mut self.packs);
        for (name, p) in packs {
            self.add(&name, p.path, p.entries);
        }
        self.open_files = 0;
    }
}

impl LocalTier {
    pub(crate) fn new(dir: &Path) -> Result<LocalTier> {
        let t = LocalTier {
            packs: dir.join("packs"),
            tmp: dir.join("tmp"),
            index: Arc::default(),
        };
        for d in [&t.tmp, &t.packs] {
            std::fs::create_dir_all(d).ctx("create dir", d)?;
        }
        Ok(t)
    }

    /// A writer for a new pack in this tier; [`LocalTier::commit`] makes it visible.
    pub(crate) fn writer(&self) -> Result<PackWriter> {
        PackWriter::create(&self.tmp)
    }

    /// Make a pack durable and visible. Returns how many frames it holds.
    pub(crate) fn commit(&self, w: PackWriter) -> Result<usize> {
        let Some((path, entries)) = w.commit(&self.packs)? else {
            return Ok(0);
        };
        let n = entries.len();
        let name = pack_name(&path);
        let mut ix = self.index.write().unwrap();
        if !ix.packs.contains_key(&name) {
            ix.add(&name, path, entries);
        }
        Ok(n)
    }

    /// Store frames durably as one pack (frames already present are skipped).
    pub(crate) fn store(&self, frames: &[(ChunkId, Vec<u8>)]) -> Result<usize> {
        let w = self.writer()?;
        self.catch_up();
        for (id, frame) in frames {
            if !self.indexed(id) {
                w.add(id, frame)?;
            }
        }
        self.commit(w)
    }

    /// Rescan `packs/`: always when `force`, else only when its mtime moved.
    fn refresh(&self, force: bool) -> Result<()> {
        let stamp = std::fs::metadata(&self.packs)
            .and_then(|m| m.modified())
            .ctx("stat", &self.packs)?;
        {
            let ix = self.index.read().unwrap();
            if ix.loaded && !force && ix.stamp == Some(stamp) {
                return Ok(());
            }
        }
        let mut present = HashSet::new();
        for e in std::fs::read_dir(&self.packs).ctx("read dir", &self.packs)? {
            let e = e.ctx("read dir", &self.packs)?;
            if let Some(name) = e.file_name().to_str() {
                if name.ends_with(".pack") {
                    present.insert(name.to_string());
                }
            }
        }
        let new: Vec<String> = {
            let ix = self.index.read().unwrap();
            present
                .iter()
                .filter(|n| !ix.packs.contains_key(*n) && !ix.bad.contains(*n))
                .cloned()
                .collect()
        };
        // Read new indexes without holding the lock.
        let mut loaded = Vec::new();
        for name in new {
            let path = self.packs.join(&name);
            match pack::read_index(&path, false)? {
                pack::Index::Gone => {}
                pack::Index::Entries(entries) => loaded.push((name, path, Some(entries))),
                pack::Index::Bad => {
                    warn!(path = %path.display(), "not a complete pack; its chunks count as missing");
                    loaded.push((name, path, None));
                }
            }
        }
        let mut ix = self.index.write().unwrap();
        let before = ix.packs.len();
        ix.packs.retain(|n, _| present.contains(n));
        ix.bad.retain(|n| present.contains(n));
        if ix.packs.len() != before {
            ix.rebuild();
        }
        let adding: usize = loaded
            .iter()
            .map(|(_, _, e)| e.as_ref().map_or(0, Vec::len))
            .sum();
        ix.chunks.reserve(adding);
        for (name, path, entries) in loaded {
            match entries {
                Some(e) if !ix.packs.contains_key(&name) => ix.add(&name, path, e),
                Some(_) => {}
                None => {
                    ix.bad.insert(name);
                }
            }
        }
        ix.loaded = true;
        ix.stamp = Some(stamp);
        Ok(())
    }

    /// Picks up packs other processes added since the last look (when `packs/` changed).
    pub(crate) fn catch_up(&self) {
        let _ = self.refresh(false);
    }

    /// True when the chunk is in a pack this process has indexed (call
    /// [`LocalTier::catch_up`] once before a batch of lookups). May miss a pack another process
    /// added since: callers use it to skip duplicate writes, where a miss costs only space.
    pub(crate) fn indexed(&self, id: &ChunkId) -> bool {
        self.index.read().unwrap().chunks.contains_key(id)
    }

    /// Where a chunk's frame is stored, if it is local.
    pub(crate) fn location(&self, id: &ChunkId) -> Option<ChunkLocation> {
        for force in [false, true] {
            if self.refresh(force).is_err() {
                return None;
            }
            if let Some((p, e)) = self.index.read().unwrap().lookup(id) {
                return Some(ChunkLocation {
                    path: p.path.clone(),
                    offset: e.offset,
                    len: e.len as u64,
                });
            }
        }
        None
    }

    /// The stored frame and where it is, or None when the chunk is not local.
    pub(crate) fn read_frame(&self, id: &ChunkId) -> Result<Option<(Vec<u8>, ChunkLocation)>> {
        // A miss or a vanished pack (another process rewrote it) rescans and tries once more.
        for attempt in 0..2 {
            self.refresh(attempt > 0)?;
            let found = {
                let ix = self.index.read().unwrap();
                ix.lookup(id)
                    .map(|(p, e)| (p.path.clone(), e, p.file.clone()))
            };
            let Some((path, e, file)) = found else {
                continue;
            };
            let file = match file {
                Some(f) => f,
                None => match File::open(&path) {
                    Ok(f) => self.keep_open(&path, f),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(Error::io("open", &path, err)),
                },
            };
            let mut frame = vec![0u8; e.len as usize];
            file.read_exact_at(&mut frame, e.offset)
                .ctx("read", &path)?;
            let loc = ChunkLocation {
                path,
                offset: e.offset,
                len: e.len as u64,
            };
            return Ok(Some((frame, loc)));
        }
        Ok(None)
    }

    fn keep_open(&self, path: &Path, f: File) -> Arc<File> {
        let f = Arc::new(f);
        let mut ix = self.index.write().unwrap();
        if ix.open_files >= MAX_OPEN_PACKS {
            for p in ix.packs.values_mut() {
                p.file = None;
            }
            ix.open_files = 0;
        }
        if let Some(p) = ix.packs.get_mut(&pack_name(path)) {
            if p.file.is_none() {
                p.file = Some(f.clone());
                ix.open_files += 1;
            }
        }
        f
    }

    /// Every local chunk with its stored size (each chunk once).
    pub(crate) fn list(&self) -> Result<Vec<(ChunkId, u64)>> {
        self.refresh(true)?;
        let ix = self.index.read().unwrap();
        Ok(ix
            .chunks
            .iter()
            .map(|(id, (name, i))| (*id, ix.packs[&**name].entries[*i as usize].len as u64))
            .collect())
    }

    /// Every pack, for eviction.
    pub(crate) fn packs(&self) -> Result<Vec<PackInfo>> {
        Ok(self
            .packs_where(|_| true)?
            .into_iter()
            .map(|(path, entries)| PackInfo {
                accessed: std::fs::metadata(&path)
                    .and_then(|m| m.accessed())
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                path,
                chunks: entries.iter().map(|e| (e.id, e.len as u64)).collect(),
            })
            .collect())
    }

    /// The packs (path and entries, after a rescan) whose entries `keep` accepts.
    fn packs_where(&self, keep: impl Fn(&[Entry]) -> bool) -> Result<Vec<(PathBuf, Vec<Entry>)>> {
        self.refresh(true)?;
        let ix = self.index.read().unwrap();
        Ok(ix
            .packs
            .values()
            .filter(|p| keep(&p.entries))
            .map(|p| (p.path.clone(), p.entries.clone()))
            .collect())
    }

    /// Files in `packs/` that are not complete packs, or whose index does not match the hash
    /// in their footer.
    pub(crate) fn damaged_packs(&self) -> Result<Vec<PathBuf>> {
        self.refresh(true)?;
        let (paths, mut out): (Vec<PathBuf>, Vec<PathBuf>) = {
            let ix = self.index.read().unwrap();
            (
                ix.packs.values().map(|p| p.path.clone()).collect(),
                ix.bad.iter().map(|n| self.packs.join(n)).collect(),
            )
        };
        for p in paths {
            if let pack::Index::Bad = pack::read_index(&p, true)? {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Delete whole pack files.
    pub(crate) fn remove_packs(&self, paths: &[PathBuf]) -> Result<()> {
        for p in paths {
            crate::fsutil::remove_opt(p)?;
        }
        if !paths.is_empty() {
            crate::fsutil::fsync_dir(&self.packs)?;
            self.refresh(true)?;
        }
        Ok(())
    }

    /// Drop chunks from the local tier: each pack holding one is rewritten without it (the
    /// new pack is durable before the old one goes). Returns (chunks removed, bytes freed).
    pub(crate) fn remove(&self, ids: &HashSet<ChunkId>) -> Result<(u64, u64)> {
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let affected = self.packs_where(|es| es.iter().any(|e| ids.contains(&e.id)))?;
        let (mut removed, mut freed) = (HashSet::new(), 0u64);
        let mut doomed = Vec::new();
        for (path, entries) in affected {
            let (gone, keep): (Vec<Entry>, Vec<Entry>) =
                entries.into_iter().partition(|e| ids.contains(&e.id));
            if !keep.is_empty() {
                let w = self.writer()?;
                if !copy_frames(&path, keep.iter(), &w)? {
                    continue; // another process rewrote it meanwhile
                }
                self.commit(w)?;
            }
            freed += gone.iter().map(|e| e.len as u64).sum::<u64>();
            removed.extend(gone.iter().map(|e| e.id));
            doomed.push(path);
        }
        self.remove_packs(&doomed)?;
        Ok((removed.len() as u64, freed))
    }

    /// Merge the packs smaller than `small` bytes into one when there are at least `at_least`
    /// of them (each put and each batch of fetched chunks makes a pack; fewer packs keep
    /// opening the store cheap). Returns how many packs were merged. The caller holds the gc
    /// lock exclusively.
    pub(crate) fn merge_small_packs(&self, small: u64, at_least: usize) -> Result<usize> {
        let packs = self.packs_where(|es| es.iter().map(|e| e.len as u64).sum::<u64>() < small)?;
        if packs.len() < at_least {
            return Ok(0);
        }
        let w = self.writer()?;
        let mut seen = HashSet::new();
        for (path, entries) in &packs {
            copy_frames(path, entries.iter().filter(|e| seen.insert(e.id)), &w)?;
        }
        self.commit(w)?;
        let paths: Vec<PathBuf> = packs.into_iter().map(|(p, _)| p).collect();
        self.remove_packs(&paths)?;
        Ok(paths.len())
    }

    /// Move chunk files of the layout before packs (`chunks/ab/<hex>`) into one pack.
    /// The caller holds the gc lock exclusively.
    pub(crate) fn migrate_chunk_files(&self, dir: &Path) -> Result<u64> {
        let old = dir.join("chunks");
        if !old.is_dir() {
            return Ok(0);
        }
        let w = self.writer()?;
        for sub in std::fs::read_dir(&old).ctx("read dir", &old)? {
            let sub = sub.ctx("read dir", &old)?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&sub).ctx("read dir", &sub)? {
                let f = f.ctx("read dir", &sub)?.path();
                let id = f
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::parse::<Digest>);
                if let Some(Ok(id)) = id {
                    let frame = std::fs::read(&f).ctx("read", &f)?;
                    w.add(&id, &frame)?;
                }
            }
        }
        let n = self.commit(w)?;
        std::fs::remove_dir_all(&old).ctx("remove", &old)?;
        info!(chunks = n, "moved chunk files into a pack");
        Ok(n as u64)
    }
}

/// Copies frames of the pack at `path` into `w`; false when the pack is gone.
fn copy_frames<'a>(
    path: &Path,
    entries: impl Iterator<Item = &'a Entry>,
    w: &PackWriter,
) -> Result<bool> {
    let src = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    for e in entries {
        let mut frame = vec![0u8; e.len as usize];
        src.read_exact_at(&mut frame, e.offset).ctx("read", path)?;
        w.add(&e.id, &frame)?;
    }
    Ok(true)
}

fn pack_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string()
}
