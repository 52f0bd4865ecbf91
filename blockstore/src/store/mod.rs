//! The [`Store`]: blobs, names, reads, export, verify, gc, push and pull.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::cache::{ChunkCache, ChunkData};
use crate::error::{Error, IoContext, Result};
use crate::frame::decode_chunk;
use crate::fsutil::{self, FileLock};
use crate::id::{BlobId, ChunkId, Digest};
use crate::local::LocalTier;
use crate::manifest::Manifest;
use crate::overlay::Overlay;
use crate::persist::Persister;
use crate::tier::RemoteTier;
use crate::PutOptions;

mod catalog;
mod export;
mod sync;

/// Tunables of a [`Store`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes of decompressed chunks kept in memory for fast repeated reads.
    pub cache_bytes: usize,
    /// Soft limit on the local tier's size (compressed bytes). When exceeded, gc and reads
    /// evict least recently used chunks that the remote also holds. `None` = unbounded.
    pub local_limit: Option<u64>,
    /// Remote gc deletes an unreferenced remote chunk only if it is older than this (a push
    /// from another host uploads chunks before its manifest).
    pub remote_gc_grace: Duration,
    /// Parallel uploads during push.
    pub push_parallelism: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        let env_mb = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        StoreOptions {
            cache_bytes: env_mb("KILN_STORE_CACHE_MB").unwrap_or(256) as usize * 1024 * 1024,
            local_limit: env_mb("KILN_STORE_LIMIT_MB").map(|m| m * 1024 * 1024),
            remote_gc_grace: Duration::from_secs(3600),
            push_parallelism: 16,
        }
    }
}

/// One blob in a listing.
#[derive(Clone, Debug, Serialize)]
pub struct BlobInfo {
    pub id: BlobId,
    pub names: Vec<String>,
    pub size: u64,
    pub chunk_size: u32,
    /// When the manifest was written locally (seconds since the epoch).
    pub created: u64,
}

/// Details of one blob.
#[derive(Clone, Debug, Serialize)]
pub struct BlobStat {
    pub id: BlobId,
    pub names: Vec<String>,
    pub size: u64,
    pub chunk_size: u32,
    /// Chunks in the manifest (including zero chunks).
    pub chunks: u64,
    /// All-zero chunks (stored as nothing).
    pub zero_chunks: u64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
    /// Distinct non-zero chunks present locally.
    pub local_chunks: u64,
    /// Compressed bytes of the local chunks.
    pub local_bytes: u64,
}

/// What [`Store::verify`] found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub blobs: u64,
    pub chunks_checked: u64,
    /// Chunks whose bytes do not match their hash (before repair).
    pub damaged: Vec<ChunkId>,
    /// Referenced chunks neither local nor known to be on the remote (before repair).
    pub missing: Vec<ChunkId>,
    /// Chunks re-fetched from the remote and now correct.
    pub repaired: Vec<ChunkId>,
    /// Referenced chunks only on the remote (fine: read lazily).
    pub remote_only: u64,
    /// Manifests that fail to parse or hash.
    pub corrupt_manifests: Vec<BlobId>,
    /// Files in `packs/` that are not complete packs or whose index does not match its hash.
    /// Chunks of an unreadable pack count as missing (`--repair` fetches them again); the
    /// file is left for inspection, never deleted by kiln.
    pub damaged_packs: Vec<PathBuf>,
    /// True when nothing is damaged or missing after repair.
    pub ok: bool,
}

/// What [`Store::gc`] removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub live_blobs: u64,
    pub chunks_removed: u64,
    pub bytes_freed: u64,
    pub tmp_files_removed: u64,
    pub stale_pins_removed: u64,
    /// Small packs merged into one.
    pub packs_merged: u64,
    /// Chunks evicted to honour the local limit (all held by the remote).
    pub chunks_evicted: u64,
    pub remote_chunks_removed: u64,
    /// Remote bundles whose blob's manifest is gone from the remote.
    pub remote_bundles_removed: u64,
}

/// What [`Store::push`] sent.
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    pub blob: BlobId,
    pub chunks: u64,
    pub chunks_uploaded: u64,
    /// Chunk and bundle bytes uploaded.
    pub bytes_uploaded: u64,
    /// Of `bytes_uploaded`, the bundle's (0: no bundle, too few chunks uploaded).
    pub bundle_bytes: u64,
}

/// Counters since the store was opened in this process.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub disk_chunk_reads: u64,
    /// Chunks fetched from the remote, by themselves or out of a bundle.
    pub remote_chunk_fetches: u64,
    /// Bytes received from the remote (a bundle's index and the gaps in its ranges included).
    pub remote_bytes_fetched: u64,
    /// Of `remote_chunk_fetches`, the chunks that came out of bundles.
    pub bundle_chunk_fetches: u64,
    /// GETs of bundles (an index, a byte range), found or not.
    pub bundle_requests: u64,
    /// Reads that waited for another thread's fetch of the same chunk instead of fetching.
    pub coalesced_waits: u64,
    pub integrity_errors: u64,
    pub chunks_written: u64,
    pub bytes_written: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) disk_chunk_reads: AtomicU64,
    pub(crate) remote_chunk_fetches: AtomicU64,
    pub(crate) remote_bytes_fetched: AtomicU64,
    pub(crate) bundle_chunk_fetches: AtomicU64,
    pub(crate) bundle_requests: AtomicU64,
    pub(crate) coalesced_waits: AtomicU64,
    pub(crate) integrity_errors: AtomicU64,
    pub(crate) chunks_written: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
}

/// A chunk load in progress; other readers of the same chunk wait on it.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Option<ChunkData>>>,
    cv: Condvar,
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) local: LocalTier,
    pub(crate) opts: StoreOptions,
    pub(crate) stats: Counters,
    cache: ChunkCache,
    remote: RwLock<Option<Arc<dyn RemoteTier>>>,
    inflight: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    manifests: Mutex<HashMap<BlobId, Arc<Manifest>>>,
    persist: Persister,
}

/// The block store. Cheap to clone (an `Arc` inside); share one per process.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner.dir.display())
    }
}

/// A readable view of one blob. Cheap to clone; `read_at` may be called from many threads.
#[derive(Clone)]
pub struct BlobReader {
    store: Store,
    id: BlobId,
    manifest: Arc<Manifest>,
}

impl BlobReader {
    /// The blob's id.
    pub fn id(&self) -> &BlobId {
        &self.id
    }
    /// The blob's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.manifest.size
    }
    /// True for an empty blob.
    pub fn is_empty(&self) -> bool {
        self.manifest.size == 0
    }
    /// Read up to `buf.len()` bytes at `off`; returns bytes read (0 at or past the end).
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.store.read_manifest_at(&self.manifest, off, buf)
    }
}

impl Store {
    /// Open the store in `dir`, creating it if missing.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with(dir, StoreOptions::default())
    }

    /// Open with explicit options.
    pub fn open_with(dir: &Path, opts: StoreOptions) -> Result<Store> {
        for sub in ["blobs", "names", "pins"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).ctx("create dir", &p)?;
        }
        let local = LocalTier::new(dir)?;
        if dir.join("chunks").is_dir() {
            let _gc = FileLock::acquire(&dir.join("gc.lock"), true)?;
            local.migrate_chunk_files(dir)?;
        }
        let persist = Persister::new(local.clone(), dir.join("gc.lock"));
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                local,
                cache: ChunkCache::new(opts.cache_bytes),
                opts,
                stats: Counters::default(),
                remote: RwLock::new(None),
                inflight: Mutex::new(HashMap::new()),
                manifests: Mutex::new(HashMap::new()),
                persist,
            }),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Attach a remote tier: enables lazy fetch of missing chunks, push, pull and repair.
    pub fn set_remote<R: RemoteTier + 'static>(&self, remote: Arc<R>) {
        *self.inner.remote.write().unwrap() = Some(remote);
    }

    /// Whether a remote tier is attached ([`Store::set_remote`]).
    pub fn has_remote(&self) -> bool {
        self.inner.remote.read().unwrap().is_some()
    }

    pub(crate) fn remote(&self) -> Option<Arc<dyn RemoteTier>> {
        self.inner.remote.read().unwrap().clone()
    }

    fn remote_or_err(&self) -> Result<Arc<dyn RemoteTier>> {
        self.remote().ok_or(Error::NoRemote)
    }

    pub(crate) fn gc_lock(&self, exclusive: bool) -> Result<FileLock> {
        FileLock::acquire(&self.inner.dir.join("gc.lock"), exclusive)
    }

    // ---------------------------------------------------------------- put

    /// Store a file as a blob.
    pub fn put_file(&self, path: &Path, opts: &PutOptions) -> Result<BlobId> {
        let f = File::open(path).ctx("open", path)?;
        crate::put::put(self, f, opts, None)
    }

    /// [`Store::put_file`] that calls `announce` with the blob's id once its chunks are
    /// durable and before its manifest is written: a caller that records the id there (a
    /// name made with [`Store::set_name_ahead`], a journal) never leaves a blob it does not
    /// know of, whenever it is killed. An error from `announce` ends the put.
    pub fn put_file_announced(
        &self,
        path: &Path,
        opts: &PutOptions,
        announce: &crate::Announce<'_>,
    ) -> Result<BlobId> {
        let f = File::open(path).ctx("open", path)?;
        crate::put::put(self, f, opts, Some(announce))
    }

    /// [`Store::put_bytes`] with an announce hook, as [`Store::put_file_announced`].
    pub fn put_bytes_announced(
        &self,
        data: &[u8],
        opts: &PutOptions,
        announce: &crate::Announce<'_>,
    ) -> Result<BlobId> {
        crate::put::put(self, data, opts, Some(announce))
    }

    /// Store bytes as a blob.
    pub fn put_bytes(&self, data: &[u8], opts: &PutOptions) -> Result<BlobId> {
        crate::put::put(self, data, opts, None)
    }

    /// Store everything `r` yields as a blob.
    pub fn put_reader(&self, r: impl Read, opts: &PutOptions) -> Result<BlobId> {
        crate::put::put(self, r, opts, None)
    }

    /// [`Store::put_reader`] with an announce hook, as [`Store::put_file_announced`].
    pub fn put_reader_announced(
        &self,
        r: impl Read,
        opts: &PutOptions,
        announce: &crate::Announce<'_>,
    ) -> Result<BlobId> {
        crate::put::put(self, r, opts, Some(announce))
    }

    /// Store a blob of `size` bytes whose chunks are already in memory, reading them in place:
    /// `chunk(i)` is chunk `i` (the chunk size of `opts`, the last one possibly shorter) or
    /// `None` when it is all zeros. Called from several threads at once.
    pub fn put_chunks<'a>(
        &self,
        size: u64,
        opts: &PutOptions,
        chunk: impl Fn(usize) -> Option<&'a [u8]> + Sync,
    ) -> Result<BlobId> {
        crate::put::put_chunks(self, size, opts, &chunk)
    }

    /// Make `m` visible (its chunks must already be durable). Returns its id.
    pub(crate) fn write_manifest(&self, m: &Manifest) -> Result<BlobId> {
        let bytes = m.to_bytes();
        let id = Digest::of(&bytes);
        let dst = self.manifest_path(&id);
        if !dst.exists() {
            fsutil::write_durable(&fsutil::tmp_name(&self.inner.local.tmp), &dst, &bytes)?;
        }
        Ok(id)
    }

    fn manifest_path(&self, id: &BlobId) -> PathBuf {
        self.inner.dir.join("blobs").join(id.to_hex())
    }

    // ---------------------------------------------------------------- blobs and names

    /// A blob's manifest.
    pub fn manifest(&self, id: &BlobId) -> Result<Manifest> {
        Ok((*self.manifest_arc(id)?).clone())
    }

    pub(crate) fn manifest_arc(&self, id: &BlobId) -> Result<Arc<Manifest>> {
        if let Some(m) = self.inner.manifests.lock().unwrap().get(id) {
            return Ok(m.clone());
        }
        let p = self.manifest_path(id);
        let bytes = fsutil::read_opt(&p)?.ok_or_else(|| Error::NotFound(format!("blob {id}")))?;
        let m = Arc::new(Manifest::from_bytes(id, &bytes)?);
        let mut cache = self.inner.manifests.lock().unwrap();
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(*id, m.clone());
        Ok(m)
    }

    /// True when the blob's manifest is in the local store.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.manifest_path(id).exists()
    }

    /// A reader for a blob.
    pub fn open_blob(&self, id: &BlobId) -> Result<BlobReader> {
        Ok(BlobReader {
            store: self.clone(),
            id: *id,
            manifest: self.manifest_arc(id)?,
        })
    }

    /// Read from a blob at `off`; returns bytes read (short only at the end).
    pub fn read_at(&self, id: &BlobId, off: u64, buf: &mut [u8]) -> Result<usize> {
        let m = self.manifest_arc(id)?;
        self.read_manifest_at(&m, off, buf)
    }

    pub(crate) fn read_manifest_at(&self, m: &Manifest, off: u64, buf: &mut [u8]) -> Result<usize> {
        if off >= m.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(m.size - off) as usize;
        let cs = m.chunk_size as u64;
        let mut done = 0;
        while done < n {
            let pos = off + done as u64;
            let idx = (pos / cs) as usize;
            let within = (pos % cs) as usize;
            let take = (cs as usize - within).min(n - done);
            let dst = &mut buf[done..done + take];
            match &m.chunks[idx] {
                None => dst.fill(0),
                Some(cid) => {
                    let data = self.chunk(cid, m.chunk_len(idx))?;
                    let src = data.get(within..within + take).ok_or(Error::Integrity {
                        chunk: *cid,
                        location: None,
                    })?;
                    dst.copy_from_slice(src);
                }
            }
            done += take;
        }
        Ok(n)
    }

    /// The plain bytes of a chunk: memory cache, else local tier, else remote; concurrent
    /// loads of one chunk are coalesced into one.
    pub(crate) fn chunk(&self, id: &ChunkId, max_len: usize) -> Result<ChunkData> {
        let st = &self.inner.stats;
        if let Some(d) = self.inner.cache.get(id) {
            st.cache_hits.fetch_add(1, Relaxed);
            return Ok(d);
        }
        st.cache_misses.fetch_add(1, Relaxed);
        let (flight, leader) = {
            let mut inflight = self.inner.inflight.lock().unwrap();
            match inflight.get(id) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    inflight.insert(*id, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            st.coalesced_waits.fetch_add(1, Relaxed);
            let mut done = flight.done.lock().unwrap();
            while done.is_none() {
                done = flight.cv.wait(done).unwrap();
            }
            if let Some(Some(d)) = done.as_ref() {
                return Ok(d.clone());
            }
            drop(done);
            // The leader failed: load ourselves so we return our own precise error.
            return self.load_chunk(id, max_len);
        }
        let res = self.load_chunk(id, max_len);
        *flight.done.lock().unwrap() = Some(res.as_ref().ok().cloned());
        flight.cv.notify_all();
        self.inner.inflight.lock().unwrap().remove(id);
        res
    }

    fn load_chunk(&self, id: &ChunkId, max_len: usize) -> Result<ChunkData> {
        let st = &self.inner.stats;
        let data = match self.inner.local.read_frame(id)? {
            Some((frame, at)) => {
                st.disk_chunk_reads.fetch_add(1, Relaxed);
                decode_chunk(id, &frame, max_len, Some(&at)).inspect_err(|_| {
                    st.integrity_errors.fetch_add(1, Relaxed);
                    warn!(chunk = %id, at = %at, "integrity error in local chunk");
                })?
            }
            None => self.fetch_chunk(id, max_len)?,
        };
        let data = Arc::new(data);
        self.inner.cache.insert(*id, data.clone());
        Ok(data)
    }

    /// Fetch a chunk from the remote, verify it and keep it in the local tier.
    fn fetch_chunk(&self, id: &ChunkId, max_len: usize) -> Result<Vec<u8>> {
        let st = &self.inner.stats;
        let remote = self.remote().ok_or_else(|| Error::MissingChunk {
            chunk: *id,
            reason: "no remote is configured".into(),
        })?;
        let frame = match remote.get_chunk(id) {
            Ok(f) => f,
            Err(Error::NotFound(_)) => {
                return Err(Error::MissingChunk {
                    chunk: *id,
                    reason: format!("{} does not have it", remote.describe()),
                })
            }
            Err(e) => return Err(e),
        };
        st.remote_chunk_fetches.fetch_add(1, Relaxed);
        st.remote_bytes_fetched
            .fetch_add(frame.len() as u64, Relaxed);
        let plain = decode_chunk(id, &frame, max_len, None).inspect_err(|_| {
            st.integrity_errors.fetch_add(1, Relaxed);
            warn!(chunk = %id, remote = %remote.describe(), "integrity error in fetched chunk");
        })?;
        debug!(chunk = %id, bytes = frame.len(), "fetched chunk");
        self.inner.persist.submit(*id, frame);
        self.note_remote_has(&[*id])?;
        let n = st.remote_chunk_fetches.load(Relaxed);
        if self.inner.opts.local_limit.is_some() && n.is_multiple_of(64) {
            if let Err(e) = crate::maint::trim(self) {
                warn!("trimming the local tier failed: {e}");
            }
        }
        Ok(plain)
    }

    // ---------------------------------------------------------------- overlays

    /// Create a writable overlay over `base` (or an empty disk of `size` bytes), with its
    /// scratch files in `dir` (created; must not already hold an overlay).
    pub fn create_overlay(&self, base: Option<&BlobId>, size: u64, dir: &Path) -> Result<Overlay> {
        Overlay::create(self, base, size, dir)
    }

    /// Reopen an overlay directory (e.g. after a VMM restart).
    pub fn open_overlay(&self, dir: &Path) -> Result<Overlay> {
        Overlay::open(self, dir)
    }

    pub(crate) fn pins_dir(&self) -> PathBuf {
        self.inner.dir.join("pins")
    }

    /// Counters since open.
    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.stats;
        StoreStats {
            cache_hits: c.cache_hits.load(Relaxed),
            cache_misses: c.cache_misses.load(Relaxed),
            disk_chunk_reads: c.disk_chunk_reads.load(Relaxed),
            remote_chunk_fetches: c.remote_chunk_fetches.load(Relaxed),
            remote_bytes_fetched: c.remote_bytes_fetched.load(Relaxed),
            bundle_chunk_fetches: c.bundle_chunk_fetches.load(Relaxed),
            bundle_requests: c.bundle_requests.load(Relaxed),
            coalesced_waits: c.coalesced_waits.load(Relaxed),
            integrity_errors: c.integrity_errors.load(Relaxed),
            chunks_written: c.chunks_written.load(Relaxed),
            bytes_written: c.bytes_written.load(Relaxed),
        }
    }

    /// Forget every decompressed chunk held in memory (benchmarks: measure disk reads).
    pub fn drop_memory_cache(&self) {
        self.inner.cache.clear();
    }

    // ---------------------------------------------------------------- verify / gc

    /// Re-check every manifest and every local chunk; with `repair`, re-fetch damaged or
    /// missing chunks from the remote.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport> {
        self.inner.persist.wait();
        crate::maint::verify(self, repair)
    }

    /// Remove chunks no visible blob (or live overlay) references; with `remote_too`, also
    /// unreferenced remote chunks older than the grace period.
    pub fn gc(&self, remote_too: bool) -> Result<GcReport> {
        self.inner.persist.wait();
        crate::maint::gc(self, remote_too)
    }

    /// Evict chunks the remote also holds until the local tier is under
    /// [`StoreOptions::local_limit`]. Returns how many chunks were evicted.
    pub fn trim(&self) -> Result<u64> {
        self.inner.persist.wait();
        crate::maint::trim(self)
    }

    /// Where the local tier keeps a chunk (`None` when it is not local): for diagnostics and
    /// for tests that damage a store on purpose.
    pub fn local_chunk(&self, id: &ChunkId) -> Option<crate::ChunkLocation> {
        self.inner.persist.wait();
        self.inner.local.location(id)
    }

    /// Drop chunks from the local tier (a remote may still hold them); returns how many
    /// were removed. Packs holding them are rewritten without them.
    pub fn evict_local(&self, ids: &[ChunkId]) -> Result<u64> {
        self.inner.persist.wait();
        let _lock = self.gc_lock(false)?;
        let ids: HashSet<ChunkId> = ids.iter().copied().collect();
        for id in &ids {
            self.inner.cache.remove(id);
        }
        Ok(self.inner.local.remove(&ids)?.0)
    }

    pub(crate) fn cache(&self) -> &ChunkCache {
        &self.inner.cache
    }

    pub(crate) fn remote_known_set(&self) -> Result<HashSet<ChunkId>> {
        self.remote_known()
    }
}

/// True when every byte is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    // SAFETY: reinterpreting initialized bytes as u128 is valid for any bit pattern.
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0)
        && post.iter().all(|&x| x == 0)
        && mid.iter().fold(0u128, |a, &x| a | x) == 0
}
