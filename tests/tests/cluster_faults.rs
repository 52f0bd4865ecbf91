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
//! - A paused sandbox resumes on another node: two sandboxes on n3, one paused through n2
//!   (E2B's pause), one by its timeout (autoPause); n3 killed (kill -9); a connect through n1
//!   resumes the first on n1, its file byte for byte and its counter counting on; two
//!   connects at once, through n1 and n2, resume the second once; n3 restarted drops its
//!   copies and resurrects neither.
//! - S3 down during a pause: the pause fails saying so, and the sandbox runs on; a drain
//!   keeps it running there, saying why.
//! - `kiln node drain n3`: its sandboxes paused, pushed and let go; placement skips n3; a
//!   connect through n3 resumes one elsewhere, as it was; undrained, n3 is placed on again.
//!
//! Skips (with a SKIP line) without etcd, gVisor, the image tools or E2B's Python SDK.

use kiln_cluster::{SandboxEntry, SandboxState};
use kiln_tests::cluster::{fixture, listed, read_etcd, start_nodes};
use kiln_tests::e2b::{self, Serve};
use kiln_tests::etcd::Etcd;
use kiln_tests::sandbox::{assert_no_processes, processes_mentioning};
use std::time::{Duration, Instant};

const KEY: &str = "cluster-faults-key";
const SECRET: &str = "cluster-faults-secret-0123456789";

/// Sandbox `id`'s entry in the cluster's catalog, read from etcd.
fn entry(etcd: &Etcd, id: &str) -> Option<SandboxEntry> {
    read_etcd(etcd, |c| async move {
        kiln_cluster::Catalog::new(c).get(id).await
    })
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

/// A sandbox created on node `s` itself: the request as another node forwards it (with the
/// cluster secret), so it is not placed again; `extra`: more fields of the create's body.
/// Its id.
fn create_on(s: &Serve, timeout: u64, extra: &str) -> String {
    let body = format!(r#"{{"templateID": "sdk", "timeout": {timeout}{extra}}}"#);
    let (code, out) = e2b::http(
        s.port,
        "POST",
        "/v2/sandboxes",
        &[
            ("X-Kiln-Forwarded-By", "test"),
            ("X-Kiln-Cluster-Secret", SECRET),
            ("Content-Type", "application/json"),
        ],
        Some(&body),
    )
    .unwrap();
    let out: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    assert_eq!(code, 201, "{out}");
    assert!(out["envdAccessToken"].is_string(), "{out}");
    out["sandboxID"].as_str().unwrap().to_string()
}

/// A counter in sandbox `id` (through `s`): a shell loop writing 1, 2, 3, ... to /tmp/count
/// (a tmpfs: the sandbox's memory), started in the background.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done";

/// The start of a Python script with E2B's SDK connected to sandbox `id` (`sbx`; its timeout
/// 300 s from now): `count()` reads its counter ([`COUNTER`]), waiting (bounded) for a first
/// count, and `advanced(c)` waits (bounded) for the count to pass `c`.
fn py_on(id: &str) -> String {
    format!("import json, os, hashlib\nfrom e2b import Sandbox\nsbx = Sandbox.connect(\"{id}\", timeout=300)\n{PY_COUNT}")
}

/// [`py_on`], then 3 MiB of random bytes written to /home/app/moved.bin (`sha`: their
/// sha256) and the [`COUNTER`] started (`c`: its first count).
fn py_file_and_counter(id: &str) -> String {
    format!(
        r#"{}
data = os.urandom(3 << 20)
sbx.files.write("/home/app/moved.bin", data)
sha = hashlib.sha256(data).hexdigest()
sbx.commands.run("{COUNTER}", background=True, timeout=0)
c = count()
"#,
        py_on(id)
    )
}

const PY_COUNT: &str = r#"
import time
def count():
    t = time.time()
    while True:
        out = sbx.commands.run("cat /tmp/count 2>/dev/null || true").stdout.strip()
        if out:
            return int(out)
        assert time.time() - t < 20, "no count"
        time.sleep(0.1)
def advanced(c):
    t = time.time()
    while True:
        n = count()
        if n > c or time.time() - t > 20:
            return n
        time.sleep(0.1)
"#;

/// Waits (bounded) until sandbox `id`'s entry says paused with its snapshot pushed; the entry.
fn wait_pushed(etcd: &Etcd, id: &str) -> SandboxEntry {
    let t = Instant::now();
    loop {
        let e = entry(etcd, id).expect("in the catalog");
        if e.state == SandboxState::Paused && e.pushed.is_some() {
            return e;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{id} is not paused with a pushed snapshot: {e:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// E2B's connect of sandbox `id` through each of `nodes` at once: the status codes, sorted
/// (each answer names the sandbox).
fn connect_at_once(nodes: &[&Serve], id: &str) -> Vec<u16> {
    let connects: Vec<_> = nodes
        .iter()
        .map(|s| {
            let (port, path) = (s.port, format!("/v2/sandboxes/{id}/connect"));
            std::thread::spawn(move || {
                e2b::http(
                    port,
                    "POST",
                    &path,
                    &[("X-API-Key", KEY), ("Content-Type", "application/json")],
                    Some(r#"{"timeout": 300}"#),
                )
                .unwrap()
            })
        })
        .collect();
    let mut codes = Vec::new();
    for c in connects {
        let (code, body) = c.join().unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(body["sandboxID"], id, "{code}: {body}");
        codes.push(code);
    }
    codes.sort_unstable();
    codes
}

/// How many of `homes` hold sandbox `id`.
fn holders(homes: &[kiln_tests::Kiln], id: &str) -> usize {
    homes
        .iter()
        .filter(|k| kiln_tests::sandbox::ids(k).contains(&id.to_string()))
        .count()
}

#[test]
fn a_paused_sandbox_resumes_on_another_node_once() {
    let Some(f) = fixture(SECRET, 3) else {
        return;
    };
    let (py, etcd) = (&f.py, &f.etcd);
    f.share_image("sdk");
    let mut nodes = start_nodes(etcd, &f.homes, KEY, &f.secret, 0);

    // Two sandboxes on n3: `a` with a file and a counter, paused through n2 (E2B's pause);
    // `b` paused by its timeout (autoPause), its snapshot pushed by n3's reaper.
    let a = create_on(&nodes[2], 300, "");
    let b = create_on(&nodes[2], 3, r#", "autoPause": true"#);
    let before = nodes[1].python(
        py,
        &format!(
            r#"{}
print(json.dumps({{"sha": sha, "count": c, "paused": Sandbox.pause("{a}")}}))
"#,
            py_file_and_counter(&a)
        ),
    );
    assert_eq!(before["paused"], true, "{before}");
    for id in [&a, &b] {
        let e = wait_pushed(etcd, id);
        assert_eq!(e.node, "n3", "{e:?}");
        assert!(e.pushed.unwrap().access.envd_token.is_some());
    }

    // n3 dies. A connect through n1 takes `a` over and resumes it there, as it was.
    nodes[2].stop();
    let t = Instant::now();
    let after = nodes[0].python(
        py,
        &format!(
            r#"{}
info = sbx.get_info()
data = sbx.files.read("/home/app/moved.bin", format="bytes")
c1 = count()
c2 = advanced(c1)
print(json.dumps({{"state": info.state.value, "sha": hashlib.sha256(bytes(data)).hexdigest(), "c1": c1, "c2": c2}}))
"#,
            py_on(&a)
        ),
    );
    eprintln!("connect through n1 after n3's kill -9: {:?}", t.elapsed());
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["sha"], before["sha"], "the file changed");
    let (c0, c1, c2) = (
        before["count"].as_u64().unwrap(),
        after["c1"].as_u64().unwrap(),
        after["c2"].as_u64().unwrap(),
    );
    assert!(
        c1 >= c0 && c2 > c1,
        "the counter: {c0} before, then {c1}, {c2}"
    );
    let e = entry(etcd, &a).unwrap();
    assert_eq!((e.node.as_str(), e.state), ("n1", SandboxState::Running));
    assert!(kiln_tests::sandbox::ids(&f.homes[0]).contains(&a));
    assert!(listed(&nodes[1], "/v2/sandboxes").contains(&(
        a.clone(),
        "n1".to_string(),
        "running".to_string()
    )));

    // Two connects of `b` at once, through n1 and n2: one resumes it, the other finds it
    // running (the node that lost the takeover forwards to the winner).
    assert_eq!(
        connect_at_once(&[&nodes[0], &nodes[1]], &b),
        vec![200, 201],
        "one resume, one connect to it running"
    );
    let e = entry(etcd, &b).unwrap();
    assert_eq!(e.state, SandboxState::Running, "{e:?}");
    assert!(["n1", "n2"].contains(&e.node.as_str()), "{e:?}");
    assert_eq!(
        holders(&f.homes[..2], &b),
        1,
        "{b} is in more than one home"
    );
    for s in &nodes[..2] {
        let out = s.python(
            py,
            &format!(
                r#"
import json
from e2b import Sandbox
print(json.dumps({{"out": Sandbox.connect("{b}").commands.run("echo resumed once").stdout}}))
"#
            ),
        );
        assert_eq!(out["out"], "resumed once\n", "{out}");
    }

    // n3 comes back: it drops its paused copies (the catalog gives them to others) before it
    // serves, and both sandboxes run on where they were resumed.
    nodes[2].restart();
    let log = nodes[2].log_text();
    assert!(
        log.contains("stopping the sandbox on this node: the catalog gives it to node"),
        "{log}"
    );
    let left = kiln_tests::sandbox::ids(&f.homes[2]);
    assert!(!left.contains(&a) && !left.contains(&b), "{left:?}");
    assert_eq!(entry(etcd, &a).unwrap().node, "n1");
    let out = nodes[2].python(
        py,
        &format!(
            "{}\nprint(json.dumps({{\"count\": advanced({c2})}}))",
            py_on(&a)
        ),
    );
    assert!(out["count"].as_u64().unwrap() > c2, "{out}");
    for s in &nodes {
        let l = listed(s, "/v2/sandboxes");
        assert_eq!(l.len(), 2, "through :{}: {l:?}", s.port);
        assert!(
            l.iter()
                .all(|(_, node, state)| node != "n3" && state == "running"),
            "{l:?}"
        );
    }
}

/// S3 down during a cluster pause: the pause fails, saying its snapshot could not be pushed,
/// and the sandbox runs on where it was (its counter counts, its entry says running); a drain
/// keeps it there, running, with the same cause; with S3 back the pause works.
#[test]
fn a_pause_without_s3_fails_and_the_sandbox_runs_on() {
    let Some(mut f) = fixture(SECRET, 2) else {
        return;
    };
    let nodes = start_nodes(&f.etcd, &f.homes, KEY, &f.secret, 0);
    let a = create(&nodes[1], &f.py);
    let count = py_on(&a);
    nodes[1].python(
        &f.py,
        &format!("{count}\nsbx.commands.run(\"{COUNTER}\", background=True, timeout=0)\nprint(json.dumps({{\"count\": count()}}))"),
    );
    f.s3.stop();
    let t = Instant::now();
    let out = nodes[1].python(
        &f.py,
        &format!(
            r#"
import json
from e2b import Sandbox
try:
    print(json.dumps({{"paused": Sandbox.pause("{a}")}}))
except Exception as e:
    print(json.dumps({{"error": type(e).__name__, "message": str(e)}}))
"#
        ),
    );
    eprintln!("the pause without S3 took {:?}: {out}", t.elapsed());
    let msg = out["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("could not be pushed to the store's remote")
            && msg.contains("it was resumed and runs on, on node n1"),
        "{out}"
    );
    let e = entry(&f.etcd, &a).unwrap();
    assert_eq!((e.node.as_str(), e.state), ("n1", SandboxState::Running));
    let out = nodes[1].python(
        &f.py,
        &format!("{count}\nc = count()\nprint(json.dumps({{\"c\": c, \"then\": advanced(c)}}))"),
    );
    assert!(out["then"].as_u64() > out["c"].as_u64(), "{out}");

    // A drain cannot let it go either: it stays, running, and the drain says why.
    let drain = node_cmd(&f.homes[0], &f.etcd, &["drain", "n1", "--timeout", "60"]);
    let text = String::from_utf8_lossy(&drain.stdout);
    eprintln!("kiln node drain n1 without S3:\n{text}");
    assert!(!drain.status.success(), "{text}");
    assert!(
        text.contains(&format!("{a} (was running) KEPT on the node: "))
            && text.contains("could not be pushed to the store's remote"),
        "{text}"
    );
    let e = entry(&f.etcd, &a).unwrap();
    assert_eq!(
        (e.node.as_str(), e.state, e.released),
        ("n1", SandboxState::Running, false)
    );
    let out = nodes[1].python(
        &f.py,
        &format!("{count}\nc = count()\nprint(json.dumps({{\"c\": c, \"then\": advanced(c)}}))"),
    );
    assert!(out["then"].as_u64() > out["c"].as_u64(), "{out}");
    assert!(node_cmd(&f.homes[0], &f.etcd, &["undrain", "n1"])
        .status
        .success());

    f.s3.restart().unwrap();
    let out = nodes[1].python(
        &f.py,
        &format!(
            r#"
import json
from e2b import Sandbox
print(json.dumps({{"paused": Sandbox.pause("{a}")}}))
"#
        ),
    );
    assert_eq!(out["paused"], true, "{out}");
    wait_pushed(&f.etcd, &a);
}

/// A node cut off long enough for another to take its paused sandbox over never resumes its
/// own copy: n2 (SIGSTOP) past its lease, n1 takes the pushed paused sandbox over and
/// resumes it; n2 continued (SIGCONT) is asked at once to connect it, before its reconcile
/// could drop the copy, and forwards to n1 (the catalog, not a paused copy, decides where a
/// sandbox resumes); the sandbox then runs in one home only.
#[test]
fn a_node_cut_off_never_resumes_a_paused_sandbox_taken_over_meanwhile() {
    let Some(f) = fixture(SECRET, 2) else {
        return;
    };
    let etcd = &f.etcd;
    f.share_image("sdk");
    let nodes = start_nodes(etcd, &f.homes, KEY, &f.secret, 0);
    let c = create_on(&nodes[1], 300, "");
    let (code, body) = nodes[1].api("POST", &format!("/sandboxes/{c}/pause"), None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(wait_pushed(etcd, &c).node, "n2");

    signal(&nodes[1], libc::SIGSTOP);
    let connect = |s: &Serve| {
        e2b::http(
            s.port,
            "POST",
            &format!("/v2/sandboxes/{c}/connect"),
            &[("X-API-Key", KEY), ("Content-Type", "application/json")],
            Some(r#"{"timeout": 300}"#),
        )
        .unwrap()
    };
    // n1 takes it over once n2's lease is gone (503 until then: n2 is not answering).
    let t = Instant::now();
    loop {
        let (code, body) = connect(&nodes[0]);
        if code == 201 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no takeover through n1: {code} {}",
            String::from_utf8_lossy(&body)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(entry(etcd, &c).unwrap().node, "n1");
    assert!(
        kiln_tests::sandbox::ids(&f.homes[1]).contains(&c),
        "n2's copy is gone early"
    );

    signal(&nodes[1], libc::SIGCONT);
    let (code, body) = connect(&nodes[1]);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(code, 200, "n2 resumed its own copy, or failed: {body}");
    assert_eq!(body["sandboxID"], c.as_str(), "{body}");
    let e = entry(etcd, &c).unwrap();
    assert_eq!((e.node.as_str(), e.state), ("n1", SandboxState::Running));
    // n2's reconcile drops its paused copy (bounded wait); it never ran there.
    let t = Instant::now();
    while kiln_tests::sandbox::ids(&f.homes[1]).contains(&c) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "n2 kept its copy of {c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(holders(&f.homes, &c), 1);
}

/// `/health` tells a load balancer when a node is cut off from the cluster: with etcd's
/// majority gone, 503 once the node's lease is unconfirmed for longer than its TTL; 204 again
/// once etcd is back and the node renews.
#[test]
fn health_says_when_a_node_is_cut_off_from_the_cluster() {
    let Some(mut f) = fixture(SECRET, 1) else {
        return;
    };
    let nodes = start_nodes(&f.etcd, &f.homes, KEY, &f.secret, 30);
    let health = |s: &Serve| {
        let (code, body) = e2b::http(s.port, "GET", "/health", &[], None).unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    };
    let wait_for = |code: u16, within: Duration| {
        let t = Instant::now();
        loop {
            let (c, body) = health(&nodes[0]);
            if c == code {
                return body;
            }
            assert!(
                t.elapsed() < within,
                "/health still {c} ({body}), waited for {code}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(health(&nodes[0]).0, 204);
    f.etcd.kill(0);
    f.etcd.kill(1);
    let body = wait_for(503, Duration::from_secs(30));
    assert!(
        body.contains("node n1 is cut off from the cluster"),
        "{body}"
    );
    f.etcd.restart(0);
    wait_for(204, Duration::from_secs(30));
}

/// `kiln node` through etcd, as an operator runs it: `args` after `node`, with the
/// cluster's etcd; the output.
fn node_cmd(k: &kiln_tests::Kiln, etcd: &Etcd, args: &[&str]) -> std::process::Output {
    let mut all = vec!["node"];
    all.extend_from_slice(args);
    let urls = etcd.urls_arg();
    all.extend(["--cluster-etcd", &urls]);
    k.run(&all)
}

/// `kiln node ls --json`: node id -> its row.
fn node_rows(k: &kiln_tests::Kiln, etcd: &Etcd) -> serde_json::Map<String, serde_json::Value> {
    let out = node_cmd(k, etcd, &["ls", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

/// `kiln node drain`: n3's two running sandboxes (one with a 3 MiB file and a counter) are
/// paused, pushed and let go; n3 says it drains and placement skips it (a create through n3
/// lands elsewhere); a connect through n3 resumes the first on another node, its file byte
/// for byte and its counter counting on; the second resumes once through n1 and n2 at once;
/// after `kiln node undrain` placement picks n3 again, and a sandbox paused there goes in the
/// next drain. `KILN_TEST_DRAIN_EXTRA=N` puts N more running sandboxes on n3 before the
/// drain (to time drains of more sandboxes; they are only checked released).
#[test]
fn drain_moves_a_nodes_sandboxes_to_the_others() {
    let Some(f) = fixture(SECRET, 3) else {
        return;
    };
    let (py, etcd, k) = (&f.py, &f.etcd, &f.homes[0]);
    f.share_image("sdk");
    let nodes = start_nodes(etcd, &f.homes, KEY, &f.secret, 0);
    let a = create_on(&nodes[2], 300, "");
    let b = create_on(&nodes[2], 300, "");
    let extra: usize = std::env::var("KILN_TEST_DRAIN_EXTRA")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let extras: Vec<String> = (0..extra).map(|_| create_on(&nodes[2], 300, "")).collect();
    let before = nodes[0].python(
        py,
        &format!(
            "{}\nprint(json.dumps({{\"sha\": sha, \"count\": c}}))",
            py_file_and_counter(&a)
        ),
    );

    let t = Instant::now();
    let out = node_cmd(k, etcd, &["drain", "n3", "--json", "--timeout", "60"]);
    let took = t.elapsed();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    eprintln!(
        "kiln node drain n3 ({} running sandboxes): {took:?}: {report}",
        2 + extra
    );
    assert!(
        out.status.success(),
        "{report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["complete"], true, "{report}");
    let mut released: Vec<(String, String, String)> = report["settled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let f = |k: &str| s[k].as_str().unwrap_or_default().to_string();
            (f("id"), f("was"), f("outcome"))
        })
        .collect();
    released.sort();
    let mut want: Vec<_> = [&a, &b]
        .into_iter()
        .chain(&extras)
        .map(|id| (id.clone(), "running".to_string(), "released".to_string()))
        .collect();
    want.sort();
    assert_eq!(released, want, "{report}");
    for id in [&a, &b] {
        let e = entry(etcd, id).unwrap();
        assert!(
            e.node == "n3" && e.state == SandboxState::Paused && e.released && e.pushed.is_some(),
            "{e:?}"
        );
    }
    assert_eq!(holders(&f.homes[2..], &a) + holders(&f.homes[2..], &b), 0);
    // n3 says it drains (its next published info), with nothing left on it.
    let t = Instant::now();
    let n3 = loop {
        let n3 = node_rows(k, etcd)["n3"].clone();
        if n3["draining_seen"] == true || t.elapsed() > Duration::from_secs(10) {
            break n3;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        (&n3["live"], &n3["draining"], &n3["draining_seen"]),
        (&true.into(), &true.into(), &true.into()),
        "{n3}"
    );
    assert_eq!(
        (&n3["running"], &n3["released"]),
        (&0.into(), &(2 + extra).into()),
        "{n3}"
    );
    let table = node_cmd(k, etcd, &["ls"]);
    let table = String::from_utf8_lossy(&table.stdout);
    eprintln!("kiln node ls:\n{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("n3 ") && l.contains(" yes ")),
        "{table}"
    );

    // A create through n3 lands on another node.
    let c = create(&nodes[2], py);
    let on = entry(etcd, &c).unwrap().node;
    assert!(on == "n1" || on == "n2", "placed on {on}");

    // A connect through n3 resumes `a` on another node, as it was.
    let after = nodes[2].python(
        py,
        &format!(
            r#"{}
data = sbx.files.read("/home/app/moved.bin", format="bytes")
c1 = count()
print(json.dumps({{"sha": hashlib.sha256(bytes(data)).hexdigest(), "c1": c1, "c2": advanced(c1)}}))
"#,
            py_on(&a)
        ),
    );
    assert_eq!(after["sha"], before["sha"], "the file changed");
    let (c0, c1, c2) = (
        before["count"].as_u64().unwrap(),
        after["c1"].as_u64().unwrap(),
        after["c2"].as_u64().unwrap(),
    );
    assert!(c1 >= c0 && c2 > c1, "the counter: {c0}, then {c1}, {c2}");
    let e = entry(etcd, &a).unwrap();
    assert!(
        e.node != "n3" && e.state == SandboxState::Running && !e.released,
        "{e:?}"
    );
    assert_eq!(holders(&f.homes, &a), 1);

    // `b` through n1 and n2 at once: resumed once, by the node that took it over.
    assert_eq!(connect_at_once(&[&nodes[0], &nodes[1]], &b), vec![200, 201]);
    let e = entry(etcd, &b).unwrap();
    assert!(
        ["n1", "n2"].contains(&e.node.as_str()) && e.state == SandboxState::Running,
        "{e:?}"
    );
    assert_eq!(holders(&f.homes, &b), 1);

    // Undrained, n3 (no sandbox left) is placement's choice again.
    let out = node_cmd(k, etcd, &["undrain", "n3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = create(&nodes[0], py);
    assert_eq!(entry(etcd, &d).unwrap().node, "n3");
    let t = Instant::now();
    while node_rows(k, etcd)["n3"]["draining_seen"] != false {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "n3 still says it drains"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Paused there through the CLI (its reaper pushes it), then drained again, as an
    // operator reads it: the paused sandbox goes too.
    f.homes[2].ok(["sandbox", "pause", &d]);
    wait_pushed(etcd, &d);
    let out = node_cmd(k, etcd, &["drain", "n3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("kiln node drain n3:\n{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{d} (was paused) released: pushed"))
            && text.contains("node n3 is drained in"),
        "{text}"
    );
    assert!(entry(etcd, &d).unwrap().released);
}
