//! envd's protocol (data plane), carried to the kiln agent.
//!
//! The SDK talks to envd, E2B's in-sandbox daemon; `kiln serve` answers for it and carries
//! each call to the kiln agent of the sandbox (one request per agent connection):
//! - connect-rpc `process.Process` ([`process`]) and `filesystem.Filesystem`
//!   ([`filesystem`]), JSON codec, unary and server streams ([`connect`], [`stream`]),
//!   the messages in [`types`];
//! - `GET`/`POST /files` and `POST /files/compose` ([`files`]), `GET /health` (204 while the
//!   sandbox runs, else E2B's proxy's 502), `GET /envs`, `GET /metrics` ([`metrics`]: the
//!   sandbox's usage now, from the daemon's sampler).
//!
//! envd's rules are kept: the user comes from `Authorization: Basic base64(user:)` (default:
//! the image's user), relative paths are under the user's home, the default working directory
//! is the image's, errors carry envd's codes and messages. A sandbox that is unknown or not
//! running (paused included) is answered as E2B's proxy does: HTTP 502 `{code, message}`
//! ("... was not found").
//!
//! Access comes first, from the sandbox's record (where the runtime put the tokens before the
//! sandbox started): envd's port needs `X-Access-Token` when the sandbox is secure (401), any
//! other port needs `e2b-traffic-access-token` when its traffic is private (403, as E2B's
//! proxy answers; envd's port is exempt, it has its own token). A record that asks for a
//! token but holds none refuses everyone.

pub mod agent;
pub mod connect;
pub mod files;
pub mod filesystem;
pub mod metrics;
pub mod process;
mod state;
pub mod stream;
pub mod types;

pub use state::EnvdState;

use crate::AppState;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The envd version `kiln serve` speaks: every SDK feature it serves is gated at or below it
/// (the Python SDK 2.63 gates up to 0.6.4: watch entry info, network mounts).
pub const ENVD_VERSION: &str = "0.6.4";

/// Serves one data-plane request for `port` of sandbox `sandbox_id`: envd's own port is
/// envd's API, any other port a proxy into the sandbox.
pub async fn handle(
    state: Arc<AppState>,
    sandbox_id: String,
    port: u16,
    mut req: Request,
) -> Response {
    let sandboxes = state.sandboxes.clone();
    let id = sandbox_id.clone();
    let rec = match tokio::task::spawn_blocking(move || sandboxes.record(&id)).await {
        Ok(Ok(rec)) => rec,
        Ok(Err(e)) => return agent::from_runtime(&sandbox_id, e).unary(),
        Err(e) => return agent::json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    // A signed file URL needs no access token (crate::signed).
    let signed = match port {
        crate::ENVD_PORT => crate::signed::verdict(&rec, req.method(), req.uri(), req.headers()),
        _ => None,
    };
    match signed {
        Some(Err(refused)) => return refused,
        Some(Ok(())) => {}
        None => {
            if let Some(refused) = refusal(&rec, port, req.uri().path(), req.headers()) {
                return refused;
            }
        }
    }
    // A paused sandbox that asked for auto-resume wakes on any request (crate::wake).
    let rec = match crate::wake::auto_resume(&state, rec).await {
        Ok(rec) => rec,
        Err(e) => return agent::from_runtime(&sandbox_id, e).unary(),
    };
    // From here on the sandbox is the one whose access was checked (a name resolves once).
    let sandbox_id = rec.id.clone();
    if port != crate::ENVD_PORT {
        // The token is for kiln, not for the program behind the port.
        req.headers_mut().remove(TRAFFIC_TOKEN_HEADER);
        let mask = rec.access.mask_request_host;
        return crate::proxy::handle(state, sandbox_id, port, mask, req).await;
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/health") => health(state, rec).await,
        (&Method::GET, "/envs") => envs(state, sandbox_id).await,
        (&Method::GET, "/metrics") => metrics::get(state, sandbox_id).await,
        (&Method::GET, "/files") => {
            files::download(state, sandbox_id, files::query(&parts.uri)).await
        }
        (&Method::POST, "/files/compose") => files::compose(state, sandbox_id, body).await,
        (&Method::POST, "/files") => {
            files::upload(
                state,
                sandbox_id,
                files::query(&parts.uri),
                &parts.headers,
                body,
            )
            .await
        }
        (&Method::POST, p) if p.starts_with("/process.Process/") => {
            let m = &p["/process.Process/".len()..];
            process::rpc(state, sandbox_id, m, &parts.headers, body).await
        }
        (&Method::POST, p) if p.starts_with("/filesystem.Filesystem/") => {
            let m = &p["/filesystem.Filesystem/".len()..];
            filesystem::rpc(state, sandbox_id, m, &parts.headers, body).await
        }
        (_, p)
            if p.starts_with("/process.Process/") || p.starts_with("/filesystem.Filesystem/") =>
        {
            (StatusCode::METHOD_NOT_ALLOWED, [("allow", "POST")]).into_response()
        }
        _ => agent::json_error(StatusCode::NOT_FOUND, &format!("no route {path}")),
    }
}

/// How long `/health` waits for the agent's answer.
const HEALTH_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// `GET /health`: 204 while the sandbox runs and its agent answers. Otherwise what E2B's
/// proxy answers for a sandbox it cannot reach (the SDK's `is_running()` is false on a 502,
/// and a request cut off is told apart by it): 502 "... was not found" when the sandbox is
/// paused, being paused or killed, or gone; 502 "... port is not open" when it runs but its
/// agent does not answer.
async fn health(state: Arc<AppState>, rec: kiln_runtime::SandboxRecord) -> Response {
    use kiln_runtime::OpKind;
    let op = rec.op.as_ref().map(|o| o.kind);
    if let Some(OpKind::Kill | OpKind::Pause) = op {
        let doing = if op == Some(OpKind::Kill) {
            "being killed"
        } else {
            "being paused"
        };
        return agent::not_running(&rec.id, doing).plain().expect("plain");
    }
    // A live snapshot holds the agent for a moment: the sandbox runs on.
    if rec.state == kiln_runtime::State::Running
        && matches!(op, Some(OpKind::Snapshot | OpKind::Fork))
    {
        return StatusCode::NO_CONTENT.into_response();
    }
    let sandboxes = state.sandboxes.clone();
    let id = rec.id.clone();
    let r = tokio::task::spawn_blocking(move || {
        // The runtime looks at reality when the record alone cannot say (a runtime that died,
        // a timeout that expired).
        let (_, mut s) = sandboxes
            .connect(&id)
            .map_err(|e| agent::from_runtime(&id, e))?;
        let _ = s.set_read_timeout(Some(HEALTH_WAIT));
        let _ = s.set_write_timeout(Some(HEALTH_WAIT));
        kiln_agent::client::health(&mut s).map_err(|e| agent::EnvdError::Sandbox {
            status: StatusCode::BAD_GATEWAY,
            message: format!("The sandbox is running but port is not open ({e})"),
        })
    })
    .await;
    match r {
        Ok(Ok(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => e.unary(),
        Err(e) => agent::json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `GET /envs`: the sandbox's environment variables (those it was created with).
async fn envs(state: Arc<AppState>, id: String) -> Response {
    let sandboxes = state.sandboxes.clone();
    let r = tokio::task::spawn_blocking(move || {
        sandboxes.get(&id).map_err(|e| agent::from_runtime(&id, e))
    })
    .await;
    match r {
        Ok(Ok(rec)) => (
            [
                (axum::http::header::CONTENT_TYPE, "application/json"),
                (axum::http::header::CACHE_CONTROL, "no-store"),
            ],
            serde_json::to_string(&rec.env).unwrap_or_else(|_| "{}".into()),
        )
            .into_response(),
        Ok(Err(e)) => e.unary(),
        Err(e) => agent::json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// E2B's header for the traffic access token (its orchestrator's proxy).
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Why a request for `path` on `port` may not reach sandbox `rec`, as the answer; None when
/// it may. envd's `/health` needs no token (envd.yaml gives it no security).
fn refusal(
    rec: &kiln_runtime::SandboxRecord,
    port: u16,
    path: &str,
    headers: &axum::http::HeaderMap,
) -> Option<Response> {
    let access = &rec.access;
    let given = |h: &str| headers.get(h).map(|v| v.as_bytes());
    let matches = |given: &[u8], want: &Option<String>| {
        want.as_ref()
            .is_some_and(|t| crate::constant_time_eq(given, t.as_bytes()))
    };
    if port == crate::ENVD_PORT {
        if access.secure
            && path != "/health"
            && !matches(
                given("x-access-token").unwrap_or_default(),
                &access.envd_token,
            )
        {
            return Some(agent::json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized access, please provide a valid access token",
            ));
        }
        return None;
    }
    if !access.private_traffic {
        return None;
    }
    // E2B's proxy's messages.
    let message = match given(TRAFFIC_TOKEN_HEADER) {
        None => format!(
            "Sandbox is secured with traffic access token. Token header \
             '{TRAFFIC_TOKEN_HEADER}' is missing"
        ),
        Some(t) if !matches(t, &access.traffic_token) => format!(
            "Sandbox is secured with traffic access token. Provided token in header \
             '{TRAFFIC_TOKEN_HEADER}' is invalid"
        ),
        Some(_) => return None,
    };
    let body = serde_json::json!({"sandboxId": rec.id, "message": message, "code": 403});
    Some(
        (
            StatusCode::FORBIDDEN,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn rec(access: kiln_runtime::Access) -> kiln_runtime::SandboxRecord {
        record("abc", "running", access)
    }

    /// A record of sandbox `id` in `state` (one without data: running, stopped...).
    pub(super) fn record(
        id: &str,
        state: &str,
        access: kiln_runtime::Access,
    ) -> kiln_runtime::SandboxRecord {
        let mut v = serde_json::json!({
            "schema": 1, "id": id, "name": null, "image": "00".repeat(32), "source": "t",
            "snapshot": null, "runtime": "gvisor", "cpus": 1, "memory_mib": 64, "disk_mib": 0,
            "env": {}, "metadata": {}, "state": state, "created_ms": 0,
            "timeout_secs": null, "deadline_ms": null, "on_timeout": "kill", "agent": null,
            "generation": 0, "defaults": {"env": [], "cwd": null, "user": null, "cmd": []},
        });
        v["access"] = serde_json::to_value(access).unwrap();
        serde_json::from_value(v).unwrap()
    }

    fn status(r: &kiln_runtime::SandboxRecord, port: u16, headers: &[(&str, &str)]) -> u16 {
        status_of(r, port, "/files", headers)
    }

    fn status_of(
        r: &kiln_runtime::SandboxRecord,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
    ) -> u16 {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        refusal(r, port, path, &h).map_or(200, |resp| resp.status().as_u16())
    }

    #[test]
    fn access_is_checked_from_the_record_and_fails_closed() {
        let envd = crate::ENVD_PORT;
        let open = rec(kiln_runtime::Access::default());
        assert_eq!(status(&open, envd, &[]), 200);
        assert_eq!(status(&open, 8080, &[]), 200);

        let a = kiln_runtime::Access::new(true, true);
        let (et, tt) = (
            a.envd_token.clone().unwrap(),
            a.traffic_token.clone().unwrap(),
        );
        let r = rec(a);
        assert_eq!(status(&r, envd, &[]), 401);
        assert_eq!(status(&r, envd, &[("x-access-token", &tt)]), 401);
        assert_eq!(status(&r, envd, &[("x-access-token", &et)]), 200);
        assert_eq!(
            status_of(&r, envd, "/health", &[]),
            200,
            "envd's health is open"
        );
        assert_eq!(status_of(&r, 8080, "/health", &[]), 403, "only envd's");
        assert_eq!(status(&r, 8080, &[]), 403);
        assert_eq!(status(&r, 8080, &[("x-access-token", &et)]), 403);
        assert_eq!(status(&r, 8080, &[(TRAFFIC_TOKEN_HEADER, &tt)]), 200);

        // Flags without tokens (a damaged record): nobody gets in, not even with no token.
        let sealed = rec(kiln_runtime::Access {
            secure: true,
            private_traffic: true,
            ..Default::default()
        });
        assert_eq!(status(&sealed, envd, &[]), 401);
        assert_eq!(status(&sealed, envd, &[("x-access-token", "")]), 401);
        assert_eq!(status(&sealed, 8080, &[(TRAFFIC_TOKEN_HEADER, "")]), 403);
    }
}
