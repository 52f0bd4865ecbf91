//! The helper processes the runtime starts, and the one place that starts them.
//!
//! A helper is the `kiln` binary (the runtime is given its path, never its grammar) run as
//! `<exe> __helper <dir>`: everything it needs is a typed [`HelperSpec`], written atomically as
//! `helper.json` into the helper's own directory before it starts (as Firecracker's
//! `--config-file`). The CLI's hidden `__helper` entry only reads the spec and calls the library
//! function it names, so the CLI's public command line is no contract of this layer.
//!
//! Helpers: a VMM process running one VM ([`HelperSpec::Vm`], what `kiln vm run` does in the
//! foreground), one restoring a VM snapshot ([`HelperSpec::VmRestore`]), and a sandbox
//! network's DNS proxy ([`HelperSpec::DnsProxy`], whose settings are the network crate's
//! `dns.json` beside the spec).

use crate::error::{Error, IoCtx, Result};
use crate::microvm::vm_snapshots::RestoreOptions;
use crate::microvm::vms::RunOptions;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The hidden CLI argument that runs a helper: `<exe> __helper <dir>`.
pub const ENTRY: &str = "__helper";
/// The spec's file name in the helper's directory.
pub const SPEC_FILE: &str = "helper.json";

/// What a helper process is to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "helper", rename_all = "snake_case")]
pub enum HelperSpec {
    /// Run the VM of `options` in this process (its directory is `options.dir`), with the
    /// store (and remotes) of the kiln home `home`.
    Vm { home: PathBuf, options: RunOptions },
    /// Restore the VM snapshot of `options` in this process.
    VmRestore {
        home: PathBuf,
        options: RestoreOptions,
    },
    /// Serve the DNS proxy of the sandbox network whose state directory holds the spec.
    DnsProxy,
}

/// Writes `spec` as `dir/helper.json` (temp file renamed over it; `dir` is created).
pub fn write_spec(dir: &Path, spec: &HelperSpec) -> Result<()> {
    std::fs::create_dir_all(dir).ctx("create", dir)?;
    let bytes = serde_json::to_vec_pretty(spec).expect("helper spec serializes");
    crate::record::write_atomic(&dir.join(SPEC_FILE), &bytes, false)
}

/// Reads the spec of the helper whose directory is `dir`.
pub fn read_spec(dir: &Path) -> Result<HelperSpec> {
    let path = dir.join(SPEC_FILE);
    let bytes = std::fs::read(&path).ctx("read", &path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("helper spec {}: {e}", path.display())))
}

/// The command that runs the helper of `dir` (its spec written there first; `dir` absolute,
/// so [`processes_of`] finds it).
pub fn command(exe: &Path, dir: &Path) -> Command {
    let mut c = Command::new(exe);
    c.arg(ENTRY).arg(dir);
    c
}

/// Live helper processes of `dir` (by their command line: a recorded pid may be stale).
pub fn processes_of(dir: &Path) -> Vec<u32> {
    let Some(abs) = std::path::absolute(dir).ok() else {
        return Vec::new();
    };
    let Some(abs) = abs.to_str() else {
        return Vec::new();
    };
    crate::record::processes_with(&[ENTRY, abs])
}

/// The DNS proxy command the network crate starts, its state directory appended (where
/// [`dns_proxy_spec`] put the spec).
pub fn dns_proxy_command(exe: &Path) -> Vec<OsString> {
    vec![exe.as_os_str().to_owned(), ENTRY.into()]
}

/// Writes the DNS proxy's spec into the sandbox network's state directory.
pub fn dns_proxy_spec(state: &Path) -> Result<()> {
    write_spec(state, &HelperSpec::DnsProxy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_its_directory() {
        let d = tempfile::tempdir().unwrap();
        let mut o = RunOptions::new("vm1", d.path().join("vm1"), "/boot/vmlinux");
        o.disks = vec!["/x.img".into(), "image:blob".into()];
        let spec = HelperSpec::Vm {
            home: d.path().into(),
            options: o,
        };
        write_spec(d.path(), &spec).unwrap();
        match read_spec(d.path()).unwrap() {
            HelperSpec::Vm { home, options } => {
                assert_eq!(home, d.path());
                assert_eq!(options.disks, ["/x.img", "image:blob"]);
                assert_eq!(options.mem_mib, 128);
            }
            other => panic!("{other:?}"),
        }
        write_spec(d.path(), &HelperSpec::DnsProxy).unwrap();
        assert!(matches!(read_spec(d.path()).unwrap(), HelperSpec::DnsProxy));
        let c = command(Path::new("/bin/kiln"), d.path());
        let args: Vec<_> = c.get_args().collect();
        assert_eq!(
            args,
            [OsString::from(ENTRY).as_os_str(), d.path().as_os_str()]
        );
    }
}
