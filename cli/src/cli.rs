//! What every subcommand shares: the kiln home, logging, and JSON or human output.

use std::path::{Path, PathBuf};

/// A command asked for what it cannot do as given (an option or command this mode has no
/// counterpart for): `kiln` exits with code 2, as for clap's usage errors.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// `--net-tap TAP[@NETNS]` (clap value parser shared by `kiln vm run` and `kiln snapshot`).
pub fn parse_nic(s: &str) -> Result<kiln_runtime::microvm::vms::NicSpec, String> {
    kiln_runtime::microvm::vms::NicSpec::parse(s, None)
}

/// The kiln home directory (KILN_HOME): the store, VMs, configuration.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `--home`/KILN_HOME if given, else /var/lib/kiln for root, else the XDG data dir.
    pub fn resolve(explicit: Option<PathBuf>) -> Home {
        let root = explicit.unwrap_or_else(|| {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                PathBuf::from("/var/lib/kiln")
            } else if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
                PathBuf::from(xdg).join("kiln")
            } else {
                let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
                PathBuf::from(home).join(".local/share/kiln")
            }
        });
        Home { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the block store lives.
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    /// How the runtime starts detached VMM processes: this very binary, over this home.
    pub fn launcher(&self) -> anyhow::Result<kiln_runtime::microvm::vms::Launcher> {
        use anyhow::Context;
        Ok(kiln_runtime::microvm::vms::Launcher {
            exe: std::env::current_exe().context("finding the kiln binary")?,
            home: self.root.clone(),
        })
    }

    /// Where per-VM directories (control socket, serial log, vsock sockets) live.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }
}

/// Logs go to stderr, filtered by KILN_LOG (e.g. `KILN_LOG=debug`, `KILN_LOG=blockstore=trace`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Prints `value` as pretty JSON on stdout (for `--json`).
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A progress bar on stderr when it is a terminal, hidden otherwise (scripts, CI, tests).
pub fn progress_bar(total_bytes: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
