//! Least-recently-used eviction of a cache directory whose entries are each guarded by a
//! `<key>.lock` file (held shared by every build using the entry; its mtime is the last use).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// flock(2) on a file we hold open.
pub(crate) fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Keeps `keep` and the `keep_n - 1` most recently used other entries for which `present`
/// holds; `remove`s the rest, each only when its lock can be taken exclusively (no build holds
/// it). Lock files stay: a build may hold one open while its entry is evicted.
pub(crate) fn evict(
    dir: &Path,
    keep: &str,
    keep_n: usize,
    present: impl Fn(&str) -> bool,
    remove: impl Fn(&str),
) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_suffix(".lock")?.to_string();
            Some((e.metadata().ok()?.modified().ok()?, key))
        })
        .filter(|(_, k)| k != keep && present(k))
        .collect();
    entries.sort();
    entries.reverse();
    for (_, key) in entries.into_iter().skip(keep_n.saturating_sub(1)) {
        let Ok(f) = File::options()
            .write(true)
            .open(dir.join(format!("{key}.lock")))
        else {
            continue;
        };
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            continue; // in use
        }
        remove(&key);
    }
}
