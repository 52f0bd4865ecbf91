//! Timeouts: once a second the daemon lists the sandboxes, which applies expired deadlines
//! (kill, or pause for `autoPause`). Sandboxes that failed and whose deadline passed are
//! removed too (their tokens are in their records and go with them). The same list feeds the
//! metrics samples ([`crate::metrics`]).

use crate::AppState;
use kiln_runtime::State;
use std::sync::Arc;
use std::time::Duration;

pub(crate) async fn run(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = state.clone();
        match tokio::task::spawn_blocking(move || sweep(&st)).await {
            // Cluster mode: what the sweep saw (after reconciling) goes to the catalog, the
            // paused sandboxes' snapshots to the store's remote, and the sandboxes of nodes
            // that are gone are marked lost; a drain of this node lets its sandboxes go.
            Ok(Ok(list)) => {
                if let Some(c) = &state.cluster {
                    c.push_paused(&state.sandboxes, &list);
                    c.sync(&state.sandboxes, list).await;
                    c.sweep_dead().await;
                    c.drain_sweep(&state);
                }
            }
            Ok(Err(e)) => tracing::warn!("timeout sweep: {e}"),
            Err(e) => tracing::warn!("timeout sweep panicked: {e}"),
        }
    }
}

fn sweep(state: &AppState) -> kiln_runtime::Result<Vec<kiln_runtime::SandboxRecord>> {
    let list = state.sandboxes.list()?;
    state.metrics.sweep(&state.sandboxes, &list);
    state.envd.sweep(&list);
    let now = kiln_runtime::record::now_ms();
    for rec in &list {
        let dead = matches!(rec.state, State::Failed { .. } | State::Stopped);
        if dead && rec.deadline_ms.is_some_and(|d| now >= d) {
            tracing::info!(id = %rec.id, state = rec.state.name(), "removing expired sandbox");
            if let Err(e) = state.sandboxes.kill(&rec.id) {
                tracing::warn!(id = %rec.id, "removing expired sandbox: {e}");
            }
        }
    }
    Ok(list)
}
