//! Template builds (the SDK's `Template.build` and `build_in_background`): `POST
//! /v3/templates` requests one, `POST /v2/templates/{id}/builds/{buildID}` posts its steps and
//! starts it, `GET .../status` and `GET .../logs` follow it. The build itself is
//! [`crate::builds`]'s: kiln's Dockerfile builder and its step cache.
//!
//! A template's `templateID` is its name (as `GET /templates` lists kiln images); `name:tag`
//! in a request's name is a tag, as E2B's `TemplateBuildRequestV3` says.

use super::types::{
    BuildLogEntry, BuildStatusReason, TemplateBuildInfo, TemplateBuildLogsResponse,
    TemplateRequestResponseV3,
};
use super::*;
use crate::builds::{Build, LogLine, Status};
use std::time::Duration;
use types::{BuildRequest, BuildStart};

/// A tag: what E2B accepts in a tag (letters, digits, `._-`), 1-64 of them.
pub(super) fn check_tag(t: &str) -> ApiResult<()> {
    if t.is_empty()
        || t.len() > 64
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(ApiError::bad_request(format!(
            "invalid tag {t:?} (1-64 characters from [a-zA-Z0-9._-])"
        )));
    }
    Ok(())
}

/// `POST /v3/templates`: 202 with the new build's ids.
pub(super) async fn request_build(
    State(state): State<Arc<AppState>>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<TemplateRequestResponseV3>)> {
    let req: BuildRequest = body(&bytes, false)?;
    let full = req
        .name
        .or(req.alias)
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    let (name, tag) = match full.rsplit_once(':') {
        Some((n, t)) => (n.to_string(), Some(t.to_string())),
        None => (full.clone(), None),
    };
    if name.len() > 128 || kiln_imagebuilder::image::check_name(&name).is_err() {
        return Err(ApiError::bad_request(format!(
            "invalid template name {name:?} (1-100 characters from [a-zA-Z0-9._/@-])"
        )));
    }
    let mut tags = req.tags;
    tags.extend(tag);
    for t in &tags {
        check_tag(t)?;
    }
    if tags.is_empty() {
        tags.push("default".into());
    }
    tags.dedup();
    let build_id = state.builds.request(&name, tags.clone());
    tracing::info!(template = %name, build = %build_id, "template build requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(TemplateRequestResponseV3 {
            template_id: name.clone(),
            build_id,
            public: false,
            names: vec![name.clone()],
            tags,
            aliases: vec![name],
        }),
    ))
}

/// The build `build` of template `id`; 404 with E2B's message when this daemon has none.
pub(super) fn find_build(
    state: &AppState,
    id: &str,
    build: &str,
) -> ApiResult<Arc<std::sync::Mutex<Build>>> {
    state.builds.get(id, build).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("build '{build}' of template '{id}' not found"),
        )
    })
}

/// `POST /v2/templates/{id}/builds/{buildID}`: 202 once the build runs. As E2B checks, in its
/// order: a malformed body or a build id that is no UUID is a 400, an unknown build a 404, a
/// build not waiting (started already) a 400; so are steps kiln cannot translate and files
/// not uploaded.
pub(super) async fn start_build(
    State(state): State<Arc<AppState>>,
    Path((id, build)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let start: BuildStart = body(&bytes, false)?;
    if !is_uuid(&build) {
        return Err(ApiError::bad_request(format!("Invalid build ID: {build}")));
    }
    let b = find_build(&state, &id, &build)?;
    let plan = crate::builds::dockerfile(&start).map_err(ApiError::bad_request)?;
    if let Some((h, step)) = plan.files.iter().find(|(h, _)| !state.builds.has_files(h)) {
        return Err(ApiError::bad_request(format!(
            "step {step}: files {h} were not uploaded (GET /templates/{id}/files/{h})"
        )));
    }
    // Cluster mode: a base built on another node comes from the catalog; the template is
    // ready once pushed and published, so a create through any node finds it.
    if let Some(c) = &state.cluster {
        let template = b.lock().unwrap().template.clone();
        c.check_kind(&template, kiln_cluster::TemplateKind::Image)
            .await
            .map_err(ApiError::bad_request)?;
        c.fetch_template(&state.sandboxes, &plan.base).await?;
    }
    let publish = state.cluster.clone().map(|c| {
        let sb = state.sandboxes.clone();
        Box::new(move |names: &[String], image: &kiln_blockstore::BlobId| {
            c.publish_image(&sb, names, image)
        }) as crate::builds::Publish
    });
    let Some(running) =
        state
            .builds
            .start(state.sandboxes.clone(), b, build.clone(), start, publish)
    else {
        return Err(ApiError::bad_request(format!(
            "build '{build}' is not in waiting state (it was started already)"
        )));
    };
    tracing::info!(template = %id, build = %build, "template build started");
    // The SDK polls the status every 200 ms: a build that ends within QUICK_BUILD (every
    // step cached) is answered as started once it has ended, so the first poll sees it done.
    let _ = tokio::time::timeout(QUICK_BUILD, running).await;
    Ok(StatusCode::ACCEPTED)
}

/// How long starting a build waits for the build to end before it answers.
const QUICK_BUILD: Duration = Duration::from_millis(500);
/// How long a status poll of a running build waits for its end (its logs come with it).
const STATUS_WAIT: Duration = Duration::from_millis(250);

/// `8-4-4-4-12` hex digits, as E2B's build ids are.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl From<&LogLine> for BuildLogEntry {
    fn from(l: &LogLine) -> BuildLogEntry {
        BuildLogEntry {
            timestamp: crate::timefmt::rfc3339_ms(l.ms as i64),
            message: l.message.clone(),
            level: l.level,
            step: l.step.clone(),
        }
    }
}

/// A query's `name` as an integer in `0..=max` (`default` when absent); 400 otherwise.
fn int_param(q: &BTreeMap<String, String>, name: &str, default: u64, max: u64) -> ApiResult<u64> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => {
            v.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(|| {
                ApiError::bad_request(format!("{name} must be 0..={max}, not {v:?}"))
            })
        }
    }
}

/// The log levels at `level` and above (E2B's `LogLevel` order); 400 for another value.
fn min_level(q: &BTreeMap<String, String>) -> ApiResult<usize> {
    const LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];
    match q.get("level") {
        None => Ok(0),
        Some(l) => LEVELS
            .iter()
            .position(|x| x == l)
            .ok_or_else(|| ApiError::bad_request(format!("level {l:?}: one of {LEVELS:?}"))),
    }
}

fn level_rank(l: &str) -> usize {
    ["debug", "info", "warn", "error"]
        .iter()
        .position(|x| *x == l)
        .unwrap_or(1)
}

fn query_map(uri: &Uri) -> BTreeMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// `GET /templates/{id}/builds/{buildID}/status?logsOffset=&limit=&level=`.
pub(super) async fn build_status(
    State(state): State<Arc<AppState>>,
    Path((id, build)): Path<(String, String)>,
    uri: Uri,
) -> ApiResult<Json<TemplateBuildInfo>> {
    let q = query_map(&uri);
    let offset = int_param(&q, "logsOffset", 0, i32::MAX as u64)? as usize;
    let limit = int_param(&q, "limit", 100, 100)? as usize;
    let level = min_level(&q)?;
    let b = find_build(&state, &id, &build)?;
    // A poll of a running build answers at its end if that comes within STATUS_WAIT, so a
    // client polling at intervals learns of the end sooner.
    let until = tokio::time::Instant::now() + STATUS_WAIT;
    while b.lock().unwrap().status == Status::Building && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = b.lock().unwrap();
    let entries: Vec<BuildLogEntry> = b
        .logs
        .iter()
        .skip(offset.saturating_sub(b.dropped))
        .filter(|l| level_rank(l.level) >= level)
        .take(limit)
        .map(BuildLogEntry::from)
        .collect();
    Ok(Json(TemplateBuildInfo {
        logs: entries.iter().map(|e| e.message.clone()).collect(),
        log_entries: entries,
        template_id: id,
        build_id: build,
        status: match b.status {
            Status::Waiting => "waiting",
            Status::Building => "building",
            Status::Ready => "ready",
            Status::Error => "error",
        },
        reason: b.reason.as_ref().map(|r| BuildStatusReason {
            message: r.message.clone(),
            step: r.step.clone(),
            log_entries: r.logs.iter().map(BuildLogEntry::from).collect(),
        }),
    }))
}

/// `GET /templates/{id}/builds/{buildID}/logs?cursor=&limit=&direction=&level=`: entries at
/// or after `cursor` (ms), oldest first (`direction=backward`: newest first, at or before).
pub(super) async fn build_logs(
    State(state): State<Arc<AppState>>,
    Path((id, build)): Path<(String, String)>,
    uri: Uri,
) -> ApiResult<Json<TemplateBuildLogsResponse>> {
    let q = query_map(&uri);
    let limit = int_param(&q, "limit", 100, 100)? as usize;
    let level = min_level(&q)?;
    let backward = match q.get("direction").map(String::as_str) {
        None | Some("forward") => false,
        Some("backward") => true,
        Some(d) => {
            return Err(ApiError::bad_request(format!(
                "direction {d:?}: forward or backward"
            )))
        }
    };
    let cursor = int_param(&q, "cursor", if backward { u64::MAX } else { 0 }, u64::MAX)?;
    let b = find_build(&state, &id, &build)?;
    let b = b.lock().unwrap();
    let keep = |l: &&LogLine| {
        level_rank(l.level) >= level
            && if backward {
                l.ms <= cursor
            } else {
                l.ms >= cursor
            }
    };
    let logs: Vec<BuildLogEntry> = if backward {
        b.logs
            .iter()
            .rev()
            .filter(keep)
            .take(limit)
            .map(BuildLogEntry::from)
            .collect()
    } else {
        b.logs
            .iter()
            .filter(keep)
            .take(limit)
            .map(BuildLogEntry::from)
            .collect()
    };
    Ok(Json(TemplateBuildLogsResponse { logs }))
}
