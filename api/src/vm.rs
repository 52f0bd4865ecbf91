//! `kiln vm ...`: one VM = one VMM process (this binary running `kiln vm run`), with a control
//! socket (JSON lines, see `vmm::control`) and a serial log under KILN_HOME/vms/ID.

use crate::cli::{print_json, Home};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::control::{self, ControlContext, Request};
use vmm::devices::virtio::block::engine::FileEngine;
use vmm::devices::virtio::block::{Block, DiskBackend};
use vmm::{ExitReason, GuestMemorySource, Vm, VmConfig};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a microVM (in this process; `-d` detaches it into the background)
    #[command(after_help = "Examples:\n  \
        kiln vm run --kernel vmlinux --disk base-disk --mem 256 -d\n  \
        kiln vm run --kernel guest.elf --disk ./scratch.img --cmdline 'console=ttyS0'")]
    Run(RunArgs),
    /// List VMs
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Pause a running VM (vCPUs and devices stop)
    Pause { id: String },
    /// Resume a paused VM, or start a suspended one from its snapshot (`kiln vm suspend`)
    #[command(
        after_help = "Examples:\n  kiln vm resume 3f2a9c1e      # a paused VM\n  \
        kiln vm resume my-sandbox    # a snapshot made by `kiln vm suspend`, in the background"
    )]
    Resume { id: String },
    /// Snapshot a VM into the store and stop it, freeing its memory
    ///
    /// `kiln vm resume NAME` starts it again, on this host or on another that shares the S3
    /// remote (after `kiln snapshot push NAME` here and `kiln snapshot pull ID` there).
    Suspend {
        id: String,
        /// Snapshot name to resume from (default: the VM id)
        #[arg(long)]
        name: Option<String>,
    },
    /// Start a VM from a snapshot, paging its memory in lazily from the store
    Restore(crate::snapshot::RestoreArgs),
    /// Start N VMs from one snapshot, sharing its memory pages until written
    Fork(crate::snapshot::ForkArgs),
    /// Stop a VM
    Stop { id: String },
    /// Print a VM's serial output
    Logs {
        id: String,
        /// Keep printing new output until the VM ends
        #[arg(short, long)]
        follow: bool,
    },
    /// Commit a store-overlay disk of a VM to a new blob (the VM pauses during the commit)
    CommitDisk {
        id: String,
        /// Disk index (order of --disk)
        #[arg(long, default_value_t = 0)]
        disk: usize,
        /// Also point this name at the new blob
        #[arg(long)]
        name: Option<String>,
    },
    /// Write a paused VM's state (vCPUs, devices) as JSON
    SaveState { id: String, path: PathBuf },
    /// Remove the directories of VMs that have ended
    Prune,
}

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Kernel: ELF vmlinux (64-bit) or bzImage
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Disk: a raw image file path, or a blob (name, id, prefix) from the store, booted through
    /// a copy-on-write overlay without copying. Repeatable; the order is the guest's order.
    #[arg(long)]
    disk: Vec<String>,
    /// Attach disks read-only
    #[arg(long)]
    read_only: bool,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 128)]
    mem: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Kernel command line (virtio_mmio.device= entries are appended)
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// Host Unix socket for virtio-vsock (Firecracker convention: connect and send
    /// `CONNECT <port>\n`; guest connections go to `<PATH>_<port>`)
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest CID for vsock
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// I/O engine for raw-file disks
    #[arg(long, value_enum, default_value = "uring")]
    disk_engine: EngineArg,
    /// Commit overlay disks to new blobs when the VM ends (ids are printed and kept in exit.json)
    #[arg(long)]
    commit: bool,
    /// Guest entry privilege: `kernel` (CPL 0, Linux boot protocol) or `user` (CPL 3 + IOPL 3,
    /// for freestanding guests such as kiln's test guest: on PVM hosts CPL 0 code is emulated,
    /// CPL 3 code runs natively)
    #[arg(long, value_enum, default_value = "kernel")]
    entry: EntryArg,
    /// Detach: run the VM in the background and print its id
    #[arg(short = 'd', long)]
    detach: bool,
    /// VM id (default: random)
    #[arg(long)]
    id: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum EntryArg {
    Kernel,
    User,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum EngineArg {
    Uring,
    Sync,
}

/// What `kiln vm run` records about a VM (vms/ID/vm.json).
#[derive(Serialize, Deserialize)]
struct VmMeta {
    id: String,
    pid: u32,
    kernel: PathBuf,
    mem_mib: u64,
    vcpus: u8,
    disks: Vec<String>,
    started_unix: u64,
}

/// How a VM ended (vms/ID/exit.json).
#[derive(Serialize, Deserialize)]
struct VmExit {
    reason: ExitReason,
    committed: Vec<Option<String>>,
}

pub fn run(home: &Home, c: VmCommand) -> Result<()> {
    match c {
        VmCommand::Run(a) => run_vm(home, a),
        VmCommand::Ls { json } => ls(home, json),
        VmCommand::Pause { id } => simple(home, &id, Request::Pause, "paused"),
        VmCommand::Resume { id } => resume(home, &id),
        VmCommand::Suspend { id, name } => {
            let name = name.unwrap_or_else(|| id.clone());
            crate::snapshot::create(home, &id, Some(name.clone()), false, true, false)?;
            eprintln!(
                "{id} suspended as snapshot {name:?}; `kiln vm resume {name}` starts it again"
            );
            Ok(())
        }
        VmCommand::Restore(a) => crate::snapshot::restore(home, a),
        VmCommand::Fork(a) => crate::snapshot::fork(home, a),
        VmCommand::Stop { id } => stop(home, &id),
        VmCommand::Logs { id, follow } => logs(home, &id, follow),
        VmCommand::CommitDisk { id, disk, name } => {
            let v = call(
                home,
                &id,
                &Request::CommitDisk { disk },
                Duration::from_secs(600),
            )?;
            let blob = v["blob"].as_str().unwrap_or_default().to_string();
            if let Some(name) = name {
                let store = blockstore::Store::open(&home.store_dir())?;
                store.set_name(&name, &blob.parse().map_err(|e| anyhow!("{e:?}"))?)?;
            }
            println!("{blob}");
            Ok(())
        }
        VmCommand::SaveState { id, path } => {
            let path = std::path::absolute(&path)?;
            call(
                home,
                &id,
                &Request::SaveState { path: path.clone() },
                Duration::from_secs(60),
            )?;
            println!("{}", path.display());
            Ok(())
        }
        VmCommand::Prune => prune(home),
    }
}

fn vm_dir(home: &Home, id: &str) -> Result<PathBuf> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid VM id {id:?}");
    }
    let d = home.vms_dir().join(id);
    if !d.is_dir() {
        bail!("no VM {id:?} (see `kiln vm ls`)");
    }
    Ok(d)
}

fn call(home: &Home, id: &str, req: &Request, timeout: Duration) -> Result<serde_json::Value> {
    let sock = vm_dir(home, id)?.join("control.sock");
    if !sock.exists() {
        bail!("VM {id} is not running");
    }
    control::call(&sock, req, timeout).map_err(|e| anyhow!("VM {id}: {e}"))
}

fn simple(home: &Home, id: &str, req: Request, what: &str) -> Result<()> {
    call(home, id, &req, Duration::from_secs(30))?;
    println!("{id} {what}");
    Ok(())
}

/// A running VM is resumed in place; otherwise `id` names a snapshot (a suspended VM) that is
/// restored in the background.
fn resume(home: &Home, id: &str) -> Result<()> {
    let running = home.vms_dir().join(id).join("control.sock").exists();
    if running {
        return simple(home, id, Request::Resume, "resumed");
    }
    let args = crate::snapshot::RestoreArgs {
        snapshot: id.to_string(),
        detach: true,
        id: None,
        vsock_uds: None,
        memory_file: None,
        no_working_set: false,
    };
    crate::snapshot::restore(home, args)
        .with_context(|| format!("{id:?} is neither a running VM nor a snapshot"))
}

fn stop(home: &Home, id: &str) -> Result<()> {
    let dir = vm_dir(home, id)?;
    call(home, id, &Request::Stop, Duration::from_secs(30))?;
    let t = Instant::now();
    while dir.join("control.sock").exists() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("VM {id} did not stop within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("{id} stopped");
    Ok(())
}

fn run_vm(home: &Home, a: RunArgs) -> Result<()> {
    // Check what we can before forking, so `-d` reports bad input directly.
    if !a.kernel.is_file() {
        bail!("kernel {} does not exist", a.kernel.display());
    }
    if a.mem == 0 || a.mem > vmm::memory::MAX_MEM_BYTES >> 20 {
        bail!(
            "--mem {} MiB is out of range (1..={} MiB)",
            a.mem,
            vmm::memory::MAX_MEM_BYTES >> 20
        );
    }
    let id = a.id.clone().unwrap_or_else(crate::cli::new_vm_id);
    let dir = home.vms_dir().join(&id);
    if a.detach {
        return detach(home, &a, &id, &dir);
    }
    if dir.join("control.sock").exists() {
        bail!("VM {id} already exists and is running");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join("exit.json"));

    let config = VmConfig {
        mem_bytes: a.mem << 20,
        vcpus: a.vcpus,
        kernel: Some(a.kernel.clone()),
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        serial_log: Some(dir.join("serial.log")),
        serial_stdout: std::env::var_os("KILN_VM_DETACHED").is_none(),
        // kiln VMs are there to be snapshotted: no log switch in the first snapshot's pause.
        track_dirty_pages: true,
    };
    let _ = std::fs::remove_file(dir.join("serial.log"));
    let mut vm = Vm::new(config, GuestMemorySource::Anonymous)?;
    let mut overlays = Vec::new();
    let mut store: Option<blockstore::Store> = None;
    for (i, d) in a.disk.iter().enumerate() {
        let (backend, overlay) = disk_backend(home, &mut store, d, i, &dir, a.disk_engine)?;
        let blk = Block::new(&format!("kiln{i}"), backend, a.read_only)
            .with_context(|| format!("disk {d}"))?;
        vm.add_virtio_device(Box::new(blk))?;
        overlays.push(overlay);
    }
    if let Some(uds) = &a.vsock_uds {
        let v = vmm::devices::virtio::vsock::Vsock::new(a.vsock_cid, uds)
            .with_context(|| format!("vsock on {}", uds.display()))?;
        vm.add_virtio_device(Box::new(v))?;
    }
    vm.set_entry_mode(match a.entry {
        EntryArg::Kernel => vmm::EntryMode::Kernel,
        EntryArg::User => vmm::EntryMode::User,
    });
    vm.boot()?;
    let vm = Arc::new(vm);
    let meta = VmMeta {
        id: id.clone(),
        pid: std::process::id(),
        kernel: std::path::absolute(&a.kernel)?,
        mem_mib: a.mem,
        vcpus: a.vcpus,
        disks: a.disk.clone(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    std::fs::write(dir.join("vm.json"), serde_json::to_vec_pretty(&meta)?)?;
    let ctx = Arc::new(ControlContext {
        vm: vm.clone(),
        overlays: overlays.clone(),
        id: id.clone(),
        tracking: Default::default(),
    });
    let sock = dir.join("control.sock");
    control::serve(&sock, ctx).with_context(|| format!("control socket {}", sock.display()))?;
    vm.start()?;
    let reason = vm.wait();
    let _ = std::fs::remove_file(&sock);

    let mut committed = Vec::new();
    for o in &overlays {
        committed.push(match o {
            Some(o) if a.commit => Some(o.flush().and_then(|_| o.commit())?.to_hex()),
            Some(o) => {
                o.flush()?;
                None
            }
            None => None,
        });
    }
    let exit = VmExit {
        reason: reason.clone(),
        committed: committed.clone(),
    };
    std::fs::write(dir.join("exit.json"), serde_json::to_vec_pretty(&exit)?)?;
    for (i, c) in committed.iter().enumerate() {
        if let Some(b) = c {
            eprintln!("disk {i} committed: {b}");
        }
    }
    match reason {
        ExitReason::Error(e) => bail!("VM {id} failed: {e}"),
        _ => Ok(()),
    }
}

type Overlay = Option<Arc<blockstore::Overlay>>;

fn disk_backend(
    home: &Home,
    store: &mut Option<blockstore::Store>,
    arg: &str,
    index: usize,
    dir: &Path,
    engine: EngineArg,
) -> Result<(DiskBackend, Overlay)> {
    let p = Path::new(arg);
    if p.exists() {
        if !p.is_file() {
            bail!("disk {arg} is not a regular file");
        }
        let engine = match engine {
            EngineArg::Uring => FileEngine::Uring,
            EngineArg::Sync => FileEngine::Sync,
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
    if store.is_none() {
        *store = Some(crate::store::open_with_remote(home, None, false)?);
    }
    let s = store.as_ref().expect("just set");
    let blob = s
        .resolve(arg)
        .with_context(|| format!("disk {arg:?} is neither a file nor a blob in the store"))?;
    let size = s.manifest(&blob)?.size;
    let odir = dir.join(format!("disk{index}"));
    if odir.exists() {
        std::fs::remove_dir_all(&odir)
            .with_context(|| format!("removing old {}", odir.display()))?;
    }
    let overlay = Arc::new(
        s.create_overlay(Some(&blob), size, &odir)
            .with_context(|| format!("overlay for disk {arg}"))?,
    );
    Ok((DiskBackend::Overlay(overlay.clone()), Some(overlay)))
}

fn detach(home: &Home, a: &RunArgs, id: &str, dir: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("vmm.log"))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--home")
        .arg(home.root())
        .args(["vm", "run", "--id", id]);
    cmd.arg("--kernel").arg(std::path::absolute(&a.kernel)?);
    if let Some(i) = &a.initrd {
        cmd.arg("--initrd").arg(std::path::absolute(i)?);
    }
    for d in &a.disk {
        let p = Path::new(d);
        if p.exists() {
            cmd.arg("--disk").arg(std::path::absolute(p)?);
        } else {
            cmd.arg("--disk").arg(d);
        }
    }
    if a.read_only {
        cmd.arg("--read-only");
    }
    cmd.args(["--mem", &a.mem.to_string(), "--vcpus", &a.vcpus.to_string()]);
    cmd.arg("--cmdline").arg(&a.cmdline);
    if let Some(u) = &a.vsock_uds {
        cmd.arg("--vsock-uds").arg(std::path::absolute(u)?);
        cmd.args(["--vsock-cid", &a.vsock_cid.to_string()]);
    }
    cmd.args([
        "--disk-engine",
        match a.disk_engine {
            EngineArg::Uring => "uring",
            EngineArg::Sync => "sync",
        },
    ]);
    if a.commit {
        cmd.arg("--commit");
    }
    if let EntryArg::User = a.entry {
        cmd.args(["--entry", "user"]);
    }
    cmd.env("KILN_VM_DETACHED", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid in the child before exec only changes its session; no allocation or locks.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the VMM process")?;
    let sock = dir.join("control.sock");
    let t = Instant::now();
    loop {
        if sock.exists() && control::call(&sock, &Request::Status, Duration::from_secs(5)).is_ok() {
            println!("{id}");
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
            if dir.join("exit.json").exists() {
                // It ran and already ended (a short-lived guest): still a success.
                println!("{id}");
                return Ok(());
            }
            bail!("VM {id} failed to start ({status}):\n{}", log.trim());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("VM {id} did not come up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[derive(Serialize)]
struct LsEntry {
    id: String,
    state: String,
    pid: Option<u32>,
    mem_mib: Option<u64>,
    vcpus: Option<u8>,
    kernel: Option<PathBuf>,
    disks: Vec<String>,
}

fn ls(home: &Home, json: bool) -> Result<()> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(home.vms_dir()) {
        Ok(rd) => rd.flatten().collect::<Vec<_>>(),
        Err(_) => Vec::new(),
    };
    for e in rd {
        let dir = e.path();
        let id = e.file_name().to_string_lossy().to_string();
        let meta: Option<VmMeta> = std::fs::read(dir.join("vm.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let sock = dir.join("control.sock");
        let state = if sock.exists() {
            match control::call(&sock, &Request::Status, Duration::from_secs(2)) {
                Ok(v) => match &v["state"] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
                Err(_) => "unreachable".into(),
            }
        } else if let Some(x) = std::fs::read(dir.join("exit.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<VmExit>(&b).ok())
        {
            match x.reason {
                ExitReason::Error(e) => format!("failed: {e}"),
                r => format!("exited ({r:?})").to_lowercase(),
            }
        } else {
            "dead".into()
        };
        out.push(LsEntry {
            id,
            state,
            pid: meta.as_ref().map(|m| m.pid),
            mem_mib: meta.as_ref().map(|m| m.mem_mib),
            vcpus: meta.as_ref().map(|m| m.vcpus),
            kernel: meta.as_ref().map(|m| m.kernel.clone()),
            disks: meta.map(|m| m.disks).unwrap_or_default(),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    if json {
        return print_json(&out);
    }
    println!(
        "{:<10} {:<24} {:>8} {:>6} {:>5}  DISKS",
        "ID", "STATE", "PID", "MEM", "VCPUS"
    );
    for e in out {
        println!(
            "{:<10} {:<24} {:>8} {:>6} {:>5}  {}",
            e.id,
            e.state,
            e.pid.map(|p| p.to_string()).unwrap_or_default(),
            e.mem_mib.map(|m| format!("{m}M")).unwrap_or_default(),
            e.vcpus.map(|v| v.to_string()).unwrap_or_default(),
            e.disks.join(",")
        );
    }
    Ok(())
}

fn logs(home: &Home, id: &str, follow: bool) -> Result<()> {
    let dir = vm_dir(home, id)?;
    let path = dir.join("serial.log");
    let mut f = loop {
        match std::fs::File::open(&path) {
            Ok(f) => break f,
            Err(_) if follow && dir.join("control.sock").exists() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
        }
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    loop {
        f.seek(SeekFrom::Start(pos))?;
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            out.flush()?;
            pos += n as u64;
            continue;
        }
        if !follow || !dir.join("control.sock").exists() {
            // One last read after the VM ended, then stop.
            if follow {
                let n = f.read(&mut buf)?;
                out.write_all(&buf[..n])?;
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn prune(home: &Home) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(home.vms_dir()) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let dir = e.path();
        if dir.join("control.sock").exists() {
            continue;
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("{}", e.file_name().to_string_lossy());
    }
    Ok(())
}
