//! kiln's content-addressed block store.

pub mod id;
pub mod remote;

pub use id::{BlobId, ChunkId, Digest};
