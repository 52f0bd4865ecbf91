//! Host-side file operations in directories a sandbox can write.
//!
//! A directory the sandbox writes (gVisor's `/run/kiln`, a bind mount of a host directory) can
//! hold anything the sandbox likes under any name: symlinks to host files or to other
//! sandboxes' sockets, FIFOs, hard links, and names swapped between a check and a use. So the
//! host never opens a path there by name: it opens the directory itself once (a path made of
//! host-owned components only), then works relative to that descriptor with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`) and
//! `unlinkat`, and checks the type of what it opened on the descriptor, not the name.
//!
//! The same directory is also bounded: [`mount_tmpfs`] puts a small tmpfs of its own there
//! (size and inode limits), so a flood fills that and never the host's disk, and nothing in it
//! can be a hard link to a file elsewhere.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// A directory a sandbox can write, opened by the host (`O_PATH`).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a path"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn stat_fd(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: fstat writes one stat struct into st; all-zero is a valid initial value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor we own; st is valid for writing.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

impl Dir {
    /// Opens `path`, whose every component the host owns (the sandbox writes only inside it);
    /// its last component must be a directory, not a symlink to one.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = cstr(path)?;
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a valid NUL-terminated path; the result is checked.
        let fd = check(unsafe { libc::open(c.as_ptr(), flags) })?;
        Ok(Dir {
            // SAFETY: fd is a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` (relative, no `..`, no symlink anywhere, on this directory's file system) opened
    /// with `flags` (`O_NOFOLLOW | O_CLOEXEC` are always added).
    pub fn open_beneath(&self, name: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
        let c = cstr(name)?;
        // SAFETY: open_how is plain integers; all-zero is valid (mode 0, no flags).
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_BENEATH
            | libc::RESOLVE_NO_SYMLINKS
            | libc::RESOLVE_NO_MAGICLINKS
            | libc::RESOLVE_NO_XDEV;
        // SAFETY: openat2(2) with our directory descriptor, a valid NUL-terminated path and an
        // open_how of the size we pass; the result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }

    /// `lstat` of `name` beneath this directory (never through a symlink); `None` when it is
    /// missing or reachable only through one.
    pub fn lstat_beneath(&self, name: &Path) -> Option<libc::stat> {
        let fd = self.open_beneath(name, libc::O_PATH).ok()?;
        stat_fd(&fd).ok()
    }

    /// The target of the symlink `name` beneath this directory.
    pub fn readlink_beneath(&self, name: &Path) -> io::Result<PathBuf> {
        let fd = self.open_beneath(name, libc::O_PATH)?;
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// The names in the directory `name` beneath this one (`.` for itself).
    pub fn names_beneath(&self, name: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        let fd = self.open_beneath(name, libc::O_RDONLY | libc::O_DIRECTORY)?;
        std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    /// Connects to the Unix socket `name` in this directory, never through a symlink: the
    /// socket's inode is opened (`O_PATH`), checked to be a socket, and connected to through
    /// this process's own descriptor for it, so a name swapped meanwhile changes nothing.
    pub fn connect(&self, name: &Path) -> io::Result<UnixStream> {
        let fd = self.open_beneath(name, libc::O_PATH)?;
        if stat_fd(&fd)?.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a socket", self.path.join(name).display()),
            ));
        }
        UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// Removes the entry `name` of this directory itself (a symlink is removed, not followed;
    /// not a directory). Missing is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a name in a directory"),
            ));
        }
        let c = cstr(Path::new(name))?;
        // SAFETY: unlinkat(2) on our directory descriptor with a valid NUL-terminated name.
        match check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Limits of a [`mount_tmpfs`].
#[derive(Clone, Copy, Debug)]
pub struct TmpfsLimits {
    pub bytes: u64,
    pub inodes: u64,
    /// Mode of its root directory.
    pub mode: u32,
}

/// Whether `path` is the root of a mount other than its parent's (lstat: a symlink is not).
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::symlink_metadata(path)?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    Ok(me.is_dir() && me.dev() != std::fs::symlink_metadata(parent)?.dev())
}

/// Mounts a fresh tmpfs with `limits` on the existing directory `path` (host-owned, as
/// [`Dir::open`] wants), after unmounting whatever is mounted there already.
pub fn mount_tmpfs(path: &Path, source: &str, limits: TmpfsLimits) -> io::Result<()> {
    unmount_all(path)?;
    let data = format!(
        "size={},nr_inodes={},mode={:o}",
        limits.bytes, limits.inodes, limits.mode
    );
    let (src, dst, fstype, data) = (
        CString::new(source).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        cstr(path)?,
        c"tmpfs",
        CString::new(data).expect("no NUL"),
    );
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: mount(2) with valid NUL-terminated strings; the result is checked.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })?;
    Ok(())
}

/// Unmounts every mount stacked on `path` (lazily: a process still inside keeps its view),
/// until it is a plain directory again. Missing is fine.
pub fn unmount_all(path: &Path) -> io::Result<()> {
    let c = cstr(path)?;
    // Bounded: a mount that does not go away is an error, not a hang.
    for _ in 0..64 {
        match is_mount_point(path) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        // SAFETY: umount2(2) with a valid NUL-terminated path; the result is checked.
        check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) })?;
    }
    Err(io::Error::other(format!(
        "{} is still a mount point",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_and_non_sockets_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let canary = t.path().join("canary");
        std::fs::write(&canary, b"keep").unwrap();
        let shared = t.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let sock = t.path().join("other.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::os::unix::fs::symlink(&sock, shared.join("agent.sock")).unwrap();
        std::os::unix::fs::symlink(&canary, shared.join("file")).unwrap();
        std::os::unix::fs::symlink("..", shared.join("up")).unwrap();
        let d = Dir::open(&shared).unwrap();

        // O_PATH|O_NOFOLLOW opens a trailing symlink itself: the type check refuses it.
        let e = d.connect(Path::new("agent.sock")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let e = d.connect(Path::new("up/other.sock")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let e = d.connect(Path::new("../other.sock")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{e}");
        let e = d
            .open_beneath(Path::new("file"), libc::O_WRONLY | libc::O_TRUNC)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        // A regular file is not a socket.
        std::fs::write(shared.join("plain"), b"x").unwrap();
        let e = d.connect(Path::new("plain")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        // A real socket connects; removing a symlink removes the link only.
        let real = shared.join("real.sock");
        let _l2 = std::os::unix::net::UnixListener::bind(&real).unwrap();
        d.connect(Path::new("real.sock")).unwrap();
        d.remove("file").unwrap();
        d.remove("file").unwrap();
        assert!(d.remove("../canary").is_err());
        assert_eq!(std::fs::read(&canary).unwrap(), b"keep");
        // The directory itself must not be a symlink.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        assert!(Dir::open(&link).is_err());
    }
}
