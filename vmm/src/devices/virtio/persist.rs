//! The virtio devices of a snapshot: each device's own state by type, and the restore
//! dispatch that rebuilds them (each device's [`Persist`] lives beside it: `block/persist.rs`,
//! `net/persist.rs`, `vsock/persist.rs`).
//!
//! A snapshot keeps what the guest sees of a device; the host side (disk backend, vsock socket,
//! TAP) is given anew by whoever restores it ([`DeviceResources`]), so two forks never share one.

use super::block::{Block, BlockError, BlockState, DiskBackend};
use super::net::{Net, NetRestoreError, NetState, NicSpec};
use super::vsock::{Vsock, VsockError, VsockState};
use super::{VirtioDevice, TYPE_BLOCK, TYPE_NET, TYPE_VSOCK};
use crate::persist::{Persist, VirtioDeviceState};
use serde::Serialize;
use std::path::PathBuf;

/// A virtio device's own state (beyond its transport and queues), by device type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DeviceState {
    Block(BlockState),
    Net(NetState),
    Vsock(VsockState),
}

impl DeviceState {
    /// The virtio device type id.
    pub fn device_type(&self) -> u32 {
        match self {
            DeviceState::Block(_) => TYPE_BLOCK,
            DeviceState::Net(_) => TYPE_NET,
            DeviceState::Vsock(_) => TYPE_VSOCK,
        }
    }

    /// Reads the state a device of type `device_type` saved.
    pub fn from_json(device_type: u32, v: serde_json::Value) -> Result<DeviceState, String> {
        let bad = |what: &str, e: serde_json::Error| format!("{what} device state: {e}");
        Ok(match device_type {
            TYPE_BLOCK => {
                DeviceState::Block(serde_json::from_value(v).map_err(|e| bad("block", e))?)
            }
            TYPE_NET => DeviceState::Net(serde_json::from_value(v).map_err(|e| bad("net", e))?),
            TYPE_VSOCK => {
                DeviceState::Vsock(serde_json::from_value(v).map_err(|e| bad("vsock", e))?)
            }
            t => {
                return Err(format!(
                    "virtio device type {t} has no saved state kiln knows"
                ))
            }
        })
    }
}

/// One disk of a restored VM.
pub struct RestoredDisk {
    pub backend: DiskBackend,
    /// Refuse writes even if the snapshotted device accepted them.
    pub read_only: bool,
}

/// The host side of a restored VM's devices (see the module docs).
#[derive(Default)]
pub struct DeviceResources {
    /// One per block device, in device order.
    pub disks: Vec<RestoredDisk>,
    /// The vsock device's host socket; `None` = the path it was saved with.
    pub vsock_uds: Option<PathBuf>,
    /// The NIC's TAP; `None` = no host side (its frames are dropped).
    pub net: Option<NicSpec>,
}

/// Why a snapshot's devices could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum DeviceRestoreError {
    #[error("the snapshot's VM has {saved} disks, {given} were given")]
    DiskCount { saved: usize, given: usize },
    #[error("a TAP was given but the snapshot's VM has no network interface")]
    NoNic,
    #[error("disk {id}: {source}")]
    Block { id: String, source: BlockError },
    #[error("vsock: {0}")]
    Vsock(#[from] VsockError),
    #[error("network interface: {0}")]
    Net(#[from] NetRestoreError),
}

/// Rebuilds the devices `states` describe, in order, on the host resources `res` names.
pub fn restore_devices(
    states: &[VirtioDeviceState],
    res: DeviceResources,
) -> Result<Vec<Box<dyn VirtioDevice>>, DeviceRestoreError> {
    let saved = states
        .iter()
        .filter(|s| s.device_type() == TYPE_BLOCK)
        .count();
    if saved != res.disks.len() {
        return Err(DeviceRestoreError::DiskCount {
            saved,
            given: res.disks.len(),
        });
    }
    if res.net.is_some() && !states.iter().any(|s| s.device_type() == TYPE_NET) {
        return Err(DeviceRestoreError::NoNic);
    }
    let mut disks = res.disks.into_iter();
    let mut net = res.net;
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::with_capacity(states.len());
    for s in states {
        devices.push(match &s.device {
            DeviceState::Block(b) => {
                let d = disks.next().expect("counted above");
                let blk = Block::restore((d.backend, d.read_only), b).map_err(|source| {
                    DeviceRestoreError::Block {
                        id: b.id.clone(),
                        source,
                    }
                })?;
                Box::new(blk)
            }
            DeviceState::Vsock(v) => Box::new(Vsock::restore(res.vsock_uds.clone(), v)?),
            // A second NIC (none is made today) would get no TAP rather than share one.
            DeviceState::Net(n) => Box::new(Net::restore(net.take(), n)?),
        });
    }
    Ok(devices)
}

/// The round trip every device passes: save, restore on `args`, save again: equal states, and
/// the state survives serde unchanged. Returns the restored device for behaviour checks.
#[cfg(test)]
pub(crate) fn assert_round_trip<T>(dev: &T, args: T::ConstructorArgs) -> T
where
    T: Persist,
    T::State: PartialEq + std::fmt::Debug,
    T::Error: std::fmt::Debug,
{
    let s1 = dev.save();
    let json = serde_json::to_string(&s1).expect("state serializes");
    let read: T::State = serde_json::from_str(&json).expect("state deserializes");
    assert_eq!(read, s1, "serde round trip");
    let restored = T::restore(args, &read).expect("restore");
    assert_eq!(restored.save(), s1, "save -> restore -> save");
    restored
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::MacAddr;

    /// A device list as kiln wrote it before device states were typed; it must read and write
    /// back the same JSON.
    #[test]
    fn old_device_states_read_and_write_back_unchanged() {
        let transport = serde_json::json!({
            "device_status": 15, "device_features_sel": 0, "driver_features_sel": 0,
            "acked_features": 4294967296u64, "queue_sel": 0, "interrupt_status": 0,
            "config_generation": 0, "queues": [], "activated": true
        });
        let old = serde_json::json!([
            {"device_type": 2, "transport": transport,
             "device": {"id": "rootfs", "capacity": 1048576, "read_only": false}},
            {"device_type": 19, "transport": transport,
             "device": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}},
            {"device_type": 1, "transport": transport,
             "device": {"mac": [2, 0, 0, 0, 0, 1], "tap": "tap0"}},
        ]);
        let states: Vec<VirtioDeviceState> = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(
            states.iter().map(|s| s.device_type()).collect::<Vec<_>>(),
            [TYPE_BLOCK, TYPE_VSOCK, TYPE_NET]
        );
        assert_eq!(
            states[2].device,
            DeviceState::Net(NetState {
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                tap: Some("tap0".into())
            })
        );
        assert_eq!(serde_json::to_value(&states).unwrap(), old);
        // Block states from before `read_only` was saved read as writable.
        let b: VirtioDeviceState = serde_json::from_value(serde_json::json!(
            {"device_type": 2, "transport": transport, "device": {"id": "d", "capacity": 512}}
        ))
        .unwrap();
        assert_eq!(
            b.device,
            DeviceState::Block(BlockState {
                id: "d".into(),
                capacity: 512,
                read_only: false
            })
        );
        let unknown = serde_json::json!({"device_type": 9, "transport": transport, "device": null});
        let e = serde_json::from_value::<VirtioDeviceState>(unknown).unwrap_err();
        assert!(e.to_string().contains("type 9"), "{e}");
    }

    #[test]
    fn dispatch_checks_what_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let transport: crate::devices::virtio::mmio::MmioTransportState =
            serde_json::from_value(serde_json::json!({
                "device_status": 0, "device_features_sel": 0, "driver_features_sel": 0,
                "acked_features": 0, "queue_sel": 0, "interrupt_status": 0,
                "config_generation": 0, "queues": [], "activated": false
            }))
            .unwrap();
        let state = |device| VirtioDeviceState {
            transport: transport.clone(),
            device,
        };
        let vsock = state(DeviceState::Vsock(VsockState {
            guest_cid: 3,
            uds_path: dir.path().join("saved.sock"),
        }));
        let blk = state(DeviceState::Block(BlockState {
            id: "d".into(),
            capacity: 4096,
            read_only: false,
        }));
        let e = restore_devices(std::slice::from_ref(&blk), DeviceResources::default())
            .err()
            .unwrap();
        assert!(
            matches!(e, DeviceRestoreError::DiskCount { saved: 1, given: 0 }),
            "{e}"
        );
        let res = DeviceResources {
            net: Some(NicSpec::parse("tap0", None).unwrap()),
            ..Default::default()
        };
        let e = restore_devices(std::slice::from_ref(&vsock), res)
            .err()
            .unwrap();
        assert!(matches!(e, DeviceRestoreError::NoNic), "{e}");

        // A disk of another size than the guest saw is refused.
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        let file = |path: &std::path::Path| DiskBackend::File {
            path: path.to_path_buf(),
            engine: super::super::block::engine::FileEngine::Sync,
            direct: false,
        };
        let res = DeviceResources {
            disks: vec![RestoredDisk {
                backend: file(&img),
                read_only: false,
            }],
            ..Default::default()
        };
        let e = restore_devices(&[blk], res).err().unwrap();
        assert!(matches!(e, DeviceRestoreError::Block { .. }), "{e}");

        // The devices come back in the saved order, on the resources given.
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let res = DeviceResources {
            disks: vec![RestoredDisk {
                backend: file(&img),
                read_only: true,
            }],
            vsock_uds: Some(dir.path().join("new.sock")),
            net: None,
        };
        let blk = state(DeviceState::Block(BlockState {
            id: "d".into(),
            capacity: 4096,
            read_only: false,
        }));
        let devs = restore_devices(&[vsock, blk], res).unwrap();
        assert_eq!(devs[0].device_type(), TYPE_VSOCK);
        assert_eq!(
            devs[0].save_state(),
            DeviceState::Vsock(VsockState {
                guest_cid: 3,
                uds_path: dir.path().join("new.sock")
            })
        );
        assert!(dir.path().join("new.sock").exists());
        match devs[1].save_state() {
            DeviceState::Block(b) => assert!(b.read_only, "read-only forced by the caller"),
            s => panic!("{s:?}"),
        }
    }
}
