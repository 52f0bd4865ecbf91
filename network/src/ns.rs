//! Running things inside a named network namespace (`/run/netns/<name>`).

use crate::{io_err, Error, Result};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

pub fn open(name: &str) -> Result<File> {
    let p = path(name);
    File::open(&p).map_err(io_err(format!("open {}", p.display())))
}

/// Runs `prog args` (in namespace `ns` when given) with `input` on stdin; its stderr is the
/// error's detail.
pub fn run(ns: Option<&str>, prog: &str, args: &[&str], input: &str) -> Result<String> {
    run_holding(ns, prog, args, input, None)
}

/// [`run`], with the helper holding `held` (a sandbox's network lock) until it exits and
/// killed if its caller dies: a caller killed mid-change leaves no helper that changes the
/// network after whoever next takes the lock has cleaned it up.
pub(crate) fn run_holding(
    ns: Option<&str>,
    prog: &str,
    args: &[&str],
    input: &str,
    held: Option<&File>,
) -> Result<String> {
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(lock) = held {
        let fd = lock.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: fcntl(2), prctl(2) and getppid(2) in the child only, all async-signal-safe;
        // the lock's descriptor stays open in the parent across the fork.
        unsafe {
            c.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The caller died before the death signal was armed.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    let nsf = ns.map(open).transpose()?;
    if let Some(f) = &nsf {
        let fd = f.as_raw_fd();
        // SAFETY: setns(2) on an fd we keep open across the fork; async-signal-safe.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let cmd = || {
        format!(
            "{}{prog} {}",
            ns.map(|n| format!("[{n}] ")).unwrap_or_default(),
            args.join(" ")
        )
    };
    let mut child = c.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Invalid(format!(
                "`{prog}` not found: install nftables and iproute2 (apt-get), or create \
                 sandboxes with --no-network (KILN_NETWORK=none for every sandbox)"
            ))
        } else {
            io_err(format!("run {prog}"))(e)
        }
    })?;
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("wait for {prog}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Command {
            cmd: cmd(),
            detail: err.lines().take(6).collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread that has entered namespace `ns` (/proc/sys/net and sockets there).
pub fn within<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = open(ns)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) of this thread only; the thread ends right after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io_err(format!("enter network namespace {ns}"))(
                    std::io::Error::last_os_error(),
                ));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Invalid("network namespace worker panicked".into())))
    })
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&p, value).map_err(io_err(format!("write {p}")))
}
