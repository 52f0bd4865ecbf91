//! Node membership: `nodes/<node id>` holds a node's [`NodeInfo`] under a lease the node keeps
//! alive; a node that stops renewing it (killed, cut off) disappears from the cluster when the
//! lease's TTL runs out, with no protocol of kiln's own.

use crate::{decode, now_ms, Error, Etcd, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PREFIX: &str = "nodes/";

/// Node `id`'s key: it exists while the node's lease lives.
pub fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// What a node tells the cluster about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Where other nodes reach its `kiln serve` (`http://host:port`).
    pub advertise: String,
    /// Its capacity.
    pub cpus: u32,
    pub memory_mib: u64,
    /// Memory the host can still give (`MemAvailable`).
    pub free_memory_mib: u64,
    /// Running sandboxes and the vCPUs they were given.
    pub sandboxes: u32,
    pub sandbox_cpus: u32,
    /// The most sandboxes it takes.
    pub max_sandboxes: u32,
    /// It is draining ([`crate::drain`]): it saw its drain key, takes no new sandboxes and
    /// lets its own go. (Placement reads the keys themselves: [`crate::drain::nodes`].)
    #[serde(default)]
    pub draining: bool,
    /// When this was written (Unix ms).
    pub updated_ms: u64,
}

impl NodeInfo {
    /// This host's CPUs, memory and available memory (`/proc/meminfo`), the rest zero.
    pub fn host() -> NodeInfo {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = |field: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        NodeInfo {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_mib: kib("MemTotal") / 1024,
            free_memory_mib: kib("MemAvailable") / 1024,
            ..Default::default()
        }
    }
}

/// The node ids of the cluster can be used in keys and headers.
pub fn check_node_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::NodeId(id.to_string()))
    }
}

/// This node's membership: its key, its lease, and the info it publishes.
pub struct Membership {
    etcd: Arc<Etcd>,
    node_id: String,
    ttl_secs: u64,
    lease: AtomicI64,
    /// How many times the node has joined (1 after [`Membership::register`]; more after
    /// its lease expired and it joined again).
    joins: AtomicU64,
    info: Mutex<NodeInfo>,
    /// When the node's key was last confirmed under its lease (a join, a renewal): the
    /// lease lives at most a TTL past it.
    confirmed: Mutex<Option<std::time::Instant>>,
}

impl Membership {
    /// Registers `node_id` with a lease of `ttl_secs`. When the id is held by another lease
    /// (a node with this id is live, or was killed less than a TTL ago) it waits up to one
    /// TTL for that lease to expire, then fails with [`Error::NodeIdTaken`].
    pub async fn register(
        etcd: Arc<Etcd>,
        node_id: &str,
        info: NodeInfo,
        ttl_secs: u64,
    ) -> Result<Arc<Membership>> {
        check_node_id(node_id)?;
        let m = Arc::new(Membership {
            etcd,
            node_id: node_id.to_string(),
            ttl_secs: ttl_secs.max(2),
            lease: AtomicI64::new(0),
            joins: AtomicU64::new(0),
            info: Mutex::new(info),
            confirmed: Mutex::new(None),
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(m.ttl_secs + 1);
        loop {
            if m.join().await? {
                return Ok(m);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NodeIdTaken(node_id.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A fresh lease and the node's key under it: false when the key is held by another.
    async fn join(&self) -> Result<bool> {
        let lease = self.etcd.grant(self.ttl_secs).await?;
        let value = self.value();
        match self.etcd.create(&self.key(), &value, lease).await? {
            Some(_) => {
                self.lease.store(lease, Ordering::Relaxed);
                self.joins.fetch_add(1, Ordering::SeqCst);
                self.confirm();
                tracing::info!(node = %self.node_id, lease, "joined the cluster");
                Ok(true)
            }
            None => {
                let _ = self.etcd.revoke(lease).await;
                Ok(false)
            }
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn key(&self) -> String {
        key(&self.node_id)
    }

    /// How many times this node has joined the cluster: more than 1 when its lease expired
    /// (the process stalled, or etcd was out of reach for longer than the TTL) and it joined
    /// again, so the cluster may have declared its running sandboxes lost meanwhile.
    pub fn joins(&self) -> u64 {
        self.joins.load(Ordering::SeqCst)
    }

    fn value(&self) -> Vec<u8> {
        let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        info.updated_ms = now_ms();
        serde_json::to_vec(&info).expect("NodeInfo serializes")
    }

    /// Sets what the next renewal publishes.
    pub fn set_info(&self, info: NodeInfo) {
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = info;
    }

    /// Renews the lease and republishes the info, once: after an expiry (etcd unreachable
    /// for longer than the TTL) it joins again with a new lease.
    pub async fn renew(&self) -> Result<()> {
        let lease = self.lease.load(Ordering::Relaxed);
        let alive = lease != 0 && self.etcd.keepalive(lease).await? > 0;
        if !alive {
            tracing::warn!(node = %self.node_id, "lease expired: joining again");
            if !self.join().await? {
                return Err(Error::NodeIdTaken(self.node_id.clone()));
            }
            return Ok(());
        }
        // The key is this node's alone (created under its lease): a plain write is enough,
        // and it fails if the lease ended meanwhile.
        let key = self.key();
        let cur = self.etcd.get(&key).await?;
        match cur {
            Some(kv) if kv.lease == lease => {
                self.etcd
                    .put_if(&key, &self.value(), kv.mod_revision, lease)
                    .await?;
            }
            _ => {
                self.etcd.create(&key, &self.value(), lease).await?;
            }
        }
        self.confirm();
        Ok(())
    }

    fn confirm(&self) {
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }

    /// How long this node's place in the cluster has been unconfirmed, if longer than its
    /// lease's TTL (etcd out of reach, or renewals failing): its key may be gone, and the
    /// other nodes may be taking its sandboxes over. None while it is in the cluster.
    pub fn cut_off_for(&self) -> Option<Duration> {
        let confirmed = *self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        let since = confirmed.map(|t| t.elapsed()).unwrap_or(Duration::MAX);
        (since > Duration::from_secs(self.ttl_secs)).then_some(since)
    }

    /// Renews every third of the TTL until the process ends; failures are logged and retried
    /// (the node keeps serving its own sandboxes while etcd is away).
    pub fn spawn_keepalive(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let m = self.clone();
        tokio::spawn(async move {
            let period = Duration::from_millis(m.ttl_secs * 1000 / 3);
            loop {
                tokio::time::sleep(period).await;
                if let Err(e) = m.renew().await {
                    tracing::warn!(node = %m.node_id, "renewing the node's lease: {e}");
                }
            }
        })
    }

    /// Leaves the cluster now (revokes the lease, which removes the key).
    pub async fn leave(&self) -> Result<()> {
        let lease = self.lease.swap(0, Ordering::Relaxed);
        if lease != 0 {
            self.etcd.revoke(lease).await?;
        }
        Ok(())
    }
}

/// The live nodes (their lease holds), in id order.
pub async fn nodes(etcd: &Etcd) -> Result<Vec<(String, NodeInfo)>> {
    etcd.get_prefix(PREFIX)
        .await?
        .into_iter()
        .map(|kv| {
            let id = kv.key[PREFIX.len()..].to_string();
            Ok((id, decode(&kv.key, &kv.value)?))
        })
        .collect()
}

/// One live node's info.
pub async fn node(etcd: &Etcd, id: &str) -> Result<Option<NodeInfo>> {
    match etcd.get(&key(id)).await? {
        Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
        None => Ok(None),
    }
}
