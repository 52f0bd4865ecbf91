//! Cluster mode (issue 20) benchmarks; prints one JSON object on stdout, progress on stderr.
//!
//! `cargo build -p kiln-cli -p kiln-benches && KILN_AGENT=<static agent>
//!  target/debug/cluster_bench [--runs 30] [--creates 8] [--placement-secs 5] [--resumes 5]
//!  [--ballast-mib 32]`
//!
//! A real 3-member etcd on loopback (`kiln_tests::etcd`) and two `kiln serve --cluster-etcd`
//! nodes: n1 with the `sdk` image (the serve tests' busybox image with a /bin/bash shim),
//! n2 with an empty home. E2B's Python SDK drives both:
//! - `commands.run("true")` round trip on one sandbox owned by n1, through n1 (the owner) and
//!   through n2 (forwarded), interleaved, `--runs` each (goal: non-owner <= 1.2x owner, p50);
//! - create to first command (`Sandbox.create` + `commands.run("true")`), entering through n1
//!   and through n2 in turn, `--creates` each; every sandbox is killed before the next, so
//!   placement (fewest sandboxes, then the smallest id) puts each on n1: through n2 it is
//!   forwarded (checked: every sandbox's `clientID` is n1);
//! - placement decisions per second the catalog sustains: with `kiln_cluster` straight against
//!   etcd, four concurrent placers each read the live nodes and the catalog, choose a node and
//!   record the sandbox with a compare-and-swap create, for `--placement-secs` (three fake
//!   members with room for all); the catalog grows as it goes (its size at the end is
//!   reported: every decision reads all of it).
//! - a paused sandbox resumed on another node against a resume on its own node (goal: <= 1.5x,
//!   p50), with the tests' cluster fixture (`kiln_tests::cluster`: a 3-member etcd, SeaweedFS
//!   as every store's remote, two nodes, the `sdk` image on n1 only), `--resumes` times: a
//!   sandbox created on n1 with `--ballast-mib` of random bytes in its memory (a file in
//!   /tmp, a tmpfs), paused through n1 (its snapshot pushed), connected through n1 (resumed on
//!   its own node: timed), paused again, n1 killed (kill -9) and, once its lease is gone,
//!   connected through n2 (taken over, adopted from S3, resumed on n2: timed); each timing is
//!   `Sandbox.connect` + a first `commands.run("true")`, in the SDK; then the sandbox is
//!   killed, its ballast checked, and n1 restarted. The first run's n2 also pulls the image.

use anyhow::{bail, Context, Result};
use kiln_benches::{arg, loadavg};
use kiln_cluster::{membership, placement, Catalog, Etcd, Membership, NodeInfo};
use kiln_cluster::{SandboxEntry, SandboxState};
use kiln_tests::e2b::{self, Serve};
use kiln_tests::Kiln;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "cluster-bench-key";
const SECRET: &str = "cluster-bench-secret-0123456789";

/// The SDK side: both timings, from one Python process that switches nodes by environment
/// (the SDK reads it when a sandbox object is made).
const SCRIPT: &str = r#"
import json, os, time, urllib.request
from e2b import Sandbox
nodes = json.loads(os.environ["BENCH_NODES"])
runs, creates = int(os.environ["BENCH_RUNS"]), int(os.environ["BENCH_CREATES"])
def use(n):
    os.environ["E2B_API_URL"] = n["url"]
    os.environ["E2B_SANDBOX_URL"] = n["url"]
    os.environ["E2B_DOMAIN"] = n["domain"]
def owner(sid):
    req = urllib.request.Request(nodes[0]["url"] + "/sandboxes/" + sid,
                                 headers={"X-API-Key": os.environ["E2B_API_KEY"]})
    return json.load(urllib.request.urlopen(req, timeout=10))["clientID"]
out = {"create_ms": {"n1": [], "n2": []}, "run_ms": {"owner": [], "non_owner": []}, "owners": []}
for i in range(2 * creates):
    entry = "n1" if i % 2 == 0 else "n2"
    use(nodes[0] if entry == "n1" else nodes[1])
    t = time.monotonic()
    s = Sandbox.create("sdk", timeout=120)
    s.commands.run("true")
    out["create_ms"][entry].append((time.monotonic() - t) * 1000)
    out["owners"].append(owner(s.sandbox_id))
    s.kill()
use(nodes[0])
s = Sandbox.create("sdk", timeout=300)
out["owners"].append(owner(s.sandbox_id))
via = {"owner": s}
use(nodes[1])
via["non_owner"] = Sandbox.connect(s.sandbox_id)
for _ in range(3):
    for v in via.values():
        v.commands.run("true")
for _ in range(runs):
    for name, v in via.items():
        t = time.monotonic()
        v.commands.run("true")
        out["run_ms"][name].append((time.monotonic() - t) * 1000)
s.kill()
print(json.dumps(out))
"#;

fn pct(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let k = (v.len() - 1) as f64 * p / 100.0;
    let (lo, hi) = (k.floor() as usize, (k.ceil() as usize).min(v.len() - 1));
    v[lo] + (v[hi] - v[lo]) * (k - lo as f64)
}

fn stats(xs: &[f64]) -> Value {
    let r = |x: f64| (x * 10.0).round() / 10.0;
    json!({"p50": r(pct(xs, 50.0)), "p90": r(pct(xs, 90.0)), "n": xs.len()})
}

fn ms_list(v: &Value, a: &str, b: &str) -> Vec<f64> {
    v[a][b]
        .as_array()
        .map(|xs| xs.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn node_args(etcd: &str, id: &str, port: u16, secret: &Path) -> Vec<String> {
    [
        "--cluster-etcd",
        etcd,
        "--node-id",
        id,
        "--advertise",
        &format!("http://127.0.0.1:{port}"),
        "--cluster-secret-file",
        secret.to_str().unwrap_or_default(),
    ]
    .map(String::from)
    .to_vec()
}

/// The E2B part: round trips and creates through the owner and through the other node.
fn sdk_part(etcd: &str, runs: usize, creates: usize) -> Result<Value> {
    let py = e2b::python().context("E2B's Python SDK (/opt/kiln-tools/e2b-venv)")?;
    let (tmp, k1) = e2b::sdk_home().context("the sdk image (gVisor, umoci, busybox)")?;
    let _cleanup = kiln_tests::sandbox::KillAll(k1.clone());
    let secret = tmp.path().join("cluster-secret");
    std::fs::write(&secret, SECRET)?;
    let k2 = Kiln::new(tmp.path().join("home2"));
    let (p1, p2) = (e2b::free_port(), e2b::free_port());
    let n1 = Serve::start_with(&k1, KEY, p1, &node_args(etcd, "n1", p1, &secret));
    let n2 = Serve::start_with(&k2, KEY, p2, &node_args(etcd, "n2", p2, &secret));
    let nodes = json!([
        {"url": n1.url(), "domain": format!("localhost:{p1}")},
        {"url": n2.url(), "domain": format!("localhost:{p2}")},
    ]);
    eprintln!("[cluster_bench] SDK: {creates} creates through each node, {runs} runs each way");
    let out = std::process::Command::new(&py)
        .args(["-c", SCRIPT])
        .env("E2B_API_KEY", KEY)
        .env("BENCH_NODES", nodes.to_string())
        .env("BENCH_RUNS", runs.to_string())
        .env("BENCH_CREATES", creates.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "the SDK script failed: {}\n{}\nn1: {}\nn2: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            n1.log_text(),
            n2.log_text()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .context("the SDK script's JSON")?;
    let owners: Vec<&str> = v["owners"]
        .as_array()
        .map(|o| o.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if owners.iter().any(|o| *o != "n1") {
        bail!("placement put a sandbox elsewhere than n1: {owners:?}");
    }
    let (owner, other) = (
        ms_list(&v, "run_ms", "owner"),
        ms_list(&v, "run_ms", "non_owner"),
    );
    let (local, fwd) = (
        ms_list(&v, "create_ms", "n1"),
        ms_list(&v, "create_ms", "n2"),
    );
    let ratio = |a: &[f64], b: &[f64]| (pct(a, 50.0) / pct(b, 50.0) * 100.0).round() / 100.0;
    Ok(json!({
        "commands_run_true_ms": {"through_owner": stats(&owner), "through_other_node": stats(&other),
                                 "ratio_p50": ratio(&other, &owner), "goal": "<= 1.2"},
        "create_to_first_command_ms": {"through_owner": stats(&local),
                                       "through_other_node": stats(&fwd),
                                       "ratio_p50": ratio(&fwd, &local), "goal": "<= 1.2"},
    }))
}

/// Resume on another node against resume on the sandbox's own node (see the module doc).
fn resume_part(runs: usize, ballast_mib: u64) -> Result<Value> {
    let f = kiln_tests::cluster::fixture(SECRET, 2)
        .context("etcd, SeaweedFS, gVisor, the sdk image and E2B's Python SDK")?;
    let mut nodes = kiln_tests::cluster::start_nodes(&f.etcd, &f.homes, KEY, &f.secret, 0);
    let etcd = Arc::new(Etcd::new(&f.etcd.urls())?);
    let catalog = Catalog::new(etcd.clone());
    let rt = tokio::runtime::Runtime::new()?;
    let (mut own, mut other, mut pause) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("[cluster_bench] resume {}/{runs}", i + 1);
        let here = nodes[0].python(
            &f.py,
            &format!(
                r#"
import json, time
from e2b import Sandbox
s = Sandbox.create("sdk", timeout=600)
s.commands.run("dd if=/dev/urandom of=/tmp/ballast bs=1048576 count={ballast_mib} 2>/dev/null")
t = time.monotonic()
Sandbox.pause(s.sandbox_id)
pause_ms = (time.monotonic() - t) * 1000
t = time.monotonic()
s = Sandbox.connect(s.sandbox_id, timeout=600)
s.commands.run("true")
own_ms = (time.monotonic() - t) * 1000
Sandbox.pause(s.sandbox_id)
print(json.dumps({{"id": s.sandbox_id, "pause_ms": pause_ms, "own_ms": own_ms}}))
"#
            ),
        );
        let id = here["id"].as_str().context("the sandbox's id")?.to_string();
        let owner = rt.block_on(catalog.get(&id))?;
        if owner.as_ref().map(|(e, _)| e.node.as_str()) != Some("n1") {
            bail!("{id} is not n1's: {owner:?}");
        }
        nodes[0].stop();
        let t = Instant::now();
        while rt.block_on(membership::node(&etcd, "n1"))?.is_some() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("n1's lease outlived its kill by 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let there = nodes[1].python(
            &f.py,
            &format!(
                r#"
import json, time
from e2b import Sandbox
t = time.monotonic()
s = Sandbox.connect("{id}", timeout=600)
s.commands.run("true")
ms = (time.monotonic() - t) * 1000
ballast = int(s.commands.run("wc -c < /tmp/ballast").stdout)
s.kill()
print(json.dumps({{"ms": ms, "ballast": ballast}}))
"#
            ),
        );
        // Where n2's time went (its takeover and the checkpoint's fetch), on stderr.
        let log = nodes[1].log_text();
        let took = log
            .lines()
            .filter(|l| l.contains(&id) && l.contains("took over"));
        let fetched = log.lines().rfind(|l| l.contains("checkpoint fetched"));
        for l in took.chain(fetched) {
            eprintln!("[cluster_bench] n2: {l}");
        }
        if there["ballast"].as_u64() != Some(ballast_mib << 20) {
            bail!("the ballast did not come along: {there}");
        }
        nodes[0].restart();
        pause.extend(here["pause_ms"].as_f64());
        own.extend(here["own_ms"].as_f64());
        other.extend(there["ms"].as_f64());
    }
    let ratio = (pct(&other, 50.0) / pct(&own, 50.0) * 100.0).round() / 100.0;
    Ok(json!({
        "ballast_mib": ballast_mib,
        "pause_and_push_ms": stats(&pause),
        "resume_on_own_node_ms": stats(&own),
        "resume_on_other_node_ms": stats(&other),
        "other_node_each_ms": other.iter().map(|x| x.round()).collect::<Vec<_>>(),
        "ratio_p50": ratio,
        "goal": "<= 1.5",
    }))
}

/// Placement decisions per second: read nodes and catalog, choose, record by CAS.
async fn placement_part(urls: &[String], secs: u64) -> Result<Value> {
    let etcd = Arc::new(Etcd::new(urls)?);
    let info = NodeInfo {
        advertise: "http://127.0.0.1:9".into(),
        cpus: 64,
        memory_mib: 1 << 20,
        free_memory_mib: 1 << 20,
        max_sandboxes: u32::MAX,
        ..Default::default()
    };
    let mut members = Vec::new();
    for i in 1..=3 {
        let id = format!("bench-node-{i}");
        members.push(Membership::register(etcd.clone(), &id, info.clone(), 30).await?);
    }
    let catalog = Catalog::new(etcd.clone());
    let decided = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (etcd, catalog) = (etcd.clone(), catalog.clone());
        let (decided, conflicts) = (decided.clone(), conflicts.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let mut nodes = membership::nodes(&etcd).await?;
                let entries: Vec<(String, SandboxEntry)> = catalog
                    .list()
                    .await?
                    .into_iter()
                    .map(|(id, e, _)| (id, e))
                    .collect();
                placement::count_from_catalog(&mut nodes, &entries);
                let need = placement::Need {
                    cpus: 2,
                    memory_mib: 512,
                };
                let Some(node) = placement::choose(&nodes, need).map(str::to_string) else {
                    anyhow::bail!("no node with room");
                };
                let entry = SandboxEntry {
                    node,
                    state: SandboxState::Running,
                    template: "bench".into(),
                    alias: None,
                    metadata: Default::default(),
                    started_ms: 0,
                    end_ms: None,
                    cpus: need.cpus,
                    memory_mib: need.memory_mib,
                    disk_mib: 1024,
                    cause: None,
                    pushed: None,
                    released: false,
                };
                let id = format!("bench-{w}-{n}");
                n += 1;
                match catalog.create(&id, &entry).await? {
                    Some(_) => decided.fetch_add(1, Ordering::Relaxed),
                    None => conflicts.fetch_add(1, Ordering::Relaxed),
                };
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let size = catalog.list().await?.len();
    for m in &members {
        let _ = m.leave().await;
    }
    let n = decided.load(Ordering::Relaxed);
    Ok(json!({
        "decisions": n,
        "per_second": (n as f64 / elapsed).round(),
        "cas_conflicts": conflicts.load(Ordering::Relaxed),
        "placers": 4,
        "catalog_entries_at_end": size,
        "seconds": (elapsed * 10.0).round() / 10.0,
    }))
}

fn main() -> Result<()> {
    let runs: usize = arg("--runs", 30);
    let creates: usize = arg("--creates", 8);
    let secs: u64 = arg("--placement-secs", 5);
    let resumes: usize = arg("--resumes", 5);
    let ballast: u64 = arg("--ballast-mib", 32);
    let load_before = loadavg();
    let Some(etcd) = kiln_tests::etcd::Etcd::start_or_skip() else {
        bail!("etcd is not installed (scripts/install-deps)");
    };
    let sdk = sdk_part(&etcd.urls_arg(), runs, creates)?;
    eprintln!("[cluster_bench] placement for {secs} s");
    let rt = tokio::runtime::Runtime::new()?;
    let placement = rt.block_on(placement_part(&etcd.urls(), secs))?;
    drop(rt);
    let resume = if resumes > 0 {
        resume_part(resumes, ballast)?
    } else {
        Value::Null
    };
    let out = json!({
        "bench": "cluster",
        "etcd_members": 3,
        "nodes": 2,
        "sdk": sdk,
        "placement": placement,
        "resume": resume,
        "load_before": load_before,
        "load_after": loadavg(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
