//! `POST /sandboxes` (v1 and v2): the request, its checks, and the sandbox JSON E2B's SDKs read back.

use super::*;
use types::NewSandbox;

/// A timeout field of a request (create, fork, resume, connect, set_timeout, refresh): JSON
/// `null` or absent is `None`; E2B's spec types them `integer, format: int32, minimum: 0`
/// (refresh's `duration` also `maximum: 3600`), and its handlers refuse 0 where a sandbox
/// starts (create, fork, resume) and more than the plan's hours everywhere. kiln follows
/// that with 400s, so no request can ask for a deadline that overflows.
pub(super) fn timeout_field(
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
pub(super) fn start_timeout(v: Option<&Value>) -> ApiResult<u64> {
    Ok(
        timeout_field("timeout", v, true, MAX_TIMEOUT_HOURS * 3600)?
            .unwrap_or(DEFAULT_TIMEOUT_SECS),
    )
}

/// The timeout of a request that sets one from now (set_timeout, connect): 0 ..=
/// [`MAX_TIMEOUT_HOURS`].
pub(super) fn later_timeout(v: Option<&Value>) -> ApiResult<Option<u64>> {
    timeout_field("timeout", v, false, MAX_TIMEOUT_HOURS * 3600)
}

/// `map` as the JSON the agent or the record gets, at most `max` bytes of it.
pub(super) fn check_size(name: &str, map: &BTreeMap<String, String>, max: usize) -> ApiResult<()> {
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
pub(super) fn check_env(env: &BTreeMap<String, String>) -> ApiResult<()> {
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

/// What the timeout does, from E2B's `autoPause` and `autoPauseMemory`, refused as E2B's API
/// refuses them (a filesystem-only pause without a pause, or with auto-resume: traffic cannot
/// wake a sandbox that has no memory to restore).
fn on_timeout(
    auto_pause: Option<bool>,
    memory: Option<bool>,
    auto_resume: bool,
) -> ApiResult<OnTimeout> {
    let files_only = memory == Some(false);
    match auto_pause {
        Some(true) if files_only && auto_resume => Err(ApiError::bad_request(
            "autoPauseMemory=false (filesystem-only auto-pause) cannot be combined with \
             autoResume: a filesystem-only snapshot cannot be auto-resumed by traffic and must \
             be resumed explicitly.",
        )),
        Some(true) if files_only => Ok(OnTimeout::PauseFilesystem),
        Some(true) => Ok(OnTimeout::Pause),
        _ if files_only => Err(ApiError::bad_request(
            "autoPauseMemory=false only applies when autoPause is true.",
        )),
        _ => Ok(OnTimeout::Kill),
    }
}

/// `POST /sandboxes`: secured (an envd access token) only with `secure: true`.
pub(super) async fn create_v1(state: State<Arc<AppState>>, bytes: Bytes) -> ApiResult<Response> {
    create(state, bytes, false).await
}

/// `POST /v2/sandboxes` (the SDKs 2.x): secured unless `secure: false`; the SDK no longer
/// sends the field and always passes the token it gets back.
pub(super) async fn create_v2(state: State<Arc<AppState>>, bytes: Bytes) -> ApiResult<Response> {
    create(state, bytes, true).await
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    bytes: Bytes,
    secure_default: bool,
) -> ApiResult<Response> {
    let req: NewSandbox = body(&bytes, false)?;
    let template = req.template_id.trim().to_string();
    if template.is_empty() {
        return Err(ApiError::bad_request("templateID is empty"));
    }
    let mut spec = CreateSpec::new(Source::Template(template.clone()));
    // Nothing asked of egress: the host's default (kiln_runtime::default_network, which
    // KILN_NETWORK=none makes "no network device").
    spec.network = egress::create_policy(req.allow_internet_access, req.network.as_ref())
        .map_err(ApiError::bad_request)?;
    spec.private_traffic = req.network.as_ref().is_some_and(|n| !n.public_traffic());
    spec.mask_request_host = match &req.network {
        Some(n) => n.mask_request_host().map_err(ApiError::bad_request)?,
        None => None,
    };
    spec.timeout_secs = Some(start_timeout(req.timeout.as_ref())?);
    spec.auto_resume = req.auto_resume.is_some_and(|a| a.enabled);
    spec.on_timeout = on_timeout(req.auto_pause, req.auto_pause_memory, spec.auto_resume)?;
    spec.metadata = req.metadata.unwrap_or_default();
    spec.env = req.env_vars.unwrap_or_default();
    check_env(&spec.env)?;
    check_size("metadata", &spec.metadata, MAX_METADATA_BYTES)?;
    spec.secure = req.secure.unwrap_or(secure_default);
    if let Some(c) = &state.cluster {
        c.fetch_template(&state.sandboxes, &template).await?;
    }
    let sb = state.sandboxes.clone();
    let rec = blocking(move || sb.create(spec)).await?;
    tracing::info!(id = %rec.id, template = %rec.source, "created sandbox");
    Ok((StatusCode::CREATED, Json(sandbox_json(&state, &rec))).into_response())
}

/// `name:tag` as E2B spells template references; kiln snapshot names carry no tag.
pub(super) fn strip_tag(t: &str) -> &str {
    t.strip_suffix(":default").unwrap_or(t)
}

/// E2B's `Sandbox` (create, connect, resume, fork).
pub(super) fn sandbox_json(state: &AppState, rec: &SandboxRecord) -> types::Sandbox {
    types::Sandbox::of(rec, &state.domain, ENVD_VERSION)
}

/// E2B's state of a sandbox: running or paused; `None` for one that failed or stopped (to
/// the API it is gone).
/// E2B's `ListedSandbox`.
pub(super) fn listed_json(state: &AppState, rec: &SandboxRecord) -> types::ListedSandbox {
    types::ListedSandbox {
        template_id: rec.source.clone(),
        sandbox_id: rec.id.clone(),
        client_id: client_id(state),
        alias: rec.name.clone(),
        started_at: rfc3339(rec.created_ms),
        end_at: rfc3339(rec.deadline_ms.unwrap_or(NO_DEADLINE_MS)),
        cpu_count: rec.cpus,
        memory_mb: rec.memory_mib,
        disk_size_mb: rec.disk_mib,
        metadata: rec.metadata.clone(),
        state: types::SandboxState::of(rec).unwrap_or(types::SandboxState::Running),
        envd_version: ENVD_VERSION.into(),
    }
}

/// The `clientID` this node gives its own sandboxes: its node id in cluster mode.
pub(super) fn client_id(state: &AppState) -> String {
    match &state.cluster {
        Some(c) => c.node_id.clone(),
        None => types::CLIENT_ID.to_string(),
    }
}

/// E2B's `SandboxDetail`.
pub(super) fn detail_json(state: &AppState, rec: &SandboxRecord) -> types::SandboxDetail {
    let (allow_internet_access, allow_out, deny_out) = egress::detail_fields(rec.network.as_ref());
    types::SandboxDetail {
        listed: listed_json(state, rec),
        domain: Some(state.domain.clone()),
        allow_internet_access,
        network: types::SandboxNetworkConfig {
            allow_public_traffic: !rec.access.private_traffic,
            allow_out,
            deny_out,
            mask_request_host: rec.access.mask_request_host.clone(),
        },
        lifecycle: types::SandboxLifecycle {
            auto_resume: rec.auto_resume,
            on_timeout: rec.on_timeout.into(),
        },
        pause_mode: (rec.state.kind() == StateKind::Paused).then(|| {
            if state.sandboxes.paused_files_only(rec) {
                types::SandboxPauseMode::Filesystem
            } else {
                types::SandboxPauseMode::Full
            }
        }),
        envd_access_token: rec.access.envd_token.clone(),
    }
}
