//! Block store round trips, dedup, names, integrity, lazy fetch, verify/repair and gc.

use std::sync::Arc;

use kiln_blockstore::{DirRemote, Error, PutOptions, Store, StoreOptions};
use rand::{Rng, RngCore, SeedableRng};

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng(seed).fill_bytes(&mut v);
    v
}

fn cs(n: u32) -> PutOptions {
    PutOptions {
        chunk_size: Some(n),
        ..Default::default()
    }
}

fn read_all(store: &Store, id: &kiln_blockstore::BlobId) -> Vec<u8> {
    let r = store.open_blob(id).unwrap();
    let mut out = vec![0u8; r.len() as usize];
    assert_eq!(r.read_at(0, &mut out).unwrap(), out.len());
    out
}

/// XORs `mask` into the byte at `at` of a file (`at` counted from its end when negative).
fn flip_byte(path: &std::path::Path, at: i64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = if at < 0 {
        f.metadata().unwrap().len() - at.unsigned_abs()
    } else {
        at as u64
    };
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ mask], at).unwrap();
}

/// Flips one byte in the middle of a chunk's stored frame.
fn flip_frame(store: &Store, id: &kiln_blockstore::ChunkId) {
    let loc = store.local_chunk(id).expect("chunk is local");
    flip_byte(&loc.path, (loc.offset + loc.len / 2) as i64, 0x40);
}

#[test]
fn round_trips_of_awkward_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let c = 16 * 1024;
    for (i, size) in [0usize, 1, c - 1, c, c + 1, 3 * c + c / 2]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(i as u64, size);
        let id = store.put_bytes(&data, &cs(c as u32)).unwrap();
        let m = store.manifest(&id).unwrap();
        assert_eq!(m.size, size as u64);
        assert_eq!(m.chunks.len(), size.div_ceil(c));
        assert_eq!(read_all(&store, &id), data, "size {size}");
        // reads at odd offsets and past the end
        let mut buf = vec![0u8; 100];
        let off = size.saturating_sub(37);
        let n = store.read_at(&id, off as u64, &mut buf).unwrap();
        assert_eq!(&buf[..n], &data[off..]);
        assert_eq!(store.read_at(&id, size as u64 + 5, &mut buf).unwrap(), 0);
        // export (through a file) and put_file round trip to the same id
        let out = tmp.path().join(format!("out{i}"));
        store.export(&id, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        assert_eq!(store.put_file(&out, &cs(c as u32)).unwrap(), id);
    }
}

#[test]
fn zeros_are_stored_as_nothing_and_export_sparse() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let mut data = vec![0u8; 64 << 20];
    data[20 << 20..(20 << 20) + 5].copy_from_slice(b"hello");
    let before = store.stats().bytes_written;
    let id = store.put_reader(&data[..], &PutOptions::default()).unwrap();
    let st = store.stat(&id).unwrap();
    assert_eq!(st.unique_chunks, 1);
    assert_eq!(st.zero_chunks, st.chunks - 1);
    assert!(
        store.stats().bytes_written - before < 4096,
        "only one small chunk written"
    );
    let out = tmp.path().join("sparse.img");
    store.export(&id, &out).unwrap();
    let md = std::fs::metadata(&out).unwrap();
    assert_eq!(md.len(), data.len() as u64);
    use std::os::unix::fs::MetadataExt;
    assert!(
        md.blocks() * 512 < 1 << 20,
        "exported file is sparse: {} blocks",
        md.blocks()
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[test]
fn identical_content_dedups() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let c = 64 * 1024usize;
    let a = random_bytes(1, 8 * c);
    // b = a with one chunk changed and a repeated chunk
    let mut b = a.clone();
    b[3 * c..4 * c].copy_from_slice(&random_bytes(2, c));
    b.copy_within(0..c, 5 * c);
    let ida = store.put_bytes(&a, &cs(c as u32)).unwrap();
    assert_eq!(
        store.put_bytes(&a, &cs(c as u32)).unwrap(),
        ida,
        "same bytes, same id"
    );
    let w0 = store.stats().chunks_written;
    let idb = store.put_bytes(&b, &cs(c as u32)).unwrap();
    assert_eq!(
        store.stats().chunks_written - w0,
        1,
        "only the changed chunk is new"
    );
    assert_eq!(store.stat(&idb).unwrap().unique_chunks, 7);
    assert_eq!(read_all(&store, &idb), b);
    // different chunk size = different blob id, same bytes
    let idc = store.put_bytes(&a, &cs(4096)).unwrap();
    assert_ne!(idc, ida);
    assert_eq!(read_all(&store, &idc), a);
}

#[test]
fn names_resolve_and_prefixes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let id = store
        .put_bytes(b"one", &PutOptions::named("img/base:v1"))
        .unwrap();
    let id2 = store.put_bytes(b"two", &PutOptions::default()).unwrap();
    assert_eq!(store.resolve("img/base:v1").unwrap(), id);
    assert_eq!(store.resolve(&id2.to_hex()).unwrap(), id2);
    assert_eq!(store.resolve(&id2.to_hex()[..10]).unwrap(), id2);
    assert!(matches!(store.resolve("nope"), Err(Error::NotFound(_))));
    assert!(
        matches!(store.resolve(&id.to_hex()[..7]), Err(Error::NotFound(_))),
        "prefix < 8 refused"
    );
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        list.iter().find(|b| b.id == id).unwrap().names,
        vec!["img/base:v1".to_string()]
    );
    store.set_name("img/base:v1", &id2).unwrap();
    assert_eq!(store.resolve("img/base:v1").unwrap(), id2);
    assert!(store.remove_name("img/base:v1").unwrap());
    assert!(store
        .set_name("x", &kiln_blockstore::Digest::of(b"absent"))
        .is_err());
    assert!(store.set_name("", &id).is_err());
    // JSON for the CLI
    let j = serde_json::to_value(store.stat(&id).unwrap()).unwrap();
    assert_eq!(j["size"], 3);
}

#[test]
fn flipped_byte_is_an_integrity_error_and_repair_heals_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        &tmp.path().join("store"),
        StoreOptions {
            cache_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let data = random_bytes(7, 200_000);
    let id = store.put_bytes(&data, &cs(65536)).unwrap();
    let victim = store.manifest(&id).unwrap().chunks[1].unwrap();
    flip_frame(&store, &victim);

    let mut buf = vec![0u8; 10];
    assert_eq!(
        store.read_at(&id, 0, &mut buf).unwrap(),
        10,
        "other chunks still read"
    );
    let err = store.read_at(&id, 70_000, &mut buf).unwrap_err();
    match &err {
        Error::Integrity { chunk, .. } => assert_eq!(*chunk, victim),
        e => panic!("expected integrity error, got {e}"),
    }
    assert!(err.to_string().contains(&victim.to_hex()), "{err}");

    let rep = store.verify(false).unwrap();
    assert!(!rep.ok);
    assert_eq!(rep.damaged, vec![victim]);

    // No remote: repair cannot heal it.
    let rep = store.verify(true).unwrap();
    assert!(!rep.ok && rep.repaired.is_empty());

    // A second store that has the data pushes it to a shared remote; repair heals from there.
    let remote = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
    let other = Store::open(&tmp.path().join("other")).unwrap();
    assert_eq!(other.put_bytes(&data, &cs(65536)).unwrap(), id);
    other.set_remote(remote.clone());
    let pr = other.push(&id, &|_| {}).unwrap();
    assert_eq!(pr.chunks_uploaded, 4);
    store.set_remote(remote);
    let rep = store.verify(true).unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.repaired, vec![victim]);
    assert_eq!(read_all(&store, &id), data);
}

#[test]
fn lazy_fetch_touches_only_needed_chunks_and_coalesces() {
    let tmp = tempfile::tempdir().unwrap();
    let remote = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
    let a = Store::open(&tmp.path().join("a")).unwrap();
    a.set_remote(remote.clone());
    let c = 64 * 1024usize;
    let data = random_bytes(9, 32 * c);
    let id = a.put_bytes(&data, &cs(c as u32)).unwrap();
    let mut progress = 0;
    let rep = a.push(&id, &|n| assert!(n > 0)).unwrap();
    progress += rep.bytes_uploaded;
    assert!(progress > 0);
    assert_eq!(rep.chunks_uploaded, 32);
    assert_eq!(
        a.push(&id, &|_| {}).unwrap().chunks_uploaded,
        0,
        "second push sends nothing"
    );

    let b = Store::open(&tmp.path().join("b")).unwrap();
    assert!(matches!(b.pull(&id), Err(Error::NoRemote)));
    b.set_remote(remote);
    b.pull(&id).unwrap();
    // read spanning chunks 3 and 4
    let mut buf = vec![0u8; 1000];
    b.read_at(&id, 4 * c as u64 - 500, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[4 * c - 500..4 * c + 500]);
    assert_eq!(b.stats().remote_chunk_fetches, 2);
    // 8 threads read the same untouched chunk at once: one fetch
    std::thread::scope(|s| {
        for t in 0..8 {
            let b = &b;
            let data = &data;
            s.spawn(move || {
                let mut buf = vec![0u8; 100];
                b.read_at(&id, 10 * c as u64 + t * 10, &mut buf).unwrap();
                assert_eq!(&buf[..], &data[10 * c + t as usize * 10..][..100]);
            });
        }
    });
    assert_eq!(b.stats().remote_chunk_fetches, 3);
    // fetched chunks are now local: verify sees them, the rest are remote-only
    let rep = b.verify(false).unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.chunks_checked, 3);
    assert_eq!(rep.remote_only, 29);
    assert_eq!(read_all(&b, &id), data);
    assert_eq!(b.stats().remote_chunk_fetches, 32);

    // A third home: export fetches in parallel; prefetch makes the rest local.
    let c3 = Store::open(&tmp.path().join("c")).unwrap();
    c3.set_remote(Arc::new(
        DirRemote::new(&tmp.path().join("remote")).unwrap(),
    ));
    c3.pull(&id).unwrap();
    let mut head = vec![0u8; 10];
    c3.read_at(&id, 0, &mut head).unwrap();
    assert_eq!(
        c3.prefetch(&id).unwrap(),
        31,
        "only the chunks not yet local"
    );
    let rep = c3.verify(false).unwrap();
    assert!(
        rep.ok && rep.remote_only == 0 && rep.chunks_checked == 32,
        "{rep:?}"
    );
    let d = Store::open(&tmp.path().join("d")).unwrap();
    d.set_remote(Arc::new(
        DirRemote::new(&tmp.path().join("remote")).unwrap(),
    ));
    d.pull(&id).unwrap();
    let out = tmp.path().join("exported");
    d.export(&id, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(d.stats().remote_chunk_fetches, 32);
}

#[test]
fn missing_chunk_without_remote_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s")).unwrap();
    let id = store
        .put_bytes(&random_bytes(3, 10_000), &cs(4096))
        .unwrap();
    let victim = store.manifest(&id).unwrap().chunks[0].unwrap();
    assert_eq!(store.evict_local(&[victim]).unwrap(), 1);
    let mut buf = [0u8; 8];
    let err = store.read_at(&id, 0, &mut buf).unwrap_err();
    assert!(
        matches!(err, Error::MissingChunk { chunk, .. } if chunk == victim),
        "{err}"
    );
    let rep = store.verify(false).unwrap();
    assert_eq!(rep.missing, vec![victim]);
}

#[test]
fn gc_removes_only_unreferenced_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s")).unwrap();
    let c = 4096usize;
    let shared = random_bytes(1, 4 * c);
    let mut a = shared.clone();
    a.extend(random_bytes(2, 4 * c));
    let mut b = shared.clone();
    b.extend(random_bytes(3, 4 * c));
    let ida = store.put_bytes(&a, &cs(c as u32)).unwrap();
    let idb = store.put_bytes(&b, &cs(c as u32)).unwrap();
    let rep = store.gc(false).unwrap();
    assert_eq!(rep.chunks_removed, 0);
    store.remove_blob(&ida).unwrap();
    assert!(matches!(
        store.read_at(&ida, 0, &mut [0u8; 1]),
        Err(Error::NotFound(_))
    ));
    let rep = store.gc(false).unwrap();
    assert_eq!(rep.chunks_removed, 4, "a's own chunks go, shared ones stay");
    assert_eq!(read_all(&store, &idb), b);
    assert!(store.verify(false).unwrap().ok);
}

/// Writers share their first chunks (dedup races gc) but never a whole blob (a writer removing
/// its blob must not remove another's).
fn blob_content(writer: u64, seed: u64, c: usize) -> Vec<u8> {
    let mut d = random_bytes(seed, 5 * c);
    d.extend(random_bytes(1000 + writer, c));
    d
}

#[test]
fn gc_with_concurrent_puts_keeps_every_visible_blob_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = Store::open(&dir).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let c = 4096usize;
    std::thread::scope(|s| {
        // Two writers, each through its own Store (as separate processes would be).
        for w in 0..2u64 {
            let (dir, stop) = (&dir, &stop);
            s.spawn(move || {
                let st = Store::open(dir).unwrap();
                let mut r = rng(w);
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Overlapping content between writers and iterations, so dedup hits chunks
                    // that gc may be deciding about.
                    let seed = r.random_range(0..6u64);
                    let data = blob_content(w, seed, c);
                    let id = st
                        .put_bytes(
                            &data,
                            &PutOptions {
                                chunk_size: Some(c as u32),
                                name: Some(format!("w{w}-{seed}")),
                                progress: None,
                            },
                        )
                        .unwrap();
                    assert_eq!(read_all(&st, &id), data);
                    if i.is_multiple_of(3) {
                        let _ = st.remove_blob(&id);
                    }
                    i += 1;
                }
            });
        }
        let stop = &stop;
        let store = &store;
        s.spawn(move || {
            for _ in 0..30 {
                store.gc(false).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    });
    for (name, id) in store.names().unwrap() {
        let seed: u64 = name.rsplit('-').next().unwrap().parse().unwrap();
        let w: u64 = name[1..2].parse().unwrap();
        assert_eq!(read_all(&store, &id), blob_content(w, seed, c), "{name}");
    }
    let rep = store.verify(false).unwrap();
    assert!(rep.ok, "{rep:?}");
}

#[test]
fn bad_input_is_refused_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s")).unwrap();
    assert!(matches!(
        store.put_bytes(b"x", &cs(1000)),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        store.put_bytes(b"x", &cs(1 << 30)),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        store.put_file(&tmp.path().join("absent"), &PutOptions::default()),
        Err(Error::Io { .. })
    ));
    assert!(store.list().unwrap().is_empty());
    // a reader that fails midway leaves nothing visible and no tmp files
    struct Failing(usize);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("boom"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }
    assert!(store
        .put_reader(Failing(3 << 20), &PutOptions::named("half"))
        .is_err());
    assert!(store.list().unwrap().is_empty());
    assert!(store.lookup_name("half").unwrap().is_none());
    let tmps: Vec<_> = std::fs::read_dir(store.dir().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(tmps.is_empty(), "tmp files left: {tmps:?}");
    // a manifest whose bytes were tampered with is refused
    let id = store.put_bytes(b"abc", &PutOptions::default()).unwrap();
    let mp = store.dir().join("blobs").join(id.to_hex());
    let mut b = std::fs::read(&mp).unwrap();
    b[16] ^= 1;
    std::fs::write(&mp, b).unwrap();
    let fresh = Store::open(store.dir()).unwrap();
    assert!(matches!(
        fresh.manifest(&id),
        Err(Error::CorruptManifest { .. })
    ));
    assert!(!fresh.verify(false).unwrap().ok);
    assert!(
        fresh.gc(false).is_err(),
        "gc refuses to guess with a corrupt manifest"
    );
}

#[test]
fn local_limit_evicts_only_chunks_the_remote_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let remote = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
    let store = Store::open_with(
        &tmp.path().join("s"),
        StoreOptions {
            local_limit: Some(64 * 1024),
            cache_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    store.set_remote(remote);
    let c = 16 * 1024usize;
    let pushed = random_bytes(1, 16 * c);
    let local_only = random_bytes(2, 16 * c);
    let idp = store.put_bytes(&pushed, &cs(c as u32)).unwrap();
    let idl = store.put_bytes(&local_only, &cs(c as u32)).unwrap();
    store.push(&idp, &|_| {}).unwrap();
    let evicted = store.trim().unwrap();
    assert_eq!(
        evicted, 16,
        "all pushed chunks go (still over the limit), none of the others"
    );
    assert_eq!(store.stat(&idl).unwrap().local_chunks, 16);
    assert_eq!(store.stat(&idp).unwrap().local_chunks, 0);
    // Evicted data comes back from the remote on demand.
    assert_eq!(read_all(&store, &idp), pushed);
    assert_eq!(store.stats().remote_chunk_fetches, 16);
    assert_eq!(read_all(&store, &idl), local_only);
    assert!(store.verify(false).unwrap().ok);
}

#[test]
fn handles_are_shareable_across_threads_and_progress_is_reported() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Store>();
    shareable::<kiln_blockstore::BlobReader>();
    shareable::<kiln_blockstore::Overlay>();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s")).unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = seen.clone();
    let data = random_bytes(5, 300_000);
    let id = store
        .put_bytes(
            &data,
            &PutOptions {
                chunk_size: Some(65536),
                name: None,
                progress: Some(Arc::new(move |n| {
                    s2.store(n, std::sync::atomic::Ordering::Relaxed)
                })),
            },
        )
        .unwrap();
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::Relaxed),
        data.len() as u64
    );
    let mut out = Vec::new();
    store.write_to(&id, &mut out).unwrap();
    assert_eq!(out, data);
}

fn pack_files(store: &Store) -> usize {
    std::fs::read_dir(store.dir().join("packs"))
        .unwrap()
        .count()
}

#[test]
fn gc_merges_small_packs_and_other_handles_keep_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = Store::open(&dir).unwrap();
    let blobs: Vec<_> = (0..20)
        .map(|i| {
            let data = random_bytes(100 + i, 3 * 4096);
            (store.put_bytes(&data, &cs(4096)).unwrap(), data)
        })
        .collect();
    assert_eq!(pack_files(&store), 20, "one pack per put");
    // Another handle (as another process would be) has indexed the old packs.
    let other = Store::open_with(
        &dir,
        StoreOptions {
            cache_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(&other, &blobs[0].0), blobs[0].1);
    let rep = store.gc(false).unwrap();
    assert_eq!(rep.packs_merged, 20);
    assert_eq!(pack_files(&store), 1);
    for (id, data) in &blobs {
        assert_eq!(
            &read_all(&other, id),
            data,
            "the other handle finds the merged pack"
        );
        assert_eq!(&read_all(&store, id), data);
    }
    assert!(store.verify(false).unwrap().ok);
    assert_eq!(
        store.gc(false).unwrap().packs_merged,
        0,
        "one pack is left alone"
    );
}

#[test]
fn a_store_with_chunk_files_is_moved_into_a_pack_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let data = random_bytes(9, 5 * 4096 + 7);
    let id = {
        let store = Store::open(&dir).unwrap();
        let id = store.put_bytes(&data, &cs(4096)).unwrap();
        // Rewrite the store in the layout before packs: one file per chunk frame.
        for c in store.manifest(&id).unwrap().chunks.iter().flatten() {
            let loc = store.local_chunk(c).unwrap();
            let pack = std::fs::read(&loc.path).unwrap();
            let hex = c.to_hex();
            let sub = dir.join("chunks").join(&hex[..2]);
            std::fs::create_dir_all(&sub).unwrap();
            let frame = &pack[loc.offset as usize..(loc.offset + loc.len) as usize];
            std::fs::write(sub.join(hex), frame).unwrap();
        }
        id
    };
    std::fs::remove_dir_all(dir.join("packs")).unwrap();
    let store = Store::open(&dir).unwrap();
    assert!(!dir.join("chunks").exists());
    assert_eq!(pack_files(&store), 1);
    assert_eq!(read_all(&store, &id), data);
    assert!(store.verify(false).unwrap().ok);
}

#[test]
fn put_chunks_reads_in_place_and_matches_a_streamed_put() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s")).unwrap();
    let c = 4096usize;
    let mut data = random_bytes(5, 10 * c + 100);
    data[2 * c..4 * c].fill(0);
    let streamed = store.put_bytes(&data, &cs(c as u32)).unwrap();
    let size = data.len() as u64;
    let chunk = |i: usize| {
        let d = &data[i * c..((i + 1) * c).min(data.len())];
        d.iter().any(|&b| b != 0).then_some(d)
    };
    let in_place = store.put_chunks(size, &cs(c as u32), chunk).unwrap();
    assert_eq!(in_place, streamed, "same content, same blob");
    assert_eq!(read_all(&store, &in_place), data);
    // A chunk of the wrong length is refused and leaves no blob behind.
    let before = store.blob_ids().unwrap().len();
    let err = store
        .put_chunks(size + 1, &cs(c as u32), |i| {
            Some(&data[i * c..(i * c + 1).min(data.len())])
        })
        .unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
    assert_eq!(store.blob_ids().unwrap().len(), before);
}

#[test]
fn a_truncated_pack_counts_as_missing_never_as_wrong_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = Store::open(&dir).unwrap();
    let data = random_bytes(11, 6 * 4096);
    let id = store.put_bytes(&data, &cs(4096)).unwrap();
    let victim = store.manifest(&id).unwrap().chunks[2].unwrap();
    let pack = store.local_chunk(&victim).unwrap().path;
    // A crash cannot leave this (packs are renamed in whole), but a damaged disk can.
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let fresh = Store::open(&dir).unwrap();
    let err = fresh.read_at(&id, 2 * 4096, &mut [0u8; 8]).unwrap_err();
    assert!(
        matches!(err, Error::MissingChunk { chunk, .. } if chunk == victim),
        "{err}"
    );
    let rep = fresh.verify(false).unwrap();
    assert!(!rep.ok && rep.missing.contains(&victim), "{rep:?}");
    assert_eq!(rep.damaged_packs, vec![pack.clone()]);
    fresh.remove_blob(&id).unwrap();
    fresh.gc(false).unwrap();
    assert!(
        pack.exists(),
        "kiln never deletes a damaged pack: it is left for inspection"
    );
}

#[test]
fn verify_reports_a_pack_whose_index_does_not_match_its_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s")).unwrap();
    let data = random_bytes(12, 4 * 4096);
    let id = store.put_bytes(&data, &cs(4096)).unwrap();
    let c = store.manifest(&id).unwrap().chunks[0].unwrap();
    let pack = store.local_chunk(&c).unwrap().path;
    // Flip a byte of the last entry's length field in the index (the 44-byte entries sit
    // right before the 56-byte footer): the frame itself is untouched.
    flip_byte(&pack, -(56 + 44) + 43, 0x01);
    let rep = store.verify(false).unwrap();
    assert_eq!(rep.damaged_packs, vec![pack.clone()]);
    assert!(!rep.ok);
    // A new process does not trust the index either: the pack's chunks count as missing.
    let fresh = Store::open(store.dir()).unwrap();
    let rep = fresh.verify(false).unwrap();
    assert_eq!(rep.damaged_packs, vec![pack]);
    assert!(rep.missing.contains(&c), "{rep:?}");
}
