//! kiln's snapshotter: VM snapshots stored in the block store, restored lazily with
//! userfaultfd, diffed against a parent with the KVM dirty log, and forked.
//!
//! - [`lazy`]: guest memory whose pages a userfaultfd handler fills from a memory blob.
//! - [`mapping`]: owned host mappings (anonymous, or a file mapped copy-on-write for forks).

pub mod lazy;
pub mod mapping;
pub mod memory;
pub mod record;
pub mod vm;

pub use lazy::{LazyMemory, LazyOptions, LazyStats, PageSource, SourceError};
pub use mapping::{Mapping, PAGE_SIZE};
pub use memory::{DirtyPages, HostRegion, ImageSource, Layer, MemoryImage, MEMORY_CHUNK_SIZE};
