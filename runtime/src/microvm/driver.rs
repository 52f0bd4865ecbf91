//! The `microvm` driver: each sandbox is a VM of kiln's own VMM, in its own detached process
//! (the `kiln` binary), with its files in the sandbox directory's `vm/` (see [`super::vms`]).
//!
//! - Root disk: the image's disk blob through a store overlay (the image is never modified).
//! - The agent (PID 1 of a Linux guest) is brought in as an initrd holding it as `/init`, with
//!   `kiln.root=/dev/vda` on the command line; it listens on vsock port
//!   [`AGENT_PORT`](kiln_agent::protocol::AGENT_PORT), whose host side is the Unix socket
//!   `vm/vsock.sock` (`rec.agent`).
//! - Readiness: a `Health` request on that port answered by an `Ok` frame. kiln's freestanding
//!   test guest ([`MicrovmDriver::with_test_guest`]) answers it too, so the whole lifecycle runs
//!   on hosts where no Linux guest boots (PVM).
//! - Checkpoints are kiln snapshots ([`super::vm_snapshots::create`]): full the first time, a diff
//!   against the snapshot a VM was restored from (or last checkpointed as) after that; restores
//!   page memory in lazily (userfaultfd).

use super::error::Error as MError;
use super::vm_snapshots::{self, CreateOptions, RestoreOptions};
use super::vms::{self, Entry, Launcher, NicSpec, RunOptions};
use crate::record::{Op, OpKind, Phase};
use crate::{
    Checkpoint, Error, PendingNetwork, Recovered, Result, RuntimeKind, SandboxDir, SandboxRecord,
};
use kiln_agent::protocol::AGENT_PORT;
use kiln_blockstore::{BlobId, Store};
use kiln_imagebuilder::image::ImageRecord;
use kiln_vmm::devices::virtio::vsock::connect_port;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the VMs boot.
#[derive(Clone, Debug)]
pub enum Guest {
    /// A Linux kernel (`None`: found at [`MicrovmDriver::available`] / start time) with the
    /// kiln agent as init.
    Linux { kernel: Option<PathBuf> },
    /// kiln's freestanding test guest ELF (`kiln_testguest::elf_path()`): entered at CPL 3, no
    /// root file system use, answers the agent's `Health` on port 10000.
    TestGuest { elf: PathBuf },
}

/// Sandboxes as microVMs of kiln's VMM.
pub struct MicrovmDriver {
    store: Store,
    launcher: Launcher,
    guest: Guest,
    /// How long the guest may take to answer on the agent port after start or restore.
    pub ready_timeout: Duration,
}

/// The driver's part of the sandbox record (`rec.driver`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct DriverState {
    vm_id: String,
    vm_dir: PathBuf,
    pid: u32,
    vsock: PathBuf,
}

/// What a checkpoint's `state` holds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointState {
    driver: String,
    snapshot: BlobId,
    parent: Option<BlobId>,
    mem_mib: u64,
    vcpus: u8,
    diff: bool,
}

const LOG_TAIL: usize = 4096;

fn drv(what: &str) -> impl FnOnce(MError) -> Error + '_ {
    move |e| match e {
        MError::Invalid(s) => Error::Invalid(s),
        e => Error::Driver {
            what: format!("microvm {what}"),
            detail: e.to_string(),
        },
    }
}

/// The kiln home the store lives in (`HOME/store`), which the VMM processes open again.
fn home_of(store: &Store) -> PathBuf {
    let d = store.dir();
    match (d.file_name(), d.parent()) {
        (Some(n), Some(p)) if n == "store" => p.to_path_buf(),
        _ => d.to_path_buf(),
    }
}

/// The guest kernel: `explicit`, else `KILN_GUEST_KERNEL`, else the cache of
/// `scripts/linux-guest/build-kernel` (`KILN_KERNEL_CACHE`, default `~/.cache/kiln/kernels/*/vmlinux`).
pub fn find_kernel(explicit: Option<&Path>) -> std::result::Result<PathBuf, String> {
    use kiln_vmm::host::KernelNotFound;
    kiln_vmm::host::guest_kernel(explicit).map_err(|e| match e {
        KernelNotFound::Missing { .. } => e.to_string(),
        KernelNotFound::NoneCached { cache } => format!(
            "no guest kernel: pass --kernel, set KILN_GUEST_KERNEL, or run \
                 scripts/linux-guest/build-kernel (it caches one in {})",
            cache.display()
        ),
    })
}

/// Why this host's KVM cannot run Linux guests, if it cannot.
pub fn kvm_unsupported(need_hardware_virt: bool) -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm is not usable: {e}"));
    }
    if need_hardware_virt && kiln_vmm::host::kvm_is_pvm() {
        return Some("/dev/kvm is PVM; stock Linux guests cannot boot on PVM".into());
    }
    None
}

/// The static kiln-agent for Linux guests (see [`kiln_vmm::host::static_agent`]), found
/// from `exe`, the `kiln` binary the VMM processes run.
fn find_agent(exe: &Path) -> std::result::Result<PathBuf, String> {
    kiln_vmm::host::static_agent(exe)
}

/// A newc cpio archive holding `init` (the agent), for the guest's initramfs.
fn write_agent_initrd(agent: &Path, out: &Path) -> std::io::Result<()> {
    fn entry(buf: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let namesize = name.len() + 1;
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
        );
        buf.extend_from_slice(hdr.as_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        while !buf.len().is_multiple_of(4) {
            buf.push(0);
        }
        buf.extend_from_slice(data);
        while !buf.len().is_multiple_of(4) {
            buf.push(0);
        }
    }
    let data = std::fs::read(agent)?;
    let mut buf = Vec::with_capacity(data.len() + 512);
    entry(&mut buf, 1, "init", 0o100755, &data);
    entry(&mut buf, 2, ".kiln", 0o040755, &[]);
    entry(&mut buf, 0, "TRAILER!!!", 0, &[]);
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &buf)?;
    std::fs::rename(&tmp, out)
}

impl MicrovmDriver {
    /// A driver booting Linux guests: `kernel` from `--kernel`, else KILN_GUEST_KERNEL, else the
    /// build-kernel cache. `vmm_exe` is the `kiln` binary the VMM processes run.
    pub fn new(store: Store, vmm_exe: PathBuf, kernel: Option<PathBuf>) -> MicrovmDriver {
        let home = home_of(&store);
        MicrovmDriver {
            store,
            launcher: Launcher { exe: vmm_exe, home },
            guest: Guest::Linux { kernel },
            ready_timeout: Duration::from_secs(30),
        }
    }

    /// A driver booting kiln's freestanding test guest (`elf`): the lifecycle without Linux,
    /// for hosts (PVM) where no Linux guest boots.
    pub fn with_test_guest(store: Store, vmm_exe: PathBuf, elf: PathBuf) -> MicrovmDriver {
        let mut d = MicrovmDriver::new(store, vmm_exe, None);
        d.guest = Guest::TestGuest { elf };
        d
    }

    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    fn state(rec: &SandboxRecord) -> Option<DriverState> {
        serde_json::from_value(rec.driver.clone()).ok()
    }

    fn vm_dir(dir: &SandboxDir) -> PathBuf {
        dir.sub("vm")
    }

    fn run_options(
        &self,
        dir: &SandboxDir,
        rec: &SandboxRecord,
        image: &ImageRecord,
    ) -> Result<RunOptions> {
        let vm_dir = Self::vm_dir(dir);
        let mut o = match &self.guest {
            Guest::TestGuest { elf } => {
                let mut o = RunOptions::new(dir.id(), &vm_dir, elf);
                o.entry = Entry::User;
                o.cmdline = match &rec.net {
                    Some(net) => format!("kt.ip={}", net.guest_ip),
                    None => String::new(),
                };
                o
            }
            Guest::Linux { kernel } => {
                let kernel = find_kernel(kernel.as_deref())
                    .map_err(|e| Error::Unavailable(RuntimeKind::Microvm, e))?;
                let agent = find_agent(&self.launcher.exe)
                    .map_err(|e| Error::Unavailable(RuntimeKind::Microvm, e))?;
                let mut o = RunOptions::new(dir.id(), &vm_dir, kernel);
                let initrd = vm_dir.join("agent.cpio");
                std::fs::create_dir_all(&vm_dir)
                    .and_then(|_| write_agent_initrd(&agent, &initrd))
                    .map_err(|e| Error::Io {
                        what: "writing the agent initrd",
                        path: initrd.clone(),
                        err: e,
                    })?;
                o.initrd = Some(initrd);
                o.cmdline = format!(
                    "console=ttyS0 reboot=k panic=1 rdinit=/init kiln.root=/dev/vda \
                     kiln.generation={}",
                    rec.generation
                );
                if let Some(net) = &rec.net {
                    // The kernel's own IP configuration (CONFIG_IP_PNP): address, gateway
                    // and DNS are the same in every sandbox's namespace.
                    let mask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(net.prefix)));
                    o.cmdline.push_str(&format!(
                        " ip={}::{}:{mask}::eth0:off:{}",
                        net.guest_ip, net.gateway, net.gateway
                    ));
                }
                o
            }
        };
        o.disks = vec![image.disk.to_hex()];
        o.mem_mib = rec.memory_mib;
        o.vcpus = u8::try_from(rec.cpus.max(1))
            .map_err(|_| Error::Invalid(format!("{} vCPUs: at most 255", rec.cpus)))?;
        o.vsock_uds = Some(vm_dir.join("vsock.sock"));
        o.net = nic_of(rec)?;
        Ok(o)
    }

    /// Waits until the guest answers `Health` on the agent port, or fails with the log tail.
    fn wait_ready(&self, dir: &SandboxDir, st: &DriverState) -> Result<()> {
        let t = Instant::now();
        loop {
            let last = match probe(&st.vsock) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if !vms::process_alive(st.pid) {
                return Err(Error::Driver {
                    what: "microvm start".into(),
                    detail: format!(
                        "the VMM process {} ended before the guest answered ({last})\n--- log tail ---\n{}",
                        st.pid,
                        log_tail(&st.vm_dir)
                    ),
                });
            }
            if t.elapsed() > self.ready_timeout {
                tracing::debug!(sandbox = %dir.id(), "last probe error: {last}");
                return Err(Error::AgentTimeout {
                    id: dir.id(),
                    secs: self.ready_timeout.as_secs(),
                    tail: log_tail(&st.vm_dir),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The sandbox checkpoint of VM snapshot `id`.
    fn checkpoint_of(
        &self,
        id: &BlobId,
        r: &kiln_snapshotter::record::SnapshotRecord,
    ) -> Result<Checkpoint> {
        let blobs = kiln_snapshotter::record::blobs(&self.store, id, r)
            .map_err(|e| drv("checkpoint")(e.into()))?;
        let state = CheckpointState {
            driver: "microvm".into(),
            snapshot: *id,
            parent: r.parent,
            mem_mib: r.vm.mem_bytes >> 20,
            vcpus: r.vm.vcpus,
            diff: r.parent.is_some(),
        };
        Ok(Checkpoint {
            state: serde_json::to_value(&state).expect("serializes"),
            blobs,
        })
    }

    fn adopt(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        launched: vms::Launched,
        vsock: PathBuf,
    ) -> Result<()> {
        let st = DriverState {
            vm_id: launched.id.clone(),
            vm_dir: launched.dir.clone(),
            pid: launched.child.id(),
            vsock: vsock.clone(),
        };
        launched.reap_in_background();
        rec.driver = serde_json::to_value(&st).expect("serializes");
        rec.agent = Some(vsock);
        if let Err(e) = self.wait_ready(dir, &st) {
            let _ = crate::Runtime::kill(self, dir, rec);
            return Err(e);
        }
        Ok(())
    }
}

/// The last bytes of a VM's serial log and VMM log.
/// The VM's NIC on the sandbox's network: the TAP the network layer made in the sandbox's
/// router namespace, which the VMM opens from inside it.
fn nic_of(rec: &SandboxRecord) -> Result<Option<NicSpec>> {
    let Some(net) = &rec.net else {
        return Ok(None);
    };
    let tap = net
        .tap
        .clone()
        .ok_or_else(|| Error::Invalid("the sandbox's network has no TAP for a microVM".into()))?;
    let mac = net
        .mac
        .parse()
        .map_err(|e| Error::Invalid(format!("guest MAC {:?}: {e}", net.mac)))?;
    Ok(Some(NicSpec {
        tap,
        netns: Some(PathBuf::from(&net.router_ns)),
        mac: Some(mac),
    }))
}

fn log_tail(vm_dir: &Path) -> String {
    let serial = crate::record::tail(&vm_dir.join("serial.log"), LOG_TAIL);
    let vmm = crate::record::tail(&vm_dir.join("vmm.log"), LOG_TAIL);
    format!("{serial}\n--- vmm.log ---\n{vmm}")
}

/// One readiness probe: `Health` on the agent port.
fn probe(vsock: &Path) -> std::result::Result<(), String> {
    let mut s =
        connect_port(vsock, AGENT_PORT, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    kiln_agent::client::health(&mut s)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl crate::Runtime for MicrovmDriver {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Microvm
    }

    fn available(&self) -> std::result::Result<(), String> {
        match &self.guest {
            Guest::TestGuest { elf } => {
                if let Some(why) = kvm_unsupported(false) {
                    return Err(why);
                }
                if !elf.is_file() {
                    return Err(format!("test guest {} does not exist", elf.display()));
                }
            }
            Guest::Linux { kernel } => {
                if let Some(why) = kvm_unsupported(true) {
                    return Err(why);
                }
                find_kernel(kernel.as_deref())?;
                find_agent(&self.launcher.exe)?;
            }
        }
        if !self.launcher.exe.is_file() {
            return Err(format!(
                "VMM executable {} does not exist",
                self.launcher.exe.display()
            ));
        }
        Ok(())
    }

    fn start(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        image: &ImageRecord,
        net: &PendingNetwork,
    ) -> Result<()> {
        // The VM's tap device is part of its launch: the network comes first.
        net.finish(rec)?;
        let o = self.run_options(dir, rec, image)?;
        let vm_dir = o.dir.clone();
        if vm_dir.exists() && !vms::is_running(&vm_dir) {
            let _ = std::fs::remove_dir_all(&vm_dir);
        }
        let launched = match self.launcher.run(&o) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&vm_dir);
                return Err(drv("start")(e));
            }
        };
        tracing::info!(sandbox = %dir.id(), pid = launched.child.id(), "microvm started");
        self.adopt(dir, rec, launched, o.vsock_uds.clone().expect("set"))
    }

    fn reads_checkpoint_while_running(&self) -> bool {
        // Restored memory is paged in from the store by userfaultfd, and disks are overlays
        // over the snapshot's disk blobs.
        true
    }

    fn checkpoint(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        stop: bool,
    ) -> Result<Checkpoint> {
        let st = Self::state(rec)
            .ok_or_else(|| Error::Invalid(format!("sandbox {} has no VM", dir.id())))?;
        // A diff against the snapshot it was restored from (or last checkpointed as), when the
        // VMM tracked the pages written since; a full snapshot otherwise.
        let parent = vm_snapshots::parent_of(&st.vm_dir)
            .filter(|p| kiln_snapshotter::record::load(&self.store, p).is_ok());
        let name = format!("sandbox-{}-{}", dir.id(), crate::record::now_ms());
        let o = CreateOptions {
            name: Some(name.clone()),
            diff: parent.is_some(),
            stop,
        };
        // The name tells a recovery whether the snapshot was saved (the VM, to be stopped,
        // stays paused until then).
        if let Some(op) = rec.op.as_mut() {
            op.driver = serde_json::json!({ "snapshot_name": name });
        }
        dir.enter(rec, Phase::Checkpoint)?;
        let c = vm_snapshots::create(&self.store, &st.vm_dir, &st.vm_id, &o)
            .map_err(drv("checkpoint"))?;
        let cp = self.checkpoint_of(&c.id, &c.record)?;
        if let Some(op) = rec.op.as_mut() {
            op.checkpoint = Some(cp.clone());
        }
        dir.enter(rec, Phase::Saved)?;
        // The name only kept it while it was being made: the snapshot record keeps `blobs`.
        let _ = self.store.remove_name(&snapshot_name_key(&name));
        if stop {
            let t = Instant::now();
            while vms::process_alive(st.pid) && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(cp)
    }

    fn restore(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        checkpoint: &Checkpoint,
        _image: &ImageRecord,
        net: &PendingNetwork,
    ) -> Result<()> {
        net.finish(rec)?;
        let cs: CheckpointState = serde_json::from_value(checkpoint.state.clone())
            .map_err(|e| Error::Invalid(format!("not a microvm checkpoint: {e}")))?;
        let vm_dir = Self::vm_dir(dir);
        if vms::is_running(&vm_dir) {
            return Err(Error::Invalid(format!(
                "sandbox {} still runs its VM",
                dir.id()
            )));
        }
        if vm_dir.exists() {
            let _ = std::fs::remove_dir_all(&vm_dir);
        }
        let mut o = RestoreOptions::new(cs.snapshot.to_hex(), dir.id(), &vm_dir);
        o.vsock_uds = Some(vm_dir.join("vsock.sock"));
        // A fresh TAP in this sandbox's own namespace; the guest keeps its address and MAC.
        o.net = nic_of(rec)?;
        let launched = match vm_snapshots::restore_detached(&self.store, &self.launcher, &o) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&vm_dir);
                return Err(drv("restore")(e));
            }
        };
        tracing::info!(sandbox = %dir.id(), snapshot = %cs.snapshot, "microvm restored");
        self.adopt(dir, rec, launched, o.vsock())
    }

    fn kill(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<()> {
        let st = Self::state(rec);
        let vm_dir = st
            .as_ref()
            .map(|s| s.vm_dir.clone())
            .unwrap_or_else(|| Self::vm_dir(dir));
        if vms::is_running(&vm_dir) {
            let id = st
                .as_ref()
                .map(|s| s.vm_id.clone())
                .unwrap_or_else(|| dir.id());
            if let Err(e) = vms::stop(&vm_dir, &id, Duration::from_secs(5)) {
                tracing::warn!(sandbox = %dir.id(), "stopping the VM: {e}");
            }
        }
        // Its VMM processes by their VM directory: a recorded pid may be stale (a paused
        // sandbox's) and one being restored has recorded none yet.
        let t = Instant::now();
        loop {
            let left = vmm_processes(&vm_dir);
            if left.is_empty() || t.elapsed() > Duration::from_secs(7) {
                break;
            }
            if t.elapsed() > Duration::from_secs(2) {
                for pid in left {
                    // SAFETY: kill(2) of a VMM process of this sandbox (its VM directory
                    // matched); no memory is touched.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match std::fs::remove_dir_all(&vm_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io {
                what: "removing",
                path: vm_dir,
                err: e,
            }),
        }
    }

    fn exited(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Option<String> {
        let st = Self::state(rec)?;
        if vms::process_alive(st.pid) && vms::is_running(&st.vm_dir) {
            return None;
        }
        if vms::process_alive(st.pid) {
            // Still starting or stopping.
            return None;
        }
        let _ = dir;
        Some(match vms::read_exit(&st.vm_dir) {
            Some(x) => match x.reason {
                kiln_vmm::ExitReason::Error(e) => format!("the VM failed: {e}"),
                r => format!("the VM ended ({r:?})").to_lowercase(),
            },
            None => format!(
                "the VMM process {} is gone\n--- log tail ---\n{}",
                st.pid,
                log_tail(&st.vm_dir)
            ),
        })
    }

    fn connect(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<UnixStream> {
        let st = Self::state(rec)
            .ok_or_else(|| Error::Invalid(format!("sandbox {} has no VM", dir.id())))?;
        connect_port(&st.vsock, AGENT_PORT, Duration::from_secs(10)).map_err(|e| Error::Io {
            what: "connecting to the agent through",
            path: st.vsock.clone(),
            err: e,
        })
    }

    fn recover(&self, dir: &SandboxDir, rec: &mut SandboxRecord, op: &Op) -> Result<Recovered> {
        if matches!(op.kind, OpKind::Resume | OpKind::Kill) || op.phase == Phase::Kill {
            // A restore is undone: its VMM process goes, the record still names the snapshot.
            self.kill(dir, rec)?;
            return Ok(Recovered::Stopped);
        }
        // A checkpoint: saved (the Saved phase, or its name in the store) or not.
        let saved = match &op.checkpoint {
            Some(cp) => Some(cp.clone()),
            None => match op.driver.get("snapshot_name").and_then(|n| n.as_str()) {
                Some(name) => {
                    let key = snapshot_name_key(name);
                    let found = self.store.lookup_name(&key)?;
                    let cp = match found {
                        Some(id) => {
                            let r = kiln_snapshotter::record::load(&self.store, &id)
                                .map_err(|e| drv("checkpoint")(e.into()))?;
                            Some(self.checkpoint_of(&id, &r)?)
                        }
                        None => None,
                    };
                    let _ = self.store.remove_name(&key);
                    cp
                }
                None => None,
            },
        };
        match saved {
            Some(cp) if op.kind.stops() => {
                // The VM stays paused until its snapshot is saved: it may be there still.
                self.kill(dir, rec)?;
                Ok(Recovered::Checkpointed(cp))
            }
            // Not saved, or a live snapshot nobody waits for: the VM runs on if it can.
            _ => Ok(match Self::state(rec) {
                Some(st) if vms::is_running(&st.vm_dir) => {
                    vms::call(
                        &st.vm_dir,
                        &st.vm_id,
                        &kiln_vmm::control::Request::Resume,
                        Duration::from_secs(30),
                    )
                    .map_err(drv("resume"))?;
                    Recovered::Running
                }
                _ => Recovered::Lost(
                    self.exited(dir, rec)
                        .unwrap_or_else(|| "the VM does not run".into()),
                ),
            }),
        }
    }
}

/// The store name a VM snapshot named `name` is saved under.
fn snapshot_name_key(name: &str) -> String {
    kiln_blockstore::names::VM_SNAPSHOT.name(name)
}

/// Live VMM processes of the VM in `vm_dir` (helpers of that directory).
fn vmm_processes(vm_dir: &Path) -> Vec<u32> {
    crate::helpers::processes_of(vm_dir)
}
