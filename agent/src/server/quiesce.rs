//! Quiescing before a checkpoint. gVisor cannot save a socket bound to the host, and the
//! agent's listener (and every connection it accepted) is one under `--host-uds`. So a
//! `Quiesce` request makes the agent close its listener and every other connection, and the
//! accept loop then waits for the host's resume signal, once the sandbox is restored (or left
//! running after a failed checkpoint): with `--resume FILE` (kiln's gVisor driver: a file in a
//! directory only the host writes, read-only in here) a value in FILE other than the one it
//! held when the quiesce began; without, a `resume` file appearing beside the socket.
//! Outside `--unix` (vsock in a VM: a VM snapshot keeps everything) it answers at once.

use super::{send, shutdown, Conn, Res};
use crate::protocol::{ErrorKind, Kind};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

static CONNS: Mutex<Vec<Weak<File>>> = Mutex::new(Vec::new());
/// The Unix socket the accept loop serves, while it is listening.
static LISTENING: Mutex<Option<PathBuf>> = Mutex::new(None);
static QUIESCING: AtomicBool = AtomicBool::new(false);
/// Resumes so far. A connection accepted before the last one carries a quiesce whose cycle is
/// over: from a caller that died with its request unread, which the host's recovery has
/// quiesced and released since. Taken late, it would quiesce the agent again with nobody
/// left to release it.
static RESUMES: AtomicU64 = AtomicU64::new(0);
/// `--resume FILE`, and what it held when the current quiesce began.
static RESUME_FILE: Mutex<Option<PathBuf>> = Mutex::new(None);
static RESUME_SEEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// A pipe whose read end the accept loop waits on beside its listener, so a quiesce wakes it
/// at once while an idle agent sleeps (no timed polling: every wakeup of an idle sandbox's
/// init costs the host CPU through gVisor's platform).
static WAKE: OnceLock<Option<(OwnedFd, OwnedFd)>> = OnceLock::new();

fn wake_pipe() -> Option<&'static (OwnedFd, OwnedFd)> {
    WAKE.get_or_init(|| {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into our two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return None;
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    })
    .as_ref()
}

/// The descriptor the accept loop polls beside its listener: readable once a quiesce began
/// (None if no pipe could be made: the loop then polls with a timeout).
pub fn wake_fd() -> Option<RawFd> {
    wake_pipe().map(|(r, _)| r.as_raw_fd())
}

/// Empties the wake pipe (the accept loop, once it saw the quiesce).
pub fn drain_wake() {
    if let Some((r, _)) = wake_pipe() {
        let mut buf = [0u8; 64];
        // SAFETY: reads into our buffer from our own non-blocking pipe.
        while unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

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

/// Makes the host's resume signal a new value in `file` (see the module's doc).
pub fn set_resume_file(file: Option<&Path>) {
    *RESUME_FILE.lock().unwrap_or_else(|p| p.into_inner()) = file.map(Path::to_path_buf);
}

fn resume_file() -> Option<PathBuf> {
    RESUME_FILE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// The resume file's value (empty when missing); a short read: it is a nonce.
fn resume_value(file: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    if let Ok(f) = File::open(file) {
        let _ = f.take(256).read_to_end(&mut v);
    }
    v
}

/// The resumes so far: the accept loop gives each connection the value at its accept.
pub fn epoch() -> u64 {
    RESUMES.load(Ordering::SeqCst)
}

/// True once a quiesce began: the accept loop stops and waits for [`wait_for_resume`].
pub fn quiescing() -> bool {
    QUIESCING.load(Ordering::SeqCst)
}

/// Blocks until the host signals a resume (see the module's doc), then ends the quiesce.
/// `dir` is the socket's directory.
pub fn wait_for_resume(dir: &Path) {
    let file = resume_file();
    let seen = RESUME_SEEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let marker = dir.join("resume");
    loop {
        let resumed = match &file {
            Some(f) => {
                let v = resume_value(f);
                !v.is_empty() && v != seen
            }
            None => std::fs::remove_file(&marker).is_ok(),
        };
        if resumed {
            RESUMES.fetch_add(1, Ordering::SeqCst);
            QUIESCING.store(false, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub(crate) fn quiesce(c: &Conn, accepted_in: u64) -> Res<()> {
    if accepted_in != epoch() {
        return super::fail(
            ErrorKind::Other,
            "quiesce: the connection was accepted before the last resume (its caller's cycle \
             is over)"
                .to_string(),
        );
    }
    let Some(path) = LISTENING.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return send(c, Kind::Ok, b"");
    };
    drop(path);
    if let Some(f) = resume_file() {
        // Read before the quiesce shows: the host's next value is the signal.
        *RESUME_SEEN.lock().unwrap_or_else(|p| p.into_inner()) = resume_value(&f);
    }
    // The accept loop wakes on the pipe, sees the flag and drops the listener.
    QUIESCING.store(true, Ordering::SeqCst);
    if let Some((_, w)) = wake_pipe() {
        // SAFETY: writes one byte from our buffer to our own pipe (full: already signalled).
        unsafe { libc::write(w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiesce_accepted_before_the_last_resume_is_refused_and_changes_nothing() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let c: Conn = Arc::new(File::from(OwnedFd::from(ours)));
        let accepted_in = epoch();
        // The host's recovery quiesced and released the agent after this connection was
        // accepted, before its request was read.
        RESUMES.fetch_add(1, Ordering::SeqCst);
        assert!(quiesce(&c, accepted_in).is_err());
        assert!(!quiescing(), "a stale quiesce quiesced the agent");
    }
}
