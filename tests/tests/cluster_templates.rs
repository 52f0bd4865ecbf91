//! Templates and snapshots across the cluster (issue 20): a template built through one node
//! with E2B's Python SDK runs on the others; a rebuild elsewhere moves every node to the new
//! image; a sandbox snapshot taken through one node creates sandboxes on another; a delete
//! through any node removes the template from the catalog and from every home. Three
//! `kiln serve --cluster-etcd` nodes, a 3-member etcd and SeaweedFS on loopback.
//! Skips (with a SKIP line) without etcd, gVisor, the image tools or E2B's Python SDK.

use kiln_tests::cluster::{fixture, read_etcd, start_nodes};
use kiln_tests::e2b::{self, Serve};
use kiln_tests::etcd::Etcd;

const KEY: &str = "cluster-templates-key";
const SECRET: &str = "cluster-templates-secret-0123456789";

/// Template `name`'s entry in the cluster's catalog, read from etcd.
fn template(etcd: &Etcd, name: &str) -> Option<kiln_cluster::TemplateEntry> {
    read_etcd(etcd, |c| async move {
        kiln_cluster::Templates::new(c).get(name).await
    })
    .unwrap()
    .map(|(e, _)| e)
}

/// Builds template `name` through `s` from the `sdk` image, writing `version` to /version.
fn build(s: &Serve, py: &std::path::Path, name: &str, version: &str) {
    let out = s.python(
        py,
        &format!(
            r#"
import json
from e2b import Template
t = Template().from_template("sdk").run_cmd("echo {version} > /tmp/v && cat /tmp/v", user="root").run_cmd("cp /tmp/v /home/app/version")
Template.build(t, "{name}")
print(json.dumps({{"built": True}}))
"#
        ),
    );
    assert_eq!(out["built"], true, "{out}");
}

/// A create of `template` on node `s` itself, as another node sends it when placement
/// picks `s` (node-to-node: the cluster secret, no API key): the sandbox id.
fn create_on(s: &Serve, template: &str) -> Result<String, String> {
    let body = format!(r#"{{"templateID":"{template}","timeout":120}}"#);
    let (code, b) = e2b::http(
        s.port,
        "POST",
        "/sandboxes",
        &[
            ("X-Kiln-Forwarded-By", "n1"),
            ("X-Kiln-Cluster-Secret", SECRET),
            ("Content-Type", "application/json"),
        ],
        Some(&body),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
    match code {
        201 => Ok(v["sandboxID"].as_str().unwrap().to_string()),
        _ => Err(format!("{code} {}", String::from_utf8_lossy(&b))),
    }
}

/// `cat PATH` in sandbox `id`, through node `s` (forwarded to its owner).
fn cat(s: &Serve, py: &std::path::Path, id: &str, path: &str) -> String {
    let out = s.python(
        py,
        &format!(
            r#"
import json
from e2b import Sandbox
sbx = Sandbox.connect("{id}")
print(json.dumps({{"out": sbx.commands.run("cat {path}").stdout}}))
"#
        ),
    );
    out["out"].as_str().unwrap().trim().to_string()
}

/// The images a home has by name.
fn images(k: &kiln_tests::Kiln) -> Vec<String> {
    let v = k.json(["image", "ls", "--json"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn templates_and_snapshots_are_the_clusters() {
    let Some(f) = fixture(SECRET, 3) else {
        return;
    };
    f.share_image("sdk");
    let py = f.py.clone();
    let mut nodes: Vec<Serve> = start_nodes(&f.etcd, &f.homes, KEY, &f.secret, 0);
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);

    // Built through n2: pushed and published before the build says it is ready.
    build(n2, &py, "tpl-c", "v1");
    let e = template(&f.etcd, "tpl-c").expect("tpl-c in the catalog once built");
    assert_eq!(
        (e.node.as_str(), e.holders.clone()),
        ("n2", vec!["n2".to_string()])
    );
    assert!(!images(&f.homes[2]).contains(&"tpl-c".to_string()));

    // Every node knows it (Template.exists, GET /templates), n3 not holding it.
    for s in &nodes {
        let (code, v) = s.api("GET", "/templates/aliases/tpl-c", None);
        assert_eq!((code, &v["templateID"]), (200, &"tpl-c".into()), "{v}");
        let (_, list) = s.api("GET", "/templates", None);
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|t| t["templateID"] == "tpl-c" && t["buildID"] == e.id.as_str()),
            "{list}"
        );
    }

    // A create through n1 goes to the node holding it (placement's head start).
    let out = n1.python(
        &py,
        r#"
import json
from e2b import Sandbox
sbx = Sandbox.create("tpl-c", timeout=120)
print(json.dumps({"id": sbx.sandbox_id, "v": sbx.commands.run("cat /home/app/version").stdout}))
"#,
    );
    assert_eq!(out["v"].as_str().unwrap().trim(), "v1", "{out}");
    let (_, detail) = n1.api(
        "GET",
        &format!("/sandboxes/{}", out["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(detail["clientID"], "n2", "{detail}");

    // Placed on n3, which lacks it: pulled from the remote and run there. What the pull
    // costs a create is printed (a number for the README, not an assertion).
    let t = std::time::Instant::now();
    let on3 = create_on(n3, "tpl-c").unwrap();
    let pulled = t.elapsed();
    assert_eq!(cat(n1, &py, &on3, "/home/app/version"), "v1");
    let t = std::time::Instant::now();
    let held = create_on(n3, "tpl-c").unwrap();
    eprintln!(
        "create on a node without the template (pulled): {pulled:?}; again, held: {:?}",
        t.elapsed()
    );
    let (code, _) = n1.api("DELETE", &format!("/sandboxes/{held}"), None);
    assert_eq!(code, 204);
    let e = template(&f.etcd, "tpl-c").unwrap();
    assert!(e.holders.contains(&"n3".to_string()), "{e:?}");

    // Rebuilt through n1: the name moves; n3, holding v1, pulls v2 for its next sandbox.
    build(n1, &py, "tpl-c", "v2");
    let e2 = template(&f.etcd, "tpl-c").unwrap();
    assert_ne!(e2.id, e.id);
    assert_eq!(e2.node, "n1");
    let on3_v2 = create_on(n3, "tpl-c").unwrap();
    assert_eq!(cat(n2, &py, &on3_v2, "/home/app/version"), "v2");

    // A template built through n2 from tpl-c, which n2 holds as v1: its base is the
    // catalog's v2, pulled first.
    let out = n2.python(
        &py,
        r#"
import json
from e2b import Template, Sandbox
Template.build(Template().from_template("tpl-c").run_cmd("cat /home/app/version > /home/app/base"), "tpl-d")
sbx = Sandbox.create("tpl-d", timeout=120)
print(json.dumps({"base": sbx.commands.run("cat /home/app/base").stdout}))
"#,
    );
    assert_eq!(out["base"].as_str().unwrap().trim(), "v2", "{out}");
    assert_eq!(template(&f.etcd, "tpl-d").unwrap().node, "n2");

    // A snapshot taken through n2 of n3's sandbox creates a sandbox on n2 (and lists
    // through every node).
    let (code, snap) = n2.api(
        "POST",
        &format!("/sandboxes/{on3_v2}/snapshots"),
        Some(r#"{"name":"snap-c"}"#),
    );
    assert_eq!(code, 201, "{snap}");
    let s = template(&f.etcd, "snap-c").expect("the snapshot in the catalog");
    assert_eq!(s.kind, kiln_cluster::TemplateKind::Snapshot);
    for s in &nodes {
        let (_, list) = s.api("GET", "/snapshots", None);
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|x| x["snapshotID"] == "snap-c"),
            "{list}"
        );
    }
    let from_snap = create_on(n2, "snap-c").unwrap();
    assert_eq!(cat(n3, &py, &from_snap, "/home/app/version"), "v2");
    // A snapshot and an image template never share a name.
    let (code, v) = n1.api(
        "POST",
        &format!("/sandboxes/{on3_v2}/snapshots"),
        Some(r#"{"name":"tpl-d"}"#),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("tpl-d is a template (an image)"),
        "{v}"
    );
    // Deleted through n1: no node creates from it again (n2 and n3 held it, n1 never did).
    let (code, v) = n1.api("DELETE", "/templates/snap-c", None);
    assert_eq!(code, 204, "{v}");
    for s in &nodes {
        let refused = create_on(s, "snap-c").unwrap_err();
        assert!(refused.starts_with("404"), "through :{}: {refused}", s.port);
    }

    // Tagged through n1, the tag published; untagged through n3, gone from every home.
    let out = n1.python(
        &py,
        r#"
import json
from e2b import Template
Template.assign_tags("tpl-c", ["stable"])
print(json.dumps({"tags": sorted(t.tag for t in Template.get_tags("tpl-c"))}))
"#,
    );
    assert_eq!(
        out["tags"],
        serde_json::json!(["default", "stable"]),
        "{out}"
    );
    assert_eq!(template(&f.etcd, "tpl-c:stable").unwrap().id, e2.id);
    let on3_stable = create_on(n3, "tpl-c:stable").unwrap();
    assert_eq!(cat(n3, &py, &on3_stable, "/home/app/version"), "v2");
    let out = n3.python(
        &py,
        r#"
import json
from e2b import Template
Template.remove_tags("tpl-c", ["stable"])
print(json.dumps({"exists": Template.exists("tpl-c:stable")}))
"#,
    );
    assert_eq!(out["exists"], false, "{out}");
    assert!(template(&f.etcd, "tpl-c:stable").is_none());
    for k in &f.homes {
        assert!(!images(k).contains(&"tpl-c:stable".to_string()));
    }

    // Deleted through n1 while n3 (which holds it) is down: gone from the catalog and from
    // every live home; n3, back, drops its copy at its next create of it.
    nodes[2].stop();
    let (code, v) = nodes[0].api("DELETE", "/templates/tpl-c", None);
    assert_eq!(code, 204, "{v}");
    assert!(template(&f.etcd, "tpl-c").is_none());
    for k in &f.homes[..2] {
        assert!(!images(k).contains(&"tpl-c".to_string()));
    }
    assert!(images(&f.homes[2]).contains(&"tpl-c".to_string()));
    nodes[2].restart();
    for s in &nodes {
        let (code, _) = s.api("GET", "/templates/aliases/tpl-c", None);
        assert_eq!(code, 404);
    }
    for s in &nodes {
        let refused = create_on(s, "tpl-c").unwrap_err();
        assert!(refused.starts_with("404"), "through :{}: {refused}", s.port);
    }
    assert!(
        !images(&f.homes[2]).contains(&"tpl-c".to_string()),
        "n3 kept its copy of a template deleted while it was down"
    );
}
