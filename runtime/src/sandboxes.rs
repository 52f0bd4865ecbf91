//! The lifecycle of sandboxes on this host: create, list, pause, resume, snapshot, fork, kill,
//! timeouts. Every change to a sandbox happens under its lock; a record is only ever replaced
//! atomically; a sandbox whose creator died mid-way is found and cleaned up by the next caller.

use crate::error::{Action, Error, IoCtx, Result};
use crate::holds::{Holder, Holds};
use crate::record::{
    check_name, deadline_after, new_id, now_ms, Access, OnTimeout, Op, OpKind, PauseMode, Phase,
    ProcessDefaults, ResumeMode, RuntimeKind, SandboxDir, SandboxRecord, State, SCHEMA,
};
use crate::sandbox_snapshot::{self, SnapshotRecord};
use crate::{fs_state, Checkpoint, PendingNetwork, Recovered, Runtime};
use kiln_agent::protocol::ExecRequest;
use kiln_blockstore::{BlobId, Store};
use kiln_imagebuilder::image::ImageRecord;
use kiln_network::NetworkPolicy;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long an operation waits for another one on the same sandbox.
const LOCK_WAIT: Duration = Duration::from_secs(120);
/// A sandbox directory still being set up is left alone this long before it counts as debris.
const SETUP_GRACE_MS: u64 = 60_000;

/// `rec` when it is running; otherwise the wrong-state error for `action`.
fn running(rec: SandboxRecord, action: Action) -> Result<SandboxRecord> {
    if rec.state == State::Running {
        return Ok(rec);
    }
    Err(Error::WrongState {
        state: rec.state.kind(),
        id: rec.id,
        action,
    })
}

/// What a new sandbox comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// An image name or id.
    Image(String),
    /// A sandbox snapshot name or id.
    Snapshot(String),
    /// A template as E2B's API names one (`templateID`): an image name or id, else a sandbox
    /// snapshot name or id (whose tag `:default` is the snapshot itself).
    Template(String),
}

impl Source {
    /// The reference as it was given.
    pub fn reference(&self) -> &str {
        match self {
            Source::Image(s) | Source::Snapshot(s) | Source::Template(s) => s,
        }
    }
}

/// What a [`Source`] names: the image, and the snapshot when it is one.
type Resolved = (BlobId, ImageRecord, Option<(BlobId, SnapshotRecord)>);

/// vCPUs of a sandbox of `runtime` when neither its request nor its snapshot says (at most
/// the host's). gVisor: two, as E2B's default; on its systrap platform every system call of
/// a process is a hand-off between it and the sentry, which one CPU serializes (measured with
/// the SQLite workload, `benches/sqlite_workload.py`: 3.2-4.9 s in a sandbox of one CPU,
/// 1.5-2.6 s in one of two, its lookups 2-5x slower). A microVM: one, its guest need not
/// bring up more.
pub fn default_cpus(runtime: RuntimeKind) -> u32 {
    match runtime {
        RuntimeKind::Gvisor => 2,
        RuntimeKind::Microvm => 1,
    }
}
/// Memory of a sandbox when neither its request nor its snapshot says (E2B's default).
pub const DEFAULT_MEMORY_MIB: u64 = 512;

/// `kiln sandbox create` / `POST /sandboxes`.
#[derive(Clone, Debug)]
pub struct CreateSpec {
    pub source: Source,
    pub name: Option<String>,
    /// None: the snapshot's runtime, else this host's default.
    pub runtime: Option<RuntimeKind>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_mib: Option<u64>,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub timeout_secs: Option<u64>,
    pub on_timeout: OnTimeout,
    /// Kept in the record ([`SandboxRecord::auto_resume`]).
    pub auto_resume: bool,
    /// The egress policy. `None`: the snapshot's, else this host's default
    /// ([`default_network`]).
    pub network: Option<NetworkPolicy>,
    /// No network device at all (loopback only).
    pub no_network: bool,
    /// Its data plane needs an envd access token (generated into the record).
    pub secure: bool,
    /// Its ports other than envd's need a traffic access token (generated into the record).
    pub private_traffic: bool,
    /// Kept in the record ([`Access::mask_request_host`]).
    pub mask_request_host: Option<String>,
}

/// `kiln sandbox fork` / `POST /sandboxes/{id}/fork`. Forks inherit the parent's [`Access`]
/// flags, each with tokens of its own.
#[derive(Clone, Debug)]
pub struct ForkSpec {
    pub count: usize,
    /// Each fork's timeout from its start (None: never).
    pub timeout_secs: Option<u64>,
}

/// A sandbox paused in another home whose pause was pushed to the store's remote: what
/// [`Sandboxes::adopt`] needs beyond its snapshot (the settings its record kept that a
/// snapshot leaves out).
#[derive(Clone, Debug)]
pub struct Adoption {
    pub id: String,
    /// Its pause's sandbox snapshot, in the remote.
    pub snapshot: BlobId,
    pub name: Option<String>,
    pub source: String,
    pub created_ms: u64,
    pub deadline_ms: Option<u64>,
    pub timeout_secs: Option<u64>,
    pub on_timeout: OnTimeout,
    pub auto_resume: bool,
    pub metadata: BTreeMap<String, String>,
    pub access: Access,
}

/// The largest disk a sandbox can ask for (ext4 with 4 KiB blocks goes far beyond; this keeps
/// sizes well inside what is tested).
pub const MAX_DISK_MIB: u64 = 16 << 20;

/// The disk size a sandbox gets when nobody asks, at least: its writable layer is bounded by
/// it, and room not written costs nothing (a sparse file).
pub const MIN_DEFAULT_DISK_MIB: u64 = 2048;

/// The image's disk size (room for its content twice over), at least [`MIN_DEFAULT_DISK_MIB`].
fn default_disk_mib(image: &ImageRecord) -> u64 {
    image.disk_size.div_ceil(1 << 20).max(MIN_DEFAULT_DISK_MIB)
}

/// The network a sandbox gets when nobody asks: internet on, unless `KILN_NETWORK=none`
/// makes "no network device" this host's default.
pub fn default_network() -> Option<NetworkPolicy> {
    match std::env::var("KILN_NETWORK").as_deref() {
        Ok("none") => None,
        _ => Some(NetworkPolicy::default()),
    }
}

impl CreateSpec {
    pub fn new(source: Source) -> CreateSpec {
        CreateSpec {
            source,
            name: None,
            runtime: None,
            cpus: None,
            memory_mib: None,
            disk_mib: None,
            env: BTreeMap::new(),
            metadata: BTreeMap::new(),
            timeout_secs: None,
            on_timeout: OnTimeout::Kill,
            auto_resume: false,
            network: None,
            no_network: false,
            secure: false,
            private_traffic: false,
            mask_request_host: None,
        }
    }
}

/// One command to run in a sandbox; unset fields take the image's defaults.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
}

pub struct Sandboxes {
    home: PathBuf,
    store: Store,
    /// What keeps checkpoints and snapshot records (and frees them when nothing does).
    holds: Holds,
    drivers: Vec<Box<dyn Runtime>>,
    /// The command that runs a sandbox's DNS proxy ([`crate::helpers::dns_proxy_command`]),
    /// its directory appended.
    dns_proxy: Vec<OsString>,
}

/// How many restores a fork runs at once: four per CPU (4 to 16). A restore waits on its
/// processes' starts as much as it computes: on this 2-core host, fork 32 of a gVisor
/// sandbox returned in 3.2-3.4 s with 8 or 16 at once, 3.9 s with 4, 4.4 s with 2.
pub fn fork_restores_at_once() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.saturating_mul(4).clamp(4, 16)
}

impl Sandboxes {
    /// `drivers` in order of preference: the first available one is the default runtime.
    pub fn new(home: &Path, store: Store, drivers: Vec<Box<dyn Runtime>>) -> Sandboxes {
        Sandboxes {
            home: home.to_path_buf(),
            holds: Holds::of_home(store.clone(), home),
            store,
            drivers,
            dns_proxy: Vec::new(),
        }
    }

    /// Sets the DNS proxy command of sandbox networks (without it, sandboxes get none).
    pub fn with_dns_proxy(mut self, cmd: Vec<OsString>) -> Sandboxes {
        self.dns_proxy = cmd;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn root(&self) -> PathBuf {
        self.home.join("sandboxes")
    }

    fn dir(&self, id: &str) -> SandboxDir {
        SandboxDir::new(self.root().join(id))
    }

    /// The driver for `kind`, if this host can run it.
    pub fn driver(&self, kind: RuntimeKind) -> Result<&dyn Runtime> {
        let d = self
            .drivers
            .iter()
            .find(|d| d.kind() == kind)
            .ok_or_else(|| Error::Unavailable(kind, "no driver configured".into()))?;
        d.available().map_err(|why| Error::Unavailable(kind, why))?;
        Ok(d.as_ref())
    }

    /// The first driver this host can run; the error lists why each cannot.
    pub fn default_runtime(&self) -> Result<RuntimeKind> {
        let mut why = Vec::new();
        for d in &self.drivers {
            match d.available() {
                Ok(()) => return Ok(d.kind()),
                Err(e) => why.push(format!("{}: {e}", d.kind())),
            }
        }
        Err(Error::Invalid(format!(
            "no sandbox runtime can run on this host ({})",
            why.join("; ")
        )))
    }

    /// The image (and snapshot) a source names; a template is an image first, else a snapshot.
    fn resolve_source(&self, source: &Source) -> Result<Resolved> {
        match source {
            Source::Image(name) => {
                let (id, rec) = kiln_imagebuilder::image::lookup(&self.store, name)?;
                Ok((id, rec, None))
            }
            Source::Snapshot(s) => {
                let (sid, snap) = sandbox_snapshot::lookup(&self.holds, s)?;
                sandbox_snapshot::fetch_manifests(&self.store, &snap)?;
                let image = self.image(&snap.image)?;
                Ok((snap.image, image, Some((sid, snap))))
            }
            Source::Template(t) => match self.resolve_source(&Source::Image(t.clone())) {
                Err(Error::Image(kiln_imagebuilder::Error::ImageNotFound(_))) => {
                    let snapshot = t.strip_suffix(":default").unwrap_or(t);
                    self.resolve_source(&Source::Snapshot(snapshot.to_string()))
                        .map_err(|e| match e {
                            Error::SnapshotNotFound(_) => {
                                Error::Image(kiln_imagebuilder::Error::ImageNotFound(format!(
                                    "{t} (no image or sandbox snapshot of that name; see \
                                     `kiln image ls`, GET /templates, GET /snapshots)"
                                )))
                            }
                            e => e,
                        })
                }
                r => r,
            },
        }
    }

    /// Creates a sandbox and returns once its agent answers. On any error nothing is left.
    pub fn create(&self, spec: CreateSpec) -> Result<SandboxRecord> {
        if let Some(n) = &spec.name {
            check_name(n)?;
        }
        if let Some(d) = spec.disk_mib.filter(|d| *d == 0 || *d > MAX_DISK_MIB) {
            return Err(Error::Invalid(format!(
                "a disk of {d} MiB: give 1 to {MAX_DISK_MIB} MiB"
            )));
        }
        let (image_id, image, from_snapshot) = self.resolve_source(&spec.source)?;
        let runtime = match (&from_snapshot, spec.runtime) {
            (Some((_, snap)), Some(wanted)) if wanted != snap.runtime => {
                return Err(Error::RuntimeMismatch {
                    snapshot: snap.runtime,
                    wanted,
                })
            }
            (Some((_, snap)), _) => snap.runtime,
            (None, Some(k)) => k,
            (None, None) => self.default_runtime()?,
        };
        let driver = self.driver(runtime)?;
        let snap = from_snapshot.as_ref().map(|(_, s)| s);
        let mut env = snap.map(|s| s.env.clone()).unwrap_or_default();
        env.extend(spec.env.clone());
        let mut metadata = snap.map(|s| s.metadata.clone()).unwrap_or_default();
        metadata.extend(spec.metadata.clone());
        let defaults = match snap {
            Some(s) => s.defaults.clone(),
            None => defaults_of(&image),
        };
        let network = match snap {
            // A restore has the network device its checkpoint had, or none.
            Some(s) => match &s.network {
                Some(p) if !spec.no_network => Some(spec.network.clone().unwrap_or(p.clone())),
                Some(_) => {
                    return Err(Error::Invalid(
                        "the snapshot has a network device; its sandboxes cannot go without".into(),
                    ))
                }
                None => {
                    if spec.network.is_some() {
                        tracing::warn!("the snapshot has no network device: policy ignored");
                    }
                    None
                }
            },
            None if spec.no_network => None,
            None => spec.network.clone().or_else(default_network),
        };
        // Refused when silly (0), lowered to what this host has when huge.
        let (cpus, memory_mib) = crate::gvisor::limits::check(
            spec.cpus
                .or(snap.map(|s| s.cpus))
                .unwrap_or(default_cpus(runtime)),
            spec.memory_mib
                .or(snap.map(|s| s.memory_mib))
                .unwrap_or(DEFAULT_MEMORY_MIB),
        )?;
        let now = now_ms();
        let mut rec = SandboxRecord {
            schema: SCHEMA,
            id: new_id(),
            name: spec.name.clone(),
            image: image_id,
            source: spec.source.reference().to_string(),
            snapshot: from_snapshot.as_ref().map(|(id, _)| *id),
            runtime,
            cpus,
            memory_mib,
            disk_mib: spec
                .disk_mib
                .or(snap.map(|s| s.disk_mib))
                .unwrap_or(default_disk_mib(&image)),
            env,
            metadata,
            state: State::Starting,
            created_ms: now,
            timeout_secs: spec.timeout_secs,
            // Deadline and tokens are in the record before anything runs: no moment exists in
            // which the sandbox is reachable without them.
            deadline_ms: spec.timeout_secs.map(|s| deadline_after(now, s)),
            on_timeout: spec.on_timeout,
            auto_resume: spec.auto_resume,
            agent: None,
            op: None,
            generation: snap.map(|s| s.generation + 1).unwrap_or(0),
            defaults,
            driver: serde_json::Value::Null,
            network,
            net: None,
            access: Access {
                mask_request_host: spec.mask_request_host.clone(),
                ..Access::new(spec.secure, spec.private_traffic)
            },
        };
        let (dir, _lock) = self.new_dir(&rec)?;
        if let Some((sid, snap)) = &from_snapshot {
            // Held from here on, so nothing frees it while it is read.
            if let Err(e) = self
                .holds
                .set(&Holder::Sandbox(rec.id.clone()), &snap.blobs_with(sid))
            {
                self.remove(&dir, &rec);
                return Err(e);
            }
        }
        let net = match self.make_network(&dir, &rec) {
            Ok(net) => net,
            Err(e) => {
                self.remove(&dir, &rec);
                return Err(e);
            }
        };
        let started = match &from_snapshot {
            None => driver.start(&dir, &mut rec, &image, &net),
            Some((_, snap)) => driver.restore(&dir, &mut rec, &snap.checkpoint, &image, &net),
        };
        // Waited for whatever happened: nothing is still being made when a failure is
        // cleaned up below.
        let networked = net.finish(&mut rec);
        let started = started.and(networked);
        let started = started.and_then(|()| match &from_snapshot {
            // A fresh boot starts the template's command; a restore has its processes.
            None => {
                let connect = || driver.connect(&dir, &rec);
                crate::start_cmd::run(self, &connect, &rec, &image)
            }
            Some(_) => Ok(()),
        });
        if let Err(e) = started.and_then(|()| injected_fault("create-started")) {
            // A driver cleans up after its own failure; after a later one the sandbox runs.
            let _ = driver.kill(&dir, &rec);
            self.remove(&dir, &rec);
            return Err(e);
        }
        rec.state = State::Running;
        // The timeout counts from when the sandbox is usable (a first start can take long,
        // unpacking its image); until now the deadline set at the start bounded it.
        rec.deadline_ms = rec.timeout_secs.map(|s| deadline_after(now_ms(), s));
        let saved = dir.save(&rec).and_then(|()| match &from_snapshot {
            Some((sid, snap)) => self.hold_running(driver, &rec.id, sid, snap),
            None => Ok(()),
        });
        if let Err(e) = saved {
            let _ = driver.kill(&dir, &rec);
            self.remove(&dir, &rec);
            return Err(e);
        }
        Ok(rec)
    }

    /// What a sandbox just restored from snapshot `sid` still needs: the snapshot, if its
    /// driver goes on reading it; nothing otherwise (the snapshot goes unless another holder
    /// keeps it).
    fn hold_running(
        &self,
        driver: &dyn Runtime,
        id: &str,
        sid: &BlobId,
        snap: &SnapshotRecord,
    ) -> Result<()> {
        let needed = if driver.reads_checkpoint_while_running() {
            snap.blobs_with(sid)
        } else {
            Vec::new()
        };
        self.holds.set(&Holder::Sandbox(id.into()), &needed)
    }

    /// Makes the sandbox's directory under its final name, locked, with a `starting` record:
    /// set up as a dot-directory and renamed, so no one sees it before it is locked. A name
    /// is reserved (create-exclusive file) before anything else.
    fn new_dir(&self, rec: &SandboxRecord) -> Result<(SandboxDir, crate::record::Lock)> {
        let root = self.root();
        std::fs::create_dir_all(&root).ctx("create", &root)?;
        if let Some(name) = &rec.name {
            self.reserve_name(name, &rec.id)?;
        }
        let tmp = SandboxDir::new(root.join(format!(".new-{}", rec.id)));
        let made = (|| {
            std::fs::create_dir(tmp.path()).ctx("create", tmp.path())?;
            let lock = tmp.try_lock()?.ok_or_else(|| Error::Busy(rec.id.clone()))?;
            tmp.save(rec)?;
            let dir = self.dir(&rec.id);
            std::fs::rename(tmp.path(), dir.path()).ctx("rename", dir.path())?;
            Ok((dir, lock))
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(tmp.path());
            if let Some(name) = &rec.name {
                self.release_name(name, &rec.id);
            }
        }
        made
    }

    fn names_dir(&self) -> PathBuf {
        self.root().join(".names")
    }

    fn reserve_name(&self, name: &str, id: &str) -> Result<()> {
        let d = self.names_dir();
        std::fs::create_dir_all(&d).ctx("create", &d)?;
        let p = d.join(name);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(id.as_bytes()).ctx("write", &p)?;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // A name left behind by a sandbox that no longer exists is free again.
                    let owner = std::fs::read_to_string(&p).unwrap_or_default();
                    if owner.is_empty() || self.dir(&owner).record_path().exists() {
                        return Err(Error::NameTaken(name.into()));
                    }
                    let _ = std::fs::remove_file(&p);
                }
                Err(e) => return Err(e).ctx("create", &p),
            }
        }
        Err(Error::NameTaken(name.into()))
    }

    fn release_name(&self, name: &str, id: &str) {
        let p = self.names_dir().join(name);
        if std::fs::read_to_string(&p).ok().as_deref() == Some(id) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Starts making the network of a sandbox with a policy (a fresh one per start, restore
    /// and fork) on a thread of its own; the driver waits for it before the sandbox's
    /// processes start. Whoever cleans up after a failure or a crash removes it by the
    /// sandbox's id, made or half-made.
    fn make_network(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<PendingNetwork> {
        let Some(policy) = &rec.network else {
            return Ok(PendingNetwork::none());
        };
        if self.dns_proxy.is_empty() {
            return Err(Error::Invalid(
                "sandbox networks need the DNS proxy command (Sandboxes::with_dns_proxy)".into(),
            ));
        }
        let kind = match rec.runtime {
            RuntimeKind::Microvm => kiln_network::GuestKind::Tap,
            RuntimeKind::Gvisor => kiln_network::GuestKind::Veth,
        };
        crate::helpers::dns_proxy_spec(&dir.net())?;
        let (id, policy, state, proxy) = (
            rec.id.clone(),
            policy.clone(),
            dir.net(),
            self.dns_proxy.clone(),
        );
        Ok(PendingNetwork::spawn(move || {
            kiln_network::attach(&id, kind, &policy, &state, &proxy)
        }))
    }

    /// Removes a sandbox's network, if any (idempotent; its processes must be gone).
    fn detach_network(&self, dir: &SandboxDir, rec: &mut SandboxRecord) {
        kiln_network::detach(&rec.id, &dir.net());
        rec.net = None;
    }

    /// Removes a sandbox's network, directory, name and holds (its processes must be gone).
    /// The directory is renamed away first: a remover killed mid-way leaves a `.gone-`
    /// directory that the next `list` deletes, never a sandbox without its record.
    fn remove(&self, dir: &SandboxDir, rec: &SandboxRecord) {
        if !holds_nothing_on_host(rec) {
            kiln_network::detach(&rec.id, &dir.net());
        }
        for h in [
            Holder::Sandbox(rec.id.clone()),
            Holder::Fork(rec.id.clone()),
            Holder::Checkpoint(rec.id.clone()),
        ] {
            if let Err(e) = self.holds.release(&h) {
                tracing::warn!(id = %rec.id, "releasing the sandbox's snapshots: {e}");
            }
        }
        if let Some(n) = &rec.name {
            self.release_name(n, &rec.id);
        }
        let gone = self.root().join(format!(".gone-{}", rec.id));
        let path = match std::fs::rename(dir.path(), &gone) {
            Ok(()) => gone.as_path(),
            Err(_) => dir.path(),
        };
        // A concurrent reader may recreate its lock file meanwhile: try again.
        for _ in 0..3 {
            if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
                break;
            }
        }
    }

    /// Every sandbox, with liveness checked, expired timeouts applied and debris of
    /// interrupted operations cleaned up.
    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        let root = self.root();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("list", &root),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                self.clean_setup_debris(&e.path());
                continue;
            }
            if let Ok(Some(rec)) = self.refresh(&self.dir(&name)) {
                out.push(rec);
            }
        }
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    /// A `.new-ID` directory whose creator died before renaming it, or a `.gone-ID` one whose
    /// remover died before deleting it.
    fn clean_setup_debris(&self, path: &Path) {
        let old = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_millis() as u64 > SETUP_GRACE_MS);
        let dir = SandboxDir::new(path.to_path_buf());
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if (old && name.starts_with(".new-")) || name.starts_with(".gone-") {
            if let Ok(Some(_l)) = dir.try_lock() {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }

    /// Loads a record and reconciles it with reality (under the lock when it is free, see
    /// [`Sandboxes::reconcile`]); an expired timeout is applied. `None` when the sandbox turned
    /// out not to exist.
    fn refresh(&self, dir: &SandboxDir) -> Result<Option<SandboxRecord>> {
        // A record that vanished was killed meanwhile (its directory goes file by file).
        let gone = |e: &Error| match e {
            Error::NotFound(_) => true,
            Error::Io { err, .. } => err.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        };
        let rec = match dir.load() {
            Ok(r) => r,
            Err(e) if gone(&e) || !dir.path().exists() => return Ok(None),
            Err(e) => return Err(e),
        };
        let lock = match dir.try_lock() {
            Ok(Some(l)) => l,
            // Someone is working on it: report what the record says.
            Ok(None) => return Ok(Some(rec)),
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let rec = match dir.load() {
            Ok(r) => r,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(mut rec) = self.reconcile(dir, rec)? else {
            drop(lock);
            return Ok(None);
        };
        if let Some(deadline) = rec.deadline_ms {
            if now_ms() >= deadline && rec.state == State::Running && rec.op.is_none() {
                match rec.on_timeout {
                    OnTimeout::Kill => {
                        self.kill_locked(dir, &rec)?;
                        return Ok(None);
                    }
                    OnTimeout::Pause => {
                        rec = self.pause_or_end(dir, rec, PauseMode::Full)?;
                    }
                    OnTimeout::PauseFilesystem => {
                        rec = self.pause_or_end(dir, rec, PauseMode::Filesystem)?;
                    }
                }
            }
        }
        Ok(Some(rec))
    }

    /// Under the sandbox's lock: a creator that died leaves nothing; an operation whose caller
    /// died is finished or rolled back; a runtime that died makes the state `failed`. `None`
    /// when nothing of the sandbox is left.
    fn reconcile(&self, dir: &SandboxDir, mut rec: SandboxRecord) -> Result<Option<SandboxRecord>> {
        if let Some(op) = rec.op.clone() {
            return self.recover_op(dir, rec, op);
        }
        match rec.state {
            State::Starting => {
                // Its creator was killed mid-way.
                if let Ok(d) = self.driver(rec.runtime) {
                    let _ = d.kill(dir, &rec);
                }
                self.remove(dir, &rec);
                return Ok(None);
            }
            State::Running => {
                if let Some(cause) = self
                    .driver(rec.runtime)
                    .ok()
                    .and_then(|d| d.exited(dir, &rec))
                {
                    self.fail(dir, &mut rec, cause)?;
                }
            }
            _ => {}
        }
        Ok(Some(rec))
    }

    /// Finishes or rolls back `op`, whose caller died (the record keeps it while a step still
    /// runs on its own).
    fn recover_op(
        &self,
        dir: &SandboxDir,
        mut rec: SandboxRecord,
        op: Op,
    ) -> Result<Option<SandboxRecord>> {
        tracing::warn!(id = %rec.id, kind = ?op.kind, phase = ?op.phase,
            "an operation's caller died: finishing it or rolling it back");
        if op.kind == OpKind::Kill {
            self.kill_locked(dir, &rec)?;
            return Ok(None);
        }
        if op.kind == OpKind::Adopt {
            // Whoever claimed it keeps it: the rest is fetched, or reported and tried again.
            return match self.finish_adopt(dir, rec.clone()) {
                Ok(rec) => Ok(Some(rec)),
                Err(e) => {
                    tracing::warn!(id = %rec.id, "an adoption is unfinished: {e}");
                    Ok(Some(rec))
                }
            };
        }
        if let (OpKind::Pause, Some(saved)) = (op.kind, op.saved) {
            return self.finish_pause(dir, rec, saved).map(Some);
        }
        if op.filesystem_only {
            return self.recover_files_pause(dir, rec, op).map(Some);
        }
        if op.kind == OpKind::Fork {
            // Forks that were made hold their own; the fork's snapshot is nobody's now.
            self.holds.release(&Holder::Fork(rec.id.clone()))?;
        }
        let driver = self.driver(rec.runtime)?;
        let outcome = driver.recover(dir, &mut rec, &op)?;
        if !matches!(outcome, Recovered::Checkpointed(_) | Recovered::Pending) {
            // Kept only when it became the pause; otherwise nothing holds it.
            if let Some(made) = &op.checkpoint {
                self.holds.discard(&made.blobs)?;
            }
            self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
        }
        match outcome {
            Recovered::Pending => return Ok(Some(rec)),
            Recovered::Running => {
                rec.op = None;
                rec.state = State::Running;
                dir.save(&rec)?;
            }
            Recovered::Checkpointed(cp) => {
                let snap = self.store_pause(&rec, cp)?;
                return self.finish_pause(dir, rec, snap).map(Some);
            }
            Recovered::Stopped if matches!(rec.state, State::Paused { .. }) => {
                // An interrupted resume: paused as before, holding nothing on the host.
                rec.op = None;
                rec.agent = None;
                self.detach_network(dir, &mut rec);
                dir.save(&rec)?;
            }
            Recovered::Stopped => {
                self.fail(dir, &mut rec, "its processes are gone".into())?;
            }
            Recovered::Lost(cause) => {
                let cause = format!("{cause} (a {} was interrupted)", op.kind.name());
                self.fail(dir, &mut rec, cause)?;
            }
        }
        Ok(Some(rec))
    }

    /// A filesystem-only pause whose caller died: finished once its files were saved (the
    /// sandbox's processes end), else undone (the copy never touched the sandbox: it runs on).
    fn recover_files_pause(
        &self,
        dir: &SandboxDir,
        mut rec: SandboxRecord,
        op: Op,
    ) -> Result<SandboxRecord> {
        let driver = self.driver(rec.runtime)?;
        if let (Phase::Saved, Some(cp)) = (op.phase, op.checkpoint) {
            driver.kill(dir, &rec)?;
            let snap = self.store_pause(&rec, cp)?;
            return self.finish_pause(dir, rec, snap);
        }
        self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
        match driver.exited(dir, &rec) {
            None => {
                rec.op = None;
                dir.save(&rec)?;
            }
            Some(cause) => self.fail(dir, &mut rec, cause)?,
        }
        Ok(rec)
    }

    /// The pause a timeout asks for; when it fails and the sandbox was left running (nothing
    /// saved), the sandbox ends `failed` with the cause: it never runs past its deadline.
    fn pause_or_end(
        &self,
        dir: &SandboxDir,
        rec: SandboxRecord,
        mode: PauseMode,
    ) -> Result<SandboxRecord> {
        let mut kept = rec.clone();
        let paused = match mode {
            PauseMode::Full => self.pause_locked(dir, rec),
            PauseMode::Filesystem => self.pause_files(dir, rec),
        };
        match paused {
            Ok(r) => Ok(r),
            // Failed past the copy (its record says how far): recovery finishes it.
            Err(e) if dir.load().map_or(true, |r| r.op.is_some()) => Err(e),
            Err(e) => {
                let cause = match mode {
                    PauseMode::Full => format!("timed out and could not be paused: {e}"),
                    PauseMode::Filesystem => {
                        format!("timed out and its files could not be saved: {e}")
                    }
                };
                tracing::warn!(id = %kept.id, "{cause}");
                self.driver(kept.runtime)?.kill(dir, &kept)?;
                self.fail(dir, &mut kept, cause)?;
                Ok(kept)
            }
        }
    }

    /// Marks a sandbox whose processes are gone `failed`, with the cause and its log's tail.
    fn fail(&self, dir: &SandboxDir, rec: &mut SandboxRecord, cause: String) -> Result<()> {
        rec.op = None;
        rec.state = State::Failed {
            cause: format!("{cause}\n--- log tail ---\n{}", dir.log_tail(1500)),
        };
        self.detach_network(dir, rec);
        dir.save(rec)
    }

    /// A sandbox by id or name.
    pub fn get(&self, id_or_name: &str) -> Result<SandboxRecord> {
        let dir = self.resolve(id_or_name)?;
        self.refresh(&dir)?
            .ok_or_else(|| Error::NotFound(id_or_name.into()))
    }

    fn resolve(&self, id_or_name: &str) -> Result<SandboxDir> {
        if check_name(id_or_name).is_err() {
            return Err(Error::NotFound(id_or_name.into()));
        }
        let dir = self.dir(id_or_name);
        if dir.record_path().exists() {
            return Ok(dir);
        }
        if let Ok(id) = std::fs::read_to_string(self.names_dir().join(id_or_name)) {
            let dir = self.dir(id.trim());
            if dir.record_path().exists() {
                return Ok(dir);
            }
        }
        Err(Error::NotFound(id_or_name.into()))
    }

    /// Locks a sandbox and settles what an interrupted operation left of it
    /// ([`Sandboxes::reconcile`]); returns its dir, lock and record.
    fn lock_settled(&self, id: &str) -> Result<(SandboxDir, crate::record::Lock, SandboxRecord)> {
        let dir = self.resolve(id)?;
        let lock = dir.lock(LOCK_WAIT)?;
        let rec = match dir.load() {
            // Said by the name it was asked by.
            Err(Error::NotFound(_)) => return Err(Error::NotFound(id.into())),
            r => r?,
        };
        // An unfinished adoption is finished first, or its error is the answer.
        let rec = match rec.op.as_ref().map(|o| o.kind) {
            Some(OpKind::Adopt) => self.finish_adopt(&dir, rec)?,
            _ => rec,
        };
        let rec = self
            .reconcile(&dir, rec)?
            .ok_or_else(|| Error::NotFound(id.into()))?;
        if rec.op.is_some() {
            // A step of an interrupted operation still runs on its own.
            return Err(Error::Busy(rec.id));
        }
        Ok((dir, lock, rec))
    }

    /// Locks a sandbox that must be running; returns its dir, lock and record.
    fn lock_running(
        &self,
        id: &str,
        action: Action,
    ) -> Result<(SandboxDir, crate::record::Lock, SandboxRecord)> {
        let (dir, lock, rec) = self.lock_settled(id)?;
        Ok((dir, lock, running(rec, action)?))
    }

    /// A connection to a running sandbox's agent.
    pub fn connect(&self, id: &str) -> Result<(SandboxRecord, UnixStream)> {
        // The fast path reads the record only; a failed connection looks at reality (a dead
        // runtime, an expired timeout) to say why.
        let dir = self.resolve(id)?;
        let rec = dir.load()?;
        let expired = rec.deadline_ms.is_some_and(|d| now_ms() >= d);
        if rec.state == State::Running && !expired {
            if let Ok(s) = self.driver(rec.runtime)?.connect(&dir, &rec) {
                return Ok((rec, s));
            }
        }
        let rec = self
            .refresh(&dir)?
            .ok_or_else(|| Error::NotFound(id.into()))?;
        let rec = running(rec, Action::Connect)?;
        let s = self.driver(rec.runtime)?.connect(&dir, &rec)?;
        Ok((rec, s))
    }

    /// A connection to TCP `port` on the sandbox's loopback, through its agent: after this
    /// returns the stream carries the raw bytes.
    pub fn dial(&self, id: &str, port: u16) -> Result<UnixStream> {
        let (_, s) = self.connect(id)?;
        Ok(kiln_agent::client::dial(s, port)?)
    }

    /// The agent request for `opts`, with the image's and the sandbox's defaults filled in.
    pub fn exec_request(&self, rec: &SandboxRecord, opts: ExecOptions) -> ExecRequest {
        let mut env: BTreeMap<String, String> = rec
            .defaults
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.extend(rec.env.clone());
        env.extend(opts.env);
        let argv = if opts.argv.is_empty() {
            rec.defaults.cmd.clone()
        } else {
            opts.argv
        };
        ExecRequest {
            argv,
            env,
            cwd: opts.cwd.or_else(|| rec.defaults.cwd.clone()),
            user: opts.user.or_else(|| rec.defaults.user.clone()),
            ..ExecRequest::default()
        }
    }

    /// A live snapshot: the sandbox keeps running. Returns the snapshot id.
    pub fn snapshot(&self, id: &str, name: Option<&str>) -> Result<BlobId> {
        if let Some(n) = name {
            check_name(n)?;
        }
        let (dir, _lock, mut rec) = self.lock_running(id, Action::Snapshot)?;
        let driver = self.driver(rec.runtime)?;
        let (cp, _) = self.checkpoint(driver, &dir, &mut rec, OpKind::Snapshot)?;
        driver.checkpoint_done(&dir);
        let snap = SnapshotRecord::of(&rec, cp);
        let id = sandbox_snapshot::put_record(&self.holds, &snap)?;
        // Every snapshot is named (an unnamed one by its id), so it is listed and removable.
        let name = name.map(str::to_string).unwrap_or_else(|| id.to_hex());
        sandbox_snapshot::name(&self.holds, &name, &id, &snap)?;
        rec.op = None;
        dir.save(&rec)?;
        self.holds.release(&Holder::Checkpoint(rec.id))?;
        Ok(id)
    }

    /// The driver's checkpoint for an operation of `kind`; for a fork, also whether the driver
    /// left the sandbox's own restore to [`Runtime::run_on`]. Saves the record whatever the
    /// outcome (a driver may have restarted the sandbox with a new process).
    fn checkpoint(
        &self,
        driver: &dyn Runtime,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        kind: OpKind,
    ) -> Result<(Checkpoint, bool)> {
        // Blobs a checkpoint before left held (its caller died after it was kept) are free.
        self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
        rec.op = Some(Op::new(kind, Phase::Prepare));
        dir.save(rec)?;
        let cp = match kind {
            OpKind::Fork => driver.checkpoint_for_forks(dir, rec),
            _ => driver
                .checkpoint(dir, rec, kind.stops())
                .map(|cp| (cp, false)),
        };
        if let Err(e) = &cp {
            // A checkpoint stored and then not kept (its restore failed) is nobody's.
            if let Some(made) = rec.op.take().and_then(|op| op.checkpoint) {
                self.holds.discard(&made.blobs)?;
            }
            self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
            if let Some(cause) = driver.exited(dir, rec) {
                rec.state = State::Failed {
                    cause: format!("lost during a checkpoint: {cause} ({e})"),
                };
                self.detach_network(dir, rec);
            }
        }
        // On success `op` stays set until the caller has stored the snapshot record and saved
        // the final state: a caller killed in between leaves a record that says so.
        dir.save(rec)?;
        cp
    }

    /// Saves the sandbox to the store and stops it; `resume` brings it back.
    pub fn pause(&self, id: &str) -> Result<SandboxRecord> {
        self.pause_with(id, PauseMode::Full)
    }

    /// [`Sandboxes::pause`] keeping what `mode` says.
    pub fn pause_with(&self, id: &str, mode: PauseMode) -> Result<SandboxRecord> {
        let (dir, _lock, rec) = self.lock_running(id, Action::Pause)?;
        match mode {
            PauseMode::Full => self.pause_locked(&dir, rec),
            PauseMode::Filesystem => self.pause_files(&dir, rec),
        }
    }

    /// A filesystem-only pause: the sandbox's file changes go into the store
    /// ([`fs_state`]) while it runs, then its processes end. Recorded before each step: a
    /// caller killed during the copy leaves the sandbox running, one killed after it leaves
    /// it paused ([`Sandboxes::recover_files_pause`]).
    fn pause_files(&self, dir: &SandboxDir, mut rec: SandboxRecord) -> Result<SandboxRecord> {
        let driver = self.driver(rec.runtime)?;
        self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
        let mut op = Op::new(OpKind::Pause, Phase::Capture);
        op.filesystem_only = true;
        rec.op = Some(op);
        dir.save(&rec)?;
        let t = std::time::Instant::now();
        let cp = match self.capture(driver, dir, &rec) {
            Ok(cp) => cp,
            Err(e) => {
                self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
                rec.op = None;
                dir.save(&rec)?;
                return Err(e);
            }
        };
        tracing::info!(id = %rec.id, ms = t.elapsed().as_millis() as u64, files = %cp.state["files"],
                       "file system saved");
        if let Some(op) = rec.op.as_mut() {
            op.checkpoint = Some(cp.clone());
        }
        dir.enter(&mut rec, Phase::Saved)?;
        driver.kill(dir, &rec)?;
        let snap = self.store_pause(&rec, cp)?;
        self.finish_pause(dir, rec, snap)
    }

    /// The running sandbox's file changes, in the store (held as its checkpoint).
    fn capture(
        &self,
        driver: &dyn Runtime,
        dir: &SandboxDir,
        rec: &SandboxRecord,
    ) -> Result<Checkpoint> {
        let lower = driver.image_tree(rec).ok_or_else(|| {
            Error::Invalid(format!(
                "the {} runtime cannot keep a sandbox's files without its memory",
                rec.runtime
            ))
        })?;
        let connect = || driver.connect(dir, rec);
        fs_state::capture(
            &self.store,
            &self.holds,
            &Holder::Checkpoint(rec.id.clone()),
            &connect,
            &lower,
            rec.disk_mib.saturating_mul(1 << 20),
        )
    }

    /// Boots the sandbox afresh from its image and puts the saved file changes `cp` back.
    fn boot_with_files(
        &self,
        driver: &dyn Runtime,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        cp: &Checkpoint,
        image: &ImageRecord,
    ) -> Result<()> {
        // The control socket name of a container just ended can stay taken a moment.
        let mut tries = 0;
        loop {
            match driver.start(dir, rec, image, &PendingNetwork::none()) {
                Err(e) if tries < 4 && e.to_string().contains("address already in use") => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                r => break r?,
            }
        }
        let rec_now = rec.clone();
        let connect = || driver.connect(dir, &rec_now);
        let applied = fs_state::apply(&self.store, &connect, cp)
            .and_then(|()| crate::start_cmd::run(self, &connect, &rec_now, image));
        if let Err(e) = applied {
            let _ = driver.kill(dir, rec);
            return Err(e);
        }
        Ok(())
    }

    /// After a memory restore: the sandbox rebooted on its own files (copied out, its
    /// processes ended, booted afresh with them).
    fn reboot(
        &self,
        driver: &dyn Runtime,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        image: &ImageRecord,
    ) -> Result<()> {
        dir.enter(rec, Phase::Capture)?;
        let cp = self.capture(driver, dir, rec);
        let booted = cp.and_then(|cp| {
            dir.enter(rec, Phase::Restore)?;
            driver.kill(dir, rec)?;
            self.boot_with_files(driver, dir, rec, &cp, image)
        });
        // The copy was only the way across.
        self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
        if booted.is_err() {
            let _ = driver.kill(dir, rec);
        }
        booted
    }

    fn pause_locked(&self, dir: &SandboxDir, mut rec: SandboxRecord) -> Result<SandboxRecord> {
        let driver = self.driver(rec.runtime)?;
        let (cp, _) = self.checkpoint(driver, dir, &mut rec, OpKind::Pause)?;
        let snap = self.store_pause(&rec, cp)?;
        self.finish_pause(dir, rec, snap)
    }

    /// Stores a pause's snapshot; it replaces whatever the sandbox held before, and holds
    /// the checkpoint's blobs from then on.
    fn store_pause(&self, rec: &SandboxRecord, cp: Checkpoint) -> Result<BlobId> {
        let snap = sandbox_snapshot::put(
            &self.holds,
            &SnapshotRecord::of(rec, cp),
            &Holder::Sandbox(rec.id.clone()),
        )?;
        self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
        Ok(snap)
    }

    /// The last step of a pause whose snapshot `snap` is stored: the record says so (durably)
    /// and the sandbox's network goes.
    fn finish_pause(
        &self,
        dir: &SandboxDir,
        mut rec: SandboxRecord,
        snap: BlobId,
    ) -> Result<SandboxRecord> {
        rec.state = State::Paused { saved: snap };
        rec.agent = None;
        if let Some(op) = rec.op.as_mut() {
            // Killed from here on, the next caller only repeats this step.
            op.saved = Some(snap);
            op.checkpoint = None;
            dir.save(&rec)?;
        }
        // A paused sandbox holds nothing on the host; resume attaches a fresh network.
        self.detach_network(dir, &mut rec);
        rec.op = None;
        dir.save_durable(&rec)?;
        Ok(rec)
    }

    /// Takes a paused sandbox of another home into this one under its own id, from its pushed
    /// snapshot (its record and manifests come from the remote; the data stays there until
    /// read): a `paused` record here, which [`Sandboxes::resume`] resumes as any other.
    ///
    /// `claim` runs once the record is made (locked, its op [`OpKind::Adopt`]): it makes the
    /// sandbox this home's wherever that is decided (a cluster's catalog) and says whether it
    /// did. Refused (false, or an error saying why): the record goes again, and the answer is
    /// `Ok(None)` or the error. Once claimed the record stays: what is left (the manifests,
    /// the image, the holds) is fetched now, and after a failure (the remote out of reach) or
    /// a caller killed mid-way, by the next command on the sandbox, which reports the error
    /// meanwhile, or by the next list.
    pub fn adopt(
        &self,
        a: Adoption,
        claim: impl FnOnce() -> std::result::Result<bool, String>,
    ) -> Result<Option<SandboxRecord>> {
        check_name(&a.id)?;
        if self.dir(&a.id).record_path().exists() {
            return Err(Error::Adopt {
                id: a.id,
                why: "a sandbox of that id is in this home already".into(),
            });
        }
        self.store.pull(&a.snapshot)?;
        let snap = sandbox_snapshot::get(&self.store, &a.snapshot)?;
        let mut rec = SandboxRecord {
            schema: SCHEMA,
            id: a.id,
            name: a.name,
            image: snap.image,
            source: a.source,
            snapshot: snap.parent,
            runtime: snap.runtime,
            cpus: snap.cpus,
            memory_mib: snap.memory_mib,
            disk_mib: snap.disk_mib,
            env: snap.env,
            metadata: a.metadata,
            state: State::Paused { saved: a.snapshot },
            created_ms: a.created_ms,
            timeout_secs: a.timeout_secs,
            deadline_ms: a.deadline_ms,
            on_timeout: a.on_timeout,
            auto_resume: a.auto_resume,
            agent: None,
            generation: snap.generation,
            defaults: snap.defaults,
            op: Some(Op::new(OpKind::Adopt, Phase::Prepare)),
            driver: serde_json::Value::Null,
            network: snap.network,
            net: None,
            access: a.access,
        };
        let (dir, _lock) = self.new_dir(&rec)?;
        match claim() {
            Ok(true) => {}
            refused => {
                self.remove(&dir, &rec);
                return match refused {
                    Err(why) => Err(Error::Adopt { id: rec.id, why }),
                    _ => Ok(None),
                };
            }
        }
        dir.enter(&mut rec, Phase::Store)?;
        self.finish_adopt(&dir, rec).map(Some)
    }

    /// The rest of a claimed adoption: the snapshot's manifests and its image's record here,
    /// held by the sandbox; then the record says paused, with no operation, durably.
    fn finish_adopt(&self, dir: &SandboxDir, mut rec: SandboxRecord) -> Result<SandboxRecord> {
        let State::Paused { saved } = rec.state.clone() else {
            return Err(Error::Invalid(format!(
                "sandbox {} is being adopted but is {}",
                rec.id,
                rec.state.name()
            )));
        };
        self.store.pull(&saved)?;
        let snap = sandbox_snapshot::get(&self.store, &saved)?;
        sandbox_snapshot::fetch_manifests(&self.store, &snap)?;
        self.image(&snap.image)?;
        self.holds
            .set(&Holder::Sandbox(rec.id.clone()), &snap.blobs_with(&saved))?;
        rec.op = None;
        dir.save_durable(&rec)?;
        Ok(rec)
    }

    /// Restores a paused sandbox under its own id. Its timeout starts again: `timeout_secs`
    /// if given (it becomes the sandbox's timeout), else its own; the deadline is in the record
    /// that says `running`, so the sandbox never runs under an old or missing one.
    pub fn resume(&self, id: &str, timeout_secs: Option<u64>) -> Result<SandboxRecord> {
        self.resume_with(id, timeout_secs, ResumeMode::Restore)
    }

    /// [`Sandboxes::resume`] as `mode` says. A sandbox paused without memory always boots
    /// afresh on its files; `Reboot` does so for one paused with memory too (restored, its
    /// files copied out, booted afresh on them: the paused state itself is left as it was
    /// until the sandbox runs).
    pub fn resume_with(
        &self,
        id: &str,
        timeout_secs: Option<u64>,
        mode: ResumeMode,
    ) -> Result<SandboxRecord> {
        let (dir, _lock, mut rec) = self.lock_settled(id)?;
        let State::Paused { saved: sid } = rec.state.clone() else {
            return Err(Error::WrongState {
                id: rec.id,
                state: rec.state.kind(),
                action: Action::Resume,
            });
        };
        let snap = sandbox_snapshot::get(&self.store, &sid)?;
        sandbox_snapshot::fetch_manifests(&self.store, &snap)?;
        let image = self.image(&snap.image)?;
        let driver = self.driver(rec.runtime)?;
        rec.generation += 1;
        // Recorded before anything is made: a caller killed mid-way leaves a record that says
        // so, and the next one undoes the half-made restore (network, runtime processes).
        rec.op = Some(Op::new(OpKind::Resume, Phase::Prepare));
        dir.save(&rec)?;
        let files_only = fs_state::is_filesystem_only(&snap.checkpoint);
        let restored = self.make_network(&dir, &rec).and_then(|net| {
            let restored = dir.enter(&mut rec, Phase::Restore).and_then(|()| {
                if files_only {
                    net.finish(&mut rec)?;
                    self.boot_with_files(driver, &dir, &mut rec, &snap.checkpoint, &image)
                } else {
                    driver.restore(&dir, &mut rec, &snap.checkpoint, &image, &net)?;
                    if mode == ResumeMode::Reboot {
                        self.reboot(driver, &dir, &mut rec, &image)?;
                    }
                    Ok(())
                }
            });
            // Waited for whatever happened (see `create`).
            let networked = net.finish(&mut rec);
            restored.and(networked)
        });
        if let Err(e) = restored {
            self.detach_network(&dir, &mut rec);
            rec.op = None;
            let _ = dir.save(&rec);
            return Err(e);
        }
        rec.op = None;
        rec.state = State::Running;
        if timeout_secs.is_some() {
            rec.timeout_secs = timeout_secs;
        }
        rec.deadline_ms = rec.timeout_secs.map(|s| deadline_after(now_ms(), s));
        dir.save(&rec)?;
        // The paused state goes unless the driver reads it on (or a name keeps it).
        self.hold_running(driver, &rec.id, &sid, &snap)?;
        Ok(rec)
    }

    /// Whether `rec` is paused with its files only (no memory to restore).
    pub fn paused_files_only(&self, rec: &SandboxRecord) -> bool {
        let State::Paused { saved } = &rec.state else {
            return false;
        };
        sandbox_snapshot::get(&self.store, saved)
            .is_ok_and(|s| fs_state::is_filesystem_only(&s.checkpoint))
    }

    /// New sandboxes continuing from this one's present state; it keeps running. Each fork
    /// is born with its deadline and its own tokens ([`ForkSpec`]); all or nothing.
    pub fn fork(&self, id: &str, fork: ForkSpec) -> Result<Vec<SandboxRecord>> {
        let n = fork.count;
        if n == 0 || n > 256 {
            return Err(Error::Invalid(format!("fork count {n}: use 1..=256")));
        }
        // The source stays locked until it runs on: restored beside its forks when the driver
        // leaves that to us (gVisor stops a sandbox to checkpoint it).
        let (dir, lock, mut rec) = self.lock_running(id, Action::Fork)?;
        let driver = self.driver(rec.runtime)?;
        let (cp, stopped) = self.checkpoint(driver, &dir, &mut rec, OpKind::Fork)?;
        let snap_id = match sandbox_snapshot::put(
            &self.holds,
            &SnapshotRecord::of(&rec, cp),
            &Holder::Fork(rec.id.clone()),
        ) {
            Ok(id) => id,
            Err(e) => {
                let _ = self.end_fork_checkpoint(driver, &dir, &mut rec, stopped);
                return Err(e);
            }
        };
        let parent = rec.id.clone();
        let mut spec = CreateSpec::new(Source::Snapshot(snap_id.to_hex()));
        spec.timeout_secs = fork.timeout_secs;
        spec.secure = rec.access.secure;
        spec.private_traffic = rec.access.private_traffic;
        spec.mask_request_host = rec.access.mask_request_host.clone();
        // A few at a time (each restore is a process start plus a state load), from a queue so
        // one slow restore does not hold back a whole batch.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = std::sync::Mutex::new(Vec::with_capacity(n));
        let source = std::thread::scope(|s| {
            let source = s.spawn(move || {
                let ran_on = self.end_fork_checkpoint(driver, &dir, &mut rec, stopped);
                // Free again once it runs: its forks need nothing of it but the snapshot.
                drop(lock);
                ran_on
            });
            for _ in 0..n.min(fork_restores_at_once()) {
                s.spawn(|| {
                    while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                        let r = self.create(spec.clone());
                        results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                    }
                });
            }
            source.join().unwrap_or_else(|_| {
                Err(Error::Invalid(format!(
                    "sandbox {parent}: its restore after the fork's checkpoint panicked"
                )))
            })
        });
        let mut out = Vec::with_capacity(n);
        let mut first_err = source.err();
        for r in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
            match r {
                Ok(rec) => out.push(rec),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        // Each fork holds what it still needs; the fork's snapshot goes with the last of them.
        let released = self.holds.release(&Holder::Fork(parent.clone()));
        driver.checkpoint_done(&self.dir(&parent));
        if let Some(e) = first_err.or(released.err()) {
            // All or nothing: a partial fork (or one whose source was lost) is undone.
            for r in &out {
                let _ = self.kill(&r.id);
            }
            return Err(e);
        }
        Ok(out)
    }

    /// Ends the fork's checkpoint of its source: runs it on first if the driver left that to
    /// us (`stopped`); one that cannot is `failed`, with nothing of it left running.
    fn end_fork_checkpoint(
        &self,
        driver: &dyn Runtime,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        stopped: bool,
    ) -> Result<()> {
        let ran_on = match stopped {
            true => driver.run_on(dir, rec),
            false => Ok(()),
        };
        if let Err(e) = &ran_on {
            let _ = driver.kill(dir, rec);
            rec.state = State::Failed {
                cause: format!("lost restoring it after a fork's checkpoint: {e}"),
            };
            self.detach_network(dir, rec);
        }
        rec.op = None;
        dir.save(rec)?;
        self.holds.release(&Holder::Checkpoint(rec.id.clone()))?;
        ran_on
    }

    /// Ends the sandbox and removes it (a paused one's snapshot goes with the next gc).
    pub fn kill(&self, id: &str) -> Result<()> {
        let dir = self.resolve(id)?;
        let _lock = dir.lock(LOCK_WAIT)?;
        let rec = dir.load()?;
        self.kill_locked(&dir, &rec)
    }

    fn kill_locked(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<()> {
        // Recorded first: a kill cut short is finished by the next caller, never mistaken
        // for a sandbox that died.
        if rec.op.as_ref().map(|o| o.kind) != Some(OpKind::Kill) {
            let mut rec = rec.clone();
            rec.op = Some(Op::new(OpKind::Kill, Phase::Kill));
            dir.save(&rec)?;
        }
        if !holds_nothing_on_host(rec) {
            if let Ok(d) = self.driver(rec.runtime) {
                d.kill(dir, rec)?;
            }
        }
        self.remove(dir, rec);
        Ok(())
    }

    /// Names snapshot `id` of the store's remote (pushed by another home) `name` here, unless
    /// the name already points at it; its data stays in the remote until read.
    pub fn pull_snapshot(&self, name: &str, id: &BlobId) -> Result<()> {
        let here = self
            .store
            .lookup_name(&kiln_blockstore::names::SANDBOX_SNAPSHOT.name(name))?;
        if here.as_ref() != Some(id) {
            sandbox_snapshot::pull(&self.holds, name, id)?;
        }
        Ok(())
    }

    /// Removes a named snapshot (`kiln sandbox snapshots rm`, E2B's snapshot delete); its data
    /// goes once no sandbox needs it. Returns whether it existed.
    pub fn remove_snapshot(&self, name: &str) -> Result<bool> {
        sandbox_snapshot::remove(&self.holds, name)
    }

    /// Changes a sandbox's egress policy; a running one's rules change at once (new
    /// connections; established ones go on), a paused one gets it when resumed.
    pub fn set_network(&self, id: &str, policy: NetworkPolicy) -> Result<SandboxRecord> {
        self.change_network(id, policy, false)
    }

    /// [`Sandboxes::set_network`] for a sandbox that must be running, so the change holds
    /// at once (E2B's network update): checked under the sandbox's lock.
    pub fn set_running_network(&self, id: &str, policy: NetworkPolicy) -> Result<SandboxRecord> {
        self.change_network(id, policy, true)
    }

    fn change_network(
        &self,
        id: &str,
        policy: NetworkPolicy,
        running_only: bool,
    ) -> Result<SandboxRecord> {
        let dir = self.resolve(id)?;
        let _lock = dir.lock(LOCK_WAIT)?;
        let mut rec = dir.load()?;
        if running_only {
            rec = running(rec, Action::ChangeNetwork)?;
        }
        if rec.network.is_none() {
            return Err(Error::NoNetwork(rec.id));
        }
        if let Some(att) = &rec.net {
            kiln_network::apply_policy(att, &policy, &dir.net())?;
        }
        rec.network = Some(policy);
        dir.save(&rec)?;
        Ok(rec)
    }

    /// Sets a new timeout from now (`None`: never).
    pub fn set_timeout(&self, id: &str, secs: Option<u64>) -> Result<SandboxRecord> {
        let dir = self.resolve(id)?;
        let _lock = dir.lock(LOCK_WAIT)?;
        let mut rec = dir.load()?;
        rec.timeout_secs = secs;
        rec.deadline_ms = secs.map(|s| deadline_after(now_ms(), s));
        dir.save(&rec)?;
        Ok(rec)
    }

    /// Extends the deadline to `secs` from now if that is later (never shortens it; a
    /// sandbox without a deadline keeps none); `secs` becomes its timeout when it does.
    pub fn extend_timeout(&self, id: &str, secs: u64) -> Result<SandboxRecord> {
        let dir = self.resolve(id)?;
        let _lock = dir.lock(LOCK_WAIT)?;
        let mut rec = dir.load()?;
        let wanted = deadline_after(now_ms(), secs);
        if rec.deadline_ms.is_some_and(|d| d < wanted) {
            rec.timeout_secs = Some(secs);
            rec.deadline_ms = Some(wanted);
            dir.save(&rec)?;
        }
        Ok(rec)
    }

    /// What the running sandbox `rec` uses now (its driver's [`Runtime::usage`]); `None` when
    /// it is not running or its driver cannot tell.
    pub fn usage(&self, rec: &SandboxRecord) -> Option<crate::Usage> {
        if rec.state != State::Running {
            return None;
        }
        self.driver(rec.runtime)
            .ok()?
            .usage(&self.dir(&rec.id), rec)
    }

    /// Every sandbox's record as it is on disk, without reconciling (cheap: for a data-plane
    /// request that names no sandbox, see `kiln serve`'s signed URLs). Records being
    /// written or removed meanwhile are left out.
    pub fn records(&self) -> Vec<SandboxRecord> {
        let Ok(entries) = std::fs::read_dir(self.root()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| SandboxDir::new(e.path()).load().ok())
            .collect()
    }

    /// A sandbox's record as it is on disk, without reconciling it with reality (cheap: for
    /// checks on every data-plane request).
    pub fn record(&self, id_or_name: &str) -> Result<SandboxRecord> {
        self.resolve(id_or_name)?.load()
    }

    /// Gives a sandbox made before records held tokens (by a `kiln serve` that kept them in
    /// `serve/tokens/`) its envd access token. Only a record with no access set is changed;
    /// an empty token leaves it secure without one (its data plane refuses everyone).
    pub fn adopt_envd_token(&self, id: &str, token: &str) -> Result<SandboxRecord> {
        let dir = self.resolve(id)?;
        let _lock = dir.lock(LOCK_WAIT)?;
        let mut rec = dir.load()?;
        if rec.access.is_open() {
            rec.access.secure = true;
            rec.access.envd_token = Some(token.to_string()).filter(|t| !t.is_empty());
            dir.save(&rec)?;
        }
        Ok(rec)
    }

    /// The console log of a sandbox.
    pub fn log_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.resolve(id)?.console_log())
    }

    /// An image record by id, pulled from the remote (lazily) when this home lacks it.
    fn image(&self, id: &BlobId) -> Result<ImageRecord> {
        if !self.store.contains(id) {
            kiln_imagebuilder::image::pull(&self.store, id, &id.to_hex())?;
        }
        Ok(kiln_imagebuilder::image::get_record(&self.store, id)?)
    }
}

/// Whether `rec` has nothing on the host beyond its directory: paused (its pause ended its
/// processes and removed its cgroups and network) or being adopted into this home. Its kill
/// then leaves the host's cgroups and networks alone, which are named by sandbox id: another
/// home on this host may run the same sandbox (a cluster node that took it over).
fn holds_nothing_on_host(rec: &SandboxRecord) -> bool {
    matches!(rec.state, State::Paused { .. })
        && rec.op.as_ref().is_none_or(|o| o.kind == OpKind::Adopt)
}

/// Test-only fault injection, for the cleanup paths no natural failure reaches on demand:
/// `KILN_FAULT=create-started:N` makes the Nth create of this process (counting restores
/// and forks) fail once its sandbox runs, before it is marked running. Unset: nothing.
fn injected_fault(point: &str) -> Result<()> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Ok(spec) = std::env::var("KILN_FAULT") else {
        return Ok(());
    };
    let Some(nth) = spec
        .strip_prefix(point)
        .and_then(|r| r.strip_prefix(':'))
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return Ok(());
    };
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    if n == nth {
        return Err(Error::Driver {
            what: format!("create #{n}"),
            detail: format!("fault injected by KILN_FAULT={spec}"),
        });
    }
    Ok(())
}

/// The image config's defaults for processes.
fn defaults_of(image: &ImageRecord) -> ProcessDefaults {
    let c = &image.config;
    let mut cmd = c.entrypoint.clone().unwrap_or_default();
    cmd.extend(c.cmd.clone().unwrap_or_default());
    ProcessDefaults {
        env: c.env.clone(),
        cwd: c.workdir.clone(),
        user: c.user.clone(),
        cmd,
    }
}
