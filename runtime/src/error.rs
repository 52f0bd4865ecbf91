//! The runtime layer's error type: each cause said once, the sandbox named where it matters.

/// What can go wrong creating, driving or snapshotting a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The io::Error is part of the message, not a `source`, so a chain printer says it once.
    #[error("{what} {}: {err}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] kiln_blockstore::Error),
    #[error(transparent)]
    Image(#[from] kiln_imagebuilder::Error),
    #[error("no sandbox {0:?} (see `kiln sandbox ls`)")]
    NotFound(String),
    #[error("no sandbox snapshot {0:?} (see `kiln sandbox snapshots`)")]
    SnapshotNotFound(String),
    #[error("a sandbox named {0:?} exists already")]
    NameTaken(String),
    #[error("sandbox {id} is {state}: {}", action.needs())]
    WrongState {
        id: String,
        state: crate::record::StateKind,
        action: Action,
    },
    #[error("sandbox {0} was created without a network device")]
    NoNetwork(String),
    #[error("sandbox {id}: the template's ready command {cmd:?} did not succeed within {secs} s (last: {last})")]
    NotReady {
        id: String,
        cmd: String,
        secs: u64,
        last: String,
    },
    #[error("sandbox {0} is busy with another operation (try again)")]
    Busy(String),
    #[error("sandbox {id} cannot be adopted into this home: {why}")]
    Adopt { id: String, why: String },
    #[error("runtime {0} cannot run on this host: {1}")]
    Unavailable(crate::RuntimeKind, String),
    #[error(
        "snapshot was taken under the {snapshot} runtime and cannot be restored under {wanted}"
    )]
    RuntimeMismatch {
        snapshot: crate::RuntimeKind,
        wanted: crate::RuntimeKind,
    },
    #[error("the agent in sandbox {id} did not answer within {secs} s\n--- log tail ---\n{tail}")]
    AgentTimeout { id: String, secs: u64, tail: String },
    #[error("{what} failed: {detail}")]
    Driver { what: String, detail: String },
    #[error(transparent)]
    Agent(#[from] kiln_agent::client::ClientError),
    #[error("invalid: {0}")]
    Invalid(String),
    /// A filesystem-only pause (or a reboot) refused: the sandbox's files pass one of
    /// [`crate::fs_state`]'s limits (said in the message), or its agent answered nonsense.
    #[error("the sandbox's files cannot be saved: {0}")]
    FilesNotSaved(String),
    #[error(transparent)]
    Network(#[from] kiln_network::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What was asked of a sandbox in the wrong state ([`Error::WrongState`]): callers that
/// speak another API (E2B's) word their answer by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Fork,
    Snapshot,
    /// Reaching its agent (exec, files, ports).
    Connect,
    /// Changing its egress policy at once (E2B's network update).
    ChangeNetwork,
}

impl Action {
    /// What the action needs, as the error says it.
    pub fn needs(self) -> &'static str {
        match self {
            Action::Pause => "only a running sandbox can be paused",
            Action::Resume => "only a paused sandbox can be resumed",
            Action::Fork => "only a running sandbox can be forked",
            Action::Snapshot => "only a running sandbox can be snapshotted",
            Action::Connect => "it must be running",
            Action::ChangeNetwork => "resume it to change its network",
        }
    }
}

/// Attaches the operation and path to an io::Error.
pub(crate) trait IoCtx<T> {
    fn ctx(self, what: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoCtx<T> for std::io::Result<T> {
    fn ctx(self, what: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|err| Error::Io {
            what,
            path: path.to_path_buf(),
            err,
        })
    }
}
