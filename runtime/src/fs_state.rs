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

/// Copies what the running sandbox changed against the image tree `lower` into the store,
/// every blob held by `holder` before it is visible. `connect` opens a fresh agent connection;
/// `tmp` is a host file (not the sandbox's) that file contents pass through.
pub fn capture(
    store: &Store,
    holds: &Holds,
    holder: &Holder,
    connect: &dyn Fn() -> Result<UnixStream>,
    lower: &Path,
    tmp: &Path,
) -> Result<Checkpoint> {
    let lower = hostfs::Dir::open(lower).ctx("open the image tree", lower)?;
    let opts = PutOptions::default();
    let announce = |id: &BlobId| {
        holds
            .add_ahead(holder, id)
            .map_err(|e| kiln_blockstore::Error::Invalid(format!("holding a file blob: {e}")))
    };
    let mut tree = Tree::default();
    let mut blobs = BTreeSet::new();
    let mut dirs = vec!["/".to_string()];
    while let Some(dir) = dirs.pop() {
        let listed = kiln_agent::client::list_dir(&mut connect()?, &dir, 1)?;
        let mut names = BTreeSet::new();
        for e in listed {
            let Some(rel) = child_of(&dir, &e) else {
                return Err(Error::Invalid(format!(
                    "the agent listed {:?} in {dir:?}",
                    e.path
                )));
            };
            names.insert(e.name.clone());
            if SKIP.contains(&e.path.as_str()) {
                continue;
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
                        let mut f = std::fs::File::create(tmp).ctx("create", tmp)?;
                        kiln_agent::client::read_file(&mut connect()?, &e.path, &mut f)?;
                        drop(f);
                        let id = store.put_file_announced(tmp, &opts, &announce)?;
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
    let _ = std::fs::remove_file(tmp);
    tree.entries.sort_by(|a, b| a.path.cmp(&b.path));
    let bytes = serde_json::to_vec(&tree).expect("trees serialize");
    let id = store.put_bytes_announced(&bytes, &opts, &announce)?;
    blobs.insert(id);
    let files = tree.entries.iter().filter(|e| e.blob.is_some()).count();
    Ok(Checkpoint {
        state: serde_json::json!({"format": FORMAT, "tree": id, "files": files,
                                  "entries": tree.entries.len(), "removed": tree.removed.len()}),
        blobs: blobs.into_iter().collect(),
    })
}

/// Puts the saved changes `cp` into a freshly booted sandbox of the same image.
pub fn apply(
    store: &Store,
    connect: &dyn Fn() -> Result<UnixStream>,
    cp: &Checkpoint,
) -> Result<()> {
    let id: BlobId = cp
        .state
        .get("tree")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .ok_or_else(|| Error::Invalid("a file system checkpoint without its tree".into()))?;
    let bytes = read_blob(store, &id)?;
    let tree: Tree = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("the saved file system's tree: {e}")))?;
    // One entry the new agent refuses (say, a name the image now has as something else) is
    // left out and logged: the rest of the files still come back. A connection that fails
    // fails the boot.
    let mut refused = 0usize;
    let mut each = |path: &str, r: std::result::Result<(), kiln_agent::client::ClientError>| match r
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == Some(kiln_agent::protocol::ErrorKind::NotFound) => Ok(()),
        Err(e) if e.kind().is_some() => {
            refused += 1;
            tracing::warn!(path, "putting a saved file back: {e}");
            Ok(())
        }
        Err(e) => Err(Error::from(e)),
    };
    for p in &tree.removed {
        each(p, kiln_agent::client::remove(&mut connect()?, p))?;
    }
    // Sorted by path: a directory comes before what is in it.
    for e in &tree.entries {
        let r = match (e.kind, e.blob) {
            (FileKind::File, Some(blob)) => {
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
                    blob: store.open_blob(&blob)?,
                    at: 0,
                };
                kiln_agent::client::write_file(&mut connect()?, &req, reader).map(drop)
            }
            (kind @ (FileKind::Dir | FileKind::Symlink), _) => {
                let req = NodeRequest {
                    path: e.path.clone(),
                    kind,
                    target: e.target.clone(),
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                };
                kiln_agent::client::set_node(&mut connect()?, &req)
            }
            _ => Ok(()),
        };
        each(&e.path, r)?;
    }
    if refused > 0 {
        tracing::warn!(refused, "some saved files could not be put back");
    }
    Ok(())
}

fn read_blob(store: &Store, id: &BlobId) -> Result<Vec<u8>> {
    let b = store.open_blob(id)?;
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
