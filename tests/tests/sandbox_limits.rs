//! Limits that hold, on gVisor (real runsc, the real kiln binary, the agent as init): a
//! process that allocates past its sandbox's memory dies inside while the sandbox and its
//! neighbour go on; tmpfs is bounded by the sandbox's memory; a fork bomb is bounded by the
//! task limit and the host's limits while a neighbour keeps counting; two busy sandboxes of
//! one CPU each share the host fairly; and when the host's backstop does fire, the sandbox
//! says it ran out of memory, with its limit.

use kiln_runtime::gvisor::limits;
use kiln_tests::sandbox::{app_home, create, exec, sh, KillAll, COUNTER_LOOP};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn count(k: &kiln_tests::Kiln, id: &str) -> u64 {
    kiln_tests::sandbox::counter(k, id)
}

/// Waits (bounded) until `id`'s counter passes `n`.
fn counts_past(k: &kiln_tests::Kiln, id: &str, n: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if count(k, id) > n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The sandbox's memory cgroup directory on this host (v1 or v2).
fn memory_cgroup(id: &str) -> PathBuf {
    let cg = PathBuf::from("/sys/fs/cgroup");
    let rel = limits::cgroups_path(id);
    let rel = rel.trim_start_matches('/');
    match limits::version() {
        limits::Version::V2 => cg.join(rel),
        limits::Version::V1 => cg.join("memory").join(rel),
    }
}

#[test]
fn a_process_past_its_memory_dies_inside_and_the_sandbox_and_its_neighbour_live_on() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let a = create(&k, &["app", "--memory", "256"]);
    let a = a["id"].as_str().unwrap().to_string();
    let b = create(&k, &["app"]);
    let b = b["id"].as_str().unwrap().to_string();
    assert!(
        memory_cgroup(&a).is_dir(),
        "no cgroup for {a} at {}",
        memory_cgroup(&a).display()
    );
    sh(&k, &b, COUNTER_LOOP);
    let a_loop = sh(&k, &a, &format!("{COUNTER_LOOP} echo $!"));
    assert!(
        counts_past(&k, &b, 0),
        "the neighbour's counter never started"
    );

    // A string that doubles until it holds twice the sandbox's memory (anonymous memory,
    // written page by page as programs do), then reports.
    let before = count(&k, &b);
    let t = Instant::now();
    let (out, err, code) = exec(
        &k,
        &a,
        &[],
        &[
            "busybox",
            "awk",
            "BEGIN { s = \"x\"; while (length(s) < 512 * 1048576) s = s s; print \"done\" }",
        ],
        b"",
    );
    eprintln!(
        "allocating 2x the memory: exit {code} after {:?}: {err}",
        t.elapsed()
    );
    assert!(
        code != 0 && !out.contains("done"),
        "awk past the sandbox's memory succeeded: {out} {err}"
    );
    // The sandbox lives on: it answers, its own counter and the neighbour's keep counting.
    let rec = k.json(["sandbox", "info", &a, "--json"]);
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(sh(&k, &a, "echo ok"), "ok\n");
    let a_now = count(&k, &a);
    assert!(
        counts_past(&k, &a, a_now),
        "the sandbox's own counter stopped"
    );
    assert!(
        sh(&k, &a, &format!("kill -0 {} && echo alive", a_loop.trim())).contains("alive"),
        "the OOM killer took the small counter loop instead of the large process"
    );
    assert!(
        counts_past(&k, &b, before),
        "the neighbour stopped counting"
    );

    // tmpfs lives in the sentry's memory: /tmp holds at most half the sandbox's memory, and
    // filling it fails inside (gVisor's tmpfs says EIO rather than ENOSPC).
    let (_, err, code) = exec(
        &k,
        &a,
        &[],
        &["sh", "-c", "head -c 300000000 /dev/zero > /tmp/big"],
        b"",
    );
    assert_ne!(code, 0, "300 MB into /tmp of a 256 MiB sandbox: {err}");
    let held: u64 = sh(&k, &a, "wc -c < /tmp/big").trim().parse().unwrap();
    assert!(held <= 128 << 20, "/tmp held {held} bytes ({err})");
    sh(&k, &a, "rm /tmp/big");
    assert_eq!(sh(&k, &a, "echo ok"), "ok\n");
    k.ok(["sandbox", "kill", &a]);
    assert!(!memory_cgroup(&a).exists(), "kill left the cgroup of {a}");
}

/// `kiln ARGS` that gives up after `limit`: (stdout, exit code), `None` when it did not end
/// in time.
fn kiln_within(k: &kiln_tests::Kiln, args: &[&str], limit: Duration) -> Option<(String, i32)> {
    let mut child = k
        .cmd(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kiln sandbox exec");
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            use std::io::Read;
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return Some((out, status.code().unwrap_or(-1)));
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `kiln-work`'s task count, as the agent itself reads it (`cp` starts no process: under a
/// bomb, no new process may start).
const TASKS: &str = "/sys/fs/cgroup/pids/kiln-work/pids.current";

/// Samples `id`'s task count for `secs` seconds, asserting each sample is at most `bound`;
/// returns the largest seen.
fn peak_tasks(k: &kiln_tests::Kiln, id: &str, scratch: &Path, secs: u64, bound: u64) -> u64 {
    let copy = scratch.join("tasks");
    let src = format!("{id}:{TASKS}");
    let t = Instant::now();
    let mut samples = Vec::new();
    while t.elapsed() < Duration::from_secs(secs) {
        let args = ["sandbox", "cp", &src, copy.to_str().unwrap()];
        if let Some((_, 0)) = kiln_within(k, &args, Duration::from_secs(3)) {
            let n: u64 = std::fs::read_to_string(&copy)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(
                n <= bound,
                "{n} tasks, past the bound of {bound}: {samples:?}"
            );
            samples.push(n);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let peak = samples.iter().copied().max().unwrap_or(0);
    assert!(peak > 0, "the task count was never read during the bomb");
    peak
}

/// Tells the bombs in `id` to stop (they look for /tmp/stop) and waits (bounded) until no
/// task is left in `kiln-work`, or the sandbox is no longer running.
fn stop_bombs(k: &kiln_tests::Kiln, id: &str, scratch: &Path) {
    let stop = scratch.join("stop");
    let copy = scratch.join("tasks");
    let src = format!("{id}:{TASKS}");
    std::fs::write(&stop, b"").unwrap();
    let dst = format!("{id}:/tmp/stop");
    let t = Instant::now();
    loop {
        let _ = kiln_within(
            k,
            &["sandbox", "cp", stop.to_str().unwrap(), &dst],
            Duration::from_secs(5),
        );
        let args = ["sandbox", "cp", &src, copy.to_str().unwrap()];
        let n = kiln_within(k, &args, Duration::from_secs(5))
            .filter(|(_, code)| *code == 0)
            .and_then(|_| std::fs::read_to_string(&copy).ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if n.is_some_and(|n| n == 0) {
            return;
        }
        let rec = k.json(["sandbox", "info", id, "--json"]);
        if rec["state"] != "running" {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the bomb outlived 60 s after it was told to stop: {n:?} tasks"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A bombed sandbox either runs whole (it answers) or says it ran out of memory; kill then
/// leaves nothing of it.
fn whole_or_out_of_memory_then_killed(k: &kiln_tests::Kiln, id: &str) {
    let rec = k.json(["sandbox", "info", id, "--json"]);
    if rec["state"] == "running" {
        assert_eq!(sh(k, id, "echo ok"), "ok\n");
    } else {
        let text = rec.to_string();
        assert!(
            text.contains("out of memory (limit 512 MiB)"),
            "a bombed sandbox that is not running must say why: {rec}"
        );
    }
    k.ok(["sandbox", "kill", id]);
    assert!(!memory_cgroup(id).exists(), "kill left the cgroup of {id}");
    kiln_tests::sandbox::assert_no_processes(id);
}

/// A shell fork bomb that stops forking once /tmp/stop exists (put there by the agent, which
/// needs no new process): then its shells end by themselves.
const BOMB: &str = "b() { [ -e /tmp/stop ] || { b | b & }; }; b";

/// A fork bomb is bounded: the tasks inside never pass the sandbox's task limit (with the
/// agent's room in the per-user limit), the host's memory and pid limits of the sandbox are in
/// place, and a neighbour keeps counting. On runsc 20240729/systrap the bomb's churn grows the
/// sentry's own host memory (every address space gVisor ever made keeps a host stub process,
/// pooled, never freed: measured 3 GB and 6,600 host tasks with the backstop lifted) until the
/// backstop ends the sandbox, which then says so (`failed: out of memory`); where it survives,
/// it is whole again once the bomb is told to stop. Either way, kill leaves nothing.
#[test]
fn a_fork_bomb_is_bounded_and_its_neighbour_keeps_counting() {
    let Some((tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let b = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    sh(&k, &b, COUNTER_LOOP);
    assert!(
        counts_past(&k, &b, 0),
        "the neighbour's counter never started"
    );
    let (out, err, _) = exec(
        &k,
        &id,
        &["--user", "root"],
        &["cat", "/sys/fs/cgroup/pids/kiln-work/pids.max"],
        b"",
    );
    let limit = limits::tasks_inside(512);
    assert_eq!(out.trim(), limit.to_string(), "{err}");
    let host_limit: u64 =
        std::fs::read_to_string(memory_cgroup(&id).join(match limits::version() {
            limits::Version::V2 => "memory.max",
            limits::Version::V1 => "memory.limit_in_bytes",
        }))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(host_limit, limits::backstop_bytes(512));
    // The per-user limit is set, and no process may raise it.
    let (out, _, _) = exec(
        &k,
        &id,
        &[],
        &["sh", "-c", "ulimit -u; ulimit -u 100000"],
        b"",
    );
    assert_eq!(
        out.lines().next(),
        Some(
            (limit + kiln_agent::limits::AGENT_TASKS)
                .to_string()
                .as_str()
        ),
        "{out}"
    );

    sh(&k, &id, &format!("({BOMB}) >/dev/null 2>&1 &"));
    let before = count(&k, &b);
    // gVisor checks a clone against the user's RLIMIT_NPROC every time (its pids.max only
    // now and then, see kiln_agent::limits).
    let peak = peak_tasks(
        &k,
        &id,
        tmp.path(),
        8,
        limit + kiln_agent::limits::AGENT_TASKS,
    );
    assert!(
        counts_past(&k, &b, before),
        "the neighbour stopped counting during the bomb"
    );
    let rec = k.json(["sandbox", "info", &id, "--json"]);
    eprintln!(
        "fork bomb: at most {peak} tasks seen (limit {limit}); then {}",
        rec["state"]
    );
    if rec["state"] == "running" {
        stop_bombs(&k, &id, tmp.path());
    }
    whole_or_out_of_memory_then_killed(&k, &id);
}

#[test]
fn two_busy_sandboxes_of_one_cpu_each_share_fairly_and_stay_within_it() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let rec = create(&k, &["app", "--cpus", "1"]);
        ids.push(rec["id"].as_str().unwrap().to_string());
    }
    let usage = |id: &str| limits::cpu_usage_ns(id).expect("the sandbox's CPU usage");
    // What an idle sandbox costs (the agent's OOM killer polls every 50 ms): printed, not
    // asserted (performance numbers belong in benches).
    let (i0, t) = (usage(&ids[0]), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let idle = (usage(&ids[0]) - i0) as f64 / t.elapsed().as_nanos() as f64;
    eprintln!("an idle sandbox used {:.4} CPUs", idle);
    // Two busy loops each: either could take both cores without its quota.
    for id in &ids {
        sh(
            &k,
            id,
            "(while :; do :; done) >/dev/null 2>&1 & (while :; do :; done) >/dev/null 2>&1 &",
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let u0: Vec<u64> = ids.iter().map(|id| usage(id)).collect();
    std::thread::sleep(Duration::from_secs(5));
    let u1: Vec<u64> = ids.iter().map(|id| usage(id)).collect();
    let wall = t0.elapsed().as_nanos() as f64;
    let used: Vec<f64> = u0
        .iter()
        .zip(&u1)
        .map(|(a, b)| (b - a) as f64 / wall)
        .collect();
    eprintln!("cpus used over {:.1} s: {used:?}", wall / 1e9);
    for u in &used {
        assert!(*u < 1.3, "a sandbox of one CPU used {u:.2} CPUs");
    }
    let ratio = used[0].max(used[1]) / used[0].min(used[1]).max(1e-3);
    assert!(ratio < 2.5, "unfair share: {used:?}");
}

#[test]
fn a_sandbox_ended_by_the_hosts_backstop_says_out_of_memory_with_its_limit() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let rec = create(&k, &["app", "--memory", "256"]);
    let id = rec["id"].as_str().unwrap().to_string();
    // The agent acts at 256 MiB; an allocation faster than its polling is what the backstop
    // is for. Made certain here: the backstop is lowered to just above what the sandbox
    // holds now, and a 192 MiB allocation (below the agent's limit) crosses it.
    let cg = memory_cgroup(&id);
    let (usage_file, limit_file) = match limits::version() {
        limits::Version::V2 => ("memory.current", "memory.max"),
        limits::Version::V1 => ("memory.usage_in_bytes", "memory.limit_in_bytes"),
    };
    let usage: u64 = std::fs::read_to_string(cg.join(usage_file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::write(cg.join(limit_file), (usage + (16 << 20)).to_string()).unwrap();
    let (_, err, code) = exec(
        &k,
        &id,
        &[],
        &[
            "busybox",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=192M",
            "count=4",
        ],
        b"",
    );
    eprintln!("dd: {code} {err}");
    let t = Instant::now();
    let rec = loop {
        let rec = k.json(["sandbox", "info", &id, "--json"]);
        if rec["state"] != "running" || t.elapsed() > Duration::from_secs(20) {
            break rec;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
    let events = std::fs::read_to_string(cg.join(match limits::version() {
        limits::Version::V2 => "memory.events",
        limits::Version::V1 => "memory.oom_control",
    }))
    .unwrap_or_default();
    assert_eq!(
        rec["state"], "failed",
        "{rec}\nleft in the cgroup: {procs:?}\n{events}\nusage before: {usage}"
    );
    let cause = rec["cause"].as_str().unwrap_or_default();
    assert!(
        cause.starts_with("out of memory (limit 256 MiB)"),
        "cause: {cause}"
    );
    let text = k.ok_str(["sandbox", "info", &id]);
    assert!(text.contains("out of memory (limit 256 MiB)"), "{text}");
    k.ok(["sandbox", "kill", &id]);
    assert!(!cg.exists(), "kill left the cgroup of {id}");
}

#[test]
fn silly_sizes_are_refused() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let err = k.fails(["sandbox", "create", "app", "--cpus", "0"]);
    assert!(err.contains("cpus"), "{err}");
    let err = k.fails(["sandbox", "create", "app", "--memory", "1"]);
    assert!(err.contains("memory"), "{err}");
    // Huge ones are lowered to what this host has.
    let rec = create(&k, &["app", "--cpus", "4096", "--memory", "999999999"]);
    let host_cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert!(rec["cpus"].as_u64().unwrap() <= host_cpus, "{rec}");
    assert!(rec["memory_mib"].as_u64().unwrap() < 999999999, "{rec}");
}
