//! Signed file URLs across the cluster: such a URL names no sandbox (the SDK sends it to
//! `E2B_SANDBOX_URL`, any node behind the load balancer); its signature does, made with one
//! sandbox's envd token, which only the sandbox's node holds. A node that finds no sandbox of
//! its own for a signature asks every other live node at once with a probe (the same method
//! and URI, no body, node to node, [`PROBE_HEADER`]): the node whose sandbox the signature
//! names answers 204 without doing anything, the others 404, and the request goes to the
//! first that said yes.

use super::Cluster;
use axum::http::{Method, StatusCode, Uri};
use kiln_cluster::NodeInfo;

/// Marks a node-to-node probe for a signed file URL (honoured only on a request that carries
/// the cluster secret).
pub(crate) const PROBE_HEADER: &str = "x-kiln-signed-probe";

impl Cluster {
    /// The other live node whose sandbox the signed file URL `method uri` names, if one says
    /// so in time ([`Cluster::ask`]).
    pub(crate) async fn signed_owner(
        &self,
        method: &Method,
        uri: &Uri,
    ) -> Option<(String, NodeInfo)> {
        let probes = self
            .others()
            .await
            .ok()?
            .into_iter()
            .map(|(node, info)| {
                let probe = axum::http::Request::builder()
                    .method(method.clone())
                    .uri(uri.clone())
                    .header(PROBE_HEADER, "1")
                    .body(axum::body::Body::empty());
                Box::pin(async move {
                    let probe = probe.ok()?;
                    let resp = self.ask(&node, &info, probe).await?;
                    (resp.status() == StatusCode::NO_CONTENT).then_some((node, info))
                })
            })
            .collect::<Vec<_>>();
        if probes.is_empty() {
            return None;
        }
        // The first yes; a node that is slow or says no does not hold the others up.
        let mut pending = probes;
        while !pending.is_empty() {
            let (found, _, rest) = futures_util::future::select_all(pending).await;
            if found.is_some() {
                return found;
            }
            pending = rest;
        }
        None
    }
}

/// Whether `req` is another node's probe ([`PROBE_HEADER`] on a request with the secret).
pub(crate) fn is_probe(req: &axum::extract::Request) -> bool {
    super::forwarded(req) && req.headers().contains_key(PROBE_HEADER)
}

/// A signed file URL for which this node has no sandbox: Ok(the answer of the node that
/// has it), Err(req) when none does (or not in cluster mode, or asked by another node).
pub(crate) async fn signed_elsewhere(
    state: &crate::AppState,
    req: axum::extract::Request,
) -> Result<axum::response::Response, axum::extract::Request> {
    let Some(c) = &state.cluster else {
        return Err(req);
    };
    if super::forwarded(&req) {
        return Err(req);
    }
    let Some((node, info)) = c.signed_owner(req.method(), req.uri()).await else {
        return Err(req);
    };
    Ok(c.forward(&node, &info, req).await.unwrap_or_else(|| {
        super::refuse(
            StatusCode::BAD_GATEWAY,
            &format!("node {node}, whose sandbox the signature names, went away"),
        )
    }))
}
