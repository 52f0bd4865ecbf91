//! `GET /sandboxes/{id}` and the sandbox lists (v1, and v2 with metadata filters, states and cursors).

use super::*;

/// A sandbox as E2B sees it: 404 when unknown, failed or stopped.
pub(super) async fn lookup(state: &AppState, id: &str) -> ApiResult<SandboxRecord> {
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

pub(super) async fn get_sandbox(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<types::SandboxDetail>> {
    let rec = lookup(&state, &id).await?;
    Ok(Json(detail_json(&state, &rec)))
}

/// The query's pairs, percent-decoded once.
pub(super) fn query_pairs(uri: &Uri) -> ApiResult<Vec<(String, String)>> {
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

/// The `metadata` parameter (already decoded once as a query value) is itself a query string
/// `k1=v1&k2=v2` whose keys and values are URL-encoded once more (the SDKs encode each with
/// `quote`/`encodeURIComponent` first): the pairs, fully decoded.
pub(super) fn parse_metadata(s: &str) -> ApiResult<Vec<(String, String)>> {
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

/// `%XX` escapes decoded (`+` stays a plus); None for a bad escape or invalid UTF-8, which
/// E2B answers with a 400 (Go's `url.PathUnescape`), where the `form_urlencoded` crate keeps it.
pub(super) fn percent_decode(s: &str) -> Option<String> {
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

pub(super) struct ListQuery {
    pub(super) metadata: Vec<(String, String)>,
    pub(super) states: Option<Vec<types::SandboxState>>,
    pub(super) ascending: bool,
    pub(super) started_after_ms: Option<u64>,
    pub(super) template: Option<String>,
    pub(super) limit: usize,
    pub(super) next_token: Option<String>,
}

pub(super) fn list_query(uri: &Uri) -> ApiResult<ListQuery> {
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
                    let s = match s {
                        "running" => types::SandboxState::Running,
                        "paused" => types::SandboxState::Paused,
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "invalid state {s:?} (running or paused)"
                            )))
                        }
                    };
                    q.states.get_or_insert_with(Vec::new).push(s);
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

pub(super) fn matches_metadata(row: &Row, want: &[(String, String)]) -> bool {
    want.iter()
        .all(|(k, v)| row.listed.metadata.get(k).is_some_and(|m| m == v))
}

/// A page cursor: the sort key (start time, id) of the last item of the previous page.
pub(super) fn cursor(row: &Row) -> String {
    hex::encode(format!("{}:{}", row.created_ms, row.listed.sandbox_id))
}

pub(super) fn parse_cursor(t: &str) -> ApiResult<(u64, String)> {
    let bad = || ApiError::bad_request(format!("invalid nextToken {t:?}"));
    let raw = String::from_utf8(hex::decode(t).map_err(|_| bad())?).map_err(|_| bad())?;
    let (ms, id) = raw.split_once(':').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, id.to_string()))
}

/// One sandbox of a list: this host's record, or in cluster mode the catalog's entry.
pub(super) struct Row {
    listed: types::ListedSandbox,
    created_ms: u64,
    /// Its image's id (hex), when known (this host's sandboxes).
    image: Option<String>,
}

impl Row {
    fn key(&self) -> (u64, &str) {
        (self.created_ms, &self.listed.sandbox_id)
    }
}

/// The sandboxes E2B lists (running or paused): this host's, or in cluster mode the whole
/// cluster's from its catalog.
pub(super) async fn all_sandboxes(state: &AppState) -> ApiResult<Vec<Row>> {
    if let Some(c) = &state.cluster {
        let entries = c.listed().await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cluster catalog: {e}"),
            )
        })?;
        return Ok(entries
            .into_iter()
            .filter_map(|(id, e)| catalog_row(id, e))
            .collect());
    }
    let sb = state.sandboxes.clone();
    let recs = blocking(move || sb.list()).await?;
    Ok(recs
        .iter()
        .filter(|r| types::SandboxState::of(r).is_some())
        .map(|r| Row {
            listed: listed_json(state, r),
            created_ms: r.created_ms,
            image: Some(r.image.to_hex()),
        })
        .collect())
}

/// A catalog entry's row (None for a failed one: lists leave them out).
fn catalog_row(id: String, e: kiln_cluster::SandboxEntry) -> Option<Row> {
    let state = match e.state {
        kiln_cluster::SandboxState::Running => types::SandboxState::Running,
        kiln_cluster::SandboxState::Paused => types::SandboxState::Paused,
        kiln_cluster::SandboxState::Failed => return None,
    };
    Some(Row {
        listed: types::ListedSandbox {
            template_id: e.template,
            sandbox_id: id,
            client_id: e.node,
            alias: e.alias,
            started_at: rfc3339(e.started_ms),
            end_at: rfc3339(e.end_ms.unwrap_or(NO_DEADLINE_MS)),
            cpu_count: e.cpus,
            memory_mb: e.memory_mib,
            disk_size_mb: e.disk_mib,
            metadata: e.metadata,
            state,
            envd_version: ENVD_VERSION.into(),
        },
        created_ms: e.started_ms,
        image: None,
    })
}

pub(super) async fn list_v2(State(state): State<Arc<AppState>>, uri: Uri) -> ApiResult<Response> {
    let q = list_query(&uri)?;
    let mut rows: Vec<Row> = all_sandboxes(&state)
        .await?
        .into_iter()
        .filter(|r| {
            q.states
                .as_ref()
                .is_none_or(|w| w.contains(&r.listed.state))
                && matches_metadata(r, &q.metadata)
                && q.started_after_ms.is_none_or(|t| r.created_ms >= t)
                && q.template.as_ref().is_none_or(|t| {
                    &r.listed.template_id == t
                        || r.image.as_ref().is_some_and(|i| i == t || i.starts_with(t))
                })
        })
        .collect();
    rows.sort_by(|a, b| a.key().cmp(&b.key()));
    if !q.ascending {
        rows.reverse();
    }
    let running = rows
        .iter()
        .filter(|r| r.listed.state == types::SandboxState::Running)
        .count();
    let start = match &q.next_token {
        None => 0,
        Some(t) => {
            let (ms, id) = parse_cursor(t)?;
            let key = (ms, id.as_str());
            rows.iter()
                .position(|r| {
                    if q.ascending {
                        r.key() > key
                    } else {
                        r.key() < key
                    }
                })
                .unwrap_or(rows.len())
        }
    };
    let total = rows.len();
    let page: Vec<Row> = rows.into_iter().skip(start).take(q.limit).collect();
    let more = start + page.len() < total;
    let mut headers = HeaderMap::new();
    if more {
        if let Some(last) = page.last() {
            headers.insert("x-next-token", hv(&cursor(last)));
        }
    }
    if q.states
        .as_ref()
        .is_none_or(|s| s.contains(&types::SandboxState::Running))
    {
        headers.insert("x-total-running", hv(&running.to_string()));
    }
    let body: Vec<types::ListedSandbox> = page.into_iter().map(|r| r.listed).collect();
    Ok((headers, Json(body)).into_response())
}

pub(super) fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("hex and digits are valid header values")
}

/// The deprecated v1 list: running sandboxes, optionally filtered by metadata.
pub(super) async fn list_v1(
    State(state): State<Arc<AppState>>,
    uri: Uri,
) -> ApiResult<Json<Vec<types::ListedSandbox>>> {
    let mut metadata = Vec::new();
    for (k, v) in query_pairs(&uri)? {
        if k == "metadata" {
            metadata.extend(parse_metadata(&v)?);
        }
    }
    let mut rows: Vec<Row> = all_sandboxes(&state)
        .await?
        .into_iter()
        .filter(|r| {
            r.listed.state == types::SandboxState::Running && matches_metadata(r, &metadata)
        })
        .collect();
    rows.sort_by(|a, b| b.key().cmp(&a.key()));
    Ok(Json(rows.into_iter().map(|r| r.listed).collect()))
}
