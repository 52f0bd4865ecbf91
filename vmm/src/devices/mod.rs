//! Devices and the I/O buses that route vCPU port and MMIO exits to them.

pub mod genid;
pub mod idle;
pub mod legacy;
pub mod virtio;

use std::sync::{Arc, Mutex};

/// A device on the MMIO bus.
pub trait MmioDevice: Send {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

/// The MMIO bus: non-overlapping windows, each owned by one device.
type Window = (u64, u64, Arc<Mutex<dyn MmioDevice>>);

#[derive(Default, Clone)]
pub struct MmioBus {
    windows: Vec<Window>,
}

impl MmioBus {
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) {
        self.windows.push((base, len, dev));
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn MmioDevice>>)> {
        self.windows
            .iter()
            .find(|(b, l, _)| addr >= *b && addr - *b < *l)
            .map(|(b, _, d)| (addr - b, d))
    }

    /// Returns false when nothing is mapped at `addr` (the access is ignored; reads see 0xff).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .mmio_read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .mmio_write(off, data);
                true
            }
            None => false,
        }
    }
}
