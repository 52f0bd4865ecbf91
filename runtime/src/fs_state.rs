//! A sandbox's file system without its memory (E2B's filesystem-only pause): what the
//! sandbox changed in its root file system against its image, copied out through its agent
//! into the block store, and put back by the agent of a freshly booted sandbox of the same
//! image.
//!
//! - The walk asks the running agent for each directory's entries (type, mode, owner, size,
//!   mtime, symlink target, `user.e2b.*` metadata) and compares them with the image's own tree
//!   on the host (read beneath it, never through a symlink: the names come from the sandbox).
//!   New or changed regular files are read out and stored as a blob each, so a file that did
//!   not change between two pauses, or that several sandboxes wrote alike, is stored once;
//!   directories and symlinks that differ are listed with their metadata; names the image has
//!   and the sandbox removed are listed as removed. The list itself is one blob more.
//! - Not kept: the contents of mounts that are not the root file system (`/proc`, `/sys`,
//!   `/dev`, kiln's own `/run/kiln` and `/.kiln`, the network's `/etc/resolv.conf` and
//!   `/etc/hosts`), FIFOs, sockets and device nodes, hard links (each name becomes a file of its
//!   own), and a file changed without changing its size, mtime (to the millisecond), mode or
//!   owner.
//! - Like a disk after a crash, what a process had not written yet is not there.

use crate::error::{Error, IoCtx, Result};
use crate::holds::{Holder, Holds};
use crate::hostfs;
use crate::Checkpoint;
use kiln_agent::protocol::{FileInfo, FileKind, FileRequest, NodeRequest};
use kiln_blockstore::{BlobId, PutOptions, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// `Checkpoint::state["format"]` of a file system saved without memory.
pub const FORMAT: &str = "kiln-fs/1";

/// Paths whose contents are not the root file system's.
const SKIP: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run/kiln",
    "/.kiln",
    "/etc/resolv.conf",
    "/etc/hosts",
];

/// What was saved: the changes against the image.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Tree {
    entries: Vec<Entry>,
    removed: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    path: String,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    /// A regular file's contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blob: Option<BlobId>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
}

/// Whether `cp` holds a file system only (no memory to restore).
pub fn is_filesystem_only(cp: &Checkpoint) -> bool {
    cp.state.get("format").and_then(|v| v.as_str()) == Some(FORMAT)
}

/// Most names one save looks at (every name in the sandbox's tree): what changed is in the
/// host's memory while the list is made (a few hundred bytes an entry), and is one blob.
pub const MAX_ENTRIES: usize = 500_000;
/// Most bytes of names, symlink targets and metadata one save keeps (same reason).
pub const MAX_TREE_BYTES: usize = 64 << 20;
/// Longest path kept: Linux's `PATH_MAX`; nothing deeper can be named by path inside either.
pub const MAX_PATH: usize = 4096;
/// Entries the agent is asked for at once (its reply is one frame, at most 1 MiB).
const LIST_PAGE: u32 = 2048;
/// How long the agent may stay silent during a save or a restore before it is given up on
/// (a hostile one may never answer; an honest one answers a page or a chunk at once).
pub const AGENT_IDLE: Duration = Duration::from_secs(30);
/// How many saved files a restore puts back at once.
const PUT_WORKERS: usize = 8;
/// The longest a whole save may take: the sandbox's lock is held meanwhile, and a sandbox
/// must not keep its host busy at will (an honest save of a full disk takes a few minutes).
pub const MAX_SAVE_TIME: Duration = Duration::from_secs(15 * 60);

/// An agent connection with [`AGENT_IDLE`] timeouts, refused past `deadline` if there is one.
fn open_within(
    connect: &dyn Fn() -> Result<UnixStream>,
    deadline: Option<Instant>,
) -> Result<UnixStream> {
    let left = match deadline {
        None => AGENT_IDLE,
        Some(d) => d
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Error::FilesNotSaved(format!("not done within {} s", MAX_SAVE_TIME.as_secs()))
            })?,
    };
    let s = connect()?;
    let idle = Some(left.min(AGENT_IDLE));
    let agent = Path::new("the agent connection");
    s.set_read_timeout(idle).ctx("set a timeout on", agent)?;
    s.set_write_timeout(idle).ctx("set a timeout on", agent)?;
    Ok(s)
}

/// A reader that fails once `deadline` has passed (each read is also bounded by its socket's
/// timeout).
struct Until<R> {
    inner: R,
    deadline: Instant,
}

impl<R: std::io::Read> std::io::Read for Until<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not done within {} s", MAX_SAVE_TIME.as_secs()),
            ));
        }
        self.inner.read(buf)
    }
}

/// What one save has taken so far, against its limits.
struct Budget {
    entries: usize,
    tree_bytes: usize,
    file_bytes: u64,
    max_file_bytes: u64,
}

impl Budget {
    fn entry(&mut self, e: &FileInfo) -> Result<()> {
        self.entries += 1;
        self.tree_bytes = self.tree_bytes.saturating_add(
            e.path.len()
                + e.symlink_target.as_ref().map_or(0, String::len)
                + e.metadata
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>(),
        );
        if self.entries > MAX_ENTRIES {
            return Err(Error::FilesNotSaved(format!(
                "more than {MAX_ENTRIES} names"
            )));
        }
        if self.tree_bytes > MAX_TREE_BYTES {
            return Err(Error::FilesNotSaved(format!(
                "more than {MAX_TREE_BYTES} bytes of names, symlink targets and metadata"
            )));
        }
        Ok(())
    }

    fn file(&mut self, e: &FileInfo) -> Result<()> {
        self.file_bytes = self.file_bytes.saturating_add(e.size);
        if self.file_bytes > self.max_file_bytes {
            return Err(Error::FilesNotSaved(format!(
                "with {} the changed files pass {} bytes, the sandbox's disk size (a sparse \
                 file counts at its full size)",
                e.path, self.max_file_bytes
            )));
        }
        Ok(())
    }
}

/// Copies what the running sandbox changed against the image tree `lower` into the store,
/// every blob held by `holder` before it is visible. `connect` opens a fresh agent connection;
/// `max_file_bytes` bounds the changed files' total size (the sandbox's disk size: more can
/// only be sparse files, or lies).
///
/// Everything the agent says is the sandbox's word: names are checked to be plain children
/// of the directory listed, each directory's pages to go forward, counts and sizes against
/// the limits above; file contents are streamed into the store (never through the host's
/// memory or disk), at most the size the listing gave. A file or directory that is gone or
/// is something else by the time it is read (the agent refuses it) is left out and counted.
pub fn capture(
    store: &Store,
    holds: &Holds,
    holder: &Holder,
    connect: &dyn Fn() -> Result<UnixStream>,
    lower: &Path,
    max_file_bytes: u64,
) -> Result<Checkpoint> {
    let deadline = Instant::now() + MAX_SAVE_TIME;
    let open = || open_within(connect, Some(deadline));
    let lower = hostfs::Dir::open(lower).ctx("open the image tree", lower)?;
    let opts = PutOptions::default();
    let announce = |id: &BlobId| {
        holds
            .add_ahead(holder, id)
            .map_err(|e| kiln_blockstore::Error::Invalid(format!("holding a file blob: {e}")))
    };
    let mut budget = Budget {
        entries: 0,
        tree_bytes: 0,
        file_bytes: 0,
        max_file_bytes,
    };
    let mut tree = Tree::default();
    let mut blobs = BTreeSet::new();
    let mut empty = None;
    let mut skipped = 0usize;
    let mut dirs = vec!["/".to_string()];
    while let Some(dir) = dirs.pop() {
        let mut names = BTreeSet::new();
        let listed = each_entry(&open, &dir, &mut budget, &mut |e, budget| {
            let rel = e.path[1..].to_string();
            names.insert(e.name.clone());
            if SKIP.contains(&e.path.as_str()) {
                return Ok(());
            }
            let below = lower.lstat_beneath(Path::new(&rel));
            match e.kind {
                FileKind::Dir => {
                    if below.is_none_or(|st| differs(&e, &st, false)) {
                        tree.entries.push(entry(&e, None, None));
                    }
                    dirs.push(e.path.clone());
                }
                FileKind::File => {
                    if below.is_none_or(|st| differs(&e, &st, true) || !e.metadata.is_empty()) {
                        budget.file(&e)?;
                        let id = if e.size == 0 {
                            // Nothing to ask the agent for.
                            match empty {
                                Some(id) => id,
                                None => *empty.insert(store.put_bytes_announced(
                                    &[],
                                    &opts,
                                    &announce,
                                )?),
                            }
                        } else {
                            match kiln_agent::client::open_file(open()?, &e.path, e.size) {
                                Ok(r) => {
                                    let r = Until { inner: r, deadline };
                                    store.put_reader_announced(r, &opts, &announce)?
                                }
                                Err(err) if err.kind().is_some() => {
                                    tracing::debug!(path = e.path, "not saved: {err}");
                                    skipped += 1;
                                    return Ok(());
                                }
                                Err(err) => return Err(from_agent(err)),
                            }
                        };
                        blobs.insert(id);
                        tree.entries.push(entry(&e, None, Some(id)));
                    }
                }
                FileKind::Symlink => {
                    let same = below.is_some_and(|st| {
                        !differs(&e, &st, false)
                            && lower.readlink_beneath(Path::new(&rel)).ok().as_deref()
                                == e.symlink_target.as_deref().map(Path::new)
                    });
                    // One whose target cannot be read cannot be made again.
                    if !same && e.symlink_target.is_some() {
                        tree.entries.push(entry(&e, e.symlink_target.clone(), None));
                    }
                }
                FileKind::Other => {}
            }
            Ok(())
        })?;
        if !listed {
            skipped += 1;
            continue;
        }
        // What the image has here and the sandbox removed.
        let here = Path::new(&dir).strip_prefix("/").unwrap_or(Path::new(""));
        let here = if here.as_os_str().is_empty() {
            Path::new(".")
        } else {
            here
        };
        if lower
            .lstat_beneath(here)
            .is_some_and(|st| is_kind(&st, libc::S_IFDIR))
        {
            for n in lower.names_beneath(here).unwrap_or_default() {
                let n = n.to_string_lossy().into_owned();
                let path = join(&dir, &n);
                if !names.contains(&n) && !SKIP.contains(&path.as_str()) {
                    tree.removed.push(path);
                }
            }
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "files or directories that changed while they were saved were left out"
        );
    }
    tree.entries.sort_by(|a, b| a.path.cmp(&b.path));
    let bytes = serde_json::to_vec(&tree).expect("trees serialize");
    let id = store.put_bytes_announced(&bytes, &opts, &announce)?;
    blobs.insert(id);
    let files = tree.entries.iter().filter(|e| e.blob.is_some()).count();
    Ok(Checkpoint {
        state: serde_json::json!({"format": FORMAT, "tree": id, "files": files,
                                  "entries": tree.entries.len(), "removed": tree.removed.len(),
                                  "skipped": skipped}),
        blobs: blobs.into_iter().collect(),
    })
}

/// Calls `each` with every entry of the directory `dir`, page by page as the agent sends
/// them, each checked (see [`capture`]); false when the agent refuses the directory (it is
/// gone, or no longer a directory).
fn each_entry(
    open: &dyn Fn() -> Result<UnixStream>,
    dir: &str,
    budget: &mut Budget,
    each: &mut dyn FnMut(FileInfo, &mut Budget) -> Result<()>,
) -> Result<bool> {
    let mut last: Option<String> = None;
    loop {
        let page = kiln_agent::client::list_dir_page(&mut open()?, dir, last.as_deref(), LIST_PAGE);
        let page = match page {
            Ok(p) => p,
            Err(e) if e.kind().is_some() && last.is_none() => {
                tracing::debug!(dir, "not saved: {e}");
                return Ok(false);
            }
            Err(e) => return Err(from_agent(e)),
        };
        if page.is_empty() {
            return Ok(true);
        }
        if page.len() > LIST_PAGE as usize {
            return Err(bad_reply(format!(
                "{} entries for a page of {LIST_PAGE}",
                page.len()
            )));
        }
        for e in page {
            if child_of(dir, &e).is_none() {
                return Err(bad_reply(format!("{:?} listed in {dir:?}", e.path)));
            }
            // Forward only: each page after the last, no name twice.
            if last.as_ref().is_some_and(|l| *l >= e.name) {
                return Err(bad_reply(format!(
                    "{:?} listed out of order in {dir:?}",
                    e.name
                )));
            }
            if e.path.len() > MAX_PATH {
                return Err(Error::FilesNotSaved(format!(
                    "a path of {} bytes (in {:?}...), longer than {MAX_PATH}",
                    e.path.len(),
                    dir.get(..64).unwrap_or(dir)
                )));
            }
            budget.entry(&e)?;
            last = Some(e.name.clone());
            each(e, budget)?;
        }
    }
}

/// The agent's failure as the save's: one that stays silent is said to be.
fn from_agent(e: kiln_agent::client::ClientError) -> Error {
    use kiln_agent::client::ClientError;
    use kiln_agent::protocol::ProtocolError;
    match &e {
        ClientError::Protocol(ProtocolError::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Error::FilesNotSaved(format!(
                "the agent did not answer within {} s",
                AGENT_IDLE.as_secs()
            ))
        }
        _ => e.into(),
    }
}

fn bad_reply(what: String) -> Error {
    Error::FilesNotSaved(format!("the agent answered nonsense: {what}"))
}

/// Puts the saved changes `cp` into a freshly booted sandbox of the same image.
pub fn apply(
    store: &Store,
    connect: &(dyn Fn() -> Result<UnixStream> + Sync),
    cp: &Checkpoint,
) -> Result<()> {
    let id: BlobId = cp
        .state
        .get("tree")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .ok_or_else(|| Error::Invalid("a file system checkpoint without its tree".into()))?;
    // No deadline: what is put back was saved within the limits, into a sandbox just booted
    // (none of its processes ran yet); only a silent agent is given up on.
    let connect = &|| open_within(connect, None);
    let bytes = read_blob(store, &id)?;
    let tree: Tree = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("the saved file system's tree: {e}")))?;
    // One entry the new agent refuses (say, a name the image now has as something else) is
    // left out and logged: the rest of the files still come back. A connection that fails
    // fails the boot.
    let refused = AtomicUsize::new(0);
    let each = |path: &str, r: std::result::Result<(), kiln_agent::client::ClientError>| match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == Some(kiln_agent::protocol::ErrorKind::NotFound) => Ok(()),
        Err(e) if e.kind().is_some() => {
            refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path, "putting a saved file back: {e}");
            Ok(())
        }
        Err(e) => Err(Error::from(e)),
    };
    for p in &tree.removed {
        each(p, kiln_agent::client::remove(&mut connect()?, p))?;
    }
    // Directories and symlinks first, in path order (a directory before what is in it)...
    for e in &tree.entries {
        if let FileKind::Dir | FileKind::Symlink = e.kind {
            let req = NodeRequest {
                path: e.path.clone(),
                kind: e.kind,
                target: e.target.clone(),
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
            };
            each(&e.path, kiln_agent::client::set_node(&mut connect()?, &req))?;
        }
    }
    // ...then the files, PUT_WORKERS at a time: each is a connection of its own, and most of
    // a file's time is the round trip through the sandbox's socket, not the copy.
    let files: Vec<(&Entry, BlobId)> = tree
        .entries
        .iter()
        .filter(|e| e.kind == FileKind::File)
        .filter_map(|e| e.blob.map(|b| (e, b)))
        .collect();
    let next = AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None::<Error>);
    let put = |e: &Entry, blob: &BlobId| -> Result<()> {
        let req = FileRequest {
            path: e.path.clone(),
            mode: Some(e.mode),
            uid: Some(e.uid),
            gid: Some(e.gid),
            make_parents: true,
            metadata: (!e.metadata.is_empty()).then(|| e.metadata.clone()),
            ..FileRequest::default()
        };
        let reader = BlobRead {
            blob: store.open_blob(blob)?,
            at: 0,
        };
        let r = kiln_agent::client::write_file(&mut connect()?, &req, reader).map(drop);
        each(&e.path, r)
    };
    std::thread::scope(|scope| {
        for _ in 0..PUT_WORKERS.min(files.len()) {
            scope.spawn(|| loop {
                if failed.lock().expect("restore errors").is_some() {
                    return;
                }
                let Some((e, blob)) = files.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                if let Err(err) = put(e, blob) {
                    failed.lock().expect("restore errors").get_or_insert(err);
                    return;
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("restore errors") {
        return Err(e);
    }
    let refused = refused.into_inner();
    if refused > 0 {
        tracing::warn!(refused, "some saved files could not be put back");
    }
    Ok(())
}

fn read_blob(store: &Store, id: &BlobId) -> Result<Vec<u8>> {
    let b = store.open_blob(id)?;
    // The list was made within the limits; one past them is not ours.
    let max = (MAX_TREE_BYTES as u64).saturating_add(MAX_ENTRIES as u64 * 512);
    if b.len() > max {
        return Err(Error::FilesNotSaved(format!(
            "a saved file list of {} bytes, more than {max}",
            b.len()
        )));
    }
    let mut out = vec![0u8; usize::try_from(b.len()).unwrap_or(usize::MAX)];
    let mut at = 0;
    while at < out.len() {
        match b.read_at(at as u64, &mut out[at..])? {
            0 => break,
            n => at += n,
        }
    }
    out.truncate(at);
    Ok(out)
}

/// A blob as a `Read`.
struct BlobRead {
    blob: kiln_blockstore::BlobReader,
    at: u64,
}

impl std::io::Read for BlobRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .blob
            .read_at(self.at, buf)
            .map_err(std::io::Error::other)?;
        self.at += n as u64;
        Ok(n)
    }
}

fn entry(e: &FileInfo, target: Option<String>, blob: Option<BlobId>) -> Entry {
    Entry {
        path: e.path.clone(),
        kind: e.kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        target,
        blob,
        metadata: e.metadata.clone(),
    }
}

/// `e`'s path relative to the root, if it is a plain child of `dir` (the names come from the
/// sandbox).
fn child_of(dir: &str, e: &FileInfo) -> Option<String> {
    let n = &e.name;
    let plain = !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\0']);
    (plain && e.path == join(dir, n)).then(|| e.path[1..].to_string())
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn is_kind(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

/// Whether the sandbox's entry `e` differs from the image's `st` (for a regular file, its size
/// and mtime too).
fn differs(e: &FileInfo, st: &libc::stat, contents: bool) -> bool {
    let kind = match e.kind {
        FileKind::File => libc::S_IFREG,
        FileKind::Dir => libc::S_IFDIR,
        FileKind::Symlink => libc::S_IFLNK,
        FileKind::Other => return true,
    };
    let mtime_ms = st.st_mtime.saturating_mul(1000) + st.st_mtime_nsec / 1_000_000;
    !is_kind(st, kind)
        || (e.kind != FileKind::Symlink && e.mode != st.st_mode & 0o7777)
        || e.uid != st.st_uid
        || e.gid != st.st_gid
        || (contents && (e.size != st.st_size as u64 || e.mtime_ms != mtime_ms))
}
