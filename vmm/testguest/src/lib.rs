//! The kiln test guest: a freestanding x86-64 ELF (built from `guest/` by `build.rs` with gcc),
//! entered like a Linux vmlinux, that drives virtio-blk and answers requests over virtio-vsock.
//! See `README.md` for its command line and request protocol.
//!
//! This crate exposes the ELF's path and host-side mirrors of the guest's data patterns and
//! checksums, so tests can predict and verify what the guest writes and reports.

use std::path::Path;

/// Path of the built guest ELF (inside this crate's build output directory).
pub fn elf_path() -> &'static Path {
    Path::new(env!("KILN_TESTGUEST_ELF"))
}

/// The line the guest prints first on its serial port, before doing any other work.
pub const BANNER: &str = "kiln-testguest ready";

/// RAM below this physical address holds the guest itself; `FILL` only writes above it.
pub const ARENA_START: u64 = 16 << 20;

/// splitmix64, the guest's mixing function.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The 64-bit word the guest's pattern puts at word index `index` (byte offset / 8: disk offset
/// for `BLKWRITE`, guest-physical address for `FILL`).
pub fn pattern_word(seed: u64, index: u64) -> u64 {
    splitmix64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Fills `buf` with the pattern as it appears at byte offset `offset` (both multiples of 8).
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    assert!(
        offset.is_multiple_of(8) && buf.len().is_multiple_of(8),
        "pattern ranges are 8-byte aligned"
    );
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(seed, offset / 8 + i as u64).to_le_bytes());
    }
}

/// Streaming form of the guest's checksum (`MEMSUM`, `BLKHASH`, `FILL`, blktest).
#[derive(Debug, Clone)]
pub struct Checksum {
    h: u64,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self {
            h: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }
}

impl Checksum {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes; every call must pass a multiple of 8 bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        assert!(
            bytes.len().is_multiple_of(8),
            "checksummed data comes in 8-byte words"
        );
        for w in bytes.chunks_exact(8) {
            let w = u64::from_le_bytes(w.try_into().unwrap());
            self.h = (self.h.rotate_left(5) ^ w).wrapping_mul(0x100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }

    pub fn finish(&self) -> u64 {
        splitmix64(self.h ^ self.len)
    }
}

/// The guest's checksum of `bytes` (length a multiple of 8).
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(bytes);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_is_built() {
        let data = std::fs::read(elf_path()).expect("guest ELF exists");
        assert_eq!(&data[..4], b"\x7fELF");
        assert_eq!(data[4], 2, "64-bit ELF");
        // e_entry: linked at 1 MiB like a vmlinux entered at its physical address.
        let entry = u64::from_le_bytes(data[24..32].try_into().unwrap());
        assert_eq!(entry, 0x10_0000);
    }

    #[test]
    fn checksum_depends_on_every_word_and_length() {
        let mut a = vec![0u8; 4096];
        fill_pattern(1, 0, &mut a);
        let base = checksum(&a);
        a[4095] ^= 1;
        assert_ne!(checksum(&a), base);
        assert_ne!(checksum(&[0u8; 8]), checksum(&[0u8; 16]));
        let mut c = Checksum::new();
        a[4095] ^= 1;
        c.update(&a[..1024]);
        c.update(&a[1024..]);
        assert_eq!(c.finish(), base, "streaming equals one-shot");
    }

    #[test]
    fn pattern_is_position_dependent() {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        fill_pattern(7, 0, &mut a);
        fill_pattern(7, 8, &mut b);
        assert_eq!(a[8..], b[..8]);
        assert_ne!(a[..8], b[..8]);
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
    }
}
