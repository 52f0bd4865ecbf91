//! Virtio devices over the virtio-mmio transport.
//!
//! The split:
//! - [`mmio::MmioTransport`] speaks the virtio-mmio register protocol with the driver (feature
//!   negotiation, queue setup, status, interrupts acknowledgment) and owns the queue configuration
//!   until the driver sets DRIVER_OK.
//! - A [`VirtioDevice`] executes requests. On activation it receives the ready queues (the
//!   virtqueue protocol itself is the `virtio-queue` crate), one notification [`EventFd`] per
//!   queue (a KVM ioeventfd on the QueueNotify register, so notifications do not exit to the VMM's
//!   vCPU thread), the guest memory, and an [`Interrupt`] to signal the guest. Devices usually
//!   run a worker thread that waits on those eventfds.
//!
//! Writing a device: implement [`VirtioDevice`]; return your queues from
//! [`VirtioDevice::deactivate`] (after finishing in-flight requests) so the VM can pause, snapshot
//! and reset you; add it with `Vm::add_virtio_device`. Its snapshot state is a
//! [`persist::DeviceState`] variant, saved and restored by its [`crate::persist::Persist`]
//! implementation beside it.

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod vsock;

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device conforms to virtio 1.x (required by the modern mmio transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used/avail event index suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device type ids.
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the InterruptStatus register shared with the transport, and an
/// irqfd wired to the device's GSI.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
    /// Wakes vCPUs parked on the idle port (polling guests never see the interrupt itself).
    idle: Option<Arc<crate::devices::idle::IdleWaker>>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
            idle: None,
        }
    }

    /// Also wake the VM's idle vCPUs on every signal.
    pub fn with_idle_waker(mut self, w: Arc<crate::devices::idle::IdleWaker>) -> Self {
        self.idle = Some(w);
        self
    }

    /// Tells the driver that used rings changed.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING)
    }

    fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // Idle vCPUs first: an irqfd on an IOAPIC/PIC line is injected by a kworker, which can
        // preempt this thread for a long while (~150 us measured on a loaded PVM host) before
        // the wake-up would otherwise happen.
        if let Some(w) = &self.idle {
            w.wake();
        }
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!(error = %e, "irqfd write failed");
        }
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The irqfd (for tests that want to observe interrupts).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory (cheap to clone; the regions are shared).
    pub mem: GuestMemoryMmap,
    /// The queues, index = virtqueue number. Queues the driver did not enable have `ready() ==
    /// false`.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue: readable when the driver kicked that queue.
    pub queue_events: Vec<EventFd>,
    /// How to interrupt the driver.
    pub interrupt: Interrupt,
    /// The features the driver acknowledged.
    pub acked_features: u64,
}

/// Activation failures (the transport then sets DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("virtio device activation: {0}")]
    Failed(String),
}

/// A virtio device model. See the module docs.
pub trait VirtioDevice: Send {
    /// Virtio device type (1 = net, 2 = block, 19 = vsock, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver (include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Reads device config space at `offset` (out-of-range bytes must be left as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device: begin serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving the queues, completing requests already taken from them, and hands the
    /// queues back with their positions (used for pause, snapshot and driver reset). `None` means
    /// the device cannot stop (it keeps running through a pause and cannot be reset).
    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        None
    }
    /// Device-specific state beyond the transport and queues (its `Persist::save`).
    fn save_state(&self) -> persist::DeviceState;
    /// Counters for operators and tests (`status` on the control socket; `Null` if none).
    fn metrics(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// A queue's position and configuration as serde data (virtio-queue's `QueueState` has no serde).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl QueueSnapshot {
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }

    /// Rebuilds a queue; fails on sizes/alignments a valid queue cannot have.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        let q = Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })?;
        debug_assert_eq!(q.ready(), self.ready);
        Ok(q)
    }
}
