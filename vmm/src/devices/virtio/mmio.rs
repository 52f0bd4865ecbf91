//! The virtio-mmio (version 2) transport.

use super::{ActivateContext, Interrupt, QueueSnapshot, VirtioDevice};
use crate::devices::MmioDevice;
use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b49_4c4e; // "KILN"

pub const REG_QUEUE_NOTIFY: u64 = 0x050;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 64;
const S_FAILED: u32 = 128;

/// Transport state as plain data (the device's own state is saved separately).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MmioTransportState {
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    pub activated: bool,
}

/// One virtio device behind one virtio-mmio window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queue_events: Vec<EventFd>,
    queues: Vec<Queue>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// The device holds the queues (between DRIVER_OK and reset/pause).
    activated: bool,
    /// Paused: the device handed its queues back and will get them again on resume.
    suspended: bool,
}

impl MmioTransport {
    /// `queue_events[i]` must be the eventfd registered (as a KVM ioeventfd) for queue i.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queue_events: Vec<EventFd>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&s| Queue::new(s).expect("device queue max size must be a power of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queue_events,
            queues,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
            suspended: false,
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn clone_events(&self) -> Result<Vec<EventFd>, std::io::Error> {
        self.queue_events.iter().map(|e| e.try_clone()).collect()
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        if !valid {
            tracing::warn!(
                device_type = self.device.device_type(),
                "driver set up an invalid queue"
            );
            self.device_status |= S_NEEDS_RESET;
            return;
        }
        let queues: Vec<Queue> = self
            .queues
            .iter()
            .map(|q| {
                QueueSnapshot::of(q)
                    .to_queue()
                    .expect("queue was validated")
            })
            .collect();
        let events = match self.clone_events() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cloning queue eventfds");
                self.device_status |= S_NEEDS_RESET;
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events: events,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(error = %e, "device activation failed");
                self.device_status |= S_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            if self.device.deactivate().is_none() {
                // The device cannot be stopped: tell the driver instead of pretending.
                self.device_status |= S_NEEDS_RESET;
                return;
            }
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt.set_status(0);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (except by resetting).
        if v & self.device_status != self.device_status {
            tracing::debug!(
                old = self.device_status,
                new = v,
                "driver cleared status bits; ignored"
            );
            return;
        }
        let added = v & !self.device_status;
        if added & S_FEATURES_OK != 0 && self.acked_features & !self.device.avail_features() != 0 {
            // Driver acked features we never offered: refuse FEATURES_OK.
            self.device_status = v & !S_FEATURES_OK;
            return;
        }
        self.device_status = v;
        if added & S_DRIVER_OK != 0
            && v & (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
                == (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
            && v & S_FAILED == 0
            && !self.activated
        {
            self.activate();
        }
    }

    /// Pause: the device stops and returns its queues (with their positions).
    pub fn suspend(&mut self) {
        if !self.activated || self.suspended {
            return;
        }
        if let Some(queues) = self.device.deactivate() {
            self.queues = queues;
            self.suspended = true;
        }
    }

    /// Resume after [`Self::suspend`].
    pub fn resume(&mut self) {
        if !self.suspended {
            return;
        }
        self.suspended = false;
        self.activated = false;
        self.activate();
    }

    /// State as plain data. Queue positions are exact only while suspended (or never activated).
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            activated: self.activated,
        }
    }

    /// Applies saved transport state to a fresh transport, activating the device if it was active.
    pub fn restore(&mut self, s: &MmioTransportState) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "saved state has {} queues, device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        self.queues = s
            .queues
            .iter()
            .map(|q| q.to_queue().map_err(|e| format!("bad saved queue: {e:?}")))
            .collect::<Result<_, _>>()?;
        self.device_status = s.device_status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt.set_status(s.interrupt_status);
        if s.activated {
            self.activate();
            if !self.activated {
                return Err("device failed to activate from saved state".into());
            }
        }
        Ok(())
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.device.avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self
                .selected_queue()
                .map(|q| q.max_size() as u32)
                .unwrap_or(0),
            0x044 => self.selected_queue().map(|q| q.ready() as u32).unwrap_or(0),
            0x060 => self.interrupt.status(),
            0x070 => self.device_status,
            0x0fc => self.config_generation,
            _ => {
                tracing::debug!(offset, "read of unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue and feature setup is only legal before DRIVER_OK.
        let setup = self.device_status & S_DRIVER_OK == 0;
        let features_phase = self.device_status & (S_DRIVER | S_FEATURES_OK) == S_DRIVER;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if features_phase => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally consumed by the KVM ioeventfd; forward when it reaches us anyway.
                if let Some(e) = self.queue_events.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if setup => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(lo, hi),
                        0x090 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => tracing::debug!(offset, v, "ignored virtio-mmio register write"),
        }
    }
}

impl MmioDevice for MmioTransport {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            data.fill(0);
            self.device.read_config(offset - 0x100, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            if self.device_status & S_DRIVER != 0 {
                self.device.write_config(offset - 0x100, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            self.write_reg(offset, v);
        }
    }
}
