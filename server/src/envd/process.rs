//! `process.Process` over the agent's process table. Every process is started `background`
//! in the agent: as in envd, a process outlives the stream that started it (the SDK's
//! `disconnect`), and `Connect` replays its buffered output. A call's `Connect-Timeout-Ms`
//! bounds a started process as envd's request context does: it is killed at the deadline.

use super::agent::{from_client, with_session, EnvdError, Session};
use super::connect::{self, Code, RpcError};
use super::stream::{self, Msg, Pump, Sink};
use super::types::*;
use crate::AppState;
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine;
use kiln_agent::client;
use kiln_agent::protocol::{ErrorKind, ExitStatus, Kind, ProcessRef, TtySize};
use std::sync::Arc;

/// What envd reports about a process it started, kept per daemon (bounded).
#[derive(Clone)]
pub(super) struct Meta {
    config: ProcessConfig,
    tty: bool,
}

const META_MAX: usize = 4096;
/// The shell E2B's SDK asks for, and the one every image has.
const BASH: &str = "/bin/bash";
const SH: &str = "/bin/sh";

impl super::EnvdState {
    fn remember(&self, id: &str, pid: u32, meta: Meta) {
        let mut m = self.metas.lock().expect("process metadata");
        if m.len() >= META_MAX {
            // Forget another sandbox's entries first, then anything.
            let other: Vec<_> = m
                .keys()
                .filter(|k| k.0 != id)
                .take(META_MAX / 4)
                .cloned()
                .collect();
            for k in other {
                m.remove(&k);
            }
            if m.len() >= META_MAX {
                m.clear();
            }
        }
        m.insert((id.to_string(), pid), meta);
    }

    fn recall(&self, id: &str, pid: u32) -> Option<Meta> {
        self.metas
            .lock()
            .expect("process metadata")
            .get(&(id.to_string(), pid))
            .cloned()
    }
}

/// The user a request names: `Authorization: Basic base64(user:)`.
pub fn basic_user(h: &HeaderMap) -> Result<Option<String>, RpcError> {
    let Some(v) = h.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || RpcError::new(Code::Unauthenticated, "invalid Authorization header");
    let v = v.to_str().map_err(|_| bad())?;
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    let user = s.split_once(':').map(|(u, _)| u).unwrap_or(&s);
    Ok((!user.is_empty()).then(|| user.to_string()))
}

fn selector(p: Option<ProcessSelector>) -> Result<ProcessRef, RpcError> {
    match p {
        Some(ProcessSelector { pid: Some(pid), .. }) => Ok(ProcessRef::pid(pid as i32)),
        Some(ProcessSelector { tag: Some(t), .. }) => Ok(ProcessRef::tag(&t)),
        _ => Err(RpcError::new(
            Code::Unimplemented,
            "invalid input type: no process selector",
        )),
    }
}

fn not_found(r: &ProcessRef) -> RpcError {
    match (&r.pid, &r.tag) {
        (Some(pid), _) => {
            RpcError::new(Code::NotFound, format!("process with pid {pid} not found"))
        }
        (_, Some(t)) => RpcError::new(Code::NotFound, format!("process with tag {t} not found")),
        _ => RpcError::new(Code::NotFound, "process not found"),
    }
}

/// Agent errors about a process, with envd's not-found message.
fn process_error(r: &ProcessRef, e: RpcError) -> RpcError {
    if e.code == Code::NotFound {
        not_found(r)
    } else {
        e
    }
}

/// Go's `ProcessState.String()` signal names.
const SIGNAL_NAMES: [(i32, &str); 15] = [
    (1, "hangup"),
    (2, "interrupt"),
    (3, "quit"),
    (4, "illegal instruction"),
    (5, "trace/breakpoint trap"),
    (6, "aborted"),
    (7, "bus error"),
    (8, "floating point exception"),
    (9, "killed"),
    (10, "user defined signal 1"),
    (11, "segmentation fault"),
    (12, "user defined signal 2"),
    (13, "broken pipe"),
    (14, "alarm clock"),
    (15, "terminated"),
];

fn signal_name(sig: i32) -> String {
    match SIGNAL_NAMES.iter().find(|(n, _)| *n == sig) {
        Some((_, name)) => name.to_string(),
        None => format!("signal {sig}"),
    }
}

/// The signal that ended a process, from its end event's status (`signal: killed`, as
/// [`end_event`] writes it): the number back.
pub fn signal_of(status: &str) -> Option<i32> {
    let name = status.strip_prefix("signal: ")?;
    SIGNAL_NAMES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(sig, _)| *sig)
        .or_else(|| name.strip_prefix("signal ")?.parse().ok())
}

/// A process request must fit in one agent frame (create bounds the sandbox's own
/// environment so that ordinary commands always do): refused as an invalid argument that
/// says why, not as a broken connection.
fn check_frame(er: &kiln_agent::protocol::ExecRequest) -> Result<(), EnvdError> {
    use kiln_agent::protocol::MAX_FRAME;
    let size = serde_json::to_vec(er)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size > MAX_FRAME {
        return Err(EnvdError::rpc(
            Code::InvalidArgument,
            format!(
                "the command with its arguments and environment (the image's, the sandbox's \
                 and its own) takes {size} bytes as a request to the sandbox; at most \
                 {MAX_FRAME} are accepted"
            ),
        ));
    }
    Ok(())
}

/// envd's end event for an exit status.
pub fn end_event(s: ExitStatus) -> EndEvent {
    match (s.code, s.signal) {
        (Some(code), _) => {
            let status = format!("exit status {code}");
            EndEvent {
                exit_code: code,
                exited: true,
                error: (code != 0).then(|| status.clone()),
                status,
            }
        }
        (None, Some(sig)) => {
            let status = format!("signal: {}", signal_name(sig));
            EndEvent {
                exit_code: -1,
                exited: false,
                error: Some(status.clone()),
                status,
            }
        }
        (None, None) => EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some("unknown exit status".into()),
        },
    }
}

fn output_event(kind: Kind, data: &[u8], tty: bool) -> serde_json::Value {
    let ev = match (kind, tty) {
        (_, true) => ProcessEvent::Pty(data.to_vec()),
        (Kind::Stderr, false) => ProcessEvent::Stderr(data.to_vec()),
        _ => ProcessEvent::Stdout(data.to_vec()),
    };
    ev.response()
}

fn keepalive() -> serde_json::Value {
    ProcessEvent::Keepalive.response()
}

pub async fn rpc(
    state: Arc<AppState>,
    id: String,
    method: &str,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Response {
    match method {
        "Start" | "Connect" => {
            let bytes = match axum::body::to_bytes(body, connect::MAX_MESSAGE).await {
                Ok(b) => b,
                Err(e) => {
                    return connect::stream_error(&RpcError::new(
                        Code::InvalidArgument,
                        format!("reading the request: {e}"),
                    ))
                }
            };
            let r = if method == "Start" {
                start(state, id, headers, &bytes).await
            } else {
                connect_to(state, id, headers, &bytes).await
            };
            r.unwrap_or_else(|e| e.stream())
        }
        "StreamInput" => stream_input(state, id, body).await,
        _ => {
            let bytes = match axum::body::to_bytes(body, connect::MAX_MESSAGE).await {
                Ok(b) => b,
                Err(e) => {
                    return connect::unary_error(&RpcError::new(
                        Code::InvalidArgument,
                        format!("reading the request: {e}"),
                    ))
                }
            };
            unary(state, id, method, &bytes)
                .await
                .unwrap_or_else(|e| e.unary())
        }
    }
}

async fn unary(
    state: Arc<AppState>,
    id: String,
    method: &str,
    body: &[u8],
) -> Result<Response, EnvdError> {
    let empty = serde_json::json!({});
    match method {
        "List" => {
            let _: serde_json::Value = connect::decode(body)?;
            let sid = id.clone();
            let list = with_session(&state, &id, move |s| {
                s.call(client::list_processes).map_err(EnvdError::from)
            })
            .await?;
            let processes = list
                .into_iter()
                .filter(|p| p.running)
                .map(|p| {
                    let pid = p.pid as u32;
                    let config = state
                        .envd
                        .recall(&sid, pid)
                        .map(|m| m.config)
                        .unwrap_or_else(|| ProcessConfig {
                            cmd: p.argv.first().cloned().unwrap_or_default(),
                            args: p.argv.iter().skip(1).cloned().collect(),
                            envs: Default::default(),
                            cwd: p.cwd.clone(),
                        });
                    ProcessInfo {
                        config,
                        pid,
                        tag: p.tag,
                    }
                })
                .collect();
            Ok(connect::unary_ok(&ListResponse { processes }))
        }
        "SendSignal" => {
            let req: SendSignalRequest = connect::decode(body)?;
            let target = selector(req.process)?;
            let sig = match req.signal {
                Signal::Sigkill => libc::SIGKILL,
                Signal::Sigterm => libc::SIGTERM,
                other => {
                    return Err(EnvdError::rpc(
                        Code::Unimplemented,
                        format!("invalid signal: {other:?}"),
                    ))
                }
            };
            with_session(&state, &id, move |s| {
                running(s, &target)?;
                s.call(|c| client::signal(c, &target, sig))
                    .map_err(|e| process_error(&target, e).into())
            })
            .await?;
            Ok(connect::unary_ok(&empty))
        }
        "SendInput" => {
            let req: SendInputRequest = connect::decode(body)?;
            let target = selector(req.process)?;
            let data = req
                .input
                .as_ref()
                .and_then(|i| i.bytes())
                .ok_or_else(|| RpcError::new(Code::Unimplemented, "invalid input type"))?
                .to_vec();
            with_session(&state, &id, move |s| {
                s.call(|c| client::send_stdin(c, &target, &data))
                    .map_err(|e| process_error(&target, e).into())
            })
            .await?;
            Ok(connect::unary_ok(&empty))
        }
        "CloseStdin" => {
            let req: SelectorRequest = connect::decode(body)?;
            let target = selector(req.process)?;
            with_session(&state, &id, move |s| {
                s.call(|c| client::close_stdin(c, &target))
                    .map_err(|e| process_error(&target, e).into())
            })
            .await?;
            Ok(connect::unary_ok(&empty))
        }
        "Update" => {
            let req: UpdateRequest = connect::decode(body)?;
            let target = selector(req.process)?;
            if let Some(size) = req.pty.and_then(|p| p.size) {
                with_session(&state, &id, move |s| {
                    s.call(|c| client::resize(c, &target, size.cols as u16, size.rows as u16))
                        .map_err(|e| process_error(&target, e).into())
                })
                .await?;
            }
            Ok(connect::unary_ok(&empty))
        }
        m => Err(EnvdError::rpc(
            Code::Unimplemented,
            format!("process.Process/{m} is not implemented"),
        )),
    }
}

/// envd only knows live processes: an exited one in the agent's table is not found.
fn running(s: &mut Session, target: &ProcessRef) -> Result<(), EnvdError> {
    let list = s.call(client::list_processes)?;
    let live = list.iter().any(|p| {
        p.running
            && match (&target.pid, &target.tag) {
                (Some(pid), _) => p.pid == *pid,
                (_, Some(t)) => p.tag.as_deref() == Some(t),
                _ => false,
            }
    });
    if live {
        Ok(())
    } else {
        Err(not_found(target).into())
    }
}

async fn start(
    state: Arc<AppState>,
    id: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, EnvdError> {
    let req: StartRequest = connect::decode_stream_request(body)?;
    let user = basic_user(headers)?;
    let deadline = stream::timeout(headers)?;
    let keepalive_every = stream::keepalive_interval(headers);
    let config = req.process.clone().unwrap_or_default();
    if config.cmd.is_empty() {
        return Err(EnvdError::rpc(
            Code::InvalidArgument,
            "process.cmd is empty",
        ));
    }
    let tty = req.pty.map(|p| {
        let s = p.size.unwrap_or(PtySize { cols: 80, rows: 24 });
        TtySize {
            cols: s.cols as u16,
            rows: s.rows as u16,
        }
    });
    // envd's stdin defaults to an open pipe (fed by SendInput); `false` is /dev/null.
    let stdin_open = req.stdin.unwrap_or(true);
    let (sink, mut rx) = stream::channel();
    let (abort_tx, abort_rx) = std::sync::mpsc::channel();
    let run_state = state.clone();
    let sid = id.clone();
    let tag = req.tag.clone();
    let cfg = config.clone();
    std::thread::spawn(move || {
        let run = || -> Result<ExitStatus, EnvdError> {
            let mut s = Session::open(&run_state, &sid)?;
            let u = s.user(user.as_deref())?;
            let cwd = s.resolve(cfg.cwd.as_deref().unwrap_or(""), &u)?;
            let mut argv = vec![cfg.cmd.clone()];
            argv.extend(cfg.args.iter().cloned());
            let is_tty = tty.is_some();
            let mut started = false;
            let r = loop {
                let mut er = s.sandboxes.exec_request(
                    &s.rec,
                    kiln_runtime::ExecOptions {
                        argv: argv.clone(),
                        env: cfg.envs.clone(),
                        cwd: Some(cwd.clone()),
                        user: Some(u.name.clone()),
                    },
                );
                er.background = true;
                er.tag = tag.clone();
                er.tty = tty;
                // Resolved once, here: the agent runs it as is.
                er.identity = Some(u.clone());
                // Agent `stdin: true` with no input closes it at once (envd's /dev/null).
                er.stdin = tty.is_none() && !stdin_open;
                check_frame(&er)?;
                let mut conn = s.conn()?;
                // Handed over with the start event: only a started process can be aborted.
                let mut abort = conn.try_clone().ok();
                let r = client::exec_stream(
                    &mut conn,
                    &er,
                    None,
                    |pid| {
                        started = true;
                        if let Some(c) = abort.take() {
                            let _ = abort_tx.send(c);
                        }
                        sink.send(Msg::Event(
                            ProcessEvent::Start { pid: pid as u32 }.response(),
                        ));
                    },
                    |kind, data| {
                        sink.send(Msg::Event(output_event(kind, data, is_tty)));
                    },
                );
                let not_found = matches!(
                    r,
                    Err(client::ClientError::Agent {
                        kind: ErrorKind::NotFound,
                        ..
                    })
                );
                // The agent's failed exec does not say whether the program or the working
                // directory was missing: envd checks the directory first, so ask (only on
                // this failure, so a command costs no extra round trip).
                if not_found && !started {
                    if let Err(e) = s.call(|c| client::stat(c, &cwd)) {
                        if e.code == Code::NotFound {
                            return Err(EnvdError::rpc(
                                Code::InvalidArgument,
                                format!("cwd '{cwd}' does not exist"),
                            ));
                        }
                    }
                }
                match r {
                    // E2B's SDK runs every command as `/bin/bash -l -c`; images without bash
                    // (busybox, alpine, `FROM scratch`) get their POSIX shell instead.
                    Err(_) if not_found && !started && argv[0] == BASH => {
                        tracing::debug!(sandbox = %sid, "no {BASH} in the sandbox: {SH} instead");
                        argv[0] = SH.into();
                    }
                    r => break r,
                }
            };
            r.map_err(|e| {
                let mut e = from_client(e);
                if !started && e.code != Code::Unavailable {
                    // envd: a process that cannot start is an invalid argument.
                    e.code = Code::InvalidArgument;
                }
                e.into()
            })
        };
        match run() {
            Ok(status) => {
                sink.send(Msg::Event(ProcessEvent::End(end_event(status)).response()));
                sink.send(Msg::End(None))
            }
            Err(e) => sink.send(Msg::End(Some(e.into_rpc()))),
        };
    });
    // The first message is the start event, or the failure to start.
    let pid = match rx.recv().await {
        Some(Msg::Event(v)) => v["event"]["start"]["pid"].as_u64().unwrap_or(0) as u32,
        Some(Msg::End(Some(e))) => return Err(e.into()),
        _ => {
            return Err(EnvdError::rpc(
                Code::Unknown,
                "the process ended before it started",
            ))
        }
    };
    state.envd.remember(
        &id,
        pid,
        Meta {
            config,
            tty: tty.is_some(),
        },
    );
    let kill_state = state.clone();
    let kill_id = id.clone();
    let pump = Pump {
        keepalive: keepalive_every,
        keepalive_msg: keepalive(),
        deadline,
        on_deadline: Some(Box::new(move || {
            if let Ok(mut s) = Session::open(&kill_state, &kill_id) {
                let _ = s.call(|c| client::signal(c, &ProcessRef::pid(pid as i32), libc::SIGKILL));
            }
        })),
        abort: abort_rx.try_recv().ok(),
    };
    Ok(pump.respond(vec![ProcessEvent::Start { pid }.response()], rx))
}

async fn connect_to(
    state: Arc<AppState>,
    id: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, EnvdError> {
    let req: SelectorRequest = connect::decode_stream_request(body)?;
    let target = selector(req.process)?;
    let deadline = stream::timeout(headers)?;
    let keepalive_every = stream::keepalive_interval(headers);
    let (sink, mut rx) = stream::channel();
    let (abort_tx, abort_rx) = std::sync::mpsc::channel();
    let sid = id.clone();
    std::thread::spawn(move || {
        let run = |sink: &Sink| -> Result<ExitStatus, EnvdError> {
            let mut s = Session::open(&state, &sid)?;
            // Is it a tty? Known if this daemon started it, else from the agent's table.
            let list = s.call(client::list_processes)?;
            let info = list
                .iter()
                .rev()
                .find(|p| match (&target.pid, &target.tag) {
                    (Some(pid), _) => p.pid == *pid,
                    (_, Some(t)) => p.tag.as_deref() == Some(t),
                    _ => false,
                });
            let Some(info) = info else {
                return Err(not_found(&target).into());
            };
            let tty = s
                .envd
                .recall(&sid, info.pid as u32)
                .map(|m| m.tty)
                .unwrap_or(info.tty);
            let mut conn = s.conn()?;
            if let Ok(c) = conn.try_clone() {
                let _ = abort_tx.send(c);
            }
            client::connect_process(
                &mut conn,
                &target,
                |st| {
                    sink.send(Msg::Event(
                        ProcessEvent::Start { pid: st.pid as u32 }.response(),
                    ));
                },
                |kind, data| {
                    sink.send(Msg::Event(output_event(kind, data, tty)));
                },
            )
            .map_err(|e| process_error(&target, from_client(e)).into())
        };
        match run(&sink) {
            Ok(status) => {
                sink.send(Msg::Event(ProcessEvent::End(end_event(status)).response()));
                sink.send(Msg::End(None))
            }
            Err(e) => sink.send(Msg::End(Some(e.into_rpc()))),
        };
    });
    let first = match rx.recv().await {
        Some(Msg::Event(v)) => v,
        Some(Msg::End(Some(e))) => return Err(e.into()),
        _ => {
            return Err(EnvdError::rpc(
                Code::Unknown,
                "the process stream ended before it started",
            ))
        }
    };
    let pump = Pump {
        keepalive: keepalive_every,
        keepalive_msg: keepalive(),
        deadline,
        on_deadline: None,
        abort: abort_rx.try_recv().ok(),
    };
    Ok(pump.respond(vec![first], rx))
}

/// `StreamInput`: a client stream of `start` (the process), then `data` chunks.
async fn stream_input(state: Arc<AppState>, id: String, body: axum::body::Body) -> Response {
    use futures_util::StreamExt;
    let mut data = body.into_data_stream();
    let mut reader = connect::EnvelopeReader::default();
    let mut target: Option<ProcessRef> = None;
    let result: Result<(), EnvdError> = async {
        loop {
            while let Some((flags, payload)) = reader.next_envelope()? {
                if flags & connect::END_STREAM != 0 {
                    return Ok(());
                }
                let m: StreamInputRequest = connect::decode(&payload)?;
                if let Some(st) = m.start {
                    target = Some(selector(st.process)?);
                } else if let Some(d) = m.data {
                    let Some(t) = target.clone() else {
                        return Err(EnvdError::rpc(
                            Code::FailedPrecondition,
                            "input before the start event",
                        ));
                    };
                    let bytes = d
                        .input
                        .as_ref()
                        .and_then(|i| i.bytes())
                        .unwrap_or_default()
                        .to_vec();
                    if bytes.is_empty() {
                        continue;
                    }
                    with_session(&state, &id, move |s| {
                        s.call(|c| client::send_stdin(c, &t, &bytes))
                            .map_err(|e| process_error(&t, e).into())
                    })
                    .await?;
                }
            }
            match data.next().await {
                Some(Ok(chunk)) => reader.push(&chunk),
                Some(Err(e)) => {
                    return Err(EnvdError::rpc(
                        Code::Unknown,
                        format!("error streaming input: {e}"),
                    ))
                }
                None => return Ok(()),
            }
        }
    }
    .await;
    match result {
        Ok(()) => {
            let mut body = connect::message(&serde_json::json!({})).to_vec();
            body.extend_from_slice(&connect::end_stream(None));
            connect::stream_response(axum::body::Body::from(body))
        }
        Err(e) => e.stream(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_exits_and_selectors_map_as_envd_does() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_user(&h).unwrap(), None);
        // base64("app:")
        h.insert("authorization", "Basic YXBwOg==".parse().unwrap());
        assert_eq!(basic_user(&h).unwrap().as_deref(), Some("app"));
        h.insert("authorization", "Basic !!".parse().unwrap());
        assert_eq!(basic_user(&h).unwrap_err().code, Code::Unauthenticated);

        let e = end_event(ExitStatus {
            code: Some(0),
            signal: None,
        });
        assert_eq!(
            (e.exit_code, e.exited, e.status.as_str()),
            (0, true, "exit status 0")
        );
        assert!(e.error.is_none());
        let e = end_event(ExitStatus {
            code: Some(3),
            signal: None,
        });
        assert_eq!(e.error.as_deref(), Some("exit status 3"));
        let e = end_event(ExitStatus {
            code: None,
            signal: Some(9),
        });
        assert_eq!(
            (e.exit_code, e.exited, e.status.as_str()),
            (-1, false, "signal: killed")
        );
        assert_eq!(signal_of(&e.status), Some(9));
        for sig in [1, 15, 31] {
            let e = end_event(ExitStatus {
                code: None,
                signal: Some(sig),
            });
            assert_eq!(signal_of(&e.status), Some(sig), "{}", e.status);
        }
        assert_eq!(signal_of("exit status 1"), None);

        assert_eq!(
            selector(Some(ProcessSelector {
                pid: Some(5),
                tag: None
            }))
            .unwrap(),
            ProcessRef::pid(5)
        );
        assert_eq!(selector(None).unwrap_err().code, Code::Unimplemented);
        assert_eq!(
            not_found(&ProcessRef::tag("t")).message,
            "process with tag t not found"
        );
    }
}
