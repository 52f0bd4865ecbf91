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

    // 320 MiB of strings, 1 MiB at a time (anonymous memory, written page by page as programs
    // do), then a report: past the sandbox's 256 MiB but under the backstop's 384, which
    // gVisor itself enforces by refusing the allocation (a string that doubles to twice the
    // memory fails that way, with or without the agent), so only the agent's watch stops it.
    let before = count(&k, &b);
    let t = Instant::now();
    let (out, err, code) = exec(
        &k,
        &a,
        &[],
        &[
            "busybox",
            "awk",
            "BEGIN { s = sprintf(\"%1048576s\", \"\"); for (i = 0; i < 320; i++) a[i] = s i; \
             print \"done\" }",
        ],
        b"",
    );
    eprintln!(
        "allocating past the memory: exit {code} after {:?}: {err}",
        t.elapsed()
    );
    assert!(
        code == 128 + libc::SIGKILL && !out.contains("done"),
        "awk past the sandbox's memory was not killed (exit {code}): {out} {err}"
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

/// The agent's memory watch sleeps while the agent has no child (nothing else runs then), so
/// it must not be fooled by a process the agent never started itself: an orphan it adopted
/// after the command that started it returned. Such an orphan that allocates past the
/// sandbox's memory is killed inside, and the sandbox lives on.
#[test]
fn an_orphan_past_its_memory_dies_inside_after_its_command_returned() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let a = create(&k, &["app", "--memory", "256"]);
    let a = a["id"].as_str().unwrap().to_string();
    // The shell returns at once; its subshell (then awk, same pid) is orphaned, waits until
    // the reaper has seen the agent without a command, then takes 320 MiB, 1 MiB at a time,
    // and holds it: past the sandbox's 256 MiB, under what gVisor itself would refuse (the
    // backstop's 384), so only the agent's watch stops it.
    let pid = sh(
        &k,
        &a,
        "(busybox sleep 2; exec busybox awk 'BEGIN { s = sprintf(\"%1048576s\", \"\"); \
         for (i = 0; i < 320; i++) a[i] = s i; print \"done\"; system(\"busybox sleep 30\") }' \
         > /tmp/orphan.out 2>&1) & echo $!",
    );
    let pid = pid.trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "no pid: {pid:?}");
    let t = Instant::now();
    let alive = |k: &kiln_tests::Kiln| {
        sh(
            k,
            &a,
            &format!("kill -0 {pid} 2>/dev/null && echo alive || true"),
        )
        .contains("alive")
    };
    // Seen alive after its command returned (the case under test), then gone.
    assert!(alive(&k), "the orphan did not outlive its command");
    let gone = loop {
        std::thread::sleep(Duration::from_millis(300));
        let rec = k.json(["sandbox", "info", &a, "--json"]);
        assert_eq!(
            rec["state"], "running",
            "the backstop ended the sandbox: {rec}"
        );
        if !alive(&k) {
            break true;
        }
        if t.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    eprintln!("the orphan was gone after {:?}", t.elapsed());
    assert!(gone, "the orphan still runs after {:?}", t.elapsed());
    let out = sh(&k, &a, "cat /tmp/orphan.out; echo");
    assert!(!out.contains("done"), "the orphan got its memory: {out}");
    assert_eq!(sh(&k, &a, "echo ok"), "ok\n");
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

/// The task counts of the cgroups a process of the sandbox can be in (`kiln-work`, and the
/// agent's, which root can move itself into), as the agent itself reads them (`cp` starts no
/// process: under a bomb, no new process may start). gVisor counts a cgroup's own tasks only.
const TASKS: [&str; 2] = [
    "/sys/fs/cgroup/pids/kiln-work/pids.current",
    "/sys/fs/cgroup/pids/pids.current",
];

/// The tasks of `id`'s processes in each of [`TASKS`] (the agent's threads are in the
/// second), or None if a count could not be read in time.
fn tasks_in(k: &kiln_tests::Kiln, id: &str, scratch: &Path) -> Option<[u64; 2]> {
    let copy = scratch.join("tasks");
    let mut counts = [0; 2];
    for (f, n) in TASKS.iter().zip(&mut counts) {
        let src = format!("{id}:{f}");
        let args = ["sandbox", "cp", &src, copy.to_str().unwrap()];
        kiln_within(k, &args, Duration::from_secs(3)).filter(|(_, code)| *code == 0)?;
        *n = std::fs::read_to_string(&copy)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()?;
    }
    Some(counts)
}

/// All the tasks of `id`'s processes, the agent's threads included.
fn tasks_now(k: &kiln_tests::Kiln, id: &str, scratch: &Path) -> Option<u64> {
    tasks_in(k, id, scratch).map(|[work, agents]| work + agents)
}

/// What [`peak_tasks`] saw: the largest sum, the largest count in the agent's cgroup, and
/// every sum in order.
struct TaskSamples {
    peak: u64,
    agents_peak: u64,
    sums: Vec<u64>,
}

/// Samples `id`'s task counts for `secs` seconds, asserting each sample's sum is at most
/// `bound`.
fn peak_tasks(
    k: &kiln_tests::Kiln,
    id: &str,
    scratch: &Path,
    secs: u64,
    bound: u64,
) -> TaskSamples {
    let t = Instant::now();
    let mut sums = Vec::new();
    let mut agents_peak = 0;
    while t.elapsed() < Duration::from_secs(secs) {
        if let Some([work, agents]) = tasks_in(k, id, scratch) {
            let n = work + agents;
            assert!(n <= bound, "{n} tasks, past the bound of {bound}: {sums:?}");
            sums.push(n);
            agents_peak = agents_peak.max(agents);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let peak = sums.iter().copied().max().unwrap_or(0);
    assert!(peak > 0, "the task count was never read during the bomb");
    TaskSamples {
        peak,
        agents_peak,
        sums,
    }
}

/// Tells the bombs in `id` to stop (they look for /tmp/stop) and waits (bounded) until no
/// task is left in `kiln-work`, or the sandbox is no longer running.
fn stop_bombs(k: &kiln_tests::Kiln, id: &str, scratch: &Path) {
    let stop = scratch.join("stop");
    std::fs::write(&stop, b"").unwrap();
    let dst = format!("{id}:/tmp/stop");
    let t = Instant::now();
    loop {
        let _ = kiln_within(
            k,
            &["sandbox", "cp", stop.to_str().unwrap(), &dst],
            Duration::from_secs(5),
        );
        // The agent's own threads stay (at most AGENT_TASKS).
        let n = tasks_now(k, id, scratch);
        if n.is_some_and(|n| n <= kiln_agent::limits::AGENT_TASKS) {
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
    // The user's budget, and the agent's own threads beside it.
    let peak = peak_tasks(
        &k,
        &id,
        tmp.path(),
        8,
        limit + 2 * kiln_agent::limits::AGENT_TASKS,
    )
    .peak;
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

/// A bomb whose every process forks again and again (until /tmp/stop exists), so its
/// count presses on every limit for as long as it runs.
const LOOPING_BOMB: &str = "b() { while [ ! -e /tmp/stop ]; do b & done; }; b";

/// Root spreads a fork bomb over many users, each with a per-user budget of its own, half of
/// them moved out of the task-limited cgroup into the agent's (through the agent's open
/// cgroup files in `/proc/1/fd`): the agent's task watch counts both cgroups and trims the
/// newest processes once they hold half as many tasks again as the limit, so the count stays
/// near that, and the sandbox answers.
#[test]
fn a_root_fork_bomb_spread_over_many_users_is_trimmed_by_the_agent() {
    let Some((tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let limit = limits::tasks_inside(512);
    // The even users' bombs start first, from shells that moved into the agent's cgroup
    // through its open `tasks` file (found once, before any bomb: under one, a `readlink`
    // may not get to fork).
    let users = (2002..2010).step_by(2).chain((2001..2009).step_by(2));
    let bombs: String = users
        .map(|u| {
            let escape = match u % 2 {
                0 => "echo 0 > $tasks; ",
                _ => "",
            };
            format!(
                "echo b{u}:x:{u}:{u}::/tmp:/bin/sh >>/etc/passwd; \
                 ({escape}busybox su -s /bin/sh b{u} -c '{LOOPING_BOMB}') & "
            )
        })
        .collect();
    let find_tasks = "for f in /proc/1/fd/*; do \
                      [ \"$(readlink $f)\" = /tasks ] && tasks=$f; done; ";
    // The way out works: a shell that takes it is in the agent's cgroup.
    let probe = format!("{find_tasks}(echo 0 > $tasks; grep pids /proc/self/cgroup)");
    let (moved, err, _) = exec(&k, &id, &["--user", "root"], &["sh", "-c", &probe], b"");
    assert!(
        moved.trim_end().ends_with(&format!("pids:/{id}")),
        "{moved}{err}"
    );
    let agents_idle = tasks_in(&k, &id, tmp.path()).expect("the task counts")[1];
    let (_, err, code) = exec(
        &k,
        &id,
        &["--user", "root"],
        &[
            "sh",
            "-c",
            &format!("{find_tasks}({bombs}) >/dev/null 2>&1 &"),
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    // Eight users of limit + 64 each could hold over 2,500 tasks. The watch is not a hard
    // bound: it looks every 5 ms once the count nears the limit, but inside gVisor it is one
    // runnable task among the bomb's hundreds, so its looks come later the larger the bomb.
    // Measured under load 6-8: peaks of 97-589 for a threshold of 448 (with the agent's room).
    // What it must do: keep the count from running away, and bring it back down.
    let threshold =
        kiln_agent::limits::task_kill_threshold(limit) + kiln_agent::limits::AGENT_TASKS;
    let bound = 3 * limit + kiln_agent::limits::AGENT_TASKS;
    let seen = peak_tasks(&k, &id, tmp.path(), 8, bound);
    eprintln!(
        "root's bomb over 8 users: at most {} tasks seen, {} in the agent's cgroup (limit \
         {limit}): {:?}",
        seen.peak, seen.agents_peak, seen.sums
    );
    assert!(
        seen.agents_peak > agents_idle,
        "no bomb was seen outside kiln-work ({agents_idle} tasks there before the bombs): \
         the test tests less than it says"
    );
    if seen.sums.iter().any(|n| *n > threshold) {
        // Under load one sample can take seconds, so the window may close just past a peak:
        // the count must come back under the threshold while the bombs keep forking.
        // Or the bomb's churn reached the memory backstop, which ended the sandbox (the
        // other documented outcome: checked below with the cause it must give).
        let mut sums = seen.sums.clone();
        let t = Instant::now();
        let ended =
            |k: &kiln_tests::Kiln| k.json(["sandbox", "info", &id, "--json"])["state"] != "running";
        while sums.last().is_some_and(|n| *n > threshold)
            && t.elapsed() < Duration::from_secs(30)
            && !ended(&k)
        {
            std::thread::sleep(Duration::from_millis(300));
            if let Some(n) = tasks_now(&k, &id, tmp.path()) {
                assert!(n <= bound, "{n} tasks, past the bound of {bound}: {sums:?}");
                sums.push(n);
            }
        }
        eprintln!("past the threshold of {threshold}, then: {sums:?}");
        let over = sums.iter().position(|n| *n > threshold).unwrap();
        assert!(
            sums[over..].iter().any(|n| *n <= threshold) || ended(&k),
            "past the threshold of {threshold}, not brought back within 30 s, and the \
             sandbox still runs: {sums:?}"
        );
    }
    let rec = k.json(["sandbox", "info", &id, "--json"]);
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
