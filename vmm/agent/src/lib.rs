//! kiln guest agent: runs as PID 1 in a Linux guest and serves exec and file requests over
//! vsock (port [`protocol::AGENT_PORT`]). The same code serves a Unix socket for tests and
//! development. [`client`] is the host side.

pub mod client;
pub mod protocol;
pub mod server;
