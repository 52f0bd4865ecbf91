//! Network namespaces holding a TAP, for VM network tests and benchmarks: everything a test
//! sends stays inside a namespace it created (named uniquely, deleted on drop, also when the
//! test panics). Host-side traffic runs on a thread that entered the namespace (`setns`), so
//! sockets opened there live in it.

use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace this process created (`ip netns add`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why namespace tests cannot run here, if they cannot (not root, no `ip`, no /dev/net/tun).
pub fn netns_unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces and TAPs need root".into());
    }
    if ip(&["-V"]).is_err() {
        return Some("iproute2 (`ip`) is not installed".into());
    }
    None
}

/// Moves the calling thread into the named namespace (`/run/netns/NAME`): sockets it opens,
/// and processes it starts, live there.
pub fn enter(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns(2) of the calling thread only, into a namespace file we hold open.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl NetNs {
    /// A fresh namespace `kt<pid>-<tag><n>` with loopback up.
    pub fn new(tag: &str) -> Result<NetNs> {
        let name = format!(
            "kt{}-{tag}{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// A persistent TAP `tap` in this namespace with `cidr` (e.g. 10.77.0.1/24), up.
    pub fn add_tap(&self, tap: &str, cidr: &str) -> Result<()> {
        self.ip(&["tuntap", "add", tap, "mode", "tap"])?;
        self.ip(&["addr", "add", cidr, "dev", tap])?;
        self.ip(&["link", "set", tap, "up"])?;
        Ok(())
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    /// The MAC this namespace's neighbour table has for `addr`, if any.
    pub fn neighbour(&self, addr: &str) -> Option<String> {
        let out = self.ip(&["neigh", "show", addr]).ok()?;
        let mut w = out.split_whitespace();
        w.find(|x| *x == "lladdr")?;
        w.next().map(str::to_string)
    }

    /// Whether TAP `tap` has a reader/writer attached (its carrier is up).
    pub fn tap_attached(&self, tap: &str) -> bool {
        self.ip(&["link", "show", tap])
            .map(|s| !s.contains("NO-CARRIER"))
            .unwrap_or(false)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// ICMP echo requests to `dst` from inside the current thread's namespace (a raw socket): how
/// many of `count` were answered, each waited for up to `timeout`.
pub fn ping(dst: Ipv4Addr, count: u16, timeout: Duration) -> Result<u16> {
    // SAFETY: plain socket creation; the result is checked and owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if raw < 0 {
        bail!("raw ICMP socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let id = (std::process::id() as u16) ^ 0x4b4c;
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut answered = 0;
    for seq in 0..count {
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend((0..56u8).map(|i| i.wrapping_mul(7)));
        let c = inet_checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        // SAFETY: sends from a valid buffer to a valid sockaddr_in.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            bail!("sending ICMP echo: {}", std::io::Error::last_os_error());
        }
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let left = timeout.saturating_sub(t0.elapsed()).as_millis() as i32;
            // SAFETY: polls one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.max(1)) } <= 0 {
                continue;
            }
            let mut buf = [0u8; 2048];
            // SAFETY: receives into a valid buffer.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 28 {
                continue;
            }
            let ihl = usize::from(buf[0] & 15) * 4;
            let icmp = &buf[ihl..n as usize];
            let from = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            if from == dst
                && icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
                && icmp[8..] == pkt[8..]
                && inet_checksum(icmp) == 0
            {
                answered += 1;
                break;
            }
        }
    }
    Ok(answered)
}

/// RFC 1071 checksum.
pub fn inet_checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Sends `payload` to `dst` over UDP from inside the current thread's namespace and waits for
/// the same bytes back from `dst`; retries up to `tries` times (the first datagram may wait
/// for ARP, or be lost). Returns the round trip of the answered try.
pub fn udp_echo(dst: SocketAddrV4, payload: &[u8], tries: u32) -> Result<Duration> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = vec![0u8; 65536];
    for _ in 0..tries {
        let t0 = Instant::now();
        s.send_to(payload, dst)?;
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if from == std::net::SocketAddr::V4(dst) && &buf[..n] == payload {
                return Ok(t0.elapsed());
            }
        }
    }
    bail!("no UDP echo from {dst} after {tries} tries")
}
