//! kiln guest agent: the init (PID 1) of a sandbox, over vsock in a Linux microVM (port
//! [`protocol::AGENT_PORT`]) or a Unix socket in gVisor and in tests. It is the sandbox's data
//! plane: processes (exec with streamed output, ttys, users, a process table with bounded
//! output buffers for reconnects, signals, stdin), files (atomic writes, reads, stat, listings,
//! directory changes, inotify watches), TCP ports (`Dial`), and lifecycle (health, the VM
//! generation after a restore or fork). [`protocol`] documents the wire format, [`server`]
//! serves it, [`client`] is the host side. [`genid`] reseeds the RNG and sets the clock when
//! a microVM is restored or forked.

pub mod children;
pub mod client;
pub mod genid;
pub mod gvisor_init;
pub mod limits;
pub mod protocol;
pub mod server;
pub mod users;
