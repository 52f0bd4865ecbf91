//! Sandbox metrics: `GET /sandboxes/{id}/metrics` (samples over a time range) and `GET
//! /sandboxes/metrics` (the latest sample of many sandboxes), from the daemon's samples
//! ([`crate::metrics`]).
use super::types::{SandboxMetric, SandboxesWithMetrics};
use super::*;
use crate::metrics::{buckets, step_secs, Sample};

impl From<Sample> for SandboxMetric {
    fn from(s: Sample) -> SandboxMetric {
        SandboxMetric {
            timestamp: rfc3339(s.at_secs.saturating_mul(1000)),
            timestamp_unix: s.at_secs,
            cpu_count: s.cpu_count,
            cpu_used_pct: s.cpu_used_pct,
            mem_used: s.mem_used,
            mem_total: s.mem_total,
            mem_cache: s.mem_cache,
            disk_used: s.disk_used,
            disk_total: s.disk_total,
        }
    }
}

/// The most ids `GET /sandboxes/metrics` takes (spec: `maxItems: 100`).
const MAX_IDS: usize = 100;

/// Samples of a sandbox that exists (404 otherwise) at `start..=end` (Unix seconds, spec:
/// int64 >= 0; each defaults to the sandbox's first and last sample), in E2B's steps (5 s
/// under an hour of range, longer above), each step's largest values at its start.
pub(super) async fn metrics(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    uri: Uri,
) -> ApiResult<Json<Vec<SandboxMetric>>> {
    let (mut start, mut end) = (None, None);
    for (k, v) in query_pairs(&uri)? {
        let slot = match k.as_str() {
            "start" => &mut start,
            "end" => &mut end,
            _ => continue,
        };
        *slot = Some(v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("{k} must be Unix seconds >= 0, not {v:?}"))
        })?);
    }
    if let (Some(s), Some(e)) = (start, end) {
        if s > e {
            return Err(ApiError::bad_request(
                "Invalid time range for metrics: start time cannot be after end time",
            ));
        }
    }
    let rec = lookup(&state, &id).await?;
    let samples = state.metrics.range(&rec.id, start, end);
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Ok(Json(Vec::new()));
    };
    let span = end
        .unwrap_or(last.at_secs)
        .saturating_sub(start.unwrap_or(first.at_secs));
    let step = step_secs(span);
    Ok(Json(
        buckets(&samples, step)
            .into_iter()
            .map(SandboxMetric::from)
            .collect(),
    ))
}

/// The latest sample of each sandbox of `sandbox_ids` (comma-separated, required, at most
/// [`MAX_IDS`]) that has one; other ids are left out, as E2B's query leaves them.
pub(super) async fn many_metrics(
    State(state): State<Arc<AppState>>,
    forwarded: Option<axum::Extension<crate::cluster::Forwarded>>,
    uri: Uri,
) -> ApiResult<Json<SandboxesWithMetrics>> {
    let mut ids: Vec<String> = Vec::new();
    let mut given = false;
    for (k, v) in query_pairs(&uri)? {
        if k == "sandbox_ids" {
            given = true;
            ids.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
    }
    if !given {
        return Err(ApiError::bad_request(
            "query parameter sandbox_ids is required",
        ));
    }
    ids.sort();
    ids.dedup();
    if ids.len() > MAX_IDS {
        return Err(ApiError::bad_request(format!(
            "Too many sandboxes requested, maximum is {MAX_IDS}"
        )));
    }
    let mut sandboxes: BTreeMap<String, SandboxMetric> = ids
        .iter()
        .filter_map(|id| {
            let s = state.metrics.latest(id)?;
            Some((id.clone(), SandboxMetric::from(s)))
        })
        .collect();
    // Cluster mode: the other nodes' sandboxes from their nodes (asked by the node the
    // client reached, never by those it asks).
    if let Some(c) = state.cluster.as_ref().filter(|_| forwarded.is_none()) {
        let here = sandboxes.keys().cloned().collect();
        sandboxes.extend(c.metrics_elsewhere(&ids, &here).await);
    }
    Ok(Json(SandboxesWithMetrics { sandboxes }))
}
