//! Placement: which live node gets a new sandbox. Simple and deterministic, on purpose:
//!
//! 1. A node has room when it is not draining ([`crate::drain`]), its free memory covers the sandbox plus [`RESERVE_MIB`] for the
//!    host, its sandboxes stay under its `max_sandboxes`, and the vCPUs given to its
//!    sandboxes stay within [`CPU_OVERCOMMIT`] times its CPUs.
//! 2. Among those, the one with the fewest running sandboxes; ties go to the most vCPUs
//!    left, then to the smallest node id (so the same cluster state always gives the same
//!    answer; free memory, which moves all the time, is a filter, not a rank).
//!
//! The running sandboxes of each node are counted from the catalog ([`count_from_catalog`]),
//! which every node updates before it answers a change, not taken from the node's published
//! info, which is renewed every few seconds: two creates in a row see the first one.
//!
//! 3. A node that holds the template already ([`crate::TemplateEntry::holders`]: its chunks
//!    are local, nothing comes from S3) counts [`HOLDER_HEAD_START`] sandboxes fewer in the
//!    first rank: creates of one template gather where it is, but not all on one node.

use crate::{NodeInfo, SandboxEntry, SandboxState};

/// Memory every node keeps for itself and its page cache.
pub const RESERVE_MIB: u64 = 256;
/// How many vCPUs of sandboxes one CPU takes: sandboxes are mostly idle and their vCPUs
/// time-shared (gVisor's default is 2 vCPUs each; at 4x a 2-core host would stop at four
/// sandboxes), so memory is the limit that binds; this only stops a pile-up.
pub const CPU_OVERCOMMIT: u32 = 16;

/// What a new sandbox needs.
#[derive(Clone, Copy, Debug)]
pub struct Need {
    pub cpus: u32,
    pub memory_mib: u64,
}

/// Whether `n` can take a sandbox that needs `need`.
pub fn has_room(n: &NodeInfo, need: Need) -> bool {
    !n.draining
        && n.free_memory_mib >= need.memory_mib.saturating_add(RESERVE_MIB)
        && n.sandboxes < n.max_sandboxes
        && n.sandbox_cpus.saturating_add(need.cpus) <= n.cpus.saturating_mul(CPU_OVERCOMMIT)
}

/// Sets each node's running sandboxes and their vCPUs from the catalog's `entries`.
pub fn count_from_catalog(nodes: &mut [(String, NodeInfo)], entries: &[(String, SandboxEntry)]) {
    for (id, n) in nodes.iter_mut() {
        let running = || {
            entries
                .iter()
                .filter(|(_, e)| e.node == *id && e.state == SandboxState::Running)
        };
        n.sandboxes = running().count() as u32;
        n.sandbox_cpus = running().map(|(_, e)| e.cpus).sum();
    }
}

/// How many running sandboxes holding the template is worth in placement's first rank.
pub const HOLDER_HEAD_START: u32 = 2;

/// The node for a sandbox that needs `need`, among `nodes` (id, info); None when none has room.
pub fn choose(nodes: &[(String, NodeInfo)], need: Need) -> Option<&str> {
    choose_for(nodes, need, &[])
}

/// [`choose`] for a sandbox of a template that `holders` hold.
pub fn choose_for<'a>(
    nodes: &'a [(String, NodeInfo)],
    need: Need,
    holders: &[String],
) -> Option<&'a str> {
    let load = |id: &String, n: &NodeInfo| {
        let start = if holders.contains(id) {
            HOLDER_HEAD_START
        } else {
            0
        };
        // Scaled so a head start never goes below zero.
        n.sandboxes.saturating_add(HOLDER_HEAD_START) - start
    };
    nodes
        .iter()
        .filter(|(_, n)| has_room(n, need))
        .min_by(|(a_id, a), (b_id, b)| {
            let left = |n: &NodeInfo| {
                n.cpus
                    .saturating_mul(CPU_OVERCOMMIT)
                    .saturating_sub(n.sandbox_cpus)
            };
            load(a_id, a)
                .cmp(&load(b_id, b))
                .then(left(b).cmp(&left(a)))
                .then(a_id.cmp(b_id))
        })
        .map(|(id, _)| id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(free: u64, sandboxes: u32, sandbox_cpus: u32) -> NodeInfo {
        NodeInfo {
            advertise: String::new(),
            cpus: 2,
            memory_mib: 4096,
            free_memory_mib: free,
            sandboxes,
            sandbox_cpus,
            max_sandboxes: 10,
            updated_ms: 0,
            draining: false,
        }
    }

    const NEED: Need = Need {
        cpus: 1,
        memory_mib: 512,
    };

    #[test]
    fn fewest_sandboxes_then_id() {
        let nodes = vec![
            ("c".to_string(), node(4000, 0, 0)),
            ("a".to_string(), node(2000, 1, 1)),
            ("b".to_string(), node(1000, 0, 0)),
        ];
        assert_eq!(choose(&nodes, NEED), Some("b"));
        let nodes = vec![
            ("c".to_string(), node(4000, 1, 1)),
            ("a".to_string(), node(2000, 1, 1)),
        ];
        assert_eq!(choose(&nodes, NEED), Some("a"));
    }

    #[test]
    fn only_nodes_with_room() {
        let full_memory = node(512 + RESERVE_MIB - 1, 0, 0);
        let full_count = node(4000, 10, 1);
        let full_cpus = node(4000, 1, 2 * CPU_OVERCOMMIT);
        for n in [&full_memory, &full_count, &full_cpus] {
            assert!(!has_room(n, NEED), "{n:?}");
        }
        let nodes = vec![
            ("a".to_string(), full_memory),
            ("b".to_string(), full_count),
            ("c".to_string(), full_cpus),
        ];
        assert_eq!(choose(&nodes, NEED), None);
        assert!(has_room(&node(512 + RESERVE_MIB, 9, 7), NEED));
        assert_eq!(choose(&[], NEED), None);
    }

    #[test]
    fn holders_of_the_template_get_a_head_start() {
        let nodes = vec![
            ("a".to_string(), node(4000, 1, 1)),
            ("b".to_string(), node(4000, 2, 2)),
            ("c".to_string(), node(4000, 4, 4)),
        ];
        let held_by = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(choose_for(&nodes, NEED, &[]), Some("a"));
        // b holds it: 2 - 2 beats a's 1.
        assert_eq!(choose_for(&nodes, NEED, &held_by(&["b"])), Some("b"));
        // c holds it but runs 4: a's 1 wins.
        assert_eq!(choose_for(&nodes, NEED, &held_by(&["c"])), Some("a"));
        // A holder without room is passed over.
        let full = vec![
            ("a".to_string(), node(4000, 1, 1)),
            ("b".to_string(), node(100, 0, 0)),
        ];
        assert_eq!(choose_for(&full, NEED, &held_by(&["b"])), Some("a"));
    }

    #[test]
    fn never_a_draining_node() {
        let mut empty = node(4000, 0, 0);
        empty.draining = true;
        assert!(!has_room(&empty, NEED));
        // The emptiest node drains: the next one gets the sandbox, and none when it is alone.
        let nodes = vec![
            ("a".to_string(), empty.clone()),
            ("b".to_string(), node(1000, 3, 3)),
        ];
        assert_eq!(choose(&nodes, NEED), Some("b"));
        assert_eq!(choose(&nodes[..1], NEED), None);
    }

    #[test]
    fn the_catalog_counts() {
        let entry = |node: &str, state| SandboxEntry {
            node: node.into(),
            state,
            template: "t".into(),
            alias: None,
            metadata: Default::default(),
            started_ms: 0,
            end_ms: None,
            cpus: 2,
            memory_mib: 512,
            disk_mib: 0,
            cause: None,
            pushed: None,
            released: false,
        };
        // a's info is stale (it says 0); the catalog has two running there, one paused at b.
        let mut nodes = vec![
            ("a".to_string(), node(4000, 0, 0)),
            ("b".to_string(), node(4000, 3, 3)),
        ];
        let entries = vec![
            ("1".to_string(), entry("a", SandboxState::Running)),
            ("2".to_string(), entry("a", SandboxState::Running)),
            ("3".to_string(), entry("b", SandboxState::Paused)),
            ("4".to_string(), entry("b", SandboxState::Failed)),
        ];
        count_from_catalog(&mut nodes, &entries);
        assert_eq!((nodes[0].1.sandboxes, nodes[0].1.sandbox_cpus), (2, 4));
        assert_eq!((nodes[1].1.sandboxes, nodes[1].1.sandbox_cpus), (0, 0));
        assert_eq!(choose(&nodes, NEED), Some("b"));
    }
}
