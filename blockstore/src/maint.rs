//! Store maintenance: verify (and repair) and garbage collection.

use crate::error::Result;
use crate::store::{GcReport, Store, VerifyReport};

pub(crate) fn verify(_store: &Store, _repair: bool) -> Result<VerifyReport> {
    todo!("verify")
}

pub(crate) fn gc(_store: &Store, _remote_too: bool) -> Result<GcReport> {
    todo!("gc")
}
