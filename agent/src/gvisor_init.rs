//! What the agent does first as PID 1 of a gVisor sandbox, before any other thread exists.
//!
//! gVisor's procfs caches the `/proc/<pid>` directory of every process looked up there (each
//! process a shell runs is), up to 1,000 of them: some 80 KiB of sentry state and ~5 ms of
//! `runsc checkpoint` and `runsc restore` each (measured on runsc 20240729: a sandbox that had
//! run 300 commands checkpointed 25 MB in 1.5 s, a fresh one 0.5 MB in 60 ms). runsc mounts
//! the container's `/proc` without passing mount options, so the agent mounts a procfs of its
//! own over it with a small cache ([`PROC_DENTRY_CACHE`]), then gives up `CAP_SYS_ADMIN`,
//! which the runtime grants it for its mounts alone (this one, and the cgroupfs's in
//! [`crate::limits::limit_tasks`]): it leaves the bounding set, so no process of the sandbox
//! ever has it.
//!
//! `CAP_SYS_RESOURCE` (also granted by the runtime for the agent alone) stays in the agent's
//! effective set, and leaves the bounding and inheritable sets: the agent is exempt from the
//! per-user task limit it sets ([`crate::limits`]), and no process it starts can gain it.

use std::ffi::CString;

/// The `/proc/<pid>` directories gVisor's procfs may keep cached: enough for a tool that
/// reads a few files of a few processes in a row (`ps`, `top`), a bounded cost in every
/// checkpoint (reading `/proc/1/stat` 3,000 times showed no difference between 0 and 1,000).
pub const PROC_DENTRY_CACHE: u32 = 8;

/// `CAP_SYS_ADMIN` (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_SYS_RESOURCE` (linux/capability.h).
const CAP_SYS_RESOURCE: u32 = 24;

/// Mounts the small-cache procfs over `/proc`, then drops `CAP_SYS_ADMIN` from every set of
/// this thread (the only one) and `CAP_SYS_RESOURCE` from all but its effective and permitted
/// sets. The drops happen whether or not the mount worked; an error says what did not work.
/// Call it before any thread is spawned: capabilities are per thread.
///
/// With a task limit, also makes the task-limited cgroup and seals gVisor's cgroupfs read-only
/// ([`crate::limits::limit_tasks`]), which needs `CAP_SYS_ADMIN` too.
pub fn init(pids_max: Option<u64>) -> Result<(), String> {
    let mounted = mount_proc();
    let limited = match pids_max {
        Some(n) => crate::limits::limit_tasks(n)
            .map_err(|e| format!("processes start without a task limit: {e}")),
        None => Ok(()),
    };
    let dropped = drop_caps();
    mounted.and(limited).and(dropped)
}

fn mount_proc() -> Result<(), String> {
    let data = format!("dentry_cache_limit={PROC_DENTRY_CACHE}");
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let proc = std::path::Path::new("/proc");
    mount(proc, proc, Some("proc"), flags, Some(&data))
        .map_err(|e| format!("mount /proc with a small dentry cache: {e}"))
}

/// mount(2): `src` on `dst`, of file system type `fstype` with `data` (None for binds and
/// remounts, which take neither). The error names the mount.
pub(crate) fn mount(
    src: &std::path::Path,
    dst: &std::path::Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let c = |b: &[u8]| CString::new(b).map_err(|e| e.to_string());
    let (s, d) = (
        c(src.as_os_str().as_encoded_bytes())?,
        c(dst.as_os_str().as_encoded_bytes())?,
    );
    let (t, x) = (
        fstype.map(|t| c(t.as_bytes())).transpose()?,
        data.map(|x| c(x.as_bytes())).transpose()?,
    );
    let ptr = |o: &Option<CString>| o.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: valid NUL-terminated strings or nulls; the data, when given, is a string, as
    // the file systems mounted here (procfs) expect.
    let r = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), ptr(&t), flags, ptr(&x).cast()) };
    if r != 0 {
        return Err(format!(
            "mount {} on {} (flags {flags:#x}): {}",
            src.display(),
            dst.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

fn drop_caps() -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    for (cap, name) in [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE"),
    ] {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        // EINVAL: a kernel that does not know the capability, nothing to drop.
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(os(&format!("drop {name} from the bounding set")));
        }
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (version 3) through a pointer to an array of two.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if r != 0 {
        return Err(os("capget"));
    }
    let admin = !(1u32 << CAP_SYS_ADMIN);
    data[0].effective &= admin;
    data[0].permitted &= admin;
    data[0].inheritable &= admin & !(1u32 << CAP_SYS_RESOURCE);
    // SAFETY: capset reads the header and two CapData, all valid for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if r != 0 {
        return Err(os("drop CAP_SYS_ADMIN"));
    }
    // An ambient capability would survive exec: none may (Docker's set gives none anyway).
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capability masks (`CapEff`, `CapPrm`, `CapBnd`, `CapInh`) of this thread.
    fn masks() -> Vec<(String, u64)> {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .filter(|l| l.starts_with("Cap") && !l.starts_with("CapAmb"))
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.to_string(), u64::from_str_radix(v.trim(), 16).unwrap())
            })
            .collect()
    }

    #[test]
    fn sys_admin_leaves_every_set_sys_resource_stays_effective_only_and_the_rest_stays() {
        if !masks()
            .iter()
            .any(|(k, m)| k == "CapEff" && m & (1 << CAP_SYS_ADMIN) != 0)
        {
            eprintln!("SKIP: this test process has no CAP_SYS_ADMIN to drop");
            return;
        }
        // Some hosts' containers give root no CAP_SYS_RESOURCE to keep.
        let had_resource = masks()
            .iter()
            .any(|(k, m)| k == "CapEff" && m & (1 << CAP_SYS_RESOURCE) != 0);
        // In a child process: the drop is for good.
        // SAFETY: the child only reads /proc, calls drop_caps and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let ok = drop_caps().is_ok()
                && masks().iter().all(|(k, m)| {
                    let resource = m & (1 << CAP_SYS_RESOURCE) != 0;
                    m & (1 << CAP_SYS_ADMIN) == 0
                        && (k == "CapInh" || m & (1 << 0) != 0) // CAP_CHOWN kept
                        && resource == (had_resource && (k == "CapEff" || k == "CapPrm"))
                });
            // SAFETY: _exit in the forked child, no unwinding into the test harness.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "CAP_SYS_ADMIN still there, CAP_SYS_RESOURCE beyond the agent, or another \
             capability went: {status:#x}"
        );
    }
}
