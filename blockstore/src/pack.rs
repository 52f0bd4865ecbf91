//! Pack files: many chunk frames in one file, so a put of thousands of chunks costs one file,
//! one fdatasync and one rename instead of a file, a rename and a journal entry per chunk.
//!
//! ```text
//! frame frame ... frame            zstd frames back to back
//! index                            count x (chunk id [32], offset u64 LE, length u32 LE)
//! footer (56 bytes)                index offset u64, count u32, 0u32, blake3(index) [32],
//!                                  magic "KILNPAK1"
//! ```
//! A pack is written under `tmp/`, made durable, and renamed into `packs/` whole: a file in
//! `packs/` is complete, and its name is the hash of its index.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::id::{ChunkId, Digest};

const MAGIC: &[u8; 8] = b"KILNPAK1";
const FOOTER_LEN: u64 = 56;
const ENTRY_LEN: usize = 44;
/// Start writeback every this many bytes, so the final fdatasync finds little left to do.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Where one frame lives inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: ChunkId,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// What [`read_index`] found.
pub(crate) enum Index {
    Entries(Vec<Entry>),
    /// The file is not a complete pack (truncated, damaged index, not a pack).
    Bad,
    /// The file is gone (another process removed it).
    Gone,
}

/// Reads and checks a pack's index (its hash too when `check_hash`: not needed for safety,
/// as every frame is checked against its chunk id when read, but it tells a damaged index
/// from a missing chunk).
pub(crate) fn read_index(path: &Path, check_hash: bool) -> Result<Index> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Index::Gone),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let size = f.metadata().ctx("stat", path)?.len();
    if size < FOOTER_LEN {
        return Ok(Index::Bad);
    }
    let mut footer = [0u8; FOOTER_LEN as usize];
    f.read_exact_at(&mut footer, size - FOOTER_LEN)
        .ctx("read", path)?;
    if &footer[48..56] != MAGIC {
        return Ok(Index::Bad);
    }
    let index_off = u64::from_le_bytes(footer[0..8].try_into().unwrap());
    let count = u32::from_le_bytes(footer[8..12].try_into().unwrap()) as u64;
    if index_off.checked_add(count * ENTRY_LEN as u64 + FOOTER_LEN) != Some(size) {
        return Ok(Index::Bad);
    }
    let mut index = vec![0u8; count as usize * ENTRY_LEN];
    f.read_exact_at(&mut index, index_off).ctx("read", path)?;
    if check_hash && Digest::of(&index).0 != footer[16..48] {
        return Ok(Index::Bad);
    }
    let entries: Vec<Entry> = index.chunks_exact(ENTRY_LEN).map(decode_entry).collect();
    if entries
        .iter()
        .any(|e| e.offset.saturating_add(e.len as u64) > index_off)
    {
        return Ok(Index::Bad);
    }
    Ok(Index::Entries(entries))
}

fn decode_entry(b: &[u8]) -> Entry {
    Entry {
        id: Digest(b[..32].try_into().unwrap()),
        offset: u64::from_le_bytes(b[32..40].try_into().unwrap()),
        len: u32::from_le_bytes(b[40..44].try_into().unwrap()),
    }
}

/// A pack being written. Frames may be added from many threads at once; nothing is visible
/// until [`PackWriter::commit`]; dropping an uncommitted writer removes its file.
pub(crate) struct PackWriter {
    tmp: PathBuf,
    file: File,
    state: Mutex<WriterState>,
}

#[derive(Default)]
struct WriterState {
    end: u64,
    entries: Vec<Entry>,
    writeback_from: u64,
    done: bool,
}

impl PackWriter {
    pub(crate) fn create(tmp_dir: &Path) -> Result<PackWriter> {
        let tmp = fsutil::tmp_name(tmp_dir);
        let file = File::create(&tmp).ctx("create", &tmp)?;
        Ok(PackWriter {
            tmp,
            file,
            state: Mutex::default(),
        })
    }

    /// Appends one frame (safe to call from several threads).
    pub(crate) fn add(&self, id: &ChunkId, frame: &[u8]) -> Result<()> {
        let (offset, writeback) = {
            let mut st = self.state.lock().unwrap();
            let offset = st.end;
            st.end += frame.len() as u64;
            st.entries.push(Entry {
                id: *id,
                offset,
                len: frame.len() as u32,
            });
            let wb = (st.end - st.writeback_from >= WRITEBACK_EVERY).then(|| {
                let from = st.writeback_from;
                st.writeback_from = offset;
                (from, offset - from)
            });
            (offset, wb)
        };
        self.file
            .write_all_at(frame, offset)
            .ctx("write", &self.tmp)?;
        if let Some((from, len)) = writeback {
            // SAFETY: sync_file_range only reads the fd, which `self.file` keeps open. It starts
            // writeback of pages already written; pages still being written by another thread
            // are simply left for the final fdatasync.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    from as i64,
                    len as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
        }
        Ok(())
    }

    /// Writes the index, makes the pack durable and moves it into `packs_dir`. Returns its
    /// path and entries, or `None` when no frame was added (and nothing was written).
    pub(crate) fn commit(self, packs_dir: &Path) -> Result<Option<(PathBuf, Vec<Entry>)>> {
        let (end, entries) = {
            let mut st = self.state.lock().unwrap();
            st.done = true;
            (st.end, std::mem::take(&mut st.entries))
        };
        if entries.is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
            return Ok(None);
        }
        let res = (|| {
            let mut tail = Vec::with_capacity(entries.len() * ENTRY_LEN + FOOTER_LEN as usize);
            for e in &entries {
                tail.extend_from_slice(e.id.as_bytes());
                tail.extend_from_slice(&e.offset.to_le_bytes());
                tail.extend_from_slice(&e.len.to_le_bytes());
            }
            let hash = Digest::of(&tail);
            tail.extend_from_slice(&end.to_le_bytes());
            tail.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            tail.extend_from_slice(&0u32.to_le_bytes());
            tail.extend_from_slice(hash.as_bytes());
            tail.extend_from_slice(MAGIC);
            self.file.write_all_at(&tail, end).ctx("write", &self.tmp)?;
            self.file.sync_data().ctx("fsync", &self.tmp)?;
            let dst = packs_dir.join(format!("{}.pack", &hash.to_hex()[..32]));
            std::fs::rename(&self.tmp, &dst).ctx("rename", &dst)?;
            fsutil::fsync_dir(packs_dir)?;
            Ok(dst)
        })();
        match res {
            Ok(dst) => Ok(Some((dst, entries))),
            Err(e) => {
                let _ = std::fs::remove_file(&self.tmp);
                Err(e)
            }
        }
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if !self.state.get_mut().map(|s| s.done).unwrap_or(true) {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
