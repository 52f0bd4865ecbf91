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
//! - Root can still spread processes over many users, each with a budget of its own; so once
//!   `kiln-work` holds half as many tasks again as its limit, the agent SIGKILLs the process
//!   group with the most tasks, one at a time, as the OOM killer does with memory.

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

/// Makes the task-limited cgroup for the processes the agent starts. Best effort: without
/// gVisor's cgroupfs (a microVM, tests) processes start unlimited.
pub fn limit_tasks(pids_max: u64) -> Result<(), String> {
    let dir = std::path::Path::new(PIDS_ROOT).join(WORK_CGROUP);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("create {}: {e}", dir.display())),
    }
    std::fs::write(dir.join("pids.max"), pids_max.to_string())
        .map_err(|e| format!("set {}/pids.max: {e}", dir.display()))?;
    TASK_LIMIT.store(pids_max, Ordering::Relaxed);
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .map_err(|e| format!("open {}/cgroup.procs: {e}", dir.display()))?;
    // Kept open (never closed): spawned children write to it between fork and exec.
    let fd = procs.as_raw_fd();
    std::mem::forget(procs);
    WORK_PROCS.store(fd, Ordering::Relaxed);
    // Both or neither: a thread that went in must be able to come back.
    let open = |p: std::path::PathBuf| std::fs::OpenOptions::new().write(true).open(p);
    if let (Ok(work), Ok(home)) = (
        open(dir.join("tasks")),
        open(std::path::Path::new(PIDS_ROOT).join("tasks")),
    ) {
        WORK_TASKS.store(work.as_raw_fd(), Ordering::Relaxed);
        HOME_TASKS.store(home.as_raw_fd(), Ordering::Relaxed);
        std::mem::forget((work, home));
    }
    limit_tasks_per_user(pids_max.saturating_add(AGENT_TASKS))
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
fn task_kill_threshold(limit: u64) -> u64 {
    limit.saturating_add(limit / 2)
}

/// The task watch: ends the process group with the most tasks while `kiln-work` holds more
/// than [`task_kill_threshold`] (see the module's notes).
fn watch_tasks(victim: &mut Victim, buf: &mut String) {
    let limit = TASK_LIMIT.load(Ordering::Relaxed);
    if limit == 0 || victim.pending() {
        return;
    }
    buf.clear();
    let path = std::path::Path::new(PIDS_ROOT)
        .join(WORK_CGROUP)
        .join("pids.current");
    let Some(tasks) = File::open(path)
        .and_then(|mut f| std::io::Read::read_to_string(&mut f, buf))
        .ok()
        .and_then(|_| buf.trim().parse::<u64>().ok())
    else {
        return;
    };
    if tasks <= task_kill_threshold(limit) {
        return;
    }
    if let Some(g) = largest_group(|g| g.tasks, 2) {
        victim.kill(g.pgrp);
        eprintln!(
            "kiln-agent: {tasks} tasks, limit {limit}: killed process group {} ({}, {} tasks)",
            g.pgrp, g.name, g.tasks
        );
    }
}

fn oom_loop(limit: u64) {
    let mut buf = String::with_capacity(2048);
    let mut victim = Victim::default();
    let mut task_victim = Victim::default();
    loop {
        watch_tasks(&mut task_victim, &mut buf);
        buf.clear();
        let info = File::open("/proc/meminfo")
            .and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut buf))
            .map(|_| MemInfo::parse(&buf))
            .unwrap_or_default();
        let in_use = info.in_use();
        if in_use > limit && !victim.pending() {
            if let Some(g) = largest_group(|g| g.rss, min_victim(limit)) {
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
    tasks: u64,
    name: String,
    largest: u64,
}

/// The process group that holds the most by `measure`, at least `min`, the agent's excluded.
/// A group, not a process: a command and what it started go together, and a fork bomb of
/// many small processes is one large group.
fn largest_group(measure: fn(&Group) -> u64, min: u64) -> Option<Group> {
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
        g.tasks = g.tasks.saturating_add(p.threads.max(1));
        if p.rss >= g.largest || g.name.is_empty() {
            (g.largest, g.name) = (p.rss, p.name);
        }
    }
    groups
        .into_values()
        .filter(|g| measure(g) >= min.max(1))
        .max_by_key(measure)
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
    pub threads: u64,
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
            } else if let Some(v) = line.strip_prefix("Threads:") {
                p.threads = number(v);
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
                threads: 3
            }
        );
    }

    #[test]
    fn the_task_watch_leaves_room_past_the_limit_and_saturates() {
        assert_eq!(task_kill_threshold(256), 384);
        assert_eq!(task_kill_threshold(u64::MAX), u64::MAX);
    }
}
