//! What a virtio-net device saves in a snapshot, and the NIC a VM is given.
//!
//! The guest's view is saved (its MAC; the transport saves negotiated features and queue
//! positions); the host side is not: a restored or forked VM gets the TAP (and namespace) its
//! caller names, never the one the snapshot was taken with, so two clones never share a TAP.

use super::tap::{Tap, TapError};
use super::Net;
use crate::persist::Persist;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address (02:xx:xx:xx:xx:xx style).
    pub fn random() -> MacAddr {
        let mut b = [0u8; 6];
        let got = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .is_ok();
        if !got {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64
                ^ u64::from(std::process::id());
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad = || format!("invalid MAC address {s:?} (want six hex bytes: 02:00:00:00:00:01)");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut b = [0u8; 6];
        for (o, p) in b.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if b[0] & 1 != 0 {
            return Err(format!("MAC address {s} is a multicast address"));
        }
        Ok(MacAddr(b))
    }
}

/// A VM's network interface: the host TAP backing it and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// TAP device name (attached if it exists, created otherwise).
    pub tap: String,
    /// Network namespace holding the TAP: a name (`/run/netns/NAME`) or a path
    /// (`/proc/PID/ns/net`); `None` = the VMM's own namespace.
    pub netns: Option<PathBuf>,
    /// Guest MAC; `None` = a random locally administered one (a restored VM keeps its saved MAC).
    pub mac: Option<MacAddr>,
}

impl NicSpec {
    /// Parses the CLI form `TAP[@NETNS]`.
    pub fn parse(s: &str, mac: Option<MacAddr>) -> Result<NicSpec, String> {
        let (tap, netns) = match s.split_once('@') {
            Some((t, ns)) if !ns.is_empty() => (t, Some(PathBuf::from(ns))),
            Some(_) => return Err(format!("{s:?}: empty network namespace after '@'")),
            None => (s, None),
        };
        super::tap::check_name(tap).map_err(|e| e.to_string())?;
        Ok(NicSpec {
            tap: tap.to_string(),
            netns,
            mac,
        })
    }

    /// The CLI form `TAP[@NETNS]`.
    pub fn arg(&self) -> String {
        match &self.netns {
            Some(ns) => format!("{}@{}", self.tap, ns.display()),
            None => self.tap.clone(),
        }
    }
}

/// Device state in a snapshot (`VirtioDeviceState::device` of a net device).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetState {
    pub mac: MacAddr,
    /// The TAP the snapshotted VM used (for information only: restores name their own).
    #[serde(default)]
    pub tap: Option<String>,
}

/// Why a NIC could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum NetRestoreError {
    #[error("the snapshot's guest has MAC {saved}; a restored guest keeps it (asked for {asked})")]
    MacChanged { saved: MacAddr, asked: MacAddr },
    #[error(transparent)]
    Tap(#[from] TapError),
}

impl Persist for Net {
    type State = NetState;
    /// The restored NIC's TAP; `None` = no host side (the guest's frames are dropped).
    type ConstructorArgs = Option<NicSpec>;
    type Error = NetRestoreError;

    fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            tap: self.tap_name().map(str::to_string),
        }
    }

    fn restore(spec: Option<NicSpec>, s: &NetState) -> Result<Net, NetRestoreError> {
        let tap = match &spec {
            Some(n) => {
                if let Some(asked) = n.mac.filter(|m| *m != s.mac) {
                    return Err(NetRestoreError::MacChanged {
                        saved: s.mac,
                        asked,
                    });
                }
                Some(Tap::open(&n.tap, n.netns.as_deref())?)
            }
            None => {
                tracing::warn!(mac = %s.mac, "restored NIC has no TAP: its frames are dropped");
                None
            }
        };
        Ok(Net::with_tap(tap, s.mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::persist::assert_round_trip;
    use crate::devices::virtio::VirtioDevice;

    #[test]
    fn round_trip() {
        // Without a TAP (opening one needs CAP_NET_ADMIN and a namespace: see tests/vm_net.rs).
        let mac: MacAddr = "02:00:00:00:00:07".parse().unwrap();
        let n = Net::with_tap(None, mac);
        let back = assert_round_trip(&n, None);
        // The guest reads the same MAC.
        let (mut c1, mut c2) = ([0u8; 6], [0u8; 6]);
        n.read_config(0, &mut c1);
        back.read_config(0, &mut c2);
        assert_eq!(c1, c2);
        assert_eq!(c2, mac.0);
    }

    #[test]
    fn restore_keeps_the_mac() {
        let n = Net::with_tap(None, "02:00:00:00:00:07".parse().unwrap());
        let spec = NicSpec::parse("tap0", Some("02:00:00:00:00:08".parse().unwrap())).unwrap();
        let e = Net::restore(Some(spec), &n.save()).err().unwrap();
        assert!(matches!(e, NetRestoreError::MacChanged { .. }), "{e}");
    }

    #[test]
    fn mac_parse_and_print() {
        let m: MacAddr = "02:aB:00:10:ff:01".parse().unwrap();
        assert_eq!(m.0, [2, 0xab, 0, 0x10, 0xff, 1]);
        assert_eq!(m.to_string(), "02:ab:00:10:ff:01");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:0g",
            "03:00:00:00:00:01",
            "2:0:0:0:0:1",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let r = MacAddr::random();
        assert_eq!(r.0[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn nic_spec_parse() {
        let n = NicSpec::parse("tap0@sbx1", None).unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.netns.as_deref(), Some(std::path::Path::new("sbx1")));
        assert_eq!(n.arg(), "tap0@sbx1");
        let n = NicSpec::parse("tap0@/proc/1/ns/net", None).unwrap();
        assert_eq!(n.arg(), "tap0@/proc/1/ns/net");
        assert_eq!(NicSpec::parse("tap1", None).unwrap().netns, None);
        for bad in ["", "tap0@", "a/b", "sixteen-chars-xx", "x y"] {
            assert!(NicSpec::parse(bad, None).is_err(), "{bad}");
        }
    }
}
