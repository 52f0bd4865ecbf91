//! What this host offers Linux guests, asked in one place by every layer that boots them (the
//! microvm runtime, the image builder's VM isolation, tests): whether /dev/kvm is PVM (stock
//! Linux guests cannot boot there; kiln's freestanding test guest can) and which guest kernel to
//! boot (`--kernel`, else `KILN_GUEST_KERNEL`, else the [`crate::kernel_cache`]); and where
//! the static kiln agent is (the init of every sandbox and guest, gVisor's included).

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

/// How to get a static agent, said by every error of [`static_agent`].
const AGENT_HOW: &str = "build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build \
    -p kiln-agent --target x86_64-unknown-linux-gnu` and set KILN_AGENT to it";

/// The static kiln agent: `KILN_AGENT`, else a static `kiln-agent` beside `exe` (the running
/// `kiln`), else the static build cargo makes with `--target x86_64-unknown-linux-gnu` beside
/// `exe`'s profile directory. It runs as init on arbitrary images: a dynamically linked one
/// is refused.
pub fn static_agent(exe: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KILN_AGENT").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return match is_static_elf(&p) {
            Ok(true) => Ok(p),
            Ok(false) => Err(format!(
                "KILN_AGENT={} is dynamically linked; images may lack its libraries: {AGENT_HOW}",
                p.display()
            )),
            Err(e) => Err(format!("KILN_AGENT={}: {e}; {AGENT_HOW}", p.display())),
        };
    }
    let dir = exe.parent().unwrap_or(Path::new("."));
    // target/<profile>/kiln (or target/<profile>/deps/<test> for test binaries).
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let mut candidates = vec![dir.join("kiln-agent")];
    if let (Some(profile), Some(target)) = (profile_dir.file_name(), profile_dir.parent()) {
        candidates.push(
            target
                .join("x86_64-unknown-linux-gnu")
                .join(profile)
                .join("kiln-agent"),
        );
    }
    candidates
        .into_iter()
        .find(|p| matches!(is_static_elf(p), Ok(true)))
        .ok_or_else(|| format!("no statically linked kiln-agent found: {AGENT_HOW}"))
}

/// An x86-64 ELF without a program interpreter (PT_INTERP) needs no shared libraries. Reads
/// the header and the program headers only (this runs on every start of the CLI).
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 64-bit ELF file");
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).map_err(|_| bad())?;
    if &h[..4] != b"\x7fELF" || h[4] != 2 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(h[0x20..0x28].try_into().unwrap());
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    if phentsize < 4 {
        return Err(bad());
    }
    let mut table = vec![0u8; phentsize * phnum];
    f.read_exact_at(&mut table, phoff).map_err(|_| bad())?;
    Ok(!table
        .chunks_exact(phentsize)
        .any(|e| u32::from_le_bytes(e[..4].try_into().unwrap()) == 3))
}

#[cfg(test)]
mod agent_tests {
    use super::*;

    #[test]
    fn static_elfs_are_told_from_dynamic_ones_and_other_files() {
        // This test binary is dynamically linked (it has an interpreter).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let tmp = tempfile::tempdir().unwrap();
        let text = tmp.path().join("script");
        std::fs::write(&text, b"#!/bin/sh\necho not an ELF\n").unwrap();
        assert!(is_static_elf(&text).is_err());
        // A minimal static ELF: the header, and one PT_LOAD program header.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        let file = tmp.path().join("static");
        std::fs::write(&file, &elf).unwrap();
        assert!(is_static_elf(&file).unwrap());
        // Its program header table cut short: refused, not read past the end.
        std::fs::write(&file, &elf[..80]).unwrap();
        assert!(is_static_elf(&file).is_err());
    }
}
