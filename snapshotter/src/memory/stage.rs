//! Staging: guest memory copied out of a paused VM (its own regions, another process's, or a
//! stream) into host memory laid out as the image, stored once the VM runs again.

use super::*;

/// Guest memory copied out of a paused VM, to be stored once the VM runs again: the pause then
/// lasts for a zero check and a memcpy, not for hashing, compressing and syncing. Holds as much
/// host memory as the copied (non-zero or dirty) pages until stored.
pub struct Staged {
    pub(super) size: u64,
    pub(super) chunk_size: u32,
    pub(super) kind: StagedKind,
}

pub(super) enum StagedKind {
    /// The image's layout; only the chunks marked present were written (the rest are zero).
    Full { buf: Mapping, present: Vec<bool> },
    /// The dirty pages back to back over `parent`, and their indices (ascending); with
    /// `only_changed`, pages equal to the parent's are dropped when stored.
    Diff {
        parent: MemoryImage,
        data: Vec<u8>,
        pages: Vec<u32>,
        only_changed: bool,
    },
}

/// A staging buffer for an image of `size` bytes, its chunk count and the chunks per copying
/// thread. Laid out as the image; only non-zero chunks are written, so untouched (zero) parts
/// cost no memory, and threads fill disjoint chunk ranges without coordination.
fn staging_buffer(size: u64) -> Result<(Mapping, usize, usize), MemoryError> {
    let n = size.div_ceil(MEMORY_CHUNK_SIZE as u64) as usize;
    // No MADV_HUGEPAGE: with THP defrag on `madvise`, faulting huge pages in compacted memory
    // synchronously and made the copy 3-4x slower here (measured: 350-370 vs 94-120 ms).
    let buf = Mapping::anonymous(size as usize)
        .map_err(|e| MemoryError::Invalid(format!("staging buffer of {size} bytes: {e}")))?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    Ok((buf, n, n.div_ceil(threads).max(1)))
}

/// Copies the non-zero chunks of guest memory for a full image, on every core.
///
/// # Safety
/// As for [`capture_full`] (only during this call).
pub unsafe fn stage_full(regions: &[HostRegion]) -> Result<Staged, MemoryError> {
    let size = total(regions);
    let cs = MEMORY_CHUNK_SIZE as usize;
    let (buf, n, per) = staging_buffer(size)?;
    let dst = buf.as_ptr() as usize;
    let present: Vec<bool> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|lo| {
                sc.spawn(move || {
                    let mut out = Vec::with_capacity(per);
                    let mut tmp = vec![0u8; cs];
                    for idx in lo..(lo + per).min(n) {
                        let len = (size as usize - idx * cs).min(cs);
                        // SAFETY: inside the image; regions readable and stable per the
                        // contract.
                        let bytes = match unsafe { contiguous(regions, idx * cs, len) } {
                            Some(b) => b,
                            None => {
                                // SAFETY: as above.
                                unsafe { gather(regions, idx * cs, &mut tmp[..len]) };
                                &tmp[..len]
                            }
                        };
                        let nonzero = !is_zero(bytes);
                        if nonzero {
                            populate(dst + idx * cs, len);
                            // SAFETY: [idx*cs, idx*cs+len) lies in the staging buffer (image
                            // size) and no other thread writes this chunk.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    bytes.as_ptr(),
                                    (dst + idx * cs) as *mut u8,
                                    len,
                                )
                            };
                        }
                        out.push(nonzero);
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("staging thread panicked"))
            .collect()
    });
    Ok(Staged {
        size,
        chunk_size: MEMORY_CHUNK_SIZE,
        kind: StagedKind::Full { buf, present },
    })
}

/// Copies guest memory straight out of another process (the VMM of a paused VM) with
/// `process_vm_readv`, on every core, into a staging buffer laid out like the image, skipping
/// zero chunks. `regions` are (address in that process, size), in image order.
pub fn stage_process(pid: i32, regions: &[(u64, u64)]) -> Result<Staged, MemoryError> {
    let size: u64 = regions.iter().map(|r| r.1).sum();
    let cs = MEMORY_CHUNK_SIZE as usize;
    let (buf, n, per) = staging_buffer(size)?;
    let dst = buf.as_ptr() as usize;
    let untouched = untouched_chunks(pid, regions, cs);
    let untouched = &untouched;
    let parts: Vec<Result<Vec<bool>, MemoryError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|lo| {
                sc.spawn(move || {
                    let mut out = Vec::with_capacity(per);
                    // 1 MiB per syscall, then chunk by chunk.
                    const BATCH: usize = 16;
                    let hi = (lo + per).min(n);
                    for first in (lo..hi).step_by(BATCH) {
                        let last = (first + BATCH).min(hi);
                        let start = first * cs;
                        let len = (size as usize).min(last * cs) - start;
                        if let Some(u) = untouched {
                            if u[first..last].iter().all(|&z| z) {
                                out.extend(std::iter::repeat_n(false, last - first));
                                continue;
                            }
                        }
                        // Straight into the staging buffer, its pages faulted in by one call.
                        populate(dst + start, len);
                        // SAFETY: [start, start+len) lies in the staging buffer and only this
                        // thread touches it.
                        let area = unsafe {
                            std::slice::from_raw_parts_mut((dst + start) as *mut u8, len)
                        };
                        read_remote(pid, regions, start as u64, area)?;
                        for chunk in area.chunks(cs) {
                            let nonzero = !is_zero(chunk);
                            if !nonzero {
                                // Give back the zero pages we just faulted in.
                                // SAFETY: a range of our own staging mapping; its contents (zeros)
                                // are not needed (absent pages of an anonymous mapping read as 0).
                                unsafe {
                                    libc::madvise(
                                        chunk.as_ptr() as *mut libc::c_void,
                                        chunk.len(),
                                        libc::MADV_DONTNEED,
                                    )
                                };
                            }
                            out.push(nonzero);
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("staging thread panicked"))
            .collect()
    });
    let mut present = Vec::with_capacity(n);
    for p in parts {
        present.extend(p?);
    }
    Ok(Staged {
        size,
        chunk_size: MEMORY_CHUNK_SIZE,
        kind: StagedKind::Full { buf, present },
    })
}

/// Faults in `[addr, addr+len)` of a staging buffer with one call (MADV_POPULATE_WRITE, Linux
/// 5.14+) instead of one trap per page, which cost more than the copy itself. Best effort.
fn populate(addr: usize, len: usize) {
    // SAFETY: only ever called on ranges of our own staging mappings; populating changes no
    // contents.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
}

/// Per image chunk, whether it is certainly zero without reading it: every page of it is
/// neither present nor swapped (`/proc/PID/pagemap`) in private anonymous memory that no
/// userfaultfd serves (`/proc/PID/smaps`: no backing file, no `um` flag). Such a page was never
/// written. Memory filled lazily (userfaultfd) or mapped from a file has missing pages that
/// are not zero: then `None`, and everything is read.
fn untouched_chunks(pid: i32, regions: &[(u64, u64)], cs: usize) -> Option<Vec<bool>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    // (start, end, plain anonymous and not userfaultfd-registered)
    let mut vmas: Vec<(u64, u64, bool)> = Vec::new();
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                // perms, offset, dev, inode, then the path if any.
                let inode = parts.nth(3).unwrap_or("0");
                let anon = inode == "0" && parts.next().is_none();
                vmas.push((a, b, anon));
                continue;
            }
        }
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags
                .split_whitespace()
                .any(|f| f == "um" || f == "uw" || f == "ui")
            {
                if let Some(v) = vmas.last_mut() {
                    v.2 = false;
                }
            }
        }
    }
    let plain = |a: u64, b: u64| {
        // [a, b) must be covered by plain anonymous VMAs only.
        let mut at = a;
        for &(s, e, ok) in &vmas {
            if s <= at && at < e {
                if !ok {
                    return false;
                }
                at = e;
                if at >= b {
                    return true;
                }
            }
        }
        false
    };
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let mut zero_pages: Vec<bool> = Vec::new();
    for &(addr, len) in regions {
        if addr % 4096 != 0 || len % 4096 != 0 || !plain(addr, addr + len) {
            return None;
        }
        let mut raw = vec![0u8; (len / 4096 * 8) as usize];
        pagemap.read_exact_at(&mut raw, addr / 4096 * 8).ok()?;
        // Bit 63: present; bit 62: swapped.
        zero_pages.extend(
            raw.chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) >> 62 == 0),
        );
    }
    let per = cs / 4096;
    Some(
        zero_pages
            .chunks(per)
            .map(|c| c.iter().all(|&z| z))
            .collect(),
    )
}

/// Reads image bytes [off, off+out.len()) from process `pid`'s regions.
fn read_remote(
    pid: i32,
    regions: &[(u64, u64)],
    off: u64,
    out: &mut [u8],
) -> Result<(), MemoryError> {
    let mut base = 0u64;
    let end = off + out.len() as u64;
    for &(addr, len) in regions {
        let (rs, re) = (base, base + len);
        if off < re && end > rs {
            let a = off.max(rs);
            let b = end.min(re);
            let dst = &mut out[(a - off) as usize..(b - off) as usize];
            let local = libc::iovec {
                iov_base: dst.as_mut_ptr() as *mut libc::c_void,
                iov_len: dst.len(),
            };
            let remote = libc::iovec {
                iov_base: (addr + (a - rs)) as *mut libc::c_void,
                iov_len: dst.len(),
            };
            // SAFETY: `local` is our own writable buffer of iov_len bytes; the remote range is
            // only read (by the kernel, checked against that process's mappings).
            let got = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            if got != dst.len() as isize {
                return Err(MemoryError::Invalid(format!(
                    "reading {} bytes of guest memory from process {pid}: {}",
                    dst.len(),
                    if got < 0 {
                        std::io::Error::last_os_error().to_string()
                    } else {
                        format!("short read ({got})")
                    }
                )));
            }
        }
        base = re;
    }
    if end > base {
        return Err(MemoryError::Invalid(format!(
            "image range ends at {end}, beyond the regions' {base} bytes"
        )));
    }
    Ok(())
}

/// Copies a memory stream of `size` bytes (e.g. the VMM's `save_memory` written into a FIFO)
/// into a staging buffer laid out like the image, skipping zero chunks, to be stored later.
pub fn stage_stream(size: u64, mut r: impl Read) -> Result<Staged, MemoryError> {
    let cs = MEMORY_CHUNK_SIZE as usize;
    let n = size.div_ceil(cs as u64) as usize;
    let buf = Mapping::anonymous(size as usize)
        .map_err(|e| MemoryError::Invalid(format!("staging buffer of {size} bytes: {e}")))?;
    let mut present = Vec::with_capacity(n);
    let mut tmp = vec![0u8; cs];
    for idx in 0..n {
        let len = (size as usize - idx * cs).min(cs);
        r.read_exact(&mut tmp[..len]).map_err(|e| {
            MemoryError::Invalid(format!("memory stream ended at chunk {idx}: {e}"))
        })?;
        let nonzero = !is_zero(&tmp[..len]);
        if nonzero {
            // SAFETY: the buffer is ours, not yet shared, and [idx*cs, idx*cs+len) lies in it.
            unsafe { buf.as_mut_slice()[idx * cs..idx * cs + len].copy_from_slice(&tmp[..len]) };
        }
        present.push(nonzero);
    }
    Ok(Staged {
        size,
        chunk_size: MEMORY_CHUNK_SIZE,
        kind: StagedKind::Full { buf, present },
    })
}

/// Copies the dirty pages for a diff layer over `parent`.
///
/// # Safety
/// As for [`capture_full`] (only during this call).
pub unsafe fn stage_diff(
    parent: &MemoryImage,
    regions: &[HostRegion],
    dirty: &DirtyPages,
) -> Result<Staged, MemoryError> {
    let size = total(regions);
    if size != parent.size || dirty.pages != size / PAGE as u64 {
        return Err(MemoryError::Invalid(format!(
            "diff over {size} bytes / {} dirty-map pages does not match the parent's {} bytes",
            dirty.pages, parent.size
        )));
    }
    let pages = dirty.page_list();
    let mut data = vec![0u8; pages.len() * PAGE as usize];
    for (&p, out) in pages.iter().zip(data.chunks_mut(PAGE as usize)) {
        // SAFETY: page p lies inside the image (dirty.pages == size / 4096); the regions are
        // readable and stable per the contract.
        unsafe { gather(regions, p as usize * PAGE as usize, out) };
    }
    Ok(Staged {
        size,
        chunk_size: parent.chunk_size,
        kind: StagedKind::Diff {
            parent: parent.clone(),
            data,
            pages,
            only_changed: false,
        },
    })
}

impl Staged {
    /// Bytes copied out of the VM.
    pub fn bytes(&self) -> usize {
        match &self.kind {
            StagedKind::Full { present, .. } => {
                present.iter().filter(|&&p| p).count() * self.chunk_size as usize
            }
            StagedKind::Diff { data, .. } => data.len(),
        }
    }

    /// Stores the copy: a full image, or the parent's layers plus one page-granular layer.
    pub fn store(self, store: &Store) -> Result<MemoryImage, MemoryError> {
        match self.kind {
            StagedKind::Full { buf, present } => {
                let opts = PutOptions {
                    chunk_size: Some(self.chunk_size),
                    ..Default::default()
                };
                // SAFETY: the buffer is ours and no longer written.
                let data = unsafe { buf.as_slice() };
                let cs = self.chunk_size as usize;
                // Chunks never copied were zero; the others are read in place.
                let blob = store.put_chunks(self.size, &opts, |i| {
                    present[i].then(|| &data[i * cs..(i * cs + cs).min(self.size as usize)])
                })?;
                Ok(MemoryImage {
                    size: self.size,
                    chunk_size: self.chunk_size,
                    layers: vec![Layer {
                        blob,
                        runs: None,
                        unit: None,
                    }],
                })
            }
            StagedKind::Diff {
                parent,
                data,
                pages,
                only_changed,
            } => {
                let (pages, data) = if only_changed {
                    changed_pages(store, &parent, pages, data)?
                } else {
                    (pages, data)
                };
                let mut layers = parent.layers;
                layers.push(put_page_layer(store, self.chunk_size, &data, &pages)?);
                Ok(MemoryImage {
                    size: self.size,
                    chunk_size: self.chunk_size,
                    layers,
                })
            }
        }
    }
}

/// The pages (ascending, with their bytes back to back) that differ from `parent`'s.
fn changed_pages(
    store: &Store,
    parent: &MemoryImage,
    pages: Vec<u32>,
    data: Vec<u8>,
) -> Result<(Vec<u32>, Vec<u8>), MemoryError> {
    let src = ImageSource::open(store, parent)?;
    let cs = parent.chunk_size as usize;
    let per_chunk = cs / PAGE as usize;
    let mut old = vec![0u8; cs];
    let mut loaded = None;
    let (mut kept, mut kept_data) = (Vec::new(), Vec::new());
    for (p, new) in pages.into_iter().zip(data.chunks(PAGE as usize)) {
        let idx = p as usize / per_chunk;
        let len = (parent.size as usize - idx * cs).min(cs);
        if loaded != Some(idx) {
            src.read_chunk(idx, &mut old[..len])
                .map_err(|e| MemoryError::Invalid(e.to_string()))?;
            loaded = Some(idx);
        }
        let at = (p as usize % per_chunk) * PAGE as usize;
        if new != &old[at..at + PAGE as usize] {
            kept.push(p);
            kept_data.extend_from_slice(new);
        }
    }
    Ok((kept, kept_data))
}
