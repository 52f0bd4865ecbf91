//! Chunk frames: how a chunk's bytes are stored, locally and in a remote. Every frame is a
//! standard zstd frame, so any zstd decoder reads it; chunks that do not compress (random or
//! already compressed data, encrypted memory) are stored as raw zstd blocks, which costs a
//! memcpy instead of a compression pass.

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::id::{ChunkId, Digest};
use crate::local::ChunkLocation;

/// zstd level for chunks that compress.
const LEVEL: i32 = 1;
/// Bytes compressed per sample, and samples per chunk, to decide whether a chunk compresses.
const SAMPLE: usize = 2048;
const SAMPLES: usize = 4;
/// A chunk compresses when its samples shrink below this fraction (in 1/100).
const WORTH_PERCENT: usize = 95;
/// zstd's largest block.
const MAX_BLOCK: usize = 128 * 1024;

/// Encodes chunks into frames; one per thread (it keeps a zstd context).
pub(crate) struct ChunkEncoder {
    comp: zstd::bulk::Compressor<'static>,
    sample_out: Vec<u8>,
}

impl ChunkEncoder {
    pub(crate) fn new() -> Result<ChunkEncoder> {
        Ok(ChunkEncoder {
            comp: zstd::bulk::Compressor::new(LEVEL)
                .map_err(|e| Error::io("zstd init", "<compressor>", e))?,
            sample_out: Vec::with_capacity(zstd::zstd_safe::compress_bound(SAMPLE)),
        })
    }

    /// The frame of `data` in `out` (replacing its contents).
    pub(crate) fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        if self.compresses(data)? {
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            self.comp
                .compress_to_buffer(data, out)
                .map_err(|e| Error::io("zstd compress", "<chunk>", e))?;
            if out.len() < data.len() {
                return Ok(());
            }
            out.clear();
        }
        raw_frame(data, out);
        Ok(())
    }

    /// Whether a few evenly spread samples of `data` compress.
    fn compresses(&mut self, data: &[u8]) -> Result<bool> {
        if data.len() < SAMPLE * SAMPLES * 2 {
            return Ok(true);
        }
        let step = data.len() / SAMPLES;
        let mut packed = 0;
        for i in 0..SAMPLES {
            let sample = &data[i * step..i * step + SAMPLE];
            self.sample_out.clear();
            self.comp
                .compress_to_buffer(sample, &mut self.sample_out)
                .map_err(|e| Error::io("zstd compress", "<chunk>", e))?;
            packed += self.sample_out.len();
        }
        Ok(packed * 100 < SAMPLE * SAMPLES * WORTH_PERCENT)
    }
}

/// A zstd frame holding `data` in raw (stored) blocks: single segment, 4-byte content size,
/// no checksum (the chunk id is the checksum).
fn raw_frame(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(9 + data.len() + 3 * data.len().div_ceil(MAX_BLOCK).max(1));
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    out.push(0b1010_0000); // FCS field 4 bytes, single segment
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0]); // one empty last block
    }
    while let Some(b) = blocks.next() {
        let last = blocks.peek().is_none() as u32;
        let header = last | ((b.len() as u32) << 3); // block type 0 = raw
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(b);
    }
}

/// The longest frame of a chunk of `len` bytes: a compressed frame is only kept when shorter
/// than the raw one; zstd's bound covers frames written by any zstd encoder.
pub(crate) fn max_frame_len(len: usize) -> usize {
    let raw = len + 9 + 3 * len.div_ceil(MAX_BLOCK).max(1);
    raw.max(zstd::zstd_safe::compress_bound(len))
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompress a chunk frame and check it against `id`. `max_len` bounds the output.
pub(crate) fn decode_chunk(
    id: &ChunkId,
    frame: &[u8],
    max_len: usize,
    at: Option<&ChunkLocation>,
) -> Result<Vec<u8>> {
    let integrity = || Error::Integrity {
        chunk: *id,
        location: at.map(ChunkLocation::to_string),
    };
    let plain = DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        match d.as_mut() {
            Some(d) => d.decompress(frame, max_len),
            None => zstd::bulk::decompress(frame, max_len),
        }
    });
    let plain = plain.map_err(|_| integrity())?;
    if Digest::of(&plain) != *id {
        return Err(integrity());
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_compressed_frames_decode_with_stock_zstd() {
        let mut enc = ChunkEncoder::new().unwrap();
        let mut x = 7u64;
        let random: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let text = b"kiln stores chunks ".repeat(4000);
        for data in [
            &random[..],
            &random[..65536],
            &random[..10],
            &[][..],
            &text[..],
        ] {
            let mut frame = Vec::new();
            enc.encode(data, &mut frame).unwrap();
            assert!(frame.len() <= data.len() + 9 + 3 * data.len().div_ceil(MAX_BLOCK).max(1));
            assert_eq!(zstd::bulk::decompress(&frame, data.len()).unwrap(), data);
            let id = Digest::of(data);
            assert_eq!(decode_chunk(&id, &frame, data.len(), None).unwrap(), data);
        }
        let mut frame = Vec::new();
        enc.encode(&text, &mut frame).unwrap();
        assert!(frame.len() < text.len() / 10, "text compresses");
        enc.encode(&random, &mut frame).unwrap();
        assert_eq!(
            frame.len(),
            random.len() + 9 + 3 * 3,
            "random is stored raw"
        );
    }
}
