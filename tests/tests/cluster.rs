//! Cluster mode, first part (issue 20): a real 3-member etcd (tests/src/etcd.rs) and three
//! `kiln serve --cluster-etcd` nodes with their own homes and ports on loopback, driven by
//! E2B's Python SDK. Only node n1's home has the `sdk` image: placement (fewest sandboxes,
//! then the smallest node id) gives an empty cluster's first sandbox to n1, so a create
//! through n3 is forwarded to n1, and everything after it through n2 and n3 is forwarded too:
//! commands (streamed), files, a port by Host name, pause, connect (resume), kill, with one
//! etcd member killed midway; every node lists the cluster from the catalog; a timeout ends a
//! sandbox in every list; node-to-node requests need the cluster secret.
//! Skips (with a SKIP line) without etcd, gVisor, the image tools or E2B's Python SDK.

use kiln_tests::cluster::{fixture, listed, node_args, start_nodes};
use kiln_tests::e2b::{self, Serve};
use kiln_tests::Kiln;

const KEY: &str = "cluster-test-key";
const SECRET: &str = "cluster-test-secret-0123456789";

#[test]
fn three_nodes_serve_one_cluster() {
    let Some(mut f) = fixture(SECRET, 3) else {
        return;
    };
    let (py, secret) = (f.py.clone(), f.secret.clone());
    let nodes: Vec<Serve> = start_nodes(&f.etcd, &f.homes, KEY, &secret, 0);
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);

    // Create through n3 (placed on n1, forwarded there), then a command through n3.
    let out = n3.python(
        &py,
        r#"
import json
from e2b import Sandbox
sbx = Sandbox.create("sdk", timeout=300, metadata={"suite": "cluster"})
r = sbx.commands.run("echo hello from $(hostname)")
print(json.dumps({"id": sbx.sandbox_id, "out": r.stdout}))
"#,
    );
    let id = out["id"].as_str().unwrap().to_string();
    assert!(
        out["out"].as_str().unwrap().starts_with("hello from"),
        "{out}"
    );

    // Every node lists the sandbox once, owned by n1 (v2 and v1 lists).
    for s in &nodes {
        for path in ["/v2/sandboxes", "/sandboxes"] {
            assert_eq!(
                listed(s, path),
                vec![(id.clone(), "n1".to_string(), "running".to_string())],
                "{path} through :{}",
                s.port
            );
        }
    }
    let (code, detail) = n2.api("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(code, 200, "{detail}");
    assert_eq!(detail["clientID"], "n1");
    assert_eq!(detail["metadata"]["suite"], "cluster");

    // Its latest metrics through every node (n1 samples it; n2 and n3 ask n1), bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for s in &nodes {
        loop {
            let (code, m) = s.api(
                "GET",
                &format!("/sandboxes/metrics?sandbox_ids={id},nope"),
                None,
            );
            assert_eq!(code, 200, "{m}");
            let got = m["sandboxes"].as_object().unwrap();
            if got.contains_key(&id) {
                assert_eq!(got.len(), 1, "{m}");
                assert!(got[&id]["memTotal"].as_u64().unwrap() > 0, "{m}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no metrics of {id} through :{}: {m}",
                s.port
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }

    // No sandbox of these hosts reaches etcd (it has no authentication): its members are in
    // the host table's refused endpoints.
    let nft = std::process::Command::new("nft")
        .args(["list", "set", "inet", "kiln", "protected"])
        .output()
        .unwrap();
    let set = String::from_utf8_lossy(&nft.stdout);
    for url in f.etcd.urls() {
        let port = url.rsplit(':').next().unwrap();
        assert!(
            set.contains(&format!("127.0.0.1 . {port}")),
            "{url} not in {set}"
        );
    }

    // An etcd member dies (the one every node tries first): the cluster goes on.
    f.etcd.kill(0);

    // Files and a streamed command through n2, after a connect through n2.
    let out = n2.python(
        &py,
        &format!(
            r#"
import json
from e2b import Sandbox
sbx = Sandbox.connect("{id}")
data = "written through n2\n" * 1000
sbx.files.write("/tmp/through-n2.txt", data)
back = sbx.files.read("/tmp/through-n2.txt")
lines = []
r = sbx.commands.run("wc -l < /tmp/through-n2.txt; for i in 1 2 3; do echo tick$i; sleep 0.1; done",
                     on_stdout=lambda s: lines.append(s))
srv = sbx.commands.run("mkdir -p /tmp/www && echo served > /tmp/www/index.html && httpd -f -p 8123 -h /tmp/www",
                       background=True, timeout=0)
# Signed file URLs name no sandbox: n2 finds the node whose sandbox the signature names.
import httpx
down = httpx.get(sbx.download_url("/tmp/through-n2.txt"))
up = httpx.post(sbx.upload_url("/home/app/up.txt"), files={{"file": ("up.txt", b"uploaded through n2")}})
forged = httpx.get(sbx.download_url("/tmp/through-n2.txt").replace("signature=v1_", "signature=v1_x"))
print(json.dumps({{"same": back == data, "out": r.stdout, "streamed": len(lines),
  "down": [down.status_code, down.text == data], "up": [up.status_code, sbx.files.read("/home/app/up.txt")],
  "forged": forged.status_code}}))
"#
        ),
    );
    assert_eq!(out["same"], true, "{out}");
    assert_eq!(out["down"], serde_json::json!([200, true]), "{out}");
    assert_eq!(out["up"][1], "uploaded through n2", "{out}");
    assert_eq!(out["forged"], 401, "{out}");
    let stdout = out["out"].as_str().unwrap();
    assert!(
        stdout.starts_with("1000\n") && stdout.contains("tick3"),
        "{out}"
    );
    assert!(out["streamed"].as_u64().unwrap() >= 1, "{out}");

    // Port proxying through a node that does not own the sandbox, by Host name.
    let host = format!("8123-{id}.localhost:{}", n3.port);
    let mut served = None;
    for _ in 0..50 {
        if let Ok((200, body)) = e2b::http(n3.port, "GET", "/", &[("Host", &host)], None) {
            served = Some(body);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        served.as_deref(),
        Some(&b"served\n"[..]),
        "{}",
        n1.log_text()
    );

    // Pause through n3, seen paused through n2; connect through n2 resumes it on n1 with its
    // files and its processes.
    let out = n3.python(
        &py,
        &format!(
            r#"
import json
from e2b import Sandbox
print(json.dumps({{"paused": Sandbox.pause("{id}")}}))
"#
        ),
    );
    assert_eq!(out["paused"], true, "{out}");
    assert_eq!(
        listed(n2, "/v2/sandboxes"),
        vec![(id.clone(), "n1".to_string(), "paused".to_string())]
    );
    let out = n2.python(
        &py,
        &format!(
            r#"
import json
from e2b import Sandbox
sbx = Sandbox.connect("{id}", timeout=300)
info = sbx.get_info()
kept = sbx.files.read("/tmp/through-n2.txt") == "written through n2\n" * 1000
print(json.dumps({{"state": info.state.value, "kept": kept}}))
"#
        ),
    );
    assert_eq!(
        (out["state"].as_str(), out["kept"].as_bool()),
        (Some("running"), Some(true)),
        "{out}"
    );
    assert_eq!(
        listed(n3, "/v2/sandboxes"),
        vec![(id.clone(), "n1".to_string(), "running".to_string())]
    );
    assert_eq!(
        e2b::http(n3.port, "GET", "/", &[("Host", &host)], None).unwrap(),
        (200, b"served\n".to_vec()),
        "the sandbox's server survives pause and resume"
    );

    // A node-to-node request is refused without the cluster secret, or with a wrong one.
    for headers in [
        vec![("X-Kiln-Forwarded-By", "n1")],
        vec![
            ("X-Kiln-Forwarded-By", "n1"),
            ("X-Kiln-Cluster-Secret", "not-the-secret"),
        ],
        vec![("X-Kiln-Cluster-Secret", "")],
    ] {
        let (code, body) = e2b::http(n2.port, "GET", "/v2/sandboxes", &headers, None).unwrap();
        assert_eq!(code, 401, "{headers:?}: {}", String::from_utf8_lossy(&body));
    }
    // With it, the node takes the request as one from another node (no API key needed).
    let (code, _) = e2b::http(
        n2.port,
        "GET",
        "/v2/sandboxes",
        &[
            ("X-Kiln-Forwarded-By", "n1"),
            ("X-Kiln-Cluster-Secret", SECRET),
        ],
        None,
    )
    .unwrap();
    assert_eq!(code, 200);

    // Kill through n2: gone from every node's list as soon as the call returns.
    let out = n2.python(
        &py,
        &format!(
            r#"
import json
from e2b import Sandbox
print(json.dumps({{"killed": Sandbox.kill("{id}")}}))
"#
        ),
    );
    assert_eq!(out["killed"], true, "{out}");
    for s in &nodes {
        assert!(listed(s, "/v2/sandboxes").is_empty(), "through :{}", s.port);
    }
    let (code, _) = n3.api("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(code, 404);

    // A timeout is seen by the owner's sweep, which takes the sandbox out of the catalog.
    let out = n2.python(
        &py,
        r#"
import json
from e2b import Sandbox
sbx = Sandbox.create("sdk", timeout=3)
print(json.dumps({"id": sbx.sandbox_id}))
"#,
    );
    let short = out["id"].as_str().unwrap().to_string();
    assert_eq!(
        listed(n3, "/v2/sandboxes"),
        vec![(short, "n1".to_string(), "running".to_string())]
    );
    let t = std::time::Instant::now();
    while !listed(n3, "/v2/sandboxes").is_empty() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "a timed-out sandbox stays in the catalog"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn serve_without_etcd_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path().join("home"));
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    // Nothing listens on this port (it was free a moment ago).
    let dead = format!("http://127.0.0.1:{}", e2b::free_port());
    let port = e2b::free_port();
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    args.extend(node_args(&dead, "n1", port, &secret));
    let out = k.run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("joining the cluster: no etcd endpoint answered")
            && stderr.contains(&dead["http://".len()..]),
        "{stderr}"
    );
}
