//! `kiln snapshot ...`: snapshot running VMs into the block store, list/inspect/remove
//! snapshots, and restore or fork them into new VMM processes.
//!
//! `create` drives the VM's control socket (pause, save_state, save_memory into a FIFO that is
//! streamed straight into the store, commit_disk, resume/stop). A `--diff` snapshot hashes the
//! streamed memory chunk by chunk and stores only chunks that differ from the parent (the VM's
//! previous snapshot, or the one it was restored from).
//!
//! `restore` runs the VMM in this process (as `kiln vm run` does: control socket, serial log
//! and vm.json under KILN_HOME/vms/ID) with guest memory paged in lazily by a userfaultfd
//! handler; `fork` starts N such processes over one copy-on-write memory file.
//!
//! Disks: `create` commits every virtio-blk disk (store overlays only) into the record; each
//! restored or forked VM gets its own fresh overlay over those blobs under KILN_HOME/vms/ID.

use crate::cli::{print_json, Home};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use snapshotter::record::{self, VmShape};
use snapshotter::vm::{self as snapvm, Identity, LazyRestore, RestoredMemory};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::control::{self, ControlContext, Request};

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
    /// Map this materialized memory file copy-on-write instead of paging from the store (forks)
    #[arg(long, hide = true)]
    pub memory_file: Option<PathBuf>,
    /// Do not prefetch the recorded working set
    #[arg(long)]
    pub no_working_set: bool,
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
        SnapshotCommand::Inspect { snapshot } => inspect(home, &snapshot),
        SnapshotCommand::Rm { snapshot } => {
            let store = crate::store::open_with_remote(home, None, false)?;
            let n = snapshot
                .strip_prefix(record::NAME_PREFIX)
                .unwrap_or(&snapshot);
            if !store.remove_name(&format!("{}{n}", record::NAME_PREFIX))? {
                bail!("no snapshot named {n:?}");
            }
            Ok(())
        }
        SnapshotCommand::Push { snapshot } => {
            let store = crate::store::open_with_remote(home, None, true)?;
            let id = record::resolve(&store, &snapshot)?;
            let bytes = record::push(&store, &id)?;
            println!("{} ({bytes} bytes uploaded)", id.to_hex());
            Ok(())
        }
        SnapshotCommand::Pull { id, name } => {
            let store = crate::store::open_with_remote(home, None, true)?;
            let id: blockstore::BlobId = id.parse().context("snapshot id")?;
            record::pull(&store, &id, name.as_deref())?;
            println!("{}", id.to_hex());
            Ok(())
        }
        SnapshotCommand::Restore(a) => restore(home, a),
        SnapshotCommand::Fork(a) => fork(home, a),
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
    Ok(home.vms_dir().join(id))
}

fn call(sock: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value> {
    control::call(sock, req, timeout).map_err(|e| anyhow!("{}: {e}", sock.display()))
}

/// A diff layer staged from the pages the VMM saw written since the VM's last snapshot or its
/// restore (the tracking tag in TRACKING_FILE, `save_dirty_memory`), or `None` if it did not
/// track them (a snapshot that failed after restarting the tracking, a VMM that could not).
fn diff_from_written_pages(
    sock: &Path,
    dir: &Path,
    parent: &snapshotter::MemoryImage,
    timeout: Duration,
) -> Result<Option<snapshotter::memory::Staged>> {
    let Ok(since) = std::fs::read_to_string(dir.join(TRACKING_FILE)) else {
        return Ok(None);
    };
    let path = dir.join("snapshot.dirty");
    let req = Request::SaveDirtyMemory {
        path: path.clone(),
        since: since.trim().to_string(),
    };
    if let Err(e) = call(sock, &req, timeout) {
        if format!("{e:#}").contains("were not tracked") {
            return Ok(None);
        }
        return Err(e);
    }
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let restored = since.starts_with(RESTORE_TAG);
    let r = snapshotter::memory::stage_pages_from(parent, std::io::BufReader::new(f), restored);
    let _ = std::fs::remove_file(&path);
    Ok(Some(r?))
}

/// Guest RAM copied out of the (paused) VMM process with process_vm_readv, or `None` if that is
/// not possible here (then it streams through a FIFO).
fn copy_from_vmm(sock: &Path, mem_bytes: u64) -> Option<snapshotter::memory::Staged> {
    let st = call(sock, &Request::Status, Duration::from_secs(30)).ok()?;
    let pid = i32::try_from(st["pid"].as_u64()?).ok()?;
    let regions: Vec<(u64, u64)> = st["regions"]
        .as_array()?
        .iter()
        .map(|r| Some((r["host_addr"].as_u64()?, r["size"].as_u64()?)))
        .collect::<Option<_>>()?;
    if regions.iter().map(|r| r.1).sum::<u64>() != mem_bytes {
        return None;
    }
    match snapshotter::memory::stage_process(pid, &regions) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("copying guest memory from the VMM failed, using its FIFO: {e}");
            None
        }
    }
}

/// Memory captured while the VM was paused.
enum CapturedMemory {
    /// Already stored (a diff), with its page count and where its pages came from.
    Stored(snapshotter::MemoryImage, u64, &'static str),
    /// Copied out (and how), to be stored once the VM runs again.
    Staged(snapshotter::memory::Staged, &'static str),
}

/// File in the VM directory holding the tag of the VMM's write tracking since the snapshot in
/// PARENT_FILE (see `Request::TrackWrites`).
const TRACKING_FILE: &str = "snapshot.tracking";

/// Milliseconds since `t`, for reports and timing logs.
fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Prefix of the tracking tag a restored VMM starts with (see `capture_pages_from`).
const RESTORE_TAG: &str = "restore-";

/// A fresh tag for the VMM's write tracking (`Request::TrackWrites`).
fn tracking_tag() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

/// File in the VM directory naming the snapshot a `--diff` is taken against.
const PARENT_FILE: &str = "snapshot.parent";

pub fn create(
    home: &Home,
    vm: &str,
    name: Option<String>,
    diff: bool,
    stop: bool,
    json: bool,
) -> Result<()> {
    let dir = vm_dir(home, vm)?;
    let sock = dir.join("control.sock");
    if !sock.exists() {
        bail!("VM {vm} is not running");
    }
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("vm.json")).with_context(|| format!("VM {vm}: reading vm.json"))?,
    )?;
    let mem_bytes = meta["mem_mib"]
        .as_u64()
        .ok_or_else(|| anyhow!("vm.json lacks mem_mib"))?
        << 20;
    let vcpus = meta["vcpus"].as_u64().unwrap_or(1) as u8;
    let store = crate::store::open_with_remote(home, None, false)?;
    let parent = if diff {
        let p = std::fs::read_to_string(dir.join(PARENT_FILE)).map_err(|_| {
            anyhow!("VM {vm} has no earlier snapshot to diff against; take a full one first")
        })?;
        let (pid, prec) = record::load_checked(&store, p.trim())?;
        Some((pid, prec))
    } else {
        None
    };
    let t0 = Instant::now();
    let long = Duration::from_secs(600);
    // Tag of the write tracking that starts at this snapshot (TRACKING_FILE, once it is saved).
    let tag = tracking_tag();
    call(&sock, &Request::Pause, Duration::from_secs(30))?;
    // From here on, resume (or stop) the VM whatever happens. While paused: state, memory (a
    // diff's written pages, stored; or all of it copied into a staging buffer), committed
    // disks, write tracking restarted. The VM then runs on while the copy is stored.
    let captured = (|| -> Result<(serde_json::Value, CapturedMemory, Vec<record::DiskRef>)> {
        let state_path = dir.join("snapshot.state.json");
        call(
            &sock,
            &Request::SaveState {
                path: state_path.clone(),
            },
            long,
        )?;
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_path)?)?;
        let _ = std::fs::remove_file(&state_path);
        // A diff asks the VMM for just the pages written since the parent was saved; a VMM
        // that has not tracked them (restored in a new process since) streams all memory.
        let dirty = match &parent {
            Some((_, prec)) => diff_from_written_pages(&sock, &dir, &prec.memory, long)?,
            None => None,
        };
        // A full snapshot copies guest RAM straight out of the VMM process.
        let copied = match &parent {
            None => copy_from_vmm(&sock, mem_bytes),
            Some(_) => None,
        };
        let memory = match (dirty, copied) {
            (Some(staged), _) => CapturedMemory::Staged(staged, "tracked_writes"),
            (None, Some(staged)) => CapturedMemory::Staged(staged, "process_vm_readv"),
            (None, None) => {
                // Memory goes through a FIFO from the VMM.
                let fifo = dir.join("snapshot.memory.fifo");
                let _ = std::fs::remove_file(&fifo);
                let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
                // SAFETY: mkfifo on a NUL-terminated path we own.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("mkfifo");
                }
                let (s2, f2) = (sock.clone(), fifo.clone());
                let writer =
                    std::thread::spawn(move || call(&s2, &Request::SaveMemory { path: f2 }, long));
                let reader = std::fs::File::open(&fifo).context("opening the memory FIFO")?;
                let reader = std::io::BufReader::with_capacity(1 << 20, reader);
                let captured = match &parent {
                    // Hashed against the parent as it streams (rare: see above).
                    Some((_, prec)) => {
                        snapshotter::memory::capture_diff_from(&store, &prec.memory, reader)
                            .map(|(m, n)| CapturedMemory::Stored(m, n, "memory_stream"))
                    }
                    // Copied only: stored after the VM resumed.
                    None => snapshotter::memory::stage_stream(mem_bytes, reader)
                        .map(|s| CapturedMemory::Staged(s, "fifo")),
                };
                let wrote = writer
                    .join()
                    .map_err(|_| anyhow!("save_memory thread panicked"))?;
                let _ = std::fs::remove_file(&fifo);
                wrote?;
                captured?
            }
        };
        // Every virtio-blk device (in device order) becomes a committed blob; the VM's overlay
        // is rebased onto it and keeps running.
        let blk: Vec<bool> = state["virtio"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter(|d| d["device_type"] == vmm::devices::virtio::TYPE_BLOCK)
                    .map(|d| d["device"]["read_only"].as_bool().unwrap_or(false))
                    .collect()
            })
            .unwrap_or_default();
        let mut disks = Vec::new();
        for (i, read_only) in blk.into_iter().enumerate() {
            let r = call(&sock, &Request::CommitDisk { disk: i }, long).with_context(|| {
                format!("committing disk {i} (snapshots need store-backed disks)")
            })?;
            let b = r["blob"]
                .as_str()
                .ok_or_else(|| anyhow!("commit of disk {i} named no blob"))?;
            disks.push(record::DiskRef {
                blob: b.parse()?,
                read_only,
            });
        }
        if !stop {
            // Track writes from here on (still paused), so that the next --diff reads only
            // those pages. If this fails, that diff streams all memory instead.
            let req = Request::TrackWrites { since: tag.clone() };
            if let Err(e) = call(&sock, &req, Duration::from_secs(30)) {
                tracing::warn!("write tracking for diffs not started: {e:#}");
            }
        }
        Ok((state, memory, disks))
    })();
    let after = if stop { Request::Stop } else { Request::Resume };
    let resumed = call(&sock, &after, Duration::from_secs(30));
    let paused_ms = ms_since(t0);
    let (state, memory, disks) = captured?;
    resumed?;
    let (memory, changed, source) = match memory {
        CapturedMemory::Stored(m, n, from) => (m, n, from),
        CapturedMemory::Staged(s, via) => {
            let m = s.store(&store)?;
            let pages = if parent.is_some() {
                m.layers.last().and_then(|l| l.units()).unwrap_or(0)
            } else {
                0
            };
            (m, pages, via)
        }
    };
    let vsock_cid = state["virtio"].as_array().and_then(|v| {
        v.iter()
            .find(|d| d["device_type"] == 19)
            .and_then(|d| d["device"]["guest_cid"].as_u64())
    });
    let generation = state["genid"]["generation"].as_u64().unwrap_or(0);
    let rec = record::SnapshotRecord {
        format: record::SNAPSHOT_FORMAT,
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        cpu: record::CpuIdentity::host(),
        created: record::now(),
        vm: VmShape {
            mem_bytes,
            vcpus,
            cmdline: String::new(),
            vsock_cid,
        },
        state,
        memory,
        disks,
        parent: parent.as_ref().map(|(p, _)| *p),
        generation,
    };
    let name = name
        .clone()
        .unwrap_or_else(|| format!("{vm}-{}", record::now()));
    let id = record::save(&store, &rec, Some(&name))?;
    // The parent first: a tag left from an older snapshot never matches the VMM's new one.
    std::fs::write(dir.join(PARENT_FILE), id.to_hex())?;
    if stop {
        let _ = std::fs::remove_file(dir.join(TRACKING_FILE));
    } else {
        std::fs::write(dir.join(TRACKING_FILE), &tag)?;
    }
    let out = serde_json::json!({
        "snapshot": id.to_hex(),
        "name": name,
        "vm": vm,
        "diff": rec.parent.is_some(),
        "changed_pages": changed,
        // Where a diff's pages came from: the VMM's write tracking, or comparing all memory.
        "diff_from": rec.parent.is_some().then_some(source),
        // How a full snapshot's memory left the VMM process.
        "copied_via": rec.parent.is_none().then_some(source),
        "layers": rec.memory.layers.len(),
        "disks": rec.disks.len(),
        "stopped": stop,
        "paused_ms": paused_ms,
        "ms": ms_since(t0),
    });
    if json {
        print_json(&out)
    } else {
        println!("{}", id.to_hex());
        Ok(())
    }
}

fn ls(home: &Home, json: bool) -> Result<()> {
    let store = crate::store::open_with_remote(home, None, false)?;
    let mut rows = Vec::new();
    for (name, id) in record::list(&store)? {
        let r = record::load(&store, &id);
        rows.push(match r {
            Ok(r) => serde_json::json!({
                "name": name, "id": id.to_hex(), "mem_mib": r.vm.mem_bytes >> 20,
                "layers": r.memory.layers.len(), "created": r.created,
                "parent": r.parent.map(|p| p.to_hex()),
            }),
            Err(e) => {
                serde_json::json!({ "name": name, "id": id.to_hex(), "error": e.to_string() })
            }
        });
    }
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

fn inspect(home: &Home, snap: &str) -> Result<()> {
    let store = crate::store::open_with_remote(home, None, false)?;
    let id = record::resolve(&store, snap)?;
    let mut rec = serde_json::to_value(record::load(&store, &id)?)?;
    rec["state"] = serde_json::json!("(vCPU and device state omitted)");
    rec["id"] = serde_json::json!(id.to_hex());
    rec["working_set_chunks"] =
        serde_json::json!(record::working_set(&store, &id)?.map(|w| w.len()));
    print_json(&rec)
}

/// `kiln vm restore SNAP [-d]` (also `kiln snapshot restore`).
pub fn restore(home: &Home, a: RestoreArgs) -> Result<()> {
    let id = a.id.clone().unwrap_or_else(crate::cli::new_vm_id);
    let dir = vm_dir(home, &id)?;
    if dir.join("control.sock").exists() {
        bail!("VM {id} already exists");
    }
    std::fs::create_dir_all(&dir)?;
    let t_start = Instant::now();
    let store = crate::store::open_with_remote(home, None, false)?;
    // Check the snapshot before anything runs (also before detaching, for a clear error).
    let (snap_id, rec) = record::load_checked(&store, &a.snapshot)?;
    tracing::debug!(
        ms = ms_since(t_start),
        "restore: store open, snapshot record loaded"
    );
    for d in &rec.disks {
        // Only the manifest is needed now (a pulled snapshot has it); data is read lazily.
        store
            .manifest(&d.blob)
            .with_context(|| format!("disk blob {} of snapshot {}", d.blob, a.snapshot))?;
    }
    if a.detach {
        return detach(home, &a, &id, &dir);
    }
    let vsock = a
        .vsock_uds
        .clone()
        .unwrap_or_else(|| dir.join("vsock.sock"));
    // This VM's own overlays over the snapshot's disks (stale ones of an earlier VM with this
    // id, which is not running, go first).
    for i in 0..rec.disks.len() {
        let odir = dir.join(format!("disk{i}"));
        if odir.exists() {
            std::fs::remove_dir_all(&odir)
                .with_context(|| format!("removing old {}", odir.display()))?;
        }
    }
    let overlays = snapvm::disk_overlays(&store, &rec, &dir)?;
    let ident = Identity {
        serial_log: Some(dir.join("serial.log")),
        serial_stdout: false,
        vsock_uds: rec.vm.vsock_cid.map(|_| vsock.clone()),
        disks: overlays.clone(),
    };
    let t0 = Instant::now();
    let mem = match &a.memory_file {
        Some(f) => {
            let file =
                std::fs::File::open(f).with_context(|| format!("memory file {}", f.display()))?;
            RestoredMemory::Mapped(snapshotter::Mapping::file_private(
                &file,
                rec.memory.size as usize,
            )?)
        }
        None => RestoredMemory::Lazy(snapvm::lazy_memory(
            &store,
            &snap_id,
            &rec,
            LazyRestore {
                use_working_set: !a.no_working_set,
                record: true,
                on_fatal: snapshotter::lazy::exit_process_hook(),
            },
        )?),
    };
    tracing::debug!(ms = ms_since(t0), "restore: guest memory ready");
    // SAFETY: `mem` lives until the end of this function, after the VM has ended.
    let vm = Arc::new(unsafe { snapvm::build_vm(&rec, &mem, &ident) }?);
    tracing::debug!(ms = ms_since(t0), "restore: VM built");
    // Memory equals the snapshot now: track writes from here, before any vCPU runs, so the
    // first `--diff` against it takes only the written pages.
    let ctx = Arc::new(ControlContext {
        vm: vm.clone(),
        overlays: overlays.iter().map(|o| Some(o.clone())).collect(),
        id: id.clone(),
        tracking: Default::default(),
    });
    let tag = format!("{RESTORE_TAG}{}", tracking_tag());
    let tracked = match ctx.tracking.start(&vm, tag.clone()) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("not tracking writes (the first diff will read all memory): {e}");
            false
        }
    };
    tracing::debug!(ms = ms_since(t0), "restore: write tracking started");
    vm.start()?;
    tracing::info!(vm = %id, snapshot = %snap_id, ms = ms_since(t0), "restored");
    let meta = serde_json::json!({
        "id": id, "pid": std::process::id(), "kernel": format!("snapshot:{}", snap_id.to_hex()),
        "mem_mib": rec.vm.mem_bytes >> 20, "vcpus": rec.vm.vcpus,
        "disks": rec.disks.iter().map(|d| d.blob.to_hex()).collect::<Vec<_>>(),
        "started_unix": record::now(), "snapshot": snap_id.to_hex(),
    });
    std::fs::write(dir.join("vm.json"), serde_json::to_vec_pretty(&meta)?)?;
    std::fs::write(dir.join(PARENT_FILE), snap_id.to_hex())?;
    let _ = std::fs::remove_file(dir.join(TRACKING_FILE));
    if tracked {
        std::fs::write(dir.join(TRACKING_FILE), &tag)?;
    }
    let sock = dir.join("control.sock");
    control::serve(&sock, ctx).with_context(|| format!("control socket {}", sock.display()))?;
    // The pages the guest touches in its first seconds become the snapshot's working set, which
    // later restores prefetch in the background.
    let mut ended = None;
    if let Some(l) = mem.lazy() {
        ended = vm.wait_timeout(Duration::from_secs(2));
        if ended.is_none() {
            match snapvm::finish_recording(&store, &snap_id, l) {
                Ok(n) if n > 0 => tracing::info!(chunks = n, "recorded working set"),
                Ok(_) => {}
                Err(e) => tracing::warn!("recording the working set: {e}"),
            }
        }
    }
    let reason = match ended {
        Some(r) => r,
        None => vm.wait(),
    };
    let _ = std::fs::remove_file(&sock);
    for (i, o) in overlays.iter().enumerate() {
        // The VM's writes stay in its overlay (`kiln snapshot create` commits them).
        if let Err(e) = o.flush() {
            tracing::warn!(disk = i, "flushing the disk overlay: {e}");
        }
    }
    std::fs::write(
        dir.join("exit.json"),
        serde_json::to_vec_pretty(
            &serde_json::json!({ "reason": reason, "committed": vec![serde_json::Value::Null; overlays.len()] }),
        )?,
    )?;
    drop(vm);
    drop(mem);
    Ok(())
}

fn detach(home: &Home, a: &RestoreArgs, id: &str, dir: &Path) -> Result<()> {
    let log = std::fs::File::create(dir.join("vmm.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--home")
        .arg(home.root())
        .args(["snapshot", "restore", &a.snapshot, "--id", id]);
    if let Some(u) = &a.vsock_uds {
        cmd.arg("--vsock-uds").arg(std::path::absolute(u)?);
    }
    if let Some(f) = &a.memory_file {
        cmd.arg("--memory-file").arg(std::path::absolute(f)?);
    }
    if a.no_working_set {
        cmd.arg("--no-working-set");
    }
    use std::os::unix::process::CommandExt;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn().context("starting the VMM process")?;
    let t0 = Instant::now();
    while !dir.join("control.sock").exists() {
        if let Some(st) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
            bail!("VM {id} exited during restore ({st}):\n{log}");
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "VM {id} did not come up within 30 s (see {})",
                dir.join("vmm.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    println!("{id}");
    Ok(())
}

/// `kiln vm fork SNAP -n N`: N detached VMs over one copy-on-write memory file.
pub fn fork(home: &Home, a: ForkArgs) -> Result<()> {
    let ForkArgs {
        snapshot,
        count,
        vsock_dir,
    } = a;
    let snap = snapshot.as_str();
    let store = crate::store::open_with_remote(home, None, false)?;
    let (snap_id, rec) = record::load_checked(&store, snap)?;
    let mdir = home.root().join("snapshots").join(snap_id.to_hex());
    std::fs::create_dir_all(&mdir)?;
    let file = mdir.join("memory.img");
    snapvm::materialize(&store, &rec, &file)?;
    if let Some(d) = &vsock_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    for _ in 0..count {
        let id = crate::cli::new_vm_id();
        let a = RestoreArgs {
            snapshot: snap_id.to_hex(),
            detach: true,
            id: Some(id.clone()),
            vsock_uds: vsock_dir.as_ref().map(|d| d.join(format!("{id}.vsock"))),
            memory_file: Some(file.clone()),
            no_working_set: true,
        };
        let dir = vm_dir(home, &id)?;
        std::fs::create_dir_all(&dir)?;
        detach(home, &a, &id, &dir)?;
    }
    Ok(())
}
