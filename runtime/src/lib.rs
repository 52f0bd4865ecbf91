//! kiln's host runtime: sandboxes on this host.
//!
//! A sandbox is an image (or a snapshot of a sandbox) run by one of two drivers behind the small
//! [`Runtime`] trait: `microvm` (kiln's VMM; needs KVM with hardware virtualization and a Linux
//! guest kernel) and `gvisor` (`runsc`; any Linux host). Inside both, the kiln agent is the
//! sandbox's init and its data plane (processes, files, ports), reached over vsock or a Unix
//! socket with one protocol (`kiln_agent::protocol`).
//!
//! [`Sandboxes`] owns the records and the lifecycle (create, pause, resume, snapshot, fork,
//! kill, timeouts); the CLI and the daemon are thin over it. Each sandbox runs in its own
//! processes, so the caller exiting or crashing takes no sandbox with it. Snapshots of either
//! runtime live in the block store ([`snapshot`]) and travel through its S3 remote.

mod error;
pub mod fs_state;
pub mod gvisor;
mod gvisor_disk;
pub mod helpers;
pub mod holds;
pub mod hostfs;
pub mod microvm;
mod pending_network;
pub mod ports;
pub mod record;
pub mod rootfs;
pub mod sandbox_snapshot;
mod sandboxes;
pub mod start_cmd;

pub use error::{Action, Error, Result};
pub use kiln_network::{Dest, NetworkPolicy};
pub use pending_network::PendingNetwork;
pub use record::{
    Access, OnTimeout, Op, OpKind, PauseMode, Phase, Proc, ProcessDefaults, ResumeMode,
    RuntimeKind, SandboxDir, SandboxRecord, State, StateKind,
};
pub use sandboxes::{
    default_cpus, default_network, fork_restores_at_once, Adoption, CreateSpec, ExecOptions,
    ForkSpec, Sandboxes, Source, DEFAULT_MEMORY_MIB, MAX_DISK_MIB, MIN_DEFAULT_DISK_MIB,
};

use kiln_blockstore::BlobId;
use kiln_imagebuilder::image::ImageRecord;
use std::os::unix::net::UnixStream;

/// What a driver saved of a sandbox: its own description of the state (serialized into the
/// snapshot record) and every blob that description refers to, which the snapshot keeps from
/// gc and pushes to a remote.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub state: serde_json::Value,
    pub blobs: Vec<BlobId>,
}

/// What a running sandbox uses on the host right now (for metrics): CPU time since it was
/// started or restored, memory, and its disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of its processes since its processes started, in ns.
    pub cpu_ns: u64,
    /// Bytes of memory in use (the sandbox's own memory, not page cache).
    pub mem_used: u64,
    /// Bytes of page cache (its files' pages).
    pub mem_cache: u64,
    /// Bytes used and in all on its disk (0 and 0 when the driver has no disk to measure).
    pub disk_used: u64,
    pub disk_total: u64,
}

/// What an operation whose caller died came to, once the driver finished or undid its part
/// ([`Runtime::recover`]).
#[derive(Debug)]
pub enum Recovered {
    /// The sandbox runs: the operation undone, or a live snapshot's restore in place redone.
    Running,
    /// A pause's checkpoint completed and is in the store; nothing of the sandbox runs.
    Checkpointed(Checkpoint),
    /// Nothing of the sandbox runs: an interrupted restore undone.
    Stopped,
    /// A step still runs on its own (a detached helper that did not end in time): ask again
    /// later.
    Pending,
    /// The sandbox's processes are gone and no checkpoint of them completed.
    Lost(String),
}

/// One way of running sandboxes. Drivers keep their own state in `rec.driver` and in files of
/// the sandbox's directory; the caller holds the sandbox's lock and saves the record. Steps of
/// a checkpoint that a dying caller could leave half-done are recorded as they start
/// ([`SandboxDir::enter`] with `rec.op`'s [`Phase`]), so [`Runtime::recover`] knows where
/// to pick up.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// `Err(why)` when this host cannot run this driver's sandboxes.
    fn available(&self) -> std::result::Result<(), String>;

    /// Boots a fresh sandbox of `image` in `dir`; sets `rec.agent` and `rec.driver`. Returns
    /// when the agent answers; on error everything it started is gone again. The sandbox's
    /// network is being made meanwhile (`net`, [`PendingNetwork::none`] without one): a driver
    /// that can prepare meanwhile waits for it ([`PendingNetwork::finish`]) only before the
    /// sandbox's processes start; on success `rec.net` holds it.
    fn start(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        image: &ImageRecord,
        net: &PendingNetwork,
    ) -> Result<()>;

    /// Saves memory, device state and file-system changes into the store. With `stop` the
    /// sandbox's processes end once the state is durable (pause); without, it runs on. On
    /// success `rec.op` is in [`Phase::Saved`] with the checkpoint.
    fn checkpoint(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        stop: bool,
    ) -> Result<Checkpoint>;

    /// A live checkpoint for forks: as `checkpoint(dir, rec, false)`, except that a driver
    /// which stops the sandbox to checkpoint it and restores it to run on may leave that
    /// restore to [`Runtime::run_on`], so the caller can run it beside the forks' own.
    /// Returns whether it did (the sandbox is then stopped, `rec.op` in [`Phase::Restore`]).
    fn checkpoint_for_forks(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
    ) -> Result<(Checkpoint, bool)> {
        self.checkpoint(dir, rec, false).map(|cp| (cp, false))
    }

    /// Runs on a sandbox that [`Runtime::checkpoint_for_forks`] left stopped: restores it
    /// from that checkpoint and puts `rec.op` in [`Phase::Saved`].
    fn run_on(&self, _dir: &SandboxDir, _rec: &mut SandboxRecord) -> Result<()> {
        Ok(())
    }

    /// Runs `rec` (a new sandbox, or a paused one) from a checkpoint of a sandbox of `image`.
    /// Returns when the agent (or guest) answers. `net` as for [`Runtime::start`].
    fn restore(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        checkpoint: &Checkpoint,
        image: &ImageRecord,
        net: &PendingNetwork,
    ) -> Result<()>;

    /// Ends the sandbox's processes and frees what it holds on the host. Idempotent.
    fn kill(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<()>;

    /// `None` while the sandbox's processes run; `Some(cause)` once they are gone.
    fn exited(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Option<String>;

    /// A fresh connection to the sandbox's agent, ready for one request.
    fn connect(&self, dir: &SandboxDir, rec: &SandboxRecord) -> Result<UnixStream>;

    /// The live checkpoint just made of the sandbox in `dir` will not be restored again by
    /// its caller (a snapshot is named, a fork's sandboxes run): files the driver kept on the
    /// host for those restores may go.
    fn checkpoint_done(&self, _dir: &SandboxDir) {}

    /// Whether a sandbox restored from a checkpoint goes on reading its blobs while it runs
    /// (memory paged in lazily), so they must be kept until it is gone or saved again.
    fn reads_checkpoint_while_running(&self) -> bool {
        false
    }

    /// What the running sandbox uses now; `None` when the driver cannot tell (or nothing of
    /// it runs).
    fn usage(&self, _dir: &SandboxDir, _rec: &SandboxRecord) -> Option<Usage> {
        None
    }

    /// `op` (a pause, resume, snapshot or fork) was under way when its caller died: finish
    /// the driver's part or undo it, waiting (bounded) for a detached step that still runs.
    /// A checkpoint that completed is kept (stored for a pause, restored in place for a live
    /// snapshot); a restore is undone. May change `rec.driver` and `rec.agent`; the caller
    /// applies the outcome to the record.
    fn recover(&self, dir: &SandboxDir, rec: &mut SandboxRecord, op: &Op) -> Result<Recovered>;

    /// The image's own tree on the host that the running sandbox's root file system is made
    /// of (its changes are what a filesystem-only pause keeps); `None`: the driver has none.
    fn image_tree(&self, _rec: &SandboxRecord) -> Option<std::path::PathBuf> {
        None
    }
}

/// This host's sandboxes with every driver, in order of preference (microvm, then gvisor):
/// the first one this host can run is the default. `vmm_exe` is the binary that runs a VMM
/// process (the `kiln` CLI).
pub fn host_sandboxes(
    home: &std::path::Path,
    store: kiln_blockstore::Store,
    vmm_exe: std::path::PathBuf,
) -> Sandboxes {
    let drivers: Vec<Box<dyn Runtime>> = vec![
        Box::new(microvm::MicrovmDriver::new(
            store.clone(),
            vmm_exe.clone(),
            None,
        )),
        Box::new(gvisor::GvisorDriver::new(
            store.clone(),
            home,
            gvisor::GvisorConfig::from_env(),
        )),
    ];
    Sandboxes::new(home, store, drivers).with_dns_proxy(helpers::dns_proxy_command(&vmm_exe))
}
