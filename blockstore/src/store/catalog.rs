//! Names and the blob catalog: naming blobs, resolving names and ids, listing, stat, removal.

use super::*;

impl Store {
    pub(super) fn name_path(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.len() > 120 || name.chars().any(|c| c.is_control()) {
            return Err(Error::Invalid(format!(
                "bad name {name:?}: 1-120 bytes, no control characters"
            )));
        }
        Ok(self.inner.dir.join("names").join(hex::encode(name)))
    }

    /// Point `name` at `id` (replacing what it pointed at).
    pub fn set_name(&self, name: &str, id: &BlobId) -> Result<()> {
        let p = self.name_path(name)?;
        if !self.contains(id) {
            return Err(Error::NotFound(format!("blob {id}")));
        }
        fsutil::write_durable(
            &fsutil::tmp_name(&self.inner.local.tmp),
            &p,
            id.to_hex().as_bytes(),
        )
    }

    /// Point `name` at `id` before the blob exists (from a put's announce hook, see
    /// [`Store::put_file_announced`]); a put cut short leaves a name to a blob that is not
    /// there, which reads as not found.
    pub fn set_name_ahead(&self, name: &str, id: &BlobId) -> Result<()> {
        let p = self.name_path(name)?;
        fsutil::write_durable(
            &fsutil::tmp_name(&self.inner.local.tmp),
            &p,
            id.to_hex().as_bytes(),
        )
    }

    /// Remove a name (the blob stays). Returns whether it existed.
    pub fn remove_name(&self, name: &str) -> Result<bool> {
        fsutil::remove_opt(&self.name_path(name)?)
    }

    /// The blob a name points at, if any.
    pub fn lookup_name(&self, name: &str) -> Result<Option<BlobId>> {
        let Ok(p) = self.name_path(name) else {
            return Ok(None);
        };
        match fsutil::read_opt(&p)? {
            None => Ok(None),
            Some(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .map(Some)
                .ok_or_else(|| Error::Invalid(format!("name file {} is damaged", p.display()))),
        }
    }

    /// All names with their blobs.
    pub fn names(&self) -> Result<Vec<(String, BlobId)>> {
        self.names_with_prefix("")
    }

    /// The names that start with `prefix`, with their blobs; only those name files are read.
    pub fn names_with_prefix(&self, prefix: &str) -> Result<Vec<(String, BlobId)>> {
        let dir = self.inner.dir.join("names");
        // Name files are the hex of the name, byte by byte: a name prefix is a file name prefix.
        let hex_prefix = hex::encode(prefix);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).ctx("read dir", &dir)? {
            let e = e.ctx("read dir", &dir)?;
            let Some(name) = e
                .file_name()
                .to_str()
                .filter(|h| h.starts_with(&hex_prefix))
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| String::from_utf8(b).ok())
            else {
                continue;
            };
            if let Ok(Some(id)) = self.lookup_name(&name) {
                out.push((name, id));
            }
        }
        out.sort();
        Ok(out)
    }

    /// A name, a full hex id, or a unique hex prefix of at least 8 digits.
    pub fn resolve(&self, name_or_id: &str) -> Result<BlobId> {
        if let Some(id) = self.lookup_name(name_or_id)? {
            return Ok(id);
        }
        let s = name_or_id.to_ascii_lowercase();
        if let Ok(id) = s.parse::<Digest>() {
            if self.contains(&id) {
                return Ok(id);
            }
            return Err(Error::NotFound(format!("blob {id}")));
        }
        if s.len() >= 8 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            let matches: Vec<BlobId> = self
                .blob_ids()?
                .into_iter()
                .filter(|id| id.to_hex().starts_with(&s))
                .collect();
            return match matches.len() {
                1 => Ok(matches[0]),
                0 => Err(Error::NotFound(format!(
                    "no blob or name matches {name_or_id:?}"
                ))),
                count => Err(Error::Ambiguous { prefix: s, count }),
            };
        }
        Err(Error::NotFound(format!(
            "no blob or name matches {name_or_id:?}"
        )))
    }

    /// Ids of all local blobs.
    pub fn blob_ids(&self) -> Result<Vec<BlobId>> {
        let dir = self.inner.dir.join("blobs");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).ctx("read dir", &dir)? {
            let e = e.ctx("read dir", &dir)?;
            if let Some(id) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    pub(super) fn names_by_blob(&self) -> Result<HashMap<BlobId, Vec<String>>> {
        let mut by: HashMap<BlobId, Vec<String>> = HashMap::new();
        for (n, id) in self.names()? {
            by.entry(id).or_default().push(n);
        }
        Ok(by)
    }

    /// All local blobs, newest first.
    pub fn list(&self) -> Result<Vec<BlobInfo>> {
        let names = self.names_by_blob()?;
        let mut out = Vec::new();
        for id in self.blob_ids()? {
            let m = match self.manifest_arc(&id) {
                Ok(m) => m,
                Err(e) => {
                    warn!(blob = %id, "skipping unreadable manifest: {e}");
                    continue;
                }
            };
            let created = std::fs::metadata(self.manifest_path(&id))
                .and_then(|md| md.modified())
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            out.push(BlobInfo {
                id,
                names: names.get(&id).cloned().unwrap_or_default(),
                size: m.size,
                chunk_size: m.chunk_size,
                created,
            });
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Details of one blob.
    pub fn stat(&self, id: &BlobId) -> Result<BlobStat> {
        self.inner.persist.wait();
        let m = self.manifest_arc(id)?;
        let uniq: HashSet<ChunkId> = m.chunks.iter().flatten().copied().collect();
        let mut local_chunks = 0;
        let mut local_bytes = 0;
        for c in &uniq {
            if let Some(at) = self.inner.local.location(c) {
                local_chunks += 1;
                local_bytes += at.len;
            }
        }
        Ok(BlobStat {
            id: *id,
            names: self.names_by_blob()?.remove(id).unwrap_or_default(),
            size: m.size,
            chunk_size: m.chunk_size,
            chunks: m.chunks.len() as u64,
            zero_chunks: m.chunks.iter().filter(|c| c.is_none()).count() as u64,
            unique_chunks: uniq.len() as u64,
            local_chunks,
            local_bytes,
        })
    }

    /// Drop a blob's manifest and the names pointing at it; its chunks go at the next gc.
    pub fn remove_blob(&self, id: &BlobId) -> Result<()> {
        // The manifest before the names: a remover killed in between leaves a name to a blob
        // that is gone (reads say not found), never a blob that no name reaches.
        if !fsutil::remove_opt(&self.manifest_path(id))? {
            return Err(Error::NotFound(format!("blob {id}")));
        }
        self.inner.manifests.lock().unwrap().remove(id);
        for (n, nid) in self.names()? {
            if nid == *id {
                self.remove_name(&n)?;
            }
        }
        Ok(())
    }
}
