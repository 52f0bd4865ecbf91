//! Small filesystem helpers: atomic durable writes, directory fsync, flock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};

/// A fresh, unique temporary path inside `dir` (unique across processes and threads).
pub(crate) fn tmp_name(dir: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{}.{}.tmp", std::process::id(), n))
}

/// Write `bytes` to `tmp`, fsync it, rename it to `dst` and fsync `dst`'s directory:
/// readers see either nothing or the whole file, also after a crash.
pub(crate) fn write_durable(tmp: &Path, dst: &Path, bytes: &[u8]) -> Result<()> {
    let res = (|| {
        let mut f = File::create(tmp).ctx("create", tmp)?;
        f.write_all(bytes).ctx("write", tmp)?;
        f.sync_data().ctx("fsync", tmp)?;
        std::fs::rename(tmp, dst).ctx("rename", dst)?;
        fsync_dir(dst.parent().unwrap_or(Path::new(".")))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    res
}

/// Write `bytes` to `tmp` and rename it to `dst`, without fsync: readers see either nothing or
/// the whole file now, but a crash may lose it. For files made durable later as a group.
pub(crate) fn write_visible(tmp: &Path, dst: &Path, bytes: &[u8]) -> Result<()> {
    let res = (|| {
        let mut f = File::create(tmp).ctx("create", tmp)?;
        f.write_all(bytes).ctx("write", tmp)?;
        std::fs::rename(tmp, dst).ctx("rename", dst)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    res
}

/// fsync a file that already exists.
pub(crate) fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .ctx("fsync", path)
}

/// fsync a directory so renames/creates inside it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync dir", dir)
}

/// A held flock; released on drop (also by the kernel when the process dies).
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Block until the lock at `path` is held, shared or exclusive.
    pub(crate) fn acquire(path: &Path, exclusive: bool) -> Result<FileLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx("open lock", path)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on an fd we own; no memory is involved.
            let r = unsafe { libc::flock(file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(FileLock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("flock", path, e));
            }
        }
    }
}

/// Read a file, mapping "does not exist" to `Ok(None)`.
pub(crate) fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// Remove a file, ignoring "does not exist".
pub(crate) fn remove_opt(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}
