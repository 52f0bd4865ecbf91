//! Deterministic ext4 images from a directory tree, with e2fsprogs.
//!
//! `mkfs.ext4 -d` copies the tree (sorted by name), but stamps inodes with the source files'
//! ctime/atime, which no one can set on the host. So after mkfs, `debugfs` rewrites those fields
//! on every used inode to a fixed time; with a fixed UUID, hash seed and E2FSPROGS_FAKE_TIME the
//! same tree then gives the same bytes, hence the same blob id.

use crate::error::{Error, IoCtx, Result};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The time every inode and the superblock carry (SOURCE_DATE_EPOCH style; 0 = 1970).
pub const FIXED_TIME: u64 = 0;

/// E2FSPROGS_FAKE_TIME for the superblock (0 would mean "unset" to e2fsprogs).
const MKFS_FAKE_TIME: &str = "1";

/// Bytes a tree needs, roughly: file data rounded to blocks plus an inode per entry.
pub fn tree_bytes(root: &Path) -> Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut inodes = 1u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ctx("read dir", &d)? {
            let e = e.ctx("read dir", &d)?;
            let m = e.metadata().ctx("lstat", e.path())?;
            inodes += 1;
            bytes += m.size().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// A disk size for a tree: room for the content twice over plus 64 MiB, rounded to 4 MiB.
/// Free space costs nothing in the store (all-zero chunks are not stored).
pub fn disk_size_for(content_bytes: u64) -> u64 {
    let raw = content_bytes * 2 + (64 << 20);
    raw.div_ceil(4 << 20) * (4 << 20)
}

/// Makes `out` an ext4 image of `root`, `size` bytes, with a UUID derived from `seed`.
pub fn make_ext4(root: &Path, out: &Path, size: u64, seed: &[u8]) -> Result<()> {
    let h = blake3::hash(seed);
    let b = h.as_bytes();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&b[0..4]),
        hex::encode(&b[4..6]),
        hex::encode(&b[6..8]),
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    );
    let hash_seed = format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&b[16..20]),
        hex::encode(&b[20..22]),
        hex::encode(&b[22..24]),
        hex::encode(&b[24..26]),
        hex::encode(&b[26..32])
    );
    let _ = std::fs::remove_file(out);
    let f = std::fs::File::create(out).ctx("create", out)?;
    f.set_len(size).ctx("truncate", out)?;
    drop(f);
    let (_, inodes) = tree_bytes(root)?;
    let inode_count = (inodes * 2 + 8192).to_string();
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-I",
            "256",
            "-m",
            "0",
            "-L",
            "kiln-root",
        ])
        .args(["-N", &inode_count])
        .args(["-U", &uuid])
        .arg("-E")
        .arg(format!(
            "hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=0,nodiscard"
        ))
        .arg("-d")
        .arg(root)
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", MKFS_FAKE_TIME)
        .env("SOURCE_DATE_EPOCH", FIXED_TIME.to_string())
        .env("MKE2FS_CONFIG", "/etc/mke2fs.conf")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Mkfs(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}")))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(Error::Mkfs(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    fix_times(out)
}

/// Rewrites ctime/atime (and their nanosecond parts) of every used inode to [`FIXED_TIME`].
fn fix_times(img: &Path) -> Result<()> {
    let dump = Command::new("dumpe2fs")
        .arg(img)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| Error::Mkfs(format!("cannot run dumpe2fs: {e}")))?;
    let text = String::from_utf8_lossy(&dump.stdout);
    let mut per_group = 0u64;
    let mut groups_free: Vec<Vec<(u64, u64)>> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Inodes per group:") {
            per_group = v.trim().parse().unwrap_or(0);
        } else if l.starts_with("Group ") && l.contains(": (Blocks") {
            groups_free.push(Vec::new());
        } else if let Some(v) = l.strip_prefix("Free inodes:") {
            if let Some(g) = groups_free.last_mut() {
                for r in v.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                        g.push((a, b));
                    }
                }
            }
        }
    }
    if per_group == 0 || groups_free.is_empty() {
        return Err(Error::Mkfs("cannot read inode layout from dumpe2fs".into()));
    }
    let mut script = String::new();
    let t = format!("{FIXED_TIME:#x}");
    for (g, free) in groups_free.iter().enumerate() {
        let first = g as u64 * per_group + 1;
        for ino in first..first + per_group {
            if free.iter().any(|&(a, b)| ino >= a && ino <= b) {
                continue;
            }
            // Reserved inodes below 11 other than the root (2) hold no file.
            if ino < 11 && ino != 2 {
                continue;
            }
            for field in ["ctime", "atime"] {
                script.push_str(&format!("sif <{ino}> {field} {t}\n"));
            }
            for field in ["ctime_extra", "atime_extra"] {
                script.push_str(&format!("sif <{ino}> {field} 0\n"));
            }
        }
    }
    // A script file (not stdin): debugfs echoes every command, and a pipe both ways deadlocks.
    let script_path = img.with_extension("debugfs");
    std::fs::write(&script_path, script).ctx("write", &script_path)?;
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(img)
        .env("E2FSPROGS_FAKE_TIME", MKFS_FAKE_TIME)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Mkfs(format!("cannot run debugfs: {e}")))?;
    let _ = std::fs::remove_file(&script_path);
    let err = String::from_utf8_lossy(&out.stderr);
    let bad: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !out.status.success() || !bad.is_empty() {
        return Err(Error::Mkfs(format!(
            "debugfs: {}",
            bad.iter().take(5).copied().collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path, reverse: bool) {
        let mut names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
        if reverse {
            names.reverse();
        }
        std::fs::create_dir(root.join("d")).unwrap();
        for n in &names {
            let p = root.join("d").join(n);
            std::fs::write(&p, n.repeat(100)).unwrap();
            crate::layer::set_mtime(&p, 1000).unwrap();
        }
        crate::layer::set_mtime(&root.join("d"), 1000).unwrap();
        crate::layer::set_mtime(root, 1000).unwrap();
    }

    #[test]
    fn same_tree_same_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tree(a.path(), false);
        // Different creation order and a later ctime: the image must not change.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        tree(b.path(), true);
        let out = tempfile::tempdir().unwrap();
        let (ia, ib) = (out.path().join("a"), out.path().join("b"));
        make_ext4(a.path(), &ia, 16 << 20, b"seed").unwrap();
        make_ext4(b.path(), &ib, 16 << 20, b"seed").unwrap();
        assert!(std::fs::read(&ia).unwrap() == std::fs::read(&ib).unwrap());
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&ia)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
}
