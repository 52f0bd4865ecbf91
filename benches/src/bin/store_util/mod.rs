//! Shared helpers of the store_* benchmarks (not a binary: no main.rs).
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

pub const MIB: usize = 1 << 20;

/// A disk-image-like file of `size` bytes, in 1 MiB segments: 40% random, 20% compressible
/// text-like, 20% zeros, 20% repeats of earlier segments.
pub fn mixed_file(path: &Path, size: usize, seed: u64) -> anyhow::Result<()> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::with_capacity(4 * MIB, std::fs::File::create(path)?);
    let mut earlier: Vec<Vec<u8>> = Vec::new();
    let words: Vec<&[u8]> = vec![
        b"kernel ", b"lib", b"usr/", b"0x00ff ", b"error: ", b"\n", b"the ", b"config", b"=1;",
    ];
    let mut seg = vec![0u8; MIB];
    for _ in 0..size.div_ceil(MIB) {
        let kind = r.random_range(0..10);
        match kind {
            0..=3 => r.fill_bytes(&mut seg),
            4 | 5 => {
                let mut i = 0;
                while i < MIB {
                    let w = words[r.random_range(0..words.len())];
                    let n = w.len().min(MIB - i);
                    seg[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            6 | 7 => seg.fill(0),
            _ => {
                if let Some(e) = earlier.get(r.random_range(0..earlier.len().max(1))) {
                    seg.copy_from_slice(e)
                } else {
                    r.fill_bytes(&mut seg)
                }
            }
        }
        if kind <= 5 && earlier.len() < 64 {
            earlier.push(seg.clone());
        }
        f.write_all(&seg)?;
    }
    f.flush()?;
    f.get_ref().set_len(size as u64)?;
    Ok(())
}

/// Flush dirty pages so one measurement does not pay for the previous one's writeback.
pub fn sync() {
    let _ = std::process::Command::new("sync").status();
}

pub fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

pub use kiln_benches::arg;

/// A scratch directory on the same filesystem as the store would be (KILN_BENCH_DIR or /var/tmp).
pub fn scratch() -> anyhow::Result<tempfile::TempDir> {
    let base = std::env::var("KILN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    Ok(tempfile::Builder::new()
        .prefix("kiln-bench-")
        .tempdir_in(base)?)
}

/// Total bytes of the files under `dir`.
pub fn du(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            n += if md.is_dir() { du(&e.path()) } else { md.len() };
        }
    }
    n
}

/// CPU seconds (user + system) used so far by this process (`children` = false) or by its
/// waited-for children.
pub fn cpu_s(children: bool) -> f64 {
    let who = if children {
        libc::RUSAGE_CHILDREN
    } else {
        libc::RUSAGE_SELF
    };
    // SAFETY: getrusage writes into the zeroed struct we pass; no other memory is touched.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
