//! A real 3-member etcd cluster on 127.0.0.1 for the cluster tests: free ports, data in a
//! temp dir, each member killable and restartable (same data, same ports) for fault tests,
//! every member killed on drop. [`Etcd::start_or_skip`] prints a SKIP line when Debian's
//! `etcd` (package etcd-server, `scripts/install-deps`) is not installed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `etcd` binary (`KILN_ETCD` overrides), if it runs.
pub fn etcd_bin() -> Option<PathBuf> {
    let bin = std::env::var_os("KILN_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        .then_some(bin)
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running 3-member etcd cluster.
pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl Etcd {
    /// Starts the cluster and waits until every member answers; None after a SKIP line.
    pub fn start_or_skip() -> Option<Etcd> {
        let Some(bin) = etcd_bin() else {
            eprintln!("SKIP: etcd not installed (Debian's etcd-server; scripts/install-deps)");
            return None;
        };
        let members = (1..=3)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: crate::free_port(),
                peer_port: crate::free_port(),
                child: None,
            })
            .collect();
        let mut e = Etcd {
            bin,
            dir: tempfile::tempdir().unwrap(),
            members,
        };
        for i in 0..3 {
            e.spawn(i);
        }
        for i in 0..3 {
            e.wait_healthy(i);
        }
        Some(e)
    }

    fn spawn(&mut self, i: usize) {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(&self.bin)
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={cluster}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=kiln-test")
            // Fast elections on loopback: a killed member's absence is noticed quickly.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning etcd");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, i: usize) {
        let port = self.members[i].client_port;
        let t = Instant::now();
        loop {
            if let Ok((200, body)) = crate::e2b::http(port, "GET", "/health", &[], None) {
                if String::from_utf8_lossy(&body).contains("\"true\"") {
                    return;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "etcd member {} not healthy within 30 s:\n{}",
                self.members[i].name,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Member `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default()
    }

    /// The client URLs, `http://127.0.0.1:PORT` each.
    pub fn urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The client URLs joined with commas (what `--cluster-etcd` takes).
    pub fn urls_arg(&self) -> String {
        self.urls().join(",")
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and ports, and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
