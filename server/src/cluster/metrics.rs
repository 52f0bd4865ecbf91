//! `GET /sandboxes/metrics` across the cluster: the latest samples of sandboxes that other
//! nodes own are asked of those nodes (node to node, all at once) and merged with this
//! node's own, so the answer through any node covers every sandbox asked for.

use super::Cluster;
use crate::control::types::{SandboxMetric, SandboxesWithMetrics};
use kiln_cluster::SandboxState;
use std::collections::{BTreeMap, HashSet};

impl Cluster {
    /// The latest samples of those of `ids` that run on other live nodes (not in `here`);
    /// an owner that does not answer in time leaves its sandboxes out, as E2B leaves out
    /// sandboxes it has no sample of.
    pub(crate) async fn metrics_elsewhere(
        &self,
        ids: &[String],
        here: &HashSet<String>,
    ) -> BTreeMap<String, SandboxMetric> {
        let wanted: HashSet<&str> = ids
            .iter()
            .filter(|id| !here.contains(*id))
            .map(String::as_str)
            .collect();
        if wanted.is_empty() {
            return BTreeMap::new();
        }
        let entries = match self.catalog().await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("metrics of other nodes' sandboxes left out: {e}");
                return BTreeMap::new();
            }
        };
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, e) in entries {
            if wanted.contains(id.as_str())
                && e.state == SandboxState::Running
                && e.node != self.node_id
            {
                by_node.entry(e.node).or_default().push(id);
            }
        }
        let asks = by_node.into_iter().map(|(node, ids)| async move {
            let info = kiln_cluster::membership::node(&self.etcd, &node)
                .await
                .ok()??;
            let path = format!("/sandboxes/metrics?sandbox_ids={}", ids.join(","));
            let req = axum::http::Request::get(path)
                .body(axum::body::Body::empty())
                .ok()?;
            let resp = self.ask(&node, &info, req).await?;
            if !resp.status().is_success() {
                return None;
            }
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.ok()?;
            serde_json::from_slice::<SandboxesWithMetrics>(&body).ok()
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .flat_map(|m| m.sandboxes)
            .filter(|(id, _)| wanted.contains(id.as_str()))
            .collect()
    }
}
