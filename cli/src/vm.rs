//! `kiln vm ...`: one VM = one VMM process (this binary running `kiln vm run`), with a control
//! socket (JSON lines, see `kiln_vmm::control`) and a serial log under KILN_HOME/vms/ID. The work is
//! `kiln_runtime::microvm::vms`; this file parses, calls it and prints.

use crate::cli::{parse_nic, print_json, Home};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_runtime::microvm::vms::{self, DiskEngine, Entry, MacAddr, NicSpec, RunOptions};
use kiln_vmm::control::Request;
use kiln_vmm::ExitReason;
use std::path::PathBuf;
use std::time::Duration;

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
    Restore(crate::vm_snapshot::RestoreArgs),
    /// Start N VMs from one snapshot, sharing its memory pages until written
    Fork(crate::vm_snapshot::ForkArgs),
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
    /// Network interface: a TAP device, attached if it exists (created otherwise), optionally
    /// in a network namespace (NETNS: a name under /run/netns, or a path such as
    /// /proc/PID/ns/net). The guest sees a virtio-net NIC.
    #[arg(long, value_name = "TAP[@NETNS]", value_parser = parse_nic)]
    net_tap: Option<NicSpec>,
    /// The NIC's MAC address (default: random, locally administered)
    #[arg(long, requires = "net_tap")]
    net_mac: Option<MacAddr>,
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
    /// The VM's directory (default: KILN_HOME/vms/ID; sandboxes keep theirs elsewhere)
    #[arg(long, hide = true)]
    vm_dir: Option<PathBuf>,
    /// Attach disks from this index on read-only (the ones before stay writable)
    #[arg(long, hide = true)]
    read_only_from: Option<usize>,
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

/// The launcher of detached VMM processes: this binary, this home.
pub fn run(home: &Home, c: VmCommand) -> Result<()> {
    match c {
        VmCommand::Run(a) => run_vm(home, a),
        VmCommand::Ls { json } => ls(home, json),
        VmCommand::Pause { id } => simple(home, &id, Request::Pause, "paused"),
        VmCommand::Resume { id } => resume(home, &id),
        VmCommand::Suspend { id, name } => {
            let name = name.unwrap_or_else(|| id.clone());
            crate::vm_snapshot::create(home, &id, Some(name.clone()), false, true, false)?;
            eprintln!(
                "{id} suspended as snapshot {name:?}; `kiln vm resume {name}` starts it again"
            );
            Ok(())
        }
        VmCommand::Restore(a) => crate::vm_snapshot::restore(home, a),
        VmCommand::Fork(a) => crate::vm_snapshot::fork(home, a),
        VmCommand::Stop { id } => {
            let dir = vms::vm_dir(home.root(), &id)?;
            vms::stop(&dir, &id, Duration::from_secs(30))?;
            println!("{id} stopped");
            Ok(())
        }
        VmCommand::Logs { id, follow } => {
            let dir = vms::vm_dir(home.root(), &id)?;
            Ok(vms::logs(&dir, follow, &mut std::io::stdout().lock())?)
        }
        VmCommand::CommitDisk { id, disk, name } => {
            let dir = vms::vm_dir(home.root(), &id)?;
            let blob = vms::commit_disk(&dir, &id, disk)?;
            if let Some(name) = name {
                let store = kiln_blockstore::Store::open(&home.store_dir())?;
                store.set_name(&name, &blob)?;
            }
            println!("{blob}");
            Ok(())
        }
        VmCommand::SaveState { id, path } => {
            let path = std::path::absolute(&path)?;
            let dir = vms::vm_dir(home.root(), &id)?;
            vms::call(
                &dir,
                &id,
                &Request::SaveState { path: path.clone() },
                Duration::from_secs(60),
            )?;
            println!("{}", path.display());
            Ok(())
        }
        VmCommand::Prune => {
            for id in vms::prune(home.root())? {
                println!("{id}");
            }
            Ok(())
        }
    }
}

fn simple(home: &Home, id: &str, req: Request, what: &str) -> Result<()> {
    let dir = vms::vm_dir(home.root(), id)?;
    vms::call(&dir, id, &req, Duration::from_secs(30))?;
    println!("{id} {what}");
    Ok(())
}

/// A running VM is resumed in place; otherwise `id` names a snapshot (a suspended VM) that is
/// restored in the background.
fn resume(home: &Home, id: &str) -> Result<()> {
    if vms::is_running(&home.vms_dir().join(id)) {
        return simple(home, id, Request::Resume, "resumed");
    }
    let args = crate::vm_snapshot::RestoreArgs {
        snapshot: id.to_string(),
        detach: true,
        id: None,
        vsock_uds: None,
        net_tap: None,
        memory_file: None,
        no_working_set: false,
        vm_dir: None,
    };
    crate::vm_snapshot::restore(home, args)
        .with_context(|| format!("{id:?} is neither a running VM nor a snapshot"))
}

/// `TAP[@NETNS]` of `--net-tap`.
fn options(home: &Home, a: &RunArgs) -> RunOptions {
    let id = a.id.clone().unwrap_or_else(vms::new_vm_id);
    let dir = a.vm_dir.clone().unwrap_or_else(|| home.vms_dir().join(&id));
    RunOptions {
        id,
        dir,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        disks: a.disk.clone(),
        read_only_from: if a.read_only {
            0
        } else {
            a.read_only_from.unwrap_or(usize::MAX)
        },
        mem_mib: a.mem,
        vcpus: a.vcpus,
        cmdline: a.cmdline.clone(),
        vsock_uds: a.vsock_uds.clone(),
        vsock_cid: a.vsock_cid,
        net: a.net_tap.clone().map(|n| NicSpec {
            mac: a.net_mac,
            ..n
        }),
        disk_engine: match a.disk_engine {
            EngineArg::Uring => DiskEngine::Uring,
            EngineArg::Sync => DiskEngine::Sync,
        },
        commit: a.commit,
        entry: match a.entry {
            EntryArg::Kernel => Entry::Kernel,
            EntryArg::User => Entry::User,
        },
    }
}

fn run_vm(home: &Home, a: RunArgs) -> Result<()> {
    let o = options(home, &a);
    // Check what we can before forking, so `-d` reports bad input directly.
    o.check()?;
    if a.detach {
        let l = home.launcher()?.run(&o)?;
        println!("{}", l.id);
        return Ok(());
    }
    run_in_process(home, &o, true)
}

/// Runs the VM of `o` in this process (`kiln vm run` in the foreground, or the VMM helper
/// with the guest's serial output only in its log).
pub fn run_in_process(home: &Home, o: &RunOptions, serial_stdout: bool) -> Result<()> {
    let store = if o.needs_store() {
        Some(crate::store::open_with_remote(home, None, false)?)
    } else {
        None
    };
    let exit = vms::run_foreground(o, store.as_ref(), serial_stdout)?;
    for (i, c) in exit.committed.iter().enumerate() {
        if let Some(b) = c {
            eprintln!("disk {i} committed: {b}");
        }
    }
    match exit.reason {
        ExitReason::Error(e) => bail!("VM {} failed: {e}", o.id),
        _ => Ok(()),
    }
}

fn ls(home: &Home, json: bool) -> Result<()> {
    let out = vms::list(home.root());
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
