//! Guest physical memory: layout (RAM around the MMIO gap below 4 GiB) and who supplies the
//! mapping (anonymous memory, or regions handed in by the caller, e.g. the snapshotter's
//! userfaultfd-registered or snapshot-backed mappings).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory with a dirty bitmap per region: every write the VMM makes through vm-memory
/// (virtqueue rings, device buffers) sets the bits of the pages it touched. The KVM dirty log
/// sees only the guest's writes; together they are the exact set a diff snapshot needs.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
/// The mapping behind a [`GuestRegionMmap`].
pub type MmapRegion = vm_memory::MmapRegion<AtomicBitmap>;

/// Start of the hole below 4 GiB reserved for devices (virtio-mmio, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the hole: RAM continues at 4 GiB.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the virtio-mmio device windows (inside the gap, identity-mapped for the guest).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Largest guest memory accepted (a guard against typos such as `--mem 1000000`).
pub const MAX_MEM_BYTES: u64 = 256 << 30;

/// Where a VM's guest memory comes from.
pub enum GuestMemorySource {
    /// Fresh private anonymous memory, zero-filled lazily by the host kernel.
    Anonymous,
    /// Memory the caller mapped itself (userfaultfd-registered, mapped from a snapshot file, ...).
    /// Its regions must match [`layout`] for the VM's memory size exactly.
    Provided(GuestMemoryMmap),
}

/// Memory errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} bytes is invalid: must be a non-zero multiple of 4 KiB and at most {MAX_MEM_BYTES} bytes")]
    BadSize(u64),
    #[error("provided guest memory does not match the layout for {size} bytes: expected {expected:?}, got {got:?}")]
    LayoutMismatch {
        size: u64,
        expected: Vec<(u64, u64)>,
        got: Vec<(u64, u64)>,
    },
    #[error("mapping guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
}

/// The (guest address, size) RAM ranges for `mem_bytes` of memory: one range below the MMIO gap,
/// and the rest above 4 GiB.
pub fn layout(mem_bytes: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if mem_bytes == 0 || !mem_bytes.is_multiple_of(4096) || mem_bytes > MAX_MEM_BYTES {
        return Err(MemoryError::BadSize(mem_bytes));
    }
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (mem_bytes - low) as usize));
    }
    Ok(ranges)
}

/// Builds (or validates) the guest memory for `mem_bytes`.
pub fn create(mem_bytes: u64, source: GuestMemorySource) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = layout(mem_bytes)?;
    match source {
        GuestMemorySource::Anonymous => Ok(GuestMemoryMmap::from_ranges(&ranges)?),
        GuestMemorySource::Provided(mem) => {
            let got: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
            let expected: Vec<(u64, u64)> = ranges.iter().map(|(a, s)| (a.0, *s as u64)).collect();
            if got != expected {
                return Err(MemoryError::LayoutMismatch {
                    size: mem_bytes,
                    expected,
                    got,
                });
            }
            Ok(mem)
        }
    }
}

/// One guest memory region as the host sees it (for the snapshotter: dumping, dirty tracking,
/// userfaultfd registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// KVM memory slot number.
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// The regions of `mem`, in slot order.
pub fn regions(mem: &GuestMemoryMmap) -> Vec<RegionInfo> {
    mem.iter()
        .enumerate()
        .map(|(slot, r)| RegionInfo {
            slot: slot as u32,
            guest_addr: r.start_addr().0,
            host_addr: r.as_ptr() as u64,
            size: r.len(),
        })
        .collect()
}

/// Records a VMM write into `[addr, addr+len)` that bypassed vm-memory (io_uring reading a disk
/// straight into guest buffers), so diff snapshots see it. Parts outside guest memory are ignored.
pub fn mark_written(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
    let mut addr = addr;
    let mut left = len;
    while left > 0 {
        let Some(r) = mem.find_region(addr) else {
            return;
        };
        let off = addr.unchecked_offset_from(r.start_addr());
        let n = left.min(r.len() - off);
        let m: &MmapRegion = r;
        m.bitmap().set_addr_range(off as usize, n as usize);
        addr = addr.unchecked_add(n);
        left -= n;
    }
}

/// The pages (4 KiB, bit i of word w = page w*64+i, as KVM_GET_DIRTY_LOG) of memory slot `slot`
/// the VMM wrote since the previous call, and clears them. `None` if there is no such slot.
pub fn take_written(mem: &GuestMemoryMmap, slot: u32) -> Option<Vec<u64>> {
    let r = mem.iter().nth(slot as usize)?;
    let m: &MmapRegion = r;
    Some(m.bitmap().get_and_reset())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_gap() {
        assert_eq!(layout(64 << 20).unwrap(), vec![(GuestAddress(0), 64 << 20)]);
        let big = layout(4 << 30).unwrap();
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(big[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
        assert!(layout(0).is_err());
        assert!(layout(4095).is_err());
        assert!(layout(MAX_MEM_BYTES + 4096).is_err());
    }

    #[test]
    fn provided_memory_must_match_layout() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            create(2 << 20, GuestMemorySource::Provided(mem.clone())),
            Err(MemoryError::LayoutMismatch { .. })
        ));
        let ok = create(1 << 20, GuestMemorySource::Provided(mem)).unwrap();
        assert_eq!(regions(&ok).len(), 1);
    }

    #[test]
    fn vmm_writes_are_tracked_per_page() {
        use vm_memory::Bytes;
        let mem = create(1 << 20, GuestMemorySource::Anonymous).unwrap();
        assert_eq!(take_written(&mem, 0).unwrap(), vec![0u64; 4]);
        mem.write_obj(7u32, GuestAddress(0x3000 + 4094)).unwrap(); // straddles pages 3 and 4
        mark_written(&mem, GuestAddress(0x10_0000 - 1), 100); // last page; the rest is outside
        let bits = take_written(&mem, 0).unwrap();
        assert_eq!(bits[0], 0b11000);
        assert_eq!(bits[3], 1 << 63);
        assert_eq!(
            take_written(&mem, 0).unwrap(),
            vec![0u64; 4],
            "taking clears"
        );
        assert!(take_written(&mem, 1).is_none());
    }
}
