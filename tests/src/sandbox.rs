//! Helpers for the `kiln sandbox` end-to-end tests on gVisor: a kiln home holding a small
//! image built from a Dockerfile over busybox, skips with their reason, and a check that no
//! runsc process of a sandbox outlived it.

use crate::registry::busybox_build_home;
use crate::Kiln;
use std::path::Path;

/// The Dockerfile of the tests' `app` image: busybox applets the tests use, ENV, WORKDIR,
/// USER and CMD for the defaults of every exec.
pub const APP_DOCKERFILE: &str = "FROM bb
RUN for a in md5sum stat httpd nc kill seq tr od cmp ln chown grep mv; do busybox ln -sf busybox /bin/$a; done && busybox mkdir -p /work && busybox chown app:app /work
ENV GREETING=hello
WORKDIR /work
USER app
CMD [\"sh\"]
";

/// A shell loop (started in the background) that counts in a shell variable, in memory, and
/// publishes the count in /tmp/count every 50 ms by rename, so a reader never sees it half written.
pub const COUNTER_LOOP: &str = "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done) >/dev/null 2>&1 &";

/// The count [`COUNTER_LOOP`] last published in `id`, waiting (at most 20 s) for its first:
/// the loop starts in the background, and a command may come before it wrote anything.
pub fn counter(k: &Kiln, id: &str) -> u64 {
    let t = std::time::Instant::now();
    loop {
        let out = sh(k, id, "cat /tmp/count 2>/dev/null || true");
        if let Ok(n) = out.trim().parse() {
            return n;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "no count in {id} after 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether [`COUNTER_LOOP`] in `id` still counts: waits (at most 15 s, the loop is slow on a
/// loaded host) for the count to pass its present value; returns the two counts.
pub fn counter_advances(k: &Kiln, id: &str) -> Option<(u64, u64)> {
    let a = counter(k, id);
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(15) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let b = counter(k, id);
        if b > a {
            return Some((a, b));
        }
    }
    None
}

/// Why gVisor sandboxes cannot run here, if they cannot.
pub fn gvisor_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("gVisor sandboxes need root here (runsc without --rootless)".into());
    }
    if !crate::registry::have("runsc") {
        return Some("runsc not installed (apt-get install runsc; scripts/install-deps)".into());
    }
    None
}

/// A temp dir and a home with the `app` image built; None (after a SKIP line) when gVisor or
/// the image tools are missing.
pub fn app_home() -> Option<(tempfile::TempDir, Kiln)> {
    if let Some(why) = gvisor_unavailable() {
        eprintln!("SKIP: {why}");
        return None;
    }
    let (tmp, k) = busybox_build_home()?;
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), APP_DOCKERFILE).unwrap();
    k.ok(["build", "-t", "app", ctx.to_str().unwrap()]);
    Some((tmp, k))
}

/// Runs `kiln sandbox create ARGS --json` and returns the record.
pub fn create(k: &Kiln, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["sandbox", "create"];
    a.extend_from_slice(args);
    a.push("--json");
    k.json(a)
}

/// `kiln sandbox exec ID -- CMD...` with stdin `input`: (stdout, stderr, exit code).
pub fn exec(
    k: &Kiln,
    id: &str,
    opts: &[&str],
    cmd: &[&str],
    input: &[u8],
) -> (String, String, i32) {
    use std::io::Write;
    let mut args = vec!["sandbox", "exec"];
    args.extend_from_slice(opts);
    args.push(id);
    args.push("--");
    args.extend_from_slice(cmd);
    let mut c = k.cmd(args);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("kiln sandbox exec");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// The stdout of a command that must succeed.
pub fn sh(k: &Kiln, id: &str, script: &str) -> String {
    let (out, err, code) = exec(k, id, &[], &["sh", "-c", script], b"");
    assert_eq!(code, 0, "sh -c {script:?} in {id}: {err}");
    out
}

/// Every process but this one: (pid, command line arguments).
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if pid != std::process::id() {
            let args = cmd.split(|b| *b == 0).map(String::from_utf8_lossy);
            out.push((pid, args.map(|a| a.into_owned()).collect()));
        }
    }
    out
}

/// Pids of processes whose command line mentions `needle` (e.g. a sandbox id).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|(_, args)| args.join(" ").contains(needle))
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits (bounded) until no process mentions `id`; panics with what is left.
pub fn assert_no_processes(id: &str) {
    let t = std::time::Instant::now();
    loop {
        let left = processes_mentioning(id);
        if left.is_empty() {
            return;
        }
        if t.elapsed() > std::time::Duration::from_secs(10) {
            panic!("processes of sandbox {id} left: {left:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The record as `kiln sandbox ls` shows it after its reconcile (None: not listed).
pub fn listed(k: &Kiln, id: &str) -> Option<serde_json::Value> {
    k.json(["sandbox", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
}

/// Sandbox ids in `kiln sandbox ls --json`.
pub fn ids(k: &Kiln) -> Vec<String> {
    k.json(["sandbox", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Kills every sandbox of the home when dropped (tests that fail leave nothing running).
pub struct KillAll(pub Kiln);

impl Drop for KillAll {
    fn drop(&mut self) {
        if !self.0.home.join("sandboxes").exists() {
            return;
        }
        let out = self.0.run(["sandbox", "ls", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for r in list.as_array().into_iter().flatten() {
            if let Some(id) = r["id"].as_str() {
                let _ = self.0.run(["sandbox", "kill", id]);
            }
        }
    }
}

/// A file's bytes, or panic naming it.
pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// How long `kiln ARGS` takes when left alone.
pub fn timed(k: &Kiln, args: &[&str]) -> std::time::Duration {
    let t = std::time::Instant::now();
    k.ok(args);
    t.elapsed()
}

/// `n` delays spread over `d`, from just after the start to just before the end: the
/// moments a crash test kills an operation at.
pub fn moments(d: std::time::Duration, n: u32) -> Vec<std::time::Duration> {
    (0..n)
        .map(|i| d.mul_f64((f64::from(i) + 0.3) / f64::from(n)))
        .collect()
}

/// Runs `kiln ARGS` and SIGKILLs it after `delay`.
pub fn killed_after(k: &Kiln, args: &[&str], delay: std::time::Duration) {
    let mut child = k
        .cmd(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
}
