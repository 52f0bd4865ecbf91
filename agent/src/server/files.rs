//! File requests: atomic writes, reads, stat, directory listing and changes, and watching a
//! directory with inotify.

use super::{fail, io_fail, read_data, send, send_json, xattr, Conn, Res};
use crate::protocol::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What the temp files of atomic writes are called after their target's name.
const TEMP_MARK: &str = ".kiln-agent-tmp-";

/// Longest file name (Linux's `NAME_MAX`).
const NAME_MAX: usize = 255;

/// The temp file a write goes to before its rename: a unique name in the same directory,
/// short enough for the file system however long the target's name is.
fn temp_path(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let tail = format!("{TEMP_MARK}{}-{n}", std::process::id());
    let name = name.to_string_lossy();
    let mut keep = name.len().min(NAME_MAX - 1 - tail.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    dir.join(format!(".{}{tail}", &name[..keep]))
}

/// Whether a file name is an atomic write's temp file (`.NAME.kiln-agent-tmp-PID-N`).
pub(super) fn is_temp_name(name: &str) -> bool {
    let Some((head, tail)) = name.rsplit_once(TEMP_MARK) else {
        return false;
    };
    let mut nums = tail.split('-');
    head.starts_with('.')
        && head.len() > 1
        && nums
            .next()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && nums
            .next()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && nums.next().is_none()
}

pub fn write_file(req: FileRequest, c: &Conn) -> Res<()> {
    let written = if req.in_place {
        write_in_place(&req, c)
    } else {
        write_atomic(&req, c)
    };
    match written {
        Ok(info) => send_json(c, Kind::Ok, &info),
        Err(super::Fail(mut e)) => {
            if !e.message.contains(&req.path) {
                e.message = format!("write {}: {}", req.path, e.message);
            }
            Err(super::Fail(e))
        }
    }
}

/// The metadata and fsync that end every write; the file's info for the answer.
fn finish(f: &File, req: &FileRequest) -> Res<FileInfo> {
    if let Some(want) = &req.metadata {
        // A file system without xattrs keeps the file, not its metadata (as envd).
        match xattr::replace(f, want) {
            Err(e) if !xattr::unsupported(&e) => return Err(io_fail("write metadata", e)),
            _ => {}
        }
    }
    f.sync_all().map_err(|e| io_fail("fsync", e))?;
    file_info_of(f, Path::new(&req.path)).map_err(|e| io_fail("fstat", e))
}

/// Gives `f` the wanted permission bits if it lacks them (the umask trimmed them, or chown
/// cleared the set-id bits); no change, no CHMOD event.
fn ensure_mode(f: &File, mode: u32) -> Res<()> {
    let have = f.metadata().map_err(|e| io_fail("fstat", e))?.mode() & 0o7777;
    if have != mode {
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_fail("chmod", e))?;
    }
    Ok(())
}

fn make_parents(req: &FileRequest, path: &Path) -> Res<()> {
    match path.parent() {
        Some(dir) if req.make_parents && !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(|e| io_fail(&dir.to_string_lossy(), e))
        }
        _ => Ok(()),
    }
}

/// envd's write: into the file itself, in envd's order (an existing file gets its owner
/// before it is truncated, a new one right after it is created). A write cut off leaves what
/// was written, as under envd.
///
/// The directory may be hostile (any process of the sandbox may have planted a name in it):
/// unlike envd, which follows whatever is there as root, a new file is created with
/// `O_EXCL`, a symlink is written through only when root or the user the file is written for
/// owns it, and a file with other names (hard links) only when that user owns it; otherwise
/// the file is replaced atomically instead (the link, or that name, is replaced, never
/// written through).
fn write_in_place(req: &FileRequest, c: &Conn) -> Res<FileInfo> {
    let prepared = open_in_place(req);
    if let Ok(None) = prepared {
        return write_atomic(req, c);
    }
    let prepared = prepared.map(|f| f.expect("handled above"));
    let f = read_data(c, prepared, |f, chunk| {
        f.write_all(chunk)
            .map_err(|e| io_fail(&format!("write {}", req.path), e))
    })?;
    finish(&f, req)
}

/// Opens the file `write_in_place` writes, given to the user and emptied (None: it is not one
/// to write through).
fn open_in_place(req: &FileRequest) -> Res<Option<File>> {
    let path = Path::new(&req.path);
    if path.file_name().is_none() {
        return fail(ErrorKind::Invalid, "write: path has no file name");
    }
    make_parents(req, path)?;
    if std::fs::metadata(path).is_ok_and(|md| md.is_dir()) {
        return fail(
            ErrorKind::Invalid,
            format!("path is a directory: {}", req.path),
        );
    }
    let mode = req.mode.unwrap_or(0o644) & 0o7777;
    let chown = |f: &File| match (req.uid, req.gid) {
        (None, None) => Ok(()),
        (u, g) => std::os::unix::fs::fchown(f, u, g).map_err(|e| io_fail("chown", e)),
    };
    let open = |flags: libc::c_int, create: bool| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(create)
            .mode(mode)
            .custom_flags(flags)
            .open(path)
    };
    match open(0, true) {
        Ok(f) => {
            chown(&f)?;
            ensure_mode(&f, mode)?;
            return Ok(Some(f));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_fail(&req.path, e)),
    }
    let ours = |uid: u32| Some(uid) == req.uid || (req.uid.is_none() && uid == 0);
    let f = match open(libc::O_NOFOLLOW, false) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            let link = std::fs::symlink_metadata(path).map_err(|e| io_fail(&req.path, e))?;
            if link.uid() != 0 && !ours(link.uid()) {
                return Ok(None);
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .mode(mode)
                .open(path)
                .map_err(|e| io_fail(&req.path, e))?;
            // The link checked is the one followed (it was not swapped meanwhile).
            let (opened, now, there) = (
                f.metadata().map_err(|e| io_fail("fstat", e))?,
                std::fs::symlink_metadata(path).ok(),
                std::fs::metadata(path).ok(),
            );
            let same = now.is_some_and(|n| n.ino() == link.ino() && n.dev() == link.dev())
                && there.is_some_and(|t| t.ino() == opened.ino() && t.dev() == opened.dev());
            if !same {
                return fail(
                    ErrorKind::Other,
                    format!("{} changed during the write", req.path),
                );
            }
            f
        }
        Err(e) => return Err(io_fail(&req.path, e)),
    };
    let md = f.metadata().map_err(|e| io_fail("fstat", e))?;
    if md.nlink() > 1 && !ours(md.uid()) {
        return Ok(None);
    }
    chown(&f)?;
    // An existing file keeps its mode unless one is asked for (chown may have cleared set-id
    // bits, as under envd).
    if let Some(m) = req.mode {
        ensure_mode(&f, m & 0o7777)?;
    }
    f.set_len(0).map_err(|e| io_fail("truncate", e))?;
    Ok(Some(f))
}

/// The atomic write: a temp file in the same directory, renamed over the target.
fn write_atomic(req: &FileRequest, c: &Conn) -> Res<FileInfo> {
    let path = Path::new(&req.path);
    let prepared = (|| -> Res<(File, PathBuf)> {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return fail(ErrorKind::Invalid, "write: path has no file name");
        };
        make_parents(req, path)?;
        let tmp = temp_path(dir, name);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_fail(&format!("create {}", tmp.display()), e))?;
        Ok((f, tmp))
    })();
    let tmp = prepared.as_ref().ok().map(|(_, t)| t.clone());
    let result = read_data(c, prepared, |(f, tmp), chunk| {
        f.write_all(chunk)
            .map_err(|e| io_fail(&format!("write {}", tmp.display()), e))
    })
    .and_then(|(f, tmp)| {
        let mode = req.mode.unwrap_or(0o644) & 0o7777;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_fail("chmod", e))?;
        if req.uid.is_some() || req.gid.is_some() {
            std::os::unix::fs::fchown(&f, req.uid, req.gid).map_err(|e| io_fail("chown", e))?;
            // chown clears the set-id bits: put them back.
            ensure_mode(&f, mode)?;
        }
        let info = finish(&f, req)?;
        std::fs::rename(&tmp, path)
            .map_err(|e| io_fail(&format!("rename to {}", path.display()), e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename is durable once the directory is.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(info)
    });
    if result.is_err() {
        if let Some(tmp) = tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
    result
}

pub fn read_file(req: FileRequest, c: &Conn) -> Res<()> {
    let mut f = if req.regular_only {
        // O_NONBLOCK: a FIFO opens at once instead of waiting for a writer (and is refused
        // below); O_NOCTTY: a tty never becomes ours.
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&req.path)
    } else {
        File::open(&req.path)
    }
    .map_err(|e| io_fail(&req.path, e))?;
    if req.regular_only && !f.metadata().is_ok_and(|m| m.is_file()) {
        return fail(
            ErrorKind::Invalid,
            format!("{} is not a regular file", req.path),
        );
    }
    if f.metadata().is_ok_and(|m| m.is_dir()) {
        return fail(ErrorKind::Invalid, format!("{} is a directory", req.path));
    }
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_fail(&req.path, e))?;
        send(c, Kind::Data, &buf[..n])?;
        if n == 0 {
            return Ok(());
        }
    }
}

fn kind_of(ft: std::fs::FileType) -> FileKind {
    if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

fn info_from(path: &Path, md: &std::fs::Metadata) -> FileInfo {
    FileInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.to_string_lossy().into_owned()),
        path: path.to_string_lossy().into_owned(),
        kind: kind_of(md.file_type()),
        size: md.size(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ms: md.mtime() * 1000 + md.mtime_nsec() / 1_000_000,
        symlink_target: None,
        link: None,
        metadata: Default::default(),
    }
}

/// lstat of `path` as a [`FileInfo`]; a symlink's target and where it leads, and the metadata
/// (through a symlink, best effort: an unreadable one is none), as envd reports them.
pub fn file_info(path: &Path) -> std::io::Result<FileInfo> {
    let md = std::fs::symlink_metadata(path)?;
    let mut info = info_from(path, &md);
    if info.kind == FileKind::Symlink {
        info.symlink_target = std::fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned());
        info.link = Some(match std::fs::canonicalize(path) {
            Ok(to) => {
                let there = std::fs::metadata(&to).ok();
                LinkTarget {
                    path: to.to_string_lossy().into_owned(),
                    kind: there.as_ref().map(|m| kind_of(m.file_type())),
                    mode: there.map_or(0, |m| m.mode() & 0o7777),
                }
            }
            Err(_) => LinkTarget {
                path: info.path.clone(),
                kind: None,
                mode: 0,
            },
        });
    }
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        info.metadata = xattr::read(xattr::On::Path(&c)).unwrap_or_default();
    }
    Ok(info)
}

/// An open file as a [`FileInfo`] named `path`.
fn file_info_of(f: &File, path: &Path) -> std::io::Result<FileInfo> {
    let mut info = info_from(path, &f.metadata()?);
    info.metadata = xattr::read(xattr::On::File(f)).unwrap_or_default();
    Ok(info)
}

pub fn stat(req: PathRequest, c: &Conn) -> Res<()> {
    let info = file_info(Path::new(&req.path)).map_err(|e| io_fail(&req.path, e))?;
    send_json(c, Kind::Ok, &info)
}

fn walk(dir: &Path, levels: u32, out: &mut Vec<FileInfo>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let Ok(info) = entry.and_then(|e| file_info(&e.path())) else {
            continue; // removed meanwhile
        };
        let sub = (info.kind == FileKind::Dir && levels > 1).then(|| PathBuf::from(&info.path));
        out.push(info);
        if let Some(sub) = sub {
            // An unreadable subdirectory is listed, not descended into.
            let _ = walk(&sub, levels - 1, out);
        }
    }
    Ok(())
}

/// A page of the directory `req.path` (see [`ListDirRequest`]): its entries named after
/// `req.after`, in name order, as many as `req.limit` and one frame allow.
fn list_page(req: &ListDirRequest) -> Res<Vec<FileInfo>> {
    let root = Path::new(&req.path);
    if req.depth != 1 {
        return fail(ErrorKind::Invalid, "a page of a listing is one level deep");
    }
    let md = std::fs::symlink_metadata(root).map_err(|e| io_fail(&req.path, e))?;
    if !md.is_dir() {
        return fail(
            ErrorKind::Invalid,
            format!("{} is not a directory", req.path),
        );
    }
    let mut names: Vec<(String, std::fs::DirEntry)> = std::fs::read_dir(root)
        .map_err(|e| io_fail(&req.path, e))?
        .filter_map(|e| e.ok())
        // A name that is not UTF-8 cannot be said in the protocol: two of them would look
        // alike, so none is listed.
        .filter_map(|e| e.file_name().into_string().ok().map(|n| (n, e)))
        .filter(|(n, _)| req.after.as_deref().is_none_or(|a| n.as_str() > a))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    // Room for the JSON array around the entries.
    let mut bytes = 2;
    for (_, entry) in names {
        if out.len() >= req.limit as usize {
            break;
        }
        let path = entry.path();
        // One too deep to be named by path is still listed (lstat beside the directory's
        // descriptor), so the client learns it is there.
        let info = match file_info(&path) {
            Ok(info) => info,
            Err(_) => match entry.metadata() {
                Ok(md) => info_from(&path, &md),
                Err(_) => continue, // removed meanwhile
            },
        };
        bytes += serde_json::to_vec(&info).map_or(0, |v| v.len()) + 1;
        if bytes > MAX_FRAME && !out.is_empty() {
            break;
        }
        out.push(info);
    }
    Ok(out)
}

pub fn list_dir(req: ListDirRequest, c: &Conn) -> Res<()> {
    if req.limit > 0 {
        return send_json(c, Kind::Ok, &list_page(&req)?);
    }
    let root = Path::new(&req.path);
    let md = std::fs::metadata(root).map_err(|e| io_fail(&req.path, e))?;
    if !md.is_dir() {
        return fail(
            ErrorKind::Invalid,
            format!("{} is not a directory", req.path),
        );
    }
    let mut out = Vec::new();
    if req.depth > 0 {
        walk(root, req.depth, &mut out).map_err(|e| io_fail(&req.path, e))?;
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    send_json(c, Kind::Ok, &out)
}

pub fn make_dir(req: MakeDirRequest, c: &Conn) -> Res<()> {
    let created = match std::fs::metadata(&req.path) {
        Ok(md) if md.is_dir() => false,
        Ok(_) => {
            return fail(
                ErrorKind::Exists,
                format!("{} exists and is not a directory", req.path),
            )
        }
        Err(_) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(req.mode.unwrap_or(0o755))
                .create(&req.path)
                .map_err(|e| io_fail(&req.path, e))?;
            true
        }
    };
    send_json(c, Kind::Ok, &MakeDirReply { created })
}

pub fn set_node(req: NodeRequest, c: &Conn) -> Res<()> {
    let path = Path::new(&req.path);
    let fail_at = |e| io_fail(&req.path, e);
    match (req.kind, &req.target) {
        (FileKind::Dir, _) => {
            match std::fs::symlink_metadata(path) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    std::fs::remove_file(path).map_err(fail_at)?;
                    std::fs::create_dir(path).map_err(fail_at)?;
                }
                Err(_) => std::fs::create_dir_all(path).map_err(fail_at)?,
            }
            std::os::unix::fs::lchown(path, Some(req.uid), Some(req.gid)).map_err(fail_at)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(req.mode & 0o7777))
                .map_err(fail_at)?;
        }
        (FileKind::Symlink, Some(target)) => {
            match std::fs::symlink_metadata(path) {
                Ok(md) if md.is_dir() => std::fs::remove_dir_all(path).map_err(fail_at)?,
                Ok(_) => std::fs::remove_file(path).map_err(fail_at)?,
                Err(_) => {}
            }
            std::os::unix::fs::symlink(target, path).map_err(fail_at)?;
            std::os::unix::fs::lchown(path, Some(req.uid), Some(req.gid)).map_err(fail_at)?;
        }
        _ => {
            return fail(
                ErrorKind::Invalid,
                format!("{}: a directory, or a symlink with its target", req.path),
            )
        }
    }
    send_json(c, Kind::Ok, &MakeDirReply { created: true })
}

pub fn rename(req: RenameRequest, c: &Conn) -> Res<()> {
    std::fs::rename(&req.from, &req.to)
        .map_err(|e| io_fail(&format!("rename {} to {}", req.from, req.to), e))?;
    let info = file_info(Path::new(&req.to)).map_err(|e| io_fail(&req.to, e))?;
    send_json(c, Kind::Ok, &info)
}

pub fn remove(req: PathRequest, c: &Conn) -> Res<()> {
    let md = std::fs::symlink_metadata(&req.path).map_err(|e| io_fail(&req.path, e))?;
    if md.is_dir() {
        std::fs::remove_dir_all(&req.path)
    } else {
        std::fs::remove_file(&req.path)
    }
    .map_err(|e| io_fail(&req.path, e))?;
    send(c, Kind::Ok, b"")
}

/// envd's compose: the sources, in order, into a temp file beside the destination (copied
/// in the kernel where it can), renamed over it; then the sources go.
pub fn compose(req: ComposeRequest, c: &Conn) -> Res<()> {
    let dest = Path::new(&req.destination);
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return fail(ErrorKind::Invalid, "compose: destination has no file name");
    };
    let tmp = temp_path(dir, name);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| io_fail(&format!("create {}", tmp.display()), e))?;
    let built = (|| -> Res<FileInfo> {
        if req.uid.is_some() || req.gid.is_some() {
            std::os::unix::fs::fchown(&out, req.uid, req.gid).map_err(|e| io_fail("chown", e))?;
        }
        for src in &req.sources {
            let mut f = File::open(src).map_err(|e| io_fail(src, e))?;
            if !f.metadata().is_ok_and(|m| m.is_file()) {
                return fail(
                    ErrorKind::Invalid,
                    format!("source path is not a regular file: {src}"),
                );
            }
            std::io::copy(&mut f, &mut out).map_err(|e| io_fail(&format!("compose {src}"), e))?;
        }
        out.sync_all().map_err(|e| io_fail("fsync", e))?;
        std::fs::rename(&tmp, dest).map_err(|e| io_fail(&req.destination, e))?;
        file_info_of(&out, dest).map_err(|e| io_fail("fstat", e))
    })();
    let info = match built {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    for src in &req.sources {
        let _ = std::fs::remove_file(src);
    }
    send_json(c, Kind::Ok, &info)
}
