//! Crash test of `kiln serve` (issue 16): the daemon is killed with SIGKILL at random moments
//! while 8 E2B Python SDK clients create, run commands in, write and read files of, pause,
//! connect to (resume), fork and kill sandboxes; it is restarted on the same home each time.
//! Afterwards, for every sandbox any client got back from the daemon: it is listed (running
//! or paused; a paused one resumes; its file is byte-identical to the client's last confirmed
//! write; a command runs) or it is cleanly gone (no directory, no runsc process with its
//! `--root`, no token, no network namespace). A live sandbox has exactly one set of runsc
//! processes, and a live daemon answers no 5xx (the first resume after a restart works).
//! Globally, after every sandbox is killed and `kiln store gc` ran: no runsc process, mount
//! or network namespace of this home, and no `hold:` store name that no live sandbox or
//! named snapshot needs.
//!
//! The clients and the checker are `tests/py/serve_crash.py`. Every violation is collected
//! and printed (which sandbox, what state, what leaked) before the test fails.
//!
//! Knobs: `KILN_CRASH_SEED` (the seed is printed), `KILN_CRASH_KILLS` (default 8),
//! `KILN_CRASH_SECS` (client run time, default 60), `KILN_CRASH_QUIET` (seconds the daemon
//! stays up after the last kill, default 30), `KILN_CRASH_CLIENTS` (default 8),
//! `KILN_CRASH_HOLD` (seconds to wait before the final cleanup, to inspect by hand),
//! `KILN_CRASH_KEEP=1` (keep the temp dir: home, daemon log, journals).
//!
//! The daemon and the clients run in a network namespace of the test's own (loopback only):
//! its port cannot collide with anything across restarts, and a sandbox network the daemon
//! makes (whatever `KILN_NETWORK` says) has no way out.

use kiln_tests::e2b::{self, Serve};
use kiln_tests::sandbox::{processes, processes_mentioning, KillAll};
use kiln_tests::tapns;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "kiln_crash_key_0123456789";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py/serve_crash.py")
}

/// Invariant violations, by subject (a sandbox id or "global").
#[derive(Default)]
struct Report(BTreeMap<String, Vec<String>>);

impl Report {
    fn add(&mut self, subject: &str, what: impl Into<String>) {
        self.0
            .entry(subject.to_string())
            .or_default()
            .push(what.into());
    }

    fn count(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

#[test]
fn daemon_kill_9_under_concurrent_sdk_clients() {
    let Some(py) = e2b::python_or_skip() else {
        return;
    };
    if let Some(why) = tapns::netns_unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let Some((tmp, k)) = e2b::sdk_home() else {
        return;
    };
    let seed = env_u64(
        "KILN_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let kills = env_u64("KILN_CRASH_KILLS", 8);
    let secs = env_u64("KILN_CRASH_SECS", 60);
    let clients = env_u64("KILN_CRASH_CLIENTS", 8);
    eprintln!(
        "serve_crash: seed {seed} (rerun with KILN_CRASH_SEED={seed}), {kills} kills, \
         {clients} clients, {secs} s"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // What the store holds before any sandbox: the image's names and unnamed blobs.
    let base_names: BTreeSet<String> = store_names(&k).into_keys().collect();
    let base_orphans = unnamed_blobs(&k);

    let ns = tapns::NetNs::new("crash").unwrap();
    tapns::enter(&ns.name).unwrap();
    // Declared after `ns`, so dropped before it: sandboxes go before their namespace, and
    // whatever the crashes left running (and `kiln sandbox kill` cannot find) last.
    let _leftovers = KillLeftovers(k.home.clone());
    let _cleanup = KillAll(k.clone());
    let mut s = Serve::start(&k, KEY);

    let work = tmp.path().join("crash");
    let journals = work.join("journals");
    std::fs::create_dir_all(&journals).unwrap();
    let stopfile = work.join("stop");
    let mut procs: Vec<(u64, Child)> = (0..clients)
        .map(|n| {
            let out = std::fs::File::create(work.join(format!("client{n}.out"))).unwrap();
            let err = std::fs::File::create(work.join(format!("client{n}.err"))).unwrap();
            let child = Command::new(&py)
                .arg(script())
                .arg("client")
                .arg(n.to_string())
                .arg(seed.to_string())
                .arg(journals.join(format!("client{n}.jsonl")))
                .arg(&stopfile)
                .arg("sdk")
                .envs(s.sdk_env())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("starting a client");
            (n, child)
        })
        .collect();

    // Kills at random moments; the clients start up meanwhile (the first ones are
    // likely to hit a create).
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(rng.random_range(3000..8000)));
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(1000..6000)));
        let at = t0.elapsed().as_secs_f64();
        s.restart();
        eprintln!(
            "kill {}/{kills} at {at:.1} s (up again after {:.2} s)",
            i + 1,
            t0.elapsed().as_secs_f64() - at
        );
    }
    // A quiet spell after the last kill: under load a restart takes up to ~10 s and a fork
    // longer than the window between two kills, so without it an operation may never finish.
    let quiet = Duration::from_secs(env_u64("KILN_CRASH_QUIET", 30));
    let rest = Duration::from_secs(secs)
        .saturating_sub(t0.elapsed())
        .max(quiet);
    std::thread::sleep(rest);
    std::fs::write(&stopfile, b"").unwrap();
    let mut summary: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut report = Report::default();
    let wait_from = Instant::now();
    for (n, child) in &mut procs {
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if wait_from.elapsed() > Duration::from_secs(150) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let out = std::fs::read_to_string(work.join(format!("client{n}.out"))).unwrap();
        let err = std::fs::read_to_string(work.join(format!("client{n}.err"))).unwrap();
        let Some(st) = st else {
            report.add(
                "global",
                format!(
                    "client {n} did not stop within 150 s of the stop file (a request hung?):\n{}",
                    tail(&err, 5)
                ),
            );
            continue;
        };
        match (st, out.lines().last().map(serde_json::from_str::<Value>)) {
            (st, Some(Ok(v))) if st.success() => {
                for (op, outcomes) in v.as_object().unwrap() {
                    for (o, c) in outcomes.as_object().unwrap() {
                        *summary
                            .entry(op.clone())
                            .or_default()
                            .entry(o.clone())
                            .or_default() += c.as_u64().unwrap();
                    }
                }
            }
            (st, _) => panic!(
                "client {n} did not end well ({st:?}): the test is broken\n{}",
                tail(&err, 30)
            ),
        }
    }
    eprintln!(
        "clients stopped {:.1} s after the stop file; operations:",
        wait_from.elapsed().as_secs_f64()
    );
    for (op, outcomes) in &summary {
        eprintln!("  {op:8} {outcomes:?}");
    }
    // The test means nothing unless the clients did what it is about.
    for op in [
        "create", "write", "read", "pause", "connect", "fork", "kill",
    ] {
        let ok = summary
            .get(op)
            .map(|o| o.get("ok").unwrap_or(&0) + o.get("ok-after-retry").unwrap_or(&0))
            .unwrap_or(0);
        assert!(ok > 0, "no {op} succeeded: the test exercised nothing");
    }

    // Let the daemon reconcile (its sweep runs every second), then check every sandbox
    // through the SDK.
    std::thread::sleep(Duration::from_secs(3));
    let out = Command::new(&py)
        .arg(script())
        .arg("check")
        .arg(&journals)
        .envs(s.sdk_env())
        .stdin(Stdio::null())
        .output()
        .expect("running the checker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let check: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "the checker failed ({}): the test is broken\n{}\n{}",
                out.status,
                stdout,
                tail(&String::from_utf8_lossy(&out.stderr), 30)
            )
        });
    let strings = |v: &Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    let listed: BTreeMap<String, String> = check["listed"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, st)| (id.clone(), st.as_str().unwrap().to_string()))
        .collect();
    let journaled = strings(&check["journaled"]);
    let alive = strings(&check["expected_alive"]);
    for v in check["violations"].as_array().unwrap() {
        report.add(v["id"].as_str().unwrap(), v["what"].as_str().unwrap());
    }
    eprintln!(
        "sandboxes: {} acknowledged to clients ({} never killed), {} listed at the end \
         ({} that no client got back)",
        journaled.len(),
        alive.len(),
        listed.len(),
        strings(&check["unjournaled"]).len()
    );

    // Gone means gone: nothing of a sandbox that is not listed stays on the host.
    let home = k.home.clone();
    let mut universe: BTreeSet<String> = journaled.clone();
    universe.extend(listed.keys().cloned());
    universe.extend(entries(&home.join("sandboxes")));
    universe.extend(entries(&home.join("serve/tokens")));
    let gone: Vec<String> = universe
        .iter()
        .filter(|id| !listed.contains_key(*id))
        .cloned()
        .collect();
    for (id, what) in settle(|| gone.iter().flat_map(|id| leftovers(&home, id)).collect()) {
        report.add(&id, what);
    }

    // A live sandbox has one set of runsc processes (a sandbox and its gofer): a restore
    // that went on after its daemon died must not leave a second one beside it.
    // (Those the checker found unusable are reported already.)
    let usable: Vec<&String> = listed
        .keys()
        .filter(|id| !report.0.contains_key(*id))
        .collect();
    for id in usable {
        let sets = runsc_roots(&home.join("sandboxes").join(id).join("runsc"));
        let sandboxes = sets
            .iter()
            .filter(|(_, a)| a.contains("runsc-sandbox"))
            .count();
        let gofers = sets
            .iter()
            .filter(|(_, a)| a.contains("runsc-gofer"))
            .count();
        if sandboxes != 1 || gofers > 1 {
            let pids: Vec<u32> = sets.iter().map(|(p, _)| *p).collect();
            report.add(
                id,
                format!(
                    "listed, running, but with {sandboxes} runsc sandbox and {gofers} gofer \
                     process trees (one of each expected): {}",
                    describe(&pids)
                ),
            );
        }
    }

    // Holds (`hold:<holder>:<blob>` store names): only live sandboxes and named snapshots
    // keep anything, and no fork is under way any more.
    let names = store_names(&k);
    let stray: Vec<&String> = names
        .keys()
        .filter(|n| n.starts_with("hold:") && !hold_is_live(n, &listed, &names))
        .collect();
    if !stray.is_empty() {
        report.add(
            "global",
            format!(
                "{} of {} hold: names belong to no live sandbox or named snapshot ({} live \
                 sandboxes), e.g. {:?}",
                stray.len(),
                names.keys().filter(|n| n.starts_with("hold:")).count(),
                listed.len(),
                &stray[..stray.len().min(3)]
            ),
        );
    }

    if let Some(hold) = std::env::var("KILN_CRASH_HOLD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        eprintln!(
            "holding {hold} s before cleanup: home {}, daemon on 127.0.0.1:{} in netns {}",
            home.display(),
            s.port,
            ns.name
        );
        std::thread::sleep(Duration::from_secs(hold));
    }

    // Kill everything through the API; then nothing of this home may be left.
    for id in listed.keys() {
        let (code, v) = s.api("DELETE", &format!("/sandboxes/{id}"), None);
        if code != 204 {
            report.add(id, format!("DELETE answered {code}: {v}"));
        }
    }
    for what in settle(|| global_leftovers(&home, &universe)) {
        report.add(
            "global",
            format!("after killing every listed sandbox: {what}"),
        );
    }
    let gc = k.run(["store", "gc"]);
    if !gc.status.success() {
        report.add(
            "global",
            format!(
                "kiln store gc failed: {}",
                String::from_utf8_lossy(&gc.stderr)
            ),
        );
    }
    let names = store_names(&k);
    let held: Vec<&String> = names
        .keys()
        .filter(|n| n.starts_with("hold:") || n.starts_with("keep:"))
        .filter(|n| !base_names.contains(*n))
        .collect();
    let named: Vec<&String> = names
        .keys()
        .filter(|n| n.starts_with("sandbox-snapshot:"))
        .collect();
    if !held.is_empty() && named.is_empty() {
        report.add(
            "global",
            format!(
                "after killing every sandbox and kiln store gc, {} hold:/keep: names remain with \
                 no sandbox and no named snapshot left (store: {}), e.g. {:?}",
                held.len(),
                du(&k.store_dir()),
                &held[..held.len().min(3)]
            ),
        );
    }
    // A blob nobody names is one nobody can reach: a checkpoint leaked by a crash (each
    // checkpoint blob is held before its manifest is written, so none may be).
    let orphans = unnamed_blobs(&k);
    if named.is_empty() && orphans > base_orphans {
        report.add(
            "global",
            format!(
                "after killing every sandbox and kiln store gc, {} blobs have no name ({} \
                 before the run; store: {})",
                orphans,
                base_orphans,
                du(&k.store_dir())
            ),
        );
    }

    let n = report.count();
    if n > 0 {
        let log = std::fs::read_to_string(home.with_extension("serve.log")).unwrap_or_default();
        eprintln!("\nINVARIANT VIOLATIONS ({n}), seed {seed}:");
        for (subject, whats) in &report.0 {
            let origin = origin(&journals, subject);
            eprintln!("  {subject}{origin}");
            for w in whats {
                eprintln!("    - {w}");
            }
            if subject != "global" {
                for l in log
                    .lines()
                    .filter(|l| l.contains(subject.as_str()))
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(3)
                {
                    eprintln!("      log: {}", l.chars().take(300).collect::<String>());
                }
            }
        }
    }
    if std::env::var_os("KILN_CRASH_KEEP").is_some() {
        eprintln!("kept {}", tmp.keep().display());
    }
    assert_eq!(
        n, 0,
        "{n} invariant violations after {kills} daemon kills (seed {seed}); see above"
    );
}

/// Kills (SIGKILL) every process whose command line names the home, when dropped.
struct KillLeftovers(PathBuf);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for pid in processes_mentioning(&format!("{}/", self.0.display())) {
            // SAFETY: kill(2) of a process that names this test's own home (a sandbox's
            // runsc or DNS proxy that outlived its record).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Names in a directory (none if it does not exist), dot-entries left out.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// The sandbox's network namespace names (`kiln_network::setup::names`), if any exist.
fn netns_of(id: &str) -> Vec<String> {
    let short: String = id.chars().take(12).collect();
    entries(Path::new("/run/netns"))
        .into_iter()
        .filter(|n| *n == format!("kiln-{short}") || *n == format!("kiln-{short}-g"))
        .collect()
}

/// What a sandbox that is not listed left on the host: (id, what).
fn leftovers(home: &Path, id: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = home.join("sandboxes").join(id);
    if dir.exists() {
        let rec: Value = std::fs::read(dir.join("sandbox.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let cause = rec["cause"]
            .as_str()
            .map(|c| format!(", cause: {}", c.lines().next().unwrap_or("")))
            .unwrap_or_default();
        out.push(format!(
            "not listed, but its directory remains (record: state {}, op {}{cause})",
            rec["state"], rec["op"]
        ));
    }
    let pids = processes_mentioning(&format!("{}/", dir.display()));
    if !pids.is_empty() {
        out.push(format!(
            "not listed, but processes of it still run: {}",
            describe(&pids)
        ));
    }
    if home.join("serve/tokens").join(id).exists() {
        out.push("not listed, but its access token file remains".into());
    }
    for n in netns_of(id) {
        out.push(format!("not listed, but its network namespace {n} remains"));
    }
    out.into_iter().map(|w| (id.to_string(), w)).collect()
}

/// What of this home is left once every sandbox was killed.
fn global_leftovers(home: &Path, ids: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    let pids = processes_mentioning(&format!("{}/", home.display()));
    if !pids.is_empty() {
        out.push(format!("processes still run: {}", describe(&pids)));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let home_s = home.display().to_string();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&home_s)).collect();
    if !left.is_empty() {
        out.push(format!("mounts under the home: {left:?}"));
    }
    let ns: Vec<String> = ids.iter().flat_map(|id| netns_of(id)).collect();
    if !ns.is_empty() {
        out.push(format!("network namespaces remain: {ns:?}"));
    }
    let dirs = entries(&home.join("sandboxes"));
    if !dirs.is_empty() {
        out.push(format!("sandbox directories remain: {dirs:?}"));
    }
    // Setup debris (`.new-<id>`) goes once it is older than the runtime's 60 s grace.
    let debris: Vec<String> = std::fs::read_dir(home.join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".new-"))
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a > Duration::from_secs(90))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !debris.is_empty() {
        out.push(format!("setup debris older than 90 s remains: {debris:?}"));
    }
    let tokens = entries(&home.join("serve/tokens"));
    if !tokens.is_empty() {
        out.push(format!("token files remain: {tokens:?}"));
    }
    out
}

/// runsc processes started with `--root=ROOT` whose parent is not one of them (the tops of
/// its process trees; systrap's stub processes are children of the sandbox): (pid, argv0).
fn runsc_roots(root: &Path) -> Vec<(u32, String)> {
    let flag = format!("--root={}", root.display());
    let mut all = BTreeMap::new();
    for (pid, args) in processes() {
        if !args.contains(&flag) {
            continue;
        }
        // Field 4 of /proc/PID/stat, after the command name in parentheses.
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| {
                st[st.rfind(')')? + 2..]
                    .split(' ')
                    .nth(1)
                    .and_then(|p| p.parse::<u32>().ok())
            })
            .unwrap_or(0);
        all.insert(pid, (ppid, args[0].clone()));
    }
    all.iter()
        .filter(|(_, (ppid, _))| !all.contains_key(ppid))
        .map(|(pid, (_, argv0))| (*pid, argv0.clone()))
        .collect()
}

/// `f()` re-evaluated for up to 15 s until it finds nothing (the daemon's sweep and
/// asynchronous teardown get their time); the last findings.
fn settle<T>(f: impl Fn() -> Vec<T>) -> Vec<T> {
    let t = Instant::now();
    loop {
        let found = f();
        if found.is_empty() || t.elapsed() > Duration::from_secs(15) {
            return found;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// pid (command line) for each.
fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            format!("{p} ({})", cmd.chars().take(160).collect::<String>())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Store name -> blob id.
fn store_names(k: &kiln_tests::Kiln) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for b in k.json(["store", "ls", "--json"]).as_array().unwrap() {
        for n in b["names"].as_array().unwrap() {
            out.insert(
                n.as_str().unwrap().to_string(),
                b["id"].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

/// Whether a `hold:` store name belongs to a live holder: a listed sandbox, or a named
/// snapshot that still exists (`hold:fork:` holds only last while a fork is under way).
fn hold_is_live(
    name: &str,
    listed: &BTreeMap<String, String>,
    names: &BTreeMap<String, String>,
) -> bool {
    let rest = name.strip_prefix("hold:").unwrap_or_default();
    let (kind, rest) = rest.split_once(':').unwrap_or_default();
    let holder = rest.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
    match kind {
        "sandbox" => listed.contains_key(holder),
        "snapshot" => names.contains_key(&format!("sandbox-snapshot:{holder}")),
        _ => false,
    }
}

/// How many blobs of the store carry no name at all.
fn unnamed_blobs(k: &kiln_tests::Kiln) -> usize {
    k.json(["store", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["names"].as_array().is_none_or(|n| n.is_empty()))
        .count()
}

/// The size of a directory on disk, as `du -sh` says.
fn du(p: &Path) -> String {
    Command::new("du")
        .arg("-sh")
        .arg(p)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// " (client N, created by create|fork of P)" from the journals, if a client had it.
fn origin(journals: &Path, id: &str) -> String {
    for e in std::fs::read_dir(journals).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for l in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                continue;
            };
            if v["ev"] == "created" && v["id"] == id {
                let parent = v["parent"]
                    .as_str()
                    .map(|p| format!(" of {p}"))
                    .unwrap_or_default();
                return format!(
                    " (client {}, {}{parent})",
                    v["client"],
                    v["via"].as_str().unwrap_or("?")
                );
            }
        }
    }
    if id == "global" {
        String::new()
    } else {
        " (no client got it back)".into()
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
