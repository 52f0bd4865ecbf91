//! Snapshots of live VMs and VMs built from snapshots, on top of `kiln_vmm::Vm`.
//!
//! Dirty tracking for diff snapshots: the KVM dirty log sees the guest's writes, the VMM's
//! dirty bitmap (`kiln_vmm::memory::take_written`: vm-memory's per-region bitmap plus the io_uring
//! buffers the block device marks) sees the VMM's own writes into guest memory (virtqueue rings,
//! device buffers). Their union is exact, so a diff reads only the dirty pages.

use crate::lazy::{FatalHook, LazyMemory, LazyOptions};
use crate::mapping::Mapping;
use crate::memory::{self, DirtyPages, HostRegion, ImageSource};
use crate::record::{self, CpuIdentity, DiskRef, SnapshotRecord, VmShape, SNAPSHOT_FORMAT};
use kiln_blockstore::{BlobId, Store};
use kiln_vmm::devices::virtio::block::{BlockState, DiskBackend};
use kiln_vmm::devices::virtio::net::NicSpec;
use kiln_vmm::devices::virtio::persist::{DeviceResources, DeviceState, RestoredDisk};
use kiln_vmm::memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use kiln_vmm::{GuestMemorySource, Vm, VmConfig, VmState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use vm_memory::GuestAddress;

/// Errors of VM-level snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Lazy(#[from] crate::lazy::LazyError),
    #[error("VMM: {0}")]
    Vmm(#[from] kiln_vmm::Error),
    #[error("block store: {0}")]
    Store(#[from] kiln_blockstore::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapError {
    let w = what.into();
    move |e| SnapError::Io(w, e)
}

/// The VM's RAM as host regions in image order.
pub fn host_regions(vm: &Vm) -> Vec<HostRegion> {
    vm.memory_regions()
        .iter()
        .map(|r| HostRegion {
            host_addr: r.host_addr as *const u8,
            size: r.size as usize,
        })
        .collect()
}

/// Tracks pages written since the last capture: by the guest (KVM dirty log) and by the VMM.
pub struct DirtyTracker {
    _private: (),
}

impl DirtyTracker {
    /// Turns on KVM dirty logging and clears the log; from now on guest writes are tracked.
    pub fn start(vm: &Vm) -> Result<DirtyTracker, SnapError> {
        vm.set_dirty_logging(true)?;
        for r in vm.memory_regions() {
            vm.take_dirty_bitmap(r.slot)?;
            kiln_vmm::memory::take_written(vm.memory(), r.slot);
        }
        Ok(DirtyTracker { _private: () })
    }

    /// Pages written since `start` or the previous `take`, and restarts tracking.
    pub fn take(&self, vm: &Vm) -> Result<DirtyPages, SnapError> {
        let mut per = Vec::new();
        for r in vm.memory_regions() {
            let mut bits = vm.take_dirty_bitmap(r.slot)?;
            let vmm_bits = kiln_vmm::memory::take_written(vm.memory(), r.slot).unwrap_or_default();
            for (a, b) in bits.iter_mut().zip(&vmm_bits) {
                *a |= *b;
            }
            per.push((r.size / 4096, bits));
        }
        Ok(DirtyPages::from_regions(&per))
    }
}

/// What to snapshot besides the VM itself.
pub struct SnapshotRequest<'a> {
    pub shape: VmShape,
    /// Store name (the record is named `snapshot/<name>`).
    pub name: Option<&'a str>,
    /// Diff against this parent using `tracker`'s dirty pages.
    pub parent: Option<(BlobId, &'a SnapshotRecord)>,
    pub tracker: Option<&'a DirtyTracker>,
    pub disks: Vec<DiskRef>,
}

/// What a capture cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureReport {
    pub snapshot: BlobId,
    pub diff: bool,
    pub dirty_pages: u64,
    pub state_ms: f64,
    /// Copying memory out of the VM and storing it.
    pub memory_ms: f64,
    /// Of memory_ms: copying memory out of the paused VM ([`snapshot_begin`]; 0 when streamed
    /// straight into the store).
    pub copy_ms: f64,
    pub total_ms: f64,
}

/// Snapshots a paused VM: state, memory (full, or a diff layer over the parent), record.
/// The VM stays paused; the caller resumes or stops it.
pub fn snapshot(
    store: &Store,
    vm: &Vm,
    req: SnapshotRequest,
) -> Result<(SnapshotRecord, CaptureReport), SnapError> {
    if req.parent.is_some() {
        // A diff copies its few pages anyway: no difference to taking them in two steps.
        return snapshot_begin(vm, req)?.finish(store);
    }
    let t0 = Instant::now();
    let state = save_state(vm)?;
    if let Some(t) = req.tracker {
        t.take(vm)?; // restart tracking at this snapshot
    }
    let t1 = Instant::now();
    // SAFETY: the VM is paused (save_state checked) and its memory stays mapped. Streamed
    // straight into the store: no copy of guest memory is held.
    let memory = unsafe { memory::capture_full(store, &host_regions(vm))? };
    let t2 = Instant::now();
    let pending = PendingSnapshot {
        req,
        state,
        memory: None,
        dirty_pages: 0,
        t0,
        state_ms: ms(t0, t1),
        copy_ms: 0.0,
    };
    pending.save(store, memory, None, ms(t1, t2))
}

/// A snapshot whose state and memory are copied out of the paused VM but not stored yet: the
/// caller may resume the VM before [`PendingSnapshot::finish`] stores them, so the VM pauses
/// only for the copy (no hashing, compression or fsync). The copy holds the non-zero (full) or
/// dirty (diff) pages in host memory until stored.
pub struct PendingSnapshot<'a> {
    req: SnapshotRequest<'a>,
    state: serde_json::Value,
    memory: Option<memory::Staged>,
    dirty_pages: u64,
    t0: Instant,
    state_ms: f64,
    copy_ms: f64,
}

/// First half of a snapshot of a paused VM: copies state and memory (see [`PendingSnapshot`]).
pub fn snapshot_begin<'a>(
    vm: &Vm,
    req: SnapshotRequest<'a>,
) -> Result<PendingSnapshot<'a>, SnapError> {
    let t0 = Instant::now();
    let state = save_state(vm)?;
    let t1 = Instant::now();
    let regions = host_regions(vm);
    let (staged, dirty_pages) = match (&req.parent, req.tracker) {
        (Some((_, prec)), Some(tracker)) => {
            let dirty = tracker.take(vm)?;
            // SAFETY: the VM is paused (save_state checked) and its memory stays mapped.
            let s = unsafe { memory::stage_diff(&prec.memory, &regions, &dirty)? };
            (s, dirty.count())
        }
        (Some(_), None) => {
            return Err(SnapError::Invalid(
                "a diff snapshot needs dirty tracking since the parent".into(),
            ))
        }
        (None, tracker) => {
            if let Some(t) = tracker {
                t.take(vm)?; // restart tracking at this snapshot
            }
            // SAFETY: as above.
            (unsafe { memory::stage_full(&regions)? }, 0)
        }
    };
    let t2 = Instant::now();
    Ok(PendingSnapshot {
        req,
        state,
        memory: Some(staged),
        dirty_pages,
        t0,
        state_ms: ms(t0, t1),
        copy_ms: ms(t1, t2),
    })
}

impl PendingSnapshot<'_> {
    /// How long the VM had to stay paused for this snapshot (state + memory copy).
    pub fn pause_ms(&self) -> f64 {
        self.state_ms + self.copy_ms
    }

    /// Stores the copied memory and the record. The VM may run meanwhile.
    pub fn finish(mut self, store: &Store) -> Result<(SnapshotRecord, CaptureReport), SnapError> {
        let t = Instant::now();
        let staged = self.memory.take().expect("staged memory is stored once");
        let memory = staged.store(store)?;
        let parent = self.req.parent.as_ref().map(|(pid, _)| *pid);
        let store_ms = ms(t, Instant::now());
        self.save(store, memory, parent, store_ms)
    }

    fn save(
        self,
        store: &Store,
        memory: memory::MemoryImage,
        parent: Option<BlobId>,
        store_ms: f64,
    ) -> Result<(SnapshotRecord, CaptureReport), SnapError> {
        let generation = self.state["genid"]["generation"].as_u64().unwrap_or(0);
        let rec = SnapshotRecord {
            format: SNAPSHOT_FORMAT,
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            cpu: CpuIdentity::host(),
            created: record::now(),
            vm: self.req.shape,
            state: self.state,
            memory,
            disks: self.req.disks,
            parent,
            generation,
        };
        let id = record::save(store, &rec, self.req.name)?;
        let report = CaptureReport {
            snapshot: id,
            diff: rec.parent.is_some(),
            dirty_pages: self.dirty_pages,
            state_ms: self.state_ms,
            memory_ms: self.copy_ms + store_ms,
            copy_ms: self.copy_ms,
            total_ms: ms(self.t0, Instant::now()),
        };
        Ok((rec, report))
    }
}

fn save_state(vm: &Vm) -> Result<serde_json::Value, SnapError> {
    let state = vm.save_state()?;
    serde_json::to_value(&state)
        .map_err(|e| SnapError::Invalid(format!("serializing VM state: {e}")))
}

fn ms(a: Instant, b: Instant) -> f64 {
    (b - a).as_secs_f64() * 1e3
}

/// Memory a restored VM runs on.
pub enum RestoredMemory {
    /// Filled lazily by a userfaultfd handler from the store.
    Lazy(LazyMemory),
    /// A copy-on-write mapping of a materialized memory file (forks share its pages).
    Mapped(Mapping),
}

impl RestoredMemory {
    pub fn host_addr(&self) -> *mut u8 {
        match self {
            RestoredMemory::Lazy(l) => l.host_addr(),
            RestoredMemory::Mapped(m) => m.as_ptr(),
        }
    }

    pub fn lazy(&self) -> Option<&LazyMemory> {
        match self {
            RestoredMemory::Lazy(l) => Some(l),
            RestoredMemory::Mapped(_) => None,
        }
    }

    /// Guest memory regions over this mapping for a VM of `mem_bytes`.
    ///
    /// # Safety
    /// `self` must outlive every user of the returned memory (the VM).
    pub unsafe fn guest_memory(&self, mem_bytes: u64) -> Result<GuestMemoryMmap, SnapError> {
        let ranges =
            kiln_vmm::memory::layout(mem_bytes).map_err(|e| SnapError::Invalid(e.to_string()))?;
        let mut regions = Vec::new();
        let mut off = 0usize;
        for (ga, size) in ranges {
            // SAFETY: [host+off, host+off+size) lies inside our mapping (image size = mem_bytes),
            // which the caller keeps alive; vm-memory does not unmap raw regions.
            let r = unsafe {
                MmapRegion::build_raw(
                    self.host_addr().add(off),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| SnapError::Invalid(format!("guest memory region: {e}")))?;
            regions.push(
                GuestRegionMmap::new(r, GuestAddress(ga.0))
                    .ok_or_else(|| SnapError::Invalid("guest region overflows".into()))?,
            );
            off += size;
        }
        GuestMemoryMmap::from_regions(regions)
            .map_err(|e| SnapError::Invalid(format!("guest memory: {e}")))
    }
}

/// How to restore memory lazily.
pub struct LazyRestore {
    /// Prefetch the working set recorded at an earlier restore (if any).
    pub use_working_set: bool,
    /// Record what this restore touches (store it with [`finish_recording`]) when the
    /// snapshot has no working set yet.
    pub record: bool,
    pub on_fatal: FatalHook,
}

/// Opens a snapshot's memory for a lazy (userfaultfd) restore.
pub fn lazy_memory(
    store: &Store,
    id: &BlobId,
    rec: &SnapshotRecord,
    opts: LazyRestore,
) -> Result<LazyMemory, SnapError> {
    let src = ImageSource::open(store, &rec.memory)?;
    let ws = if opts.use_working_set {
        record::working_set(store, id)?
    } else {
        None
    };
    let record = opts.record && ws.is_none();
    Ok(LazyMemory::new(
        Arc::new(src),
        LazyOptions {
            prefetch: ws.unwrap_or_default(),
            prefetch_all: false,
            record,
            on_fatal: opts.on_fatal,
        },
    )?)
}

/// Stores what a recording restore touched as the snapshot's working set. Returns the count.
pub fn finish_recording(store: &Store, id: &BlobId, mem: &LazyMemory) -> Result<usize, SnapError> {
    let ws = mem.take_recorded();
    if !ws.is_empty() {
        record::save_working_set(store, id, &ws)?;
    }
    Ok(ws.len())
}

/// Writes a snapshot's memory image to `path` once (sparse: zero chunks are holes) so forks
/// can map it copy-on-write and share its pages; reuses an existing complete file.
pub fn materialize(
    store: &Store,
    rec: &SnapshotRecord,
    path: &Path,
) -> Result<std::fs::File, SnapError> {
    if let Ok(f) = std::fs::File::open(path) {
        if f.metadata().map(|m| m.len()).unwrap_or(0) == rec.memory.size {
            return Ok(f);
        }
    }
    let src = ImageSource::open(store, &rec.memory)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&tmp)
        .map_err(io(format!("creating {}", tmp.display())))?;
    f.set_len(rec.memory.size)
        .map_err(io("sizing memory file"))?;
    let cs = rec.memory.chunk_size as usize;
    let mut buf = vec![0u8; cs];
    use crate::lazy::PageSource;
    use std::os::unix::fs::FileExt;
    for i in 0..src.chunks() {
        if src.chunk_is_zero(i) {
            continue;
        }
        let len = (rec.memory.size as usize - i * cs).min(cs);
        src.read_chunk(i, &mut buf[..len])
            .map_err(|e| SnapError::Invalid(e.to_string()))?;
        f.write_all_at(&buf[..len], (i * cs) as u64)
            .map_err(io("writing memory file"))?;
    }
    std::fs::rename(&tmp, path).map_err(io(format!("installing {}", path.display())))?;
    Ok(f)
}

/// Per-VM identity of a restored or forked VM.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub serial_log: Option<PathBuf>,
    pub serial_stdout: bool,
    /// Host side of the VM's vsock (each fork needs its own).
    pub vsock_uds: Option<PathBuf>,
    /// This VM's own writable view of each snapshot disk, in the record's order (see
    /// [`disk_overlays`]); never shared between VMs.
    pub disks: Vec<Arc<kiln_blockstore::Overlay>>,
    /// The TAP behind the VM's NIC (each fork needs its own; the guest keeps its saved MAC).
    /// `None`: the NIC has no host side.
    pub net: Option<NicSpec>,
}

/// Creates a fresh copy-on-write overlay over each of a snapshot's committed disks, in
/// `dir/disk<i>` (which must not exist yet). The blobs are read lazily (from the remote if the
/// store has one and lacks a chunk); the VM's writes stay in the overlays.
pub fn disk_overlays(
    store: &Store,
    rec: &SnapshotRecord,
    dir: &Path,
) -> Result<Vec<Arc<kiln_blockstore::Overlay>>, SnapError> {
    let mut made: Vec<kiln_blockstore::Overlay> = Vec::with_capacity(rec.disks.len());
    let create = |i: usize, d: &DiskRef| -> Result<kiln_blockstore::Overlay, SnapError> {
        let size = store.manifest(&d.blob)?.size;
        let odir = dir.join(format!("disk{i}"));
        if odir.exists() {
            return Err(SnapError::Invalid(format!(
                "{} exists; a restored VM needs fresh disk overlays",
                odir.display()
            )));
        }
        Ok(store.create_overlay(Some(&d.blob), size, &odir)?)
    };
    for (i, d) in rec.disks.iter().enumerate() {
        match create(i, d) {
            Ok(o) => made.push(o),
            Err(e) => {
                // Nothing half-made stays behind (nor its pin on the base).
                for o in made {
                    let _ = o.discard();
                }
                return Err(e);
            }
        }
    }
    Ok(made.into_iter().map(Arc::new).collect())
}

/// Builds a VM from a snapshot record over `memory`, restores its state and starts it.
///
/// # Safety
/// `memory` must outlive the returned VM.
pub unsafe fn start_vm(
    rec: &SnapshotRecord,
    memory: &RestoredMemory,
    id: &Identity,
) -> Result<Vm, SnapError> {
    // SAFETY: forwarded to our caller.
    let vm = unsafe { build_vm(rec, memory, id)? };
    vm.start()?;
    Ok(vm)
}

/// As [`start_vm`] but leaves the VM created and restored, not running.
///
/// # Safety
/// `memory` must outlive the returned VM.
pub unsafe fn build_vm(
    rec: &SnapshotRecord,
    memory: &RestoredMemory,
    id: &Identity,
) -> Result<Vm, SnapError> {
    let state: VmState = serde_json::from_value(rec.state.clone())
        .map_err(|e| SnapError::Invalid(format!("snapshot VM state does not parse: {e}")))?;
    // SAFETY: forwarded to our caller.
    let gm = unsafe { memory.guest_memory(rec.vm.mem_bytes)? };
    let config = VmConfig {
        mem_bytes: rec.vm.mem_bytes,
        vcpus: rec.vm.vcpus,
        kernel: None,
        initrd: None,
        cmdline: rec.vm.cmdline.clone(),
        serial_log: id.serial_log.clone(),
        serial_stdout: id.serial_stdout,
        // A restored VM's next snapshot is usually a diff against this one.
        track_dirty_pages: true,
    };
    let mut vm = Vm::new(config, GuestMemorySource::Provided(gm))?;
    let saved: Vec<&BlockState> = state
        .virtio
        .iter()
        .filter_map(|d| match &d.device {
            DeviceState::Block(b) => Some(b),
            _ => None,
        })
        .collect();
    if saved.len() != rec.disks.len() || saved.len() != id.disks.len() {
        return Err(SnapError::Invalid(format!(
            "the snapshot's VM has {} disks, its record lists {}, {} overlays were given",
            saved.len(),
            rec.disks.len(),
            id.disks.len()
        )));
    }
    let mut disks = Vec::with_capacity(saved.len());
    for ((b, dref), overlay) in saved.into_iter().zip(&rec.disks).zip(&id.disks) {
        if overlay.base() != Some(dref.blob) || overlay.len() != b.capacity {
            return Err(SnapError::Invalid(format!(
                "disk {} of the snapshot is {} bytes (blob {}); the overlay given is {} bytes over {:?}",
                b.id,
                b.capacity,
                dref.blob,
                overlay.len(),
                overlay.base()
            )));
        }
        disks.push(RestoredDisk {
            backend: DiskBackend::Overlay(overlay.clone()),
            read_only: dref.read_only,
        });
    }
    let res = DeviceResources {
        disks,
        vsock_uds: id.vsock_uds.clone(),
        net: id.net.clone(),
    };
    vm.add_restored_devices(&state, res)?;
    vm.restore_state(&state)?;
    Ok(vm)
}
