//! Fork (`POST /sandboxes/{id}/fork`) and sandbox snapshots: create, list, delete.

use super::*;
use types::{ForkRequest, SnapshotRequest};

/// `count` new sandboxes from the running sandbox's present state: 201 with one
/// `{sandbox}` per fork. kiln forks all or nothing, so a failure fails the request and
/// leaves no fork. Each fork is born with its deadline and, like its parent, secure or not
/// (its own tokens).
pub(super) async fn fork(
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
    let sb = state.sandboxes.clone();
    let spec = kiln_runtime::ForkSpec {
        count,
        timeout_secs: Some(secs),
    };
    let forks = blocking(move || sb.fork(&rec.id, spec)).await?;
    let out: Vec<types::SandboxForkResult> = forks
        .iter()
        .map(|f| types::SandboxForkResult {
            sandbox: sandbox_json(&state, f),
        })
        .collect();
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// A live snapshot (the sandbox keeps running), always named so it is listed and kept: the
/// given name (an existing one moves to the new snapshot, as E2B assigns a new build), else
/// `snapshot-<random id>`. 201 with `{snapshotID, names}`; the id is a valid `templateID`.
pub(super) async fn create_snapshot(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: SnapshotRequest = body(&bytes, true)?;
    let name = req.name.filter(|n| !n.is_empty());
    if let Some(n) = &name {
        kiln_runtime::record::check_name(n).map_err(ApiError::from)?;
    }
    // Cluster mode: a name the cluster knows as a template image is refused before anything
    // is taken.
    if let (Some(c), Some(n)) = (&state.cluster, &name) {
        c.check_kind(n, kiln_cluster::TemplateKind::Snapshot)
            .await
            .map_err(ApiError::bad_request)?;
    }
    let rec = lookup(&state, &id).await?;
    let sb = state.sandboxes.clone();
    let (name, sid) = blocking(move || {
        let name = name.unwrap_or_else(|| format!("snapshot-{}", kiln_runtime::record::new_id()));
        let sid = sb.snapshot(&rec.id, Some(&name))?;
        tracing::info!(snapshot = %sid, name, "created snapshot");
        Ok((name, sid))
    })
    .await?;
    // Cluster mode: answered once pushed and published, so any node can create from it.
    if let Some(c) = state.cluster.clone() {
        let (sb, n) = (state.sandboxes.clone(), name.clone());
        tokio::task::spawn_blocking(move || c.publish_snapshot(&sb, &n, &sid))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "snapshot {name} was taken on this node but not published to the \
                         cluster: {e}"
                    ),
                )
            })?;
    }
    Ok((StatusCode::CREATED, Json(snapshot_json(&name))).into_response())
}

pub(super) fn snapshot_json(name: &str) -> types::SnapshotInfo {
    types::SnapshotInfo::named(name)
}

pub(super) async fn list_snapshots(
    State(state): State<Arc<AppState>>,
    uri: Uri,
) -> ApiResult<Response> {
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
    // Cluster mode: the cluster's snapshots (this home's too: it publishes the ones it takes)
    // by name and id, for those not held here.
    let cluster: Vec<(String, String)> = match &state.cluster {
        Some(c) => c
            .templates()
            .await?
            .into_iter()
            .filter(|(_, e)| e.kind == kiln_cluster::TemplateKind::Snapshot)
            .map(|(n, e)| (n, e.id))
            .collect(),
        None => Vec::new(),
    };
    let sb = state.sandboxes.clone();
    let mut names: Vec<String> = blocking(move || {
        let store = sb.store();
        let mut all: BTreeMap<String, kiln_blockstore::BlobId> =
            kiln_runtime::sandbox_snapshot::list(store)?
                .into_iter()
                .collect();
        for (n, id) in cluster {
            if let Ok(id) = id.parse() {
                all.insert(n, id);
            }
        }
        let mut out = Vec::new();
        for (n, id) in all {
            if name.as_ref().is_some_and(|w| *w != n && *w != id.to_hex()) {
                continue;
            }
            if let Some(s) = &sandbox {
                // A snapshot of another node's: its record comes from the remote.
                // One that cannot be read (the remote away) is left out, not the whole list.
                if !store.contains(&id) && store.pull(&id).is_err() {
                    continue;
                }
                let Ok(rec) = kiln_runtime::sandbox_snapshot::get(store, &id) else {
                    continue;
                };
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
    let body: Vec<types::SnapshotInfo> = page.into_iter().map(|n| snapshot_json(n)).collect();
    Ok((headers, Json(body)).into_response())
}
