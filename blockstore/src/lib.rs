//! kiln's content-addressed block store.
//!
//! # Model
//! - A **blob** is a byte array (a disk image, a guest memory image, a state record). It is cut
//!   into fixed-size, aligned **chunks** (the chunk size is per blob, a power of two between
//!   4 KiB and 16 MiB); a chunk is named by the blake3 hash of its plain bytes ([`ChunkId`]).
//!   All-zero chunks are stored as nothing. Chunks are zstd-compressed at rest and in S3.
//! - A blob's [`Manifest`] (size, chunk size, chunk ids) has canonical bytes; the blob id
//!   ([`BlobId`]) is their blake3 hash, so equal content gives equal ids.
//! - An [`Overlay`] is a writable copy-on-write view of a blob (a VM disk, an image build step);
//!   [`Overlay::commit`] turns it into a new blob that shares every unchanged chunk.
//!
//! # Local tier layout (plain files, no database)
//! ```text
//! <dir>/packs/<hex>.pack  zstd frames of many chunks + an index; a pack's presence is the index
//! <dir>/blobs/<hex>       one manifest per blob (canonical bytes); presence = blob is visible
//! <dir>/names/<hex(name)> the blob id a name points to
//! <dir>/pins/<hex>        path of an overlay directory whose base gc must keep
//! <dir>/remote-chunks     append-only log of chunk ids the remote is known to hold
//! <dir>/remote-bundles    append-only log of (chunk id, blob id): which remote bundle holds it
//! <dir>/tmp/              files being written (tmp + fsync + rename)
//! <dir>/gc.lock           flock: writers hold it shared, gc exclusive
//! ```
//! Plain files instead of sled: sled lets only one process open its database, and kiln runs
//! several processes on one store at once (a VMM serving disks for its whole life, a CLI putting
//! and collecting). Files written with tmp + fsync + rename are atomic, multi-process safe and
//! survive kill -9 without a recovery step.
//!
//! # Concurrency and crash safety
//! A put appends its new chunks to one pack file in `tmp/`, makes it durable (one fdatasync,
//! which flushes only this file, unlike a `syncfs` that waits for every process's dirty pages),
//! renames it into `packs/`, fsyncs the directory, and only then writes the manifest (tmp +
//! fsync + rename + dir fsync). So a visible manifest never points at a missing or half-written
//! chunk, and a pack in `packs/` is always complete and durable. Every writer holds `gc.lock`
//! shared; gc holds it exclusive, so gc never races a put in any process.

pub mod id;
pub mod remote;

mod bundle;
mod cache;
mod error;
mod frame;
mod fsutil;
mod local;
mod maint;
mod manifest;
pub mod names;
mod overlay;
mod pack;
mod persist;
mod put;
pub use put::Announce;
mod store;
mod tier;

pub use error::{Error, Result};
pub use id::{BlobId, ChunkId, Digest};
pub use local::ChunkLocation;
pub use manifest::Manifest;
pub use overlay::Overlay;
pub use store::{
    BlobInfo, BlobReader, BlobStat, GcReport, PushReport, Store, StoreOptions, StoreStats,
    VerifyReport,
};
pub use tier::{DirRemote, RemoteTier};

use std::sync::Arc;

/// Default chunk size for blobs whose [`PutOptions::chunk_size`] is `None`.
/// Chosen by measurement: see README `## Block store`.
pub const DEFAULT_CHUNK_SIZE: u32 = 512 * 1024;

/// Smallest and largest chunk sizes accepted (powers of two only).
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;

/// A progress callback: called with the number of input bytes processed so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Options for [`Store::put_file`], [`Store::put_bytes`] and [`Store::put_reader`].
#[derive(Clone, Default)]
pub struct PutOptions {
    /// Chunk size (power of two, 4 KiB..16 MiB); `None` = [`DEFAULT_CHUNK_SIZE`].
    pub chunk_size: Option<u32>,
    /// Also point this name at the new blob (after it is durable).
    pub name: Option<String>,
    /// Called with the number of bytes consumed so far.
    pub progress: Option<Progress>,
}

impl PutOptions {
    /// Options with a name.
    pub fn named(name: &str) -> PutOptions {
        PutOptions {
            name: Some(name.to_string()),
            ..Default::default()
        }
    }
}
