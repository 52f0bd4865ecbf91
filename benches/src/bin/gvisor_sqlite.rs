//! The SQLite workload sandbox vendors publish (benches/sqlite_workload.py: Python's sqlite3,
//! 100k inserts in transactions, an index, 5k point lookups, 200 committed updates, 1k small
//! files written and read) inside a kiln sandbox, against the same script with the same
//! Python in the same root file system natively and under raw `runsc do`, interleaved in one
//! run; prints one JSON object (progress on stderr).
//!
//! `cargo build --release -p kiln-cli -p kiln-benches && KILN_AGENT=<static agent>
//!  target/release/gvisor_sqlite [--runs 5] [--platform systrap] [--raw-overlay root:memory]`
//!
//! - the tree: `debootstrap --variant=minbase --include=python3 bookworm`, cached at
//!   /var/cache/kiln-bench/debian-python3-rootfs (kiln_tests::registry), packed with umoci
//!   (cached beside it) and imported with `kiln image import` into a temporary home;
//! - native: the tree's own /usr/bin/python3 under `chroot` (in a private mount namespace that
//!   binds the work directory to /mnt), once with the work directory on the host's disk and
//!   once on tmpfs (/dev/shm): gVisor's writable layer is in memory (or a file) and its fsync
//!   does not reach a disk, so the tmpfs row is the strict baseline;
//! - raw runsc: `runsc --platform=P --network=none --overlay2=O do -root TREE python3 ...`,
//!   its work directory in the sandbox's writable layer;
//! - kiln: `kiln sandbox create py` (CLI, `KILN_GVISOR_PLATFORM=P`), then `kiln sandbox exec
//!   ID -- python3 -c SCRIPT /root/work`; a fresh sandbox per run, killed after it.
//!
//! The script times itself from its first line (so `import sqlite3` counts, interpreter
//! start does not): that `total_s` is what the ratios compare. Wall times around each run
//! (process start, sandbox boot for runsc do, the CLI for kiln) are reported beside them.

use anyhow::{bail, Context, Result};
use kiln_benches::{arg, gvisor_platform, loadavg, median};
use kiln_tests::registry::{cached_layout, debian_python3_rootfs, have};
use kiln_tests::sandbox::{gvisor_unavailable, KillAll};
use kiln_tests::Kiln;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const SCRIPT: &str = include_str!("../../sqlite_workload.py");
/// The script's own step times, in its JSON.
const STEPS: [&str; 7] = [
    "import_s", "insert_s", "index_s", "lookup_s", "update_s", "files_s", "total_s",
];
/// Rows of the result, in the order they run within a round.
const MODES: [&str; 4] = ["native_disk", "native_tmpfs", "raw_runsc_do", "kiln"];

/// One run: the script's JSON and the wall time around it.
struct Sample {
    script: Value,
    wall_s: f64,
}

/// Runs `c`, returns the script's JSON (its last stdout line) and the wall time.
fn timed(mut c: Command, what: &str) -> Result<Sample> {
    c.stdin(Stdio::null());
    let t = Instant::now();
    let out = c.output().with_context(|| format!("running {what}"))?;
    let wall_s = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        );
    }
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let script = line
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("{what}: no JSON line in {stdout:?}"))?;
    Ok(Sample { script, wall_s })
}

/// The tree's python3 under chroot, the work directory `work` (on the host) bound to /mnt in
/// a mount namespace of its own, so nothing is written into the cached tree.
fn native(tree: &Path, work: &Path) -> Result<Sample> {
    std::fs::create_dir_all(work)?;
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2/mnt" && exec chroot "$2" /usr/bin/python3 -c "$3" /mnt/work"#)
        .arg("sh")
        .arg(work)
        .arg(tree)
        .arg(SCRIPT)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8");
    let r = timed(c, "native python3");
    let _ = std::fs::remove_dir_all(work);
    r
}

/// `runsc do` of the tree: the work directory in the sandbox's writable layer.
fn raw_runsc(tree: &Path, state: &Path, platform: &str, overlay: &str) -> Result<Sample> {
    std::fs::create_dir_all(state)?;
    let mut c = Command::new("runsc");
    c.arg("--root")
        .arg(state)
        .arg(format!("--platform={platform}"))
        .arg("--network=none")
        .arg(format!("--overlay2={overlay}"))
        .arg("--ignore-cgroups")
        .args(["do", "-quiet", "-cwd", "/", "-root"])
        .arg(tree)
        .args(["/usr/bin/python3", "-c", SCRIPT, "/root/work"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8");
    let r = timed(c, "runsc do python3");
    let _ = std::fs::remove_dir_all(state);
    r
}

/// A fresh kiln sandbox of image `py`, the script through `kiln sandbox exec`, then kill.
fn kiln(k: &Kiln) -> Result<(Sample, f64)> {
    let t = Instant::now();
    let rec = k.json(["sandbox", "create", "py", "--json"]);
    let create_s = t.elapsed().as_secs_f64();
    let id = rec["id"].as_str().context("sandbox id")?.to_string();
    let mut c = k.cmd([
        "sandbox",
        "exec",
        &id,
        "--",
        "python3",
        "-c",
        SCRIPT,
        "/root/work",
    ]);
    c.env("LANG", "C.UTF-8");
    let r = timed(c, "kiln sandbox exec python3");
    k.ok(["sandbox", "kill", &id]);
    Ok((r?, create_s))
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() {
    let runs = arg("--runs", 5usize).max(1);
    let platform = gvisor_platform();
    let overlay = arg("--raw-overlay", "root:memory".to_string());
    if let Some(why) = gvisor_unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    for tool in ["umoci", "unshare", "chroot"] {
        if !have(tool) {
            eprintln!("SKIP: {tool} not installed");
            return;
        }
    }
    let Some(tree) = debian_python3_rootfs() else {
        return;
    };
    match run(runs, &platform, &overlay, &tree) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap()),
        Err(e) => {
            eprintln!("gvisor_sqlite: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(runs: usize, platform: &str, overlay: &str, tree: &Path) -> Result<Value> {
    let load_start = loadavg();
    let tmp = tempfile::Builder::new()
        .prefix("kiln-gvisor-sqlite-")
        .tempdir()?;
    let layout = cached_layout(tree, &tree.with_file_name("debian-python3"))
        .context("no umoci layout of the tree")?;
    let k = Kiln::new(tmp.path().join("home"))
        .with_env([("KILN_GVISOR_PLATFORM".to_string(), platform.to_string())]);
    let _guard = KillAll(k.clone());
    let t = Instant::now();
    k.ok([
        "image",
        "import",
        &format!("oci:{}:base", layout.display()),
        "py",
    ]);
    let import_s = t.elapsed().as_secs_f64();
    eprintln!("image py imported in {import_s:.1} s");
    // Warm-up, not counted: page cache for the tree, kiln's first-create tree extraction.
    let (_, first_create_s) = kiln(&k)?;
    native(tree, &tmp.path().join("warm"))?;

    let shm = PathBuf::from(format!(
        "/dev/shm/kiln-gvisor-sqlite-{}",
        std::process::id()
    ));
    let mut samples: Vec<Vec<Sample>> = MODES.iter().map(|_| Vec::new()).collect();
    let mut kiln_create = Vec::new();
    let mut loads = Vec::new();
    for i in 0..runs {
        loads.push(loadavg());
        samples[0].push(native(tree, &tmp.path().join(format!("native{i}")))?);
        samples[1].push(native(tree, &shm.join(format!("native{i}")))?);
        samples[2].push(raw_runsc(
            tree,
            &tmp.path().join(format!("runsc{i}")),
            platform,
            overlay,
        )?);
        let (s, c) = kiln(&k)?;
        samples[3].push(s);
        kiln_create.push(c);
        eprintln!(
            "run {i}: {} (load {})",
            MODES
                .iter()
                .zip(&samples)
                .map(|(m, v)| format!("{m} {:.3} s", total(&v[i])))
                .collect::<Vec<_>>()
                .join(", "),
            loads[i]
        );
    }
    let _ = std::fs::remove_dir_all(&shm);

    let med = |m: usize| median(samples[m].iter().map(total).collect());
    let mut rows = serde_json::Map::new();
    for (m, name) in MODES.iter().enumerate() {
        let v = &samples[m];
        let steps: serde_json::Map<String, Value> = STEPS
            .iter()
            .map(|s| {
                let xs = v.iter().map(|x| x.script[s].as_f64().unwrap_or(f64::NAN));
                (format!("{s}_median"), json!(r3(median(xs.collect()))))
            })
            .collect();
        rows.insert(
            name.to_string(),
            json!({
                "script_total_s": v.iter().map(|x| r3(total(x))).collect::<Vec<_>>(),
                "script_total_s_median": r3(med(m)),
                "wall_s_median": r3(median(v.iter().map(|x| x.wall_s).collect())),
                "steps": steps,
                "python": v[0].script["python"],
                "sqlite": v[0].script["sqlite"],
            }),
        );
    }
    let kiln_m = med(3);
    Ok(json!({
        "bench": "gvisor_sqlite",
        "platform": platform,
        "runsc_version": runsc_version(),
        "runs": runs,
        "load_avg_start": load_start,
        "load_avg_per_run": loads,
        "load_avg_end": loadavg(),
        "image_import_s": r3(import_s),
        "kiln_first_create_s": r3(first_create_s),
        "kiln_create_s_median": r3(median(kiln_create)),
        "results": rows,
        "ratio_kiln_vs_native_tmpfs": r3(kiln_m / med(1)),
        "ratio_kiln_vs_native_disk": r3(kiln_m / med(0)),
        "ratio_kiln_vs_raw_runsc": r3(kiln_m / med(2)),
        "ratio_raw_runsc_vs_native_tmpfs": r3(med(2) / med(1)),
        "goal_ratio_vs_native": 1.3,
        "compared": "medians of the script's own total_s (from its first line to its end)",
        "native": "unshare --mount + bind of the work dir to TREE/mnt + chroot TREE /usr/bin/python3 -c SCRIPT /mnt/work; native_disk: work dir under the bench's temp dir (host disk), native_tmpfs: under /dev/shm",
        "raw_runsc": format!("runsc --root R --platform={platform} --network=none --overlay2={overlay} --ignore-cgroups do -quiet -cwd / -root TREE /usr/bin/python3 -c SCRIPT /root/work"),
        "kiln": "kiln sandbox create py (image imported from the tree's umoci layout), kiln sandbox exec ID -- python3 -c SCRIPT /root/work, kiln sandbox kill ID",
        "tree": tree,
        "published_s": {"tensorlake": 2.45, "e2b": 3.92, "daytona": 5.51},
    }))
}

fn total(s: &Sample) -> f64 {
    s.script["total_s"].as_f64().unwrap_or(f64::NAN)
}

fn runsc_version() -> String {
    Command::new("runsc")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}
