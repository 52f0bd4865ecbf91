//! `kiln snapshot ...`: snapshot running VMs into the block store, list/inspect/remove
//! snapshots, and restore or fork them into new VMM processes. The work is
//! `kiln_runtime::microvm::vm_snapshots`; this file parses, calls it and prints.

use crate::cli::{print_json, Home};
use anyhow::Result;
use clap::{Args, Subcommand};
use kiln_runtime::microvm::vm_snapshots::{self, CreateOptions, RestoreOptions};
use kiln_runtime::microvm::vms;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a running VM (memory, vCPU/device state, disks) into the store
    #[command(
        after_help = "Examples:\n  kiln snapshot create 3f2a9c1e --name warm\n  \
        kiln snapshot create 3f2a9c1e --name warm2 --diff\n  kiln snapshot create 3f2a9c1e --stop"
    )]
    Create {
        /// VM id (see `kiln vm ls`)
        vm: String,
        /// Snapshot name (default: <vm>-<unix time>)
        #[arg(long)]
        name: Option<String>,
        /// Store only the memory pages that changed since the VM's previous snapshot
        #[arg(long)]
        diff: bool,
        /// Stop the VM after the snapshot (suspend) instead of resuming it
        #[arg(long)]
        stop: bool,
        #[arg(long)]
        json: bool,
    },
    /// List snapshots
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a snapshot's record (without the raw vCPU state)
    Inspect { snapshot: String },
    /// Remove a snapshot's name (its blobs go at the next `kiln store gc`)
    Rm { snapshot: String },
    /// Push a snapshot (record, memory layers, disks, working set) to the remote
    Push { snapshot: String },
    /// Make a snapshot pushed from another home restorable here (manifests now, pages lazily)
    Pull {
        /// Snapshot id (as printed by `create`/`push`)
        id: String,
        /// Name it here
        #[arg(long)]
        name: Option<String>,
    },
    /// Start a VM from a snapshot (memory paged in lazily from the store)
    Restore(RestoreArgs),
    /// Start N VMs from one snapshot, sharing its memory pages until written
    Fork(ForkArgs),
}

#[derive(Args, Clone)]
pub struct ForkArgs {
    /// Snapshot name or id
    pub snapshot: String,
    /// How many VMs to start
    #[arg(short = 'n', long, default_value_t = 1)]
    pub count: usize,
    /// Directory for the forks' vsock sockets (fork i listens on DIR/<id>.vsock)
    #[arg(long)]
    pub vsock_dir: Option<PathBuf>,
    /// The forks' TAPs, one per fork (repeat the flag), or one pattern where `{}` becomes the
    /// fork's index (`--net-tap tap0@sbx{}`: fork 0 on tap0 in sbx0, ...)
    #[arg(long, value_name = "TAP[@NETNS]")]
    pub net_tap: Vec<String>,
}

#[derive(Args, Clone)]
pub struct RestoreArgs {
    /// Snapshot name or id
    pub snapshot: String,
    /// Run in the background and print the VM id
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// VM id (default: random)
    #[arg(long)]
    pub id: Option<String>,
    /// Host Unix socket for the VM's vsock (default: KILN_HOME/vms/ID/vsock.sock)
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// The TAP behind the restored VM's network interface, optionally in a network namespace
    /// (each restore needs its own; the guest keeps its MAC and address). Without it the NIC
    /// has no host side.
    #[arg(long, value_name = "TAP[@NETNS]", value_parser = crate::cli::parse_nic)]
    pub net_tap: Option<kiln_runtime::microvm::vms::NicSpec>,
    /// Map this materialized memory file copy-on-write instead of paging from the store (forks)
    #[arg(long, hide = true)]
    pub memory_file: Option<PathBuf>,
    /// Do not prefetch the recorded working set
    #[arg(long)]
    pub no_working_set: bool,
    /// The VM's directory (default: KILN_HOME/vms/ID; sandboxes keep theirs elsewhere)
    #[arg(long, hide = true)]
    pub vm_dir: Option<PathBuf>,
}

pub fn run(home: &Home, c: SnapshotCommand) -> Result<()> {
    match c {
        SnapshotCommand::Create {
            vm,
            name,
            diff,
            stop,
            json,
        } => create(home, &vm, name, diff, stop, json),
        SnapshotCommand::Ls { json } => ls(home, json),
        SnapshotCommand::Inspect { snapshot } => {
            let store = crate::store::open_with_remote(home, None, false)?;
            print_json(&vm_snapshots::inspect(&store, &snapshot)?)
        }
        SnapshotCommand::Rm { snapshot } => {
            let store = crate::store::open_with_remote(home, None, false)?;
            Ok(vm_snapshots::remove(&store, &snapshot)?)
        }
        SnapshotCommand::Push { snapshot } => {
            let store = crate::store::open_with_remote(home, None, true)?;
            let (id, bytes) = vm_snapshots::push(&store, &snapshot)?;
            println!("{} ({bytes} bytes uploaded)", id.to_hex());
            Ok(())
        }
        SnapshotCommand::Pull { id, name } => {
            let store = crate::store::open_with_remote(home, None, true)?;
            let id = vm_snapshots::pull(&store, &id, name.as_deref())?;
            println!("{}", id.to_hex());
            Ok(())
        }
        SnapshotCommand::Restore(a) => restore(home, a),
        SnapshotCommand::Fork(a) => fork(home, a),
    }
}

pub fn create(
    home: &Home,
    vm: &str,
    name: Option<String>,
    diff: bool,
    stop: bool,
    json: bool,
) -> Result<()> {
    vms::check_id(vm)?;
    let dir = home.vms_dir().join(vm);
    if !vms::is_running(&dir) {
        return Err(kiln_runtime::microvm::Error::NotRunning(vm.to_string()).into());
    }
    let store = crate::store::open_with_remote(home, None, false)?;
    let c = vm_snapshots::create(&store, &dir, vm, &CreateOptions { name, diff, stop })?;
    if json {
        print_json(&c.report)
    } else {
        println!("{}", c.id.to_hex());
        Ok(())
    }
}

fn ls(home: &Home, json: bool) -> Result<()> {
    let store = crate::store::open_with_remote(home, None, false)?;
    let rows = vm_snapshots::list(&store)?;
    if json {
        return print_json(&rows);
    }
    println!(
        "{:<24} {:<18} {:>8} {:>7}",
        "NAME", "ID", "MEM_MIB", "LAYERS"
    );
    for r in rows {
        println!(
            "{:<24} {:<18} {:>8} {:>7}",
            r["name"].as_str().unwrap_or(""),
            &r["id"].as_str().unwrap_or("")[..16],
            r["mem_mib"]
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or("?".into()),
            r["layers"]
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "corrupt".into()),
        );
    }
    Ok(())
}

/// `kiln vm restore SNAP [-d]` (also `kiln snapshot restore`).
pub fn restore(home: &Home, a: RestoreArgs) -> Result<()> {
    let id = a.id.clone().unwrap_or_else(vms::new_vm_id);
    vms::check_id(&id)?;
    let dir = a.vm_dir.clone().unwrap_or_else(|| home.vms_dir().join(&id));
    let o = RestoreOptions {
        snapshot: a.snapshot.clone(),
        id,
        dir,
        vsock_uds: a.vsock_uds.clone(),
        memory_file: a.memory_file.clone(),
        no_working_set: a.no_working_set,
        net: a.net_tap.clone(),
    };
    let store = crate::store::open_with_remote(home, None, false)?;
    if a.detach {
        let l = vm_snapshots::restore_detached(&store, &home.launcher()?, &o)?;
        println!("{}", l.id);
        return Ok(());
    }
    // In the foreground the guest's serial output also goes to stdout, as with `kiln vm run`.
    Ok(vm_snapshots::restore_foreground(&store, &o, true)?)
}

/// Restores `o` in this process (the VMM helper: serial output only in its log).
pub fn restore_in_process(home: &Home, o: &RestoreOptions, serial_stdout: bool) -> Result<()> {
    let store = crate::store::open_with_remote(home, None, false)?;
    Ok(vm_snapshots::restore_foreground(&store, o, serial_stdout)?)
}

/// `--net-tap` of `kiln vm fork`: one per fork, or one `{}` pattern expanded per fork index.
fn fork_nics(args: &[String], count: usize) -> Result<Vec<vms::NicSpec>> {
    let expanded: Vec<String> = match args {
        [one] if one.contains("{}") => (0..count)
            .map(|i| one.replace("{}", &i.to_string()))
            .collect(),
        _ => args.to_vec(),
    };
    expanded
        .iter()
        .map(|s| crate::cli::parse_nic(s).map_err(anyhow::Error::msg))
        .collect()
}

/// `kiln vm fork SNAP -n N`: N detached VMs over one copy-on-write memory file.
pub fn fork(home: &Home, a: ForkArgs) -> Result<()> {
    let nets = fork_nics(&a.net_tap, a.count)?;
    let store = crate::store::open_with_remote(home, None, false)?;
    vm_snapshots::fork(
        &store,
        &home.launcher()?,
        &a.snapshot,
        a.count,
        a.vsock_dir.as_deref(),
        &nets,
        &mut |id| println!("{id}"),
    )?;
    Ok(())
}
