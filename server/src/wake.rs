//! Resuming paused sandboxes once however many ask at the same moment: `connect` of a paused
//! sandbox, and any data-plane request (envd's port or another one) for a paused sandbox
//! created with `autoResume: {enabled: true}` (E2B's auto-resume; without it such a request
//! is answered as E2B's proxy answers for a paused sandbox).
//!
//! Requests for one sandbox take its wake lock in turn; the first resumes it, the others find
//! it running when they get the lock. An auto-resumed sandbox gets its own timeout again
//! (E2B: the create's timeout, else 5 minutes).

use crate::AppState;
use kiln_runtime::{SandboxRecord, State};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// E2B's timeout of an auto-resumed sandbox that has none of its own.
const DEFAULT_AUTO_RESUME_SECS: u64 = 300;

/// One lock per sandbox being resumed.
#[derive(Default)]
pub struct Wakes {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Whether a resume happened in this call, and the record after it.
pub struct Woken {
    pub resumed: bool,
    pub rec: SandboxRecord,
}

/// One caller's turn on one sandbox ([`Wakes::turn`]); the next caller's when dropped.
pub(crate) struct Turn<'a> {
    wakes: &'a Wakes,
    id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Wakes {
    /// Waits for the turn on sandbox `id`: callers that resume it, or (cluster mode) take it
    /// over from a node that is gone, go one at a time.
    pub(crate) async fn turn(&self, id: &str) -> Turn<'_> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        Turn {
            wakes: self,
            id: id.to_string(),
            lock,
            guard: Some(guard),
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.guard = None;
        // The lock goes with its last user (the map and this turn hold it; a waiter took
        // its clone under the map's mutex, as this check is made).
        let mut locks = self.wakes.locks.lock().unwrap_or_else(|e| e.into_inner());
        let last = Arc::strong_count(&self.lock) == 2;
        if last
            && locks
                .get(&self.id)
                .is_some_and(|l| Arc::ptr_eq(l, &self.lock))
        {
            locks.remove(&self.id);
        }
    }
}

/// Resumes sandbox `id` with `timeout_secs` if it is paused (once among concurrent callers);
/// a sandbox that runs is returned as it is.
pub async fn resume_once(
    state: &AppState,
    id: &str,
    timeout_secs: Option<u64>,
    mode: kiln_runtime::ResumeMode,
) -> kiln_runtime::Result<Woken> {
    let _turn = state.wakes.turn(id).await;
    resume_if_paused(state, id, timeout_secs, mode).await
}

async fn resume_if_paused(
    state: &AppState,
    id: &str,
    timeout_secs: Option<u64>,
    mode: kiln_runtime::ResumeMode,
) -> kiln_runtime::Result<Woken> {
    let sb = state.sandboxes.clone();
    let id = id.to_string();
    let run = move || {
        let rec = sb.record(&id)?;
        if !matches!(rec.state, State::Paused { .. }) {
            return Ok(Woken {
                resumed: false,
                rec,
            });
        }
        match sb.resume_with(&rec.id, timeout_secs, mode) {
            Ok(rec) => Ok(Woken { resumed: true, rec }),
            // Resumed meanwhile by someone else (the CLI, or an older request's retry).
            Err(e) => match sb.record(&rec.id) {
                Ok(now) if now.state == State::Running => Ok(Woken {
                    resumed: false,
                    rec: now,
                }),
                _ => Err(e),
            },
        }
    };
    tokio::task::spawn_blocking(run)
        .await
        .map_err(|e| kiln_runtime::Error::Driver {
            what: "resume".into(),
            detail: format!("panicked: {e}"),
        })?
}

/// The record of a data-plane request's sandbox, resumed first when it is paused and asked
/// for auto-resume; any other record as it is.
pub async fn auto_resume(
    state: &AppState,
    rec: SandboxRecord,
) -> kiln_runtime::Result<SandboxRecord> {
    // A sandbox paused without memory is resumed only when asked (E2B: traffic cannot wake it).
    if !rec.auto_resume
        || !matches!(rec.state, State::Paused { .. })
        || state.sandboxes.paused_files_only(&rec)
    {
        return Ok(rec);
    }
    let secs = rec.timeout_secs.unwrap_or(DEFAULT_AUTO_RESUME_SECS);
    let woken = resume_once(
        state,
        &rec.id,
        Some(secs),
        kiln_runtime::ResumeMode::Restore,
    )
    .await?;
    if woken.resumed {
        tracing::info!(id = %woken.rec.id, timeout_secs = secs, "auto-resumed sandbox on a request");
    }
    Ok(woken.rec)
}
