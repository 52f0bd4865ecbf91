//! gVisor sandbox benchmarks through the runtime library (`kiln_runtime::Sandboxes`, in-process),
//! each against raw `runsc` measured in the same run; prints one JSON object on stdout,
//! progress on stderr.
//!
//! `cargo build --release -p kiln-cli -p kiln-benches && KILN_AGENT=<static agent>
//!  target/release/sandbox_bench [--runs 20] [--forks 32] [--net-cycles 3] [--platform systrap]
//!  [--raw-overlay root:memory | --raw-like-kiln] [--json-only]`
//!
//! The platform (`--platform`, else `KILN_GVISOR_PLATFORM`, else systrap) is kiln's and the raw
//! baselines' alike; `--raw-overlay` is the raw baselines' `--overlay2`. `--raw-like-kiln` runs
//! every raw baseline as kiln configures runsc instead: cgroups of their own with kiln's
//! default limits (`default_cpus`, `DEFAULT_MEMORY_MIB`; made by
//! `kiln_runtime::gvisor::limits`) and the root overlay's filestore in a host directory
//! (`--overlay2=root:dir=...`), so the ratios show kiln's own overhead, not the price of its
//! limits and its disk. The bench uses kiln as a user of the library would (create, exec, snapshot, fork, pause, resume, the store's
//! counters); only the step-by-step replays copy kiln's bundle, and they are skipped (with
//! the reason in the JSON) when that no longer works.
//!
//! - setup: a busybox image (static /bin/busybox, umoci OCI layout, imported with imagebuilder)
//!   in a temporary KILN_HOME; the raw baselines run the tree the image was made from;
//! - tti: create from the image to the first `exec true` answered (agent over the Unix
//!   socket), against `runsc run --detach` of the same tree with `sleep 1000` as init and
//!   `runsc exec true`; plus kiln's own steps replayed one by one (runsc run of kiln's bundle,
//!   agent health, exec) to show where the time goes;
//! - snapshot: create from a snapshot to the first exec, against `runsc restore` of a raw
//!   `runsc checkpoint` + `runsc exec`; kiln's restore replayed step by step (blob export,
//!   runsc restore, agent, generation, exec);
//! - fork: N forks of one running sandbox until all answered an exec, PSS per idle fork
//!   (runsc sandbox + gofer processes), against N raw restores of one checkpoint, as many at
//!   a time as `Sandboxes::fork` runs (`fork_restores_at_once`);
//! - pause/resume: pause, and resume to the first exec, against raw checkpoint / restore to
//!   the first exec; the bytes the store writes for each pause, the second and third after a
//!   1 MiB change (goal: under 2 MiB);
//! - pause after network use: inside test namespaces of its own (kiln_tests::net), a sandbox
//!   with a network makes an HTTP request to a server in the "internet" namespace, then is
//!   paused (goal: under 1 s) and resumed (`--net-cycles` times); then it holds a TCP
//!   connection open to the bench's holder there and is paused once more.
//!
//! Every sandbox and runsc container is killed after its measurement; on any error (and from a
//! watchdog, and on SIGINT/SIGTERM) every process whose command line names this run's
//! temporary directory is SIGKILLed, so no runsc process outlives the bench.

use anyhow::{bail, Context, Result};
use kiln_agent::client;
use kiln_blockstore::{BlobId, Store};
use kiln_runtime::{CreateSpec, ExecOptions, RuntimeKind, Sandboxes, Source, State};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static QUIET: AtomicBool = AtomicBool::new(false);
/// This run's temporary directory: every runsc process of the run names it.
static TMP: OnceLock<PathBuf> = OnceLock::new();
/// The gVisor platform of kiln and of the raw baselines alike (`--platform`, default systrap).
static PLATFORM: OnceLock<String> = OnceLock::new();
/// The raw baselines' `--overlay2` (`--raw-overlay`, default root:memory, as kiln's bundle had
/// before issue 17).
static RAW_OVERLAY: OnceLock<String> = OnceLock::new();
/// `--raw-like-kiln`: raw baselines with kiln's cgroups and disk-backed overlay.
static RAW_LIKE_KILN: AtomicBool = AtomicBool::new(false);
/// The bench gives up (and cleans up) after this long.
const WATCHDOG: Duration = Duration::from_secs(40 * 60);
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the idle forks' CPU use is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(5);

macro_rules! progress {
    ($($t:tt)*) => {
        if !QUIET.load(Ordering::Relaxed) {
            eprintln!($($t)*);
        }
    };
}

use kiln_benches::{arg, gvisor_platform, loadavg};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(v: &[f64]) -> Value {
    json!({"p50": round(pct(v, 0.5)), "p90": round(pct(v, 0.9)), "min": round(pct(v, 0.0)),
           "max": round(pct(v, 1.0)), "n": v.len()})
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ------------------------------------------------------------------ cleanup

/// SIGKILLs every process whose command line contains `needle` (not this one); repeats until
/// none is left. Returns how many were killed.
fn kill_matching(needle: &[u8]) -> usize {
    let me = std::process::id();
    let mut total = 0;
    for _ in 0..20 {
        let pids = pids_matching(needle);
        let pids: Vec<u32> = pids.into_iter().filter(|&p| p != me).collect();
        if pids.is_empty() {
            break;
        }
        for &p in &pids {
            // SAFETY: kill on a pid whose command line names our own temporary directory.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        total += pids.len();
        std::thread::sleep(Duration::from_millis(100));
    }
    total
}

fn pids_matching(needle: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmd.windows(needle.len()).any(|w| w == needle) {
            out.push(pid);
        }
    }
    out
}

/// Every process of this run.
fn sweep() -> usize {
    match TMP.get() {
        Some(t) => kill_matching(t.to_string_lossy().as_bytes()),
        None => 0,
    }
}

static mut SIG_PIPE_W: i32 = -1;

extern "C" fn on_signal(_: libc::c_int) {
    // SAFETY: write(2) is async-signal-safe; the fd is set before the handler is installed.
    unsafe {
        let b = 1u8;
        libc::write(SIG_PIPE_W, (&b as *const u8).cast(), 1);
    }
}

/// SIGINT / SIGTERM and the watchdog: clean up, then exit.
fn install_guards() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array; the handler only writes to the pipe.
    unsafe {
        libc::pipe(fds.as_mut_ptr());
        SIG_PIPE_W = fds[1];
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let r = fds[0];
    std::thread::spawn(move || {
        let mut b = 0u8;
        // SAFETY: reading one byte from our own pipe.
        unsafe { libc::read(r, (&mut b as *mut u8).cast(), 1) };
        let n = sweep();
        eprintln!("sandbox_bench: interrupted; killed {n} runsc processes");
        std::process::exit(130);
    });
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        let n = sweep();
        eprintln!(
            "sandbox_bench: watchdog after {}s; killed {n} runsc processes",
            WATCHDOG.as_secs()
        );
        std::process::exit(3);
    });
}

// ------------------------------------------------------------------ raw runsc

fn platform() -> &'static str {
    PLATFORM.get().map(String::as_str).unwrap_or("systrap")
}

fn raw_overlay() -> &'static str {
    RAW_OVERLAY
        .get()
        .map(String::as_str)
        .unwrap_or("root:memory")
}

fn like_kiln() -> bool {
    RAW_LIKE_KILN.load(Ordering::Relaxed)
}

fn runsc(root: &Path, host_uds: bool) -> Command {
    let mut c = Command::new("runsc");
    c.arg("--root")
        .arg(root)
        .arg(format!("--platform={}", platform()))
        .arg("--network=none");
    if like_kiln() {
        // Made here: the step-by-step replays run containers through this too.
        let _ = std::fs::create_dir_all(root.join("filestore"));
        c.arg(format!(
            "--overlay2=root:dir={}",
            root.join("filestore").display()
        ));
    } else {
        c.arg(format!("--overlay2={}", raw_overlay()))
            .arg("--ignore-cgroups");
    }
    if host_uds {
        c.arg("--host-uds=create");
    }
    c.stdin(Stdio::null());
    c
}

/// A runsc command that ends on its own.
fn runsc_ok(mut c: Command, what: &str) -> Result<()> {
    let out = c.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `run --detach` / `restore --detach`: the detached processes keep their stdio, so it goes
/// to a file (a pipe would never see EOF).
fn runsc_detached(mut c: Command, log: &Path, what: &str) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let st = c
        .stdout(f.try_clone()?)
        .stderr(f)
        .status()
        .with_context(|| format!("running {what}"))?;
    if !st.success() {
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let tail: String = tail.lines().rev().take(8).collect::<Vec<_>>().join("\n");
        bail!("{what} failed: {tail}");
    }
    Ok(())
}

/// A raw container: its own state root, the shared bundle.
struct Raw {
    root: PathBuf,
    id: String,
}

impl Raw {
    fn new(base: &Path, id: &str) -> Raw {
        Raw {
            root: base.join(format!("root-{id}")),
            id: id.into(),
        }
    }
    /// The cgroup of a raw container run like kiln (`--raw-like-kiln`).
    fn cgroup(&self) -> String {
        format!("bench-{}-{}", std::process::id(), self.id)
    }
    /// Makes the state root; with `--raw-like-kiln` also the filestore's directory, the
    /// container's cgroups and a bundle of its own that names them.
    fn prepare(&self, bundle: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.root)?;
        if !like_kiln() {
            return Ok(bundle.to_path_buf());
        }
        std::fs::create_dir_all(self.root.join("filestore"))?;
        kiln_runtime::gvisor::limits::create(
            &self.cgroup(),
            kiln_runtime::default_cpus(RuntimeKind::Gvisor),
            kiln_runtime::DEFAULT_MEMORY_MIB,
        )?;
        let mut spec: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
        spec["linux"]["cgroupsPath"] =
            json!(kiln_runtime::gvisor::limits::cgroups_path(&self.cgroup()));
        let own = self.root.join("bundle");
        std::fs::create_dir_all(&own)?;
        std::fs::write(own.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
        Ok(own)
    }
    fn run(&self, bundle: &Path) -> Result<()> {
        let bundle = self.prepare(bundle)?;
        let mut c = runsc(&self.root, false);
        c.args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(&self.id);
        runsc_detached(c, &self.root.join("log"), "runsc run")
    }
    fn restore(&self, bundle: &Path, image: &Path) -> Result<()> {
        let bundle = self.prepare(bundle)?;
        let mut c = runsc(&self.root, false);
        c.args(["restore", "--detach", "--image-path"])
            .arg(image)
            .arg("--bundle")
            .arg(bundle)
            .arg(&self.id);
        runsc_detached(c, &self.root.join("log"), "runsc restore")
    }
    fn exec_true(&self) -> Result<()> {
        let mut c = runsc(&self.root, false);
        c.args(["exec", &self.id, "true"]);
        runsc_ok(c, "runsc exec")
    }
    fn exec_sh(&self, line: &str) -> Result<()> {
        let mut c = runsc(&self.root, false);
        c.args(["exec", &self.id, "/bin/sh", "-c", line]);
        runsc_ok(c, "runsc exec sh")
    }
    fn checkpoint(&self, image: &Path) -> Result<()> {
        std::fs::create_dir_all(image)?;
        let mut c = runsc(&self.root, false);
        c.args(["checkpoint", "--image-path"])
            .arg(image)
            .arg(&self.id);
        runsc_ok(c, "runsc checkpoint")
    }
    /// Removes the container: SIGKILLs its processes (found by their `--root`) and drops its
    /// state (as the driver's kill does; `runsc delete --force` polls for ~2 s here).
    fn delete(&self) {
        kill_matching(root_needle(&self.root).as_bytes());
        if like_kiln() {
            let _ = kiln_runtime::gvisor::limits::remove(&self.cgroup());
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
    fn pss_kib(&self) -> u64 {
        pss_of_root(&self.root)
    }
}

/// Every runsc process of one state root names it as `--root=<root>` followed by a NUL.
fn root_needle(root: &Path) -> String {
    format!("--root={}\0", root.display())
}

fn pss_of_root(root: &Path) -> u64 {
    pids_matching(root_needle(root).as_bytes())
        .into_iter()
        .map(pss_kib)
        .sum()
}

/// CPU time (user + system, clock ticks) of processes `pids`.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // Fields after the command name (which may hold spaces): utime and stime are the
            // 12th and 13th there.
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Percent of one core used, over about `window`, by the processes whose command line names
/// one of `needles` (the sandboxes' runsc processes; systrap's stubs carry the sentry's
/// command line). The processes are found once, before the window.
fn idle_cpu_pct(needles: &[String], window: Duration) -> f64 {
    let mut pids: Vec<u32> = needles
        .iter()
        .flat_map(|n| pids_matching(n.as_bytes()))
        .filter(|&p| p != std::process::id())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t = Instant::now();
    let a = cpu_ticks(&pids);
    std::thread::sleep(window);
    let b = cpu_ticks(&pids);
    b.saturating_sub(a) as f64 / hz / t.elapsed().as_secs_f64() * 100.0
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The raw baseline's bundle: the image's tree, `sleep 1000` as init, kiln's namespaces.
fn raw_bundle(dir: &Path, rootfs: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sleep", "1000"],
            "env": ["PATH=/bin"],
            "cwd": "/",
        },
        // As kiln's bundle: writable through the in-memory overlay (the tree is never written).
        "root": {"path": rootfs, "readonly": false},
        "hostname": "raw",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
        ],
        "linux": {"namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network"},
        ]},
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    Ok(dir.to_path_buf())
}

// ------------------------------------------------------------------ kiln

fn kiln_exec(sbx: &Sandboxes, id: &str, argv: &[&str]) -> Result<Vec<u8>> {
    let (rec, mut s) = sbx.connect(id)?;
    s.set_read_timeout(Some(EXEC_TIMEOUT))?;
    let mut req = sbx.exec_request(
        &rec,
        ExecOptions {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            ..ExecOptions::default()
        },
    );
    req.stdin = false;
    let out = client::exec(&mut s, &req, b"", |_, _| {})?;
    if out.status.code != Some(0) {
        bail!(
            "exec {argv:?} in {id}: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn gvisor_spec(source: Source) -> CreateSpec {
    let mut s = CreateSpec::new(source);
    s.runtime = Some(RuntimeKind::Gvisor);
    // Against raw runsc with --network=none (and this binary is no `kiln` to run the DNS
    // proxy); net_bench measures what a network adds.
    s.no_network = true;
    s
}

/// Kills the sandboxes it holds when dropped (error paths included).
struct Live<'a> {
    sbx: &'a Sandboxes,
    ids: Vec<String>,
}

impl<'a> Live<'a> {
    fn new(sbx: &'a Sandboxes) -> Live<'a> {
        Live {
            sbx,
            ids: Vec::new(),
        }
    }
    fn add(&mut self, id: &str) {
        self.ids.push(id.into());
    }
    fn kill(&mut self, id: &str) -> Result<()> {
        self.ids.retain(|i| i != id);
        self.sbx.kill(id)?;
        Ok(())
    }
    fn kill_all(&mut self) {
        for id in std::mem::take(&mut self.ids) {
            if let Err(e) = self.sbx.kill(&id) {
                progress!("kill {id}: {e}");
            }
        }
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// PSS of a kiln sandbox: every process whose command line names its id (runsc names the
/// container id and kiln's state root holds it), so the bench needs no driver internals.
fn pss_of_sandbox(id: &str) -> u64 {
    pids_matching(id.as_bytes())
        .into_iter()
        .filter(|&p| p != std::process::id())
        .map(pss_kib)
        .sum()
}

/// The single runsc state file of a gVisor snapshot, if its checkpoint has one (the format
/// before issue 17); the step-by-step replays need it and are skipped without it.
fn state_file_of(store: &Store, snap: &BlobId) -> Option<BlobId> {
    let rec = kiln_runtime::sandbox_snapshot::get(store, snap).ok()?;
    rec.checkpoint
        .state
        .get("state_file")
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
}

// ------------------------------------------------------------------ kiln's steps replayed

/// kiln's bundle (from a live sandbox) with the agent's run and control directories moved to
/// `dir/run` and `dir/ctl`.
fn replay_bundle(kiln_config: &Value, dir: &Path) -> Result<PathBuf> {
    let mut spec = kiln_config.clone();
    // Not kiln's sandbox's cgroups: runsc would make them again under that sandbox's name
    // (with `--raw-like-kiln`) after kiln removed them, and nothing would remove them then.
    if let Some(linux) = spec["linux"].as_object_mut() {
        linux.remove("cgroupsPath");
    }
    let run = dir.join("run");
    let ctl = dir.join("ctl");
    std::fs::create_dir_all(&run)?;
    std::fs::create_dir_all(&ctl)?;
    release_agent(dir)?;
    for m in spec["mounts"].as_array_mut().context("mounts")? {
        if m["destination"] == "/run/kiln" {
            m["source"] = json!(run);
        }
        if m["destination"] == "/.kiln/ctl" {
            m["source"] = json!(ctl);
        }
    }
    let b = dir.join("bundle");
    std::fs::create_dir_all(&b)?;
    std::fs::write(b.join("config.json"), serde_json::to_vec(&spec)?)?;
    Ok(b)
}

/// Lets a quiesced agent listen again as the driver does: a new value of the same length in
/// `dir/ctl/resume`.
fn release_agent(dir: &Path) -> Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let tmp = dir.join("ctl/.resume.tmp");
    std::fs::write(&tmp, format!("{:020}-{n:020}", std::process::id()))?;
    std::fs::rename(&tmp, dir.join("ctl/resume"))?;
    Ok(())
}

/// Polls the agent like the driver does (3 ms between tries).
fn wait_agent(sock: &Path) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Ok(mut s) = UnixStream::connect(sock) {
            s.set_read_timeout(Some(EXEC_TIMEOUT)).ok();
            if client::health(&mut s).is_ok() {
                return Ok(());
            }
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("agent at {} did not answer", sock.display());
        }
        std::thread::sleep(Duration::from_millis(3));
    }
}

fn agent_exec_true(sock: &Path) -> Result<()> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(EXEC_TIMEOUT))?;
    let req = kiln_agent::protocol::ExecRequest {
        argv: vec!["true".into()],
        stdin: false,
        ..Default::default()
    };
    let out = client::exec(&mut s, &req, b"", |_, _| {})?;
    if out.status.code != Some(0) {
        bail!("replay exec true: {:?}", out.status);
    }
    Ok(())
}

#[derive(Default)]
struct Steps {
    export: Vec<f64>,
    runsc: Vec<f64>,
    agent: Vec<f64>,
    generation: Vec<f64>,
    exec: Vec<f64>,
    total: Vec<f64>,
}

/// One kiln start (`ckpt: None`) or restore, step by step, outside `Sandboxes`.
fn replay_once(
    kiln_config: &Value,
    dir: &Path,
    store: &Store,
    ckpt: Option<&BlobId>,
    steps: &mut Steps,
) -> Result<()> {
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    let t0 = Instant::now();
    let bundle = replay_bundle(kiln_config, dir)?;
    let root = dir.join("runsc");
    let sock = dir.join("run/agent.sock");
    let mut c = runsc(&root, true);
    let t_exported;
    match ckpt {
        None => {
            t_exported = t0.elapsed();
            c.args(["run", "--detach", "--bundle"])
                .arg(&bundle)
                .arg("--pid-file")
                .arg(dir.join("sandbox.pid"))
                .arg(&id);
            runsc_detached(c, &dir.join("console.log"), "replay runsc run")?;
        }
        Some(blob) => {
            let img = dir.join("ckpt");
            std::fs::create_dir_all(&img)?;
            store.export(blob, &img.join("checkpoint.img"))?;
            t_exported = t0.elapsed();
            c.args(["restore", "--detach", "--image-path"])
                .arg(&img)
                .arg("--bundle")
                .arg(&bundle)
                .arg("--pid-file")
                .arg(dir.join("sandbox.pid"))
                .arg(&id);
            runsc_detached(c, &dir.join("console.log"), "replay runsc restore")?;
            release_agent(dir)?;
        }
    }
    let t_runsc = t0.elapsed();
    wait_agent(&sock)?;
    let t_agent = t0.elapsed();
    if ckpt.is_some() {
        let mut s = UnixStream::connect(&sock)?;
        s.set_read_timeout(Some(EXEC_TIMEOUT))?;
        client::set_generation(
            &mut s,
            &kiln_agent::protocol::GenerationRequest {
                generation: 1,
                unix_time_ns: 0,
                seed_hex: "00".repeat(32),
            },
        )?;
    }
    let t_gen = t0.elapsed();
    agent_exec_true(&sock)?;
    let t_exec = t0.elapsed();
    if ckpt.is_some() {
        steps.export.push(ms(t_exported));
        steps.generation.push(ms(t_gen - t_agent));
    }
    steps.runsc.push(ms(t_runsc - t_exported));
    steps.agent.push(ms(t_agent - t_runsc));
    steps.exec.push(ms(t_exec - t_gen));
    steps.total.push(ms(t_exec));
    Ok(())
}

fn replay(
    kiln_config: &Value,
    dir: &Path,
    store: &Store,
    ckpt: Option<&BlobId>,
    steps: &mut Steps,
) -> Result<()> {
    let r = replay_once(kiln_config, dir, store, ckpt, steps);
    let root = dir.join("runsc");
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut c = runsc(&root, true);
    c.args(["delete", "--force", &id]);
    let _ = c.output();
    kill_matching(root_needle(&root).as_bytes());
    let _ = std::fs::remove_dir_all(dir.join("ckpt"));
    r
}

/// What the driver does after a checkpoint instead of `runsc delete`: waits up to 200 ms for
/// the stopped sandbox process to go (then SIGKILLs what names the root), drops runsc's state.
fn forget_container(root: &Path, pid_file: &Path) {
    let pid: Option<u32> = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let t = Instant::now();
    if let Some(pid) = pid {
        while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
            if t.elapsed() > Duration::from_millis(200) {
                kill_matching(root_needle(root).as_bytes());
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let _ = std::fs::remove_dir_all(root);
}

/// kiln's live snapshot (`checkpoint` without stop) replayed step by step on one sandbox
/// started from kiln's bundle, `n` times: quiesce the agent, runsc checkpoint, put the state
/// file into the store, forget the stopped container (as the driver: no `runsc delete`), runsc
/// restore in place, agent answering again.
fn replay_live_snapshots(
    kiln_config: &Value,
    dir: &Path,
    store: &Store,
    n: usize,
) -> Result<Value> {
    let r = (|| -> Result<Value> {
        let id = dir.file_name().unwrap().to_string_lossy().into_owned();
        let bundle = replay_bundle(kiln_config, dir)?;
        let root = dir.join("runsc");
        let sock = dir.join("run/agent.sock");
        let log = dir.join("console.log");
        let mut c = runsc(&root, true);
        c.args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg("--pid-file")
            .arg(dir.join("sandbox.pid"))
            .arg(&id);
        runsc_detached(c, &log, "replay runsc run")?;
        wait_agent(&sock)?;
        let (mut q, mut ck, mut put, mut del, mut rs, mut ag, mut tot) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let img = dir.join("ckpt");
        for _ in 0..n {
            let _ = std::fs::remove_dir_all(&img);
            std::fs::create_dir_all(&img)?;
            let t0 = Instant::now();
            let mut s = UnixStream::connect(&sock)?;
            s.set_read_timeout(Some(EXEC_TIMEOUT))?;
            client::quiesce(&mut s)?;
            drop(s);
            let t1 = t0.elapsed();
            let mut c = runsc(&root, true);
            c.args(["checkpoint", "--image-path"]).arg(&img).arg(&id);
            runsc_ok(c, "replay runsc checkpoint")?;
            let t2 = t0.elapsed();
            store.put_file(
                &img.join("checkpoint.img"),
                &kiln_blockstore::PutOptions {
                    chunk_size: Some(512 * 1024),
                    ..Default::default()
                },
            )?;
            let t3 = t0.elapsed();
            forget_container(&root, &dir.join("sandbox.pid"));
            let t4 = t0.elapsed();
            let mut c = runsc(&root, true);
            c.args(["restore", "--detach", "--image-path"])
                .arg(&img)
                .arg("--bundle")
                .arg(&bundle)
                .arg("--pid-file")
                .arg(dir.join("sandbox.pid"))
                .arg(&id);
            runsc_detached(c, &log, "replay runsc restore")?;
            release_agent(dir)?;
            let t5 = t0.elapsed();
            wait_agent(&sock)?;
            let t6 = t0.elapsed();
            q.push(ms(t1));
            ck.push(ms(t2 - t1));
            put.push(ms(t3 - t2));
            del.push(ms(t4 - t3));
            rs.push(ms(t5 - t4));
            ag.push(ms(t6 - t5));
            tot.push(ms(t6));
        }
        Ok(json!({
            "quiesce_ms": summary(&q),
            "runsc_checkpoint_ms": summary(&ck),
            "store_put_ms": summary(&put),
            "forget_container_ms": summary(&del),
            "runsc_restore_ms": summary(&rs),
            "agent_ready_after_restore_ms": summary(&ag),
            "total_ms": summary(&tot),
        }))
    })();
    let root = dir.join("runsc");
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut c = runsc(&root, true);
    c.args(["delete", "--force", &id]);
    let _ = c.output();
    kill_matching(root_needle(&root).as_bytes());
    let _ = std::fs::remove_dir_all(dir.join("ckpt"));
    r
}

fn steps_json(s: &Steps) -> Value {
    let mut o = json!({
        "runsc_ms": summary(&s.runsc),
        "agent_ready_after_runsc_ms": summary(&s.agent),
        "exec_true_ms": summary(&s.exec),
        "total_ms": summary(&s.total),
    });
    if !s.export.is_empty() {
        o["export_state_file_ms"] = summary(&s.export);
        o["set_generation_ms"] = summary(&s.generation);
    }
    o
}

// ------------------------------------------------------------------ main

struct Cfg {
    runs: usize,
    forks: usize,
    net_cycles: usize,
}

fn main() {
    let cfg = Cfg {
        runs: arg("--runs", 20usize).max(1),
        forks: arg("--forks", 32usize).clamp(1, 256),
        net_cycles: arg("--net-cycles", 3usize).clamp(1, 50),
    };
    QUIET.store(
        std::env::args().any(|a| a == "--json-only"),
        Ordering::Relaxed,
    );
    PLATFORM.set(gvisor_platform()).unwrap();
    RAW_OVERLAY
        .set(arg("--raw-overlay", "root:memory".to_string()))
        .unwrap();
    RAW_LIKE_KILN.store(
        std::env::args().any(|a| a == "--raw-like-kiln"),
        Ordering::Relaxed,
    );
    // Networked sandboxes (the pause-after-network measurement) resolve names through the
    // test namespaces' DNS server, never the host's. SAFETY: no other thread runs yet.
    unsafe {
        std::env::set_var(
            "KILN_DNS_UPSTREAM",
            format!(
                "{}:{}",
                kiln_tests::net::INTERNET_IP,
                kiln_tests::net::DNS_PORT
            ),
        )
    };
    let tmp = match tempfile::Builder::new()
        .prefix("kiln-sandbox-bench-")
        .tempdir()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sandbox_bench: temp dir: {e}");
            std::process::exit(1);
        }
    };
    TMP.set(tmp.path().to_path_buf()).unwrap();
    install_guards();
    let r = run(&cfg, tmp.path());
    let leftover = sweep();
    match r {
        Ok(mut out) => {
            out["leftover_runsc_processes_killed_at_exit"] = json!(leftover);
            println!("{}", serde_json::to_string_pretty(&out).unwrap());
        }
        Err(e) => {
            eprintln!("sandbox_bench: {e:#}");
            eprintln!("(cleaned up {leftover} processes)");
            drop(tmp);
            std::process::exit(1);
        }
    }
}

/// kiln's steps replayed outside `Sandboxes` (diagnostics: where the time goes). They copy
/// kiln's bundle and checkpoint as they were before issue 17; when that no longer works (the
/// bundle or the checkpoint format changed), the bench goes on without them and says why.
struct Replay {
    config: Option<Value>,
    failed: Option<String>,
}

impl Replay {
    fn run(&mut self, f: impl FnOnce(&Value) -> Result<()>) {
        if self.failed.is_some() {
            return;
        }
        let Some(c) = &self.config else {
            return;
        };
        if let Err(e) = f(c) {
            progress!("replay failed, replays skipped from here on: {e:#}");
            self.failed = Some(format!("{e:#}"));
        }
    }

    fn report(&self, v: impl FnOnce() -> Value) -> Value {
        match (&self.config, &self.failed) {
            (None, _) => json!("skipped: kiln's bundle was not found where it used to be"),
            (_, Some(e)) => json!(format!("failed: {e}")),
            _ => v(),
        }
    }
}

/// Bytes of every file under `dir` (a raw checkpoint image: one state file, or pages files
/// beside it with `--compression=none`).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn run(cfg: &Cfg, tmp: &Path) -> Result<Value> {
    let load_start = loadavg();
    let home = tmp.join("home");
    std::fs::create_dir_all(&home)?;
    // SAFETY: set before any thread of ours reads the environment (the guards do not).
    unsafe { std::env::set_var("KILN_HOME", &home) };
    let store = Store::open(&home.join("store"))?;
    // The `kiln` binary beside this one: networked sandboxes start its DNS proxy.
    let sbx = kiln_runtime::host_sandboxes(&home, store.clone(), kiln_tests::kiln_bin());
    let drv = sbx.driver(RuntimeKind::Gvisor).map_err(|e| {
        anyhow::anyhow!("{e} (set KILN_AGENT to a static kiln-agent: RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p kiln-agent --target x86_64-unknown-linux-gnu)")
    })?;
    let _ = drv;

    // ---- setup: busybox image
    let t = Instant::now();
    let layout = kiln_tests::registry::busybox_layout(tmp, "bb")
        .context("busybox image: needs umoci and busybox-static")?;
    // The tree the image was made from: the raw baselines run it (runsc never writes it).
    let rootfs = tmp.join("rootfs");
    let (image_id, _) = kiln_imagebuilder::oci::import(
        &store,
        &tmp.join("import-tmp"),
        &format!("oci:{}:bb", layout.display()),
        "bb",
        &kiln_imagebuilder::oci::PullOptions::default(),
    )?;
    let import_ms = ms(t.elapsed());
    progress!("image bb = {image_id} imported in {import_ms:.0} ms");

    // `runsc --version`: Sandboxes runs it for every driver lookup (create, connect, get).
    let mut version_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let _ = Command::new("runsc").arg("--version").output()?;
        version_ms.push(ms(t.elapsed()));
    }

    // ---- first create: extracts the image's tree
    let mut live = Live::new(&sbx);
    let t = Instant::now();
    let first = sbx.create(gvisor_spec(Source::Image("bb".into())))?;
    live.add(&first.id);
    kiln_exec(&sbx, &first.id, &["true"])?;
    let first_ms = ms(t.elapsed());
    let config_path = home
        .join("sandboxes")
        .join(&first.id)
        .join("bundle/config.json");
    let replays = Replay {
        config: std::fs::read(&config_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
        failed: None,
    };
    let kiln_fresh_pss_kib = {
        std::thread::sleep(Duration::from_millis(300));
        pss_of_sandbox(&first.id)
    };
    live.kill(&first.id)?;
    progress!("first create (with tree extraction) to exec: {first_ms:.0} ms");

    let raw_base = tmp.join("raw");
    let mut run = Run {
        cfg,
        sbx: &sbx,
        store: &store,
        live,
        replays,
        bundle: raw_bundle(&raw_base.join("bundle"), &rootfs)?,
        raw_base,
        replay_base: tmp.join("replay"),
    };

    let (tti, raw_fresh_pss_kib) = run.time_to_interactive(first_ms)?;
    let (from_snapshot, raw_img) = run.create_from_snapshot()?;
    let fork = run.fork(&raw_img, kiln_fresh_pss_kib, raw_fresh_pss_kib)?;
    let Run {
        sbx,
        store,
        bundle,
        raw_base,
        ..
    } = run;

    // ---- pause / resume
    let pause = pause_resume(sbx, store, &bundle, &raw_base)?;

    // ---- pause after network use
    let no_net_pause_p50 = pause["kiln_pause_ms_p50"].as_f64().unwrap_or(f64::NAN);
    let network_pause = std::thread::scope(|s| {
        s.spawn(|| net_pause(sbx, cfg.net_cycles, no_net_pause_p50))
            .join()
            .unwrap_or_else(|_| json!({"error": "panicked"}))
    });

    Ok(json!({
        "bench": "sandbox",
        "runtime": format!("gvisor (runsc --platform={})", platform()),
        "platform": platform(),
        "raw_overlay": if like_kiln() { "root:dir=<state root>/filestore" } else { raw_overlay() },
        "raw_like_kiln": like_kiln(),
        "runsc_version": String::from_utf8_lossy(&Command::new("runsc").arg("--version").output()?.stdout).lines().next().unwrap_or("").to_string(),
        "image": {"name": "bb", "id": image_id.to_hex(), "import_ms": round(import_ms)},
        "load_avg_start": load_start,
        "load_avg_end": loadavg(),
        "runsc_version_cmd_ms": summary(&version_ms),
        "time_to_interactive": tti,
        "from_snapshot": from_snapshot,
        "fork": fork,
        "pause_resume": pause,
        "pause_after_network_use": network_pause,
    }))
}

/// What the phases of one run share.
struct Run<'a> {
    cfg: &'a Cfg,
    sbx: &'a Sandboxes,
    store: &'a Store,
    /// Sandboxes to kill if a phase fails.
    live: Live<'a>,
    replays: Replay,
    /// The raw baselines' bundle and root.
    bundle: PathBuf,
    raw_base: PathBuf,
    replay_base: PathBuf,
}

impl Run<'_> {
    /// Time to interactive: create to first exec, against raw `runsc run` + `exec` (`first_ms`:
    /// the first create, which extracted the image's tree). Also the PSS of a fresh raw
    /// container.
    fn time_to_interactive(&mut self, first_ms: f64) -> Result<(Value, u64)> {
        let (mut k_create, mut k_exec, mut k_total) = (Vec::new(), Vec::new(), Vec::new());
        let (mut r_run, mut r_exec, mut r_total) = (Vec::new(), Vec::new(), Vec::new());
        let mut tti_steps = Steps::default();
        let mut raw_fresh_pss_kib = 0;
        for i in 0..self.cfg.runs {
            // kiln
            let t0 = Instant::now();
            let rec = self.sbx.create(gvisor_spec(Source::Image("bb".into())))?;
            self.live.add(&rec.id);
            let t1 = t0.elapsed();
            kiln_exec(self.sbx, &rec.id, &["true"])?;
            let t2 = t0.elapsed();
            self.live.kill(&rec.id)?;
            k_create.push(ms(t1));
            k_exec.push(ms(t2 - t1));
            k_total.push(ms(t2));
            // raw runsc
            let raw = Raw::new(&self.raw_base, &format!("tti{i}"));
            let t0 = Instant::now();
            let r = raw.run(&self.bundle).and_then(|()| {
                let t1 = t0.elapsed();
                raw.exec_true()?;
                Ok(t1)
            });
            let t2 = t0.elapsed();
            if i == 0 && r.is_ok() {
                std::thread::sleep(Duration::from_millis(300));
                raw_fresh_pss_kib = raw.pss_kib();
            }
            raw.delete();
            let t1 = r?;
            r_run.push(ms(t1));
            r_exec.push(ms(t2 - t1));
            r_total.push(ms(t2));
            // kiln's steps, replayed
            self.replays.run(|c| {
                replay(
                    c,
                    &self.replay_base.join(format!("tti{i}")),
                    self.store,
                    None,
                    &mut tti_steps,
                )
            });
            progress!(
                "tti {i}: kiln {:.0} ms (create {:.0} + exec {:.0}), raw {:.0} ms (run {:.0} + exec {:.0}), replay {:.0} ms",
                k_total[i],
                k_create[i],
                k_exec[i],
                r_total[i],
                r_run[i],
                r_exec[i],
                tti_steps.total.get(i).copied().unwrap_or(f64::NAN)
            );
        }
        let tti = json!({
            "kiln_create_to_first_exec_ms": summary(&k_total),
            "kiln_create_ms": summary(&k_create),
            "kiln_first_exec_ms": summary(&k_exec),
            "raw_runsc_run_to_first_exec_ms": summary(&r_total),
            "raw_runsc_run_ms": summary(&r_run),
            "raw_runsc_exec_ms": summary(&r_exec),
            "ratio_kiln_vs_raw_p50": round(pct(&k_total, 0.5) / pct(&r_total, 0.5)),
            "ratio_kiln_vs_raw_p90": round(pct(&k_total, 0.9) / pct(&r_total, 0.9)),
            "goal_ratio": 1.2,
            "kiln_steps_replayed": self.replays.report(|| steps_json(&tti_steps)),
            "sandboxes_overhead_ms_p50": self.replays.report(|| json!(round(pct(&k_create, 0.5) - pct(&tti_steps.runsc, 0.5) - pct(&tti_steps.agent, 0.5)))),
            "first_create_with_tree_extraction_ms": round(first_ms),
            "runs": self.cfg.runs,
            "raw_baseline": if like_kiln() {
                format!("runsc --root R --platform={} --network=none --overlay2=root:dir=R/filestore run --detach --bundle B id (cgroups of its own with kiln's default vCPUs and memory, as kiln makes them; init /bin/sleep 1000, the tree the image was made from), then runsc exec id true", platform())
            } else {
                format!("runsc --root R --platform={} --network=none --overlay2={} --ignore-cgroups run --detach --bundle B id (init /bin/sleep 1000, the tree the image was made from), then runsc exec id true", platform(), raw_overlay())
            },
        });
        Ok((tti, raw_fresh_pss_kib))
    }

    /// Create from a snapshot, against raw `runsc restore`; returns the raw checkpoint image
    /// the fork baseline restores.
    fn create_from_snapshot(&mut self) -> Result<(Value, PathBuf)> {
        let src = self.sbx.create(gvisor_spec(Source::Image("bb".into())))?;
        self.live.add(&src.id);
        kiln_exec(self.sbx, &src.id, &["true"])?;
        let before = self.store.stats();
        let t = Instant::now();
        let snap = self.sbx.snapshot(&src.id, Some("bench-base"))?;
        let snapshot_live_ms = ms(t.elapsed());
        let snapshot_store_bytes = self.store.stats().bytes_written - before.bytes_written;
        kiln_exec(self.sbx, &src.id, &["true"])?;
        self.live.kill(&src.id)?;
        let mut live_steps = json!(null);
        self.replays.run(|c| {
            live_steps = replay_live_snapshots(c, &self.replay_base.join("live"), self.store, 3)?;
            Ok(())
        });
        let snap_state = state_file_of(self.store, &snap);
        if snap_state.is_none() && self.replays.failed.is_none() {
            self.replays.failed = Some("the snapshot has no single runsc state file".into());
        }
        let snap_size = snap_state
            .and_then(|s| self.store.manifest(&s).ok())
            .map(|m| m.size);
        progress!(
            "snapshot {snap}: {snapshot_live_ms:.0} ms (live: checkpoint + restore in place), {snapshot_store_bytes} B written to the store"
        );
        let raw_src = Raw::new(&self.raw_base, "snapsrc");
        let raw_img = self.raw_base.join("snap-image");
        let r = raw_src.run(&self.bundle).and_then(|()| {
            raw_src.exec_true()?;
            let t = Instant::now();
            raw_src.checkpoint(&raw_img)?;
            Ok(ms(t.elapsed()))
        });
        raw_src.delete();
        let raw_checkpoint_ms = r?;
        let raw_ckpt_size = dir_bytes(&raw_img);
        let (mut ks_create, mut ks_total) = (Vec::new(), Vec::new());
        let (mut rs_restore, mut rs_total) = (Vec::new(), Vec::new());
        let mut snap_steps = Steps::default();
        for i in 0..self.cfg.runs {
            let t0 = Instant::now();
            let rec = self
                .sbx
                .create(gvisor_spec(Source::Snapshot("bench-base".into())))?;
            self.live.add(&rec.id);
            let t1 = t0.elapsed();
            kiln_exec(self.sbx, &rec.id, &["true"])?;
            let t2 = t0.elapsed();
            self.live.kill(&rec.id)?;
            ks_create.push(ms(t1));
            ks_total.push(ms(t2));
            let raw = Raw::new(&self.raw_base, &format!("rs{i}"));
            let t0 = Instant::now();
            let r = raw.restore(&self.bundle, &raw_img).and_then(|()| {
                let t1 = t0.elapsed();
                raw.exec_true()?;
                Ok(t1)
            });
            let t2 = t0.elapsed();
            raw.delete();
            let t1 = r?;
            rs_restore.push(ms(t1));
            rs_total.push(ms(t2));
            if let Some(sf) = &snap_state {
                self.replays.run(|c| {
                    replay(
                        c,
                        &self.replay_base.join(format!("rs{i}")),
                        self.store,
                        Some(sf),
                        &mut snap_steps,
                    )
                });
            }
            progress!(
                "snapshot {i}: kiln {:.0} ms (create {:.0}), raw {:.0} ms (restore {:.0}), replay {:.0} ms",
                ks_total[i],
                ks_create[i],
                rs_total[i],
                rs_restore[i],
                snap_steps.total.get(i).copied().unwrap_or(f64::NAN)
            );
        }
        let from_snapshot = json!({
            "kiln_create_to_first_exec_ms": summary(&ks_total),
            "kiln_create_ms": summary(&ks_create),
            "raw_runsc_restore_to_first_exec_ms": summary(&rs_total),
            "raw_runsc_restore_ms": summary(&rs_restore),
            "ratio_kiln_vs_raw_p50": round(pct(&ks_total, 0.5) / pct(&rs_total, 0.5)),
            "ratio_kiln_vs_raw_p90": round(pct(&ks_total, 0.9) / pct(&rs_total, 0.9)),
            "kiln_steps_replayed": self.replays.report(|| steps_json(&snap_steps)),
            "sandboxes_overhead_ms_p50": self.replays.report(|| json!(round(pct(&ks_create, 0.5) - pct(&snap_steps.export, 0.5) - pct(&snap_steps.runsc, 0.5) - pct(&snap_steps.agent, 0.5) - pct(&snap_steps.generation, 0.5)))),
            "kiln_live_snapshot_ms": round(snapshot_live_ms),
            "kiln_live_snapshot_steps_replayed": live_steps,
            "kiln_snapshot_store_bytes_written": snapshot_store_bytes,
            "kiln_state_file_bytes": snap_size,
            "raw_runsc_checkpoint_ms": round(raw_checkpoint_ms),
            "raw_checkpoint_image_bytes": raw_ckpt_size,
            "runs": self.cfg.runs,
        });
        Ok((from_snapshot, raw_img))
    }

    /// Fork N, against N raw restores of one checkpoint, as many at a time as kiln runs.
    fn fork(
        &mut self,
        raw_img: &Path,
        kiln_fresh_pss_kib: u64,
        raw_fresh_pss_kib: u64,
    ) -> Result<Value> {
        let n = self.cfg.forks;
        let src = self.sbx.create(gvisor_spec(Source::Image("bb".into())))?;
        self.live.add(&src.id);
        kiln_exec(self.sbx, &src.id, &["true"])?;
        let t0 = Instant::now();
        let forks = self.sbx.fork(
            &src.id,
            kiln_runtime::ForkSpec {
                count: n,
                timeout_secs: None,
            },
        )?;
        for f in &forks {
            self.live.add(&f.id);
        }
        let fork_returned = t0.elapsed();
        for f in &forks {
            kiln_exec(self.sbx, &f.id, &["true"])?;
        }
        let fork_all = t0.elapsed();
        kiln_exec(self.sbx, &src.id, &["true"])?;
        std::thread::sleep(Duration::from_millis(500));
        let fork_pss: Vec<f64> = forks
            .iter()
            .map(|f| pss_of_sandbox(&f.id) as f64 / 1024.0)
            .collect();
        let fork_pss_sum: f64 = fork_pss.iter().sum();
        let src_pss = pss_of_sandbox(&src.id) as f64 / 1024.0;
        let fork_ids: Vec<String> = forks.iter().map(|f| f.id.clone()).collect();
        let fork_cpu = idle_cpu_pct(&fork_ids, IDLE_WINDOW);
        progress!(
            "fork {n}: returned {:.0} ms, all answered {:.0} ms, PSS {:.1} MiB per fork, idle CPU {fork_cpu:.0}% of a core for all",
            ms(fork_returned),
            ms(fork_all),
            fork_pss_sum / n as f64
        );
        self.live.kill_all();
        // raw: N restores of one checkpoint, as many at a time as kiln's fork runs
        let at_once = kiln_runtime::fork_restores_at_once();
        let raws: Vec<Raw> = (0..n)
            .map(|i| Raw::new(&self.raw_base, &format!("fork{i}")))
            .collect();
        let t0 = Instant::now();
        let mut raw_err = None;
        for batch in raws.chunks(at_once) {
            let rs: Vec<Result<()>> = std::thread::scope(|s| {
                let hs: Vec<_> = batch
                    .iter()
                    .map(|r| s.spawn(|| r.restore(&self.bundle, raw_img)))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| bail!("panicked")))
                    .collect()
            });
            for r in rs {
                if let Err(e) = r {
                    raw_err.get_or_insert(e);
                }
            }
        }
        let raw_fork_restored = t0.elapsed();
        if raw_err.is_none() {
            for r in &raws {
                if let Err(e) = r.exec_true() {
                    raw_err.get_or_insert(e);
                    break;
                }
            }
        }
        let raw_fork_all = t0.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let raw_fork_pss: Vec<f64> = raws.iter().map(|r| r.pss_kib() as f64 / 1024.0).collect();
        let raw_roots: Vec<String> = raws.iter().map(|r| root_needle(&r.root)).collect();
        let raw_fork_cpu = if raw_err.is_none() {
            idle_cpu_pct(&raw_roots, IDLE_WINDOW)
        } else {
            f64::NAN
        };
        for r in &raws {
            r.delete();
        }
        if let Some(e) = raw_err {
            return Err(e.context("raw fork baseline"));
        }
        let raw_pss_sum: f64 = raw_fork_pss.iter().sum();
        progress!(
            "raw fork {n}: restored {:.0} ms, all answered {:.0} ms, PSS {:.1} MiB per fork, idle CPU {raw_fork_cpu:.0}% of a core for all",
            ms(raw_fork_restored),
            ms(raw_fork_all),
            raw_pss_sum / n as f64
        );
        let fork = json!({
            "n": n,
            "kiln_fork_call_ms": round(ms(fork_returned)),
            "kiln_all_answered_exec_ms": round(ms(fork_all)),
            "goal_all_answered_ms": 3000,
            "kiln_pss_mib_per_idle_fork": round(fork_pss_sum / n as f64),
            "kiln_pss_mib_per_fork_median": round(pct(&fork_pss, 0.5)),
            "kiln_pss_mib_source_sandbox": round(src_pss),
            "kiln_pss_mib_fresh_sandbox": round(kiln_fresh_pss_kib as f64 / 1024.0),
            "restores_at_once": at_once,
            "raw_restores_ms": round(ms(raw_fork_restored)),
            "raw_all_answered_exec_ms": round(ms(raw_fork_all)),
            "raw_pss_mib_per_idle_fork": round(raw_pss_sum / n as f64),
            "raw_pss_mib_fresh_container": round(raw_fresh_pss_kib as f64 / 1024.0),
            "kiln_idle_cpu_pct_of_one_core_all_forks": round(fork_cpu),
            "raw_idle_cpu_pct_of_one_core_all_restores": round(raw_fork_cpu),
            "idle_cpu": format!("CPU time of the idle forks' processes over {} s, in percent of one core (this host has 2)", IDLE_WINDOW.as_secs()),
            "ratio_kiln_vs_raw_all_answered": round(ms(fork_all) / ms(raw_fork_all)),
            "pss_counts": "sum of Pss from /proc/PID/smaps_rollup of every process whose command line names the sandbox id (kiln) or the container's runsc --root (raw): runsc-sandbox + runsc-gofer, divided by N",
        });
        Ok(fork)
    }
}

/// Pause and resume cycles of one sandbox, the second and later after a 1 MiB change, against
/// raw checkpoint / restore of one container that makes the same changes.
fn pause_resume(sbx: &Sandboxes, store: &Store, bundle: &Path, raw_base: &Path) -> Result<Value> {
    const CHANGE: usize = 1 << 20;
    let cycles = 3;
    let mut live = Live::new(sbx);
    let pr = sbx.create(gvisor_spec(Source::Image("bb".into())))?;
    live.add(&pr.id);
    kiln_exec(sbx, &pr.id, &["true"])?;
    let raw_pr = Raw::new(raw_base, "pause");
    let raw_started = raw_pr.run(bundle).and_then(|()| raw_pr.exec_true());
    if let Err(e) = raw_started {
        raw_pr.delete();
        return Err(e);
    }
    let mut seen: HashSet<BlobId> = HashSet::new();
    let mut rows = Vec::new();
    let (mut p_ms, mut rz_ms, mut rp_ms, mut rr_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let r: Result<()> = (|| {
        for c in 0..cycles {
            let change = c > 0;
            if change {
                let line = format!("head -c {CHANGE} /dev/urandom > /root/change{c}");
                kiln_exec(sbx, &pr.id, &["/bin/sh", "-c", &line])?;
                raw_pr.exec_sh(&line)?;
            }
            let before = store.stats();
            let t = Instant::now();
            let rec = sbx.pause(&pr.id)?;
            let pause_ms = ms(t.elapsed());
            let after = store.stats();
            let State::Paused { saved } = rec.state else {
                bail!("pause left the sandbox {}", rec.state.name());
            };
            // Chunk-level detail when the checkpoint is one runsc state file (before issue 17).
            let chunks = state_file_of(store, &saved)
                .and_then(|sf| store.manifest(&sf).ok())
                .map(|m| {
                    let ids: Vec<BlobId> = m.chunks.iter().flatten().copied().collect();
                    let new = ids.iter().filter(|c| !seen.contains(c)).count();
                    let distinct: HashSet<BlobId> = ids.iter().copied().collect();
                    let v = json!({"state_file_bytes": m.size, "chunks": ids.len(),
                        "distinct_chunks": distinct.len(), "chunk_size": m.chunk_size,
                        "chunks_new_vs_earlier_pauses": new});
                    seen.extend(ids);
                    v
                });
            let t = Instant::now();
            sbx.resume(&pr.id, None)?;
            let resume_ms = ms(t.elapsed());
            kiln_exec(sbx, &pr.id, &["true"])?;
            let resume_exec_ms = ms(t.elapsed());
            if change {
                let out = kiln_exec(
                    sbx,
                    &pr.id,
                    &["/bin/sh", "-c", &format!("wc -c < /root/change{c}")],
                )?;
                anyhow::ensure!(
                    String::from_utf8_lossy(&out).trim() == CHANGE.to_string(),
                    "the 1 MiB file did not survive pause/resume: {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
            // raw
            let img = raw_base.join(format!("pause-image{c}"));
            let t = Instant::now();
            raw_pr.checkpoint(&img)?;
            let raw_ckpt_ms = ms(t.elapsed());
            let mut d = runsc(&raw_pr.root, false);
            d.args(["delete", "--force", &raw_pr.id]);
            runsc_ok(d, "runsc delete")?;
            let t = Instant::now();
            raw_pr.restore(bundle, &img)?;
            let raw_restore_ms = ms(t.elapsed());
            raw_pr.exec_true()?;
            let raw_restore_exec_ms = ms(t.elapsed());
            let raw_size = dir_bytes(&img);
            let _ = std::fs::remove_dir_all(&img);
            let written = after.bytes_written - before.bytes_written;
            progress!(
                "pause {c}: {pause_ms:.0} ms, {written} B written to the store; resume to exec {resume_exec_ms:.0} ms; raw checkpoint {raw_ckpt_ms:.0} ms ({raw_size} B), restore to exec {raw_restore_exec_ms:.0} ms",
            );
            p_ms.push(pause_ms);
            rz_ms.push(resume_exec_ms);
            rp_ms.push(raw_ckpt_ms);
            rr_ms.push(raw_restore_exec_ms);
            rows.push(json!({
                "cycle": c,
                "change_before": if change { "1 MiB file of random bytes written" } else { "none (first pause)" },
                "pause_ms": round(pause_ms),
                "resume_ms": round(resume_ms),
                "resume_to_first_exec_ms": round(resume_exec_ms),
                "store_chunks_written": after.chunks_written - before.chunks_written,
                "store_bytes_written": written,
                "state_file": chunks,
                "raw_checkpoint_ms": round(raw_ckpt_ms),
                "raw_restore_ms": round(raw_restore_ms),
                "raw_restore_to_first_exec_ms": round(raw_restore_exec_ms),
                "raw_checkpoint_image_bytes": raw_size,
            }));
        }
        Ok(())
    })();
    raw_pr.delete();
    live.kill_all();
    r?;
    let second = rows
        .get(1)
        .and_then(|r| r["store_bytes_written"].as_u64())
        .unwrap_or(0);
    Ok(json!({
        "cycles": rows,
        "kiln_pause_ms_p50": round(pct(&p_ms, 0.5)),
        "kiln_resume_to_first_exec_ms_p50": round(pct(&rz_ms, 0.5)),
        "raw_checkpoint_ms_p50": round(pct(&rp_ms, 0.5)),
        "raw_restore_to_first_exec_ms_p50": round(pct(&rr_ms, 0.5)),
        "ratio_pause_vs_raw_checkpoint_p50": round(pct(&p_ms, 0.5) / pct(&rp_ms, 0.5)),
        "ratio_resume_vs_raw_restore_p50": round(pct(&rz_ms, 0.5) / pct(&rr_ms, 0.5)),
        "goal_ratio_resume": 1.2,
        "second_pause_store_bytes_written": second,
        "goal_second_pause_store_bytes": 2 << 20,
        "store_bytes_written": "Store::stats().bytes_written across the pause (what the store wrote: chunks after its zstd, manifests, records)",
    }))
}

/// The port of the bench's connection holder in the "internet" namespace.
const HOLD_PORT: u16 = 9100;

/// Pause after network use, inside test namespaces of kiln_tests::net (kiln's "host"
/// namespace and an "internet" namespace behind it; this thread moves into the first):
/// - after a request: the sandbox makes an HTTP request to a server in the internet namespace
///   (the connection is closed, in time-wait), then is paused and resumed, `cycles` times;
/// - with an open connection: `sleep | nc` holds a TCP connection to the bench's holder there,
///   then one pause (and resume, if it worked).
///
/// Runs on a thread of its own (it changes its network namespace). Errors are results here:
/// they go into the JSON.
fn net_pause(sbx: &Sandboxes, cycles: usize, no_net_pause_p50: f64) -> Value {
    use kiln_tests::net::{TestNet, HTTP_PORT, SERVER_A};
    if let Some(why) = kiln_tests::net::unavailable() {
        return json!({"skipped": why});
    }
    let net = TestNet::new();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let inet = net.inet_ns.clone();
    let bound = std::thread::spawn(move || {
        kiln_tests::net::enter(&inet);
        std::net::TcpListener::bind((SERVER_A, HOLD_PORT))
    })
    .join();
    let listener = match bound {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return json!({"error": format!("bind the holder: {e}")}),
        Err(_) => return json!({"error": "bind the holder: panicked"}),
    };
    // Accepts and holds every connection; says when one comes and how it ends. (The thread
    // stays blocked in accept after the bench is done with it: the process ends soon after.)
    let t0 = Instant::now();
    std::thread::spawn(move || {
        use std::io::Read;
        for (n, s) in listener.incoming().enumerate() {
            let Ok(mut s) = s else { continue };
            let _ = tx.send(format!("accept {n} at {:.1} s", t0.elapsed().as_secs_f64()));
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let how = loop {
                    match s.read(&mut buf) {
                        Ok(0) => break "EOF".to_string(),
                        Ok(_) => continue,
                        Err(e) => break e.to_string(),
                    }
                };
                let _ = tx.send(format!(
                    "closed {n} at {:.1} s: {how}",
                    t0.elapsed().as_secs_f64()
                ));
            });
        }
    });
    net.enter();
    let mut live = Live::new(sbx);
    let mut events = Vec::new();
    let r = (|| -> Result<Value> {
        let mut spec = gvisor_spec(Source::Image("bb".into()));
        spec.no_network = false;
        spec.network = Some(kiln_runtime::NetworkPolicy::default());
        let t = Instant::now();
        let rec = sbx.create(spec)?;
        live.add(&rec.id);
        let create_ms = ms(t.elapsed());
        let id = rec.id.as_str();
        let get =
            format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc {SERVER_A} {HTTP_PORT}");
        let request = || -> Result<bool> {
            let body = kiln_exec(sbx, id, &["/bin/sh", "-c", &get])?;
            Ok(String::from_utf8_lossy(&body).contains("server-a"))
        };
        // One pause (and resume to the first exec, if the pause worked) as a JSON row.
        let cycle = |what: &str, p_ms: &mut Vec<f64>, rz_ms: &mut Vec<f64>| -> Result<Value> {
            let t = Instant::now();
            let paused = sbx.pause(id);
            let pause_ms = ms(t.elapsed());
            if let Err(e) = paused {
                progress!("network pause ({what}): failed after {pause_ms:.0} ms: {e}");
                return Ok(json!({"pause_error": e.to_string(), "pause_ms": round(pause_ms)}));
            }
            let t = Instant::now();
            sbx.resume(id, None)?;
            kiln_exec(sbx, id, &["true"])?;
            let resume_ms = ms(t.elapsed());
            let net_after = request()?;
            progress!(
                "network pause ({what}): {pause_ms:.0} ms, resume to exec {resume_ms:.0} ms, network after resume: {net_after}"
            );
            p_ms.push(pause_ms);
            rz_ms.push(resume_ms);
            Ok(json!({"pause_ms": round(pause_ms),
                "resume_to_first_exec_ms": round(resume_ms),
                "http_request_after_resume_ok": net_after}))
        };
        let (mut p_ms, mut rz_ms, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cycles {
            anyhow::ensure!(
                request()?,
                "the HTTP request through the sandbox's network failed"
            );
            rows.push(cycle("after a request", &mut p_ms, &mut rz_ms)?);
        }
        // The connection stays open: nc's stdin is the pipe from sleep.
        let hold = format!("(sleep 100000 | busybox nc {SERVER_A} {HOLD_PORT}) >/dev/null 2>&1 &");
        kiln_exec(sbx, id, &["/bin/sh", "-c", &hold])?;
        let accepted = rx.recv_timeout(Duration::from_secs(10));
        anyhow::ensure!(
            accepted.as_ref().is_ok_and(|e| e.starts_with("accept")),
            "the holder saw no connection from the sandbox ({accepted:?})"
        );
        events.push(accepted.unwrap());
        let (mut op_ms, mut orz_ms) = (Vec::new(), Vec::new());
        let open = cycle("a connection open", &mut op_ms, &mut orz_ms)?;
        std::thread::sleep(Duration::from_millis(200));
        events.extend(rx.try_iter());
        Ok(json!({
            "kiln_create_with_network_ms": round(create_ms),
            "after_request": {
                "cycles": rows,
                "kiln_pause_ms_p50": round(pct(&p_ms, 0.5)),
                "kiln_pause_ms_max": round(pct(&p_ms, 1.0)),
                "kiln_resume_to_first_exec_ms_p50": round(pct(&rz_ms, 0.5)),
                "ratio_vs_pause_without_network_p50": round(pct(&p_ms, 0.5) / no_net_pause_p50),
            },
            "with_open_connection": open,
            "kiln_pause_without_network_ms_p50": round(no_net_pause_p50),
            "goal_pause_ms": 1000,
            "holder_events": events,
            "setup": "after_request: an HTTP/1.0 request (busybox nc) to a server in the test's internet namespace, then pause, resume, exec true, the request again; with_open_connection: `sleep | busybox nc` holding a TCP connection to the bench's holder there (its accept seen), then pause (and resume)",
        }))
    })();
    live.kill_all();
    drop(net);
    r.unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
}
