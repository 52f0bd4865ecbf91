//! Processes: spawning (user switching, pseudo-terminals), the process table with a bounded
//! output buffer per process, the reaper, and the requests that name a process.
//!
//! Output flows from one pump thread per pipe (or pty) into the process's buffer, and from the
//! buffer to every attached connection. A pump waits rather than drop output an attached
//! connection has not sent yet, so a slow client blocks the process on its pipe; with nobody
//! attached the oldest output is dropped. Memory per process is bounded by [`RING_BYTES`].
//!
//! A finished process leaves nothing behind (a sandbox's checkpoint must not grow with its
//! history): once the connection that started it has received its end, it leaves the table;
//! otherwise (its client went away) it stays for reconnects, at most [`KEEP_EXITED`] of them
//! and for at most [`EXITED_TTL`], its buffer shrunk to what it holds.

use super::{fail, io_fail, read_data, send, send_json, watch_conn, Conn, Res};
use crate::children;
use crate::protocol::*;
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const READ_CHUNK: usize = 64 * 1024;
/// After a process exited, how long its pipes may stay quiet before they count as abandoned
/// (held open by a process it left behind, e.g. `sh -c "server &"`): its output then ends.
const ABANDON_AFTER: Duration = Duration::from_millis(500);
/// The subscriber id of the connection that started a process.
const OWNER: u64 = 0;
/// How long an exited process whose end nobody received stays for reconnects.
const EXITED_TTL: Duration = Duration::from_secs(600);

struct Chunk {
    off: u64,
    kind: Kind,
    data: Vec<u8>,
}

struct State {
    info: ProcessInfo,
    chunks: VecDeque<Chunk>,
    /// Stream offset of the first buffered byte (the count of bytes dropped).
    start: u64,
    /// Stream offset after the last byte.
    end: u64,
    /// Attached connections: id -> the stream offset they have sent up to.
    subs: HashMap<u64, u64>,
    next_sub: u64,
    open_pumps: usize,
    /// The write side of the process's stdin (the pty master on a tty).
    stdin: Option<Arc<File>>,
    pty: Option<Arc<File>>,
    retired: bool,
    last_output: Instant,
    /// Pumps waiting for a slow connection (their pipes may hold more output).
    waiting_pumps: usize,
    /// The process exited and its open pipes stayed quiet: see [`ABANDON_AFTER`].
    abandoned: bool,
    /// Out of the table: output that comes later (on pipes a process left behind holds) is
    /// dropped once no connection is attached.
    forgotten: bool,
}

impl State {
    /// A process just started, with `pumps` output pipes and the owner attached at 0.
    fn new(
        info: ProcessInfo,
        pumps: usize,
        stdin: Option<Arc<File>>,
        pty: Option<Arc<File>>,
    ) -> State {
        State {
            info,
            chunks: VecDeque::new(),
            start: 0,
            end: 0,
            subs: HashMap::from([(OWNER, 0)]),
            next_sub: OWNER + 1,
            open_pumps: pumps,
            stdin,
            pty,
            retired: false,
            last_output: Instant::now(),
            waiting_pumps: 0,
            abandoned: false,
            forgotten: false,
        }
    }

    /// Exited, and all its output is in the buffer (what comes later on abandoned pipes is
    /// still buffered, for `Connect`).
    fn done(&self) -> bool {
        self.info.exit.is_some() && (self.open_pumps == 0 || self.abandoned)
    }

    /// Appends output, into the last chunk while it is small and of the same kind (a process
    /// writing a byte at a time must not cost a chunk per byte); drops the oldest output
    /// beyond [`RING_BYTES`].
    fn append(&mut self, kind: Kind, data: &[u8]) {
        let off = self.end;
        match self.chunks.back_mut() {
            Some(last) if last.kind == kind && last.data.len() + data.len() <= READ_CHUNK => {
                last.data.extend_from_slice(data)
            }
            _ => self.chunks.push_back(Chunk {
                off,
                kind,
                data: data.to_vec(),
            }),
        }
        self.end += data.len() as u64;
        // Whole chunks only, none an attached connection has not sent all of (a pump waits
        // for them, see `push`): at most RING_BYTES plus one chunk stays.
        let sent = self.subs.values().copied().min().unwrap_or(u64::MAX);
        while self.end - self.start > RING_BYTES as u64 {
            match self.chunks.front() {
                Some(c) if c.off + c.data.len() as u64 <= sent => {
                    self.start += c.data.len() as u64;
                    self.chunks.pop_front();
                }
                _ => break,
            }
        }
        self.info.dropped = self.start;
    }

    /// The output from stream offset `pos` on, within one chunk: (its offset, kind, bytes).
    /// Output dropped before `pos` is skipped (the first chunk held is sent).
    fn output_at(&self, pos: u64) -> Option<(u64, Kind, &[u8])> {
        let i = self
            .chunks
            .partition_point(|ch| ch.off + ch.data.len() as u64 <= pos);
        let ch = self.chunks.get(i)?;
        let from = pos.saturating_sub(ch.off) as usize;
        Some((ch.off + from as u64, ch.kind, &ch.data[from..]))
    }

    /// Gives back the memory a finished process's buffer no longer needs; all of it once
    /// nobody can read it any more.
    fn compact(&mut self) {
        if self.forgotten && self.subs.is_empty() {
            self.chunks = VecDeque::new();
            self.start = self.end;
            return;
        }
        for c in &mut self.chunks {
            c.data.shrink_to_fit();
        }
        self.chunks.shrink_to_fit();
    }
}

struct Proc {
    pid: i32,
    seq: u64,
    tag: Option<String>,
    st: Mutex<State>,
    cv: Condvar,
}

impl Proc {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Table {
    procs: HashMap<i32, Arc<Proc>>,
    /// Exited processes kept for reconnects, oldest first: (pid, seq, when retired).
    exited: VecDeque<(i32, u64, Instant)>,
    next_seq: u64,
}

impl Table {
    /// Takes `p` out of the table (a pid seen again is another process: left alone).
    fn forget(&mut self, p: &Proc) {
        if self.procs.get(&p.pid).is_some_and(|q| q.seq == p.seq) {
            self.procs.remove(&p.pid);
        }
        self.exited
            .retain(|&(pid, seq, _)| (pid, seq) != (p.pid, p.seq));
        let mut s = p.lock();
        s.forgotten = true;
        s.compact();
    }

    /// Forgets the exited processes beyond [`KEEP_EXITED`] and those older than
    /// [`EXITED_TTL`].
    fn prune(&mut self) {
        while let Some(&(pid, seq, at)) = self.exited.front() {
            if self.exited.len() <= KEEP_EXITED && at.elapsed() < EXITED_TTL {
                break;
            }
            self.exited.pop_front();
            if let Some(p) = self.procs.get(&pid).filter(|q| q.seq == seq).cloned() {
                self.forget(&p);
            }
        }
    }
}

/// Lock order: the table, then a process's state (never the other way round).
fn table() -> MutexGuard<'static, Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Starts the thread that reaps every child (as PID 1 that includes orphans re-parented to the
/// agent, so zombies never pile up) and records the status of the processes in the table.
pub fn start_reaper() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        std::thread::Builder::new()
            .spawn(|| {
                set_thread_name(c"reaper");
                reap_loop()
            })
            .expect("spawning the reaper thread");
    });
}

fn reap_loop() {
    loop {
        let seen = children::spawn_count();
        // Peek first (WNOWAIT), reap after: a spawn in progress holds the table lock and may
        // reap its own child whose exec failed (std and glibc's posix_spawn both do); reaping
        // it here first would make that spawn fail or panic.
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with a valid out-pointer; P_ALL waits for any child.
        let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // No children right now: sleep until the next spawn.
                Some(libc::ECHILD) => {
                    children::note_none(seen);
                    children::wait_while_none();
                }
                Some(libc::EINTR) => {}
                // Never seen; not a reason to spin, nor to think the agent alone.
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
            continue;
        }
        // SAFETY: waitid succeeded for an exited child, so si_pid is set.
        let peeked = unsafe { info.si_pid() };
        let guard = table();
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer, for the one child seen above.
        let pid = unsafe { libc::waitpid(peeked, &mut status, libc::WNOHANG) };
        drop(guard);
        if pid <= 0 {
            continue; // its spawner reaped it
        }
        let st = if libc::WIFEXITED(status) {
            ExitStatus {
                code: Some(libc::WEXITSTATUS(status)),
                signal: None,
            }
        } else if libc::WIFSIGNALED(status) {
            ExitStatus {
                code: None,
                signal: Some(libc::WTERMSIG(status)),
            }
        } else {
            continue;
        };
        // Spawning holds the table lock until the process is in it, so it is found here.
        let Some(p) = table().procs.get(&pid).cloned() else {
            continue;
        };
        let mut s = p.lock();
        if s.info.exit.is_some() {
            continue;
        }
        s.info.exit = Some(st);
        s.info.running = false;
        if s.pty.is_none() {
            s.stdin = None;
        }
        p.cv.notify_all();
        let retire = s.done();
        drop(s);
        if retire {
            retire_proc(&p);
        } else {
            std::thread::spawn(move || watch_abandoned(p));
        }
    }
}

/// Marks an exited process's pipes abandoned once they stay quiet (and no pump is waiting
/// for a slow connection, so nothing is left unread in them).
fn watch_abandoned(p: Arc<Proc>) {
    loop {
        std::thread::sleep(ABANDON_AFTER / 4);
        let mut s = p.lock();
        if s.open_pumps == 0 {
            return; // done the ordinary way
        }
        if s.waiting_pumps == 0 && s.last_output.elapsed() >= ABANDON_AFTER {
            s.abandoned = true;
            p.cv.notify_all();
            drop(s);
            retire_proc(&p);
            return;
        }
    }
}

/// Moves a finished process to the bounded list of exited ones (unless its owner already
/// received its end and it left the table).
fn retire_proc(p: &Arc<Proc>) {
    // The table first (the lock order), so that a concurrent `forget` sees either nothing or
    // the whole retirement.
    let mut t = table();
    {
        let mut s = p.lock();
        if s.retired {
            return;
        }
        s.retired = true;
        // Its tty is no longer needed (the buffer holds all output).
        s.pty = None;
        s.stdin = None;
        s.compact();
        if s.forgotten {
            return;
        }
    }
    t.exited.push_back((p.pid, p.seq, Instant::now()));
    t.prune();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The user `spec` names in this sandbox (the agent's root is the sandbox's root).
fn exec_user(spec: &str) -> Res<crate::users::Identity> {
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    let users = crate::users::Users::parse(&read("/etc/passwd"), &read("/etc/group"));
    users.exec_user(spec).map_err(|e| {
        let kind = match e {
            crate::users::UserError::Invalid(_) => ErrorKind::Invalid,
            _ => ErrorKind::NotFound,
        };
        super::Fail(ErrorReply::new(kind, e.to_string()))
    })
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn set_winsize(fd: &File, size: TtySize) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize, valid for the call; the fd is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ as _, &ws) } != 0 {
        return Err(last_err());
    }
    Ok(())
}

/// A new pseudo-terminal (master, slave), both close-on-exec, of `size`.
fn open_pty(size: TtySize) -> std::io::Result<(File, OwnedFd)> {
    // SAFETY: plain posix_openpt call; the result is checked.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(last_err());
    }
    // SAFETY: m is a fresh descriptor we own.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(m) });
    // SAFETY: grantpt/unlockpt on our master descriptor.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(last_err());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes at most name.len() bytes (NUL-terminated) into name.
    let r = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    // SAFETY: name is NUL-terminated (ptsname_r succeeded).
    let s = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(last_err());
    }
    // SAFETY: s is a fresh descriptor we own.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_winsize(&master, size)?;
    Ok((master, slave))
}

/// Where `prog` is, if it can be run: itself when it has a slash (relative to `cwd`), else the
/// first executable file of that name in `path`. Checked before spawning, because std's
/// fork-based spawn (used with a uid or a tty) reaps a child whose exec failed itself, and
/// asserts that it could: the reaper may have got there first.
fn resolve(prog: &str, path: &str, cwd: Option<&str>) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    let ok = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.contains('/') {
        let p = Path::new(prog);
        let at = match cwd {
            Some(cwd) if p.is_relative() => Path::new(cwd).join(p),
            _ => p.to_path_buf(),
        };
        ok(&at).then(|| p.to_path_buf())
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(prog))
            .find(|p| ok(p))
    }
}

/// The calling thread acting as a user until dropped, back to root then. Raw `set*id` system
/// calls change one thread (libc's change all of them), and the saved ids stay 0 so the thread
/// can come back; a process the thread starts meanwhile is born as the user (`execve` makes its
/// saved ids the user's too, and leaves it no capability). Start no thread while it is held.
struct ThreadAs {
    groups: Vec<libc::gid_t>,
}

impl ThreadAs {
    fn become_user(u: &crate::users::Identity) -> std::io::Result<ThreadAs> {
        let check = |r: libc::c_long| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let mut groups = vec![0 as libc::gid_t; 256];
        // SAFETY: getgroups writes at most `groups.len()` ids into the buffer.
        let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
        check(n as libc::c_long)?;
        groups.truncate(n as usize);
        // From here on, Drop puts back whatever changed.
        let back = ThreadAs { groups };
        // -1: the saved id stays (root).
        let keep = u32::MAX;
        // SAFETY: set*id system calls with integer arguments and a valid array of `len` ids.
        unsafe {
            check(libc::syscall(
                libc::SYS_setgroups,
                u.groups.len(),
                u.groups.as_ptr(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, u.gid, u.gid, keep))?;
            check(libc::syscall(libc::SYS_setresuid, u.uid, u.uid, keep))?;
        }
        Ok(back)
    }
}

impl Drop for ThreadAs {
    fn drop(&mut self) {
        // SAFETY: as in become_user; root first, which the saved uid allows.
        let ok = unsafe {
            libc::syscall(libc::SYS_setresuid, 0, 0, 0) == 0
                && libc::syscall(libc::SYS_setresgid, 0, 0, 0) == 0
                && libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()) == 0
        };
        if !ok {
            eprintln!(
                "kiln-agent: a thread could not become root again: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn spawn_fail(prog: &str, e: std::io::Error) -> super::Fail {
    super::Fail(ErrorReply::new(
        ErrorKind::of_io(&e),
        format!("exec {prog}: {e}"),
    ))
}

/// `cmd.spawn()`, its rare panic (see [`resolve`]) turned into an error.
fn spawn_guarded(cmd: &mut Command, prog: &str) -> Res<std::process::Child> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd.spawn())) {
        Ok(r) => {
            let child = r.map_err(|e| spawn_fail(prog, e))?;
            children::note_spawned();
            Ok(child)
        }
        Err(_) => fail(
            ErrorKind::Other,
            format!("exec {prog}: the program did not start"),
        ),
    }
}

/// Makes `cmd` switch to `u` (groups, gid, uid) and then enter `cwd` as that user, as runc
/// does. std's `uid`/`gid` would drop every supplementary group (and its `groups` is
/// unstable), so the switch is a pre_exec hook, after the cgroup write that needs root.
fn run_as(cmd: &mut Command, u: crate::users::Identity, cwd: Option<&str>) -> Res<()> {
    let Ok(cwd) = cwd.map(CString::new).transpose() else {
        return fail(ErrorKind::Invalid, "exec: a working directory with NUL");
    };
    // SAFETY: the closure only makes async-signal-safe calls (setgroups, setgid, setuid,
    // chdir) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Only root may set groups; an agent run unprivileged (tests) keeps its own.
            let ok = (libc::getuid() != 0
                || libc::setgroups(u.groups.len(), u.groups.as_ptr()) == 0)
                && libc::setgid(u.gid) == 0
                && libc::setuid(u.uid) == 0
                && cwd.as_ref().is_none_or(|c| libc::chdir(c.as_ptr()) == 0);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// Spawns `req` and puts it in the table, the owner (subscriber [`OWNER`]) attached at 0.
fn spawn(req: &ExecRequest) -> Res<Arc<Proc>> {
    let Some(prog) = req.argv.first() else {
        return fail(ErrorKind::Invalid, "exec: empty argv");
    };
    let user = match (&req.identity, req.user.as_deref()) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(spec)) => Some(exec_user(spec)?),
        (None, None) => None,
    };
    let path = req.env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    // Without a tty, this thread itself takes on the process's cgroup and user while it starts
    // it (`ThreadInWork`, `ThreadAs`), so std can start it with posix_spawn (a vfork) instead
    // of a fork, which in gVisor copies the agent's address space (from Python: fork + exec
    // 90 ms, posix_spawn 31 ms). std uses posix_spawn only for a program named by path when
    // PATH is set, so the agent looks it up itself.
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let in_thread = req.tty.is_none()
        && (user.is_none() || root)
        && (crate::limits::work_cgroup_fd().is_none() || crate::limits::ThreadInWork::usable());
    let Some(found) = resolve(prog, path, req.cwd.as_deref()) else {
        return fail(
            ErrorKind::NotFound,
            format!("exec {prog}: no such program (or not executable)"),
        );
    };
    let mut cmd = Command::new(if in_thread {
        found.as_os_str()
    } else {
        prog.as_ref()
    });
    cmd.arg0(prog)
        .args(&req.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH);
    if let Some(u) = &user {
        cmd.env("HOME", &u.home);
        if u.known {
            cmd.env("USER", &u.name).env("LOGNAME", &u.name);
        }
    }
    if req.tty.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    cmd.envs(&req.env);
    // With a user, the directory is entered as that user, as runc does: by the new process
    // itself when this thread starts it as the user, else in `run_as`.
    if let Some(cwd) = &req.cwd {
        if in_thread || user.is_none() {
            cmd.current_dir(cwd);
        }
    }
    if !in_thread {
        if let Some(fd) = crate::limits::work_cgroup_fd() {
            // Into the task-limited cgroup before it runs anything (see `limits`).
            // SAFETY: the closure makes one async-signal-safe call (write).
            unsafe {
                cmd.pre_exec(move || {
                    crate::limits::enter_work_cgroup(fd);
                    Ok(())
                });
            }
        }
        if let Some(u) = user.clone() {
            run_as(&mut cmd, u, req.cwd.as_deref())?;
        }
    }
    // Held until the process is in the table, so the reaper finds it even if it exits at once.
    // Every spawn happens under this lock, so no other child inherits a pty descriptor between
    // its creation and the spawn.
    let mut t = table();
    let (pid, stdin, outputs, pty) = match req.tty {
        Some(size) => {
            let (master, slave) = open_pty(size).map_err(|e| io_fail("openpty", e))?;
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| io_fail("dup", e));
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            // SAFETY: the closure only makes async-signal-safe calls (setsid, ioctl).
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = spawn_guarded(&mut cmd, prog)?;
            // Closes the agent's copies of the slave: the master reads EIO once the process
            // (and anything it left holding the tty) is gone.
            drop(cmd);
            let master = Arc::new(master);
            (
                child.id() as i32,
                Some(master.clone()),
                vec![(master.clone(), Kind::Stdout)],
                Some(master),
            )
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            let mut child = if in_thread {
                // Dropped in reverse order, right after the start: the pumps below must be
                // born root and outside the task-limited cgroup.
                let _cgroup = crate::limits::ThreadInWork::enter();
                let _as = match &user {
                    Some(u) if root => {
                        Some(ThreadAs::become_user(u).map_err(|e| io_fail("switching user", e))?)
                    }
                    _ => None,
                };
                spawn_guarded(&mut cmd, prog)?
            } else {
                spawn_guarded(&mut cmd, prog)?
            };
            let file = |fd: OwnedFd| Arc::new(File::from(fd));
            let stdin = child.stdin.take().map(|s| file(s.into()));
            let out = file(child.stdout.take().expect("piped").into());
            let err = file(child.stderr.take().expect("piped").into());
            (
                child.id() as i32,
                stdin,
                vec![(out, Kind::Stdout), (err, Kind::Stderr)],
                None,
            )
        }
    };
    let seq = t.next_seq;
    t.next_seq += 1;
    let p = Arc::new(Proc {
        pid,
        seq,
        tag: req.tag.clone(),
        st: Mutex::new(State::new(
            ProcessInfo {
                pid,
                tag: req.tag.clone(),
                argv: req.argv.clone(),
                cwd: req.cwd.clone(),
                started_ms: now_ms(),
                running: true,
                exit: None,
                background: req.background,
                tty: req.tty.is_some(),
                dropped: 0,
            },
            outputs.len(),
            stdin,
            pty,
        )),
        cv: Condvar::new(),
    });
    // A pid seen again was reaped: its old entry (exited) is replaced.
    t.procs.insert(pid, p.clone());
    drop(t);
    for (src, kind) in outputs {
        let p = p.clone();
        // Named from inside, not with `Builder::name`: std names a thread through
        // /proc/self/task/<tid>/comm, and gVisor then keeps that task's /proc directory (and
        // the dead task) for good, about 1.7 KiB of every later checkpoint per thread.
        std::thread::Builder::new()
            .spawn(move || {
                set_thread_name(c"pump");
                pump(p, src, kind)
            })
            .map_err(|e| io_fail("spawning a thread", e))?;
    }
    Ok(p)
}

/// Names the calling thread (for debuggers and `ps -T`) without touching /proc.
fn set_thread_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes (longer names are
    // truncated by the kernel).
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

fn pump(p: Arc<Proc>, src: Arc<File>, kind: Kind) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match (&*src).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => push(&p, kind, &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: the tty's last holder closed it.
            Err(_) => break,
        }
    }
    let mut s = p.lock();
    s.open_pumps -= 1;
    p.cv.notify_all();
    let retire = s.done();
    drop(s);
    if retire {
        retire_proc(&p);
    }
}

/// Appends output to the buffer; waits while that would drop output an attached connection
/// has not sent yet.
fn push(p: &Proc, kind: Kind, data: &[u8]) {
    let mut s = p.lock();
    if s.forgotten && s.subs.is_empty() {
        return; // nobody can read it any more
    }
    loop {
        let end = s.end;
        let behind = s.subs.values().map(|&pos| end - pos).max().unwrap_or(0);
        if behind == 0 || behind as usize + data.len() <= RING_BYTES {
            break;
        }
        s.waiting_pumps += 1;
        s = p.wait(s);
        s.waiting_pumps -= 1;
    }
    s.last_output = Instant::now();
    s.append(kind, data);
    p.cv.notify_all();
}

enum Ended {
    Exit(ExitStatus),
    Gone,
}

/// Sends the process's output from subscriber `id`'s position on, until it is done.
fn stream(p: &Proc, id: u64, c: &Conn) -> Ended {
    loop {
        let (off, kind, data) = {
            let mut s = p.lock();
            loop {
                let Some(&pos) = s.subs.get(&id) else {
                    return Ended::Gone;
                };
                if let Some((off, kind, data)) = s.output_at(pos) {
                    break (off, kind, data.to_vec());
                }
                if s.done() {
                    s.subs.remove(&id);
                    p.cv.notify_all();
                    return Ended::Exit(s.info.exit.expect("done"));
                }
                s = p.wait(s);
            }
        };
        if send(c, kind, &data).is_err() {
            return Ended::Gone;
        }
        let mut s = p.lock();
        if let Some(pos) = s.subs.get_mut(&id) {
            *pos = off + data.len() as u64;
        }
        p.cv.notify_all();
    }
}

/// Detaches subscriber `id`; when it is the owner of a process that is not `background`, the
/// process's group gets SIGKILL.
fn detach(p: &Proc, id: u64) {
    let mut s = p.lock();
    s.subs.remove(&id);
    p.cv.notify_all();
    if id == OWNER && !s.info.background && s.info.exit.is_none() {
        // SAFETY: kill(2); the process is not reaped yet (no exit status), so its pid (and
        // process group, which it leads) is still its own.
        unsafe { libc::kill(-p.pid, libc::SIGKILL) };
    }
}

/// Closes the process's stdin (on a tty: sends the EOF character).
fn close_stdin_of(p: &Proc) {
    let mut s = p.lock();
    if s.pty.is_some() {
        let w = s.stdin.clone();
        drop(s);
        if let Some(w) = w {
            let _ = (&*w).write_all(&[0x04]);
        }
    } else {
        s.stdin = None;
    }
}

pub fn exec(req: ExecRequest, c: &Conn) -> Res<()> {
    let p = spawn(&req)?;
    let started = Started {
        pid: p.pid,
        dropped: 0,
    };
    if send_json(c, Kind::Started, &started).is_err() {
        detach(&p, OWNER);
        return Ok(());
    }
    // Reads the connection: stdin frames, then nothing until the client goes away.
    let p2 = p.clone();
    let mut feeding = req.stdin;
    watch_conn(
        c,
        move |kind, data| {
            if kind == Kind::Stdin && feeding {
                if data.is_empty() {
                    close_stdin_of(&p2);
                    feeding = false;
                } else if let Some(w) = p2.lock().stdin.clone() {
                    // A process that does not read its input: the rest is dropped.
                    let _ = (&*w).write_all(data);
                }
            }
        },
        {
            let p = p.clone();
            move || detach(&p, OWNER)
        },
    );
    match stream(&p, OWNER, c) {
        Ended::Exit(st) => {
            send_json(c, Kind::Exit, &st)?;
            // Its client has all of it: nothing to keep for a reconnect.
            table().forget(&p);
            Ok(())
        }
        Ended::Gone => {
            detach(&p, OWNER);
            Ok(())
        }
    }
}

fn find(target: &ProcessRef) -> Res<Arc<Proc>> {
    let mut t = table();
    t.prune();
    let found = match (&target.pid, &target.tag) {
        (Some(pid), _) => t.procs.get(pid).cloned().ok_or(format!("pid {pid}")),
        (None, Some(tag)) => t
            .procs
            .values()
            .filter(|p| p.tag.as_deref() == Some(tag))
            .max_by_key(|p| p.seq)
            .cloned()
            .ok_or(format!("tag {tag}")),
        (None, None) => return fail(ErrorKind::Invalid, "name a process by pid or tag"),
    };
    found.or_else(|what| fail(ErrorKind::NotFound, format!("no process with {what}")))
}

pub fn connect(target: ProcessRef, c: &Conn) -> Res<()> {
    let p = find(&target)?;
    let (id, dropped) = {
        let mut s = p.lock();
        let id = s.next_sub;
        s.next_sub += 1;
        let start = s.start;
        s.subs.insert(id, start);
        (id, start)
    };
    let started = Started {
        pid: p.pid,
        dropped,
    };
    if send_json(c, Kind::Started, &started).is_err() {
        detach(&p, id);
        return Ok(());
    }
    watch_conn(c, |_, _| {}, {
        let p = p.clone();
        move || detach(&p, id)
    });
    match stream(&p, id, c) {
        Ended::Exit(st) => send_json(c, Kind::Exit, &st),
        Ended::Gone => {
            detach(&p, id);
            Ok(())
        }
    }
}

pub fn list() -> Vec<ProcessInfo> {
    let mut t = table();
    t.prune();
    let mut procs: Vec<Arc<Proc>> = t.procs.values().cloned().collect();
    drop(t);
    procs.sort_by_key(|p| p.seq);
    procs.iter().map(|p| p.lock().info.clone()).collect()
}

pub fn signal(req: SignalRequest, c: &Conn) -> Res<()> {
    let p = find(&req.target)?;
    let s = p.lock();
    if s.info.exit.is_some() {
        return fail(ErrorKind::Invalid, format!("process {} has exited", p.pid));
    }
    // SAFETY: kill(2); the process is not reaped yet (checked under the lock the reaper takes).
    let mut r = unsafe { libc::kill(-p.pid, req.signal) };
    if r != 0 && last_err().raw_os_error() == Some(libc::ESRCH) {
        // Not a group leader (it called setpgid itself): the process alone.
        // SAFETY: as above.
        r = unsafe { libc::kill(p.pid, req.signal) };
    }
    drop(s);
    if r != 0 {
        return Err(io_fail(
            &format!("signal {} to pid {}", req.signal, p.pid),
            last_err(),
        ));
    }
    send(c, Kind::Ok, b"")
}

pub fn send_stdin(target: ProcessRef, c: &Conn) -> Res<()> {
    let found = find(&target);
    let w = match &found {
        Ok(p) => p.lock().stdin.clone().ok_or_else(|| {
            super::Fail(ErrorReply::new(
                ErrorKind::Invalid,
                format!("stdin of process {} is closed", p.pid),
            ))
        }),
        Err(super::Fail(e)) => Err(super::Fail(e.clone())),
    };
    read_data(c, w, |w, chunk| {
        (&**w)
            .write_all(chunk)
            .map_err(|e| io_fail("write to stdin", e))
    })?;
    send(c, Kind::Ok, b"")
}

pub fn close_stdin(target: ProcessRef, c: &Conn) -> Res<()> {
    close_stdin_of(&*find(&target)?);
    send(c, Kind::Ok, b"")
}

pub fn resize(req: ResizeRequest, c: &Conn) -> Res<()> {
    let p = find(&req.target)?;
    let Some(pty) = p.lock().pty.clone() else {
        return fail(ErrorKind::Invalid, format!("process {} has no tty", p.pid));
    };
    let size = TtySize {
        cols: req.cols,
        rows: req.rows,
    };
    set_winsize(&pty, size).map_err(|e| io_fail("TIOCSWINSZ", e))?;
    send(c, Kind::Ok, b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exited process (not in the global table) with no pipes left.
    fn exited(pid: i32, seq: u64) -> Arc<Proc> {
        let info = ProcessInfo {
            pid,
            tag: None,
            argv: vec!["true".into()],
            cwd: None,
            started_ms: 0,
            running: false,
            exit: Some(ExitStatus::default()),
            background: true,
            tty: false,
            dropped: 0,
        };
        Arc::new(Proc {
            pid,
            seq,
            tag: None,
            st: Mutex::new(State::new(info, 0, None, None)),
            cv: Condvar::new(),
        })
    }

    #[test]
    fn output_is_coalesced_bounded_and_read_from_any_offset() {
        let p = exited(1, 0);
        let mut s = p.lock();
        s.subs.clear();
        // A byte at a time, 3 MiB: chunks of up to READ_CHUNK, the last RING_BYTES kept.
        let total = 3 * RING_BYTES as u64;
        for i in 0..total {
            s.append(Kind::Stdout, &[(i % 251) as u8]);
        }
        assert_eq!(s.end, total);
        assert!(s.end - s.start <= RING_BYTES as u64);
        assert!(s.end - s.start > (RING_BYTES - READ_CHUNK) as u64);
        assert!(
            s.chunks.len() <= RING_BYTES / READ_CHUNK + 1,
            "{}",
            s.chunks.len()
        );
        assert_eq!(s.info.dropped, s.start);
        // Read back from a dropped offset (starts at the first byte held) and from the middle
        // of a chunk (the rest of that chunk), every byte in order.
        for from in [0, s.start + 12_345] {
            let mut pos = from;
            while let Some((off, _, data)) = s.output_at(pos) {
                assert!(off >= pos && off >= s.start);
                for (j, b) in data.iter().enumerate() {
                    assert_eq!(*b, ((off + j as u64) % 251) as u8);
                }
                pos = off + data.len() as u64;
            }
            assert_eq!(pos, s.end);
        }
        // An attached connection's unsent output is never dropped, even inside a chunk.
        let unsent = s.end - 10;
        s.subs.insert(OWNER, unsent);
        s.append(Kind::Stdout, &vec![7; RING_BYTES - 10]);
        assert!(s.start <= unsent && s.end - s.start <= (RING_BYTES + READ_CHUNK) as u64);
        s.subs.clear();
        s.append(Kind::Stdout, b"x");
        assert!(s.end - s.start <= RING_BYTES as u64);
        // Kinds stay apart.
        s.append(Kind::Stderr, b"e");
        s.append(Kind::Stdout, b"o");
        let (off, kind, data) = s.output_at(s.end - 2).unwrap();
        assert_eq!((off, kind, data), (s.end - 2, Kind::Stderr, &b"e"[..]));
        // Compacting keeps what a reconnect can read; forgotten, nothing is held.
        s.compact();
        assert!(s.output_at(s.start).is_some());
        s.subs.clear();
        s.forgotten = true;
        s.compact();
        assert!(s.output_at(0).is_none() && s.chunks.capacity() == 0);
    }

    #[test]
    fn exited_processes_leave_the_table_when_delivered_too_many_or_too_old() {
        let mut t = Table::default();
        let procs: Vec<Arc<Proc>> = (0..KEEP_EXITED as i32 + 5)
            .map(|i| exited(100 + i, i as u64))
            .collect();
        for p in &procs {
            t.procs.insert(p.pid, p.clone());
            t.exited.push_back((p.pid, p.seq, Instant::now()));
            t.prune();
        }
        assert_eq!((t.procs.len(), t.exited.len()), (KEEP_EXITED, KEEP_EXITED));
        assert!(!t.procs.contains_key(&100) && t.procs.contains_key(&105));
        assert!(procs[0].lock().forgotten && !procs[5].lock().forgotten);
        // Delivered: out at once.
        t.forget(&procs[10]);
        assert!(!t.procs.contains_key(&110));
        assert_eq!(t.exited.len(), KEEP_EXITED - 1);
        // A pid used again by a newer process is not the old one's to forget.
        let again = exited(111, 1000);
        t.procs.insert(111, again.clone());
        t.forget(&procs[11]);
        assert!(Arc::ptr_eq(&t.procs[&111], &again));
        // Too old: out at the next look.
        let old = Instant::now()
            .checked_sub(EXITED_TTL + Duration::from_secs(1))
            .expect("uptime beyond the TTL");
        for e in t.exited.iter_mut().take(3) {
            e.2 = old;
        }
        let n = t.exited.len();
        t.prune();
        assert_eq!(t.exited.len(), n - 3);
    }
}
