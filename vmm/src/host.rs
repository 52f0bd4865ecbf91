//! What this host offers Linux guests, asked in one place by every layer that boots them (the
//! microvm runtime, the image builder's VM isolation, tests): whether /dev/kvm is PVM (stock
//! Linux guests cannot boot there; kiln's freestanding test guest can) and which guest kernel to
//! boot (`--kernel`, else `KILN_GUEST_KERNEL`, else the [`crate::kernel_cache`]).

use std::path::{Path, PathBuf};

/// Whether /dev/kvm is PVM's (the `kvm_pvm` module is loaded).
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
        || std::fs::read_to_string("/proc/modules")
            .map(|m| m.lines().any(|l| l.starts_with("kvm_pvm ")))
            .unwrap_or(false)
}

/// Why no guest kernel was found; each caller words its own hint.
#[derive(Debug, thiserror::Error)]
pub enum KernelNotFound {
    /// `--kernel` or `KILN_GUEST_KERNEL` named a path that is no file.
    #[error("{what} {}: no such file", path.display())]
    Missing { what: &'static str, path: PathBuf },
    /// Nothing given and nothing cached in `cache`.
    #[error("no guest kernel in {}", cache.display())]
    NoneCached { cache: PathBuf },
}

/// The guest kernel: `explicit` (`--kernel`), else `KILN_GUEST_KERNEL`, else a cached
/// `scripts/linux-guest/build-kernel` result.
pub fn guest_kernel(explicit: Option<&Path>) -> Result<PathBuf, KernelNotFound> {
    let given = explicit
        .map(|p| ("--kernel", p.to_path_buf()))
        .or_else(|| std::env::var_os("KILN_GUEST_KERNEL").map(|p| ("KILN_GUEST_KERNEL", p.into())));
    if let Some((what, path)) = given {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(KernelNotFound::Missing { what, path })
        };
    }
    crate::kernel_cache::find().ok_or_else(|| KernelNotFound::NoneCached {
        cache: crate::kernel_cache::dir(),
    })
}
