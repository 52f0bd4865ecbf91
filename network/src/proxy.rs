//! The per-sandbox DNS proxy (`kiln __helper DIR`, started by kiln-runtime's helpers): opens its upstream socket in kiln's
//! namespace, enters the sandbox's router namespace, answers on the gateway address by the
//! policy in `DIR/policy.json` (reread when it changes), and lets the guest connect to the
//! addresses of allowed names by adding them to the router's `allow_dns` set before it
//! passes the answer on. UDP only; every query is answered or dropped within a few seconds.

use crate::policy::{NameVerdict, NetworkPolicy};
use crate::setup::{ProxyConfig, MIN_TTL};
use crate::{dns, io_err, ns, rules, Error, Result};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

struct Pending {
    client: SocketAddr,
    id: u16,
    verdict: NameVerdict,
    at: Instant,
}

/// The device and inode that name a namespace (as `/run/netns/<name>` shows them).
fn ns_identity(f: &std::fs::File) -> std::io::Result<(u64, u64)> {
    f.metadata().map(|m| (m.dev(), m.ino()))
}

/// Runs the proxy for the sandbox whose network state is in `state`; returns on error, or
/// once the sandbox's router namespace is gone.
pub fn serve(state: &Path) -> Result<()> {
    let cfg: ProxyConfig = serde_json::from_slice(
        &std::fs::read(state.join("dns.json")).map_err(io_err("read dns.json"))?,
    )
    .map_err(|e| Error::Invalid(format!("dns.json: {e}")))?;
    // Bound here, before entering the router namespace: an upstream on kiln's own loopback
    // (127.0.0.53) stays reachable.
    // Not connected: an upstream unreachable now (no route yet) must not stop the proxy.
    let upstream = UdpSocket::bind("0.0.0.0:0").map_err(io_err("bind the upstream socket"))?;
    let nsf = ns::open(&cfg.router_ns)?;
    // SAFETY: setns(2) of this single-threaded process into the router namespace.
    if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io_err("enter the router namespace")(
            std::io::Error::last_os_error(),
        ));
    }
    let guest = UdpSocket::bind(cfg.listen).map_err(io_err(format!("bind {}", cfg.listen)))?;
    std::fs::write(state.join("dns.ready"), b"").map_err(io_err("write dns.ready"))?;
    let served = ns_identity(&nsf).map_err(io_err("stat the router namespace"))?;
    let mut checked = Instant::now();

    let policy_path = state.join("policy.json");
    let mut policy = NetworkPolicy::default();
    let mut policy_mtime: Option<SystemTime> = None;
    let mut pending: HashMap<u16, Pending> = HashMap::new();
    let mut next_id: u16 = std::process::id() as u16;
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: guest.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: upstream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two descriptors we own, with a correctly sized array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_err("poll")(e));
        }
        pending.retain(|_, p| p.at.elapsed() < Duration::from_secs(5));
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            // A caller killed before it recorded this proxy's pid cannot stop it: it stops
            // itself once its namespace is deleted (or another one has taken the name).
            let now = std::fs::metadata(ns::path(&cfg.router_ns)).map(|m| (m.dev(), m.ino()));
            if now.ok() != Some(served) {
                return Ok(());
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let Ok((len, client)) = guest.recv_from(&mut buf) else {
                continue;
            };
            let msg = &buf[..len];
            let Some(q) = dns::question(msg) else {
                continue;
            };
            let mtime = std::fs::metadata(&policy_path)
                .and_then(|m| m.modified())
                .ok();
            if mtime != policy_mtime {
                if let Ok(p) = std::fs::read(&policy_path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                {
                    policy = p;
                    policy_mtime = mtime;
                }
            }
            let verdict = policy.name_verdict(&q.name);
            if verdict == NameVerdict::Refused {
                let _ = guest.send_to(&dns::nxdomain(msg, &q), client);
                continue;
            }
            next_id = next_id.wrapping_add(1);
            let mut fwd = msg.to_vec();
            let orig = dns::id(msg).unwrap_or(0);
            dns::set_id(&mut fwd, next_id);
            if upstream.send_to(&fwd, cfg.upstream).is_ok() {
                pending.insert(
                    next_id,
                    Pending {
                        client,
                        id: orig,
                        verdict,
                        at: Instant::now(),
                    },
                );
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let Ok((len, from)) = upstream.recv_from(&mut buf) else {
                continue;
            };
            if from != cfg.upstream {
                continue;
            }
            let Some(p) = dns::id(&buf[..len]).and_then(|id| pending.remove(&id)) else {
                continue;
            };
            if p.verdict == NameVerdict::Allowed {
                let ips: Vec<_> = dns::answers_a(&buf[..len])
                    .into_iter()
                    .map(|(ip, ttl)| (ip, ttl.max(MIN_TTL)))
                    .collect();
                if !ips.is_empty() {
                    // Before the answer: the guest's connection right after must pass.
                    if let Err(e) =
                        ns::run(None, "nft", &["-f", "-"], &rules::allow_dns_elements(&ips))
                    {
                        eprintln!("kiln dns: {e}");
                    }
                }
            }
            dns::set_id(&mut buf[..len], p.id);
            let _ = guest.send_to(&buf[..len], p.client);
        }
    }
}
