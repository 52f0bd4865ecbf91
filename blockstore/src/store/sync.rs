//! The store against its remote tier: which chunks the remote has, push and pull.

use super::*;

impl Store {
    pub(super) fn remote_log(&self) -> PathBuf {
        self.inner.dir.join("remote-chunks")
    }

    /// Record that the remote holds these chunks (append-only; 32 bytes per id).
    pub(crate) fn note_remote_has(&self, ids: &[ChunkId]) -> Result<()> {
        let buf: Vec<u8> = ids.iter().flat_map(|id| id.0).collect();
        self.append_log(&self.remote_log(), &buf)
    }

    fn append_log(&self, p: &Path, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ctx("open", p)?;
        f.write_all(buf).ctx("append", p)
    }

    /// Record that the remote bundle of blob `bundle` holds these chunks (append-only; a
    /// chunk id and a blob id per chunk), so a later push can name that bundle in its own.
    pub(crate) fn note_bundled(&self, bundle: &BlobId, ids: &[ChunkId]) -> Result<()> {
        let buf: Vec<u8> = ids
            .iter()
            .flat_map(|id| [id.0, bundle.0])
            .flatten()
            .collect();
        self.append_log(&self.inner.dir.join("remote-bundles"), &buf)
    }

    /// The bundles (at most [`crate::bundle::MAX_REFS`], other than `blob`'s own) that hold
    /// the most of `chunks`, as far as this store has seen, and how many they hold.
    fn bundles_holding(&self, blob: &BlobId, chunks: &[ChunkId]) -> Result<(Vec<BlobId>, usize)> {
        let b = fsutil::read_opt(&self.inner.dir.join("remote-bundles"))?.unwrap_or_default();
        let want: HashSet<&ChunkId> = chunks.iter().collect();
        // The latest record of a chunk wins (an older bundle may be gone or rewritten).
        let mut holder: HashMap<ChunkId, BlobId> = HashMap::new();
        for rec in b.chunks_exact(64) {
            let c = Digest(rec[..32].try_into().unwrap());
            if want.contains(&c) {
                holder.insert(c, Digest(rec[32..].try_into().unwrap()));
            }
        }
        let mut count: HashMap<BlobId, usize> = HashMap::new();
        for h in holder.values().filter(|h| *h != blob) {
            *count.entry(*h).or_default() += 1;
        }
        let mut best: Vec<(BlobId, usize)> = count.into_iter().collect();
        best.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        best.truncate(crate::bundle::MAX_REFS);
        let covered = best.iter().map(|(_, n)| n).sum();
        Ok((best.into_iter().map(|(b, _)| b).collect(), covered))
    }

    pub(super) fn remote_known(&self) -> Result<HashSet<ChunkId>> {
        let b = fsutil::read_opt(&self.remote_log())?.unwrap_or_default();
        Ok(b.chunks_exact(32)
            .map(|c| Digest(c.try_into().unwrap()))
            .collect())
    }

    // ---------------------------------------------------------------- push / pull

    /// Upload a blob: the chunks the remote lacks (in parallel), with them a bundle of those
    /// chunks naming the earlier bundles that hold its other chunks, when together they are
    /// many ([`crate::bundle`]), then the manifest.
    /// `progress` gets the number of chunk bytes uploaded so far.
    ///
    /// A failed bundle upload fails the push like a failed chunk: it means S3 is failing us
    /// now, and a push that succeeds promises a fast fetch elsewhere. A push that failed once
    /// and is retried bundles only what the retry uploads (slower elsewhere, never wrong).
    pub fn push(&self, id: &BlobId, progress: &dyn Fn(u64)) -> Result<PushReport> {
        let remote = self.remote_or_err()?;
        let m = self.manifest_arc(id)?;
        let mut uniq: Vec<ChunkId> = m.chunks.iter().flatten().copied().collect();
        uniq.sort();
        uniq.dedup();
        let have = remote.has_chunks(&uniq)?;
        let todo: Vec<ChunkId> = uniq
            .iter()
            .zip(&have)
            .filter(|(_, h)| !**h)
            .map(|(c, _)| *c)
            .collect();
        // Chunks the remote had: in which earlier bundles (none when the push uploads nothing:
        // the blob was pushed before, its bundle stays as it is).
        let (refs, covered) = if todo.is_empty() || uniq.len() < crate::bundle::MIN_CHUNKS {
            (Vec::new(), 0)
        } else {
            let had: Vec<ChunkId> = uniq
                .iter()
                .zip(&have)
                .filter(|(_, h)| **h)
                .map(|(c, _)| *c)
                .collect();
            self.bundles_holding(id, &had)?
        };
        // In blob order, so a reader lacking a stretch of the blob reads a stretch of bundle.
        let bundle = (todo.len() + covered >= crate::bundle::MIN_CHUNKS).then(|| {
            let mut left: HashSet<ChunkId> = todo.iter().copied().collect();
            let frames: Vec<ChunkId> = m
                .chunks
                .iter()
                .flatten()
                .filter(|c| left.remove(*c))
                .copied()
                .collect();
            (frames, refs)
        });
        info!(blob = %id, chunks = uniq.len(), missing = todo.len(), bundle_refs = bundle.as_ref().map_or(0, |b| b.1.len()), remote = %remote.describe(), "push");
        let next = AtomicU64::new(0);
        let sent = AtomicU64::new(0);
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        let (ptx, prx) = std::sync::mpsc::channel::<u64>();
        let threads = self
            .inner
            .opts
            .push_parallelism
            .clamp(1, 64)
            .min(todo.len().max(1));
        let bundle_bytes = std::thread::scope(|s| {
            // The bundle goes up beside the chunks (the manifest, last, is what readers see).
            let bundle = bundle.as_ref().map(|(chunks, refs)| {
                s.spawn(|| self.push_bundle(&*remote, id, chunks, refs, &first_err))
            });
            for _ in 0..threads {
                let ptx = ptx.clone();
                let (todo, next, sent, first_err, remote) =
                    (&todo, &next, &sent, &first_err, &remote);
                s.spawn(move || loop {
                    if first_err.lock().unwrap().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Relaxed) as usize;
                    let Some(c) = todo.get(i) else { return };
                    let r = (|| {
                        let frame = self.frame_to_push(c)?;
                        remote.put_chunk(c, &frame)?;
                        Ok::<u64, Error>(frame.len() as u64)
                    })();
                    match r {
                        Ok(n) => {
                            sent.fetch_add(n, Relaxed);
                            let _ = ptx.send(n);
                        }
                        Err(e) => {
                            first_err.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                });
            }
            drop(ptx);
            let mut total = 0;
            for n in prx {
                total += n;
                progress(total);
            }
            bundle.map_or(0, |h| h.join().expect("bundle upload thread panicked"))
        });
        if let Some(e) = first_err.into_inner().unwrap() {
            return Err(e);
        }
        self.note_remote_has(&uniq)?;
        if let Some((chunks, _)) = &bundle {
            self.note_bundled(id, chunks)?;
        }
        remote.put_manifest(id, &m.to_bytes())?;
        Ok(PushReport {
            blob: *id,
            chunks: uniq.len() as u64,
            chunks_uploaded: todo.len() as u64,
            bytes_uploaded: sent.load(Relaxed) + bundle_bytes,
            bundle_bytes,
        })
    }

    /// A chunk's stored frame, checked against its id (a push never uploads damaged bytes).
    fn frame_to_push(&self, c: &ChunkId) -> Result<Vec<u8>> {
        let (frame, at) = self
            .inner
            .local
            .read_frame(c)?
            .ok_or_else(|| Error::MissingChunk {
                chunk: *c,
                reason: "the remote lacks it too".into(),
            })?;
        decode_chunk(c, &frame, crate::MAX_CHUNK_SIZE as usize, Some(&at))?;
        Ok(frame)
    }

    /// Uploads blob `id`'s bundle of `chunks` naming bundles `refs`; returns its size (0 after
    /// an error, which goes to `first_err` as a chunk's would).
    fn push_bundle(
        &self,
        remote: &dyn RemoteTier,
        id: &BlobId,
        chunks: &[ChunkId],
        refs: &[BlobId],
        first_err: &Mutex<Option<Error>>,
    ) -> u64 {
        let mut index: Vec<(ChunkId, u32)> = Vec::with_capacity(chunks.len());
        let (mut size, mut done) = (0u64, false);
        let mut frames = chunks.iter();
        let mut pieces = std::iter::from_fn(|| {
            if done {
                return None;
            }
            if first_err.lock().unwrap().is_some() {
                // A chunk failed, so does the push: end the bundle unfinished (never visible).
                done = true;
                return Some(Err(Error::Invalid("push abandoned".into())));
            }
            let piece = match frames.next() {
                Some(c) => self
                    .frame_to_push(c)
                    .inspect(|f| index.push((*c, f.len() as u32))),
                None => {
                    done = true;
                    Ok(crate::bundle::index_bytes(&index, refs))
                }
            };
            match &piece {
                Ok(p) => size += p.len() as u64,
                Err(_) => done = true,
            }
            Some(piece)
        });
        let t = std::time::Instant::now();
        match remote.put_bundle(id, &mut pieces) {
            Ok(()) => {
                if size > 0 {
                    info!(blob = %id, chunks = chunks.len(), refs = refs.len(), bytes = size, ms = t.elapsed().as_millis() as u64, "pushed bundle");
                }
                size
            }
            Err(e) => {
                first_err.lock().unwrap().get_or_insert(e);
                0
            }
        }
    }

    /// Points the remote name `name` at `id` (push the blob first: the remote then never
    /// names a blob it lacks). Remote names are separate from local ones.
    pub fn push_name(&self, name: &str, id: &BlobId) -> Result<()> {
        self.remote_or_err()?.put_ref(name, id)
    }

    /// The blob a remote name points at (`None` if the remote has no such name).
    pub fn remote_name(&self, name: &str) -> Result<Option<BlobId>> {
        self.remote_or_err()?.get_ref(name)
    }

    /// Fetch a blob's manifest from the remote (its data is fetched lazily by reads).
    pub fn pull(&self, id: &BlobId) -> Result<()> {
        if self.contains(id) {
            return Ok(());
        }
        let remote = self.remote_or_err()?;
        let bytes = match remote.get_manifest(id) {
            Ok(b) => b,
            Err(Error::NotFound(_)) => {
                return Err(Error::NotFound(format!(
                    "blob {id} on {}",
                    remote.describe()
                )))
            }
            Err(e) => return Err(e),
        };
        let m = Manifest::from_bytes(id, &bytes)?;
        let _lock = self.gc_lock(false)?;
        let wrote = self.write_manifest(&m)?;
        debug_assert_eq!(wrote, *id);
        // Chunks of a remote manifest are on the remote (it was pushed chunks-first).
        let uniq: Vec<ChunkId> = m.chunks.iter().flatten().copied().collect();
        self.note_remote_has(&uniq)
    }
}
