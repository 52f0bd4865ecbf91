//! The generation-id device: a read-only MMIO page, like ACPI VMGenID but without ACPI, that
//! tells the guest it was restored or forked, so its agent reseeds its random number generator
//! and resets its clock.
//!
//! Fixed at guest-physical [`GENID_BASE`] (in the MMIO gap, below the virtio-mmio windows;
//! reachable from a CPL 3 test guest through the VMM's identity map, and from Linux through
//! `/dev/mem`, which allows non-RAM pages). Little-endian registers, read with 1/2/4/8-byte
//! loads at any offset; writes are ignored:
//!
//! | offset | size | meaning |
//! |---|---|---|
//! | 0x00 | 4 | magic [`GENID_MAGIC`] ("KGEN") |
//! | 0x04 | 4 | layout version [`GENID_VERSION`] |
//! | 0x08 | 8 | generation: 0 after a fresh boot, +1 on every restore from a snapshot (forks too) |
//! | 0x10 | 16 | id: 128 random bits, new on every boot, restore and fork |
//! | 0x20 | 8 | host wall clock now (CLOCK_REALTIME, ns since the Unix epoch), read live |
//! | 0x28 | 8 | 64 fresh random bits from the host (getrandom), new on every read |
//!
//! A guest reads generation, id, then generation again and retries if it changed (a snapshot
//! can fall between two loads).

use super::MmioDevice;
use serde::{Deserialize, Serialize};

/// Guest-physical address of the register page.
pub const GENID_BASE: u64 = 0xcfff_f000;
/// Size of the register window.
pub const GENID_SIZE: u64 = 0x1000;
/// "KGEN", little-endian.
pub const GENID_MAGIC: u32 = 0x4e45_474b;
pub const GENID_VERSION: u32 = 1;
pub const REG_MAGIC: u64 = 0x00;
pub const REG_GENERATION: u64 = 0x08;
pub const REG_ID: u64 = 0x10;
pub const REG_HOST_TIME_NS: u64 = 0x20;
pub const REG_RANDOM: u64 = 0x28;
const REGS_END: u64 = 0x30;

/// The saved part of the device (part of [`crate::VmState`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenIdState {
    pub generation: u64,
    /// Two little-endian halves of the 128-bit id (low first): JSON numbers stay within u64.
    pub id: [u64; 2],
}

impl GenIdState {
    /// A fresh VM: generation 0, a new random id.
    pub fn boot() -> Self {
        GenIdState {
            generation: 0,
            id: random_id(),
        }
    }

    /// What a VM restored (or forked) from a snapshot holding `self` gets: the next generation
    /// and a new id.
    pub fn next(&self) -> Self {
        GenIdState {
            generation: self.generation.wrapping_add(1),
            id: random_id(),
        }
    }

    /// The id as 32 hex digits (high half first), as the test guest prints it.
    pub fn id_hex(&self) -> String {
        format!("{:016x}{:016x}", self.id[1], self.id[0])
    }
}

fn random_id() -> [u64; 2] {
    let mut b = [0u8; 16];
    fill_random(&mut b);
    [
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..].try_into().unwrap()),
    ]
}

fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most len bytes into the live buffer slice.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // getrandom(2) with flags 0 on a booted host only fails on bad arguments; never hand
            // out a predictable id silently.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// The device on the MMIO bus.
#[derive(Debug)]
pub struct GenIdDevice {
    state: GenIdState,
}

impl GenIdDevice {
    pub fn new(state: GenIdState) -> Self {
        GenIdDevice { state }
    }

    pub fn state(&self) -> GenIdState {
        self.state
    }

    pub fn set_state(&mut self, state: GenIdState) {
        self.state = state;
    }

    fn register_bytes(&self, offset: u64, len: usize) -> [u8; REGS_END as usize] {
        let mut r = [0u8; REGS_END as usize];
        r[0..4].copy_from_slice(&GENID_MAGIC.to_le_bytes());
        r[4..8].copy_from_slice(&GENID_VERSION.to_le_bytes());
        r[8..16].copy_from_slice(&self.state.generation.to_le_bytes());
        r[16..24].copy_from_slice(&self.state.id[0].to_le_bytes());
        r[24..32].copy_from_slice(&self.state.id[1].to_le_bytes());
        // Live values only when the load touches them: a clock read and getrandom per access
        // would be wasted on generation polls.
        let touches = |reg: u64| offset < reg + 8 && offset + len as u64 > reg;
        if touches(REG_HOST_TIME_NS) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            r[32..40].copy_from_slice(&now.to_le_bytes());
        }
        if touches(REG_RANDOM) {
            fill_random(&mut r[40..48]);
        }
        r
    }
}

impl MmioDevice for GenIdDevice {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= REGS_END {
            return;
        }
        let regs = self.register_bytes(offset, data.len());
        let end = (offset as usize + data.len()).min(regs.len());
        data[..end - offset as usize].copy_from_slice(&regs[offset as usize..end]);
    }

    fn mmio_write(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "guest wrote to the read-only generation-id page");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(d: &mut GenIdDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.mmio_read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn registers_read_back_at_any_width() {
        let s = GenIdState {
            generation: 7,
            id: [0x1122_3344_5566_7788, 0x99aa_bbcc_ddee_ff00],
        };
        let mut d = GenIdDevice::new(s);
        assert_eq!(read(&mut d, REG_MAGIC, 4), u64::from(GENID_MAGIC));
        assert_eq!(read(&mut d, 4, 4), u64::from(GENID_VERSION));
        assert_eq!(read(&mut d, REG_GENERATION, 8), 7);
        assert_eq!(read(&mut d, REG_ID, 8), s.id[0]);
        assert_eq!(read(&mut d, REG_ID + 8, 8), s.id[1]);
        assert_eq!(read(&mut d, REG_ID + 4, 4), 0x1122_3344);
        assert_eq!(read(&mut d, REG_ID, 1), 0x88);
        assert_eq!(
            read(&mut d, 0x800, 8),
            0,
            "beyond the registers reads as zero"
        );
        assert_eq!(
            read(&mut d, REGS_END - 4, 8) >> 32,
            0,
            "a load straddling the end"
        );
        d.mmio_write(REG_GENERATION, &[0xff; 8]);
        assert_eq!(read(&mut d, REG_GENERATION, 8), 7, "read-only");
        assert_eq!(s.id_hex(), "99aabbccddeeff001122334455667788");
    }

    #[test]
    fn live_registers_move() {
        let mut d = GenIdDevice::new(GenIdState::boot());
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let t = read(&mut d, REG_HOST_TIME_NS, 8);
        assert!(t >= host && t - host < 5_000_000_000, "{t} vs {host}");
        let r: std::collections::HashSet<u64> =
            (0..8).map(|_| read(&mut d, REG_RANDOM, 8)).collect();
        assert_eq!(r.len(), 8, "every read of the random register is fresh");
    }

    #[test]
    fn next_generation_gets_a_new_id() {
        let a = GenIdState::boot();
        assert_eq!(a.generation, 0);
        let (b, c) = (a.next(), a.next());
        assert_eq!((b.generation, c.generation), (1, 1));
        assert_ne!(b.id, c.id, "two forks of one snapshot get distinct ids");
        assert_ne!(b.id, a.id);
        assert_eq!(b.next().generation, 2);
    }
}
