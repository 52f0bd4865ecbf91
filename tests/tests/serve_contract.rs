//! E2B's REST contract, checked against a live `kiln serve` by E2B's own generated API client
//! (the Python SDK's `e2b.api.client`, generated from E2B's `spec/openapi.yml`): every status
//! kiln answers must be declared for its operation, every body must parse as the declared
//! model, and no body may carry a field the spec does not declare. The requests
//! (`tests/py/e2b_contract.py`) cover every route kiln serves on good and bad input: unknown
//! ids, malformed bodies, wrong states, a missing or wrong API key.

use kiln_tests::e2b;
use std::path::Path;
use std::process::Command;

const KEY: &str = "kiln_contract_key_0123456789";

/// Routes kiln serves that the contract run must reach (method and spec path).
const ROUTES: &[&str] = &[
    "POST /sandboxes",
    "GET /sandboxes",
    "GET /v2/sandboxes",
    "GET /sandboxes/{sandbox_id}",
    "DELETE /sandboxes/{sandbox_id}",
    "POST /sandboxes/{sandbox_id}/timeout",
    "POST /sandboxes/{sandbox_id}/refreshes",
    "PUT /sandboxes/{sandbox_id}/network",
    "POST /sandboxes/{sandbox_id}/pause",
    "POST /sandboxes/{sandbox_id}/resume",
    "POST /sandboxes/{sandbox_id}/connect",
    "POST /v2/sandboxes/{sandbox_id}/connect",
    "POST /sandboxes/{sandbox_id}/fork",
    "POST /sandboxes/{sandbox_id}/snapshots",
    "GET /sandboxes/{sandbox_id}/metrics",
    "GET /sandboxes/metrics",
    "GET /snapshots",
    "GET /templates",
    "GET /templates/aliases/{alias}",
    "DELETE /templates/{template_id}",
    "POST /v3/templates",
    "GET /templates/{template_id}/files/{hash_}",
    "POST /v2/templates/{template_id}/builds/{build_id}",
    "GET /templates/{template_id}/builds/{build_id}/status",
    "GET /templates/{template_id}/builds/{build_id}/logs",
];

#[test]
fn every_answer_is_declared_by_e2bs_spec() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/e2b_contract.py");
    let out = Command::new(&t.py)
        .arg(&script)
        .arg("sdk")
        .envs(t.s.sdk_env())
        .output()
        .expect("running the contract check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "the contract check failed ({}):\n{stdout}\n{}\n--- kiln serve ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                t.s.log_text()
            )
        });
    let list = |k: &str| -> Vec<String> {
        report[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let checked = list("checked");
    let routes = list("routes");
    eprintln!(
        "{} answers checked over {} routes",
        checked.len(),
        routes.len()
    );
    let missing: Vec<&&str> = ROUTES
        .iter()
        .filter(|r| !routes.iter().any(|s| s == **r))
        .collect();
    assert!(
        missing.is_empty(),
        "routes the check never reached: {missing:?}"
    );
    let violations = list("violations");
    assert!(
        violations.is_empty(),
        "{} of {} answers break E2B's contract:\n{}",
        violations.len(),
        checked.len(),
        violations.join("\n")
    );
}
