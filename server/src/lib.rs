//! `kiln serve`: one daemon over this host's sandboxes whose HTTP API is E2B's, so E2B's SDKs
//! drive kiln unchanged.
//!
//! - Control plane ([`control`]): E2B's REST API (`spec/openapi.yml` in e2b-dev/infra).
//! - Data plane ([`envd`]): envd's connect-rpc services and `/files`, carried to the kiln agent
//!   in the sandbox; other ports are proxied into the sandbox through the agent ([`proxy`]).
//!
//! In cluster mode ([`ClusterConfig`], `kiln serve --cluster-etcd`) the node joins other
//! nodes through etcd, lists the whole cluster and forwards requests for other nodes'
//! sandboxes to them ([`cluster`]); without it, nothing of that runs.
//!
//! A request is data plane when it names a sandbox: the `E2b-Sandbox-Id` and
//! `E2b-Sandbox-Port` headers (the SDK sends them when `E2B_SANDBOX_URL` is set) or a Host of
//! the form `{port}-{sandbox id}.{domain}`; everything else is control plane.
//!
//! The daemon keeps its own state under `KILN_HOME/serve/`: the API key (`api-key`, 0600,
//! unless `KILN_API_KEY` is set). Sandboxes themselves are the runtime's, with their access
//! tokens (envd's, E2B's traffic token) in their records, which the runtime makes before the
//! sandbox starts: they run in their own processes and outlive a restart of the daemon, which
//! reloads them at start. (Daemons before this one kept envd tokens in `serve/tokens/<id>`;
//! the first start moves them into the records.)

mod builds;
pub mod client;
mod cluster;
pub mod control;
mod egress;
pub mod envd;
pub mod metrics;
pub mod proxy;
mod reaper;
mod secret;
mod signed;
pub mod timefmt;
pub mod wake;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use cluster::ClusterConfig;
pub use secret::{constant_time_eq, load_or_create_api_key, random_token};

/// envd's port in an E2B sandbox: requests for it are served by [`envd`], others proxied.
pub const ENVD_PORT: u16 = 49983;

/// What can stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {}: {err}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error(
        "refusing to listen on {0}, which is not a loopback address: kiln serve has no TLS; \
         pass --allow-remote to listen there anyway (behind a TLS proxy or a trusted network)"
    )]
    NotLoopback(SocketAddr),
    #[error("listening on {addr}: {err}")]
    Listen {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::Error),
    #[error("joining the cluster")]
    Cluster(#[from] kiln_cluster::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What every handler shares.
pub struct AppState {
    pub sandboxes: Arc<kiln_runtime::Sandboxes>,
    /// The control plane's API key (`X-API-Key`).
    pub api_key: String,
    /// The domain in `{port}-{id}.{domain}` host names and in create responses.
    pub domain: String,
    /// `KILN_HOME/serve`: the daemon's own files.
    pub serve_dir: PathBuf,
    /// envd's per-sandbox state in this daemon (process metadata, users, watchers).
    pub(crate) envd: Arc<envd::EnvdState>,
    /// Samples of every sandbox's CPU, memory and disk (taken by [`reaper`]'s sweeps).
    pub(crate) metrics: metrics::Metrics,
    /// Resumes under way ([`wake`]).
    pub(crate) wakes: wake::Wakes,
    /// Template builds through E2B's SDK ([`builds`]).
    pub(crate) builds: Arc<builds::Builds>,
    /// This node in a cluster (cluster mode only: [`cluster`]).
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
}

impl AppState {
    /// The state for sandboxes `sandboxes`, with the daemon's files under `serve_dir`.
    pub fn new(
        sandboxes: Arc<kiln_runtime::Sandboxes>,
        api_key: String,
        domain: String,
        serve_dir: PathBuf,
    ) -> AppState {
        AppState {
            sandboxes,
            api_key,
            domain,
            envd: Default::default(),
            metrics: Default::default(),
            wakes: Default::default(),
            builds: Arc::new(builds::Builds::new(
                &serve_dir,
                builds::build_tmp(serve_dir.parent().unwrap_or(&serve_dir)),
            )),
            serve_dir,
            cluster: None,
        }
    }
}

/// How `kiln serve` runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// `None`: `localhost:<port>` (`*.localhost` resolves to loopback), so
    /// `{port}-{id}.localhost:<port>` reaches this listener.
    pub domain: Option<String>,
    pub allow_remote: bool,
    /// `KILN_API_KEY`, else the key in `KILN_HOME/serve/api-key` (generated at first start).
    pub api_key: Option<String>,
    /// `KILN_HOME`.
    pub home: PathBuf,
    /// Cluster mode: the node joins the cluster through etcd. None: one host, no etcd.
    pub cluster: Option<ClusterConfig>,
}

/// How long a busy listen address is retried before it is an error.
const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds the API's listener. A daemon restarted right after a crash can find its port still
/// held for a moment: a child the old daemon had forked keeps a copy of the listener until it
/// execs (runsc's launch does mount work between fork and exec). So "in use" is retried for
/// [`BIND_RETRY`] before it is the answer; a second daemon on the port still fails, just later.
async fn bind_listener(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(err)
                if err.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < BIND_RETRY =>
            {
                if !said {
                    tracing::warn!(%addr, "address in use; retrying for a few seconds");
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            r => return r.map_err(|err| Error::Listen { addr, err }),
        }
    }
}

/// Checks the listen address: loopback only, unless remote listening was allowed.
pub fn check_listen(addr: SocketAddr, allow_remote: bool) -> Result<()> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(Error::NotLoopback(addr))
    }
}

/// Where the generated API key lives.
pub fn api_key_path(home: &Path) -> PathBuf {
    home.join("serve").join("api-key")
}

/// The whole service (control and data plane) as one router over `state`.
pub fn app(state: Arc<AppState>) -> axum::Router {
    control::router(state.clone())
        .layer(axum::middleware::from_fn_with_state(state, dispatch))
        .layer(axum::middleware::from_fn(log_request))
}

/// Binds, reloads the host's sandboxes, starts the timeout enforcer and serves until the
/// process ends. `on_ready` is called with the bound address and the key file (None when the
/// key came from the environment) before the first request is accepted.
pub async fn run(
    cfg: ServeConfig,
    sandboxes: kiln_runtime::Sandboxes,
    on_ready: impl FnOnce(SocketAddr, Option<&Path>),
) -> Result<()> {
    check_listen(cfg.listen, cfg.allow_remote)?;
    let serve_dir = cfg.home.join("serve");
    std::fs::create_dir_all(&serve_dir).map_err(|err| Error::Io {
        what: "create",
        path: serve_dir.clone(),
        err,
    })?;
    let (api_key, key_file) = match cfg.api_key.filter(|k| !k.is_empty()) {
        Some(k) => (k, None),
        None => {
            let p = api_key_path(&cfg.home);
            let k = load_or_create_api_key(&p).map_err(|err| Error::Io {
                what: "api key",
                path: p.clone(),
                err,
            })?;
            (k, Some(p))
        }
    };
    let listener = bind_listener(cfg.listen).await?;
    let addr = listener.local_addr().map_err(|err| Error::Listen {
        addr: cfg.listen,
        err,
    })?;
    let domain = cfg
        .domain
        .unwrap_or_else(|| format!("localhost:{}", addr.port()));
    let sandboxes = Arc::new(sandboxes);
    // Reload: liveness, interrupted operations and expired deadlines, before serving; tokens
    // an older daemon kept beside the records go into them first.
    let sb = sandboxes.clone();
    let tokens = serve_dir.join("tokens");
    let reloaded = tokio::task::spawn_blocking(move || {
        secret::migrate_tokens(&sb, &tokens);
        sb.list()
    })
    .await
    .map_err(|e| Error::Serve(std::io::Error::other(e)))??;
    tracing::info!(sandboxes = reloaded.len(), "reloaded sandboxes");
    let mut state = AppState::new(sandboxes, api_key, domain, serve_dir);
    if let Some(cc) = cfg.cluster {
        let c = cluster::Cluster::join(cc, &state.sandboxes, &state.serve_dir).await?;
        tracing::info!(node = %c.node_id, "cluster mode");
        state.cluster = Some(Arc::new(c));
    }
    let state = Arc::new(state);
    tokio::spawn(reaper::run(state.clone()));
    on_ready(addr, key_file.as_deref());
    serve(listener, app(state)).await;
    Ok(())
}

/// Serves `app` on `listener` as `axum::serve` does (HTTP/1 and 2, upgrades), except that
/// HTTP/1 header names keep the case they came in: hyper records it in each request, and the
/// port proxy ([`proxy`]) sends them into the sandbox as they were sent, and the sandbox's
/// answers back the same way (hyper lower-cases them otherwise).
async fn serve(listener: tokio::net::TcpListener, app: axum::Router) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // A connection that failed before it was accepted concerns only its client.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            // Out of descriptors and the like: wait for some to be freed.
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http1().preserve_header_case(true);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await
            {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

/// Data-plane requests (they name a sandbox, or are signed file URLs: [`signed`]) go to
/// [`envd::handle`]; the rest on to the control plane.
async fn dispatch(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    if let Some(refused) = cluster::admit(&state, &mut req) {
        return refused;
    }
    if let Some((id, port)) = data_plane_target(req.headers(), &state.domain) {
        // In cluster mode another node's sandbox is served by that node.
        let req = match cluster::data_plane(&state, &id, port, req).await {
            Ok(forwarded) => return forwarded,
            Err(req) => req,
        };
        return envd::handle(state, id, port, req).await;
    }
    // A signed file URL names no sandbox when the SDK has E2B_SANDBOX_URL: its signature does.
    if signed::is_signed(req.method(), req.uri()) {
        let sb = state.sandboxes.clone();
        let records = tokio::task::spawn_blocking(move || sb.records())
            .await
            .unwrap_or_default();
        let found = signed::sandbox_of(req.method(), req.uri(), &records).map(|r| r.id.clone());
        // Another node asking whether the signature names a sandbox here: yes or no, nothing
        // done.
        if cluster::is_probe(&req) {
            let status = match found {
                Some(_) => StatusCode::NO_CONTENT,
                None => StatusCode::NOT_FOUND,
            };
            return status.into_response();
        }
        return match found {
            Some(id) => envd::handle(state, id, ENVD_PORT, req).await,
            // In cluster mode, a sandbox of another node's.
            None => match cluster::signed_elsewhere(&state, req).await {
                Ok(answer) => answer,
                Err(_) => signed::invalid(),
            },
        };
    }
    next.run(req).await
}

/// `(sandbox id, port)` when the request is for the data plane: the `E2b-Sandbox-Id` header
/// (port from `E2b-Sandbox-Port`, envd's by default), or a Host `{port}-{id}.{domain}`.
pub fn data_plane_target(headers: &HeaderMap, domain: &str) -> Option<(String, u16)> {
    if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        let port = headers
            .get("e2b-sandbox-port")
            .and_then(|v| v.to_str().ok())
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(ENVD_PORT);
        return Some((id.trim().to_string(), port));
    }
    let host = headers.get("host").and_then(|v| v.to_str().ok())?;
    parse_sandbox_host(host, domain)
}

/// `{port}-{id}.{domain}` (the Host header may or may not carry the listener's port, and the
/// domain may or may not carry one).
pub fn parse_sandbox_host(host: &str, domain: &str) -> Option<(String, u16)> {
    let host = host.trim().to_ascii_lowercase();
    let domain = domain.trim().to_ascii_lowercase();
    let label = host
        .strip_suffix(&domain)
        .and_then(|h| h.strip_suffix('.'))
        .or_else(|| {
            let h = strip_port(&host);
            h.strip_suffix(strip_port(&domain))?.strip_suffix('.')
        })?;
    if label.contains('.') {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    let port = port.parse().ok()?;
    (!id.is_empty()).then(|| (id.to_string(), port))
}

fn strip_port(h: &str) -> &str {
    match h.rsplit_once(':') {
        Some((name, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    }
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let t = std::time::Instant::now();
    let res = next.run(req).await;
    tracing::info!(
        %method,
        path,
        status = res.status().as_u16(),
        ms = t.elapsed().as_millis() as u64,
        "request"
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_hosts() {
        let d = "localhost:3000";
        assert_eq!(
            parse_sandbox_host("49983-abc.localhost:3000", d),
            Some(("abc".into(), 49983))
        );
        assert_eq!(
            parse_sandbox_host("8080-abc.localhost", d),
            Some(("abc".into(), 8080))
        );
        assert_eq!(
            parse_sandbox_host("8080-abc.kiln.example", "kiln.example"),
            Some(("abc".into(), 8080))
        );
        assert_eq!(parse_sandbox_host("localhost:3000", d), None);
        assert_eq!(parse_sandbox_host("127.0.0.1:3000", d), None);
        assert_eq!(parse_sandbox_host("x.y.localhost:3000", d), None);
        assert_eq!(parse_sandbox_host("abc.localhost:3000", d), None);
    }

    #[test]
    fn headers_name_the_sandbox() {
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:3000".parse().unwrap());
        assert_eq!(data_plane_target(&h, "localhost:3000"), None);
        h.insert("e2b-sandbox-id", "abc".parse().unwrap());
        assert_eq!(
            data_plane_target(&h, "localhost:3000"),
            Some(("abc".into(), ENVD_PORT))
        );
        h.insert("e2b-sandbox-port", "8080".parse().unwrap());
        assert_eq!(
            data_plane_target(&h, "localhost:3000"),
            Some(("abc".into(), 8080))
        );
    }

    #[test]
    fn listen_is_loopback_unless_allowed() {
        assert!(check_listen("127.0.0.1:3000".parse().unwrap(), false).is_ok());
        assert!(check_listen("[::1]:3000".parse().unwrap(), false).is_ok());
        assert!(check_listen("0.0.0.0:3000".parse().unwrap(), false).is_err());
        assert!(check_listen("0.0.0.0:3000".parse().unwrap(), true).is_ok());
    }
}
