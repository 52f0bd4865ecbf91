//! Helpers for the `kiln serve` tests: a real `kiln serve` on a free loopback port with its
//! own home and API key, E2B's real SDKs (Python from `/opt/kiln-tools/e2b-venv`, JS from
//! `/opt/kiln-tools/e2b-js`, both installed by `scripts/install-deps`) pointed at it, and raw
//! HTTP for what an SDK hides (status codes, bodies).

use crate::Kiln;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Python of the SDK venv (`KILN_E2B_VENV` overrides the venv), if `import e2b` works.
pub fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("KILN_E2B_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kiln-tools/e2b-venv"));
    let py = venv.join("bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import e2b"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(py)
}

/// `node_modules` holding the JS SDK (`KILN_E2B_JS` overrides the project dir), if node and
/// the package are there.
pub fn js_modules() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_E2B_JS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kiln-tools/e2b-js"));
    let m = dir.join("node_modules");
    (m.join("e2b/package.json").exists() && crate::registry::have("node")).then_some(m)
}

/// The SDK venv's Python, or a SKIP line and None.
pub fn python_or_skip() -> Option<PathBuf> {
    let p = python();
    if p.is_none() {
        eprintln!(
            "SKIP: E2B's Python SDK not installed (/opt/kiln-tools/e2b-venv; scripts/install-deps)"
        );
    }
    p
}

pub use crate::free_port;

/// A running `kiln serve`; killed when dropped.
pub struct Serve {
    pub kiln: Kiln,
    pub port: u16,
    /// The API key (`KILN_API_KEY` given to the daemon).
    pub key: String,
    child: Option<Child>,
    log: PathBuf,
    /// More arguments for `kiln serve`.
    args: Vec<String>,
}

impl Serve {
    /// Starts `kiln serve` for `kiln`'s home on a free port with API key `key`.
    pub fn start(kiln: &Kiln, key: &str) -> Serve {
        Serve::start_with(kiln, key, free_port(), &[])
    }

    /// Starts `kiln serve` for `kiln`'s home on `port` with API key `key` and more
    /// arguments `args` (cluster mode's, say).
    pub fn start_with(kiln: &Kiln, key: &str, port: u16, args: &[String]) -> Serve {
        let mut s = Serve {
            kiln: kiln.clone(),
            port,
            key: key.to_string(),
            child: None,
            log: kiln.home.with_extension("serve.log"),
            args: args.to_vec(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.kiln.home).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = self.kiln.cmd([
            "serve".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
        ]);
        cmd.args(&self.args);
        cmd.env("KILN_API_KEY", &self.key)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawning kiln serve"));
        let t = Instant::now();
        loop {
            if let Ok((204, _)) = http(self.port, "GET", "/health", &[], None) {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                // Who holds the port, when that is why (a process that inherited the old
                // daemon's listener would be a leak).
                let holders = Command::new("ss")
                    .args(["-ltnpH", &format!("sport = :{}", self.port)])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                panic!(
                    "kiln serve exited with {st}:\n{}\nlistening on :{}: {holders}",
                    self.log_text(),
                    self.port
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "kiln serve did not answer /health within 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the daemon (SIGKILL: nothing graceful) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The daemon's process id (None once stopped): to SIGSTOP and SIGCONT it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the daemon.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The daemon's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The environment E2B's SDKs need to talk to this daemon.
    pub fn sdk_env(&self) -> Vec<(String, String)> {
        vec![
            ("E2B_API_URL".into(), self.url()),
            ("E2B_SANDBOX_URL".into(), self.url()),
            ("E2B_API_KEY".into(), self.key.clone()),
            ("E2B_DOMAIN".into(), format!("localhost:{}", self.port)),
        ]
    }

    /// Raw HTTP with the API key.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let (code, b) = http(
            self.port,
            method,
            path,
            &[
                ("X-API-Key", &self.key),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (
            code,
            serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Runs a Python script with E2B's SDK against this daemon; panics (with both outputs
    /// and the daemon's log) unless it exits 0. Returns the JSON of its last stdout line.
    pub fn python(&self, py: &std::path::Path, script: &str) -> serde_json::Value {
        let out = Command::new(py)
            .args(["-c", script])
            .envs(self.sdk_env())
            .output()
            .expect("running python");
        self.last_json("python", out)
    }

    /// Runs a node script (ES module) with E2B's JS SDK against this daemon.
    pub fn node(&self, modules: &std::path::Path, script: &str) -> serde_json::Value {
        let dir = modules.parent().unwrap();
        let file = dir.join(format!("kiln-test-{}.mjs", std::process::id()));
        std::fs::write(&file, script).unwrap();
        let out = Command::new("node")
            .arg(&file)
            .current_dir(dir)
            .envs(self.sdk_env())
            .output()
            .expect("running node");
        let _ = std::fs::remove_file(&file);
        self.last_json("node", out)
    }

    fn last_json(&self, what: &str, out: std::process::Output) -> serde_json::Value {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{what} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- kiln serve ---\n{}",
            out.status,
            self.log_text()
        );
        let last = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("null");
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{what}: last line {last:?} is not JSON: {e}\n{stderr}"))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP/1.1 request over a fresh connection: (status, body). `Host` defaults to the
/// listener's address.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(180)))?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status:?}")))?;
    let mut chunked = false;
    let mut len = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
            if k == "content-length" {
                len = v.parse::<usize>().ok();
            }
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf)?;
            out.extend_from_slice(&buf[..n]);
        }
    } else if let Some(n) = len {
        out.resize(n, 0);
        r.read_exact(&mut out)?;
    } else {
        r.read_to_end(&mut out)?;
    }
    Ok((code, out))
}

/// An image over the tests' `app` image for E2B's SDK: its commands run `/bin/bash -l -c
/// CMD`, and busybox has no bash, so a shim; `app` gets a home directory.
pub const SDK_DOCKERFILE: &str = "FROM app
USER root
RUN printf '#!/bin/sh\\nexec /bin/sh \"$@\"\\n' > /bin/bash && chmod 755 /bin/bash && mkdir -p /home/app && chown app:app /home/app && sed -i 's#^app:x:\\([0-9]*\\):\\([0-9]*\\):[^:]*:[^:]*:#app:x:\\1:\\2::/home/app:#' /etc/passwd
USER app
";

/// [`crate::sandbox::app_home`] plus the `sdk` image ([`SDK_DOCKERFILE`]); None after a SKIP.
pub fn sdk_home() -> Option<(tempfile::TempDir, Kiln)> {
    let (tmp, k) = crate::sandbox::app_home()?;
    let ctx = tmp.path().join("sdk-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), SDK_DOCKERFILE).unwrap();
    k.ok(["build", "-t", "sdk", ctx.to_str().unwrap()]);
    Some((tmp, k))
}

/// A daemon over a home with the SDK's image, E2B's Python SDK, and every sandbox killed at
/// the end (fields drop in this order: the daemon, the sandboxes, then the temp dir).
pub struct SdkServe {
    pub s: Serve,
    _cleanup: crate::sandbox::KillAll,
    pub k: Kiln,
    pub py: PathBuf,
    pub tmp: tempfile::TempDir,
}

/// [`SdkServe`] with API key `key` and `env` for kiln; None after a SKIP line.
pub fn sdk_serve(key: &str, env: &[(&str, &str)]) -> Option<SdkServe> {
    let py = python_or_skip()?;
    let (tmp, k) = sdk_home()?;
    let k = k.with_env(env.iter().map(|(a, b)| (a.to_string(), b.to_string())));
    Some(SdkServe {
        s: Serve::start(&k, key),
        _cleanup: crate::sandbox::KillAll(k.clone()),
        k,
        py,
        tmp,
    })
}
