//! The bridge to the kiln agent: blocking agent calls on tokio's blocking pool, their errors
//! as envd's, the sandbox's users (its /etc/passwd and /etc/group, read through the agent and
//! cached briefly), envd's path rules and its `EntryInfo`.

use super::connect::{self, Code, RpcError};
use super::types::{EntryInfo, FileType};
use crate::timefmt::rfc3339_ms;
use crate::AppState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_agent::client::{self, ClientError};
use kiln_agent::protocol::{ErrorKind, FileInfo, FileKind};
/// The user a request acts as, resolved by the rules the agent runs processes with.
pub use kiln_agent::users::{Identity as User, Users};
use kiln_runtime::{SandboxRecord, Sandboxes};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a data-plane request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    /// The sandbox itself cannot be reached (unknown, not running): answered as plain HTTP,
    /// as E2B's proxy in front of envd does (`{"code": 502, "message": ...}`).
    #[error("{message}")]
    Sandbox { status: StatusCode, message: String },
    /// envd's own answer.
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

impl EnvdError {
    pub fn rpc(code: Code, message: impl Into<String>) -> EnvdError {
        EnvdError::Rpc(RpcError::new(code, message))
    }

    pub fn plain(&self) -> Option<Response> {
        match self {
            EnvdError::Sandbox { status, message } => Some(json_error(*status, message)),
            EnvdError::Rpc(_) => None,
        }
    }

    /// As the answer of a unary call.
    pub fn unary(&self) -> Response {
        match self {
            EnvdError::Rpc(e) => connect::unary_error(e),
            _ => self.plain().expect("plain"),
        }
    }

    /// As the answer of a stream that has not started.
    pub fn stream(&self) -> Response {
        match self {
            EnvdError::Rpc(e) => connect::stream_error(e),
            _ => self.plain().expect("plain"),
        }
    }

    /// The end of a stream that had started (a sandbox failure becomes `unavailable`).
    pub fn into_rpc(self) -> RpcError {
        match self {
            EnvdError::Rpc(e) => e,
            EnvdError::Sandbox { message, .. } => RpcError::new(Code::Unavailable, message),
        }
    }
}

/// envd's HTTP error body `{code, message}`.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({"code": status.as_u16(), "message": message});
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// E2B's proxy's answer for a sandbox it has no route to (gone, or not running: a paused
/// sandbox is not in its catalog either); the SDK tells it by "was not found".
pub fn not_running(id: &str, state: &str) -> EnvdError {
    EnvdError::Sandbox {
        status: StatusCode::BAD_GATEWAY,
        message: format!("The sandbox {id} was not found (it is {state})"),
    }
}

pub fn from_runtime(id: &str, e: kiln_runtime::Error) -> EnvdError {
    match e {
        kiln_runtime::Error::NotFound(_) => EnvdError::Sandbox {
            status: StatusCode::BAD_GATEWAY,
            message: format!("The sandbox {id} was not found"),
        },
        kiln_runtime::Error::WrongState { id, state, .. } => not_running(&id, state.name()),
        kiln_runtime::Error::Agent(e) => EnvdError::Rpc(from_client(e)),
        e => EnvdError::Sandbox {
            status: StatusCode::BAD_GATEWAY,
            message: e.to_string(),
        },
    }
}

/// The agent's error as envd's code.
pub fn from_client(e: ClientError) -> RpcError {
    match e {
        ClientError::Agent { kind, message } => {
            let code = match kind {
                ErrorKind::NotFound => Code::NotFound,
                ErrorKind::Exists => Code::AlreadyExists,
                ErrorKind::Invalid => Code::InvalidArgument,
                ErrorKind::Permission => Code::PermissionDenied,
                ErrorKind::Other => Code::Internal,
            };
            RpcError::new(code, message)
        }
        e => RpcError::new(
            Code::Unavailable,
            format!("the connection to the sandbox agent failed: {e}"),
        ),
    }
}

/// One sandbox as a blocking call sees it.
pub struct Session {
    pub sandboxes: Arc<Sandboxes>,
    /// The daemon's envd state (see [`super::EnvdState`]).
    pub envd: Arc<super::EnvdState>,
    pub id: String,
    pub rec: SandboxRecord,
    first: Option<UnixStream>,
}

impl Session {
    /// Looks the sandbox up and connects to its agent (blocking).
    pub fn open(state: &AppState, id: &str) -> Result<Session, EnvdError> {
        let sandboxes = state.sandboxes.clone();
        let (rec, s) = sandboxes.connect(id).map_err(|e| from_runtime(id, e))?;
        Ok(Session {
            sandboxes,
            envd: state.envd.clone(),
            id: id.to_string(),
            rec,
            first: Some(s),
        })
    }

    /// A fresh agent connection (one request per connection).
    pub fn conn(&mut self) -> Result<UnixStream, EnvdError> {
        if let Some(s) = self.first.take() {
            return Ok(s);
        }
        let (_, s) = self
            .sandboxes
            .connect(&self.id)
            .map_err(|e| from_runtime(&self.id, e))?;
        Ok(s)
    }

    /// Runs one agent call on a fresh connection.
    pub fn call<T>(
        &mut self,
        f: impl FnOnce(&mut UnixStream) -> Result<T, ClientError>,
    ) -> Result<T, RpcError> {
        let mut s = self.conn().map_err(EnvdError::into_rpc)?;
        f(&mut s).map_err(from_client)
    }

    /// The sandbox's users (cached for a few seconds).
    pub fn users(&mut self) -> Result<Arc<Users>, RpcError> {
        const TTL: Duration = Duration::from_secs(5);
        let envd = self.envd.clone();
        let cache = &envd.users;
        if let Some((t, u)) = cache.lock().expect("users cache").get(&self.id) {
            if t.elapsed() < TTL {
                return Ok(u.clone());
            }
        }
        let passwd = self.read_small("/etc/passwd")?;
        let group = self.read_small("/etc/group")?;
        let users = Arc::new(Users::parse(&passwd, &group));
        let mut c = cache.lock().expect("users cache");
        if c.len() >= 256 {
            c.retain(|_, (t, _)| t.elapsed() < TTL);
            if c.len() >= 256 {
                c.clear();
            }
        }
        c.insert(self.id.clone(), (Instant::now(), users.clone()));
        Ok(users)
    }

    fn read_small(&mut self, path: &str) -> Result<String, RpcError> {
        let mut out = Vec::new();
        match self.call(|s| client::read_file(s, path, &mut out)) {
            Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
            Err(e) if e.code == Code::NotFound => Ok(String::new()),
            Err(e) => Err(e),
        }
    }

    /// The user a request acts as: the one it names, else the image's, else root.
    pub fn user(&mut self, named: Option<&str>) -> Result<User, RpcError> {
        let name = named
            .map(str::to_string)
            .or_else(|| self.rec.defaults.user.clone())
            .unwrap_or_else(|| "root".into());
        let users = self.users()?;
        users.exec_user(&name).map_err(|e| {
            tracing::debug!(sandbox = %self.id, "user {name:?}: {e}");
            RpcError::new(Code::Unauthenticated, format!("invalid username: '{name}'"))
        })
    }

    /// The image's working directory, envd's default for relative paths and processes.
    pub fn default_workdir(&self) -> Option<String> {
        self.rec.defaults.cwd.clone()
    }

    /// envd's `ExpandAndResolve`: empty is the default workdir, `~` the user's home, a
    /// relative path is under the home.
    pub fn resolve(&self, path: &str, user: &User) -> Result<String, RpcError> {
        resolve_path(path, user, self.default_workdir().as_deref())
    }

    /// The `EntryInfo` of `info`, as envd's: a symlink reports its target's type and mode,
    /// and in `symlinkTarget` the path with every link resolved (its own path when it
    /// dangles, with no type).
    pub fn entry(&mut self, info: FileInfo) -> Result<EntryInfo, RpcError> {
        let users = self.users()?;
        let (mut kind, mut mode) = (file_type(info.kind), info.mode & 0o777);
        let mut target = None;
        if info.kind == FileKind::Symlink {
            // Agents before protocol 3 do not say where a link leads: followed from here.
            let (path, there) = match &info.link {
                Some(l) => (l.path.clone(), l.kind.map(|k| (k, l.mode))),
                None => match self.follow(&info.path) {
                    Some((path, t)) => (path, Some((t.kind, t.mode))),
                    None => (info.path.clone(), None),
                },
            };
            (kind, mode) = there.map_or((FileType::Unspecified, 0), |(k, m)| {
                (file_type(k), m & 0o777)
            });
            target = Some(path);
        }
        Ok(EntryInfo {
            permissions: permissions(info.kind, info.mode),
            owner: users.user_name(info.uid),
            group: users.group_name(info.gid),
            modified_time: Some(rfc3339_ms(info.mtime_ms)),
            symlink_target: target,
            metadata: info.metadata,
            name: info.name,
            kind,
            path: info.path,
            size: info.size as i64,
            mode,
        })
    }

    /// Resolves a symlink chain: the final path and its info.
    fn follow(&mut self, path: &str) -> Option<(String, FileInfo)> {
        let mut cur = path.to_string();
        for _ in 0..40 {
            let info = self.call(|s| client::stat(s, &cur)).ok()?;
            if info.kind != FileKind::Symlink {
                return Some((cur, info));
            }
            let t = info.symlink_target?;
            cur = if t.starts_with('/') {
                clean(&t)
            } else {
                let parent = cur.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                clean(&format!("{parent}/{t}"))
            };
        }
        None
    }

    /// envd's `EnsureDirs`: creates the missing directories of `dir`, owned by `user`.
    pub fn ensure_dirs(&mut self, dir: &str, user: &User) -> Result<(), RpcError> {
        // The missing ancestors, outermost first.
        let mut missing = Vec::new();
        let mut cur = clean(dir);
        loop {
            match self.call(|s| client::stat(s, &cur)) {
                Ok(info) if info.kind == FileKind::Dir => break,
                Ok(info) if info.kind == FileKind::Symlink => break, // followed by mkdir
                Ok(_) => {
                    return Err(RpcError::new(
                        Code::Internal,
                        format!("path is a file: {cur}"),
                    ))
                }
                Err(e) if e.code == Code::NotFound => missing.push(cur.clone()),
                Err(e) => return Err(e),
            }
            match cur.rsplit_once('/') {
                Some(("", _)) | None => break,
                Some((p, _)) => cur = p.to_string(),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        missing.reverse();
        self.call(|s| client::make_dir(s, dir).map(drop))?;
        if user.uid != 0 || user.gid != 0 {
            self.chown(&missing, user)?;
        }
        Ok(())
    }

    /// Gives `paths` to `user` (a `chown` run as root in the sandbox: the agent has no
    /// chown request of its own).
    pub fn chown(&mut self, paths: &[String], user: &User) -> Result<(), RpcError> {
        let mut argv = vec!["chown".to_string(), format!("{}:{}", user.uid, user.gid)];
        argv.extend(paths.iter().cloned());
        let mut req = self.sandboxes.exec_request(
            &self.rec,
            kiln_runtime::ExecOptions {
                argv,
                user: Some("0".into()),
                cwd: Some("/".into()),
                ..Default::default()
            },
        );
        req.stdin = true;
        let out = self.call(|s| client::exec(s, &req, b"", |_, _| {}))?;
        if out.status.code != Some(0) {
            return Err(RpcError::new(
                Code::Internal,
                format!(
                    "failed to chown directory: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }
}

/// Runs `f` with a session on tokio's blocking pool.
pub async fn with_session<T: Send + 'static>(
    state: &Arc<AppState>,
    id: &str,
    f: impl FnOnce(&mut Session) -> Result<T, EnvdError> + Send + 'static,
) -> Result<T, EnvdError> {
    let state = state.clone();
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        let mut s = Session::open(&state, &id)?;
        f(&mut s)
    })
    .await
    .unwrap_or_else(|e| Err(EnvdError::rpc(Code::Internal, format!("task failed: {e}"))))
}

/// [`with_session`], handing the session over.
pub async fn with_owned_session<T: Send + 'static>(
    state: &Arc<AppState>,
    id: &str,
    f: impl FnOnce(Session) -> Result<T, EnvdError> + Send + 'static,
) -> Result<T, EnvdError> {
    let state = state.clone();
    let id = id.to_string();
    tokio::task::spawn_blocking(move || f(Session::open(&state, &id)?))
        .await
        .unwrap_or_else(|e| Err(EnvdError::rpc(Code::Internal, format!("task failed: {e}"))))
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::File,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Other => FileType::Unspecified,
    }
}

/// Go's `FileMode.String()`, as envd reports permissions: type letters, then `rwxrwxrwx`.
pub fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::new();
    match kind {
        FileKind::Dir => s.push('d'),
        FileKind::Symlink => s.push('L'),
        _ => {}
    }
    if mode & 0o4000 != 0 {
        s.push('u');
    }
    if mode & 0o2000 != 0 {
        s.push('g');
    }
    if mode & 0o1000 != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// Lexically cleans an absolute path (`.`, `..`, repeated slashes).
pub fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// envd's path rules (see [`Session::resolve`]).
pub fn resolve_path(path: &str, user: &User, workdir: Option<&str>) -> Result<String, RpcError> {
    let path = if path.is_empty() {
        workdir.unwrap_or("")
    } else {
        path
    };
    let path = if let Some(rest) = path.strip_prefix('~') {
        if !rest.is_empty() && !rest.starts_with('/') {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!(
                    "failed to expand path '{path}' for user '{}': cannot expand user-specific home dir",
                    user.name
                ),
            ));
        }
        format!("{}/{rest}", user.home)
    } else {
        path.to_string()
    };
    if path.starts_with('/') && !path.starts_with("//") {
        // envd keeps an absolute path as given, apart from what `~` expansion cleaned.
        return Ok(
            if path.contains("/./") || path.contains("//") || path.contains("/../") {
                clean(&path)
            } else {
                path
            },
        );
    }
    Ok(clean(&format!("{}/{path}", user.home)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_paths_and_modes() {
        let u = Users::parse(
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
            "root:x:0:\napp:x:1000:\n",
        );
        let app = u.exec_user("app").unwrap();
        assert_eq!((app.uid, app.home.as_str()), (1000, "/home/app"));

        assert_eq!(resolve_path("a/b", &app, None).unwrap(), "/home/app/a/b");
        assert_eq!(resolve_path("~/x", &app, None).unwrap(), "/home/app/x");
        assert_eq!(resolve_path("", &app, Some("/work")).unwrap(), "/work");
        assert_eq!(resolve_path("", &app, None).unwrap(), "/home/app");
        assert_eq!(resolve_path("/a/../b", &app, None).unwrap(), "/b");
        assert_eq!(resolve_path("/tmp/x", &app, None).unwrap(), "/tmp/x");
        assert_eq!(
            resolve_path("~bob/x", &app, None).unwrap_err().code,
            Code::InvalidArgument
        );

        assert_eq!(permissions(FileKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(permissions(FileKind::Symlink, 0o777), "Lrwxrwxrwx");
        assert_eq!(permissions(FileKind::Dir, 0o1777), "dtrwxrwxrwx");
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
