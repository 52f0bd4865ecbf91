//! The block store's error type.

use std::path::PathBuf;

use crate::id::{BlobId, ChunkId};

/// Everything the block store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A chunk's bytes do not hash to its id (damaged on disk or in transit). No bytes of it
    /// are returned; `kiln store verify --repair` re-fetches it from the remote.
    #[error("integrity error: chunk {chunk} does not match its hash{}", .location.as_ref().map(|p| format!(" ({p})")).unwrap_or_default())]
    Integrity {
        chunk: ChunkId,
        location: Option<String>,
    },
    /// A chunk is referenced but neither stored locally nor obtainable from a remote.
    #[error("chunk {chunk} is missing locally and {reason}")]
    MissingChunk { chunk: ChunkId, reason: String },
    /// No blob or name matches.
    #[error("not found: {0}")]
    NotFound(String),
    /// A hex prefix matches several blobs.
    #[error("ambiguous blob prefix {prefix:?}: matches {count} blobs")]
    Ambiguous { prefix: String, count: usize },
    /// A manifest's bytes are not a valid manifest (or do not hash to the blob's id).
    #[error("corrupt manifest for blob {blob}: {reason}")]
    CorruptManifest { blob: BlobId, reason: String },
    /// An overlay directory is damaged or not an overlay.
    #[error("corrupt overlay at {path}: {reason}")]
    CorruptOverlay { path: PathBuf, reason: String },
    /// Invalid argument (bad chunk size, bad name, out-of-range write...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The operation needs a remote and none is configured.
    #[error("no remote configured")]
    NoRemote,
    /// The remote tier failed.
    #[error("remote: {0}")]
    Remote(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn remote(e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Remote(Box::new(e))
    }

    /// True when the error means "does not exist" (blob, name, chunk).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_) | Error::MissingChunk { .. })
    }
}

/// Attach an operation and path to an io::Result.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
