//! Sandbox networking: one policy model ([`policy`]), one network per sandbox.
//!
//! Each sandbox gets a *router* network namespace `kiln-<id>` holding its guest-side
//! interface (a TAP `tap0` for a microVM, or the veth `gw0` whose peer `eth0` sits in a second
//! namespace `kiln-<id>-g` that gVisor's netstack takes over), the gateway and DNS address
//! 10.88.0.1 (the guest is always 10.88.0.2/30, so restores and forks need no readdressing),
//! an uplink veth `up0` to the host end `kiln<slot>` in kiln's own namespace, NAT out of
//! `up0`, and the egress policy as an nftables table. A small DNS proxy per sandbox answers on
//! 10.88.0.1:53 by the policy. Deleting the namespaces deletes every interface and rule.

pub mod dns;
mod ns;
pub mod policy;
pub mod proxy;
mod rules;
mod setup;

pub use policy::{Dest, DestError, NetworkPolicy};
pub use setup::{
    apply_policy, attach, cleanup_stale_slots, detach, guest_namespace, protect, reset_guest,
    Attachment, GuestKind,
};

pub const GUEST_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 88, 0, 2);
pub const GATEWAY_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 88, 0, 1);
pub const GUEST_PREFIX: u8 = 30;
/// Fixed MACs: every sandbox is its own L2 segment, and a restored guest finds its gateway
/// where it left it.
pub const GUEST_MAC: &str = "02:6b:69:6c:6e:02";
pub const GATEWAY_MAC: &str = "02:6b:69:6c:6e:01";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("no free network slot (all {0} in use)")]
    NoSlot(u32),
    #[error("sandbox network: {0}")]
    Invalid(String),
    /// kiln's namespace could not be prepared (the first attach of a process says why).
    #[error("{0}")]
    Host(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |err| Error::Io { what, err }
}
