//! What `kiln node` does, straight on etcd (no node's API, no API key): list the nodes
//! ([`nodes`]), drain one and follow its sandboxes until each is let go ([`drain`]), end a
//! drain ([`crate::drain::cancel`]). The CLI parses, calls these and prints.

use crate::{
    drain as drains, membership, Catalog, Error, Etcd, Result, SandboxEntry, SandboxState,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One node as `kiln node ls` shows it: live nodes, and nodes that are gone but still named
/// by a drain or a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub id: String,
    /// Its lease lives.
    pub live: bool,
    /// Its advertise URL (live nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// A drain is asked of it (its key exists).
    pub draining: bool,
    /// It says it is draining (it saw the key).
    pub draining_seen: bool,
    /// Its sandboxes in the catalog: running, paused, and paused ones it let go (released,
    /// not yet taken over).
    pub running: u32,
    pub paused: u32,
    pub released: u32,
    /// What it last published (live nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// The cluster's nodes, by id.
pub async fn nodes(etcd: Arc<Etcd>) -> Result<Vec<NodeRow>> {
    let catalog = Catalog::new(etcd.clone());
    let (live, drains, entries) =
        tokio::try_join!(membership::nodes(&etcd), drains::all(&etcd), catalog.list())?;
    let mut rows: BTreeMap<String, NodeRow> = BTreeMap::new();
    for (id, info) in &live {
        let r = row(&mut rows, id);
        r.live = true;
        r.advertise = Some(info.advertise.clone());
        r.draining_seen = info.draining;
        r.free_memory_mib = Some(info.free_memory_mib);
        r.memory_mib = Some(info.memory_mib);
    }
    for id in drains.keys() {
        row(&mut rows, id).draining = true;
    }
    for (_, e, _) in &entries {
        let r = row(&mut rows, &e.node);
        match e.state {
            SandboxState::Running => r.running += 1,
            SandboxState::Paused if e.released => r.released += 1,
            SandboxState::Paused => r.paused += 1,
            SandboxState::Failed => {}
        }
    }
    Ok(rows.into_values().collect())
}

fn row<'a>(rows: &'a mut BTreeMap<String, NodeRow>, id: &str) -> &'a mut NodeRow {
    rows.entry(id.to_string()).or_insert_with(|| NodeRow {
        id: id.to_string(),
        live: false,
        advertise: None,
        draining: false,
        draining_seen: false,
        running: 0,
        paused: 0,
        released: 0,
        free_memory_mib: None,
        memory_mib: None,
    })
}

/// How [`drain`] follows the node.
#[derive(Clone, Copy, Debug)]
pub struct Follow {
    /// Wait for the node at all (false: ask and return).
    pub wait: bool,
    /// How long to follow it at most (the drain goes on past it).
    pub timeout: Duration,
    /// How often the catalog is read.
    pub every: Duration,
}

/// What became of one of the draining node's sandboxes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Paused, pushed and let go: the next node asked for it resumes it.
    Released,
    /// Already taken over by another node (`node`).
    Elsewhere,
    /// Killed meanwhile (its entry left the catalog).
    Gone,
    /// It failed meanwhile (`cause`).
    Failed,
    /// The node could not let it go (`cause`): it stays there, running or paused.
    Kept,
}

/// One sandbox of the draining node, once settled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Settled {
    pub id: String,
    /// Its state on the node when the drain began (or when it showed up there).
    pub was: SandboxState,
    pub outcome: Outcome,
    /// Where it is now ([`Outcome::Elsewhere`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// Since the drain was asked.
    pub ms: u64,
}

/// What [`drain`] reports as it follows the node.
#[derive(Clone, Debug)]
pub enum Event {
    /// The drain is asked: the node's sandboxes to let go (running, paused), and whether
    /// the node is live (a node that is not starts when it joins).
    Asked {
        running: usize,
        paused: usize,
        live: bool,
    },
    /// The node saw its key and began.
    Started { ms: u64 },
    /// One sandbox settled.
    Settled(Settled),
}

/// How a drain went, as far as it was followed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DrainReport {
    pub node: String,
    /// The node was live when the drain was asked.
    pub live: bool,
    /// The node began (it saw its key).
    pub started: bool,
    /// Every sandbox it had settled: nothing of it is left to let go.
    pub complete: bool,
    /// Its key was removed meanwhile (`kiln node undrain`).
    pub cancelled: bool,
    /// The node left the cluster meanwhile (its lease expired).
    pub node_left: bool,
    /// Followed for this long (seconds).
    pub secs: f64,
    pub settled: Vec<Settled>,
    /// Its sandboxes not settled yet (timeout, `--no-wait`, or it left).
    pub pending: Vec<String>,
}

impl DrainReport {
    /// Those of `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.settled.iter().filter(|s| s.outcome == outcome).count()
    }
}

/// A sandbox entry the draining node still has to let go.
fn holds(e: &SandboxEntry, node: &str) -> bool {
    e.node == node && e.state != SandboxState::Failed && !e.released
}

/// Asks node `node` to drain ([`crate::drain::request`]), then, with `follow.wait`, reads
/// the catalog every `follow.every` until each of its sandboxes has settled (let go, already
/// elsewhere, gone, failed, or kept with the node's cause), the drain is cancelled, the node
/// leaves, or `follow.timeout` passes; `on` hears each step. A node that is not live and is
/// named by no sandbox is refused ([`Error::NoSuchNode`]: a typo writes no key).
pub async fn drain(
    etcd: Arc<Etcd>,
    node: &str,
    follow: Follow,
    mut on: impl FnMut(&Event),
) -> Result<DrainReport> {
    membership::check_node_id(node)?;
    let t = Instant::now();
    let catalog = Catalog::new(etcd.clone());
    let (info, entries) = tokio::try_join!(membership::node(&etcd, node), catalog.list())?;
    let live = info.is_some();
    if !live && !entries.iter().any(|(_, e, _)| e.node == node) {
        return Err(Error::NoSuchNode(node.to_string()));
    }
    drains::request(&etcd, node).await?;
    let mut pending: BTreeMap<String, SandboxState> = entries
        .iter()
        .filter(|(_, e, _)| holds(e, node))
        .map(|(id, e, _)| (id.clone(), e.state))
        .collect();
    let count = |s| pending.values().filter(|&&v| v == s).count();
    on(&Event::Asked {
        running: count(SandboxState::Running),
        paused: count(SandboxState::Paused),
        live,
    });
    let mut report = DrainReport {
        node: node.to_string(),
        live,
        ..Default::default()
    };
    if follow.wait && live {
        // A timeout past what the clock can hold waits as long as it can.
        let deadline = t
            .checked_add(follow.timeout)
            .unwrap_or(t + Duration::from_secs(100 * 365 * 24 * 3600));
        while Instant::now() < deadline {
            tokio::time::sleep(follow.every).await;
            let (drain, entries, info) = tokio::try_join!(
                drains::requested(&etcd, node),
                catalog.list(),
                membership::node(&etcd, node)
            )?;
            let ms = t.elapsed().as_millis() as u64;
            let Some((drain, _)) = drain else {
                report.cancelled = true;
                break;
            };
            if let (Some(_), false) = (drain.started_ms, report.started) {
                report.started = true;
                on(&Event::Started { ms });
            }
            let now: BTreeMap<&str, &SandboxEntry> =
                entries.iter().map(|(id, e, _)| (id.as_str(), e)).collect();
            // Sandboxes that reached the node since (a create placed before the drain).
            for (id, e) in &now {
                if holds(e, node) && !report.settled.iter().any(|s| s.id == *id) {
                    pending.entry(id.to_string()).or_insert(e.state);
                }
            }
            let mut done = BTreeSet::new();
            for (id, was) in &pending {
                let settled = |outcome, node: Option<&str>, cause: Option<&str>| Settled {
                    id: id.clone(),
                    was: *was,
                    outcome,
                    node: node.map(str::to_string),
                    cause: cause.map(str::to_string),
                    ms,
                };
                let s = match now.get(id.as_str()) {
                    None => settled(Outcome::Gone, None, None),
                    Some(e) if e.node != node => settled(Outcome::Elsewhere, Some(&e.node), None),
                    Some(e) if e.released => settled(Outcome::Released, None, None),
                    Some(e) if e.state == SandboxState::Failed => {
                        settled(Outcome::Failed, None, e.cause.as_deref())
                    }
                    Some(_) => match drain.failed.get(id) {
                        Some(cause) => settled(Outcome::Kept, None, Some(cause)),
                        None => continue,
                    },
                };
                on(&Event::Settled(s.clone()));
                report.settled.push(s);
                done.insert(id.clone());
            }
            pending.retain(|id, _| !done.contains(id));
            if report.started && pending.is_empty() {
                report.complete = true;
                break;
            }
            if info.is_none() {
                report.node_left = true;
                break;
            }
        }
    }
    report.pending = pending.into_keys().collect();
    report.secs = t.elapsed().as_secs_f64();
    Ok(report)
}
