//! A bounded in-memory cache of decompressed, verified chunks (CLOCK eviction, sharded).
//! Warm random reads are served from here with one lock and one memcpy.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::id::ChunkId;

const SHARDS: usize = 16;

pub(crate) type ChunkData = Arc<Vec<u8>>;

struct Entry {
    data: ChunkData,
    referenced: bool,
}

#[derive(Default)]
struct Shard {
    map: HashMap<ChunkId, Entry>,
    clock: VecDeque<ChunkId>,
    bytes: usize,
}

pub(crate) struct ChunkCache {
    shards: Vec<Mutex<Shard>>,
    cap_per_shard: usize,
}

impl ChunkCache {
    pub(crate) fn new(capacity_bytes: usize) -> ChunkCache {
        ChunkCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            cap_per_shard: capacity_bytes / SHARDS,
        }
    }

    fn shard(&self, id: &ChunkId) -> &Mutex<Shard> {
        &self.shards[id.0[0] as usize % SHARDS]
    }

    pub(crate) fn get(&self, id: &ChunkId) -> Option<ChunkData> {
        let mut s = self.shard(id).lock().unwrap();
        let e = s.map.get_mut(id)?;
        e.referenced = true;
        Some(e.data.clone())
    }

    pub(crate) fn insert(&self, id: ChunkId, data: ChunkData) {
        let len = data.len();
        if len > self.cap_per_shard {
            return;
        }
        let mut s = self.shard(&id).lock().unwrap();
        if s.map.contains_key(&id) {
            return;
        }
        // CLOCK: entries referenced since the hand last passed get a second chance.
        while s.bytes + len > self.cap_per_shard {
            let Some(victim) = s.clock.pop_front() else {
                break;
            };
            let keep = match s.map.get_mut(&victim) {
                Some(e) if e.referenced => {
                    e.referenced = false;
                    true
                }
                _ => false,
            };
            if keep {
                s.clock.push_back(victim);
            } else if let Some(e) = s.map.remove(&victim) {
                s.bytes -= e.data.len();
            }
        }
        s.bytes += len;
        s.clock.push_back(id);
        s.map.insert(
            id,
            Entry {
                data,
                referenced: false,
            },
        );
    }

    pub(crate) fn remove(&self, id: &ChunkId) {
        let mut s = self.shard(id).lock().unwrap();
        if let Some(e) = s.map.remove(id) {
            s.bytes -= e.data.len();
            s.clock.retain(|c| c != id);
        }
    }

    pub(crate) fn clear(&self) {
        for s in &self.shards {
            *s.lock().unwrap() = Shard::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;

    #[test]
    fn bounded_and_keeps_hot_entries() {
        let c = ChunkCache::new(SHARDS * 4096);
        // all ids with the same first byte land in one shard of 4096 bytes = 4 entries of 1 KiB
        let ids: Vec<ChunkId> = (0..8u8)
            .map(|i| {
                Digest([
                    0, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0, 0, 0, 0, 0,
                ])
            })
            .collect();
        for id in &ids[..4] {
            c.insert(*id, Arc::new(vec![1; 1024]));
        }
        assert!(c.get(&ids[0]).is_some()); // mark hot
        for id in &ids[4..6] {
            c.insert(*id, Arc::new(vec![1; 1024]));
        }
        assert!(c.get(&ids[0]).is_some(), "hot entry survived");
        let present = ids.iter().filter(|i| c.get(i).is_some()).count();
        assert_eq!(present, 4);
    }
}
