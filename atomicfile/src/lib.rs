//! Replacing a file atomically: readers see the old file or the whole new one, never a part,
//! and a writer killed half-way leaves only a temp file beside it (named `.NAME.tmp.*`).
//!
//! The temp name is unique per process, thread and call, so concurrent writers of one file
//! (threads of `kiln serve`, two CLIs) never write into each other's temp file; the last
//! rename wins. Created with `O_EXCL` and the final mode, so a private file is never readable
//! by others, not even as a temp file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How the new file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Mode 0600 (tokens, keys, records holding them) instead of 0644.
    pub private: bool,
    /// fsync the file before the rename and its directory after: the new content survives a
    /// crash of the machine, not only of the process.
    pub durable: bool,
}

impl Options {
    pub const PLAIN: Options = Options {
        private: false,
        durable: false,
    };
    pub const DURABLE: Options = Options {
        private: false,
        durable: true,
    };
    pub const PRIVATE_DURABLE: Options = Options {
        private: true,
        durable: true,
    };
}

fn temp_path(path: &Path) -> io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Ok(path.with_file_name(format!(
        ".{}.tmp.{}.{seq}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Replaces `path` with `bytes` (creates it if missing); its directory must exist.
pub fn write(path: &Path, bytes: &[u8], opts: Options) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if opts.private { 0o600 } else { 0o644 })
            .open(&tmp)?;
        f.write_all(bytes)?;
        if opts.durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if opts.durable {
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write(&p, b"one", Options::PLAIN).unwrap();
        write(&p, b"two", Options::DURABLE).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o600, 0o600);
        write(&p, b"secret", Options::PRIVATE_DURABLE).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "private whatever the file was");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["f.json"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write(&p, b"old", Options::PLAIN).unwrap();
        // A directory where the file should go: the rename fails.
        let q = d.path().join("dir");
        std::fs::create_dir(&q).unwrap();
        std::fs::write(q.join("x"), b"").unwrap();
        assert!(write(&q, b"new", Options::PLAIN).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
        assert!(write(Path::new("/"), b"x", Options::PLAIN).is_err());
    }

    #[test]
    fn concurrent_writers_never_mix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..50 {
                        write(p, &[t; 4096], Options::PLAIN).unwrap();
                    }
                });
            }
        });
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 4096);
        assert!(b.iter().all(|&x| x == b[0]));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
