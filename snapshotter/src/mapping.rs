//! Page-aligned host mappings that back guest memory.

use std::os::fd::AsRawFd;

/// Host page size assumed everywhere (x86_64).
pub const PAGE_SIZE: usize = 4096;

/// An owned `mmap` region, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; concurrent access to its bytes is
// the user's business (guest memory is shared with vCPU threads by design, as in vm-memory).
unsafe impl Send for Mapping {}
// SAFETY: see Send; &Mapping only hands out raw pointers and the length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A private anonymous mapping of `len` bytes (rounded up to pages), not reserved in swap:
    /// untouched pages cost nothing.
    pub fn anonymous(len: usize) -> std::io::Result<Mapping> {
        let len = round_up(len.max(PAGE_SIZE), PAGE_SIZE);
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr as *mut u8,
            len,
        })
    }

    /// A copy-on-write (MAP_PRIVATE) mapping of a whole file: pages are shared with every other
    /// private mapping of the same file (through the page cache) until written. This is how
    /// forks share a snapshot's memory.
    pub fn file_private(file: &std::fs::File, len: usize) -> std::io::Result<Mapping> {
        let len = round_up(len.max(PAGE_SIZE), PAGE_SIZE);
        // SAFETY: maps a file we hold open; MAP_PRIVATE so the file is never modified.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr as *mut u8,
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping as a byte slice.
    ///
    /// # Safety
    /// No one may write the mapping while the slice lives (e.g. the VM is paused), and every
    /// page must be readable without blocking forever (not a uffd range whose handler is gone).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the caller upholds the contract above; the range is mapped for self's life.
        unsafe { std::slice::from_raw_parts(self.addr, self.len) }
    }

    /// The mapping as a mutable byte slice.
    ///
    /// # Safety
    /// The caller must be the only one accessing the mapping while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as above, exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region this value created.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

pub(crate) fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}
