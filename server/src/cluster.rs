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
//! - Dead nodes: a node whose lease has expired has lost its running sandboxes. Every live
//!   node's sweep ([`Cluster::sweep_dead`]) writes `failed` with the cause over their entries,
//!   in a transaction that also requires the node's key to be absent (so exactly one writer
//!   wins, and never against a node that joined again); until one has, reads derive the same
//!   from the missing key ([`Cluster::route`], [`Cluster::listed`]). A request for such a
//!   sandbox is answered here with the cause, at once, instead of being forwarded.
//! - A returning node ([`Cluster::reconcile`], on joining and on joining again after its
//!   lease expired) stops the local sandboxes the catalog no longer gives it: owned by
//!   another node, marked failed, or (published by this node before) removed.
//! - Pauses: a paused sandbox's entry carries its snapshot ([`Pushed`]) once the snapshot is
//!   in the store's S3 remote: E2B's pause pushes it before it answers ([`Cluster::pause`]),
//!   and the reaper pushes the others ([`Cluster::push_paused`]: timeouts, the CLI).
//! - Takeover: a request for a paused sandbox whose node is gone, through any node, takes it
//!   over ([`Cluster::take_over`]): one compare-and-swap gives its entry to this node (the
//!   entry unchanged and the old node's key absent), the runtime adopts it from the remote
//!   ([`Sandboxes::adopt`]), and the request is served here as for any local sandbox (a
//!   connect resumes it). Of two nodes taking it at once, one wins; the other forwards to it.
//! - Drains ([`drain`], `kiln node drain`): a node whose drain key exists takes no new
//!   sandboxes and lets its own go (paused, pushed, their entries marked released); a
//!   released sandbox is taken over as above, its old node live, by its entry's revision.

use crate::control::{types, ApiError};
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_cluster::catalog::Access as EntryAccess;
use kiln_cluster::placement::{self, Need};
use kiln_cluster::{
    drain as drains, membership, Catalog, Etcd, Membership, NodeInfo, Pushed, SandboxEntry,
    SandboxState,
};
use kiln_runtime::{
    Access, Adoption, PauseMode, ResumeMode, SandboxRecord, Sandboxes, State as SbxState,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod drain;
mod metrics;
mod signed_urls;
mod templates;
pub(crate) use signed_urls::{is_probe, signed_elsewhere};

/// How long another node is given to answer a request made of several nodes at once (drop
/// a deleted template, send its sandboxes' metrics, say whether a signature is its own).
const TELL_WITHIN: Duration = Duration::from_secs(10);

/// The node a forwarded request comes from.
pub const FORWARDED_BY: &str = "x-kiln-forwarded-by";
/// The cluster secret, on every node-to-node request.
pub const SECRET_HEADER: &str = "x-kiln-cluster-secret";
/// The lease of a node's membership: a node that stops renewing is gone after this long.
const LEASE_TTL_SECS: u64 = 5;
/// The file in the serve directory naming the cluster node this home has been: a node that
/// finds it was in the cluster before, so its lease has expired since (a restart waits for
/// that), and its running sandboxes may have been declared lost.
const MEMBER_FILE: &str = "cluster-node";
/// The most sandboxes one node takes.
const MAX_SANDBOXES: u32 = 256;
/// How long after a failed background push of a paused sandbox's snapshot it is tried again.
const PUSH_RETRY: Duration = Duration::from_secs(10);
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
    /// How long a node may be gone (its lease expired) before its running sandboxes are
    /// declared lost: a node restarted within it (`kiln serve` killed and started again,
    /// which waits out its old lease) keeps them.
    pub lost_after: std::time::Duration,
}

/// A node-to-node request without the right cluster secret.
struct WrongSecret;

/// A request that came from another node with the right secret; `again` when that node had
/// been sent it by a third (a takeover lost to another node: see [`SECOND_HOP`]).
#[derive(Clone, Copy)]
pub(crate) struct Forwarded {
    again: bool,
}

/// Marks a forwarded request sent on once more: a node asked to take a sandbox over that
/// another node won meanwhile sends the request to the winner, which serves it (a request
/// that carries this is never sent on).
const SECOND_HOP: &str = "x-kiln-second-hop";

/// This node in the cluster.
pub(crate) struct Cluster {
    pub(crate) node_id: String,
    secret: String,
    advertise: String,
    etcd: Arc<Etcd>,
    membership: Arc<Membership>,
    catalog: Catalog,
    templates: kiln_cluster::Templates,
    /// The catalog entries this node wrote, with their revisions (None: not read yet).
    written: tokio::sync::Mutex<Option<HashMap<String, (SandboxEntry, i64)>>>,
    /// The membership join the local sandboxes were last reconciled after.
    reconciled: AtomicU64,
    /// When each node was last seen live (its info's `updated_ms`): the cause given for the
    /// sandboxes of a node that is gone.
    seen: std::sync::Mutex<HashMap<String, u64>>,
    /// [`ClusterConfig::lost_after`], and since when this node has seen each gone node gone.
    lost_after: std::time::Duration,
    missing_since: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// The snapshot (hex id) each of this node's paused sandboxes was last pushed as: its
    /// entry carries it ([`Pushed`]) while the sandbox is paused as that snapshot.
    pushed: std::sync::Mutex<HashMap<String, String>>,
    /// Sandboxes in hand here ([`InHand`]): a pause pushing its snapshot, or an adoption
    /// under way. [`Cluster::sync`] and [`Cluster::reconcile`] leave them alone meanwhile.
    in_hand: Arc<std::sync::Mutex<HashSet<String>>>,
    /// When a background push of each paused sandbox last failed.
    push_failed: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// This node's drain key exists (as its last sweep saw it): it takes nothing over and
    /// lets its sandboxes go ([`drain`]).
    draining: AtomicBool,
    /// A drain pass runs (one at a time).
    drain_busy: Arc<AtomicBool>,
    /// The template names this home holds from the cluster's catalog ([`templates`]).
    held: templates::Held,
}

/// A sandbox in hand until dropped ([`Cluster::in_hand`]).
struct InHand {
    set: Arc<std::sync::Mutex<HashSet<String>>>,
    id: String,
}

impl InHand {
    /// `id` in hand; None when it is already (another task has it).
    fn take(set: &Arc<std::sync::Mutex<HashSet<String>>>, id: &str) -> Option<InHand> {
        let fresh = set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        fresh.then(|| InHand {
            set: set.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Where a request for a sandbox goes.
enum Route {
    /// Served here: this node has it, or nobody has.
    Here,
    /// To its owner, live.
    Owner(String, NodeInfo),
    /// To the node that took it over first while this one tried to ([`Cluster::take_over`]):
    /// served there, so sent on even by a node it was forwarded to (once: [`SECOND_HOP`]).
    Winner(String, NodeInfo),
    /// Nowhere: it failed (the catalog says so, or it was running on a node that is gone).
    Lost(Lost),
    /// Not here for now, for the reason given: running on a node that is away (not yet
    /// declared lost), or paused on a node that is gone with its snapshot on its disk alone.
    Stranded(String),
    /// Paused and pushed, its node gone: to be taken over ([`Cluster::take_over`]). Its
    /// entry and revision.
    Adopt(Box<SandboxEntry>, i64),
}

/// A sandbox that runs nowhere: why, and its entry (to remove it on a kill).
struct Lost {
    cause: String,
    node: String,
    rev: i64,
    /// Its entry goes on its revision alone: marked failed in the catalog, or released by
    /// its node (else its node's key must be missing too).
    marked: bool,
}

/// What writing one of this node's entries came to.
enum Written {
    Done,
    /// The catalog does not give the sandbox to this node any more: stop it here, for this reason.
    Stop(String),
}

impl Cluster {
    /// Joins: registers the node under its lease (etcd unreachable is an error here, so a
    /// node never starts outside the cluster it was told to join), stops the sandboxes the
    /// catalog no longer gives it when this home was in the cluster before
    /// ([`Cluster::reconcile`]), writes the others to the catalog, and keeps the lease alive
    /// from then on.
    pub(crate) async fn join(
        cfg: ClusterConfig,
        sandboxes: &Arc<Sandboxes>,
        serve_dir: &Path,
    ) -> kiln_cluster::Result<Cluster> {
        let etcd = Arc::new(Etcd::new(&cfg.etcd)?);
        kiln_cluster::authority(&cfg.advertise)?;
        protect_etcd(&cfg.etcd);
        let mut info = NodeInfo::host();
        info.advertise = cfg.advertise.clone();
        info.max_sandboxes = MAX_SANDBOXES;
        let membership =
            Membership::register(etcd.clone(), &cfg.node_id, info, LEASE_TTL_SECS).await?;
        membership.spawn_keepalive();
        let member_file = serve_dir.join(MEMBER_FILE);
        let was_member =
            std::fs::read_to_string(&member_file).is_ok_and(|s| s.trim() == cfg.node_id);
        let c = Cluster {
            node_id: cfg.node_id,
            secret: cfg.secret,
            advertise: cfg.advertise,
            catalog: Catalog::new(etcd.clone()),
            templates: kiln_cluster::Templates::new(etcd.clone()),
            etcd,
            reconciled: AtomicU64::new(membership.joins()),
            membership,
            written: Default::default(),
            seen: Default::default(),
            lost_after: cfg.lost_after,
            missing_since: Default::default(),
            pushed: Default::default(),
            in_hand: Default::default(),
            push_failed: Default::default(),
            draining: AtomicBool::new(false),
            drain_busy: Default::default(),
            held: templates::Held::new(serve_dir),
        };
        // A drain asked before this start holds on: placement skips the node from the first
        // info it publishes.
        let asked = drains::requested(&c.etcd, &c.node_id).await?.is_some();
        c.draining.store(asked, Ordering::SeqCst);
        if !sandboxes.store().has_remote() {
            tracing::warn!(
                "the store has no S3 remote (kiln remote add): this node's paused sandboxes \
                 can be resumed only here"
            );
        }
        {
            let mut written = c.written.lock().await;
            // First join: every sandbox of the home is published as it is.
            let published = (!was_member).then(HashSet::new);
            c.reconcile(sandboxes, &mut written, published.as_ref())
                .await?;
        }
        if let Err(e) = std::fs::write(&member_file, format!("{}\n", c.node_id)) {
            tracing::warn!("writing {}: {e}", member_file.display());
        }
        // Templates deleted in the cluster while this node was away leave its home too.
        c.drop_all_deleted(sandboxes).await;
        c.sync_now(sandboxes).await;
        Ok(c)
    }

    /// After this node joined (again): stops each local sandbox the catalog no longer gives
    /// it (owned by another node, a paused one taken over included; marked failed, the
    /// cluster having declared it lost while this node was away; or published by this node
    /// before (`published`, None: all of them) and no longer in the catalog: killed through
    /// another node), and forgets the entries it had read, so the next [`Cluster::sync`]
    /// reads them again. Sandboxes in hand are left alone. Runs with the `written` lock held.
    async fn reconcile(
        &self,
        sandboxes: &Arc<Sandboxes>,
        written: &mut Option<HashMap<String, (SandboxEntry, i64)>>,
        published: Option<&HashSet<String>>,
    ) -> kiln_cluster::Result<()> {
        let entries: HashMap<String, SandboxEntry> = self
            .catalog
            .list()
            .await?
            .into_iter()
            .map(|(id, e, _)| (id, e))
            .collect();
        let in_hand = self.in_hand();
        for r in records(sandboxes).await {
            if types::SandboxState::of(&r).is_none() || in_hand.contains(&r.id) {
                continue;
            }
            let why = match entries.get(&r.id) {
                Some(e) => self.verdict(e),
                None if published.is_none_or(|p| p.contains(&r.id)) => Some(
                    "it left the cluster's catalog while this node was out of the cluster".into(),
                ),
                None => None,
            };
            if let Some(why) = why {
                stop_local(sandboxes, &r.id, &why).await;
            }
        }
        *written = None;
        Ok(())
    }

    /// Why a local sandbox whose catalog entry is `e` must stop here (None: it stays).
    fn verdict(&self, e: &SandboxEntry) -> Option<String> {
        if e.node != self.node_id {
            Some(format!("the catalog gives it to node {}", e.node))
        } else if e.released {
            Some("this node let it go in a drain: it resumes on the next node asked for it".into())
        } else if e.state == SandboxState::Failed {
            Some(format!(
                "the cluster declared it lost: {}",
                e.cause.as_deref().unwrap_or("failed")
            ))
        } else {
            None
        }
    }

    /// Brings the catalog's entries of this node in line with its sandboxes `recs` (all of
    /// them, as the runtime lists them) and refreshes what the node publishes; first, when
    /// the node joined again since the last time (its lease had expired), reconciles. A
    /// sandbox the catalog turns out to give away is stopped here. Failures are logged: the
    /// next sweep tries again.
    pub(crate) async fn sync(&self, sandboxes: &Arc<Sandboxes>, mut recs: Vec<SandboxRecord>) {
        let mut guard = self.written.lock().await;
        let joins = self.membership.joins();
        if joins != self.reconciled.load(Ordering::SeqCst) {
            tracing::warn!(node = %self.node_id, "joined the cluster again after the lease expired: reconciling");
            let published: HashSet<String> = guard
                .as_ref()
                .map(|w| w.keys().cloned().collect())
                .unwrap_or_default();
            if let Err(e) = self
                .reconcile(sandboxes, &mut guard, Some(&published))
                .await
            {
                tracing::warn!("cluster catalog: {e}");
                return;
            }
            self.reconciled.store(joins, Ordering::SeqCst);
            recs = records(sandboxes).await;
        }
        // A sandbox in hand is its handler's: its entry is neither written nor removed.
        let in_hand = self.in_hand();
        let desired: BTreeMap<String, SandboxEntry> = recs
            .iter()
            .filter(|r| !in_hand.contains(&r.id))
            .filter_map(|r| Some((r.id.clone(), self.entry(r)?)))
            .collect();
        self.membership.set_info(self.info(&desired));
        if guard.is_none() {
            match self.catalog.list().await {
                Ok(all) => {
                    // Failed entries written by others (this node's sandboxes lost while it
                    // was away) are not this node's to keep or remove, nor those it let go
                    // in a drain (they name it until another node takes them over).
                    let mine: HashMap<String, (SandboxEntry, i64)> = all
                        .into_iter()
                        .filter(|(_, e, _)| {
                            e.node == self.node_id && e.state != SandboxState::Failed && !e.released
                        })
                        .map(|(id, e, rev)| (id, (e, rev)))
                        .collect();
                    // What was pushed before (this process may be new) is known from them.
                    let mut pushed = self.lock(&self.pushed);
                    for (id, (e, _)) in &mine {
                        if let Some(p) = &e.pushed {
                            pushed
                                .entry(id.clone())
                                .or_insert_with(|| p.snapshot.clone());
                        }
                    }
                    drop(pushed);
                    *guard = Some(mine)
                }
                Err(e) => {
                    tracing::warn!("cluster catalog: {e}");
                    return;
                }
            }
        }
        let written = guard.as_mut().expect("loaded above");
        let mut stop = Vec::new();
        for (id, want) in &desired {
            if written.get(id).is_some_and(|(e, _)| e == want) {
                continue;
            }
            match self.write(written, id, want).await {
                Ok(Written::Done) => {}
                Ok(Written::Stop(why)) => stop.push((id.clone(), why)),
                Err(e) => tracing::warn!(id, "cluster catalog: {e}"),
            }
        }
        let mut gone: Vec<String> = written
            .keys()
            .filter(|id| !desired.contains_key(*id) && !in_hand.contains(*id))
            .cloned()
            .collect();
        if !gone.is_empty() {
            // `recs` may predate a sandbox made since (the reaper lists before it syncs, and
            // an adoption may have finished in between): only what is gone now goes.
            let now: HashSet<String> = records(sandboxes)
                .await
                .iter()
                .filter(|r| self.entry(r).is_some())
                .map(|r| r.id.clone())
                .collect();
            gone.retain(|id| !now.contains(id));
        }
        {
            let mut pushed = self.lock(&self.pushed);
            for id in &gone {
                pushed.remove(id);
            }
        }
        for id in gone {
            if let Err(e) = self.erase(written, &id).await {
                tracing::warn!(id, "cluster catalog: {e}");
            }
        }
        drop(guard);
        for (id, why) in stop {
            stop_local(sandboxes, &id, &why).await;
        }
    }

    /// [`Cluster::sync`] from the records on disk, right after a request changed one.
    pub(crate) async fn sync_now(&self, sandboxes: &Arc<Sandboxes>) {
        self.sync(sandboxes, records(sandboxes).await).await;
    }

    /// Writes `want` as sandbox `id`'s entry: compare-and-swap on the revision this node
    /// last saw; on a conflict it looks again, and leaves alone an entry another node owns,
    /// one marked failed (this node's lease expired meanwhile) and one removed since this
    /// node wrote it: the sandbox must stop here then.
    async fn write(
        &self,
        written: &mut HashMap<String, (SandboxEntry, i64)>,
        id: &str,
        want: &SandboxEntry,
    ) -> kiln_cluster::Result<Written> {
        for _ in 0..3 {
            let done = match written.get(id) {
                Some((_, rev)) => self.catalog.update(id, want, *rev).await?,
                None => self.catalog.create(id, want).await?,
            };
            if let Some(rev) = done {
                written.insert(id.to_string(), (want.clone(), rev));
                return Ok(Written::Done);
            }
            let had = written.remove(id).is_some();
            match self.catalog.get(id).await? {
                Some((cur, rev)) => match self.verdict(&cur) {
                    // This node's own failure, written before: it stays written.
                    Some(_) if cur.node == self.node_id && want.state == SandboxState::Failed => {
                        written.insert(id.to_string(), (cur, rev));
                    }
                    Some(why) => return Ok(Written::Stop(why)),
                    None => {
                        written.insert(id.to_string(), (cur, rev));
                    }
                },
                None if had => {
                    return Ok(Written::Stop(
                        "its catalog entry was removed while this node was out of the cluster"
                            .into(),
                    ))
                }
                None => {}
            }
        }
        Ok(Written::Done)
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
                // Still this node's (a failed one was marked by another node: it stays).
                Some((cur, rev)) if self.verdict(&cur).is_none() => {
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

    /// A sandbox's catalog entry (None: stopped). A failed one is published with its cause,
    /// so every node can answer for it as this one does (404 with the cause).
    fn entry(&self, r: &SandboxRecord) -> Option<SandboxEntry> {
        let (state, cause) = match &r.state {
            SbxState::Failed { cause } => (SandboxState::Failed, Some(cause.clone())),
            _ => match types::SandboxState::of(r)? {
                types::SandboxState::Running => (SandboxState::Running, None),
                types::SandboxState::Paused => (SandboxState::Paused, None),
            },
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
            cause,
            pushed: self.pushed_entry(r),
            released: false,
        })
    }

    /// What the entry of `r`, paused, says of its snapshot in the store's remote: None until
    /// it is there.
    fn pushed_entry(&self, r: &SandboxRecord) -> Option<Pushed> {
        let SbxState::Paused { saved } = &r.state else {
            return None;
        };
        let snapshot = saved.to_hex();
        if self.lock(&self.pushed).get(&r.id) != Some(&snapshot) {
            return None;
        }
        let a = &r.access;
        Some(Pushed {
            snapshot,
            timeout_secs: r.timeout_secs,
            on_timeout: serde_json::to_value(r.on_timeout)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            auto_resume: r.auto_resume,
            access: EntryAccess {
                secure: a.secure,
                envd_token: a.envd_token.clone(),
                private_traffic: a.private_traffic,
                traffic_token: a.traffic_token.clone(),
                mask_request_host: a.mask_request_host.clone(),
            },
        })
    }

    /// Locks one of the node's small tables.
    fn lock<'a, T>(&self, m: &'a std::sync::Mutex<T>) -> std::sync::MutexGuard<'a, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sandboxes in hand now.
    fn in_hand(&self) -> HashSet<String> {
        self.lock(&self.in_hand).clone()
    }

    fn info(&self, desired: &BTreeMap<String, SandboxEntry>) -> NodeInfo {
        let running = || {
            desired
                .values()
                .filter(|e| e.state == SandboxState::Running)
        };
        NodeInfo {
            advertise: self.advertise.clone(),
            sandboxes: running().count() as u32,
            sandbox_cpus: running().map(|e| e.cpus).sum(),
            max_sandboxes: MAX_SANDBOXES,
            draining: self.draining.load(Ordering::SeqCst),
            ..NodeInfo::host()
        }
    }

    /// The whole cluster's sandboxes (failed ones included: placement counts only the
    /// running ones of live nodes).
    pub(crate) async fn catalog(&self) -> kiln_cluster::Result<Vec<(String, SandboxEntry)>> {
        Ok(self
            .catalog
            .list()
            .await?
            .into_iter()
            .map(|(id, e, _)| (id, e))
            .collect())
    }

    /// The sandboxes E2B's lists show: running on a live node, or paused. A failed one is
    /// left out, as on one host, and so is one running on a node that is gone (lost, though
    /// no sweep has marked it yet).
    pub(crate) async fn listed(&self) -> kiln_cluster::Result<Vec<(String, SandboxEntry)>> {
        let (nodes, entries) = tokio::try_join!(membership::nodes(&self.etcd), self.catalog())?;
        self.saw(&nodes);
        let live: HashSet<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
        Ok(entries
            .into_iter()
            .filter(|(_, e)| match e.state {
                // Still listed while its node may come back (see `lost_after`).
                SandboxState::Running => {
                    live.contains(e.node.as_str()) || !self.gone_for_long(&e.node)
                }
                SandboxState::Paused => true,
                SandboxState::Failed => false,
            })
            .collect())
    }

    /// Notes when each live node last published its info, and forgets when it was gone (it
    /// came back).
    fn saw(&self, nodes: &[(String, NodeInfo)]) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (id, info) in nodes {
            let t = seen.entry(id.clone()).or_default();
            *t = (*t).max(info.updated_ms);
        }
        let mut since = self.missing_since.lock().unwrap_or_else(|e| e.into_inner());
        since.retain(|n, _| !nodes.iter().any(|(l, _)| l == n));
    }

    /// Why the running sandboxes of node `node`, whose key is gone, are lost.
    fn gone_cause(&self, node: &str) -> String {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get(node) {
            Some(&ms) if ms > 0 => format!(
                "node {node} is gone (no heartbeat since {})",
                crate::timefmt::rfc3339(ms)
            ),
            _ => format!("node {node} is gone (its membership lease expired)"),
        }
    }

    /// Whether node `node`, whose key is gone, has been gone for
    /// [`ClusterConfig::lost_after`] as this node saw it (from the first time it looked).
    fn gone_for_long(&self, node: &str) -> bool {
        let mut since = self.missing_since.lock().unwrap_or_else(|e| e.into_inner());
        let first = *since
            .entry(node.to_string())
            .or_insert_with(std::time::Instant::now);
        first.elapsed() >= self.lost_after
    }

    /// E2B's pause in cluster mode: paused here, then its snapshot pushed to the store's S3
    /// remote, before the answer and before its entry says `paused` (with the snapshot: any
    /// node can resume it from then on). A push that fails (the remote out of reach) fails
    /// the pause, and the sandbox is resumed here: it runs on where it was (its timeout
    /// counting again from the resume; one paused without memory boots again on its files).
    /// A store without a remote keeps the pause here alone.
    pub(crate) async fn pause(
        &self,
        sandboxes: &Arc<Sandboxes>,
        id: &str,
        mode: PauseMode,
    ) -> Result<(), ApiError> {
        let _in_hand = InHand::take(&self.in_hand, id);
        let sb = sandboxes.clone();
        let id2 = id.to_string();
        let rec = crate::control::blocking(move || sb.pause_with(&id2, mode)).await?;
        let SbxState::Paused { saved } = rec.state else {
            return Ok(());
        };
        if !sandboxes.store().has_remote() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let e = match push(sandboxes, saved.to_hex()).await {
            Ok(bytes) => {
                let ms = t.elapsed().as_millis() as u64;
                tracing::info!(
                    id,
                    bytes,
                    ms,
                    "pushed the pause's snapshot to the store's remote"
                );
                self.lock(&self.pushed).insert(rec.id, saved.to_hex());
                return Ok(());
            }
            Err(e) => e,
        };
        tracing::warn!(
            id,
            "pushing the pause's snapshot failed, resuming the sandbox here: {e}"
        );
        let sb = sandboxes.clone();
        let id2 = rec.id.clone();
        let resumed =
            crate::control::blocking(move || sb.resume_with(&id2, None, ResumeMode::Restore)).await;
        let then = match resumed {
            Ok(_) => format!("it was resumed and runs on, on node {}", self.node_id),
            Err(r) => format!(
                "resuming it failed too ({}): it stays paused on node {} alone",
                r.message, self.node_id
            ),
        };
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "pausing sandbox {id}: its snapshot could not be pushed to the store's remote, \
                 so no other node could resume it ({e}); {then}"
            ),
        ))
    }

    /// Pushes, each in a task of its own, the snapshots of this node's paused sandboxes that
    /// are not in the store's remote yet (paused by a timeout, through the CLI, or by a pause
    /// whose caller died); their entries say `paused` without a snapshot until then. A push
    /// that failed is tried again after [`PUSH_RETRY`].
    pub(crate) fn push_paused(
        self: &Arc<Self>,
        sandboxes: &Arc<Sandboxes>,
        recs: &[SandboxRecord],
    ) {
        if !sandboxes.store().has_remote() {
            return;
        }
        for r in recs {
            let SbxState::Paused { saved } = &r.state else {
                continue;
            };
            let snapshot = saved.to_hex();
            let pushed = self.lock(&self.pushed).get(&r.id) == Some(&snapshot);
            let failed_lately = self
                .lock(&self.push_failed)
                .get(&r.id)
                .is_some_and(|t| t.elapsed() < PUSH_RETRY);
            if pushed || failed_lately || r.op.is_some() {
                continue;
            }
            let Some(in_hand) = InHand::take(&self.in_hand, &r.id) else {
                continue;
            };
            let (c, sb) = (self.clone(), sandboxes.clone());
            tokio::spawn(async move {
                let id = in_hand.id.clone();
                match push(&sb, snapshot.clone()).await {
                    Ok(bytes) => {
                        tracing::info!(
                            id,
                            bytes,
                            "pushed a paused sandbox's snapshot to the store's remote"
                        );
                        c.lock(&c.push_failed).remove(&id);
                        c.lock(&c.pushed).insert(id, snapshot);
                    }
                    Err(e) => {
                        tracing::warn!(
                            id,
                            "pushing a paused sandbox's snapshot (tried again in {} s): {e}",
                            PUSH_RETRY.as_secs()
                        );
                        c.lock(&c.push_failed).insert(id, std::time::Instant::now());
                    }
                }
                drop(in_hand);
            });
        }
    }

    /// Once a sweep: marks `failed` the running entries of nodes that are gone (each in a
    /// transaction requiring the entry unchanged and the node's key absent: one writer wins,
    /// and a node that joined again keeps its own), and removes failed entries past their
    /// end time. Entries of this node are its own to write ([`Cluster::sync`]).
    pub(crate) async fn sweep_dead(&self) {
        let (nodes, entries) =
            match tokio::try_join!(membership::nodes(&self.etcd), self.catalog.list()) {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("cluster catalog: {e}");
                    return;
                }
            };
        self.saw(&nodes);
        let live: HashSet<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
        let now = now_ms();
        for (id, e, rev) in entries {
            let result = if e.expired(now) {
                self.catalog.remove(&id, rev).await.map(drop)
            } else if e.state == SandboxState::Running
                && e.node != self.node_id
                && !live.contains(e.node.as_str())
                && self.gone_for_long(&e.node)
            {
                let cause = self.gone_cause(&e.node);
                match self
                    .catalog
                    .mark_lost(&id, &e.lost(cause.clone()), rev)
                    .await
                {
                    Ok(Some(_)) => {
                        tracing::warn!(id, node = %e.node, "sandbox lost with its node: {cause}");
                        Ok(())
                    }
                    // Another node marked it first, or its node came back.
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            } else {
                Ok(())
            };
            if let Err(e) = result {
                tracing::warn!(id, "cluster catalog: {e}");
            }
        }
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

    /// Sends `req` to node `node` (its advertise URL `info`) as a node-to-node request.
    /// None when the node turned out to be gone before it answered: it cannot be reached
    /// and its lease expires within a TTL, or its lease expires while the answer is awaited
    /// (a node stopped or cut off accepts connections its kernel queues, and answers none).
    async fn forward(&self, node: &str, info: &NodeInfo, mut req: Request) -> Option<Response> {
        let authority = match kiln_cluster::authority(&info.advertise) {
            Ok(a) => a,
            Err(e) => return Some(refuse(StatusCode::BAD_GATEWAY, &e.to_string())),
        };
        let again = forwarded(&req);
        let h = req.headers_mut();
        h.insert(FORWARDED_BY, header_value(&self.node_id));
        h.insert(SECRET_HEADER, header_value(&self.secret));
        if again {
            h.insert(SECOND_HOP, HeaderValue::from_static("1"));
        }
        let connect = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&authority),
        )
        .await;
        let failed = match connect {
            Ok(Ok(tcp)) => tokio::select! {
                sent = crate::proxy::send(tcp, req) => match sent {
                    Ok(resp) => return Some(resp),
                    Err(crate::proxy::SendError::Handshake(e) | crate::proxy::SendError::Send(e)) => {
                        format!("node {node}: {e}")
                    }
                },
                () = self.gone(node) => return None,
            },
            Ok(Err(e)) => format!("node {node} ({authority}): {e}"),
            Err(_) => format!("node {node} ({authority}) did not answer"),
        };
        // Unreachable: dead (its lease ends within a TTL) or briefly away.
        let ttl = Duration::from_secs(LEASE_TTL_SECS + 2);
        tokio::select! {
            () = self.gone(node) => None,
            () = tokio::time::sleep(ttl) => Some(refuse(StatusCode::BAD_GATEWAY, &failed)),
        }
    }

    /// The live nodes but this one.
    async fn others(&self) -> kiln_cluster::Result<Vec<(String, NodeInfo)>> {
        let mut nodes = membership::nodes(&self.etcd).await?;
        nodes.retain(|(n, _)| *n != self.node_id);
        Ok(nodes)
    }

    /// `req` forwarded to node `node` ([`Cluster::forward`]) when this node asks several at
    /// once: its answer, or None when it gave none within [`TELL_WITHIN`].
    async fn ask(&self, node: &str, info: &NodeInfo, req: Request) -> Option<Response> {
        tokio::time::timeout(TELL_WITHIN, self.forward(node, info, req))
            .await
            .ok()
            .flatten()
    }

    /// Returns once node `node`'s key is gone (its lease expired), checking every second.
    async fn gone(&self, node: &str) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if matches!(membership::node(&self.etcd, node).await, Ok(None)) {
                return;
            }
        }
    }

    /// Where a request for sandbox `id` goes.
    async fn route(&self, state: &AppState, id: &str) -> kiln_cluster::Result<Route> {
        let sb = state.sandboxes.clone();
        let id2 = id.to_string();
        let local = tokio::task::spawn_blocking(move || {
            sb.record(&id2)
                .ok()
                .map(|r| matches!(r.state, SbxState::Paused { .. }))
        })
        .await
        .unwrap_or(None);
        // A sandbox running here is this node's alone. A paused copy here is not proof: while
        // this node was cut off from etcd, another node may have taken it over and resumed it
        // (its reconcile stops the copy once it joins again). So the catalog decides, and
        // without etcd the answer is 503, never a second copy resumed here.
        let paused_here = match local {
            Some(false) => return Ok(Route::Here),
            Some(true) => true,
            None => false,
        };
        let Some((e, rev)) = self.catalog.get(id).await? else {
            return Ok(Route::Here);
        };
        // Let go by its node (a drain): taken over by whichever node is asked, its old node
        // included (which, draining, sends it on), while that node lives.
        if e.released && e.state == SandboxState::Paused && e.pushed.is_some() {
            return Ok(Route::Adopt(Box::new(e), rev));
        }
        if paused_here && e.node == self.node_id {
            return Ok(Route::Here);
        }
        let marked = |e: SandboxEntry| {
            Route::Lost(Lost {
                cause: e.cause.unwrap_or_else(|| "failed".into()),
                node: e.node,
                rev,
                marked: true,
            })
        };
        // A live owner answers for its sandboxes, failed ones too (a kill of one of them
        // ends its record there); this node for its entries marked failed while it was away.
        if e.node == self.node_id {
            return Ok(match e.state {
                SandboxState::Failed => marked(e),
                _ => Route::Here,
            });
        }
        match membership::node(&self.etcd, &e.node).await? {
            Some(info) => Ok(Route::Owner(e.node, info)),
            None if e.state == SandboxState::Failed => Ok(marked(e)),
            None if e.state == SandboxState::Running && self.gone_for_long(&e.node) => {
                Ok(Route::Lost(Lost {
                    cause: self.gone_cause(&e.node),
                    node: e.node,
                    rev,
                    marked: false,
                }))
            }
            None if e.state == SandboxState::Running => Ok(Route::Stranded(format!(
                "sandbox {id} runs on node {}, which is not answering (its lease expired); \
                 its sandboxes are declared lost if it is not back within {} s",
                e.node,
                self.lost_after.as_secs()
            ))),
            None if e.pushed.is_some() => Ok(Route::Adopt(Box::new(e), rev)),
            None => Ok(Route::Stranded(format!(
                "sandbox {id} is paused on node {}, which is gone, and only there: its \
                 snapshot did not reach the store's remote; it can be resumed once the node \
                 is back",
                e.node
            ))),
        }
    }

    /// The control plane's answer for sandbox `id`, lost ([`Route::Lost`]): a kill removes
    /// its entry (as a kill of a failed sandbox does on one host), anything else is 404 with
    /// the cause.
    async fn lost_answer(&self, id: &str, method: &Method, lost: Lost) -> Response {
        if method != Method::DELETE {
            return refuse(
                StatusCode::NOT_FOUND,
                &format!("sandbox {id} failed: {}", lost.cause),
            );
        }
        let removed = if lost.marked {
            self.catalog.remove(id, lost.rev).await
        } else {
            self.catalog.remove_lost(id, &lost.node, lost.rev).await
        };
        match removed {
            Ok(true) => {
                tracing::info!(id, "removed a lost sandbox from the catalog");
                StatusCode::NO_CONTENT.into_response()
            }
            Ok(false) => refuse(
                StatusCode::CONFLICT,
                &format!("sandbox {id} changed meanwhile; try again"),
            ),
            Err(e) => unavailable(e),
        }
    }

    /// A control-plane request for sandbox `id`: Ok(answer) when another node answers it or
    /// it is answered from the catalog, Err(req) when this node serves it (always, when the
    /// request was forwarded here: it is never forwarded twice). A request for a paused
    /// sandbox of a node that is gone takes it over first ([`Cluster::resolve`]); a kill of
    /// one removes its entry.
    async fn control_for(
        &self,
        state: &AppState,
        id: &str,
        mut req: Request,
    ) -> Result<Response, Request> {
        let method = req.method().clone();
        // Twice at most: a node found gone while it was asked is routed around once.
        let mut last_try = false;
        let lost = loop {
            let route = match self.route(state, id).await {
                Err(e) => return Ok(unavailable(e)),
                // Nothing to resume: its entry goes (its snapshot stays in the remote).
                Ok(Route::Adopt(e, rev)) if method == Method::DELETE => Route::Lost(Lost {
                    cause: format!("paused on node {}, which is gone", e.node),
                    marked: e.released,
                    node: e.node,
                    rev,
                }),
                Ok(route) => match self.resolve(state, id, route, forwarded(&req)).await {
                    Ok(route) => route,
                    Err(answer) => return Ok(answer),
                },
            };
            match route {
                Route::Here => return Err(req),
                // Forwarded here: served here (the sender routed it by the same catalog), but
                // for a takeover lost meanwhile to another node, which serves it (once).
                Route::Owner(..) if forwarded(&req) => return Err(req),
                Route::Winner(..) if no_more_hops(&req) => return Err(req),
                Route::Stranded(msg) => return Ok(refuse(StatusCode::SERVICE_UNAVAILABLE, &msg)),
                Route::Adopt(..) => return Ok(changed_hands(id)),
                Route::Lost(lost) => break lost,
                Route::Owner(node, info) | Route::Winner(node, info) => {
                    let (sent, again) = if last_try {
                        (req, None)
                    } else {
                        match twice(req).await {
                            Ok((a, b)) => (a, Some(b)),
                            Err(answer) => return Ok(answer),
                        }
                    };
                    if let Some(resp) = self.forward(&node, &info, sent).await {
                        return Ok(resp);
                    }
                    // Its node went away: route again (lost with it, or taken over).
                    match again {
                        Some(r) => req = r,
                        None => {
                            return Ok(refuse(
                                StatusCode::BAD_GATEWAY,
                                &format!("node {node} went away while answering"),
                            ))
                        }
                    }
                    last_try = true;
                }
            }
        };
        Ok(self.lost_answer(id, &method, lost).await)
    }

    /// Why this node is cut off from the cluster (its lease unconfirmed for longer than its
    /// TTL), if it is.
    pub(crate) fn cut_off_for(&self) -> Option<String> {
        self.membership.cut_off_for().map(|d| {
            format!(
                "node {} is cut off from the cluster: its place was last confirmed in etcd {} s \
                 ago (its lease lasts {LEASE_TTL_SECS} s)",
                self.node_id,
                d.as_secs()
            )
        })
    }

    /// `route` with a takeover done when it says so ([`Cluster::take_over`]).
    async fn resolve(
        &self,
        state: &AppState,
        id: &str,
        route: Route,
        forwarded: bool,
    ) -> Result<Route, Response> {
        match route {
            Route::Adopt(..) => self.take_over(state, id, forwarded).await,
            route => Ok(route),
        }
    }

    /// Takes sandbox `id` (paused and pushed, its node gone) over and adopts it here; the
    /// route the request takes then: here; to the node that took it first; or, when this
    /// node has no room for it (and the request was not forwarded), to the node placement
    /// picks, which takes it over. Requests through this node go one at a time
    /// ([`crate::wake`]'s turn), so the second finds it here.
    async fn take_over(
        &self,
        state: &AppState,
        id: &str,
        forwarded: bool,
    ) -> Result<Route, Response> {
        let _turn = state.wakes.turn(id).await;
        for _ in 0..3 {
            let (entry, rev) = match self.route(state, id).await {
                Ok(Route::Adopt(entry, rev)) => (*entry, rev),
                Ok(Route::Owner(node, info)) => return Ok(Route::Winner(node, info)),
                Ok(route) => return Ok(route),
                Err(e) => return Err(unavailable(e)),
            };
            if self.draining.load(Ordering::SeqCst) {
                let (node, info) = self.draining_elsewhere(id, &entry, forwarded).await?;
                return Ok(Route::Owner(node, info));
            }
            if !forwarded {
                match self.elsewhere(&entry).await {
                    Ok(Some((node, info))) => return Ok(Route::Owner(node, info)),
                    Ok(None) => {}
                    Err(e) => return Err(unavailable(e)),
                }
            }
            if self.adopt(state, id, entry, rev).await? {
                return Ok(Route::Here);
            }
            // Another node took it first (or its node came back): route again.
        }
        Err(changed_hands(id))
    }

    /// The node a sandbox of `entry`'s size resumes on when this one has no room for it
    /// (None: here).
    async fn elsewhere(
        &self,
        entry: &SandboxEntry,
    ) -> kiln_cluster::Result<Option<(String, NodeInfo)>> {
        let (mut nodes, entries) = tokio::try_join!(drains::nodes(&self.etcd), self.catalog())?;
        placement::count_from_catalog(&mut nodes, &entries);
        let need = Need {
            cpus: entry.cpus,
            memory_mib: entry.memory_mib,
        };
        let here = nodes.iter().find(|(n, _)| *n == self.node_id);
        if here.is_none_or(|(_, info)| placement::has_room(info, need)) {
            return Ok(None);
        }
        let chosen = placement::choose(&nodes, need).map(str::to_string);
        Ok(chosen.and_then(|c| nodes.into_iter().find(|(n, _)| *n == c)))
    }

    /// Adopts sandbox `id` here, its entry given to this node by compare-and-swap (at `rev`,
    /// its old node's key absent) once the runtime has made its record: true when it is this
    /// node's, false when another node took it first. After the takeover the sandbox stays
    /// this node's whatever follows (a failure to fetch the rest is answered, and the next
    /// request finishes it): its entry says paused here, never lost.
    async fn adopt(
        &self,
        state: &AppState,
        id: &str,
        entry: SandboxEntry,
        rev: i64,
    ) -> Result<bool, Response> {
        let internal = |why: String| refuse(StatusCode::INTERNAL_SERVER_ERROR, &why);
        let p = entry
            .pushed
            .clone()
            .ok_or_else(|| internal(format!("sandbox {id}'s catalog entry names no snapshot")))?;
        let adoption = adoption_of(id, &entry, &p)
            .map_err(|why| internal(format!("sandbox {id}'s catalog entry: {why}")))?;
        let old = entry.node.clone();
        let from = old.clone();
        let released = entry.released;
        let mine = SandboxEntry {
            node: self.node_id.clone(),
            released: false,
            ..entry
        };
        let _in_hand = InHand::take(&self.in_hand, id);
        let won = Arc::new(std::sync::Mutex::new(None));
        let claim = {
            let (catalog, id, mine, won) = (
                self.catalog.clone(),
                id.to_string(),
                mine.clone(),
                won.clone(),
            );
            let rt = tokio::runtime::Handle::current();
            let take = async move {
                if released {
                    catalog.take_over_released(&id, &mine, rev).await
                } else {
                    catalog.take_over(&id, &mine, rev, &old).await
                }
            };
            move || match rt.block_on(take) {
                Ok(Some(rev)) => {
                    *won.lock().unwrap_or_else(|e| e.into_inner()) = Some(rev);
                    Ok(true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(format!("taking it over in the cluster's catalog: {e}")),
            }
        };
        let sb = state.sandboxes.clone();
        let t = std::time::Instant::now();
        let adopted = tokio::task::spawn_blocking(move || sb.adopt(adoption, claim)).await;
        let taken = *won.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rev) = taken {
            let ms = t.elapsed().as_millis() as u64;
            let why = if released {
                "took over a paused sandbox its node let go (drained)"
            } else {
                "took over a paused sandbox whose node is gone"
            };
            tracing::info!(id, from, ms, "{why}");
            self.lock(&self.pushed)
                .insert(id.to_string(), p.snapshot.clone());
            if let Some(w) = self.written.lock().await.as_mut() {
                w.insert(id.to_string(), (mine, rev));
            }
        }
        match adopted {
            Ok(Ok(rec)) => Ok(rec.is_some()),
            Ok(Err(e)) => Err(crate::control::ApiError::from(e).into_response()),
            Err(e) => Err(internal(format!("adopting sandbox {id}: {e}"))),
        }
    }
}

/// Makes the cluster's etcd members unreachable from this host's sandboxes (etcd has no
/// authentication here: code in a sandbox that reached it could rewrite the catalog, drain
/// every node or point a template at data of its choosing). IPv4 endpoints, host names
/// resolved now; a failure is logged (the sandboxes' networks need the same nftables).
fn protect_etcd(urls: &[String]) {
    use std::net::{SocketAddr, ToSocketAddrs};
    let mut endpoints = Vec::new();
    for u in urls {
        let resolved = kiln_cluster::authority(u)
            .ok()
            .and_then(|a| a.to_socket_addrs().ok());
        endpoints.extend(resolved.into_iter().flatten().filter_map(|a| match a {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        }));
    }
    match kiln_network::protect(&endpoints) {
        Ok(()) => tracing::info!(?endpoints, "sandboxes of this host cannot reach etcd"),
        Err(e) => tracing::warn!("could not keep sandboxes away from etcd: {e}"),
    }
}

/// Two of control-plane request `req` (its body is small: E2B's JSON), to send it again when
/// the node it went to is gone.
async fn twice(req: Request) -> Result<(Request, Request), Response> {
    let (req, bytes) = buffered(req).await?;
    let (parts, _) = req.into_parts();
    Ok((
        Request::from_parts(parts.clone(), axum::body::Body::from(bytes.clone())),
        Request::from_parts(parts, axum::body::Body::from(bytes)),
    ))
}

/// Control-plane request `req` with its body read (it is small: E2B's JSON), and that body.
async fn buffered(req: Request) -> Result<(Request, axum::body::Bytes), Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            &format!("reading the request: {e}"),
        )
    })?;
    let req = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
    Ok((req, bytes))
}

/// The answer when a sandbox kept changing hands while a request looked for it.
fn changed_hands(id: &str) -> Response {
    refuse(
        StatusCode::CONFLICT,
        &format!("sandbox {id} changed hands meanwhile; try again"),
    )
}

/// What the runtime needs to adopt sandbox `id` from its entry `e` (paused, pushed as `p`).
fn adoption_of(id: &str, e: &SandboxEntry, p: &Pushed) -> Result<Adoption, String> {
    let a = &p.access;
    Ok(Adoption {
        id: id.to_string(),
        snapshot: p
            .snapshot
            .parse()
            .map_err(|err| format!("snapshot {:?}: {err}", p.snapshot))?,
        name: e.alias.clone(),
        source: e.template.clone(),
        created_ms: e.started_ms,
        deadline_ms: e.end_ms,
        timeout_secs: p.timeout_secs,
        on_timeout: serde_json::from_value(serde_json::Value::String(p.on_timeout.clone()))
            .map_err(|err| format!("onTimeout {:?}: {err}", p.on_timeout))?,
        auto_resume: p.auto_resume,
        metadata: e.metadata.clone(),
        access: Access {
            secure: a.secure,
            envd_token: a.envd_token.clone(),
            private_traffic: a.private_traffic,
            traffic_token: a.traffic_token.clone(),
            mask_request_host: a.mask_request_host.clone(),
        },
    })
}

/// Pushes sandbox snapshot `snapshot` (hex id) with its image to the store's remote: the
/// bytes uploaded.
async fn push(sandboxes: &Arc<Sandboxes>, snapshot: String) -> Result<u64, String> {
    let sb = sandboxes.clone();
    let pushed = tokio::task::spawn_blocking(move || {
        let id = snapshot
            .parse()
            .map_err(|e| format!("snapshot {snapshot:?}: {e}"))?;
        kiln_runtime::sandbox_snapshot::push(sb.store(), &id, None).map_err(|e| e.to_string())
    })
    .await;
    pushed.unwrap_or_else(|e| Err(format!("the push panicked: {e}")))
}

/// The runtime's records, read off the async threads.
async fn records(sandboxes: &Arc<Sandboxes>) -> Vec<SandboxRecord> {
    let sb = sandboxes.clone();
    match tokio::task::spawn_blocking(move || sb.records()).await {
        Ok(recs) => recs,
        Err(e) => {
            tracing::warn!("listing sandboxes: {e}");
            Vec::new()
        }
    }
}

/// Kills local sandbox `id` (the runtime's kill: its processes and record go), for `why`.
async fn stop_local(sandboxes: &Arc<Sandboxes>, id: &str, why: &str) {
    tracing::warn!(id, "stopping the sandbox on this node: {why}");
    let sb = sandboxes.clone();
    let id2 = id.to_string();
    match tokio::task::spawn_blocking(move || sb.kill(&id2)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(id, "stopping the sandbox: {e}"),
        Err(e) => tracing::warn!(id, "stopping the sandbox: {e}"),
    }
}

fn now_ms() -> u64 {
    kiln_runtime::record::now_ms()
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
            let again = req.headers_mut().remove(SECOND_HOP).is_some();
            req.extensions_mut().insert(Forwarded { again });
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

/// Whether `req` may not be sent on to another node: it came on a second hop.
fn no_more_hops(req: &Request) -> bool {
    req.extensions().get::<Forwarded>().is_some_and(|f| f.again)
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
    let route = match c.route(state, id).await {
        Ok(route) => match c.resolve(state, id, route, forwarded(&req)).await {
            Ok(route) => Ok(route),
            Err(answer) => return Ok(answer),
        },
        Err(e) => Err(e),
    };
    let (node, info) = match route {
        Ok(Route::Here) => return Err(req),
        Ok(Route::Adopt(..)) => return Ok(changed_hands(id)),
        // Forwarded here: served here, but for a takeover lost meanwhile to another node,
        // which serves it (a second hop, never a third).
        Ok(Route::Owner(..)) if forwarded(&req) => return Err(req),
        Ok(Route::Winner(..)) if no_more_hops(&req) => return Err(req),
        Ok(Route::Owner(node, info) | Route::Winner(node, info)) => (node, info),
        Ok(Route::Lost(lost)) => {
            return Ok(gone_data_plane(id, &format!("it failed: {}", lost.cause)))
        }
        Ok(Route::Stranded(msg)) => return Ok(gone_data_plane(id, &msg)),
        Err(e) => return Ok(unavailable(e)),
    };
    // The owner's domain may differ: the sandbox and port travel in E2B's headers.
    let h = req.headers_mut();
    h.insert("e2b-sandbox-id", header_value(id));
    h.insert("e2b-sandbox-port", header_value(&port.to_string()));
    match c.forward(&node, &info, req).await {
        Some(resp) => Ok(resp),
        None => Ok(gone_data_plane(id, &c.gone_cause(&node))),
    }
}

/// The data plane's answer for a sandbox that runs nowhere: E2B's proxy's "was not found"
/// (what the SDK looks for), as for a local sandbox that failed.
fn gone_data_plane(id: &str, why: &str) -> Response {
    crate::envd::agent::json_error(
        StatusCode::BAD_GATEWAY,
        &format!("The sandbox {id} was not found ({why})"),
    )
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
    mut req: Request,
    next: Next,
) -> Response {
    let Some(c) = &state.cluster else {
        return next.run(req).await;
    };
    if is_create(&req) && !forwarded(&req) {
        let bytes;
        (req, bytes) = match buffered(req).await {
            Ok(x) => x,
            Err(answer) => return answer,
        };
        let template = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| Some(v.get("templateID")?.as_str()?.trim().to_string()));
        let holders = match &template {
            Some(t) => c.holders(t).await,
            None => Vec::new(),
        };
        let (mut nodes, entries) = match tokio::try_join!(drains::nodes(&c.etcd), c.catalog()) {
            Ok(x) => x,
            Err(e) => return unavailable(e),
        };
        placement::count_from_catalog(&mut nodes, &entries);
        let chosen = placement::choose_for(&nodes, create_need(), &holders)
            .and_then(|id| nodes.iter().find(|(n, _)| n == id));
        match chosen {
            Some((node, info)) if *node != c.node_id => {
                return match c.forward(node, info, req).await {
                    Some(resp) => resp,
                    None => refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("node {node}, placed to take the sandbox, is gone; try again"),
                    ),
                };
            }
            Some(_) => {}
            None => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no node of the cluster has room for a new sandbox",
                )
            }
        }
    } else if let Some(id) = sandbox_in_path(req.uri().path()).map(str::to_string) {
        req = match c.control_for(&state, &id, req).await {
            Ok(answer) => return answer,
            Err(req) => req,
        };
        if !forwarded(&req) {
            // Served here, but a request that waited its turn behind a drain letting the
            // sandbox go finds it gone: routed again, once, where the catalog now says.
            let (now, later) = match twice(req).await {
                Ok(x) => x,
                Err(answer) => return answer,
            };
            let resp = next.clone().run(now).await;
            if resp.status() != StatusCode::NOT_FOUND || !c.gone_from_here(&state, &id).await {
                return c.after(&state, resp, changes_of(&later)).await;
            }
            tracing::info!(
                id,
                "the sandbox left this node while the request waited: routed again"
            );
            req = match c.control_for(&state, &id, later).await {
                Ok(answer) => return answer,
                Err(req) => req,
            };
        }
    }
    let changes = changes_of(&req);
    let resp = next.run(req).await;
    c.after(&state, resp, changes).await
}

/// Whether `req` may change something (its answer is followed by a catalog sync).
fn changes_of(req: &Request) -> bool {
    req.method() != Method::GET
}

impl Cluster {
    /// Whether sandbox `id`, which this node has no record of now, is in the catalog as
    /// another node's or as let go (a drain): a request that found it gone here is routed
    /// again.
    async fn gone_from_here(&self, state: &AppState, id: &str) -> bool {
        let sb = state.sandboxes.clone();
        let id2 = id.to_string();
        let here = tokio::task::spawn_blocking(move || sb.record(&id2).is_ok())
            .await
            .unwrap_or(true);
        if here {
            return false;
        }
        matches!(self.catalog.get(id).await, Ok(Some((e, _))) if e.node != self.node_id || e.released)
    }

    /// A control-plane answer given here: the catalog synced first when it changed something.
    async fn after(&self, state: &AppState, resp: Response, changes: bool) -> Response {
        if changes && resp.status().is_success() {
            self.sync_now(&state.sandboxes).await;
        }
        resp
    }
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
