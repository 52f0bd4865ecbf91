//! Stage root file systems for builds: an extracted base tree, cached between builds, under an
//! overlayfs with one upper directory per step.
//!
//! Extracting a 200 MB base for every build cost more than the rest of the build together. So
//! the tree of a FROM image's layers is extracted once into `<tmp>/rootfs-cache/<key>` and only
//! ever used as a read-only overlayfs lower directory. A stage mounts
//! `lowerdir=<sealed uppers, newest first>:<base>` with a fresh upper directory; a step that
//! needs its own diff (RUN) first seals the current upper (it becomes a lower) so that after the
//! command the new upper holds exactly what the step changed: the layer is written from it
//! instead of scanning the whole tree before and after. The union of all upper directories is
//! what the stage changed against the base, which the final ext4 uses to update the base
//! image's disk instead of making a new one.
//!
//! Cache entries are guarded by flock: shared while a build uses the tree, exclusive while it is
//! extracted or evicted, so eviction never pulls a lower directory out from under a mount.

use crate::error::{Error, IoCtx, Result};
use blockstore::{BlobId, Store};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Extracted trees kept; older ones (not in use) are removed.
const KEEP_TREES: usize = 3;

/// overlayfs takes its options in one page; stay well below.
const MAX_MOUNT_OPTS: usize = 3500;

/// A cached, extracted base tree, held (shared lock) for as long as this value lives.
pub(crate) struct BaseTree {
    pub path: PathBuf,
    _lock: File,
}

fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn cache_dir(tmp: &Path) -> PathBuf {
    tmp.join("rootfs-cache")
}

/// The key of a layer list: names its cache entry.
pub(crate) fn layers_key(layers: &[BlobId]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"kiln-rootfs-v1");
    for l in layers {
        h.update(l.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// The extracted tree of `layers`, from the cache or extracted now.
///
/// Locks: `<key>.lock` is held shared by every user and taken exclusive only by eviction,
/// without waiting; `<key>.extract` is held exclusive while extracting. A holder of either
/// never waits for another lock, so builds (even two stages of one build) cannot deadlock.
pub(crate) fn base_tree(store: &Store, tmp: &Path, layers: &[BlobId]) -> Result<BaseTree> {
    let dir = cache_dir(tmp);
    std::fs::create_dir_all(&dir).ctx("mkdir", &dir)?;
    let key = layers_key(layers);
    let path = dir.join(&key);
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(p)
            .ctx("open", p)
    };
    let lock_path = dir.join(format!("{key}.lock"));
    let lock = open(&lock_path)?;
    flock(&lock, libc::LOCK_SH).ctx("lock", &lock_path)?;
    // Last use, for eviction.
    let _ = lock.set_modified(std::time::SystemTime::now());
    if !complete(&dir, &key) {
        let ex_path = dir.join(format!("{key}.extract"));
        let ex = open(&ex_path)?;
        flock(&ex, libc::LOCK_EX).ctx("lock", &ex_path)?;
        if !complete(&dir, &key) {
            let _ = std::fs::remove_dir_all(&path);
            let t = std::time::Instant::now();
            let staging = dir.join(format!("{key}.tmp"));
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).ctx("mkdir", &staging)?;
            if let Err(e) = crate::image::materialize(store, layers, &staging) {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
            std::fs::rename(&staging, &path).ctx("rename", &path)?;
            // The marker lives next to the tree, not in it (the tree is a lower directory).
            std::fs::write(dir.join(format!("{key}.complete")), b"").ctx("write", &dir)?;
            tracing::info!(
                layers = layers.len(),
                ms = t.elapsed().as_millis() as u64,
                "base tree extracted into the cache"
            );
        }
    }
    evict(&dir, &key);
    Ok(BaseTree { path, _lock: lock })
}

/// Keeps `tree`, a staging tree just made from `layers` (and given to
/// [`crate::image::commit_rootfs`], which added the guest config), as the cache entry of those
/// layers, so the first build over a freshly pulled or imported image does not extract it
/// again. Moves the tree (same file system); best effort: failures only cost that extraction.
pub(crate) fn adopt_tree(tmp: &Path, layers: &[BlobId], tree: &Path) {
    let dir = cache_dir(tmp);
    let key = layers_key(layers);
    let res = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{key}.lock")))?;
        flock(&lock, libc::LOCK_SH)?;
        let _ = lock.set_modified(std::time::SystemTime::now());
        if complete(&dir, &key) {
            return Ok(());
        }
        let ex = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{key}.extract")))?;
        flock(&ex, libc::LOCK_EX)?;
        if complete(&dir, &key) {
            return Ok(());
        }
        // The tree must be exactly the layers' result: drop the config commit_rootfs wrote.
        let kiln = tree.join(".kiln");
        let _ = std::fs::remove_file(tree.join(crate::image::CONFIG_PATH_IN_DISK));
        let _ = std::fs::remove_dir(&kiln);
        let _ = std::fs::remove_dir_all(dir.join(&key));
        std::fs::rename(tree, dir.join(&key))?;
        std::fs::write(dir.join(format!("{key}.complete")), b"")?;
        Ok(())
    })();
    match res {
        Ok(()) => evict(&dir, &key),
        Err(e) => tracing::warn!(error = %e, "could not keep the extracted tree"),
    }
}

/// Whether the cache entry `key` is complete.
fn complete(dir: &Path, key: &str) -> bool {
    dir.join(format!("{key}.complete")).exists() && dir.join(key).is_dir()
}

/// Removes the least recently used trees beyond [`KEEP_TREES`] that no build holds.
fn evict(dir: &Path, keep: &str) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    // Lock files stay (a user may hold one open while it is evicted); only trees go.
    let mut entries: Vec<(std::time::SystemTime, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_suffix(".lock")?.to_string();
            if !dir.join(&key).exists() {
                return None;
            }
            let t = e.metadata().ok()?.modified().ok()?;
            Some((t, key))
        })
        .collect();
    entries.sort();
    entries.reverse();
    for (_, key) in entries.into_iter().skip(KEEP_TREES) {
        if key == keep {
            continue;
        }
        let lock_path = dir.join(format!("{key}.lock"));
        let Ok(f) = File::options().write(true).open(&lock_path) else {
            continue;
        };
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            continue; // in use
        }
        let _ = std::fs::remove_file(dir.join(format!("{key}.complete")));
        let _ = std::fs::remove_dir_all(dir.join(&key));
        let _ = std::fs::remove_file(dir.join(format!("{key}.disk")));
        for ext in ["diskid", "work", "dirty"] {
            let _ = std::fs::remove_file(dir.join(format!("{key}.{ext}")));
        }
        tracing::info!(key, "evicted cached base tree");
    }
}

/// The cached plain copy of a base disk blob (`base`, never written) and a working copy
/// (`work`) that a build updates in place and then restores sector by sector from `base`, so no
/// build copies the whole disk. Held exclusively for as long as this value lives; a working
/// copy left dirty by a crash is made again from `base`. Evicted with the tree of `tree_key`.
pub(crate) struct DiskPair {
    pub base: PathBuf,
    pub work: PathBuf,
    dirty: PathBuf,
    _lock: File,
}

impl DiskPair {
    /// From here until [`DiskPair::mark_clean`], `work` may differ from `base`.
    pub fn mark_dirty(&self) -> Result<()> {
        std::fs::write(&self.dirty, b"").ctx("write", &self.dirty)
    }

    pub fn mark_clean(&self) -> Result<()> {
        std::fs::remove_file(&self.dirty).ctx("remove", &self.dirty)
    }
}

pub(crate) fn disk_pair(
    store: &Store,
    tmp: &Path,
    tree_key: &str,
    disk: &BlobId,
) -> Result<DiskPair> {
    let dir = cache_dir(tmp);
    let lock_path = dir.join(format!("{tree_key}.disklock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ctx("open", &lock_path)?;
    flock(&lock, libc::LOCK_EX).ctx("lock", &lock_path)?;
    let base = dir.join(format!("{tree_key}.disk"));
    let work = dir.join(format!("{tree_key}.work"));
    let dirty = dir.join(format!("{tree_key}.dirty"));
    let id_path = dir.join(format!("{tree_key}.diskid"));
    if !base.exists() || std::fs::read_to_string(&id_path).ok().as_deref() != Some(&disk.to_hex()) {
        let _ = std::fs::remove_file(&id_path);
        let _ = std::fs::remove_file(&work);
        store.export(disk, &base)?;
        std::fs::write(&id_path, disk.to_hex()).ctx("write", &id_path)?;
    }
    if !work.exists() || dirty.exists() {
        crate::image::sparse_copy(&base, &work)?;
        let _ = std::fs::remove_file(&dirty);
    }
    Ok(DiskPair {
        base,
        work,
        dirty,
        _lock: lock,
    })
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Invalid("path with NUL".into()))
}

/// A stage's root: overlayfs over a base tree and the stage's sealed upper directories.
pub(crate) struct OverlayRoot {
    dir: PathBuf,
    base: Option<BaseTree>,
    /// Sealed upper directories, bottom first.
    sealed: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
    next: usize,
    mounted: bool,
}

impl OverlayRoot {
    /// A root in `dir` (created, must be on a file system overlayfs accepts as upper: tmpfs,
    /// ext4, xfs) over `base` (None: an empty root).
    pub fn new(dir: &Path, base: Option<BaseTree>) -> Result<OverlayRoot> {
        std::fs::create_dir_all(dir).ctx("mkdir", dir)?;
        let merged = dir.join("m");
        std::fs::create_dir_all(&merged).ctx("mkdir", &merged)?;
        std::fs::create_dir_all(dir.join("empty")).ctx("mkdir", dir)?;
        let mut r = OverlayRoot {
            dir: dir.to_path_buf(),
            base,
            sealed: Vec::new(),
            upper: PathBuf::new(),
            work: PathBuf::new(),
            merged,
            next: 0,
            mounted: false,
        };
        r.fresh_upper()?;
        Ok(r)
    }

    fn fresh_upper(&mut self) -> Result<()> {
        self.upper = self.dir.join(format!("u{}", self.next));
        self.work = self.dir.join(format!("w{}", self.next));
        self.next += 1;
        for d in [&self.upper, &self.work] {
            std::fs::create_dir_all(d).ctx("mkdir", d)?;
        }
        Ok(())
    }

    /// The base tree (lowest layer), if any.
    pub fn base(&self) -> Option<&Path> {
        self.base.as_ref().map(|b| b.path.as_path())
    }

    /// The merged root, mounted if it is not.
    pub fn root(&mut self) -> Result<PathBuf> {
        if !self.mounted {
            self.mount()?;
        }
        Ok(self.merged.clone())
    }

    fn mount(&mut self) -> Result<()> {
        let mut lowers: Vec<String> = self
            .sealed
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        lowers.push(match &self.base {
            Some(b) => b.path.display().to_string(),
            None => self.dir.join("empty").display().to_string(),
        });
        if lowers.iter().any(|l| l.contains([':', ',', '\\'])) {
            return Err(Error::Build(format!(
                "build directory {} has a character overlayfs cannot take (':', ',' or '\\')",
                self.dir.display()
            )));
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,index=off,metacopy=off,xino=off",
            lowers.join(":"),
            self.upper.display(),
            self.work.display()
        );
        if opts.len() > MAX_MOUNT_OPTS {
            return Err(Error::Build(format!(
                "too many file-changing steps in one stage ({}) for overlayfs's option page",
                self.sealed.len()
            )));
        }
        let src = CString::new("overlay").expect("no NUL");
        let target = cstr(&self.merged)?;
        let data = CString::new(opts).map_err(|_| Error::Invalid("path with NUL".into()))?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(Error::Build(format!(
                "cannot mount the stage's overlayfs at {} (needs root and overlayfs): {}",
                self.merged.display(),
                std::io::Error::last_os_error()
            )));
        }
        self.mounted = true;
        Ok(())
    }

    /// Unmounts the merged root (changes stay in the upper directory).
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        let target = cstr(&self.merged)?;
        // SAFETY: valid NUL-terminated path.
        let r = unsafe { libc::umount2(target.as_ptr(), 0) };
        if r != 0 {
            // Something (a leftover process) still holds it: detach so the build can go on.
            // SAFETY: as above.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        self.mounted = false;
        Ok(())
    }

    /// Makes the current upper directory a lower one, so the next changes land in a fresh,
    /// empty upper. Nothing happens if the current upper is empty.
    pub fn seal(&mut self) -> Result<()> {
        let empty = std::fs::read_dir(&self.upper)
            .ctx("read dir", &self.upper)?
            .next()
            .is_none();
        if empty {
            return Ok(());
        }
        self.unmount()?;
        self.sealed.push(self.upper.clone());
        let _ = std::fs::remove_dir_all(&self.work);
        self.fresh_upper()
    }

    /// The current upper directory (the changes since the last seal).
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// Every upper directory, bottom first: together, what the stage changed on its base.
    pub fn uppers(&self) -> Vec<PathBuf> {
        let mut v = self.sealed.clone();
        v.push(self.upper.clone());
        v
    }
}

impl Drop for OverlayRoot {
    fn drop(&mut self) {
        if self.mounted {
            if let Ok(t) = cstr(&self.merged) {
                // SAFETY: valid NUL-terminated path.
                unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
            }
            self.mounted = false;
        }
    }
}

/// Records this process as the owner of a build directory (see [`clean_stale_builds`]).
pub(crate) fn claim_build_dir(dir: &Path) -> Result<()> {
    let p = dir.join("owner.pid");
    std::fs::write(&p, std::process::id().to_string()).ctx("write", &p)
}

/// Unmounts and removes build directories whose `kiln build` died without cleaning up (killed
/// with SIGKILL): their stage overlays stay mounted otherwise. Only directories whose recorded
/// owner process no longer exists are touched.
pub(crate) fn clean_stale_builds(tmp: &Path) {
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("build-") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(dir.join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if alive {
            continue;
        }
        let Ok(stages) = std::fs::read_dir(&dir) else {
            continue;
        };
        for st in stages.filter_map(|e| e.ok()) {
            let m = st.path().join("m");
            if let Ok(c) = cstr(&m) {
                // SAFETY: valid NUL-terminated path; EINVAL when it is not a mount point.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        // Only remove what is no longer mounted: a failed unmount leaves the directory.
        let still_mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|mi| mi.contains(&*dir.to_string_lossy()))
            .unwrap_or(true);
        if !still_mounted {
            let _ = std::fs::remove_dir_all(&dir);
            tracing::info!(dir = %dir.display(), pid, "removed a dead build's directory");
        }
    }
}
