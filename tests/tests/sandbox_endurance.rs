//! Endurance of a gVisor sandbox (real runsc through the `kiln` CLI, the static agent as its
//! init): finished commands leave nothing behind in the agent, a checkpoint does not grow with
//! the commands a sandbox ran, and pause/resume does not slow down
//! with a sandbox's history (after a long run, no slower than twice a fresh sandbox that ran
//! as many commands, timed alternately).
//!
//! `KILN_ENDURANCE_CYCLES` sets the pause/resume cycle count (default [`DEFAULT_CYCLES`]).

use kiln_tests::sandbox::{app_home, create, sh, KillAll};
use kiln_tests::Kiln;
use std::time::{Duration, Instant};

/// Pause/resume cycles of the endurance test unless `KILN_ENDURANCE_CYCLES` says otherwise: a
/// short soak for CI; the full one is `KILN_ENDURANCE_CYCLES=200`.
const DEFAULT_CYCLES: usize = 30;
/// Cycles whose median is compared at each end of the run.
const ENDS: usize = 5;

/// The agent (PID 1 of the sandbox) as /proc inside the sandbox shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AgentStats {
    vm_data_kib: u64,
    vm_rss_kib: u64,
    threads: u64,
    fds: u64,
}

fn agent_stats(k: &Kiln, id: &str) -> AgentStats {
    let out = sh(
        k,
        id,
        "grep -E '^(VmData|VmRSS):' /proc/1/status; ls /proc/1/task | wc -l; ls /proc/1/fd | wc -l",
    );
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {out:?}"))
    };
    let counts: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(counts.len(), 2, "{out:?}");
    AgentStats {
        vm_data_kib: field("VmData:"),
        vm_rss_kib: field("VmRSS:"),
        threads: counts[0],
        fds: counts[1],
    }
}

/// Pauses `id`: how long `kiln sandbox pause` took and the size of the stored checkpoint.
fn pause(k: &Kiln, id: &str) -> (Duration, u64) {
    let t = Instant::now();
    let out = k.cmd(["sandbox", "pause", id, "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "pause failed: {}\nthe sandbox then: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&k.cmd(["sandbox", "info", id]).output().unwrap().stdout)
    );
    let paused: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let took = t.elapsed();
    assert_eq!(paused["state"], "paused", "{paused}");
    let snap = paused["state_detail"]["saved"]
        .as_str()
        .or_else(|| paused["saved"].as_str())
        .unwrap_or_else(|| panic!("no snapshot id in {paused}"))
        .to_string();
    let rec: serde_json::Value = serde_json::from_slice(&k.ok(["store", "cat", &snap])).unwrap();
    // Every file of the checkpoint, whatever its format.
    let blobs = rec["checkpoint"]["blobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no checkpoint blobs in {rec}"));
    let bytes = blobs
        .iter()
        .map(|b| {
            let b = b.as_str().expect("blob id");
            k.json(["store", "stat", b, "--json"])["size"]
                .as_u64()
                .unwrap()
        })
        .sum();
    (took, bytes)
}

/// Runs `true` `n` times in the sandbox of record `rec`, as `kiln sandbox exec` does, straight
/// on the agent's socket (a CLI process per command would take most of the time).
fn run_true(rec: &serde_json::Value, n: usize) {
    use kiln_agent::{client, protocol::ExecRequest};
    let sock = rec["agent"].as_str().expect("agent socket");
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..ExecRequest::default()
    };
    for i in 0..n {
        let mut s = std::os::unix::net::UnixStream::connect(sock)
            .unwrap_or_else(|e| panic!("command {i}: connecting to {sock}: {e}"));
        let out = client::exec(&mut s, &req, b"", |_, _| {})
            .unwrap_or_else(|e| panic!("command {i}: {e}"));
        assert_eq!(out.status.code, Some(0), "command {i}");
    }
}

/// Commands run before the first measurement: the allocator's arenas and glibc's cache of
/// thread stacks reach their working size (bounded, but how far depends on how the host
/// scheduled the agent's short-lived threads).
const WARM_UP: usize = 300;
/// Commands between the two measurements.
const MEASURED: usize = 1000;

/// Runs [`WARM_UP`] commands in one sandbox, then [`MEASURED`] more: for each point, the agent's
/// stats and the processes it still lists.
fn before_and_after_a_thousand() -> Option<[(AgentStats, usize); 2]> {
    let (_tmp, k) = app_home()?;
    let _guard = KillAll(k.clone());
    let rec = create(&k, &["app"]);
    let id = rec["id"].as_str().unwrap().to_string();
    let sock = rec["agent"].as_str().unwrap().to_string();
    let list = || {
        kiln_agent::client::list_processes(
            &mut std::os::unix::net::UnixStream::connect(&sock).unwrap(),
        )
        .unwrap()
        .len()
    };
    let warm = std::cell::OnceCell::new();
    let measure = |n: usize| {
        let t = Instant::now();
        run_true(&rec, n);
        let ran = t.elapsed();
        // The agent takes a process out right after sending its end: a moment later at most.
        let mut listed = list();
        for _ in 0..50 {
            if listed == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            listed = list();
        }
        let mut st = agent_stats(&k, &id);
        // A connection just served may still be closing: its thread and descriptor go a
        // moment later (a leak stays).
        for _ in 0..20 {
            if warm
                .get()
                .is_none_or(|w: &AgentStats| st.fds <= w.fds && st.threads <= w.threads)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            st = agent_stats(&k, &id);
        }
        warm.get_or_init(|| st);
        eprintln!("{n} more commands in {ran:?}: {listed} listed, agent {st:?}");
        (st, listed)
    };
    let warm = measure(WARM_UP);
    let after = measure(MEASURED);
    k.ok(["sandbox", "kill", &id]);
    Some([warm, after])
}

#[test]
fn finished_commands_leave_nothing_in_the_agent() {
    let Some([(warm, warm_listed), (after, after_listed)]) = before_and_after_a_thousand() else {
        return;
    };
    // Their ends were delivered: no entry, thread or descriptor is left, and the agent's
    // memory stays where it was. A leak of 1 KiB per command would show as 1000 KiB.
    assert_eq!((warm_listed, after_listed), (0, 0));
    assert!(
        after.threads <= warm.threads && after.fds <= warm.fds,
        "{warm:?} -> {after:?}"
    );
    assert!(
        after.vm_rss_kib <= warm.vm_rss_kib + 768,
        "{warm:?} -> {after:?}"
    );
}

/// gVisor's procfs caches the `/proc/<pid>` directory of every process a shell runs, up to
/// 1,000 (some 80 KiB of sentry state each, in every checkpoint; measured on 20240729 with raw
/// `runsc`, no kiln involved): the agent mounts `/proc` with a small cache, so a checkpoint
/// does not grow with the commands a sandbox ran (without it: +80 MB after 1,200 commands).
#[test]
fn a_checkpoint_does_not_grow_with_the_commands_run() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let mut sizes = Vec::new();
    for commands in [20, 1200] {
        let rec = k.json(["sandbox", "info", &id, "--json"]);
        run_true(&rec, commands);
        let (took, bytes) = pause(&k, &id);
        eprintln!("after {commands} more commands: checkpoint {bytes} bytes, pause {took:?}");
        sizes.push(bytes);
        k.ok(["sandbox", "resume", &id]);
    }
    assert!(
        sizes[1] <= sizes[0] + (2 << 20),
        "checkpoint after 1,220 commands {} bytes, after 20 {} bytes",
        sizes[1],
        sizes[0]
    );
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

#[test]
fn pause_resume_does_not_slow_down() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let cycles = std::env::var("KILN_ENDURANCE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CYCLES)
        .max(2 * ENDS);
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let cycle = |id: &str| {
        let rec = k.json(["sandbox", "info", id, "--json"]);
        run_true(&rec, 1);
        let (paused, bytes) = pause(&k, id);
        let t = Instant::now();
        k.ok(["sandbox", "resume", id]);
        (paused, t.elapsed(), bytes)
    };
    for i in 0..cycles {
        let (paused, resumed, bytes) = cycle(&id);
        if i < ENDS || i % 10 == 0 || i + ENDS >= cycles {
            eprintln!("cycle {i}: pause {paused:?} + resume {resumed:?}, checkpoint {bytes} bytes");
        }
    }
    eprintln!("agent after {cycles} cycles: {:?}", agent_stats(&k, &id));
    // Against a fresh sandbox that ran as many commands, cycle for cycle at the same moments (the host's load changes over a run; the comparison must
    // not): what is measured is what the pause/resume history adds.
    let fresh = create(&k, &["app"]);
    run_true(&fresh, cycles + 1);
    let fresh = fresh["id"].as_str().unwrap().to_string();
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for _ in 0..ENDS {
        let (p, r, _) = cycle(&id);
        old.push(p + r);
        let (p, r, _) = cycle(&fresh);
        new.push(p + r);
    }
    let (old, new) = (median(&old), median(&new));
    eprintln!(
        "after {cycles} cycles: {old:?}; a fresh sandbox that ran as many commands, at the \
         same time: {new:?} (medians of {ENDS})"
    );
    assert!(
        old <= new * 2,
        "pause+resume after {cycles} cycles takes {old:?}, a fresh sandbox's {new:?}"
    );
}
