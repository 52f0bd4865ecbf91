//! The remote tier as the store sees it: a trait so the store does not depend on one backend.
//! [`crate::remote::S3Remote`] implements it; [`DirRemote`] is a remote in a plain directory
//! (a shared mount), handy for hosts that share storage and for tests without S3.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, IoContext, Result};
use crate::id::{BlobId, ChunkId};

/// A remote holding chunks (zstd frames, exactly as the local tier stores them) and manifests.
/// All methods are blocking and may be called from many threads at once.
pub trait RemoteTier: Send + Sync {
    /// Store a compressed chunk (idempotent).
    fn put_chunk(&self, id: &ChunkId, compressed: &[u8]) -> Result<()>;
    /// Fetch a compressed chunk; `Error::NotFound` when absent.
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>>;
    /// Fetch several compressed chunks, in the order given (a remote with latency overlaps
    /// the requests); the first error ends it.
    fn get_chunks(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>> {
        ids.iter().map(|id| self.get_chunk(id)).collect()
    }
    /// Which of `ids` the remote holds (same order).
    fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>>;
    /// Store a manifest's canonical bytes.
    fn put_manifest(&self, id: &BlobId, bytes: &[u8]) -> Result<()>;
    /// Fetch a manifest; `Error::NotFound` when absent.
    fn get_manifest(&self, id: &BlobId) -> Result<Vec<u8>>;
    /// Every chunk with its last-modified time (for gc's grace period).
    fn list_chunks(&self) -> Result<Vec<(ChunkId, SystemTime)>>;
    /// Every manifest id.
    fn list_manifests(&self) -> Result<Vec<BlobId>>;
    /// Delete chunks (missing ones are not an error).
    fn delete_chunks(&self, ids: &[ChunkId]) -> Result<()>;
    /// Point the remote name `name` at blob `id`, replacing what it named. Names are the
    /// remote's only mutable objects (a snapshot's working set, recorded after its push).
    fn put_ref(&self, name: &str, id: &BlobId) -> Result<()>;
    /// The blob the remote name points at, if the name exists.
    fn get_ref(&self, name: &str) -> Result<Option<BlobId>>;
    /// Store blob `blob`'s bundle ([`crate::bundle`]: frames of many of its chunks in one
    /// object), its bytes streamed from `pieces`; an error from `pieces` ends it with no bundle
    /// visible. A remote without bundles (the default) ignores it: every chunk is also its own
    /// object, so a bundle only saves a reader requests.
    fn put_bundle(
        &self,
        _blob: &BlobId,
        _pieces: &mut dyn Iterator<Item = Result<Vec<u8>>>,
    ) -> Result<()> {
        Ok(())
    }
    /// The last `len` bytes of blob `blob`'s bundle and its size; `None` when there is none.
    fn bundle_tail(&self, _blob: &BlobId, _len: u64) -> Result<Option<(Vec<u8>, u64)>> {
        Ok(None)
    }
    /// Reads byte ranges `(start, len)` of blob `blob`'s bundle, calling `each(index, bytes)`
    /// as each arrives (a remote with latency overlaps them).
    fn bundle_ranges(
        &self,
        blob: &BlobId,
        ranges: &[(u64, u64)],
        each: &mut dyn FnMut(usize, Result<Vec<u8>>),
    ) {
        for i in 0..ranges.len() {
            each(i, Err(Error::NotFound(format!("bundle of {blob}"))));
        }
    }
    /// Every bundle (named by its blob) with its last-modified time.
    fn list_bundles(&self) -> Result<Vec<(BlobId, SystemTime)>> {
        Ok(Vec::new())
    }
    /// Delete bundles (missing ones are not an error).
    fn delete_bundles(&self, _ids: &[BlobId]) -> Result<()> {
        Ok(())
    }
    /// A human description (no secrets), for logs and errors.
    fn describe(&self) -> String;
}

/// Checks a remote name: path-like segments of `[A-Za-z0-9._-]`, no empty, `.` or `..` segment.
pub(crate) fn check_ref_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 512
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("bad remote name {name:?}")))
    }
}

/// Parses a ref object's body (a blob id in hex, optionally newline-terminated).
pub(crate) fn parse_ref(name: &str, body: &[u8]) -> Result<BlobId> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::Invalid(format!("remote name {name:?} holds no blob id")))
}

/// A remote in a plain directory: `<root>/chunks/<hex>`, `<root>/blobs/<hex>`.
pub struct DirRemote {
    root: PathBuf,
}

impl DirRemote {
    /// Use (and create) `root`.
    pub fn new(root: &Path) -> Result<DirRemote> {
        for sub in ["chunks", "blobs", "refs", "tmp"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).ctx("create dir", &p)?;
        }
        Ok(DirRemote {
            root: root.to_path_buf(),
        })
    }

    fn put(&self, sub: &str, hex: &str, bytes: &[u8]) -> Result<()> {
        let dst = self.root.join(sub).join(hex);
        let tmp = crate::fsutil::tmp_name(&self.root.join("tmp"));
        crate::fsutil::write_durable(&tmp, &dst, bytes)
    }

    fn get(&self, sub: &str, hex: &str) -> Result<Vec<u8>> {
        let p = self.root.join(sub).join(hex);
        match std::fs::read(&p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::NotFound(format!("{} in {}", hex, self.describe())))
            }
            Err(e) => Err(Error::io("read", p, e)),
        }
    }

    fn list(&self, sub: &str) -> Result<Vec<(crate::Digest, SystemTime)>> {
        let dir = self.root.join(sub);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).ctx("read dir", &dir)? {
            let e = e.ctx("read dir", &dir)?;
            if let Some(d) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                let mtime = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((d, mtime));
            }
        }
        Ok(out)
    }
}

impl RemoteTier for DirRemote {
    fn put_chunk(&self, id: &ChunkId, compressed: &[u8]) -> Result<()> {
        self.put("chunks", &id.to_hex(), compressed)
    }
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.get("chunks", &id.to_hex())
    }
    fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        Ok(ids
            .iter()
            .map(|id| self.root.join("chunks").join(id.to_hex()).exists())
            .collect())
    }
    fn put_manifest(&self, id: &BlobId, bytes: &[u8]) -> Result<()> {
        self.put("blobs", &id.to_hex(), bytes)
    }
    fn get_manifest(&self, id: &BlobId) -> Result<Vec<u8>> {
        self.get("blobs", &id.to_hex())
    }
    fn list_chunks(&self) -> Result<Vec<(ChunkId, SystemTime)>> {
        self.list("chunks")
    }
    fn list_manifests(&self) -> Result<Vec<BlobId>> {
        Ok(self.list("blobs")?.into_iter().map(|(d, _)| d).collect())
    }
    fn delete_chunks(&self, ids: &[ChunkId]) -> Result<()> {
        for id in ids {
            let p = self.root.join("chunks").join(id.to_hex());
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", p, e)),
            }
        }
        Ok(())
    }
    fn put_ref(&self, name: &str, id: &BlobId) -> Result<()> {
        check_ref_name(name)?;
        self.put("refs", &name.replace('/', "%2F"), id.to_hex().as_bytes())
    }
    fn get_ref(&self, name: &str) -> Result<Option<BlobId>> {
        check_ref_name(name)?;
        match self.get("refs", &name.replace('/', "%2F")) {
            Ok(b) => parse_ref(name, &b).map(Some),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_remote_names_round_trip_and_bad_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = DirRemote::new(d.path()).unwrap();
        let a = crate::Digest::of(b"a");
        let b = crate::Digest::of(b"b");
        assert_eq!(r.get_ref("workingset/x").unwrap(), None);
        r.put_ref("workingset/x", &a).unwrap();
        assert_eq!(r.get_ref("workingset/x").unwrap(), Some(a));
        r.put_ref("workingset/x", &b).unwrap();
        assert_eq!(r.get_ref("workingset/x").unwrap(), Some(b));
        for bad in ["", "a//b", "../x", "a/./b", "a b", "x/.."] {
            assert!(r.put_ref(bad, &a).is_err(), "{bad:?} accepted");
        }
    }
}
