//! Sandbox records: one directory per sandbox under `KILN_HOME/sandboxes/<id>/` holding
//! `sandbox.json` (written atomically: temp file, fsync, rename), a `lock` file (flock, held by
//! whoever is changing the sandbox, so operations on one sandbox are serialized and a holder
//! killed mid-operation is noticed), the console log, and driver-private files.

use crate::error::{Error, IoCtx, Result};
use kiln_blockstore::BlobId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Which driver runs a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// kiln's own VMM (KVM with hardware virtualization, a Linux guest kernel).
    Microvm,
    /// gVisor's `runsc` (any Linux host).
    Gvisor,
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // pad, not write_str: table columns pass a width.
        f.pad(match self {
            RuntimeKind::Microvm => "microvm",
            RuntimeKind::Gvisor => "gvisor",
        })
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "microvm" => Ok(RuntimeKind::Microvm),
            "gvisor" => Ok(RuntimeKind::Gvisor),
            _ => Err(Error::Invalid(format!(
                "unknown runtime {s:?} (microvm or gvisor)"
            ))),
        }
    }
}

/// Where a sandbox is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum State {
    /// Being created (or restored); the creator holds the lock.
    Starting,
    Running,
    /// Saved to the store and stopped; `resume` restores it.
    Paused {
        saved: BlobId,
    },
    Stopped,
    Failed {
        cause: String,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The state without its data, for matching and for errors.
    pub fn kind(&self) -> StateKind {
        match self {
            State::Starting => StateKind::Starting,
            State::Running => StateKind::Running,
            State::Paused { .. } => StateKind::Paused,
            State::Stopped => StateKind::Stopped,
            State::Failed { .. } => StateKind::Failed,
        }
    }
}

/// Which [`State`] a sandbox is in, without what the state carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    Starting,
    Running,
    Paused,
    Stopped,
    Failed,
}

impl StateKind {
    pub fn name(self) -> &'static str {
        match self {
            StateKind::Starting => "starting",
            StateKind::Running => "running",
            StateKind::Paused => "paused",
            StateKind::Stopped => "stopped",
            StateKind::Failed => "failed",
        }
    }
}

impl std::fmt::Display for StateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens when a sandbox's timeout expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Kill,
    Pause,
    /// Pause keeping only the file system (E2B's `autoPauseMemory: false`).
    #[serde(rename = "pause_filesystem")]
    PauseFilesystem,
}

/// What a pause keeps of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PauseMode {
    /// Memory, processes and files: a resume goes on where it stopped.
    #[default]
    Full,
    /// The root file system's changes only: a resume boots the sandbox afresh on them.
    Filesystem,
}

/// How a paused sandbox comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ResumeMode {
    /// From its memory when it was saved with it.
    #[default]
    Restore,
    /// A fresh boot on its files, whatever was saved (a full pause's memory is left alone).
    Reboot,
}

/// A process's defaults, from the image config (Dockerfile ENV, WORKDIR, USER, CMD).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessDefaults {
    /// `K=V` entries, image first, then the sandbox's own.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub cmd: Vec<String>,
}

/// One sandbox, as kept in `sandbox.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub schema: u32,
    pub id: String,
    pub name: Option<String>,
    /// The image its root file system comes from.
    pub image: BlobId,
    /// What the user asked for (an image name or id, or a snapshot).
    pub source: String,
    /// The snapshot it was restored from, if any.
    pub snapshot: Option<BlobId>,
    pub runtime: RuntimeKind,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    #[serde(flatten)]
    pub state: State,
    pub created_ms: u64,
    pub timeout_secs: Option<u64>,
    /// Unix ms after which `on_timeout` applies (None: never).
    pub deadline_ms: Option<u64>,
    pub on_timeout: OnTimeout,
    /// Whether a request for the sandbox while it is paused resumes it (E2B's
    /// `autoResume`; `kiln serve` acts on it, the runtime only keeps it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_resume: bool,
    /// The agent's address on the host (a Unix socket path).
    pub agent: Option<PathBuf>,
    /// Bumped by every restore and fork; the agent is told so programs can tell.
    pub generation: u64,
    pub defaults: ProcessDefaults,
    /// An operation under way and how far it got: if its process dies, whoever next takes
    /// the lock finishes it or rolls it back ([`crate::Runtime::recover`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "op_or_legacy"
    )]
    pub op: Option<Op>,
    /// Driver-private state (process ids, paths).
    #[serde(default)]
    pub driver: serde_json::Value,
    /// The egress policy; `None`: the sandbox has no network device (loopback only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<kiln_network::NetworkPolicy>,
    /// Its network on this host while it runs (namespaces, TAP or veth, addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<kiln_network::Attachment>,
    /// Who may use its data plane: set when the record is made (before anything runs), kept
    /// for its whole life, never copied into a snapshot.
    #[serde(default, skip_serializing_if = "Access::is_open")]
    pub access: Access,
}

/// The data plane's credentials of one sandbox (`kiln serve`: E2B's envd access token and
/// traffic access token). A flag without its token means the record was damaged: the data
/// plane then refuses everyone rather than no one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// Requests for envd (processes, files) must carry `envd_token`.
    #[serde(default)]
    pub secure: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_token: Option<String>,
    /// Requests for the sandbox's other ports must carry `traffic_token` (E2B's
    /// `allowPublicTraffic: false`).
    #[serde(default)]
    pub private_traffic: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_token: Option<String>,
    /// The Host requests for the sandbox's other ports carry inside (E2B's
    /// `maskRequestHost`; `${PORT}` is the port), the original one in `X-Forwarded-Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
}

impl Access {
    /// Fresh tokens for what is asked.
    pub fn new(secure: bool, private_traffic: bool) -> Access {
        Access {
            secure,
            envd_token: secure.then(|| new_token("ea_")),
            private_traffic,
            traffic_token: private_traffic.then(|| new_token("ta_")),
            mask_request_host: None,
        }
    }

    /// Nothing asked: anyone who can reach the data plane may use it.
    pub fn is_open(&self) -> bool {
        *self == Access::default()
    }
}

pub const SCHEMA: u32 = 1;

/// An operation that changes a running or paused sandbox in several steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Pause,
    Resume,
    /// A live snapshot (the sandbox runs on).
    Snapshot,
    /// The live snapshot a fork starts from (the forks themselves are `starting` records).
    Fork,
    Kill,
    /// A sandbox paused on another host, taken from the store's remote into this home
    /// ([`crate::Sandboxes::adopt`]); its record is `paused` throughout.
    Adopt,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Pause => "pause",
            OpKind::Resume => "resume",
            OpKind::Snapshot => "snapshot",
            OpKind::Fork => "fork",
            OpKind::Kill => "kill",
            OpKind::Adopt => "adopt",
        }
    }

    /// Whether its checkpoint ends the sandbox's processes (pause) or the sandbox runs on.
    pub fn stops(self) -> bool {
        self == OpKind::Pause
    }
}

/// How far an operation got. Each phase is saved before its step starts, so a record never
/// claims more than was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Getting ready (the agent told to quiesce, a network attached): the sandbox's processes
    /// are as they were.
    Prepare,
    /// The runtime writes the checkpoint (`helper` is the detached process doing it).
    Checkpoint,
    /// The sandbox's files are copied out through its agent into the store (a filesystem-only
    /// pause, or a reboot); nothing of the sandbox changes.
    Capture,
    /// The checkpoint is complete on the host and goes into the store.
    Store,
    /// The driver's part is done and `checkpoint` holds its result.
    Saved,
    /// The sandbox is being restored (resume; or in place after a live snapshot's checkpoint
    /// stopped it).
    Restore,
    /// Its processes are being ended and its directory removed.
    Kill,
}

/// A process by pid and start time (clock ticks since boot): a recycled pid is not mistaken
/// for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    pub start_time: u64,
}

impl Proc {
    /// The live process `pid`, as it is now.
    pub fn of(pid: u32) -> Option<Proc> {
        Some(Proc {
            pid,
            start_time: process_start_time(pid)?,
        })
    }

    /// Whether it still runs (a zombie does not).
    pub fn alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks); None for a gone or zombie process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Live processes whose command line holds every one of `args` (whole arguments).
pub fn processes_with(args: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let has = |a: &str| cmd.split(|b| *b == 0).any(|c| c == a.as_bytes());
        if args.iter().all(|a| has(a)) && process_start_time(pid).is_some() {
            out.push(pid);
        }
    }
    out
}

/// An operation under way on a sandbox (`rec.op`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub kind: OpKind,
    pub phase: Phase,
    /// When the phase was entered (Unix ms).
    pub since_ms: u64,
    /// A detached process doing the step (e.g. the watcher of `runsc checkpoint`), which goes
    /// on if the caller dies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper: Option<Proc>,
    /// The checkpoint, once the driver's part is done ([`Phase::Saved`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<crate::Checkpoint>,
    /// The snapshot record made of it, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<BlobId>,
    /// A filesystem-only pause (its steps are kiln's, not the driver's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub filesystem_only: bool,
    /// Driver-private progress (e.g. the name a VM snapshot is being saved under).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub driver: serde_json::Value,
}

impl Op {
    pub fn new(kind: OpKind, phase: Phase) -> Op {
        Op {
            kind,
            phase,
            since_ms: now_ms(),
            helper: None,
            checkpoint: None,
            saved: None,
            filesystem_only: false,
            driver: serde_json::Value::Null,
        }
    }
}

/// `op` as saved now, or as kiln saved it before phases existed (just its kind's name, set
/// while the checkpoint ran).
fn op_or_legacy<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Op>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Now(Op),
        Legacy(String),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        None => None,
        Some(Either::Now(op)) => Some(op),
        Some(Either::Legacy(kind)) => {
            let kind = serde_json::from_value(serde_json::Value::String(kind))
                .map_err(serde::de::Error::custom)?;
            Some(Op::new(kind, Phase::Checkpoint))
        }
    })
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The deadline `secs` seconds after `now_ms` (Unix ms), saturating: a huge timeout is a
/// deadline at the end of time, never one that wrapped into the past.
pub fn deadline_after(now_ms: u64, secs: u64) -> u64 {
    now_ms.saturating_add(secs.saturating_mul(1000))
}

/// `prefix` + 32 hex digits (128 bits) from the OS RNG: a secret.
pub fn new_token(prefix: &str) -> String {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: getrandom writes at most the remaining length into the buffer we own.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // Without the OS RNG there is no secret to hand out; nothing sensible goes on.
            assert_eq!(e.raw_os_error(), Some(libc::EINTR), "getrandom: {e}");
            continue;
        }
        got += n as usize;
    }
    format!("{prefix}{}", hex::encode(b))
}

/// 16 lowercase hex digits from the OS RNG: usable in host names (`{port}-{id}.domain`).
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = now_ms() ^ ((std::process::id() as u64) << 40);
        b = t.to_le_bytes();
    }
    hex::encode(b)
}

/// Sandbox ids and names: `[a-zA-Z0-9._-]`, 1..64 bytes, not starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "sandbox name {name:?}: use 1-64 of [a-zA-Z0-9._-], not starting with . or -"
        )))
    }
}

/// A sandbox's directory.
#[derive(Clone, Debug)]
pub struct SandboxDir {
    path: PathBuf,
}

impl SandboxDir {
    pub fn new(path: PathBuf) -> SandboxDir {
        SandboxDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn id(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
    pub fn record_path(&self) -> PathBuf {
        self.path.join("sandbox.json")
    }
    /// What the sandbox's init and runtime print (console, runsc's user log, the VMM's serial).
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }
    /// A driver's own subdirectory.
    pub fn sub(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
    /// The network's files: policy, DNS proxy settings and pid, resolv.conf, hosts.
    pub fn net(&self) -> PathBuf {
        self.path.join("net")
    }

    /// The record; [`Error::NotFound`] once it is gone (the sandbox was removed meanwhile).
    pub fn load(&self) -> Result<SandboxRecord> {
        let p = self.record_path();
        let bytes = match std::fs::read(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(self.id()))
            }
            r => r.ctx("read", &p)?,
        };
        serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))
    }

    /// Replaces the record atomically. Not fsynced: a host crash ends the sandbox's processes
    /// anyway, and the next reader derives the state from what is left; only a pause's record
    /// must outlive one ([`SandboxDir::save_durable`]).
    pub fn save(&self, rec: &SandboxRecord) -> Result<()> {
        write_atomic(&self.record_path(), &Self::bytes(rec), false)
    }

    /// Records that `rec`'s operation enters `phase` (before its step starts); a helper of
    /// the previous phase is forgotten.
    pub fn enter(&self, rec: &mut SandboxRecord, phase: Phase) -> Result<()> {
        if let Some(op) = rec.op.as_mut() {
            op.phase = phase;
            op.since_ms = now_ms();
            op.helper = None;
        }
        self.save(rec)
    }

    /// Replaces the record atomically and durably.
    pub fn save_durable(&self, rec: &SandboxRecord) -> Result<()> {
        write_atomic(&self.record_path(), &Self::bytes(rec), true)
    }

    fn bytes(rec: &SandboxRecord) -> Vec<u8> {
        serde_json::to_vec_pretty(rec).expect("records serialize")
    }

    /// Takes the sandbox's lock without waiting; `None` if another process holds it.
    pub fn try_lock(&self) -> Result<Option<Lock>> {
        let p = self.path.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p);
        let f = match f {
            // The sandbox was removed (renamed away) since it was looked up.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(self.id()));
            }
            r => r.ctx("open", &p)?,
        };
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            Ok(Some(Lock { _file: f }))
        } else {
            Ok(None)
        }
    }

    /// Takes the lock, waiting up to `wait` for another operation to finish.
    pub fn lock(&self, wait: std::time::Duration) -> Result<Lock> {
        let t = std::time::Instant::now();
        loop {
            if let Some(l) = self.try_lock()? {
                return Ok(l);
            }
            if t.elapsed() >= wait {
                return Err(Error::Busy(self.id()));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The last `max` bytes of the console log, for error messages.
    pub fn log_tail(&self, max: usize) -> String {
        tail(&self.console_log(), max)
    }
}

/// The last `max` bytes of a file (lossy UTF-8), or a note that it cannot be read.
pub fn tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b[b.len().saturating_sub(max)..]).into_owned(),
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Held while an operation changes a sandbox; released when dropped or when the process dies.
pub struct Lock {
    _file: File,
}

/// `path` replaced atomically (see `kiln_atomicfile`), mode 0600: records hold access tokens.
/// With `durable`, the file and its directory are fsynced too.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let opts = kiln_atomicfile::Options {
        private: true,
        durable,
    };
    kiln_atomicfile::write(path, bytes, opts).ctx("write", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_removed_after_its_lookup_is_not_found_when_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SandboxDir::new(tmp.path().join("abc"));
        std::fs::create_dir(dir.path()).unwrap();
        assert!(dir.try_lock().unwrap().is_some());
        // What `remove` does while another caller holds the path it resolved.
        std::fs::rename(dir.path(), tmp.path().join(".gone-abc")).unwrap();
        match dir.lock(std::time::Duration::from_millis(50)) {
            Err(Error::NotFound(id)) => assert_eq!(id, "abc"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("locked a removed sandbox"),
        }
        assert!(
            !dir.path().exists(),
            "the lookup recreated the removed sandbox"
        );
    }

    #[test]
    fn deadlines_saturate() {
        assert_eq!(deadline_after(1_000, 0), 1_000);
        assert_eq!(deadline_after(1_000, 5), 6_000);
        let now = 1_796_171_626_123;
        for secs in [u64::MAX, u64::MAX / 1000 + 1, 1 << 63, (1 << 63) - 1] {
            let d = deadline_after(now, secs);
            assert_eq!(d, u64::MAX, "{secs}");
            assert!(d > now);
        }
        assert_eq!(deadline_after(u64::MAX, 1), u64::MAX);
        // Just below the limit: exact, no early saturation.
        let secs = (u64::MAX - now) / 1000;
        assert_eq!(deadline_after(now, secs), now + secs * 1000);
    }

    #[test]
    fn access_tokens_are_fresh_and_old_records_are_open() {
        let a = Access::new(true, true);
        let (e, t) = (
            a.envd_token.clone().unwrap(),
            a.traffic_token.clone().unwrap(),
        );
        assert!(e.starts_with("ea_") && e.len() == 35, "{e}");
        assert!(t.starts_with("ta_") && t.len() == 35, "{t}");
        assert_ne!(Access::new(true, false).envd_token, a.envd_token);
        assert!(Access::new(false, false).is_open());
        assert!(!Access::new(false, true).is_open());
        let none: Access = serde_json::from_str("{}").unwrap();
        assert!(none.is_open());
    }

    #[test]
    fn records_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sandbox.json");
        write_atomic(&p, b"{}", false).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
