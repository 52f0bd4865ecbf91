//! kiln's own VMM as a runtime: VM processes and their directories ([`vms`]), snapshots of them
//! in the block store ([`snapshots`]), and the sandbox driver on top ([`MicrovmDriver`]).
//!
//! The VMM process is the `kiln` binary (`kiln vm run` / `kiln snapshot restore` in the
//! foreground run the VM in-process through [`vms::run_foreground`] and
//! [`vm_snapshots::restore_foreground`]); everything that starts one detached takes the executable
//! to run ([`vms::Launcher`]) and starts it as a helper from a typed spec
//! ([`crate::helpers`]), so this library never assumes which binary it is linked into, nor its
//! command line.

mod driver;
mod error;
pub mod vm_snapshots;
pub mod vms;

pub use driver::{connect_port, find_kernel, kvm_unsupported, Guest, MicrovmDriver};
pub use error::{Context, Error, Result};
