//! kiln guest agent: runs as PID 1 in a Linux guest and serves exec and file requests over
//! vsock (port [`protocol::AGENT_PORT`]). The same code serves a Unix socket for tests and
//! development. [`client`] is the host side. [`genid`] reseeds the RNG and sets the clock when
//! the VM is restored or forked.

pub mod client;
pub mod genid;
pub mod protocol;
pub mod server;
