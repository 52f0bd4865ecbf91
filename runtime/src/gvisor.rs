//! The `gvisor` driver: a sandbox is a `runsc` container (one sandbox process, one gofer) whose
//! init is the kiln agent.
//!
//! - Root file system: the image's tree ([`crate::rootfs`]), shared read-only; the sandbox's
//!   writes stay in gVisor's in-memory overlay (`--overlay2=root:memory`), so a checkpoint
//!   captures memory and file changes together, and forks diverge on their own.
//! - The agent (`/.kiln/bin/kiln-agent`, a static binary bind-mounted read-only) listens on
//!   `/run/kiln/agent.sock` inside, which `--host-uds=create` makes a host socket in the
//!   sandbox's `run/` directory (bind-mounted read-write at /run/kiln).
//! - `run/` is the only host directory the sandbox can write, and so hostile: symlinks made
//!   there are real on the host. It is a tiny tmpfs of its own (size and inode limits), mounted
//!   fresh before every run and restore and unmounted by [`Runtime::kill`], and the host only
//!   connects to the agent's socket there, through [`crate::hostfs`] (never by a path that
//!   could follow a symlink).
//! - gVisor cannot save a socket bound to the host, so before a checkpoint the agent is told to
//!   quiesce: it closes its listener and connections and waits until `/.kiln/ctl/resume`
//!   holds a new value. `ctl/` is a host directory only the host writes, bind-mounted
//!   read-only; the driver writes a fresh random value there after the restore (or after a
//!   failed checkpoint), so the sandbox can neither forge nor redirect that signal.
//! - Checkpoints are uncompressed `runsc checkpoint` images (`--compression=none`: the state,
//!   the page metadata and the memory pages, which hold the in-memory overlay's files too),
//!   each file put into the block store as a blob of plain data in fixed chunks, so pages that
//!   did not change between checkpoints are stored once. Every blob is held
//!   ([`Holder::Checkpoint`]) before its manifest is written. A restore exports the files back
//!   into `ckpt/` in parallel; forks of one checkpoint link the files the live checkpoint left
//!   in their parent's `ckpt-shared/` instead. A live snapshot is a checkpoint followed by a
//!   restore in place.
//! - A checkpoint drops the sandbox's TCP connections to the outside (`--net-disconnect-ok`:
//!   the peers see them reset or closed, as after E2B's pause); connections inside the
//!   sandbox (loopback) are saved and go on after the restore.
//!
//! Files in the sandbox's directory: `bundle/config.json` (the OCI spec), `runsc/` (runsc's
//! state root for this one container), `run/` (the agent's socket; the sandbox's tmpfs),
//! `ctl/` (the resume signal; read-only inside), `ckpt/` (a checkpoint being written or read),
//! `ckpt-shared/` (the files of the last live checkpoint, for its forks to link),
//! `console.log` (runsc's output, and the agent's until it listens: then it detaches its
//! stdio, so nothing in the sandbox can write there).

use crate::error::{Error, IoCtx, Result};
use crate::gvisor_disk;
use crate::holds::{Holder, Holds};
use crate::hostfs::{self, TmpfsLimits};
use crate::record::{
    process_start_time, processes_with, write_atomic, Op, OpKind, Phase, Proc, RuntimeKind,
    SandboxDir, SandboxRecord,
};
use crate::{Checkpoint, PendingNetwork, Recovered, Runtime, Usage};
use kiln_blockstore::{BlobId, PutOptions, Store};
use kiln_imagebuilder::image::ImageRecord;
use serde_json::json;
use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub mod limits;

/// Where the agent lives and listens inside the sandbox.
const AGENT_IN_SANDBOX: &str = "/.kiln/bin/kiln-agent";
const RUN_IN_SANDBOX: &str = "/run/kiln";
/// Where the host's read-only control directory (`ctl/`) appears inside.
const CTL_IN_SANDBOX: &str = "/.kiln/ctl";
/// The sandbox-writable `run/`: room for the agent's socket and its `generation` file, not
/// for a flood. Mode 0711: the sandbox's other users may read `generation` by name.
const RUN_LIMITS: TmpfsLimits = TmpfsLimits {
    bytes: 64 << 10,
    inodes: 32,
    mode: 0o711,
};
/// The capabilities Docker gives a container's processes by default.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];
/// The agent's capabilities as runsc starts it: Docker's set, `CAP_SYS_ADMIN` for the mounts
/// it makes first (its own `/proc`, the cgroupfs sealed read-only), and `CAP_SYS_RESOURCE`, which exempts it from the
/// per-user task limit it gives what it starts. It drops the first from every set and the
/// second from the bounding and inheritable sets before it starts a thread or a process
/// (`kiln_agent::gvisor_init`), so no process it starts has either.
fn agent_caps() -> Vec<&'static str> {
    let mut caps = DEFAULT_CAPS.to_vec();
    caps.extend(["CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"]);
    caps
}
/// Chunk size of checkpoint files in the store: one page. runsc writes the committed pages of
/// its memory file in order, so a page committed or freed early in that file shifts every
/// later one by a page: only page-sized chunks dedupe across such shifts (measured: a second
/// pause after a 1 MiB write into a kiln sandbox holding 144 MiB stored all 145 MiB again at
/// 64 KiB chunks).
const CHECKPOINT_CHUNK: u32 = 4096;
/// `Checkpoint::state["format"]` of this driver: every file of runsc's image directory as a
/// blob of its own (`files`: name -> blob).
const FORMAT: &str = "runsc-files/1";
/// The format of runsc 20221219's checkpoints (one compressed state file), which runsc
/// 20240729 cannot restore.
const OLD_FORMAT: &str = "runsc-checkpoint";
/// Files kiln writes into `ckpt/` beside runsc's image.
const OWN_FILES: &[&str] = &["runsc.log", "status", "key"];
/// Threads exporting a checkpoint's chunks (decompression and file writes overlap).
const EXPORT_THREADS: usize = 4;
/// How long a pause short of disk space waits for the sentry to give freed memory back
/// before it is refused.
const ROOM_SETTLE: Duration = Duration::from_secs(3);
/// How long the reconcile waits for a checkpoint that runs on without its caller.
const RECOVER_WAIT: Duration = Duration::from_secs(60);
/// Waits for its caller's go on stdin (sent once the caller has recorded the watcher's pid;
/// a caller that dies first closes the pipe, and nothing starts), runs `runsc checkpoint` and
/// writes its exit status to `$1` when it ends: whoever comes next learns whether the
/// checkpoint completed even if the caller died meanwhile (runsc's own state cannot tell: the
/// container stays `running` in it either way).
const WATCH_SCRIPT: &str = r#"read go || exit 0; s=$1; shift; "$@"; echo $? >"$s""#;

/// The oldest runsc kiln runs on: the first Debian packages (bookworm-backports) with the
/// systrap platform, uncompressed checkpoints, `--net-disconnect-ok` and working cgroups.
pub const RUNSC_MIN_RELEASE: u32 = 20240729;

/// How to run runsc here.
#[derive(Clone, Debug)]
pub struct GvisorConfig {
    pub runsc: PathBuf,
    /// The gVisor platform: `systrap` by default, `kvm` where /dev/kvm has hardware
    /// virtualization, or what `KILN_GVISOR_PLATFORM` says (an unknown name is kept as the
    /// reason the driver is unavailable).
    pub platform: std::result::Result<Platform, String>,
    /// A statically linked kiln-agent.
    pub agent: std::result::Result<PathBuf, String>,
    /// How long a starting or restored sandbox's agent may take to answer.
    pub agent_timeout: Duration,
}

/// gVisor's ways of intercepting a sandbox's system calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// seccomp traps in stub processes: needs no virtualization, gVisor's default.
    Systrap,
    /// Hardware virtualization through /dev/kvm (not PVM): the fastest where it exists.
    Kvm,
    /// PTRACE_SYSEMU: the slowest, kept for hosts where systrap cannot run.
    Ptrace,
}

impl Platform {
    pub fn name(self) -> &'static str {
        match self {
            Platform::Systrap => "systrap",
            Platform::Kvm => "kvm",
            Platform::Ptrace => "ptrace",
        }
    }

    fn parse(s: &str) -> std::result::Result<Platform, String> {
        match s {
            "systrap" => Ok(Platform::Systrap),
            "kvm" => Ok(Platform::Kvm),
            "ptrace" => Ok(Platform::Ptrace),
            other => Err(format!(
                "KILN_GVISOR_PLATFORM={other:?} is not a gVisor platform (systrap, kvm or ptrace)"
            )),
        }
    }

    /// kvm where /dev/kvm has hardware virtualization (gVisor's KVM platform needs it: PVM
    /// is not enough), else systrap.
    fn detect() -> Platform {
        if crate::microvm::kvm_unsupported(true).is_none() {
            Platform::Kvm
        } else {
            Platform::Systrap
        }
    }

    /// Why this host cannot run the platform, if it cannot.
    fn unsupported(self) -> Option<String> {
        match self {
            Platform::Kvm => crate::microvm::kvm_unsupported(true)
                .map(|why| format!("gVisor's kvm platform needs hardware virtualization: {why}")),
            Platform::Systrap | Platform::Ptrace => None,
        }
    }
}

impl GvisorConfig {
    /// `KILN_RUNSC` (default `runsc` on PATH), `KILN_GVISOR_PLATFORM` (systrap, kvm or ptrace;
    /// default [`Platform::detect`]), `KILN_AGENT` or a static agent next to the running
    /// binary, `KILN_AGENT_TIMEOUT` seconds (default 20). An unknown platform name is reported
    /// by [`Runtime::available`].
    pub fn from_env() -> GvisorConfig {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        GvisorConfig {
            runsc: env("KILN_RUNSC")
                .map(PathBuf::from)
                .or_else(|| find_on_path("runsc"))
                .unwrap_or_else(|| PathBuf::from("runsc")),
            platform: env("KILN_GVISOR_PLATFORM")
                .map(|v| Platform::parse(&v.to_string_lossy()))
                .unwrap_or_else(|| Ok(Platform::detect())),
            agent: find_agent(),
            agent_timeout: Duration::from_secs(
                env("KILN_AGENT_TIMEOUT")
                    .and_then(|v| v.to_str()?.parse().ok())
                    .unwrap_or(20),
            ),
        }
    }
}

/// The release date in `runsc --version`'s first line (`runsc version 0.0~20240729.0`,
/// `runsc version release-20240729.0`).
fn runsc_release(version_output: &str) -> Option<u32> {
    let line = version_output.lines().next()?;
    line.split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 8 && w.starts_with("20"))?
        .parse()
        .ok()
}

fn find_on_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// The static agent (see [`kiln_vmm::host::static_agent`]) for the running binary.
fn find_agent() -> std::result::Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    kiln_vmm::host::static_agent(&exe)
}

/// What a checkpoint leaves of its sandbox.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// Ended once its state is stored (pause).
    Stop,
    /// Restored in place from it (a live snapshot).
    RunOn,
    /// Stopped, its restore left to [`Runtime::run_on`] (a fork's source, restored beside
    /// its forks).
    RunOnLater,
}

pub struct GvisorDriver {
    store: Store,
    holds: Holds,
    home: PathBuf,
    config: GvisorConfig,
    available: std::sync::OnceLock<std::result::Result<(), String>>,
    agent_dir: std::sync::OnceLock<PathBuf>,
}

impl GvisorDriver {
    pub fn new(store: Store, home: &Path, config: GvisorConfig) -> GvisorDriver {
        GvisorDriver {
            holds: Holds::of_home(store.clone(), home),
            store,
            home: home.to_path_buf(),
            config,
            available: std::sync::OnceLock::new(),
            agent_dir: std::sync::OnceLock::new(),
        }
    }

    /// runsc with this sandbox's state root and kiln's flags; with a network, gVisor's
    /// netstack takes over the interfaces of the sandbox's guest namespace.
    fn runsc(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Command {
        self.runsc_networked(dir, rec.net.is_some())
    }

    /// [`Self::runsc`] for a sandbox that has a network (`networked`) or not.
    fn runsc_networked(&self, dir: &SandboxDir, networked: bool) -> Command {
        let mut c = Command::new(&self.config.runsc);
        let network = if networked { "sandbox" } else { "none" };
        c.arg(Self::root_flag(dir))
            .arg(format!(
                "--platform={}",
                self.config
                    .platform
                    .as_ref()
                    .map_or("systrap", |p| p.name())
            ))
            .arg(format!("--network={network}"))
            .arg(Self::overlay_flag(dir))
            // A checkpoint drops connections to the outside instead of failing on them.
            .arg("--net-disconnect-ok")
            .arg("--host-uds=create");
        if let Some(d) = std::env::var_os("KILN_RUNSC_DEBUG_LOG") {
            c.arg("--debug")
                .arg(format!("--debug-log={}/", Path::new(&d).display()));
        }
        c
    }

    /// The root overlay's filestore on the sandbox's own disk ([`gvisor_disk`]). A path runsc
    /// cannot take fails every launch before runsc runs (the fallback only reaches commands
    /// that create no filestore, as `checkpoint`).
    fn overlay_flag(dir: &SandboxDir) -> String {
        gvisor_disk::overlay_flag(dir).unwrap_or_else(|_| "--overlay2=root:memory".into())
    }

    /// `--root=<state root>` in one argument, as runsc passes it on to the sandbox and gofer
    /// processes it starts: every runsc process of this sandbox carries it.
    fn root_flag(dir: &SandboxDir) -> String {
        format!("--root={}", dir.sub("runsc").display())
    }

    /// Runs `runsc checkpoint` into `dir/ckpt`, detached (its own process group) under a `sh`
    /// watcher that records its exit status in `ckpt/status`; the watcher is `rec.op`'s
    /// helper. Returns once it ended.
    fn run_checkpoint(&self, dir: &SandboxDir, rec: &mut SandboxRecord) -> Result<()> {
        let ckpt = dir.sub("ckpt");
        let mut runsc = self.runsc(dir, rec);
        runsc.args([
            "checkpoint",
            // Plain pages, so the store's chunks dedupe them (it compresses them itself).
            "--compression=none",
            "--image-path",
            path_str(&ckpt)?,
            &rec.id,
        ]);
        let log_path = ckpt.join("runsc.log");
        let log = std::fs::File::create(&log_path).ctx("create", &log_path)?;
        let sh = Path::new("/bin/sh");
        let mut child = Command::new(sh)
            .arg("-c")
            .arg(WATCH_SCRIPT)
            .arg("kiln-checkpoint")
            .arg(ckpt.join("status"))
            .arg(runsc.get_program())
            .args(runsc.get_args())
            .stdin(Stdio::piped())
            .stdout(log.try_clone().ctx("dup", &log_path)?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .ctx("run", sh)?;
        if let Some(op) = rec.op.as_mut() {
            op.helper = Proc::of(child.id());
        }
        let saved = dir.save(rec);
        let gate = child.stdin.take();
        if let (Ok(()), Some(mut gate)) = (&saved, gate) {
            use std::io::Write;
            // A watcher that cannot read its go ends without starting runsc.
            let _ = gate.write_all(b"go\n");
        }
        child.wait().ctx("wait for", sh)?;
        saved?;
        match checkpoint_status(dir) {
            Some(0) => Ok(()),
            _ => Err(Error::Driver {
                what: "runsc checkpoint".into(),
                detail: first_lines(&crate::record::tail(&log_path, 4096), 6),
            }),
        }
    }

    /// Starts (`run`) or restores the container detached: runsc's sandbox and gofer become
    /// their own process group with the console log as stdio, so they outlive the caller.
    /// `ready` and the sandbox's network (`net`, else the one in `rec`) are waited for just
    /// before runsc starts (what runsc reads, made meanwhile).
    fn launch(
        &self,
        dir: &SandboxDir,
        rec: &SandboxRecord,
        what: &str,
        args: &[&str],
        ready: &dyn Fn() -> Result<()>,
        net: &PendingNetwork,
    ) -> Result<()> {
        // An empty, bounded run/ for every run and restore: nothing a previous run of the
        // sandbox left there (a flood, symlinks) carries over.
        let run = dir.sub("run");
        std::fs::create_dir_all(&run).ctx("create", &run)?;
        hostfs::mount_tmpfs(&run, "kiln-run", RUN_LIMITS).ctx("mount a tmpfs on", &run)?;
        gvisor_disk::overlay_flag(dir)?;
        gvisor_disk::attach(dir, rec.disk_mib, &self.home.join("disks"))?;
        let log_path = dir.console_log();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .ctx("open", &log_path)?;
        let before = log.metadata().map(|m| m.len()).unwrap_or(0);
        limits::create(&rec.id, rec.cpus, rec.memory_mib)?;
        let att = net.wait()?.or_else(|| rec.net.clone());
        let mask = match &att {
            Some(att) => {
                kiln_network::reset_guest(att)?;
                Some(ProcSysMask::new()?)
            }
            None => None,
        };
        let mut cmd = self.runsc_networked(dir, att.is_some());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().ctx("dup", &log_path)?)
            .stderr(log)
            .process_group(0);
        if let Some(m) = &mask {
            m.apply(&mut cmd);
        }
        ready()?;
        let started = Instant::now();
        let mut child = cmd.spawn().ctx("run", &self.config.runsc)?;
        drop(mask);
        // If we are killed now, runsc goes on: whoever cleans up ends it first (kill).
        let launcher = dir.sub("launch.pid");
        let _ = std::fs::write(&launcher, child.id().to_string());
        if let Some(op) = rec.op.as_ref() {
            let mut rec = rec.clone();
            rec.op = Some(Op {
                helper: Proc::of(child.id()),
                ..op.clone()
            });
            let _ = dir.save(&rec);
        }
        let status = child.wait().ctx("wait for", &self.config.runsc)?;
        let _ = std::fs::remove_file(&launcher);
        tracing::debug!(id = %rec.id, what, ms = started.elapsed().as_millis() as u64, "runsc returned");
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read(&log_path).unwrap_or_default();
        let new = String::from_utf8_lossy(&text[(before as usize).min(text.len())..]).into_owned();
        Err(Error::Driver {
            what: what.into(),
            detail: first_lines(&new, 6),
        })
    }

    /// The bundle of `rec`, with the network being made (`net`) or in `rec` if any.
    fn write_bundle(
        &self,
        dir: &SandboxDir,
        rec: &SandboxRecord,
        rootfs: &Path,
        net: &PendingNetwork,
    ) -> Result<()> {
        let agent_dir = self.installed_agent()?;
        let run = dir.sub("run");
        let ctl = dir.sub("ctl");
        let bundle = dir.sub("bundle");
        for d in [&run, &ctl, &bundle] {
            std::fs::create_dir_all(d).ctx("create", d)?;
        }
        // The resume file exists from the start, always as long: a restore fails when a file
        // the agent has read is gone (a fork's new ctl/).
        Self::release_agent(dir)?;
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                 "options": ["nosuid", "noexec", "nodev", "mode=1777",
                             format!("size={}m", (rec.memory_mib / 4).max(1))]}),
            // gVisor's own cgroupfs: the agent bounds the tasks of what it starts there.
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}),
            json!({"destination": RUN_IN_SANDBOX, "type": "bind", "source": run,
                 "options": ["rbind", "rw", "nosuid", "nodev", "noexec"]}),
            json!({"destination": CTL_IN_SANDBOX, "type": "bind", "source": ctl,
                 "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}),
            json!({"destination": "/.kiln/bin", "type": "bind", "source": agent_dir,
                 "options": ["rbind", "ro"]}),
        ];
        if dir_is_empty(&rootfs.join("tmp")) {
            // gVisor would mount a tmpfs there anyway, sized by the host's memory; this one
            // is bounded by the sandbox's (half of it, as Linux does), and counts against it.
            mounts.push(
                json!({"destination": "/tmp", "type": "tmpfs", "source": "tmp",
                "options": ["nosuid", "nodev", "mode=1777",
                            format!("size={}m", (rec.memory_mib / 2).max(1))]}),
            );
        }
        let guest_ns = match &rec.net {
            Some(att) => att.guest_ns.clone(),
            None => net.coming().then(|| kiln_network::guest_namespace(&rec.id)),
        };
        let net_ns = match &guest_ns {
            Some(ns) => {
                // The gateway answers DNS; names resolve as the policy says.
                for f in ["resolv.conf", "hosts"] {
                    mounts.push(json!({"destination": format!("/etc/{f}"), "type": "bind",
                        "source": dir.net().join(f), "options": ["rbind", "ro"]}));
                }
                json!({"type": "network", "path": format!("/run/netns/{ns}")})
            }
            None => json!({"type": "network"}),
        };
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": [AGENT_IN_SANDBOX, "--unix", format!("{RUN_IN_SANDBOX}/agent.sock"),
                         "--resume", format!("{CTL_IN_SANDBOX}/resume"),
                         "--memory-mib", rec.memory_mib.to_string(),
                         "--pids-max", limits::tasks_inside(rec.memory_mib).to_string()],
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "cwd": "/",
                // Docker's default set: the agent switches users and owns files for clients.
                "capabilities": {
                    "bounding": agent_caps(), "effective": agent_caps(),
                    "permitted": agent_caps(),
                },
            },
            // Writable through gVisor's in-memory overlay; the shared tree underneath is never written.
            "root": {"path": rootfs, "readonly": false},
            "hostname": rec.name.clone().unwrap_or_else(|| rec.id.clone()),
            "mounts": mounts,
            "linux": {"cgroupsPath": limits::cgroups_path(&rec.id), "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                net_ns,
            ]},
        });
        write_atomic(
            &bundle.join("config.json"),
            &serde_json::to_vec_pretty(&spec).expect("json"),
            false, // rewritten before every run and restore
        )
    }

    /// The agent binary copied into the home under its content hash, so a rebuilt agent never
    /// changes what running or checkpointed sandboxes see.
    fn installed_agent(&self) -> Result<PathBuf> {
        if let Some(d) = self.agent_dir.get() {
            return Ok(d.clone());
        }
        let src = self
            .config
            .agent
            .as_ref()
            .map_err(|why| Error::Unavailable(RuntimeKind::Gvisor, why.clone()))?;
        // Known by size and mtime, hashed only when new: the 8 MB hash cost every start.
        let meta = std::fs::metadata(src).ctx("stat", src)?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let agents = self.home.join("agent");
        let key = agents.join(format!("by-stat/{:x}-{mtime:x}", meta.len()));
        let dir = match std::fs::read_link(&key) {
            Ok(d) if d.join("kiln-agent").exists() => d,
            _ => {
                let bytes = std::fs::read(src).ctx("read", src)?;
                let hash = blake3::hash(&bytes).to_hex();
                let dir = agents.join(&hash.as_str()[..16]);
                let bin = dir.join("kiln-agent");
                if !bin.exists() {
                    std::fs::create_dir_all(&dir).ctx("create", &dir)?;
                    // Unique per call: threads of one process (kiln serve) may install at once.
                    let tmp = dir.join(format!(
                        ".kiln-agent.{}.{}",
                        std::process::id(),
                        hex::encode(random_bytes::<8>())
                    ));
                    std::fs::write(&tmp, &bytes).ctx("write", &tmp)?;
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                        .ctx("chmod", &tmp)?;
                    std::fs::rename(&tmp, &bin).ctx("rename", &bin)?;
                }
                let _ = std::fs::create_dir_all(agents.join("by-stat"));
                let tmp_link = key.with_extension(format!(
                    "tmp{}.{}",
                    std::process::id(),
                    hex::encode(random_bytes::<8>())
                ));
                if std::os::unix::fs::symlink(&dir, &tmp_link).is_ok() {
                    let _ = std::fs::rename(&tmp_link, &key);
                }
                dir
            }
        };
        Ok(self.agent_dir.get_or_init(|| dir).clone())
    }

    fn agent_socket(dir: &SandboxDir) -> PathBuf {
        dir.sub("run").join("agent.sock")
    }

    /// Records the sandbox process (for liveness checks) from runsc's pid file.
    fn record_pid(&self, dir: &SandboxDir, rec: &mut SandboxRecord, rootfs: &Path) -> Result<()> {
        let pid_file = dir.sub("sandbox.pid");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .ctx("read", &pid_file)?
            .trim()
            .parse()
            .map_err(|_| Error::Invalid(format!("{}: not a pid", pid_file.display())))?;
        rec.driver = json!({
            "pid": pid,
            "start_time": process_start_time(pid),
            "rootfs": rootfs,
        });
        rec.agent = Some(Self::agent_socket(dir));
        Ok(())
    }

    /// Waits for the agent to answer a health request; fails early if the sandbox died.
    fn wait_agent(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<()> {
        self.wait_agent_for(dir, rec, &mut |s| kiln_agent::client::health(s).map(|_| ()))
    }

    /// Waits until the agent answers `request` (sent on a fresh connection, tried again until
    /// it succeeds); fails early if the sandbox died.
    fn wait_agent_for(
        &self,
        dir: &SandboxDir,
        rec: &SandboxRecord,
        request: &mut dyn FnMut(
            &mut UnixStream,
        )
            -> std::result::Result<(), kiln_agent::client::ClientError>,
    ) -> Result<()> {
        let sock = Self::agent_socket(dir);
        let t = Instant::now();
        loop {
            if let Ok(mut s) = connect_agent(&sock) {
                s.set_read_timeout(Some(self.config.agent_timeout)).ok();
                if request(&mut s).is_ok() {
                    return Ok(());
                }
            }
            if let Some(cause) = self.exited(dir, rec) {
                return Err(Error::Driver {
                    what: format!("sandbox {}", rec.id),
                    detail: format!("{cause}\n--- log tail ---\n{}", dir.log_tail(2000)),
                });
            }
            if t.elapsed() > self.config.agent_timeout {
                return Err(Error::AgentTimeout {
                    id: rec.id.clone(),
                    secs: self.config.agent_timeout.as_secs(),
                    tail: dir.log_tail(2000),
                });
            }
            // A refused connect is cheap: look often, the agent binds ~10-20 ms after runsc
            // returns.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets a quiesced (or just restored) agent listen again: a value it has not seen in
    /// `ctl/resume` (only the host writes `ctl/`), of a fixed length.
    fn release_agent(dir: &SandboxDir) -> Result<()> {
        let p = dir.sub("ctl").join("resume");
        let value = format!("{}-{:020}", hex::encode(random_bytes::<16>()), now_ns());
        write_atomic(&p, value.as_bytes(), false)
    }

    /// Waits for a restored agent and tells it the new generation (wall clock, RNG seed):
    /// its answer to that is the first sign of it.
    fn announce_generation(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<()> {
        let generation = rec.generation;
        self.wait_agent_for(dir, rec, &mut |s| {
            kiln_agent::client::set_generation(
                s,
                &kiln_agent::protocol::GenerationRequest {
                    generation,
                    unix_time_ns: now_ns(),
                    seed_hex: hex::encode(random_bytes::<32>()),
                },
            )
            .map(|_| ())
        })
    }

    fn connect_path(&self, rec: &SandboxRecord) -> Result<UnixStream> {
        let p = rec
            .agent
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("sandbox {} has no agent address", rec.id)))?;
        connect_agent(p).ctx("connect to the agent at", p)
    }

    /// Restores `dir`'s container from the checkpoint in `ckpt` once `ready` says its files
    /// are there and its network (`net`, else the one in `rec`) is made, and waits for its
    /// agent.
    fn restore_local(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        rootfs: &Path,
        ckpt: &Path,
        ready: &dyn Fn() -> Result<()>,
        net: &PendingNetwork,
    ) -> Result<()> {
        let bundle = dir.sub("bundle");
        let pid_file = dir.sub("sandbox.pid");
        self.launch(
            dir,
            rec,
            "runsc restore",
            &[
                "restore",
                "--detach",
                "--image-path",
                path_str(ckpt)?,
                "--bundle",
                path_str(&bundle)?,
                "--pid-file",
                path_str(&pid_file)?,
                &rec.id,
            ],
            ready,
            net,
        )?;
        let restored = Instant::now();
        net.finish(rec)?;
        self.record_pid(dir, rec, rootfs)?;
        Self::release_agent(dir)?;
        self.announce_generation(dir, rec)?;
        let answered = restored.elapsed().as_millis() as u64;
        tracing::debug!(id = %rec.id, agent_ms = answered, "restored container answers");
        Ok(())
    }

    /// Ends what is left of a stopped container (its sandbox process exits on its own after
    /// a checkpoint; SIGKILL if it lingers) and removes runsc's state for it and its `run/`
    /// (a paused sandbox holds no mount; the next run gets a fresh one).
    fn forget_container(&self, dir: &SandboxDir, rec: &SandboxRecord) {
        self.end_container(dir, rec, Duration::from_millis(200));
        if let Err(e) = hostfs::unmount_all(&dir.sub("run")) {
            tracing::warn!(id = %rec.id, "unmounting run/: {e}");
        }
        if let Err(e) = gvisor_disk::detach(dir) {
            tracing::warn!(id = %rec.id, "removing the sandbox's disk: {e}");
        }
    }

    /// SIGKILLs the sandbox process if it is still there after `linger`, waits for it to go
    /// (bounded) and removes runsc's state.
    fn end_container(&self, dir: &SandboxDir, rec: &SandboxRecord, linger: Duration) {
        if let Some(pid) = live_pid(rec) {
            let t = Instant::now();
            while is_runsc(pid) {
                if t.elapsed() > linger {
                    // SAFETY: kill(2) of this sandbox's runsc process (checked by is_runsc).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                if t.elapsed() > Duration::from_secs(5) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let _ = std::fs::remove_dir_all(dir.sub("runsc"));
        if let Err(e) = limits::remove(&rec.id) {
            tracing::warn!(id = %rec.id, "{e}");
        }
    }

    /// The steps after a completed `runsc checkpoint` (in `dir/ckpt`): its state file into
    /// the store, the stopped container forgotten, and for a live snapshot the sandbox
    /// restored in place, now or (`End::RunOnLater`) by [`Runtime::run_on`]: then the
    /// checkpoint's files are already in `ckpt-shared/`, for the forks and the sandbox alike,
    /// and the second value is true. Each step is recorded before it starts.
    fn finish_checkpoint(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        end: End,
    ) -> Result<(Checkpoint, bool)> {
        let ckpt = dir.sub("ckpt");
        dir.enter(rec, Phase::Store)?;
        let t = Instant::now();
        let files = self.store_files(&ckpt, &Holder::Checkpoint(rec.id.clone()))?;
        tracing::info!(id = %rec.id, ms = t.elapsed().as_millis() as u64, "checkpoint stored");
        let cp = Checkpoint {
            state: json!({"format": FORMAT, "files": files, "network": rec.net.is_some(),
                          "sandbox": rec.id, "overlay": gvisor_disk::OVERLAY}),
            blobs: files.values().copied().collect(),
        };
        if let Some(op) = rec.op.as_mut() {
            // Recorded at once: whoever recovers from here on knows the blob, and frees it if
            // the checkpoint is not kept.
            op.checkpoint = Some(cp.clone());
            dir.save(rec)?;
        }
        match end {
            End::Stop => {
                // The container has stopped; its state root (this sandbox's alone) goes before
                // a restore reuses the id. `runsc delete` does the same but took 1.7 s here,
                // polling.
                let t = Instant::now();
                self.forget_container(dir, rec);
                tracing::info!(id = %rec.id, ms = t.elapsed().as_millis() as u64, "container forgotten");
            }
            End::RunOnLater if Self::keep_shared(&ckpt, &files).is_ok() => {
                dir.enter(rec, Phase::Restore)?;
                return Ok((cp, true));
            }
            End::RunOn | End::RunOnLater => self.restore_in_place(dir, rec)?,
        }
        dir.enter(rec, Phase::Saved)?;
        // A live snapshot keeps its files for forks; a fork's source whose files could not be
        // kept above is not tried again.
        if end != End::RunOn || Self::keep_shared(&ckpt, &files).is_err() {
            let _ = std::fs::remove_dir_all(&ckpt);
        }
        Ok((cp, false))
    }

    /// Puts every file runsc wrote into `ckpt` into the store (in parallel: each put makes
    /// and syncs a pack of its own), each blob held by `holder` before it is visible.
    fn store_files(&self, ckpt: &Path, holder: &Holder) -> Result<BTreeMap<String, BlobId>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(ckpt).ctx("list", ckpt)? {
            let e = e.ctx("list", ckpt)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !OWN_FILES.contains(&name.as_str()) && e.file_type().is_ok_and(|t| t.is_file()) {
                names.push(name);
            }
        }
        if !names.iter().any(|n| n == "checkpoint.img") {
            return Err(Error::Invalid(format!(
                "runsc wrote no checkpoint.img into {}",
                ckpt.display()
            )));
        }
        let opts = PutOptions {
            chunk_size: Some(CHECKPOINT_CHUNK),
            ..PutOptions::default()
        };
        let announce = |id: &BlobId| {
            self.holds.add_ahead(holder, id).map_err(|e| {
                kiln_blockstore::Error::Invalid(format!("holding a checkpoint blob: {e}"))
            })
        };
        let put: Vec<(String, Result<BlobId>)> = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|n| {
                    let (opts, announce) = (&opts, &announce);
                    s.spawn(move || {
                        let p = ckpt.join(n);
                        let id = self.store.put_file_announced(&p, opts, announce);
                        (n.clone(), id.map_err(Error::from))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a put thread panicked"))
                .collect()
        });
        put.into_iter().map(|(n, id)| Ok((n, id?))).collect()
    }

    /// Writes the checkpoint `files` from the store into `ckpt` (zero chunks as holes), every
    /// file at once from a few threads; the page cache serves a hot store.
    fn export_files(&self, files: &BTreeMap<String, BlobId>, ckpt: &Path) -> Result<()> {
        use std::os::unix::fs::FileExt;
        // A checkpoint from another home: what is not here comes from the remote in batches
        // first (runsc reads all of it; page by page it would be a round trip a page).
        let t = Instant::now();
        let blobs: Vec<BlobId> = files.values().copied().collect();
        let fetched = self.store.fetch_missing(&blobs)?;
        if fetched > 0 {
            tracing::info!(
                chunks = fetched,
                ms = t.elapsed().as_millis() as u64,
                "checkpoint fetched from the store's remote"
            );
        }
        let mut jobs = Vec::new();
        let mut out = Vec::new();
        for (name, id) in files {
            let m = self.store.manifest(id)?;
            let p = ckpt.join(name);
            let f = std::fs::File::create(&p).ctx("create", &p)?;
            f.set_len(m.size).ctx("size", &p)?;
            for (i, c) in m.chunks.iter().enumerate() {
                if c.is_some() {
                    let off = i as u64 * m.chunk_size as u64;
                    let len = (m.size - off).min(m.chunk_size as u64) as usize;
                    jobs.push((out.len(), *id, off, len));
                }
            }
            out.push((p, f));
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..EXPORT_THREADS.min(jobs.len()) {
                s.spawn(|| {
                    let mut buf = vec![0u8; CHECKPOINT_CHUNK as usize];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(file, id, off, len)) = jobs.get(i) else {
                            return;
                        };
                        if buf.len() < len {
                            buf.resize(len, 0);
                        }
                        let (p, f) = &out[file];
                        let r = self
                            .store
                            .read_at(&id, off, &mut buf[..len])
                            .map_err(Error::from)
                            .and_then(|n| f.write_all_at(&buf[..n], off).ctx("write", p));
                        if let Err(e) = r {
                            failed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            next.store(jobs.len(), std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                    }
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Keeps a live checkpoint's files (complete in `ckpt`) as `ckpt-shared/` for its forks,
    /// marked with the key of their blobs.
    fn keep_shared(ckpt: &Path, files: &BTreeMap<String, BlobId>) -> Result<()> {
        let key = ckpt.join("key");
        std::fs::write(&key, files_key(files)).ctx("write", &key)?;
        let shared = ckpt.with_file_name("ckpt-shared");
        let _ = std::fs::remove_dir_all(&shared);
        std::fs::rename(ckpt, &shared).ctx("rename", ckpt)
    }

    /// Hard-links the checkpoint `files` into `ckpt` from the `ckpt-shared/` of sandbox
    /// `parent` (where the live checkpoint that made them left them), if it still holds
    /// exactly these files. Read through one descriptor of that directory, so a parent that
    /// checkpoints again meanwhile makes the links fail rather than mix two checkpoints.
    fn link_shared(&self, parent: &str, files: &BTreeMap<String, BlobId>, ckpt: &Path) -> bool {
        if crate::record::check_name(parent).is_err() {
            return false;
        }
        let shared = self.home.join("sandboxes").join(parent).join("ckpt-shared");
        let Ok(d) = std::fs::File::open(&shared) else {
            return false;
        };
        use std::os::fd::AsRawFd;
        let via = PathBuf::from(format!("/proc/self/fd/{}", d.as_raw_fd()));
        if std::fs::read(via.join("key")).ok().as_deref() != Some(files_key(files).as_bytes()) {
            return false;
        }
        let linked = files
            .keys()
            .all(|n| std::fs::hard_link(via.join(n), ckpt.join(n)).is_ok());
        if !linked {
            for n in files.keys() {
                let _ = std::fs::remove_file(ckpt.join(n));
            }
        }
        linked
    }

    /// Runs the sandbox on from the complete checkpoint in `dir/ckpt` (a live snapshot's, or
    /// one whose caller died), ending first whatever is left of its container.
    fn restore_in_place(&self, dir: &SandboxDir, rec: &mut SandboxRecord) -> Result<()> {
        let rootfs = Self::rootfs_of(rec)
            .ok_or_else(|| Error::Invalid(format!("sandbox {} has no rootfs", rec.id)))?;
        // `ckpt-shared/` when a fork left the restore for later (its forks read it too).
        let images = ["ckpt", "ckpt-shared"].map(|d| dir.sub(d));
        let Some(images) = images
            .into_iter()
            .find(|d| d.join("checkpoint.img").is_file())
        else {
            return Err(Error::Invalid(format!(
                "sandbox {}: no checkpoint left to restore from",
                rec.id
            )));
        };
        dir.enter(rec, Phase::Restore)?;
        // The control socket name of a container just killed can stay taken a moment
        // ("address already in use"): tried a few times.
        let mut tries = 0;
        loop {
            self.kill(dir, rec)?;
            let none = PendingNetwork::none();
            match self.restore_local(dir, rec, &rootfs, &images, &|| Ok(()), &none) {
                Err(e) if tries < 4 && e.to_string().contains("address already in use") => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }

    /// Waits (up to [`RECOVER_WAIT`]) for a `runsc checkpoint` whose caller died: `None` if
    /// it still runs, else whether it completed.
    fn await_checkpoint(&self, dir: &SandboxDir, op: &Op) -> Option<bool> {
        let root = Self::root_flag(dir);
        let t = Instant::now();
        loop {
            // The watcher and runsc both carry the state root and the subcommand.
            let running = op.helper.is_some_and(|h| h.alive())
                || !processes_with(&[&root, "checkpoint"]).is_empty();
            if !running {
                // No status: never started (a watcher whose pid was not recorded never gets
                // its go), or its watcher was killed and the outcome is unknown.
                return Some(checkpoint_status(dir) == Some(0));
            }
            if t.elapsed() > RECOVER_WAIT {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Refuses a checkpoint the home's file system has no room for, before the sandbox is
    /// touched: runsc ends a sandbox whose image it cannot finish writing (measured), so a
    /// full disk must stop the pause, not the sandbox. The image is about what the sandbox
    /// holds on the host; its store copy needs as much again at worst.
    ///
    /// The sentry hands memory its processes freed back to the host a little later (measured:
    /// 340 MiB of deleted /tmp files in ~150 ms on a quiet host, more under load), so a
    /// shortfall is looked at again for a while before the pause is refused.
    fn check_room_for_checkpoint(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<()> {
        let probe = dir.sub("bundle");
        let probe = probe.parent().unwrap_or(&probe);
        let t = Instant::now();
        loop {
            let Some(held) = limits::memory_in_use(&rec.id) else {
                return Ok(());
            };
            let Ok(st) = free_bytes(probe) else {
                return Ok(());
            };
            let need = held.saturating_mul(2).saturating_add(64 << 20);
            if st >= need {
                return Ok(());
            }
            if t.elapsed() < ROOM_SETTLE {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            return Err(Error::Driver {
                what: "checkpoint".into(),
                detail: format!(
                    "not enough disk space in {}: the checkpoint needs about {} MiB, {} MiB \
                     free (No space left on device); the sandbox runs on",
                    probe.display(),
                    need >> 20,
                    st >> 20
                ),
            });
        }
    }

    /// Checkpoints the sandbox into the store, then ends it, restores it in place, or (for
    /// forks) leaves that restore to [`Runtime::run_on`]: see [`End`]. Returns whether the
    /// restore was left.
    fn checkpoint_with(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        end: End,
    ) -> Result<(Checkpoint, bool)> {
        let ckpt = dir.sub("ckpt");
        let _ = std::fs::remove_dir_all(&ckpt);
        let _ = std::fs::remove_dir_all(dir.sub("ckpt-shared"));
        self.check_room_for_checkpoint(dir, rec)?;
        std::fs::create_dir_all(&ckpt).ctx("create", &ckpt)?;
        let t0 = Instant::now();
        let quiesced = self
            .connect_path(rec)
            .and_then(|mut s| Ok(kiln_agent::client::quiesce(&mut s)?));
        if let Err(e) = quiesced {
            self.undo_quiesce(dir, rec);
            return Err(e);
        }
        let t = Instant::now();
        let saved = dir
            .enter(rec, Phase::Checkpoint)
            .and_then(|()| limits::widen_for_checkpoint(&rec.id, rec.memory_mib))
            .and_then(|()| self.run_checkpoint(dir, rec));
        if let Err(e) = saved {
            // The sandbox usually still runs: its agent listens again.
            self.undo_quiesce(dir, rec);
            return Err(e);
        }
        tracing::info!(
            id = %rec.id,
            quiesce_ms = (t - t0).as_millis() as u64,
            checkpoint_ms = t.elapsed().as_millis() as u64,
            "runsc checkpoint"
        );
        let finished = self.finish_checkpoint(dir, rec, end);
        if finished.is_err() && rec.op.as_ref().is_some_and(|o| o.phase == Phase::Store) {
            // Not stored, but complete on disk: the sandbox goes on from it rather than be lost.
            if let Err(e) = self.restore_in_place(dir, rec) {
                tracing::warn!(id = %rec.id, "restoring after a failed store: {e}");
            }
        }
        if finished.is_err() {
            // Its room is what a full disk needs back.
            let _ = std::fs::remove_dir_all(dir.sub("ckpt"));
        }
        finished
    }

    /// A sandbox whose checkpoint did not complete, its agent perhaps quiesced: running on
    /// with its agent answering again, or lost (its processes ended).
    fn undo_quiesce(&self, dir: &SandboxDir, rec: &mut SandboxRecord) -> Recovered {
        let _ = std::fs::remove_dir_all(dir.sub("ckpt"));
        if let Some(cause) = self.exited(dir, rec) {
            return Recovered::Lost(cause);
        }
        // The backstop a checkpoint widened (see `limits::widen_for_checkpoint`).
        if let Err(e) = limits::narrow_after_checkpoint(&rec.id, rec.memory_mib) {
            tracing::warn!(id = %rec.id, "restoring the memory backstop: {e}");
        }
        // A listening agent is quiesced first: a quiesce sent by a caller that died may still
        // be on its way, and would otherwise come after the release.
        if let Ok(mut s) = self.connect_path(rec) {
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let _ = kiln_agent::client::quiesce(&mut s);
        }
        // The host file of its old socket outlives the listener, and the agent cannot bind a
        // new one over it (EPERM): it goes first, as before a restore.
        if let Ok(run) = hostfs::Dir::open(&dir.sub("run")) {
            let _ = run.remove("agent.sock");
        }
        match Self::release_agent(dir).and_then(|()| self.wait_agent(dir, rec)) {
            Ok(()) => Recovered::Running,
            Err(e) => {
                let _ = self.kill(dir, rec);
                Recovered::Lost(format!("its agent did not come back after a quiesce: {e}"))
            }
        }
    }

    /// A completed checkpoint whose caller died: stored for a pause, restored in place for
    /// a live snapshot (whose caller is gone: nobody wants the snapshot itself).
    fn keep_checkpoint(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        kind: OpKind,
    ) -> Recovered {
        let done = if kind.stops() {
            match self.finish_checkpoint(dir, rec, End::Stop) {
                Ok((cp, _)) => return Recovered::Checkpointed(cp),
                Err(e) => {
                    tracing::warn!(id = %rec.id, "storing an interrupted pause's checkpoint: {e}");
                    self.restore_in_place(dir, rec)
                }
            }
        } else {
            self.restore_in_place(dir, rec)
        };
        // Nobody is left to restore from them (a fork's caller died with it).
        let _ = std::fs::remove_dir_all(dir.sub("ckpt"));
        let _ = std::fs::remove_dir_all(dir.sub("ckpt-shared"));
        match done {
            Ok(()) => Recovered::Running,
            Err(e) => {
                let _ = self.kill(dir, rec);
                Recovered::Lost(format!("restoring its checkpoint: {e}"))
            }
        }
    }

    fn rootfs_of(rec: &SandboxRecord) -> Option<PathBuf> {
        rec.driver.get("rootfs")?.as_str().map(PathBuf::from)
    }
}

impl GvisorDriver {
    /// `runsc --version`'s output, remembered in the home per runsc binary (by inode, size
    /// and mtime: a new runsc is asked again): running it costs ~20 ms, on every command.
    fn runsc_version(&self) -> std::result::Result<String, String> {
        let runsc = &self.config.runsc;
        let not_found = |e: &dyn std::fmt::Display| {
            format!(
                "{} not found ({e}); install gVisor {RUNSC_MIN_RELEASE} or newer (Debian 12: \
                 runsc from bookworm-backports)",
                runsc.display()
            )
        };
        let key = std::fs::metadata(runsc).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            let mtime = (m.mtime() as i128) * 1_000_000_000 + m.mtime_nsec() as i128;
            self.home.join("runsc-version").join(format!(
                "{:x}-{:x}-{:x}-{mtime:x}",
                m.dev(),
                m.ino(),
                m.len()
            ))
        });
        if let Some(text) = key.as_ref().and_then(|k| std::fs::read_to_string(k).ok()) {
            return Ok(text);
        }
        let out = Command::new(runsc)
            .arg("--version")
            .output()
            .map_err(|e| not_found(&e))?;
        if !out.status.success() {
            return Err(format!("{} --version failed", runsc.display()));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let (Some(key), Some(_)) = (&key, runsc_release(&text)) {
            if let Some(dir) = key.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = crate::record::write_atomic(key, text.as_bytes(), false);
        }
        Ok(text)
    }
}

impl Runtime for GvisorDriver {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Gvisor
    }

    fn available(&self) -> std::result::Result<(), String> {
        // Asked on every lookup of the driver; runsc --version costs ~20 ms here.
        self.available
            .get_or_init(|| {
                let runsc = self.config.runsc.display();
                let text = self.runsc_version()?;
                match runsc_release(&text) {
                    Some(r) if r >= RUNSC_MIN_RELEASE => {}
                    Some(r) => {
                        return Err(format!(
                            "{runsc} is gVisor release {r}; kiln needs {RUNSC_MIN_RELEASE} or \
                             newer (systrap, uncompressed checkpoints, cgroups; Debian 12: runsc \
                             from bookworm-backports)"
                        ))
                    }
                    None => {
                        return Err(format!(
                            "{runsc} --version names no release kiln can read ({:?})",
                            text.lines().next().unwrap_or("")
                        ))
                    }
                }
                let platform = self.config.platform.as_ref().map_err(Clone::clone)?;
                if let Some(why) = platform.unsupported() {
                    return Err(why);
                }
                self.config.agent.as_ref().map(|_| ()).map_err(Clone::clone)
            })
            .clone()
    }

    fn start(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        image: &ImageRecord,
        net: &PendingNetwork,
    ) -> Result<()> {
        let rootfs = crate::rootfs::ensure(&self.store, &self.home, &rec.image, image)?;
        self.write_bundle(dir, rec, &rootfs, net)?;
        let bundle = dir.sub("bundle");
        let pid_file = dir.sub("sandbox.pid");
        let started = self
            .launch(
                dir,
                rec,
                "runsc run",
                &[
                    "run",
                    "--detach",
                    "--bundle",
                    path_str(&bundle)?,
                    "--pid-file",
                    path_str(&pid_file)?,
                    &rec.id,
                ],
                &|| Ok(()),
                net,
            )
            .and_then(|()| net.finish(rec))
            .and_then(|()| self.record_pid(dir, rec, &rootfs))
            .and_then(|()| self.wait_agent(dir, rec));
        if started.is_err() {
            let _ = self.kill(dir, rec);
        }
        started
    }

    fn checkpoint(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        stop: bool,
    ) -> Result<Checkpoint> {
        let end = if stop { End::Stop } else { End::RunOn };
        self.checkpoint_with(dir, rec, end).map(|(cp, _)| cp)
    }

    fn checkpoint_for_forks(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
    ) -> Result<(Checkpoint, bool)> {
        self.checkpoint_with(dir, rec, End::RunOnLater)
    }

    fn run_on(&self, dir: &SandboxDir, rec: &mut SandboxRecord) -> Result<()> {
        self.restore_in_place(dir, rec)?;
        dir.enter(rec, Phase::Saved)
    }

    fn restore(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        checkpoint: &Checkpoint,
        image: &ImageRecord,
        net: &PendingNetwork,
    ) -> Result<()> {
        let files = checkpoint_files(checkpoint)?;
        let had_net = checkpoint.state.get("network").and_then(|v| v.as_bool()) == Some(true);
        if had_net != (rec.net.is_some() || net.coming()) {
            return Err(Error::Invalid(format!(
                "the checkpoint was taken {} a network device and must be restored so",
                if had_net { "with" } else { "without" }
            )));
        }
        gvisor_disk::check_checkpoint(&checkpoint.state)?;
        let rootfs = crate::rootfs::ensure(&self.store, &self.home, &rec.image, image)?;
        self.write_bundle(dir, rec, &rootfs, net)?;
        let ckpt = dir.sub("ckpt");
        let _ = std::fs::remove_dir_all(&ckpt);
        std::fs::create_dir_all(&ckpt).ctx("create", &ckpt)?;
        let t = Instant::now();
        let made_in = checkpoint.state.get("sandbox").and_then(|v| v.as_str());
        let linked = made_in.is_some_and(|p| self.link_shared(p, &files, &ckpt));
        // The files come out of the store while the sandbox's disk, run/ and cgroups are
        // made; runsc starts once both are done.
        let id = rec.id.clone();
        let restored = std::thread::scope(|s| {
            let export = (!linked).then(|| s.spawn(|| self.export_files(&files, &ckpt)));
            let export = std::sync::Mutex::new(export);
            let ready = || {
                let handle = export.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(h) = handle {
                    h.join().map_err(|_| Error::Driver {
                        what: "exporting the checkpoint".into(),
                        detail: "the export thread panicked".into(),
                    })??;
                }
                tracing::info!(%id, linked, ms = t.elapsed().as_millis() as u64,
                               "checkpoint files ready");
                Ok(())
            };
            self.restore_local(dir, rec, &rootfs, &ckpt, &ready, net)
        });
        let _ = std::fs::remove_dir_all(&ckpt);
        if restored.is_err() {
            let _ = self.kill(dir, rec);
        }
        restored
    }

    fn kill(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<()> {
        // Every process of the container lives in its sandbox process, with the gofer beside
        // it; they, and any runsc command on it (a `run` or `restore` whose caller was killed,
        // a checkpoint and its watcher), carry this sandbox's own `--root`. Killing them is far
        // faster than `runsc kill` + `runsc delete` (about 2 s here, polling) and needs no
        // runsc state. Until none is left: a command may start another process meanwhile.
        // Their children too (the platform's stub processes carry no command line, hold the
        // sandbox's control socket and are reparented once the sandbox process is gone), so a
        // restore right after finds its socket name free.
        let root_flag = Self::root_flag(dir);
        let mut seen: Vec<Proc> = Vec::new();
        let t = Instant::now();
        loop {
            let mut left = processes_with(&[&root_flag]);
            for p in children_of(&left) {
                if !seen.iter().any(|s| s.pid == p) {
                    seen.extend(Proc::of(p));
                }
            }
            left.extend(seen.iter().filter(|p| p.alive()).map(|p| p.pid));
            if left.is_empty() || t.elapsed() > Duration::from_secs(10) {
                break;
            }
            for pid in left {
                // SAFETY: kill(2) of a process of this sandbox (its --root matched).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(dir.sub("launch.pid"));
        let _ = std::fs::remove_dir_all(dir.sub("runsc"));
        let run = dir.sub("run");
        // Every step runs whatever the others did; the first error is reported.
        let disk = gvisor_disk::detach(dir);
        let unmounted = hostfs::unmount_all(&run).ctx("unmount", &run);
        let cgroups = limits::remove(&rec.id);
        unmounted.and(disk).and(cgroups)
    }

    fn exited(&self, _dir: &SandboxDir, rec: &SandboxRecord) -> Option<String> {
        match live_pid(rec) {
            Some(_) => None,
            // The host's backstop fired (the agent's OOM killer inside did not keep up).
            None if limits::oom_killed(&rec.id) => Some(format!(
                "out of memory (limit {} MiB): the host ended the gVisor sandbox at {} MiB",
                rec.memory_mib,
                limits::backstop_bytes(rec.memory_mib) >> 20
            )),
            None => Some("the gVisor sandbox process is gone".into()),
        }
    }

    /// From the sandbox's host cgroups (CPU, memory) and its disk.
    fn usage(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Option<Usage> {
        live_pid(rec)?;
        let (mem_used, mem_cache) = limits::memory_split(&rec.id)?;
        let (disk_used, disk_total) = gvisor_disk::space(dir).unwrap_or_default();
        Some(Usage {
            cpu_ns: limits::cpu_usage_ns(&rec.id)?,
            mem_used,
            mem_cache,
            disk_used,
            disk_total,
        })
    }

    fn connect(&self, _dir: &SandboxDir, rec: &SandboxRecord) -> Result<UnixStream> {
        self.connect_path(rec)
    }

    fn checkpoint_done(&self, dir: &SandboxDir) {
        let _ = std::fs::remove_dir_all(dir.sub("ckpt-shared"));
    }

    fn image_tree(&self, rec: &SandboxRecord) -> Option<PathBuf> {
        Self::rootfs_of(rec)
    }

    fn recover(&self, dir: &SandboxDir, rec: &mut SandboxRecord, op: &Op) -> Result<Recovered> {
        Ok(match (op.kind, op.phase) {
            // A restore (resume) is undone: its half-made container goes; the record still
            // names the snapshot it came from.
            (OpKind::Resume | OpKind::Kill, _) | (_, Phase::Kill) => {
                self.kill(dir, rec)?;
                let _ = std::fs::remove_dir_all(dir.sub("ckpt"));
                Recovered::Stopped
            }
            // At most a quiesced agent: it waits for its release.
            (_, Phase::Prepare) => self.undo_quiesce(dir, rec),
            (kind, Phase::Checkpoint) => match self.await_checkpoint(dir, op) {
                None => Recovered::Pending,
                Some(true) => self.keep_checkpoint(dir, rec, kind),
                // A sandbox whose checkpoint failed usually runs on; one whose outcome is
                // unknown and that stopped is tried from what was written.
                Some(false) if self.exited(dir, rec).is_none() => self.undo_quiesce(dir, rec),
                Some(false) => self.keep_checkpoint(dir, rec, OpKind::Snapshot),
            },
            (kind, Phase::Store | Phase::Restore) => self.keep_checkpoint(dir, rec, kind),
            // Files copied out of a running sandbox (kiln's step, not runsc's): untouched.
            (_, Phase::Capture) => match self.exited(dir, rec) {
                None => Recovered::Running,
                Some(cause) => Recovered::Lost(cause),
            },
            (kind, Phase::Saved) => match &op.checkpoint {
                Some(cp) if kind.stops() => {
                    self.kill(dir, rec)?;
                    Recovered::Checkpointed(cp.clone())
                }
                _ => match self.exited(dir, rec) {
                    None => Recovered::Running,
                    Some(cause) => Recovered::Lost(cause),
                },
            },
        })
    }
}

/// Live processes whose parent is one of `pids`.
fn children_of(pids: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    if pids.is_empty() {
        return out;
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid.is_some_and(|p| pids.contains(&p)) {
            out.push(pid);
        }
    }
    out
}

/// Whether `dir` has no entries (or does not exist).
fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// The files of a checkpoint of this driver's format, by name; a checkpoint of runsc
/// 20221219's is refused with the reason.
fn checkpoint_files(cp: &Checkpoint) -> Result<BTreeMap<String, BlobId>> {
    match cp.state.get("format").and_then(|v| v.as_str()) {
        Some(FORMAT) => {}
        Some(OLD_FORMAT) => {
            return Err(Error::Invalid(
                "this checkpoint was made by runsc 20221219 (one compressed state file), whose \
                 images runsc 20240729 cannot restore; start a new sandbox from its image instead"
                    .into(),
            ))
        }
        other => {
            return Err(Error::Invalid(format!(
                "unknown gVisor checkpoint format {other:?} (this kiln reads {FORMAT:?})"
            )))
        }
    }
    let files: BTreeMap<String, BlobId> = cp
        .state
        .get("files")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| Error::Invalid("the checkpoint lists no files".into()))?;
    // Names become paths in ckpt/: plain file names only (a record may come from a remote).
    let plain = |n: &str| {
        !n.is_empty()
            && !n.starts_with('.')
            && !OWN_FILES.contains(&n)
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if !files.contains_key("checkpoint.img") || !files.keys().all(|n| plain(n)) {
        return Err(Error::Invalid(format!(
            "the checkpoint's files are not a runsc image: {:?}",
            files.keys().collect::<Vec<_>>()
        )));
    }
    if cp.blobs.len() != files.len() || !files.values().all(|b| cp.blobs.contains(b)) {
        return Err(Error::Invalid(
            "the checkpoint's files and blobs disagree".into(),
        ));
    }
    Ok(files)
}

/// What identifies a checkpoint's files on disk: the hash of their names and blobs.
fn files_key(files: &BTreeMap<String, BlobId>) -> String {
    let bytes = serde_json::to_vec(files).expect("ids serialize");
    blake3::hash(&bytes).to_hex().to_string()
}

/// Bytes available to an unprivileged writer on the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain data, filled by the call for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// What the watcher of the last `runsc checkpoint` recorded as its exit status.
fn checkpoint_status(dir: &SandboxDir) -> Option<i32> {
    std::fs::read_to_string(dir.sub("ckpt").join("status"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a live (not zombie) runsc process.
fn is_runsc(pid: u32) -> bool {
    process_start_time(pid).is_some()
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("runsc"))
}

/// The sandbox process's pid if it still runs (and is the same process: same start time).
fn live_pid(rec: &SandboxRecord) -> Option<u32> {
    let pid = rec.driver.get("pid")?.as_u64()? as u32;
    let want = rec.driver.get("start_time")?.as_u64();
    let now = process_start_time(pid)?;
    (want == Some(now)).then_some(pid)
}

/// A connection to the agent's socket at `sock` (in the sandbox-writable `run/`), which a
/// symlink or a swapped name there cannot redirect to any other socket.
fn connect_agent(sock: &Path) -> std::io::Result<UnixStream> {
    let (Some(dir), Some(name)) = (sock.parent(), sock.file_name()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a socket path",
        ));
    };
    hostfs::Dir::open(dir)?.connect(Path::new(name))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: getrandom writes at most N bytes into our buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), N, 0) };
    b
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("path {} is not UTF-8", p.display())))
}

fn first_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).take(n).collect();
    if lines.is_empty() {
        "(no output)".into()
    } else {
        lines.join("\n")
    }
}

/// runsc (20221219 and 20240729 alike) refuses `--network=sandbox` in any namespace where
/// /proc/sys/net/core/rmem_default exists, taking that for the root namespace; kernels since
/// 6.x show it in every namespace. runsc is started in a mount namespace of its own where
/// /proc/sys is a tmpfs holding bind mounts of every entry but `net` (its children, the gofer
/// and the sandbox, mount their own /proc).
struct ProcSysMask {
    targets: Vec<std::ffi::CString>,
    sources: Vec<std::ffi::CString>,
}

/// The child's descriptor of the real /proc/sys while it is masked (opened after unshare: a
/// bind source must belong to the new mount namespace).
const SYS_FD: i32 = 987;

impl ProcSysMask {
    fn new() -> Result<ProcSysMask> {
        let p = Path::new("/proc/sys");
        let (mut targets, mut sources) = (Vec::new(), Vec::new());
        for e in std::fs::read_dir(p).ctx("list", p)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "net" {
                continue;
            }
            let c = |s: String| std::ffi::CString::new(s).expect("no NUL in /proc/sys names");
            targets.push(c(format!("/proc/sys/{name}")));
            sources.push(c(format!("/proc/self/fd/{SYS_FD}/{name}")));
        }
        Ok(ProcSysMask { targets, sources })
    }

    fn apply(&self, cmd: &mut Command) {
        let targets = self.targets.clone();
        let sources = self.sources.clone();
        // SAFETY: only async-signal-safe calls (unshare, mount, mkdir) on data prepared before
        // the fork; the child is about to exec runsc.
        unsafe {
            cmd.pre_exec(move || {
                let err = || Err(std::io::Error::last_os_error());
                let none = std::ptr::null();
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return err();
                }
                if libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    none.cast(),
                ) != 0
                {
                    return err();
                }
                let fd = libc::open(c"/proc/sys".as_ptr(), libc::O_PATH | libc::O_DIRECTORY);
                if fd < 0 || libc::dup2(fd, SYS_FD) < 0 {
                    return err();
                }
                libc::close(fd);
                if libc::mount(
                    c"kiln-sysmask".as_ptr(),
                    c"/proc/sys".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    c"size=64k".as_ptr().cast(),
                ) != 0
                {
                    return err();
                }
                for (t, s) in targets.iter().zip(&sources) {
                    libc::mkdir(t.as_ptr(), 0o555);
                    if libc::mount(
                        s.as_ptr(),
                        t.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REC,
                        none.cast(),
                    ) != 0
                    {
                        return err();
                    }
                }
                libc::close(SYS_FD);
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runsc_release_reads_debian_and_upstream_versions() {
        assert_eq!(
            runsc_release("runsc version 0.0~20240729.0\nspec: 1.0.2-dev\n"),
            Some(20240729)
        );
        assert_eq!(
            runsc_release("runsc version release-20221219.0\n"),
            Some(20221219)
        );
        assert_eq!(runsc_release("runsc version VERSION_MISSING\n"), None);
        assert_eq!(runsc_release(""), None);
    }

    #[test]
    fn platforms_parse_and_unknown_ones_are_refused() {
        assert_eq!(Platform::parse("systrap"), Ok(Platform::Systrap));
        assert_eq!(Platform::parse("kvm"), Ok(Platform::Kvm));
        assert!(Platform::parse("KVM")
            .unwrap_err()
            .contains("systrap, kvm or ptrace"));
    }
}
