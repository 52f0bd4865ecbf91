//! Stage root file systems for builds: an extracted base tree, cached between builds, under an
//! overlayfs with one upper directory per step.
//!
//! Extracting a 200 MB base for every build cost more than the rest of the build together. So
//! the tree of a FROM image's layers is extracted once into `<tmp>/rootfs-cache/<key>` and only
//! ever used as a read-only overlayfs lower directory. A stage mounts
//! `lowerdir=<sealed uppers, newest first>:<base>` with a fresh upper directory; a step that
//! needs its own diff (RUN) first seals the current upper (it becomes a lower) so that after the
//! command the new upper holds exactly what the step changed: the layer is written from it
//! instead of scanning the whole tree before and after. Each step's upper directory is then
//! kept in the step-tree cache (`<tmp>/step-trees/`) and mounted as a lower directory by later
//! steps and later builds, and the step's disk is made from it ([`crate::stepdisk`]).
//!
//! Cache entries are guarded by flock: shared while a build uses the tree, exclusive while it is
//! extracted or evicted, so eviction never pulls a lower directory out from under a mount.

use crate::error::{Error, IoCtx, Result};
use crate::lru::flock;
use kiln_blockstore::{BlobId, Store};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Extracted trees kept; older ones (not in use) are removed.
const KEEP_TREES: usize = 3;

/// overlayfs takes its options in one page; stay well below.
const MAX_MOUNT_OPTS: usize = 3500;

/// A cached, extracted base tree, held (shared lock) for as long as this value lives.
pub(crate) struct BaseTree {
    pub path: PathBuf,
    _lock: Option<File>,
}

impl BaseTree {
    /// A tree no cache holds (it lives and dies with the build directory).
    pub fn uncached(path: PathBuf) -> BaseTree {
        BaseTree { path, _lock: None }
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
    evict(&dir, &key, KEEP_TREES);
    Ok(BaseTree {
        path,
        _lock: Some(lock),
    })
}

/// Upper directories of cached build steps kept; older ones (not in use) are removed.
const KEEP_STEP_TREES: usize = 48;

fn step_trees_dir(tmp: &Path) -> PathBuf {
    tmp.join("step-trees")
}

/// The cache name of a step's upper directory: the step's key and its layer (a step rerun
/// with `--no-cache` may change files differently under the same key); short, so that many
/// fit in overlayfs's option page as lower directories.
pub(crate) fn step_tree_name(key: &blake3::Hash, layer: &BlobId) -> String {
    let mut h = blake3::Hasher::new();
    h.update(key.as_bytes());
    h.update(layer.as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

fn open_lock(p: &Path) -> Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .ctx("open", p)
}

/// The cached upper directory of the step `name` (what that step changed, in overlayfs upper
/// form: whiteout devices, opaque xattrs), held for as long as the value lives; None if the
/// cache lacks it.
pub(crate) fn step_tree(tmp: &Path, name: &str) -> Result<Option<BaseTree>> {
    let dir = step_trees_dir(tmp);
    if !complete(&dir, name) {
        return Ok(None);
    }
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = open_lock(&lock_path)?;
    flock(&lock, libc::LOCK_SH).ctx("lock", &lock_path)?;
    let _ = lock.set_modified(std::time::SystemTime::now());
    // Evicted between the check and the lock: a miss.
    if !complete(&dir, name) {
        return Ok(None);
    }
    Ok(Some(BaseTree {
        path: dir.join(name),
        _lock: Some(lock),
    }))
}

/// Moves `upper` (a step's upper directory, no longer mounted) into the step cache as `name`
/// and returns it held. If the cache cannot take it (another file system), it stays where it
/// is, uncached. The `.complete` marker is written after the rename, so a kill in between
/// leaves an entry that is never used and is replaced next time.
pub(crate) fn adopt_step_tree(tmp: &Path, name: &str, upper: &Path) -> Result<BaseTree> {
    let dir = step_trees_dir(tmp);
    std::fs::create_dir_all(&dir).ctx("mkdir", &dir)?;
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = open_lock(&lock_path)?;
    flock(&lock, libc::LOCK_SH).ctx("lock", &lock_path)?;
    let _ = lock.set_modified(std::time::SystemTime::now());
    let ex_path = dir.join(format!("{name}.extract"));
    let ex = open_lock(&ex_path)?;
    flock(&ex, libc::LOCK_EX).ctx("lock", &ex_path)?;
    let path = dir.join(name);
    if complete(&dir, name) {
        let _ = std::fs::remove_dir_all(upper);
    } else {
        let _ = std::fs::remove_dir_all(&path);
        if let Err(e) = std::fs::rename(upper, &path) {
            tracing::warn!(error = %e, "cannot keep the step's tree in the cache");
            return Ok(BaseTree::uncached(upper.to_path_buf()));
        }
        std::fs::write(dir.join(format!("{name}.complete")), b"").ctx("write", &dir)?;
    }
    drop(ex);
    evict(&dir, name, KEEP_STEP_TREES);
    Ok(BaseTree {
        path,
        _lock: Some(lock),
    })
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
        Ok(()) => evict(&dir, &key, KEEP_TREES),
        Err(e) => tracing::warn!(error = %e, "could not keep the extracted tree"),
    }
}

/// Whether the cache entry `key` is complete.
fn complete(dir: &Path, key: &str) -> bool {
    dir.join(format!("{key}.complete")).exists() && dir.join(key).is_dir()
}

/// Removes the least recently used complete trees beyond `keep_n` that no build holds.
fn evict(dir: &Path, keep: &str, keep_n: usize) {
    crate::lru::evict(
        dir,
        keep,
        keep_n,
        |key| dir.join(key).exists(),
        |key| {
            let _ = std::fs::remove_file(dir.join(format!("{key}.complete")));
            let _ = std::fs::remove_dir_all(dir.join(key));
            tracing::info!(key, "evicted cached tree");
        },
    );
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Invalid("path with NUL".into()))
}

/// A stage's root: overlayfs over a base tree and the stage's sealed upper directories (each
/// the change of one step, most from the step cache).
pub(crate) struct OverlayRoot {
    dir: PathBuf,
    base: Option<BaseTree>,
    /// Sealed upper directories, bottom first (cached ones hold their cache lock).
    sealed: Vec<BaseTree>,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
    next: usize,
    mounted: bool,
}

/// A read-only overlayfs view of some of a root's layers, unmounted on drop.
pub(crate) struct View {
    path: PathBuf,
    mounted: bool,
}

impl View {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.mounted {
            umount_lazy(&self.path);
        }
    }
}

fn umount_lazy(p: &Path) {
    if let Ok(t) = cstr(p) {
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(t.as_ptr(), 0) } != 0 {
            // SAFETY: as above.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Mounts overlayfs at `target`: `lowers` top first, read-only unless `upper` (upper, work).
fn mount_overlay(lowers: &[PathBuf], upper: Option<(&Path, &Path)>, target: &Path) -> Result<()> {
    let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    if lowers.iter().any(|l| l.contains([':', ',', '\\'])) {
        return Err(Error::Build(format!(
            "build directory {} has a character overlayfs cannot take (':', ',' or '\\')",
            target.display()
        )));
    }
    let mut opts = format!("lowerdir={}", lowers.join(":"));
    if let Some((u, w)) = upper {
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            u.display(),
            w.display()
        ));
    }
    opts.push_str(",redirect_dir=off,index=off,metacopy=off,xino=off");
    if opts.len() > MAX_MOUNT_OPTS {
        return Err(Error::Build(format!(
            "too many file-changing steps in one stage ({}) for overlayfs's option page",
            lowers.len()
        )));
    }
    let src = CString::new("overlay").expect("no NUL");
    let t = cstr(target)?;
    let data = CString::new(opts).map_err(|_| Error::Invalid("path with NUL".into()))?;
    let flags = if upper.is_some() { 0 } else { libc::MS_RDONLY };
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            t.as_ptr(),
            src.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(Error::Build(format!(
            "cannot mount the stage's overlayfs at {} (needs root and overlayfs): {}",
            target.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
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

    fn base_path(&self) -> PathBuf {
        match &self.base {
            Some(b) => b.path.clone(),
            None => self.dir.join("empty"),
        }
    }

    /// Lower directories of the first `n` sealed layers over the base, top first.
    fn lowers(&self, n: usize) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.sealed[..n]
            .iter()
            .rev()
            .map(|t| t.path.clone())
            .collect();
        v.push(self.base_path());
        v
    }

    /// The merged root, mounted if it is not.
    pub fn root(&mut self) -> Result<PathBuf> {
        if !self.mounted {
            let lowers = self.lowers(self.sealed.len());
            mount_overlay(&lowers, Some((&self.upper, &self.work)), &self.merged)?;
            self.mounted = true;
        }
        Ok(self.merged.clone())
    }

    /// Unmounts the merged root (changes stay in the upper directory).
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        // Something (a leftover process) may still hold it: then it is detached.
        umount_lazy(&self.merged);
        self.mounted = false;
        Ok(())
    }

    fn upper_is_empty(&self) -> Result<bool> {
        Ok(std::fs::read_dir(&self.upper)
            .ctx("read dir", &self.upper)?
            .next()
            .is_none())
    }

    /// Makes the current upper directory a lower one, so the next changes land in a fresh,
    /// empty upper. Nothing happens if the current upper is empty.
    pub fn seal(&mut self) -> Result<()> {
        if let Some(u) = self.take_upper()? {
            self.sealed.push(BaseTree::uncached(u));
        }
        Ok(())
    }

    /// Unmounts and hands over the current upper directory (None if empty); the next changes
    /// land in a fresh one. The caller gives it back with [`Self::push_lower`] (cached or not).
    pub fn take_upper(&mut self) -> Result<Option<PathBuf>> {
        if self.upper_is_empty()? {
            return Ok(None);
        }
        self.unmount()?;
        let u = self.upper.clone();
        let _ = std::fs::remove_dir_all(&self.work);
        self.fresh_upper()?;
        Ok(Some(u))
    }

    /// Puts a layer (a step's upper directory) on top of the sealed ones.
    pub fn push_lower(&mut self, t: BaseTree) -> Result<()> {
        self.unmount()?;
        self.sealed.push(t);
        Ok(())
    }

    /// Replaces the top layer (by the same tree, moved into the step cache).
    pub fn replace_top(&mut self, t: BaseTree) -> Result<()> {
        self.unmount()?;
        let top = self.sealed.last_mut().expect("a layer to replace");
        *top = t;
        Ok(())
    }

    /// How many sealed layers there are.
    pub fn layers(&self) -> usize {
        self.sealed.len()
    }

    /// The `i`th sealed layer's directory.
    pub fn layer(&self, i: usize) -> &Path {
        &self.sealed[i].path
    }

    /// The tree of the base and the first `n` sealed layers, read-only, at `at` (created).
    pub fn view(&self, n: usize, at: &Path) -> Result<View> {
        if n == 0 {
            return Ok(View {
                path: self.base_path(),
                mounted: false,
            });
        }
        std::fs::create_dir_all(at).ctx("mkdir", at)?;
        mount_overlay(&self.lowers(n), None, at)?;
        Ok(View {
            path: at.to_path_buf(),
            mounted: true,
        })
    }

    /// The current upper directory (the changes since the last seal).
    pub fn upper(&self) -> &Path {
        &self.upper
    }
}

impl Drop for OverlayRoot {
    fn drop(&mut self) {
        if self.mounted {
            umount_lazy(&self.merged);
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
            // The stage root and the read-only views step disks are made from.
            for m in ["m", "lo", "hi"].map(|n| st.path().join(n)) {
                if let Ok(c) = cstr(&m) {
                    // SAFETY: valid NUL-terminated path; EINVAL when it is not a mount point.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
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
