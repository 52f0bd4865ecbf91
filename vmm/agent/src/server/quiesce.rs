//! Quiescing before a checkpoint. gVisor cannot save a socket bound to the host, and the
//! agent's listener (and every connection it accepted) is one under `--host-uds`. So a
//! `Quiesce` request makes the agent close its listener and every other connection, and the
//! accept loop then waits for a `resume` file to appear beside the socket, which the host
//! writes once the sandbox is restored (or left running after a failed checkpoint).
//! Outside `--unix` (vsock in a VM: a VM snapshot keeps everything) it answers at once.

use super::{send, shutdown, Conn, Res};
use crate::protocol::{ErrorKind, Kind};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

static CONNS: Mutex<Vec<Weak<File>>> = Mutex::new(Vec::new());
/// The Unix socket the accept loop serves, while it is listening.
static LISTENING: Mutex<Option<PathBuf>> = Mutex::new(None);
static QUIESCING: AtomicBool = AtomicBool::new(false);

/// How long open connections may take to close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Registers a connection, so a quiesce can close it.
pub(crate) fn track(c: &Conn) {
    let mut v = CONNS.lock().unwrap_or_else(|p| p.into_inner());
    v.retain(|w| w.strong_count() > 0);
    v.push(Arc::downgrade(c));
}

/// Set by the accept loop when it listens on `path` (None once it stopped).
pub fn set_listening(path: Option<&Path>) {
    *LISTENING.lock().unwrap_or_else(|p| p.into_inner()) = path.map(Path::to_path_buf);
}

/// True once a quiesce began: the accept loop stops and waits for [`wait_for_resume`].
pub fn quiescing() -> bool {
    QUIESCING.load(Ordering::SeqCst)
}

/// Blocks until the host writes `resume` in `dir`, removes it and ends the quiesce.
pub fn wait_for_resume(dir: &Path) {
    let marker = dir.join("resume");
    loop {
        if std::fs::remove_file(&marker).is_ok() {
            QUIESCING.store(false, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub(crate) fn quiesce(c: &Conn) -> Res<()> {
    let Some(path) = LISTENING.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return send(c, Kind::Ok, b"");
    };
    drop(path);
    // The accept loop sees the flag within one poll and drops the listener.
    QUIESCING.store(true, Ordering::SeqCst);
    let others: Vec<Arc<File>> = CONNS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|o| !Arc::ptr_eq(o, c))
        .collect();
    for o in &others {
        shutdown(o, libc::SHUT_RDWR);
    }
    let weak: Vec<Weak<File>> = others.iter().map(Arc::downgrade).collect();
    drop(others);
    let t = Instant::now();
    loop {
        let open = weak.iter().filter(|w| w.strong_count() > 0).count();
        let listening = LISTENING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if open == 0 && !listening {
            super::lifecycle::release_free_memory();
            return send(c, Kind::Ok, b"");
        }
        if t.elapsed() > CLOSE_WAIT {
            return super::fail(
                ErrorKind::Other,
                format!("quiesce: {open} connection(s) still open after {CLOSE_WAIT:?}"),
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
