//! What this daemon keeps per sandbox for envd, in one place with one lifetime: it lives in
//! [`crate::AppState`] (one per `kiln serve`), and every [`super::agent::Session`] holds it.
//! The processes this daemon started (their envd config and whether they have a tty: `List`
//! and `Connect` answer with them), each sandbox's users (cached for a few seconds) and the
//! filesystem watchers.

use super::agent::Users;
use super::filesystem::Watcher;
use super::process::Meta;
use std::collections::HashMap;
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
