//! Put throughput on a mixed 1 GiB file against `zstd -1 -T0` alone on the same file, same run.
//!
//! `cargo run --release -p kiln-benches --bin store_put [-- --size-mb 1024 --runs 3 --chunk-kib 512]`
//! Prints one JSON object. Both sides read a file that is in the page cache; the store's put
//! additionally hashes every chunk and makes its chunks and manifest durable (syncfs/fsync),
//! which zstd does not.

#[path = "store_util/mod.rs"]
mod util;

use std::process::Command;

use kiln_benches::median;
use kiln_blockstore::{PutOptions, Store};
use util::*;

fn main() -> anyhow::Result<()> {
    let size_mb: usize = arg("--size-mb", 1024);
    let runs: usize = arg("--runs", 3);
    let chunk_kib: u32 = arg("--chunk-kib", kiln_blockstore::DEFAULT_CHUNK_SIZE / 1024);
    let dir = scratch()?;
    let input = dir.path().join("input.img");
    mixed_file(&input, size_mb * MIB, 1)?;
    let bytes = (size_mb * MIB) as f64;
    // Warm the page cache for both contenders.
    std::fs::read(&input)?;

    let mut zstd_s = Vec::new();
    let mut zstd_bytes = 0;
    let mut put_s = Vec::new();
    let mut stored = 0;
    let mut zstd_cpu = Vec::new();
    let mut put_cpu = Vec::new();
    for i in 0..runs {
        let out = dir.path().join("out.zst");
        sync();
        let c0 = cpu_s(true);
        let (st, d) = time(|| {
            Command::new("zstd")
                .args(["-1", "-T0", "-q", "-f"])
                .arg(&input)
                .arg("-o")
                .arg(&out)
                .status()
        });
        anyhow::ensure!(st?.success(), "zstd failed");
        zstd_s.push(d.as_secs_f64());
        zstd_cpu.push(cpu_s(true) - c0);
        zstd_bytes = std::fs::metadata(&out)?.len();
        std::fs::remove_file(&out)?;

        let sdir = dir.path().join(format!("store{i}"));
        let store = Store::open(&sdir)?;
        sync();
        let c0 = cpu_s(false);
        let opts = PutOptions {
            chunk_size: Some(chunk_kib * 1024),
            ..Default::default()
        };
        let (id, d) = time(|| store.put_file(&input, &opts));
        id?;
        put_s.push(d.as_secs_f64());
        put_cpu.push(cpu_s(false) - c0);
        stored = du(&sdir.join("packs"));
        std::fs::remove_dir_all(&sdir)?;
    }
    let z = median(zstd_s.clone());
    let p = median(put_s.clone());
    let out = serde_json::json!({
        "bench": "store_put",
        "file_bytes": bytes as u64,
        "chunk_size": chunk_kib * 1024,
        "runs": runs,
        "zstd_1_T0_s": zstd_s,
        "put_s": put_s,
        "zstd_MBps_median": bytes / z / 1e6,
        "put_MBps_median": bytes / p / 1e6,
        "put_speed_vs_zstd": z / p,
        "zstd_cpu_s": zstd_cpu,
        "put_cpu_s": put_cpu,
        "put_cpu_efficiency_vs_zstd": median(zstd_cpu.clone()) / median(put_cpu.clone()),
        "load_avg_1m": std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split(' ').next().map(str::to_string)),
        "zstd_output_bytes": zstd_bytes,
        "store_chunk_bytes": stored,
        "goal": "put_speed_vs_zstd >= 1.0",
    });
    println!("{out}");
    Ok(())
}
