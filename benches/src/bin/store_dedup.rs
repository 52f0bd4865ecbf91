//! Dedup: two versions of a disk image that differ in 1% of their blocks; how much new data
//! does the second put store? Swept over chunk sizes and two kinds of change:
//! scattered 4 KiB blocks (worst case for fixed chunks) and 64 KiB extents (files rewritten).
//!
//! `cargo run --release -p kiln-benches --bin store_dedup [-- --size-mb 1024 --chunks-kib 64,128,256,512,1024]`

#[path = "store_util/mod.rs"]
mod util;

use std::os::unix::fs::FileExt;

use kiln_blockstore::{PutOptions, Store};
use rand::{Rng, RngCore, SeedableRng};
use util::*;

/// Copy `src` to `dst` and overwrite 1% of its `block`-sized blocks with random bytes.
fn mutate(
    src: &std::path::Path,
    dst: &std::path::Path,
    block: usize,
    seed: u64,
) -> anyhow::Result<u64> {
    std::fs::copy(src, dst)?;
    let f = std::fs::OpenOptions::new().write(true).open(dst)?;
    let len = f.metadata()?.len() as usize;
    let blocks = len / block;
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; block];
    let n = blocks / 100;
    let mut chosen = std::collections::HashSet::new();
    while chosen.len() < n {
        chosen.insert(r.random_range(0..blocks));
    }
    for b in chosen {
        r.fill_bytes(&mut buf);
        f.write_all_at(&buf, (b * block) as u64)?;
    }
    Ok((n * block) as u64)
}

fn main() -> anyhow::Result<()> {
    let size_mb: usize = arg("--size-mb", 1024);
    let chunks: String = arg("--chunks-kib", "64,128,256,512,1024".to_string());
    let dir = scratch()?;
    let v1 = dir.path().join("v1.img");
    mixed_file(&v1, size_mb * MIB, 7)?;
    let variants = [("scattered_4k_blocks", 4096usize), ("extents_64k", 65536)];
    let mut v2s = Vec::new();
    for (i, (name, block)) in variants.iter().enumerate() {
        let p = dir.path().join(format!("v2-{name}.img"));
        let changed = mutate(&v1, &p, *block, 100 + i as u64)?;
        v2s.push((name, p, changed));
    }
    let mut results = Vec::new();
    for cs_kib in chunks
        .split(',')
        .filter_map(|s| s.trim().parse::<u32>().ok())
    {
        let cs = cs_kib * 1024;
        let sdir = dir.path().join(format!("store-{cs_kib}"));
        let store = Store::open(&sdir)?;
        let opts = PutOptions {
            chunk_size: Some(cs),
            ..Default::default()
        };
        let (r, d1) = time(|| store.put_file(&v1, &opts));
        r?;
        let v1_stored = store.stats().bytes_written;
        let v1_chunks = store.stats().chunks_written;
        let mut row = serde_json::json!({
            "chunk_size": cs,
            "v1_put_s": d1.as_secs_f64(),
            "v1_stored_bytes": v1_stored,
            "v1_chunks": v1_chunks,
        });
        for (name, p, changed) in &v2s {
            let before = store.stats();
            store.put_file(p, &opts)?;
            let after = store.stats();
            let new_chunks = after.chunks_written - before.chunks_written;
            let new_bytes = after.bytes_written - before.bytes_written;
            row[name.to_string()] = serde_json::json!({
                "changed_bytes": changed,
                "changed_fraction": *changed as f64 / (size_mb * MIB) as f64,
                "new_chunks": new_chunks,
                "new_plain_bytes": new_chunks * cs as u64,
                "new_plain_fraction": (new_chunks * cs as u64) as f64 / (size_mb * MIB) as f64,
                "new_stored_bytes": new_bytes,
                "new_stored_vs_v1_stored": new_bytes as f64 / v1_stored as f64,
            });
        }
        results.push(row);
        std::fs::remove_dir_all(&sdir)?;
    }
    println!(
        "{}",
        serde_json::json!({ "bench": "store_dedup", "file_bytes": size_mb * MIB, "by_chunk_size": results })
    );
    Ok(())
}
