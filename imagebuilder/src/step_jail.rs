//! The jail a Dockerfile RUN step runs in: the step's command in Linux namespaces over a root directory.
//!
//! The child (forked by `std::process::Command`) joins a cgroup, unshares mount, pid, ipc, uts
//! (and net when the step gets no network) namespaces, then forks once more so the command is
//! pid 1 of its pid namespace; the middle process only waits and passes the exit status on.
//! The command's side mounts its own /proc, a small /dev (tmpfs with bind-mounted null, zero,
//! full, random, urandom, tty), the host's resolv.conf when the step has network, then chroots
//! into the root, drops to the step's user and execs. Everything mounted disappears with the
//! mount namespace when the command exits.

use crate::error::{Error, IoCtx, Result};
use kiln_agent::users::{Identity, Users};
use std::ffi::CString;
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What to run and where.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub rootfs: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    /// Absolute path inside the root.
    pub workdir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; None = root.
    pub user: Option<String>,
    /// Share the host's network (else a fresh, empty net namespace).
    pub network: bool,
    /// Fed to the command's stdin (heredocs).
    pub stdin: Option<Vec<u8>>,
    /// cgroup v2 memory.max in bytes, if any.
    pub memory_max: Option<u64>,
    /// `RUN --mount`s, mounted in the command's mount namespace only.
    pub mounts: Vec<Mount>,
}

/// A mount for one command (`RUN --mount`).
#[derive(Clone, Debug)]
pub struct Mount {
    /// Host path to bind; None mounts an empty tmpfs.
    pub source: Option<PathBuf>,
    /// Absolute path inside the root.
    pub target: String,
    pub readonly: bool,
}

/// How a command ended and the tail of its output.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub success: bool,
    pub status: String,
    pub tail: String,
}

const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn c(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Invalid("path with NUL".into()))
}

/// The root's users: its `/etc/passwd` and `/etc/group`, read inside the root (a build's root
/// is written by its RUN steps: symlinks resolve within it, as they would in the image).
pub fn root_users(rootfs: &Path) -> Users {
    let read = |name| match read_in_root(rootfs, name) {
        Ok(text) => text,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("reading /{name} of {}: {e}", rootfs.display());
            }
            String::new()
        }
    };
    Users::parse(&read("etc/passwd"), &read("etc/group"))
}

/// Resolves a USER spec against the root's users, as a container runtime does.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<Identity> {
    root_users(rootfs)
        .exec_user(spec)
        .map_err(|e| Error::Build(format!("USER {spec}: {e}")))
}

/// A regular file of `rootfs` (at most 1 MiB), its symlinks resolved inside the root.
fn read_in_root(rootfs: &Path, name: &str) -> std::io::Result<String> {
    const MAX: u64 = 1 << 20;
    let root = std::fs::File::open(rootfs)?;
    let name = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: open_how is plain integers; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    // Non-blocking: a FIFO planted there must not hang the build (checked below).
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    // SAFETY: openat2(2) with an open directory descriptor, a NUL-terminated path and an
    // open_how of the size passed; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX).read_to_string(&mut text)?;
    Ok(text)
}

/// Finds an exec-form program in the root's PATH without following symlinks out of it.
fn find_program(rootfs: &Path, argv0: &str, env: &[String]) -> String {
    if argv0.contains('/') {
        return argv0.to_string();
    }
    let path = env
        .iter()
        .rev()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':') {
        let cand = format!("{}/{argv0}", dir.trim_end_matches('/'));
        if std::fs::symlink_metadata(rootfs.join(cand.trim_start_matches('/'))).is_ok() {
            return cand;
        }
    }
    argv0.to_string()
}

/// cgroup groups with limits for one command (cgroup v2 if mounted with controllers, else the
/// v1 `pids` and `memory` hierarchies), removed on drop. Best effort: where the host offers no
/// writable cgroups, RUN has no limits (logged).
struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    fn create(memory_max: Option<u64>) -> Cgroup {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("kiln-build-{}-{n}", std::process::id());
        let root = Path::new("/sys/fs/cgroup");
        let mut cg = Cgroup { dirs: Vec::new() };
        let mk = |dir: PathBuf, limits: &[(&str, String)], cg: &mut Cgroup| -> bool {
            if std::fs::create_dir(&dir).is_err() {
                return false;
            }
            let mut ok = true;
            for (file, value) in limits {
                if std::fs::write(dir.join(file), value).is_err() {
                    tracing::warn!(dir = %dir.display(), file, "could not set cgroup limit");
                    ok = false;
                }
            }
            cg.dirs.push(dir);
            ok
        };
        if root.join("cgroup.controllers").exists() {
            let mut limits = vec![("pids.max", "4096".to_string())];
            if let Some(m) = memory_max {
                limits.push(("memory.max", m.to_string()));
            }
            mk(root.join(&name), &limits, &mut cg);
        } else {
            if root.join("pids/cgroup.procs").exists() {
                mk(
                    root.join("pids").join(&name),
                    &[("pids.max", "4096".into())],
                    &mut cg,
                );
            }
            if let Some(m) = memory_max {
                if root.join("memory/cgroup.procs").exists() {
                    mk(
                        root.join("memory").join(&name),
                        &[("memory.limit_in_bytes", m.to_string())],
                        &mut cg,
                    );
                }
            }
        }
        if cg.dirs.is_empty() {
            tracing::warn!("no writable cgroups: RUN steps run without pids/memory limits");
        }
        cg
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Mount points the sandbox needs that the root lacks: created before, removed after.
struct MountPoints {
    created: Vec<PathBuf>,
    parent_times: Vec<(PathBuf, i64, i64)>,
}

impl MountPoints {
    fn ensure(rootfs: &Path, mounts: &[Mount]) -> Result<MountPoints> {
        use std::os::unix::fs::MetadataExt;
        let mut mp = MountPoints {
            created: Vec::new(),
            parent_times: Vec::new(),
        };
        // RUN --mount targets: missing components are made (and removed after), and none may
        // be a symlink, which the kernel would resolve on the host.
        for m in mounts {
            let comps: Vec<&str> = m.target.split('/').filter(|c| !c.is_empty()).collect();
            let file_target = m
                .source
                .as_ref()
                .is_some_and(|s| std::fs::metadata(s).map(|m| !m.is_dir()).unwrap_or(false));
            let mut p = rootfs.to_path_buf();
            for (i, c) in comps.iter().enumerate() {
                let parent = p.clone();
                p.push(c);
                let last = i + 1 == comps.len();
                match std::fs::symlink_metadata(&p) {
                    Ok(md) if md.is_dir() && !(last && file_target) => {}
                    Ok(md) if last && file_target && md.is_file() => {}
                    Ok(_) => {
                        mp.cleanup();
                        return Err(Error::Build(format!(
                            "RUN --mount target {}: {} in the image is a symlink or of the wrong \
                             type",
                            m.target,
                            p.strip_prefix(rootfs).unwrap_or(&p).display()
                        )));
                    }
                    Err(_) => {
                        let pm = std::fs::metadata(&parent).ctx("stat", &parent)?;
                        if !mp.created.contains(&parent) {
                            mp.parent_times.push((parent, pm.mtime(), pm.mtime_nsec()));
                        }
                        if last && file_target {
                            std::fs::File::create(&p).ctx("create", &p)?;
                        } else {
                            std::fs::create_dir(&p).ctx("mkdir", &p)?;
                        }
                        mp.created.push(p.clone());
                    }
                }
            }
        }
        for d in ["proc", "dev"] {
            let p = rootfs.join(d);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Build(format!(
                        "/{d} in the image is not a directory: cannot run commands"
                    )))
                }
                Err(_) => {
                    let pm = std::fs::metadata(rootfs).ctx("stat", rootfs)?;
                    mp.parent_times
                        .push((rootfs.to_path_buf(), pm.mtime(), pm.mtime_nsec()));
                    std::fs::create_dir(&p).ctx("mkdir", &p)?;
                    mp.created.push(p);
                }
            }
        }
        Ok(mp)
    }

    fn cleanup(&self) {
        for p in self.created.iter().rev() {
            if std::fs::remove_dir(p).is_err() {
                let _ = std::fs::remove_file(p);
            }
        }
        for (p, s, ns) in self.parent_times.iter().rev() {
            if let Ok(cp) = c(p) {
                let t = libc::timespec {
                    tv_sec: *s as libc::time_t,
                    tv_nsec: *ns as libc::c_long,
                };
                let ts = [t, t];
                // SAFETY: valid path and timespec array.
                unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), ts.as_ptr(), 0) };
            }
        }
    }
}

/// Runs `spec`, calling `on_line` with each output line (stdout and stderr merged).
pub fn run(spec: &RunSpec, on_line: &mut dyn FnMut(&str)) -> Result<RunOutcome> {
    if spec.argv.is_empty() {
        return Err(Error::Build("empty command".into()));
    }
    let rootfs = std::fs::canonicalize(&spec.rootfs).ctx("resolve", &spec.rootfs)?;
    let user = match &spec.user {
        Some(u) if !u.is_empty() => Some(resolve_user(&rootfs, u)?),
        _ => None,
    };
    let mounts = MountPoints::ensure(&rootfs, &spec.mounts)?;
    let result = run_inner(spec, &rootfs, user, on_line);
    mounts.cleanup();
    result
}

fn run_inner(
    spec: &RunSpec,
    rootfs: &Path,
    user: Option<Identity>,
    on_line: &mut dyn FnMut(&str),
) -> Result<RunOutcome> {
    let cgroup = Cgroup::create(spec.memory_max);
    let jail = Jail::prepare(spec, rootfs, user, &cgroup)?;

    // One pipe for stdout and stderr, so lines keep their order.
    let mut fds = [0i32; 2];
    // SAFETY: fds is a 2-element array as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Io {
            what: "pipe",
            path: "".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nothing else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wr2 = wr.try_clone().ctx("dup", "pipe")?;

    let program = find_program(rootfs, &spec.argv[0], &spec.env);
    let mut cmd = Command::new(&program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().filter_map(|kv| kv.split_once('=')))
        .stdout(Stdio::from(wr))
        .stderr(Stdio::from(wr2))
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    // SAFETY: the closure runs in the forked child before exec; `Jail::enter` only makes raw
    // system calls on data prepared above (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || jail.enter());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Build(format!("cannot start {:?} in the sandbox: {e}", spec.argv)))?;
    // The Command holds copies of the pipe's write ends: drop it so reads end at exit.
    drop(cmd);
    let writer = spec.stdin.clone().and_then(|data| {
        let mut stdin = child.stdin.take()?;
        Some(std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        }))
    });
    let tail = read_lines(rd, on_line)?;
    let status = child.wait().ctx("wait", "sandbox")?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    drop(cgroup);
    Ok(RunOutcome {
        success: status.success(),
        status: describe(status),
        tail,
    })
}

/// Passes each line of `rd` to `on_line`; returns the last 40, joined.
fn read_lines(rd: OwnedFd, on_line: &mut dyn FnMut(&str)) -> Result<String> {
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let reader = std::io::BufReader::new(std::fs::File::from(rd));
    for line in reader.split(b'\n') {
        let line = line.ctx("read", "command output")?;
        let s = String::from_utf8_lossy(&line).into_owned();
        on_line(&s);
        tail.push_back(s);
        if tail.len() > 40 {
            tail.pop_front();
        }
    }
    Ok(tail.into_iter().collect::<Vec<_>>().join("\n"))
}

/// A step's end as a build log says it (the middle process reports a signal as 128 + it).
fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) if code > 128 => format!("signal {} (exit code {code})", code - 128),
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// Everything the child needs to jail itself, prepared before the fork: between fork and
/// exec it may only make system calls (no allocation, no locks).
struct Jail {
    parent: libc::pid_t,
    cg_procs: Vec<CString>,
    unshare: libc::c_int,
    root: CString,
    proc_dir: CString,
    dev: CString,
    /// (host node, node in the root)
    dev_nodes: Vec<(CString, CString)>,
    shm: CString,
    resolv: Option<(CString, CString)>,
    /// RUN --mount: (source, or a tmpfs; target; read-only)
    extra: Vec<(Option<CString>, CString, bool)>,
    workdir: CString,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

type Step = std::io::Result<()>;

fn sys(r: libc::c_int) -> Step {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Jail {
    fn prepare(
        spec: &RunSpec,
        rootfs: &Path,
        user: Option<Identity>,
        cgroup: &Cgroup,
    ) -> Result<Jail> {
        let (uid, gid, groups) = user.map_or((0, 0, Vec::new()), |u| (u.uid, u.gid, u.groups));
        let cg_procs = cgroup
            .dirs
            .iter()
            .map(|d| c(&d.join("cgroup.procs")))
            .collect::<Result<Vec<_>>>()?;
        let mut dev_nodes = Vec::new();
        // Only nodes the host has (a bind mount of a missing source fails).
        for n in DEV_NODES
            .iter()
            .filter(|n| Path::new("/dev").join(n).exists())
        {
            dev_nodes.push((
                c(&Path::new("/dev").join(n))?,
                c(&rootfs.join("dev").join(n))?,
            ));
        }
        let mut extra = Vec::new();
        for m in &spec.mounts {
            let dst = c(&rootfs.join(m.target.trim_start_matches('/')))?;
            let src = m.source.as_deref().map(c).transpose()?;
            extra.push((src, dst, m.readonly));
        }
        let resolv_dst = rootfs.join("etc/resolv.conf");
        let resolv = if spec.network
            && std::fs::symlink_metadata(&resolv_dst)
                .map(|m| m.is_file())
                .unwrap_or(false)
            && Path::new("/etc/resolv.conf").exists()
        {
            Some((c(Path::new("/etc/resolv.conf"))?, c(&resolv_dst)?))
        } else {
            None
        };
        let mut unshare =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if !spec.network {
            unshare |= libc::CLONE_NEWNET;
        }
        Ok(Jail {
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
            cg_procs,
            unshare,
            root: c(rootfs)?,
            proc_dir: c(&rootfs.join("proc"))?,
            dev: c(&rootfs.join("dev"))?,
            dev_nodes,
            shm: c(&rootfs.join("dev/shm"))?,
            resolv,
            extra,
            workdir: CString::new(spec.workdir.as_bytes())
                .map_err(|_| Error::Invalid("workdir with NUL".into()))?,
            uid,
            gid,
            groups,
        })
    }

    /// In the forked child: into the build's cgroups and new namespaces, a fork so the
    /// command is pid 1 of its own, the root's mounts, the chroot, then the step's user.
    fn enter(&self) -> Step {
        // SAFETY (every block below): raw system calls on NUL-terminated strings and plain
        // values this `Jail` owns; we are the single-threaded child between fork and exec.
        unsafe {
            // If kiln dies (even by SIGKILL), this process dies, and with it the command (its
            // own death signal below), so nothing keeps running in a removed build directory.
            sys(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if libc::getppid() != self.parent {
                libc::_exit(137); // kiln already died before the signal was armed
            }
            for p in &self.cg_procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            sys(libc::unshare(self.unshare))?;
            let pid = libc::fork();
            if pid < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if pid > 0 {
                wait_and_exit_as(pid);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        self.mount_root()?;
        self.mount_extra()?;
        // SAFETY: as above.
        unsafe {
            libc::sethostname(c"kiln-build".as_ptr(), "kiln-build".len());
            sys(libc::chroot(self.root.as_ptr()))?;
            sys(libc::chdir(c"/".as_ptr()))?;
            sys(libc::chdir(self.workdir.as_ptr()))?;
            sys(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            sys(libc::setgid(self.gid))?;
            sys(libc::setuid(self.uid))
        }
    }

    /// The root bound onto itself (so it can be the chroot), its /proc, a small /dev with the
    /// host's harmless nodes, /dev/shm, and the host's resolv.conf for steps with network.
    fn mount_root(&self) -> Step {
        let none = std::ptr::null::<libc::c_char>();
        let null = std::ptr::null::<libc::c_void>();
        // SAFETY: as in `enter`.
        unsafe {
            sys(libc::mount(
                c"".as_ptr(),
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                null,
            ))?;
            let root = self.root.as_ptr();
            sys(libc::mount(
                root,
                root,
                none,
                libc::MS_BIND | libc::MS_REC,
                null,
            ))?;
            sys(libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                null,
            ))?;
            sys(libc::mount(
                c"tmpfs".as_ptr(),
                self.dev.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=755,size=65536k".as_ptr().cast(),
            ))?;
            for (src, dst) in &self.dev_nodes {
                let fd = libc::open(
                    dst.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o666,
                );
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                sys(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    libc::MS_BIND,
                    null,
                ))?;
            }
            libc::mkdir(self.shm.as_ptr(), 0o1777);
            if let Some((src, dst)) = &self.resolv {
                libc::mount(src.as_ptr(), dst.as_ptr(), none, libc::MS_BIND, null);
            }
        }
        Ok(())
    }

    /// RUN --mount targets: a bind of their source, or a fresh tmpfs; read-only if asked.
    fn mount_extra(&self) -> Step {
        let none = std::ptr::null::<libc::c_char>();
        let null = std::ptr::null::<libc::c_void>();
        for (src, dst, ro) in &self.extra {
            // SAFETY: as in `enter`.
            unsafe {
                sys(match src {
                    Some(src) => libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REC,
                        null,
                    ),
                    None => libc::mount(
                        c"tmpfs".as_ptr(),
                        dst.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        c"mode=1777".as_ptr().cast(),
                    ),
                })?;
                if *ro {
                    sys(libc::mount(
                        none,
                        dst.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                        null,
                    ))?;
                }
            }
        }
        Ok(())
    }
}

/// The middle process: waits for the command (pid 1 of the new namespace) and exits with its
/// status, its inherited descriptors closed so the parent sees the exec happen.
///
/// # Safety
/// Only in the forked child, between fork and exec.
unsafe fn wait_and_exit_as(pid: libc::pid_t) -> ! {
    // SAFETY: close_range and waitpid on our own child; _exit never returns.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let mut status = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(126);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        libc::_exit(128 + libc::WTERMSIG(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build's root is written by its RUN steps: its /etc files are read inside it, never
    /// through a link out of it, never blocking on a FIFO, never more than 1 MiB.
    #[test]
    fn root_users_are_read_inside_a_hostile_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let host = d.path().join("host-passwd");
        std::fs::write(&host, "root:x:0:0::/root:/bin/sh\nhost:x:7:7::/h:/bin/sh\n").unwrap();
        // Absolute and relative links that would leave the root: resolved inside it instead.
        std::os::unix::fs::symlink(&host, root.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../host-passwd", root.join("etc/group")).unwrap();
        let u = root_users(&root);
        assert_eq!(u.user_name(7), "7", "the host's file was read");
        assert!(u.exec_user("host").is_err());
        assert_eq!(u.exec_user("root").unwrap().uid, 0, "root without passwd");

        // A link that stays inside the root is followed, as in the image.
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        std::fs::write(root.join("etc/passwd.real"), "app:x:5:6::/app:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd.real", root.join("etc/passwd")).unwrap();
        assert_eq!(resolve_user(&root, "app").unwrap().gid, 6);

        // A FIFO neither blocks nor counts.
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        let fifo = CString::new(root.join("etc/passwd").as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(read_in_root(&root, "etc/passwd").is_err());
        assert!(resolve_user(&root, "app").is_err());

        // A huge file is read up to its bound only.
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        let mut big = "app:x:5:6::/app:/bin/sh\n".to_string();
        big.push_str(&"x".repeat(3 << 20));
        std::fs::write(root.join("etc/passwd"), big).unwrap();
        assert_eq!(read_in_root(&root, "etc/passwd").unwrap().len(), 1 << 20);
        assert_eq!(resolve_user(&root, "app").unwrap().uid, 5);
    }
}
