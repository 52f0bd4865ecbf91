//! File requests: atomic writes, reads, stat, directory listing and changes, and watching a
//! directory with inotify.

use super::{fail, io_fail, read_data, send, send_json, Conn, Res};
use crate::protocol::*;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The temp file a write goes to before its rename: a unique name in the same directory.
fn temp_path(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(
        ".{}.kiln-agent-tmp-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    ))
}

pub fn write_file(req: FileRequest, c: &Conn) -> Res<()> {
    let path = Path::new(&req.path);
    let prepared = (|| -> Res<(File, PathBuf)> {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return fail(ErrorKind::Invalid, "write: path has no file name");
        };
        if req.make_parents && !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| io_fail(&dir.to_string_lossy(), e))?;
        }
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
            if mode & 0o6000 != 0 {
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| io_fail("chmod", e))?;
            }
        }
        f.sync_all().map_err(|e| io_fail("fsync", e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| io_fail(&format!("rename to {}", path.display()), e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename is durable once the directory is.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    });
    match result {
        Ok(()) => send(c, Kind::Ok, b""),
        Err(super::Fail(mut e)) => {
            if let Some(tmp) = tmp {
                let _ = std::fs::remove_file(tmp);
            }
            if !e.message.contains(&req.path) {
                e.message = format!("write {}: {}", req.path, e.message);
            }
            Err(super::Fail(e))
        }
    }
}

pub fn read_file(req: FileRequest, c: &Conn) -> Res<()> {
    let mut f = File::open(&req.path).map_err(|e| io_fail(&req.path, e))?;
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

/// lstat of `path` as a [`FileInfo`].
pub fn file_info(path: &Path) -> std::io::Result<FileInfo> {
    let md = std::fs::symlink_metadata(path)?;
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let symlink_target = match kind {
        FileKind::Symlink => std::fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned()),
        _ => None,
    };
    Ok(FileInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.to_string_lossy().into_owned()),
        path: path.to_string_lossy().into_owned(),
        kind,
        size: md.size(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ms: md.mtime() * 1000 + md.mtime_nsec() / 1_000_000,
        symlink_target,
    })
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

pub fn list_dir(req: ListDirRequest, c: &Conn) -> Res<()> {
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

const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW
    | libc::IN_EXCL_UNLINK;

struct Watches {
    ino: File,
    /// Watch descriptor -> directory relative to the watched one ("" for itself).
    dirs: HashMap<i32, String>,
    root: PathBuf,
    recursive: bool,
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

impl Watches {
    /// Watches directory `rel` (and, if recursive, its subdirectories); `found` gets a create
    /// event for each entry already in it (for a directory that just appeared: files made in
    /// it before its watch was in place are not missed).
    fn add(&mut self, rel: &str, mut found: Option<&mut Vec<Event>>) -> std::io::Result<()> {
        let dir = self.root.join(rel);
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated path; our inotify descriptor.
        let wd = unsafe { libc::inotify_add_watch(self.ino.as_raw_fd(), c.as_ptr(), WATCH_MASK) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.dirs.insert(wd, rel.to_string());
        if !self.recursive && found.is_none() {
            return Ok(());
        }
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = join(rel, &entry.file_name().to_string_lossy());
            if let Some(f) = found.as_deref_mut() {
                f.push(Event {
                    name: name.clone(),
                    op: EventOp::Create,
                });
            }
            if self.recursive && entry.file_type().is_ok_and(|t| t.is_dir()) {
                // A subdirectory removed meanwhile is no error.
                let _ = self.add(&name, found.as_deref_mut());
            }
        }
        Ok(())
    }

    /// Turns a buffer of inotify events into protocol events, adding watches as needed.
    fn events(&mut self, buf: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut at = 0;
        let u32_at = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().unwrap());
        // struct inotify_event { int wd; u32 mask; u32 cookie; u32 len; char name[len]; }
        while at + 16 <= buf.len() {
            let wd = u32_at(at) as i32;
            let mask = u32_at(at + 4);
            let len = u32_at(at + 12) as usize;
            let name_bytes = &buf[(at + 16).min(buf.len())..(at + 16 + len).min(buf.len())];
            at += 16 + len;
            let name = String::from_utf8_lossy(name_bytes)
                .trim_end_matches('\0')
                .to_string();
            if mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&wd);
                continue;
            }
            let Some(rel) = self.dirs.get(&wd) else {
                continue;
            };
            if name.is_empty() {
                continue; // about the directory itself
            }
            let name = join(rel, &name);
            let op = if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                EventOp::Create
            } else if mask & libc::IN_MODIFY != 0 {
                EventOp::Write
            } else if mask & libc::IN_DELETE != 0 {
                EventOp::Remove
            } else if mask & libc::IN_MOVED_FROM != 0 {
                EventOp::Rename
            } else if mask & libc::IN_ATTRIB != 0 {
                EventOp::Chmod
            } else {
                continue;
            };
            let new_dir = op == EventOp::Create && mask & libc::IN_ISDIR != 0;
            out.push(Event {
                name: name.clone(),
                op,
            });
            if new_dir && self.recursive {
                let _ = self.add(&name, Some(&mut out));
            }
        }
        out
    }
}

pub fn watch_dir(req: WatchRequest, c: &Conn) -> Res<()> {
    let root = PathBuf::from(&req.path);
    let md = std::fs::metadata(&root).map_err(|e| io_fail(&req.path, e))?;
    if !md.is_dir() {
        return fail(
            ErrorKind::Invalid,
            format!("{} is not a directory", req.path),
        );
    }
    // SAFETY: plain inotify_init1 call; the result is checked.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io_fail("inotify", std::io::Error::last_os_error()));
    }
    let mut w = Watches {
        // SAFETY: fd is a fresh descriptor we own.
        ino: unsafe { File::from_raw_fd(fd) },
        dirs: HashMap::new(),
        root,
        recursive: req.recursive,
    };
    w.add("", None).map_err(|e| io_fail(&req.path, e))?;
    send(c, Kind::Ok, b"")?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: w.ino.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: c.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of 2 pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_fail("poll", e));
        }
        if fds[1].revents != 0 {
            // The client sends nothing after the request: its side is readable once it closed
            // the connection (or broke the protocol). Either way the watch ends.
            return Ok(());
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let n = match (&w.ino).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_fail("inotify read", e)),
        };
        for ev in w.events(&buf[..n]) {
            if send_json(c, Kind::Event, &ev).is_err() {
                return Ok(());
            }
        }
    }
}
