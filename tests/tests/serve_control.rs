//! `kiln serve`'s control plane driven by E2B's real SDKs (Python `e2b` from PyPI, JS `e2b`
//! from npm) and raw HTTP: a real daemon on a free loopback port with its own home and API
//! key, gVisor sandboxes from the tests' `app` image.
//!
//! Skips (with `SKIP:`) when gVisor cannot run here (not root, no runsc) or the SDKs are not
//! installed (`scripts/install-deps` puts them in /opt/kiln-tools).

use kiln_tests::e2b::{self, http, Serve};
use kiln_tests::sandbox::{app_home, assert_no_processes, KillAll};
use kiln_tests::Kiln;
use std::os::unix::fs::PermissionsExt;

const KEY: &str = "kiln_test_key_0123456789";

/// Python prelude: the SDK plus a JSON printer.
const PY: &str = "import json, time\nfrom e2b import Sandbox, SandboxQuery, SandboxState\n";

#[test]
fn auth_errors_and_status_codes_over_raw_http() {
    // No sandbox runs here: an empty home is enough.
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path().join("home"));
    let s = Serve::start(&k, KEY);

    // /health needs no key; everything else does.
    assert_eq!(http(s.port, "GET", "/health", &[], None).unwrap().0, 204);
    for (method, path) in [
        ("GET", "/v2/sandboxes"),
        ("GET", "/sandboxes/abc"),
        ("POST", "/v2/sandboxes"),
        ("DELETE", "/sandboxes/abc"),
        ("GET", "/templates"),
    ] {
        let (code, body) = http(s.port, method, path, &[], None).unwrap();
        assert_eq!(code, 401, "{method} {path} without a key");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], 401, "{v}");
        assert!(v["message"].is_string(), "{v}");
        let (code, _) = http(s.port, method, path, &[("X-API-Key", "wrong")], None).unwrap();
        assert_eq!(code, 401, "{method} {path} with a wrong key");
        let (code, _) = http(
            s.port,
            method,
            path,
            &[("X-API-Key", &KEY[..KEY.len() - 1])],
            None,
        )
        .unwrap();
        assert_eq!(code, 401, "{method} {path} with a key prefix");
    }

    // Unknown sandbox: 404 with E2B's error body.
    for (method, path, body) in [
        ("GET", "/sandboxes/nosuchsandbox", None),
        ("DELETE", "/sandboxes/nosuchsandbox", None),
        ("POST", "/sandboxes/nosuchsandbox/pause", None),
        (
            "POST",
            "/sandboxes/nosuchsandbox/timeout",
            Some(r#"{"timeout": 5}"#),
        ),
        (
            "POST",
            "/v2/sandboxes/nosuchsandbox/connect",
            Some(r#"{"timeout": 5}"#),
        ),
        ("POST", "/sandboxes/nosuchsandbox/snapshots", Some("{}")),
        ("POST", "/sandboxes/nosuchsandbox/fork", Some("{}")),
    ] {
        let (code, v) = s.api(method, path, body);
        assert_eq!(code, 404, "{method} {path}: {v}");
        assert_eq!(v["code"], 404, "{v}");
    }

    // Malformed bodies and queries: 400.
    for (method, path, body) in [
        ("POST", "/v2/sandboxes", Some("{")),
        ("POST", "/v2/sandboxes", Some(r#"{"timeout": 5}"#)),
        ("POST", "/v2/sandboxes", Some(r#"{"templateID": 5}"#)),
        ("POST", "/v2/sandboxes", None),
        ("POST", "/sandboxes", Some("not json")),
        (
            "POST",
            "/sandboxes/x/timeout",
            Some(r#"{"timeout": "soon"}"#),
        ),
        ("GET", "/v2/sandboxes?limit=0", None),
        ("GET", "/v2/sandboxes?state=dead", None),
        ("GET", "/v2/sandboxes?nextToken=zz", None),
    ] {
        let (code, v) = s.api(method, path, body);
        assert_eq!(code, 400, "{method} {path} {body:?}: {v}");
        assert_eq!(v["code"], 400, "{v}");
    }

    // An unknown template: 404; nothing is left behind.
    let (code, v) = s.api("POST", "/v2/sandboxes", Some(r#"{"templateID": "nope"}"#));
    assert_eq!(code, 404, "{v}");
    let (code, v) = s.api("GET", "/v2/sandboxes", None);
    assert_eq!((code, v), (200, serde_json::json!([])));
    let (code, v) = s.api("GET", "/templates", None);
    assert_eq!((code, v), (200, serde_json::json!([])));
}

#[test]
fn key_file_and_listen_address() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path().join("home"));
    // A non-loopback address is refused without --allow-remote.
    let err = k.fails(["serve", "--listen", "0.0.0.0:0"]);
    assert!(err.contains("--allow-remote"), "{err}");

    // Without KILN_API_KEY the key is generated into a 0600 file and kept across restarts.
    let port = e2b::free_port();
    let start = || {
        let mut c = k.cmd(["serve", "--listen", &format!("127.0.0.1:{port}")]);
        c.env_remove("KILN_API_KEY")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let t = std::time::Instant::now();
        while http(port, "GET", "/health", &[], None).is_err() {
            assert!(t.elapsed().as_secs() < 30, "kiln serve did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = start();
    let file = k.home.join("serve/api-key");
    assert!(said.contains(&file.display().to_string()), "{said}");
    let key = std::fs::read_to_string(&file).unwrap();
    assert!(
        !said.contains(key.trim()),
        "the key itself is not printed: {said}"
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    start();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), key);
}

/// create, get_info, list by metadata, pause (twice), connect resumes, set_timeout expires,
/// kill, unknown ids through the SDK.
#[test]
fn python_sdk_lifecycle() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, k, py) = (&t.s, &t.k, &t.py);

    let v = s.python(
        py,
        &format!(
            r#"{PY}
sbx = Sandbox.create("sdk", timeout=120, metadata={{"suite": "serve", "who": "a b&c"}}, envs={{"X": "1"}})
other = Sandbox.create("sdk", timeout=120, metadata={{"suite": "other"}})
info = sbx.get_info()
listed = Sandbox.list(query=SandboxQuery(metadata={{"suite": "serve", "who": "a b&c"}})).next_items()
everything = Sandbox.list().next_items()
paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
# State for the pause below: a file and a running process (needs the envd data plane).
sbx.commands.run("echo kept > /work/state")
bg = sbx.commands.run("sleep 600", background=True)
print(json.dumps({{
  "id": sbx.sandbox_id, "other": other.sandbox_id, "pid": bg.pid, "tok": sbx._envd_access_token,
  "info_id": info.sandbox_id, "template": info.template_id, "state": str(info.state.value),
  "metadata": info.metadata, "started": info.started_at.isoformat(), "end": info.end_at.isoformat(),
  "listed": [i.sandbox_id for i in listed], "all": sorted(i.sandbox_id for i in everything),
  "paused": [i.sandbox_id for i in paused],
  "envd_version": str(sbx._envd_version), "token": sbx._envd_access_token is not None,
}}))
"#
        ),
    );
    let id = v["id"].as_str().unwrap().to_string();
    let other = v["other"].as_str().unwrap().to_string();
    assert_eq!(v["info_id"], id.as_str());
    assert_eq!(v["template"], "sdk");
    assert_eq!(v["state"], "running");
    assert_eq!(v["metadata"]["who"], "a b&c", "{v}");
    assert_eq!(v["listed"], serde_json::json!([id]), "{v}");
    let mut both = vec![id.clone(), other.clone()];
    both.sort();
    assert_eq!(v["all"], serde_json::json!(both));
    assert_eq!(v["paused"], serde_json::json!([]));
    assert_eq!(v["envd_version"], "0.6.4");
    assert_eq!(v["token"], true, "v2 creates are secured: {v}");
    // The token is in the sandbox's record, private, for the data plane.
    let token = v["tok"].as_str().unwrap();
    let rec_path = k.home.join("sandboxes").join(&id).join("sandbox.json");
    let mode = std::fs::metadata(&rec_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    assert_eq!(rec["access"]["envd_token"], token, "{rec}");
    // ... and the data plane requires it.
    let envd = |t: &str| {
        http(
            s.port,
            "GET",
            "/envs",
            &[
                ("E2b-Sandbox-Id", &id),
                ("E2b-Sandbox-Port", "49983"),
                ("X-Access-Token", t),
            ],
            None,
        )
        .unwrap()
        .0
    };
    assert_eq!(envd(token), 200);
    assert_eq!(envd("wrong"), 401);
    // The same through a sandbox host name (`{port}-{id}.{domain}`) instead of the headers.
    let host = format!("49983-{id}.localhost:{}", s.port);
    let by_host = |t: &str| {
        http(
            s.port,
            "GET",
            "/envs",
            &[("Host", &host), ("X-Access-Token", t)],
            None,
        )
        .unwrap()
        .0
    };
    assert_eq!(by_host(token), 200);
    assert_eq!(by_host("wrong"), 401);
    let pid = v["pid"].as_u64().unwrap();

    // Pause, pause again (409 -> False), state paused, connect resumes.
    let v = s.python(
        py,
        &format!(
            r#"{PY}
sbx = Sandbox.connect("{id}")
first = sbx.pause()
second = Sandbox.pause("{id}")
state = Sandbox.get_info("{id}").state.value
paused = [i.sandbox_id for i in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()]
again = Sandbox.connect("{id}", timeout=60)
after = again.get_info().state.value
kept = again.commands.run("cat /work/state").stdout.strip()
pids = [p.pid for p in again.commands.list()]
print(json.dumps({{"first": first, "second": second, "state": state, "paused": paused, "after": after,
  "kept": kept, "running": {pid} in pids}}))
"#
        ),
    );
    assert_eq!(v["first"], true, "{v}");
    assert_eq!(v["second"], false, "{v}");
    assert_eq!(v["state"], "paused");
    assert_eq!(v["paused"], serde_json::json!([id]));
    assert_eq!(v["after"], "running");
    assert_eq!(v["kept"], "kept", "{v}");
    assert_eq!(
        v["running"], true,
        "the background process survives pause/connect: {v}"
    );

    // set_timeout: the daemon kills it when it expires.
    let v = s.python(
        py,
        &format!(
            r#"{PY}
from e2b import SandboxNotFoundException
Sandbox.set_timeout("{id}", 2)
t = time.time()
gone = None
while time.time() - t < 30:
    try:
        Sandbox.get_info("{id}")
    except SandboxNotFoundException:
        gone = time.time() - t
        break
    time.sleep(0.25)
print(json.dumps({{"gone": gone}}))
"#
        ),
    );
    let gone = v["gone"]
        .as_f64()
        .expect("sandbox not killed at its timeout");
    assert!(gone >= 1.0, "killed before its timeout: {gone}");
    assert_no_processes(&id);

    // kill; unknown ids.
    let v = s.python(
        py,
        &format!(
            r#"{PY}
from e2b import SandboxNotFoundException
killed = Sandbox.kill("{other}")
again = Sandbox.kill("{other}")
try:
    Sandbox.get_info("nosuchsandbox"); missing = False
except SandboxNotFoundException:
    missing = True
try:
    Sandbox.connect("nosuchsandbox"); connect_missing = False
except SandboxNotFoundException:
    connect_missing = True
print(json.dumps({{"killed": killed, "again": again, "missing": missing, "connect_missing": connect_missing,
  "left": [i.sandbox_id for i in Sandbox.list().next_items()]}}))
"#
        ),
    );
    assert_eq!(
        v,
        serde_json::json!({"killed": true, "again": false, "missing": true,
            "connect_missing": true, "left": []})
    );
    assert_no_processes(&other);
}

/// autoPause: the timeout pauses instead of killing, connect resumes; a daemon restart
/// (SIGKILL, start again) in the middle keeps the sandbox usable; a wrong key is refused.
#[test]
fn python_sdk_auto_pause_and_daemon_restart() {
    let Some(py) = e2b::python_or_skip() else {
        return;
    };
    let Some((_tmp, k)) = app_home() else { return };
    let _cleanup = KillAll(k.clone());
    let mut s = Serve::start(&k, KEY);

    let v = s.python(
        &py,
        &format!(
            r#"{PY}
sbx = Sandbox.create("app", timeout=3, lifecycle={{"on_timeout": "pause"}})
info = sbx.get_info()
print(json.dumps({{"id": sbx.sandbox_id, "on_timeout": str(info.lifecycle["on_timeout"] if isinstance(info.lifecycle, dict) else info.lifecycle).lower()}}))
"#
        ),
    );
    let id = v["id"].as_str().unwrap().to_string();
    assert!(v["on_timeout"].as_str().unwrap().contains("pause"), "{v}");

    // Restart the daemon while the sandbox runs; its timer survives in the record.
    s.restart();
    let v = s.python(
        &py,
        &format!(
            r#"{PY}
t = time.time()
state = None
while time.time() - t < 60:
    state = Sandbox.get_info("{id}").state.value
    if state == "paused":
        break
    time.sleep(0.25)
print(json.dumps({{"state": state, "after": time.time() - t}}))
"#
        ),
    );
    assert_eq!(v["state"], "paused", "autoPause did not pause: {v}");

    // Restart again while paused; connect resumes it.
    s.restart();
    let v = s.python(
        &py,
        &format!(
            r#"{PY}
sbx = Sandbox.connect("{id}", timeout=120)
info = sbx.get_info()
print(json.dumps({{"state": info.state.value, "token": sbx._envd_access_token is not None}}))
"#
        ),
    );
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["token"], true, "the access token survives restarts: {v}");

    // A wrong key through the SDK: an authentication error.
    let v = s.python(
        &py,
        r#"import json
from e2b import Sandbox, AuthenticationException
try:
    Sandbox.create("app", api_key="wrong"); out = "created"
except AuthenticationException as e:
    out = "auth"
except Exception as e:
    out = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#,
    );
    assert_eq!(v, "auth");

    // Raw HTTP sees the same sandbox after the restarts, then kills it.
    let (code, v) = s.api("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "running");
    assert_eq!(s.api("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
    assert_eq!(s.api("GET", &format!("/sandboxes/{id}"), None).0, 404);
    assert!(!k.home.join("serve/tokens").join(&id).exists());
    assert_no_processes(&id);
}

/// Raw HTTP for what the SDK does not expose: 409 conflicts, resume, refreshes, the v1 list,
/// pagination headers, templates.
#[test]
fn raw_http_conflicts_pagination_and_templates() {
    let Some((_tmp, k)) = app_home() else { return };
    let _cleanup = KillAll(k.clone());
    let s = Serve::start(&k, KEY);

    let mut ids = Vec::new();
    for i in 0..3 {
        let (code, v) = s.api(
            "POST",
            "/sandboxes",
            Some(&format!(
                r#"{{"templateID": "app", "timeout": 120, "metadata": {{"n": "{i}"}}}}"#
            )),
        );
        assert_eq!(code, 201, "{v}");
        assert!(
            v["envdAccessToken"].is_null(),
            "v1 without secure: no token: {v}"
        );
        assert_eq!(v["envdVersion"], "0.6.4");
        assert_eq!(v["domain"], format!("localhost:{}", s.port));
        ids.push(v["sandboxID"].as_str().unwrap().to_string());
    }

    // Pages of 2, newest first, then the rest.
    let (code, page1) = http(
        s.port,
        "GET",
        "/v2/sandboxes?limit=2",
        &[("X-API-Key", KEY)],
        None,
    )
    .unwrap();
    assert_eq!(code, 200);
    let page1: Vec<serde_json::Value> = serde_json::from_slice(&page1).unwrap();
    assert_eq!(page1.len(), 2);
    let next = {
        // The header is read through a second raw request with the headers kept.
        let out = std::process::Command::new("curl")
            .args(["-s", "-D", "-", "-o", "/dev/null", "-H"])
            .arg(format!("X-API-Key: {KEY}"))
            .arg(format!("{}/v2/sandboxes?limit=2", s.url()))
            .output();
        match out {
            Ok(o) if o.status.success() => {
                String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("x-next-token:")
                        .then(|| l.split_once(':').unwrap().1.trim().to_string())
                })
            }
            _ => None,
        }
    };
    if let Some(next) = next {
        let (code, page2) = s.api(
            "GET",
            &format!("/v2/sandboxes?limit=2&nextToken={next}"),
            None,
        );
        assert_eq!(code, 200);
        let page2 = page2.as_array().unwrap();
        assert_eq!(page2.len(), 1);
        let mut seen: Vec<String> = page1
            .iter()
            .chain(page2)
            .map(|v| v["sandboxID"].as_str().unwrap().to_string())
            .collect();
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(seen, want);
    } else {
        eprintln!("note: curl missing, pagination header not checked");
    }

    // v1 list by metadata.
    let (code, v) = s.api("GET", "/sandboxes?metadata=n%3D1", None);
    assert_eq!(code, 200);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["sandboxID"], ids[1].as_str());

    // Conflicts: resume a running one; pause twice.
    let a = &ids[0];
    assert_eq!(
        s.api("POST", &format!("/sandboxes/{a}/resume"), None).0,
        409
    );
    assert_eq!(s.api("POST", &format!("/sandboxes/{a}/pause"), None).0, 204);
    assert_eq!(s.api("POST", &format!("/sandboxes/{a}/pause"), None).0, 409);
    assert_eq!(s.api("POST", &format!("/sandboxes/{a}/fork"), None).0, 409);
    let (code, v) = s.api(
        "POST",
        &format!("/sandboxes/{a}/resume"),
        Some(r#"{"timeout": 60}"#),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["sandboxID"], a.as_str());
    // connect on a running sandbox: 200.
    let (code, _) = s.api(
        "POST",
        &format!("/v2/sandboxes/{a}/connect"),
        Some(r#"{"timeout": 30}"#),
    );
    assert_eq!(code, 200);
    // refreshes only extend.
    let (_, before) = s.api("GET", &format!("/sandboxes/{a}"), None);
    assert_eq!(
        s.api(
            "POST",
            &format!("/sandboxes/{a}/refreshes"),
            Some(r#"{"duration": 1}"#)
        )
        .0,
        204
    );
    let (_, after) = s.api("GET", &format!("/sandboxes/{a}"), None);
    assert_eq!(before["endAt"], after["endAt"]);

    // Templates: the kiln images.
    let (code, v) = s.api("GET", "/templates", None);
    assert_eq!(code, 200);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["templateID"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"app"), "{v}");

    for id in &ids {
        assert_eq!(s.api("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
    }
}

/// create_snapshot then create from it, and fork, through the Python SDK.
#[test]
fn python_sdk_snapshot_and_fork() {
    let Some(py) = e2b::python_or_skip() else {
        return;
    };
    let Some((_tmp, k)) = app_home() else { return };
    let _cleanup = KillAll(k.clone());
    let s = Serve::start(&k, KEY);
    let v = s.python(
        &py,
        &format!(
            r#"{PY}
sbx = Sandbox.create("app", timeout=120, metadata={{"origin": "yes"}})
sbx.files.write("/work/note", "from the origin")
snap = sbx.create_snapshot()
listed = [x.snapshot_id for x in Sandbox.list_snapshots().next_items()]
child = Sandbox.create(snap.snapshot_id, timeout=120)
cinfo = child.get_info()
forks = sbx.fork(count=2, timeout=60)
fids = [f.sandbox_id for f in forks]
finfo = [Sandbox.get_info(f).state.value for f in fids]
notes = [x.files.read("/work/note") for x in [child] + forks]
deleted = Sandbox.delete_snapshot(snap.snapshot_id)
for x in [child] + forks + [sbx]:
    x.kill()
print(json.dumps({{"snap": snap.snapshot_id, "listed": listed, "child_meta": cinfo.metadata,
  "child_template": cinfo.template_id, "forks": fids, "fork_states": finfo, "deleted": deleted, "notes": notes,
  "left": [i.sandbox_id for i in Sandbox.list().next_items()]}}))
"#
        ),
    );
    let snap = v["snap"].as_str().unwrap();
    assert!(
        v["listed"].as_array().unwrap().iter().any(|x| x == snap),
        "{v}"
    );
    assert_eq!(v["child_meta"]["origin"], "yes", "{v}");
    assert_eq!(v["child_template"], snap);
    assert_eq!(v["forks"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["fork_states"], serde_json::json!(["running", "running"]));
    assert_eq!(v["deleted"], true);
    assert_eq!(
        v["notes"],
        serde_json::json!(["from the origin", "from the origin", "from the origin"]),
        "{v}"
    );
    assert_eq!(v["left"], serde_json::json!([]));
}

/// The JS SDK: create, getInfo, list, kill.
#[test]
fn js_sdk_smoke() {
    let Some(modules) = e2b::js_modules() else {
        eprintln!("SKIP: E2B's JS SDK or node not installed (/opt/kiln-tools/e2b-js; scripts/install-deps)");
        return;
    };
    let Some((_tmp, k)) = e2b::sdk_home() else {
        return;
    };
    let _cleanup = KillAll(k.clone());
    let s = Serve::start(&k, KEY);
    let v = s.node(
        &modules,
        r#"import { Sandbox } from 'e2b'
const sbx = await Sandbox.create('sdk', { timeoutMs: 120000, metadata: { js: 'yes' } })
const info = await sbx.getInfo()
const run = await sbx.commands.run('echo $GREETING from js')
const page = await Sandbox.list({ query: { metadata: { js: 'yes' } } }).nextItems()
const killed = await sbx.kill()
const gone = await Sandbox.kill(sbx.sandboxId)
console.log(JSON.stringify({ id: sbx.sandboxId, infoId: info.sandboxId, state: info.state,
  template: info.templateId, out: run.stdout, listed: page.map(s => s.sandboxId), killed, gone }))
"#,
    );
    let id = v["id"].as_str().unwrap();
    assert_eq!(v["infoId"], id);
    assert_eq!(v["state"], "running");
    assert_eq!(v["template"], "sdk");
    assert_eq!(v["out"], "hello from js\n", "{v}");
    assert_eq!(v["listed"], serde_json::json!([id]));
    assert_eq!(v["gone"], false);
    assert_no_processes(id);
}

/// Concurrent create, run, kill cycles through the Python SDK (KILN_SERVE_LOAD of them at
/// once, default 50, as the issue asks), then nothing is left: no sandbox, no
/// token, no runsc process, no mount under the home.
#[test]
fn python_sdk_concurrent_cycles_leave_nothing() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, k, py) = (&t.s, &t.k, &t.py);
    let n: usize = std::env::var("KILN_SERVE_LOAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let v = s.python(
        py,
        &format!(
            r#"{PY}
from concurrent.futures import ThreadPoolExecutor
def cycle(i):
    sbx = Sandbox.create("sdk", timeout=300, metadata={{"i": str(i)}})
    out = sbx.commands.run(f"echo {{i}}").stdout.strip()
    sbx.kill()
    return sbx.sandbox_id, out
t = time.time()
with ThreadPoolExecutor(max_workers={n}) as ex:
    res = list(ex.map(cycle, range({n})))
print(json.dumps({{"ids": [r[0] for r in res], "outs": [r[1] for r in res], "secs": time.time() - t,
  "left": [i.sandbox_id for i in Sandbox.list().next_items()]}}))
"#
        ),
    );
    let outs: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(v["outs"], serde_json::json!(outs), "{v}");
    assert_eq!(v["left"], serde_json::json!([]));
    eprintln!(
        "{n} concurrent cycles in {:.1} s",
        v["secs"].as_f64().unwrap()
    );
    let ids: Vec<&str> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), n);
    for id in &ids {
        assert_no_processes(id);
        assert!(
            !k.home.join("sandboxes").join(id).exists(),
            "{id} left a directory"
        );
    }
    let tokens: Vec<_> = std::fs::read_dir(k.home.join("serve/tokens"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(tokens.is_empty(), "tokens left: {tokens:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let home = k.home.display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&home)),
        "mounts left under {home}"
    );
}

/// Metrics through the SDK: samples of a sandbox that burns CPU and writes 16 MiB to its
/// disk carry its CPU count and memory size, a busy CPU, memory in use and the written bytes;
/// `start`/`end` select a range; `GET /sandboxes/metrics` gives the latest sample of each id
/// asked; wrong ranges and too many ids are 400s.
#[test]
fn python_sdk_metrics() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, py) = (&t.s, &t.py);
    let v = s.python(
        py,
        &format!(
            r#"{PY}
import datetime
from e2b.api.client.api.sandboxes import get_sandboxes_metrics
from e2b.sandbox_sync.paginator import get_api_client
from e2b.connection_config import ConnectionConfig
sbx = Sandbox.create("sdk", timeout=120)
idle = Sandbox.create("sdk", timeout=120)
before = sbx.get_metrics()
sbx.commands.run("dd if=/dev/urandom of=/home/app/blob bs=1M count=16 && sync")
busy = sbx.commands.run("while :; do :; done", background=True, timeout=0)
t = time.time()
samples = []
while time.time() - t < 60:
    samples = sbx.get_metrics()
    if len(samples) >= 3 and max(m.cpu_used_pct for m in samples) > 20:
        break
    time.sleep(1)
busy.kill()
last = samples[-1].timestamp
later = sbx.get_metrics(start=last)
early = sbx.get_metrics(end=datetime.datetime.fromtimestamp(time.time() - 3600))
api = get_api_client(ConnectionConfig())
many = get_sandboxes_metrics.sync_detailed(client=api, sandbox_ids=[sbx.sandbox_id, idle.sandbox_id, "nosuchsandbox"])
print(json.dumps({{
  "id": sbx.sandbox_id, "idle": idle.sandbox_id, "before": len(before),
  "samples": [{{"t": m.timestamp.timestamp(), "cpus": m.cpu_count, "cpu": m.cpu_used_pct,
     "mem": m.mem_used, "mem_total": m.mem_total, "cache": m.mem_cache,
     "disk": m.disk_used, "disk_total": m.disk_total}} for m in samples],
  "later": [m.timestamp.timestamp() for m in later], "early": len(early),
  "many_status": many.status_code, "many": json.loads(many.content),
}}))
"#
        ),
    );
    let id = v["id"].as_str().unwrap();
    let samples = v["samples"].as_array().unwrap();
    assert!(samples.len() >= 3, "{v}");
    let (_, d) = s.api("GET", &format!("/sandboxes/{id}"), None);
    let mem_total = d["memoryMB"].as_u64().unwrap() << 20;
    let busiest = samples
        .iter()
        .map(|m| m["cpu"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(busiest > 20.0, "a busy loop shows: {v}");
    assert!(busiest <= 100.0, "{v}");
    let times: Vec<f64> = samples.iter().map(|m| m["t"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "in time order: {v}");
    for m in samples {
        assert_eq!(m["cpus"], d["cpuCount"], "{m}");
        assert_eq!(m["mem_total"].as_u64(), Some(mem_total), "{m}");
        assert!(m["mem"].as_u64().unwrap() > 1 << 20, "memory in use: {m}");
        assert!(m["disk_total"].as_u64().unwrap() >= 64 << 20, "{m}");
    }
    let written = samples.last().unwrap()["disk"].as_u64().unwrap();
    assert!(
        written >= 16 << 20,
        "the 16 MiB written are on its disk: {v}"
    );
    assert!(
        written < samples.last().unwrap()["disk_total"].as_u64().unwrap(),
        "{v}"
    );
    // A range from the last sample holds it (in its 5 s step) and nothing much older.
    let later = v["later"].as_array().unwrap();
    assert!(!later.is_empty() && later.len() < samples.len(), "{v}");
    let last = *times.last().unwrap();
    assert!(
        later.iter().all(|t| t.as_f64().unwrap() > last - 5.0),
        "{v}"
    );
    assert_eq!(v["early"], 0, "nothing before the sandbox existed: {v}");
    // Many at once: the latest of each sandbox that has samples, unknown ids left out.
    assert_eq!(v["many_status"], 200, "{v}");
    let many = v["many"]["sandboxes"].as_object().unwrap();
    assert!(many.contains_key(id), "{v}");
    assert!(!many.contains_key("nosuchsandbox"), "{v}");
    assert!(
        many[id]["timestampUnix"].as_u64().unwrap() as f64 >= last - 1.0,
        "{v}"
    );
    for field in [
        "cpuCount",
        "cpuUsedPct",
        "memUsed",
        "memTotal",
        "memCache",
        "diskUsed",
        "diskTotal",
        "timestamp",
    ] {
        assert!(!many[id][field].is_null(), "{field}: {v}");
    }
    // 400s: a range that ends before it starts, a negative time, too many ids, no ids.
    for path in [
        format!("/sandboxes/{id}/metrics?start=10&end=5"),
        format!("/sandboxes/{id}/metrics?start=-1"),
        format!(
            "/sandboxes/metrics?sandbox_ids={}",
            (0..101)
                .map(|i| format!("s{i}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        "/sandboxes/metrics".to_string(),
    ] {
        let (code, body) = s.api("GET", &path, None);
        assert_eq!(code, 400, "{path}: {body}");
    }
    let (code, _) = s.api("GET", "/sandboxes/nosuchsandbox/metrics", None);
    assert_eq!(code, 404);
}

/// `Template.exists`: image and snapshot names are aliases (`:default` too), others not;
/// the raw answer is E2B's `TemplateAliasResponse`.
#[test]
fn python_sdk_template_aliases() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, py) = (&t.s, &t.py);
    let v = s.python(
        py,
        &format!(
            r#"{PY}
from e2b import Template
sbx = Sandbox.create("sdk", timeout=120)
snap = sbx.create_snapshot(name="aliased-snap")
sbx.kill()
print(json.dumps({{n: Template.exists(n) for n in ["sdk", "sdk:default", "aliased-snap", "sdk:v2", "nope"]}}))
"#
        ),
    );
    assert_eq!(
        v,
        serde_json::json!({"sdk": true, "sdk:default": true, "aliased-snap": true,
            "sdk:v2": false, "nope": false})
    );
    let (code, body) = s.api("GET", "/templates/aliases/sdk", None);
    assert_eq!(
        (code, body),
        (
            200,
            serde_json::json!({"templateID": "sdk", "public": false})
        )
    );
    let (code, body) = s.api("GET", "/templates/aliases/nope", None);
    assert_eq!(code, 404);
    assert_eq!(body["message"], "template 'nope' not found");
    let (code, _) = s.api("GET", "/templates/aliases/bad%20name", None);
    assert_eq!(code, 400);
}

/// Auto-resume: a paused sandbox created with `auto_resume` wakes on requests to a port
/// (`get_host`), once for eight at the same moment, and on envd traffic; one created without
/// it answers 502 and stays paused.
#[test]
fn python_sdk_auto_resume() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, py) = (&t.s, &t.py);
    let v = s.python(
        py,
        &format!(
            r#"{PY}
import httpx, threading
port = {port}
out = {{}}
for name, lc in [("auto", {{"on_timeout": "pause", "auto_resume": True}}), ("manual", {{"on_timeout": "pause"}})]:
    sbx = Sandbox.create("sdk", timeout=120, lifecycle=lc)
    sbx.files.write("/work/www/index.html", name)
    sbx.commands.run("httpd -p 8080 -h /work/www", background=True)
    host = sbx.get_host(8080)
    for _ in range(50):
        if httpx.get(f"http://127.0.0.1:{{port}}/", headers={{"Host": host}}).status_code == 200:
            break
        time.sleep(0.2)
    info = sbx.get_info()
    sbx.pause()
    out[name] = {{"id": sbx.sandbox_id, "lifecycle": info.lifecycle,
                  "paused": Sandbox.get_info(sbx.sandbox_id).state.value}}
    results = []
    def get():
        r = httpx.get(f"http://127.0.0.1:{{port}}/", headers={{"Host": host}}, timeout=120)
        results.append((r.status_code, r.text))
    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    out[name]["results"] = sorted(set(results))
    out[name]["after"] = Sandbox.get_info(sbx.sandbox_id).state.value
    if name == "auto":
        # envd traffic wakes it too.
        sbx.pause()
        out[name]["cmd"] = sbx.commands.run("cat /work/www/index.html").stdout
        out[name]["after_cmd"] = Sandbox.get_info(sbx.sandbox_id).state.value
print(json.dumps(out))
"#,
            port = s.port
        ),
    );
    let auto = &v["auto"];
    assert_eq!(auto["paused"], "paused", "{v}");
    assert_eq!(auto["results"], serde_json::json!([[200, "auto"]]), "{v}");
    assert_eq!(auto["after"], "running", "{v}");
    assert_eq!(auto["cmd"], "auto", "{v}");
    assert_eq!(auto["after_cmd"], "running", "{v}");
    let id = auto["id"].as_str().unwrap();
    let wakes = s
        .log_text()
        .lines()
        .filter(|l| l.contains("auto-resumed sandbox") && l.contains(id))
        .count();
    assert_eq!(wakes, 2, "one wake for eight requests, one for the command");
    assert_eq!(
        auto["lifecycle"],
        serde_json::json!({"on_timeout": "pause", "auto_resume": true}),
        "{v}"
    );
    let manual = &v["manual"];
    let results = manual["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{v}");
    assert_eq!(results[0][0], 502, "{v}");
    assert_eq!(manual["after"], "paused", "{v}");
}

/// Signed file URLs with `E2B_SANDBOX_URL` set (the URL names no sandbox): downloads and
/// uploads reach the sandbox whose token signed them, without an access token; an expired
/// signature is envd's 401 `signature is already expired`, a changed path or operation
/// `invalid signature`.
#[test]
fn python_sdk_signed_urls() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, py) = (&t.s, &t.py);
    let v = s.python(
        py,
        &format!(
            r#"{PY}
import httpx
a = Sandbox.create("sdk", timeout=120)
b = Sandbox.create("sdk", timeout=120)
out = {{"url_names_no_sandbox": a.sandbox_id not in a.download_url("/home/app/f.txt")}}
for name, sbx in [("a", a), ("b", b)]:
    sbx.files.write("/home/app/f.txt", "content of " + name)
    r = httpx.get(sbx.download_url("/home/app/f.txt"))
    out[name] = [r.status_code, r.text]
up = a.upload_url("/home/app/up.txt")
r = httpx.post(up, files={{"file": ("up.txt", b"uploaded")}})
out["upload"] = [r.status_code, a.files.read("/home/app/up.txt")]
expiring = a.download_url("/home/app/f.txt", use_signature_expiration=1)
lasting = a.download_url("/home/app/f.txt", use_signature_expiration=600)
time.sleep(2.5)
def answer(r):
    try:
        return [r.status_code, r.json().get("message")]
    except Exception:
        return [r.status_code, r.text]
out["expired"] = answer(httpx.get(expiring))
out["lasting"] = answer(httpx.get(lasting))
out["other_path"] = answer(httpx.get(a.download_url("/home/app/f.txt").replace("f.txt", "up.txt")))
out["read_as_write"] = answer(httpx.post(a.download_url("/home/app/up.txt"), files={{"file": ("x", b"x")}}))
print(json.dumps(out))
"#
        ),
    );
    assert_eq!(v["url_names_no_sandbox"], true, "{v}");
    assert_eq!(v["a"], serde_json::json!([200, "content of a"]), "{v}");
    assert_eq!(v["b"], serde_json::json!([200, "content of b"]), "{v}");
    assert_eq!(v["upload"][1], "uploaded", "{v}");
    assert_eq!(
        v["expired"],
        serde_json::json!([401, "signature is already expired"]),
        "{v}"
    );
    assert_eq!(
        v["lasting"],
        serde_json::json!([200, "content of a"]),
        "{v}"
    );
    assert_eq!(
        v["other_path"],
        serde_json::json!([401, "invalid signature"]),
        "{v}"
    );
    assert_eq!(
        v["read_as_write"],
        serde_json::json!([401, "invalid signature"]),
        "{v}"
    );
}

/// Network options of the port proxy: `allow_public_traffic=False` asks the traffic token;
/// `mask_request_host` is the Host the program inside sees (`${PORT}` the port, the original
/// Host in `X-Forwarded-Host`); header names reach it, and its answer's come back, in the
/// case they were sent in; an invalid mask is a 400.
#[test]
fn python_sdk_network_options_reach_the_port() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, py) = (&t.s, &t.py);
    // A server inside that answers with the request head it got, byte for byte.
    let echo = r#"#!/bin/sh
head=""
while IFS= read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
  head="$head$line
"
done
printf 'HTTP/1.1 200 OK\r\nContent-Length: %s\r\nX-Reply-Case: Kept\r\nConnection: close\r\n\r\n%s' "$(printf '%s' "$head" | wc -c)" "$head"
"#;
    let v = s.python(
        py,
        &format!(
            r#"{PY}
import socket
port = {port}
sbx = Sandbox.create("sdk", timeout=120, network={{"allow_public_traffic": False, "mask_request_host": "masked.example:${{PORT}}"}})
sbx.files.write("/work/echo.sh", {echo:?})
sbx.commands.run("chmod 755 /work/echo.sh")
sbx.commands.run("while :; do nc -l -p 8080 -e /work/echo.sh; done", background=True, timeout=0)
host = sbx.get_host(8080)
def raw(extra):
    for _ in range(50):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(f"GET /x HTTP/1.1\r\nHost: {{host}}\r\n{{extra}}Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            data += b
        c.close()
        if b" 502 " not in data.split(b"\r\n")[0]:
            return data.decode()
        time.sleep(0.2)
    return data.decode()
out = {{
  "id": sbx.sandbox_id,
  "no_token": raw("X-MiXeD-Case: 1\r\n"),
  "token": raw(f"e2b-traffic-access-token: {{sbx.traffic_access_token}}\r\nX-MiXeD-Case: 1\r\n"),
  "mask": Sandbox.get_info(sbx.sandbox_id) is not None,
}}
print(json.dumps(out))
"#,
            port = s.port,
        ),
    );
    let id = v["id"].as_str().unwrap();
    let no_token = v["no_token"].as_str().unwrap();
    assert!(no_token.starts_with("HTTP/1.1 403"), "{no_token}");
    let got = v["token"].as_str().unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let (head, body) = got.split_once("\r\n\r\n").unwrap();
    assert!(
        head.lines().any(|l| l == "X-Reply-Case: Kept"),
        "the answer's header names keep their case: {head}"
    );
    assert!(
        body.lines().any(|l| l == "X-MiXeD-Case: 1"),
        "the request's header names keep their case: {body}"
    );
    assert!(
        body.lines()
            .any(|l| l.eq_ignore_ascii_case("host: masked.example:8080")),
        "{body}"
    );
    let forwarded = format!("x-forwarded-host: 8080-{id}.localhost:{}", s.port);
    assert!(
        body.lines().any(|l| l.eq_ignore_ascii_case(&forwarded)),
        "{body}"
    );
    assert!(
        !body
            .to_ascii_lowercase()
            .contains("e2b-traffic-access-token"),
        "the token stays with kiln: {body}"
    );
    let (_, d) = s.api("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(
        d["network"]["maskRequestHost"], "masked.example:${PORT}",
        "{d}"
    );
    assert_eq!(d["network"]["allowPublicTraffic"], false, "{d}");
    let (code, body) = s.api(
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID": "sdk", "network": {"maskRequestHost": "bad host"}}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["message"], "mask request host is not valid: bad host");
}
