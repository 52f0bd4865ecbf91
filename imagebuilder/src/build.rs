//! Dockerfile builds.
use blockstore::{BlobId, Store};
use serde::{Deserialize, Serialize};

pub(crate) const CACHE_PREFIX: &str = "cache:";

/// A cached step result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub layer: Option<BlobId>,
}

impl StepRecord {
    pub(crate) fn referenced(&self) -> Vec<BlobId> {
        self.layer.into_iter().collect()
    }
}

pub(crate) fn get_step(_store: &Store, _id: &BlobId) -> crate::Result<StepRecord> {
    Err(crate::Error::Invalid("x".into()))
}
