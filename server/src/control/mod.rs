//! The control plane: E2B's REST API (e2b-dev/infra `spec/openapi.yml`, and the `/v2` create
//! and connect routes E2B's SDKs 2.x call) over [`kiln_runtime::Sandboxes`].
//!
//! Every route but `/health` needs `X-API-Key`. Errors are E2B's `{code, message}` with the
//! spec's status codes: 400 for a malformed body or query, 401 for a missing or wrong key,
//! 404 for an unknown sandbox, template or snapshot, 409 for a sandbox in the wrong state
//! (pausing a paused one, resuming a running one) or busy with another operation.
//!
//! The runtime is blocking: every call goes through `spawn_blocking`. Operations on one
//! sandbox are serialized by the runtime's per-sandbox lock.

use crate::egress;
use crate::timefmt::{parse_rfc3339, rfc3339};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use kiln_runtime::{CreateSpec, OnTimeout, SandboxRecord, Source, State as SbxState, StateKind};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

mod aliases;
mod create;
mod lifecycle;
mod list;
mod metrics;
mod snapshots;
mod template_builds;
mod template_files;
mod template_tags;
mod templates;
pub mod types;

use aliases::*;
use create::*;
use lifecycle::*;
use list::*;
use metrics::*;
use snapshots::*;
use template_builds::*;
use template_files::*;
use template_tags::*;
use templates::*;

/// The envd version kiln reports for every sandbox: the newest protocol level the installed
/// SDKs gate features on (Python e2b 2.63: 0.6.4 for watching network mounts; 0.5.7 octet
/// stream uploads, 0.6.2 file metadata, 0.4.0 default user, 0.3.0 stdin, 0.5.2 close stdin).
/// Below 0.4.0 the SDK would send user `user` on every call; kiln's data plane serves the
/// 0.6.x protocol. Keep in step with what `envd` implements.
pub const ENVD_VERSION: &str = "0.6.4";

/// E2B's default sandbox time to live when a request names none (spec: `default: 15`).
const DEFAULT_TIMEOUT_SECS: u64 = 15;
/// The longest timeout a request may give: E2B refuses one above its team's
/// `max_length_hours` ("Timeout cannot be greater than N hours"); kiln has no teams and takes
/// the largest E2B plan's limit, 24 hours.
const MAX_TIMEOUT_HOURS: u64 = 24;
/// The most a refresh extends by (spec: `SandboxRefreshRequest.duration`, `maximum: 3600`).
const MAX_REFRESH_SECS: u64 = 3600;
/// The most `envVars` may hold at create, as the JSON the agent gets (keys, values, quoting):
/// a quarter of the agent's frame, so every command's request (these, the image's, the
/// command's own and its arguments) still fits in one frame.
pub const MAX_ENV_BYTES: usize = kiln_agent::protocol::MAX_FRAME / 4;
/// The most `metadata` may hold at create, as JSON: it is kept in the record and listed.
pub const MAX_METADATA_BYTES: usize = 64 << 10;
/// The longest `K=V` one variable may be: a program is started with execve, which takes no
/// string over 32 pages with its NUL (Linux's and gVisor's `MAX_ARG_STRLEN`).
const MAX_ENV_ENTRY: usize = 32 * 4096 - 1;
/// The most a list page holds (spec: `paginationLimit`).
const MAX_PAGE: usize = 100;
/// `endAt` of a sandbox without a deadline (created by the CLI without `--timeout`).
const NO_DEADLINE_MS: u64 = 253_402_300_799_000; // 9999-12-31T23:59:59Z

/// An E2B error response: `{code, message}` with `code` = the HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = types::Error {
            code: self.status.as_u16(),
            message: (&self.message[..]).into(),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<kiln_runtime::Error> for ApiError {
    fn from(e: kiln_runtime::Error) -> ApiError {
        use kiln_runtime::Error as E;
        if let E::WrongState { id, state, action } = &e {
            return ApiError::new(StatusCode::CONFLICT, wrong_state(id, *state, *action, &e));
        }
        let status = match &e {
            E::NotFound(_) | E::SnapshotNotFound(_) => StatusCode::NOT_FOUND,
            E::Image(kiln_imagebuilder::Error::ImageNotFound(_)) => StatusCode::NOT_FOUND,
            E::NameTaken(_) | E::Busy(_) | E::NoNetwork(_) => StatusCode::CONFLICT,
            E::Invalid(_) | E::RuntimeMismatch { .. } => StatusCode::BAD_REQUEST,
            E::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            E::AgentTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::warn!("request failed: {e}");
        }
        ApiError::new(status, e.to_string())
    }
}

/// A request in the wrong state, in E2B's words where its API has them (the runtime checks
/// the state under the sandbox's lock; this is the one place its answer becomes E2B's).
fn wrong_state(
    id: &str,
    state: kiln_runtime::StateKind,
    action: kiln_runtime::Action,
    e: &kiln_runtime::Error,
) -> String {
    use kiln_runtime::{Action, StateKind};
    match (action, state) {
        (Action::Pause, StateKind::Paused) => {
            format!("Error pausing sandbox - sandbox '{id}' is already paused")
        }
        (Action::Pause, _) => format!("Sandbox '{id}' cannot be paused while in '{state}' state"),
        (Action::Resume, StateKind::Running) => format!("Sandbox {id} is already running"),
        _ => e.to_string(),
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Runs a blocking runtime call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> kiln_runtime::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("panicked: {e}")))?
        .map_err(ApiError::from)
}

/// A JSON body: `{}` when empty and `optional`; 400 with serde's reason when malformed.
fn body<T: DeserializeOwned>(bytes: &Bytes, optional: bool) -> ApiResult<T> {
    let raw: &[u8] = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        if !optional {
            return Err(ApiError::bad_request("request body is required"));
        }
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(raw).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

/// The control plane's routes (the data-plane dispatch is layered on in [`crate::app`]).
pub fn router(state: Arc<AppState>) -> Router {
    let authed = Router::new()
        .route("/sandboxes", post(create_v1).get(list_v1))
        .route("/v2/sandboxes", post(create_v2).get(list_v2))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/network", put(update_network))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect_v1))
        .route("/v2/sandboxes/{id}/connect", post(connect_v2))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(create_snapshot))
        .route("/sandboxes/metrics", get(many_metrics))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/snapshots", get(list_snapshots))
        .route("/templates", get(list_templates))
        .route("/templates/{id}", delete(delete_template))
        .route("/templates/aliases/{alias}", get(get_alias))
        .route("/v3/templates", post(request_build))
        .route("/templates/tags", post(assign_tags).delete(delete_tags))
        .route("/templates/{id}/tags", get(get_tags))
        .route("/templates/{id}/files/{hash}", get(file_upload_link))
        .route("/v2/templates/{id}/builds/{build}", post(start_build))
        .route("/templates/{id}/builds/{build}/status", get(build_status))
        .route("/templates/{id}/builds/{build}/logs", get(build_logs))
        .fallback(not_found)
        // Cluster mode's forwarding and catalog writes, after the key check (layers run
        // outermost first: the last added).
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::cluster::control,
        ))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        // Authenticated by its signature (the SDK sends no API key to an upload URL).
        .route("/template-files/{hash}", put(upload_files))
        .merge(authed)
        .with_state(state)
}

/// 204; in cluster mode 503 once this node's place in the cluster is unconfirmed for longer
/// than its lease (cut off from etcd): a load balancer then stops sending it clients, whose
/// sandboxes the other nodes may be declaring lost or taking over.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.cluster.as_ref().and_then(|c| c.cut_off_for()) {
        None => StatusCode::NO_CONTENT.into_response(),
        Some(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {}", uri.path()))
}

/// `X-API-Key` must match, compared in constant time.
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // Cluster mode: another node checked the client's key and proved itself with the
    // cluster secret (crate::cluster::admit).
    if req
        .extensions()
        .get::<crate::cluster::Forwarded>()
        .is_some()
    {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get("x-api-key")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if given.is_empty() {
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing X-API-Key header").into_response();
    }
    if !crate::constant_time_eq(given, state.api_key.as_bytes()) {
        return ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key").into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_query_is_decoded_three_times() {
        // What the Python SDK sends for {"user": "a b", "k=": "v&"}: quote() each, urlencode()
        // the dict, and the query encodes the whole once more.
        let uri: Uri = "/v2/sandboxes?metadata=user%3Da%252520b%26k%25253D%3Dv%252526"
            .parse()
            .unwrap();
        let q = list_query(&uri).unwrap();
        assert_eq!(
            q.metadata,
            vec![("user".into(), "a b".into()), ("k=".into(), "v&".into())]
        );
    }

    #[test]
    fn list_query_checks_its_values() {
        let q = list_query(&"/?state=running,paused&limit=5&order=asc".parse().unwrap()).unwrap();
        assert_eq!(
            q.states.unwrap(),
            vec![types::SandboxState::Running, types::SandboxState::Paused]
        );
        assert_eq!(q.limit, 5);
        assert!(q.ascending);
        for bad in [
            "/?state=dead",
            "/?limit=0",
            "/?limit=101",
            "/?order=up",
            "/?startedAfter=x",
        ] {
            assert!(list_query(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn cursors_round_trip() {
        let t = hex::encode("123:abc");
        assert_eq!(parse_cursor(&t).unwrap(), (123, "abc".into()));
        assert!(parse_cursor("zz").is_err());
    }

    #[test]
    fn timeouts_follow_e2b_bounds() {
        let max = MAX_TIMEOUT_HOURS * 3600;
        let t = |v: Value| start_timeout(Some(&v)).map_err(|e| e.message);
        let later = |v: Value| later_timeout(Some(&v)).map_err(|e| e.message);
        assert_eq!(t(json!(60)), Ok(60));
        assert_eq!(t(Value::Null), Ok(DEFAULT_TIMEOUT_SECS));
        assert_eq!(start_timeout(None).unwrap(), DEFAULT_TIMEOUT_SECS);
        assert_eq!(t(json!(max)), Ok(max));
        assert!(t(json!(max + 1)).unwrap_err().contains("24 hours"));
        assert!(t(json!(0)).unwrap_err().contains("greater than 0"));
        assert_eq!(later(json!(0)), Ok(Some(0)));
        for bad in [
            json!(-1),
            json!(i64::MIN),
            json!(i32::MAX as u64 + 1),
            json!((1u64 << 63) - 1),
            json!(u64::MAX),
            json!(1.5),
            json!(60.0),
            json!(1e300),
            json!("60"),
            json!(true),
        ] {
            assert!(t(bad.clone()).is_err(), "{bad}");
            assert!(later(bad.clone()).is_err(), "{bad}");
        }
        let refresh = |v: Value| timeout_field("duration", Some(&v), false, MAX_REFRESH_SECS);
        assert_eq!(refresh(json!(3600)).unwrap(), Some(3600));
        assert!(refresh(json!(3601)).is_err());
    }

    #[test]
    fn env_and_metadata_sizes() {
        let big: BTreeMap<String, String> = (0..10_000)
            .map(|i| (format!("VAR_{i}"), "x".repeat(100)))
            .collect();
        assert!(check_size("envVars", &big, MAX_ENV_BYTES).is_err());
        let small: BTreeMap<String, String> = [("A".into(), "1".into())].into();
        assert!(check_size("envVars", &small, MAX_ENV_BYTES).is_ok());
        // Escapes count: 50,000 control characters are 300,000 bytes of JSON.
        let escaped: BTreeMap<String, String> = [("A".into(), "\u{1}".repeat(50_000))].into();
        assert!(check_size("envVars", &escaped, MAX_ENV_BYTES).is_err());
        let one =
            |k: &str, n: usize| -> BTreeMap<String, String> { [(k.into(), "v".repeat(n))].into() };
        assert!(check_env(&one("A", MAX_ENV_ENTRY - 2)).is_ok());
        assert!(check_env(&one("A", MAX_ENV_ENTRY - 1)).is_err());
        for bad in ["", "A=B", "A\0"] {
            assert!(check_env(&one(bad, 1)).is_err(), "{bad:?}");
        }
        let nul: BTreeMap<String, String> = [("A".into(), "x\0y".into())].into();
        assert!(check_env(&nul).is_err());
    }

    #[test]
    fn bodies() {
        let r: ApiResult<types::NewSandbox> = body(&Bytes::from_static(b"{\"templateID\":"), false);
        assert_eq!(r.err().unwrap().status, StatusCode::BAD_REQUEST);
        let r: ApiResult<types::NewSandbox> = body(&Bytes::new(), false);
        assert_eq!(r.err().unwrap().status, StatusCode::BAD_REQUEST);
        let r: types::TimeoutRequest = body(&Bytes::new(), true).unwrap();
        assert!(r.timeout.is_none());
        let r: ApiResult<types::NewSandbox> = body(&Bytes::from_static(b"{\"timeout\":5}"), false);
        assert_eq!(r.err().unwrap().status, StatusCode::BAD_REQUEST);
    }
}
