//! `filesystem.Filesystem` over the agent's file requests, with envd's path rules, users
//! and errors. Watchers (`CreateWatcher` and friends) are kept per daemon, bounded.

use super::agent::{from_client, with_owned_session, with_session, EnvdError, Session};
use super::connect::{self, Code, RpcError};
use super::process::basic_user;
use super::stream::{self, Msg, Pump, Sink};
use super::types::*;
use crate::AppState;
use axum::http::HeaderMap;
use axum::response::Response;
use kiln_agent::client;
use kiln_agent::protocol::{self as proto, EventOp, FileKind, Kind};
use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Watchers a daemon keeps at most, and the events each buffers (the oldest dropped).
const MAX_WATCHERS: usize = 256;
const MAX_EVENTS: usize = 4096;

pub async fn rpc(
    state: Arc<AppState>,
    id: String,
    method: &str,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Response {
    let bytes = match axum::body::to_bytes(body, connect::MAX_MESSAGE).await {
        Ok(b) => b,
        Err(e) => {
            let e = RpcError::new(Code::InvalidArgument, format!("reading the request: {e}"));
            return if method == "WatchDir" {
                connect::stream_error(&e)
            } else {
                connect::unary_error(&e)
            };
        }
    };
    let user = match basic_user(headers) {
        Ok(u) => u,
        Err(e) => return connect::unary_error(&e),
    };
    if method == "WatchDir" {
        return watch_dir(state, id, user, headers, &bytes)
            .await
            .unwrap_or_else(|e| e.stream());
    }
    unary(state, id, user, method, &bytes)
        .await
        .unwrap_or_else(|e| e.unary())
}

fn entry_response(e: EntryInfo) -> serde_json::Value {
    serde_json::json!({ "entry": e })
}

async fn unary(
    state: Arc<AppState>,
    id: String,
    user: Option<String>,
    method: &str,
    body: &[u8],
) -> Result<Response, EnvdError> {
    let v = match method {
        "Stat" => {
            let req: PathRequest = connect::decode(body)?;
            with_session(&state, &id, move |s| {
                let u = s.user(user.as_deref())?;
                let path = s.resolve(&req.path, &u)?;
                let info = s
                    .call(|c| client::stat(c, &path))
                    .map_err(|e| not_found_as(e, &format!("file not found: {path}")))?;
                Ok(entry_response(s.entry(info)?))
            })
            .await?
        }
        "ListDir" => {
            let req: ListDirRequest = connect::decode(body)?;
            let depth = req.depth.max(1);
            with_session(&state, &id, move |s| {
                let u = s.user(user.as_deref())?;
                let path = s.resolve(&req.path, &u)?;
                let info = s
                    .call(|c| client::stat(c, &path))
                    .map_err(|e| not_found_as(e, &format!("path not found: {path}")))?;
                let is_dir = info.kind == FileKind::Dir
                    || (info.kind == FileKind::Symlink
                        && s.entry(info)?.kind == FileType::Directory);
                if !is_dir {
                    return Err(EnvdError::rpc(
                        Code::InvalidArgument,
                        format!("path is not a directory: {path}"),
                    ));
                }
                let list = s
                    .call(|c| client::list_dir(c, &path, depth))
                    .map_err(|e| not_found_as(e, &format!("directory not found: {path}")))?;
                let mut entries = Vec::with_capacity(list.len());
                for info in list {
                    entries.push(s.entry(info)?);
                }
                Ok(serde_json::json!({ "entries": entries }))
            })
            .await?
        }
        "MakeDir" => {
            let req: PathRequest = connect::decode(body)?;
            with_session(&state, &id, move |s| {
                let u = s.user(user.as_deref())?;
                let path = s.resolve(&req.path, &u)?;
                match s.call(|c| client::stat(c, &path)) {
                    Ok(info) => {
                        let dir = info.kind == FileKind::Dir
                            || (info.kind == FileKind::Symlink
                                && s.entry(info)?.kind == FileType::Directory);
                        return Err(if dir {
                            EnvdError::rpc(
                                Code::AlreadyExists,
                                format!("directory already exists: {path}"),
                            )
                        } else {
                            EnvdError::rpc(
                                Code::InvalidArgument,
                                format!("path already exists but it is not a directory: {path}"),
                            )
                        });
                    }
                    Err(e) if e.code == Code::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                s.ensure_dirs(&path, &u)?;
                let info = s.call(|c| client::stat(c, &path))?;
                Ok(entry_response(s.entry(info)?))
            })
            .await?
        }
        "Move" => {
            let req: MoveRequest = connect::decode(body)?;
            with_session(&state, &id, move |s| {
                let u = s.user(user.as_deref())?;
                let from = s.resolve(&req.source, &u)?;
                let to = s.resolve(&req.destination, &u)?;
                if let Some((parent, _)) = to.rsplit_once('/') {
                    if !parent.is_empty() {
                        s.ensure_dirs(parent, &u)?;
                    }
                }
                let info = s
                    .call(|c| client::rename(c, &from, &to))
                    .map_err(|e| not_found_as(e, &format!("source file not found: {from}")))?;
                Ok(entry_response(s.entry(info)?))
            })
            .await?
        }
        "Remove" => {
            let req: PathRequest = connect::decode(body)?;
            with_session(&state, &id, move |s| {
                let u = s.user(user.as_deref())?;
                let path = s.resolve(&req.path, &u)?;
                // envd's RemoveAll: a missing path is not an error.
                match s.call(|c| client::remove(c, &path)) {
                    Ok(()) => Ok(serde_json::json!({})),
                    Err(e) if e.code == Code::NotFound => Ok(serde_json::json!({})),
                    Err(e) => Err(EnvdError::rpc(
                        Code::Internal,
                        format!("error removing file or directory: {}", e.message),
                    )),
                }
            })
            .await?
        }
        "CreateWatcher" => {
            let req: WatchRequest = connect::decode(body)?;
            create_watcher(&state, id, user, req).await?
        }
        "GetWatcherEvents" => {
            let req: WatcherRequest = connect::decode(body)?;
            let w = watcher(&state, &req.watcher_id)?;
            let w2 = w.clone();
            tokio::task::spawn_blocking(move || w2.sync())
                .await
                .map_err(|e| EnvdError::rpc(Code::Internal, format!("task failed: {e}")))?;
            let mut q = w.queue.lock().expect("watcher queue");
            if let Some(e) = q.error.take() {
                return Err(e.into());
            }
            let events: Vec<FilesystemEvent> = q.events.drain(..).collect();
            serde_json::json!({ "events": events })
        }
        "RemoveWatcher" => {
            let req: WatcherRequest = connect::decode(body)?;
            let w = state
                .envd
                .watchers
                .lock()
                .expect("watchers")
                .remove(&req.watcher_id)
                .ok_or_else(|| watcher_not_found(&req.watcher_id))?;
            w.stop();
            serde_json::json!({})
        }
        m => {
            return Err(EnvdError::rpc(
                Code::Unimplemented,
                format!("filesystem.Filesystem/{m} is not implemented"),
            ))
        }
    };
    Ok(connect::unary_ok(&v))
}

fn not_found_as(e: RpcError, msg: &str) -> EnvdError {
    if e.code == Code::NotFound {
        EnvdError::rpc(Code::NotFound, msg)
    } else {
        e.into()
    }
}

fn event_type(op: EventOp) -> EventType {
    match op {
        EventOp::Create => EventType::Create,
        EventOp::Write => EventType::Write,
        EventOp::Remove => EventType::Remove,
        EventOp::Rename => EventType::Rename,
        EventOp::Chmod => EventType::Chmod,
    }
}

/// A watch in place: its path (resolved), the agent connection carrying its events.
struct Watch {
    session: Session,
    path: String,
    conn: UnixStream,
    include_entry: bool,
    /// The agent answers `Sync` (and reads entries itself): protocol 3.
    sync: bool,
}

/// Checks the path and asks the agent to watch it; returns once the watch is in place.
fn begin_watch(mut s: Session, user: Option<&str>, req: &WatchRequest) -> Result<Watch, EnvdError> {
    let u = s.user(user)?;
    let path = s.resolve(&req.path, &u)?;
    let info = s
        .call(|c| client::stat(c, &path))
        .map_err(|e| not_found_as(e, &format!("path {path} not found")))?;
    let dir = info.kind == FileKind::Dir
        || (info.kind == FileKind::Symlink && s.entry(info)?.kind == FileType::Directory);
    if !dir {
        return Err(EnvdError::rpc(
            Code::InvalidArgument,
            format!("path {path} not a directory"),
        ));
    }
    let mut conn = s.conn()?;
    let req_a = proto::WatchRequest {
        path: path.clone(),
        recursive: req.recursive,
        include_entry: req.include_entry,
        allow_network_mounts: req.allow_network_mounts,
    };
    proto::write_json(&mut conn, Kind::WatchDir, &req_a).map_err(|e| from_client(e.into()))?;
    let started = match proto::read_frame(&mut conn).map_err(|e| from_client(e.into()))? {
        Some((Kind::Ok, d)) => proto::parse_json::<proto::WatchStarted>(Kind::Ok, &d)
            .map_err(|e| from_client(e.into()))?,
        Some((Kind::Error, d)) => {
            let e = proto::ErrorReply::parse(&d);
            return Err(from_client(client::ClientError::Agent {
                kind: e.kind,
                message: e.message,
            })
            .into());
        }
        _ => {
            return Err(EnvdError::rpc(
                Code::Unavailable,
                "the agent ended the watch before it started",
            ))
        }
    };
    Ok(Watch {
        session: s,
        path,
        conn,
        include_entry: req.include_entry,
        sync: started.sync,
    })
}

impl Watch {
    /// Reads events until the connection ends or `on_event` returns false; `on_synced` is
    /// called for each answer to a `Sync`.
    fn run(
        mut self,
        mut on_event: impl FnMut(FilesystemEvent) -> bool,
        mut on_synced: impl FnMut(),
    ) -> Result<(), RpcError> {
        loop {
            let frame = proto::read_frame(&mut self.conn).map_err(|e| from_client(e.into()))?;
            match frame {
                Some((Kind::Ok, _)) if self.sync => on_synced(),
                Some((Kind::Event, d)) => {
                    let ev: proto::Event =
                        proto::parse_json(Kind::Event, &d).map_err(|e| from_client(e.into()))?;
                    let kind = event_type(ev.op);
                    let entry = match ev.entry {
                        Some(info) => self.session.entry(info).ok(),
                        // An older agent sends no entries: read here (later than envd would).
                        None if !self.sync
                            && self.include_entry
                            && matches!(
                                ev.op,
                                EventOp::Create | EventOp::Write | EventOp::Chmod
                            ) =>
                        {
                            let full = format!("{}/{}", self.path.trim_end_matches('/'), ev.name);
                            self.session
                                .call(|c| client::stat(c, &full))
                                .ok()
                                .and_then(|i| self.session.entry(i).ok())
                        }
                        None => None,
                    };
                    if !on_event(FilesystemEvent {
                        name: ev.name,
                        kind,
                        entry,
                    }) {
                        return Ok(());
                    }
                }
                Some((Kind::Error, d)) => {
                    let e = proto::ErrorReply::parse(&d);
                    return Err(RpcError::new(Code::Internal, e.message));
                }
                Some((k, _)) => {
                    return Err(RpcError::new(
                        Code::Internal,
                        format!("unexpected {k:?} frame"),
                    ))
                }
                None => {
                    return Err(RpcError::new(
                        Code::Unavailable,
                        "the agent ended the watch",
                    ))
                }
            }
        }
    }
}

async fn watch_dir(
    state: Arc<AppState>,
    id: String,
    user: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, EnvdError> {
    let req: WatchRequest = connect::decode_stream_request(body)?;
    let deadline = stream::timeout(headers)?;
    let keepalive_every = stream::keepalive_interval(headers);
    let (sink, rx) = stream::channel();
    let sink2: Sink = sink.clone();
    let watch =
        with_owned_session(&state, &id, move |s| begin_watch(s, user.as_deref(), &req)).await?;
    let abort = watch.conn.try_clone().ok();
    std::thread::spawn(move || {
        let r = watch.run(
            |ev| sink2.send(Msg::Event(serde_json::json!({ "filesystem": ev }))),
            || {},
        );
        sink.send(Msg::End(r.err()));
    });
    let pump = Pump {
        keepalive: keepalive_every,
        keepalive_msg: serde_json::json!({"keepalive": {}}),
        deadline,
        on_deadline: None,
        abort,
    };
    Ok(pump.respond(vec![serde_json::json!({"start": {}})], rx))
}

#[derive(Default)]
struct Queue {
    events: VecDeque<FilesystemEvent>,
    error: Option<RpcError>,
    /// `Sync`s the agent answered.
    synced: u64,
    /// The watch ended (no more answers come).
    ended: bool,
}

/// The writing side of a watcher's agent connection: None once stopped.
struct Conn {
    stream: Option<UnixStream>,
    /// `Sync`s sent.
    syncs: u64,
}

pub(super) struct Watcher {
    /// The sandbox watched ([`super::EnvdState::sweep`] ends it with the sandbox).
    pub(super) sandbox: String,
    queue: Mutex<Queue>,
    /// Signalled when a `Sync` is answered or the watch ends.
    changed: Condvar,
    conn: Mutex<Conn>,
    sync: bool,
}

/// How long `GetWatcherEvents` waits for the agent to hand over what it has queued.
const SYNC_WAIT: Duration = Duration::from_secs(5);

impl Watcher {
    pub(super) fn stop(&self) {
        if let Some(c) = self.conn.lock().expect("watcher conn").stream.take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits until the agent sent every event of a change made before this call (the SDK
    /// asks right after a write); no wait with an agent that cannot say.
    fn sync(&self) {
        if !self.sync {
            return;
        }
        let ticket = {
            let mut c = self.conn.lock().expect("watcher conn");
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            if proto::write_frame(stream, Kind::Sync, b"").is_err() {
                return;
            }
            c.syncs += 1;
            c.syncs
        };
        let q = self.queue.lock().expect("watcher queue");
        let _ = self
            .changed
            .wait_timeout_while(q, SYNC_WAIT, |q| q.synced < ticket && !q.ended);
    }
}

fn watcher_not_found(id: &str) -> EnvdError {
    EnvdError::rpc(Code::NotFound, format!("watcher with id {id} not found"))
}

fn watcher(state: &AppState, id: &str) -> Result<Arc<Watcher>, EnvdError> {
    state
        .envd
        .watchers
        .lock()
        .expect("watchers")
        .get(id)
        .cloned()
        .ok_or_else(|| watcher_not_found(id))
}

async fn create_watcher(
    state: &Arc<AppState>,
    id: String,
    user: Option<String>,
    req: WatchRequest,
) -> Result<serde_json::Value, EnvdError> {
    if state.envd.watchers.lock().expect("watchers").len() >= MAX_WATCHERS {
        return Err(EnvdError::rpc(
            Code::ResourceExhausted,
            format!("too many watchers (at most {MAX_WATCHERS}); remove some first"),
        ));
    }
    let watch =
        with_owned_session(state, &id, move |s| begin_watch(s, user.as_deref(), &req)).await?;
    static N: AtomicU64 = AtomicU64::new(0);
    let wid = format!(
        "{id}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let w = Arc::new(Watcher {
        sandbox: id.clone(),
        queue: Mutex::default(),
        changed: Condvar::new(),
        conn: Mutex::new(Conn {
            stream: watch.conn.try_clone().ok(),
            syncs: 0,
        }),
        sync: watch.sync,
    });
    state
        .envd
        .watchers
        .lock()
        .expect("watchers")
        .insert(wid.clone(), w.clone());
    std::thread::spawn(move || {
        let r = watch.run(
            |ev| {
                let mut q = w.queue.lock().expect("watcher queue");
                if q.events.len() >= MAX_EVENTS {
                    q.events.pop_front();
                }
                q.events.push_back(ev);
                true
            },
            || {
                w.queue.lock().expect("watcher queue").synced += 1;
                w.changed.notify_all();
            },
        );
        // A removed watcher's end is not an error anyone reads.
        let live = w.conn.lock().expect("watcher conn").stream.is_some();
        let mut q = w.queue.lock().expect("watcher queue");
        if let (Err(e), true) = (r, live) {
            q.error = Some(e);
        }
        q.ended = true;
        w.changed.notify_all();
    });
    Ok(serde_json::json!({ "watcherId": wid }))
}
