//! Copy-on-write overlays over blobs.

use std::path::Path;

use crate::error::Result;
use crate::id::BlobId;
use crate::store::Store;

/// A writable view of a blob: writes land in a sparse scratch file in the overlay's directory
/// plus a persisted dirty map of 4 KiB sectors; reads merge scratch and base. `Send + Sync`;
/// all methods take `&self` so VMM I/O threads can share one overlay.
pub struct Overlay {
    _store: Store,
}

impl Overlay {
    pub(crate) fn create(
        _store: &Store,
        _base: Option<&BlobId>,
        _size: u64,
        _dir: &Path,
    ) -> Result<Overlay> {
        todo!("overlay create")
    }

    pub(crate) fn open(_store: &Store, _dir: &Path) -> Result<Overlay> {
        todo!("overlay open")
    }

    /// Size of the virtual disk in bytes.
    pub fn len(&self) -> u64 {
        todo!()
    }

    /// True for a zero-length overlay.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read at `off`; returns bytes read (short only at the end).
    pub fn read_at(&self, _off: u64, _buf: &mut [u8]) -> Result<usize> {
        todo!()
    }

    /// Write all of `data` at `off` (must lie within `len()`).
    pub fn write_at(&self, _off: u64, _data: &[u8]) -> Result<()> {
        todo!()
    }

    /// Make every completed write durable (data and dirty map).
    pub fn flush(&self) -> Result<()> {
        todo!()
    }

    /// Turn the current contents into a new blob sharing every unchanged chunk with the base.
    /// The overlay stays usable and is rebased onto the new blob.
    pub fn commit(&self) -> Result<BlobId> {
        todo!()
    }

    /// The blob the overlay currently sits on (changes after `commit`).
    pub fn base(&self) -> Option<BlobId> {
        todo!()
    }

    /// Delete the overlay's scratch files and release its pin on the base.
    pub fn discard(self) -> Result<()> {
        todo!()
    }
}
