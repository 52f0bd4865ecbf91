//! Step disks: the ext4 disk after each build step, as a blob that shares every unchanged chunk
//! with the disk before the step.
//!
//! A build over a base image starts from the base image's disk; each file-changing step
//! updates a plain working copy of that disk in place (debugfs, see [`crate::ext4::update_ext4`])
//! with an undo file, whose keys name exactly the blocks debugfs wrote. Only those blocks go
//! into a blockstore overlay over the previous step's disk, whose commit is the step's disk.
//! So a step costs in proportion to what it changed, never to the size of the disk or of
//! everything since the base.
//!
//! The working copy (one per chain, i.e. per base disk, in `<tmp>/step-disks/`) holds one disk
//! of the chain at a time, recorded in `<name>.id`. To continue from another disk of the
//! chain (the last cached step of a rebuild), it is moved there by rewriting only the chunks
//! in which the two disks' manifests differ, read from the store (lazily from the remote for
//! steps pulled from another machine). A `<name>.dirty` marker is set while it is being
//! changed; a working copy found dirty (a kill) is exported again from the store.

use crate::error::{Error, IoCtx, Result};
use crate::lru::flock;
use kiln_blockstore::{BlobId, Store};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Working copies kept (one per base disk); older ones not in use are removed.
const KEEP_WORK: usize = 3;

/// A chain's working copy, held exclusively for as long as this value lives.
pub(crate) struct WorkDisk {
    path: PathBuf,
    id_path: PathBuf,
    dirty: PathBuf,
    _lock: File,
}

/// The working copy of the chain that starts at `root` (the base image's disk).
pub(crate) fn open(tmp: &Path, root: &BlobId) -> Result<WorkDisk> {
    let dir = tmp.join("step-disks");
    std::fs::create_dir_all(&dir).ctx("mkdir", &dir)?;
    let name = &root.to_hex()[..32];
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ctx("open", &lock_path)?;
    flock(&lock, libc::LOCK_EX).ctx("lock", &lock_path)?;
    let _ = lock.set_modified(std::time::SystemTime::now());
    evict(&dir, name);
    Ok(WorkDisk {
        path: dir.join(format!("{name}.img")),
        id_path: dir.join(format!("{name}.id")),
        dirty: dir.join(format!("{name}.dirty")),
        _lock: lock,
    })
}

/// Removes the least recently used working copies beyond [`KEEP_WORK`] that no build holds.
fn evict(dir: &Path, keep: &str) {
    crate::lru::evict(
        dir,
        keep,
        KEEP_WORK,
        |key| dir.join(format!("{key}.img")).exists(),
        |key| {
            for ext in ["id", "img", "dirty"] {
                let _ = std::fs::remove_file(dir.join(format!("{key}.{ext}")));
            }
        },
    );
}

impl WorkDisk {
    fn mark_dirty(&self) -> Result<()> {
        let _ = std::fs::remove_file(&self.id_path);
        std::fs::write(&self.dirty, b"").ctx("write", &self.dirty)
    }

    fn mark_clean(&self, id: &BlobId) -> Result<()> {
        std::fs::write(&self.id_path, id.to_hex()).ctx("write", &self.id_path)?;
        std::fs::remove_file(&self.dirty).ctx("remove", &self.dirty)
    }

    /// The disk the working copy holds, if it is intact.
    fn holds(&self) -> Option<BlobId> {
        if self.dirty.exists() || !self.path.exists() {
            return None;
        }
        std::fs::read_to_string(&self.id_path)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Makes the working copy hold `want`.
    fn checkout(&self, store: &Store, want: &BlobId) -> Result<()> {
        let have = self.holds();
        if have == Some(*want) {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let wm = store.manifest(want)?;
        let hm = have
            .and_then(|h| store.manifest(&h).ok())
            .filter(|m| m.size == wm.size && m.chunk_size == wm.chunk_size);
        self.mark_dirty()?;
        let Some(hm) = hm else {
            store.export(want, &self.path)?;
            tracing::info!(disk = %want, ms = t.elapsed().as_millis() as u64, "working disk exported");
            return self.mark_clean(want);
        };
        let diff: Vec<usize> = (0..wm.chunks.len())
            .filter(|&i| wm.chunks[i] != hm.chunks[i])
            .collect();
        let f = File::options()
            .write(true)
            .open(&self.path)
            .ctx("open", &self.path)?;
        let reader = store.open_blob(want)?;
        let cs = wm.chunk_size as u64;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let first_err: std::sync::Mutex<Option<Error>> = Default::default();
        // Several at once: chunks of a disk pulled from a remote are fetched on read.
        std::thread::scope(|s| {
            for _ in 0..4.min(diff.len()) {
                s.spawn(|| {
                    let mut buf = vec![0u8; cs as usize];
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&i) = diff.get(k) else { return };
                        let off = i as u64 * cs;
                        let len = wm.chunk_len(i);
                        let r = if wm.chunks[i].is_none() {
                            punch_hole(&f, off, len as u64).ctx("punch hole", &self.path)
                        } else {
                            reader
                                .read_at(off, &mut buf[..len])
                                .map_err(Error::from)
                                .and_then(|_| {
                                    f.write_all_at(&buf[..len], off).ctx("write", &self.path)
                                })
                        };
                        if let Err(e) = r {
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
        tracing::info!(
            disk = %want,
            chunks = diff.len(),
            ms = t.elapsed().as_millis() as u64,
            "working disk moved"
        );
        self.mark_clean(want)
    }

    /// The disk `from` updated to hold the tree `root`, given the tree `base` it holds now
    /// (plus `extra_base`) and every path that may differ (see [`crate::ext4::update_ext4`]).
    /// None when the disk lacks room (or a path cannot be given to debugfs): the caller
    /// then makes a fresh file system.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        store: &Store,
        from: &BlobId,
        base: &Path,
        extra_base: &[(&str, bool)],
        root: &Path,
        changed: &BTreeSet<PathBuf>,
        scratch: &Path,
    ) -> Result<Option<BlobId>> {
        self.checkout(store, from)?;
        let t = std::time::Instant::now();
        std::fs::create_dir_all(scratch).ctx("mkdir", scratch)?;
        let undo = scratch.join("undo");
        self.mark_dirty()?;
        let fits =
            crate::ext4::update_ext4(&self.path, base, extra_base, root, changed, Some(&undo))?;
        if !fits {
            self.mark_clean(from)?; // untouched
            return Ok(None);
        }
        let debugfs_ms = t.elapsed().as_millis() as u64;
        let ranges = crate::ext4::undo_ranges(&undo)?;
        let _ = std::fs::remove_file(&undo);
        let img = File::open(&self.path).ctx("open", &self.path)?;
        let size = img.metadata().ctx("stat", &self.path)?.len();
        let ov_dir = scratch.join("overlay");
        let ov = store.create_overlay(Some(from), size, &ov_dir)?;
        let res = (|| {
            let mut buf = Vec::new();
            let mut bytes = 0u64;
            for &(off, len) in &ranges {
                let len = len.min(size.saturating_sub(off));
                if len == 0 {
                    continue;
                }
                buf.resize(len as usize, 0);
                img.read_exact_at(&mut buf, off).ctx("read", &self.path)?;
                ov.write_at(off, &buf)?;
                bytes += len;
            }
            Ok::<_, Error>((ov.commit()?, bytes))
        })();
        let discard = ov.discard();
        let (id, bytes) = res?;
        discard?;
        self.mark_clean(&id)?;
        tracing::info!(
            changed_paths = changed.len(),
            written_bytes = bytes,
            debugfs_ms,
            total_ms = t.elapsed().as_millis() as u64,
            "step disk"
        );
        Ok(Some(id))
    }
}

fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an fd we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
