//! virtio-blk: a raw file (io_uring or sync engine) or a block-store overlay (thread pool).
//!
//! The virtqueue protocol (virtio-queue) and request parsing ([`request`]) are separate from
//! request execution ([`engine`]). One worker thread per device waits (epoll) on the queue's
//! notification eventfd, the engine's completion eventfd and a stop eventfd.
//!
//! Every kick and interrupt is a VM exit or an injection, which is expensive on PVM hosts: with
//! VIRTIO_RING_F_EVENT_IDX the driver says when it wants an interrupt (used_event) and the
//! device when it wants a kick (avail_event), and after completing requests the worker looks
//! for new ones briefly before sleeping, so a polling driver's refill needs no kick.

pub mod engine;
mod persist;
pub mod request;

pub use persist::BlockState;

use super::persist::DeviceState;
use super::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use engine::{Backend, Engine, FileEngine, PoolEngine, RawFile, SyncEngine, UringEngine};
use request::{Parsed, RequestKind, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Overlay pool threads.
const POOL_THREADS: usize = 4;
/// How long the worker looks for new requests after completing some (see
/// `Worker::poll_for_requests`); short against a disk's ~100 us+ per burst.
const POLL_AFTER_COMPLETION: std::time::Duration = std::time::Duration::from_micros(40);

/// What a disk is backed by.
#[derive(Clone)]
pub enum DiskBackend {
    /// A raw image file.
    File {
        path: PathBuf,
        engine: FileEngine,
        direct: bool,
    },
    /// A block-store overlay (lazy base blob + local writes).
    Overlay(Arc<kiln_blockstore::Overlay>),
}

/// Block device errors.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("disk {path} is {size} bytes; it must be a non-zero multiple of 512")]
    BadSize { path: String, size: u64 },
    #[error("disk engine: {0}")]
    Engine(std::io::Error),
    #[error("the disk is {given} bytes; the snapshotted guest's was {saved}")]
    SizeChanged { saved: u64, given: u64 },
}

/// A virtio-blk device.
pub struct Block {
    id: String,
    backend: DiskBackend,
    backend_impl: Arc<dyn Backend>,
    raw: Option<Arc<RawFile>>,
    capacity: u64,
    read_only: bool,
    worker: Option<(EventFd, std::thread::JoinHandle<Queue>)>,
}

impl Block {
    /// `id` is what GET_ID returns (at most 20 bytes are used).
    pub fn new(id: &str, backend: DiskBackend, read_only: bool) -> Result<Block, BlockError> {
        let (backend_impl, raw, name): (Arc<dyn Backend>, Option<Arc<RawFile>>, String) =
            match &backend {
                DiskBackend::File { path, direct, .. } => {
                    let f =
                        Arc::new(RawFile::open(path, read_only, *direct).map_err(|source| {
                            BlockError::Open {
                                path: path.display().to_string(),
                                source,
                            }
                        })?);
                    (f.clone(), Some(f), path.display().to_string())
                }
                DiskBackend::Overlay(o) => (o.clone(), None, format!("{o:?}")),
            };
        let capacity = backend_impl.len();
        if capacity == 0 || capacity % request::SECTOR_SIZE != 0 {
            return Err(BlockError::BadSize {
                path: name,
                size: capacity,
            });
        }
        Ok(Block {
            id: id.to_string(),
            backend,
            backend_impl,
            raw,
            capacity,
            read_only,
            worker: None,
        })
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn make_engine(&self) -> std::io::Result<Engine> {
        Ok(match (&self.backend, &self.raw) {
            (
                DiskBackend::File {
                    engine: FileEngine::Uring,
                    ..
                },
                Some(raw),
            ) => Engine::Uring(UringEngine::new(raw.clone())?),
            (DiskBackend::File { .. }, _) => {
                Engine::Sync(SyncEngine::new(self.backend_impl.clone()))
            }
            (DiskBackend::Overlay(_), _) => {
                Engine::Pool(PoolEngine::new(self.backend_impl.clone(), POOL_THREADS)?)
            }
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64 sectors), size_max, seg_max, geometry (4),
        // blk_size.
        let mut cfg = [0u8; 24];
        cfg[0..8].copy_from_slice(&(self.capacity / request::SECTOR_SIZE).to_le_bytes());
        cfg[12..16].copy_from_slice(&(request::MAX_SEGMENTS as u32).to_le_bytes());
        cfg[20..24].copy_from_slice(&(request::SECTOR_SIZE as u32).to_le_bytes());
        let off = offset as usize;
        if off < cfg.len() {
            let n = data.len().min(cfg.len() - off);
            data[..n].copy_from_slice(&cfg[off..off + n]);
        }
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let fail = |e: std::io::Error| ActivateError::Failed(e.to_string());
        let mut queue = ctx.queues.remove(0);
        // Suppression through used_event / avail_event when the driver acked EVENT_IDX.
        queue.set_event_idx(ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        let queue_evt = ctx.queue_events.remove(0);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(fail)?;
        let worker = Worker {
            mem: ctx.mem,
            queue,
            queue_evt,
            stop: stop.try_clone().map_err(fail)?,
            interrupt: ctx.interrupt,
            engine: self.make_engine().map_err(fail)?,
            capacity: self.capacity,
            read_only: self.read_only,
            id: self.id.clone(),
            pending: Vec::new(),
            free: Vec::new(),
            used_added: false,
            poll: POLL_AFTER_COMPLETION,
        };
        let handle = std::thread::Builder::new()
            .name(format!("blk-{}", self.id))
            .spawn(move || worker.run())
            .map_err(fail)?;
        self.worker = Some((stop, handle));
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        let (stop, handle) = self.worker.take()?;
        let _ = stop.write(1);
        match handle.join() {
            Ok(q) => Some(vec![q]),
            Err(_) => {
                tracing::error!(disk = %self.id, "block worker panicked");
                None
            }
        }
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Block(self.save())
    }
}

struct Pending {
    head: u16,
    status_addr: GuestAddress,
    /// Bytes the device writes into guest buffers on success (data + status).
    used_len: u32,
}

struct Worker {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_evt: EventFd,
    stop: EventFd,
    interrupt: Interrupt,
    engine: Engine,
    capacity: u64,
    read_only: bool,
    id: String,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Chains were completed since the last interrupt decision.
    used_added: bool,
    /// How long to look for new requests after completing some.
    poll: std::time::Duration,
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_ENGINE: u64 = 1;
const TOKEN_STOP: u64 = 2;

impl Worker {
    fn run(mut self) -> Queue {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "block worker: epoll");
                return self.queue;
            }
        };
        let mut fds = vec![
            (self.queue_evt.as_raw_fd(), TOKEN_QUEUE),
            (self.stop.as_raw_fd(), TOKEN_STOP),
        ];
        if let Some(fd) = self.engine.event_fd() {
            fds.push((fd, TOKEN_ENGINE));
        }
        for (fd, token) in fds {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                tracing::error!(error = %e, "block worker: epoll_ctl");
                return self.queue;
            }
        }
        let mut stopping = false;
        let mut broken = false;
        let mut events = vec![EpollEvent::default(); 4];
        // Kicks may have arrived while we were not running (before activation or while paused).
        if !self.process_queue() {
            broken = true;
        }
        self.complete();
        loop {
            if stopping && self.engine.in_flight() == 0 {
                return self.queue;
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "block worker: epoll_wait");
                    return self.queue;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_QUEUE => {
                        let _ = self.queue_evt.read();
                        if !stopping && !broken && !self.process_queue() {
                            broken = true;
                        }
                    }
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        stopping = true;
                    }
                    _ => {}
                }
            }
            if self.complete() > 0 && !stopping && !broken && !self.poll_for_requests() {
                broken = true;
            }
        }
    }

    /// Takes every available chain. Returns false if the queue itself is corrupt (the device
    /// then stops serving it until reset, rather than spinning on garbage).
    fn process_queue(&mut self) -> bool {
        loop {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                tracing::warn!(disk = %self.id, error = ?e, "bad queue; device stops");
                return false;
            }
            // A driver that moves avail.idx more than a queue size ahead is broken; without
            // this check pop_descriptor_chain keeps returning nothing while
            // enable_notification keeps reporting work: a busy loop.
            match self.queue.avail_idx(&self.mem, Ordering::Acquire) {
                Ok(avail) if (avail - Wrapping(self.queue.next_avail())).0 <= self.queue.size() => {
                }
                Ok(_) => {
                    tracing::warn!(disk = %self.id, "driver published more chains than the queue holds; device stops until reset");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(disk = %self.id, error = ?e, "bad queue; device stops");
                    return false;
                }
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
                let parsed = request::parse(chain, self.capacity, self.read_only);
                self.start(parsed);
            }
            self.engine.commit();
            match self.queue.enable_notification(&self.mem) {
                Ok(true) => continue, // more arrived meanwhile
                Ok(false) => return true,
                Err(e) => {
                    tracing::warn!(disk = %self.id, error = ?e, "bad queue; device stops");
                    return false;
                }
            }
        }
    }

    fn start(&mut self, parsed: Parsed) {
        let Parsed { head, outcome } = parsed;
        match outcome {
            Err(rej) => {
                tracing::debug!(disk = %self.id, reason = rej.reason, "rejected request");
                let len = match rej.status_addr {
                    Some(a) => {
                        let _ = self.mem.write_obj(rej.status, a);
                        1
                    }
                    None => 0,
                };
                self.add_used(head, len);
            }
            Ok((req, status_addr)) => {
                if req.kind == RequestKind::GetId {
                    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                    let b = self.id.as_bytes();
                    let n = b.len().min(id.len());
                    id[..n].copy_from_slice(&b[..n]);
                    let mut written = 0usize;
                    for s in &req.segments {
                        let take = (s.len as usize).min(id.len() - written);
                        let _ = self
                            .mem
                            .write_slice(&id[written..written + take], GuestAddress(s.guest_addr));
                        written += take;
                    }
                    let _ = self.mem.write_obj(VIRTIO_BLK_S_OK, status_addr);
                    self.add_used(head, written as u32 + 1);
                    return;
                }
                let used_len = if req.kind == RequestKind::Read {
                    req.data_len as u32 + 1
                } else {
                    1
                };
                let slot = match self.free.pop() {
                    Some(s) => s,
                    None => {
                        self.pending.push(None);
                        self.pending.len() - 1
                    }
                };
                self.pending[slot] = Some(Pending {
                    head,
                    status_addr,
                    used_len,
                });
                self.engine.submit(slot as u64, &req);
            }
        }
    }

    /// A polling driver answers completions with new requests within microseconds; looking
    /// for them briefly here saves its kick (a VM exit) and this thread's wake-up. Returns
    /// false if the queue is corrupt.
    fn poll_for_requests(&mut self) -> bool {
        if self.poll.is_zero() {
            return true;
        }
        let start = std::time::Instant::now();
        loop {
            match self.queue.avail_idx(&self.mem, Ordering::Acquire) {
                Ok(avail) if avail.0 != self.queue.next_avail() => return self.process_queue(),
                Ok(_) => {}
                Err(_) => return true, // process_queue reports it on the next kick
            }
            if start.elapsed() >= self.poll {
                return true;
            }
            std::hint::spin_loop();
        }
    }

    /// Returns how many requests completed.
    fn complete(&mut self) -> usize {
        let mut done = Vec::new();
        self.engine.drain(&mut done);
        let n = done.len();
        for (token, result) in done {
            let Some(p) = self.pending.get_mut(token as usize).and_then(|p| p.take()) else {
                continue;
            };
            self.free.push(token as usize);
            let (status, len) = match result {
                Ok(()) => (VIRTIO_BLK_S_OK, p.used_len),
                Err(e) => {
                    tracing::warn!(disk = %self.id, error = %e, "I/O error");
                    (VIRTIO_BLK_S_IOERR, 1)
                }
            };
            let _ = self.mem.write_obj(status, p.status_addr);
            self.add_used(p.head, len);
        }
        self.signal_used();
        n
    }

    fn add_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(&self.mem, head, len) {
            tracing::warn!(disk = %self.id, error = ?e, "add_used failed");
            return;
        }
        self.used_added = true;
    }

    /// One interrupt for everything added to the used ring since the last call, unless the
    /// driver suppressed it (used_event with EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT without:
    /// virtio-queue only implements the former, and polling drivers use the latter).
    fn signal_used(&mut self) {
        if !std::mem::take(&mut self.used_added) {
            return;
        }
        let wanted = if self.queue.event_idx_enabled() {
            self.queue.needs_notification(&self.mem).unwrap_or(true)
        } else {
            const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
            let flags: u16 = self
                .mem
                .read_obj(GuestAddress(self.queue.avail_ring()))
                .unwrap_or(0);
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0
        };
        if wanted {
            self.interrupt.signal_used_queue();
        }
    }
}

#[cfg(test)]
mod tests;
