//! Network namespaces for the sandbox network tests: a "host" namespace T where kiln runs
//! (its host-side rules and forwarding live there, never in the real root namespace) and an
//! "internet" namespace I behind it with HTTP servers and a DNS server of the test's own.
//! Every address exists only inside these namespaces; both are deleted on drop.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// T's address on the T-I link; I is the next one and T's default route.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
/// HTTP servers in I, each in a /24 of its own, answering `server-a` / `server-b`.
pub const SERVER_A: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
pub const SERVER_B: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 2);
pub const HTTP_PORT: u16 = 8080;
/// The test DNS server's names: web.test -> A, other.test -> B.
pub const DNS_PORT: u16 = 53;

/// Why these tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if let Some(why) = crate::tapns::netns_unavailable() {
        return Some(why);
    }
    for tool in ["nft", "nsenter"] {
        if !crate::registry::have(tool) {
            return Some(format!(
                "{tool} not installed (scripts/install-deps: nftables, util-linux)"
            ));
        }
    }
    None
}

fn ip(args: &[&str]) {
    crate::tapns::ip(args).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Enters namespace `name` on the calling thread.
pub fn enter(name: &str) {
    crate::tapns::enter(name).unwrap_or_else(|e| panic!("{e:#}"));
}

/// T and I with their servers; the calling thread is moved into T by [`TestNet::enter`].
pub struct TestNet {
    pub host_ns: String,
    pub inet_ns: String,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Requests each HTTP server answered.
    pub hits: Arc<[AtomicUsize; 2]>,
}

impl TestNet {
    pub fn new() -> TestNet {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let (t, i) = (format!("kt-{tag}"), format!("ki-{tag}"));
        ip(&["netns", "add", &t]);
        let mut net = TestNet {
            host_ns: t.clone(),
            inet_ns: i.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            hits: Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]),
        };
        ip(&["netns", "add", &i]);
        ip(&[
            "-n", &t, "link", "add", "t0", "type", "veth", "peer", "name", "i0", "netns", &i,
        ]);
        ip(&[
            "-n",
            &t,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            "t0",
        ]);
        ip(&[
            "-n",
            &i,
            "addr",
            "add",
            &format!("{INTERNET_IP}/24"),
            "dev",
            "i0",
        ]);
        for a in [SERVER_A, SERVER_B] {
            ip(&["-n", &i, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        for n in [&t, &i] {
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &t, "link", "set", "t0", "up"]);
        ip(&["-n", &i, "link", "set", "i0", "up"]);
        ip(&[
            "-n",
            &t,
            "route",
            "add",
            "default",
            "via",
            &INTERNET_IP.to_string(),
        ]);
        for (k, a) in [SERVER_A, SERVER_B].into_iter().enumerate() {
            let l = net.in_inet(move || TcpListener::bind((a, HTTP_PORT)).expect("bind http"));
            let (stop, hits) = (net.stop.clone(), net.hits.clone());
            let body = if k == 0 { "server-a" } else { "server-b" };
            net.threads.push(std::thread::spawn(move || {
                http_serve(l, body, &stop, &hits[k])
            }));
        }
        let dns = net.in_inet(|| UdpSocket::bind((INTERNET_IP, DNS_PORT)).expect("bind dns"));
        let stop = net.stop.clone();
        net.threads
            .push(std::thread::spawn(move || dns_serve(dns, &stop)));
        net
    }

    /// Runs `f` on a thread inside I (sockets made there stay there).
    pub fn in_inet<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let i = self.inet_ns.clone();
        std::thread::spawn(move || {
            enter(&i);
            f()
        })
        .join()
        .expect("thread in the internet namespace")
    }

    /// Moves the calling thread into T: every kiln it starts runs there.
    pub fn enter(&self) {
        enter(&self.host_ns);
    }

    /// kiln's environment inside T: sandboxes get networks (the test helpers' default is
    /// none) and resolve names through the test's DNS server (`KILN_DNS_UPSTREAM`).
    pub fn kiln_env(&self) -> [(String, String); 2] {
        [
            ("KILN_NETWORK".into(), "on".into()),
            (
                "KILN_DNS_UPSTREAM".into(),
                SocketAddr::from((INTERNET_IP, DNS_PORT)).to_string(),
            ),
        ]
    }

    /// Interface names in T (host ends of sandbox uplinks are `kiln<N>`).
    pub fn host_links(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.host_ns, "-br", "link"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for TestNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for n in [&self.host_ns, &self.inet_ns] {
            let _ = crate::tapns::ip(&["netns", "del", n]);
        }
    }
}

/// Answers every request with `body` and closes first (so clients keep no time-wait state).
fn http_serve(l: TcpListener, body: &str, stop: &AtomicBool, hits: &AtomicUsize) {
    use std::io::{Read, Write};
    l.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::SeqCst) {
        // Woken by a connection at once (latency is measured through this server).
        let mut fds = [libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll(2) on the listener we own, array sized 1.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        if let Ok((mut s, _)) = l.accept() {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            hits.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// web.test -> SERVER_A, other.test -> SERVER_B, anything else NXDOMAIN.
fn dns_serve(sock: UdpSocket, stop: &AtomicBool) {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Some(q) = kiln_network::dns::question(&buf[..n]) else {
            continue;
        };
        let ip = match q.name.as_str() {
            "web.test" => SERVER_A,
            "other.test" => SERVER_B,
            _ => {
                let _ = sock.send_to(&kiln_network::dns::nxdomain(&buf[..n], &q), from);
                continue;
            }
        };
        let ips = if q.qtype == kiln_network::dns::TYPE_A {
            vec![ip]
        } else {
            vec![]
        };
        let _ = sock.send_to(&kiln_network::dns::reply_a(&buf[..n], &q, &ips, 5), from);
    }
}
