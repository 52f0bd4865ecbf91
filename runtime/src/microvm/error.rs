//! The microvm layer's errors. Each variant's message already contains its cause, and no
//! variant hands that cause out again as `source()`: printed as an error chain (`{:#}`, as the
//! CLI does) every cause appears once. (snapshotter's `Store` variants show the store error in
//! their message *and* return it as their source, which printed `block store: not found: X:
//! not found: X`; wrapping them here ends the chain at their message.)

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {}: {err}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("{0}")]
    Store(kiln_blockstore::Error),
    #[error("{0}")]
    Snapshot(kiln_snapshotter::vm::SnapError),
    #[error("{0}")]
    Vmm(kiln_vmm::Error),
    /// Bad input (an id, a size, a missing file).
    #[error("{0}")]
    Invalid(String),
    #[error("no VM {0:?} (see `kiln vm ls`)")]
    NoVm(String),
    #[error("VM {0} is not running")]
    NotRunning(String),
    /// A control-socket request failed.
    #[error("VM {vm}: {detail}")]
    Control { vm: String, detail: String },
    /// Something else failed, as said.
    #[error("{0}")]
    Failed(String),
    /// `err` while doing `context`.
    #[error("{context}: {err}")]
    Context { context: String, err: Box<Error> },
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<kiln_blockstore::Error> for Error {
    fn from(e: kiln_blockstore::Error) -> Self {
        Error::Store(e)
    }
}
impl From<kiln_snapshotter::vm::SnapError> for Error {
    fn from(e: kiln_snapshotter::vm::SnapError) -> Self {
        Error::Snapshot(e)
    }
}
impl From<kiln_snapshotter::record::RecordError> for Error {
    fn from(e: kiln_snapshotter::record::RecordError) -> Self {
        Error::Snapshot(e.into())
    }
}
impl From<kiln_snapshotter::memory::MemoryError> for Error {
    fn from(e: kiln_snapshotter::memory::MemoryError) -> Self {
        Error::Snapshot(e.into())
    }
}
impl From<kiln_vmm::Error> for Error {
    fn from(e: kiln_vmm::Error) -> Self {
        Error::Vmm(e)
    }
}
impl From<kiln_snapshotter::lazy::LazyError> for Error {
    fn from(e: kiln_snapshotter::lazy::LazyError) -> Self {
        Error::Snapshot(e.into())
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        let path = path.to_path_buf();
        move |err| Error::Io { what, path, err }
    }
}

/// Wraps an error with what was being done.
pub trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.into(),
            err: Box::new(e.into()),
        })
    }
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f(),
            err: Box::new(e.into()),
        })
    }
}

impl From<Error> for crate::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(s) => crate::Error::Invalid(s),
            e => crate::Error::Driver {
                what: "microvm".into(),
                detail: e.to_string(),
            },
        }
    }
}
