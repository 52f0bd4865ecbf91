//! virtio-vsock with Firecracker's host side: guest stream sockets become Unix stream
//! connections on the host.
//!
//! - Host to guest: connect to the device's Unix socket (`uds_path`), write `CONNECT <port>\n`;
//!   once the guest accepts, the device answers `OK <host_port>\n` and the stream carries the
//!   connection's bytes both ways.
//! - Guest to host: a guest connection to CID 2, port P, becomes a connection to the Unix socket
//!   `<uds_path>_<P>` (which a host program listens on).
//! - Closing: a guest that shuts down its sending side (SHUTDOWN with SEND) half-closes the host
//!   socket once its bytes are written (the host reads end of stream and can still answer); end
//!   of stream from the host ends the connection (a Unix socket cannot tell a half-close from a
//!   close, so the guest is told both sides are done, as Firecracker does).
//!
//! One worker thread per device multiplexes the queues and every host socket with epoll (see
//! [`muxer`]). A misbehaving guest gets its packets dropped or its connections reset; nothing it
//! writes can stop the worker or reach outside guest memory.
//!
//! Pause (deactivate/activate) keeps connections. A device restored from a snapshot (its
//! `Persist::restore`, see [`persist`]) sends the guest a TRANSPORT_RESET event when activated: host connections do not survive a
//! snapshot, so the guest must drop its own. Host connections made meanwhile wait (unread) until
//! the guest has handled that event (see `muxer::ResetAck`), so they are not dropped with it.

mod muxer;
pub mod packet;
mod persist;

pub use persist::VsockState;

use super::persist::DeviceState;
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use crate::persist::Persist;
use muxer::{Muxer, Worker};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Queue size for rx, tx and event queues.
pub const QUEUE_SIZE: u16 = 256;

/// Errors setting up a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock guest CID {0} is reserved (use 3 or more)")]
    BadCid(u64),
    #[error("vsock socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    /// Connections and the listener, kept between activations (pause/resume).
    muxer: Option<Muxer>,
    worker: Option<(JoinHandle<Worker>, EventFd)>,
    reset_on_activate: bool,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path` (a stale socket file there
    /// is replaced).
    pub fn new(cid: u64, uds_path: impl AsRef<Path>) -> Result<Vsock, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cid));
        }
        let uds_path = uds_path.as_ref().to_path_buf();
        let listener = bind(&uds_path)?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.clone(),
            muxer: Some(Muxer::new(cid, uds_path, listener)),
            worker: None,
            reset_on_activate: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn stop_worker(&mut self) -> Option<Vec<Queue>> {
        let (handle, stop) = self.worker.take()?;
        let _ = stop.write(1);
        match handle.join() {
            Ok(worker) => {
                let (muxer, queues) = worker.into_parts();
                self.muxer = Some(muxer);
                Some(queues)
            }
            Err(_) => {
                tracing::error!("vsock worker panicked; connections lost");
                None
            }
        }
    }
}

fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VsockError::NotASocket(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|e| VsockError::Bind(path.to_path_buf(), e))?;
    l.set_nonblocking(true)
        .map_err(|e| VsockError::Bind(path.to_path_buf(), e))?;
    Ok(l)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Failed("vsock already active".into()));
        }
        if ctx.queues.len() != 3 || ctx.queue_events.len() != 3 {
            return Err(ActivateError::Failed("vsock needs 3 queues".into()));
        }
        let muxer = self
            .muxer
            .take()
            .ok_or_else(|| ActivateError::Failed("vsock connection state lost".into()))?;
        let stop = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| ActivateError::Failed(format!("eventfd: {e}")))?;
        let stop2 = stop
            .try_clone()
            .map_err(|e| ActivateError::Failed(format!("eventfd: {e}")))?;
        let reset = std::mem::take(&mut self.reset_on_activate);
        let worker = Worker::new(ctx, muxer, stop2, reset).map_err(|(e, muxer)| {
            self.muxer = Some(*muxer);
            ActivateError::Failed(format!("vsock worker: {e}"))
        })?;
        let handle = std::thread::Builder::new()
            .name(format!("vsock-{}", self.cid))
            .spawn(move || worker.run())
            .map_err(|e| ActivateError::Failed(format!("spawning vsock worker: {e}")))?;
        self.worker = Some((handle, stop));
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        self.stop_worker()
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Vsock(self.save())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// The host side's client: opens a connection to guest port `port` through the device's Unix
/// socket (`CONNECT port`, then `OK ...`); the stream carries the connection's bytes after it.
pub fn connect_port(
    vsock: &Path,
    port: u32,
    timeout: std::time::Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(vsock)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the answer byte by byte: what follows it belongs to the caller.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = std::io::Read::read(&mut s, &mut b)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "vsock connection closed before OK",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(std::io::Error::other("vsock answer too long"));
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::other(format!(
            "vsock answered {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}
