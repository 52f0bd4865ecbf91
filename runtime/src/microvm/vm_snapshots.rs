//! Snapshots of running VMs into the block store; listing, inspecting, removing, pushing and
//! pulling them; restoring and forking them into new VMM processes.
//!
//! [`create`] drives the VM's control socket (pause, save_state, save_memory into a FIFO that is
//! streamed straight into the store, commit_disk, resume/stop). A diff snapshot hashes the
//! streamed memory chunk by chunk and stores only chunks that differ from the parent (the VM's
//! previous snapshot, or the one it was restored from).
//!
//! [`restore_foreground`] runs the VMM in this process (as `kiln vm run` does: control socket,
//! serial log and vm.json in the VM's directory) with guest memory paged in lazily by a
//! userfaultfd handler; [`fork`] starts N such processes over one copy-on-write memory file.
//!
//! Disks: `create` commits every virtio-blk disk (store overlays only) into the record; each
//! restored or forked VM gets its own fresh overlay over those blobs in its directory.

use super::error::{Context, Error, Result};
use super::vms::{self, Launched, Launcher, VmMeta};
use kiln_blockstore::{names, BlobId, Store};
use kiln_snapshotter::record::{self, VmShape};
use kiln_snapshotter::vm::{self as snapvm, Identity, LazyRestore, RestoredMemory};
use kiln_vmm::control::{self, ControlContext, Request};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn call(sock: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value> {
    control::call(sock, req, timeout).map_err(|e| Error::Failed(format!("{}: {e}", sock.display())))
}

fn json_err(what: &str) -> impl FnOnce(serde_json::Error) -> Error + '_ {
    move |e| Error::Failed(format!("{what}: {e}"))
}

/// File in the VM directory holding the tag of the VMM's write tracking since the snapshot in
/// PARENT_FILE (see `Request::TrackWrites`).
pub const TRACKING_FILE: &str = "snapshot.tracking";
/// File in the VM directory naming the snapshot a diff is taken against.
pub const PARENT_FILE: &str = "snapshot.parent";
/// Prefix of the tracking tag a restored VMM starts with (see `capture_pages_from`).
const RESTORE_TAG: &str = "restore-";

/// Milliseconds since `t`, for reports and timing logs.
fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

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

/// The snapshot the VM in `dir` was last snapshotted as or restored from (a diff's parent).
pub fn parent_of(dir: &Path) -> Option<BlobId> {
    std::fs::read_to_string(dir.join(PARENT_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// A diff layer staged from the pages the VMM saw written since the VM's last snapshot or its
/// restore (the tracking tag in TRACKING_FILE, `save_dirty_memory`), or `None` if it did not
/// track them (a snapshot that failed after restarting the tracking, a VMM that could not).
fn diff_from_written_pages(
    sock: &Path,
    dir: &Path,
    parent: &kiln_snapshotter::MemoryImage,
    timeout: Duration,
) -> Result<Option<kiln_snapshotter::memory::Staged>> {
    let Ok(since) = std::fs::read_to_string(dir.join(TRACKING_FILE)) else {
        return Ok(None);
    };
    let path = dir.join("snapshot.dirty");
    let req = Request::SaveDirtyMemory {
        path: path.clone(),
        since: since.trim().to_string(),
    };
    if let Err(e) = call(sock, &req, timeout) {
        if e.to_string().contains("were not tracked") {
            return Ok(None);
        }
        return Err(e);
    }
    let f = std::fs::File::open(&path).map_err(Error::io("opening", &path))?;
    let restored = since.starts_with(RESTORE_TAG);
    let r =
        kiln_snapshotter::memory::stage_pages_from(parent, std::io::BufReader::new(f), restored);
    let _ = std::fs::remove_file(&path);
    Ok(Some(r?))
}

/// Guest RAM copied out of the (paused) VMM process with process_vm_readv, or `None` if that is
/// not possible here (then it streams through a FIFO).
fn copy_from_vmm(sock: &Path, mem_bytes: u64) -> Option<kiln_snapshotter::memory::Staged> {
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
    match kiln_snapshotter::memory::stage_process(pid, &regions) {
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
    Stored(kiln_snapshotter::MemoryImage, u64, &'static str),
    /// Copied out (and how), to be stored once the VM runs again.
    Staged(kiln_snapshotter::memory::Staged, &'static str),
}

/// How to snapshot a running VM.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Snapshot name (`None`: `<vm>-<unix time>`).
    pub name: Option<String>,
    /// Store only the memory pages that changed since the VM's previous snapshot (or the one
    /// it was restored from).
    pub diff: bool,
    /// Stop the VM after the snapshot (suspend) instead of resuming it.
    pub stop: bool,
}

/// A snapshot made by [`create`].
#[derive(Clone, Debug)]
pub struct Created {
    pub id: BlobId,
    pub name: String,
    pub record: record::SnapshotRecord,
    /// What `kiln snapshot create --json` prints (timings, diff source, ...).
    pub report: serde_json::Value,
}

/// Snapshots the running VM `vm` in `dir` into `store`.
pub fn create(store: &Store, dir: &Path, vm: &str, o: &CreateOptions) -> Result<Created> {
    let sock = vms::control_socket(dir);
    if !sock.exists() {
        return Err(Error::NotRunning(vm.to_string()));
    }
    let (mem_bytes, vcpus) = vm_shape(dir, vm)?;
    let stop = o.stop;
    let parent = if o.diff {
        Some(diff_parent(store, dir, vm)?)
    } else {
        None
    };
    let t0 = Instant::now();
    // Tag of the write tracking that starts at this snapshot (TRACKING_FILE, once it is saved).
    let tag = tracking_tag();
    call(&sock, &Request::Pause, Duration::from_secs(30))?;
    // From here on, resume (or stop) the VM whatever happens. While paused: state, memory (a
    // diff's written pages, stored; or all of it copied into a staging buffer), committed
    // disks, write tracking restarted. The VM then runs on while the copy is stored.
    let paused = Paused {
        store,
        dir,
        sock: &sock,
        parent: parent.as_ref(),
        mem_bytes,
    };
    let captured = paused.capture(stop, &tag);
    // A VM to be stopped stays paused until its snapshot is saved: a caller that dies before
    // leaves a VM that can run on (resumed), never one stopped with its memory lost.
    let resumed = match (&captured, stop) {
        (Ok(_), true) => Ok(serde_json::Value::Null),
        _ => call(&sock, &Request::Resume, Duration::from_secs(30)),
    };
    let paused_ms = ms_since(t0);
    let (state, memory, disks) = captured?;
    resumed?;
    let shape = VmShape {
        mem_bytes,
        vcpus,
        cmdline: String::new(),
        vsock_cid: None,
    };
    let saved = save_record(store, vm, o, shape, state, memory, disks, parent.as_ref());
    if stop {
        // Saved: the VM stops. Not saved: it runs on as if no snapshot had been asked for.
        let after = if saved.is_ok() {
            Request::Stop
        } else {
            Request::Resume
        };
        let ended = call(&sock, &after, Duration::from_secs(30));
        if saved.is_ok() {
            ended?;
        }
    }
    let (id, rec, name, changed, source) = saved?;
    // The parent first: a tag left from an older snapshot never matches the VMM's new one.
    let pf = dir.join(PARENT_FILE);
    std::fs::write(&pf, id.to_hex()).map_err(Error::io("writing", &pf))?;
    let tf = dir.join(TRACKING_FILE);
    if stop {
        let _ = std::fs::remove_file(&tf);
    } else {
        std::fs::write(&tf, &tag).map_err(Error::io("writing", &tf))?;
    }
    let report = serde_json::json!({
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
    Ok(Created {
        id,
        name,
        record: rec,
        report,
    })
}

/// The VM's memory size in bytes and vCPU count, from its `vm.json`.
fn vm_shape(dir: &Path, vm: &str) -> Result<(u64, u8)> {
    let meta_path = dir.join("vm.json");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&meta_path)
            .map_err(|e| Error::Failed(format!("VM {vm}: reading vm.json: {e}")))?,
    )
    .map_err(json_err("vm.json"))?;
    let mem_bytes = meta["mem_mib"]
        .as_u64()
        .ok_or_else(|| Error::Failed("vm.json lacks mem_mib".into()))?
        << 20;
    let vcpus = meta["vcpus"].as_u64().unwrap_or(1) as u8;
    Ok((mem_bytes, vcpus))
}

/// The snapshot a diff of the VM in `dir` is taken against: its previous one.
fn diff_parent(store: &Store, dir: &Path, vm: &str) -> Result<(BlobId, record::SnapshotRecord)> {
    let p = std::fs::read_to_string(dir.join(PARENT_FILE)).map_err(|_| {
        Error::Invalid(format!(
            "VM {vm} has no earlier snapshot to diff against; take a full one first"
        ))
    })?;
    Ok(record::load_checked(store, p.trim())?)
}

/// A paused VM being captured.
struct Paused<'a> {
    store: &'a Store,
    dir: &'a Path,
    sock: &'a Path,
    parent: Option<&'a (BlobId, record::SnapshotRecord)>,
    mem_bytes: u64,
}

/// How long one step of a capture may take.
const LONG: Duration = Duration::from_secs(600);

impl Paused<'_> {
    /// State, memory and committed disks; restarts write tracking unless the VM is to stop.
    fn capture(
        &self,
        stop: bool,
        tag: &str,
    ) -> Result<(serde_json::Value, CapturedMemory, Vec<record::DiskRef>)> {
        let state = self.state()?;
        let memory = self.memory()?;
        let disks = self.commit_disks(&state)?;
        if !stop {
            // Track writes from here on (still paused), so that the next diff reads only
            // those pages. If this fails, that diff streams all memory instead.
            let req = Request::TrackWrites { since: tag.into() };
            if let Err(e) = call(self.sock, &req, Duration::from_secs(30)) {
                tracing::warn!("write tracking for diffs not started: {e}");
            }
        }
        Ok((state, memory, disks))
    }

    /// The VMM's `VmState`, as JSON.
    fn state(&self) -> Result<serde_json::Value> {
        let state_path = self.dir.join("snapshot.state.json");
        call(
            self.sock,
            &Request::SaveState {
                path: state_path.clone(),
            },
            LONG,
        )?;
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&state_path).map_err(Error::io("reading", &state_path))?,
        )
        .map_err(json_err("VM state"))?;
        let _ = std::fs::remove_file(&state_path);
        Ok(state)
    }

    fn memory(&self) -> Result<CapturedMemory> {
        // A diff asks the VMM for just the pages written since the parent was saved; a VMM
        // that has not tracked them (restored in a new process since) streams all memory.
        let dirty = match self.parent {
            Some((_, prec)) => diff_from_written_pages(self.sock, self.dir, &prec.memory, LONG)?,
            None => None,
        };
        // A full snapshot copies guest RAM straight out of the VMM process.
        let copied = match self.parent {
            None => copy_from_vmm(self.sock, self.mem_bytes),
            Some(_) => None,
        };
        Ok(match (dirty, copied) {
            (Some(staged), _) => CapturedMemory::Staged(staged, "tracked_writes"),
            (None, Some(staged)) => CapturedMemory::Staged(staged, "process_vm_readv"),
            (None, None) => self.memory_through_fifo()?,
        })
    }

    /// Memory through a FIFO the VMM writes it into.
    fn memory_through_fifo(&self) -> Result<CapturedMemory> {
        let fifo = self.dir.join("snapshot.memory.fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Invalid(format!("{}: NUL in path", fifo.display())))?;
        // SAFETY: mkfifo on a NUL-terminated path we own.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(Error::io("mkfifo", &fifo)(std::io::Error::last_os_error()));
        }
        let (s2, f2) = (self.sock.to_path_buf(), fifo.clone());
        let writer = std::thread::spawn(move || call(&s2, &Request::SaveMemory { path: f2 }, LONG));
        let reader =
            std::fs::File::open(&fifo).map_err(Error::io("opening the memory FIFO", &fifo))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, reader);
        let captured = match self.parent {
            // Hashed against the parent as it streams (rare: see above).
            Some((_, prec)) => {
                kiln_snapshotter::memory::capture_diff_from(self.store, &prec.memory, reader)
                    .map(|(m, n)| CapturedMemory::Stored(m, n, "memory_stream"))
            }
            // Copied only: stored after the VM resumed.
            None => kiln_snapshotter::memory::stage_stream(self.mem_bytes, reader)
                .map(|s| CapturedMemory::Staged(s, "fifo")),
        };
        let wrote = writer
            .join()
            .map_err(|_| Error::Failed("save_memory thread panicked".into()))?;
        let _ = std::fs::remove_file(&fifo);
        wrote?;
        Ok(captured?)
    }

    /// Every virtio-blk device (in device order) becomes a committed blob; the VM's overlay
    /// is rebased onto it and keeps running.
    fn commit_disks(&self, state: &serde_json::Value) -> Result<Vec<record::DiskRef>> {
        let blk: Vec<bool> = state["virtio"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter(|d| d["device_type"] == kiln_vmm::devices::virtio::TYPE_BLOCK)
                    .map(|d| d["device"]["read_only"].as_bool().unwrap_or(false))
                    .collect()
            })
            .unwrap_or_default();
        let mut disks = Vec::new();
        for (i, read_only) in blk.into_iter().enumerate() {
            let r = call(self.sock, &Request::CommitDisk { disk: i }, LONG).with_context(|| {
                format!("committing disk {i} (snapshots need store-backed disks)")
            })?;
            let b = r["blob"]
                .as_str()
                .ok_or_else(|| Error::Failed(format!("commit of disk {i} named no blob")))?;
            disks.push(record::DiskRef {
                blob: b
                    .parse()
                    .map_err(|e| Error::Failed(format!("commit of disk {i}: {b:?}: {e:?}")))?,
                read_only,
            });
        }
        Ok(disks)
    }
}

/// Stores the captured memory (if only staged) and the snapshot record under its name.
/// Returns the id, record, name, changed pages and where the memory came from.
#[allow(clippy::too_many_arguments)]
fn save_record(
    store: &Store,
    vm: &str,
    o: &CreateOptions,
    mut shape: VmShape,
    state: serde_json::Value,
    memory: CapturedMemory,
    disks: Vec<record::DiskRef>,
    parent: Option<&(BlobId, record::SnapshotRecord)>,
) -> Result<(BlobId, record::SnapshotRecord, String, u64, &'static str)> {
    let (memory, changed, source) = match memory {
        CapturedMemory::Stored(m, n, from) => (m, n, from),
        CapturedMemory::Staged(s, via) => {
            let m = s.store(store)?;
            let pages = if parent.is_some() {
                m.layers.last().and_then(|l| l.units()).unwrap_or(0)
            } else {
                0
            };
            (m, pages, via)
        }
    };
    shape.vsock_cid = state["virtio"].as_array().and_then(|v| {
        v.iter()
            .find(|d| d["device_type"] == kiln_vmm::devices::virtio::TYPE_VSOCK)
            .and_then(|d| d["device"]["guest_cid"].as_u64())
    });
    let generation = state["genid"]["generation"].as_u64().unwrap_or(0);
    let rec = record::SnapshotRecord {
        format: record::SNAPSHOT_FORMAT,
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        cpu: record::CpuIdentity::host(),
        created: record::now(),
        vm: shape,
        state,
        memory,
        disks,
        parent: parent.map(|(p, _)| *p),
        generation,
    };
    let name = o
        .name
        .clone()
        .unwrap_or_else(|| format!("{vm}-{}", record::now()));
    let id = record::save(store, &rec, Some(&name))?;
    Ok((id, rec, name, changed, source))
}

/// A row of `kiln snapshot ls`: name, id, mem_mib, layers, created, parent (or error).
pub fn list(store: &Store) -> Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    for (name, id) in record::list(store)? {
        rows.push(match record::load(store, &id) {
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
    Ok(rows)
}

/// A snapshot's record without the raw vCPU and device state, with its id and working set size.
pub fn inspect(store: &Store, snap: &str) -> Result<serde_json::Value> {
    let id = record::resolve(store, snap)?;
    let mut rec = serde_json::to_value(record::load(store, &id)?).map_err(json_err("record"))?;
    rec["state"] = serde_json::json!("(vCPU and device state omitted)");
    rec["id"] = serde_json::json!(id.to_hex());
    rec["working_set_chunks"] =
        serde_json::json!(record::working_set(store, &id)?.map(|w| w.len()));
    Ok(rec)
}

/// Removes a snapshot's name (its blobs go at the next gc).
pub fn remove(store: &Store, snap: &str) -> Result<()> {
    let n = names::VM_SNAPSHOT.strip(snap).unwrap_or(snap);
    if !store.remove_name(&names::VM_SNAPSHOT.name(n))? {
        return Err(Error::Invalid(format!("no snapshot named {n:?}")));
    }
    Ok(())
}

/// Pushes a snapshot to the store's remote; returns its id and the bytes uploaded.
pub fn push(store: &Store, snap: &str) -> Result<(BlobId, u64)> {
    let id = record::resolve(store, snap)?;
    let bytes = record::push(store, &id)?;
    Ok((id, bytes))
}

/// Makes a snapshot pushed from another home restorable here (manifests now, pages lazily).
pub fn pull(store: &Store, id: &str, name: Option<&str>) -> Result<BlobId> {
    let id: BlobId = id
        .parse()
        .map_err(|e| Error::Invalid(format!("snapshot id: {e}")))?;
    record::pull(store, &id, name)?;
    Ok(id)
}

/// How to restore a snapshot into a VM.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RestoreOptions {
    /// Snapshot name or id.
    pub snapshot: String,
    pub id: String,
    /// The VM's directory.
    pub dir: PathBuf,
    /// Host Unix socket for the VM's vsock (default: `dir/vsock.sock`).
    pub vsock_uds: Option<PathBuf>,
    /// Map this materialized memory file copy-on-write instead of paging from the store.
    pub memory_file: Option<PathBuf>,
    /// Do not prefetch the recorded working set.
    pub no_working_set: bool,
    /// The TAP backing the restored VM's NIC (the guest keeps its MAC and sees no change).
    /// Each restore or fork needs its own TAP, usually in its own network namespace, where the
    /// same guest address can be reused. `None`: the NIC has no host side (frames dropped).
    pub net: Option<vms::NicSpec>,
}

impl RestoreOptions {
    pub fn new(
        snapshot: impl Into<String>,
        id: impl Into<String>,
        dir: impl Into<PathBuf>,
    ) -> Self {
        RestoreOptions {
            snapshot: snapshot.into(),
            id: id.into(),
            dir: dir.into(),
            vsock_uds: None,
            memory_file: None,
            no_working_set: false,
            net: None,
        }
    }

    /// The vsock socket the restored VM listens on.
    pub fn vsock(&self) -> PathBuf {
        self.vsock_uds
            .clone()
            .unwrap_or_else(|| self.dir.join("vsock.sock"))
    }
}

/// Checks that the snapshot can be restored (record compatible, disk manifests present)
/// before anything runs; also before detaching, for a clear error. Creates the VM directory.
pub fn check_restore(
    store: &Store,
    o: &RestoreOptions,
) -> Result<(BlobId, record::SnapshotRecord)> {
    vms::check_id(&o.id)?;
    if vms::is_running(&o.dir) {
        return Err(Error::Invalid(format!("VM {} already exists", o.id)));
    }
    std::fs::create_dir_all(&o.dir).map_err(Error::io("creating", &o.dir))?;
    let (snap_id, rec) = record::load_checked(store, &o.snapshot)?;
    for d in &rec.disks {
        // Only the manifest is needed now (a pulled snapshot has it); data is read lazily.
        store
            .manifest(&d.blob)
            .with_context(|| format!("disk blob {} of snapshot {}", d.blob, o.snapshot))?;
    }
    Ok((snap_id, rec))
}

/// Restores the snapshot and runs the VM in this process until it ends (`kiln snapshot
/// restore` without `-d`). Serial output goes to `serial.log` and, with `serial_stdout`, to
/// stdout too (as `kiln vm run` does).
pub fn restore_foreground(store: &Store, o: &RestoreOptions, serial_stdout: bool) -> Result<()> {
    let t_start = Instant::now();
    let (snap_id, rec) = check_restore(store, o)?;
    tracing::debug!(
        ms = ms_since(t_start),
        "restore: store open, snapshot record loaded"
    );
    let dir = &o.dir;
    let id = &o.id;
    let vsock = o.vsock();
    // This VM's own overlays over the snapshot's disks (stale ones of an earlier VM with this
    // id, which is not running, go first).
    for i in 0..rec.disks.len() {
        let odir = dir.join(format!("disk{i}"));
        if odir.exists() {
            std::fs::remove_dir_all(&odir).map_err(Error::io("removing old", &odir))?;
        }
    }
    let overlays = snapvm::disk_overlays(store, &rec, dir)?;
    let ident = Identity {
        serial_log: Some(dir.join("serial.log")),
        serial_stdout,
        vsock_uds: rec.vm.vsock_cid.map(|_| vsock.clone()),
        disks: overlays.clone(),
        net: o.net.clone(),
    };
    let t0 = Instant::now();
    let mem = match &o.memory_file {
        Some(f) => {
            let file = std::fs::File::open(f).map_err(Error::io("memory file", f))?;
            RestoredMemory::Mapped(
                kiln_snapshotter::Mapping::file_private(&file, rec.memory.size as usize)
                    .map_err(Error::io("mapping memory file", f))?,
            )
        }
        None => RestoredMemory::Lazy(snapvm::lazy_memory(
            store,
            &snap_id,
            &rec,
            LazyRestore {
                use_working_set: !o.no_working_set,
                record: true,
                on_fatal: kiln_snapshotter::lazy::exit_process_hook(),
            },
        )?),
    };
    tracing::debug!(ms = ms_since(t0), "restore: guest memory ready");
    // SAFETY: `mem` lives until the end of this function, after the VM has ended.
    let vm = Arc::new(unsafe { snapvm::build_vm(&rec, &mem, &ident) }?);
    tracing::debug!(ms = ms_since(t0), "restore: VM built");
    // Memory equals the snapshot now: track writes from here, before any vCPU runs, so the
    // first diff against it takes only the written pages.
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
    let meta = VmMeta {
        id: id.clone(),
        pid: std::process::id(),
        kernel: format!("snapshot:{}", snap_id.to_hex()).into(),
        mem_mib: rec.vm.mem_bytes >> 20,
        vcpus: rec.vm.vcpus,
        disks: rec.disks.iter().map(|d| d.blob.to_hex()).collect(),
        started_unix: record::now(),
        snapshot: Some(snap_id.to_hex()),
    };
    vms::write_json(&dir.join("vm.json"), &meta)?;
    let pf = dir.join(PARENT_FILE);
    std::fs::write(&pf, snap_id.to_hex()).map_err(Error::io("writing", &pf))?;
    let tf = dir.join(TRACKING_FILE);
    let _ = std::fs::remove_file(&tf);
    if tracked {
        std::fs::write(&tf, &tag).map_err(Error::io("writing", &tf))?;
    }
    let sock = vms::control_socket(dir);
    control::serve(&sock, ctx).map_err(Error::io("serving the control socket", &sock))?;
    // The pages the guest touches in its first seconds become the snapshot's working set, which
    // later restores prefetch in the background.
    let mut ended = None;
    if let Some(l) = mem.lazy() {
        ended = vm.wait_timeout(Duration::from_secs(2));
        if ended.is_none() {
            match snapvm::finish_recording(store, &snap_id, l) {
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
    vms::write_json(
        &dir.join("exit.json"),
        &vms::VmExit {
            reason,
            committed: vec![None; overlays.len()],
        },
    )?;
    drop(vm);
    drop(mem);
    Ok(())
}

/// Checks the snapshot, then restores it in a detached VMM process (see [`Launcher::restore`]).
pub fn restore_detached(
    store: &Store,
    launcher: &Launcher,
    o: &RestoreOptions,
) -> Result<Launched> {
    check_restore(store, o)?;
    launcher.restore(o)
}

/// `kiln vm fork SNAP -n N`: N detached VMs of the CLI (in `KILN_HOME/vms`) over one
/// copy-on-write memory file (materialized once in `KILN_HOME/snapshots/<id>/memory.img`).
/// Fork i listens on `vsock_dir/<id>.vsock` if a directory is given, and gets `nets[i]` as its
/// NIC's TAP (`nets` is empty, or has one per fork: clones never share a TAP; without one a
/// fork's NIC drops its frames). `started` is called with each VM's id as it comes up.
pub fn fork(
    store: &Store,
    launcher: &Launcher,
    snapshot: &str,
    count: usize,
    vsock_dir: Option<&Path>,
    nets: &[vms::NicSpec],
    started: &mut dyn FnMut(&str),
) -> Result<Vec<Launched>> {
    if !nets.is_empty() && nets.len() != count {
        return Err(Error::Invalid(format!(
            "{count} forks need {count} TAPs (one each), {} given",
            nets.len()
        )));
    }
    let (snap_id, rec) = record::load_checked(store, snapshot)?;
    let mdir = launcher.home.join("snapshots").join(snap_id.to_hex());
    std::fs::create_dir_all(&mdir).map_err(Error::io("creating", &mdir))?;
    let file = mdir.join("memory.img");
    snapvm::materialize(store, &rec, &file)?;
    if let Some(d) = vsock_dir {
        std::fs::create_dir_all(d).map_err(Error::io("creating", d))?;
    }
    let mut out = Vec::new();
    for i in 0..count {
        let id = vms::new_vm_id();
        let dir = vms::vms_dir(&launcher.home).join(&id);
        let o = RestoreOptions {
            snapshot: snap_id.to_hex(),
            id: id.clone(),
            dir,
            vsock_uds: vsock_dir.map(|d| d.join(format!("{id}.vsock"))),
            memory_file: Some(file.clone()),
            no_working_set: true,
            net: nets.get(i).cloned(),
        };
        std::fs::create_dir_all(&o.dir).map_err(Error::io("creating", &o.dir))?;
        let l = launcher.restore(&o)?;
        started(&id);
        out.push(l);
    }
    Ok(out)
}
