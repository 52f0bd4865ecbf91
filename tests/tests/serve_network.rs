//! E2B's network fields through `kiln serve`, driven by E2B's Python SDK: `allow_internet_access`
//! and `network` (`allow_out`/`deny_out`) on create, `update_network` on a running sandbox,
//! `allowInternetAccess`/`network` in the sandbox's detail, and E2B's 400s for what it refuses.
//!
//! kiln serve, the SDK and the sandboxes run inside the test's own "host" namespace, whose only
//! way out is the test's "internet" namespace with its HTTP and DNS servers (tests/src/net.rs).

use kiln_tests::e2b::{self, http, Serve};
use kiln_tests::net::{TestNet, HTTP_PORT, SERVER_A, SERVER_B};
use kiln_tests::sandbox::KillAll;

const KEY: &str = "kiln-test-network-key";

#[test]
fn python_sdk_network_policies_on_create_and_update() {
    if let Some(why) = kiln_tests::net::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let Some(py) = e2b::python_or_skip() else {
        return;
    };
    let Some((_tmp, k)) = e2b::sdk_home() else {
        return;
    };
    let net = TestNet::new();
    net.enter();
    let k = k.with_env(net.kiln_env());
    let _cleanup = KillAll(k.clone());
    let s = Serve::start(&k, KEY);

    let v = s.python(
        &py,
        &format!(
            r#"import json
from e2b import Sandbox
from e2b.exceptions import SandboxException
A, B = "{SERVER_A}", "{SERVER_B}"
# One bounded HTTP request from inside a sandbox: the server's body, or "-" when blocked.
def sbx_get(s, host):
    r = s.commands.run("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 2 " + host + " {HTTP_PORT} | tail -n 1; true")
    out = r.stdout.strip()
    return out if out.startswith("server-") else "-"
out = {{}}
s = Sandbox.create("sdk", timeout=120, allow_internet_access=False)
out["off"] = [sbx_get(s, A), sbx_get(s, B)]
s.update_network({{}})
out["updated_on"] = [sbx_get(s, A), sbx_get(s, B)]
s.update_network({{"deny_out": ["10.202.0.0/24"]}})
out["updated_deny_a"] = [sbx_get(s, A), sbx_get(s, B)]
out["id_off"] = s.sandbox_id
d = Sandbox.create("sdk", timeout=120, network={{"deny_out": ["10.203.0.0/24"]}})
out["deny_b"] = [sbx_get(d, A), sbx_get(d, B)]
out["id_deny"] = d.sandbox_id
w = Sandbox.create("sdk", timeout=120, network={{"allow_out": ["web.test"], "deny_out": ["0.0.0.0/0"]}})
out["allow_name"] = [sbx_get(w, "web.test"), sbx_get(w, B)]
out["id_allow"] = w.sandbox_id
refused = []
for net in [{{"deny_out": ["example.com"]}}, {{"allow_out": ["web.test"]}}, {{"allow_out": ["10.1.2.3:443"], "deny_out": ["0.0.0.0/0"]}}]:
    try:
        Sandbox.create("sdk", timeout=60, network=net)
        refused.append("created")
    except SandboxException as e:
        refused.append(str(e)[:3])
out["refused"] = refused
try:
    w.update_network({{"deny_out": ["not-a-cidr/99"]}})
    out["bad_update"] = "accepted"
except SandboxException as e:
    out["bad_update"] = str(e)[:3]
print(json.dumps(out))
"#
        ),
    );
    let pair = |a: &str, b: &str| serde_json::json!([a, b]);
    assert_eq!(v["off"], pair("-", "-"), "internet off: {v}");
    assert_eq!(v["updated_on"], pair("server-a", "server-b"), "{v}");
    assert_eq!(v["updated_deny_a"], pair("-", "server-b"), "{v}");
    assert_eq!(v["deny_b"], pair("server-a", "-"), "{v}");
    assert_eq!(v["allow_name"], pair("server-a", "-"), "web.test is A: {v}");
    assert_eq!(
        v["refused"],
        serde_json::json!(["400", "400", "400"]),
        "{v}"
    );
    assert_eq!(v["bad_update"], "400", "{v}");

    // The detail says what each sandbox's policy is.
    let detail = |id: &str| {
        let (code, body) = http(
            s.port,
            "GET",
            &format!("/sandboxes/{id}"),
            &[("X-API-Key", KEY)],
            None,
        )
        .unwrap();
        assert_eq!(code, 200);
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    let d = detail(v["id_off"].as_str().unwrap());
    assert_eq!(d["allowInternetAccess"], true, "{d}");
    assert_eq!(
        d["network"]["denyOut"],
        serde_json::json!(["10.202.0.0/24"]),
        "{d}"
    );
    let d = detail(v["id_allow"].as_str().unwrap());
    assert_eq!(
        d["network"]["allowOut"],
        serde_json::json!(["web.test"]),
        "{d}"
    );
    assert_eq!(
        d["network"]["denyOut"],
        serde_json::json!(["0.0.0.0/0"]),
        "{d}"
    );

    // Raw HTTP: an unknown sandbox is 404, a bad body 400.
    let put = |id: &str, body: &str| {
        http(
            s.port,
            "PUT",
            &format!("/sandboxes/{id}/network"),
            &[("X-API-Key", KEY), ("Content-Type", "application/json")],
            Some(body),
        )
        .unwrap()
        .0
    };
    assert_eq!(put("nosuchsandbox", "{}"), 404);
    assert_eq!(put(v["id_deny"].as_str().unwrap(), "{\"denyOut\": 3}"), 400);
    assert_eq!(
        put(
            v["id_deny"].as_str().unwrap(),
            "{\"rules\": {\"a.com\": []}}"
        ),
        400
    );
    drop(s);
}
