//! The put pipeline: the calling thread reads chunk-size pieces, worker threads (one per core)
//! detect zeros, hash, dedup, compress and append new chunks to one pack; at the end the pack
//! is made durable and installed, then the manifest is written.

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, unbounded};
use tracing::debug;

use crate::error::{Error, Result};
use crate::frame::ChunkEncoder;
use crate::id::{BlobId, ChunkId, Digest};
use crate::manifest::{check_chunk_size, Manifest};
use crate::store::{is_zero, Store};
use crate::{PutOptions, DEFAULT_CHUNK_SIZE};

/// Result of one chunk from a worker.
struct Done {
    idx: usize,
    id: Option<ChunkId>,
}

/// Fill `buf` from `r` as far as possible; returns bytes read (< len only at EOF).
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub(crate) fn put(store: &Store, mut input: impl Read, opts: &PutOptions) -> Result<BlobId> {
    let cs = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    check_chunk_size(cs)?;
    if let Some(n) = &opts.name {
        // Validate the name before doing any work.
        store.lookup_name(n)?;
    }
    let inner = &store.inner;
    let _lock = store.gc_lock(false)?;
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 16);
    // Buffers circulate reader -> worker -> pool -> reader: memory stays bounded.
    let nbufs = workers * 2 + 2;
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(nbufs);
    for _ in 0..nbufs {
        pool_tx.send(vec![0u8; cs as usize]).unwrap();
    }
    let (work_tx, work_rx) = bounded::<(usize, Vec<u8>, usize)>(nbufs);
    let (done_tx, done_rx) = unbounded::<Result<Done>>();
    let seen: Arc<Mutex<HashSet<ChunkId>>> = Arc::default();
    let pack = inner.local.writer()?;

    let mut size = 0u64;
    let mut count = 0usize;
    let t0 = std::time::Instant::now();
    let read_result: Result<()> = std::thread::scope(|s| {
        for _ in 0..workers {
            let (work_rx, done_tx, pool_tx, seen, pack) = (
                work_rx.clone(),
                done_tx.clone(),
                pool_tx.clone(),
                seen.clone(),
                &pack,
            );
            s.spawn(move || {
                let mut enc = match ChunkEncoder::new() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = done_tx.send(Err(e));
                        return;
                    }
                };
                let mut out = Vec::new();
                for (idx, buf, len) in work_rx {
                    let r = (|| {
                        let data = &buf[..len];
                        if is_zero(data) {
                            return Ok(Done { idx, id: None });
                        }
                        let id = Digest::of(data);
                        let fresh = seen.lock().unwrap().insert(id);
                        if fresh && !inner.local.has(&id) {
                            enc.encode(data, &mut out)?;
                            pack.add(&id, &out)?;
                            inner
                                .stats
                                .bytes_written
                                .fetch_add(out.len() as u64, Relaxed);
                        }
                        Ok(Done { idx, id: Some(id) })
                    })();
                    let _ = pool_tx.send(buf);
                    if done_tx.send(r).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let res = (|| {
            loop {
                let mut buf = pool_rx.recv().expect("workers return buffers");
                let n = read_full(&mut input, &mut buf)
                    .map_err(|e| Error::io("read", "<put input>", e))?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                if work_tx.send((count, buf, n)).is_err() {
                    break; // a worker failed; its error is in done_rx
                }
                count += 1;
                if let Some(p) = &opts.progress {
                    p(size);
                }
                if n < cs as usize {
                    break;
                }
            }
            Ok(())
        })();
        drop(work_tx);
        res
    });

    let mut chunks: Vec<Option<ChunkId>> = vec![None; count];
    let mut first_err = read_result.err();
    for d in done_rx {
        match d {
            Ok(d) => {
                if d.idx < count {
                    chunks[d.idx] = d.id;
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e); // dropping the uncommitted pack removes it
    }

    let t1 = std::time::Instant::now();
    let new_chunks = install_chunks(store, pack)?;
    debug!(
        pipeline_ms = (t1 - t0).as_millis() as u64,
        sync_ms = t1.elapsed().as_millis() as u64,
        "put timing"
    );
    let m = Manifest {
        size,
        chunk_size: cs,
        chunks,
    };
    let id = store.write_manifest(&m)?;
    debug!(blob = %id, size, chunks = count, new_chunks, "put");
    if let Some(n) = &opts.name {
        store.set_name(n, &id)?;
    }
    Ok(id)
}

/// Make a pack of new chunks durable and visible; returns how many it holds.
pub(crate) fn install_chunks(store: &Store, pack: crate::pack::PackWriter) -> Result<usize> {
    let n = store.inner.local.commit(pack)?;
    store
        .inner
        .stats
        .chunks_written
        .fetch_add(n as u64, Relaxed);
    Ok(n)
}
