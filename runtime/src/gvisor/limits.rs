//! A gVisor sandbox's limits on the host: its cgroups, and what the agent inside is told.
//!
//! Every sandbox gets cgroups of its own, `kiln/<sandbox id>`, made by kiln before runsc
//! starts or restores it (the OCI spec's `linux.cgroupsPath` names them; runsc finds them
//! made, moves the sandbox and gofer processes in, and sizes the sentry's memory from the
//! memory limit). On cgroup v2 (one unified hierarchy) that is one directory; on v1 one per
//! hierarchy (cpu, memory, pids set by kiln; runsc adds the others it knows).
//! [`remove`] takes all of them away; the driver's `kill` is the one path that calls it, so
//! whoever cleans up after a crash (at any moment) cleans the cgroups too.
//!
//! - CPU: a CFS quota of `cpus` periods (`cpu.max`; v1 `cpu.cfs_quota_us`).
//! - Memory: gVisor has no OOM killer, and a process inside that crosses the cgroup's limit
//!   makes the host kernel kill the whole sentry. So the agent inside is the sandbox's OOM
//!   killer at `memory_mib` (`kiln_agent::limits`), and the host limit is a backstop above
//!   it ([`backstop_bytes`]: room for the sentry itself and for the agent's polling delay);
//!   on v2 `memory.high` between the two throttles a sandbox racing past its limit. A
//!   sandbox ended by the backstop says so ([`oom_killed`]).
//! - Tasks: the host's `pids.max` bounds the sentry's threads (on systrap each process
//!   inside has a stub process on the host), reaching it panics the sentry; processes inside
//!   are bounded by gVisor's own cgroupfs `pids` controller, set by the agent
//!   ([`tasks_inside`]), well below.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every sandbox's cgroup, in each hierarchy.
const PARENT: &str = "kiln";
/// The smallest memory a gVisor sandbox runs in (the sentry, the agent, a shell).
pub const MIN_MEMORY_MIB: u64 = 64;
/// Tasks (processes and threads) the agent lets the processes of a sandbox of `memory_mib`
/// have. Each costs host memory outside gVisor's own accounting (on systrap a stub process:
/// its page tables, kernel stacks; measured here ~1 MiB with a fork bomb's churn), which only
/// the backstop sees: bounded so that a fork bomb stays within it.
pub fn tasks_inside(memory_mib: u64) -> u64 {
    (memory_mib / 2).clamp(64, 8192)
}
/// The host threads a sandbox's sentry, gofer and stub processes may have: measured, each
/// task inside costs one to three on systrap, plus the sentry's own. Reaching it panics the
/// sentry, so it is far above [`tasks_inside`]'s largest value: a guard for the host's pid
/// space only.
const HOST_PIDS: u64 = 32768;
const CFS_PERIOD_US: u64 = 100_000;

/// Which cgroup interface this host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy at /sys/fs/cgroup (`cgroup.controllers` there).
    V2,
    /// A hierarchy per controller under /sys/fs/cgroup (this machine kind).
    V1,
}

pub fn version() -> Version {
    if Path::new(ROOT).join("cgroup.controllers").exists() {
        Version::V2
    } else {
        Version::V1
    }
}

/// `linux.cgroupsPath` for the sandbox `id`: absolute, so runsc resolves it the same way
/// whichever cgroup the caller runs in.
pub fn cgroups_path(id: &str) -> String {
    format!("/{PARENT}/{id}")
}

/// The host's memory limit for a sandbox of `memory_mib`: a quarter more, at least 128 MiB
/// more (the sentry's own memory and page tables, the stubs, a fast allocation between two
/// looks of the agent).
pub fn backstop_bytes(memory_mib: u64) -> u64 {
    let headroom = (memory_mib / 4).max(128);
    memory_mib.saturating_add(headroom).saturating_mul(1 << 20)
}

/// The sandbox's cgroup in the hierarchy rooted at `root`.
fn dir_in(root: &Path, id: &str) -> PathBuf {
    root.join(PARENT).join(id)
}

fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    std::fs::write(dir.join(file), value).map_err(|e| Error::Driver {
        what: "cgroup".into(),
        detail: format!("write {value:?} to {}: {e}", dir.join(file).display()),
    })
}

fn make(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Driver {
        what: "cgroup".into(),
        detail: format!("create {}: {e}", dir.display()),
    })
}

/// Makes (or refreshes) the sandbox's cgroups with its limits. Idempotent.
pub fn create(id: &str, cpus: u32, memory_mib: u64) -> Result<()> {
    let quota = u64::from(cpus.max(1)).saturating_mul(CFS_PERIOD_US);
    let max = backstop_bytes(memory_mib);
    match version() {
        Version::V2 => {
            let root = Path::new(ROOT);
            let parent = root.join(PARENT);
            make(&parent)?;
            // The controllers reach the sandbox's cgroup only when each level passes them on.
            for d in [root, parent.as_path()] {
                write(d, "cgroup.subtree_control", "+cpu +memory +pids")?;
            }
            let dir = dir_in(root, id);
            make(&dir)?;
            write(&dir, "cpu.max", &format!("{quota} {CFS_PERIOD_US}"))?;
            set_memory(id, memory_mib, max)?;
            if dir.join("memory.swap.max").exists() {
                write(&dir, "memory.swap.max", "0")?;
            }
            write(&dir, "pids.max", &HOST_PIDS.to_string())?;
        }
        Version::V1 => {
            let cpu = dir_in(&Path::new(ROOT).join("cpu"), id);
            make(&cpu)?;
            write(&cpu, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
            write(&cpu, "cpu.cfs_quota_us", &quota.to_string())?;
            make(&dir_in(&Path::new(ROOT).join("memory"), id))?;
            set_memory(id, memory_mib, max)?;
            let pids = dir_in(&Path::new(ROOT).join("pids"), id);
            make(&pids)?;
            write(&pids, "pids.max", &HOST_PIDS.to_string())?;
        }
    }
    Ok(())
}

/// Sets the sandbox's host memory limit to `max` bytes (v2: `memory.high` halfway between
/// the sandbox's memory and `max`).
fn set_memory(id: &str, memory_mib: u64, max: u64) -> Result<()> {
    match version() {
        Version::V2 => {
            let dir = dir_in(Path::new(ROOT), id);
            write(&dir, "memory.max", &max.to_string())?;
            let mem = memory_mib << 20;
            let high = mem.saturating_add(max.saturating_sub(mem) / 2);
            write(&dir, "memory.high", &high.to_string())
        }
        Version::V1 => {
            let mem = dir_in(&Path::new(ROOT).join("memory"), id);
            // memsw (memory + swap) is never below the memory limit: lowered after, raised
            // before, so both orders of a change are accepted.
            let memsw = mem.join("memory.memsw.limit_in_bytes").exists();
            if memsw {
                let _ = write(&mem, "memory.memsw.limit_in_bytes", &max.to_string());
            }
            write(&mem, "memory.limit_in_bytes", &max.to_string())?;
            if memsw {
                write(&mem, "memory.memsw.limit_in_bytes", &max.to_string())?;
            }
            Ok(())
        }
    }
}

/// Room for a checkpoint: runsc's sentry writes the sandbox's whole state (up to its memory,
/// plus its kernel's objects) into files whose dirty page cache is charged to the sandbox's
/// cgroup, which at the usual backstop ended sandboxes in the middle of a pause (measured:
/// a 512 MiB sandbox after 1,200 commands). The sandbox's tasks are stopped meanwhile; the
/// limit is the backstop plus the memory again plus 256 MiB, still bounded.
pub fn widen_for_checkpoint(id: &str, memory_mib: u64) -> Result<()> {
    let max = backstop_bytes(memory_mib)
        .saturating_add(memory_mib << 20)
        .saturating_add(256 << 20);
    set_memory(id, memory_mib, max)
}

/// The usual backstop again, for a sandbox that runs on after a checkpoint that failed.
pub fn narrow_after_checkpoint(id: &str, memory_mib: u64) -> Result<()> {
    set_memory(id, memory_mib, backstop_bytes(memory_mib))
}

/// Removes the sandbox's cgroups in every hierarchy (runsc makes some kiln does not), once
/// the processes in them are gone. Idempotent.
pub fn remove(id: &str) -> Result<()> {
    let roots: Vec<PathBuf> = match version() {
        Version::V2 => vec![PathBuf::from(ROOT)],
        Version::V1 => std::fs::read_dir(ROOT)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default(),
    };
    let mut left = Vec::new();
    for root in roots {
        let dir = dir_in(&root, id);
        // A cgroup whose last process just exited can stay busy a moment; one whose
        // processes are still dying (runsc's, on a loaded host) is emptied: everything in it
        // is this sandbox's.
        let t = Instant::now();
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // Not a directory of cgroups (a plain file under /sys/fs/cgroup).
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => break,
                Err(e) if t.elapsed() > Duration::from_secs(10) => {
                    left.push(format!("{}: {e}", dir.display()));
                    break;
                }
                Err(_) => {
                    if t.elapsed() > Duration::from_millis(500) {
                        kill_members(&dir);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(Error::Driver {
            what: "cgroup".into(),
            detail: format!("could not remove {}", left.join(", ")),
        })
    }
}

/// SIGKILL to every process in the cgroup `dir` (and its children).
fn kill_members(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 1 {
            // SAFETY: kill(2) with a pid read from the sandbox's own cgroup; errors (gone
            // already) are fine.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Ok(children) = std::fs::read_dir(dir) {
        for c in children.flatten().filter(|c| c.path().is_dir()) {
            kill_members(&c.path());
        }
    }
}

/// Whether the kernel's OOM killer ended a process of the sandbox's cgroup (the backstop
/// fired: the sentry died with every process inside).
pub fn oom_killed(id: &str) -> bool {
    let (file, key) = match version() {
        Version::V2 => (
            dir_in(Path::new(ROOT), id).join("memory.events"),
            "oom_kill",
        ),
        Version::V1 => (
            dir_in(&Path::new(ROOT).join("memory"), id).join("memory.oom_control"),
            "oom_kill",
        ),
    };
    std::fs::read_to_string(file).is_ok_and(|s| counter(&s, key) > 0)
}

/// The value of `key` in a cgroup file of `key value` lines.
fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time the sandbox's processes used, in ns (for tests and benches: the quota holds).
pub fn cpu_usage_ns(id: &str) -> Option<u64> {
    match version() {
        Version::V2 => {
            let s = std::fs::read_to_string(dir_in(Path::new(ROOT), id).join("cpu.stat")).ok()?;
            Some(counter(&s, "usage_usec").saturating_mul(1000))
        }
        Version::V1 => std::fs::read_to_string(
            dir_in(&Path::new(ROOT).join("cpuacct"), id).join("cpuacct.usage"),
        )
        .ok()?
        .trim()
        .parse()
        .ok(),
    }
}

/// Bytes the sandbox's processes hold on the host (page cache included), if readable.
pub fn memory_in_use(id: &str) -> Option<u64> {
    let path = match version() {
        Version::V2 => dir_in(Path::new(ROOT), id).join("memory.current"),
        Version::V1 => dir_in(&Path::new(ROOT).join("memory"), id).join("memory.usage_in_bytes"),
    };
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Memory the sandbox's processes hold on the host, split as E2B reports it: `(used,
/// cache)` in bytes. gVisor keeps the sandbox's memory in a memfd, which the host counts as
/// shared memory inside the page cache, so used = anonymous + shared memory and cache = the
/// rest of the page cache (the writable layer's file pages).
pub fn memory_split(id: &str) -> Option<(u64, u64)> {
    let (dir, anon, file) = match version() {
        Version::V2 => (dir_in(Path::new(ROOT), id), "anon", "file"),
        Version::V1 => (
            dir_in(&Path::new(ROOT).join("memory"), id),
            "total_rss",
            "total_cache",
        ),
    };
    let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    let shmem = counter(
        &stat,
        if version() == Version::V2 {
            "shmem"
        } else {
            "total_shmem"
        },
    );
    let used = counter(&stat, anon).saturating_add(shmem);
    Some((used, counter(&stat, file).saturating_sub(shmem)))
}

/// A sandbox's `cpus` and `memory_mib` as this host can give them: 0 and memory below
/// [`MIN_MEMORY_MIB`] are refused; more CPUs than the host has, or more memory than it has,
/// are lowered to what it has.
pub fn check(cpus: u32, memory_mib: u64) -> Result<(u32, u64)> {
    if cpus == 0 {
        return Err(Error::Invalid("cpus must be at least 1".into()));
    }
    if memory_mib < MIN_MEMORY_MIB {
        return Err(Error::Invalid(format!(
            "memory must be at least {MIN_MEMORY_MIB} MiB (asked {memory_mib} MiB)"
        )));
    }
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let host_mib = host_memory_mib().unwrap_or(u64::MAX);
    Ok((cpus.min(host_cpus.max(1)), memory_mib.min(host_mib)))
}

fn host_memory_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backstop_leaves_room_above_the_sandbox() {
        assert_eq!(backstop_bytes(512), 640 << 20);
        assert_eq!(backstop_bytes(128), 256 << 20);
        assert_eq!(backstop_bytes(4096), 5120 << 20);
        assert_eq!(backstop_bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn silly_sizes_are_refused_or_lowered() {
        assert!(check(0, 512).is_err());
        assert!(check(1, 0).is_err());
        assert!(check(1, MIN_MEMORY_MIB - 1).is_err());
        let (c, m) = check(u32::MAX, u64::MAX).unwrap();
        assert!(c >= 1 && (c as usize) <= std::thread::available_parallelism().unwrap().get());
        assert!(m < u64::MAX);
        assert_eq!(check(1, 512).unwrap(), (1, 512));
    }

    #[test]
    fn counters_are_read_by_key() {
        let s = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(counter(s, "oom_kill"), 3);
        assert_eq!(counter(s, "missing"), 0);
    }
}
