//! Where `scripts/linux-guest/build-kernel` keeps guest kernels: `KILN_KERNEL_CACHE`, default
//! `~/.cache/kiln/kernels/<version>-<config hash>/vmlinux`.

use std::path::PathBuf;

/// The cache directory.
pub fn dir() -> PathBuf {
    std::env::var_os("KILN_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/kernels")
        })
}

/// The first cached `vmlinux`, if any.
pub fn find() -> Option<PathBuf> {
    std::fs::read_dir(dir()).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok())
            .map(|e| e.path().join("vmlinux"))
            .find(|p| p.is_file())
    })
}
