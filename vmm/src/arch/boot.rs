//! The Linux x86 boot protocol: load an ELF vmlinux or a bzImage, the initrd and the command line,
//! and fill boot_params (the zero page) with the e820 map.

use super::*;
use crate::memory::GuestMemoryMmap;
use crate::memory::{MMIO_GAP_END, MMIO_GAP_START};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// Boot errors: everything a bad `--kernel`/`--initrd`/`--cmdline` can produce.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {0} is neither a 64-bit ELF (vmlinux) nor a bzImage")]
    UnknownKernelFormat(String),
    #[error("loading kernel {path}: {source}")]
    KernelLoad { path: String, source: loader::Error },
    #[error("cannot read initrd {path}: {source}")]
    InitrdOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest memory below {max:#x}")]
    InitrdTooBig { size: u64, max: u64 },
    #[error("kernel command line is {0} bytes; at most {CMDLINE_MAX} are allowed")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot data into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What the vCPUs need to start the guest.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
}

enum Format {
    Elf,
    BzImage,
}

fn detect(file: &mut File) -> std::io::Result<Option<Format>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_full(file, &mut head)?;
    if n >= 5 && &head[..4] == b"\x7fELF" {
        // EI_CLASS 2 = 64-bit.
        return Ok((head[4] == 2).then_some(Format::Elf));
    }
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(Some(Format::BzImage));
    }
    Ok(None)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads kernel, initrd and command line into `mem` and writes boot_params.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let kpath = kernel.display().to_string();
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut kfile = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kpath.clone(),
        source,
    })?;
    let format = detect(&mut kfile)
        .map_err(|source| BootError::KernelOpen {
            path: kpath.clone(),
            source,
        })?
        .ok_or_else(|| BootError::UnknownKernelFormat(kpath.clone()))?;
    let kerr = |source| BootError::KernelLoad {
        path: kpath.clone(),
        source,
    };
    let (entry, setup_header, kernel_end) = match format {
        Format::Elf => {
            let r = loader::elf::Elf::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START)))
                .map_err(kerr)?;
            (r.kernel_load.raw_value(), None, r.kernel_end)
        }
        Format::BzImage => {
            let r = loader::bzimage::BzImage::load(
                mem,
                None,
                &mut kfile,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(kerr)?;
            // The 64-bit entry of a bzImage's protected-mode kernel is 0x200 past its start.
            (
                r.kernel_load.raw_value() + 0x200,
                r.setup_header,
                r.kernel_end,
            )
        }
    };

    // Command line.
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))?;

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = bytes.len() as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;

    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, path, kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // e820: low RAM up to the EBDA, then RAM from 1 MiB to the gap, then above 4 GiB.
    let mut e820 = vec![(0u64, EBDA_START)];
    for r in mem.iter() {
        let start = r.start_addr().raw_value();
        let end = start + r.len();
        if start == 0 {
            if end > HIMEM_START {
                e820.push((HIMEM_START, end.min(MMIO_GAP_START) - HIMEM_START));
            }
        } else {
            debug_assert!(start >= MMIO_GAP_END);
            e820.push((start, r.len()));
        }
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(BootInfo { entry })
}

/// Places the initrd at the top of low memory (page aligned, below INITRD_ADDR_MAX).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let pstr = path.display().to_string();
    let data =
        std::fs::read(path).map_err(|source| BootError::InitrdOpen { path: pstr, source })?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0);
    let top = low_end.min(INITRD_ADDR_MAX + 1);
    let max = top;
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitrdTooBig { size, max })?;
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok((addr, size))
}
