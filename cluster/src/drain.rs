//! Drains: `drains/<node id>` -> [`Drain`] asks node `<node id>` to let its sandboxes go so
//! they resume elsewhere (`kiln node drain`). The key is the request and its record: it has
//! no lease, so it outlives restarts of the node and of the CLI that wrote it, until
//! [`cancel`] (`kiln node undrain`) removes it.
//!
//! While its key exists a node is draining: placement never picks it ([`nodes`] marks it
//! from the key, at once, before the node itself has seen it), and the node, which looks
//! for its key in every once-a-second sweep, pauses its running sandboxes, pushes every
//! paused one's snapshot to the store's remote, and marks each entry released
//! ([`crate::SandboxEntry::released`]), so the first node asked for it takes it over
//! ([`crate::Catalog::take_over_released`]). The node writes into the key when it started
//! ([`Drain::started_ms`]) and which sandboxes it could not let go, and why
//! ([`Drain::failed`]): they run on where they are. Asking again clears that list, so the
//! node tries them once more.

use crate::{decode, membership, now_ms, Error, Etcd, NodeInfo, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const PREFIX: &str = "drains/";

/// Node `node`'s drain key.
pub fn key(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// A drain asked of a node, and how far the node got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// When it was asked (Unix ms).
    pub requested_ms: u64,
    /// When the node saw it and started (Unix ms): None until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// The sandboxes the node could not let go (still its own, running or paused there),
    /// each with why; not tried again in this drain.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed: BTreeMap<String, String>,
}

/// Asks node `node` to drain (again: a drain it was doing starts over, its failures
/// cleared): the drain as written.
pub async fn request(etcd: &Etcd, node: &str) -> Result<Drain> {
    membership::check_node_id(node)?;
    let d = Drain {
        requested_ms: now_ms(),
        ..Default::default()
    };
    let k = key(node);
    for _ in 0..TRIES {
        let written = match etcd.get(&k).await? {
            None => etcd.create(&k, &json(&d), 0).await?,
            Some(kv) => etcd.put_if(&k, &json(&d), kv.mod_revision, 0).await?,
        };
        if written.is_some() {
            return Ok(d);
        }
        // The node wrote its progress meanwhile: once more on what is there now.
    }
    Err(Error::Contended(k))
}

/// How many times a write that lost a compare-and-swap is made again on what is there.
const TRIES: usize = 10;

/// Ends node `node`'s drain (placement may pick it again; the sandboxes it let go stay
/// wherever they resumed): false when it was not draining.
pub async fn cancel(etcd: &Etcd, node: &str) -> Result<bool> {
    membership::check_node_id(node)?;
    let k = key(node);
    for _ in 0..TRIES {
        let Some(kv) = etcd.get(&k).await? else {
            return Ok(false);
        };
        if etcd.delete_if(&k, kv.mod_revision).await? {
            return Ok(true);
        }
    }
    Err(Error::Contended(k))
}

/// Node `node`'s drain and its key's mod revision, if one is asked.
pub async fn requested(etcd: &Etcd, node: &str) -> Result<Option<(Drain, i64)>> {
    match etcd.get(&key(node)).await? {
        Some(kv) => Ok(Some((decode(&kv.key, &kv.value)?, kv.mod_revision))),
        None => Ok(None),
    }
}

/// Writes the draining node's progress `d` if its key is still at `rev`: the new revision,
/// or None (asked again, or cancelled, meanwhile).
pub async fn update(etcd: &Etcd, node: &str, d: &Drain, rev: i64) -> Result<Option<i64>> {
    etcd.put_if(&key(node), &json(d), rev, 0).await
}

/// Every drain asked, by node id.
pub async fn all(etcd: &Etcd) -> Result<BTreeMap<String, Drain>> {
    etcd.get_prefix(PREFIX)
        .await?
        .into_iter()
        .map(|kv| {
            Ok((
                kv.key[PREFIX.len()..].to_string(),
                decode(&kv.key, &kv.value)?,
            ))
        })
        .collect()
}

/// The live nodes as placement must see them: each one's `draining` is whether its drain
/// key exists (the request counts from the moment it is written, and an undrain at once,
/// whatever the node last published).
pub async fn nodes(etcd: &Etcd) -> Result<Vec<(String, NodeInfo)>> {
    let (mut nodes, drains) = tokio::try_join!(membership::nodes(etcd), all(etcd))?;
    for (id, n) in &mut nodes {
        n.draining = drains.contains_key(id);
    }
    Ok(nodes)
}

fn json(d: &Drain) -> Vec<u8> {
    serde_json::to_vec(d).expect("Drain serializes")
}
