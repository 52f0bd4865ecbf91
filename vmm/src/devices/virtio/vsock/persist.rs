//! What a virtio-vsock device saves in a snapshot: the guest's CID and the host socket it was
//! saved with. Connections are not saved (see the module docs of `vsock`): a restored device
//! tells the guest its transport was reset.

use super::{Vsock, VsockError};
use crate::persist::Persist;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Device state in a snapshot (`VirtioDeviceState::device` of a vsock device).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

impl Persist for Vsock {
    type State = VsockState;
    /// The restored device's host socket; `None` = the path it was saved with (each fork needs
    /// its own).
    type ConstructorArgs = Option<PathBuf>;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.cid,
            uds_path: self.uds_path.clone(),
        }
    }

    fn restore(uds: Option<PathBuf>, s: &VsockState) -> Result<Vsock, VsockError> {
        let mut v = Vsock::new(s.guest_cid, uds.as_ref().unwrap_or(&s.uds_path))?;
        v.reset_on_activate = true;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::persist::assert_round_trip;
    use crate::devices::virtio::VirtioDevice;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vsock::new(7, dir.path().join("v.sock")).unwrap();
        assert!(!v.reset_on_activate);
        let saved = v.save();
        drop(v); // its socket path is reused below
        let v = Vsock::new(7, &saved.uds_path).unwrap();
        let back = assert_round_trip(&v, None);
        // The guest reads its CID; the restored device resets the guest's connections.
        let (mut c1, mut c2) = ([0u8; 8], [0u8; 8]);
        v.read_config(0, &mut c1);
        back.read_config(0, &mut c2);
        assert_eq!(c1, c2);
        assert_eq!(u64::from_le_bytes(c2), 7);
        assert!(back.reset_on_activate);
    }

    #[test]
    fn restore_on_a_new_socket() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vsock::new(3, dir.path().join("a.sock")).unwrap();
        let fork = Vsock::restore(Some(dir.path().join("b.sock")), &v.save()).unwrap();
        assert_eq!(fork.uds_path(), dir.path().join("b.sock"));
        assert!(dir.path().join("a.sock").exists() && dir.path().join("b.sock").exists());
        let e = Vsock::restore(
            None,
            &VsockState {
                guest_cid: 2,
                uds_path: dir.path().join("c.sock"),
            },
        )
        .err()
        .unwrap();
        assert!(matches!(e, VsockError::BadCid(2)), "{e}");
    }
}
