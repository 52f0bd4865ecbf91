//! TAP devices: `/dev/net/tun` opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, optionally inside
//! another network namespace.
//!
//! A TAP belongs to the network namespace of the thread that attaches to it (TUNSETIFF looks the
//! name up there, or creates it there). To reach a TAP in a sandbox's namespace, a short-lived
//! thread enters that namespace (`setns`), opens and attaches, and ends; the file descriptor
//! keeps working from any namespace, and the VMM's own threads never change namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Errors opening a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {0:?} (1 to 15 bytes, no '/', ':' or whitespace)")]
    BadName(String),
    #[error("network namespace {0}: {1}")]
    Netns(PathBuf, io::Error),
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("attaching to TAP {0}: {1}")]
    Attach(String, io::Error),
    #[error("configuring TAP {0}: {1}")]
    Configure(String, io::Error),
}

/// An attached TAP: a packet file descriptor (one read = one frame, one write = one frame), each
/// frame preceded by a 12-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Where a namespace given by name lives (`ip netns add NAME` bind-mounts it there).
pub fn netns_path(netns: &Path) -> PathBuf {
    if netns.components().count() == 1 && !netns.is_absolute() {
        Path::new("/run/netns").join(netns)
    } else {
        netns.to_path_buf()
    }
}

/// Checks a TAP name as the kernel would (IFNAMSIZ, no separators), plus ':' (kiln's syntax).
pub fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '@' || c.is_whitespace() || c.is_control())
    {
        return Err(TapError::BadName(name.to_string()));
    }
    Ok(())
}

impl Tap {
    /// Attaches to TAP `name` (creating a non-persistent one if it does not exist), in network
    /// namespace `netns` (a name under /run/netns or a path such as /proc/PID/ns/net) or in
    /// this thread's namespace. The descriptor is non-blocking; no offloads are enabled.
    pub fn open(name: &str, netns: Option<&Path>) -> Result<Tap, TapError> {
        check_name(name)?;
        let fd = match netns {
            None => attach(name)?,
            Some(ns) => {
                let path = netns_path(ns);
                let ns_file = File::open(&path).map_err(|e| TapError::Netns(path.clone(), e))?;
                let name2 = name.to_string();
                std::thread::Builder::new()
                    .name("tap-open".into())
                    .spawn(move || {
                        // SAFETY: setns on this (short-lived) thread only, with a namespace fd
                        // we hold open; the thread ends right after attaching.
                        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(TapError::Netns(path, io::Error::last_os_error()));
                        }
                        attach(&name2)
                    })
                    .map_err(TapError::OpenTun)?
                    .join()
                    .map_err(|_| {
                        TapError::OpenTun(io::Error::other("tap-open thread panicked"))
                    })??
            }
        };
        let tap = Tap {
            fd,
            name: name.to_string(),
        };
        let conf = |e| TapError::Configure(name.to_string(), e);
        let hdr: libc::c_int = super::VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid.
        if unsafe { libc::ioctl(tap.fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } != 0 {
            return Err(conf(io::Error::last_os_error()));
        }
        // Fully checksummed, unsegmented frames only (see the module docs of `net` on offloads).
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(tap.fd.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } != 0 {
            return Err(conf(io::Error::last_os_error()));
        }
        Ok(tap)
    }

    /// Wraps any packet descriptor (tests use a datagram socket pair in place of a TAP).
    #[doc(hidden)]
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            fd,
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its virtio-net header); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into a valid, exclusively borrowed buffer of buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writes from a valid buffer of buf.len() bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn attach(name: &str) -> Result<OwnedFd, TapError> {
    // SAFETY: open with a NUL-terminated literal path; the result is checked.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(TapError::OpenTun(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which `req` is laid out as.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        return Err(TapError::Attach(
            name.to_string(),
            io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}
