//! A client of E2B's API as `kiln serve` answers it (one server, or any node of a cluster,
//! which lists the whole cluster and forwards to a sandbox's node): the control plane's
//! sandbox routes, and envd's process service and `/files` on the data plane. It is what
//! `kiln sandbox --server URL` runs on.
//!
//! Blocking calls over a small tokio runtime of its own, plain HTTP/1.1 with hyper (one
//! connection per call). `kiln serve` has no TLS, and neither has this client: an https://
//! URL is refused as such. The data plane is addressed as E2B's SDKs do with
//! `E2B_SANDBOX_URL`: the server's own URL with `E2b-Sandbox-Id` and `E2b-Sandbox-Port`
//! headers, the sandbox's envd access token in `X-Access-Token` (read from its detail).
//!
//! The bodies are the server's own types ([`crate::control::types`], [`crate::envd::types`]);
//! every failure is a [`ClientError`], an answer of the server's with its status and message.

use crate::control::types::{
    ConnectRequest, ForkRequest, ListedSandbox, NewSandbox, PauseRequest, Sandbox, SandboxDetail,
    SandboxForkResult, SandboxState, SnapshotInfo, SnapshotRequest, TimeoutRequest,
};
use crate::envd::connect::{self, EnvelopeReader, END_STREAM};
use crate::envd::types::{
    EndEvent, ProcessConfig, ProcessEvent, ProcessInput, ProcessSelector, Pty, PtySize,
    SelectorRequest, SendInputRequest, SendSignalRequest, Signal, StartRequest,
};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a control-plane call may take, answer included (a create may pull a template
/// onto a node first; a pause writes the sandbox's memory).
const CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// How often a process stream carries a keepalive when quiet (envd's
/// `Keepalive-Ping-Interval`), and how long a stream may stay silent before it is given up.
const KEEPALIVE_SECS: u64 = 15;
const STREAM_IDLE: Duration = Duration::from_secs(4 * KEEPALIVE_SECS);
/// The most of an error answer's body that is read.
const MAX_ERROR_BODY: usize = 64 << 10;
/// The longest control-plane answer read (a list of 100 sandboxes is tens of KiB): a broken
/// or hostile server cannot make the CLI hold more.
const MAX_ANSWER_BODY: usize = 16 << 20;
/// The most sandboxes a list reads, page after page.
const MAX_LISTED: usize = 1_000_000;
/// Pieces of a file read for an upload.
const UPLOAD_CHUNK: usize = 256 << 10;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {0:?}: expected http://HOST[:PORT] (e.g. http://10.0.0.5:3000)")]
    BadUrl(String),
    #[error(
        "{0}: https is not supported (kiln serve and this client speak plain HTTP); use \
         http:// to a kiln serve on a trusted network, or a local tunnel to it"
    )]
    Https(String),
    #[error("no API key: pass --api-key or set E2B_API_KEY (the server's KILN_API_KEY, or its KILN_HOME/serve/api-key)")]
    NoKey,
    #[error("the API key holds characters an HTTP header cannot carry")]
    BadKey,
    #[error("cannot reach {server}: {err}")]
    Connect { server: String, err: std::io::Error },
    #[error("{server} did not answer within {secs} s")]
    Timeout { server: String, secs: u64 },
    #[error("{server}: {err}")]
    Http { server: String, err: hyper::Error },
    #[error("{server} refused the API key: {message} (401)")]
    WrongKey { server: String, message: String },
    /// An error answer: E2B's `{code, message}` (envd's for the data plane).
    #[error("{message} ({status})")]
    Api { status: u16, message: String },
    /// A process stream that ended with an error (connect's end-of-stream error).
    #[error("sandbox {id}: {code}: {message}")]
    Rpc {
        id: String,
        code: String,
        message: String,
    },
    #[error("sandbox {0} is paused: resume it first")]
    Paused(String),
    /// This process got signal `signal` during an exec with [`Exec::end_on_signal`]: the
    /// command was killed.
    #[error("interrupted by signal {signal}: the command was killed")]
    Interrupted { signal: i32 },
    #[error("unexpected answer from {server}: {why}")]
    Protocol { server: String, why: String },
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
}

pub type Result<T> = std::result::Result<T, ClientError>;

type Body = BoxBody<Bytes, std::io::Error>;

/// A command to run in a sandbox (envd's `StartRequest`, with the client's stdin).
#[derive(Default)]
pub struct Exec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Fed to the process until it ends (None: the process's stdin is closed, /dev/null).
    pub stdin: Option<Box<dyn Read + Send>>,
    /// Run on a terminal of this size (output arrives as [`Output::Stdout`]).
    pub tty: Option<PtySize>,
    /// SIGINT, SIGTERM or SIGHUP to this process kills the command (envd's `SendSignal`,
    /// SIGKILL) and ends the call with [`ClientError::Interrupted`], as a command run on the
    /// home dies with its caller; without it the command outlives the call (envd keeps a
    /// process whose stream went away).
    pub end_on_signal: bool,
}

/// A piece of a process's output.
pub enum Output<'a> {
    Stdout(&'a [u8]),
    Stderr(&'a [u8]),
}

/// A server's (or a cluster node's) E2B API.
pub struct Client {
    /// `host:port`.
    authority: String,
    /// `http://host:port`, for messages.
    url: String,
    /// `X-API-Key`, marked sensitive (left out of hyper's debug output).
    api_key: HeaderValue,
    rt: tokio::runtime::Runtime,
}

/// `http://HOST[:PORT][/]` (or `HOST:PORT`): the `host:port` to connect to (port 80 when
/// none is given). A path, user info or query is refused: E2B's API is at the root.
pub fn parse_server_url(url: &str) -> Result<String> {
    let u = url.trim();
    let bad = || ClientError::BadUrl(u.to_string());
    let lower = u.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(ClientError::Https(u.to_string()));
    }
    let rest = match lower.starts_with("http://") {
        true => &u["http://".len()..],
        false if u.contains("://") => return Err(bad()),
        false => u,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(bad());
    }
    let (host, port) = match rest.rsplit_once(':') {
        // Not the inside of an IPv6 literal ("[::1]").
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    if host.is_empty() || host.starts_with('[') != host.ends_with(']') {
        return Err(bad());
    }
    match port {
        None => Ok(format!("{host}:80")),
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => Ok(rest.to_string()),
            _ => Err(bad()),
        },
    }
}

impl Client {
    /// A client of the server at `url` (see [`parse_server_url`]) with API key `api_key`.
    pub fn new(url: &str, api_key: Option<String>) -> Result<Client> {
        let authority = parse_server_url(url)?;
        let api_key = api_key
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .ok_or(ClientError::NoKey)?;
        let mut api_key = HeaderValue::from_str(&api_key).map_err(|_| ClientError::BadKey)?;
        api_key.set_sensitive(true);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| ClientError::Io {
                what: "starting the client's runtime".into(),
                err,
            })?;
        Ok(Client {
            url: format!("http://{authority}"),
            authority,
            api_key,
            rt,
        })
    }

    /// `http://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }

    // ---- control plane ----

    /// `POST /v2/sandboxes`.
    pub fn create(&self, req: &NewSandbox) -> Result<Sandbox> {
        self.control(Method::POST, "/v2/sandboxes", Some(req))
    }

    /// `GET /v2/sandboxes`, every page: the whole cluster's sandboxes through any node.
    pub fn list(&self) -> Result<Vec<ListedSandbox>> {
        self.rt.block_on(async {
            let mut all = Vec::new();
            let mut next: Option<String> = None;
            loop {
                let mut path = "/v2/sandboxes?limit=100".to_string();
                if let Some(t) = &next {
                    path.push_str("&nextToken=");
                    path.push_str(&query_value(t));
                }
                let req = self.control_request(Method::GET, &path, None::<&()>)?;
                let (_, headers, body) = self.call(req).await?;
                let page: Vec<ListedSandbox> = self.decode(&body)?;
                let empty = page.is_empty();
                all.extend(page);
                let token = headers
                    .get("x-next-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .filter(|t| !t.is_empty());
                if token.is_none() {
                    return Ok(all);
                }
                // A server that pages forever (an empty page, the same token again, more pages
                // than any cluster holds) is refused rather than followed.
                if empty || token == next || all.len() > MAX_LISTED {
                    return Err(self.protocol("the sandbox list's pages do not end"));
                }
                next = token;
            }
        })
    }

    /// `GET /sandboxes/{id}`.
    pub fn get(&self, id: &str) -> Result<SandboxDetail> {
        self.control(Method::GET, &sandbox_path(id, ""), None::<&()>)
    }

    /// `DELETE /sandboxes/{id}`.
    pub fn kill(&self, id: &str) -> Result<()> {
        self.control_empty(Method::DELETE, &sandbox_path(id, ""), None::<&()>)
    }

    /// `POST /sandboxes/{id}/timeout`: the sandbox ends (or pauses) `secs` from now.
    pub fn set_timeout(&self, id: &str, secs: u64) -> Result<()> {
        let req = TimeoutRequest {
            timeout: Some(secs.into()),
        };
        self.control_empty(Method::POST, &sandbox_path(id, "/timeout"), Some(&req))
    }

    /// `POST /sandboxes/{id}/pause`; `memory: false` keeps only its files.
    pub fn pause(&self, id: &str, memory: bool) -> Result<()> {
        let req = PauseRequest {
            memory: Some(memory),
            require_healthy_guest: None,
        };
        self.control_empty(Method::POST, &sandbox_path(id, "/pause"), Some(&req))
    }

    /// `POST /v2/sandboxes/{id}/connect`: resumes a paused sandbox (`memory: false`: boots it
    /// afresh on its files) and sets its timeout to `timeout_secs` from now when given (none:
    /// its own timeout again). The sandbox, and whether it was paused and has been resumed
    /// (201) rather than found running (200).
    pub fn connect(
        &self,
        id: &str,
        timeout_secs: Option<u64>,
        memory: bool,
    ) -> Result<(Sandbox, bool)> {
        let req = ConnectRequest {
            timeout: timeout_secs.map(Into::into),
            memory: Some(memory),
        };
        let path = format!("/v2{}", sandbox_path(id, "/connect"));
        let req = self.control_request(Method::POST, &path, Some(&req))?;
        self.rt.block_on(async {
            let (status, _, body) = self.call(req).await?;
            Ok((self.decode(&body)?, status == StatusCode::CREATED))
        })
    }

    /// `POST /sandboxes/{id}/fork`: `count` sandboxes continuing from this one's present.
    pub fn fork(
        &self,
        id: &str,
        count: usize,
        timeout_secs: Option<u64>,
    ) -> Result<Vec<SandboxForkResult>> {
        let req = ForkRequest {
            timeout: timeout_secs.map(Into::into),
            count: Some(count),
        };
        self.control(Method::POST, &sandbox_path(id, "/fork"), Some(&req))
    }

    /// `POST /sandboxes/{id}/snapshots`: a named snapshot of a running sandbox.
    pub fn snapshot(&self, id: &str, name: &str) -> Result<SnapshotInfo> {
        let req = SnapshotRequest {
            name: Some(name.to_string()),
            memory: None,
        };
        self.control(Method::POST, &sandbox_path(id, "/snapshots"), Some(&req))
    }

    /// `GET /snapshots`.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.control(Method::GET, "/snapshots", None::<&()>)
    }

    // ---- data plane ----

    /// Runs `e` in sandbox `id` through envd's `process.Process/Start`, handing its output to
    /// `out` as it comes; its end event once it has ended.
    pub fn exec(&self, id: &str, e: Exec, mut out: impl FnMut(Output)) -> Result<EndEvent> {
        let token = self.access_token(id)?;
        let (cmd, args) = match e.argv.split_first() {
            Some((c, a)) => (c.clone(), a.to_vec()),
            None => {
                return Err(ClientError::Rpc {
                    id: id.into(),
                    code: "invalid_argument".into(),
                    message: "no command given".into(),
                })
            }
        };
        let start = StartRequest {
            process: Some(ProcessConfig {
                cmd,
                args,
                envs: e.env,
                cwd: e.cwd,
            }),
            pty: e.tty.map(|size| Pty { size: Some(size) }),
            tag: None,
            stdin: Some(e.stdin.is_some()),
        };
        let body = serde_json::to_vec(&start).expect("a start request serializes");
        let mut req = envd_request(
            &self.authority,
            id,
            token.as_deref(),
            e.user.as_deref(),
            "/process.Process/Start",
            full(connect::envelope(0, &body)),
        )?;
        let h = req.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(connect::STREAM_JSON));
        h.insert("connect-protocol-version", HeaderValue::from_static("1"));
        h.insert("keepalive-ping-interval", HeaderValue::from(KEEPALIVE_SECS));
        let tty = e.tty.is_some();
        let mut stdin = e.stdin;
        let end_on_signal = e.end_on_signal;
        self.rt.block_on(async {
            let mut signals = match end_on_signal {
                true => caught_signals().map_err(|err| ClientError::Io {
                    what: "catching signals".into(),
                    err,
                })?,
                false => Vec::new(),
            };
            let mut pid: Option<u32> = None;
            let resp = self.send(req, CALL_TIMEOUT).await?;
            let status = resp.status();
            if status != StatusCode::OK {
                let body = error_body(resp).await;
                return Err(self.error(status, &body));
            }
            let mut body = resp.into_body();
            let mut reader = EnvelopeReader::default();
            let mut end: Option<EndEvent> = None;
            loop {
                let next = tokio::select! {
                    f = tokio::time::timeout(STREAM_IDLE, body.frame()) => f,
                    signal = next_signal(&mut signals) => {
                        if let Some(pid) = pid {
                            let kill = SendSignalRequest {
                                process: Some(ProcessSelector { pid: Some(pid), tag: None }),
                                signal: Signal::Sigkill,
                            };
                            let u = Unary {
                                authority: self.authority.clone(),
                                id: id.to_string(),
                                token: token.clone(),
                            };
                            if let Err(e) = u.call("SendSignal", &kill).await {
                                tracing::warn!("killing the command: {e}");
                            }
                        }
                        return Err(ClientError::Interrupted { signal });
                    }
                };
                let frame = match next {
                    Err(_) => return Err(self.timeout(STREAM_IDLE)),
                    Ok(None) => {
                        return Err(self.protocol("the process stream ended without its end"))
                    }
                    Ok(Some(f)) => f.map_err(|err| self.http(err))?,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                reader.push(&data);
                while let Some((flags, payload)) = reader
                    .next_envelope()
                    .map_err(|e| self.protocol(&e.to_string()))?
                {
                    let msg: serde_json::Value = serde_json::from_slice(&payload)
                        .map_err(|e| self.protocol(&format!("a stream message: {e}")))?;
                    if flags & END_STREAM != 0 {
                        if let Some(err) = msg.get("error") {
                            return Err(ClientError::Rpc {
                                id: id.to_string(),
                                code: err["code"].as_str().unwrap_or("unknown").to_string(),
                                message: err["message"].as_str().unwrap_or_default().to_string(),
                            });
                        }
                        return end.ok_or_else(|| self.protocol("the process stream has no end"));
                    }
                    match ProcessEvent::parse(&msg) {
                        Some(ProcessEvent::Start { pid: started }) => {
                            pid = Some(started);
                            if let Some(input) = stdin.take() {
                                self.feed_stdin(id, token.clone(), started, tty, input);
                            }
                        }
                        Some(ProcessEvent::Stdout(b) | ProcessEvent::Pty(b)) => {
                            out(Output::Stdout(&b))
                        }
                        Some(ProcessEvent::Stderr(b)) => out(Output::Stderr(&b)),
                        Some(ProcessEvent::End(e)) => end = Some(e),
                        Some(ProcessEvent::Keepalive) | None => {}
                    }
                }
            }
        })
    }

    /// Sends what `input` yields to process `pid` (`SendInput`), then closes its stdin
    /// (`CloseStdin`), from a task of this runtime fed by a reading thread; the process's
    /// stream goes on meanwhile. A failure to send ends the feeding only (the process ends
    /// on its own, or by its own stream's end).
    fn feed_stdin(
        &self,
        id: &str,
        token: Option<String>,
        pid: u32,
        tty: bool,
        mut input: Box<dyn Read + Send>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let this = Unary {
            authority: self.authority.clone(),
            id: id.to_string(),
            token,
        };
        let selector = move || {
            Some(ProcessSelector {
                pid: Some(pid),
                tag: None,
            })
        };
        tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                let input = match tty {
                    true => ProcessInput {
                        stdin: None,
                        pty: Some(data),
                    },
                    false => ProcessInput {
                        stdin: Some(data),
                        pty: None,
                    },
                };
                let req = SendInputRequest {
                    process: selector(),
                    input: Some(input),
                };
                if let Err(e) = this.call("SendInput", &req).await {
                    tracing::debug!("sending stdin: {e}");
                    return;
                }
            }
            if !tty {
                let req = SelectorRequest {
                    process: selector(),
                };
                if let Err(e) = this.call("CloseStdin", &req).await {
                    tracing::debug!("closing stdin: {e}");
                }
            }
        });
    }

    /// Writes what `data` yields to `path` in sandbox `id` (`POST /files`, a raw body),
    /// as its default user unless `user` is given.
    pub fn write_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        data: impl Read + Send + 'static,
    ) -> Result<()> {
        let mut req = self.files_request(id, path, user, streamed(data))?;
        req.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        self.rt.block_on(async {
            let resp = self.send(req, CALL_TIMEOUT).await?;
            let status = resp.status();
            let body = error_body(resp).await;
            match status.is_success() {
                true => Ok(()),
                false => Err(self.error(status, &body)),
            }
        })
    }

    /// Copies file `path` of sandbox `id` into `out` (`GET /files`).
    pub fn read_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        out: &mut impl Write,
    ) -> Result<u64> {
        let mut req = self.files_request(id, path, user, full(Bytes::new()))?;
        *req.method_mut() = Method::GET;
        self.rt.block_on(async {
            let resp = self.send(req, CALL_TIMEOUT).await?;
            let status = resp.status();
            if !status.is_success() {
                let body = error_body(resp).await;
                return Err(self.error(status, &body));
            }
            let mut body = resp.into_body();
            let mut n = 0u64;
            loop {
                let frame = match tokio::time::timeout(STREAM_IDLE, body.frame()).await {
                    Err(_) => return Err(self.timeout(STREAM_IDLE)),
                    Ok(None) => return Ok(n),
                    Ok(Some(f)) => f.map_err(|err| self.http(err))?,
                };
                if let Ok(data) = frame.into_data() {
                    out.write_all(&data).map_err(|err| ClientError::Io {
                        what: "writing the file".into(),
                        err,
                    })?;
                    n += data.len() as u64;
                }
            }
        })
    }

    /// A request of envd's `/files` for `path` in sandbox `id` (as `user`), with its token.
    fn files_request(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        body: Body,
    ) -> Result<Request<Body>> {
        let token = self.access_token(id)?;
        envd_request(
            &self.authority,
            id,
            token.as_deref(),
            user,
            &files_path(path),
            body,
        )
    }

    /// The envd access token of sandbox `id` (None: it is not secured), from its detail;
    /// [`ClientError::Paused`] when it is paused (its data plane is down until a resume).
    fn access_token(&self, id: &str) -> Result<Option<String>> {
        let d = self.get(id)?;
        if d.listed.state == SandboxState::Paused {
            return Err(ClientError::Paused(d.listed.sandbox_id));
        }
        Ok(d.envd_access_token)
    }

    // ---- plumbing ----

    fn control<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let req = self.control_request(method, path, body)?;
        self.rt.block_on(async {
            let (_, _, body) = self.call(req).await?;
            self.decode(&body)
        })
    }

    fn control_empty(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<()> {
        let req = self.control_request(method, path, body)?;
        self.rt.block_on(self.call(req)).map(|_| ())
    }

    fn control_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Request<Body>> {
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).expect("a request body serializes")),
            None => Bytes::new(),
        };
        let mut req = self.request(method, path, full(bytes))?;
        let h = req.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert("x-api-key", self.api_key.clone());
        Ok(req)
    }

    fn request(&self, method: Method, path: &str, body: Body) -> Result<Request<Body>> {
        request(&self.authority, method, path, body)
    }

    /// Sends `req`, reads the whole answer: its status, headers and body when 2xx, else the
    /// error.
    async fn call(&self, req: Request<Body>) -> Result<(StatusCode, HeaderMap, Bytes)> {
        let t = std::time::Instant::now();
        let resp = self.send(req, CALL_TIMEOUT).await?;
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let left = CALL_TIMEOUT.saturating_sub(t.elapsed());
        let limited = http_body_util::Limited::new(body, MAX_ANSWER_BODY);
        let body = match tokio::time::timeout(left, limited.collect()).await {
            Err(_) => return Err(self.timeout(CALL_TIMEOUT)),
            Ok(Err(err)) => match err.downcast::<hyper::Error>() {
                Ok(err) => return Err(self.http(*err)),
                Err(_) => {
                    return Err(
                        self.protocol(&format!("an answer longer than {MAX_ANSWER_BODY} bytes"))
                    )
                }
            },
            Ok(Ok(b)) => b.to_bytes(),
        };
        if !status.is_success() {
            return Err(status_error(&self.url, status, &body, Plane::Control));
        }
        Ok((status, parts.headers, body))
    }

    async fn send(&self, req: Request<Body>, within: Duration) -> Result<Response<Incoming>> {
        send(&self.authority, req, within).await
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T> {
        let body = if body.is_empty() { &b"null"[..] } else { body };
        serde_json::from_slice(body).map_err(|e| self.protocol(&e.to_string()))
    }

    /// A data-plane answer's error.
    fn error(&self, status: StatusCode, body: &[u8]) -> ClientError {
        status_error(&self.url, status, body, Plane::Data)
    }

    fn timeout(&self, d: Duration) -> ClientError {
        ClientError::Timeout {
            server: self.url.clone(),
            secs: d.as_secs(),
        }
    }

    fn http(&self, err: hyper::Error) -> ClientError {
        ClientError::Http {
            server: self.url.clone(),
            err,
        }
    }

    fn protocol(&self, why: &str) -> ClientError {
        ClientError::Protocol {
            server: self.url.clone(),
            why: why.to_string(),
        }
    }
}

/// At most [`MAX_ERROR_BODY`] of an answer's body, within [`CALL_TIMEOUT`] (empty when it
/// cannot be read): what an error answer says.
async fn error_body(resp: Response<Incoming>) -> Bytes {
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY);
    match tokio::time::timeout(CALL_TIMEOUT, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => Bytes::new(),
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from now on (instead of ending the process).
fn caught_signals() -> std::io::Result<Vec<(i32, tokio::signal::unix::Signal)>> {
    use tokio::signal::unix::{signal, SignalKind};
    [
        (libc::SIGINT, SignalKind::interrupt()),
        (libc::SIGTERM, SignalKind::terminate()),
        (libc::SIGHUP, SignalKind::hangup()),
    ]
    .into_iter()
    .map(|(n, kind)| Ok((n, signal(kind)?)))
    .collect()
}

/// The next of `signals` to arrive (never, when there are none).
async fn next_signal(signals: &mut [(i32, tokio::signal::unix::Signal)]) -> i32 {
    std::future::poll_fn(|cx| {
        for (n, s) in signals.iter_mut() {
            if s.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*n);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// What a task of the runtime needs for envd's unary calls on one sandbox.
struct Unary {
    authority: String,
    id: String,
    token: Option<String>,
}

impl Unary {
    /// `process.Process/{method}` with message `msg`.
    async fn call(&self, method: &str, msg: &impl Serialize) -> Result<()> {
        let body = Bytes::from(serde_json::to_vec(msg).expect("a message serializes"));
        let path = format!("/process.Process/{method}");
        let mut req = envd_request(
            &self.authority,
            &self.id,
            self.token.as_deref(),
            None,
            &path,
            full(body),
        )?;
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(connect::JSON));
        let resp = send(&self.authority, req, CALL_TIMEOUT).await?;
        let status = resp.status();
        let body = error_body(resp).await;
        match status.is_success() {
            true => Ok(()),
            false => Err(status_error(&self.authority, status, &body, Plane::Data)),
        }
    }
}

/// A request for `path` on the data plane of sandbox `id` (envd's port).
fn envd_request(
    authority: &str,
    id: &str,
    token: Option<&str>,
    user: Option<&str>,
    path: &str,
    body: Body,
) -> Result<Request<Body>> {
    let mut req = request(authority, Method::POST, path, body)?;
    let bad = |what: &str| ClientError::Protocol {
        server: authority.to_string(),
        why: format!("{what} holds characters a header cannot"),
    };
    let h = req.headers_mut();
    h.insert(
        "e2b-sandbox-id",
        HeaderValue::from_str(id).map_err(|_| bad("the sandbox id"))?,
    );
    h.insert(
        "e2b-sandbox-port",
        HeaderValue::from_str(&crate::ENVD_PORT.to_string()).expect("digits"),
    );
    if let Some(t) = token {
        let mut v = HeaderValue::from_str(t).map_err(|_| bad("the access token"))?;
        v.set_sensitive(true);
        h.insert("x-access-token", v);
    }
    if let Some(u) = user {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:"));
        h.insert(
            hyper::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {b}")).expect("base64"),
        );
    }
    Ok(req)
}

fn request(authority: &str, method: Method, path: &str, body: Body) -> Result<Request<Body>> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .body(body)
        .map_err(|e| ClientError::Protocol {
            server: authority.to_string(),
            why: format!("request {path:?}: {e}"),
        })?;
    req.headers_mut().insert(
        HOST,
        HeaderValue::from_str(authority).map_err(|_| ClientError::BadUrl(authority.into()))?,
    );
    Ok(req)
}

/// Sends `req` on a new connection to `authority`; the answer's head within `within`.
async fn send(authority: &str, req: Request<Body>, within: Duration) -> Result<Response<Incoming>> {
    let server = format!("http://{authority}");
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority))
        .await
    {
        Err(_) => {
            return Err(ClientError::Timeout {
                server,
                secs: CONNECT_TIMEOUT.as_secs(),
            })
        }
        Ok(Err(err)) => return Err(ClientError::Connect { server, err }),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let http = |err| ClientError::Http {
        server: server.clone(),
        err,
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(http)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    match tokio::time::timeout(within, sender.send_request(req)).await {
        Err(_) => Err(ClientError::Timeout {
            server: server.clone(),
            secs: within.as_secs(),
        }),
        Ok(r) => r.map_err(http),
    }
}

/// Which side of the API answered: a 401 of the control plane refuses the API key, one of
/// the data plane the sandbox's access token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plane {
    Control,
    Data,
}

/// The error an answer with `status` and `body` stands for: E2B's `{code, message}`, envd's
/// `{code: "not_found", message}`, or the body's text.
fn status_error(server: &str, status: StatusCode, body: &[u8], plane: Plane) -> ClientError {
    let message = match serde_json::from_slice::<crate::control::types::Error>(body) {
        Ok(e) => e.message.into_owned(),
        Err(_) => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) if v["message"].is_string() => v["message"].as_str().unwrap_or("").to_string(),
            _ => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                match text.is_empty() {
                    true => status.canonical_reason().unwrap_or("error").to_string(),
                    false => text.chars().take(300).collect(),
                }
            }
        },
    };
    if status == StatusCode::UNAUTHORIZED && plane == Plane::Control {
        return ClientError::WrongKey {
            server: server.to_string(),
            message,
        };
    }
    ClientError::Api {
        status: status.as_u16(),
        message,
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A body read from `data` on a thread of its own, piece by piece.
fn streamed(mut data: impl Read + Send + 'static) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Frame<Bytes>>>(4);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        loop {
            let item = match data.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => Ok(Frame::data(Bytes::copy_from_slice(&buf[..n]))),
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    StreamBody::new(stream).boxed()
}

/// `/sandboxes/{id}{rest}`, the id escaped.
fn sandbox_path(id: &str, rest: &str) -> String {
    format!("/sandboxes/{}{rest}", query_value(id))
}

/// `/files?path=...`.
fn files_path(path: &str) -> String {
    format!("/files?path={}", query_value(path))
}

/// `s` percent-encoded for a path segment or a query value.
fn query_value(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(
            parse_server_url("http://127.0.0.1:3000").unwrap(),
            "127.0.0.1:3000"
        );
        assert_eq!(
            parse_server_url("http://127.0.0.1:3000/").unwrap(),
            "127.0.0.1:3000"
        );
        assert_eq!(parse_server_url("HTTP://node1").unwrap(), "node1:80");
        assert_eq!(
            parse_server_url("localhost:3000").unwrap(),
            "localhost:3000"
        );
        assert_eq!(parse_server_url("http://[::1]:3000").unwrap(), "[::1]:3000");
        assert_eq!(parse_server_url("http://[::1]").unwrap(), "[::1]:80");
        assert!(matches!(
            parse_server_url("https://kiln.example"),
            Err(ClientError::Https(_))
        ));
        for bad in [
            "",
            "http://",
            "ftp://x:1",
            "http://x:0",
            "http://x:99999",
            "http://x:1/api",
            "http://u@x:1",
            "http://x:1?q",
            "http://:3000",
        ] {
            assert!(
                matches!(parse_server_url(bad), Err(ClientError::BadUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_carry_status_and_message() {
        let e = status_error(
            "http://s",
            StatusCode::NOT_FOUND,
            br#"{"code":404,"message":"sandbox ab12 not found"}"#,
            Plane::Control,
        );
        assert_eq!(e.to_string(), "sandbox ab12 not found (404)");
        let e = status_error(
            "http://s",
            StatusCode::UNAUTHORIZED,
            br#"{"code":401,"message":"invalid API key"}"#,
            Plane::Control,
        );
        assert!(matches!(e, ClientError::WrongKey { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "http://s refused the API key: invalid API key (401)"
        );
        let e = status_error(
            "http://s",
            StatusCode::UNAUTHORIZED,
            br#"{"code":401,"message":"unauthorized access"}"#,
            Plane::Data,
        );
        assert_eq!(e.to_string(), "unauthorized access (401)");
        let e = status_error(
            "http://s",
            StatusCode::BAD_GATEWAY,
            br#"{"code":"not_found","message":"gone"}"#,
            Plane::Data,
        );
        assert_eq!(e.to_string(), "gone (502)");
        let e = status_error(
            "http://s",
            StatusCode::INTERNAL_SERVER_ERROR,
            b"",
            Plane::Control,
        );
        assert_eq!(e.to_string(), "Internal Server Error (500)");
        assert_eq!(query_value("a b/c&d"), "a%20b%2Fc%26d");
    }

    /// A one-connection-at-a-time HTTP server on loopback answering every request with
    /// `answer`, for up to `n` connections.
    fn hostile_server(n: usize, answer: Vec<u8>) -> String {
        use std::io::{BufRead, BufReader};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for c in l.incoming().take(n) {
                let Ok(mut c) = c else { return };
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = c.write_all(&answer);
            }
        });
        url
    }

    #[test]
    fn a_hostile_server_can_neither_flood_nor_page_forever() {
        let mut huge = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            MAX_ANSWER_BODY + 1
        )
        .into_bytes();
        huge.resize(huge.len() + MAX_ANSWER_BODY + 1, b' ');
        let url = hostile_server(1, huge);
        let e = Client::new(&url, Some("k".into()))
            .unwrap()
            .get("ab12")
            .unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");

        let pages = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-next-token: again\r\ncontent-length: 2\r\n\r\n[]".to_vec();
        let url = hostile_server(8, pages);
        let e = Client::new(&url, Some("k".into()))
            .unwrap()
            .list()
            .unwrap_err();
        assert!(e.to_string().contains("do not end"), "{e}");
    }
}
