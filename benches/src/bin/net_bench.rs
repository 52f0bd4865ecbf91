//! Sandbox networking benchmark (JSON on stdout): a gVisor sandbox's network against a bare
//! veth pair between two namespaces, measured in the same run, and the time a network adds
//! to `kiln sandbox create` and `fork`.
//!
//! - setup: the tests' namespaces (tests/src/net.rs): kiln runs in a "host" namespace T whose
//!   way out is an "internet" namespace I; a "peer" namespace P joined to I by a plain veth
//!   pair is the baseline. Nothing leaves these namespaces.
//! - throughput: `busybox dd | busybox nc` sends `--mib` MiB to a byte sink in I, timed by
//!   the sink (first accept to EOF); inside the sandbox vs in P.
//! - request: `--requests` HTTP/1.0 requests, one `nc` each, from one shell loop; the same
//!   loop piping into `cat` instead of `nc` is subtracted, leaving network + connection cost.
//!   (No ping: runsc drops raw sockets unless `--net-raw`.)
//! - create / fork: `kiln sandbox create` (CLI wall time) with the default network vs
//!   `--no-network`, and `fork -n 1` of a networked vs a network-less sandbox, `--runs` each.
//!
//! Run: `cargo build -p kiln-cli -p kiln-benches && target/debug/net_bench [--runs 5] [--mib 64]`
//! (root, runsc, nftables; KILN_AGENT pointing at the static agent).

use kiln_benches::{arg, median};
use kiln_tests::net::{TestNet, SERVER_A};
use kiln_tests::sandbox::{app_home, exec, KillAll};
use kiln_tests::Kiln;
use serde_json::{json, Value};
use std::io::Read;
use std::net::TcpListener;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SINK_PORT: u16 = 9000;
const PEER_IP: &str = "10.204.0.1";
const PEER_GW: &str = "10.204.0.2";

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

/// P: a namespace joined to I by a bare veth pair (the baseline path).
struct Peer(String);

impl Peer {
    fn new(inet: &str) -> Peer {
        let p = format!("kp-{}", std::process::id());
        ip(&["netns", "add", &p]);
        let peer = Peer(p.clone());
        ip(&[
            "-n", &p, "link", "add", "p0", "type", "veth", "peer", "name", "ip0", "netns", inet,
        ]);
        ip(&[
            "-n",
            &p,
            "addr",
            "add",
            &format!("{PEER_IP}/24"),
            "dev",
            "p0",
        ]);
        ip(&[
            "-n",
            inet,
            "addr",
            "add",
            &format!("{PEER_GW}/24"),
            "dev",
            "ip0",
        ]);
        ip(&["-n", &p, "link", "set", "p0", "up"]);
        ip(&["-n", &p, "link", "set", "lo", "up"]);
        ip(&["-n", inet, "link", "set", "ip0", "up"]);
        ip(&["-n", &p, "route", "add", "default", "via", PEER_GW]);
        peer
    }

    fn sh(&self, script: &str) -> Duration {
        let t = Instant::now();
        let st = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", script])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("ip netns exec");
        assert!(st.success(), "{script}");
        t.elapsed()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A byte sink in I: for every connection, (bytes, seconds from accept to EOF).
fn sink(inet: &str) -> mpsc::Receiver<(u64, f64)> {
    let (tx, rx) = mpsc::channel();
    let inet = inet.to_string();
    std::thread::spawn(move || {
        kiln_tests::net::enter(&inet);
        let l = TcpListener::bind((SERVER_A, SINK_PORT)).expect("bind sink");
        for mut s in l.incoming().flatten() {
            let t = Instant::now();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = tx.send((n, t.elapsed().as_secs_f64()));
        }
    });
    rx
}

fn in_sandbox(k: &Kiln, id: &str, script: &str) -> Duration {
    let t = Instant::now();
    let (_, err, code) = exec(k, id, &[], &["sh", "-c", script], b"");
    assert_eq!(code, 0, "{script}: {err}");
    t.elapsed()
}

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn main() {
    let runs = arg("--runs", 5usize).max(1);
    let mib = arg("--mib", 64u64).max(1);
    let requests = arg("--requests", 50usize).max(1);
    if let Some(why) = kiln_tests::net::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let Some((_tmp, k)) = app_home() else { return };
    let net = TestNet::new();
    net.enter();
    let k = k.with_env(net.kiln_env());
    let _guard = KillAll(k.clone());
    let peer = Peer::new(&net.inet_ns);
    let sink = sink(&net.inet_ns);
    let id = k.json(["sandbox", "create", "app", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Throughput: the same client in the sandbox and in P, timed by the sink.
    let send = format!(
        "busybox dd if=/dev/zero bs=65536 count={} 2>/dev/null | busybox nc -w 10 {SERVER_A} {SINK_PORT}",
        mib * 16
    );
    let thr = |run: &dyn Fn()| -> f64 {
        let mut v = Vec::new();
        for _ in 0..runs.min(3) {
            run();
            let (n, secs) = sink
                .recv_timeout(Duration::from_secs(120))
                .expect("sink result");
            assert_eq!(n, mib << 20, "short transfer");
            v.push(n as f64 / secs / 1e6 * 8.0);
        }
        median(v)
    };
    let sandbox_mbit = thr(&|| {
        in_sandbox(&k, &id, &send);
    });
    let veth_mbit = thr(&|| {
        peer.sh(&send);
    });

    // Per-request latency: a loop of requests minus the same loop without the network.
    let loop_of = |tail: &str| {
        format!(
            "for i in $(busybox seq {requests}); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {tail} >/dev/null; done"
        )
    };
    let req = loop_of(&format!("busybox nc -w 3 {SERVER_A} 8080"));
    let idle = loop_of("busybox cat");
    let per_req = |f: &dyn Fn(&str) -> Duration| -> f64 {
        let mut v = Vec::new();
        for _ in 0..runs.min(3) {
            let with = f(&req).as_secs_f64();
            let without = f(&idle).as_secs_f64();
            v.push((with - without).max(0.0) * 1000.0 / requests as f64);
        }
        median(v)
    };
    let sandbox_req = per_req(&|s| in_sandbox(&k, &id, s));
    let veth_req = per_req(&|s| peer.sh(s));
    k.ok(["sandbox", "kill", &id]);

    // Create and fork, with and without a network.
    let create = |extra: &[&str]| -> (f64, String) {
        let mut args = vec!["sandbox", "create", "app", "--json"];
        args.extend_from_slice(extra);
        let t = Instant::now();
        let rec = k.json(args);
        (
            t.elapsed().as_secs_f64() * 1000.0,
            rec["id"].as_str().unwrap().to_string(),
        )
    };
    let (mut c_net, mut c_none) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (ms, i) = create(&[]);
        c_net.push(ms);
        k.ok(["sandbox", "kill", &i]);
        let (ms, i) = create(&["--no-network"]);
        c_none.push(ms);
        k.ok(["sandbox", "kill", &i]);
    }
    let fork = |parent: &str| -> f64 {
        let t = Instant::now();
        let f = k.json(["sandbox", "fork", parent, "-n", "1", "--json"]);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        k.ok(["sandbox", "kill", f[0]["id"].as_str().unwrap()]);
        ms
    };
    let (_, p_net) = create(&[]);
    let (_, p_none) = create(&["--no-network"]);
    let (mut f_net, mut f_none) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        f_net.push(fork(&p_net));
        f_none.push(fork(&p_none));
    }
    let (cn, c0) = (median(c_net), median(c_none));
    let (fnet, f0) = (median(f_net), median(f_none));
    let out: Value = json!({
        "bench": "net_bench",
        "runs": runs,
        "throughput_mbit_s": {"mib_sent": mib, "gvisor_sandbox": r2(sandbox_mbit),
            "bare_veth": r2(veth_mbit), "ratio_sandbox_to_veth": r2(sandbox_mbit / veth_mbit)},
        "http_request_ms": {"requests": requests, "gvisor_sandbox": r2(sandbox_req),
            "bare_veth": r2(veth_req)},
        "create_ms": {"with_network": r2(cn), "no_network": r2(c0), "added": r2(cn - c0)},
        "fork_ms": {"with_network": r2(fnet), "no_network": r2(f0), "added": r2(fnet - f0)},
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
