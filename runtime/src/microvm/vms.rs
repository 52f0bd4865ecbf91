//! VMs on this host: one VM = one VMM process (the `kiln` binary running `kiln vm run` or
//! `kiln snapshot restore` in the foreground, or a VMM helper from its `helper.json` spec, see
//! [`crate::helpers`]), with a directory holding its control socket
//! (JSON lines, see `kiln_vmm::control`), serial log, `vm.json` (who it is), `exit.json` (how it
//! ended), `vmm.log` (the detached process's own output) and its disk overlays. The CLI's VMs
//! live in `KILN_HOME/vms/ID`; a sandbox's VM in its sandbox directory (`vm/`).

use super::error::{Context, Error, Result};
use crate::helpers::{self, HelperSpec};
use kiln_vmm::control::{self, ControlContext, Request};
use kiln_vmm::devices::virtio::block::engine::FileEngine;
use kiln_vmm::devices::virtio::block::{Block, DiskBackend};
pub use kiln_vmm::devices::virtio::net::{MacAddr, NicSpec};
use kiln_vmm::{ExitReason, GuestMemorySource, Vm, VmConfig};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a detached VMM may take to come up.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// `KILN_HOME/vms`: where the CLI's VMs live.
pub fn vms_dir(home: &Path) -> PathBuf {
    home.join("vms")
}

/// VM ids: `[a-zA-Z0-9_-]+`.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::Invalid(format!("invalid VM id {id:?}")));
    }
    Ok(())
}

/// The directory of the CLI's VM `id` (which must exist).
pub fn vm_dir(home: &Path, id: &str) -> Result<PathBuf> {
    check_id(id)?;
    let d = vms_dir(home).join(id);
    if !d.is_dir() {
        return Err(Error::NoVm(id.to_string()));
    }
    Ok(d)
}

/// The control socket of the VM in `dir`.
pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// Whether the VM in `dir` runs (its VMM serves its control socket).
pub fn is_running(dir: &Path) -> bool {
    control_socket(dir).exists()
}

/// A fresh VM id: 8 hex digits from /dev/urandom (time and pid if that cannot be read).
pub fn new_vm_id() -> String {
    let mut b = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.subsec_nanos() ^ std::process::id()).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How the guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Entry {
    /// CPL 0, Linux boot protocol.
    #[default]
    Kernel,
    /// CPL 3 + IOPL 3, for freestanding guests such as kiln's test guest (native on PVM hosts).
    User,
}

/// I/O engine for raw-file disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DiskEngine {
    #[default]
    Uring,
    Sync,
}

/// What `kiln vm run` boots.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunOptions {
    pub id: String,
    /// The VM's directory (`vms_dir(home)/id` for the CLI's VMs).
    pub dir: PathBuf,
    /// ELF vmlinux (64-bit) or bzImage.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Raw image file paths, or blobs (name, id, prefix) booted through a store overlay.
    pub disks: Vec<String>,
    /// Disks at or after this index are attached read-only (`0`: all of them; `usize::MAX`:
    /// none).
    pub read_only_from: usize,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Kernel command line (virtio_mmio.device= entries are appended).
    pub cmdline: String,
    /// Host Unix socket for virtio-vsock (Firecracker convention).
    pub vsock_uds: Option<PathBuf>,
    pub vsock_cid: u64,
    /// One virtio-net NIC backed by a TAP (e.g. in the sandbox's network namespace: the VMM
    /// attaches to it from there, the guest sees only the NIC). See [`NicSpec`].
    pub net: Option<NicSpec>,
    pub disk_engine: DiskEngine,
    /// Commit overlay disks to new blobs when the VM ends.
    pub commit: bool,
    pub entry: Entry,
}

impl RunOptions {
    /// Defaults of `kiln vm run` for VM `id` in `dir` booting `kernel`.
    pub fn new(id: impl Into<String>, dir: impl Into<PathBuf>, kernel: impl Into<PathBuf>) -> Self {
        RunOptions {
            id: id.into(),
            dir: dir.into(),
            kernel: kernel.into(),
            initrd: None,
            disks: Vec::new(),
            read_only_from: usize::MAX,
            mem_mib: 128,
            vcpus: 1,
            cmdline: "console=ttyS0 reboot=k panic=1".into(),
            vsock_uds: None,
            vsock_cid: 3,
            net: None,
            disk_engine: DiskEngine::Uring,
            commit: false,
            entry: Entry::Kernel,
        }
    }

    /// Checks what can be checked before anything runs (also before detaching).
    pub fn check(&self) -> Result<()> {
        check_id(&self.id)?;
        if !self.kernel.is_file() {
            return Err(Error::Invalid(format!(
                "kernel {} does not exist",
                self.kernel.display()
            )));
        }
        let max = kiln_vmm::memory::MAX_MEM_BYTES >> 20;
        if self.mem_mib == 0 || self.mem_mib > max {
            return Err(Error::Invalid(format!(
                "--mem {} MiB is out of range (1..={max} MiB)",
                self.mem_mib
            )));
        }
        Ok(())
    }

    /// Whether a disk names a store blob (then the caller passes a store to [`run_foreground`]).
    pub fn needs_store(&self) -> bool {
        self.disks.iter().any(|d| !Path::new(d).exists())
    }
}

/// What a VM's directory says about it (vm.json).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmMeta {
    pub id: String,
    pub pid: u32,
    /// The kernel path, or `snapshot:<id>` for a restored VM.
    pub kernel: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub disks: Vec<String>,
    pub started_unix: u64,
    /// The snapshot a restored VM came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// How a VM ended (exit.json).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmExit {
    pub reason: ExitReason,
    pub committed: Vec<Option<String>>,
}

pub fn read_meta(dir: &Path) -> Option<VmMeta> {
    std::fs::read(dir.join("vm.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

pub fn read_exit(dir: &Path) -> Option<VmExit> {
    std::fs::read(dir.join("exit.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

pub(crate) fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("serializes"))
        .map_err(Error::io("writing", path))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the VM in this process until it ends (`kiln vm run` without `-d`). `store` is needed
/// when a disk is a blob ([`RunOptions::needs_store`]). Serial output goes to `serial.log` and,
/// with `serial_stdout`, to stdout too. The exit is also written to exit.json; a VM that failed
/// is `Ok` here with `ExitReason::Error` (the caller reports the committed disks first).
pub fn run_foreground(
    o: &RunOptions,
    store: Option<&kiln_blockstore::Store>,
    serial_stdout: bool,
) -> Result<VmExit> {
    o.check()?;
    let dir = &o.dir;
    if is_running(dir) {
        return Err(Error::Invalid(format!(
            "VM {} already exists and is running",
            o.id
        )));
    }
    std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    let _ = std::fs::remove_file(dir.join("exit.json"));
    let config = VmConfig {
        mem_bytes: o.mem_mib << 20,
        vcpus: o.vcpus,
        kernel: Some(o.kernel.clone()),
        initrd: o.initrd.clone(),
        cmdline: o.cmdline.clone(),
        serial_log: Some(dir.join("serial.log")),
        serial_stdout,
        // kiln VMs are there to be snapshotted: no log switch in the first snapshot's pause.
        track_dirty_pages: true,
    };
    let _ = std::fs::remove_file(dir.join("serial.log"));
    let mut vm = Vm::new(config, GuestMemorySource::Anonymous)?;
    let mut overlays = Vec::new();
    for (i, d) in o.disks.iter().enumerate() {
        let (backend, overlay) = disk_backend(store, d, i, dir, o.disk_engine)?;
        let blk = Block::new(&format!("kiln{i}"), backend, i >= o.read_only_from)
            .map_err(|e| Error::Failed(format!("disk {d}: {e}")))?;
        vm.add_virtio_device(Box::new(blk))?;
        overlays.push(overlay);
    }
    if let Some(uds) = &o.vsock_uds {
        let v = kiln_vmm::devices::virtio::vsock::Vsock::new(o.vsock_cid, uds)
            .map_err(|e| Error::Failed(format!("vsock on {}: {e}", uds.display())))?;
        vm.add_virtio_device(Box::new(v))?;
    }
    if let Some(n) = &o.net {
        let nic = kiln_vmm::devices::virtio::net::Net::new(n)
            .map_err(|e| Error::Failed(format!("network interface {}: {e}", n.arg())))?;
        vm.add_virtio_device(Box::new(nic))?;
    }
    vm.set_entry_mode(match o.entry {
        Entry::Kernel => kiln_vmm::EntryMode::Kernel,
        Entry::User => kiln_vmm::EntryMode::User,
    });
    vm.boot()?;
    let vm = Arc::new(vm);
    let meta = VmMeta {
        id: o.id.clone(),
        pid: std::process::id(),
        kernel: std::path::absolute(&o.kernel).map_err(Error::io("resolving", &o.kernel))?,
        mem_mib: o.mem_mib,
        vcpus: o.vcpus,
        disks: o.disks.clone(),
        started_unix: unix_now(),
        snapshot: None,
    };
    write_json(&dir.join("vm.json"), &meta)?;
    let ctx = Arc::new(ControlContext {
        vm: vm.clone(),
        overlays: overlays.clone(),
        id: o.id.clone(),
        tracking: Default::default(),
    });
    let sock = control_socket(dir);
    control::serve(&sock, ctx).map_err(Error::io("serving the control socket", &sock))?;
    vm.start()?;
    let reason = vm.wait();
    let _ = std::fs::remove_file(&sock);

    let mut committed = Vec::new();
    for o2 in &overlays {
        committed.push(match o2 {
            Some(ov) if o.commit => Some(ov.flush().and_then(|_| ov.commit())?.to_hex()),
            Some(ov) => {
                ov.flush()?;
                None
            }
            None => None,
        });
    }
    let exit = VmExit { reason, committed };
    write_json(&dir.join("exit.json"), &exit)?;
    Ok(exit)
}

type Overlay = Option<Arc<kiln_blockstore::Overlay>>;

fn disk_backend(
    store: Option<&kiln_blockstore::Store>,
    arg: &str,
    index: usize,
    dir: &Path,
    engine: DiskEngine,
) -> Result<(DiskBackend, Overlay)> {
    let p = Path::new(arg);
    if p.exists() {
        if !p.is_file() {
            return Err(Error::Invalid(format!("disk {arg} is not a regular file")));
        }
        let engine = match engine {
            DiskEngine::Uring => FileEngine::Uring,
            DiskEngine::Sync => FileEngine::Sync,
        };
        return Ok((
            DiskBackend::File {
                path: p.to_path_buf(),
                engine,
                direct: true,
            },
            None,
        ));
    }
    let s = store.ok_or_else(|| {
        Error::Invalid(format!(
            "disk {arg:?} is not a file (and no store was given)"
        ))
    })?;
    let blob = s
        .resolve(arg)
        .with_context(|| format!("disk {arg:?} is neither a file nor a blob in the store"))?;
    let size = s.manifest(&blob)?.size;
    let odir = dir.join(format!("disk{index}"));
    if odir.exists() {
        std::fs::remove_dir_all(&odir).map_err(Error::io("removing old", &odir))?;
    }
    let overlay = Arc::new(
        s.create_overlay(Some(&blob), size, &odir)
            .with_context(|| format!("overlay for disk {arg}"))?,
    );
    Ok((DiskBackend::Overlay(overlay.clone()), Some(overlay)))
}

/// Where a detached VMM process is started from: the executable (the `kiln` binary: the CLI
/// passes `std::env::current_exe()`) and the kiln home it opens the store (and remotes) of.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub exe: PathBuf,
    pub home: PathBuf,
}

/// A detached VMM process that came up.
#[derive(Debug)]
pub struct Launched {
    pub id: String,
    pub dir: PathBuf,
    /// The process (already reparented once the caller exits; a long-lived caller should
    /// [`Launched::reap_in_background`] so it leaves no zombie).
    pub child: Child,
    /// The VM ran and already ended before it was seen running (a short-lived guest).
    pub ended: bool,
}

impl Launched {
    /// Waits for the process in a background thread, so its exit leaves no zombie.
    pub fn reap_in_background(self) {
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }
}

impl Launcher {
    /// Writes `spec` into `dir` and returns the helper command over it, its output going to
    /// `dir/log_name`.
    fn helper(&self, dir: &Path, log_name: &str, spec: &HelperSpec) -> Result<Command> {
        std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
        let dir = &std::path::absolute(dir).map_err(Error::io("resolving", dir))?;
        helpers::write_spec(dir, spec).map_err(|e| Error::Failed(e.to_string()))?;
        let log_path = dir.join(log_name);
        let log = std::fs::File::create(&log_path).map_err(Error::io("creating", &log_path))?;
        let log2 = log
            .try_clone()
            .map_err(Error::io("duplicating", &log_path))?;
        let mut cmd = helpers::command(&self.exe, dir);
        cmd.stdin(Stdio::null()).stdout(log2).stderr(log);
        Ok(cmd)
    }

    /// Starts a VMM helper running `o` as its own process (own session, survives the caller) and
    /// returns once it serves its control socket (or already ended).
    pub fn run(&self, o: &RunOptions) -> Result<Launched> {
        o.check()?;
        let abs = |p: &Path| std::path::absolute(p).map_err(Error::io("resolving", p));
        // Paths absolute (as the command line had them); disks that are no file stay blob
        // names.
        let mut options = o.clone();
        options.dir = abs(&o.dir)?;
        options.kernel = abs(&o.kernel)?;
        options.initrd = o.initrd.as_deref().map(abs).transpose()?;
        for d in &mut options.disks {
            let p = Path::new(d.as_str());
            if p.exists() {
                *d = abs(p)?.to_string_lossy().into_owned();
            }
        }
        options.vsock_uds = o.vsock_uds.as_deref().map(abs).transpose()?;
        let spec = HelperSpec::Vm {
            home: self.home.clone(),
            options,
        };
        let mut cmd = self.helper(&o.dir, "vmm.log", &spec)?;
        // SAFETY: setsid in the child before exec only changes its session; no allocation or
        // locks.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(Error::io("starting the VMM process", &self.exe))?;
        let sock = control_socket(&o.dir);
        let t = Instant::now();
        loop {
            if sock.exists()
                && control::call(&sock, &Request::Status, Duration::from_secs(5)).is_ok()
            {
                return Ok(Launched {
                    id: o.id.clone(),
                    dir: o.dir.clone(),
                    child,
                    ended: false,
                });
            }
            if let Some(status) = child
                .try_wait()
                .map_err(Error::io("waiting for", &self.exe))?
            {
                if o.dir.join("exit.json").exists() {
                    // It ran and already ended (a short-lived guest): still a success.
                    return Ok(Launched {
                        id: o.id.clone(),
                        dir: o.dir.clone(),
                        child,
                        ended: true,
                    });
                }
                let log = std::fs::read_to_string(o.dir.join("vmm.log")).unwrap_or_default();
                return Err(Error::Failed(format!(
                    "VM {} failed to start ({status}):\n{}",
                    o.id,
                    log.trim()
                )));
            }
            if t.elapsed() > LAUNCH_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Failed(format!(
                    "VM {} did not come up within {} s",
                    o.id,
                    LAUNCH_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Starts a VMM helper restoring `o` as its own process group and returns once it
    /// serves its control socket.
    pub fn restore(&self, o: &super::vm_snapshots::RestoreOptions) -> Result<Launched> {
        check_id(&o.id)?;
        let abs = |p: &Path| std::path::absolute(p).map_err(Error::io("resolving", p));
        let mut options = o.clone();
        options.dir = abs(&o.dir)?;
        options.vsock_uds = o.vsock_uds.as_deref().map(abs).transpose()?;
        options.memory_file = o.memory_file.as_deref().map(abs).transpose()?;
        // A restored NIC keeps the MAC saved in the device state: only its TAP is given.
        if let Some(n) = &mut options.net {
            n.mac = None;
        }
        let spec = HelperSpec::VmRestore {
            home: self.home.clone(),
            options,
        };
        let mut cmd = self.helper(&o.dir, "vmm.log", &spec)?;
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(Error::io("starting the VMM process", &self.exe))?;
        let t0 = Instant::now();
        while !control_socket(&o.dir).exists() {
            if let Some(st) = child
                .try_wait()
                .map_err(Error::io("waiting for", &self.exe))?
            {
                let log = std::fs::read_to_string(o.dir.join("vmm.log")).unwrap_or_default();
                return Err(Error::Failed(format!(
                    "VM {} exited during restore ({st}):\n{log}",
                    o.id
                )));
            }
            if t0.elapsed() > LAUNCH_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Failed(format!(
                    "VM {} did not come up within {} s (see {})",
                    o.id,
                    LAUNCH_TIMEOUT.as_secs(),
                    o.dir.join("vmm.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Launched {
            id: o.id.clone(),
            dir: o.dir.clone(),
            child,
            ended: false,
        })
    }
}

/// One control request to the VM in `dir` (named `id` in errors).
pub fn call(dir: &Path, id: &str, req: &Request, timeout: Duration) -> Result<serde_json::Value> {
    let sock = control_socket(dir);
    if !sock.exists() {
        return Err(Error::NotRunning(id.to_string()));
    }
    control::call(&sock, req, timeout).map_err(|e| Error::Control {
        vm: id.to_string(),
        detail: e.to_string(),
    })
}

/// Stops the VM in `dir` and waits (up to `timeout`) until its VMM has let go of its socket.
pub fn stop(dir: &Path, id: &str, timeout: Duration) -> Result<()> {
    call(dir, id, &Request::Stop, Duration::from_secs(30))?;
    let t = Instant::now();
    while is_running(dir) {
        if t.elapsed() > timeout {
            return Err(Error::Failed(format!(
                "VM {id} did not stop within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Commits disk `disk` of a running VM into a new blob (the VM pauses meanwhile).
pub fn commit_disk(dir: &Path, id: &str, disk: usize) -> Result<kiln_blockstore::BlobId> {
    let v = call(
        dir,
        id,
        &Request::CommitDisk { disk },
        Duration::from_secs(600),
    )?;
    let blob = v["blob"].as_str().unwrap_or_default();
    blob.parse().map_err(|e| {
        Error::Failed(format!(
            "VM {id}: commit named no valid blob {blob:?}: {e:?}"
        ))
    })
}

/// A row of `kiln vm ls`.
#[derive(Clone, Debug, Serialize)]
pub struct VmEntry {
    pub id: String,
    pub state: String,
    pub pid: Option<u32>,
    pub mem_mib: Option<u64>,
    pub vcpus: Option<u8>,
    pub kernel: Option<PathBuf>,
    pub disks: Vec<String>,
}

/// The state of the VM in `dir`: its VMM's answer, or how it ended.
pub fn state(dir: &Path) -> String {
    let sock = control_socket(dir);
    if sock.exists() {
        match control::call(&sock, &Request::Status, Duration::from_secs(2)) {
            Ok(v) => match &v["state"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            Err(_) => "unreachable".into(),
        }
    } else if let Some(x) = read_exit(dir) {
        match x.reason {
            ExitReason::Error(e) => format!("failed: {e}"),
            r => format!("exited ({r:?})").to_lowercase(),
        }
    } else {
        "dead".into()
    }
}

/// The CLI's VMs, sorted by id.
pub fn list(home: &Path) -> Vec<VmEntry> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(vms_dir(home)) {
        Ok(rd) => rd.flatten().collect::<Vec<_>>(),
        Err(_) => Vec::new(),
    };
    for e in rd {
        let dir = e.path();
        let meta = read_meta(&dir);
        out.push(VmEntry {
            id: e.file_name().to_string_lossy().to_string(),
            state: state(&dir),
            pid: meta.as_ref().map(|m| m.pid),
            mem_mib: meta.as_ref().map(|m| m.mem_mib),
            vcpus: meta.as_ref().map(|m| m.vcpus),
            kernel: meta.as_ref().map(|m| m.kernel.clone()),
            disks: meta.map(|m| m.disks).unwrap_or_default(),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Copies the VM's serial output to `out`; with `follow`, keeps copying until the VM ends.
pub fn logs(dir: &Path, follow: bool, out: &mut dyn Write) -> Result<()> {
    let path = dir.join("serial.log");
    let mut f = loop {
        match std::fs::File::open(&path) {
            Ok(f) => break f,
            Err(_) if follow && is_running(dir) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(Error::io("opening", &path)(e)),
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    let rd = Error::io("reading", &path);
    let res = (|| -> std::io::Result<()> {
        loop {
            f.seek(SeekFrom::Start(pos))?;
            let n = f.read(&mut buf)?;
            if n > 0 {
                out.write_all(&buf[..n])?;
                out.flush()?;
                pos += n as u64;
                continue;
            }
            if !follow || !is_running(dir) {
                // One last read after the VM ended, then stop.
                if follow {
                    let n = f.read(&mut buf)?;
                    out.write_all(&buf[..n])?;
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    res.map_err(rd)
}

/// Removes the directories of the CLI's VMs that have ended; returns their ids.
pub fn prune(home: &Path) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    let Ok(rd) = std::fs::read_dir(vms_dir(home)) else {
        return Ok(gone);
    };
    for e in rd.flatten() {
        let dir = e.path();
        if is_running(&dir) {
            continue;
        }
        std::fs::remove_dir_all(&dir).map_err(Error::io("removing", &dir))?;
        gone.push(e.file_name().to_string_lossy().into_owned());
    }
    Ok(gone)
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name's closing parenthesis.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}
