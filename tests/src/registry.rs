//! A real OCI registry (Debian's `docker-registry`, distribution 2.8) on a free loopback port,
//! with filesystem storage in a temp dir, stopped on drop; and the images tests push to it: a
//! busybox-static root file system made into an OCI layout with umoci.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub use crate::free_port;

pub struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
    /// The user and password every request needs (None: anonymous).
    creds: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry, or None (with a SKIP line) when `docker-registry` is not installed.
    pub fn start() -> Option<Registry> {
        Registry::start_inner(None)
    }

    /// [`Registry::start`] that answers only requests with HTTP basic auth as `user`/`password`
    /// (an htpasswd file, bcrypt as distribution requires, hashed by Python's `crypt`).
    pub fn start_with_basic_auth(user: &str, password: &str) -> Option<Registry> {
        Registry::start_inner(Some((user.to_string(), password.to_string())))
    }

    fn start_inner(creds: Option<(String, String)>) -> Option<Registry> {
        if !have("docker-registry") {
            eprintln!("SKIP: docker-registry not installed (apt-get install docker-registry)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let cfg = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = &creds {
            let out = Command::new("python3")
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                    password,
                ])
                .output()
                .expect("run python3");
            let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(hash.starts_with("$2"), "no bcrypt hash: {out:?}");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n")).expect("write htpasswd");
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(&cfg, text).expect("write registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            child,
            _dir: dir,
            port,
            creds,
        };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "registry did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(reg)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `oci:<layout>:<tag>` to `<addr>/<repo>` with skopeo.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some((user, password)) = &self.creds {
            cmd.arg(format!("--dest-creds={user}:{password}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}", self.addr()))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes a busybox root file system under `dir/rootfs` (static busybox, a few applets, an
/// `app` user, /tmp 1777). None (with a SKIP line) without busybox-static.
pub fn busybox_rootfs(dir: &Path) -> Option<PathBuf> {
    let bb = Path::new("/bin/busybox");
    let is_static = Command::new("sh")
        .args(["-c", "file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || ldd /bin/busybox 2>&1 | grep -q 'not a dynamic'"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !bb.exists() || !is_static {
        eprintln!("SKIP: a static /bin/busybox is needed (apt-get install busybox-static)");
        return None;
    }
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "root", "home/app"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy(bb, root.join("bin/busybox")).expect("copy busybox");
    for applet in [
        "sh", "echo", "cat", "ls", "mkdir", "touch", "id", "rm", "env", "pwd", "sleep", "true",
        "false", "wc", "chmod", "head",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").expect("group");
    let st = Command::new("chmod")
        .arg("1777")
        .arg(root.join("tmp"))
        .status()
        .expect("chmod");
    assert!(st.success());
    let st = Command::new("chown")
        .arg("1000:1000")
        .arg(root.join("home/app"))
        .status()
        .expect("chown");
    assert!(st.success());
    Some(root)
}

/// A temp dir and a `kiln` home in it holding the busybox image imported as `bb`, for
/// `kiln build` tests. None (with a SKIP line) when not root (builds need namespaces), without
/// e2fsprogs, umoci or busybox-static.
pub fn busybox_build_home() -> Option<(tempfile::TempDir, crate::Kiln)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: builds need root (namespaces, chroot)");
        return None;
    }
    if !have("mkfs.ext4") || !have("debugfs") {
        eprintln!("SKIP: e2fsprogs (mkfs.ext4, debugfs) not installed");
        return None;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let layout = busybox_layout(tmp.path(), "bb")?;
    let k = crate::Kiln::new(tmp.path().join("home"));
    k.ok([
        "image",
        "import",
        &format!("oci:{}:bb", layout.display()),
        "bb",
    ]);
    Some((tmp, k))
}

/// A new OCI layout at `layout` with `rootfs` as one layer, tagged `tag`, its config set by
/// umoci `config` flags.
fn umoci_layout(rootfs: &Path, layout: &Path, tag: &str, config: &[&str]) {
    let image = format!("{}:{tag}", layout.display());
    let run = |args: &[&str]| {
        let out = Command::new("umoci")
            .args(args)
            .output()
            .expect("run umoci");
        assert!(
            out.status.success(),
            "umoci {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["init", "--layout", layout.to_str().expect("utf-8 path")]);
    run(&["new", "--image", &image]);
    let root = rootfs.to_str().expect("utf-8 path");
    run(&["insert", "--image", &image, root, "/"]);
    let mut args = vec!["config", "--image", &image];
    args.extend_from_slice(config);
    run(&args);
}

/// An OCI layout at `dir/oci` holding the busybox root file system as `<tag>` (umoci).
/// None (with a SKIP line) without umoci or busybox-static.
pub fn busybox_layout(dir: &Path, tag: &str) -> Option<PathBuf> {
    if !have("umoci") {
        eprintln!("SKIP: umoci not installed (apt-get install umoci)");
        return None;
    }
    let root = busybox_rootfs(dir)?;
    let layout = dir.join("oci");
    umoci_layout(
        &root,
        &layout,
        tag,
        &[
            "--config.env",
            "PATH=/bin",
            "--config.cmd",
            "/bin/sh",
            "--config.workingdir",
            "/root",
        ],
    );
    Some(layout)
}

/// Where the Debian minbase root file system is cached between runs; shared by the tests and
/// the image benchmark. `KILN_DEBIAN_ROOTFS` overrides it.
pub const DEBIAN_ROOTFS: &str = "/var/cache/kiln-bench/debian-rootfs";

fn debian_rootfs_dir() -> PathBuf {
    std::env::var_os("KILN_DEBIAN_ROOTFS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEBIAN_ROOTFS))
}

/// Holds an exclusive flock on `path` (created) until dropped, so concurrent test processes
/// do not debootstrap or pack the same cache twice.
struct CacheLock {
    _file: std::fs::File,
}

impl CacheLock {
    fn take(path: &Path) -> CacheLock {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .expect("open cache lock");
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", path.display());
        CacheLock { _file: f }
    }
}

/// A `debootstrap --variant=minbase bookworm` root file system, made once and cached at
/// [`DEBIAN_ROOTFS`] (about 50 s and 206 MB when the mirror is reachable; the mirror is
/// `KILN_DEBIAN_MIRROR`, default http://deb.debian.org/debian). None, with a SKIP line that
/// says why, without root, without debootstrap, or when the mirror cannot be reached.
pub fn debian_rootfs() -> Option<PathBuf> {
    debootstrap_cached(&debian_rootfs_dir(), &[])
}

/// Where the Debian minbase + python3 root is cached; `KILN_DEBIAN_PYTHON3_ROOTFS` overrides.
pub const DEBIAN_PYTHON3_ROOTFS: &str = "/var/cache/kiln-bench/debian-python3-rootfs";

/// [`debian_rootfs`] with `python3` included (`debootstrap --include=python3`), cached at
/// [`DEBIAN_PYTHON3_ROOTFS`] (about 70 s, 240 MB the first time); None with a SKIP line as there.
pub fn debian_python3_rootfs() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_DEBIAN_PYTHON3_ROOTFS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEBIAN_PYTHON3_ROOTFS));
    debootstrap_cached(&dir, &["python3"])
}

/// `debootstrap --variant=minbase [--include=PKGS] bookworm dir`, once: made beside `dir` under
/// a lock and renamed into place, so a half-made root is never used.
fn debootstrap_cached(dir: &Path, include: &[&str]) -> Option<PathBuf> {
    let complete = |d: &Path| {
        d.join("etc/debian_version").exists()
            && d.join("bin/sh").exists()
            && include.iter().all(|p| d.join("usr/bin").join(p).exists())
    };
    if complete(dir) {
        return Some(dir.to_path_buf());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIP: no cached Debian root at {} and debootstrap needs root",
            dir.display()
        );
        return None;
    }
    if !have("debootstrap") {
        eprintln!("SKIP: debootstrap not installed (apt-get install debootstrap), no cached Debian root at {}", dir.display());
        return None;
    }
    let parent = dir.parent().expect("cache dir has a parent");
    std::fs::create_dir_all(parent).expect("create cache dir");
    let _lock = CacheLock::take(&parent.join(".debian-rootfs.lock"));
    if complete(dir) {
        return Some(dir.to_path_buf()); // made by another process while we waited
    }
    let mirror = std::env::var("KILN_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let partial = parent.join(format!(
        "{}.partial",
        dir.file_name().expect("name").to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(dir); // an incomplete leftover
    eprintln!(
        "making the Debian minbase root at {} from {mirror} (cached for later runs)",
        dir.display()
    );
    let t0 = Instant::now();
    let out = Command::new("debootstrap")
        .arg("--variant=minbase")
        .args(include_arg(include))
        .arg("bookworm")
        .arg(&partial)
        .arg(&mirror)
        .stdin(Stdio::null())
        .output()
        .expect("run debootstrap");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        eprintln!(
            "SKIP: debootstrap of Debian bookworm from {mirror} failed ({}), so there is no Debian image to test with: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
        return None;
    }
    std::fs::rename(&partial, dir).expect("move the Debian root into place");
    eprintln!("debootstrap took {:.0} s", t0.elapsed().as_secs_f64());
    Some(dir.to_path_buf())
}

fn include_arg(include: &[&str]) -> Option<String> {
    (!include.is_empty()).then(|| format!("--include={}", include.join(",")))
}

/// An OCI layout holding `rootfs` as tag `base` (umoci; PATH set, cmd /bin/sh), made once at
/// `at/oci` and reused. None (with a SKIP line) without umoci.
pub fn cached_layout(rootfs: &Path, at: &Path) -> Option<PathBuf> {
    if !have("umoci") {
        eprintln!("SKIP: umoci not installed (apt-get install umoci)");
        return None;
    }
    let layout = at.join("oci");
    if layout.join("index.json").exists() {
        return Some(layout);
    }
    std::fs::create_dir_all(at).expect("create layout cache dir");
    let _lock = CacheLock::take(&at.join(".layout.lock"));
    if layout.join("index.json").exists() {
        return Some(layout);
    }
    // Made next to its final place and renamed, so a half-made layout is never reused.
    let partial = at.join("oci.partial");
    let _ = std::fs::remove_dir_all(&partial);
    umoci_layout(
        rootfs,
        &partial,
        "base",
        &[
            "--config.env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--config.cmd",
            "/bin/sh",
        ],
    );
    // The layout records its own path nowhere, so it can move.
    std::fs::rename(&partial, &layout).expect("move the layout into place");
    Some(layout)
}

/// The Debian minbase image as an OCI layout (tag `base`), cached next to its root file
/// system (`<rootfs>/../debian/oci`, where the image benchmark looks too).
pub fn debian_layout() -> Option<PathBuf> {
    let rootfs = debian_rootfs()?;
    let at = rootfs.parent().expect("cache dir").join("debian");
    cached_layout(&rootfs, &at)
}

/// (instruction, cached) per step of a `kiln build --json` report.
pub fn build_steps(report: &serde_json::Value) -> Vec<(String, bool)> {
    report["steps"]
        .as_array()
        .expect("a build report's steps")
        .iter()
        .map(|s| {
            (
                s["instruction"].as_str().unwrap().to_string(),
                s["cached"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// True when builds can run here (root and `tools`); else prints why (a SKIP line).
pub fn can_build_or_skip(tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: image builds need root");
        return false;
    }
    if let Some(t) = tools.iter().find(|t| !have(t)) {
        eprintln!("SKIP: {t} not installed (scripts/install-deps)");
        return false;
    }
    true
}
