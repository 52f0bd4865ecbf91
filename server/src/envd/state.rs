//! What this daemon keeps per sandbox for envd, in one place with one lifetime: it lives in
//! [`crate::AppState`] (one per `kiln serve`), and every [`super::agent::Session`] holds it.
//! The processes this daemon started (their envd config and whether they have a tty: `List`
//! and `Connect` answer with them), each sandbox's users (cached for a few seconds) and the
//! filesystem watchers. A sandbox's entries go when it does ([`EnvdState::sweep`], from the
//! daemon's periodic sweep): a paused sandbox keeps its processes and watchers.

use super::agent::Users;
use super::filesystem::Watcher;
use super::process::Meta;
use kiln_runtime::{SandboxRecord, StateKind};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Default)]
pub struct EnvdState {
    /// (sandbox id, pid) -> what the process was started as.
    pub(super) metas: Mutex<HashMap<(String, u32), Meta>>,
    /// Sandbox id -> its users and when they were read.
    pub(super) users: Mutex<HashMap<String, (Instant, Arc<Users>)>>,
    /// Watcher id -> the watcher.
    pub(super) watchers: Mutex<HashMap<String, Arc<Watcher>>>,
}

impl EnvdState {
    /// Forgets what it keeps of every sandbox not in `list` or no longer alive (stopped,
    /// failed), and ends those sandboxes' watchers; users are re-read after a pause.
    pub fn sweep(&self, list: &[SandboxRecord]) {
        let alive: HashSet<&str> = list
            .iter()
            .filter(|r| !matches!(r.state.kind(), StateKind::Stopped | StateKind::Failed))
            .map(|r| r.id.as_str())
            .collect();
        let running: HashSet<&str> = list
            .iter()
            .filter(|r| r.state.kind() == StateKind::Running)
            .map(|r| r.id.as_str())
            .collect();
        self.metas
            .lock()
            .expect("process metadata")
            .retain(|(id, _), _| alive.contains(id.as_str()));
        self.users
            .lock()
            .expect("users cache")
            .retain(|id, _| running.contains(id.as_str()));
        let gone: Vec<Arc<Watcher>> = {
            let mut w = self.watchers.lock().expect("watchers");
            let ids: Vec<String> = w
                .iter()
                .filter(|(_, w)| !alive.contains(w.sandbox.as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|k| w.remove(k)).collect()
        };
        for w in gone {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_forgets_the_sandboxes_that_are_gone() {
        let state = EnvdState::default();
        let users = Arc::new(Users::parse("", ""));
        for id in ["runs", "stopped", "gone"] {
            let mut u = state.users.lock().unwrap();
            u.insert(id.to_string(), (Instant::now(), users.clone()));
        }
        let list = [
            super::super::tests::record("runs", "running", Default::default()),
            super::super::tests::record("stopped", "stopped", Default::default()),
        ];
        state.sweep(&list);
        let mut left: Vec<String> = state.users.lock().unwrap().keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["runs"]);
        state.sweep(&[]);
        assert!(state.users.lock().unwrap().is_empty());
    }
}
