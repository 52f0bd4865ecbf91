//! Applying OCI layer tars to a root directory, safely, and writing a directory's changes as a
//! layer tar.
//!
//! The applier never calls `tar::Entry::unpack`. Every entry path is split into components and
//! resolved by hand below the root: `..` is refused, a symlink met on the way is followed only
//! while it stays inside the root (absolute symlink targets and relative ones that climb above
//! the root are refused), and the final component is always handled without following it. The
//! root is a staging directory only kiln writes to while a layer is applied, so checking each
//! component with `lstat` before use is race-free.

use crate::error::{Error, IoCtx, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// What an applied layer may contain.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyOptions {
    /// Accept any character and block device nodes. Without it only fifos and the standard
    /// character devices in /dev (null, zero, full, random, urandom, tty, console, ptmx) are.
    pub allow_devices: bool,
}

/// Counts of what a layer did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Opens a layer stream, undoing gzip or zstd compression (detected by magic bytes).
pub fn decompress<'a, R: Read + 'a>(r: R) -> Result<Box<dyn Read + 'a>> {
    let mut r = io::BufReader::with_capacity(256 * 1024, r);
    let head = io::BufRead::fill_buf(&mut r).ctx("read", "layer")?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(
            zstd::stream::read::Decoder::with_buffer(r).ctx("open zstd", "layer")?,
        ))
    } else {
        Ok(Box::new(r))
    }
}

/// Splits an archive path into safe normal components. `None` means the root itself.
fn clean_components(raw: &Path) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(s) => out.push(s.to_os_string()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(Error::UnsafeEntry {
                    path: raw.display().to_string(),
                    why: "path contains `..`".into(),
                })
            }
        }
    }
    Ok(out)
}

/// Resolves `comps` (all directories) below `root`, following symlinks only while they stay
/// inside it, and creating missing directories when `create` is set. Returns the host path of
/// the resolved directory and its components relative to the root.
fn resolve_dir(
    root: &Path,
    comps: &[OsString],
    create: bool,
    what: &str,
) -> Result<(PathBuf, Vec<OsString>)> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut queue: std::collections::VecDeque<OsString> = comps.iter().cloned().collect();
    let mut hops = 0;
    let unsafe_err = |why: String| Error::UnsafeEntry {
        path: what.to_string(),
        why,
    };
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            if resolved.pop().is_none() {
                return Err(unsafe_err(
                    "a symlink on its path leads outside the root".into(),
                ));
            }
            continue;
        }
        if c == "." || c.is_empty() {
            continue;
        }
        let mut host = root.to_path_buf();
        host.extend(&resolved);
        host.push(&c);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => resolved.push(c),
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(unsafe_err("too many levels of symlinks".into()));
                }
                let target = std::fs::read_link(&host).ctx("readlink", &host)?;
                if target.is_absolute() {
                    return Err(unsafe_err(format!(
                        "goes through absolute symlink {} -> {}, which would lead outside the root",
                        rel_display(&resolved, &c),
                        target.display()
                    )));
                }
                // Splice the target's components in front of what is left.
                let mut parts: Vec<OsString> = target
                    .components()
                    .filter_map(|tc| match tc {
                        Component::Normal(s) => Some(s.to_os_string()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    })
                    .collect();
                parts.extend(queue.drain(..));
                queue = parts.into();
            }
            Ok(_) => {
                return Err(unsafe_err(format!(
                    "{} is not a directory",
                    rel_display(&resolved, &c)
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&host).ctx("mkdir", &host)?;
                resolved.push(c);
            }
            Err(e) => {
                return Err(Error::Io {
                    what: "lstat",
                    path: host,
                    source: e,
                })
            }
        }
    }
    let mut host = root.to_path_buf();
    host.extend(&resolved);
    Ok((host, resolved))
}

fn rel_display(resolved: &[OsString], c: &OsStr) -> String {
    let mut p = PathBuf::from("/");
    p.extend(resolved);
    p.push(c);
    p.display().to_string()
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::BadLayer("path has a NUL byte".into()))
}

fn errno_io(what: &'static str, p: &Path) -> Error {
    Error::Io {
        what,
        path: p.to_path_buf(),
        source: io::Error::last_os_error(),
    }
}

/// Removes whatever is at `p` (not following symlinks).
fn remove_any(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).ctx("remove", p),
        Ok(_) => std::fs::remove_file(p).ctx("remove", p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            what: "lstat",
            path: p.to_path_buf(),
            source: e,
        }),
    }
}

fn lchown(p: &Path, uid: u64, gid: u64) -> Result<()> {
    let c = cstr(p)?;
    // SAFETY: c is a valid NUL-terminated path; lchown does not follow symlinks.
    if unsafe { libc::lchown(c.as_ptr(), uid as libc::uid_t, gid as libc::gid_t) } != 0 {
        return Err(errno_io("chown", p));
    }
    Ok(())
}

/// Sets atime = mtime = `secs` without following symlinks.
pub(crate) fn set_mtime(p: &Path, secs: i64) -> Result<()> {
    let c = cstr(p)?;
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: valid path and a 2-element timespec array, as utimensat requires.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(errno_io("utimensat", p));
    }
    Ok(())
}

fn set_xattr(p: &Path, key: &[u8], value: &[u8]) -> Result<()> {
    let c = cstr(p)?;
    let k = CString::new(key).map_err(|_| Error::BadLayer("xattr name has a NUL byte".into()))?;
    // SAFETY: valid path and name, value pointer/length from a live slice.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        // Some file systems refuse some namespaces (e.g. trusted.* on tmpfs): keep going.
        tracing::warn!(path = %p.display(), key = %String::from_utf8_lossy(key),
            err = %io::Error::last_os_error(), "could not set xattr");
    }
    Ok(())
}

/// Applies one (possibly compressed) layer tar to `root`, in order, with OCI whiteouts.
pub fn apply_layer(root: &Path, layer: impl Read, opts: &ApplyOptions) -> Result<ApplyStats> {
    let mut ar = tar::Archive::new(decompress(layer)?);
    let mut a = Applier {
        root,
        opts,
        stats: ApplyStats::default(),
        created: HashSet::new(),
        dir_times: Vec::new(),
        kept_times: HashMap::new(),
    };
    for entry in ar.entries().ctx("read", "layer tar")? {
        let mut entry = entry.map_err(|e| Error::BadLayer(format!("corrupt tar: {e}")))?;
        a.stats.entries += 1;
        a.apply(&mut entry)?;
    }
    a.finish()
}

/// One layer being applied to a root.
struct Applier<'a> {
    root: &'a Path,
    opts: &'a ApplyOptions,
    stats: ApplyStats,
    /// Paths this layer created: an opaque whiteout only hides what lower layers put there.
    created: HashSet<PathBuf>,
    /// Directory times are set at the end, after their children are written.
    dir_times: Vec<(PathBuf, i64)>,
    /// Existing directories this layer adds to or removes from without carrying them keep
    /// their times: the kernel would stamp them with the wall clock, and images must be
    /// deterministic.
    kept_times: HashMap<PathBuf, i64>,
}

/// What a tar header says of an entry's owner, mode, time and extended attributes.
struct Meta {
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Meta {
        let h = entry.header();
        let (uid, gid) = (h.uid().unwrap_or(0), h.gid().unwrap_or(0));
        let (mode, mtime) = (
            h.mode().unwrap_or(0o644) & 0o7777,
            h.mtime().unwrap_or(0) as i64,
        );
        let xattrs = match entry.pax_extensions() {
            Ok(Some(exts)) => exts
                .filter_map(|x| x.ok())
                .filter_map(|x| {
                    x.key_bytes()
                        .strip_prefix(b"SCHILY.xattr.")
                        .map(|k| (k.to_vec(), x.value_bytes().to_vec()))
                })
                .collect(),
            _ => Vec::new(),
        };
        Meta {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        }
    }

    /// Owner, then mode (chown clears set-id bits), then extended attributes.
    fn set_owner_mode_xattrs(&self, p: &Path) -> Result<()> {
        lchown(p, self.uid, self.gid)?;
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(self.mode))
            .ctx("chmod", p)?;
        for (k, v) in &self.xattrs {
            set_xattr(p, k, v)?;
        }
        Ok(())
    }
}

impl Applier<'_> {
    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw_path = entry
            .path()
            .map_err(|e| Error::BadLayer(format!("bad entry path: {e}")))?
            .into_owned();
        let what = raw_path.display().to_string();
        let mut comps = clean_components(&raw_path)?;
        let Some(name) = comps.pop() else {
            return self.apply_to_root(entry, what);
        };
        let (parent, parent_rel) = resolve_dir(self.root, &comps, true, &what)?;
        if !self.kept_times.contains_key(&parent) {
            if let Ok(m) = std::fs::symlink_metadata(&parent) {
                self.kept_times.insert(parent.clone(), m.mtime());
            }
        }
        if self.whiteout(name.as_bytes(), &parent, &parent_rel, &what)? {
            return Ok(());
        }
        let target = parent.join(&name);
        let mut rel: PathBuf = parent_rel.iter().collect();
        rel.push(&name);
        let etype = entry.header().entry_type();
        let meta = Meta::of(entry);
        // Anything already there is replaced, except a directory by a directory (merge).
        let existing = std::fs::symlink_metadata(&target).ok();
        if let Some(m) = &existing {
            if !(m.is_dir() && etype.is_dir()) {
                remove_any(&target)?;
            }
        }
        match etype {
            tar::EntryType::Directory => {
                if existing.as_ref().map(|m| m.is_dir()) != Some(true) {
                    std::fs::create_dir(&target).ctx("mkdir", &target)?;
                }
                meta.set_owner_mode_xattrs(&target)?;
                self.dir_times.push((target, meta.mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if etype == tar::EntryType::GNUSparse {
                    tracing::debug!(path = %what, "sparse entry written densely");
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .ctx("create", &target)?;
                self.stats.bytes += io::copy(entry, &mut f).ctx("write", &target)?;
                drop(f);
                meta.set_owner_mode_xattrs(&target)?;
                set_mtime(&target, meta.mtime)?;
            }
            tar::EntryType::Symlink => {
                let link = link_target(entry, &what, "symlink")?;
                // Creating a symlink is harmless whatever its target: the applier never follows
                // one out of the root, and inside the VM the disk is the whole file system.
                std::os::unix::fs::symlink(&link, &target).ctx("symlink", &target)?;
                lchown(&target, meta.uid, meta.gid)?;
                for (k, v) in &meta.xattrs {
                    set_xattr(&target, k, v)?;
                }
                set_mtime(&target, meta.mtime)?;
            }
            tar::EntryType::Link => self.hardlink(entry, &target, what)?,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.node(entry.header(), &meta, &target, &parent_rel, what)?
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => return Ok(()),
            other => {
                return Err(Error::BadLayer(format!(
                    "{what}: unsupported entry type {other:?}"
                )))
            }
        }
        self.created.insert(rel);
        Ok(())
    }

    /// An entry for the root itself: its metadata, nothing else.
    fn apply_to_root<R: Read>(&mut self, entry: &tar::Entry<'_, R>, what: String) -> Result<()> {
        let h = entry.header();
        let t = h.entry_type();
        if !t.is_dir() && !matches!(t, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            return Err(Error::UnsafeEntry {
                path: what,
                why: "an entry for the root that is not a directory".into(),
            });
        }
        if t.is_dir() {
            let mode = h.mode().unwrap_or(0o755) & 0o7777;
            lchown(self.root, h.uid().unwrap_or(0), h.gid().unwrap_or(0))?;
            std::fs::set_permissions(
                self.root,
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            )
            .ctx("chmod", self.root)?;
            self.dir_times
                .push((self.root.to_path_buf(), h.mtime().unwrap_or(0) as i64));
        }
        Ok(())
    }

    /// Applies `name` if it is a whiteout (an opaque one empties what lower layers put in
    /// `parent`; `.wh.X` removes X); false if it is an ordinary name.
    fn whiteout(
        &mut self,
        name: &[u8],
        parent: &Path,
        parent_rel: &[OsString],
        what: &str,
    ) -> Result<bool> {
        if name == b".wh..wh..opq" {
            self.stats.whiteouts += 1;
            for e in std::fs::read_dir(parent).ctx("read dir", parent)? {
                let e = e.ctx("read dir", parent)?;
                let mut rel: PathBuf = parent_rel.iter().collect();
                rel.push(e.file_name());
                if !self.created.contains(&rel) {
                    remove_any(&e.path())?;
                }
            }
            return Ok(true);
        }
        let Some(hidden) = name.strip_prefix(b".wh.") else {
            return Ok(false);
        };
        self.stats.whiteouts += 1;
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(Error::UnsafeEntry {
                path: what.to_string(),
                why: "bad whiteout name".into(),
            });
        }
        remove_any(&parent.join(OsStr::from_bytes(hidden)))?;
        Ok(true)
    }

    /// A hard link to a file this root already has (never outside it, never a directory).
    fn hardlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        target: &Path,
        what: String,
    ) -> Result<()> {
        let link = link_target(entry, &what, "hardlink")?;
        let mut lcomps = clean_components(&link).map_err(|_| Error::UnsafeEntry {
            path: what.clone(),
            why: format!("hardlink target {} leads outside the root", link.display()),
        })?;
        let lname = lcomps.pop().ok_or_else(|| Error::UnsafeEntry {
            path: what.clone(),
            why: "hardlink to the root".into(),
        })?;
        let (lparent, _) =
            resolve_dir(self.root, &lcomps, false, &what).map_err(|e| Error::UnsafeEntry {
                path: what.clone(),
                why: format!("hardlink target {}: {e}", link.display()),
            })?;
        let src = lparent.join(&lname);
        let m = std::fs::symlink_metadata(&src).map_err(|_| Error::UnsafeEntry {
            path: what.clone(),
            why: format!(
                "hardlink target {} does not exist in the layer",
                link.display()
            ),
        })?;
        if m.is_dir() {
            return Err(Error::UnsafeEntry {
                path: what,
                why: "hardlink to a directory".into(),
            });
        }
        // std::fs::hard_link uses linkat without AT_SYMLINK_FOLLOW: a link to a
        // symlink links the symlink itself.
        std::fs::hard_link(&src, target).ctx("link", target)
    }

    /// A FIFO, or a device node when allowed (or one of the harmless standard ones).
    fn node(
        &mut self,
        h: &tar::Header,
        meta: &Meta,
        target: &Path,
        parent_rel: &[OsString],
        what: String,
    ) -> Result<()> {
        let kind = match h.entry_type() {
            tar::EntryType::Char => libc::S_IFCHR,
            tar::EntryType::Block => libc::S_IFBLK,
            _ => libc::S_IFIFO,
        };
        let major = h.device_major().ok().flatten().unwrap_or(0);
        let minor = h.device_minor().ok().flatten().unwrap_or(0);
        if kind != libc::S_IFIFO
            && !self.opts.allow_devices
            && !is_standard_dev(parent_rel, kind, major, minor)
        {
            return Err(Error::UnsafeEntry {
                path: what,
                why: "device nodes are not allowed in this image (allow_devices is off)".into(),
            });
        }
        let c = cstr(target)?;
        // SAFETY: valid path; mknod creates a node, it opens nothing.
        if unsafe { libc::mknod(c.as_ptr(), kind | meta.mode, libc::makedev(major, minor)) } != 0 {
            return Err(errno_io("mknod", target));
        }
        lchown(target, meta.uid, meta.gid)?;
        std::fs::set_permissions(
            target,
            std::os::unix::fs::PermissionsExt::from_mode(meta.mode),
        )
        .ctx("chmod", target)?;
        set_mtime(target, meta.mtime)
    }

    /// Sets the directory times, deepest first, so setting a parent's time is not undone by
    /// a child.
    fn finish(self) -> Result<ApplyStats> {
        let mut dir_times = self.dir_times;
        let carried: HashSet<PathBuf> = dir_times.iter().map(|(p, _)| p.clone()).collect();
        dir_times.extend(
            self.kept_times
                .into_iter()
                .filter(|(p, _)| !carried.contains(p)),
        );
        dir_times.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, t) in dir_times {
            if std::fs::symlink_metadata(&p)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                set_mtime(&p, t)?;
            }
        }
        Ok(self.stats)
    }
}

/// The harmless character devices a root file system's /dev may carry (debootstrap makes
/// them): null, zero, full, random, urandom, tty, console, ptmx.
fn is_standard_dev(parent: &[OsString], kind: libc::mode_t, major: u32, minor: u32) -> bool {
    kind == libc::S_IFCHR
        && parent.len() == 1
        && parent[0] == "dev"
        && matches!(
            (major, minor),
            (1, 3) | (1, 5) | (1, 7) | (1, 8) | (1, 9) | (5, 0) | (5, 1) | (5, 2)
        )
}

/// What a path looked like, to tell whether a step changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileState {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    is_dir: bool,
}

impl FileState {
    fn of(m: &std::fs::Metadata) -> FileState {
        FileState {
            ino: m.ino(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            is_dir: m.is_dir(),
        }
    }

    fn changed_from(&self, before: &FileState) -> bool {
        if self.is_dir && before.is_dir {
            // A directory's ctime moves whenever a child does; its children speak for that.
            self.mode != before.mode
                || self.uid != before.uid
                || self.gid != before.gid
                || self.mtime != before.mtime
        } else {
            self != before
        }
    }
}

/// A snapshot of every path below a root (relative paths, sorted).
pub type TreeState = BTreeMap<PathBuf, FileState>;

/// Walks `root` without following symlinks. Mount points named in `skip` are not entered.
pub fn scan_tree(root: &Path) -> Result<TreeState> {
    let mut out = TreeState::new();
    let root_dev = std::fs::symlink_metadata(root).ctx("lstat", root)?.dev();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).ctx("read dir", &dir)? {
            let e = e.ctx("read dir", &dir)?;
            let m = e.metadata().ctx("lstat", e.path())?;
            let r = rel.join(e.file_name());
            if m.is_dir() && m.dev() == root_dev {
                stack.push(r.clone());
            }
            out.insert(r, FileState::of(&m));
        }
    }
    Ok(out)
}

/// Writes the difference between `before` and the current state of `root` as an OCI layer tar
/// (changed and new paths, `.wh.` whiteouts for removed ones). Entries are sorted by path so the
/// same tree change gives the same bytes. Returns the number of entries written.
pub fn write_diff(
    root: &Path,
    before: &TreeState,
    after: &TreeState,
    out: impl io::Write,
) -> Result<u64> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut n = 0;
    // Removed paths: whiteout only the topmost removed one.
    let mut entries: BTreeMap<PathBuf, Option<&FileState>> = BTreeMap::new();
    for (p, _) in before.iter() {
        if !after.contains_key(p) {
            let parent_gone = p
                .parent()
                .map(|pp| !pp.as_os_str().is_empty() && !after.contains_key(pp))
                .unwrap_or(false);
            if !parent_gone {
                let mut wh = p.parent().map(Path::to_path_buf).unwrap_or_default();
                let mut name = OsString::from(".wh.");
                name.push(p.file_name().unwrap_or_default());
                wh.push(name);
                entries.insert(wh, None);
            }
        }
    }
    for (p, st) in after.iter() {
        match before.get(p) {
            Some(old) if !st.changed_from(old) => {}
            _ => {
                entries.insert(p.clone(), Some(st));
            }
        }
    }
    // Hardlinks written in this tar: inode -> first path.
    let mut links: HashMap<u64, PathBuf> = HashMap::new();
    for (p, st) in entries {
        let Some(st) = st else {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o644);
            h.set_mtime(0);
            b.append_data(&mut h, &p, io::empty())
                .ctx("write whiteout", &p)?;
            n += 1;
            continue;
        };
        let host = root.join(&p);
        let m = std::fs::symlink_metadata(&host).ctx("lstat", &host)?;
        if m.is_file() && m.nlink() > 1 {
            if let Some(first) = links.get(&st.ino) {
                let mut h = tar::Header::new_gnu();
                h.set_metadata_in_mode(&m, tar::HeaderMode::Complete);
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, &p, first).ctx("write link", &p)?;
                n += 1;
                continue;
            }
            links.insert(st.ino, p.clone());
        }
        append_xattrs(&mut b, &host)?;
        b.append_path_with_name(&host, &p)
            .ctx("write tar entry", &host)?;
        n += 1;
    }
    b.into_inner().ctx("finish", "layer tar")?;
    Ok(n)
}

/// What an overlayfs upper directory entry is.
pub(crate) enum UpperKind {
    /// A whiteout (character device 0/0): the path was removed.
    Whiteout,
    /// A directory marked opaque: it replaces the lower one entirely.
    OpaqueDir,
    /// Anything else: present with this content and metadata.
    Present,
}

/// Classifies an entry of an overlayfs upper directory.
pub(crate) fn upper_kind(path: &Path, m: &std::fs::Metadata) -> UpperKind {
    use std::os::unix::fs::FileTypeExt;
    if m.file_type().is_char_device() && m.rdev() == 0 {
        return UpperKind::Whiteout;
    }
    if m.is_dir() {
        if let Ok(c) = cstr(path) {
            let mut v = [0u8; 4];
            // SAFETY: valid path and attribute name; buffer from a live array.
            let n = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    c"trusted.overlay.opaque".as_ptr(),
                    v.as_mut_ptr().cast(),
                    v.len(),
                )
            };
            if n == 1 && v[0] == b'y' {
                return UpperKind::OpaqueDir;
            }
        }
    }
    UpperKind::Present
}

/// Every path below an overlayfs upper directory (sorted, relative), with its metadata.
pub(crate) fn scan_upper(upper: &Path) -> Result<BTreeMap<PathBuf, std::fs::Metadata>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = upper.join(&rel);
        for e in std::fs::read_dir(&dir).ctx("read dir", &dir)? {
            let e = e.ctx("read dir", &dir)?;
            let m = e.metadata().ctx("lstat", e.path())?;
            let r = rel.join(e.file_name());
            if m.is_dir() {
                stack.push(r.clone());
            }
            out.insert(r, m);
        }
    }
    Ok(out)
}

/// Writes an overlayfs upper directory (what one step changed) as an OCI layer tar: whiteout
/// devices become `.wh.` entries, opaque directories get `.wh..wh..opq`, overlayfs's own
/// xattrs are dropped. Sorted by path. Returns the number of entries written.
pub fn write_upper(upper: &Path, out: impl io::Write) -> Result<u64> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut n = 0;
    let mut links: HashMap<u64, PathBuf> = HashMap::new();
    let whiteout = |b: &mut tar::Builder<_>, p: PathBuf| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append_data(&mut h, &p, io::empty())
            .ctx("write whiteout", &p)
    };
    for (p, m) in scan_upper(upper)? {
        let host = upper.join(&p);
        match upper_kind(&host, &m) {
            UpperKind::Whiteout => {
                let mut name = OsString::from(".wh.");
                name.push(p.file_name().unwrap_or_default());
                whiteout(&mut b, p.with_file_name(name))?;
                n += 1;
                continue;
            }
            UpperKind::OpaqueDir => {
                append_xattrs(&mut b, &host)?;
                b.append_path_with_name(&host, &p)
                    .ctx("write tar entry", &host)?;
                whiteout(&mut b, p.join(".wh..wh..opq"))?;
                n += 2;
                continue;
            }
            UpperKind::Present => {}
        }
        if m.is_file() && m.nlink() > 1 {
            if let Some(first) = links.get(&m.ino()) {
                let mut h = tar::Header::new_gnu();
                h.set_metadata_in_mode(&m, tar::HeaderMode::Complete);
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, &p, first).ctx("write link", &p)?;
                n += 1;
                continue;
            }
            links.insert(m.ino(), p.clone());
        }
        append_xattrs(&mut b, &host)?;
        b.append_path_with_name(&host, &p)
            .ctx("write tar entry", &host)?;
        n += 1;
    }
    b.into_inner().ctx("finish", "layer tar")?;
    Ok(n)
}

/// Writes a PAX header carrying `path`'s xattrs, if it has any, before its entry.
fn append_xattrs<W: io::Write>(b: &mut tar::Builder<W>, path: &Path) -> Result<()> {
    let c = cstr(path)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid path; buffer pointer/length from a live Vec.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Ok(());
    }
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    for key in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|k| !k.is_empty() && !k.starts_with(b"trusted.overlay."))
    {
        let k = CString::new(key).expect("split on NUL");
        let mut val = vec![0u8; 65536];
        // SAFETY: valid path and name; value buffer from a live Vec.
        let vn =
            unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if vn >= 0 {
            val.truncate(vn as usize);
            pax.push((
                format!("SCHILY.xattr.{}", String::from_utf8_lossy(key)),
                val,
            ));
        }
    }
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .ctx("write xattrs", path)?;
    }
    Ok(())
}

/// The target a symlink or hardlink entry names (`kind` is for the error message).
fn link_target<R: std::io::Read>(
    entry: &tar::Entry<'_, R>,
    what: &str,
    kind: &str,
) -> Result<std::path::PathBuf> {
    entry
        .link_name()
        .map_err(|e| Error::BadLayer(format!("{what}: bad link name: {e}")))?
        .map(|l| l.into_owned())
        .ok_or_else(|| Error::BadLayer(format!("{what}: {kind} without target")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o640);
        h.set_mtime(1234);
        // Write the name bytes raw: tar::Builder refuses `..` itself.
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o777);
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_gnu_mut().unwrap().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
    }

    #[test]
    fn files_links_whiteouts() {
        let root = tempfile::tempdir().unwrap();
        let l1 = tar_with(|b| {
            file(b, "etc/a", b"one");
            file(b, "etc/b", b"two");
            file(b, "d/x", b"x");
            link(b, tar::EntryType::Symlink, "lnk", "etc/a");
            link(b, tar::EntryType::Link, "hard", "etc/a");
        });
        apply_layer(root.path(), &l1[..], &ApplyOptions::default()).unwrap();
        assert_eq!(std::fs::read(root.path().join("hard")).unwrap(), b"one");
        assert_eq!(
            std::fs::read_link(root.path().join("lnk")).unwrap(),
            Path::new("etc/a")
        );
        let m = std::fs::metadata(root.path().join("etc/a")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!(m.nlink(), 2);
        assert_eq!(m.mtime(), 1234);
        let l2 = tar_with(|b| {
            file(b, "etc/.wh.a", b"");
            file(b, "d/.wh..wh..opq", b"");
            file(b, "d/y", b"y");
        });
        apply_layer(root.path(), &l2[..], &ApplyOptions::default()).unwrap();
        assert!(!root.path().join("etc/a").exists());
        assert!(root.path().join("etc/b").exists());
        assert!(!root.path().join("d/x").exists());
        assert!(root.path().join("d/y").exists());
    }

    #[test]
    fn refuses_escapes() {
        let outside = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("dotdot", tar_with(|b| file(b, "../evil", b"x"))),
            (
                "abs symlink",
                tar_with(|b| {
                    link(
                        b,
                        tar::EntryType::Symlink,
                        "esc",
                        outside.path().to_str().unwrap(),
                    );
                    file(b, "esc/evil", b"x");
                }),
            ),
            (
                "rel symlink",
                tar_with(|b| {
                    link(b, tar::EntryType::Symlink, "a", "../../../../../../..");
                    file(b, "a/evil", b"x");
                }),
            ),
            (
                "hardlink out",
                tar_with(|b| link(b, tar::EntryType::Link, "h", "../../../etc/passwd")),
            ),
        ];
        for (name, t) in cases {
            let root = tempfile::tempdir().unwrap();
            let err = apply_layer(root.path(), &t[..], &ApplyOptions::default()).unwrap_err();
            assert!(matches!(err, Error::UnsafeEntry { .. }), "{name}: {err}");
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn overlay_upper_dir_as_a_layer() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: whiteout devices and trusted xattrs need root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (base, upper) = (t.path().join("base"), t.path().join("upper"));
        std::fs::create_dir_all(base.join("d/old")).unwrap();
        std::fs::write(base.join("d/gone"), b"g").unwrap();
        std::fs::write(base.join("d/old/x"), b"x").unwrap();
        std::fs::write(base.join("keep"), b"k").unwrap();
        // What overlayfs leaves after `rm d/gone; rm -r d/old; mkdir d/old; echo n > d/old/n`
        // plus an overlayfs-internal xattr that must not travel.
        std::fs::create_dir_all(upper.join("d/old")).unwrap();
        let wh = cstr(&upper.join("d/gone")).unwrap();
        // SAFETY: valid path; a 0/0 character device is overlayfs's whiteout.
        assert_eq!(
            unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR | 0o600, 0) },
            0
        );
        for (dir, key, val) in [
            ("d/old", c"trusted.overlay.opaque", &b"y"[..]),
            ("d", c"trusted.overlay.impure", &b"y"[..]),
        ] {
            let p = cstr(&upper.join(dir)).unwrap();
            // SAFETY: valid path, name and value buffer.
            let r = unsafe {
                libc::lsetxattr(p.as_ptr(), key.as_ptr(), val.as_ptr().cast(), val.len(), 0)
            };
            assert_eq!(r, 0);
        }
        std::fs::write(upper.join("d/old/n"), b"n").unwrap();
        let mut tar = Vec::new();
        assert_eq!(write_upper(&upper, &mut tar).unwrap(), 5);
        let names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"d/.wh.gone".to_string()), "{names:?}");
        assert!(
            names.contains(&"d/old/.wh..wh..opq".to_string()),
            "{names:?}"
        );
        assert!(
            !tar.windows(15).any(|w| w == b"trusted.overlay"),
            "overlayfs xattrs leaked"
        );
        apply_layer(&base, &tar[..], &ApplyOptions::default()).unwrap();
        assert!(!base.join("d/gone").exists());
        assert!(!base.join("d/old/x").exists());
        assert_eq!(std::fs::read(base.join("d/old/n")).unwrap(), b"n");
        assert_eq!(std::fs::read(base.join("keep")).unwrap(), b"k");
    }

    #[test]
    fn diff_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/keep"), b"k").unwrap();
        std::fs::write(r.join("d/gone"), b"g").unwrap();
        let before = scan_tree(r).unwrap();
        std::fs::remove_file(r.join("d/gone")).unwrap();
        std::fs::write(r.join("d/new"), b"n").unwrap();
        let after = scan_tree(r).unwrap();
        let mut tar = Vec::new();
        write_diff(r, &before, &after, &mut tar).unwrap();
        // Apply to a copy of the "before" tree.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir(other.path().join("d")).unwrap();
        std::fs::write(other.path().join("d/keep"), b"k").unwrap();
        std::fs::write(other.path().join("d/gone"), b"g").unwrap();
        apply_layer(other.path(), &tar[..], &ApplyOptions::default()).unwrap();
        assert!(!other.path().join("d/gone").exists());
        assert_eq!(std::fs::read(other.path().join("d/new")).unwrap(), b"n");
        assert!(other.path().join("d/keep").exists());
    }
}
