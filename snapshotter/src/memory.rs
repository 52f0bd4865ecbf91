//! Guest memory images in the block store.
//!
//! A memory image is a byte array: the VM's RAM regions concatenated in guest-address order
//! (the MMIO gap is not stored). It is cut into chunks of [`MEMORY_CHUNK_SIZE`] and kept as a
//! stack of layers, each a blob in the store:
//! - the first layer is a full capture (every chunk; zero chunks cost nothing in the store);
//! - each diff layer holds only the chunks dirtied since the parent snapshot, back to back, and
//!   lists which chunk indices they are.
//!
//! Restoring reads every chunk from the topmost layer that has it. Chunks are content-addressed,
//! so a page that did not change between snapshots is stored once however often it is captured.

use crate::lazy::{PageSource, SourceError};
use blockstore::{BlobId, BlobReader, PutOptions, Store};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::sync::Arc;

/// Chunk size of memory images. Smaller than disks' (512 KiB) because a chunk is what one
/// page fault loads; see README `## Snapshots` for the measurement behind it.
pub const MEMORY_CHUNK_SIZE: u32 = 64 * 1024;

/// One host mapping of guest RAM, in image order.
#[derive(Debug, Clone, Copy)]
pub struct HostRegion {
    pub host_addr: *const u8,
    pub size: usize,
}

// SAFETY: a HostRegion is an address + length used only while the VM is paused; it carries no
// thread-affine state.
unsafe impl Send for HostRegion {}
// SAFETY: see Send.
unsafe impl Sync for HostRegion {}

/// A memory image: size, chunking and layers (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    pub size: u64,
    pub chunk_size: u32,
    pub layers: Vec<Layer>,
}

/// One blob of a memory image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub blob: BlobId,
    /// Which chunk indices the blob holds, in order, as `[first, count]` runs; `None` = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<[u32; 2]>>,
}

/// Why a memory image could not be captured or opened.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("block store: {0}")]
    Store(#[from] blockstore::Error),
    #[error("memory image is inconsistent: {0}")]
    Invalid(String),
}

/// A set of dirty pages (4 KiB) over the whole image: bit `i` = page `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    pub pages: u64,
    pub bits: Vec<u64>,
}

impl DirtyPages {
    pub fn new(pages: u64) -> DirtyPages {
        DirtyPages {
            pages,
            bits: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Concatenates per-region bitmaps (as KVM_GET_DIRTY_LOG returns them, one per memory
    /// slot) in image order.
    pub fn from_regions(regions: &[(u64, Vec<u64>)]) -> DirtyPages {
        let total: u64 = regions.iter().map(|(p, _)| *p).sum();
        let mut d = DirtyPages::new(total);
        let mut base = 0u64;
        for (pages, bits) in regions {
            for p in 0..*pages {
                let w = (p / 64) as usize;
                if w < bits.len() && bits[w] >> (p % 64) & 1 == 1 {
                    d.set(base + p);
                }
            }
            base += pages;
        }
        d
    }

    pub fn set(&mut self, page: u64) {
        self.bits[(page / 64) as usize] |= 1 << (page % 64);
    }

    pub fn get(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize] >> (page % 64) & 1 == 1
    }

    pub fn union(&mut self, other: &DirtyPages) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= *b;
        }
    }

    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Chunk indices (of `chunk_size`) containing at least one dirty page.
    pub fn chunks(&self, chunk_size: u32) -> Vec<u32> {
        let per = (chunk_size as u64 / 4096).max(1);
        let mut out: Vec<u32> = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let b = word.trailing_zeros() as u64;
                word &= word - 1;
                let c = ((w as u64 * 64 + b) / per) as u32;
                if out.last() != Some(&c) {
                    out.push(c);
                }
            }
        }
        out
    }
}

/// `[first, count]` runs of a sorted index list.
pub fn to_runs(sorted: &[u32]) -> Vec<[u32; 2]> {
    let mut runs: Vec<[u32; 2]> = Vec::new();
    for &i in sorted {
        match runs.last_mut() {
            Some(r) if r[0] + r[1] == i => r[1] += 1,
            _ => runs.push([i, 1]),
        }
    }
    runs
}

/// The index list of `[first, count]` runs.
pub fn from_runs(runs: &[[u32; 2]]) -> impl Iterator<Item = u32> + '_ {
    runs.iter().flat_map(|r| r[0]..r[0].saturating_add(r[1]))
}

/// Reads regions back to back, as one stream (for `put_reader`).
struct RegionReader<'a> {
    regions: &'a [HostRegion],
    region: usize,
    off: usize,
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

fn total(regions: &[HostRegion]) -> u64 {
    regions.iter().map(|r| r.size as u64).sum()
}

/// Stores all of guest memory as a new single-layer image.
///
/// # Safety
/// Every region must stay mapped, readable and unmodified (VM paused) during the call.
pub unsafe fn capture_full(
    store: &Store,
    regions: &[HostRegion],
) -> Result<MemoryImage, MemoryError> {
    let size = total(regions);
    let opts = PutOptions {
        chunk_size: Some(MEMORY_CHUNK_SIZE),
        ..Default::default()
    };
    let blob = store.put_reader(
        RegionReader {
            regions,
            region: 0,
            off: 0,
        },
        &opts,
    )?;
    Ok(MemoryImage {
        size,
        chunk_size: MEMORY_CHUNK_SIZE,
        layers: vec![Layer { blob, runs: None }],
    })
}

/// Stores the chunks holding dirty pages as a new layer on top of `parent`.
///
/// # Safety
/// As for [`capture_full`].
pub unsafe fn capture_diff(
    store: &Store,
    parent: &MemoryImage,
    regions: &[HostRegion],
    dirty: &DirtyPages,
) -> Result<MemoryImage, MemoryError> {
    let size = total(regions);
    if size != parent.size || dirty.pages != size / 4096 {
        return Err(MemoryError::Invalid(format!(
            "diff over {size} bytes / {} dirty-map pages does not match the parent's {} bytes",
            dirty.pages, parent.size
        )));
    }
    let cs = parent.chunk_size as usize;
    let chunks = dirty.chunks(parent.chunk_size);
    let mut data = Vec::with_capacity(chunks.len() * cs);
    for &c in &chunks {
        // Chunks never straddle regions when region sizes are chunk multiples; copy page-wise
        // through the region list anyway so odd sizes stay correct.
        let start = c as u64 * cs as u64;
        let end = (start + cs as u64).min(size);
        let mut pos = start;
        let mut base = 0u64;
        for r in regions {
            let (rs, re) = (base, base + r.size as u64);
            if pos < re && end > rs {
                let a = pos.max(rs);
                let b = end.min(re);
                // SAFETY: [a-rs, b-rs) lies inside region r, readable per the contract.
                let s = unsafe {
                    std::slice::from_raw_parts(r.host_addr.add((a - rs) as usize), (b - a) as usize)
                };
                data.extend_from_slice(s);
                pos = b;
            }
            base = re;
        }
    }
    let opts = PutOptions {
        chunk_size: Some(parent.chunk_size),
        ..Default::default()
    };
    let blob = store.put_bytes(&data, &opts)?;
    let mut layers = parent.layers.clone();
    layers.push(Layer {
        blob,
        runs: Some(to_runs(&chunks)),
    });
    Ok(MemoryImage {
        size,
        chunk_size: parent.chunk_size,
        layers,
    })
}

/// Marks (as dirty pages) every chunk whose bytes no longer hash to the parent's chunk id,
/// among the chunks `dirty` does not already cover. Catches writes no dirty log saw.
///
/// # Safety
/// As for [`capture_full`].
pub unsafe fn add_changed_chunks(
    store: &Store,
    parent: &MemoryImage,
    regions: &[HostRegion],
    dirty: &mut DirtyPages,
) -> Result<u64, MemoryError> {
    let src = ImageSource::open(store, parent)?;
    let cs = parent.chunk_size as usize;
    let known: std::collections::HashSet<u32> =
        dirty.chunks(parent.chunk_size).into_iter().collect();
    let n = src.chunks();
    // Hashing RAM is the cost here: spread it over the cores.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let per_thread = n.div_ceil(threads).max(1);
    let changed: Vec<usize> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .step_by(per_thread)
            .map(|lo| {
                let (src, known) = (&src, &known);
                sc.spawn(move || {
                    let mut out = Vec::new();
                    let mut buf = vec![0u8; cs];
                    for idx in lo..(lo + per_thread).min(n) {
                        if known.contains(&(idx as u32)) {
                            continue;
                        }
                        let start = idx * cs;
                        let len = (parent.size as usize - start).min(cs);
                        // SAFETY: forwarded contract: the regions are readable and stable.
                        let bytes = match unsafe { contiguous(regions, start, len) } {
                            Some(s) => s,
                            None => {
                                // SAFETY: as above.
                                unsafe { gather(regions, start, &mut buf[..len]) };
                                &buf[..len]
                            }
                        };
                        let same = match src.chunk_id(idx) {
                            None => bytes.iter().all(|&b| b == 0),
                            Some(id) => blockstore::Digest::of(bytes) == id,
                        };
                        if !same {
                            out.push(idx);
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    for &idx in &changed {
        let start = idx * cs;
        let len = (parent.size as usize - start).min(cs);
        for p in 0..len.div_ceil(4096) {
            dirty.set((start / 4096 + p) as u64);
        }
    }
    Ok(changed.len() as u64)
}

/// The image bytes [start, start+len) if they lie in one region.
unsafe fn contiguous(regions: &[HostRegion], start: usize, len: usize) -> Option<&[u8]> {
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
unsafe fn gather(regions: &[HostRegion], start: usize, out: &mut [u8]) {
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

/// A memory image opened for reading: which layer and position serve each chunk.
pub struct ImageSource {
    image: MemoryImage,
    readers: Vec<BlobReader>,
    /// Per chunk: (layer, chunk position inside that layer's blob).
    map: Vec<(u16, u32)>,
}

impl ImageSource {
    /// Opens every layer (manifests only; data is read on demand) and checks the layers fit.
    pub fn open(store: &Store, image: &MemoryImage) -> Result<ImageSource, MemoryError> {
        let cs = image.chunk_size as u64;
        if image.chunk_size == 0 || !cs.is_multiple_of(4096) || !image.size.is_multiple_of(4096) {
            return Err(MemoryError::Invalid(format!(
                "chunk size {} / size {} not page multiples",
                image.chunk_size, image.size
            )));
        }
        let nchunks = image.size.div_ceil(cs) as usize;
        let chunk_len = |i: u32| (image.size - i as u64 * cs).min(cs);
        let mut map = vec![(u16::MAX, 0u32); nchunks];
        let mut readers = Vec::new();
        for (li, layer) in image.layers.iter().enumerate() {
            let r = store.open_blob(&layer.blob)?;
            if r.manifest().chunk_size != image.chunk_size {
                return Err(MemoryError::Invalid(format!(
                    "layer {li} ({}) has chunk size {}, image says {}",
                    layer.blob,
                    r.manifest().chunk_size,
                    image.chunk_size
                )));
            }
            let expect = match &layer.runs {
                None => {
                    for (i, m) in map.iter_mut().enumerate() {
                        *m = (li as u16, i as u32);
                    }
                    image.size
                }
                Some(runs) => {
                    let mut bytes = 0;
                    let mut prev: Option<u32> = None;
                    for (pos, c) in from_runs(runs).enumerate() {
                        if c as usize >= nchunks || prev.is_some_and(|p| p >= c) {
                            return Err(MemoryError::Invalid(format!(
                                "layer {li} lists chunk {c} out of order or beyond the image"
                            )));
                        }
                        prev = Some(c);
                        map[c as usize] = (li as u16, pos as u32);
                        bytes += chunk_len(c);
                    }
                    bytes
                }
            };
            if r.len() != expect {
                return Err(MemoryError::Invalid(format!(
                    "layer {li} ({}) holds {} bytes, expected {expect}",
                    layer.blob,
                    r.len()
                )));
            }
            readers.push(r);
        }
        if let Some(i) = map.iter().position(|m| m.0 == u16::MAX) {
            return Err(MemoryError::Invalid(format!("no layer holds chunk {i}")));
        }
        Ok(ImageSource {
            image: image.clone(),
            readers,
            map,
        })
    }

    pub fn image(&self) -> &MemoryImage {
        &self.image
    }

    /// The id of chunk `index` (`None` = all zeros).
    pub fn chunk_id(&self, index: usize) -> Option<blockstore::ChunkId> {
        let (l, pos) = self.map[index];
        self.readers[l as usize].manifest().chunks[pos as usize]
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.map.len()
    }
}

impl PageSource for ImageSource {
    fn chunk_size(&self) -> usize {
        self.image.chunk_size as usize
    }

    fn len(&self) -> u64 {
        self.image.size
    }

    fn chunk_is_zero(&self, index: usize) -> bool {
        let (l, pos) = self.map[index];
        self.readers[l as usize].manifest().chunks[pos as usize].is_none()
    }

    fn read_chunk(&self, index: usize, buf: &mut [u8]) -> Result<(), SourceError> {
        let (l, pos) = self.map[index];
        let off = pos as u64 * self.image.chunk_size as u64;
        let r = &self.readers[l as usize];
        match r.read_at(off, buf) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(SourceError {
                index,
                reason: format!("blob {} ended after {n} of {} bytes", r.id(), buf.len()),
            }),
            Err(e) => Err(SourceError {
                index,
                reason: e.to_string(),
            }),
        }
    }
}

/// Reads a whole image into `out` (eager restore, fork files, verification).
pub fn read_image(src: &ImageSource, out: &mut [u8]) -> Result<(), SourceError> {
    let cs = src.chunk_size();
    for (i, chunk) in out.chunks_mut(cs).enumerate().take(src.chunks()) {
        if src.chunk_is_zero(i) {
            chunk.fill(0);
        } else {
            src.read_chunk(i, chunk)?;
        }
    }
    Ok(())
}

/// Shares an [`ImageSource`] with the page handler.
pub fn into_source(src: ImageSource) -> Arc<dyn PageSource> {
    Arc::new(src)
}

/// Stores a memory image read from a stream (e.g. the VMM's `save_memory` written into a FIFO).
pub fn capture_full_from(
    store: &Store,
    size: u64,
    r: impl Read,
) -> Result<MemoryImage, MemoryError> {
    let opts = PutOptions {
        chunk_size: Some(MEMORY_CHUNK_SIZE),
        ..Default::default()
    };
    let blob = store.put_reader(r.take(size), &opts)?;
    let got = store.open_blob(&blob)?.len();
    if got != size {
        return Err(MemoryError::Invalid(format!(
            "memory stream ended after {got} of {size} bytes"
        )));
    }
    Ok(MemoryImage {
        size,
        chunk_size: MEMORY_CHUNK_SIZE,
        layers: vec![Layer { blob, runs: None }],
    })
}

/// A diff layer over `parent` from a stream of the whole memory: every chunk is hashed and
/// compared with the parent's, so it is exact without any dirty log (the CLI path, where the
/// VMM runs in another process).
pub fn capture_diff_from(
    store: &Store,
    parent: &MemoryImage,
    mut r: impl Read,
) -> Result<(MemoryImage, u64), MemoryError> {
    let src = ImageSource::open(store, parent)?;
    let cs = parent.chunk_size as usize;
    let mut buf = vec![0u8; cs];
    let mut changed = Vec::new();
    let mut data = Vec::new();
    for idx in 0..src.chunks() {
        let len = (parent.size as usize - idx * cs).min(cs);
        r.read_exact(&mut buf[..len]).map_err(|e| {
            MemoryError::Invalid(format!("memory stream ended at chunk {idx}: {e}"))
        })?;
        let same = match src.chunk_id(idx) {
            None => buf[..len].iter().all(|&b| b == 0),
            Some(id) => blockstore::Digest::of(&buf[..len]) == id,
        };
        if !same {
            changed.push(idx as u32);
            data.extend_from_slice(&buf[..len]);
        }
    }
    let opts = PutOptions {
        chunk_size: Some(parent.chunk_size),
        ..Default::default()
    };
    let blob = store.put_bytes(&data, &opts)?;
    let mut layers = parent.layers.clone();
    layers.push(Layer {
        blob,
        runs: Some(to_runs(&changed)),
    });
    Ok((
        MemoryImage {
            size: parent.size,
            chunk_size: parent.chunk_size,
            layers,
        },
        changed.len() as u64,
    ))
}
