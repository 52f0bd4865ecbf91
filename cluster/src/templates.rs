//! The cluster's template catalog: `templates/<name>` -> [`TemplateEntry`], the image or
//! sandbox snapshot a template name means on every node (E2B's `templateID`: an image name,
//! `name:tag` included, or a sandbox snapshot's name). The data is in the store's S3 remote,
//! pushed before the name is published here, so any node can pull it (lazily) by id.
//!
//! A name moves to a new id by compare-and-swap on the entry's revision: the last
//! publication wins, and none overwrites one it did not see. A removal names the id it
//! removes, so it never takes away a newer publication made meanwhile.

use crate::{decode, now_ms, Etcd, Result};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "templates/";

/// What a template name points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    Image,
    Snapshot,
}

/// One template of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateEntry {
    pub kind: TemplateKind,
    /// The image's or sandbox snapshot's blob id (hex) in the store's remote.
    pub id: String,
    /// The node that published it, and when (Unix ms).
    pub node: String,
    pub updated_ms: u64,
    /// An image's disk size (MiB; 0 for a snapshot, or unknown).
    #[serde(default)]
    pub disk_mib: u64,
    /// The nodes that hold it in their homes (published or pulled there): placement
    /// prefers them, their chunks being local.
    #[serde(default)]
    pub holders: Vec<String>,
}

impl TemplateEntry {
    /// An entry published now by `node`, which holds it.
    pub fn new(kind: TemplateKind, id: String, node: &str, disk_mib: u64) -> TemplateEntry {
        TemplateEntry {
            kind,
            id,
            node: node.to_string(),
            updated_ms: now_ms(),
            disk_mib,
            holders: vec![node.to_string()],
        }
    }
}

/// The template catalog in etcd.
#[derive(Clone)]
pub struct Templates {
    etcd: std::sync::Arc<Etcd>,
}

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// How many times a write retries after losing a compare-and-swap to another writer.
const RETRIES: usize = 8;

impl Templates {
    pub fn new(etcd: std::sync::Arc<Etcd>) -> Templates {
        Templates { etcd }
    }

    /// Every template of the cluster, in name order. An entry this version cannot read
    /// (written by a newer one, or damaged) is left out, with a warning, not the whole list.
    pub async fn list(&self) -> Result<Vec<(String, TemplateEntry)>> {
        Ok(self
            .etcd
            .get_prefix(PREFIX)
            .await?
            .into_iter()
            .filter_map(|kv| {
                let name = kv.key[PREFIX.len()..].to_string();
                match decode::<TemplateEntry>(&kv.key, &kv.value) {
                    Ok(e) if is_blob_id(&e.id) => Some((name, e)),
                    Ok(e) => {
                        tracing::warn!(template = name, id = e.id, "not a blob id: left out");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(template = name, "left out: {e}");
                        None
                    }
                }
            })
            .collect())
    }

    /// One template and its mod revision.
    pub async fn get(&self, name: &str) -> Result<Option<(TemplateEntry, i64)>> {
        match self.etcd.get(&key(name)).await? {
            Some(kv) => {
                let e: TemplateEntry = decode(&kv.key, &kv.value)?;
                if !is_blob_id(&e.id) {
                    return Err(crate::Error::Value {
                        key: kv.key,
                        why: format!("{:?} is not a blob id", e.id),
                    });
                }
                Ok(Some((e, kv.mod_revision)))
            }
            None => Ok(None),
        }
    }

    /// Points `name` at `e` (replacing what it pointed at, seen at its current revision).
    pub async fn publish(&self, name: &str, e: &TemplateEntry) -> Result<()> {
        let k = key(name);
        for _ in 0..RETRIES {
            let written = match self.get(name).await? {
                None => self.etcd.create(&k, &json(e), 0).await?,
                Some((_, rev)) => self.etcd.put_if(&k, &json(e), rev, 0).await?,
            };
            if written.is_some() {
                return Ok(());
            }
        }
        Err(conflict(name))
    }

    /// Adds `node` to the holders of `name` if it still points at `id`.
    pub async fn add_holder(&self, name: &str, id: &str, node: &str) -> Result<()> {
        for _ in 0..RETRIES {
            let Some((mut e, rev)) = self.get(name).await? else {
                return Ok(());
            };
            if e.id != id || e.holders.iter().any(|h| h == node) {
                return Ok(());
            }
            e.holders.push(node.to_string());
            if self
                .etcd
                .put_if(&key(name), &json(&e), rev, 0)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(conflict(name))
    }

    /// Removes `name` if it points at `id` (None: whatever it points at): whether it did.
    pub async fn remove(&self, name: &str, id: Option<&str>) -> Result<bool> {
        for _ in 0..RETRIES {
            let Some((e, rev)) = self.get(name).await? else {
                return Ok(false);
            };
            if id.is_some_and(|id| id != e.id) {
                return Ok(false);
            }
            if self.etcd.delete_if(&key(name), rev).await? {
                return Ok(true);
            }
        }
        Err(conflict(name))
    }
}

/// A blob id as kiln writes it: 64 lowercase hex digits.
fn is_blob_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn conflict(name: &str) -> crate::Error {
    crate::Error::Contended(format!("template {name}"))
}

fn json(e: &TemplateEntry) -> Vec<u8> {
    serde_json::to_vec(e).expect("TemplateEntry serializes")
}
