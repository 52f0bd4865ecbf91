//! Creating, changing and removing a sandbox's network.

use crate::policy::NetworkPolicy;
use crate::{
    dns, io_err, ns, rules, Error, Result, GATEWAY_IP, GATEWAY_MAC, GUEST_IP, GUEST_MAC,
    GUEST_PREFIX,
};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Uplinks are /30s of 10.89.0.0/16: 16384 sandboxes per host.
const SLOTS: u32 = 16384;
/// A slot file younger than this may belong to a sandbox still being set up.
const SLOT_GRACE: Duration = Duration::from_secs(60);
/// DNS answers for allowed names stay allowed at least this long.
pub(crate) const MIN_TTL: u32 = 120;
/// How long a change to a sandbox's network waits for the helpers of a killed earlier one
/// (they die with their caller, so this is only ever a few milliseconds).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// A sandbox's network lock (`state/lock`, flock): held by whoever changes the network and by
/// every `ip`/`nft` helper they start. A caller killed mid-change (kill -9 of a resume) leaves
/// helpers that may still be creating a namespace; whoever cleans up after it takes this lock
/// first, so nothing is made after the cleanup.
struct NetLock(std::fs::File);

impl NetLock {
    /// Creates the state directory and takes its lock.
    fn take(state: &Path) -> Result<NetLock> {
        std::fs::create_dir_all(state).map_err(io_err(format!("create {}", state.display())))?;
        let path = state.join("lock");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err(format!("open {}", path.display())))?;
        if !Self::wait(&f) {
            return Err(Error::Invalid(format!(
                "the network of {} is still being changed after {LOCK_WAIT:?}",
                state.display()
            )));
        }
        Ok(NetLock(f))
    }

    /// The lock of a network that was ever set up (none: nothing to wait for). A lock still
    /// held after [`LOCK_WAIT`] is not waited for longer: the cleanup goes ahead.
    fn existing(state: &Path) -> Option<NetLock> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(state.join("lock"))
            .ok()?;
        if !Self::wait(&f) {
            tracing::warn!(state = %state.display(), "network lock still held: cleaning up anyway");
        }
        Some(NetLock(f))
    }

    /// Takes the lock within [`LOCK_WAIT`].
    fn wait(f: &std::fs::File) -> bool {
        use std::os::fd::AsRawFd;
        let t = Instant::now();
        loop {
            // SAFETY: flock(2) on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return true;
            }
            if t.elapsed() > LOCK_WAIT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs a helper that holds this lock until it exits (see [`ns::run`]).
    fn run(&self, ns: Option<&str>, prog: &str, args: &[&str], input: &str) -> Result<String> {
        ns::run_holding(ns, prog, args, input, Some(&self.0))
    }
}

/// What faces the guest in the router namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// A persistent TAP `tap0` that the VMM opens after entering the router namespace.
    Tap,
    /// A veth `gw0` whose peer `eth0` lives in the guest namespace (gVisor takes over every
    /// interface of the namespace it is given, so the router cannot be that namespace).
    Veth,
}

/// A sandbox's network on this host, as kept in its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub slot: u32,
    /// The router namespace (`/run/netns/<name>`).
    pub router_ns: String,
    /// gVisor: the namespace runsc is given.
    pub guest_ns: Option<String>,
    /// microVM: the TAP in the router namespace.
    pub tap: Option<String>,
    /// The host end of the uplink, in kiln's namespace.
    pub host_if: String,
    pub guest_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub mac: String,
    pub uplink_ip: Ipv4Addr,
}

/// The network namespace runsc is given for sandbox `id` (a veth attachment's `guest_ns`):
/// known before the attachment is made, so a bundle can name it meanwhile.
pub fn guest_namespace(id: &str) -> String {
    names(id).1
}

/// Namespace names of sandbox `id` (host-global, so derived from the unique id).
fn names(id: &str) -> (String, String) {
    let short: String = id.chars().take(12).collect();
    (format!("kiln-{short}"), format!("kiln-{short}-g"))
}

fn slots_dir() -> PathBuf {
    std::env::var_os("KILN_NET_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/kiln/net"))
        .join("slots")
}

fn slot_ips(slot: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 89, 0, 0)) + slot * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// Claims a free slot (create-exclusive file naming its router namespace); a slot whose
/// namespace is gone and whose file is older than the grace period is taken over.
fn alloc_slot(router: &str) -> Result<u32> {
    let dir = slots_dir();
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let start = (std::process::id().wrapping_mul(2654435761) ^ fxhash(router)) % SLOTS;
    for i in 0..SLOTS {
        let slot = (start + i) % SLOTS;
        let p = dir.join(slot.to_string());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(router.as_bytes())
                    .map_err(io_err(format!("write {}", p.display())))?;
                return Ok(slot);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if reclaim_if_stale(&p) {
                    // Retried on the next pass of a later caller; keep scanning here.
                    continue;
                }
            }
            Err(e) => return Err(io_err(format!("create {}", p.display()))(e)),
        }
    }
    Err(Error::NoSlot(SLOTS))
}

fn fxhash(s: &str) -> u32 {
    s.bytes()
        .fold(0x811c9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(16777619))
}

/// Removes a slot file whose namespace is gone (its owner died before cleaning up).
fn reclaim_if_stale(p: &Path) -> bool {
    let old = std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > SLOT_GRACE);
    let owner = std::fs::read_to_string(p).unwrap_or_default();
    if old && (owner.is_empty() || !ns::exists(owner.trim())) {
        return std::fs::remove_file(p).is_ok();
    }
    false
}

/// Frees the slots of dead sandboxes (their router namespace is gone).
pub fn cleanup_stale_slots() -> usize {
    let Ok(rd) = std::fs::read_dir(slots_dir()) else {
        return 0;
    };
    rd.flatten().filter(|e| reclaim_if_stale(&e.path())).count()
}

/// Forwarding and the host table in kiln's namespace, once per process.
fn ensure_host() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
        if fwd.trim() != "1" {
            ns::sysctl("net.ipv4.ip_forward", "1").map_err(|e| e.to_string())?;
        }
        apply_host_table()
    })
    .clone()
    .map_err(Error::Host)
}

/// The host table with the protected endpoints on record ([`protect`]).
fn apply_host_table() -> std::result::Result<(), String> {
    let table = rules::host_table(&protected_endpoints());
    ns::run(None, "nft", &["-f", "-"], &table)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The file holding the endpoints no sandbox may reach (`ip:port` a line), host-wide: every
/// kiln process on the host writes the host table, each from it.
fn protected_file() -> PathBuf {
    std::env::var_os("KILN_NET_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/kiln/net"))
        .join("protected")
}

fn protected_endpoints() -> Vec<SocketAddrV4> {
    let text = std::fs::read_to_string(protected_file()).unwrap_or_default();
    let mut all: Vec<SocketAddrV4> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    all.sort();
    all.dedup();
    all
}

/// Makes the TCP `endpoints` (a cluster's etcd members) unreachable from every sandbox of this
/// host, whatever its egress policy allows, from now on: added to those on record and
/// written into the host table at once (an atomic replace; running sandboxes keep their
/// connections' NAT).
pub fn protect(endpoints: &[SocketAddrV4]) -> Result<()> {
    let mut all = protected_endpoints();
    all.extend_from_slice(endpoints);
    all.sort();
    all.dedup();
    let text: String = all.iter().map(|a| format!("{a}\n")).collect();
    let file = protected_file();
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Host(format!("{}: {e}", dir.display())))?;
    }
    kiln_atomicfile::write(&file, text.as_bytes(), kiln_atomicfile::Options::PLAIN)
        .map_err(|e| Error::Host(format!("{}: {e}", file.display())))?;
    ensure_host()?;
    apply_host_table().map_err(Error::Host)
}

/// The DNS proxy's settings, in the sandbox's network directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyConfig {
    pub router_ns: String,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
}

/// Where the proxy asks: `KILN_DNS_UPSTREAM=ip:port`, else the first nameserver in
/// /etc/resolv.conf.
fn upstream() -> Result<SocketAddr> {
    if let Some(v) = std::env::var_os("KILN_DNS_UPSTREAM").filter(|v| !v.is_empty()) {
        let s = v.to_string_lossy();
        return s
            .parse()
            .or_else(|_| {
                s.parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, 53))
            })
            .map_err(|_| Error::Invalid(format!("KILN_DNS_UPSTREAM={s}: want ip:port")));
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddr::new(ip.into(), 53))
        .next()
        .ok_or_else(|| {
            Error::Invalid("no IPv4 nameserver in /etc/resolv.conf; set KILN_DNS_UPSTREAM".into())
        })
}

/// Sets up sandbox `id`'s network (kiln must run in the host's mount namespace, as
/// `nsenter --net` keeps it, not under `ip netns exec`: the namespaces it creates are bind
/// mounts under /run/netns that later kiln processes must see): namespaces, interfaces, NAT, `policy`, and its DNS proxy
/// (`proxy_cmd` + the state directory, e.g. `kiln __helper DIR`). `state` is a directory
/// of the sandbox's own (policy, DNS proxy files). On error nothing is left.
pub fn attach(
    id: &str,
    kind: GuestKind,
    policy: &NetworkPolicy,
    state: &Path,
    proxy_cmd: &[OsString],
) -> Result<Attachment> {
    let t = Instant::now();
    ensure_host()?;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "host table ensured");
    let lock = NetLock::take(state)?;
    let (router, guest) = names(id);
    let slot = alloc_slot(&router)?;
    let (host_ip, uplink_ip) = slot_ips(slot);
    let att = Attachment {
        slot,
        router_ns: router.clone(),
        guest_ns: (kind == GuestKind::Veth).then(|| guest.clone()),
        tap: (kind == GuestKind::Tap).then(|| "tap0".to_string()),
        host_if: format!("kiln{slot}"),
        guest_ip: GUEST_IP,
        gateway: GATEWAY_IP,
        prefix: GUEST_PREFIX,
        mac: GUEST_MAC.into(),
        uplink_ip,
    };
    let made = build(&att, host_ip, policy, state, proxy_cmd, &lock);
    if let Err(e) = made {
        remove(id, state);
        return Err(e);
    }
    tracing::debug!(
        id,
        slot,
        ms = t.elapsed().as_millis() as u64,
        "network attached"
    );
    Ok(att)
}

fn build(
    att: &Attachment,
    host_ip: Ipv4Addr,
    policy: &NetworkPolicy,
    state: &Path,
    proxy_cmd: &[OsString],
    lock: &NetLock,
) -> Result<()> {
    let r = att.router_ns.as_str();
    let gw = format!("{}/{}", att.gateway, att.prefix);
    let t = Instant::now();
    let step = |what: &str| tracing::debug!(ms = t.elapsed().as_millis() as u64, "{what}");
    lock.run(None, "ip", &["netns", "add", r], "")?;
    if let Some(g) = &att.guest_ns {
        lock.run(None, "ip", &["netns", "add", g], "")?;
    }
    step("namespaces added");
    let hif = &att.host_if;
    lock.run(
        None,
        "ip",
        &["-b", "-"],
        &format!(
            "link add {hif} type veth peer name up0 netns {r}\n\
             addr add {host_ip}/30 dev {hif}\n\
             link set {hif} up\n"
        ),
    )?;
    let no_v6 = || {
        ns::sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns::sysctl("net.ipv6.conf.default.disable_ipv6", "1")
    };
    ns::within(r, || {
        no_v6()?;
        ns::sysctl("net.ipv4.ip_forward", "1")
    })?;
    let mut batch = format!(
        "link set lo up\naddr add {}/30 dev up0\nlink set up0 up\nroute add default via {host_ip}\n",
        att.uplink_ip
    );
    let guest_if = match (&att.guest_ns, &att.tap) {
        (Some(g), _) => {
            batch += &format!(
                "link add gw0 address {GATEWAY_MAC} type veth peer name eth0 address {GUEST_MAC} netns {g}\n\
                 addr add {gw} dev gw0\nlink set gw0 up\n"
            );
            "gw0"
        }
        (None, Some(tap)) => {
            batch += &format!(
                "tuntap add dev {tap} mode tap\nlink set {tap} address {GATEWAY_MAC}\n\
                 addr add {gw} dev {tap}\nlink set {tap} up\n"
            );
            tap.as_str()
        }
        (None, None) => return Err(Error::Invalid("an attachment needs a TAP or a veth".into())),
    };
    step("uplink made");
    lock.run(Some(r), "ip", &["-b", "-"], &batch)?;
    step("router configured");
    if let Some(g) = &att.guest_ns {
        ns::within(g, no_v6)?;
        reset_guest_holding(att, Some(lock))?;
    }
    let cfg = ProxyConfig {
        router_ns: r.to_string(),
        listen: SocketAddr::new(att.gateway.into(), 53),
        upstream: upstream()?,
    };
    write(
        &state.join("dns.json"),
        &serde_json::to_vec_pretty(&cfg).expect("json"),
    )?;
    write(
        &state.join("resolv.conf"),
        format!("nameserver {}\n", att.gateway).as_bytes(),
    )?;
    write(
        &state.join("hosts"),
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    step("guest configured");
    apply_rules(att, guest_if, policy, state, &cfg, lock)?;
    step("rules applied");
    let started = start_proxy(state, proxy_cmd);
    step("DNS proxy started");
    started
}

fn write(p: &Path, bytes: &[u8]) -> Result<()> {
    kiln_atomicfile::write(p, bytes, kiln_atomicfile::Options::PLAIN)
        .map_err(io_err(format!("write {}", p.display())))
}

/// (Re)configures the guest namespace's `eth0` before runsc takes it over (runsc removes the
/// addresses it copies into its netstack, so every run and restore needs them again).
pub fn reset_guest(att: &Attachment) -> Result<()> {
    reset_guest_holding(att, None)
}

fn reset_guest_holding(att: &Attachment, lock: Option<&NetLock>) -> Result<()> {
    let Some(g) = &att.guest_ns else {
        return Ok(());
    };
    ns::run_holding(
        Some(g),
        "ip",
        &["-b", "-"],
        &format!(
            "link set lo up\naddr replace {}/{} dev eth0\nlink set eth0 up\n\
             route replace default via {}\n",
            att.guest_ip, att.prefix, att.gateway
        ),
        lock.map(|l| &l.0),
    )
    .map(|_| ())
}

/// Resolves the policy's host names (through the upstream) and rewrites the router's table.
fn apply_rules(
    att: &Attachment,
    guest_if: &str,
    policy: &NetworkPolicy,
    state: &Path,
    cfg: &ProxyConfig,
    lock: &NetLock,
) -> Result<()> {
    let resolve = |list: &[crate::Dest]| -> Vec<Ipv4Addr> {
        let mut ips = Vec::new();
        for h in NetworkPolicy::hosts(list).filter(|h| !h.starts_with("*.")) {
            match dns::resolve_a(cfg.upstream, h, Duration::from_secs(2)) {
                Ok(a) => ips.extend(a.into_iter().map(|(ip, _)| ip)),
                Err(e) => tracing::warn!(host = h, "cannot resolve: {e}"),
            }
        }
        ips.sort();
        ips.dedup();
        ips
    };
    let allowed = resolve(&policy.allow_out);
    let denied = resolve(&policy.deny_out);
    write(
        &state.join("policy.json"),
        &serde_json::to_vec_pretty(policy).expect("json"),
    )?;
    let table = rules::router_table(guest_if, policy, &allowed, &denied);
    lock.run(Some(&att.router_ns), "nft", &["-f", "-"], &table)
        .map(|_| ())
}

/// Changes a running sandbox's policy: the router's table atomically, the proxy's file
/// (it rereads it on its next query).
pub fn apply_policy(att: &Attachment, policy: &NetworkPolicy, state: &Path) -> Result<()> {
    let cfg: ProxyConfig = serde_json::from_slice(
        &std::fs::read(state.join("dns.json")).map_err(io_err("read the DNS proxy settings"))?,
    )
    .map_err(|e| Error::Invalid(format!("dns.json: {e}")))?;
    let guest_if = if att.tap.is_some() { "tap0" } else { "gw0" };
    let lock = NetLock::take(state)?;
    apply_rules(att, guest_if, policy, state, &cfg, &lock)
}

/// Starts the DNS proxy detached (own process group, output to `dns.log`) and waits until
/// it serves.
fn start_proxy(state: &Path, proxy_cmd: &[OsString]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let (prog, args) = proxy_cmd
        .split_first()
        .ok_or_else(|| Error::Invalid("no DNS proxy command".into()))?;
    let ready = state.join("dns.ready");
    let _ = std::fs::remove_file(&ready);
    let log_path = state.join("dns.log");
    let log = std::fs::File::create(&log_path)
        .map_err(io_err(format!("create {}", log_path.display())))?;
    let mut child = std::process::Command::new(prog)
        .args(args)
        .arg(state)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io_err("dup the DNS log"))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(io_err(format!(
            "start the DNS proxy {}",
            Path::new(prog).display()
        )))?;
    write(&state.join("dns.pid"), child.id().to_string().as_bytes())?;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if ready.exists() {
            // Reaped by a thread so it never lingers as a zombie of a long-lived caller.
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(Error::Invalid(format!(
                "the DNS proxy exited ({status}): {}",
                log.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(Error::Invalid(
        "the DNS proxy did not start within 5 s".into(),
    ))
}

/// Removes sandbox `id`'s network, whatever state a creator left it in: the DNS proxy,
/// both namespaces (with every interface and rule in them), the host end, the slot.
/// Idempotent; the names derive from the id, so a record without an attachment is enough.
/// Waits for the helpers of a killed [`attach`] first ([`NetLock`]).
pub fn detach(id: &str, state: &Path) {
    let _lock = NetLock::existing(state);
    remove(id, state);
}

/// [`detach`] under the network lock.
fn remove(id: &str, state: &Path) {
    let (router, guest) = names(id);
    let pid_file = state.join("dns.pid");
    if let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*state.to_string_lossy()));
        if ours {
            // SAFETY: kill(2) of this sandbox's DNS proxy (its command line names our dir).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    for n in [&guest, &router] {
        if ns::exists(n) {
            if let Err(e) = ns::run(None, "ip", &["netns", "del", n], "") {
                tracing::warn!("{e}");
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(slots_dir()) {
        for e in rd.flatten() {
            if std::fs::read_to_string(e.path()).is_ok_and(|o| o.trim() == router) {
                // The namespace's own teardown is deferred by the kernel: delete the host end
                // now, so the slot's next owner can create it again.
                let host_if = format!("kiln{}", e.file_name().to_string_lossy());
                let _ = ns::run(None, "ip", &["link", "del", &host_if], "");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
