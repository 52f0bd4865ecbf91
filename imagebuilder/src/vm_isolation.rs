//! `--isolation=vm`: a RUN step inside a Linux microVM through the guest agent.
//!
//! Per step: the step's input root (the merged stage tree) becomes a fresh ext4 disk with the
//! agent at [`AGENT_PATH`]; a microVM boots the guest kernel with the agent as init, the command
//! runs through `kiln_agent::client::exec` over vsock (streamed output, exit status), the guest
//! syncs, the VM stops, and the disk's tree is read back (`debugfs rdump`) and compared with the
//! input root. Every difference is applied to that root, so when the root is the stage's
//! overlay mount the step's result lands in its upper directory (deletions become whiteouts)
//! exactly as with the namespace sandbox, and the builder turns it into a layer the same way.
//!
//! Needs a host whose KVM boots stock Linux guests (VT-x/AMD-V), a guest kernel
//! (`--kernel`, `KILN_GUEST_KERNEL`, else the cache of `scripts/linux-guest/build-kernel`) and a static
//! `kiln-agent` (`KILN_AGENT`, else next to the running binary). On PVM hosts it refuses.
//!
//! Not carried over from the namespace sandbox: network (the VM has no network device),
//! `RUN --mount`, and non-root `USER` (the agent execs as root). Read back from ext4 by debugfs:
//! regular files, directories and symlinks with mode, owner and mtime; hard links come back as
//! copies, xattrs are not compared, and device nodes or FIFOs the guest deletes stay.

use crate::error::{Error, IoCtx, Result};
use crate::step_jail::{RunOutcome, RunSpec};
use kiln_agent::protocol::{ExecRequest, Kind, AGENT_PORT};
use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the agent sits on the step's disk (removed from the result).
pub const AGENT_DIR: &str = ".kiln";
pub const AGENT_PATH: &str = "/.kiln/agent";
/// How long the guest may take from VM start to the agent answering.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MEM: u64 = 1 << 30;
/// Free room on the step's disk beyond its content (sparse: costs nothing until written).
const DISK_HEADROOM: u64 = 4 << 30;

/// Why this host cannot run Linux guests, if it cannot.
pub fn linux_guest_unsupported() -> Option<String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm is not usable".into());
    }
    kiln_vmm::host::kvm_is_pvm().then(|| "/dev/kvm is PVM; stock Linux guests cannot boot".into())
}

/// The guest kernel: `explicit` (`--kernel`), else `KILN_GUEST_KERNEL`, else a cached
/// build-kernel result.
pub fn guest_kernel(explicit: Option<&Path>) -> Result<PathBuf> {
    use kiln_vmm::host::KernelNotFound;
    kiln_vmm::host::guest_kernel(explicit).map_err(|e| match e {
        KernelNotFound::Missing { .. } => Error::Build(e.to_string()),
        KernelNotFound::NoneCached { cache } => Error::Build(format!(
            "--isolation=vm needs a guest kernel: none in {} and KILN_GUEST_KERNEL is unset; \
                 build one with scripts/linux-guest/build-kernel (about 12 minutes)",
            cache.display()
        )),
    })
}

/// The static agent (see [`kiln_vmm::host::static_agent`]) for the running binary. It runs
/// as init on arbitrary images, so it must be statically linked.
pub fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Build(format!("guest agent: current executable: {e}")))?;
    kiln_vmm::host::static_agent(&exe).map_err(|e| Error::Build(format!("guest agent: {e}")))
}

/// The guest's kernel command line (the VMM appends its virtio-mmio devices).
pub fn guest_cmdline() -> String {
    format!("console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4 init={AGENT_PATH}")
}

/// Everything a VM step needs that does not depend on the step; checked before a build starts.
pub struct VmEnv {
    pub kernel: PathBuf,
    pub agent: PathBuf,
    /// [`guest_cmdline`] for Linux; tests boot other guests with their own.
    pub cmdline: String,
    /// Kernel for Linux; tests run the freestanding test guest at User on PVM hosts.
    pub entry: kiln_vmm::EntryMode,
}

/// Checks the host, the kernel and the agent, with a clear error for the first that is missing.
pub fn check(kernel: Option<&Path>) -> Result<VmEnv> {
    if let Some(why) = linux_guest_unsupported() {
        return Err(Error::Build(format!(
            "--isolation=vm runs RUN steps in a microVM through the guest agent, which needs a \
             host that can boot Linux guests (hardware virtualization): {why}; use \
             --isolation=namespace here"
        )));
    }
    Ok(VmEnv {
        kernel: guest_kernel(kernel)?,
        agent: agent_binary()?,
        cmdline: guest_cmdline(),
        entry: kiln_vmm::EntryMode::Kernel,
    })
}

fn tool(cmd: &mut Command, what: &str) -> Result<std::process::Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Build(format!("cannot run {what} (install e2fsprogs): {e}")))?;
    Ok(out)
}

/// Makes `out` an ext4 disk of `root` with `agent` at [`AGENT_PATH`].
pub fn make_disk(root: &Path, agent: &Path, out: &Path) -> Result<()> {
    if std::fs::symlink_metadata(root.join(AGENT_DIR)).is_ok() {
        return Err(Error::Build(format!(
            "the root already has /{AGENT_DIR}, which --isolation=vm reserves for the agent"
        )));
    }
    let (bytes, inodes) = crate::ext4::tree_bytes(root)?;
    let size = crate::ext4::disk_size_for(bytes) + DISK_HEADROOM;
    let _ = std::fs::remove_file(out);
    let f = std::fs::File::create(out).ctx("create", out)?;
    f.set_len(size).ctx("truncate", out)?;
    drop(f);
    // Plain mkfs (no fixed times): mtimes must survive so the read-back diff sees only changes.
    let o = tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0"])
            .args(["-N", &(inodes * 2 + 65536).to_string()])
            .args(["-E", "root_owner=0:0,nodiscard", "-d"])
            .arg(root)
            .arg(out),
        "mkfs.ext4",
    )?;
    if !o.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(Error::Mkfs(
            String::from_utf8_lossy(&o.stderr).trim().into(),
        ));
    }
    let agent_s = agent
        .to_str()
        .filter(|s| !s.contains(['"', '\n']))
        .ok_or_else(|| Error::Invalid(format!("agent path {}", agent.display())))?;
    let script = format!(
        "mkdir /{AGENT_DIR}\nwrite \"{agent_s}\" {AGENT_PATH}\nsif {AGENT_PATH} mode 0100755\n\
         sif {AGENT_PATH} uid 0\nsif {AGENT_PATH} gid 0\n"
    );
    debugfs_w(out, &script)?;
    Ok(())
}

fn debugfs_w(disk: &Path, script: &str) -> Result<()> {
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Build(format!("cannot run debugfs (install e2fsprogs): {e}")))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .ctx("write", "debugfs commands")?;
    let o = child.wait_with_output().ctx("wait", "debugfs")?;
    let err = String::from_utf8_lossy(&o.stderr);
    // debugfs exits 0 even when a command fails; its errors are on stderr after the banner.
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !o.status.success() || !errors.is_empty() {
        return Err(Error::Build(format!("debugfs: {}", errors.join("; "))));
    }
    Ok(())
}

/// Replays the journal of a disk the guest left and dumps its tree into `out` (created).
pub fn read_back(disk: &Path, out: &Path) -> Result<()> {
    let o = tool(Command::new("e2fsck").arg("-fy").arg(disk), "e2fsck")?;
    // 0: clean, 1: errors corrected (e.g. the journal replayed); more is damage.
    if !matches!(o.status.code(), Some(0 | 1)) {
        return Err(Error::Build(format!(
            "the step's disk is damaged after the VM ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim()
        )));
    }
    std::fs::create_dir_all(out).ctx("mkdir", out)?;
    let o = tool(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / \"{}\"", out.display()))
            .arg(disk),
        "debugfs",
    )?;
    if !o.status.success() {
        return Err(Error::Build(format!(
            "debugfs rdump: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// What [`apply_changes`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub written: Vec<String>,
    pub removed: Vec<String>,
}

/// Makes `root` look like `new` (a read-back tree): entries that differ in kind, mode, owner,
/// size, mtime (seconds), link target or content are replaced, entries `new` lacks are removed.
/// Skips the agent's directory and a `lost+found` mkfs made. Device nodes, FIFOs and sockets in
/// `root` are kept (debugfs does not dump them).
pub fn apply_changes(new: &Path, root: &Path) -> Result<Changes> {
    let mut ch = Changes::default();
    walk(new, root, "", &mut ch)?;
    Ok(ch)
}

fn walk(new: &Path, root: &Path, rel: &str, ch: &mut Changes) -> Result<()> {
    let nd = new.join(rel);
    let od = root.join(rel);
    let mut names = BTreeMap::new();
    for e in std::fs::read_dir(&nd).ctx("read dir", &nd)? {
        let e = e.ctx("read dir", &nd)?;
        names.insert(e.file_name(), true);
    }
    for e in std::fs::read_dir(&od).ctx("read dir", &od)? {
        let e = e.ctx("read dir", &od)?;
        names.entry(e.file_name()).or_insert(false);
    }
    for (name, in_new) in names {
        let name_s = name.to_string_lossy();
        let r = if rel.is_empty() {
            name_s.to_string()
        } else {
            format!("{rel}/{name_s}")
        };
        if rel.is_empty() && name_s == AGENT_DIR {
            continue;
        }
        let (np, op) = (new.join(&r), root.join(&r));
        let om = std::fs::symlink_metadata(&op).ok();
        if !in_new {
            let Some(om) = om else { continue };
            let ft = om.file_type();
            if ft.is_dir() {
                std::fs::remove_dir_all(&op).ctx("remove", &op)?;
            } else if ft.is_file() || ft.is_symlink() {
                std::fs::remove_file(&op).ctx("remove", &op)?;
            } else {
                continue; // special file: not dumped, so not known to be deleted
            }
            ch.removed.push(r);
            continue;
        }
        let nm = std::fs::symlink_metadata(&np).ctx("lstat", &np)?;
        if rel.is_empty() && name_s == "lost+found" && om.is_none() {
            continue;
        }
        if nm.is_dir() {
            let fresh = !matches!(&om, Some(m) if m.is_dir());
            if fresh {
                remove_any(&op, om.as_ref())?;
                std::fs::create_dir(&op).ctx("mkdir", &op)?;
            }
            walk(new, root, &r, ch)?;
            // After the children: creating them changed the directory's mtime.
            if fresh || !om.as_ref().is_some_and(|m| same_meta(&nm, m)) {
                set_meta(&np, &op, &nm)?;
                ch.written.push(r);
            }
            continue;
        }
        if let Some(m) = &om {
            if same_entry(&np, &nm, &op, m)? {
                continue;
            }
        }
        remove_any(&op, om.as_ref())?;
        if nm.file_type().is_symlink() {
            let t = std::fs::read_link(&np).ctx("readlink", &np)?;
            std::os::unix::fs::symlink(&t, &op).ctx("symlink", &op)?;
        } else {
            std::fs::copy(&np, &op).ctx("copy to", &op)?;
        }
        set_meta(&np, &op, &nm)?;
        ch.written.push(r);
    }
    Ok(())
}

fn remove_any(p: &Path, m: Option<&std::fs::Metadata>) -> Result<()> {
    match m {
        None => Ok(()),
        Some(m) if m.is_dir() => std::fs::remove_dir_all(p).ctx("remove", p),
        Some(_) => std::fs::remove_file(p).ctx("remove", p),
    }
}

fn same_meta(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.mode() == b.mode() && a.uid() == b.uid() && a.gid() == b.gid()
}

fn same_entry(
    np: &Path,
    nm: &std::fs::Metadata,
    op: &Path,
    om: &std::fs::Metadata,
) -> Result<bool> {
    if !same_meta(nm, om) {
        return Ok(false);
    }
    if nm.file_type().is_symlink() {
        return Ok(std::fs::read_link(np).ok() == std::fs::read_link(op).ok());
    }
    if !nm.is_file() || nm.len() != om.len() || nm.mtime() != om.mtime() {
        return Ok(false);
    }
    same_content(np, op)
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let mut fa = BufReader::new(std::fs::File::open(a).ctx("open", a)?);
    let mut fb = BufReader::new(std::fs::File::open(b).ctx("open", b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let n = fa.read(&mut ba).ctx("read", a)?;
        if n == 0 {
            return Ok(fb.read(&mut bb[..1]).ctx("read", b)? == 0);
        }
        fb.read_exact(&mut bb[..n]).ctx("read", b)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Copies mode, owner and mtime of `src` (already lstat'ed as `m`) to `dst`.
fn set_meta(_src: &Path, dst: &Path, m: &std::fs::Metadata) -> Result<()> {
    std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid())).ctx("chown", dst)?;
    if !m.file_type().is_symlink() {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))
            .ctx("chmod", dst)?;
    }
    let t = std::fs::FileTimes::new().set_modified(m.modified().ctx("mtime", dst)?);
    if !m.file_type().is_symlink() {
        let f = std::fs::File::options()
            .read(true)
            .open(dst)
            .ctx("open", dst)?;
        f.set_times(t).ctx("set times", dst)?;
    }
    Ok(())
}

/// Runs one RUN step in a microVM; `work` holds its disk while it runs. Same outcome as
/// [`crate::step_jail::run`]: the changes are in `spec.rootfs` afterwards.
pub fn run(
    spec: &RunSpec,
    env: &VmEnv,
    work: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<RunOutcome> {
    if spec.argv.is_empty() {
        return Err(Error::Build("empty command".into()));
    }
    if !spec.mounts.is_empty() {
        return Err(Error::Build(
            "RUN --mount is not supported with --isolation=vm".into(),
        ));
    }
    if let Some(u) = spec.user.as_deref().filter(|u| !u.is_empty()) {
        let id = crate::step_jail::resolve_user(&spec.rootfs, u)?;
        if (id.uid, id.gid) != (0, 0) {
            return Err(Error::Build(format!(
                "USER {u} with --isolation=vm: the guest agent runs commands as root only"
            )));
        }
    }
    if spec.network {
        tracing::warn!("--isolation=vm: RUN steps have no network (the VM has no network device)");
    }
    let dir = tempfile::Builder::new()
        .prefix("vmstep-")
        .tempdir_in(work)
        .ctx("create dir in", work)?;
    let disk = dir.path().join("root.ext4");
    make_disk(&spec.rootfs, &env.agent, &disk)?;
    let outcome = run_vm(spec, env, dir.path(), &disk, on_line)?;
    if !outcome.success {
        return Ok(outcome); // the build fails; nothing to read back
    }
    let back = dir.path().join("back");
    read_back(&disk, &back)?;
    let ch = apply_changes(&back, &spec.rootfs)?;
    tracing::debug!(
        written = ch.written.len(),
        removed = ch.removed.len(),
        "VM step read back"
    );
    Ok(outcome)
}

fn run_vm(
    spec: &RunSpec,
    env: &VmEnv,
    dir: &Path,
    disk: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<RunOutcome> {
    use kiln_vmm::devices::virtio::block::{Block, DiskBackend};
    let verr = |e: &dyn std::fmt::Display| Error::Build(format!("microVM: {e}"));
    let serial = dir.join("serial.log");
    let uds = dir.join("vsock.sock");
    let config = kiln_vmm::VmConfig {
        mem_bytes: spec.memory_max.unwrap_or(DEFAULT_MEM).max(128 << 20),
        vcpus: std::thread::available_parallelism()
            .map(|n| n.get().min(4) as u8)
            .unwrap_or(1),
        kernel: Some(env.kernel.clone()),
        initrd: None,
        cmdline: env.cmdline.clone(),
        serial_log: Some(serial.clone()),
        serial_stdout: false,
        track_dirty_pages: false,
    };
    let mut vm =
        kiln_vmm::Vm::new(config, kiln_vmm::GuestMemorySource::Anonymous).map_err(|e| verr(&e))?;
    let backend = DiskBackend::File {
        path: disk.to_path_buf(),
        engine: Default::default(),
        direct: false,
    };
    let blk = Block::new("root", backend, false).map_err(|e| verr(&e))?;
    vm.add_virtio_device(Box::new(blk)).map_err(|e| verr(&e))?;
    let vsock = kiln_vmm::devices::virtio::vsock::Vsock::new(3, &uds).map_err(|e| verr(&e))?;
    vm.add_virtio_device(Box::new(vsock))
        .map_err(|e| verr(&e))?;
    vm.set_entry_mode(env.entry);
    vm.boot().map_err(|e| verr(&e))?;
    vm.start().map_err(|e| verr(&e))?;
    let result = exec_in_guest(&vm, spec, &uds, on_line);
    vm.stop();
    let _ = vm.wait_timeout(Duration::from_secs(10));
    result.map_err(|e| {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::Build(format!(
            "{e}\n--- guest console (last lines) ---\n{}",
            tail.join("\n")
        ))
    })
}

/// Connects to the agent through the vsock device's Unix socket (Firecracker's `CONNECT`).
fn connect(
    vm: &kiln_vmm::Vm,
    uds: &Path,
    deadline: Instant,
) -> std::result::Result<UnixStream, String> {
    loop {
        if let kiln_vmm::RunState::Exited(r) = vm.state() {
            return Err(format!("the guest ended before its agent answered: {r:?}"));
        }
        let attempt =
            kiln_vmm::devices::virtio::vsock::connect_port(uds, AGENT_PORT, Duration::from_secs(2));
        if let Ok(s) = attempt {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the guest agent did not answer on vsock port {AGENT_PORT} within {}s",
                BOOT_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exec_in_guest(
    vm: &kiln_vmm::Vm,
    spec: &RunSpec,
    uds: &Path,
    on_line: &mut dyn FnMut(&str),
) -> std::result::Result<RunOutcome, String> {
    // If the guest dies (panic, reset, PVM-style internal error) while a request is in flight,
    // nothing would ever answer it: a watcher shuts the connection down when the VM ends.
    let current: std::sync::Mutex<Option<UnixStream>> = Default::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if vm.wait_timeout(Duration::from_millis(200)).is_some() {
                    if let Some(s) = current.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    return;
                }
            }
        });
        let attach = |s: UnixStream| -> std::result::Result<UnixStream, String> {
            let c = s
                .try_clone()
                .map_err(|e| format!("vsock connection: {e}"))?;
            *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
            if let kiln_vmm::RunState::Exited(r) = vm.state() {
                return Err(format!("the guest ended: {r:?}"));
            }
            Ok(s)
        };
        let r = (|| {
            let mut s = attach(connect(vm, uds, Instant::now() + BOOT_TIMEOUT)?)?;
            let (status, tail) =
                exec_streaming(&mut s, &exec_request(spec), spec.stdin.as_deref(), on_line)
                    .map_err(|e| format!("exec in the guest: {e}"))?;
            // Everything the command wrote must be on the disk before the VM stops.
            let mut s = attach(connect(vm, uds, Instant::now() + Duration::from_secs(10))?)?;
            let sync = ExecRequest {
                argv: vec!["sync".into()],
                ..Default::default()
            };
            let (st, _) = exec_streaming(&mut s, &sync, None, &mut |_| {}).map_err(|e| {
                format!("sync in the guest (the image needs a `sync` program): {e}")
            })?;
            if st.code != Some(0) {
                return Err(format!("sync in the guest failed: {st:?}"));
            }
            Ok(outcome(status, tail))
        })();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
}

/// The agent request for a RUN spec (env as `K=V` list, workdir as cwd).
pub fn exec_request(spec: &RunSpec) -> ExecRequest {
    ExecRequest {
        argv: spec.argv.clone(),
        env: spec
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cwd: Some(spec.workdir.clone()),
        ..Default::default()
    }
}

/// Runs `req` over `stream`, passing complete output lines to `on_line`; returns the exit
/// status and the last lines.
pub fn exec_streaming<S: Read + Write>(
    stream: &mut S,
    req: &ExecRequest,
    stdin: Option<&[u8]>,
    on_line: &mut dyn FnMut(&str),
) -> std::result::Result<(kiln_agent::protocol::ExitStatus, String), kiln_agent::client::ClientError>
{
    // One partial line per stream: the agent reads stdout and stderr from separate pipes, so
    // their chunks arrive in any order, and a line must never mix the two.
    let mut pending: [Vec<u8>; 2] = Default::default();
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut emit = |line: &[u8], tail: &mut std::collections::VecDeque<String>| {
        let s = String::from_utf8_lossy(line).into_owned();
        on_line(&s);
        tail.push_back(s);
        if tail.len() > 40 {
            tail.pop_front();
        }
    };
    // stdout and stderr interleave line by line into one stream, as in the namespace sandbox.
    let out = kiln_agent::client::exec(stream, req, stdin.unwrap_or_default(), |kind, data| {
        let pending = match kind {
            Kind::Stdout => &mut pending[0],
            Kind::Stderr => &mut pending[1],
            _ => return,
        };
        pending.extend_from_slice(data);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            emit(&line[..line.len() - 1], &mut tail);
        }
    })?;
    for p in pending.iter().filter(|p| !p.is_empty()) {
        emit(p, &mut tail);
    }
    Ok((out.status, tail.into_iter().collect::<Vec<_>>().join("\n")))
}

fn outcome(status: kiln_agent::protocol::ExitStatus, tail: String) -> RunOutcome {
    let desc = match (status.code, status.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "an unknown status".into(),
    };
    RunOutcome {
        success: status.code == Some(0),
        status: desc,
        tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_boots_the_agent_from_the_root_disk() {
        let c = guest_cmdline();
        assert!(c.contains("root=/dev/vda rw"), "{c}");
        assert!(c.contains("init=/.kiln/agent"), "{c}");
        assert!(c.contains("console=ttyS0"), "{c}");
    }

    #[test]
    fn exit_status_maps_like_the_sandbox() {
        let st = |code, signal| kiln_agent::protocol::ExitStatus { code, signal };
        assert!(outcome(st(Some(0), None), String::new()).success);
        let o = outcome(st(Some(7), None), "x".into());
        assert!(!o.success);
        assert_eq!(o.status, "exit code 7");
        assert_eq!(outcome(st(None, Some(9)), String::new()).status, "signal 9");
    }
}
