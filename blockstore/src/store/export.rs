//! Reading whole blobs out: export to a file, write to a stream, prefetch every chunk.

use super::*;
use crate::frame::max_frame_len;

/// How many chunks [`Store::fetch_missing`] asks the remote for at once.
const FETCH_BATCH: usize = 512;

impl Store {
    /// Write a blob to a file (zero ranges become holes). The file appears complete or not at all.
    pub fn export(&self, id: &BlobId, to: &Path) -> Result<()> {
        let m = self.manifest_arc(id)?;
        let dir = match to.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = fsutil::tmp_name(&dir);
        let res = (|| {
            let f = File::create(&tmp).ctx("create", &tmp)?;
            f.set_len(m.size).ctx("truncate", &tmp)?;
            self.for_each_chunk(&m, |i, data| {
                let Some(buf) = data else { return Ok(()) };
                let off = i as u64 * m.chunk_size as u64;
                let len = buf.len();
                // Skip 4 KiB runs of zeros so the file stays sparse.
                let mut pos = 0;
                while pos < len {
                    let end = (pos + 4096).min(len);
                    if !is_zero(&buf[pos..end]) {
                        let mut run_end = end;
                        while run_end < len && !is_zero(&buf[run_end..(run_end + 4096).min(len)]) {
                            run_end = (run_end + 4096).min(len);
                        }
                        f.write_all_at(&buf[pos..run_end], off + pos as u64)
                            .ctx("write", &tmp)?;
                        pos = run_end;
                    } else {
                        pos = end;
                    }
                }
                Ok(())
            })?;
            f.sync_all().ctx("fsync", &tmp)?;
            std::fs::rename(&tmp, to).ctx("rename", to)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// Write a blob's bytes to `w` (e.g. stdout).
    pub fn write_to(&self, id: &BlobId, w: &mut dyn Write) -> Result<()> {
        let m = self.manifest_arc(id)?;
        let zeros = vec![0u8; m.chunk_size as usize];
        self.for_each_chunk(&m, |i, data| {
            let bytes = data.unwrap_or(&zeros[..m.chunk_len(i)]);
            w.write_all(bytes)
                .map_err(|e| Error::io("write", "<output>", e))
        })
    }

    /// Make every chunk of a blob local (fetching missing ones from the remote, many at a
    /// time). Returns how many chunks were fetched.
    pub fn prefetch(&self, id: &BlobId) -> Result<u64> {
        let m = self.manifest_arc(id)?;
        let before = self.inner.stats.remote_chunk_fetches.load(Relaxed);
        self.for_each_chunk(&m, |_, _| Ok(()))?;
        self.inner.persist.wait();
        Ok(self.inner.stats.remote_chunk_fetches.load(Relaxed) - before)
    }

    /// Makes every chunk of the blobs `ids` local, fetching what the local tier lacks from
    /// the remote: out of a blob's bundle when it has one ([`crate::bundle`]: a few large
    /// range GETs), the rest [`FETCH_BATCH`] at a time, each batch's requests overlapped
    /// ([`RemoteTier::get_chunks`]): for a reader about to read all of them (a gVisor restore
    /// reads its whole checkpoint), which chunk by chunk would wait one round trip per chunk
    /// (a checkpoint's chunks are 4 KiB pages). Returns how many chunks were fetched.
    pub fn fetch_missing(&self, ids: &[BlobId]) -> Result<u64> {
        let Some(remote) = self.remote() else {
            return Ok(0);
        };
        // Chunks fetched by earlier reads are local once written: not fetched again.
        self.inner.persist.wait();
        self.inner.local.catch_up();
        let mut seen = HashSet::new();
        let mut want: Vec<(ChunkId, usize)> = Vec::new();
        let mut fetched = 0u64;
        for id in ids {
            let m = self.manifest_arc(id)?;
            let start = want.len();
            for (i, c) in m.chunks.iter().enumerate() {
                if let Some(c) = c {
                    if !self.inner.local.indexed(c) && seen.insert(*c) {
                        want.push((*c, m.chunk_len(i)));
                    }
                }
            }
            if want.len() - start >= crate::bundle::MIN_TO_READ {
                let got = self.fetch_from_bundle(&*remote, id, &m, &want[start..])?;
                fetched += got.len() as u64;
                let mut k = start;
                want.retain(|(c, _)| {
                    k += 1;
                    k <= start || !got.contains(c)
                });
            }
        }
        let st = &self.inner.stats;
        for batch in want.chunks(FETCH_BATCH) {
            let ids: Vec<ChunkId> = batch.iter().map(|(c, _)| *c).collect();
            let frames = remote.get_chunks(&ids)?;
            for ((c, len), frame) in batch.iter().zip(frames) {
                st.remote_bytes_fetched
                    .fetch_add(frame.len() as u64, Relaxed);
                self.keep_fetched(c, frame, *len).inspect_err(|_| {
                    warn!(chunk = %c, remote = %remote.describe(), "integrity error in fetched chunk");
                })?;
            }
            self.note_remote_has(&ids)?;
        }
        // Readers find them in the local tier from here on.
        self.inner.persist.wait();
        Ok(fetched + want.len() as u64)
    }

    /// A frame of chunk `c` fetched from the remote for [`Store::fetch_missing`]: checked
    /// against its id (a mismatch is counted as an integrity error and returned), then kept
    /// in the memory cache (the caller reads it next: not decoded again from disk), counted
    /// and queued for the local tier.
    fn keep_fetched(&self, c: &ChunkId, frame: Vec<u8>, max_len: usize) -> Result<()> {
        let st = &self.inner.stats;
        let plain = decode_chunk(c, &frame, max_len, None).inspect_err(|_| {
            st.integrity_errors.fetch_add(1, Relaxed);
        })?;
        self.inner.cache.insert(*c, Arc::new(plain));
        st.remote_chunk_fetches.fetch_add(1, Relaxed);
        self.inner.persist.submit(*c, frame);
        Ok(())
    }

    /// Fetches what it can of `lacking` (chunk, plain length), all chunks of blob `id`, from
    /// the blob's bundle and the bundles it names; returns the chunks it got, each checked
    /// against its id and queued for the local tier. No bundle, a damaged one or a failed
    /// range only leave chunks to the caller's chunk-by-chunk fetch (with a warning); only
    /// local errors are errors.
    fn fetch_from_bundle(
        &self,
        remote: &dyn RemoteTier,
        id: &BlobId,
        m: &Manifest,
        lacking: &[(ChunkId, usize)],
    ) -> Result<HashSet<ChunkId>> {
        let t = std::time::Instant::now();
        let mut got = HashSet::new();
        let chunks = m.chunks.iter().flatten().collect::<HashSet<_>>().len();
        let Some(own) = self.bundle_index(remote, id, chunks, chunks) else {
            return Ok(got);
        };
        let lens: HashMap<ChunkId, usize> = lacking.iter().copied().collect();
        let mut read = 1;
        self.fetch_frames(remote, id, &own.entries, &lens, &mut got)?;
        let mut refs = own.refs;
        refs.sort();
        refs.dedup();
        for r in refs.iter().filter(|r| *r != id) {
            if got.len() == lens.len() {
                break;
            }
            if let Some(ix) = self.bundle_index(remote, r, chunks, crate::bundle::MAX_CHUNKS) {
                read += 1;
                self.fetch_frames(remote, r, &ix.entries, &lens, &mut got)?;
            }
        }
        debug!(blob = %id, chunks = got.len(), of = lacking.len(), bundles = read, ms = t.elapsed().as_millis() as u64, "fetched from bundles");
        Ok(got)
    }

    /// The index of blob `id`'s bundle (listing at most `max_chunks`), `None` (after a warning
    /// when it is not merely absent) when there is none to use. One GET reads the index of a
    /// bundle of up to `guess` chunks; a larger one takes a second.
    fn bundle_index(
        &self,
        remote: &dyn RemoteTier,
        id: &BlobId,
        guess: usize,
        max_chunks: usize,
    ) -> Option<crate::bundle::Index> {
        use crate::bundle::{parse_index, tail_len, BadBundle, MAX_TAIL};
        let st = &self.inner.stats;
        let mut want = tail_len(guess).min(MAX_TAIL);
        for _ in 0..2 {
            st.bundle_requests.fetch_add(1, Relaxed);
            let (tail, size) = match remote.bundle_tail(id, want) {
                Ok(Some(x)) => x,
                Ok(None) => {
                    debug!(blob = %id, "no bundle");
                    return None;
                }
                Err(e) => {
                    warn!(blob = %id, "reading a bundle failed, fetching chunk by chunk: {e}");
                    return None;
                }
            };
            st.remote_bytes_fetched
                .fetch_add(tail.len() as u64, Relaxed);
            match parse_index(&tail, size, max_chunks) {
                Ok(ix) => return Some(ix),
                Err(BadBundle::Incomplete { need }) if need <= MAX_TAIL && need > want => {
                    want = need
                }
                Err(why) => {
                    warn!(blob = %id, remote = %remote.describe(), "a bundle is unusable ({why}), fetching chunk by chunk");
                    return None;
                }
            }
        }
        None
    }

    /// Reads the frames of `lens`' chunks not yet in `got` that blob `id`'s bundle holds
    /// (`entries`), in coalesced ranges; checks each against its id, queues it for the local
    /// tier and adds it to `got`.
    fn fetch_frames(
        &self,
        remote: &dyn RemoteTier,
        id: &BlobId,
        entries: &[crate::bundle::Entry],
        lens: &HashMap<ChunkId, usize>,
        got: &mut HashSet<ChunkId>,
    ) -> Result<()> {
        let st = &self.inner.stats;
        let mut planned = HashSet::new();
        let ranges = crate::bundle::plan(entries, |e| {
            !got.contains(&e.id)
                && lens
                    .get(&e.id)
                    .is_some_and(|&l| e.len as usize <= max_frame_len(l))
                && planned.insert(e.id)
        });
        let spans: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.len)).collect();
        // Ranges arrive faster than one thread checks their frames (on loopback 32 MiB comes
        // in ~40 ms, its 8,450 frames take ~100 ms to check on one core), so two check them.
        let (tx, rx) = crossbeam_channel::bounded::<(usize, Vec<u8>)>(4);
        let fresh: Vec<ChunkId> = std::thread::scope(|s| {
            let check = || {
                let mut fresh = Vec::new();
                for (i, bytes) in rx.clone() {
                    for f in &ranges[i].frames {
                        let at = f.offset as usize;
                        let Some(frame) = bytes.get(at..at.saturating_add(f.len as usize)) else {
                            continue;
                        };
                        if self
                            .keep_fetched(&f.id, frame.to_vec(), lens[&f.id])
                            .is_err()
                        {
                            warn!(chunk = %f.id, blob = %id, remote = %remote.describe(), "integrity error in a bundle's frame, fetching the chunk by itself");
                            continue;
                        }
                        st.bundle_chunk_fetches.fetch_add(1, Relaxed);
                        fresh.push(f.id);
                    }
                }
                fresh
            };
            let checkers = [s.spawn(check), s.spawn(check)];
            remote.bundle_ranges(id, &spans, &mut |i, r| {
                st.bundle_requests.fetch_add(1, Relaxed);
                match r {
                    Ok(bytes) => {
                        st.remote_bytes_fetched
                            .fetch_add(bytes.len() as u64, Relaxed);
                        let _ = tx.send((i, bytes));
                    }
                    Err(e) => {
                        warn!(blob = %id, "reading a range of a bundle failed, fetching its chunks one by one: {e}");
                    }
                }
            });
            drop(tx);
            checkers
                .into_iter()
                .flat_map(|c| c.join().expect("bundle check thread panicked"))
                .collect()
        });
        got.extend(fresh.iter().copied());
        self.note_remote_has(&fresh)?;
        self.note_bundled(id, &fresh)
    }

    /// Call `f(index, Some(bytes))` for every chunk in order (`None` for zero chunks), loading
    /// up to 8 chunks at once ahead of `f` so remote fetches overlap their latency.
    pub(super) fn for_each_chunk(
        &self,
        m: &Manifest,
        mut f: impl FnMut(usize, Option<&[u8]>) -> Result<()>,
    ) -> Result<()> {
        const WINDOW: usize = 16;
        const THREADS: usize = 8;
        let mut start = 0;
        while start < m.chunks.len() {
            let end = (start + WINDOW).min(m.chunks.len());
            let slots: Vec<Mutex<Option<Result<ChunkData>>>> =
                (start..end).map(|_| Mutex::new(None)).collect();
            let next = AtomicU64::new(start as u64);
            let need = m.chunks[start..end].iter().filter(|c| c.is_some()).count();
            std::thread::scope(|s| {
                for _ in 0..THREADS.min(need) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Relaxed) as usize;
                        if i >= end {
                            return;
                        }
                        if let Some(c) = &m.chunks[i] {
                            *slots[i - start].lock().unwrap() = Some(self.chunk(c, m.chunk_len(i)));
                        }
                    });
                }
            });
            for (k, slot) in slots.into_iter().enumerate() {
                match slot.into_inner().unwrap() {
                    None => f(start + k, None)?,
                    Some(Ok(d)) if d.len() == m.chunk_len(start + k) => f(start + k, Some(&d[..]))?,
                    Some(Ok(_)) => {
                        return Err(Error::Invalid(format!(
                            "chunk {} has the wrong length for its place in the blob",
                            start + k
                        )))
                    }
                    Some(Err(e)) => return Err(e),
                }
            }
            start = end;
        }
        Ok(())
    }
}
