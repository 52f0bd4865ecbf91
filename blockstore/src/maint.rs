//! Store maintenance: verify (and repair), garbage collection and local-cache trimming.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::{info, warn};

use crate::error::{Error, IoContext, Result};
use crate::frame::decode_chunk;
use crate::fsutil;
use crate::id::ChunkId;
use crate::local::PackInfo;
use crate::manifest::Manifest;
use crate::overlay::pinned_bases;
use crate::store::{GcReport, Store, VerifyReport};
use crate::MAX_CHUNK_SIZE;

/// gc merges the packs under this size once there are this many of them.
const SMALL_PACK: u64 = 4 << 20;
const MERGE_SMALL_PACKS_AT: usize = 16;

/// Manifests of every visible blob; errors for the ones that do not parse.
fn all_manifests(store: &Store) -> Result<(Vec<Manifest>, Vec<crate::BlobId>)> {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for id in store.blob_ids()? {
        match store.manifest(&id) {
            Ok(m) => ok.push(m),
            Err(Error::CorruptManifest { .. }) => bad.push(id),
            Err(Error::NotFound(_)) => {} // removed meanwhile
            Err(e) => return Err(e),
        }
    }
    Ok((ok, bad))
}

/// Base manifests of live overlays; removes pins whose directory is gone when `prune`.
fn pinned(store: &Store, prune: bool) -> Result<(Vec<Manifest>, u64)> {
    let dir = store.pins_dir();
    let mut out = Vec::new();
    let mut stale = 0;
    for e in std::fs::read_dir(&dir).ctx("read dir", &dir)? {
        let e = e.ctx("read dir", &dir)?;
        let Ok(target) = std::fs::read(e.path()) else {
            continue;
        };
        let target = PathBuf::from(String::from_utf8_lossy(&target).into_owned());
        match pinned_bases(store, &target) {
            Some(ms) => out.extend(ms),
            None => {
                if prune {
                    fsutil::remove_opt(&e.path())?;
                    stale += 1;
                }
            }
        }
    }
    Ok((out, stale))
}

fn referenced(ms: &[Manifest]) -> HashSet<ChunkId> {
    ms.iter()
        .flat_map(|m| m.chunks.iter().flatten().copied())
        .collect()
}

/// Check one local chunk: Ok(true) good, Ok(false) damaged.
fn check_local(store: &Store, id: &ChunkId) -> Result<Option<bool>> {
    let Some((frame, _)) = store.inner.local.read_frame(id)? else {
        return Ok(None);
    };
    Ok(Some(
        decode_chunk(id, &frame, MAX_CHUNK_SIZE as usize, None).is_ok(),
    ))
}

/// Fetch a chunk from the remote and verify it.
fn refetch(store: &Store, id: &ChunkId) -> Result<Vec<u8>> {
    let remote = store.remote().ok_or(Error::NoRemote)?;
    let frame = remote.get_chunk(id)?;
    decode_chunk(id, &frame, MAX_CHUNK_SIZE as usize, None)?;
    Ok(frame)
}

pub(crate) fn verify(store: &Store, repair: bool) -> Result<VerifyReport> {
    let _lock = store.gc_lock(false)?;
    let (mut ms, corrupt) = all_manifests(store)?;
    let blobs = ms.len() as u64 + corrupt.len() as u64;
    ms.extend(pinned(store, false)?.0);
    let refs = referenced(&ms);
    let local = store.inner.local.list()?;
    let local_set: HashSet<ChunkId> = local.iter().map(|(id, _)| *id).collect();

    // Decode every local chunk, on all cores.
    let next = AtomicUsize::new(0);
    let damaged: Mutex<Vec<ChunkId>> = Mutex::default();
    let first_err: Mutex<Option<Error>> = Mutex::default();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Relaxed);
                let Some((id, _)) = local.get(i) else { return };
                match check_local(store, id) {
                    Ok(Some(false)) => damaged.lock().unwrap().push(*id),
                    Ok(_) => {}
                    Err(e) => {
                        first_err.lock().unwrap().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap() {
        return Err(e);
    }
    let mut damaged = damaged.into_inner().unwrap();
    damaged.sort();

    let known = store.remote_known_set()?;
    let mut missing = Vec::new();
    let mut remote_only = Vec::new();
    for id in &refs {
        if !local_set.contains(id) {
            if known.contains(id) {
                remote_only.push(*id);
            } else {
                missing.push(*id);
            }
        }
    }
    // With a remote at hand, confirm it really holds the chunks we only have there.
    if let (Some(remote), false) = (store.remote(), remote_only.is_empty()) {
        let have = remote.has_chunks(&remote_only)?;
        let (present, absent): (Vec<_>, Vec<_>) =
            remote_only.iter().zip(have).partition(|(_, h)| *h);
        missing.extend(absent.into_iter().map(|(id, _)| *id));
        remote_only = present.into_iter().map(|(id, _)| *id).collect();
    }
    missing.sort();

    let mut repaired = Vec::new();
    let mut unrepaired = 0usize;
    if repair {
        // Fresh copies of the referenced chunks go into one pack; damaged copies (unused ones
        // just go) are dropped in one pass, so each pack holding some is rewritten once.
        let fresh = store.inner.local.writer()?;
        let mut drop: HashSet<ChunkId> = HashSet::new();
        for id in damaged.iter().chain(missing.iter()) {
            if !refs.contains(id) {
                drop.insert(*id);
                continue;
            }
            match refetch(store, id) {
                Ok(frame) => {
                    fresh.add(id, &frame)?;
                    drop.insert(*id);
                    repaired.push(*id);
                }
                Err(e) => {
                    warn!(chunk = %id, "cannot repair: {e}");
                    unrepaired += 1;
                }
            }
        }
        store.inner.local.remove(&drop)?;
        store.inner.local.commit(fresh)?;
        for id in &drop {
            store.cache().remove(id);
        }
    } else {
        unrepaired = damaged.len() + missing.len();
    }
    let damaged_packs = store.inner.local.damaged_packs()?;
    for p in &damaged_packs {
        warn!(pack = %p.display(), "pack index does not match its hash");
    }
    let report = VerifyReport {
        blobs,
        chunks_checked: local.len() as u64,
        ok: unrepaired == 0 && corrupt.is_empty() && damaged_packs.is_empty(),
        damaged_packs,
        damaged,
        missing,
        repaired,
        remote_only: remote_only.len() as u64,
        corrupt_manifests: corrupt,
    };
    info!(
        ok = report.ok,
        checked = report.chunks_checked,
        damaged = report.damaged.len(),
        missing = report.missing.len(),
        repaired = report.repaired.len(),
        "verify"
    );
    Ok(report)
}

pub(crate) fn gc(store: &Store, remote_too: bool) -> Result<GcReport> {
    let _lock = store.gc_lock(true)?;
    let mut report = GcReport::default();
    let (mut ms, corrupt) = all_manifests(store)?;
    if let Some(id) = corrupt.first() {
        return Err(Error::CorruptManifest {
            blob: *id,
            reason:
                "gc cannot know which chunks it needs; remove the blob or repair the store first"
                    .into(),
        });
    }
    report.live_blobs = ms.len() as u64;
    let (pinned, stale) = pinned(store, true)?;
    report.stale_pins_removed = stale;
    ms.extend(pinned);
    let refs = referenced(&ms);

    let dead: HashSet<ChunkId> = store
        .inner
        .local
        .list()?
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !refs.contains(id))
        .collect();
    let (removed, freed) = store.inner.local.remove(&dead)?;
    report.chunks_removed = removed;
    report.bytes_freed = freed;
    for id in &dead {
        store.cache().remove(id);
    }
    report.packs_merged = store
        .inner
        .local
        .merge_small_packs(SMALL_PACK, MERGE_SMALL_PACKS_AT)? as u64;
    // No writer holds the lock, so every tmp file is an orphan of a crashed writer.
    let tmp = &store.inner.local.tmp;
    for e in std::fs::read_dir(tmp).ctx("read dir", tmp)?.flatten() {
        if fsutil::remove_opt(&e.path())? {
            report.tmp_files_removed += 1;
        }
    }

    if remote_too {
        let remote = store.remote().ok_or(Error::NoRemote)?;
        let mut rrefs = refs.clone();
        let manifests = remote.list_manifests()?;
        for id in &manifests {
            let b = remote.get_manifest(id)?;
            rrefs.extend(Manifest::from_bytes(id, &b)?.chunks.into_iter().flatten());
        }
        let now = SystemTime::now();
        let grace = store.inner.opts.remote_gc_grace;
        // Old enough: a push from another host uploads chunks and its bundle before the
        // manifest that makes them referenced.
        let old = |mtime: &SystemTime| {
            now.duration_since(*mtime)
                .map(|age| age >= grace)
                .unwrap_or(false)
        };
        let doomed: Vec<ChunkId> = remote
            .list_chunks()?
            .into_iter()
            .filter(|(id, mtime)| !rrefs.contains(id) && old(mtime))
            .map(|(id, _)| id)
            .collect();
        remote.delete_chunks(&doomed)?;
        report.remote_chunks_removed = doomed.len() as u64;
        let manifests: HashSet<crate::BlobId> = manifests.into_iter().collect();
        let orphans: Vec<crate::BlobId> = remote
            .list_bundles()?
            .into_iter()
            .filter(|(id, mtime)| !manifests.contains(id) && old(mtime))
            .map(|(id, _)| id)
            .collect();
        remote.delete_bundles(&orphans)?;
        report.remote_bundles_removed = orphans.len() as u64;
    }
    report.chunks_evicted = trim(store)?;
    info!(?report, "gc");
    Ok(report)
}

/// Evict packs whose chunks the remote all holds (least recently accessed first) until the
/// local tier is under its limit. Returns how many chunks were evicted.
pub(crate) fn trim(store: &Store) -> Result<u64> {
    let Some(limit) = store.inner.opts.local_limit else {
        return Ok(0);
    };
    let packs = store.inner.local.packs()?;
    let size = |p: &PackInfo| p.chunks.iter().map(|(_, l)| *l).sum::<u64>();
    let mut total: u64 = packs.iter().map(size).sum();
    if total <= limit {
        return Ok(0);
    }
    let known = store.remote_known_set()?;
    let mut cands: Vec<_> = packs
        .into_iter()
        .filter(|p| p.chunks.iter().all(|(id, _)| known.contains(id)))
        .collect();
    cands.sort_by_key(|p| p.accessed);
    let (mut doomed, mut evicted) = (Vec::new(), 0u64);
    for p in cands {
        if total <= limit {
            break;
        }
        total -= size(&p);
        evicted += p.chunks.len() as u64;
        doomed.push(p.path);
    }
    store.inner.local.remove_packs(&doomed)?;
    if total > limit {
        warn!(
            total,
            limit, "local tier still over its limit: the rest is not on the remote (push it)"
        );
    }
    Ok(evicted)
}
