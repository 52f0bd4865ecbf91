//! Sandbox networking end to end on gVisor (real runsc, nftables, network namespaces, the
//! kiln binary): internet on and off, deny and allow lists by CIDR and by host name through
//! the DNS proxy, policy changes on a running sandbox, pause/resume and forks each with a
//! network of their own, isolation from the host and from other sandboxes, and that a killed
//! sandbox (or a killed `create`) leaves no namespace, interface, slot or process.
//!
//! Every test runs kiln inside a "host" namespace of its own (tests/src/net.rs) whose only
//! way out is an "internet" namespace with the test's HTTP and DNS servers.

use kiln_tests::net::{TestNet, HOST_IP, HTTP_PORT, SERVER_A, SERVER_B};
use kiln_tests::sandbox::{app_home, create, exec, sh, KillAll};
use kiln_tests::Kiln;
use std::time::{Duration, Instant};

/// A home with the app image and kiln running in a fresh T (this thread is moved there);
/// dropped in field order: the sandboxes first, then the namespaces, then the home.
struct Env {
    _guard: KillAll,
    k: Kiln,
    net: TestNet,
    _tmp: tempfile::TempDir,
}

fn setup() -> Option<Env> {
    if let Some(why) = kiln_tests::net::unavailable() {
        eprintln!("SKIP: {why}");
        return None;
    }
    let (tmp, k) = app_home()?;
    let net = TestNet::new();
    net.enter();
    let k = k.with_env(net.kiln_env());
    Some(Env {
        _guard: KillAll(k.clone()),
        k,
        net,
        _tmp: tmp,
    })
}

/// One HTTP request from inside the sandbox (bounded by nc's 5 s timeout; a denied one is
/// refused at once): the body, if any.
fn fetch(k: &Kiln, id: &str, host: &str) -> Option<String> {
    let script = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {host} {HTTP_PORT} | tail -n 1"
    );
    let (out, _, _) = exec(k, id, &[], &["sh", "-c", &script], b"");
    let body = out.trim();
    body.starts_with("server-").then(|| body.to_string())
}

fn id_of(rec: &serde_json::Value) -> String {
    rec["id"].as_str().expect("id").to_string()
}

#[test]
fn internet_on_reaches_the_server_off_does_not_and_host_and_neighbours_stay_closed() {
    let Some(env) = setup() else {
        return;
    };
    let k = env.k.clone();
    let net = &env.net;
    let on = id_of(&create(&k, &["app"]));
    let off = id_of(&create(&k, &["app", "--no-internet"]));
    let info = k.json(["sandbox", "info", &on, "--json"]);
    assert_eq!(info["network"]["internet"], true);
    assert_eq!(info["net"]["guest_ip"], "10.88.0.2");
    assert_eq!(
        fetch(&k, &on, &SERVER_A.to_string()).as_deref(),
        Some("server-a")
    );
    assert_eq!(fetch(&k, &off, &SERVER_A.to_string()), None);
    assert_eq!(fetch(&k, &off, &SERVER_B.to_string()), None);

    // kiln's own namespace (a service on the host) is closed to sandboxes...
    let host_service = std::net::TcpListener::bind((HOST_IP, HTTP_PORT)).expect("bind on T");
    host_service.set_nonblocking(true).unwrap();
    assert_eq!(fetch(&k, &on, &HOST_IP.to_string()), None);
    assert!(host_service.accept().is_err(), "a sandbox reached the host");
    // ...and so is another sandbox (through its uplink address).
    let off_rec = k.json(["sandbox", "info", &off, "--json"]);
    let neighbour = off_rec["net"]["uplink_ip"].as_str().unwrap().to_string();
    let (_, _, code) = exec(
        &k,
        &on,
        &[],
        &[
            "sh",
            "-c",
            &format!("busybox nc -w 2 {neighbour} 53 </dev/null"),
        ],
        b"",
    );
    assert_ne!(code, 0, "a sandbox reached another's uplink {neighbour}");
    // Only the first sandbox's request reached the internet.
    assert_eq!(net.hits[0].load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn deny_out_blocks_one_cidr_and_leaves_another() {
    let Some(env) = setup() else {
        return;
    };
    let k = env.k.clone();
    let id = id_of(&create(&k, &["app", "--deny-out", "10.202.0.0/24"]));
    assert_eq!(fetch(&k, &id, &SERVER_A.to_string()), None);
    // Refused, not left hanging.
    let (_, err, code) = exec(
        &k,
        &id,
        &[],
        &["busybox", "nc", "-w", "5", &SERVER_A.to_string(), "8080"],
        b"",
    );
    assert!(code != 0 && err.contains("refused"), "{code}: {err}");
    assert_eq!(
        fetch(&k, &id, &SERVER_B.to_string()).as_deref(),
        Some("server-b")
    );
    // Bad entries are refused with the reason, and nothing is created.
    let before = k
        .json(["sandbox", "ls", "--json"])
        .as_array()
        .unwrap()
        .len();
    for (bad, why) in [
        ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
        ("::1", "IPv6"),
        ("a..b", "host name"),
    ] {
        let err = k.fails(["sandbox", "create", "app", "--deny-out", bad]);
        assert!(err.contains(why), "{bad}: {err}");
    }
    assert_eq!(
        k.json(["sandbox", "ls", "--json"])
            .as_array()
            .unwrap()
            .len(),
        before
    );
}

#[test]
fn host_name_rules_admit_the_name_and_not_raw_ips() {
    let Some(env) = setup() else {
        return;
    };
    let k = env.k.clone();
    // Whitelist: web.test (-> server A) only.
    let id = id_of(&create(
        &k,
        &["app", "--no-internet", "--allow-out", "web.test"],
    ));
    assert_eq!(fetch(&k, &id, "web.test").as_deref(), Some("server-a"));
    assert_eq!(
        fetch(&k, &id, &SERVER_A.to_string()).as_deref(),
        Some("server-a")
    );
    assert_eq!(
        fetch(&k, &id, &SERVER_B.to_string()),
        None,
        "raw IP of another server"
    );
    // Names not allowed do not resolve (no lookups leave the sandbox).
    let (out, _, code) = exec(&k, &id, &[], &["busybox", "nslookup", "other.test"], b"");
    assert!(
        code != 0 || !out.contains("10.203.0.2"),
        "other.test resolved: {out}"
    );
    assert_eq!(fetch(&k, &id, "other.test"), None);

    // Deny by name: the name's address is blocked even as a raw IP; others stay open.
    let id = id_of(&create(&k, &["app", "--deny-out", "web.test"]));
    assert_eq!(fetch(&k, &id, &SERVER_A.to_string()), None);
    assert_eq!(fetch(&k, &id, "web.test"), None);
    assert_eq!(fetch(&k, &id, "other.test").as_deref(), Some("server-b"));
}

#[test]
fn policy_changes_on_a_running_sandbox_take_effect_both_ways() {
    let Some(env) = setup() else {
        return;
    };
    let k = env.k.clone();
    let id = id_of(&create(&k, &["app"]));
    assert_eq!(
        fetch(&k, &id, &SERVER_A.to_string()).as_deref(),
        Some("server-a")
    );
    let p = k.json(["sandbox", "network", &id, "--internet", "off", "--json"]);
    assert_eq!(p["internet"], false);
    assert_eq!(fetch(&k, &id, &SERVER_A.to_string()), None);
    k.ok(["sandbox", "network", &id, "--allow-out", "10.203.0.0/24"]);
    assert_eq!(
        fetch(&k, &id, &SERVER_B.to_string()).as_deref(),
        Some("server-b")
    );
    assert_eq!(fetch(&k, &id, &SERVER_A.to_string()), None);
    let shown = k.ok_str(["sandbox", "network", &id]);
    assert!(
        shown.contains("internet off") && shown.contains("10.203.0.0/24"),
        "{shown}"
    );
    k.ok(["sandbox", "network", &id, "--clear", "--internet", "on"]);
    assert_eq!(
        fetch(&k, &id, &SERVER_A.to_string()).as_deref(),
        Some("server-a")
    );
    let rec = k.json(["sandbox", "info", &id, "--json"]);
    assert_eq!(
        rec["network"],
        serde_json::json!({"internet": true, "allow_out": [], "deny_out": []})
    );
}

#[test]
fn pause_resume_and_four_forks_each_have_their_own_working_network() {
    let Some(env) = setup() else {
        return;
    };
    let k = env.k.clone();
    // No traffic before the checkpoints: gVisor cannot save open TCP connections.
    let id = id_of(&create(&k, &["app", "--deny-out", "10.202.0.0/24"]));
    let ns_before = k.json(["sandbox", "info", &id, "--json"])["net"]["router_ns"].clone();
    k.ok(["sandbox", "pause", &id]);
    assert!(
        !std::path::Path::new("/run/netns")
            .join(ns_before.as_str().unwrap())
            .exists(),
        "a paused sandbox keeps its namespace"
    );
    k.ok(["sandbox", "resume", &id]);
    let forks = k.json(["sandbox", "fork", &id, "-n", "4", "--json"]);
    let forks: Vec<serde_json::Value> = forks.as_array().unwrap().clone();
    assert_eq!(forks.len(), 4);
    let mut namespaces: Vec<String> = forks
        .iter()
        .map(|f| f["net"]["router_ns"].as_str().unwrap().to_string())
        .collect();
    namespaces.push(
        k.json(["sandbox", "info", &id, "--json"])["net"]["router_ns"]
            .as_str()
            .unwrap()
            .into(),
    );
    namespaces.sort();
    namespaces.dedup();
    assert_eq!(namespaces.len(), 5, "namespaces shared: {namespaces:?}");
    for f in &forks {
        assert_eq!(
            f["network"]["deny_out"][0], "10.202.0.0/24",
            "forks inherit the policy"
        );
    }
    // All five at once, each through its own namespace.
    let mut all: Vec<String> = forks.iter().map(id_of).collect();
    all.push(id.clone());
    let got: Vec<(Option<String>, Option<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = all
            .iter()
            .map(|sid| {
                let k = k.clone();
                let host_ns = env.net.host_ns.clone();
                s.spawn(move || {
                    kiln_tests::net::enter(&host_ns);
                    (
                        fetch(&k, sid, &SERVER_B.to_string()),
                        fetch(&k, sid, &SERVER_A.to_string()),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (sid, (b, a)) in all.iter().zip(got) {
        assert_eq!(b.as_deref(), Some("server-b"), "{sid}");
        assert_eq!(a, None, "{sid}: the policy survived the fork");
    }
}

/// What is left of sandbox `id` on the host: namespaces, slot files, host interfaces, DNS
/// proxies.
fn leftovers(id: &str, slot: Option<u64>, net: &TestNet) -> Vec<String> {
    let short: String = id.chars().take(12).collect();
    let mut left = Vec::new();
    for n in [format!("kiln-{short}"), format!("kiln-{short}-g")] {
        if std::path::Path::new("/run/netns").join(&n).exists() {
            left.push(format!("netns {n}"));
        }
    }
    for e in std::fs::read_dir("/run/kiln/net/slots")
        .into_iter()
        .flatten()
        .flatten()
    {
        if std::fs::read_to_string(e.path()).is_ok_and(|o| o.trim() == format!("kiln-{short}")) {
            left.push(format!("slot {}", e.path().display()));
        }
    }
    if let Some(s) = slot {
        if net.host_links().contains(&format!("kiln{s}@")) {
            left.push(format!("host link kiln{s}"));
        }
    }
    for p in kiln_tests::sandbox::processes_mentioning(id) {
        left.push(format!("process {p}"));
    }
    left
}

#[test]
fn killed_sandboxes_and_killed_creates_leave_no_network_behind() {
    let Some(env) = setup() else {
        return;
    };
    let k = env.k.clone();
    let net = &env.net;
    let rec = create(&k, &["app"]);
    let id = id_of(&rec);
    let slot = rec["net"]["slot"].as_u64();
    assert!(
        leftovers(&id, slot, net).len() >= 3,
        "the network is there while it runs"
    );
    k.ok(["sandbox", "kill", &id]);
    assert_eq!(leftovers(&id, slot, net), Vec::<String>::new());

    // A create killed at any moment: the next command's reconcile removes what it left.
    for delay_ms in [40u64, 120, 250, 400] {
        let mut child = k
            .cmd(["sandbox", "create", "app", "--json"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let dirs: Vec<String> = std::fs::read_dir(k.home.join("sandboxes"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .trim_start_matches(".new-")
                    .to_string()
            })
            .filter(|n| n.len() == 16)
            .collect();
        let ids = kiln_tests::sandbox::ids(&k); // reconciles
        let t = Instant::now();
        for d in dirs.iter().filter(|d| !ids.contains(d)) {
            while !leftovers(d, None, net).is_empty() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(
                leftovers(d, None, net),
                Vec::<String>::new(),
                "create killed after {delay_ms} ms"
            );
        }
        for i in ids {
            k.ok(["sandbox", "kill", &i]);
            assert_eq!(leftovers(&i, None, net), Vec::<String>::new());
        }
    }
}

/// For tests of the network crate itself: this thread in a fresh T, and a temp dir (None
/// after a SKIP line).
fn direct() -> Option<(TestNet, tempfile::TempDir)> {
    if let Some(why) = kiln_tests::net::unavailable() {
        eprintln!("SKIP: {why}");
        return None;
    }
    let net = TestNet::new();
    net.enter();
    Some((net, tempfile::tempdir().unwrap()))
}

/// Not a test on its own: the child of [`an_attach_killed_at_any_moment_leaves_nothing_once_detached`]
/// (`KILN_TEST_ATTACH="ID STATE"`): attaches a network, says so, and waits to be killed.
#[test]
fn attach_child_entrypoint() {
    let Ok(spec) = std::env::var("KILN_TEST_ATTACH") else {
        return;
    };
    let (id, state) = spec.split_once(' ').unwrap();
    let state = std::path::Path::new(state);
    let cmd = kiln_runtime::helpers::dns_proxy_command(&kiln_tests::kiln_bin());
    kiln_runtime::helpers::dns_proxy_spec(state).unwrap();
    let policy = kiln_network::NetworkPolicy::default();
    kiln_network::attach(id, kiln_network::GuestKind::Veth, &policy, state, &cmd).unwrap();
    println!("attached");
    std::thread::sleep(Duration::from_secs(120));
}

/// kill -9 of an attach at moments across it (its `ip` helpers may still be running): the
/// detach that follows leaves no namespace, slot, host interface or DNS proxy, and nothing
/// appears afterwards.
#[test]
fn an_attach_killed_at_any_moment_leaves_nothing_once_detached() {
    let Some((net, tmp)) = direct() else {
        return;
    };
    let links_before = net.host_links().matches("kiln").count();
    let start = |n: u32| {
        let id = format!("ak{:08x}{n:02}", std::process::id());
        let state = tmp.path().join(&id).join("net");
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "attach_child_entrypoint", "--nocapture"])
            .env("KILN_TEST_ATTACH", format!("{id} {}", state.display()))
            .envs(net.kiln_env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        (id, state, child)
    };
    // How long one attach takes when left alone.
    let (id, state, mut child) = start(0);
    let t = Instant::now();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("attached") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "the attaching child ended without attaching");
    }
    let whole = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    kiln_network::detach(&id, &state);
    assert_eq!(leftovers(&id, None, &net), Vec::<String>::new());
    eprintln!("one attach: {whole:?}");
    for n in 1..=8u32 {
        let (id, state, mut child) = start(n);
        let at = whole.mul_f64(f64::from(n) / 8.0);
        std::thread::sleep(at);
        let _ = child.kill();
        let _ = child.wait();
        kiln_network::detach(&id, &state);
        let what = format!("attach killed after {at:?}");
        // Namespaces, slot and uplink are gone when detach returns; a DNS proxy whose pid was
        // never recorded stops itself within about a second.
        let t = Instant::now();
        let mut left = leftovers(&id, None, &net);
        while left.iter().all(|l| l.starts_with("process"))
            && !left.is_empty()
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(50));
            left = leftovers(&id, None, &net);
        }
        assert_eq!(left, Vec::<String>::new(), "{what}");
        assert_eq!(
            net.host_links().matches("kiln").count(),
            links_before,
            "{what}"
        );
        // Nothing a killed helper was still doing shows up afterwards.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            leftovers(&id, None, &net),
            Vec::<String>::new(),
            "{what}: later"
        );
        assert_eq!(
            net.host_links().matches("kiln").count(),
            links_before,
            "{what}: later"
        );
    }
}

/// The microVM side (a TAP in the router namespace, which the VMM opens by name) and the DNS
/// proxy's answers, through the network crate directly: no guest needed.
#[test]
fn tap_attachment_and_dns_proxy_answers_by_policy() {
    let Some((net, tmp)) = direct() else {
        return;
    };
    let state = tmp.path().join("net");
    let id = format!("tap{:013x}", std::process::id());
    let policy = kiln_network::NetworkPolicy {
        internet: false,
        allow_out: vec!["web.test".parse().unwrap()],
        deny_out: vec![],
    };
    let cmd = kiln_runtime::helpers::dns_proxy_command(&kiln_tests::kiln_bin());
    kiln_runtime::helpers::dns_proxy_spec(&state).unwrap();
    for (k, v) in net.kiln_env() {
        std::env::set_var(k, v);
    }
    let att = kiln_network::attach(&id, kiln_network::GuestKind::Tap, &policy, &state, &cmd)
        .expect("attach");
    struct Detach<'a>(&'a str, &'a std::path::Path);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            kiln_network::detach(self.0, self.1);
        }
    }
    let _detach = Detach(&id, &state);
    assert_eq!(att.tap.as_deref(), Some("tap0"));
    assert_eq!(att.guest_ns, None);
    let out = std::process::Command::new("ip")
        .args(["-n", &att.router_ns, "-br", "addr", "show", "tap0"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("10.88.0.1/30"), "{shown}");

    // Ask the proxy from inside the router namespace, as the guest would.
    let router = att.router_ns.clone();
    let ask = move |name: &str| -> Vec<std::net::Ipv4Addr> {
        let (router, name) = (router.clone(), name.to_string());
        std::thread::spawn(move || {
            kiln_tests::net::enter(&router);
            let ips = kiln_network::dns::resolve_a(
                "10.88.0.1:53".parse().unwrap(),
                &name,
                Duration::from_secs(3),
            )
            .expect("the proxy answers");
            ips.into_iter().map(|(ip, _)| ip).collect()
        })
        .join()
        .unwrap()
    };
    assert_eq!(ask("web.test"), vec![SERVER_A]);
    assert!(ask("other.test").is_empty(), "a name not allowed resolved");
    // The answer's address joined the router's allowed set.
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &att.router_ns,
            "nft",
            "list",
            "set",
            "inet",
            "kiln",
            "allow_dns",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.202.0.2"));
    // A policy change reaches the proxy.
    let open = kiln_network::NetworkPolicy::default();
    kiln_network::apply_policy(&att, &open, &state).expect("apply");
    assert_eq!(ask("other.test"), vec![SERVER_B]);

    drop(_detach);
    assert!(!std::path::Path::new("/run/netns")
        .join(&att.router_ns)
        .exists());
    assert!(!net.host_links().contains(&format!("{}@", att.host_if)));
}

/// A pause never waits for the network: right after a connection to the outside was opened
/// (and while it is still open) it completes at once, the connection is gone after the
/// resume (its client inside sees it end), and a TCP connection between two processes
/// inside the sandbox (loopback) survives the pause and carries data after it.
#[test]
fn pause_drops_outside_connections_at_once_and_keeps_loopback_ones() {
    let Some(env) = setup() else {
        return;
    };
    let k = env.k.clone();
    let id = id_of(&create(&k, &["app"]));
    // A server in the test's own "internet" namespace that holds what it accepts.
    const PORT: u16 = 9090;
    let server = env.net.in_inet(|| {
        let l = std::net::TcpListener::bind((SERVER_A, PORT)).expect("bind");
        l.set_nonblocking(true).unwrap();
        l
    });
    // Outside: a client that keeps its connection open and idle, and says when it ends.
    // (It writes what goes into a FIFO that a sleeping writer keeps open.)
    let outside = format!(
        "mkfifo /tmp/ext.in; (sleep 100000 >/tmp/ext.in &) ; \
         (nc {SERVER_A} {PORT} </tmp/ext.in >/tmp/ext.out; echo ended >/tmp/ext.done) \
         >/dev/null 2>&1 &"
    );
    sh(&k, &id, &outside);
    let t = Instant::now();
    let mut conn = loop {
        match server.accept() {
            Ok((c, _)) => break c,
            Err(_) if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the sandbox never connected to the server: {e}"),
        }
    };
    // Inside: a listener and a client on loopback; the client sends what is written into a
    // FIFO that a sleeping writer keeps open. (busybox nc ends its connection when its own
    // stdin ends: the listener reads a pipe that never does.)
    sh(
        &k,
        &id,
        "(sleep 100000 | nc -l -p 7000 >/tmp/lo.out &) ; sleep 0.3; mkfifo /tmp/lo.in; \
         (sleep 100000 >/tmp/lo.in &) ; (nc 127.0.0.1 7000 </tmp/lo.in >/dev/null 2>&1 &) ; \
         echo before >/tmp/lo.in",
    );
    let got = |k: &Kiln, want: &str| {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if sh(k, &id, "cat /tmp/lo.out").contains(want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    assert!(got(&k, "before"), "the loopback connection carries nothing");
    assert_eq!(sh(&k, &id, "cat /tmp/ext.done 2>/dev/null || true"), "");

    // The old driver waited up to 70 s for connections to drain; now nothing waits.
    let t = Instant::now();
    k.ok(["sandbox", "pause", &id]);
    let paused = t.elapsed();
    assert!(
        paused < Duration::from_secs(10),
        "a pause with an open outside connection took {paused:?}"
    );
    k.ok(["sandbox", "resume", &id]);

    // The outside connection is gone for its client inside: it ends at once or at its next
    // write, which goes in the background (the FIFO blocks an opener once nc has ended)...
    sh(&k, &id, "(echo ping >/tmp/ext.in &)");
    let t = Instant::now();
    while sh(&k, &id, "cat /tmp/ext.done 2>/dev/null || true").trim() != "ended" {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the outside connection's client still waits on it after the resume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...and for the server: the sandbox answers it with a reset, or never again.
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    use std::io::{Read, Write};
    let _ = conn.write_all(b"hello?\n");
    let mut buf = [0u8; 16];
    match conn.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("the dropped connection answered {:?}", &buf[..n]),
    }
    // The loopback connection survives and carries data. The write goes in the background: a
    // FIFO blocks its opener once its reader has ended.
    sh(&k, &id, "(echo after >/tmp/lo.in &)");
    assert!(
        got(&k, "after"),
        "the loopback connection inside did not survive the pause"
    );
    assert_eq!(sh(&k, &id, "cat /tmp/lo.out"), "before\nafter\n");
    // The sandbox still reaches the outside.
    assert_eq!(
        fetch(&k, &id, &SERVER_B.to_string()).as_deref(),
        Some("server-b")
    );
}
