//! A drain of this node ([`kiln_cluster::drain`], `kiln node drain`): while its drain key
//! exists the node says so in its info, takes no sandbox over, and lets its sandboxes go,
//! one at a time, in a task of its own started by the once-a-second sweep: a running one is
//! paused as E2B's pause does it here ([`Cluster::pause`]: paused, pushed, resumed where it
//! was if the push fails), a paused one pushed if it is not yet; then its entry is rewritten
//! by compare-and-swap as released ([`SandboxEntry::released`]), and its copy here goes (a
//! paused record's kill removes its directory and holds alone). A sandbox that cannot be let
//! go stays here, as it is, and is written with why into the drain key ([`Drain::failed`]),
//! not tried again until the drain is asked again. Failed sandboxes are left alone.

use super::{push, records, Cluster, InHand, Written};
use crate::AppState;
use axum::http::StatusCode;
use axum::response::Response;
use kiln_cluster::drain::{self as drains, Drain};
use kiln_cluster::SandboxEntry;
use kiln_runtime::{PauseMode, SandboxRecord, State as SbxState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Clears its flag when dropped (a pass that ended, or panicked).
struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What became of one sandbox in a pass.
enum Release {
    /// Let go: its entry says released, its copy here is gone.
    Done,
    /// Not now (in hand elsewhere, changed, the catalog not read yet): the next pass.
    Later,
}

impl Cluster {
    /// Once a sweep: reads this node's drain key and, while it exists, runs a pass over the
    /// node's sandboxes in a task (one at most at a time).
    pub(crate) fn drain_sweep(self: &Arc<Self>, state: &Arc<AppState>) {
        if self.drain_busy.swap(true, Ordering::SeqCst) {
            return;
        }
        let busy = Busy(self.drain_busy.clone());
        let (c, state) = (self.clone(), state.clone());
        tokio::spawn(async move {
            c.drain_pass(&state).await;
            drop(busy);
        });
    }

    async fn drain_pass(&self, state: &AppState) {
        let (mut d, mut rev) = match drains::requested(&self.etcd, &self.node_id).await {
            Ok(Some(x)) => x,
            Ok(None) => {
                if self.draining.swap(false, Ordering::SeqCst) {
                    tracing::info!(node = %self.node_id, "drain ended: placement may pick this node again");
                }
                return;
            }
            Err(e) => {
                tracing::debug!("cluster drain key: {e}");
                return;
            }
        };
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!(
                node = %self.node_id,
                "draining: placement skips this node, and its sandboxes are paused, pushed and \
                 let go to resume on other nodes"
            );
        }
        if d.started_ms.is_none() {
            d.started_ms = Some(super::now_ms());
            let Some(r) = self.progress(&d, rev).await else {
                return;
            };
            rev = r;
        }
        let no_remote = !state.sandboxes.store().has_remote();
        for r in records(&state.sandboxes).await {
            if super::types::SandboxState::of(&r).is_none()
                || r.op.is_some()
                || d.failed.contains_key(&r.id)
            {
                continue;
            }
            let t = std::time::Instant::now();
            let released = if no_remote {
                Err(
                    "this node's store has no S3 remote (kiln remote add): its sandboxes can \
                     resume only here"
                        .to_string(),
                )
            } else {
                self.release(state, &r).await
            };
            match released {
                Ok(Release::Done) => {
                    let ms = t.elapsed().as_millis() as u64;
                    tracing::info!(id = %r.id, ms, "drain: let the sandbox go; it resumes on the next node asked for it");
                }
                Ok(Release::Later) => {}
                Err(why) => {
                    tracing::warn!(id = %r.id, "drain: the sandbox stays on this node: {why}");
                    d.failed.insert(r.id.clone(), why);
                    let Some(r) = self.progress(&d, rev).await else {
                        return;
                    };
                    rev = r;
                }
            }
            // Cancelled (or asked again) meanwhile: no more of them go in this pass.
            match drains::requested(&self.etcd, &self.node_id).await {
                Ok(Some((_, now))) if now == rev => {}
                _ => return,
            }
        }
    }

    /// Writes the drain's progress `d` into its key, still at `rev`: its new revision, or
    /// None when the pass must end (asked again or cancelled meanwhile: the next sweep reads
    /// it again; or etcd failed).
    async fn progress(&self, d: &Drain, rev: i64) -> Option<i64> {
        match drains::update(&self.etcd, &self.node_id, d, rev).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cluster drain key: {e}");
                None
            }
        }
    }

    /// Lets sandbox `r` go: paused and pushed, its entry released, its copy here removed.
    /// Err: why it stays here (running, or paused here alone).
    async fn release(&self, state: &AppState, r: &SandboxRecord) -> Result<Release, String> {
        let id = r.id.as_str();
        // Requests through this node that resume it wait meanwhile: none resumes it here
        // between its pause and its release.
        let _turn = state.wakes.turn(id).await;
        let Some(_in_hand) = InHand::take(&self.in_hand, id) else {
            return Ok(Release::Later);
        };
        let Some(rec) = self.record(state, id).await else {
            return Ok(Release::Later);
        };
        match &rec.state {
            _ if rec.op.is_some() => return Ok(Release::Later),
            SbxState::Running => self
                .pause(&state.sandboxes, id, PauseMode::Full)
                .await
                .map_err(|e| e.message)?,
            SbxState::Paused { saved } => {
                let snapshot = saved.to_hex();
                if self.lock(&self.pushed).get(id) != Some(&snapshot) {
                    push(&state.sandboxes, snapshot.clone())
                        .await
                        .map_err(|e| format!("pushing its snapshot to the store's remote: {e}"))?;
                    self.lock(&self.pushed).insert(id.to_string(), snapshot);
                }
            }
            _ => return Ok(Release::Later),
        }
        let Some(rec) = self.record(state, id).await else {
            return Ok(Release::Later);
        };
        let want = match self.entry(&rec) {
            Some(
                e @ SandboxEntry {
                    pushed: Some(_), ..
                },
            ) if rec.op.is_none() => SandboxEntry {
                released: true,
                ..e
            },
            _ => {
                return Err(format!(
                    "it is {} after its pause, not paused and pushed",
                    rec.state.name()
                ))
            }
        };
        {
            let mut guard = self.written.lock().await;
            let Some(written) = guard.as_mut() else {
                return Ok(Release::Later);
            };
            match self.write(written, id, &want).await {
                Ok(Written::Done) if written.get(id).is_some_and(|(e, _)| *e == want) => {
                    // No longer this node's to write or remove.
                    written.remove(id);
                }
                Ok(Written::Done) => return Err("its catalog entry kept changing".into()),
                Ok(Written::Stop(why)) => return Err(why),
                Err(e) => return Err(format!("writing its catalog entry: {e}")),
            }
            self.lock(&self.pushed).remove(id);
        }
        // Its copy here: a paused record, so its directory and holds alone. Should the kill
        // fail, the entry says released and the next sync stops the copy.
        super::stop_local(&state.sandboxes, id, "let go in a drain").await;
        Ok(Release::Done)
    }

    /// Sandbox `id`'s record here, if it has one.
    async fn record(&self, state: &AppState, id: &str) -> Option<SandboxRecord> {
        let sb = state.sandboxes.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || sb.record(&id).ok())
            .await
            .ok()
            .flatten()
    }

    /// The answer, on this draining node, to a request that would take sandbox `id` (its
    /// entry `entry`) over here: forwarded to the node placement picks (not for a request
    /// forwarded here already), else 503.
    pub(super) async fn draining_elsewhere(
        &self,
        id: &str,
        entry: &SandboxEntry,
        forwarded: bool,
    ) -> Result<(String, kiln_cluster::NodeInfo), Response> {
        let busy = |why: String| super::refuse(StatusCode::SERVICE_UNAVAILABLE, &why);
        if forwarded {
            return Err(busy(format!(
                "node {} is draining: it takes no sandbox over; ask another node for {id}",
                self.node_id
            )));
        }
        match self.elsewhere(entry).await {
            Ok(Some(to)) => Ok(to),
            Ok(None) => Err(busy(format!(
                "node {} is draining and no other node has room for sandbox {id}",
                self.node_id
            ))),
            Err(e) => Err(super::unavailable(e)),
        }
    }
}
