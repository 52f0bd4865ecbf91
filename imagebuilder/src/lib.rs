//! kiln's image builder: OCI images and Dockerfiles in, deterministic ext4 disk blobs out.
//!
//! - [`oci`]: `pull` from registries (oci-client), `import` of OCI layouts and docker-archives.
//! - [`layer`]: the safe layer applier (whiteouts, links, devices, xattrs; no escapes) and the
//!   directory diff that turns a build step into a layer tar.
//! - [`ext4`]: deterministic `mkfs.ext4 -d` images.
//! - [`image`]: image records and names in the block store.
//! - [`dockerfile`], [`build`], [`step_jail`]: Dockerfile builds with a step cache in the store.

mod add;
pub mod build;
mod build_cache;
pub mod dockerfile;
mod error;
pub mod ext4;
pub mod image;
pub mod layer;
mod lru;
pub mod oci;
mod stage;
pub mod step_jail;
mod stepdisk;
pub mod vm_isolation;

pub use error::{Error, Result};
pub use image::{ImageConfig, ImageRecord, ImageSummary};
