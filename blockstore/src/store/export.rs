//! Reading whole blobs out: export to a file, write to a stream, prefetch every chunk.

use super::*;

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
    /// the remote [`FETCH_BATCH`] at a time, each batch's requests overlapped
    /// ([`RemoteTier::get_chunks`]): for a reader about to read all of them (a gVisor restore
    /// reads its whole checkpoint), which chunk by chunk would wait one round trip per chunk
    /// (a checkpoint's chunks are 4 KiB pages). Returns how many chunks were fetched.
    pub fn fetch_missing(&self, ids: &[BlobId]) -> Result<u64> {
        let Some(remote) = self.remote() else {
            return Ok(0);
        };
        self.inner.local.catch_up();
        let mut seen = HashSet::new();
        let mut want: Vec<(ChunkId, usize)> = Vec::new();
        for id in ids {
            let m = self.manifest_arc(id)?;
            for (i, c) in m.chunks.iter().enumerate() {
                if let Some(c) = c {
                    if !self.inner.local.indexed(c) && seen.insert(*c) {
                        want.push((*c, m.chunk_len(i)));
                    }
                }
            }
        }
        let st = &self.inner.stats;
        for batch in want.chunks(FETCH_BATCH) {
            let ids: Vec<ChunkId> = batch.iter().map(|(c, _)| *c).collect();
            let frames = remote.get_chunks(&ids)?;
            for ((c, len), frame) in batch.iter().zip(frames) {
                decode_chunk(c, &frame, *len, None).inspect_err(|_| {
                    st.integrity_errors.fetch_add(1, Relaxed);
                    warn!(chunk = %c, remote = %remote.describe(), "integrity error in fetched chunk");
                })?;
                st.remote_chunk_fetches.fetch_add(1, Relaxed);
                st.remote_bytes_fetched
                    .fetch_add(frame.len() as u64, Relaxed);
                self.inner.persist.submit(*c, frame);
            }
            self.note_remote_has(&ids)?;
        }
        // Readers find them in the local tier from here on.
        self.inner.persist.wait();
        Ok(want.len() as u64)
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
