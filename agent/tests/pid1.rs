//! The agent as PID 1 with `--unix` (as in a gVisor sandbox), in a PID and mount namespace of
//! its own: it mounts nothing, reaps orphans and keeps serving.

mod common;

use common::*;
use kiln_agent::client;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// `unshare` and the agent in it; both killed on drop.
struct Ns {
    unshare: Child,
    agent: i32,
}

impl Drop for Ns {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the namespace's init, which we started.
        unsafe { libc::kill(self.agent, libc::SIGKILL) };
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(c.split_whitespace().map(|p| p.parse::<i32>().unwrap()));
    }
    out
}

fn proc_field(pid: i32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
}

#[test]
fn as_pid1_on_a_unix_socket_it_mounts_nothing_and_reaps_orphans() {
    let usable = is_root()
        && Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--propagation",
                "private",
                "true",
            ])
            .status()
            .is_ok_and(|s| s.success());
    if !usable {
        eprintln!("SKIP: needs root and unshare(1)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The socket's directory does not exist yet: the agent makes it.
    let sock = dir.path().join("run/kiln/agent.sock");
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--propagation", "private"])
        .arg(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg("--unix")
        .arg(&sock)
        .spawn()
        .unwrap();
    let upid = unshare.id() as i32;
    let t0 = Instant::now();
    let agent = loop {
        if let Some(&agent) = children(upid).first() {
            break agent;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "agent did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let ns = Ns { unshare, agent };
    while UnixStream::connect(&sock).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "agent did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let conn = || {
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    let status = proc_field(ns.agent, "status");
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.ends_with("\t1"), "{nspid}");
    // Same mounts as unshare (in the same new mount namespace): no /proc, /sys, ... mounted.
    assert_eq!(
        proc_field(ns.agent, "mountinfo"),
        proc_field(upid, "mountinfo")
    );

    // sh leaves an orphan behind; it becomes the agent's child, then is reaped at its exit.
    let r = sh("sleep 1 & echo $!");
    let out = client::exec(&mut conn(), &r, b"", |_, _| {}).unwrap();
    assert_eq!(out.status.code, Some(0));
    let orphan_seen = children(ns.agent)
        .iter()
        .any(|&c| proc_field(c, "comm").trim() == "sleep");
    assert!(orphan_seen, "the orphan is re-parented to the agent");
    let t0 = Instant::now();
    while !children(ns.agent).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "children left (zombies?): {:?}",
            children(ns.agent)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let h = client::health(&mut conn()).unwrap();
    assert_eq!(h.protocol, kiln_agent::protocol::PROTOCOL_VERSION);
}
