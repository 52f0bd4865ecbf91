//! The put pipeline. From a stream ([`put`]): the calling thread reads chunk-size pieces and
//! worker threads (one per core) detect zeros, hash, dedup, encode and append new chunks to one
//! pack. From chunks already in memory ([`put_chunks`]): the workers take the chunks in place,
//! with no copy. At the end the pack is made durable and installed, then the manifest written.

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use crossbeam_channel::{bounded, unbounded};
use tracing::debug;

use crate::error::{Error, Result};
use crate::frame::ChunkEncoder;
use crate::id::{BlobId, ChunkId, Digest};
use crate::manifest::{check_chunk_size, Manifest};
use crate::pack::PackWriter;
use crate::store::{is_zero, Store};
use crate::{PutOptions, DEFAULT_CHUNK_SIZE};

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

fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 16)
}

/// What one put shares between its workers: the pack being written and the chunks seen.
struct ChunkSink<'a> {
    store: &'a Store,
    pack: PackWriter,
    seen: Mutex<HashSet<ChunkId>>,
}

impl<'a> ChunkSink<'a> {
    fn new(store: &'a Store) -> Result<ChunkSink<'a>> {
        store.inner.local.catch_up();
        Ok(ChunkSink {
            store,
            pack: store.inner.local.writer()?,
            seen: Mutex::default(),
        })
    }

    /// Stores one chunk (unless all zero or already stored); returns its id.
    fn add(
        &self,
        enc: &mut ChunkEncoder,
        out: &mut Vec<u8>,
        data: &[u8],
    ) -> Result<Option<ChunkId>> {
        if is_zero(data) {
            return Ok(None);
        }
        let id = Digest::of(data);
        let fresh = self.seen.lock().unwrap().insert(id);
        if fresh && !self.store.inner.local.indexed(&id) {
            enc.encode(data, out)?;
            self.pack.add(&id, out)?;
            self.store
                .inner
                .stats
                .bytes_written
                .fetch_add(out.len() as u64, Relaxed);
        }
        Ok(Some(id))
    }

    /// Makes the new chunks durable, then tells `announce` the blob's id, then writes the
    /// manifest, then the name.
    fn finish(
        self,
        chunks: Vec<Option<ChunkId>>,
        size: u64,
        cs: u32,
        opts: &PutOptions,
        announce: Option<&Announce<'_>>,
    ) -> Result<BlobId> {
        let t = std::time::Instant::now();
        let new_chunks = install_chunks(self.store, self.pack)?;
        let m = Manifest {
            size,
            chunk_size: cs,
            chunks,
        };
        if let Some(f) = announce {
            f(&Digest::of(&m.to_bytes()))?;
        }
        let id = self.store.write_manifest(&m)?;
        debug!(blob = %id, size, chunks = m.chunks.len(), new_chunks, sync_ms = t.elapsed().as_millis() as u64, "put");
        if let Some(n) = &opts.name {
            self.store.set_name(n, &id)?;
        }
        Ok(id)
    }
}

/// Checks the options before any work; returns the chunk size.
fn check_options(store: &Store, opts: &PutOptions) -> Result<u32> {
    let cs = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    check_chunk_size(cs)?;
    if let Some(n) = &opts.name {
        store.lookup_name(n)?;
    }
    Ok(cs)
}

/// Called with a blob's id before its manifest is written (see [`Store::put_file_announced`]).
pub type Announce<'a> = dyn Fn(&BlobId) -> Result<()> + Sync + 'a;

pub(crate) fn put(
    store: &Store,
    mut input: impl Read,
    opts: &PutOptions,
    announce: Option<&Announce<'_>>,
) -> Result<BlobId> {
    let cs = check_options(store, opts)?;
    let _lock = store.gc_lock(false)?;
    let workers = workers();
    // Buffers circulate reader -> worker -> pool -> reader: memory stays bounded.
    let nbufs = workers * 2 + 2;
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(nbufs);
    for _ in 0..nbufs {
        pool_tx.send(vec![0u8; cs as usize]).unwrap();
    }
    let (work_tx, work_rx) = bounded::<(usize, Vec<u8>, usize)>(nbufs);
    let (done_tx, done_rx) = unbounded::<Result<(usize, Option<ChunkId>)>>();
    let sink = ChunkSink::new(store)?;

    let mut size = 0u64;
    let mut count = 0usize;
    let read_result: Result<()> = std::thread::scope(|s| {
        for _ in 0..workers {
            let (work_rx, done_tx, pool_tx, sink) =
                (work_rx.clone(), done_tx.clone(), pool_tx.clone(), &sink);
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
                    let r = sink
                        .add(&mut enc, &mut out, &buf[..len])
                        .map(|id| (idx, id));
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
            Ok((idx, id)) => {
                if idx < count {
                    chunks[idx] = id;
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
    sink.finish(chunks, size, cs, opts, announce)
}

/// A chunk's index in the blob and its id (`None`: all zeros).
type Placed = (usize, Option<ChunkId>);

/// Stores a blob of `size` bytes whose chunks are already in memory: `chunk(i)` is chunk `i`
/// (chunk-size bytes, the last one possibly shorter), or `None` when it is all zeros.
pub(crate) fn put_chunks<'a>(
    store: &Store,
    size: u64,
    opts: &PutOptions,
    chunk: &(dyn Fn(usize) -> Option<&'a [u8]> + Sync),
) -> Result<BlobId> {
    let cs = check_options(store, opts)?;
    let _lock = store.gc_lock(false)?;
    let count = size.div_ceil(cs as u64) as usize;
    let sink = ChunkSink::new(store)?;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Vec<Result<Vec<Placed>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers().min(count.max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut enc = ChunkEncoder::new()?;
                    let (mut out, mut done) = (Vec::new(), Vec::new());
                    while !failed.load(Relaxed) {
                        let i = next.fetch_add(1, Relaxed);
                        if i >= count {
                            break;
                        }
                        let want = (size - i as u64 * cs as u64).min(cs as u64) as usize;
                        let id = match chunk(i) {
                            None => None,
                            Some(d) if d.len() == want => sink
                                .add(&mut enc, &mut out, d)
                                .inspect_err(|_| failed.store(true, Relaxed))?,
                            Some(d) => {
                                failed.store(true, Relaxed);
                                return Err(Error::Invalid(format!(
                                    "chunk {i} has {} bytes, expected {want}",
                                    d.len()
                                )));
                            }
                        };
                        done.push((i, id));
                        if let Some(p) = &opts.progress {
                            p(((i + 1) as u64 * cs as u64).min(size));
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("put worker panicked"))
            .collect()
    });
    let mut chunks: Vec<Option<ChunkId>> = vec![None; count];
    for r in results {
        for (i, id) in r? {
            chunks[i] = id;
        }
    }
    sink.finish(chunks, size, cs, opts, None)
}

/// Make a pack of new chunks durable and visible; returns how many it holds.
pub(crate) fn install_chunks(store: &Store, pack: PackWriter) -> Result<usize> {
    let n = store.inner.local.commit(pack)?;
    store
        .inner
        .stats
        .chunks_written
        .fetch_add(n as u64, Relaxed);
    Ok(n)
}
