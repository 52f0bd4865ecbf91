//! Warm random 4 KiB reads through `Store::read_at` against `pread` on the raw file (in the
//! page cache), same run, 1 and 2 threads; plus cold local reads (memory cache dropped: each
//! read loads, decompresses and verifies a whole chunk from the local tier).
//!
//! `cargo run --release -p kiln-benches --bin store_read [-- --size-mb 512 --reads 400000 --chunks-kib 64,512]`

#[path = "store_util/mod.rs"]
mod util;

use std::os::unix::fs::FileExt;
use std::time::Instant;

use kiln_blockstore::{PutOptions, Store, StoreOptions};
use rand::{Rng, SeedableRng};
use util::*;

fn offsets(n: usize, size: u64, seed: u64) -> Vec<u64> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| r.random_range(0..size / 4096) * 4096)
        .collect()
}

/// IOPS of `f` over `offs`, split across `threads`.
fn iops(threads: usize, offs: &[u64], f: &(dyn Fn(u64, &mut [u8]) + Sync)) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in offs.chunks(offs.len().div_ceil(threads)) {
            s.spawn(move || {
                let mut buf = vec![0u8; 4096];
                for &o in part {
                    f(o, &mut buf);
                }
            });
        }
    });
    offs.len() as f64 / t.elapsed().as_secs_f64()
}

/// Where a cold local chunk load spends its time: reading the frame file (page cache warm)
/// versus zstd decompression + blake3 verification. Decides whether io_uring could pay.
fn split_cold(
    store: &kiln_blockstore::Store,
    ids: &[kiln_blockstore::ChunkId],
    cs: usize,
) -> anyhow::Result<(f64, f64)> {
    let locs: Vec<_> = ids
        .iter()
        .take(500)
        .filter_map(|id| store.local_chunk(id))
        .collect();
    let (frames, t_read) = time(|| {
        locs.iter()
            .map(|l| {
                let mut frame = vec![0u8; l.len as usize];
                std::fs::File::open(&l.path)?.read_exact_at(&mut frame, l.offset)?;
                Ok(frame)
            })
            .collect::<std::io::Result<Vec<_>>>()
    });
    let frames = frames?;
    let (_, t_dec) = time(|| {
        for f in &frames {
            let plain = zstd::bulk::decompress(f, cs).unwrap();
            std::hint::black_box(blake3::hash(&plain));
        }
    });
    let n = locs.len().max(1) as f64;
    Ok((
        t_read.as_secs_f64() * 1e6 / n,
        t_dec.as_secs_f64() * 1e6 / n,
    ))
}

fn main() -> anyhow::Result<()> {
    let size_mb: usize = arg("--size-mb", 512);
    let reads: usize = arg("--reads", 400_000);
    let chunks: String = arg("--chunks-kib", "64,128,512".to_string());
    let dir = scratch()?;
    let raw = dir.path().join("raw.img");
    mixed_file(&raw, size_mb * MIB, 3)?;
    let size = (size_mb * MIB) as u64;
    let file = std::fs::File::open(&raw)?;
    std::fs::read(&raw)?; // page cache
    let offs = offsets(reads, size, 1);
    let pread = |o: u64, b: &mut [u8]| {
        file.read_exact_at(b, o).unwrap();
    };
    let mut rows = Vec::new();
    for cs_kib in chunks
        .split(',')
        .filter_map(|s| s.trim().parse::<u32>().ok())
    {
        let store = Store::open_with(
            &dir.path().join(format!("store-{cs_kib}")),
            StoreOptions {
                cache_bytes: 2 * size as usize,
                ..Default::default()
            },
        )?;
        let id = store.put_file(
            &raw,
            &PutOptions {
                chunk_size: Some(cs_kib * 1024),
                ..Default::default()
            },
        )?;
        let blob = store.open_blob(&id)?;
        // correctness spot check
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        for &o in offs.iter().take(1000) {
            blob.read_at(o, &mut a)?;
            file.read_exact_at(&mut b, o)?;
            anyhow::ensure!(a == b, "mismatch at {o}");
        }
        // Cold local reads: one chunk load (read frame + zstd + blake3) per read.
        store.drop_memory_cache();
        // One read in each of (up to) 1000 distinct chunks, in random order.
        let cs = cs_kib as u64 * 1024;
        let mut idx: Vec<u64> = (0..size / cs).collect();
        let mut r = rand::rngs::StdRng::seed_from_u64(2);
        for i in (1..idx.len()).rev() {
            idx.swap(i, r.random_range(0..=i));
        }
        idx.truncate(1000);
        let cold_offs: Vec<u64> = idx
            .iter()
            .map(|c| c * cs + r.random_range(0..cs / 4096) * 4096)
            .collect();
        let t = Instant::now();
        for &o in &cold_offs {
            blob.read_at(o, &mut a)?;
        }
        let cold_us = t.elapsed().as_secs_f64() * 1e6 / cold_offs.len() as f64;
        // Warm: load every chunk once, then measure.
        let mut whole = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            off += blob.read_at(off, &mut whole)? as u64;
        }
        let store_read = |o: u64, buf: &mut [u8]| {
            blob.read_at(o, buf).unwrap();
        };
        let ids: Vec<_> = blob.manifest().chunks.iter().flatten().copied().collect();
        let (read_us, decode_us) = split_cold(&store, &ids, cs_kib as usize * 1024)?;
        let mut row = serde_json::json!({
            "chunk_size": cs_kib * 1024,
            "cold_local_read_us": cold_us,
            "load_split_frame_read_us": read_us,
            "load_split_decompress_verify_us": decode_us,
        });
        for threads in [1usize, 2] {
            // Interleave to share the machine's noise fairly.
            let p1 = iops(threads, &offs, &pread);
            let s1 = iops(threads, &offs, &store_read);
            let p2 = iops(threads, &offs, &pread);
            let s2 = iops(threads, &offs, &store_read);
            let (p, s) = ((p1 + p2) / 2.0, (s1 + s2) / 2.0);
            row[format!("threads_{threads}")] = serde_json::json!({
                "pread_iops": p, "read_at_iops": s, "ratio": s / p,
            });
        }
        rows.push(row);
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "store_read", "blob_bytes": size, "reads": reads,
            "goal": "warm read_at/pread ratio >= 0.8", "by_chunk_size": rows,
        })
    );
    Ok(())
}
