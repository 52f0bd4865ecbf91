//! Overlays against a plain in-memory model: random writes, reads, flushes, commits and
//! reopenings (as after a VMM restart); every committed blob must read back as the model did.

use kiln_blockstore::{PutOptions, Store};
use proptest::prelude::*;

const CS: u32 = 16 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, byte: u8 },
    Zero { off: u64, len: usize },
    Read { off: u64, len: usize },
    Flush,
    Commit,
    Reopen,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let off = 0..size;
    prop_oneof![
        6 => (off.clone(), 1usize..20_000, any::<u8>()).prop_map(|(off, len, byte)| Op::Write { off, len, byte }),
        1 => (off.clone(), 1usize..40_000).prop_map(|(off, len)| Op::Zero { off, len }),
        4 => (off, 1usize..40_000).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

fn read_overlay(ov: &kiln_blockstore::Overlay) -> Vec<u8> {
    let mut out = vec![0u8; ov.len() as usize];
    assert_eq!(ov.read_at(0, &mut out).unwrap(), out.len());
    out
}

fn run(base_len: usize, size: u64, ops: Vec<Op>) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    // A base with random, zero and repeated chunks.
    let mut base = vec![0u8; base_len];
    for (i, b) in base.iter_mut().enumerate() {
        if (i / CS as usize) % 3 != 1 {
            *b = (i as u32).wrapping_mul(2654435761).to_le_bytes()[3];
        }
    }
    let base_id = (base_len > 0).then(|| {
        store
            .put_bytes(
                &base,
                &PutOptions {
                    chunk_size: Some(CS),
                    ..Default::default()
                },
            )
            .unwrap()
    });
    let mut model = base.clone();
    model.resize(size as usize, 0);
    let dir = tmp.path().join("ov");
    let mut ov = store.create_overlay(base_id.as_ref(), size, &dir).unwrap();
    let mut committed = Vec::new();
    for op in ops {
        match op {
            Op::Write { off, len, .. } | Op::Zero { off, len } if off + len as u64 > size => {
                let before = read_overlay(&ov);
                assert!(
                    ov.write_at(off, &vec![0xAAu8; len]).is_err(),
                    "write past the end must fail"
                );
                assert_eq!(read_overlay(&ov), before, "a refused write changes nothing");
            }
            Op::Write { off, len, byte } => {
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                ov.write_at(off, &data).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Zero { off, len } => {
                ov.write_at(off, &vec![0u8; len]).unwrap();
                model[off as usize..off as usize + len].fill(0);
            }
            Op::Read { off, len } => {
                let mut buf = vec![0xEEu8; len];
                let n = ov.read_at(off, &mut buf).unwrap();
                let want = &model[off as usize..(off as usize + len).min(size as usize)];
                assert_eq!(n, want.len());
                assert_eq!(&buf[..n], want, "read at {off} len {len}");
            }
            Op::Flush => ov.flush().unwrap(),
            Op::Commit => {
                let id = ov.commit().unwrap();
                assert_eq!(ov.base(), Some(id));
                assert_eq!(ov.dirty_bytes(), 0);
                committed.push((id, model.clone()));
            }
            Op::Reopen => {
                // A clean restart: flushed writes survive.
                ov.flush().unwrap();
                drop(ov);
                ov = store.open_overlay(&dir).unwrap();
            }
        }
    }
    assert_eq!(read_overlay(&ov), model);
    let id = ov.commit().unwrap();
    committed.push((id, model.clone()));
    // Unchanged chunks are shared with the base: same ids at the same index.
    if let Some(b) = &base_id {
        let bm = store.manifest(b).unwrap();
        let nm = store.manifest(&id).unwrap();
        for (i, c) in nm.chunks.iter().enumerate() {
            let s = i * CS as usize;
            let e = (s + CS as usize).min(size as usize);
            if i < bm.chunks.len() && e <= base.len() && model[s..e] == base[s..e] {
                assert_eq!(*c, bm.chunks[i], "unchanged chunk {i} shared");
            }
        }
    }
    ov.discard().unwrap();
    assert!(!dir.exists());
    // Every commit is an independent blob; gc keeps them all.
    store.gc(false).unwrap();
    for (id, want) in committed {
        let r = store.open_blob(&id).unwrap();
        let mut got = vec![0u8; r.len() as usize];
        r.read_at(0, &mut got).unwrap();
        assert_eq!(got, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn overlay_matches_model(
        base_chunks in 0usize..6,
        tail in 0usize..20_000,
        grow in 0u64..50_000,
        ops in proptest::collection::vec(op(150_000), 1..40),
    ) {
        let base_len = base_chunks * CS as usize + if base_chunks > 0 { tail } else { 0 };
        let size = (base_len as u64 + grow).max(1);
        let ops = ops.into_iter().map(|o| match o {
            Op::Write { off, len, byte } => Op::Write { off: off % size, len, byte },
            Op::Zero { off, len } => Op::Zero { off: off % size, len },
            Op::Read { off, len } => Op::Read { off: off % size, len },
            o => o,
        }).collect();
        run(base_len, size, ops);
    }
}

#[test]
fn gc_keeps_the_base_of_a_live_overlay_and_restart_keeps_flushed_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let base: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let id = store
        .put_bytes(
            &base,
            &PutOptions {
                chunk_size: Some(CS),
                ..Default::default()
            },
        )
        .unwrap();
    let dir = tmp.path().join("disk");
    let ov = store
        .create_overlay(Some(&id), base.len() as u64, &dir)
        .unwrap();
    ov.write_at(5, b"hello").unwrap();
    ov.flush().unwrap();
    // The base blob is removed while the overlay lives: gc must keep its chunks.
    store.remove_blob(&id).unwrap();
    store.gc(false).unwrap();
    store.drop_memory_cache();
    drop(ov);
    let fresh = Store::open(&tmp.path().join("store")).unwrap();
    let ov = fresh.open_overlay(&dir).unwrap();
    let mut buf = vec![0u8; base.len()];
    ov.read_at(0, &mut buf).unwrap();
    let mut want = base.clone();
    want[5..10].copy_from_slice(b"hello");
    assert_eq!(buf, want);
    assert!(
        fresh.create_overlay(None, 10, &dir).is_err(),
        "an existing overlay is not clobbered"
    );
    ov.discard().unwrap();
    let rep = fresh.gc(false).unwrap();
    assert!(
        rep.chunks_removed > 0,
        "base chunks go once the overlay is discarded"
    );
}
