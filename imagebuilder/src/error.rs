//! The image builder's error type.

use std::path::PathBuf;

/// Everything that can go wrong while pulling, importing, unpacking or building an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unsafe layer entry {path:?}: {why}")]
    UnsafeEntry { path: String, why: String },
    #[error("bad layer: {0}")]
    BadLayer(String),
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("registry: {0}")]
    Registry(String),
    #[error("bad image source: {0}")]
    BadSource(String),
    #[error("image {0:?} not found")]
    ImageNotFound(String),
    #[error("{file}:{line}: {msg}")]
    Dockerfile {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("build: {0}")]
    Build(String),
    #[error("RUN failed with {status} at {file}:{line}: {cmd}\n--- last output ---\n{output}")]
    RunFailed {
        file: String,
        line: usize,
        cmd: String,
        status: String,
        output: String,
    },
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] kiln_blockstore::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attaches what was being done and to which path to an io::Error.
pub(crate) trait IoCtx<T> {
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoCtx<T> for std::io::Result<T> {
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            what,
            path: path.into(),
            source,
        })
    }
}
