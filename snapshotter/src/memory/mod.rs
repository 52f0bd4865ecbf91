//! Guest memory images in the block store.
//!
//! A memory image is a byte array: the VM's RAM regions concatenated in guest-address order
//! (the MMIO gap is not stored). It is cut into chunks of [`MEMORY_CHUNK_SIZE`] and kept as a
//! stack of layers, each a blob in the store:
//! - the first layer is a full capture (every chunk; zero chunks cost nothing in the store);
//! - each diff layer holds only the 4 KiB pages dirtied since the parent snapshot, back to back,
//!   and lists which page indices they are (older diff layers hold whole chunks; `Layer::unit`
//!   says which). Page granularity matters: scattered writes dirty few pages but many chunks (1%
//!   of pages touch ~40% of 64 KiB chunks), so chunk-sized diffs would store ~15x the bytes.
//!
//! Restoring reads every chunk from the topmost chunk-granular layer that has it, then lays the
//! pages of later page-granular layers over it. Stored chunks are content-addressed, so data
//! that did not change between snapshots is stored once however often it is captured.

use crate::lazy::{PageSource, SourceError};
use crate::mapping::Mapping;
use kiln_blockstore::{BlobId, BlobReader, PutOptions, Store};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;

mod capture;
mod from_vmm;
mod regions;
mod source;
mod stage;

pub use capture::*;
pub use from_vmm::*;
use regions::*;
pub use source::*;
pub use stage::*;

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
    /// Which units the blob holds, in order, as `[first, count]` runs; `None` = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<[u32; 2]>>,
    /// Size of the units `runs` counts: `None` = the image's chunk size, [`PAGE`] for
    /// page-granular diff layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<u32>,
}

impl Layer {
    /// How many units (pages of a diff layer) the layer holds; `None` = all of the image.
    pub fn units(&self) -> Option<u64> {
        self.runs
            .as_ref()
            .map(|r| r.iter().map(|r| r[1] as u64).sum())
    }
}

/// The unit of dirty tracking and of page-granular diff layers.
pub const PAGE: u32 = 4096;

/// Why a memory image could not be captured or opened.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("block store: {0}")]
    Store(#[from] kiln_blockstore::Error),
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

    /// Indices of the dirty pages, ascending.
    pub fn page_list(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                out.push((w as u64 * 64 + word.trailing_zeros() as u64) as u32);
                word &= word - 1;
            }
        }
        out
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
