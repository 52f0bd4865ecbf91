//! Watches kiln's generation-id page (the VMM's `kiln_vmm::devices::genid`, a VMGenID-like MMIO page)
//! and, when the VM was restored or forked, reseeds the kernel's random number generator and
//! sets the wall clock from the host's.
//!
//! After a restore the guest's memory, including the kernel's CRNG state and every process's
//! userspace RNG, is a copy of the snapshot's: without a reseed, forks produce the same "random"
//! numbers. Its clock also stopped when the snapshot was taken.
//!
//! In a guest the page is mapped from `/dev/mem` (it is not RAM, so `CONFIG_STRICT_DEVMEM`
//! allows it). [`MappedPage::open`] takes any file and offset, so tests map a plain file.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// Guest-physical address of the page (`kiln_vmm::devices::genid::GENID_BASE`).
pub const GENID_BASE: u64 = 0xcfff_f000;
pub const GENID_MAGIC: u32 = 0x4e45_474b;
pub const REG_MAGIC: usize = 0x00;
pub const REG_GENERATION: usize = 0x08;
pub const REG_ID: usize = 0x10;
pub const REG_HOST_TIME_NS: usize = 0x20;
pub const REG_RANDOM: usize = 0x28;
/// How often the agent looks (two or three MMIO reads: cheap).
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Bytes of fresh entropy fed to the kernel per reseed.
const RESEED_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum GenIdError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("no kiln generation-id device (magic {0:#x})")]
    NoDevice(u32),
}

/// Reads of the register page.
pub trait Registers {
    fn read_u64(&self, offset: usize) -> u64;
}

/// The register page mapped from a file (`/dev/mem` in a guest).
pub struct MappedPage {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is only read, with volatile loads, and lives as long as the struct.
unsafe impl Send for MappedPage {}

impl MappedPage {
    /// Maps one page of `path` at `offset` (page aligned) and checks the magic.
    pub fn open(path: &Path, offset: u64) -> Result<MappedPage, GenIdError> {
        let f = File::open(path).map_err(|e| GenIdError::Io(path.display().to_string(), e))?;
        let len = 4096;
        // SAFETY: a fresh shared read-only mapping of an open file; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(GenIdError::Io(
                format!("mapping {} at {offset:#x}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        let page = MappedPage {
            ptr: ptr.cast(),
            len,
        };
        let magic = page.read_u64(REG_MAGIC) as u32;
        if magic != GENID_MAGIC {
            return Err(GenIdError::NoDevice(magic));
        }
        Ok(page)
    }
}

impl Registers for MappedPage {
    fn read_u64(&self, offset: usize) -> u64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len);
        // SAFETY: in bounds and aligned (asserted); volatile, since the VMM answers each load
        // (an MMIO exit) and values change behind our back.
        unsafe { std::ptr::read_volatile(self.ptr.add(offset).cast::<u64>()) }
    }
}

impl Drop for MappedPage {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `open`, exactly once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// What the agent does when the generation changes (the system's, or a recorder in tests).
pub trait Actions {
    /// Mixes `entropy` into the kernel pool and credits it.
    fn reseed(&mut self, entropy: &[u8]) -> Result<(), String>;
    /// Sets the wall clock (CLOCK_REALTIME), ns since the Unix epoch.
    fn set_clock(&mut self, unix_ns: u64) -> Result<(), String>;
}

/// The real thing: RNDADDENTROPY on /dev/urandom, clock_settime.
pub struct SystemActions;

/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

impl Actions for SystemActions {
    fn reseed(&mut self, entropy: &[u8]) -> Result<(), String> {
        // struct rand_pool_info { int entropy_count (bits); int buf_size (bytes); __u32 buf[]; }
        let mut req = vec![0u32; 2 + entropy.len().div_ceil(4)];
        req[0] = (entropy.len() * 8) as u32;
        req[1] = entropy.len() as u32;
        for (i, c) in entropy.chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            req[2 + i] = u32::from_ne_bytes(w);
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(|e| format!("/dev/urandom: {e}"))?;
        // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buffer holds buf_size bytes, which
        // `req` does; the fd is open for the call's duration.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, req.as_ptr()) };
        if r != 0 {
            return Err(format!(
                "RNDADDENTROPY: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    fn set_clock(&mut self, unix_ns: u64) -> Result<(), String> {
        let ts = libc::timespec {
            tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: a valid timespec for the duration of the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(format!(
                "clock_settime: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

/// The generation and id, read consistently (a snapshot can fall between two loads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub generation: u64,
    pub id: [u64; 2],
}

pub fn read_generation(r: &dyn Registers) -> Generation {
    loop {
        let generation = r.read_u64(REG_GENERATION);
        let id = [r.read_u64(REG_ID), r.read_u64(REG_ID + 8)];
        if r.read_u64(REG_GENERATION) == generation {
            return Generation { generation, id };
        }
    }
}

/// Host entropy from the page, mixed with the CPU's RDRAND when it has one: either source alone
/// suffices, and neither is a copy of the snapshot's state.
pub fn fresh_entropy(r: &dyn Registers) -> Vec<u8> {
    let mut out = Vec::with_capacity(RESEED_BYTES);
    while out.len() < RESEED_BYTES {
        let w = r.read_u64(REG_RANDOM) ^ rdrand().unwrap_or(0);
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

fn rdrand() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("rdrand") {
            let mut v = 0u64;
            for _ in 0..10 {
                // SAFETY: the CPU has RDRAND (checked above).
                if unsafe { std::arch::x86_64::_rdrand64_step(&mut v) } == 1 {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Notices generation changes.
pub struct Watcher {
    last: Generation,
}

/// What one change led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub from: u64,
    pub to: u64,
    /// Errors of the actions (the watcher carries on regardless).
    pub errors: Vec<String>,
}

impl Watcher {
    /// Starts from what the page says now (the agent starts at boot; nothing to fix yet).
    pub fn new(r: &dyn Registers) -> Self {
        Watcher {
            last: read_generation(r),
        }
    }

    /// Checks once; on a new generation or id, reseeds and sets the clock.
    pub fn poll(&mut self, r: &dyn Registers, actions: &mut dyn Actions) -> Option<Change> {
        let now = read_generation(r);
        if now == self.last {
            return None;
        }
        let mut errors = Vec::new();
        if let Err(e) = actions.reseed(&fresh_entropy(r)) {
            errors.push(e);
        }
        if let Err(e) = actions.set_clock(r.read_u64(REG_HOST_TIME_NS)) {
            errors.push(e);
        }
        let change = Change {
            from: self.last.generation,
            to: now.generation,
            errors,
        };
        self.last = now;
        Some(change)
    }
}

/// The agent's watcher thread body: polls forever, logging changes to stderr (the console).
pub fn watch_forever(page: MappedPage) {
    let mut w = Watcher::new(&page);
    loop {
        std::thread::sleep(POLL_INTERVAL);
        if let Some(c) = w.poll(&page, &mut SystemActions) {
            eprintln!(
                "kiln-agent: VM generation {} -> {}: reseeded the RNG, set the clock{}",
                c.from,
                c.to,
                if c.errors.is_empty() {
                    String::new()
                } else {
                    format!(" (errors: {})", c.errors.join("; "))
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A page the test changes, with a random register that never repeats.
    struct FakePage {
        regs: RefCell<[u64; 6]>,
        /// Applied after this many reads of the generation register (a "snapshot" mid-read).
        bump_after: RefCell<Option<(usize, u64)>>,
        gen_reads: RefCell<usize>,
    }

    impl FakePage {
        fn new(generation: u64, id: u64) -> Self {
            FakePage {
                regs: RefCell::new([
                    u64::from(GENID_MAGIC),
                    generation,
                    id,
                    !id,
                    1_700_000_000_000_000_000,
                    1,
                ]),
                bump_after: RefCell::new(None),
                gen_reads: RefCell::new(0),
            }
        }
        fn set(&self, generation: u64, id: u64) {
            let mut r = self.regs.borrow_mut();
            r[1] = generation;
            r[2] = id;
            r[3] = !id;
        }
    }

    impl Registers for FakePage {
        fn read_u64(&self, offset: usize) -> u64 {
            if offset == REG_GENERATION {
                let mut n = self.gen_reads.borrow_mut();
                *n += 1;
                if let Some((at, g)) = *self.bump_after.borrow() {
                    if *n > at {
                        self.regs.borrow_mut()[1] = g;
                    }
                }
            }
            let mut r = self.regs.borrow_mut();
            if offset == REG_RANDOM {
                r[5] = r[5]
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
            }
            r[offset / 8]
        }
    }

    #[derive(Default)]
    struct Recorder {
        reseeds: Vec<Vec<u8>>,
        clocks: Vec<u64>,
    }

    impl Actions for Recorder {
        fn reseed(&mut self, e: &[u8]) -> Result<(), String> {
            self.reseeds.push(e.to_vec());
            Ok(())
        }
        fn set_clock(&mut self, ns: u64) -> Result<(), String> {
            self.clocks.push(ns);
            Ok(())
        }
    }

    #[test]
    fn reseeds_and_sets_the_clock_once_per_new_generation() {
        let page = FakePage::new(0, 42);
        let mut w = Watcher::new(&page);
        let mut rec = Recorder::default();
        assert_eq!(w.poll(&page, &mut rec), None, "boot: nothing to do");
        page.set(1, 77);
        let c = w.poll(&page, &mut rec).expect("restore noticed");
        assert_eq!((c.from, c.to), (0, 1));
        assert!(c.errors.is_empty());
        assert_eq!(w.poll(&page, &mut rec), None, "acted once");
        assert_eq!(rec.reseeds.len(), 1);
        assert_eq!(rec.reseeds[0].len(), RESEED_BYTES);
        assert_eq!(rec.clocks, vec![1_700_000_000_000_000_000]);
        // A sibling fork restored at the same generation still has a new id: act.
        page.set(1, 78);
        assert!(w.poll(&page, &mut rec).is_some());
        assert_ne!(rec.reseeds[0], rec.reseeds[1], "fresh entropy each time");
    }

    #[test]
    fn a_generation_change_between_loads_is_read_again() {
        let page = FakePage::new(3, 1);
        // The first read sees 3, the re-check sees 4: the pair must be re-read.
        *page.bump_after.borrow_mut() = Some((1, 4));
        let g = read_generation(&page);
        assert_eq!(g.generation, 4);
    }

    #[test]
    fn maps_a_page_from_a_file_and_checks_the_magic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        let mut page = vec![0u8; 8192];
        page[4096..4100].copy_from_slice(&GENID_MAGIC.to_le_bytes());
        page[4096 + REG_GENERATION..4096 + REG_GENERATION + 8].copy_from_slice(&5u64.to_le_bytes());
        std::fs::write(&p, &page).unwrap();
        let m = MappedPage::open(&p, 4096).unwrap();
        assert_eq!(read_generation(&m).generation, 5);
        match MappedPage::open(&p, 0) {
            Err(GenIdError::NoDevice(0)) => {}
            other => panic!("{:?}", other.err()),
        }
        assert!(matches!(
            MappedPage::open(&dir.path().join("nope"), 0),
            Err(GenIdError::Io(..))
        ));
    }

    #[test]
    fn layout_matches_the_vmm_device() {
        // The agent is a guest program and does not link the VMM: compare with its source.
        let vmm = include_str!("../../vmm/src/devices/genid.rs");
        for (name, v) in [
            ("GENID_BASE", GENID_BASE),
            ("GENID_MAGIC", u64::from(GENID_MAGIC)),
            ("REG_MAGIC", REG_MAGIC as u64),
            ("REG_GENERATION", REG_GENERATION as u64),
            ("REG_ID", REG_ID as u64),
            ("REG_HOST_TIME_NS", REG_HOST_TIME_NS as u64),
            ("REG_RANDOM", REG_RANDOM as u64),
        ] {
            let line = vmm
                .lines()
                .find(|l| l.starts_with(&format!("pub const {name}:")))
                .unwrap_or_else(|| panic!("{name} not in the VMM's genid.rs"));
            let lit = line
                .rsplit('=')
                .next()
                .unwrap()
                .trim()
                .trim_end_matches(';');
            let lit = lit.replace('_', "");
            let got = match lit.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).unwrap(),
                None => lit.parse().unwrap(),
            };
            assert_eq!(got, v, "{name}");
        }
    }

    #[test]
    fn rndaddentropy_is_accepted_by_the_kernel() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: RNDADDENTROPY needs CAP_SYS_ADMIN");
            return;
        }
        let page = FakePage::new(0, 1);
        SystemActions
            .reseed(&fresh_entropy(&page))
            .expect("the kernel takes the entropy");
    }
}
