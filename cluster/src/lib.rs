//! kiln's cluster coordination through etcd, and nothing else: which `kiln serve` nodes are
//! live ([`membership`]), which node owns which sandbox ([`catalog`]), and where a new sandbox
//! goes ([`placement`]). All of it lives in etcd, written with transactions that compare
//! revisions (compare-and-swap), never read-then-write; kiln runs no consensus, election or
//! membership protocol of its own. Bulk data (images, snapshots) is the block store's, on S3.
//!
//! Keys: `nodes/<node id>` (held by the node's lease), `sandboxes/<sandbox id>` and
//! `templates/<name>` ([`templates`]) and `drains/<node id>` ([`drain`]), all JSON. [`admin`]
//! is what `kiln node` does with them.

pub mod admin;
pub mod catalog;
pub mod drain;
pub mod etcd;
pub mod membership;
pub mod placement;
pub mod templates;

pub use catalog::{Catalog, Pushed, SandboxEntry, SandboxState};
pub use etcd::Etcd;
pub use membership::{Membership, NodeInfo};
pub use templates::{TemplateEntry, TemplateKind, Templates};

/// What can go wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid URL {0:?} (expected http://host:port)")]
    Endpoint(String),
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    #[error("etcd refused {path} (HTTP {status}): {body}")]
    Refused {
        path: String,
        status: u16,
        body: String,
    },
    #[error("etcd answered {path} with something unexpected: {why}")]
    BadAnswer { path: String, why: String },
    #[error(
        "node id {0:?} is already live in the cluster (another kiln serve holds its lease; \
         a node killed just now frees it when its lease expires)"
    )]
    NodeIdTaken(String),
    #[error("invalid node id {0:?} (letters, digits, '-', '_' and '.', at most 64)")]
    NodeId(String),
    #[error("{0} kept changing while it was written; try again")]
    Contended(String),
    #[error("no node {0:?} in the cluster: none is live under that id, and no sandbox names it")]
    NoSuchNode(String),
    #[error("the value of {key} is not what kiln writes: {why}")]
    Value { key: String, why: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `host:port` of a URL `http://host:port` (the scheme may be left out; kiln's cluster
/// speaks plain HTTP: etcd's client URLs and the nodes' advertise URLs).
pub fn authority(url: &str) -> Result<String> {
    let u = url.trim();
    let rest = u.strip_prefix("http://").unwrap_or(u);
    let authority = rest.trim_end_matches('/');
    let port_ok = authority
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
    if !port_ok || authority.contains(['/', '@', '?', '#']) || rest.contains("://") {
        return Err(Error::Endpoint(u.to_string()));
    }
    Ok(authority.to_string())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads a JSON value kiln wrote at `key`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::Value {
        key: key.to_string(),
        why: e.to_string(),
    })
}
