//! The sandbox's own limits, enforced from inside (gVisor): its out-of-memory killer and the
//! task limit of the processes the agent starts.
//!
//! gVisor has no OOM killer: when the host's memory cgroup limit is reached, the host kernel
//! kills the whole sentry, every process of the sandbox with it. So the host limit is only a
//! backstop set above the sandbox's memory, and the agent (its init) keeps the sandbox below
//! its memory: it polls gVisor's `/proc/meminfo` and, while the memory in use passes the
//! limit, SIGKILLs the process group with the largest resident set (never its own; none
//! smaller than [`min_victim`]), one at a time: a command with what it started, or a fork
//! bomb's many small processes, go together.
//! "In use" is what the sandbox cannot give back by itself: anonymous memory, tmpfs (`/tmp`,
//! `/dev/shm`, an in-memory root overlay) and the sentry's own allocations; the page cache
//! of files (`Cached` minus `Shmem`) is left out, as the host reclaims it. Polling is cheap
//! (one read of a synthetic file) and quickens as usage nears the limit.
//!
//! Tasks: the host's `pids.max` only bounds the sentry's threads (and reaching it panics the
//! sentry), so the bound is gVisor's own, three layers deep:
//! - Its cgroupfs `pids` controller: the agent makes a child cgroup `kiln-work` with
//!   `pids.max` and starts every process in it, staying outside itself. Its count is exact,
//!   but runsc 20240729 checks a clone against `pids.max` only now and then
//!   (`Task.chargeLocked` charges the first of a task's seven cgroups, one per hierarchy, in
//!   Go's random map order; the others take the charge unchecked): a fork bomb went to 491
//!   tasks for a limit of 256.
//! - `RLIMIT_NPROC`, which gVisor checks at every clone, per real user: set on the agent
//!   (soft and hard) and inherited by all it starts, with [`AGENT_TASKS`] of room for the
//!   agent's own threads, which count for root. A process that lacks `CAP_SYS_RESOURCE` (all
//!   but the agent: see `gvisor_init`) cannot raise it. A bomb of one user stops there.
//! - Root can still spread processes over many users, each with a budget of its own, and move
//!   them out of `kiln-work`; so once the sandbox's processes hold half as many tasks again
//!   as the limit, the agent SIGKILLs every process that left `kiln-work` and the newest in
//!   it, down to half the limit, and all of them when they regrow past it again and again
//!   ([`watch_tasks`]), as the OOM killer does with memory. The agent makes the cgroupfs
//!   read-only before it gives up `CAP_SYS_ADMIN` ([`limit_tasks`]): no process can raise
//!   `kiln-work`'s limit or make a cgroup the watch does not count.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

/// OOM kills so far (reported by `Health`).
static OOM_KILLS: AtomicU64 = AtomicU64::new(0);
/// `cgroup.procs` of the task-limited cgroup, open for the life of the agent (-1: none).
static WORK_PROCS: AtomicI32 = AtomicI32::new(-1);
/// `tasks` of the task-limited cgroup and of the agent's own, open for the life of the agent
/// (-1: none): they move one thread (see [`ThreadInWork`]).
static WORK_TASKS: AtomicI32 = AtomicI32::new(-1);
static HOME_TASKS: AtomicI32 = AtomicI32::new(-1);

/// Where the bundle mounts gVisor's cgroupfs (a tmpfs holding one mount per controller).
const CGROUP_MOUNTS: &str = "/sys/fs/cgroup";
/// Where gVisor's cgroupfs `pids` controller of the container appears (its cgroup mount).
const PIDS_ROOT: &str = "/sys/fs/cgroup/pids";
const WORK_CGROUP: &str = "kiln-work";
/// The task limit of `kiln-work` (0: none), for the watch in the OOM killer's loop.
static TASK_LIMIT: AtomicU64 = AtomicU64::new(0);
/// Room in root's `RLIMIT_NPROC` budget for the agent's own threads (a connection thread and
/// two pumps per running command, the reaper, the OOM killer).
pub const AGENT_TASKS: u64 = 64;

/// How many processes the OOM killer has ended.
pub fn oom_kills() -> u64 {
    OOM_KILLS.load(Ordering::Relaxed)
}

/// Makes the task-limited cgroup for the processes the agent starts and seals gVisor's
/// cgroupfs read-only for the rest of the sandbox: its files are root's, so root inside could
/// otherwise raise `kiln-work`'s `pids.max` or make cgroups of its own. The agent keeps its
/// own descriptors, opened through a private bind mount it detaches at once: gVisor refuses
/// to make a mount read-only while a file is open for writing through it. (Root can still
/// reach those descriptors through `/proc/1/fd` and move itself between `kiln-work` and the
/// agent's cgroup: the task watch counts both.) Needs `CAP_SYS_ADMIN` (see `gvisor_init`).
/// Without gVisor's cgroupfs (a microVM, tests) it fails and processes start unlimited.
pub fn limit_tasks(pids_max: u64) -> Result<(), String> {
    let root = std::path::Path::new(PIDS_ROOT);
    let dir = root.join(WORK_CGROUP);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("create {}: {e}", dir.display())),
    }
    std::fs::write(dir.join("pids.max"), pids_max.to_string())
        .map_err(|e| format!("set {}/pids.max: {e}", dir.display()))?;
    TASK_LIMIT.store(pids_max, Ordering::Relaxed);
    limit_tasks_per_user(pids_max.saturating_add(AGENT_TASKS))?;
    use crate::gvisor_init::mount;
    let private = std::path::Path::new(CGROUP_MOUNTS).join(".kiln-agent");
    std::fs::create_dir(&private).map_err(|e| format!("create {}: {e}", private.display()))?;
    let opened = mount(root, &private, None, libc::MS_BIND, None).and_then(|()| {
        let opened = open_work_files(&private);
        let detached = umount_detached(&private);
        opened.and(detached)
    });
    let _ = std::fs::remove_dir(&private);
    // Sealed either way: without its descriptors the agent starts processes outside
    // `kiln-work`, but still none may raise its limit or make a cgroup the watch misses.
    let sealed = seal_cgroup_mounts();
    opened.and(sealed)
}

/// Opens (for good) the files the agent writes to move processes and threads into
/// `kiln-work` and threads back out, under `root` (the pids hierarchy's root as mounted there).
fn open_work_files(root: &std::path::Path) -> Result<(), String> {
    let open = |p: std::path::PathBuf| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| format!("open {}: {e}", p.display()))
    };
    let dir = root.join(WORK_CGROUP);
    let procs = open(dir.join("cgroup.procs"))?;
    // Kept open (never closed): spawned children write to it between fork and exec.
    WORK_PROCS.store(procs.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(procs);
    // Both or neither: a thread that went in must be able to come back.
    let (work, home) = (open(dir.join("tasks"))?, open(root.join("tasks"))?);
    WORK_TASKS.store(work.as_raw_fd(), Ordering::Relaxed);
    HOME_TASKS.store(home.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget((work, home));
    Ok(())
}

/// Makes `/sys/fs/cgroup` and every controller's mount in it read-only (root without
/// `CAP_SYS_ADMIN` cannot remount them).
fn seal_cgroup_mounts() -> Result<(), String> {
    use crate::gvisor_init::mount;
    let top = std::path::Path::new(CGROUP_MOUNTS);
    let entries = std::fs::read_dir(top).map_err(|e| format!("list {}: {e}", top.display()))?;
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
            mount(&e.path(), &e.path(), None, flags, None)?;
        }
    }
    mount(top, top, None, libc::MS_REMOUNT | libc::MS_RDONLY, None)
}

fn umount_detached(dst: &std::path::Path) -> Result<(), String> {
    let d =
        std::ffi::CString::new(dst.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(d.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(format!(
            "unmount {}: {}",
            dst.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sets `RLIMIT_NPROC` (soft and hard) of the agent, inherited by every process it starts.
fn limit_tasks_per_user(n: u64) -> Result<(), String> {
    let rlim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads one valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &rlim) } != 0 {
        return Err(format!(
            "set RLIMIT_NPROC to {n}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The calling thread inside the task-limited cgroup until dropped (cgroupfs's `tasks` moves
/// one thread): what it starts meanwhile is born there, so the start needs no step between
/// fork and exec, and can be a `posix_spawn` (vfork: in gVisor a fork copies the agent's
/// address space, ~60 ms of a spawn measured from Python). Start no thread while it is held:
/// threads are born in the cgroup too.
pub struct ThreadInWork(());

impl ThreadInWork {
    /// Whether threads can move in and out (both `tasks` files are open).
    pub fn usable() -> bool {
        WORK_TASKS.load(Ordering::Relaxed) >= 0 && HOME_TASKS.load(Ordering::Relaxed) >= 0
    }

    /// None when there is no task-limited cgroup or the thread cannot enter it (full: what
    /// it starts then runs unlimited, as a child that cannot enter does).
    pub fn enter() -> Option<ThreadInWork> {
        if !Self::usable() {
            return None;
        }
        let work = WORK_TASKS.load(Ordering::Relaxed);
        // SAFETY: write(2) of a 1-byte buffer to a descriptor the agent keeps open.
        let r = unsafe { libc::write(work, b"0".as_ptr().cast(), 1) };
        (r == 1).then_some(ThreadInWork(()))
    }
}

impl Drop for ThreadInWork {
    fn drop(&mut self) {
        let home = HOME_TASKS.load(Ordering::Relaxed);
        // SAFETY: write(2) of a 1-byte buffer to a descriptor the agent keeps open.
        if unsafe { libc::write(home, b"0".as_ptr().cast(), 1) } != 1 {
            eprintln!(
                "kiln-agent: a thread stays in the task-limited cgroup: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The descriptor a child writes "0" to (in `pre_exec`) to enter the task-limited cgroup.
pub fn work_cgroup_fd() -> Option<RawFd> {
    Some(WORK_PROCS.load(Ordering::Relaxed)).filter(|fd| *fd >= 0)
}

/// For a child between fork and exec: joins the task-limited cgroup. Async-signal-safe (one
/// write(2)); a failure is ignored (the child runs, unlimited, rather than not at all).
pub fn enter_work_cgroup(fd: RawFd) {
    // SAFETY: write(2) of a 1-byte buffer to a descriptor the agent keeps open.
    unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
}

/// Starts the OOM killer thread for a sandbox of `limit_bytes`.
pub fn start_oom_killer(limit_bytes: u64) {
    let _ = std::thread::Builder::new()
        .name("oom".into())
        .stack_size(64 << 10)
        .spawn(move || oom_loop(limit_bytes));
}

/// The part of gVisor's `/proc/meminfo` the OOM killer needs, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    pub free: u64,
    pub cached: u64,
    pub shmem: u64,
}

impl MemInfo {
    pub fn parse(text: &str) -> MemInfo {
        let mut m = MemInfo::default();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(kib) = v.parse::<u64>() else { continue };
            let slot = match k {
                "MemTotal:" => &mut m.total,
                "MemFree:" => &mut m.free,
                "Cached:" => &mut m.cached,
                "Shmem:" => &mut m.shmem,
                _ => continue,
            };
            *slot = kib.saturating_mul(1024);
        }
        m
    }

    /// Memory the sandbox holds and cannot give back by itself: everything gVisor counts
    /// as used but the page cache of files.
    pub fn in_use(&self) -> u64 {
        let used = self.total.saturating_sub(self.free);
        let file_cache = self.cached.saturating_sub(self.shmem);
        used.saturating_sub(file_cache)
    }
}

/// How long to wait before the next look: long while far from the limit, short near it (a
/// process allocating fast crosses the last tenth between two looks either way; the host's
/// backstop has room for that).
pub fn poll_interval(in_use: u64, limit: u64) -> Duration {
    let pct = in_use.saturating_mul(100) / limit.max(1);
    Duration::from_millis(match pct {
        0..=49 => 50,
        50..=79 => 20,
        _ => 5,
    })
}

/// A process group killed by a watch: not killed again (nor another chosen) until it is gone
/// or a second passed, since what it holds is freed only once it has exited.
#[derive(Default)]
struct Victim(Option<(i32, std::time::Instant)>);

impl Victim {
    fn pending(&self) -> bool {
        self.0
            .is_some_and(|(pgrp, at)| alive(pgrp) && at.elapsed() < Duration::from_secs(1))
    }

    fn kill(&mut self, pgrp: i32) {
        // SAFETY: kill(2) of a process group in the sandbox, never the agent's.
        unsafe { libc::kill(-pgrp, libc::SIGKILL) };
        self.0 = Some((pgrp, std::time::Instant::now()));
    }
}

/// Tasks in `kiln-work` past which the task watch kills: half as many again as its limit.
pub fn task_kill_threshold(limit: u64) -> u64 {
    limit.saturating_add(limit / 2)
}

/// What the task watch saw.
#[derive(Debug, PartialEq, Eq)]
enum Tasks {
    /// Within the limit (or no limit): this many.
    Within(u64),
    /// Past the threshold: some or all were killed.
    Killed,
}

/// The task watch: while the sandbox's processes hold more than [`task_kill_threshold`]
/// tasks (plus [`AGENT_TASKS`]), SIGKILLs those [`task_victims`] names. They are in
/// `kiln-work` or in the container's own cgroup, the agent's: root inside can move itself
/// there through the agent's open cgroup files (gVisor lets root open `/proc/1/fd/N`), but no
/// further (the cgroupfs is read-only: no other cgroup can be made), and gVisor counts a
/// cgroup's tasks without its children's, so the two counts add up. Two reads per cgroup (no
/// walk of `/proc`, which is slow while a bomb runs).
fn watch_tasks(buf: &mut String, kills: &mut TaskKills) -> Tasks {
    let limit = TASK_LIMIT.load(Ordering::Relaxed);
    if limit == 0 {
        return Tasks::Within(0);
    }
    let root = std::path::Path::new(PIDS_ROOT);
    let cgroups = [root.to_path_buf(), root.join(WORK_CGROUP)];
    let mut tasks = 0u64;
    for c in &cgroups {
        if read_into(&c.join("pids.current"), buf).is_none() {
            return Tasks::Within(0);
        }
        tasks = tasks.saturating_add(buf.trim().parse::<u64>().unwrap_or(0));
    }
    if tasks <= task_kill_threshold(limit).saturating_add(AGENT_TASKS) {
        return Tasks::Within(tasks);
    }
    // [the agent's cgroup, kiln-work]
    let mut procs: [Vec<i32>; 2] = Default::default();
    for (c, p) in cgroups.iter().zip(&mut procs) {
        if read_into(&c.join("cgroup.procs"), buf).is_some() {
            p.extend(
                buf.split_ascii_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                    .filter(|p| *p > 1),
            );
        }
    }
    kills.forget_old();
    let [escaped, work] = procs;
    // A bomb that regrows past the threshold again and again within a second outruns the
    // trim (inside gVisor the watch is one runnable task among hundreds): all of it goes.
    let victims = if kills.trims >= TRIMS_BEFORE_ALL {
        escaped
            .into_iter()
            .chain(work)
            .filter(|p| !kills.recent.contains(p))
            .collect()
    } else {
        task_victims(tasks, limit, escaped, work, &kills.recent)
    };
    for pid in &victims {
        // SAFETY: kill(2) of a process listed in the sandbox's cgroups a moment ago, never
        // the agent (PID 1).
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    kills.note(tasks, victims);
    Tasks::Killed
}

/// Whom the task watch kills once past its threshold, given the processes in the agent's
/// cgroup besides the agent (`escaped`) and in `kiln-work` (`work`):
/// - every escaped one: only root gets there (through the agent's descriptors), or a command
///   started while `kiln-work` was full, so past the threshold they are a bomb's, and a bomb
///   trimmed only in part regrows from its survivors;
/// - then the newest in `kiln-work`, down to half the limit: the survivors regrow while the
///   watch sleeps, and a busy host stretches that sleep.
///
/// Newest by pid: gVisor hands pids out in increasing order (wrapping only after millions),
/// and a bomb's members are the newest. The processes killed a moment ago (`recent`) are
/// neither chosen nor counted on: they are listed (and counted) until they are reaped, and
/// killing them again would spare the live.
fn task_victims(
    tasks: u64,
    limit: u64,
    escaped: Vec<i32>,
    mut work: Vec<i32>,
    recent: &std::collections::HashSet<i32>,
) -> Vec<i32> {
    let keep = (limit / 2).saturating_add(AGENT_TASKS);
    let excess = tasks.saturating_sub(keep);
    let mut victims: Vec<i32> = escaped
        .into_iter()
        .filter(|p| !recent.contains(p))
        .collect();
    let more = excess.saturating_sub(victims.len() as u64);
    work.sort_unstable_by(|a, b| b.cmp(a));
    victims.extend(
        work.into_iter()
            .filter(|p| !recent.contains(p))
            .take(usize::try_from(more).unwrap_or(usize::MAX)),
    );
    victims
}

/// Reads a small file into `buf` (cleared first).
fn read_into(path: &std::path::Path, buf: &mut String) -> Option<()> {
    buf.clear();
    File::open(path)
        .and_then(|mut f| std::io::Read::read_to_string(&mut f, buf))
        .ok()
        .map(|_| ())
}

/// The task watch's recent kills: the processes killed within the last second (not chosen
/// again while they die), and a log line at most once a second (a bomb trimmed every few
/// milliseconds must not fill the sandbox's log).
#[derive(Default)]
struct TaskKills {
    since: Option<std::time::Instant>,
    recent: std::collections::HashSet<i32>,
    peak: u64,
    /// Looks past the threshold within this second.
    trims: u32,
}

/// Looks past the threshold within one second after which the task watch kills every
/// process of the sandbox but the agent, not just the newest: a legitimate workload held
/// by `RLIMIT_NPROC` and `pids.max` does not come back past the threshold after a trim
/// to half the limit; only a bomb of many users, regrowing from its survivors, does.
const TRIMS_BEFORE_ALL: u32 = 3;

impl TaskKills {
    fn forget_old(&mut self) {
        if self
            .since
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
        {
            eprintln!(
                "kiln-agent: {} tasks at most, limit {}: killed {} processes",
                self.peak,
                TASK_LIMIT.load(Ordering::Relaxed),
                self.recent.len()
            );
            *self = TaskKills::default();
        }
    }

    fn note(&mut self, tasks: u64, killed: Vec<i32>) {
        self.since.get_or_insert_with(std::time::Instant::now);
        self.peak = self.peak.max(tasks);
        self.trims = self.trims.saturating_add(1);
        self.recent.extend(killed);
    }
}

fn oom_loop(limit: u64) {
    let mut buf = String::with_capacity(2048);
    let mut victim = Victim::default();
    loop {
        // Alone in the sandbox, the agent has nothing to watch (see `children`).
        crate::children::wait_while_none();
        let info = read_into(std::path::Path::new("/proc/meminfo"), &mut buf)
            .map(|()| MemInfo::parse(&buf))
            .unwrap_or_default();
        let in_use = info.in_use();
        if in_use > limit && !victim.pending() {
            if let Some(g) = largest_group(min_victim(limit)) {
                victim.kill(g.pgrp);
                OOM_KILLS.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "kiln-agent: out of memory ({} MiB in use, limit {} MiB): killed \
                     process group {} ({}, {} MiB resident)",
                    in_use >> 20,
                    limit >> 20,
                    g.pgrp,
                    g.name,
                    g.rss >> 20
                );
            }
        }
        std::thread::sleep(poll_interval(in_use, limit));
    }
}

/// Starts the task watch ([`watch_tasks`]) on a thread of its own, if [`limit_tasks`] set a
/// limit: not in the OOM killer's loop, whose walk of `/proc` is slow while a bomb also
/// fills the memory. Call it after `gvisor_init` (threads inherit capabilities).
pub fn start_task_watch() {
    if TASK_LIMIT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("tasks".into())
        .stack_size(64 << 10)
        .spawn(|| {
            let mut buf = String::with_capacity(2048);
            let mut kills = TaskKills::default();
            loop {
                crate::children::wait_while_none();
                let limit = TASK_LIMIT.load(Ordering::Relaxed);
                let next = match watch_tasks(&mut buf, &mut kills) {
                    Tasks::Within(n) => task_poll_interval(n, limit),
                    Tasks::Killed => task_poll_interval(limit, limit),
                };
                std::thread::sleep(next);
            }
        });
}

/// How long the task watch waits before its next look: the memory poll's steps at half the
/// count, so long while few tasks run (every wakeup of an idle sandbox costs the host CPU
/// through gVisor's platform), short from 40% of the limit on (a looping bomb grows by
/// hundreds in 100 ms).
fn task_poll_interval(tasks: u64, limit: u64) -> Duration {
    poll_interval(tasks.saturating_mul(2), limit)
}

/// Whether the process `pid` (a group's leader) is still there.
fn alive(pid: i32) -> bool {
    // Reaped children vanish from /proc; a zombie has no memory left.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// The smallest resident set worth a kill: when files in tmpfs, not processes, hold the
/// memory, killing shells and daemons one after another would free nothing.
pub fn min_victim(limit: u64) -> u64 {
    (limit / 16).min(16 << 20)
}

/// What a process group holds: its processes' resident sets and tasks together, and the name
/// of its largest process.
#[derive(Debug, Default)]
struct Group {
    pgrp: i32,
    rss: u64,
    name: String,
    largest: u64,
}

/// The process group with the largest resident set, at least `min`, the agent's excluded.
/// A group, not a process: a command and what it started go together, and a fork bomb of
/// many small processes is one large group.
fn largest_group(min: u64) -> Option<Group> {
    let me = std::process::id() as i32;
    let mut groups: std::collections::HashMap<i32, Group> = Default::default();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || pid == 1 {
            continue;
        }
        let Some(pgrp) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| pgrp_of(&s))
        else {
            continue;
        };
        if pgrp <= 1 {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let p = ProcessUse::parse(&status);
        let g = groups.entry(pgrp).or_default();
        g.pgrp = pgrp;
        g.rss = g.rss.saturating_add(p.rss);
        if p.rss >= g.largest || g.name.is_empty() {
            (g.largest, g.name) = (p.rss, p.name);
        }
    }
    groups
        .into_values()
        .filter(|g| g.rss >= min.max(1))
        .max_by_key(|g| g.rss)
}

/// The process group of a `/proc/<pid>/stat` line (after the command name: state, ppid, pgrp).
pub fn pgrp_of(stat: &str) -> Option<i32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// What one process holds, from its `/proc/<pid>/status`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProcessUse {
    pub name: String,
    /// `VmRSS`, bytes.
    pub rss: u64,
}

impl ProcessUse {
    pub fn parse(status: &str) -> ProcessUse {
        let mut p = ProcessUse::default();
        let number = |v: &str| {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("VmRSS:") {
                p.rss = number(v).saturating_mul(1024);
            } else if let Some(v) = line.strip_prefix("Name:") {
                p.name = v.trim().to_string();
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_use_leaves_out_the_file_cache_and_counts_tmpfs() {
        let m = MemInfo::parse(
            "MemTotal:  786432 kB\nMemFree:  186432 kB\nMemAvailable: 186432 kB\n\
             Cached:  300000 kB\nShmem:  100000 kB\n",
        );
        assert_eq!(m.total, 786432 * 1024);
        // used 600000 kB, file cache 200000 kB.
        assert_eq!(m.in_use(), 400000 * 1024);
        assert_eq!(MemInfo::parse("garbage\n").in_use(), 0);
    }

    #[test]
    fn polls_faster_near_the_limit() {
        assert!(poll_interval(90, 100) < poll_interval(60, 100));
        assert!(poll_interval(60, 100) < poll_interval(10, 100));
        assert_eq!(poll_interval(5, 0), Duration::from_millis(5));
    }

    #[test]
    fn stat_fields() {
        assert_eq!(pgrp_of("42 (a) b) c) S 1 40 40 0 -1"), Some(40));
        assert_eq!(pgrp_of("42 (sh"), None);
    }

    #[test]
    fn status_fields() {
        let p = ProcessUse::parse("Name:\tpython3\nVmRSS:\t  2048 kB\nThreads:\t3\n");
        assert_eq!(
            p,
            ProcessUse {
                name: "python3".into(),
                rss: 2 << 20,
            }
        );
    }

    #[test]
    fn the_task_watch_looks_more_often_as_tasks_near_the_limit() {
        assert!(task_poll_interval(200, 256) < task_poll_interval(100, 256));
        assert!(task_poll_interval(100, 256) < task_poll_interval(10, 256));
        assert_eq!(task_poll_interval(u64::MAX, 0), Duration::from_millis(5));
    }

    #[test]
    fn past_the_threshold_every_escaped_process_dies_then_the_newest_at_work() {
        let recent = [9].into_iter().collect();
        // 600 tasks, limit 256: keep 192, so 408 go; the escaped ones count among them.
        let work: Vec<i32> = (10..600).collect();
        let v = task_victims(600, 256, vec![7, 8, 9], work, &recent);
        assert_eq!(
            &v[..2],
            &[7, 8],
            "every escaped one but the one dying already"
        );
        assert_eq!(v.len(), 408);
        assert_eq!(v[2], 599, "then the newest");
        assert!(!v.contains(&9));
        // Many escaped: all of them, even past the excess.
        let v = task_victims(200, 256, (2..300).collect(), vec![400], &recent);
        assert_eq!(v.len(), 297);
        assert!(!v.contains(&400));
    }

    #[test]
    fn the_task_watch_leaves_room_past_the_limit_and_saturates() {
        assert_eq!(task_kill_threshold(256), 384);
        assert_eq!(task_kill_threshold(u64::MAX), u64::MAX);
    }
}
