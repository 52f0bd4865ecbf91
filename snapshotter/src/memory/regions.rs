//! A paused VM's RAM as host regions, read in image order: as one stream, or by image offset
//! (in place when a range lies in one region, gathered across regions otherwise).

use super::*;

/// Reads regions back to back, as one stream (for `put_reader`).
pub(super) struct RegionReader<'a> {
    pub(super) regions: &'a [HostRegion],
    pub(super) region: usize,
    pub(super) off: usize,
}

impl Read for RegionReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.region < self.regions.len() {
            let r = self.regions[self.region];
            if self.off < r.size {
                let n = buf.len().min(r.size - self.off);
                // SAFETY: the caller of capture_full guarantees the regions stay mapped and
                // unwritten (VM paused) while capturing.
                let src = unsafe { std::slice::from_raw_parts(r.host_addr.add(self.off), n) };
                buf[..n].copy_from_slice(src);
                self.off += n;
                return Ok(n);
            }
            self.region += 1;
            self.off = 0;
        }
        Ok(0)
    }
}

pub(super) fn total(regions: &[HostRegion]) -> u64 {
    regions.iter().map(|r| r.size as u64).sum()
}

/// The image bytes [start, start+len) if they lie in one region.
///
/// # Safety
/// The regions must be readable for the returned lifetime.
pub(super) unsafe fn contiguous(regions: &[HostRegion], start: usize, len: usize) -> Option<&[u8]> {
    let mut base = 0;
    for r in regions {
        if start >= base && start + len <= base + r.size {
            // SAFETY: inside region r; the caller guarantees it is readable.
            return Some(unsafe { std::slice::from_raw_parts(r.host_addr.add(start - base), len) });
        }
        base += r.size;
    }
    None
}

/// Copies image bytes starting at `start` across region boundaries into `out`.
///
/// # Safety
/// The regions must be readable.
pub(super) unsafe fn gather(regions: &[HostRegion], start: usize, out: &mut [u8]) {
    let mut base = 0;
    let end = start + out.len();
    for r in regions {
        let (rs, re) = (base, base + r.size);
        if start < re && end > rs {
            let a = start.max(rs);
            let b = end.min(re);
            // SAFETY: [a-rs, b-rs) is inside region r.
            let s = unsafe { std::slice::from_raw_parts(r.host_addr.add(a - rs), b - a) };
            out[a - start..b - start].copy_from_slice(s);
        }
        base = re;
    }
}
