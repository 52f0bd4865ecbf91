//! Cluster mode's node faults (issue 20): a real 3-member etcd (tests/src/etcd.rs) and three
//! `kiln serve --cluster-etcd` nodes on loopback, E2B's Python SDK. Only n1's home has the
//! `sdk` image, and placement gives an empty cluster's sandbox to n1.
//!
//! - n1 stopped (SIGSTOP) past its lease: the live nodes mark its running sandbox failed in
//!   the catalog, naming n1; every list leaves it out, GET answers 404 with the cause through
//!   any node, a request that was waiting on n1 is answered with it, envd's data plane says
//!   "was not found", the SDK's connect raises SandboxNotFoundException. n1 continued (SIGCONT) joins again and stops the
//!   sandbox it still ran; a kill through another node then removes the entry.
//! - n1 killed (kill -9) and restarted on its home: the same, the sandbox stopped as the node
//!   joins, before it serves; n1 then runs new sandboxes.
//!
//! Skips (with a SKIP line) without etcd, gVisor, the image tools or E2B's Python SDK.

use kiln_cluster::{SandboxEntry, SandboxState};
use kiln_tests::cluster::{fixture, listed, start_nodes};
use kiln_tests::e2b::{self, Serve};
use kiln_tests::etcd::Etcd;
use kiln_tests::sandbox::{assert_no_processes, processes_mentioning};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "cluster-faults-key";
const SECRET: &str = "cluster-faults-secret-0123456789";

/// Sandbox `id`'s entry in the cluster's catalog, read from etcd.
fn entry(etcd: &Etcd, id: &str) -> Option<SandboxEntry> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = Arc::new(kiln_cluster::Etcd::new(&etcd.urls()).unwrap());
    rt.block_on(kiln_cluster::Catalog::new(client).get(id))
        .unwrap()
        .map(|(e, _)| e)
}

/// Waits (bounded) until sandbox `id`'s entry is marked failed; its cause.
fn wait_marked_failed(etcd: &Etcd, id: &str) -> String {
    let t = Instant::now();
    loop {
        let e = entry(etcd, id).expect("the entry stays in the catalog");
        if e.state == SandboxState::Failed {
            return e.cause.expect("a failed entry has a cause");
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{id} is still {:?} in the catalog",
            e.state
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A new sandbox through `s` (placed on n1): its id.
fn create(s: &Serve, py: &std::path::Path) -> String {
    let out = s.python(
        py,
        r#"
import json
from e2b import Sandbox
sbx = Sandbox.create("sdk", timeout=300)
r = sbx.commands.run("echo up")
print(json.dumps({"id": sbx.sandbox_id, "out": r.stdout}))
"#,
    );
    assert_eq!(out["out"], "up\n", "{out}");
    out["id"].as_str().unwrap().to_string()
}

/// Every node lists `id` nowhere, and GET through each answers 404 naming the cause.
fn lost_everywhere(nodes: &[&Serve], id: &str, cause: &str) {
    for s in nodes {
        for path in ["/v2/sandboxes", "/sandboxes"] {
            let l = listed(s, path);
            assert!(
                l.iter().all(|(i, ..)| i != id),
                "{path} through :{}: {l:?}",
                s.port
            );
        }
        let (code, body) = s.api("GET", &format!("/sandboxes/{id}"), None);
        assert_eq!(code, 404, "through :{}: {body}", s.port);
        let msg = body["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("sandbox {id} failed: {cause}")),
            "through :{}: {msg}",
            s.port
        );
    }
}

fn signal(s: &Serve, sig: i32) {
    let pid = s.pid().expect("the node runs") as i32;
    // SAFETY: kill(2) of the kiln serve this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

#[test]
fn dead_node_sandboxes_are_lost_and_do_not_come_back() {
    let Some(f) = fixture(SECRET, 3) else {
        return;
    };
    let (py, etcd, k1) = (&f.py, &f.etcd, &f.homes[0]);
    let mut nodes = start_nodes(etcd, &f.homes, KEY, &f.secret, 0);

    // 1. n1 stops answering (SIGSTOP) with a sandbox running.
    let a = create(&nodes[1], py);
    assert_eq!(
        listed(&nodes[2], "/v2/sandboxes"),
        vec![(a.clone(), "n1".to_string(), "running".to_string())]
    );
    assert!(!processes_mentioning(&a).is_empty());
    signal(&nodes[0], libc::SIGSTOP);
    // A request forwarded to n1 now waits on it; it is answered once n1's lease is gone.
    let waiting = {
        let port = nodes[1].port;
        let path = format!("/sandboxes/{a}");
        std::thread::spawn(move || {
            e2b::http(port, "GET", &path, &[("X-API-Key", KEY)], None).unwrap()
        })
    };
    let cause = wait_marked_failed(etcd, &a);
    assert!(
        cause.starts_with("node n1 is gone (no heartbeat since 20"),
        "{cause}"
    );
    let (code, body) = waiting.join().unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("node n1 is gone"), "{body}");
    lost_everywhere(&[&nodes[1], &nodes[2]], &a, &cause);
    // envd's data plane through another node: the SDK's "was not found".
    let (code, body) = e2b::http(
        nodes[2].port,
        "GET",
        "/health",
        &[("E2b-Sandbox-Id", &a)],
        None,
    )
    .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("was not found") && body.contains("node n1 is gone"),
        "{body}"
    );
    let out = nodes[2].python(
        py,
        &format!(
            r#"
import json
from e2b import Sandbox
try:
    Sandbox.connect("{a}")
    print(json.dumps({{"connected": True}}))
except Exception as e:
    print(json.dumps({{"error": type(e).__name__}}))
"#
        ),
    );
    // (The SDK puts its own words on a 404 from connect.)
    assert_eq!(out["error"], "SandboxNotFoundException", "{out}");

    // n1 continues: it joins again and stops the sandbox the cluster declared lost.
    signal(&nodes[0], libc::SIGCONT);
    let t = Instant::now();
    while !nodes[0]
        .log_text()
        .contains("stopping the sandbox on this node: the cluster declared it lost")
        || nodes[0].api("GET", &format!("/sandboxes/{a}"), None).0 != 404
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "n1 did not stop {a}:\n{}",
            nodes[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_no_processes(&a);
    lost_everywhere(&nodes.iter().collect::<Vec<_>>(), &a, &cause);
    assert_eq!(entry(etcd, &a).map(|e| e.state), Some(SandboxState::Failed));
    // A kill through another node removes what is left of it.
    let (code, body) = nodes[2].api("DELETE", &format!("/sandboxes/{a}"), None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(entry(etcd, &a), None);
    let (code, _) = nodes[1].api("GET", &format!("/sandboxes/{a}"), None);
    assert_eq!(code, 404);

    // 2. n1 killed (kill -9) with a sandbox running, then restarted on its home.
    let b = create(&nodes[2], py);
    assert_eq!(entry(etcd, &b).map(|e| e.node), Some("n1".to_string()));
    nodes[0].stop();
    let cause = wait_marked_failed(etcd, &b);
    assert!(cause.starts_with("node n1 is gone"), "{cause}");
    lost_everywhere(&[&nodes[1], &nodes[2]], &b, &cause);
    eprintln!(
        "processes of {b} after its node's kill -9: {:?}",
        processes_mentioning(&b)
    );
    nodes[0].restart();
    assert_no_processes(&b);
    assert!(
        !kiln_tests::sandbox::ids(k1).contains(&b),
        "{b} is still in n1's home"
    );
    lost_everywhere(&nodes.iter().collect::<Vec<_>>(), &b, &cause);

    // The returning node serves again: a new sandbox lands on it, and runs.
    let c = create(&nodes[1], py);
    assert_eq!(entry(etcd, &c).map(|e| e.node), Some("n1".to_string()));
    for s in &nodes {
        assert_eq!(
            listed(s, "/v2/sandboxes"),
            vec![(c.clone(), "n1".to_string(), "running".to_string())],
            "through :{}",
            s.port
        );
    }
}

/// A node killed (kill -9) and restarted within `--cluster-lost-after` keeps its running
/// sandboxes: while it is away they stay listed, requests for them answer 503 (not "failed"),
/// and once it is back they answer again, their processes never stopped.
#[test]
fn a_node_restarted_within_the_grace_keeps_its_sandboxes() {
    let Some(f) = fixture(SECRET, 2) else {
        return;
    };
    let (py, etcd) = (&f.py, &f.etcd);
    let mut nodes = start_nodes(etcd, &f.homes, KEY, &f.secret, 120);
    let a = create(&nodes[1], py);
    assert_eq!(entry(etcd, &a).map(|e| e.node), Some("n1".to_string()));
    let mut pids = processes_mentioning(&a);
    pids.sort_unstable();
    assert!(!pids.is_empty());

    nodes[0].stop();
    // Its lease expires (5 s); n2 sweeps every second meanwhile.
    let t = Instant::now();
    let (code, body) = loop {
        let (code, body) = nodes[1].api("GET", &format!("/sandboxes/{a}"), None);
        if code != 200 || t.elapsed() > Duration::from_secs(30) {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(code, 503, "while n1 is away: {body}");
    assert!(body.to_string().contains("not answering"), "{body}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        entry(etcd, &a).map(|e| e.state),
        Some(SandboxState::Running),
        "declared lost within the grace"
    );
    assert_eq!(
        listed(&nodes[1], "/v2/sandboxes"),
        vec![(a.clone(), "n1".to_string(), "running".to_string())]
    );

    nodes[0].restart();
    let mut now = processes_mentioning(&a);
    now.sort_unstable();
    assert_eq!(now, pids, "the sandbox's processes changed");
    let (code, body) = nodes[1].api("GET", &format!("/sandboxes/{a}"), None);
    assert_eq!(code, 200, "after n1 is back: {body}");
    let out = nodes[1].python(
        py,
        &format!(
            r#"
import json
from e2b import Sandbox
s = Sandbox.connect("{a}")
print(json.dumps({{"out": s.commands.run("echo still here").stdout}}))
"#
        ),
    );
    assert_eq!(out["out"], "still here\n", "{out}");
}
