//! The agent binary on a Unix socket in a temp dir, and helpers shared by the test files.
#![allow(dead_code)]

use kiln_agent::client;
use kiln_agent::protocol::{self, ExecRequest, Kind};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Agent {
    pub child: Child,
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_with_env(&[])
    }

    pub fn start_with_env(env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .arg("--unix")
            .arg(&sock)
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        // The socket file appears at bind(), before listen(): wait for a connection to work.
        while UnixStream::connect(&sock).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "agent did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent { child, sock, dir }
    }

    pub fn conn(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    pub fn exec(
        &self,
        argv: &[&str],
        stdin: &[u8],
    ) -> Result<client::ExecOutput, client::ClientError> {
        let req = ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        client::exec(&mut self.conn(), &req, stdin, |_, _| {})
    }
}

pub fn file_req(path: &str, mode: u32) -> protocol::FileRequest {
    protocol::FileRequest {
        path: path.into(),
        mode: Some(mode),
        ..Default::default()
    }
}

pub fn read_all(a: &Agent, path: &str) -> Result<Vec<u8>, client::ClientError> {
    let mut out = Vec::new();
    client::read_file(&mut a.conn(), path, &mut out)?;
    Ok(out)
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sh(line: &str) -> ExecRequest {
    req(&["/bin/sh", "-c", line])
}

impl Agent {
    /// Starts a process and drops the connection once it runs; returns its pid.
    pub fn start_bg(&self, r: &ExecRequest) -> i32 {
        let mut s = self.conn();
        protocol::write_json(&mut s, Kind::Exec, r).unwrap();
        let (k, p) = protocol::read_frame(&mut s).unwrap().unwrap();
        assert_eq!(k, Kind::Started, "{}", String::from_utf8_lossy(&p));
        protocol::parse_json::<protocol::Started>(k, &p)
            .unwrap()
            .pid
    }

    /// The agent process's resident memory (VmRSS), bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// Waits until `f` holds (polling), at most `secs`.
    pub fn wait_until(&self, secs: u64, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(secs), "timed out");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() == 0 }
}
