//! virtio-blk request parsing: a descriptor chain -> a validated request, or the status to
//! answer with. Strict: chain shape, directions, lengths, sector range, guest-memory bounds.
//! Nothing here touches the disk, so it is tested (and fuzzed with proptest) in isolation.

use crate::memory::GuestMemoryMmap;
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the device id returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: u32 = 20;
/// Most data segments per request (announced as seg_max).
pub const MAX_SEGMENTS: usize = 128;
/// Largest request accepted, in bytes.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
}

/// One data segment: guest address, length, and its host address (validated to lie inside one
/// guest memory region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub guest_addr: u64,
    pub len: u32,
    pub host_addr: usize,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Byte offset on the disk.
    pub offset: u64,
    pub segments: Vec<Segment>,
    /// Sum of segment lengths.
    pub data_len: u64,
}

/// A chain that could not become a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Status to report, if the chain has a usable status byte.
    pub status_addr: Option<GuestAddress>,
    pub status: u8,
    pub reason: &'static str,
}

/// A parsed chain: its head index, status byte address and the request (or why not).
#[derive(Debug)]
pub struct Parsed {
    pub head: u16,
    pub outcome: Result<(Request, GuestAddress), Rejected>,
}

/// The host address of `[addr, addr+len)` if it lies in one region of `mem`.
pub fn host_range(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Option<usize> {
    let region = mem.find_region(addr)?;
    let off = addr.checked_offset_from(region.start_addr())?;
    if off.checked_add(len)? > region.len() {
        return None;
    }
    Some(region.as_ptr() as usize + off as usize)
}

/// Parses one chain. `capacity` is the disk size in bytes.
pub fn parse<M>(chain: DescriptorChain<M>, capacity: u64, read_only: bool) -> Parsed
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let head = chain.head_index();
    let mem: GuestMemoryMmap = chain.memory().clone();
    // The chain iterator stops at the queue size (no loops) and at 4 GiB of total length.
    let descs: Vec<_> = chain.take(MAX_SEGMENTS + 3).collect();
    let outcome = parse_descs(&mem, &descs, capacity, read_only);
    Parsed { head, outcome }
}

fn reject(status_addr: Option<GuestAddress>, status: u8, reason: &'static str) -> Rejected {
    Rejected {
        status_addr,
        status,
        reason,
    }
}

fn parse_descs(
    mem: &GuestMemoryMmap,
    descs: &[virtio_queue::desc::split::Descriptor],
    capacity: u64,
    read_only: bool,
) -> Result<(Request, GuestAddress), Rejected> {
    // Status: the last descriptor, device-writable, at least one byte, inside guest memory.
    let last = descs.last().ok_or(reject(None, 0, "empty chain"))?;
    let status_addr =
        (last.is_write_only() && last.len() >= 1 && host_range(mem, last.addr(), 1).is_some())
            .then_some(last.addr())
            .ok_or(reject(None, 0, "no writable status descriptor"))?;
    let ioerr = |reason| reject(Some(status_addr), VIRTIO_BLK_S_IOERR, reason);
    if descs.len() < 2 {
        return Err(ioerr("chain too short"));
    }
    if descs.len() > MAX_SEGMENTS + 2 {
        return Err(ioerr("too many segments"));
    }
    // Header: the first descriptor, driver-readable, 16 bytes.
    let hdr = &descs[0];
    if hdr.is_write_only() || hdr.len() < 16 {
        return Err(ioerr("bad header descriptor"));
    }
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, hdr.addr())
        .map_err(|_| ioerr("header outside guest memory"))?;
    let req_type = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
    let kind = match req_type {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        _ => {
            return Err(reject(
                Some(status_addr),
                VIRTIO_BLK_S_UNSUPP,
                "unsupported request type",
            ))
        }
    };
    // The status descriptor may carry more than the status byte only if it is exactly 1 byte
    // long per spec; we only use its first byte, so longer is tolerated.
    let data = &descs[1..descs.len() - 1];
    let device_writes = matches!(kind, RequestKind::Read | RequestKind::GetId);
    let mut segments = Vec::with_capacity(data.len());
    let mut total: u64 = 0;
    for d in data {
        if d.is_write_only() != device_writes {
            return Err(ioerr("data descriptor has the wrong direction"));
        }
        if d.len() == 0 {
            continue;
        }
        let host = host_range(mem, d.addr(), u64::from(d.len()))
            .ok_or(ioerr("data buffer outside guest memory"))?;
        total += u64::from(d.len());
        if total > MAX_REQUEST_BYTES {
            return Err(ioerr("request too large"));
        }
        if device_writes {
            // io_uring fills these buffers through raw pointers, past vm-memory's dirty
            // bitmap: record them for diff snapshots.
            crate::memory::mark_written(mem, d.addr(), u64::from(d.len()));
        }
        segments.push(Segment {
            guest_addr: d.addr().raw_value(),
            len: d.len(),
            host_addr: host,
        });
    }
    let offset = match kind {
        RequestKind::Read | RequestKind::Write => {
            if read_only && kind == RequestKind::Write {
                return Err(ioerr("write to a read-only disk"));
            }
            if !total.is_multiple_of(SECTOR_SIZE) {
                return Err(ioerr("data length is not a multiple of 512"));
            }
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(ioerr("sector overflows"))?;
            let end = offset.checked_add(total).ok_or(ioerr("range overflows"))?;
            if end > capacity {
                return Err(ioerr("access beyond the end of the disk"));
            }
            offset
        }
        RequestKind::Flush => 0,
        RequestKind::GetId => {
            if total < u64::from(VIRTIO_BLK_ID_BYTES) {
                return Err(ioerr("GET_ID buffer shorter than 20 bytes"));
            }
            0
        }
    };
    Ok((
        Request {
            kind,
            offset,
            segments,
            data_len: total,
        },
        status_addr,
    ))
}
