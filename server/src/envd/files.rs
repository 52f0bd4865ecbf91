//! envd's `/files`: `GET` downloads a file (`path`, `username` query parameters), `POST`
//! uploads one (`application/octet-stream`, optionally gzip-encoded, to `path`) or several
//! (`multipart/form-data`, parts named `file`, each to `path` or to its file name). Uploads
//! stream into the agent's write, in place as envd writes (watchers see what they see under
//! envd); missing parent directories are created and given to the user, the file too; the
//! `X-Metadata-<key>` headers become the file's metadata (`user.e2b.<key>` xattrs, envd
//! 0.6.2), returned in the answer. Errors are envd's `{code, message}` with its statuses.

use super::agent::{json_error, EnvdError, Session, User};
use super::connect::Code;
use super::stream::body_of;
use super::types::UploadedEntry;
use crate::AppState;
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use kiln_agent::client;
use kiln_agent::protocol::{FileKind, FileRequest, METADATA_XATTR_PREFIX};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A failed `/files` request: status and message.
#[derive(Debug)]
pub struct HttpFail(pub StatusCode, pub String);

impl From<EnvdError> for HttpFail {
    fn from(e: EnvdError) -> HttpFail {
        match e {
            EnvdError::Sandbox { status, message } => HttpFail(status, message),
            EnvdError::Rpc(e) => {
                let status = match e.code {
                    Code::NotFound => StatusCode::NOT_FOUND,
                    Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                    Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
                    Code::Unavailable => StatusCode::BAD_GATEWAY,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                HttpFail(status, e.message)
            }
        }
    }
}

impl From<super::connect::RpcError> for HttpFail {
    fn from(e: super::connect::RpcError) -> HttpFail {
        EnvdError::Rpc(e).into()
    }
}

impl IntoResponse for HttpFail {
    fn into_response(self) -> Response {
        json_error(self.0, &self.1)
    }
}

pub fn query(uri: &axum::http::Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            // Form decoding (`+` is a space), as Go's `url.Query()` in envd.
            form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect::<HashMap<_, _>>()
        })
        .unwrap_or_default()
}

/// The user and resolved path of a request (401 for an unknown user, as envd).
fn who(s: &mut Session, username: Option<&str>) -> Result<User, HttpFail> {
    s.user(username).map_err(|e| {
        HttpFail(
            StatusCode::UNAUTHORIZED,
            format!(
                "error looking up user '{}': {}",
                username.unwrap_or_default(),
                e.message
            ),
        )
    })
}

/// A `Write` that hands its bytes to an async body.
struct ChannelWriter(mpsc::Sender<Bytes>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `Read` fed by the request body (an error ends it: the agent drops the partial file).
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

pub async fn download(state: Arc<AppState>, id: String, q: HashMap<String, String>) -> Response {
    let path = q.get("path").cloned().unwrap_or_default();
    let username = q.get("username").cloned().filter(|u| !u.is_empty());
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<Result<String, HttpFail>>();
    tokio::task::spawn_blocking(move || {
        let prep = (|| -> Result<(Session, String), HttpFail> {
            let mut s = Session::open(&state, &id)?;
            let u = who(&mut s, username.as_deref())?;
            let resolved = s.resolve(&path, &u).map_err(|e| {
                HttpFail(
                    StatusCode::BAD_REQUEST,
                    format!("error expanding and resolving path '{path}': {}", e.message),
                )
            })?;
            match s.call(|c| client::stat(c, &resolved)) {
                Err(e) if e.code == Code::NotFound => {
                    return Err(HttpFail(
                        StatusCode::NOT_FOUND,
                        format!("path '{resolved}' does not exist"),
                    ))
                }
                Err(e) => {
                    return Err(HttpFail(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("error checking if path exists '{resolved}': {}", e.message),
                    ))
                }
                Ok(info) => {
                    let dir = info.kind == FileKind::Dir
                        || (info.kind == FileKind::Symlink
                            && s.entry(info)?.kind == super::types::FileType::Directory);
                    if dir {
                        return Err(HttpFail(
                            StatusCode::BAD_REQUEST,
                            format!("path '{resolved}' is a directory"),
                        ));
                    }
                }
            }
            Ok((s, resolved))
        })();
        match prep {
            Err(e) => {
                let _ = head_tx.send(Err(e));
            }
            Ok((mut s, resolved)) => {
                let _ = head_tx.send(Ok(resolved.clone()));
                let _ = s.call(|c| client::read_file(c, &resolved, ChannelWriter(tx)));
            }
        }
    });
    match head_rx.await {
        Ok(Ok(path)) => {
            let name = path.rsplit('/').next().unwrap_or("file").replace('"', "");
            let mut r = Response::new(body_of(rx));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{name}\"")) {
                h.insert(header::CONTENT_DISPOSITION, v);
            }
            h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
            r
        }
        Ok(Err(e)) => e.into_response(),
        Err(_) => {
            HttpFail(StatusCode::INTERNAL_SERVER_ERROR, "download failed".into()).into_response()
        }
    }
}

/// The metadata of an upload: its `X-Metadata-<key>` headers, keys lowercased, the first
/// value of a repeated one (envd's `extractMetadataHeaders`), checked as envd checks them.
pub fn metadata_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, HttpFail> {
    const PREFIX: &str = "x-metadata-";
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(PREFIX).filter(|k| !k.is_empty()) else {
            continue;
        };
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(key.to_string()).or_insert(value);
    }
    validate_metadata(&out)
        .map_err(|m| HttpFail(StatusCode::BAD_REQUEST, format!("invalid metadata: {m}")))?;
    Ok(out)
}

/// envd's `ValidateMetadata`: printable US-ASCII keys and values, a key at most 255 bytes
/// with its xattr prefix, 4096 bytes in all (each key counted with the prefix).
fn validate_metadata(m: &BTreeMap<String, String>) -> Result<(), String> {
    const PREFIX_LEN: usize = METADATA_XATTR_PREFIX.len();
    let printable = |label: &str, s: &str| match s.bytes().position(|c| !(0x20..=0x7e).contains(&c))
    {
        Some(i) => Err(format!(
            "metadata {label} contains non-printable-ASCII byte 0x{:02x} at offset {i}",
            s.as_bytes()[i]
        )),
        None => Ok(()),
    };
    let mut total = 0;
    for (k, v) in m {
        if k.is_empty() {
            return Err("metadata key must not be empty".into());
        }
        if k.len() > 255 - PREFIX_LEN {
            return Err(format!(
                "metadata key {k:?} exceeds {} bytes",
                255 - PREFIX_LEN
            ));
        }
        printable("key", k)?;
        printable(&format!("value for key {k:?}"), v)?;
        total += PREFIX_LEN + k.len() + v.len();
    }
    if total > 4096 {
        return Err(format!("total metadata size {total} exceeds 4096 bytes"));
    }
    Ok(())
}

/// Writes one file from `rx` (blocking) as envd does: parents created and owned by the
/// user, the file written in place, given to the user, its metadata replaced. Returns the
/// metadata it has then.
fn write_one(
    s: &mut Session,
    u: &User,
    path: &str,
    rx: mpsc::Receiver<io::Result<Bytes>>,
    gzip: bool,
    metadata: &BTreeMap<String, String>,
) -> Result<Option<BTreeMap<String, String>>, HttpFail> {
    if let Some((parent, _)) = path.rsplit_once('/') {
        if !parent.is_empty() {
            s.ensure_dirs(parent, u)?;
        }
    }
    let req = FileRequest {
        path: path.to_string(),
        uid: Some(u.uid),
        gid: Some(u.gid),
        in_place: true,
        metadata: Some(metadata.clone()),
        ..Default::default()
    };
    let reader = ChannelReader {
        rx,
        cur: Bytes::new(),
    };
    let r = if gzip {
        s.call(|c| client::write_file_info(c, &req, flate2::read::GzDecoder::new(reader)))
    } else {
        s.call(|c| client::write_file_info(c, &req, reader))
    };
    match r {
        Ok((_, info)) => Ok(info.map(|i| i.metadata).filter(|m| !m.is_empty())),
        // A directory is in the way (envd's 400).
        Err(e) if e.code == Code::InvalidArgument => {
            Err(HttpFail(StatusCode::BAD_REQUEST, e.message))
        }
        Err(e) => {
            let status = if e.message.contains("No space left")
                || e.message.contains("Disk quota exceeded")
            {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            Err(HttpFail(
                status,
                format!("error writing file '{path}': {}", e.message),
            ))
        }
    }
}

/// A session and user prepared on the blocking pool.
async fn prepare(
    state: &Arc<AppState>,
    id: &str,
    username: Option<String>,
) -> Result<(Session, User), HttpFail> {
    let state = state.clone();
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        let mut s = Session::open(&state, &id)?;
        let u = who(&mut s, username.as_deref())?;
        Ok((s, u))
    })
    .await
    .unwrap_or_else(|e| Err(HttpFail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))
}

/// `POST /files/compose` (envd 0.6.x): `{source_paths, destination, username?}`; the
/// sources, in order, become the destination (parents created and given to the user, the
/// file too) and go away. envd's checks, statuses and messages.
pub async fn compose(state: Arc<AppState>, id: String, body: Body) -> Response {
    #[derive(serde::Deserialize)]
    struct Req {
        source_paths: Vec<String>,
        destination: String,
        #[serde(default)]
        username: Option<String>,
    }
    let req: Req = match axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            return HttpFail(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            )
            .into_response()
        }
    };
    if req.source_paths.is_empty() {
        return HttpFail(
            StatusCode::BAD_REQUEST,
            "source_paths must not be empty".into(),
        )
        .into_response();
    }
    if req.destination.is_empty() {
        return HttpFail(StatusCode::BAD_REQUEST, "destination is required".into()).into_response();
    }
    let r = tokio::task::spawn_blocking(move || -> Result<UploadedEntry, HttpFail> {
        let mut s = Session::open(&state, &id)?;
        let u = who(&mut s, req.username.as_deref().filter(|u| !u.is_empty()))?;
        let bad = |what: String| HttpFail(StatusCode::BAD_REQUEST, what);
        let dest = s
            .resolve(&req.destination, &u)
            .map_err(|e| bad(format!("error resolving destination path: {}", e.message)))?;
        let mut sources = Vec::with_capacity(req.source_paths.len());
        for src in &req.source_paths {
            let path = s.resolve(src, &u).map_err(|e| {
                bad(format!(
                    "error resolving source path {src:?}: {}",
                    e.message
                ))
            })?;
            if path == dest {
                return Err(bad(format!(
                    "source path {src:?} cannot be the same as destination"
                )));
            }
            let info = s.call(|c| client::stat(c, &path)).map_err(|_| {
                HttpFail(
                    StatusCode::NOT_FOUND,
                    format!("source file not found: {src}"),
                )
            })?;
            let regular = info.kind == FileKind::File
                || info
                    .link
                    .as_ref()
                    .is_some_and(|l| l.kind == Some(FileKind::File));
            if !regular {
                return Err(bad(format!("source path is not a regular file: {src}")));
            }
            sources.push(path);
        }
        if let Some((parent, _)) = dest.rsplit_once('/').filter(|(p, _)| !p.is_empty()) {
            s.ensure_dirs(parent, &u).map_err(|e| {
                HttpFail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("error ensuring directories: {}", e.message),
                )
            })?;
        }
        let creq = kiln_agent::protocol::ComposeRequest {
            sources,
            destination: dest.clone(),
            uid: Some(u.uid),
            gid: Some(u.gid),
        };
        let info = s.call(|c| client::compose(c, &creq)).map_err(|e| {
            let status = if e.message.contains("No space left") {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            HttpFail(status, format!("error composing files: {}", e.message))
        })?;
        Ok(uploaded(
            &dest,
            Some(info.metadata).filter(|m| !m.is_empty()),
        ))
    })
    .await;
    match r {
        Ok(Ok(entry)) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&entry).unwrap_or_else(|_| "{}".into()),
        )
            .into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => HttpFail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// What a file written has as metadata.
type Written = Result<Option<BTreeMap<String, String>>, HttpFail>;
/// A file being written: the feed of its bytes, the writer (which hands the session back).
type Feed = mpsc::Sender<io::Result<Bytes>>;
type Writer = tokio::task::JoinHandle<(Session, User, Written)>;

/// Starts writing `path`; returns the feed and the writer's handle.
fn spawn_write(
    mut s: Session,
    u: User,
    path: String,
    gzip: bool,
    metadata: Arc<BTreeMap<String, String>>,
) -> (Feed, Writer) {
    let (tx, rx) = mpsc::channel(8);
    let h = tokio::task::spawn_blocking(move || {
        let r = write_one(&mut s, &u, &path, rx, gzip, &metadata);
        (s, u, r)
    });
    (tx, h)
}

pub async fn upload(
    state: Arc<AppState>,
    id: String,
    q: HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    upload_inner(state, id, q, headers, body)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn upload_inner(
    state: Arc<AppState>,
    id: String,
    q: HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, HttpFail> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let media = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let metadata = Arc::new(metadata_headers(headers)?);
    let up = Upload {
        metadata,
        state,
        id,
        username: q.get("username").cloned().filter(|u| !u.is_empty()),
        path: q.get("path").cloned().filter(|p| !p.is_empty()),
        data: body.into_data_stream(),
    };
    let done = if media == "application/octet-stream" {
        up.raw(gzip).await?
    } else if media.starts_with("multipart/") {
        up.multipart(&ctype).await?
    } else {
        return Err(HttpFail(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported content type: {ctype}, expected multipart/form-data or application/octet-stream"
            ),
        ));
    };
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&done).unwrap_or_else(|_| "[]".into()),
    )
        .into_response())
}

/// One upload request's body and where it goes.
struct Upload {
    state: Arc<AppState>,
    id: String,
    username: Option<String>,
    /// The `path` query parameter.
    path: Option<String>,
    /// Every file's metadata.
    metadata: Arc<BTreeMap<String, String>>,
    data: axum::body::BodyDataStream,
}

impl Upload {
    /// A raw body (`application/octet-stream`): one file at `path`.
    async fn raw(mut self, gzip: bool) -> Result<Vec<UploadedEntry>, HttpFail> {
        let Some(path) = self.path else {
            return Err(HttpFail(
                StatusCode::BAD_REQUEST,
                "path query parameter is required for raw body upload".into(),
            ));
        };
        let (s, u) = prepare(&self.state, &self.id, self.username).await?;
        let resolved = s.resolve(&path, &u).map_err(|e| {
            HttpFail(
                StatusCode::BAD_REQUEST,
                format!("error resolving path: {}", e.message),
            )
        })?;
        let (tx, h) = spawn_write(s, u, resolved.clone(), gzip, self.metadata.clone());
        while let Some(chunk) = self.data.next().await {
            let item = chunk.map_err(|e| io::Error::other(e.to_string()));
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
        drop(tx);
        let (_, _, r) = h
            .await
            .map_err(|e| HttpFail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(vec![uploaded(&resolved, r?)])
    }

    /// A multipart form: every `file` part is a file, at `path` or its own file name.
    async fn multipart(mut self, ctype: &str) -> Result<Vec<UploadedEntry>, HttpFail> {
        let mut done: Vec<UploadedEntry> = Vec::new();
        let Some(boundary) = boundary_of(ctype) else {
            return Err(HttpFail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "error parsing multipart form: no boundary".into(),
            ));
        };
        let (s, u) = prepare(&self.state, &self.id, self.username.clone()).await?;
        let mut session = Some((s, u));
        let mut parser = Multipart::new(&boundary);
        let mut current: Option<(String, Feed, Writer)> = None;
        let mut skipping = false;
        let mut body_done = false;
        loop {
            match parser.next_event().map_err(|m| {
                HttpFail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("error reading form: {m}"),
                )
            })? {
                Some(Part::Start { name, filename }) => {
                    if name != "file" {
                        skipping = true;
                        continue;
                    }
                    skipping = false;
                    let (s, u) = session.take().expect("session between parts");
                    let target = match (&self.path, filename) {
                        (Some(p), _) => p.clone(),
                        (None, Some(f)) => f,
                        (None, None) => {
                            return Err(HttpFail(
                                StatusCode::BAD_REQUEST,
                                "error getting multipart custom part file name: no file name"
                                    .into(),
                            ))
                        }
                    };
                    let resolved = s.resolve(&target, &u).map_err(|e| {
                        HttpFail(
                            StatusCode::BAD_REQUEST,
                            format!("error resolving path: {}", e.message),
                        )
                    })?;
                    if done.iter().any(|d| d.path == resolved) {
                        return Err(HttpFail(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "you cannot upload multiple files to the same path '{resolved}' in one upload request, only the first specified file was uploaded"
                            ),
                        ));
                    }
                    let (tx, h) = spawn_write(s, u, resolved.clone(), false, self.metadata.clone());
                    current = Some((resolved, tx, h));
                }
                Some(Part::Data(b)) => {
                    if skipping {
                        continue;
                    }
                    if let Some((_, tx, _)) = &current {
                        // A writer that failed early reports it at the part's end.
                        let _ = tx.send(Ok(b)).await;
                    }
                }
                Some(Part::End) => {
                    if let Some((path, tx, h)) = current.take() {
                        drop(tx);
                        let (s, u, r) = h.await.map_err(|e| {
                            HttpFail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                        })?;
                        let metadata = r?;
                        session = Some((s, u));
                        done.push(uploaded(&path, metadata));
                    }
                    skipping = false;
                }
                Some(Part::Done) => break,
                None if body_done => {
                    if let Some((_, tx, h)) = current.take() {
                        let _ = tx.send(Err(io::Error::other("form cut off"))).await;
                        drop(tx);
                        let _ = h.await;
                    }
                    return Err(HttpFail(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "error reading form: unexpected end of the body".into(),
                    ));
                }
                None => match self.data.next().await {
                    Some(Ok(chunk)) => parser.push(&chunk),
                    Some(Err(e)) => {
                        return Err(HttpFail(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("error reading form: {e}"),
                        ))
                    }
                    None => body_done = true,
                },
            }
        }
        Ok(done)
    }
}

fn uploaded(path: &str, metadata: Option<BTreeMap<String, String>>) -> UploadedEntry {
    UploadedEntry {
        path: path.to_string(),
        name: path.rsplit('/').next().unwrap_or(path).to_string(),
        kind: "file",
        metadata,
    }
}

/// The `boundary` parameter of a multipart content type.
fn boundary_of(ctype: &str) -> Option<String> {
    ctype.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// What the multipart parser found.
#[derive(Debug, PartialEq)]
pub enum Part {
    Start {
        name: String,
        filename: Option<String>,
    },
    Data(Bytes),
    End,
    Done,
}

#[derive(Debug, PartialEq)]
enum St {
    Preamble,
    Headers,
    Body,
    AfterDelimiter,
    Done,
}

/// An incremental `multipart/form-data` parser (RFC 7578): bytes in, parts out.
pub struct Multipart {
    /// `\r\n--boundary`.
    delim: Vec<u8>,
    buf: BytesMut,
    st: St,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Multipart {
    pub fn new(boundary: &str) -> Multipart {
        let mut delim = b"\r\n--".to_vec();
        delim.extend_from_slice(boundary.as_bytes());
        Multipart {
            delim,
            buf: BytesMut::new(),
            st: St::Preamble,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next event, or None until more bytes are pushed.
    pub fn next_event(&mut self) -> Result<Option<Part>, String> {
        loop {
            match self.st {
                St::Done => return Ok(Some(Part::Done)),
                St::Preamble => {
                    // The first delimiter may lack its leading CRLF.
                    let first = &self.delim[2..];
                    let Some(i) = find(&self.buf, first) else {
                        let keep = first.len();
                        if self.buf.len() > keep {
                            let n = self.buf.len() - keep;
                            self.buf.advance(n);
                        }
                        return Ok(None);
                    };
                    self.buf.advance(i + first.len());
                    self.st = St::AfterDelimiter;
                }
                St::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    if &self.buf[..2] == b"--" {
                        self.st = St::Done;
                        return Ok(Some(Part::Done));
                    }
                    // Transport padding, then CRLF.
                    let Some(i) = find(&self.buf, b"\r\n") else {
                        return Ok(None);
                    };
                    self.buf.advance(i + 2);
                    self.st = St::Headers;
                }
                St::Headers => {
                    let Some(i) = find(&self.buf, b"\r\n\r\n") else {
                        if self.buf.len() > 64 * 1024 {
                            return Err("part headers too large".into());
                        }
                        return Ok(None);
                    };
                    let head = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                    self.buf.advance(i + 4);
                    self.st = St::Body;
                    let (mut name, mut filename) = (String::new(), None);
                    for line in head.split("\r\n") {
                        let Some((k, v)) = line.split_once(':') else {
                            continue;
                        };
                        if k.trim().eq_ignore_ascii_case("content-disposition") {
                            name = disposition_param(v, "name").unwrap_or_default();
                            filename = disposition_param(v, "filename");
                        }
                    }
                    return Ok(Some(Part::Start { name, filename }));
                }
                St::Body => {
                    if let Some(i) = find(&self.buf, &self.delim) {
                        if i > 0 {
                            return Ok(Some(Part::Data(self.buf.split_to(i).freeze())));
                        }
                        self.buf.advance(self.delim.len());
                        self.st = St::AfterDelimiter;
                        return Ok(Some(Part::End));
                    }
                    let safe = self.buf.len().saturating_sub(self.delim.len() - 1);
                    if safe > 0 {
                        return Ok(Some(Part::Data(self.buf.split_to(safe).freeze())));
                    }
                    return Ok(None);
                }
            }
        }
    }
}

/// A `Content-Disposition` parameter (`name="..."`, quoted with backslash escapes, or bare).
fn disposition_param(v: &str, key: &str) -> Option<String> {
    let mut rest = v;
    while let Some(semi) = rest.find(';') {
        rest = rest[semi + 1..].trim_start();
        let (k, after) = rest.split_once('=')?;
        let k = k.trim();
        let val: String;
        let remaining: &str;
        if let Some(q) = after.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => out.push(c),
                }
            }
            val = out;
            remaining = &q[end.min(q.len())..];
        } else {
            let e = after.find(';').unwrap_or(after.len());
            val = after[..e].trim().to_string();
            remaining = &after[e..];
        }
        if k.eq_ignore_ascii_case(key) {
            // httpx percent-encodes quotes in file names.
            return Some(val.replace("%22", "\""));
        }
        rest = remaining;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(body: &[u8], step: usize) -> Vec<Part> {
        let mut p = Multipart::new("XyZ");
        let mut out = Vec::new();
        for chunk in body.chunks(step) {
            p.push(chunk);
            while let Some(ev) = p.next_event().unwrap() {
                let done = ev == Part::Done;
                match (out.last_mut(), ev) {
                    (Some(Part::Data(prev)), Part::Data(b)) => {
                        let mut v = prev.to_vec();
                        v.extend_from_slice(&b);
                        *prev = Bytes::from(v);
                    }
                    (_, ev) => out.push(ev),
                }
                if done {
                    return out;
                }
            }
        }
        out
    }

    #[test]
    fn metadata_headers_as_envd_reads_them() {
        let mut h = HeaderMap::new();
        h.append("X-Metadata-Author", HeaderValue::from_static("mish"));
        h.append("x-metadata-author", HeaderValue::from_static("second"));
        h.append("X-Metadata-Purpose", HeaderValue::from_static("up load"));
        h.append("X-Metadata-", HeaderValue::from_static("ignored"));
        h.append("X-Other", HeaderValue::from_static("ignored"));
        let m = metadata_headers(&h).unwrap();
        assert_eq!(
            m,
            BTreeMap::from([
                ("author".to_string(), "mish".to_string()),
                ("purpose".to_string(), "up load".to_string())
            ])
        );
        let bad = |k: &str, v: &str| {
            let m = BTreeMap::from([(k.to_string(), v.to_string())]);
            validate_metadata(&m).unwrap_err()
        };
        assert!(bad("k", "tab\there").contains("non-printable-ASCII byte 0x09 at offset 3"));
        assert!(bad("", "v").contains("must not be empty"));
        assert!(bad(&"k".repeat(247), "v").contains("exceeds 246 bytes"));
        assert!(validate_metadata(&BTreeMap::from([("k".repeat(246), "v".into())])).is_ok());
        assert!(bad("k", &"v".repeat(4096)).contains("total metadata size 4106"));
        let mut h = HeaderMap::new();
        h.append(
            "X-Metadata-K",
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        let e = metadata_headers(&h).unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        assert!(e.1.starts_with("invalid metadata: "), "{}", e.1);
    }

    #[test]
    fn multipart_parses_in_any_split() {
        let body = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/home/a \\\"q\\\".txt\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\n--XyY-not\r\nworld\r\n--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--XyZ--\r\n";
        for step in [1, 2, 3, 7, 1000] {
            let parts = parse_all(body, step);
            assert_eq!(
                parts,
                vec![
                    Part::Start {
                        name: "file".into(),
                        filename: Some("/home/a \"q\".txt".into())
                    },
                    Part::Data(Bytes::from_static(b"hello\r\n--XyY-not\r\nworld")),
                    Part::End,
                    Part::Start {
                        name: "other".into(),
                        filename: None
                    },
                    Part::Data(Bytes::from_static(b"x")),
                    Part::End,
                    Part::Done,
                ],
                "step {step}"
            );
        }
        assert_eq!(
            boundary_of("multipart/form-data; boundary=\"abc\"").as_deref(),
            Some("abc")
        );
        let q = query(
            &"/files?path=%2Fhome%2Fuser%2Fa%20b+c.txt&username=app&p=100%"
                .parse()
                .unwrap(),
        );
        assert_eq!(q["path"], "/home/user/a b c.txt");
        assert_eq!(q["username"], "app");
        assert_eq!(q["p"], "100%");
    }
}
