//! `kiln serve` against callers who push its edges (issue 16), through E2B's Python SDK and raw
//! HTTP, real gVisor sandboxes:
//! - a fork that fails after its sandboxes started leaves nothing running; a fork is born
//!   with its deadline and its own access token, in its 0600 record;
//! - timeouts near the integer limits, negative or fractional are 400s, never a past deadline;
//!   the runtime saturates what the CLI gives it;
//! - `envVars` too large to start a command with are a 400; the largest accepted one works;
//! - `network.allowPublicTraffic: false` makes the sandbox's ports need its traffic token;
//! - under `KILN_NETWORK=none` (the tests' default) an API sandbox has no network device, and
//!   the detail and `kiln sandbox info` say so.
//!
//! Skips (with `SKIP:`) when gVisor or E2B's Python SDK is missing.

use kiln_tests::e2b::{self, http, Serve};
use kiln_tests::sandbox::{app_home, assert_no_processes, processes_mentioning, KillAll};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;

const KEY: &str = "kiln_test_safety_key_0123";

/// Python prelude: the SDK plus a JSON printer.
const PY: &str = "import json, time\nfrom e2b import Sandbox\n";

/// The on-disk record of sandbox `id`.
fn record(k: &kiln_tests::Kiln, id: &str) -> Value {
    let p = k.home.join("sandboxes").join(id).join("sandbox.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// An envd request for sandbox `id` through the data plane with `token` (if any): the status.
fn envd_status(s: &Serve, id: &str, path: &str, token: Option<&str>) -> u16 {
    let mut h = vec![("E2b-Sandbox-Id", id), ("E2b-Sandbox-Port", "49983")];
    if let Some(t) = token {
        h.push(("X-Access-Token", t));
    }
    http(s.port, "GET", path, &h, None).unwrap().0
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `endAt` of sandbox `id` (its detail), as Unix ms (parsed by Python's datetime: what an SDK
/// would make of it).
fn end_at_ms(s: &Serve, id: &str) -> u64 {
    let (code, v) = s.api("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(code, 200, "{v}");
    let end = v["endAt"].as_str().unwrap().to_string();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, datetime; print(int(datetime.datetime.fromisoformat(sys.argv[1].replace('Z', '+00:00')).timestamp() * 1000))",
            &end,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "endAt {end:?} does not parse");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Processes of sandboxes of this home other than `keep`'s.
fn other_sandbox_processes(k: &kiln_tests::Kiln, keep: &[&str]) -> Vec<u32> {
    let root = k.home.join("sandboxes").display().to_string();
    processes_mentioning(&root)
        .into_iter()
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).into_owned();
            !keep.iter().any(|id| cmd.contains(id))
        })
        .collect()
}

/// A secure parent holding a secret; a fork of 3 whose second sandbox fails once it runs
/// (`KILN_FAULT=create-started:3`: create #1 is the parent, #2-#4 the forks): 500, and no fork
/// is left, running or on disk. Then a fork that works: each fork's record is 0600 and holds
/// its deadline and its own token; its data plane refuses no token, a wrong one and the
/// parent's.
#[test]
fn a_failed_fork_leaves_nothing_and_forks_are_born_secured() {
    let Some(t) = e2b::sdk_serve(KEY, &[("KILN_FAULT", "create-started:3")]) else {
        return;
    };
    let (s, k, py) = (&t.s, &t.k, &t.py);

    let v = s.python(
        py,
        &format!(
            r#"{PY}
sbx = Sandbox.create("sdk", timeout=300)
sbx.files.write("/work/secret", "parent's secret")
print(json.dumps({{"id": sbx.sandbox_id, "token": sbx._envd_access_token}}))
"#
        ),
    );
    let parent = v["id"].as_str().unwrap().to_string();
    let parent_token = v["token"].as_str().unwrap().to_string();

    let (code, v) = s.api(
        "POST",
        &format!("/sandboxes/{parent}/fork"),
        Some(r#"{"count": 3, "timeout": 60}"#),
    );
    assert_eq!(code, 500, "the injected fault fails the fork: {v}");
    assert!(v["message"].as_str().unwrap().contains("KILN_FAULT"), "{v}");
    let (_, list) = s.api("GET", "/v2/sandboxes", None);
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [parent.as_str()], "only the parent is left");
    let dirs: Vec<String> = std::fs::read_dir(k.home.join("sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        dirs,
        std::slice::from_ref(&parent),
        "no fork's directory is left"
    );
    let t = std::time::Instant::now();
    loop {
        let left = other_sandbox_processes(k, &[&parent]);
        if left.is_empty() {
            break;
        }
        assert!(t.elapsed().as_secs() < 10, "fork processes left: {left:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !k.home.join("serve/tokens").exists(),
        "tokens live in the records only"
    );

    // A fork that works (the fault was one-shot).
    let before = now_ms();
    let (code, v) = s.api(
        "POST",
        &format!("/sandboxes/{parent}/fork"),
        Some(r#"{"count": 2, "timeout": 60}"#),
    );
    assert_eq!(code, 201, "{v}");
    let mut fork_tokens = Vec::new();
    for f in v.as_array().unwrap() {
        let id = f["sandbox"]["sandboxID"].as_str().unwrap();
        let token = f["sandbox"]["envdAccessToken"].as_str().unwrap();
        assert_ne!(token, parent_token, "a fork has a token of its own");
        let rec = record(k, id);
        assert_eq!(rec["access"]["secure"], true, "{rec}");
        assert_eq!(rec["access"]["envd_token"], token, "{rec}");
        let deadline = rec["deadline_ms"].as_u64().expect("a fork has a deadline");
        assert!(
            deadline >= before + 60_000 && deadline <= now_ms() + 60_000,
            "{rec}"
        );
        let p = k.home.join("sandboxes").join(id).join("sandbox.json");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "records hold tokens");
        let secret = "/files?path=/work/secret";
        assert_eq!(envd_status(s, id, secret, None), 401);
        assert_eq!(envd_status(s, id, secret, Some("ea_wrong")), 401);
        assert_eq!(envd_status(s, id, secret, Some(&parent_token)), 401);
        assert_eq!(envd_status(s, id, secret, Some(token)), 200);
        fork_tokens.push((id.to_string(), token.to_string()));
    }
    assert_eq!(
        envd_status(s, &parent, "/envs", Some(&fork_tokens[0].1)),
        401
    );
    for (id, _) in &fork_tokens {
        assert_eq!(s.api("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
        assert_no_processes(id);
    }
    assert_eq!(
        s.api("DELETE", &format!("/sandboxes/{parent}"), None).0,
        204
    );
}

/// E2B's bounds on every timeout field (integer, int32, >= 0; > 0 where a sandbox starts; at
/// most 24 hours) with 400s that leave the sandbox as it was; a CLI timeout of 2^64-1 seconds
/// saturates to the end of time instead of wrapping into the past.
#[test]
fn timeouts_near_the_integer_limits() {
    let Some((_tmp, k)) = app_home() else { return };
    let _cleanup = KillAll(k.clone());
    let s = Serve::start(&k, KEY);
    let bad = [
        "9223372036854775807",
        "18446744073709551615",
        "-1",
        "-9223372036854775808",
        "2147483648",
        "86401",
        "1.5",
        "60.0",
        "1e300",
        "\"60\"",
    ];

    for t in bad.iter().chain(&["0"]) {
        let (code, v) = s.api(
            "POST",
            "/v2/sandboxes",
            Some(&format!(r#"{{"templateID": "app", "timeout": {t}}}"#)),
        );
        assert_eq!(code, 400, "create with timeout {t}: {v}");
    }
    assert_eq!(s.api("GET", "/v2/sandboxes", None).1, json!([]));

    // The longest timeout E2B allows: a deadline a day ahead.
    let (code, v) = s.api(
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID": "app", "timeout": 86400}"#),
    );
    assert_eq!(code, 201, "{v}");
    let id = v["sandboxID"].as_str().unwrap().to_string();
    let end = end_at_ms(&s, &id);
    assert!(
        end > now_ms() + 86_000_000 && end <= now_ms() + 86_400_000,
        "{end}"
    );

    let before = end_at_ms(&s, &id);
    for t in bad {
        let body = format!(r#"{{"timeout": {t}}}"#);
        for path in [
            format!("/sandboxes/{id}/timeout"),
            format!("/v2/sandboxes/{id}/connect"),
            format!("/sandboxes/{id}/fork"),
        ] {
            let (code, v) = s.api("POST", &path, Some(&body));
            assert_eq!(code, 400, "{path} {body}: {v}");
        }
        let (code, v) = s.api(
            "POST",
            &format!("/sandboxes/{id}/refreshes"),
            Some(&format!(r#"{{"duration": {t}}}"#)),
        );
        assert_eq!(code, 400, "refresh {t}: {v}");
    }
    let (code, v) = s.api(
        "POST",
        &format!("/sandboxes/{id}/fork"),
        Some(r#"{"timeout": 0}"#),
    );
    assert_eq!(code, 400, "a fork needs a timeout > 0: {v}");
    assert_eq!(end_at_ms(&s, &id), before, "refusals change nothing");
    assert_eq!(
        s.api("GET", "/v2/sandboxes", None)
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A paused sandbox stays paused when the resume's timeout is refused; a good one resumes
    // it with that deadline.
    assert_eq!(
        s.api("POST", &format!("/sandboxes/{id}/pause"), None).0,
        204
    );
    for path in [
        format!("/sandboxes/{id}/resume"),
        format!("/v2/sandboxes/{id}/connect"),
    ] {
        let (code, v) = s.api("POST", &path, Some(r#"{"timeout": 18446744073709551615}"#));
        assert_eq!(code, 400, "{path}: {v}");
    }
    assert_eq!(
        s.api("GET", &format!("/sandboxes/{id}"), None).1["state"],
        "paused"
    );
    let (code, v) = s.api(
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(r#"{"timeout": 120}"#),
    );
    assert_eq!(code, 201, "{v}");
    let end = end_at_ms(&s, &id);
    assert!(
        end > now_ms() + 100_000 && end <= now_ms() + 120_000,
        "{end}"
    );

    // The CLI takes any u64: the runtime saturates, the API shows the end of time, and the
    // sandbox lives on.
    let out = k.run(["sandbox", "timeout", &id, "18446744073709551615"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(record(&k, &id)["deadline_ms"], u64::MAX, "saturated");
    let (_, d) = s.api("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(d["endAt"], "9999-12-31T23:59:59.999Z", "{d}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (code, d) = s.api("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!((code, d["state"].as_str()), (200, Some("running")), "{d}");
    let info = String::from_utf8_lossy(&k.ok(["sandbox", "info", &id])).into_owned();
    assert!(info.contains("timeout:"), "{info}");
    assert_eq!(s.api("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
    assert_no_processes(&id);
}

/// 10,000 `envVars` (about 1 MB) are refused at create; the largest accepted set reaches
/// every command, also with envs of the command's own; a command whose request cannot fit is
/// an invalid argument that says why; metadata is bounded too.
#[test]
fn env_vars_are_bounded_so_that_what_is_accepted_works() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, py) = (&t.s, &t.py);

    let huge: serde_json::Map<String, Value> = (0..10_000)
        .map(|i| (format!("VAR_{i:05}"), json!("x".repeat(100))))
        .collect();
    let body = json!({"templateID": "sdk", "envVars": huge}).to_string();
    assert!(body.len() > 1_000_000);
    let (code, v) = s.api("POST", "/v2/sandboxes", Some(&body));
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("envVars"), "{v}");
    let meta: serde_json::Map<String, Value> = (0..2_000)
        .map(|i| (format!("k{i}"), json!("m".repeat(50))))
        .collect();
    let (code, v) = s.api(
        "POST",
        "/v2/sandboxes",
        Some(&json!({"templateID": "sdk", "metadata": meta}).to_string()),
    );
    assert_eq!(code, 400, "{v}");
    for bad in [
        json!({"A=B": "1"}),
        json!({"": "1"}),
        json!({"A": "x\u{0}y"}),
    ] {
        let (code, v) = s.api(
            "POST",
            "/v2/sandboxes",
            Some(&json!({"templateID": "sdk", "envVars": bad}).to_string()),
        );
        assert_eq!(code, 400, "{bad}: {v}");
    }
    // One variable longer than execve takes.
    let (code, v) = s.api(
        "POST",
        "/v2/sandboxes",
        Some(&json!({"templateID": "sdk", "envVars": {"A": "a".repeat(131_070)}}).to_string()),
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(s.api("GET", "/v2/sandboxes", None).1, json!([]));

    // The largest set: 262,144 bytes of JSON (the limit) in variables of the largest size
    // execve takes, the second one sized to the byte.
    let entry = 131_072 - 2 - "A01".len(); // NAME=VALUE and its NUL: 32 pages
    let mut env = serde_json::Map::new();
    env.insert("A01".into(), json!("a".repeat(entry)));
    env.insert("A02".into(), json!(""));
    let last = 262_144 - Value::Object(env.clone()).to_string().len();
    assert!(last <= entry);
    env.insert("A02".into(), json!("b".repeat(last)));
    assert_eq!(Value::Object(env.clone()).to_string().len(), 262_144);
    let mut over = env.clone();
    over.insert("A02".into(), json!("b".repeat(last + 1)));
    let (code, v) = s.api(
        "POST",
        "/v2/sandboxes",
        Some(&json!({"templateID": "sdk", "envVars": over}).to_string()),
    );
    assert_eq!(code, 400, "one byte over: {v}");

    let env_file = t.tmp.path().join("env.json");
    std::fs::write(&env_file, Value::Object(env).to_string()).unwrap();
    let v = s.python(
        py,
        &format!(
            r#"{PY}
from e2b.exceptions import InvalidArgumentException
envs = json.load(open("{}"))
sbx = Sandbox.create("sdk", timeout=120, envs=envs)
r = sbx.commands.run('printf "%s %s" "${{#A01}}" "${{#A02}}"')
own = sbx.commands.run('printf "%s %s %s" "${{#A01}}" "$MINE" "$GREETING"', envs={{"MINE": "m" * 1000}})
try:
    sbx.commands.run("true", envs={{"Y%d" % i: "y" * 100 for i in range(8000)}})
    too_big = "ran"
except InvalidArgumentException as e:
    too_big = str(e)
after = sbx.commands.run("echo fine").stdout.strip()
sbx.kill()
print(json.dumps({{"lens": r.stdout, "own": own.stdout[:20], "own_len": len(own.stdout), "too_big": too_big, "after": after}}))
"#,
            env_file.display()
        ),
    );
    assert_eq!(v["lens"], format!("{entry} {last}"), "{v}");
    assert_eq!(
        v["own_len"],
        format!("{entry} ").len() + 1000 + " hello".len(),
        "{v}"
    );
    assert!(v["too_big"].as_str().unwrap().contains("at most"), "{v}");
    assert_eq!(v["after"], "fine");
}

/// `network.allowPublicTraffic: false`: the create response carries a traffic token; a
/// sandbox port answers 403 (E2B's proxy's body) without it or with a wrong one, and serves
/// with it; envd's port needs only the envd token; a sandbox without the field serves
/// anyone; a fork has a traffic token of its own.
#[test]
fn private_traffic_needs_the_traffic_token() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, py) = (&t.s, &t.py);
    let v = s.python(
        py,
        &format!(
            r#"{PY}
out = {{}}
for name, net in [("private", {{"allow_public_traffic": False}}), ("public", None)]:
    sbx = Sandbox.create("sdk", timeout=120, network=net)
    sbx.files.write("/work/www/index.html", name)
    sbx.commands.run("httpd -p 8080 -h /work/www", background=True)
    out[name] = {{"id": sbx.sandbox_id, "traffic": sbx.traffic_access_token, "envd": sbx._envd_access_token}}
time.sleep(0.5)
print(json.dumps(out))
"#
        ),
    );
    let private = v["private"]["id"].as_str().unwrap().to_string();
    let token = v["private"]["traffic"]
        .as_str()
        .expect("a traffic token")
        .to_string();
    assert!(token.starts_with("ta_"), "{v}");
    assert!(v["public"]["traffic"].is_null(), "{v}");
    let public = v["public"]["id"].as_str().unwrap().to_string();

    let get = |id: &str, port: u16, headers: &[(&str, &str)]| {
        let host = format!("{port}-{id}.localhost:{}", s.port);
        let mut h = vec![("Host", host.as_str())];
        h.extend_from_slice(headers);
        let (code, body) = http(s.port, "GET", "/", &h, None).unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    };
    let (code, body) = get(&private, 8080, &[]);
    assert_eq!(code, 403, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["code"], 403);
    assert_eq!(err["sandboxId"], private.as_str());
    assert!(
        err["message"].as_str().unwrap().contains("is missing"),
        "{err}"
    );
    let (code, body) = get(&private, 8080, &[("e2b-traffic-access-token", "ta_wrong")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("is invalid"), "{body}");
    let priv_envd = v["private"]["envd"].as_str().unwrap();
    let (code, _) = get(&private, 8080, &[("X-Access-Token", priv_envd)]);
    assert_eq!(code, 403, "the envd token is not the traffic token");
    let (code, body) = get(&private, 8080, &[("e2b-traffic-access-token", &token)]);
    assert_eq!((code, body.as_str()), (200, "private"));
    // envd's port is exempt: its own token is what counts.
    assert_eq!(envd_status(s, &private, "/envs", Some(priv_envd)), 200);
    assert_eq!(envd_status(s, &private, "/envs", None), 401);
    // A sandbox without the field: its port answers anyone.
    let (code, body) = get(&public, 8080, &[]);
    assert_eq!((code, body.as_str()), (200, "public"));

    // The detail says so; a fork is private too, with a token of its own.
    let (_, d) = s.api("GET", &format!("/sandboxes/{private}"), None);
    assert_eq!(d["network"]["allowPublicTraffic"], false, "{d}");
    let (_, d) = s.api("GET", &format!("/sandboxes/{public}"), None);
    assert_eq!(d["network"]["allowPublicTraffic"], true, "{d}");
    let (code, f) = s.api(
        "POST",
        &format!("/sandboxes/{private}/fork"),
        Some(r#"{"timeout": 60}"#),
    );
    assert_eq!(code, 201, "{f}");
    let fork = f[0]["sandbox"]["sandboxID"].as_str().unwrap().to_string();
    let fork_token = f[0]["sandbox"]["trafficAccessToken"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(fork_token, token);
    assert_eq!(
        get(&fork, 8080, &[("e2b-traffic-access-token", &token)]).0,
        403
    );
    let (code, body) = get(&fork, 8080, &[("e2b-traffic-access-token", &fork_token)]);
    assert_eq!(
        (code, body.as_str()),
        (200, "private"),
        "the fork's httpd runs on"
    );
    for id in [&private, &public, &fork] {
        assert_eq!(s.api("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
    }
}

/// Under `KILN_NETWORK=none` (what `Kiln::new` sets for every test) a sandbox created through
/// the API without asking anything of egress gets no network device: no namespace, no
/// interface but loopback; the detail and `kiln sandbox info` say so.
#[test]
fn kiln_network_none_holds_in_serve() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, k, py) = (&t.s, &t.k, &t.py);
    let v = s.python(
        py,
        &format!(
            r#"{PY}
sbx = Sandbox.create("sdk", timeout=120, network={{"allow_public_traffic": True}})
links = sbx.commands.run("cat /proc/net/dev").stdout
print(json.dumps({{"id": sbx.sandbox_id, "links": links}}))
"#
        ),
    );
    let id = v["id"].as_str().unwrap().to_string();
    let links: Vec<&str> = v["links"]
        .as_str()
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(links, ["lo"], "{v}");
    let rec = record(k, &id);
    assert!(
        rec.get("network").is_none() && rec.get("net").is_none(),
        "{rec}"
    );
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(!netns.contains(&id), "a namespace for {id}: {netns}");
    let (_, d) = s.api("GET", &format!("/sandboxes/{id}"), None);
    // E2B's fields say no traffic leaves (kiln's own "no device at all" is in `sandbox info`).
    assert_eq!(d["allowInternetAccess"], false, "{d}");
    assert_eq!(
        d["network"]["denyOut"],
        serde_json::json!(["0.0.0.0/0"]),
        "{d}"
    );
    assert!(d.get("networkDevice").is_none(), "{d}");
    let info = String::from_utf8_lossy(&k.ok(["sandbox", "info", &id])).into_owned();
    assert!(info.contains("network:  none (no network device"), "{info}");
    assert!(info.contains("access:   envd access token"), "{info}");
    assert_eq!(s.api("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
}

/// A daemon before this one kept envd tokens in `serve/tokens/<id>`: the first start moves
/// each into its sandbox's record (the sandbox stays secure with the same token) and drops
/// the files of sandboxes that are gone.
#[test]
fn tokens_of_an_older_daemon_move_into_the_records() {
    let Some((_tmp, k)) = app_home() else { return };
    let _cleanup = KillAll(k.clone());
    let mut s = Serve::start(&k, KEY);
    let (code, v) = s.api(
        "POST",
        "/v2/sandboxes",
        Some(r#"{"templateID": "app", "timeout": 120}"#),
    );
    assert_eq!(code, 201, "{v}");
    let id = v["sandboxID"].as_str().unwrap().to_string();
    let token = v["envdAccessToken"].as_str().unwrap().to_string();
    s.stop();
    // The old layout: no access in the record, the token beside it.
    let p = k.home.join("sandboxes").join(&id).join("sandbox.json");
    let mut rec = record(&k, &id);
    rec.as_object_mut().unwrap().remove("access");
    std::fs::write(&p, serde_json::to_vec(&rec).unwrap()).unwrap();
    let dir = k.home.join("serve/tokens");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&id), format!("{token}\n")).unwrap();
    std::fs::write(dir.join("0123456789abcdef"), "ea_gone").unwrap();
    s.restart();
    assert!(!dir.exists(), "the old token files are gone");
    assert_eq!(record(&k, &id)["access"]["envd_token"], token.as_str());
    assert_eq!(envd_status(&s, &id, "/envs", None), 401);
    assert_eq!(envd_status(&s, &id, "/envs", Some(&token)), 200);
    let (_, d) = s.api("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(d["envdAccessToken"], token.as_str());
    assert_eq!(s.api("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
}
