//! Kill, timeouts, network policy updates, pause, resume and connect of one sandbox.

use super::*;
use kiln_runtime::{PauseMode, ResumeMode};
use types::{
    ConnectRequest, NetworkConfig, PauseRequest, RefreshRequest, ResumeRequest, TimeoutRequest,
};

pub(super) async fn kill(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    // After any resume (or, in cluster mode, a drain letting it go) under way: a kill never
    // lands between a drain's pause and its release, leaving a released entry of nothing.
    let _turn = state.wakes.turn(&id).await;
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

pub(super) async fn set_timeout(
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

/// Extends the time to live to at least `duration` from now (never shortens it).
pub(super) async fn refresh(
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

/// `rec` with its time to live extended to `secs` from now when given.
async fn with_timeout(
    state: &AppState,
    rec: SandboxRecord,
    secs: Option<u64>,
) -> ApiResult<SandboxRecord> {
    match secs {
        Some(s) => extend(state, rec, s).await,
        None => Ok(rec),
    }
}

/// Sets the deadline to now + `secs` if that is later than the present one (under the
/// sandbox's lock: no other change to it comes in between).
pub(super) async fn extend(
    state: &AppState,
    rec: SandboxRecord,
    secs: u64,
) -> ApiResult<SandboxRecord> {
    let sb = state.sandboxes.clone();
    blocking(move || sb.extend_timeout(&rec.id, secs)).await
}

/// `PUT /sandboxes/{id}/network`: replaces the whole egress policy of a running sandbox
/// (204); 409 when it is paused or has no network device.
pub(super) async fn update_network(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let req: NetworkConfig = body(&bytes, true)?;
    let policy =
        egress::policy_of(req.allow_internet_access, Some(&req)).map_err(ApiError::bad_request)?;
    let rec = lookup(&state, &id).await?;
    let sb = state.sandboxes.clone();
    blocking(move || sb.set_running_network(&rec.id, policy)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn pause(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let req: PauseRequest = body(&bytes, true)?;
    let mode = match req.memory {
        Some(false) => PauseMode::Filesystem,
        _ => PauseMode::Full,
    };
    let rec = lookup(&state, &id).await?;
    match &state.cluster {
        // Its snapshot goes to the store's remote too, for any node to resume it.
        Some(c) => c.pause(&state.sandboxes, &rec.id, mode).await?,
        None => {
            let sb = state.sandboxes.clone();
            blocking(move || sb.pause_with(&rec.id, mode)).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// How a connect or resume asking `memory` brings a paused sandbox back.
fn resume_mode(memory: Option<bool>) -> ResumeMode {
    match memory {
        Some(false) => ResumeMode::Reboot,
        _ => ResumeMode::Restore,
    }
}

/// Deprecated resume: 201 with the sandbox; 409 when it is not paused.
pub(super) async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: ResumeRequest = body(&bytes, true)?;
    let secs = start_timeout(req.timeout.as_ref())?;
    // One resume at a time, as a connect's; and never between a drain's pause and release.
    let _turn = state.wakes.turn(&id).await;
    let rec = lookup(&state, &id).await?;
    let sb = state.sandboxes.clone();
    let mode = resume_mode(req.memory);
    let rec = blocking(move || sb.resume_with(&rec.id, Some(secs), mode)).await?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&state, &rec))).into_response())
}

pub(super) async fn connect_v1(
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

pub(super) async fn connect_v2(
    state: State<Arc<AppState>>,
    id: Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: ConnectRequest = body(&bytes, true)?;
    connect(state, id, req).await
}

/// 200 with the sandbox when it runs (its time to live only extended), 201 when it was paused
/// and has been resumed.
pub(super) async fn connect(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: ConnectRequest,
) -> ApiResult<Response> {
    let secs = later_timeout(req.timeout.as_ref())?;
    let rec = lookup(&state, &id).await?;
    let (status, rec) = if rec.state.kind() == StateKind::Paused {
        // The new deadline comes with the resume, in one record update; a request that
        // auto-resumed it meanwhile leaves it running (crate::wake).
        let woken =
            crate::wake::resume_once(&state, &rec.id, secs, resume_mode(req.memory)).await?;
        if woken.resumed {
            tracing::info!(id = %woken.rec.id, "resumed sandbox on connect");
            (StatusCode::CREATED, woken.rec)
        } else {
            (StatusCode::OK, with_timeout(&state, woken.rec, secs).await?)
        }
    } else {
        (StatusCode::OK, with_timeout(&state, rec, secs).await?)
    };
    Ok((status, Json(sandbox_json(&state, &rec))).into_response())
}
