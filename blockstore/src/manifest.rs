//! Blob manifests and their canonical byte form.
//!
//! ```text
//! "KILNBLOB" | version u32 LE (=1) | chunk_size u32 LE | size u64 LE | count u64 LE
//! | count x 32-byte chunk id (32 zero bytes = an all-zero chunk, stored as nothing)
//! ```
//! The blob id is blake3 of exactly these bytes.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::{BlobId, ChunkId, Digest};
use crate::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

const MAGIC: &[u8; 8] = b"KILNBLOB";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8;

/// What a blob is made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// Length in bytes.
    pub size: u64,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// One entry per chunk; `None` = all zeros.
    pub chunks: Vec<Option<ChunkId>>,
}

/// Check a chunk size: a power of two in [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE].
pub(crate) fn check_chunk_size(cs: u32) -> Result<()> {
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(Error::Invalid(format!(
            "chunk size {cs} must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )));
    }
    Ok(())
}

/// Number of chunks of a blob of `size` bytes.
pub(crate) fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(chunk_size as u64)
}

impl Manifest {
    /// Canonical bytes (what the blob id hashes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 32 * self.chunks.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            match c {
                Some(id) => out.extend_from_slice(id.as_bytes()),
                None => out.extend_from_slice(&[0u8; 32]),
            }
        }
        out
    }

    /// The blob id of this manifest.
    pub fn id(&self) -> BlobId {
        Digest::of(&self.to_bytes())
    }

    /// Parse canonical bytes; `id` (the name they were stored under) is checked against them.
    pub fn from_bytes(id: &BlobId, bytes: &[u8]) -> Result<Manifest> {
        let bad = |reason: &str| Error::CorruptManifest {
            blob: *id,
            reason: reason.to_string(),
        };
        if Digest::of(bytes) != *id {
            return Err(bad("bytes do not hash to the blob id"));
        }
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad("not a kiln manifest"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        if u32_at(8) != VERSION {
            return Err(bad("unknown manifest version"));
        }
        let chunk_size = u32_at(12);
        let size = u64_at(16);
        let count = u64_at(24);
        check_chunk_size(chunk_size).map_err(|_| bad("bad chunk size"))?;
        if count != chunk_count(size, chunk_size)
            || bytes.len() as u64 != HEADER as u64 + 32 * count
        {
            return Err(bad("chunk count does not match size"));
        }
        let chunks = bytes[HEADER..]
            .chunks_exact(32)
            .map(|c| {
                let d: [u8; 32] = c.try_into().unwrap();
                (d != [0u8; 32]).then_some(Digest(d))
            })
            .collect();
        Ok(Manifest {
            size,
            chunk_size,
            chunks,
        })
    }

    /// Length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = i as u64 * self.chunk_size as u64;
        (self.size - start).min(self.chunk_size as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let m = Manifest {
            size: 5000,
            chunk_size: 4096,
            chunks: vec![Some(Digest::of(b"a")), None],
        };
        let b = m.to_bytes();
        let id = m.id();
        assert_eq!(Manifest::from_bytes(&id, &b).unwrap(), m);
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(Manifest::from_bytes(&id, &bad).is_err());
        assert!(Manifest::from_bytes(&Digest::of(&bad), &bad).is_err()); // count mismatch
        assert_eq!(m.chunk_len(0), 4096);
        assert_eq!(m.chunk_len(1), 904);
    }
}
