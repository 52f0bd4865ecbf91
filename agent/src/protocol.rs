//! The agent's wire protocol: length-prefixed frames over one stream (vsock in a guest, a Unix
//! socket in gVisor and in tests).
//!
//! Frame: `u32` little-endian payload length, one kind byte ([`Kind`]), the payload (at most
//! [`MAX_FRAME`] bytes). Control payloads are JSON; data payloads are raw bytes. A connection
//! carries one request: its first frame names it, and the connection closes when it is done.
//!
//! Answers: `Ok` (an empty payload, or the JSON reply named below) or `Error` (JSON
//! [`ErrorReply`] `{kind, message}`, `kind` one of `not_found`, `exists`, `invalid`,
//! `permission`, `other`; agents before protocol 2 sent the message as plain UTF-8, which
//! clients still accept as kind `other`).
//!
//! Processes (every spawned process is kept in a process table with a bounded output buffer,
//! [`RING_BYTES`] per process, oldest output dropped; the last [`KEEP_EXITED`] exited entries
//! stay for reconnects). A process is named by [`ProcessRef`] `{pid?, tag?}` (a tag names the
//! most recently started process with that tag); an unknown one gets `not_found` "no process
//! with pid N" / "no process with tag T".
//! - `Exec` (JSON [`ExecRequest`]): the agent answers `Started` (JSON [`Started`]) once the
//!   process runs, then `Stdout` / `Stderr` frames as output appears (in the order the agent read
//!   it; all output is `Stdout` on a tty), and ends with `Exit` (JSON [`ExitStatus`]) or `Error`.
//!   `Exit` comes once the process exited and its output pipes closed, or stayed quiet for
//!   500 ms after its exit (held open by a process it left running, e.g. `sh -c "server &"`).
//!   If `stdin` is true (the default) the client sends `Stdin` frames, an empty one closing the
//!   process's stdin; otherwise the process reads a pipe fed only by `SendStdin`. The client
//!   keeps its side open until `Exit`: when the connection goes away earlier, a process with
//!   `background: false` gets SIGKILL (its process group); a background one keeps running. While
//!   a client is attached, output is not dropped: a slow reader blocks the process on its pipe.
//! - `Connect` (JSON [`ProcessRef`]): `Started` (with the count of output bytes already dropped
//!   from the buffer), the buffered output, live output, then `Exit`.
//! - `List` (empty payload or `{}`): `Ok` with JSON `Vec<`[`ProcessInfo`]`>`.
//! - `Signal` (JSON [`SignalRequest`]): signals the process group; `Ok`.
//! - `SendStdin` (JSON [`ProcessRef`]), then `Data` frames, an empty one ending them: `Ok`.
//! - `CloseStdin` (JSON [`ProcessRef`]): `Ok` (on a tty this sends ^D, the EOF character).
//! - `Resize` (JSON [`ResizeRequest`]): `TIOCSWINSZ` on the process's tty; `Ok`.
//!
//! Files:
//! - `WriteFile` (JSON [`FileRequest`]) then `Data` frames, an empty one ending the content;
//!   `Ok` with JSON [`FileInfo`] of the file written (protocol 3; empty before). By default the
//!   file appears atomically (temp file in the same directory, fsync, rename), with `mode`,
//!   then `uid`/`gid` if given. `in_place` writes the way envd does instead: the file (or a
//!   symlink's target) is opened with `O_TRUNC` and keeps its inode, so a watcher sees what it
//!   sees under envd (a new file: CREATE, CHMOD for the owner, WRITE; an existing one: CHMOD,
//!   WRITE) and no temp name ever exists. `metadata` replaces the file's `user.e2b.*` xattrs.
//!   `make_parents` creates the missing parent directories.
//! - `ReadFile` (JSON [`FileRequest`]): `Data` frames, an empty one ending the content, or
//!   `Error`.
//! - `Stat` (JSON [`PathRequest`]): `Ok` with JSON [`FileInfo`] (lstat: a symlink is not
//!   followed, but where it leads is in `link`; `metadata` is read through it, as envd does).
//! - `ListDir` (JSON [`ListDirRequest`]): `Ok` with JSON `Vec<`[`FileInfo`]`>`, the entries up to
//!   `depth` levels below the directory (1: its children), sorted by path, symlinks not followed.
//! - `MakeDir` (JSON [`MakeDirRequest`]): `mkdir -p`; `Ok` with JSON [`MakeDirReply`]
//!   (`created: false` if it was a directory already; `exists` error if it is something else).
//! - `Rename` (JSON [`RenameRequest`]): `Ok` with JSON [`FileInfo`] of the new path.
//! - `Remove` (JSON [`PathRequest`]): `Ok`; directories are removed recursively.
//! - `Compose` (JSON [`ComposeRequest`], protocol 3): the sources concatenated into the
//!   destination (a temp file renamed over it, given to `uid`/`gid`), then the sources
//!   removed (envd's `/files/compose`); `Ok` with JSON [`FileInfo`] of the destination.
//! - `WatchDir` (JSON [`WatchRequest`]): `Ok` (JSON [`WatchStarted`], protocol 3; empty before)
//!   once the watch is in place, then `Event` frames (JSON [`Event`]) until the client closes
//!   the connection. The events are envd's (its fsnotify fork's): a new subdirectory of a
//!   recursive watch is watched from when its CREATE is read (nothing is made up for what
//!   appeared in it before), changes of a watched directory itself are named after it (`.`
//!   for the root), and the atomic writes' temp names are never reported. The client may send
//!   `Sync` frames: the agent reads every event already queued, sends them, then answers `Ok`,
//!   so a change made before the `Sync` is in the frames before that `Ok`.
//!
//! Ports:
//! - `Dial` (JSON [`DialRequest`]): the agent connects to `host:port` (TCP, inside the sandbox)
//!   and answers `Ok` or `Error`; after `Ok` the connection is a raw byte pipe both ways, no more
//!   frames, and an end of stream on either side is passed on as a shutdown of writes.
//!
//! Lifecycle:
//! - `Health` (empty payload): `Ok` with JSON [`HealthInfo`].
//! - `Generation` (JSON [`GenerationRequest`], sent by the host after every restore or fork):
//!   sets the wall clock (unless `unix_time_ns` is 0), mixes the seed into the kernel RNG,
//!   records the generation (reported by `Health`) and writes it, as decimal and a newline,
//!   atomically to `$KILN_AGENT_RUN_DIR/generation` (default `/run/kiln/generation`); `Ok` with
//!   JSON [`GenerationReply`]. No signal is sent to anyone.
//! - `Quiesce` (empty payload, before a gVisor checkpoint): under `--unix` the agent closes its
//!   listener and every other connection, answers `Ok`, and listens again only once the host
//!   writes a `resume` file beside the socket (see `server::quiesce`). Elsewhere just `Ok`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

/// Largest frame payload accepted (bigger transfers are split into several frames).
pub const MAX_FRAME: usize = 1 << 20;
/// vsock port the agent listens on inside a guest.
pub const AGENT_PORT: u32 = 10_000;
/// Protocol version reported by `Health`.
pub const PROTOCOL_VERSION: u32 = 3;
/// Output kept per process for reconnects (bytes; the oldest output is dropped).
pub const RING_BYTES: usize = 1 << 20;
/// Exited processes kept in the table (the oldest are forgotten).
pub const KEEP_EXITED: usize = 64;

macro_rules! kinds {
    ($($(#[$m:meta])* $name:ident = $byte:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Kind {
            $($(#[$m])* $name = $byte,)*
        }

        impl Kind {
            pub fn from_byte(b: u8) -> Option<Kind> {
                match b {
                    $($byte => Some(Kind::$name),)*
                    _ => None,
                }
            }
        }
    };
}

kinds! {
    Exec = b'E',
    Stdin = b'I',
    Stdout = b'O',
    Stderr = b'R',
    Exit = b'X',
    WriteFile = b'W',
    ReadFile = b'F',
    Data = b'D',
    Ok = b'K',
    Error = b'!',
    /// The process runs (JSON [`Started`]).
    Started = b'S',
    Connect = b'C',
    List = b'L',
    Signal = b'G',
    SendStdin = b'N',
    CloseStdin = b'c',
    Resize = b'Z',
    Stat = b's',
    ListDir = b'l',
    MakeDir = b'M',
    Rename = b'm',
    Remove = b'r',
    WatchDir = b'w',
    /// A file system event (JSON [`Event`]).
    Event = b'V',
    Dial = b'T',
    Health = b'H',
    Generation = b'g',
    Quiesce = b'q',
    /// On a watch connection: send the events queued so far, then `Ok`.
    Sync = b'y',
    Compose = b'o',
    /// Makes a directory or symlink with the given owner and mode (JSON [`NodeRequest`]).
    SetNode = b'n',
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in PATH if it has no slash. A shell
    /// command line is `["/bin/sh", "-c", line]`.
    pub argv: Vec<String>,
    /// Environment (replaces the agent's, except PATH which defaults to a standard one, and
    /// HOME / USER / LOGNAME which default to the user's passwd entry when `user` is given).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name` (looked up in /etc/passwd), `uid`, `uid:gid` or `name:group`, resolved by
    /// [`crate::users::Users::exec_user`] (supplementary groups from /etc/group). Default: the
    /// agent's user.
    #[serde(default)]
    pub user: Option<String>,
    /// The user as the host already resolved it (same rules, from the sandbox's files): run
    /// as is, `user` not looked up again. An agent older than this field ignores it and
    /// resolves `user`, so a host sends both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::users::Identity>,
    /// A name for `Connect`, `Signal`, ... (several processes may share one).
    #[serde(default)]
    pub tag: Option<String>,
    /// Keep running when the client's connection goes away.
    #[serde(default)]
    pub background: bool,
    /// Run on a new pseudo-terminal of this size (its own session, the tty as its controlling
    /// terminal and as stdin, stdout and stderr).
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// The client sends `Stdin` frames after the request (default true).
    #[serde(default = "yes")]
    pub stdin: bool,
}

impl Default for ExecRequest {
    fn default() -> Self {
        ExecRequest {
            argv: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            identity: None,
            tag: None,
            background: false,
            tty: None,
            stdin: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExitStatus {
    /// Exit code, if the process exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Started {
    pub pid: i32,
    /// Output bytes dropped from the buffer before this connection attached (`Connect`).
    #[serde(default)]
    pub dropped: u64,
}

/// Names a process in the table: by pid, else by tag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ProcessRef {
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub tag: Option<String>,
}

impl ProcessRef {
    pub fn pid(pid: i32) -> ProcessRef {
        ProcessRef {
            pid: Some(pid),
            tag: None,
        }
    }
    pub fn tag(tag: &str) -> ProcessRef {
        ProcessRef {
            pid: None,
            tag: Some(tag.into()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalRequest {
    #[serde(flatten)]
    pub target: ProcessRef,
    pub signal: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResizeRequest {
    #[serde(flatten)]
    pub target: ProcessRef,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: i32,
    pub tag: Option<String>,
    pub argv: Vec<String>,
    pub cwd: Option<String>,
    pub started_ms: u64,
    pub running: bool,
    pub exit: Option<ExitStatus>,
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub tty: bool,
    /// Output bytes dropped from the buffer so far.
    #[serde(default)]
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct FileRequest {
    pub path: String,
    /// Permission bits for WriteFile (default 0644).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Owner set after a WriteFile (each defaults to unchanged).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// WriteFile creates missing parent directories.
    #[serde(default)]
    pub make_parents: bool,
    /// WriteFile writes into the file as envd does (see the module docs); `mode` then applies
    /// to a new file (default 0644) and, if given, to an existing one, which otherwise keeps
    /// its own.
    #[serde(default)]
    pub in_place: bool,
    /// WriteFile replaces the file's metadata (`user.e2b.<key>` xattrs) with these keys; None
    /// leaves the xattrs alone. Kept nowhere when the file system has no xattrs.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// ReadFile reads a regular file only, never through a symlink at its last component and
    /// without blocking on its open (a FIFO or device put there meanwhile is refused with
    /// `invalid`, not opened): what a host copying a sandbox's files out asks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub regular_only: bool,
}

/// The xattr namespace of file metadata (envd's `MetadataXattrPrefix`).
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathRequest {
    pub path: String,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListDirRequest {
    pub path: String,
    #[serde(default = "one")]
    pub depth: u32,
    /// A page of a big directory (depth 1 only, the directory itself not through a symlink):
    /// at most `limit` entries (fewer when the reply would pass [`MAX_FRAME`]), those whose
    /// name sorts after `after`. The pages end with an empty one. 0: every entry at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MakeDirRequest {
    pub path: String,
    /// Permission bits of the directories created (default 0755, less the umask).
    #[serde(default)]
    pub mode: Option<u32>,
}

/// A directory (made if missing, kept if there) or a symlink (replacing whatever is at
/// `path`), then owned by `uid:gid`; a directory's permission bits become `mode`. Used to put
/// back a file system saved without memory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRequest {
    pub path: String,
    pub kind: FileKind,
    /// The symlink's target.
    #[serde(default)]
    pub target: Option<String>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct MakeDirReply {
    pub created: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RenameRequest {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ComposeRequest {
    /// Regular files, in order.
    pub sources: Vec<String>,
    pub destination: String,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchRequest {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
    /// Each event that names an entry still there (CREATE, WRITE, CHMOD) carries its
    /// [`FileInfo`], read when the event is (envd's `include_entry`).
    #[serde(default)]
    pub include_entry: bool,
    /// Watch a directory on a network file system (NFS, SMB/CIFS, FUSE) too: refused
    /// otherwise, as envd refuses (its events may never come).
    #[serde(default)]
    pub allow_network_mounts: bool,
}

/// The answer to `WatchDir` (protocol 3).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct WatchStarted {
    /// The agent answers `Sync` frames.
    #[serde(default)]
    pub sync: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileInfo {
    /// The last component of `path`.
    pub name: String,
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ms: i64,
    pub symlink_target: Option<String>,
    /// For a symlink: where it leads (protocol 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkTarget>,
    /// The file's metadata: its `user.e2b.*` xattrs (prefix stripped, values that are not
    /// UTF-8 left out), read through a symlink (protocol 3).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// Where a symlink leads, as envd reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkTarget {
    /// The path with every symlink in it resolved; the link's own path when that fails (it
    /// dangles, or loops).
    pub path: String,
    /// What is there; None when the link dangles.
    pub kind: Option<FileKind>,
    /// Its permission bits (0 when it dangles).
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventOp {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Path relative to the watched directory (`.` for the directory itself).
    pub name: String,
    pub op: EventOp,
    /// With `include_entry`: the entry, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<FileInfo>,
}

fn localhost() -> String {
    "127.0.0.1".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DialRequest {
    pub port: u16,
    #[serde(default = "localhost")]
    pub host: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthInfo {
    pub version: String,
    pub protocol: u32,
    pub generation: u64,
    pub uptime_ms: u64,
    /// Processes the agent's out-of-memory killer ended (gVisor sandboxes).
    #[serde(default)]
    pub oom_kills: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationRequest {
    pub generation: u64,
    /// Wall clock to set (ns since the Unix epoch); 0 leaves the clock alone.
    #[serde(default)]
    pub unix_time_ns: u64,
    /// Fresh entropy (32 bytes as 64 hex digits; any whole number of bytes up to 512).
    #[serde(default)]
    pub seed_hex: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationReply {
    pub generation: u64,
    /// The clock was set (false if not asked, or the kernel refused: gVisor may).
    pub clock_set: bool,
    /// The seed was credited to the kernel pool with RNDADDENTROPY (it is always written to
    /// /dev/urandom, which mixes it in without credit).
    pub entropy_credited: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    Exists,
    Invalid,
    Permission,
    #[serde(other)]
    Other,
}

impl ErrorKind {
    pub fn of_io(e: &io::Error) -> ErrorKind {
        match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::Exists,
            io::ErrorKind::PermissionDenied => ErrorKind::Permission,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorKind::Invalid,
            _ => match e.raw_os_error() {
                Some(libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY | libc::EINVAL) => {
                    ErrorKind::Invalid
                }
                Some(libc::EPERM) => ErrorKind::Permission,
                _ => ErrorKind::Other,
            },
        }
    }
}

/// The payload of an `Error` frame.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

impl ErrorReply {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            kind,
            message: message.into(),
        }
    }

    /// An I/O error about `what` (a path, usually); "not found: <what>" for ENOENT.
    pub fn io(what: &str, e: &io::Error) -> ErrorReply {
        let kind = ErrorKind::of_io(e);
        let message = match kind {
            ErrorKind::NotFound => format!("not found: {what}"),
            _ => format!("{what}: {e}"),
        };
        ErrorReply { kind, message }
    }

    /// Reads an `Error` frame's payload: JSON, or the plain text of older agents.
    pub fn parse(payload: &[u8]) -> ErrorReply {
        serde_json::from_slice(payload).unwrap_or_else(|_| ErrorReply {
            kind: ErrorKind::Other,
            message: String::from_utf8_lossy(payload).into_owned(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0:#04x}")]
    BadKind(u8),
    #[error("bad JSON in {0:?} frame: {1}")]
    Json(Kind, serde_json::Error),
    #[error("unexpected {0:?} frame")]
    Unexpected(Kind),
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    if payload.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(payload.len()));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[4] = kind as u8;
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

pub fn write_json<T: Serialize>(
    w: &mut impl Write,
    kind: Kind,
    v: &T,
) -> Result<(), ProtocolError> {
    let bytes = serde_json::to_vec(v).map_err(|e| ProtocolError::Json(kind, e))?;
    write_frame(w, kind, &bytes)
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames. Reads exactly the
/// frame's bytes (never more), so a stream can carry raw bytes after a frame (`Dial`).
pub fn read_frame(r: &mut impl Read) -> Result<Option<(Kind, Vec<u8>)>, ProtocolError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    // Checked after the payload is consumed, so the peer can still read our error reply.
    let kind = Kind::from_byte(head[4]).ok_or(ProtocolError::BadKind(head[4]))?;
    Ok(Some((kind, payload)))
}

pub fn parse_json<T: for<'de> Deserialize<'de>>(
    kind: Kind,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    // An empty payload is an empty object (requests without fields, e.g. `List`).
    let payload = if payload.is_empty() { b"{}" } else { payload };
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Json(kind, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello").unwrap();
        write_json(
            &mut buf,
            Kind::Exit,
            &ExitStatus {
                code: Some(3),
                signal: None,
            },
        )
        .unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((Kind::Stdout, b"hello".to_vec()))
        );
        let (k, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(parse_json::<ExitStatus>(k, &p).unwrap().code, Some(3));
        assert!(read_frame(&mut r).unwrap().is_none());

        let mut bad = &[5u8, 0, 0, 0, b'?', 1, 2, 3, 4, 5][..];
        assert!(matches!(
            read_frame(&mut bad),
            Err(ProtocolError::BadKind(b'?'))
        ));
        let mut huge = &[0xff, 0xff, 0xff, 0x7f, b'D'][..];
        assert!(matches!(
            read_frame(&mut huge),
            Err(ProtocolError::TooLarge(_))
        ));
        let mut cut = &[9u8, 0, 0, 0, b'D', 1][..];
        assert!(matches!(read_frame(&mut cut), Err(ProtocolError::Io(_))));
        assert!(write_frame(&mut Vec::new(), Kind::Data, &vec![0; MAX_FRAME + 1]).is_err());
    }

    #[test]
    fn kind_bytes_are_distinct_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            if let Some(k) = Kind::from_byte(b) {
                assert_eq!(k as u8, b);
                assert!(seen.insert(k));
            }
        }
        // Every request and answer kind (more may be added).
        assert!(seen.len() >= 27, "{}", seen.len());
    }

    #[test]
    fn old_requests_parse_with_defaults() {
        let r: ExecRequest = parse_json(Kind::Exec, br#"{"argv":["true"]}"#).unwrap();
        assert!(r.stdin && !r.background && r.tty.is_none() && r.user.is_none());
        let f: FileRequest = parse_json(Kind::WriteFile, br#"{"path":"/x","mode":420}"#).unwrap();
        assert_eq!((f.mode, f.uid, f.make_parents), (Some(0o644), None, false));
        let l: ListDirRequest = parse_json(Kind::ListDir, br#"{"path":"/"}"#).unwrap();
        assert_eq!(l.depth, 1);
        let d: DialRequest = parse_json(Kind::Dial, br#"{"port":80}"#).unwrap();
        assert_eq!(d.host, "127.0.0.1");
        let p: ProcessRef = parse_json(Kind::List, b"").unwrap();
        assert_eq!(p, ProcessRef::default());
        let s: SignalRequest = parse_json(Kind::Signal, br#"{"tag":"t","signal":15}"#).unwrap();
        assert_eq!(s.target, ProcessRef::tag("t"));
    }

    #[test]
    fn error_replies_are_json_and_plain_text_still_reads() {
        let e = ErrorReply::io("/x", &io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.starts_with("not found:"), "{}", e.message);
        let bytes = serde_json::to_vec(&e).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains(r#""kind":"not_found""#));
        assert_eq!(ErrorReply::parse(&bytes), e);
        let old = ErrorReply::parse(b"exec x: boom");
        assert_eq!(
            (old.kind, old.message.as_str()),
            (ErrorKind::Other, "exec x: boom")
        );
        let future = ErrorReply::parse(br#"{"kind":"busy","message":"m"}"#);
        assert_eq!(future.kind, ErrorKind::Other);
        assert_eq!(
            ErrorKind::of_io(&io::Error::from_raw_os_error(libc::EEXIST)),
            ErrorKind::Exists
        );
    }
}
