//! Cluster mode (opt-in: [`ClusterConfig`]; issue 20, first part): this node joins the nodes
//! coordinated through etcd ([`kiln_cluster`]), writes its sandboxes to the cluster's catalog,
//! lists the whole cluster, and forwards what concerns another node's sandbox to that node.
//!
//! - Catalog: this node writes the entries of the sandboxes it owns and no others. The
//!   sandboxes are observed in two places: the reaper's once-a-second sweep ([`crate::reaper`],
//!   the runtime's reconciling list, which also applies timeouts and sees sandboxes that died
//!   or auto-resumed), and after every control-plane request that changed something (create,
//!   kill, pause, resume, timeout, ...: [`control`]), so the catalog is current when the
//!   answer leaves. Each write is a compare-and-swap on the entry's revision.
//! - Forwarding: a request for a sandbox this node does not have (control plane routes under
//!   `/sandboxes/{id}` and `/v2/sandboxes/{id}`, the envd data plane, other ports by header or
//!   `{port}-{id}.{domain}` Host) goes to the owner's advertise URL as it came (streamed both
//!   ways, upgrades piped). A create is placed by [`kiln_cluster::placement`] and forwarded
//!   when another node is chosen.
//! - Node-to-node requests carry [`FORWARDED_BY`] and the cluster secret in [`SECRET_HEADER`];
//!   the receiving node checks the secret in constant time, refuses the request without it,
//!   never forwards it again, and takes it without an API key (the first node checked it).

use crate::control::types;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_cluster::placement::{self, Need};
use kiln_cluster::{membership, Catalog, Etcd, Membership, NodeInfo, SandboxEntry};
use kiln_runtime::SandboxRecord;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// The node a forwarded request comes from.
pub const FORWARDED_BY: &str = "x-kiln-forwarded-by";
/// The cluster secret, on every node-to-node request.
pub const SECRET_HEADER: &str = "x-kiln-cluster-secret";
/// The lease of a node's membership: a node that stops renewing is gone after this long.
const LEASE_TTL_SECS: u64 = 5;
/// The most sandboxes one node takes.
const MAX_SANDBOXES: u32 = 256;
/// What placement assumes a new sandbox needs: the request names a template whose size the
/// node that has it knows, so a gVisor sandbox of kiln's defaults.
fn create_need() -> Need {
    Need {
        cpus: kiln_runtime::default_cpus(kiln_runtime::RuntimeKind::Gvisor),
        memory_mib: kiln_runtime::DEFAULT_MEMORY_MIB,
    }
}

/// How this node joins a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// etcd's client URLs (`http://host:port`).
    pub etcd: Vec<String>,
    pub node_id: String,
    /// Where the other nodes reach this one (`http://host:port`).
    pub advertise: String,
    /// Shared by every node; authenticates node-to-node requests.
    pub secret: String,
}

/// A node-to-node request without the right cluster secret.
struct WrongSecret;

/// A request that came from another node with the right secret.
#[derive(Clone, Copy)]
pub(crate) struct Forwarded;

/// This node in the cluster.
pub(crate) struct Cluster {
    pub(crate) node_id: String,
    secret: String,
    advertise: String,
    etcd: Arc<Etcd>,
    membership: Arc<Membership>,
    catalog: Catalog,
    /// The catalog entries this node wrote, with their revisions (None: not read yet).
    written: tokio::sync::Mutex<Option<HashMap<String, (SandboxEntry, i64)>>>,
}

impl Cluster {
    /// Joins: registers the node under its lease (etcd unreachable is an error here, so a
    /// node never starts outside the cluster it was told to join), writes its sandboxes to
    /// the catalog, and keeps the lease alive from then on.
    pub(crate) async fn join(
        cfg: ClusterConfig,
        recs: &[SandboxRecord],
    ) -> kiln_cluster::Result<Cluster> {
        let etcd = Arc::new(Etcd::new(&cfg.etcd)?);
        kiln_cluster::authority(&cfg.advertise)?;
        let mut info = NodeInfo::host();
        info.advertise = cfg.advertise.clone();
        info.max_sandboxes = MAX_SANDBOXES;
        let membership =
            Membership::register(etcd.clone(), &cfg.node_id, info, LEASE_TTL_SECS).await?;
        membership.spawn_keepalive();
        let c = Cluster {
            node_id: cfg.node_id,
            secret: cfg.secret,
            advertise: cfg.advertise,
            catalog: Catalog::new(etcd.clone()),
            etcd,
            membership,
            written: Default::default(),
        };
        c.sync(recs).await;
        Ok(c)
    }

    /// Brings the catalog's entries of this node in line with its sandboxes `recs` (all of
    /// them, as the runtime lists them) and refreshes what the node publishes. Failures are
    /// logged: the next sweep tries again.
    pub(crate) async fn sync(&self, recs: &[SandboxRecord]) {
        let desired: BTreeMap<String, SandboxEntry> = recs
            .iter()
            .filter_map(|r| Some((r.id.clone(), self.entry(r)?)))
            .collect();
        self.membership.set_info(self.info(&desired));
        let mut guard = self.written.lock().await;
        if guard.is_none() {
            match self.catalog.list().await {
                Ok(all) => {
                    *guard = Some(
                        all.into_iter()
                            .filter(|(_, e, _)| e.node == self.node_id)
                            .map(|(id, e, rev)| (id, (e, rev)))
                            .collect(),
                    )
                }
                Err(e) => {
                    tracing::warn!("cluster catalog: {e}");
                    return;
                }
            }
        }
        let written = guard.as_mut().expect("loaded above");
        for (id, want) in &desired {
            if written.get(id).is_some_and(|(e, _)| e == want) {
                continue;
            }
            if let Err(e) = self.write(written, id, want).await {
                tracing::warn!(id, "cluster catalog: {e}");
            }
        }
        let gone: Vec<String> = written
            .keys()
            .filter(|id| !desired.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Err(e) = self.erase(written, &id).await {
                tracing::warn!(id, "cluster catalog: {e}");
            }
        }
    }

    /// [`Cluster::sync`] from the records on disk, right after a request changed one.
    pub(crate) async fn sync_now(&self, sandboxes: &Arc<kiln_runtime::Sandboxes>) {
        let sb = sandboxes.clone();
        if let Ok(recs) = tokio::task::spawn_blocking(move || sb.records()).await {
            self.sync(&recs).await;
        }
    }

    /// Writes `want` as sandbox `id`'s entry: compare-and-swap on the revision this node
    /// last saw; on a conflict it looks again, and leaves an entry another node owns alone.
    async fn write(
        &self,
        written: &mut HashMap<String, (SandboxEntry, i64)>,
        id: &str,
        want: &SandboxEntry,
    ) -> kiln_cluster::Result<()> {
        for _ in 0..3 {
            let done = match written.get(id) {
                Some((_, rev)) => self.catalog.update(id, want, *rev).await?,
                None => self.catalog.create(id, want).await?,
            };
            if let Some(rev) = done {
                written.insert(id.to_string(), (want.clone(), rev));
                return Ok(());
            }
            match self.catalog.get(id).await? {
                Some((cur, rev)) if cur.node == self.node_id => {
                    written.insert(id.to_string(), (cur, rev));
                }
                Some((cur, _)) => {
                    tracing::warn!(id, owner = %cur.node, "the catalog gives this sandbox to another node");
                    written.remove(id);
                    return Ok(());
                }
                None => {
                    written.remove(id);
                }
            }
        }
        Ok(())
    }

    /// Removes sandbox `id`'s entry if this node still owns it.
    async fn erase(
        &self,
        written: &mut HashMap<String, (SandboxEntry, i64)>,
        id: &str,
    ) -> kiln_cluster::Result<()> {
        for _ in 0..3 {
            let Some((_, rev)) = written.get(id) else {
                return Ok(());
            };
            if self.catalog.remove(id, *rev).await? {
                written.remove(id);
                return Ok(());
            }
            match self.catalog.get(id).await? {
                Some((cur, rev)) if cur.node == self.node_id => {
                    written.insert(id.to_string(), (cur, rev));
                }
                _ => {
                    written.remove(id);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// A sandbox's catalog entry (None: gone to the API, failed or stopped).
    fn entry(&self, r: &SandboxRecord) -> Option<SandboxEntry> {
        let state = match types::SandboxState::of(r)? {
            types::SandboxState::Running => kiln_cluster::SandboxState::Running,
            types::SandboxState::Paused => kiln_cluster::SandboxState::Paused,
        };
        Some(SandboxEntry {
            node: self.node_id.clone(),
            state,
            template: r.source.clone(),
            alias: r.name.clone(),
            metadata: r.metadata.clone(),
            started_ms: r.created_ms,
            end_ms: r.deadline_ms,
            cpus: r.cpus,
            memory_mib: r.memory_mib,
            disk_mib: r.disk_mib,
        })
    }

    fn info(&self, desired: &BTreeMap<String, SandboxEntry>) -> NodeInfo {
        let running = || {
            desired
                .values()
                .filter(|e| e.state == kiln_cluster::SandboxState::Running)
        };
        NodeInfo {
            advertise: self.advertise.clone(),
            sandboxes: running().count() as u32,
            sandbox_cpus: running().map(|e| e.cpus).sum(),
            max_sandboxes: MAX_SANDBOXES,
            ..NodeInfo::host()
        }
    }

    /// The whole cluster's sandboxes.
    pub(crate) async fn catalog(&self) -> kiln_cluster::Result<Vec<(String, SandboxEntry)>> {
        Ok(self
            .catalog
            .list()
            .await?
            .into_iter()
            .map(|(id, e, _)| (id, e))
            .collect())
    }

    /// Whether `headers` say the request comes from another node: Ok(true) with the right
    /// secret, Err with a missing or wrong one.
    fn check_forwarded(&self, headers: &axum::http::HeaderMap) -> Result<bool, WrongSecret> {
        if !headers.contains_key(FORWARDED_BY) && !headers.contains_key(SECRET_HEADER) {
            return Ok(false);
        }
        let given = headers
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if given.is_empty() || !crate::constant_time_eq(given, self.secret.as_bytes()) {
            return Err(WrongSecret);
        }
        Ok(true)
    }

    /// Sends `req` to node `node` (its advertise URL) as a node-to-node request.
    async fn forward(&self, node: &str, mut req: Request) -> Response {
        let info = match membership::node(&self.etcd, node).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("node {node}, which owns this sandbox, is not live"),
                )
            }
            Err(e) => return unavailable(e),
        };
        let authority = match kiln_cluster::authority(&info.advertise) {
            Ok(a) => a,
            Err(e) => return refuse(StatusCode::BAD_GATEWAY, &e.to_string()),
        };
        let h = req.headers_mut();
        h.insert(FORWARDED_BY, header_value(&self.node_id));
        h.insert(SECRET_HEADER, header_value(&self.secret));
        let connect = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&authority),
        )
        .await;
        let tcp = match connect {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return refuse(
                    StatusCode::BAD_GATEWAY,
                    &format!("node {node} ({authority}): {e}"),
                )
            }
            Err(_) => {
                return refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("node {node} ({authority}) did not answer"),
                )
            }
        };
        match crate::proxy::send(tcp, req).await {
            Ok(resp) => resp,
            Err(crate::proxy::SendError::Handshake(e) | crate::proxy::SendError::Send(e)) => {
                refuse(StatusCode::BAD_GATEWAY, &format!("node {node}: {e}"))
            }
        }
    }

    /// The node that owns sandbox `id` when it is not this one (None: this node has it, or
    /// nobody does).
    async fn other_owner(
        &self,
        state: &AppState,
        id: &str,
    ) -> Result<Option<String>, kiln_cluster::Error> {
        let sb = state.sandboxes.clone();
        let id2 = id.to_string();
        let local = tokio::task::spawn_blocking(move || sb.record(&id2).is_ok())
            .await
            .unwrap_or(false);
        if local {
            return Ok(None);
        }
        Ok(self
            .catalog
            .get(id)
            .await?
            .map(|(e, _)| e.node)
            .filter(|n| *n != self.node_id))
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// E2B's `{code, message}`.
fn refuse(status: StatusCode, message: &str) -> Response {
    crate::control::ApiError::new(status, message).into_response()
}

fn unavailable(e: kiln_cluster::Error) -> Response {
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("cluster catalog: {e}"),
    )
}

/// First step of every request in cluster mode: checks a node-to-node request's secret
/// (then strips it, so it reaches neither handlers nor sandboxes) and marks it [`Forwarded`];
/// the refusal when the secret is wrong or missing.
pub(crate) fn admit(state: &AppState, req: &mut Request) -> Option<Response> {
    let c = state.cluster.as_ref()?;
    match c.check_forwarded(req.headers()) {
        Ok(true) => {
            req.headers_mut().remove(SECRET_HEADER);
            req.headers_mut().remove(FORWARDED_BY);
            req.extensions_mut().insert(Forwarded);
            None
        }
        Ok(false) => None,
        Err(WrongSecret) => Some(refuse(
            StatusCode::UNAUTHORIZED,
            "node-to-node request without the right cluster secret",
        )),
    }
}

fn forwarded(req: &Request) -> bool {
    req.extensions().get::<Forwarded>().is_some()
}

/// A data-plane request (envd, or another port) for sandbox `id`: Ok(answer) when it was
/// forwarded to the owner, Err(req) when this node serves it.
pub(crate) async fn data_plane(
    state: &AppState,
    id: &str,
    port: u16,
    mut req: Request,
) -> Result<Response, Request> {
    let Some(c) = &state.cluster else {
        return Err(req);
    };
    if forwarded(&req) {
        return Err(req);
    }
    match c.other_owner(state, id).await {
        Ok(Some(node)) => {
            // The owner's domain may differ: the sandbox and port travel in E2B's headers.
            let h = req.headers_mut();
            h.insert("e2b-sandbox-id", header_value(id));
            h.insert("e2b-sandbox-port", header_value(&port.to_string()));
            Ok(c.forward(&node, req).await)
        }
        Ok(None) => Err(req),
        Err(e) => Ok(unavailable(e)),
    }
}

/// The sandbox a control-plane path names: `/sandboxes/{id}...` or `/v2/sandboxes/{id}...`.
fn sandbox_in_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2").unwrap_or(path);
    let rest = rest.strip_prefix("/sandboxes/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty() && id != "metrics").then_some(id)
}

fn is_create(req: &Request) -> bool {
    req.method() == Method::POST && matches!(req.uri().path(), "/sandboxes" | "/v2/sandboxes")
}

/// The control plane in cluster mode (a route layer inside the API key check): forwards
/// requests for another node's sandbox to it, places creates, and writes the catalog after a
/// request that changed something here.
pub(crate) async fn control(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(c) = &state.cluster else {
        return next.run(req).await;
    };
    if !forwarded(&req) {
        if is_create(&req) {
            let (mut nodes, entries) =
                match tokio::try_join!(membership::nodes(&c.etcd), c.catalog()) {
                    Ok(x) => x,
                    Err(e) => return unavailable(e),
                };
            placement::count_from_catalog(&mut nodes, &entries);
            match placement::choose(&nodes, create_need()) {
                Some(node) if node != c.node_id => return c.forward(node, req).await,
                Some(_) => {}
                None => {
                    return refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no node of the cluster has room for a new sandbox",
                    )
                }
            }
        } else if let Some(id) = sandbox_in_path(req.uri().path()) {
            match c.other_owner(&state, id).await {
                Ok(Some(node)) => return c.forward(&node, req).await,
                Ok(None) => {}
                Err(e) => return unavailable(e),
            }
        }
    }
    let changes = req.method() != Method::GET;
    let resp = next.run(req).await;
    if changes && resp.status().is_success() {
        c.sync_now(&state.sandboxes).await;
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_paths() {
        assert_eq!(sandbox_in_path("/sandboxes/abc"), Some("abc"));
        assert_eq!(sandbox_in_path("/sandboxes/abc/pause"), Some("abc"));
        assert_eq!(sandbox_in_path("/v2/sandboxes/abc/connect"), Some("abc"));
        assert_eq!(sandbox_in_path("/sandboxes/metrics"), None);
        assert_eq!(sandbox_in_path("/sandboxes"), None);
        assert_eq!(sandbox_in_path("/v2/sandboxes"), None);
        assert_eq!(sandbox_in_path("/templates/abc"), None);
    }
}
