//! What a virtio-blk device saves in a snapshot: what the guest negotiated about the disk (its
//! id, size and whether it may write). The backend is the restorer's: a restored or forked VM
//! gets its own (usually a fresh overlay over the snapshot's committed disk blob).

use super::{Block, BlockError, DiskBackend};
use crate::persist::Persist;
use serde::{Deserialize, Serialize};

/// Device state in a snapshot (`VirtioDeviceState::device` of a block device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// What GET_ID returns.
    pub id: String,
    /// Disk size in bytes, as the guest read it from config space.
    pub capacity: u64,
    /// The guest was told the disk is read-only (states saved before this field: writable).
    #[serde(default)]
    pub read_only: bool,
}

impl Persist for Block {
    type State = BlockState;
    /// The backend, and whether to refuse writes even if the saved device accepted them.
    type ConstructorArgs = (DiskBackend, bool);
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            id: self.id.clone(),
            capacity: self.capacity,
            read_only: self.read_only,
        }
    }

    fn restore(
        (backend, read_only): (DiskBackend, bool),
        s: &BlockState,
    ) -> Result<Block, BlockError> {
        // The guest negotiated read-only once; the device must keep refusing writes.
        let blk = Block::new(&s.id, backend, s.read_only || read_only)?;
        if blk.capacity != s.capacity {
            return Err(BlockError::SizeChanged {
                saved: s.capacity,
                given: blk.capacity,
            });
        }
        Ok(blk)
    }
}

#[cfg(test)]
mod tests {
    use super::super::engine::FileEngine;
    use super::*;
    use crate::devices::virtio::persist::assert_round_trip;
    use crate::devices::virtio::VirtioDevice;

    fn disk(dir: &std::path::Path, name: &str, len: usize) -> DiskBackend {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        DiskBackend::File {
            path,
            engine: FileEngine::Sync,
            direct: false,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for read_only in [false, true] {
            let blk = Block::new("rootfs", disk(dir.path(), "a", 1 << 20), read_only).unwrap();
            let back = assert_round_trip(&blk, (disk(dir.path(), "b", 1 << 20), false));
            // The guest sees the same disk: config space and features.
            let (mut c1, mut c2) = ([0u8; 24], [0u8; 24]);
            blk.read_config(0, &mut c1);
            back.read_config(0, &mut c2);
            assert_eq!(c1, c2);
            assert_eq!(blk.avail_features(), back.avail_features());
        }
    }

    #[test]
    fn restore_keeps_read_only_and_refuses_a_resized_disk() {
        let dir = tempfile::tempdir().unwrap();
        let blk = Block::new("d", disk(dir.path(), "a", 8192), false).unwrap();
        let ro = Block::restore((disk(dir.path(), "b", 8192), true), &blk.save()).unwrap();
        assert!(ro.save().read_only);
        let e = Block::restore((disk(dir.path(), "c", 4096), false), &blk.save())
            .err()
            .unwrap();
        assert!(
            matches!(
                e,
                BlockError::SizeChanged {
                    saved: 8192,
                    given: 4096
                }
            ),
            "{e}"
        );
    }
}
