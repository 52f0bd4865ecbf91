//! The cluster's sandbox catalog: `sandboxes/<id>` -> [`SandboxEntry`] (owner node, state,
//! what E2B's lists show). Every change is a transaction comparing the key's mod revision (or
//! its absence), so two writers never overwrite each other unseen: a conflict comes back as
//! `None`/`false` and the caller re-reads.

use crate::{decode, Etcd, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const PREFIX: &str = "sandboxes/";

/// A sandbox's state as the cluster lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
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
}

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
}

fn json(e: &SandboxEntry) -> Vec<u8> {
    serde_json::to_vec(e).expect("SandboxEntry serializes")
}
