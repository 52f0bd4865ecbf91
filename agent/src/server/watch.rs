//! Watching a directory with inotify, reporting what envd reports for the same changes: envd
//! watches with E2B's fork of fsnotify (github.com/e2b-dev/fsnotify, recursive with `dir/...`),
//! and this follows its rules (see [`Watcher::events`]).

use super::files::{file_info, is_temp_name};
use super::{fail, io_fail, send, send_json, Conn, Res};
use crate::protocol::*;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

/// fsnotify's inotify mask for its five operations (create, write, remove, rename, chmod).
const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_MOVE_SELF
    | libc::IN_ATTRIB
    | libc::IN_ONLYDIR;

/// The moves fsnotify remembers to follow a renamed directory's watches (its `cookies`).
const KEEP_COOKIES: usize = 10;

/// One inotify watch: a directory, relative to the watched one ("" for itself).
struct Dir {
    rel: String,
    /// Part of a recursive watch.
    recurse: bool,
    /// The directory the client asked for (not one found below it).
    by_user: bool,
}

struct Watcher {
    ino: File,
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    dirs: HashMap<i32, Dir>,
    /// Recent IN_MOVED_FROM cookies and what moved.
    cookies: VecDeque<(u32, String)>,
}

fn join(rel: &str, name: &str) -> String {
    match (rel.is_empty(), name.is_empty()) {
        (_, true) => rel.to_string(),
        (true, false) => name.to_string(),
        (false, false) => format!("{rel}/{name}"),
    }
}

fn parent(rel: &str) -> Option<&str> {
    (!rel.is_empty()).then(|| rel.rsplit_once('/').map_or("", |(p, _)| p))
}

impl Watcher {
    fn add(&mut self, rel: &str, recurse: bool, by_user: bool) -> std::io::Result<()> {
        let dir = self.root.join(rel);
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated path; our inotify descriptor.
        let wd = unsafe { libc::inotify_add_watch(self.ino.as_raw_fd(), c.as_ptr(), WATCH_MASK) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The same directory again (a watch that moved) keeps its entry, as in fsnotify.
        self.dirs.entry(wd).or_insert(Dir {
            rel: rel.to_string(),
            recurse,
            by_user,
        });
        Ok(())
    }

    /// The watch of the directory asked for and, if recursive, of every directory below it
    /// (symlinks not followed), as fsnotify's `Add("dir/...")`.
    fn add_tree(&mut self, rel: &str, by_user: bool) -> std::io::Result<()> {
        self.add(rel, self.recursive, by_user)?;
        if !self.recursive {
            return Ok(());
        }
        for entry in std::fs::read_dir(self.root.join(rel))?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let sub = join(rel, &entry.file_name().to_string_lossy());
                // A subdirectory removed meanwhile is no error.
                let _ = self.add_tree(&sub, false);
            }
        }
        Ok(())
    }

    fn remove_wd(&mut self, wd: i32) {
        // SAFETY: our inotify descriptor; a stale wd only fails.
        unsafe { libc::inotify_rm_watch(self.ino.as_raw_fd(), wd) };
        self.dirs.remove(&wd);
    }

    /// Turns a buffer of inotify events into protocol events (Err: the queue overflowed).
    ///
    /// fsnotify's rules, kept: IN_CREATE and IN_MOVED_TO are CREATE, IN_MODIFY WRITE,
    /// IN_DELETE and IN_DELETE_SELF REMOVE, IN_MOVED_FROM and IN_MOVE_SELF RENAME, IN_ATTRIB
    /// CHMOD; an event about a watched directory itself is named after it; a directory
    /// created (or moved) into a recursive watch is watched from then on, its contents as
    /// they change; a subdirectory's own removal is left to its parent's event and its own
    /// move is not reported; the watched directory moved away ends the watch with a RENAME.
    fn events(&mut self, buf: &[u8], out: &mut Vec<Event>) -> Result<(), ()> {
        let mut at = 0;
        let u32_at = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().unwrap());
        // struct inotify_event { int wd; u32 mask; u32 cookie; u32 len; char name[len]; }
        while at + 16 <= buf.len() {
            let wd = u32_at(at) as i32;
            let mask = u32_at(at + 4);
            let cookie = u32_at(at + 8);
            let len = u32_at(at + 12) as usize;
            let name_bytes = &buf[(at + 16).min(buf.len())..(at + 16 + len).min(buf.len())];
            at += 16 + len;
            if mask & libc::IN_Q_OVERFLOW != 0 {
                return Err(());
            }
            let name = String::from_utf8_lossy(name_bytes)
                .trim_end_matches('\0')
                .to_string();
            let Some(dir) = self.dirs.get(&wd) else {
                continue;
            };
            let (dir_rel, recurse, by_user) = (dir.rel.clone(), dir.recurse, dir.by_user);
            if mask & (libc::IN_IGNORED | libc::IN_UNMOUNT) != 0 {
                self.dirs.remove(&wd);
                continue;
            }
            if mask & libc::IN_DELETE_SELF != 0 {
                self.dirs.remove(&wd);
            }
            if mask & libc::IN_MOVE_SELF != 0 {
                if recurse && !by_user {
                    continue; // its parent reports the move
                }
                // The watched directory itself moved: every watch goes.
                let wds: Vec<i32> = self.dirs.keys().copied().collect();
                for w in wds {
                    self.remove_wd(w);
                }
                if recurse {
                    out.push(self.event(&dir_rel, EventOp::Rename));
                    continue;
                }
            }
            if mask & libc::IN_DELETE_SELF != 0
                && parent(&dir_rel).is_some_and(|p| self.dirs.values().any(|d| d.rel == p))
            {
                continue; // its parent reports the removal
            }
            if is_temp_name(&name) {
                continue;
            }
            let rel = join(&dir_rel, &name);
            let mut renamed_from = None;
            if cookie != 0 && mask & libc::IN_MOVED_FROM != 0 {
                if self.cookies.len() == KEEP_COOKIES {
                    self.cookies.pop_front();
                }
                self.cookies.push_back((cookie, rel.clone()));
            } else if cookie != 0 && mask & libc::IN_MOVED_TO != 0 {
                renamed_from = self
                    .cookies
                    .iter()
                    .find(|(c, _)| *c == cookie)
                    .map(|(_, p)| p.clone());
            }
            let mut ops = Vec::with_capacity(1);
            if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                ops.push(EventOp::Create);
            }
            if mask & (libc::IN_MOVE_SELF | libc::IN_MOVED_FROM) != 0 {
                ops.push(EventOp::Rename);
            }
            if mask & libc::IN_ATTRIB != 0 {
                ops.push(EventOp::Chmod);
            }
            if mask & libc::IN_MODIFY != 0 {
                ops.push(EventOp::Write);
            }
            if mask & (libc::IN_DELETE | libc::IN_DELETE_SELF) != 0 {
                ops.push(EventOp::Remove);
            }
            if recurse && mask & libc::IN_ISDIR != 0 && ops.contains(&EventOp::Create) {
                // A directory moved within the tree keeps its watches, renamed.
                if let Some(from) = renamed_from {
                    let prefix = format!("{from}/");
                    for d in self.dirs.values_mut() {
                        if d.rel == from {
                            d.rel = rel.clone();
                        } else if let Some(rest) = d.rel.strip_prefix(&prefix) {
                            d.rel = format!("{rel}/{rest}");
                        }
                    }
                }
                // Gone again already is no error.
                let _ = self.add(&rel, true, false);
            }
            for op in ops {
                out.push(self.event(&rel, op));
            }
        }
        Ok(())
    }

    fn event(&self, rel: &str, op: EventOp) -> Event {
        let entry = (self.include_entry
            && matches!(op, EventOp::Create | EventOp::Write | EventOp::Chmod))
        .then(|| file_info(&self.root.join(rel)).ok())
        .flatten();
        Event {
            name: if rel.is_empty() {
                ".".into()
            } else {
                rel.into()
            },
            op,
            entry,
        }
    }

    /// Reads what inotify has queued (without waiting) and sends it; false once the client
    /// is gone. The queue overflowing ends the watch with an error, as under envd.
    fn pump(&mut self, c: &Conn, buf: &mut [u8]) -> Res<bool> {
        loop {
            let n = match (&self.ino).read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_fail("inotify read", e)),
            };
            let mut out = Vec::new();
            if self.events(&buf[..n], &mut out).is_err() {
                return fail(
                    ErrorKind::Other,
                    "watcher error: fsnotify: queue or buffer overflow",
                );
            }
            for ev in out {
                if send_json(c, Kind::Event, &ev).is_err() {
                    return Ok(false);
                }
            }
        }
    }
}

/// The file systems envd watches only when asked (`allow_network_mounts`), by `statfs` magic:
/// NFS, CIFS, SMB, SMB2, FUSE.
const NETWORK_FS_MAGIC: [u32; 5] = [0x6969, 0xFF53_4D42, 0x517B, 0xFE53_4D42, 0x6573_5546];

fn on_network_mount(path: &Path) -> std::io::Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // f_type is signed on some targets: its low 32 bits are the magic.
    Ok(NETWORK_FS_MAGIC.contains(&(st.f_type as u32)))
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
    if !req.allow_network_mounts {
        let network = on_network_mount(&root).map_err(|e| {
            super::Fail(ErrorReply::new(
                ErrorKind::Other,
                format!("error checking mount status: {e}"),
            ))
        })?;
        if network {
            return fail(
                ErrorKind::Invalid,
                format!("cannot watch path on network filesystem: {}", req.path),
            );
        }
    }
    // SAFETY: plain inotify_init1 call; the result is checked.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io_fail("inotify", std::io::Error::last_os_error()));
    }
    let mut w = Watcher {
        // SAFETY: fd is a fresh descriptor we own.
        ino: unsafe { File::from_raw_fd(fd) },
        root: Path::new(&req.path).to_path_buf(),
        recursive: req.recursive,
        include_entry: req.include_entry,
        dirs: HashMap::new(),
        cookies: VecDeque::new(),
    };
    w.add_tree("", true).map_err(|e| io_fail(&req.path, e))?;
    send_json(c, Kind::Ok, &WatchStarted { sync: true })?;
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
        if fds[0].revents & libc::POLLIN != 0 && !w.pump(c, &mut buf)? {
            return Ok(());
        }
        if fds[1].revents != 0 {
            // The client sends only `Sync` frames; anything else (its close) ends the watch.
            match read_frame(&mut &**c) {
                Ok(Some((Kind::Sync, _))) => {
                    // Everything a change made before the Sync queued is read now.
                    if !w.pump(c, &mut buf)? {
                        return Ok(());
                    }
                    send(c, Kind::Ok, b"")?;
                }
                _ => return Ok(()),
            }
        }
    }
}
