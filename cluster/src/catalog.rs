//! The cluster's sandbox catalog: `sandboxes/<id>` -> [`SandboxEntry`] (owner node, state,
//! what E2B's lists show). Every change is a transaction comparing the key's mod revision (or
//! its absence), so two writers never overwrite each other unseen: a conflict comes back as
//! `None`/`false` and the caller re-reads.
//!
//! A sandbox that failed stays in the catalog as `failed` with its cause (a tombstone) until
//! its end time has passed, so every node can say why it is gone: its owner writes its own
//! failures (out of memory, ...), and any live node writes `failed` over the `running`
//! entries of a node whose lease has expired ([`SandboxEntry::lost`]), each with a
//! compare-and-swap, so one writer wins.
//!
//! A paused sandbox whose snapshot is in the store's S3 remote carries it ([`Pushed`]) with
//! what its record holds beyond the snapshot: any node can then adopt and resume it once its
//! owner is gone, after taking it over ([`Catalog::take_over`], the same compare-and-swap).
//! One its node let go ([`SandboxEntry::released`], a drain) is taken over the same way
//! while that node lives ([`Catalog::take_over_released`]).

use crate::etcd::Cond;
use crate::{decode, membership, Etcd, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const PREFIX: &str = "sandboxes/";

/// A sandbox's state as the cluster lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
    /// Gone, for the reason in [`SandboxEntry::cause`]; listed nowhere, kept to say why.
    Failed,
}

/// One sandbox of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxEntry {
    /// The node that owns it (runs it, or holds its paused state).
    pub node: String,
    pub state: SandboxState,
    /// What it was created from (E2B's `templateID`) and its alias.
    pub template: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// E2B's `startedAt` and `endAt` (Unix ms; no end: no deadline).
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ms: Option<u64>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// Why it failed (state `failed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// State `paused` only, once its snapshot is in the store's remote: what a node that
    /// takes it over resumes it from. A paused entry without it is paused on its node alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<Pushed>,
    /// Paused, pushed, and let go by its node (a drain, [`crate::drain`]): `node` still
    /// names the node that had it (for messages), but any node may take it over while that
    /// node lives ([`Catalog::take_over_released`]), and that node holds no copy of it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

/// A paused sandbox in the store's S3 remote: its pause's sandbox snapshot (which names its
/// runtime, image, size, environment, network policy and checkpoint) and the settings of its
/// record that the snapshot leaves out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    /// The sandbox snapshot's blob id (hex) in the remote.
    pub snapshot: String,
    /// Its timeout (seconds; a resume starts it again) and what its expiry does (`kill`,
    /// `pause`, `pause_filesystem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    pub on_timeout: String,
    /// E2B's `autoResume`.
    #[serde(default)]
    pub auto_resume: bool,
    /// Its data plane's credentials (the same tokens wherever it resumes).
    #[serde(default)]
    pub access: Access,
}

/// A sandbox's data-plane credentials, as its record holds them (the runtime's `Access` as
/// the catalog carries it: the catalog's JSON is its own, between nodes of any version).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(default)]
    pub secure: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_token: Option<String>,
    #[serde(default)]
    pub private_traffic: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
}

impl SandboxEntry {
    /// This entry marked failed with `cause` (the owner stays: it says where it ran).
    pub fn lost(&self, cause: String) -> SandboxEntry {
        SandboxEntry {
            state: SandboxState::Failed,
            cause: Some(cause),
            ..self.clone()
        }
    }

    /// Whether a failed entry may leave the catalog at `now_ms`: its end time passed
    /// [`TOMBSTONE_GRACE_MS`] ago (its owner, had it lived, would have ended it by then).
    /// One without an end time stays until it is killed through the API.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.state == SandboxState::Failed
            && self
                .end_ms
                .is_some_and(|end| now_ms >= end.saturating_add(TOMBSTONE_GRACE_MS))
    }
}

/// How long a failed entry outlives its end time (the owner's clock and sweeps may lag).
pub const TOMBSTONE_GRACE_MS: u64 = 60_000;

/// The catalog in etcd.
#[derive(Clone)]
pub struct Catalog {
    etcd: std::sync::Arc<Etcd>,
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

impl Catalog {
    pub fn new(etcd: std::sync::Arc<Etcd>) -> Catalog {
        Catalog { etcd }
    }

    /// Every sandbox of the cluster with its mod revision, in id order.
    pub async fn list(&self) -> Result<Vec<(String, SandboxEntry, i64)>> {
        self.etcd
            .get_prefix(PREFIX)
            .await?
            .into_iter()
            .map(|kv| {
                let id = kv.key[PREFIX.len()..].to_string();
                Ok((id, decode(&kv.key, &kv.value)?, kv.mod_revision))
            })
            .collect()
    }

    /// One sandbox and its mod revision.
    pub async fn get(&self, id: &str) -> Result<Option<(SandboxEntry, i64)>> {
        match self.etcd.get(&key(id)).await? {
            Some(kv) => Ok(Some((decode(&kv.key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Adds a sandbox: its mod revision, or None when the id is already in the catalog.
    pub async fn create(&self, id: &str, e: &SandboxEntry) -> Result<Option<i64>> {
        self.etcd.create(&key(id), &json(e), 0).await
    }

    /// Replaces a sandbox's entry if it is still at `rev`: the new revision, or None.
    pub async fn update(&self, id: &str, e: &SandboxEntry, rev: i64) -> Result<Option<i64>> {
        self.etcd.put_if(&key(id), &json(e), rev, 0).await
    }

    /// Removes a sandbox if its entry is still at `rev`: false when it changed since.
    pub async fn remove(&self, id: &str, rev: i64) -> Result<bool> {
        self.etcd.delete_if(&key(id), rev).await
    }

    /// Writes `lost` (an entry [`SandboxEntry::lost`]) if the entry is still at `rev` and its
    /// node is not live (its membership key is gone), both in one transaction: a node that
    /// joined again meanwhile keeps its entry. The new revision, or None.
    pub async fn mark_lost(&self, id: &str, lost: &SandboxEntry, rev: i64) -> Result<Option<i64>> {
        self.replace_while_gone(id, lost, rev, &lost.node).await
    }

    /// Gives sandbox `id` (paused, pushed) to the node `mine` names, if its entry is still at
    /// `rev` and its owner `old` is not live, both in one transaction: of two nodes taking it
    /// at once one wins, and a node that joined again keeps its sandbox. The new revision, or
    /// None.
    pub async fn take_over(
        &self,
        id: &str,
        mine: &SandboxEntry,
        rev: i64,
        old: &str,
    ) -> Result<Option<i64>> {
        self.replace_while_gone(id, mine, rev, old).await
    }

    /// Gives sandbox `id`, released by its node ([`SandboxEntry::released`]), to the node
    /// `mine` names if its entry is still at `rev`: its old node may be live (it let the
    /// sandbox go), so the revision alone decides, and of two nodes taking it at once one
    /// wins. The new revision, or None.
    pub async fn take_over_released(
        &self,
        id: &str,
        mine: &SandboxEntry,
        rev: i64,
    ) -> Result<Option<i64>> {
        self.update(id, mine, rev).await
    }

    async fn replace_while_gone(
        &self,
        id: &str,
        e: &SandboxEntry,
        rev: i64,
        gone: &str,
    ) -> Result<Option<i64>> {
        let k = key(id);
        let node = membership::key(gone);
        let conds = [Cond::ModIs(&k, rev), Cond::Absent(&node)];
        self.etcd.put_when(&k, &json(e), 0, &conds).await
    }

    /// Removes the entry of a sandbox of node `node` if it is still at `rev` and the node is
    /// not live (a kill through another node of a sandbox lost with its node).
    pub async fn remove_lost(&self, id: &str, node: &str, rev: i64) -> Result<bool> {
        let k = key(id);
        let node = membership::key(node);
        let conds = [Cond::ModIs(&k, rev), Cond::Absent(&node)];
        self.etcd.delete_when(&k, &conds).await
    }
}

fn json(e: &SandboxEntry) -> Vec<u8> {
    serde_json::to_vec(e).expect("SandboxEntry serializes")
}
