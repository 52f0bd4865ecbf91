//! The local tier: one zstd frame per chunk under `chunks/<first byte hex>/<hex>`.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::id::{ChunkId, Digest};

#[derive(Clone)]
pub(crate) struct LocalTier {
    pub(crate) chunks: PathBuf,
    pub(crate) tmp: PathBuf,
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompress a chunk frame and check it against `id`. `max_len` bounds the output.
pub(crate) fn decode_chunk(
    id: &ChunkId,
    frame: &[u8],
    max_len: usize,
    at: Option<&Path>,
) -> Result<Vec<u8>> {
    let integrity = || Error::Integrity {
        chunk: *id,
        location: at.map(Path::to_path_buf),
    };
    let plain = DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        match d.as_mut() {
            Some(d) => d.decompress(frame, max_len),
            None => zstd::bulk::decompress(frame, max_len),
        }
    });
    let plain = plain.map_err(|_| integrity())?;
    if Digest::of(&plain) != *id {
        return Err(integrity());
    }
    Ok(plain)
}

impl LocalTier {
    pub(crate) fn new(dir: &Path) -> Result<LocalTier> {
        let t = LocalTier {
            chunks: dir.join("chunks"),
            tmp: dir.join("tmp"),
        };
        std::fs::create_dir_all(&t.tmp).ctx("create dir", &t.tmp)?;
        for b in 0..=255u8 {
            let p = t.chunks.join(format!("{b:02x}"));
            std::fs::create_dir_all(&p).ctx("create dir", &p)?;
        }
        Ok(t)
    }

    pub(crate) fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.chunks.join(&hex[..2]).join(hex)
    }

    pub(crate) fn has(&self, id: &ChunkId) -> bool {
        self.path(id).exists()
    }

    /// The stored frame, or None when the chunk is not local.
    pub(crate) fn read_frame(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        fsutil::read_opt(&self.path(id))
    }

    /// Write a frame to a new tmp file (not synced); the caller syncs and installs it.
    pub(crate) fn write_tmp(&self, frame: &[u8]) -> Result<PathBuf> {
        let tmp = fsutil::tmp_name(&self.tmp);
        let mut f = std::fs::File::create(&tmp).ctx("create", &tmp)?;
        f.write_all(frame).ctx("write", &tmp)?;
        Ok(tmp)
    }

    /// Rename a synced tmp file into place.
    pub(crate) fn install(&self, tmp: &Path, id: &ChunkId) -> Result<()> {
        let dst = self.path(id);
        std::fs::rename(tmp, &dst).ctx("rename", &dst)
    }

    /// Store one verified frame durably (tmp + fsync + rename + dir fsync).
    pub(crate) fn store_durable(&self, id: &ChunkId, frame: &[u8]) -> Result<()> {
        let dst = self.path(id);
        fsutil::write_durable(&fsutil::tmp_name(&self.tmp), &dst, frame)
    }

    /// Make tmp chunk files durable, then rename them into place and make the renames durable:
    /// a file under `chunks/` always has durable contents.
    pub(crate) fn install_durable(&self, tmps: &[(PathBuf, ChunkId)]) -> Result<()> {
        if tmps.is_empty() {
            return Ok(());
        }
        // Few chunks: fsync each. Many: one syncfs beats thousands of fsyncs.
        let few = tmps.len() <= 4;
        if few {
            for (t, _) in tmps {
                std::fs::File::open(t)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| Error::io("fsync", t, e))?;
            }
        } else {
            fsutil::syncfs(&self.tmp)?;
        }
        for (t, id) in tmps {
            self.install(t, id)?;
        }
        if few {
            let mut dirs: Vec<PathBuf> = tmps
                .iter()
                .map(|(_, id)| self.path(id).parent().unwrap().to_path_buf())
                .collect();
            dirs.sort();
            dirs.dedup();
            for d in dirs {
                fsutil::fsync_dir(&d)?;
            }
            Ok(())
        } else {
            fsutil::syncfs(&self.chunks)
        }
    }

    pub(crate) fn remove(&self, id: &ChunkId) -> Result<bool> {
        fsutil::remove_opt(&self.path(id))
    }

    /// Every local chunk with its stored size.
    pub(crate) fn list(&self) -> Result<Vec<(ChunkId, u64)>> {
        let mut out = Vec::new();
        for b in 0..=255u8 {
            let dir = self.chunks.join(format!("{b:02x}"));
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("read dir", dir, e)),
            };
            for e in rd {
                let e = e.ctx("read dir", &dir)?;
                let Some(id) = e
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<Digest>().ok())
                else {
                    continue;
                };
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((id, len));
            }
        }
        Ok(out)
    }
}
