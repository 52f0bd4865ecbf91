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

use crate::egress::{self, NetworkConfig};
use crate::timefmt::{parse_rfc3339, rfc3339};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use kiln_runtime::{CreateSpec, OnTimeout, SandboxRecord, Source, State as SbxState};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

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
        let body = json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

impl From<kiln_runtime::Error> for ApiError {
    fn from(e: kiln_runtime::Error) -> ApiError {
        use kiln_runtime::Error as E;
        let status = match &e {
            E::NotFound(_) | E::SnapshotNotFound(_) => StatusCode::NOT_FOUND,
            // A record that vanished while it was read: the sandbox was being removed.
            E::Io { err, path, .. }
                if err.kind() == std::io::ErrorKind::NotFound
                    && path.file_name().is_some_and(|n| n == "sandbox.json") =>
            {
                StatusCode::NOT_FOUND
            }
            E::Image(kiln_imagebuilder::Error::ImageNotFound(_)) => StatusCode::NOT_FOUND,
            E::NameTaken(_) | E::WrongState { .. } | E::Busy(_) => StatusCode::CONFLICT,
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

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Runs a blocking runtime call off the async threads.
async fn blocking<T: Send + 'static>(
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
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/snapshots", get(list_snapshots))
        .route("/templates", get(list_templates))
        .route("/templates/{id}", delete(delete_template))
        .fallback(not_found)
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(authed)
        .with_state(state)
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {}", uri.path()))
}

/// `X-API-Key` must match, compared in constant time.
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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

// ---- create ----

/// A timeout field of a request (create, fork, resume, connect, set_timeout, refresh): JSON
/// `null` or absent is `None`; E2B's spec types them `integer, format: int32, minimum: 0`
/// (refresh's `duration` also `maximum: 3600`), and its handlers refuse 0 where a sandbox
/// starts (create, fork, resume) and more than the plan's hours everywhere. kiln follows
/// that with 400s, so no request can ask for a deadline that overflows.
fn timeout_field(
    name: &str,
    v: Option<&Value>,
    positive: bool,
    max_secs: u64,
) -> ApiResult<Option<u64>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let n = v
        .as_i64()
        .map(i128::from)
        .or(v.as_u64().map(i128::from))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name} must be an integer number of seconds, not {v}"
            ))
        })?;
    let n = u64::try_from(n)
        .ok()
        .filter(|n| *n <= i32::MAX as u64)
        .ok_or_else(|| {
            ApiError::bad_request(format!("{name} must be 0..={} seconds, not {n}", i32::MAX))
        })?;
    if positive && n == 0 {
        return Err(ApiError::bad_request(format!(
            "{name} must be greater than 0"
        )));
    }
    if n > max_secs {
        return Err(ApiError::bad_request(
            if max_secs.is_multiple_of(3600) && max_secs > 3600 {
                format!("{name} cannot be greater than {} hours", max_secs / 3600)
            } else {
                format!("{name} must be at most {max_secs}")
            },
        ));
    }
    Ok(Some(n))
}

/// The timeout of a request that starts a sandbox (create, fork, resume): E2B's default when
/// absent, else 1 s ..= [`MAX_TIMEOUT_HOURS`].
fn start_timeout(v: Option<&Value>) -> ApiResult<u64> {
    Ok(
        timeout_field("timeout", v, true, MAX_TIMEOUT_HOURS * 3600)?
            .unwrap_or(DEFAULT_TIMEOUT_SECS),
    )
}

/// The timeout of a request that sets one from now (set_timeout, connect): 0 ..=
/// [`MAX_TIMEOUT_HOURS`].
fn later_timeout(v: Option<&Value>) -> ApiResult<Option<u64>> {
    timeout_field("timeout", v, false, MAX_TIMEOUT_HOURS * 3600)
}

/// `map` as the JSON the agent or the record gets, at most `max` bytes of it.
fn check_size(name: &str, map: &BTreeMap<String, String>, max: usize) -> ApiResult<()> {
    let n = serde_json::to_vec(map)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if n > max {
        return Err(ApiError::bad_request(format!(
            "{name} takes {n} bytes (as JSON, {} entries); at most {max} are accepted",
            map.len()
        )));
    }
    Ok(())
}

/// `envVars` that every command of the sandbox can be started with: bounded in total
/// ([`MAX_ENV_BYTES`]) and each ([`MAX_ENV_ENTRY`]), names without `=` or NUL, values
/// without NUL.
fn check_env(env: &BTreeMap<String, String>) -> ApiResult<()> {
    check_size("envVars", env, MAX_ENV_BYTES)?;
    for (k, v) in env {
        let name: String = k.chars().take(40).collect();
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "envVars: {name:?}: a name must be non-empty without '=' or NUL, a value \
                 without NUL"
            )));
        }
        if k.len() + 1 + v.len() > MAX_ENV_ENTRY {
            return Err(ApiError::bad_request(format!(
                "envVars: {name:?} takes {} bytes as NAME=VALUE; a program can be started \
                 with at most {MAX_ENV_ENTRY}",
                k.len() + 1 + v.len()
            )));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<Value>,
    auto_pause: Option<bool>,
    #[allow(dead_code)]
    auto_pause_memory: Option<bool>,
    secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<NetworkConfig>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
}

/// `POST /sandboxes`: secured (an envd access token) only with `secure: true`.
async fn create_v1(state: State<Arc<AppState>>, bytes: Bytes) -> ApiResult<Response> {
    create(state, bytes, false).await
}

/// `POST /v2/sandboxes` (the SDKs 2.x): secured unless `secure: false`; the SDK no longer
/// sends the field and always passes the token it gets back.
async fn create_v2(state: State<Arc<AppState>>, bytes: Bytes) -> ApiResult<Response> {
    create(state, bytes, true).await
}

async fn create(
    State(state): State<Arc<AppState>>,
    bytes: Bytes,
    secure_default: bool,
) -> ApiResult<Response> {
    let req: NewSandbox = body(&bytes, false)?;
    let template = req.template_id.trim().to_string();
    if template.is_empty() {
        return Err(ApiError::bad_request("templateID is empty"));
    }
    let mut spec = CreateSpec::new(Source::Image(template.clone()));
    // Nothing asked of egress: the host's default (kiln_runtime::default_network, which
    // KILN_NETWORK=none makes "no network device").
    spec.network = egress::create_policy(req.allow_internet_access, req.network.as_ref())
        .map_err(ApiError::bad_request)?;
    spec.private_traffic = req.network.as_ref().is_some_and(|n| !n.public_traffic());
    spec.timeout_secs = Some(start_timeout(req.timeout.as_ref())?);
    if req.auto_pause == Some(true) {
        spec.on_timeout = OnTimeout::Pause;
    }
    spec.metadata = req.metadata.unwrap_or_default();
    spec.env = req.env_vars.unwrap_or_default();
    check_env(&spec.env)?;
    check_size("metadata", &spec.metadata, MAX_METADATA_BYTES)?;
    spec.secure = req.secure.unwrap_or(secure_default);
    let sb = state.sandboxes.clone();
    let rec = blocking(move || {
        let mut spec = spec;
        // A template is an image name or id, else a sandbox snapshot name or id.
        match sb.create(spec.clone()) {
            Err(kiln_runtime::Error::Image(kiln_imagebuilder::Error::ImageNotFound(_))) => {
                spec.source = Source::Snapshot(strip_tag(&template).to_string());
                sb.create(spec).map_err(|e| match e {
                    kiln_runtime::Error::SnapshotNotFound(_) => kiln_runtime::Error::Image(
                        kiln_imagebuilder::Error::ImageNotFound(format!(
                            "{template} (no image or sandbox snapshot of that name; see \
                             `kiln image ls`, GET /templates, GET /snapshots)"
                        )),
                    ),
                    e => e,
                })
            }
            r => r,
        }
    })
    .await?;
    tracing::info!(id = %rec.id, template = %rec.source, "created sandbox");
    Ok((StatusCode::CREATED, Json(sandbox_json(&state, &rec))).into_response())
}

/// `name:tag` as E2B spells template references; kiln snapshot names carry no tag.
fn strip_tag(t: &str) -> &str {
    t.strip_suffix(":default").unwrap_or(t)
}

/// E2B's `Sandbox` (create, connect, resume, fork).
fn sandbox_json(state: &AppState, rec: &SandboxRecord) -> Value {
    let mut v = json!({
        "templateID": rec.source,
        "sandboxID": rec.id,
        "clientID": "kiln",
        "envdVersion": ENVD_VERSION,
        "trafficAccessToken": rec.access.traffic_token,
        "domain": state.domain,
    });
    if let Some(alias) = alias(rec) {
        v["alias"] = json!(alias);
    }
    if let Some(t) = &rec.access.envd_token {
        v["envdAccessToken"] = json!(t);
    }
    v
}

fn alias(rec: &SandboxRecord) -> Option<&str> {
    rec.name.as_deref()
}

/// E2B's state of a sandbox: running or paused; `None` for one that failed or stopped (to
/// the API it is gone).
fn e2b_state(rec: &SandboxRecord) -> Option<&'static str> {
    match rec.state {
        SbxState::Starting | SbxState::Running => Some("running"),
        SbxState::Paused { .. } => Some("paused"),
        SbxState::Stopped | SbxState::Failed { .. } => None,
    }
}

/// E2B's `ListedSandbox`.
fn listed_json(rec: &SandboxRecord) -> Value {
    json!({
        "templateID": rec.source,
        "sandboxID": rec.id,
        "clientID": "kiln",
        "startedAt": rfc3339(rec.created_ms),
        "endAt": rfc3339(rec.deadline_ms.unwrap_or(NO_DEADLINE_MS)),
        "cpuCount": rec.cpus,
        "memoryMB": rec.memory_mib,
        "diskSizeMB": rec.disk_mib,
        "metadata": rec.metadata,
        "state": e2b_state(rec).unwrap_or("running"),
        "envdVersion": ENVD_VERSION,
    })
}

/// E2B's `SandboxDetail`.
fn detail_json(state: &AppState, rec: &SandboxRecord) -> Value {
    let mut v = listed_json(rec);
    v["domain"] = json!(state.domain);
    let (internet, mut network) = egress::detail_fields(rec.network.as_ref());
    v["allowInternetAccess"] = internet;
    network["allowPublicTraffic"] = json!(!rec.access.private_traffic);
    v["network"] = network;
    // kiln's own: whether the sandbox has a network device at all (KILN_NETWORK=none, or a
    // snapshot without one: loopback only), which E2B's fields cannot say.
    v["networkDevice"] = json!(rec.network.is_some());
    v["lifecycle"] = json!({
        "autoResume": false,
        "onTimeout": match rec.on_timeout { OnTimeout::Kill => "kill", OnTimeout::Pause => "pause" },
    });
    if let Some(t) = &rec.access.envd_token {
        v["envdAccessToken"] = json!(t);
    }
    v
}

// ---- get, list ----

/// A sandbox as E2B sees it: 404 when unknown, failed or stopped.
async fn lookup(state: &AppState, id: &str) -> ApiResult<SandboxRecord> {
    let sb = state.sandboxes.clone();
    let id2 = id.to_string();
    let rec = blocking(move || sb.get(&id2)).await?;
    match &rec.state {
        SbxState::Failed { cause } => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} failed: {cause}"),
        )),
        SbxState::Stopped => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} has stopped"),
        )),
        _ => Ok(rec),
    }
}

async fn get_sandbox(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let rec = lookup(&state, &id).await?;
    Ok(Json(detail_json(&state, &rec)))
}

/// The query's pairs, percent-decoded once.
fn query_pairs(uri: &Uri) -> ApiResult<Vec<(String, String)>> {
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

/// The `metadata` parameter (already decoded once as a query value) is itself a query string
/// `k1=v1&k2=v2` whose keys and values are URL-encoded once more (the SDKs encode each with
/// `quote`/`encodeURIComponent` first): the pairs, fully decoded.
fn parse_metadata(s: &str) -> ApiResult<Vec<(String, String)>> {
    let bad = || ApiError::bad_request(format!("invalid metadata query {s:?}"));
    let uri: Uri = format!("/?{s}").parse().map_err(|_| bad())?;
    query_pairs(&uri)?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                percent_decode(&k).ok_or_else(bad)?,
                percent_decode(&v).ok_or_else(bad)?,
            ))
        })
        .collect()
}

/// `%XX` escapes decoded (`+` stays a plus); None for a bad escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

struct ListQuery {
    metadata: Vec<(String, String)>,
    states: Option<Vec<String>>,
    ascending: bool,
    started_after_ms: Option<u64>,
    template: Option<String>,
    limit: usize,
    next_token: Option<String>,
}

fn list_query(uri: &Uri) -> ApiResult<ListQuery> {
    let mut q = ListQuery {
        metadata: Vec::new(),
        states: None,
        ascending: false,
        started_after_ms: None,
        template: None,
        limit: MAX_PAGE,
        next_token: None,
    };
    for (k, v) in query_pairs(uri)? {
        match k.as_str() {
            "metadata" => q.metadata.extend(parse_metadata(&v)?),
            "state" => {
                for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if s != "running" && s != "paused" {
                        return Err(ApiError::bad_request(format!(
                            "invalid state {s:?} (running or paused)"
                        )));
                    }
                    q.states.get_or_insert_with(Vec::new).push(s.to_string());
                }
            }
            "order" => {
                q.ascending = match v.as_str() {
                    "asc" => true,
                    "desc" => false,
                    _ => return Err(ApiError::bad_request(format!("invalid order {v:?}"))),
                }
            }
            "startedAfter" => {
                q.started_after_ms = Some(parse_rfc3339(&v).ok_or_else(|| {
                    ApiError::bad_request(format!("invalid startedAfter {v:?} (RFC 3339)"))
                })?)
            }
            "template" => q.template = Some(v),
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("invalid limit {v:?} (1..=100)"))
                    })?
            }
            "nextToken" => q.next_token = Some(v).filter(|t| !t.is_empty()),
            _ => {}
        }
    }
    Ok(q)
}

fn matches_metadata(rec: &SandboxRecord, want: &[(String, String)]) -> bool {
    want.iter()
        .all(|(k, v)| rec.metadata.get(k).is_some_and(|m| m == v))
}

/// A page cursor: the sort key (start time, id) of the last item of the previous page.
fn cursor(rec: &SandboxRecord) -> String {
    hex::encode(format!("{}:{}", rec.created_ms, rec.id))
}

fn parse_cursor(t: &str) -> ApiResult<(u64, String)> {
    let bad = || ApiError::bad_request(format!("invalid nextToken {t:?}"));
    let raw = String::from_utf8(hex::decode(t).map_err(|_| bad())?).map_err(|_| bad())?;
    let (ms, id) = raw.split_once(':').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, id.to_string()))
}

async fn all_sandboxes(state: &AppState) -> ApiResult<Vec<SandboxRecord>> {
    let sb = state.sandboxes.clone();
    blocking(move || sb.list()).await
}

async fn list_v2(State(state): State<Arc<AppState>>, uri: Uri) -> ApiResult<Response> {
    let q = list_query(&uri)?;
    let mut recs: Vec<SandboxRecord> = all_sandboxes(&state)
        .await?
        .into_iter()
        .filter(|r| {
            let Some(s) = e2b_state(r) else { return false };
            q.states.as_ref().is_none_or(|w| w.iter().any(|x| x == s))
                && matches_metadata(r, &q.metadata)
                && q.started_after_ms.is_none_or(|t| r.created_ms >= t)
                && q.template.as_ref().is_none_or(|t| {
                    &r.source == t || r.image.to_hex() == *t || r.image.to_hex().starts_with(t)
                })
        })
        .collect();
    recs.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    if !q.ascending {
        recs.reverse();
    }
    let running = recs
        .iter()
        .filter(|r| e2b_state(r) == Some("running"))
        .count();
    let start = match &q.next_token {
        None => 0,
        Some(t) => {
            let (ms, id) = parse_cursor(t)?;
            let key = (ms, id);
            recs.iter()
                .position(|r| {
                    let k = (r.created_ms, r.id.clone());
                    if q.ascending {
                        k > key
                    } else {
                        k < key
                    }
                })
                .unwrap_or(recs.len())
        }
    };
    let page: Vec<&SandboxRecord> = recs.iter().skip(start).take(q.limit).collect();
    let more = start + page.len() < recs.len();
    let mut headers = HeaderMap::new();
    if more {
        if let Some(last) = page.last() {
            headers.insert("x-next-token", hv(&cursor(last)));
        }
    }
    if q.states
        .as_ref()
        .is_none_or(|s| s.iter().any(|x| x == "running"))
    {
        headers.insert("x-total-running", hv(&running.to_string()));
    }
    let body: Vec<Value> = page.into_iter().map(listed_json).collect();
    Ok((headers, Json(body)).into_response())
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("hex and digits are valid header values")
}

/// The deprecated v1 list: running sandboxes, optionally filtered by metadata.
async fn list_v1(State(state): State<Arc<AppState>>, uri: Uri) -> ApiResult<Json<Vec<Value>>> {
    let mut metadata = Vec::new();
    for (k, v) in query_pairs(&uri)? {
        if k == "metadata" {
            metadata.extend(parse_metadata(&v)?);
        }
    }
    let mut recs: Vec<SandboxRecord> = all_sandboxes(&state)
        .await?
        .into_iter()
        .filter(|r| e2b_state(r) == Some("running") && matches_metadata(r, &metadata))
        .collect();
    recs.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
    Ok(Json(recs.iter().map(listed_json).collect()))
}

// ---- kill, timeouts ----

async fn kill(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let sb = state.sandboxes.clone();
    let rec = blocking({
        let sb = sb.clone();
        let id = id.clone();
        move || sb.get(&id)
    })
    .await?;
    let rid = rec.id.clone();
    blocking(move || sb.kill(&rid)).await?;
    tracing::info!(id = %rec.id, "killed sandbox");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct TimeoutRequest {
    timeout: Option<Value>,
}

async fn set_timeout(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let req: TimeoutRequest = body(&bytes, false)?;
    let secs = later_timeout(req.timeout.as_ref())?
        .ok_or_else(|| ApiError::bad_request("timeout is required"))?;
    let rec = lookup(&state, &id).await?;
    let sb = state.sandboxes.clone();
    blocking(move || sb.set_timeout(&rec.id, Some(secs))).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct RefreshRequest {
    duration: Option<Value>,
}

/// Extends the time to live to at least `duration` from now (never shortens it).
async fn refresh(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let req: RefreshRequest = body(&bytes, true)?;
    let secs = timeout_field("duration", req.duration.as_ref(), false, MAX_REFRESH_SECS)?
        .unwrap_or(DEFAULT_TIMEOUT_SECS);
    let rec = lookup(&state, &id).await?;
    extend(&state, rec, secs).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets the deadline to now + `secs` if that is later than the present one (under the
/// sandbox's lock: no other change to it comes in between).
async fn extend(state: &AppState, rec: SandboxRecord, secs: u64) -> ApiResult<SandboxRecord> {
    let sb = state.sandboxes.clone();
    blocking(move || sb.extend_timeout(&rec.id, secs)).await
}

/// `PUT /sandboxes/{id}/network`: replaces the whole egress policy of a running sandbox
/// (204); 409 when it is paused or has no network device.
async fn update_network(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let req: NetworkConfig = body(&bytes, true)?;
    let policy =
        egress::policy_of(req.allow_internet_access, Some(&req)).map_err(ApiError::bad_request)?;
    let rec = lookup(&state, &id).await?;
    if e2b_state(&rec) != Some("running") {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "sandbox {} is paused; resume it to change its network",
                rec.id
            ),
        ));
    }
    if rec.network.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} has no network device", rec.id),
        ));
    }
    let sb = state.sandboxes.clone();
    blocking(move || sb.set_network(&rec.id, policy)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- pause, resume, connect ----

#[derive(Deserialize)]
#[allow(dead_code)]
struct PauseRequest {
    memory: Option<bool>,
}

async fn pause(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let _: PauseRequest = body(&bytes, true)?;
    let rec = lookup(&state, &id).await?;
    if e2b_state(&rec) == Some("paused") {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} is already paused", rec.id),
        ));
    }
    let sb = state.sandboxes.clone();
    blocking(move || sb.pause(&rec.id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ResumeRequest {
    timeout: Option<Value>,
}

/// Deprecated resume: 201 with the sandbox; 409 when it is not paused.
async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: ResumeRequest = body(&bytes, true)?;
    let secs = start_timeout(req.timeout.as_ref())?;
    let rec = lookup(&state, &id).await?;
    if e2b_state(&rec) != Some("paused") {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} is already running", rec.id),
        ));
    }
    let sb = state.sandboxes.clone();
    let rec = blocking(move || sb.resume(&rec.id, Some(secs))).await?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&state, &rec))).into_response())
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct ConnectRequest {
    timeout: Option<Value>,
    memory: Option<bool>,
}

async fn connect_v1(
    state: State<Arc<AppState>>,
    id: Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: ConnectRequest = body(&bytes, false)?;
    if req.timeout.is_none() {
        return Err(ApiError::bad_request("timeout is required"));
    }
    connect(state, id, req).await
}

async fn connect_v2(
    state: State<Arc<AppState>>,
    id: Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: ConnectRequest = body(&bytes, true)?;
    connect(state, id, req).await
}

/// 200 with the sandbox when it runs (its time to live only extended), 201 when it was paused
/// and has been resumed.
async fn connect(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: ConnectRequest,
) -> ApiResult<Response> {
    let secs = later_timeout(req.timeout.as_ref())?;
    let rec = lookup(&state, &id).await?;
    let (status, rec) = if e2b_state(&rec) == Some("paused") {
        let sb = state.sandboxes.clone();
        // The new deadline comes with the resume, in one record update.
        let rec = blocking(move || sb.resume(&rec.id, secs)).await?;
        tracing::info!(id = %rec.id, "resumed sandbox on connect");
        (StatusCode::CREATED, rec)
    } else {
        let rec = match secs {
            Some(s) => extend(&state, rec, s).await?,
            None => rec,
        };
        (StatusCode::OK, rec)
    };
    Ok((status, Json(sandbox_json(&state, &rec))).into_response())
}

// ---- fork, snapshots ----

#[derive(Deserialize)]
struct ForkRequest {
    timeout: Option<Value>,
    count: Option<usize>,
}

/// `count` new sandboxes from the running sandbox's present state: 201 with one
/// `{sandbox}` per fork. kiln forks all or nothing, so a failure fails the request and
/// leaves no fork. Each fork is born with its deadline and, like its parent, secure or not
/// (its own tokens).
async fn fork(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: ForkRequest = body(&bytes, true)?;
    let count = req.count.unwrap_or(1);
    if !(1..=100).contains(&count) {
        return Err(ApiError::bad_request("count must be 1..=100"));
    }
    let secs = start_timeout(req.timeout.as_ref())?;
    let rec = lookup(&state, &id).await?;
    if e2b_state(&rec) != Some("running") {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "sandbox {} is paused; only a running sandbox can be forked",
                rec.id
            ),
        ));
    }
    let sb = state.sandboxes.clone();
    let spec = kiln_runtime::ForkSpec {
        count,
        timeout_secs: Some(secs),
    };
    let forks = blocking(move || sb.fork(&rec.id, spec)).await?;
    let out: Vec<Value> = forks
        .iter()
        .map(|f| json!({ "sandbox": sandbox_json(&state, f) }))
        .collect();
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct SnapshotRequest {
    name: Option<String>,
    memory: Option<bool>,
}

/// A live snapshot (the sandbox keeps running), always named so it is listed and kept: the
/// given name (an existing one moves to the new snapshot, as E2B assigns a new build), else
/// `snapshot-<random id>`. 201 with `{snapshotID, names}`; the id is a valid `templateID`.
async fn create_snapshot(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: SnapshotRequest = body(&bytes, true)?;
    let name = req.name.filter(|n| !n.is_empty());
    if let Some(n) = &name {
        kiln_runtime::record::check_name(n).map_err(ApiError::from)?;
    }
    let rec = lookup(&state, &id).await?;
    let sb = state.sandboxes.clone();
    let name = blocking(move || {
        let name = name.unwrap_or_else(|| format!("snapshot-{}", kiln_runtime::record::new_id()));
        let sid = sb.snapshot(&rec.id, Some(&name))?;
        tracing::info!(snapshot = %sid, name, "created snapshot");
        Ok(name)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(snapshot_json(&name))).into_response())
}

fn snapshot_json(name: &str) -> Value {
    json!({ "snapshotID": name, "names": [name] })
}

async fn list_snapshots(State(state): State<Arc<AppState>>, uri: Uri) -> ApiResult<Response> {
    let (mut sandbox, mut name, mut limit, mut next) = (None, None, MAX_PAGE, None);
    for (k, v) in query_pairs(&uri)? {
        match k.as_str() {
            "sandboxID" => sandbox = Some(v),
            "name" => name = Some(strip_tag(&v).to_string()),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| ApiError::bad_request(format!("invalid limit {v:?}")))?
            }
            "nextToken" => next = Some(v).filter(|t| !t.is_empty()),
            _ => {}
        }
    }
    let sb = state.sandboxes.clone();
    let mut names: Vec<String> = blocking(move || {
        let mut out = Vec::new();
        for (n, id) in kiln_runtime::sandbox_snapshot::list(sb.store())? {
            if name.as_ref().is_some_and(|w| *w != n && *w != id.to_hex()) {
                continue;
            }
            if let Some(s) = &sandbox {
                let rec = kiln_runtime::sandbox_snapshot::get(sb.store(), &id)?;
                if rec.sandbox != *s {
                    continue;
                }
            }
            out.push(n);
        }
        Ok(out)
    })
    .await?;
    names.sort();
    let start = match &next {
        None => 0,
        Some(t) => {
            let after = String::from_utf8(
                hex::decode(t)
                    .map_err(|_| ApiError::bad_request(format!("invalid nextToken {t:?}")))?,
            )
            .map_err(|_| ApiError::bad_request(format!("invalid nextToken {t:?}")))?;
            names.partition_point(|n| *n <= after)
        }
    };
    let page: Vec<&String> = names.iter().skip(start).take(limit).collect();
    let mut headers = HeaderMap::new();
    if start + page.len() < names.len() {
        if let Some(last) = page.last() {
            headers.insert("x-next-token", hv(&hex::encode(last)));
        }
    }
    let body: Vec<Value> = page.into_iter().map(|n| snapshot_json(n)).collect();
    Ok((headers, Json(body)).into_response())
}

/// Deletes a snapshot (the SDK's `delete_snapshot`): its name goes, and its data once no
/// sandbox needs it (its chunks with the next gc).
/// Images are not deleted through the API.
async fn delete_template(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let name = strip_tag(&id).to_string();
    let sb = state.sandboxes.clone();
    let removed = blocking(move || sb.remove_snapshot(&name)).await?;
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no snapshot {id:?} (images are removed with `kiln image rm`)"),
        ))
    }
}

// ---- templates, metrics ----

/// kiln images as E2B templates: one per image name; the name is the `templateID`.
async fn list_templates(State(state): State<Arc<AppState>>) -> ApiResult<Json<Vec<Value>>> {
    let sb = state.sandboxes.clone();
    let images = blocking(move || Ok(kiln_imagebuilder::image::list(sb.store())?)).await?;
    let epoch = rfc3339(0);
    Ok(Json(
        images
            .into_iter()
            .map(|i| {
                json!({
                    "templateID": i.name,
                    "buildID": i.id.to_hex(),
                    "cpuCount": 1,
                    "memoryMB": 512,
                    "diskSizeMB": i.disk_size.div_ceil(1 << 20),
                    "public": false,
                    "aliases": [i.name],
                    "names": [i.name],
                    "createdAt": epoch,
                    "updatedAt": epoch,
                    "createdBy": null,
                    "lastSpawnedAt": null,
                    "spawnCount": 0,
                    "buildCount": 1,
                    "envdVersion": ENVD_VERSION,
                    "buildStatus": "ready",
                })
            })
            .collect(),
    ))
}

/// No metrics are collected yet: an empty series for a sandbox that exists.
async fn metrics(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<Value>>> {
    lookup(&state, &id).await?;
    Ok(Json(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(q.states.unwrap(), vec!["running", "paused"]);
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
        let r: ApiResult<NewSandbox> = body(&Bytes::from_static(b"{\"templateID\":"), false);
        assert_eq!(r.err().unwrap().status, StatusCode::BAD_REQUEST);
        let r: ApiResult<NewSandbox> = body(&Bytes::new(), false);
        assert_eq!(r.err().unwrap().status, StatusCode::BAD_REQUEST);
        let r: TimeoutRequest = body(&Bytes::new(), true).unwrap();
        assert!(r.timeout.is_none());
        let r: ApiResult<NewSandbox> = body(&Bytes::from_static(b"{\"timeout\":5}"), false);
        assert_eq!(r.err().unwrap().status, StatusCode::BAD_REQUEST);
    }
}
