//! VM snapshot benchmarks with the kiln test guest on real KVM; prints one JSON object.
//!
//! `cargo run --release -p kiln-benches --bin snapshot_bench [-- --mem-mib 256 --runs 20 --forks 32 --create-runs 3]`
//!
//! - create: full snapshot of a paused guest with half its RAM holding data, against writing the
//!   whole RAM to a file (+fsync), as a file-based snapshot does: staged (`snapshot_begin`: the
//!   VM pauses while memory is copied, then runs while the copy is stored; pause and
//!   time-to-durable) and streamed (`snapshot`: paused until stored); medians of
//!   `--create-runs` rounds, each into an empty store;
//! - diff: a staged diff snapshot after 1% of pages were rewritten (pause, time-to-durable);
//! - restore: lazy (userfaultfd) restore to the first vsock reply, p50/p99, without and with
//!   the recorded working set (in-process: VM build + state restore + first reply; process
//!   spawn is not included);
//! - fork: N VMs from one snapshot (copy-on-write file mapping): wall time until every fork
//!   answered, and PSS / private memory per fork.

use kiln_blockstore::Store;
use kiln_snapshotter::record::{self, VmShape};
use kiln_snapshotter::vm::{
    self as snapvm, Identity, LazyRestore, RestoredMemory, SnapshotRequest,
};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lets the file system finish with the previous step (writeback, the discards of removed
/// files on this `discard`-mounted disk) so that it is not billed to the next measurement.
fn settle() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn ping(uds: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let r = (|| -> std::io::Result<()> {
            let s = UnixStream::connect(uds)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut w = s.try_clone()?;
            let mut r = BufReader::new(s);
            write!(w, "CONNECT 1\nPING\n")?;
            let mut l = String::new();
            r.read_line(&mut l)?;
            if !l.starts_with("OK") {
                return Err(std::io::Error::other(l));
            }
            l.clear();
            r.read_line(&mut l)?;
            if l.trim_end() != "PONG" {
                return Err(std::io::Error::other(l));
            }
            Ok(())
        })();
        match r {
            Ok(()) => return Ok(()),
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) => anyhow::bail!("no reply from {}: {e}", uds.display()),
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    pct(&mut v, 0.5)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sum of `field` (kB) over the smaps entries whose range lies in [start, start+len).
fn smaps_kb(start: u64, len: u64, field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut inside = false;
    let mut total = 0;
    for line in s.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = a >= start && b <= start + len;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
                total += v
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn main() -> anyhow::Result<()> {
    let mem_mib: u64 = arg("--mem-mib", 256);
    let runs: usize = arg("--runs", 20);
    let nforks: usize = arg("--forks", 32);
    let create_runs: usize = arg("--create-runs", 3).max(1);
    let dir = tempfile::tempdir_in(
        std::env::var("KILN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )?;
    let store = Store::open(&dir.path().join("store"))?;
    let shape = VmShape {
        mem_bytes: mem_mib * MIB,
        vcpus: 1,
        cmdline: String::new(),
        vsock_cid: Some(3),
    };

    // Boot the guest (CPL 3: native speed on PVM) and put data in half of its RAM.
    let uds = dir.path().join("src.vsock");
    let vm = kiln_tests::boot_test_guest(mem_mib * MIB, &uds, &dir.path().join("src.serial"))?;
    ping(&uds)?;
    let tracker = snapvm::DirtyTracker::start(&vm)?;
    vm.pause()?;
    let half = mem_mib / 2;
    let mut buf = vec![0u8; MIB as usize];
    for m in 16..16 + half {
        kiln_testguest::fill_pattern(m, m * MIB, &mut buf);
        vm.memory().write_slice(&buf, GuestAddress(m * MIB))?;
    }

    // Baseline: the whole RAM written to a file and made durable.
    let req = |name: &'static str| SnapshotRequest {
        shape: shape.clone(),
        name: Some(name),
        parent: None,
        tracker: Some(&tracker),
        disks: vec![],
    };
    // Each round: the baseline, a streamed and a staged capture, each into an empty store (so
    // no capture finds its chunks already stored). The last staged one is the base for the
    // diff and the restores below.
    let (mut file_ms, mut stream_ms, mut pause_ms, mut create_ms) =
        (vec![], vec![], vec![], vec![]);
    let (mut stream_stored, mut stored, mut copy_ms) = (0, 0, vec![]);
    let mut base = None;
    for round in 0..create_runs {
        if round > 0 {
            vm.pause()?;
        }
        // Baseline: the whole RAM written to a file and made durable.
        let regions = snapvm::host_regions(&vm);
        let file = dir.path().join("mem.raw");
        let t = Instant::now();
        {
            let mut f = std::fs::File::create(&file)?;
            for r in &regions {
                // SAFETY: VM paused; region mapped.
                f.write_all(unsafe { std::slice::from_raw_parts(r.host_addr, r.size) })?;
            }
            f.sync_all()?;
        }
        file_ms.push(ms(t.elapsed()));
        std::fs::remove_file(&file)?;
        settle();

        // Streamed: the VM stays paused while memory is hashed, compressed and made durable.
        let sdir = dir.path().join("stream-store");
        let stream_store = Store::open(&sdir)?;
        let t = Instant::now();
        snapvm::snapshot(&stream_store, &vm, req("bench-stream"))?;
        stream_ms.push(ms(t.elapsed()));
        stream_stored = stream_store.stats().bytes_written;
        drop(stream_store);
        std::fs::remove_dir_all(&sdir)?;
        settle();

        // Staged: the VM pauses for the copy only, then runs while the copy is stored.
        let last = round + 1 == create_runs;
        let tdir = dir.path().join("staged-store");
        let round_store = if last {
            None
        } else {
            Some(Store::open(&tdir)?)
        };
        let st = round_store.as_ref().unwrap_or(&store);
        let before = st.stats().bytes_written;
        let t = Instant::now();
        let pending = snapvm::snapshot_begin(&vm, req("bench-base"))?;
        vm.resume()?;
        pause_ms.push(ms(t.elapsed()));
        let (rec, rep) = pending.finish(st)?;
        create_ms.push(ms(t.elapsed()));
        copy_ms.push(rep.copy_ms);
        stored = st.stats().bytes_written - before;
        if let Some(s) = round_store {
            drop(s);
            std::fs::remove_dir_all(&tdir)?;
            settle();
        }
        base = Some((rec, rep));
    }
    let (base_rec, base_rep) = base.expect("--create-runs is at least 1");
    let (file_ms, stream_ms, pause_ms, create_ms, copy_ms) = (
        median(file_ms),
        median(stream_ms),
        median(pause_ms),
        median(create_ms),
        median(copy_ms),
    );

    // Diff: rewrite 1% of pages (host writes: the VMM's dirty bitmap sees them), then a diff
    // snapshot, again staged.
    vm.pause()?;
    let pages = mem_mib * MIB / 4096;
    let mut x = 0x1234_5678_u64;
    for _ in 0..pages / 100 {
        x = kiln_testguest::splitmix64(x);
        let p = x % pages;
        vm.memory().write_obj(x, GuestAddress(p * 4096 + 8))?;
    }
    let before = store.stats().bytes_written;
    let t = Instant::now();
    let pending = snapvm::snapshot_begin(
        &vm,
        SnapshotRequest {
            shape: shape.clone(),
            name: Some("bench-diff"),
            parent: Some((base_rep.snapshot, &base_rec)),
            tracker: Some(&tracker),
            disks: vec![],
        },
    )?;
    vm.resume()?;
    let diff_pause_ms = ms(t.elapsed());
    let (_diff_rec, diff_rep) = pending.finish(&store)?;
    let diff_ms = ms(t.elapsed());
    let diff_stored = store.stats().bytes_written - before;
    vm.stop();
    let _ = vm.wait_timeout(Duration::from_secs(5));
    drop(vm);

    // Restore: lazy, to first reply; first without a working set, recording one.
    let (id, rec) = record::load_checked(&store, "bench-base")?;
    let restore_once = |tag: &str,
                        ws: bool|
     -> anyhow::Result<(f64, kiln_snapshotter::LazyStats, Option<usize>)> {
        let t = Instant::now();
        let lazy = snapvm::lazy_memory(
            &store,
            &id,
            &rec,
            LazyRestore {
                use_working_set: ws,
                record: !ws,
                on_fatal: kiln_snapshotter::lazy::exit_process_hook(),
            },
        )?;
        let t_mem = t.elapsed();
        let mem = RestoredMemory::Lazy(lazy);
        let uds = dir.path().join(format!("{tag}.vsock"));
        let ident = Identity {
            vsock_uds: Some(uds.clone()),
            ..Default::default()
        };
        // SAFETY: mem outlives vm (dropped after it below).
        let vm = unsafe { snapvm::start_vm(&rec, &mem, &ident)? };
        let t_vm = t.elapsed();
        ping(&uds)?;
        if std::env::var_os("KILN_BENCH_VERBOSE").is_some() {
            eprintln!(
                "restore {tag}: memory {:?} vm {:?} reply {:?}",
                t_mem,
                t_vm,
                t.elapsed()
            );
        }
        let took = ms(t.elapsed());
        let lazy = mem.lazy().unwrap();
        let stats = lazy.stats();
        let recorded = if !ws {
            Some(snapvm::finish_recording(&store, &id, lazy)?)
        } else {
            None
        };
        vm.stop();
        let _ = vm.wait_timeout(Duration::from_secs(5));
        drop(vm);
        drop(mem);
        Ok((took, stats, recorded))
    };
    let mut cold = Vec::new();
    let mut cold_stats = None;
    let mut ws_chunks = 0;
    for i in 0..runs {
        let (t, s, rec) = restore_once(&format!("r{i}"), false)?;
        cold.push(t);
        ws_chunks = rec.unwrap_or(0);
        cold_stats = Some(s);
    }
    let mut warm = Vec::new();
    let mut warm_stats = None;
    for i in 0..runs {
        let (t, s, _) = restore_once(&format!("w{i}"), true)?;
        warm.push(t);
        warm_stats = Some(s);
    }

    // Fork N VMs from one materialized memory file.
    let t = Instant::now();
    let memfile = snapvm::materialize(&store, &rec, &dir.path().join("fork.mem"))?;
    let materialize_ms = ms(t.elapsed());
    let t = Instant::now();
    let mut forks = Vec::new();
    for i in 0..nforks {
        let m = kiln_snapshotter::Mapping::file_private(&memfile, rec.memory.size as usize)?;
        let mem = RestoredMemory::Mapped(m);
        let uds = dir.path().join(format!("f{i}.vsock"));
        let ident = Identity {
            vsock_uds: Some(uds.clone()),
            ..Default::default()
        };
        // SAFETY: mem is kept next to the VM and dropped after it.
        let vm = unsafe { snapvm::start_vm(&rec, &mem, &ident)? };
        forks.push((vm, mem, uds));
    }
    let started_ms = ms(t.elapsed());
    for (_, _, uds) in &forks {
        ping(uds)?;
    }
    let fork_ms = ms(t.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    let mut pss = Vec::new();
    let mut private = Vec::new();
    for (_, mem, _) in &forks {
        let a = mem.host_addr() as u64;
        pss.push(smaps_kb(a, rec.memory.size, "Pss") as f64 / 1024.0);
        private.push(
            (smaps_kb(a, rec.memory.size, "Private_Dirty")
                + smaps_kb(a, rec.memory.size, "Private_Clean")) as f64
                / 1024.0,
        );
    }
    for (vm, mem, _) in forks {
        vm.stop();
        let _ = vm.wait_timeout(Duration::from_secs(5));
        drop(vm);
        drop(mem);
    }
    let out = serde_json::json!({
        "bench": "snapshot",
        "mem_mib": mem_mib,
        "data_mib": half,
        "create": {
            "pause_ms": pause_ms,
            "durable_ms": create_ms,
            "copy_ms": copy_ms,
            "rounds": create_runs,
            "bytes_stored": stored,
            "streamed_ms": stream_ms,
            "streamed_bytes_stored": stream_stored,
            "file_write_fsync_ms": file_ms,
            "file_bytes": mem_mib * MIB,
            "pause_speedup_vs_file": file_ms / pause_ms,
            "durable_speedup_vs_file": file_ms / create_ms,
            "streamed_speedup_vs_file": file_ms / stream_ms,
        },
        "diff_1pct": {
            "pause_ms": diff_pause_ms,
            "durable_ms": diff_ms,
            "dirty_pages": diff_rep.dirty_pages,
            "bytes_stored": diff_stored,
        },
        "restore_lazy_first_reply_ms": {
            "no_working_set": { "p50": pct(&mut cold.clone(), 0.5), "p99": pct(&mut cold, 0.99), "stats": cold_stats },
            "working_set": { "chunks": ws_chunks, "p50": pct(&mut warm.clone(), 0.5), "p99": pct(&mut warm, 0.99), "stats": warm_stats },
            "runs": runs,
        },
        "fork": {
            "n": nforks,
            "materialize_ms": materialize_ms,
            "wall_ms_all_started": started_ms,
            "wall_ms_all_replied": fork_ms,
            "pss_mib_per_fork_median": pct(&mut pss.clone(), 0.5),
            "private_mib_per_fork_median": pct(&mut private, 0.5),
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    let _ = Arc::new(());
    Ok(())
}
