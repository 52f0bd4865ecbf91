//! Deterministic ext4 images from a directory tree, with e2fsprogs.
//!
//! `mkfs.ext4 -d` copies the tree (sorted by name), but stamps inodes with the source files'
//! ctime/atime, which no one can set on the host. So after mkfs, `debugfs` rewrites those fields
//! on every used inode to a fixed time; with a fixed UUID, hash seed and E2FSPROGS_FAKE_TIME the
//! same tree then gives the same bytes, hence the same blob id.

use crate::error::{Error, IoCtx, Result};
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
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
    run_debugfs(img, &script, None)
}

/// Free blocks, free inodes and block size of an ext4 image, read from its superblock (at
/// byte 1024; the counts e2fsprogs keeps there and `dumpe2fs -h` prints, without a process).
fn free_space(img: &Path) -> Result<(u64, u64, u64)> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    std::fs::File::open(img)
        .and_then(|f| f.read_exact_at(&mut sb, 1024))
        .ctx("read superblock", img)?;
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes")) as u64;
    if u16_at(0x38) != 0xEF53 {
        return Err(Error::Mkfs(format!(
            "{} is not an ext4 image",
            img.display()
        )));
    }
    let mut free_blocks = u32_at(0x0C);
    // 64bit feature (incompat 0x80): the high half of the count.
    if u32_at(0x60) & 0x80 != 0 {
        free_blocks |= u32_at(0x158) << 32;
    }
    Ok((free_blocks, u32_at(0x10), 1024u64 << u32_at(0x18).min(6)))
}

/// `lstat` of `rel` below `root`, None if it or any parent is missing or a parent is not a
/// real directory (symlinks in the image must never resolve on the host).
fn lstat_in(root: &Path, rel: &Path) -> Option<std::fs::Metadata> {
    let mut p = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        p.push(c);
        let m = std::fs::symlink_metadata(&p).ok()?;
        if i + 1 == comps.len() {
            return Some(m);
        }
        if !m.is_dir() {
            return None;
        }
    }
    std::fs::symlink_metadata(root).ok()
}

/// A path as a debugfs argument (quoted), or None where debugfs cannot take it.
fn q(p: &Path) -> Option<String> {
    let s = p.to_str()?;
    if s.contains(['"', '\\', '\n', '\r']) || s.chars().any(|c| c.is_control()) {
        return None;
    }
    Some(format!("\"{s}\""))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Updates `img`, an ext4 image of the tree `base` (plus whatever `extra_base` names: paths
/// the image has that the tree lacks), in place so that it holds the tree `root`, given every
/// path where `root` may differ from `base` (`changed`, relative). The changes are written by
/// debugfs in path order with fixed times, so the same image and trees give the same bytes.
///
/// Returns false (image untouched) when the image lacks room for the change or a path cannot
/// be expressed to debugfs; the caller then makes a fresh image.
pub fn update_ext4(
    img: &Path,
    base: &Path,
    extra_base: &[(&str, bool)],
    root: &Path,
    changed: &BTreeSet<PathBuf>,
    undo: Option<&Path>,
) -> Result<bool> {
    let mut plan = DebugfsPlan {
        base,
        extra_base,
        root,
        changed,
        // The superblock's write time comes from this clock; 0 would mean "the real time".
        script: format!("set_current_time @{MKFS_FAKE_TIME}\n"),
        fix: Vec::new(),
        dirs: Vec::new(),
        removed: Vec::new(),
        links: HashMap::new(),
        need_blocks: 0,
        need_inodes: 0,
    };
    if plan.make().is_none() {
        tracing::info!("a changed path cannot be given to debugfs: full mkfs");
        return Ok(false);
    }
    let (free_blocks, free_inodes, block_size) = free_space(img)?;
    let need_blocks = plan.need_blocks * 4096 / block_size.max(1);
    let need_inodes = plan.need_inodes;
    if need_blocks + need_blocks / 8 + 1024 > free_blocks || need_inodes + 256 > free_inodes {
        tracing::info!(
            need_blocks,
            free_blocks,
            need_inodes,
            free_inodes,
            "base disk too small for the change: full mkfs"
        );
        return Ok(false);
    }
    run_debugfs(img, &plan.script, undo)?;
    Ok(true)
}

/// The debugfs script that turns the base tree's disk into the new tree's, and what it needs.
/// Its steps return None for a path debugfs cannot be given (the caller then runs mkfs).
struct DebugfsPlan<'a> {
    base: &'a Path,
    /// Paths the base has beyond its tree (the mount points): (path, is a directory)
    extra_base: &'a [(&'a str, bool)],
    root: &'a Path,
    changed: &'a BTreeSet<PathBuf>,
    script: String,
    /// Inodes created or changed: their times are fixed at the end.
    fix: Vec<PathBuf>,
    /// Directories whose metadata is set last (adding and removing entries touches it).
    dirs: Vec<(PathBuf, std::fs::Metadata)>,
    removed: Vec<PathBuf>,
    /// Hard-linked files by (dev, inode): the first path written and the link count.
    links: HashMap<(u64, u64), (PathBuf, u64)>,
    need_blocks: u64,
    need_inodes: u64,
}

impl DebugfsPlan<'_> {
    fn make(&mut self) -> Option<()> {
        for rel in self.changed {
            if rel.as_os_str().is_empty() || self.removed.iter().any(|r| rel.starts_with(r)) {
                continue;
            }
            self.change(rel)?;
        }
        self.finish()
    }

    /// Some(is a directory) if the base has `rel`.
    fn base_has(&self, rel: &Path) -> Option<bool> {
        if let Some(&(_, d)) = self.extra_base.iter().find(|(p, _)| Path::new(p) == rel) {
            return Some(d);
        }
        lstat_in(self.base, rel).map(|m| m.is_dir())
    }

    /// One changed path: removed, merged (a directory over a directory), kept (unchanged), or
    /// replaced by what the new tree has.
    fn change(&mut self, rel: &PathBuf) -> Option<()> {
        let old = self.base_has(rel);
        let Some(m) = lstat_in(self.root, rel) else {
            if let Some(d) = old {
                self.rm_tree(rel, d)?;
                self.removed.push(rel.clone());
            }
            return Some(());
        };
        if let Some(old_dir) = old {
            if old_dir && m.is_dir() {
                self.remove_children_gone(rel)?;
                self.dirs.push((rel.clone(), m));
                return Some(());
            }
            // Unchanged files stay where they are (a step may copy up without change).
            if !old_dir && self.unchanged(rel, &m) {
                return Some(());
            }
            self.rm_tree(rel, old_dir)?;
            if old_dir {
                self.removed.push(rel.clone());
            }
        }
        self.create(rel, m)
    }

    /// Children the base has and the result lacks (opaque directories list no whiteouts for
    /// them).
    fn remove_children_gone(&mut self, rel: &Path) -> Option<()> {
        let Ok(rd) = std::fs::read_dir(self.base.join(rel)) else {
            return Some(());
        };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let child = rel.join(e.file_name());
            if lstat_in(self.root, &child).is_none() && !self.changed.contains(&child) {
                let d = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                self.rm_tree(&child, d)?;
                self.removed.push(child);
            }
        }
        Some(())
    }

    /// Whether the base's non-directory `rel` is the new tree's, metadata and data.
    fn unchanged(&self, rel: &Path, m: &std::fs::Metadata) -> bool {
        let Some(bm) = lstat_in(self.base, rel) else {
            return false;
        };
        let same_meta = bm.mode() == m.mode()
            && bm.uid() == m.uid()
            && bm.gid() == m.gid()
            && bm.size() == m.size()
            && bm.mtime() == m.mtime()
            && bm.mtime_nsec() == m.mtime_nsec()
            && bm.nlink() == 1
            && m.nlink() == 1;
        same_meta
            && if m.is_file() {
                same_file(&self.base.join(rel), &self.root.join(rel))
            } else if m.file_type().is_symlink() {
                std::fs::read_link(self.base.join(rel)).ok()
                    == std::fs::read_link(self.root.join(rel)).ok()
            } else {
                bm.rdev() == m.rdev()
            }
    }

    /// Removes `rel` and, for a directory, everything below it (as the base tree has it).
    fn rm_tree(&mut self, rel: &Path, is_dir: bool) -> Option<()> {
        if is_dir {
            if let Ok(rd) = std::fs::read_dir(self.base.join(rel)) {
                let mut names: Vec<_> = rd.filter_map(|e| e.ok()).collect();
                names.sort_by_key(|e| e.file_name());
                for e in names {
                    let child = rel.join(e.file_name());
                    let d = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                    self.rm_tree(&child, d)?;
                }
            }
            self.script.push_str(&format!("rmdir {}\n", q(rel)?));
        } else {
            self.script.push_str(&format!("rm {}\n", q(rel)?));
        }
        Some(())
    }

    /// Writes the new tree's `rel` (metadata `m`) into the disk.
    fn create(&mut self, rel: &PathBuf, m: std::fs::Metadata) -> Option<()> {
        use std::os::unix::fs::FileTypeExt;
        let ft = m.file_type();
        let p = q(rel)?;
        self.need_inodes += 1;
        if ft.is_dir() {
            self.script.push_str(&format!("mkdir {p}\n"));
            self.need_blocks += 1;
            self.removed.retain(|r| r != rel);
            self.dirs.push((rel.clone(), m));
            self.fix.push(rel.clone());
            return Some(());
        } else if ft.is_file() {
            if m.nlink() > 1 {
                let e = self
                    .links
                    .entry((m.dev(), m.ino()))
                    .or_insert_with(|| (rel.clone(), 0));
                e.1 += 1;
                if e.1 > 1 {
                    let first = e.0.clone();
                    self.script.push_str(&format!("ln {} {p}\n", q(&first)?));
                    self.need_inodes -= 1;
                    return Some(());
                }
            }
            self.script
                .push_str(&format!("write {} {p}\n", q(&self.root.join(rel))?));
            self.need_blocks += m.size().div_ceil(4096) + m.size() / (4096 * 340) + 1;
        } else if ft.is_symlink() {
            let t = std::fs::read_link(self.root.join(rel)).ok()?;
            self.script.push_str(&format!("symlink {p} {}\n", q(&t)?));
            self.need_blocks += 1;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let name = q(Path::new(rel.file_name()?))?;
            let kind = if ft.is_fifo() {
                "p".to_string()
            } else {
                let (maj, min) = (libc::major(m.rdev()), libc::minor(m.rdev()));
                let c = if ft.is_char_device() { 'c' } else { 'b' };
                format!("{c} {maj} {min}")
            };
            self.script.push_str(&format!(
                "cd {}\nmknod {name} {kind}\ncd /\n",
                q(&Path::new("/").join(parent))?
            ));
        } else {
            return Some(()); // sockets are not kept in images
        }
        self.script.push_str(&set_inode_meta(&p, &m));
        self.fix.push(rel.clone());
        Some(())
    }

    /// Directory metadata, link counts, and the fixed times of every inode written.
    fn finish(&mut self) -> Option<()> {
        for (rel, m) in &self.dirs {
            self.script.push_str(&set_inode_meta(&q(rel)?, m));
            self.fix.push(rel.clone());
        }
        for (first, n) in self.links.values() {
            self.script
                .push_str(&format!("sif {} links_count {n}\n", q(first)?));
        }
        let t = format!("{FIXED_TIME:#x}");
        self.fix.sort();
        self.fix.dedup();
        for rel in &self.fix {
            let p = q(rel)?;
            for field in ["ctime", "atime", "crtime"] {
                self.script.push_str(&format!("sif {p} {field} {t}\n"));
            }
            for field in ["ctime_extra", "atime_extra", "crtime_extra", "mtime_extra"] {
                self.script.push_str(&format!("sif {p} {field} 0\n"));
            }
        }
        Some(())
    }
}

/// The byte ranges (offset, length) a debugfs run with `-z undo` wrote, from its undo file:
/// e2undo's format, a header (`E2UNDO02`, key count at 8, first key block at 24 in blocks,
/// block size at 32) and key blocks (magic 0xCADECADE, then 16-byte keys: file system block,
/// crc, size in bytes), each followed by the old data of its keys. A missing file means no
/// write; anything malformed is an error (the caller then cannot trust the image's blocks).
pub fn undo_ranges(undo: &Path) -> Result<Vec<(u64, u64)>> {
    let bytes = match std::fs::read(undo) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                what: "read",
                path: undo.to_path_buf(),
                source: e,
            })
        }
    };
    let bad = |what: &str| Error::Mkfs(format!("undo file {}: {what}", undo.display()));
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?))
    };
    if bytes.get(..8) != Some(b"E2UNDO02".as_slice()) {
        return Err(bad("not an e2undo file"));
    }
    let keys = u64_at(8).ok_or_else(|| bad("short header"))?;
    let mut blk = u64_at(24).ok_or_else(|| bad("short header"))?;
    let bs = u32_at(32).ok_or_else(|| bad("short header"))? as u64;
    if !(1024..=65536).contains(&bs) {
        return Err(bad("odd block size"));
    }
    let per_block = (bs - 16) / 16;
    let mut out = Vec::new();
    let mut left = keys;
    while left > 0 {
        let at = (blk * bs) as usize;
        if u32_at(at) != Some(0xCADE_CADE) {
            return Err(bad("key block magic missing"));
        }
        blk += 1;
        for k in 0..per_block.min(left) {
            let o = at + 16 + (k * 16) as usize;
            let fsblk = u64_at(o).ok_or_else(|| bad("short key block"))?;
            let size = u32_at(o + 12).ok_or_else(|| bad("short key block"))? as u64;
            out.push((fsblk * bs, size));
            blk += size.div_ceil(bs);
        }
        left -= per_block.min(left);
    }
    out.sort_unstable();
    Ok(out)
}

/// Runs a debugfs script (`-w`) on an image; any complaint is an error. With `undo`, debugfs
/// also writes an undo file there (see [`undo_ranges`]).
fn run_debugfs(img: &Path, script: &str, undo: Option<&Path>) -> Result<()> {
    // A script file (not stdin): debugfs echoes every command, and a pipe both ways deadlocks.
    let script_path = img.with_extension("debugfs");
    std::fs::write(&script_path, script).ctx("write", &script_path)?;
    let mut cmd = Command::new("debugfs");
    cmd.arg("-w");
    if let Some(u) = undo {
        let _ = std::fs::remove_file(u);
        cmd.arg("-z").arg(u);
    }
    let out = cmd
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

/// debugfs commands giving the (quoted) path `p` the mode, owner and mtime of `m`.
fn set_inode_meta(p: &str, m: &std::fs::Metadata) -> String {
    format!(
        "sif {p} mode 0{:o}\nsif {p} uid {}\nsif {p} gid {}\nsif {p} mtime {:#x}\n",
        m.mode(),
        m.uid(),
        m.gid(),
        m.mtime().max(0)
    )
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

    /// Every path below `root` with its type, mode, owner, size and content (no times).
    fn listing(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for e in std::fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                let r = rel.join(e.file_name());
                if r == Path::new("lost+found") {
                    continue;
                }
                let m = e.metadata().unwrap();
                let what = if m.is_dir() {
                    stack.push(r.clone());
                    String::new()
                } else if m.file_type().is_symlink() {
                    std::fs::read_link(e.path()).unwrap().display().to_string()
                } else {
                    String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned()
                };
                out.push(format!(
                    "{} {:o} {}:{} {}",
                    r.display(),
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    what
                ));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn update_in_place_matches_the_new_tree() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let (base, fin) = (t.path().join("base"), t.path().join("final"));
        for r in [&base, &fin] {
            std::fs::create_dir_all(r.join("d/sub/deeper")).unwrap();
            std::fs::write(r.join("d/a"), "a").unwrap();
            std::fs::write(r.join("d/b"), "b").unwrap();
            std::fs::write(r.join("d/sub/deeper/f"), "f").unwrap();
            std::fs::write(r.join("top"), "top").unwrap();
            std::fs::write(r.join("same"), "same").unwrap();
            std::os::unix::fs::symlink("d/a", r.join("l")).unwrap();
        }
        // The changes a build might make.
        std::fs::write(fin.join("d/a"), "changed").unwrap();
        std::fs::remove_dir_all(fin.join("d/sub")).unwrap();
        std::fs::remove_file(fin.join("top")).unwrap();
        std::fs::create_dir(fin.join("top")).unwrap();
        std::fs::write(fin.join("top/y"), "y").unwrap();
        std::fs::set_permissions(fin.join("d/b"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir(fin.join("new dir")).unwrap();
        std::fs::write(fin.join("new dir/x"), "x").unwrap();
        std::fs::hard_link(fin.join("new dir/x"), fin.join("d/h")).unwrap();
        std::fs::remove_file(fin.join("l")).unwrap();
        std::os::unix::fs::symlink("top/y", fin.join("l")).unwrap();
        let changed: BTreeSet<PathBuf> = [
            "d",
            "d/a",
            "d/b",
            "d/h",
            "d/sub",
            "top",
            "top/y",
            "new dir",
            "new dir/x",
            "l",
            "same",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let img = t.path().join("img");
        make_ext4(&base, &img, 16 << 20, b"seed").unwrap();
        let img2 = t.path().join("img2");
        std::fs::copy(&img, &img2).unwrap();
        let undo = t.path().join("undo");
        assert!(update_ext4(&img, &base, &[], &fin, &changed, Some(&undo)).unwrap());
        // The undo file names every block that changed: the untouched copy plus those
        // blocks from the updated image is the updated image.
        let ranges = undo_ranges(&undo).unwrap();
        assert!(!ranges.is_empty());
        let mut patched = std::fs::read(&img2).unwrap();
        let updated = std::fs::read(&img).unwrap();
        for &(off, len) in &ranges {
            let (a, b) = (off as usize, (off + len) as usize);
            patched[a..b].copy_from_slice(&updated[a..b]);
        }
        assert!(
            patched == updated,
            "a changed block is missing from the undo file"
        );
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let dump = Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", out.display()))
            .arg(&img)
            .output()
            .unwrap();
        assert!(dump.status.success());
        // rdump puts the root's entries into out/ itself.
        assert_eq!(listing(&out), listing(&fin));
        // The hardlink is one inode with two names.
        let stat = Command::new("debugfs")
            .args(["-R", "stat /d/h"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&stat.stdout).contains("Links: 2"));
        // Same image, same trees: same bytes, also a second later (the superblock keeps the
        // time of its last write).
        std::thread::sleep(std::time::Duration::from_millis(1100));
        // (With an undo file, as builds run it: the superblock counts the bytes a session
        // wrote, and through the undo layer that count differs.)
        let undo2 = t.path().join("undo2");
        assert!(update_ext4(&img2, &base, &[], &fin, &changed, Some(&undo2)).unwrap());
        assert!(std::fs::read(&img).unwrap() == std::fs::read(&img2).unwrap());
        // No room: nothing is touched.
        std::fs::write(fin.join("big"), vec![1u8; 32 << 20]).unwrap();
        let mut more = changed.clone();
        more.insert("big".into());
        let before = std::fs::read(&img).unwrap();
        assert!(!update_ext4(&img, &base, &[], &fin, &more, None).unwrap());
        assert!(std::fs::read(&img).unwrap() == before);
        // The superblock's counts, as dumpe2fs prints them.
        let dump = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&dump.stdout);
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap()
        };
        assert_eq!(
            free_space(&img).unwrap(),
            (
                field("Free blocks:"),
                field("Free inodes:"),
                field("Block size:")
            )
        );
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
