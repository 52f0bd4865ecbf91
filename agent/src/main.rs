//! `kiln-agent [--unix PATH [--resume FILE] [--memory-mib N] [--pids-max N] | --vsock PORT]`
//!
//! As PID 1 (the guest's init, e.g. `init=/sbin/kiln-agent` with the image's root disk mounted
//! by the kernel) it first mounts /proc, /sys, /dev, /dev/pts, /tmp and /run, then any
//! `kiln.mount=<device>:<dir>` from the kernel command line (ext4), starts the generation watcher
//! (`genid`: reseed and clock after a restore), and serves vsock port 10000.
//! Started from an initramfs (`rdinit=/init`, the way kiln's microvm driver brings it in without
//! touching the image) with `kiln.root=<device>` on the command line, it first mounts that
//! device (ext4) and makes it the root (mount move + chroot; the agent keeps running from its
//! initramfs copy), then goes on as above.
//! As PID 1 with `--unix PATH` (the init of a gVisor sandbox, whose runtime did the mounts) it
//! mounts only its own `/proc` (see `gvisor_init`), watches no generation page, and once it
//! listens it points its stdio at /dev/null: they are the host's console log, which any root
//! process in the sandbox could otherwise write without bound through /proc/1/fd.
//! `--resume FILE`: see `server::quiesce`. `--memory-mib N` starts the sandbox's out-of-memory
//! killer and `--pids-max N` bounds the tasks of the processes it starts (see
//! `kiln_agent::limits`). Elsewhere it serves the given Unix socket or vsock port (for tests
//! and development). In every case a reaper thread collects every child, orphans included,
//! and PID 1 never exits. One thread per connection; one request per
//! connection (see `protocol`).

use kiln_agent::protocol::AGENT_PORT;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pid1 = std::process::id() == 1;
    let unix = args.get(1).map(String::as_str) == Some("--unix");
    let options = match unix {
        true => UnixOptions::parse(args.get(3..).unwrap_or_default()),
        false => Ok(UnixOptions::default()),
    };
    if pid1 && unix {
        // First: capabilities are per thread, and init() starts the reaper.
        let pids_max = options.as_ref().ok().and_then(|o| o.pids_max);
        if let Err(e) = kiln_agent::gvisor_init::init(pids_max) {
            eprintln!("kiln-agent: {e}");
        }
    }
    kiln_agent::server::init();
    if pid1 && !unix {
        if let Err(e) = enter_kiln_root() {
            eprintln!("kiln-agent: {e}");
        }
        init_mounts();
        start_genid_watcher();
    }
    let result = match args.get(1).map(String::as_str) {
        Some("--unix") if args.len() >= 3 => match options {
            Ok(o) => {
                o.apply();
                serve_unix(&args[2], pid1)
            }
            Err(e) => Err(e),
        },
        Some("--vsock") if args.len() == 3 => match args[2].parse() {
            Ok(p) => serve_vsock(p),
            Err(_) => Err(format!("bad vsock port {:?}", args[2])),
        },
        None if pid1 => serve_vsock(AGENT_PORT),
        _ => Err(USAGE.into()),
    };
    if let Err(e) = result {
        eprintln!("kiln-agent: {e}");
        if pid1 {
            // PID 1 must not exit (the kernel would panic); leave a clear message and idle.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        std::process::exit(1);
    }
}

const USAGE: &str =
    "usage: kiln-agent [--unix PATH [--resume FILE] [--memory-mib N] [--pids-max N] | --vsock PORT]";

/// The options after `--unix PATH`.
#[derive(Default)]
struct UnixOptions {
    resume: Option<String>,
    memory_mib: Option<u64>,
    /// Applied by `gvisor_init` (it needs `CAP_SYS_ADMIN`, given up there).
    pids_max: Option<u64>,
}

impl UnixOptions {
    fn parse(opts: &[String]) -> Result<UnixOptions, String> {
        let number = |v: &str, what: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("bad {what} {v:?}"))
        };
        let mut o = UnixOptions::default();
        for pair in opts.chunks(2) {
            let [flag, value] = pair else {
                return Err(USAGE.into());
            };
            match flag.as_str() {
                "--resume" => o.resume = Some(value.clone()),
                "--memory-mib" => o.memory_mib = Some(number(value, "--memory-mib")?),
                "--pids-max" => o.pids_max = Some(number(value, "--pids-max")?),
                _ => return Err(USAGE.into()),
            }
        }
        Ok(o)
    }

    /// Starts what the options ask for (after `gvisor_init`: threads inherit capabilities).
    fn apply(&self) {
        if let Some(f) = &self.resume {
            kiln_agent::server::quiesce::set_resume_file(Some(std::path::Path::new(f)));
        }
        if let Some(m) = self.memory_mib {
            kiln_agent::limits::start_oom_killer(m.saturating_mul(1 << 20));
        }
        kiln_agent::limits::start_task_watch();
    }
}

/// Reseeds the RNG and sets the clock whenever the VM is restored or forked.
fn start_genid_watcher() {
    use kiln_agent::genid;
    match genid::MappedPage::open(std::path::Path::new("/dev/mem"), genid::GENID_BASE) {
        Ok(page) => {
            let _ = std::thread::Builder::new()
                .name("genid".into())
                .spawn(move || genid::watch_forever(page));
        }
        Err(e) => eprintln!("kiln-agent: not watching the VM generation: {e}"),
    }
}

fn mount(src: &str, dst: &str, fstype: &str, flags: libc::c_ulong) -> Result<(), String> {
    let _ = std::fs::create_dir_all(dst);
    let c = |s: &str| CString::new(s).map_err(|_| format!("NUL in {s:?}"));
    let (s, d, t) = (c(src)?, c(dst)?, c(fstype)?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), t.as_ptr(), flags, std::ptr::null()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(format!("mount {src} on {dst}: {e}"));
        }
    }
    Ok(())
}

/// With `kiln.root=<device>` on the kernel command line: mount it and make it `/`.
fn enter_kiln_root() -> Result<(), String> {
    mount("proc", "/proc", "proc", 0)?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(dev) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.root="))
    else {
        return Ok(());
    };
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID as libc::c_ulong,
    )?;
    mount(dev, "/newroot", "ext4", 0)?;
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (newroot, dot, slash) = (c("/newroot"), c("."), c("/"));
    // SAFETY: valid NUL-terminated paths; MS_MOVE takes no fstype or data.
    let moved = unsafe {
        libc::chdir(newroot.as_ptr()) == 0
            && libc::mount(
                dot.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ) == 0
            && libc::chroot(dot.as_ptr()) == 0
            && libc::chdir(slash.as_ptr()) == 0
    };
    if !moved {
        return Err(format!(
            "switching the root to {dev}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn init_mounts() {
    let nodev = (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC) as libc::c_ulong;
    for (src, dst, fs, flags) in [
        ("proc", "/proc", "proc", nodev),
        ("sysfs", "/sys", "sysfs", nodev),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            libc::MS_NOSUID as libc::c_ulong,
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID as libc::c_ulong,
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            (libc::MS_NOSUID | libc::MS_NODEV) as libc::c_ulong,
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            (libc::MS_NOSUID | libc::MS_NODEV) as libc::c_ulong,
        ),
    ] {
        if let Err(e) = mount(src, dst, fs, flags) {
            eprintln!("kiln-agent: {e}");
        }
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for spec in cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("kiln.mount="))
    {
        match spec.split_once(':') {
            Some((dev, dir)) => {
                if let Err(e) = mount(dev, dir, "ext4", 0) {
                    eprintln!("kiln-agent: {e}");
                }
            }
            None => eprintln!("kiln-agent: bad kiln.mount={spec} (want <device>:<dir>)"),
        }
    }
}

fn spawn_conn(fd: OwnedFd) {
    let epoch = kiln_agent::server::quiesce::epoch();
    std::thread::spawn(move || {
        if let Err(e) = kiln_agent::server::serve_accepted(fd, epoch) {
            eprintln!("kiln-agent: connection: {e}");
        }
    });
}

/// Points stdin, stdout and stderr at /dev/null.
fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2(2) of our own open /dev/null over a standard descriptor.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
    }
}

/// Serves the Unix socket `path`; with `detach`, stdio goes to /dev/null once it listens.
fn serve_unix(path: &str, detach: bool) -> Result<(), String> {
    use kiln_agent::server::quiesce;
    let path = std::path::Path::new(path);
    let dir = path.parent().unwrap_or(std::path::Path::new("/"));
    let _ = std::fs::create_dir_all(dir);
    let mut listened = false;
    loop {
        let _ = std::fs::remove_file(path);
        let l = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if !listened => return Err(format!("bind {}: {e}", path.display())),
            // After a resume: a full /run/kiln may drain again; the agent must not end.
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        // Only the host (root) connects; the host sees the socket's mode.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        quiesce::set_listening(Some(path));
        if detach && !listened {
            detach_stdio();
        }
        listened = true;
        // Not a blocking accept: a quiesce cannot wake one (connecting to a host-created
        // socket from inside gVisor is not allowed), so the loop sleeps in poll on the
        // listener and the quiesce's wake pipe, and looks at the flag when either is ready.
        let wake = quiesce::wake_fd();
        let mut pfds = [
            libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&l),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Without a wake pipe, a timed poll is the only way to notice a quiesce.
        let timeout = if wake.is_some() { -1 } else { 5 };
        while !quiesce::quiescing() {
            // SAFETY: two valid pollfds (a negative fd is ignored by poll).
            if unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout) } <= 0 {
                continue;
            }
            if pfds[0].revents & libc::POLLIN == 0 {
                continue;
            }
            match l.accept() {
                Ok((s, _)) => spawn_conn(OwnedFd::from(s)),
                Err(e) => {
                    eprintln!("kiln-agent: accept: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        quiesce::drain_wake();
        // A quiesce: no socket of ours may stay open across the checkpoint.
        drop(l);
        let _ = std::fs::remove_file(path);
        quiesce::set_listening(None);
        quiesce::wait_for_resume(dir);
    }
}

fn serve_vsock(port: u32) -> Result<(), String> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("vsock socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    if unsafe { libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) } != 0
        // SAFETY: listen on our bound socket.
        || unsafe { libc::listen(fd, 64) } != 0
    {
        return Err(format!(
            "vsock port {port}: {}",
            std::io::Error::last_os_error()
        ));
    }
    loop {
        // SAFETY: accept on our listening socket; null address pointers are allowed.
        let c = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            eprintln!(
                "kiln-agent: vsock accept: {}",
                std::io::Error::last_os_error()
            );
            continue;
        }
        // SAFETY: c is a fresh connected socket we now own.
        spawn_conn(unsafe { OwnedFd::from_raw_fd(c) });
        let _ = &sock;
    }
}
