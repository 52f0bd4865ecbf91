//! A sandbox is hostile: a root process inside a gVisor sandbox attacks what it shares with the
//! host (real runsc, the real kiln binary, the static agent as init). It races symlinks into
//! its writable `/run/kiln` (a host directory) at host canaries while kiln pauses, resumes,
//! snapshots and forks it; it floods every path it shares with the host; it points its agent
//! socket's name at another sandbox's socket. Host files stay untouched, host-side bytes stay
//! bounded, kiln never talks to the other sandbox, and no mount outlives a sandbox.

use kiln_tests::sandbox::{app_home, assert_no_processes, create, exec, ids, sh, KillAll};
use kiln_tests::Kiln;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A command as root in the sandbox; must succeed.
fn root_sh(k: &Kiln, id: &str, script: &str) -> String {
    let (out, err, code) = exec(k, id, &["--user", "root"], &["sh", "-c", script], b"");
    assert_eq!(code, 0, "sh -c {script:?} in {id}: {err}");
    out
}

/// Mount points (from this process's mountinfo) at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir))
        .map(String::from)
        .collect()
}

/// Every path below `dir` (not following symlinks) with its size and mtime.
fn tree(dir: &Path) -> Vec<(PathBuf, u64, i64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((
                e.path(),
                m.len(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000,
            ));
        }
    }
    out.sort();
    out
}

/// Bytes the files below `dir` take on disk (allocated blocks; symlinks not followed).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                todo.push(e.path());
            }
            total += m.blocks() * 512;
        }
    }
    total
}

/// A Unix socket on the host that counts the connections it gets.
struct CanarySocket {
    path: PathBuf,
    hits: Arc<AtomicUsize>,
}

impl CanarySocket {
    fn bind(path: PathBuf) -> CanarySocket {
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if c.is_ok() {
                    h.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        CanarySocket { path, hits }
    }
}

/// The sandbox's host directory and the host path of its agent's socket.
fn sandbox_dir(k: &Kiln, id: &str) -> PathBuf {
    k.home.join("sandboxes").join(id)
}

#[test]
fn symlinks_raced_into_the_shared_dir_never_reach_host_files() {
    let Some((tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let canaries = tmp.path().join("canaries");
    std::fs::create_dir(&canaries).unwrap();
    let file = canaries.join("file");
    std::fs::write(&file, b"host canary: must keep these bytes\n").unwrap();
    let sock = CanarySocket::bind(canaries.join("sock"));
    let missing = canaries.join("must-not-appear");
    let before = tree(&canaries);

    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    sh(&k, &id, "echo kept > /work/state");
    // Every name the host might touch in /run/kiln (and in the read-only control dir), pointed
    // at each canary in turn, as fast as the shell goes: replaced where the name exists, taken
    // the moment it is free for the agent's own socket (replacing a live socket would only cut
    // the sandbox off from its own agent; the cross-sandbox test does that).
    let targets = format!(
        "{} {} {} ../../../../../../../..{}",
        file.display(),
        sock.path.display(),
        missing.display(),
        file.display()
    );
    root_sh(
        &k,
        &id,
        &format!(
            "(while :; do for t in {targets}; do \
               for n in resume generation .generation.tmp agent.sock.tmp ckpt console.log; do \
                 ln -sfn $t /run/kiln/$n; done; \
               ln -s $t /run/kiln/agent.sock; ln -sfn $t /.kiln/ctl/resume; \
             done; done) >/dev/null 2>&1 & echo $! > /tmp/attacker.pid"
        ),
    );
    // The loop starts in the background: waited for (bounded; slow on a loaded host).
    let t = Instant::now();
    while root_sh(&k, &id, "ls -l /run/kiln | grep -c -- '->' || true")
        .trim()
        .parse::<u32>()
        .unwrap_or(0)
        == 0
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the attacker made no symlink"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Pause/resume (checkpoint, restore in place) and fork (live checkpoint, restore in place
    // and into a new sandbox), round after round, while the attacker runs in every copy.
    let t = Instant::now();
    let mut rounds = 0;
    while rounds < 30 && t.elapsed() < Duration::from_secs(75) {
        if rounds % 2 == 0 {
            k.ok(["sandbox", "pause", &id]);
            k.ok(["sandbox", "resume", &id]);
        } else {
            let forks = k.json(["sandbox", "fork", &id, "-n", "1", "--json"]);
            let f = forks[0]["id"].as_str().unwrap().to_string();
            assert_eq!(sh(&k, &f, "cat /work/state"), "kept\n");
            k.ok(["sandbox", "kill", &f]);
        }
        rounds += 1;
    }
    assert!(rounds >= 10, "only {rounds} rounds in {:?}", t.elapsed());
    eprintln!("{rounds} rounds in {:?}", t.elapsed());

    assert_eq!(tree(&canaries), before, "a host canary changed or appeared");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"host canary: must keep these bytes\n"
    );
    assert!(!missing.exists());
    assert_eq!(
        sock.hits.load(Ordering::SeqCst),
        0,
        "kiln connected to the canary socket"
    );
    // The control directory holds only what the host wrote there.
    for e in std::fs::read_dir(sandbox_dir(&k, &id).join("ctl"))
        .unwrap()
        .flatten()
    {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        assert!(
            m.is_file(),
            "{} in ctl/ is no host file",
            e.path().display()
        );
    }
    // The sandbox works on, with its memory and files.
    root_sh(&k, &id, "kill $(cat /tmp/attacker.pid)");
    assert_eq!(sh(&k, &id, "cat /work/state"), "kept\n");
    k.ok(["sandbox", "pause", &id]);
    k.ok(["sandbox", "resume", &id]);
    assert_eq!(sh(&k, &id, "echo ok"), "ok\n");
    k.ok(["sandbox", "kill", &id]);
    assert_no_processes(&id);
    assert!(ids(&k).is_empty());
    assert_eq!(mounts_under(&k.home), Vec::<String>::new(), "mounts left");
}

#[test]
fn floods_into_every_shared_path_stay_small_on_the_host() {
    let Some((tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let dir = sandbox_dir(&k, &id);
    let baseline = disk_usage(&dir);

    // 256 MiB into /run/kiln (big files, then many small ones): ENOSPC early.
    let (_, _, code) = exec(
        &k,
        &id,
        &["--user", "root"],
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/run/kiln/flood bs=1M count=256; \
             i=0; while [ $i -lt 2000 ]; do echo x > /run/kiln/f$i || break; i=$((i+1)); done; \
             mkdir -p /run/kiln/d && dd if=/dev/zero of=/run/kiln/d/more bs=1M count=64",
        ],
        b"",
    );
    assert_ne!(code, 0, "256 MiB fit into /run/kiln");
    // 64 MiB into the init's stdout and stderr (the host's console log, before the fix).
    root_sh(
        &k,
        &id,
        "dd if=/dev/zero of=/proc/1/fd/1 bs=1M count=32 2>/dev/null; \
         dd if=/dev/zero of=/proc/1/fd/2 bs=1M count=32 2>/dev/null; true",
    );
    // 16 MiB through the files API (what E2B's /files serves) into /run/kiln.
    let big = tmp.path().join("big");
    std::fs::write(&big, kiln_tests::pseudo_random(16 << 20, 7)).unwrap();
    let out = k.run([
        "sandbox",
        "cp",
        big.to_str().unwrap(),
        &format!("{id}:/run/kiln/big"),
    ]);
    assert!(!out.status.success(), "16 MiB fit into /run/kiln");

    let grown = disk_usage(&dir).saturating_sub(baseline);
    let console = std::fs::metadata(dir.join("console.log")).map_or(0, |m| m.len());
    eprintln!(
        "host bytes: +{grown} in {}, console.log {console}",
        dir.display()
    );
    assert!(
        grown <= 1 << 20,
        "the sandbox's host directory grew by {grown} bytes"
    );
    assert!(console <= 64 << 10, "console.log holds {console} bytes");

    // The sandbox keeps working, and its next run gets an empty /run/kiln again.
    assert_eq!(sh(&k, &id, "echo ok"), "ok\n");
    k.ok([
        "sandbox",
        "cp",
        big.to_str().unwrap(),
        &format!("{id}:/work/big"),
    ]);
    assert_eq!(
        sh(&k, &id, "wc -c < /work/big").trim(),
        (16 << 20).to_string()
    );
    k.ok(["sandbox", "pause", &id]);
    k.ok(["sandbox", "resume", &id]);
    assert_eq!(
        root_sh(&k, &id, "ls /run/kiln | grep -c '^f' || true").trim(),
        "0",
        "a flood outlived the restore"
    );
    k.ok(["sandbox", "kill", &id]);
    assert_eq!(mounts_under(&k.home), Vec::<String>::new(), "mounts left");
}

#[test]
fn a_socket_name_pointed_at_another_sandbox_never_reaches_it() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let a = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let b = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    sh(&k, &a, "echo A > /work/who");
    sh(&k, &b, "echo B > /work/who");
    let b_sock = sandbox_dir(&k, &b).join("run/agent.sock");
    assert!(b_sock.exists());
    let b_gen = k.json(["sandbox", "info", &b, "--json"])["generation"].clone();

    // A root process in A swaps its socket's name for symlinks to B's socket (absolute,
    // relative through the host's tree, through /proc), each for a while, twice over: A cuts
    // itself off from its own agent, and must reach nothing else.
    let targets = [
        b_sock.display().to_string(),
        format!("../../{b}/run/agent.sock"),
        format!("/proc/self/root{}", b_sock.display()),
    ]
    .join(" ");
    root_sh(
        &k,
        &a,
        &format!(
            "(for r in 1 2; do for t in {targets}; do \
               ln -sfn $t /run/kiln/agent.sock.new && mv -f /run/kiln/agent.sock.new /run/kiln/agent.sock; \
               sleep 1.5; done; done) >/dev/null 2>&1 &"
        ),
    );
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut tries = 0;
    while t.elapsed() < Duration::from_secs(9) {
        let (out, err, code) = exec(&k, &a, &[], &["cat", "/work/who"], b"");
        assert_ne!(
            out, "B\n",
            "kiln ran a command of sandbox {a} in sandbox {b}"
        );
        if tries > 0 {
            assert_ne!(
                code, 0,
                "exec in {a} through a swapped socket name: {out}{err}"
            );
        }
        // A pause of A must not quiesce B.
        let _ = k.run(["sandbox", "pause", &a]);
        assert_eq!(sh(&k, &b, "cat /work/who"), "B\n");
        tries += 1;
    }
    let rec = k.json(["sandbox", "info", &b, "--json"]);
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(
        rec["generation"], b_gen,
        "sandbox {b} was checkpointed: {rec}"
    );
    k.ok(["sandbox", "kill", &a]);
    assert_no_processes(&a);
    assert_eq!(sh(&k, &b, "echo ok"), "ok\n");
    k.ok(["sandbox", "kill", &b]);
    assert_eq!(mounts_under(&k.home), Vec::<String>::new(), "mounts left");
}

#[test]
fn creates_killed_at_any_moment_leave_no_mount() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    for delay_ms in [20u64, 100, 250, 500, 900, 1500] {
        let mut child = k.cmd(["sandbox", "create", "app"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // Listing reconciles: a killed create leaves nothing, a finished one runs.
        for id in ids(&k) {
            k.ok(["sandbox", "kill", &id]);
        }
        assert_eq!(
            mounts_under(&k.home),
            Vec::<String>::new(),
            "mounts left after a create killed at {delay_ms} ms"
        );
    }
}

/// The agent gets `CAP_SYS_ADMIN` only to mount its own `/proc` (a small dentry cache); it
/// drops it from every set before it starts anything, so neither it nor any process of the
/// sandbox has it, and root inside cannot mount.
#[test]
fn no_process_inside_has_cap_sys_admin_or_sys_resource() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let caps = root_sh(
        &k,
        &id,
        "grep -H -E '^Cap(Bnd|Eff|Prm|Inh)' /proc/1/status /proc/self/status",
    );
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_SYS_RESOURCE: u64 = 1 << 24;
    const CAP_CHOWN: u64 = 1;
    let mut seen = 0;
    for line in caps.lines() {
        let hex = line.rsplit('\t').next().unwrap_or_default().trim();
        let mask = u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("{line:?}"));
        assert_eq!(mask & CAP_SYS_ADMIN, 0, "{line}");
        // The agent (PID 1) alone keeps CAP_SYS_RESOURCE, in its effective and permitted sets.
        let agent_keeps =
            line.starts_with("/proc/1/") && !line.contains("CapBnd") && !line.contains("CapInh");
        assert_eq!(mask & CAP_SYS_RESOURCE != 0, agent_keeps, "{line}");
        if line.contains("CapBnd") {
            // Docker's default set is still there.
            assert_ne!(mask & CAP_CHOWN, 0, "{line}");
        }
        seen += 1;
    }
    assert_eq!(seen, 8, "{caps}");
    let (_, err, code) = exec(
        &k,
        &id,
        &["--user", "root"],
        &["sh", "-c", "mkdir -p /mnt/x && mount -t tmpfs t /mnt/x"],
        b"",
    );
    assert_ne!(code, 0, "root mounted a tmpfs inside: {err}");
    let mounts = root_sh(&k, &id, "grep ' /proc proc ' /proc/mounts");
    assert!(
        mounts
            .lines()
            .last()
            .is_some_and(|l| l.contains("dentry_cache_limit=8")),
        "{mounts}"
    );
    // After a pause and resume (the checkpoint carries the dropped capabilities).
    k.ok(["sandbox", "pause", &id]);
    k.ok(["sandbox", "resume", &id]);
    let caps = root_sh(&k, &id, "grep -E '^CapBnd' /proc/self/status");
    let hex = caps.rsplit('\t').next().unwrap_or_default().trim();
    let mask = u64::from_str_radix(hex, 16).unwrap();
    assert_eq!(mask & (CAP_SYS_ADMIN | CAP_SYS_RESOURCE), 0, "{caps}");
}

/// gVisor's cgroupfs files belong to root, so root inside could raise the task limit or make
/// cgroups the agent's task watch does not count; the agent makes the cgroupfs read-only
/// before it gives up `CAP_SYS_ADMIN`. Also after a pause and resume. (Moving itself into the
/// agent's cgroup through `/proc/1/fd` stays possible, and is counted:
/// `sandbox_limits::a_root_fork_bomb_spread_over_many_users_is_trimmed_by_the_agent`.)
#[test]
fn root_inside_can_neither_raise_the_task_limit_nor_make_cgroups() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let work = "/sys/fs/cgroup/pids/kiln-work";
    let limit = root_sh(&k, &id, &format!("cat {work}/pids.max"));
    let attempts = [
        format!("echo 1000000 > {work}/pids.max"),
        format!("mkdir {work}/escape"),
        "mkdir /sys/fs/cgroup/pids/escape".to_string(),
        "echo $$ > /sys/fs/cgroup/pids/cgroup.procs".to_string(),
        "mount -o remount,rw /sys/fs/cgroup/pids".to_string(),
        "mount -o remount,rw /sys/fs/cgroup".to_string(),
        "umount -l /sys/fs/cgroup/pids".to_string(),
    ];
    for round in ["fresh", "resumed"] {
        for a in &attempts {
            let (out, err, code) = exec(&k, &id, &["--user", "root"], &["sh", "-c", a], b"");
            assert_ne!(code, 0, "{round}: root inside did `{a}`: {out}{err}");
        }
        let state = root_sh(
            &k,
            &id,
            &format!("grep pids /proc/self/cgroup; cat {work}/pids.max"),
        );
        assert!(state.contains("kiln-work"), "{round}: {state}");
        assert!(state.trim_end().ends_with(limit.trim()), "{round}: {state}");
        k.ok(["sandbox", "pause", &id]);
        k.ok(["sandbox", "resume", &id]);
    }
}
