//! Bundles against a real SeaweedFS: a push of many chunks also uploads them as one object;
//! another home fetches a blob it lacks out of it in a few range GETs; damaged, truncated,
//! lying or deleted bundles only cost the chunk-by-chunk fetch, every chunk still verified;
//! remote gc removes the bundles of blobs the remote no longer has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_blockstore::remote::S3Remote;
use kiln_blockstore::{BlobId, PutOptions, Store, StoreOptions};
use kiln_tests::s3::{S3Server, BUCKET};
use kiln_tests::{pseudo_random, Kiln};

const PAGE: usize = 4096;

/// `pages` 4 KiB pages of random bytes, every 16th all zeros (stored as nothing).
fn memory(pages: usize, seed: u64) -> Vec<u8> {
    let mut data = pseudo_random(pages * PAGE, seed);
    for p in (0..pages).step_by(16) {
        data[p * PAGE..(p + 1) * PAGE].fill(0);
    }
    data
}

fn pages() -> PutOptions {
    PutOptions {
        chunk_size: Some(PAGE as u32),
        ..PutOptions::default()
    }
}

fn store(dir: &std::path::Path, remote: &Arc<S3Remote>) -> Store {
    let s = Store::open(dir).unwrap();
    s.set_remote(remote.clone());
    s
}

fn read_all(s: &Store, id: &BlobId) -> Vec<u8> {
    let r = s.open_blob(id).unwrap();
    let mut out = vec![0u8; r.len() as usize];
    assert_eq!(r.read_at(0, &mut out).unwrap(), out.len());
    out
}

/// Distinct non-zero chunks of a blob.
fn stored_chunks(s: &Store, id: &BlobId) -> u64 {
    s.stat(id).unwrap().unique_chunks
}

/// The whole bundle of `id` (a suffix range longer than the object answers all of it).
fn bundle_bytes(r: &S3Remote, id: &BlobId) -> Vec<u8> {
    let (b, size) = r.bundle_tail(id, 1 << 30).unwrap().expect("a bundle");
    assert_eq!(b.len() as u64, size);
    b
}

fn put_raw_bundle(r: &S3Remote, id: &BlobId, bytes: Vec<u8>) {
    r.put_bundle(id, &mut std::iter::once(Ok(bytes))).unwrap();
}

#[test]
fn a_push_of_many_chunks_writes_a_bundle_and_another_home_fetches_through_it() {
    let Some(s3) = S3Server::start_or_skip("a_push_of_many_chunks_writes_a_bundle").unwrap() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let remote = Arc::new(s3.remote(BUCKET, "bundles"));
    let a = store(&tmp.path().join("a"), &remote);
    // 12 MiB of pages: the bundle (~11.3 MiB) goes up as a multipart upload of two parts.
    let data = memory(3072, 1);
    let id = a.put_bytes(&data, &pages()).unwrap();
    let n = stored_chunks(&a, &id);
    assert_eq!(n, 3072 - 192);
    let t = Instant::now();
    let rep = a.push(&id, &|_| {}).unwrap();
    eprintln!("push of {n} pages and their bundle: {:?}", t.elapsed());
    assert_eq!(rep.chunks_uploaded, n);
    assert!(rep.bundle_bytes > n * PAGE as u64, "{rep:?}");
    let listed = remote.list_bundles().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].size, rep.bundle_bytes);
    // Every chunk is still its own object too: the bundle only accelerates.
    assert_eq!(remote.list_chunks().unwrap().len() as u64, n);

    // A second home lacking everything: the tail (the index), then 4 MiB ranges.
    let b = store(&tmp.path().join("b"), &remote);
    b.pull(&id).unwrap();
    let t = Instant::now();
    assert_eq!(b.fetch_missing(&[id]).unwrap(), n);
    eprintln!(
        "fetch_missing of {n} pages through the bundle: {:?}",
        t.elapsed()
    );
    let st = b.stats();
    assert_eq!(st.remote_chunk_fetches, n, "{st:?}");
    assert_eq!(
        st.bundle_chunk_fetches, n,
        "every chunk came out of the bundle: {st:?}"
    );
    assert!(st.bundle_requests <= 5, "{st:?}");
    assert_eq!(st.integrity_errors, 0);
    assert_eq!(read_all(&b, &id), data);
    assert_eq!(b.stats().remote_chunk_fetches, n, "all of it was local");
    assert!(b.verify(false).unwrap().ok);

    // A third home that already read a few pages here and there: the bundle gives the rest,
    // its ranges coalesced over the pages it has.
    let c = store(&tmp.path().join("c"), &remote);
    c.pull(&id).unwrap();
    let mut buf = vec![0u8; PAGE];
    for p in (1..3072).step_by(97) {
        c.read_at(&id, (p * PAGE) as u64, &mut buf).unwrap();
    }
    let before = c.stats();
    let read = before.remote_chunk_fetches;
    assert_eq!(c.fetch_missing(&[id]).unwrap(), n - read);
    let st = c.stats();
    assert_eq!(st.bundle_chunk_fetches, n - read, "{st:?}");
    assert!(st.bundle_requests - before.bundle_requests <= 5, "{st:?}");
    assert_eq!(read_all(&c, &id), data);

    // The next checkpoint of the same memory: 150 pages changed. Its push bundles just those
    // and names the first bundle, which holds the rest: a home without either fetches all of
    // it out of the two bundles.
    let next = change(&data, 150, 1000);
    let id2 = a.put_bytes(&next, &pages()).unwrap();
    let rep = a.push(&id2, &|_| {}).unwrap();
    assert_eq!(rep.chunks_uploaded, 150, "{rep:?}");
    assert!(rep.bundle_bytes > 150 * PAGE as u64, "{rep:?}");
    assert!(rep.bundle_bytes < 160 * PAGE as u64, "{rep:?}");
    let d = store(&tmp.path().join("d"), &remote);
    d.pull(&id2).unwrap();
    assert_eq!(d.fetch_missing(&[id2]).unwrap(), n);
    let st = d.stats();
    assert_eq!(st.bundle_chunk_fetches, n, "{st:?}");
    assert!(st.bundle_requests <= 8, "two indexes, a few ranges: {st:?}");
    assert_eq!(read_all(&d, &id2), next);

    // That home (the sandbox resumed there) checkpoints again, 10 pages changed: too few for
    // a bundle of their own, but it read the rest out of two bundles, so its push names them.
    let third = change(&next, 10, 5000);
    let id3 = d.put_bytes(&third, &pages()).unwrap();
    let rep = d.push(&id3, &|_| {}).unwrap();
    assert_eq!(rep.chunks_uploaded, 10, "{rep:?}");
    assert!(rep.bundle_bytes > 0, "{rep:?}");
    let e = store(&tmp.path().join("e"), &remote);
    e.pull(&id3).unwrap();
    assert_eq!(e.fetch_missing(&[id3]).unwrap(), n);
    let st = e.stats();
    assert_eq!(st.bundle_chunk_fetches, n, "{st:?}");
    assert!(
        st.bundle_requests <= 12,
        "three indexes, a few ranges: {st:?}"
    );
    assert_eq!(read_all(&e, &id3), third);

    // A push of few chunks of a small blob uploads no bundle.
    let small = a.put_bytes(&memory(40, 7), &pages()).unwrap();
    assert_eq!(a.push(&small, &|_| {}).unwrap().bundle_bytes, 0);
    assert_eq!(remote.list_bundles().unwrap().len(), 3);
}

/// `data` with `count` of its non-zero pages (every 15th from page 3) replaced.
fn change(data: &[u8], count: usize, seed: u64) -> Vec<u8> {
    let mut out = data.to_vec();
    let pages = (3..data.len() / PAGE).step_by(15).filter(|p| p % 16 != 0);
    for p in pages.take(count) {
        out[p * PAGE..(p + 1) * PAGE].copy_from_slice(&pseudo_random(PAGE, seed + p as u64));
    }
    out
}

#[test]
fn damaged_truncated_lying_or_deleted_bundles_fall_back_to_chunks() {
    let Some(s3) = S3Server::start_or_skip("damaged_bundles_fall_back_to_chunks").unwrap() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let remote = Arc::new(s3.remote(BUCKET, "damaged"));
    let a = store(&tmp.path().join("a"), &remote);
    let data = memory(512, 2);
    let id = a.put_bytes(&data, &pages()).unwrap();
    a.push(&id, &|_| {}).unwrap();
    let n = stored_chunks(&a, &id);
    let good = bundle_bytes(&remote, &id);
    let len = good.len();
    let entries = n as usize;
    let index_at = len - 20 - 36 * entries;
    let entry_len = |i: usize| index_at + 36 * i + 32;
    let frame_len = |b: &[u8], i: usize| {
        u32::from_le_bytes(b[entry_len(i)..entry_len(i) + 4].try_into().unwrap()) as usize
    };

    let mut cases: Vec<(&str, Option<Vec<u8>>, u64, u64)> = Vec::new();
    // (what, the bundle (None: deleted), chunks expected from it, integrity errors expected)
    let mut flipped = good.clone();
    flipped[frame_len(&good, 0) + 100] ^= 0x40; // in the second frame's data
    cases.push(("a flipped byte in a frame", Some(flipped), n - 1, 1));
    cases.push(("truncated", Some(good[..len - 100].to_vec()), 0, 0));
    cases.push(("cut in the middle", Some(good[..len / 2].to_vec()), 0, 0));
    let mut huge = good.clone();
    huge[len - 16..len - 12].copy_from_slice(&u32::MAX.to_le_bytes());
    cases.push(("an index claiming 4 billion chunks", Some(huge), 0, 0));
    let mut past = good.clone();
    past[entry_len(3)..entry_len(3) + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    cases.push(("a frame length past the end", Some(past), 0, 0));
    // Lengths that still add up, but split frames 5 and 6 in the wrong place.
    let mut shifted = good.clone();
    let (l5, l6) = (frame_len(&good, 5), frame_len(&good, 6));
    shifted[entry_len(5)..entry_len(5) + 4].copy_from_slice(&(l5 as u32 + 7).to_le_bytes());
    shifted[entry_len(6)..entry_len(6) + 4].copy_from_slice(&(l6 as u32 - 7).to_le_bytes());
    cases.push(("lengths that add up but lie", Some(shifted), n - 2, 2));
    // Chunk ids swapped: each frame is checked against the id it is taken for.
    let mut swapped = good.clone();
    let (e0, e1) = (index_at, index_at + 36);
    let id0: Vec<u8> = good[e0..e0 + 32].to_vec();
    swapped.copy_within(e1..e1 + 32, e0);
    swapped[e1..e1 + 32].copy_from_slice(&id0);
    cases.push(("two ids swapped", Some(swapped), n - 2, 2));
    cases.push(("garbage", Some(pseudo_random(300_000, 9)), 0, 0));
    cases.push(("empty", Some(Vec::new()), 0, 0));
    cases.push(("deleted", None, 0, 0));

    for (i, (what, bundle, from_bundle, errors)) in cases.into_iter().enumerate() {
        match bundle {
            Some(b) => put_raw_bundle(&remote, &id, b),
            None => remote.delete_bundles(&[id]).unwrap(),
        }
        let s = store(&tmp.path().join(format!("case{i}")), &remote);
        s.pull(&id).unwrap();
        assert_eq!(s.fetch_missing(&[id]).unwrap(), n, "{what}");
        let st = s.stats();
        assert_eq!(st.remote_chunk_fetches, n, "{what}: {st:?}");
        assert_eq!(st.bundle_chunk_fetches, from_bundle, "{what}: {st:?}");
        assert_eq!(st.integrity_errors, errors, "{what}: {st:?}");
        assert_eq!(read_all(&s, &id), data, "{what}");
        assert!(s.verify(false).unwrap().ok, "{what}");
    }
}

#[test]
fn remote_gc_removes_bundles_whose_blob_is_gone_and_cli_commands_ignore_them() {
    let Some(s3) = S3Server::start_or_skip("remote_gc_removes_orphan_bundles").unwrap() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let remote = Arc::new(s3.remote(BUCKET, "gc"));
    let home = tmp.path().join("home");
    let a = store(&home.join("store"), &remote);
    let keep = a.put_bytes(&memory(200, 3), &pages()).unwrap();
    let gone = a.put_bytes(&memory(200, 4), &pages()).unwrap();
    a.push(&keep, &|_| {}).unwrap();
    a.push(&gone, &|_| {}).unwrap();
    assert_eq!(remote.list_bundles().unwrap().len(), 2);
    drop(a);
    remote.delete_manifests(&[gone]).unwrap();

    // Through the CLI: verify and gc against a remote holding bundles; within the grace
    // period (1 h) gc keeps the orphan bundle (its push may still be under way).
    let k = Kiln::new(home.clone()).with_env(s3.env());
    s3.add_origin(&k, &format!("s3://{BUCKET}/gc"));
    k.ok(["store", "rm", &gone.to_hex()]);
    let v = k.json(["store", "verify", "--remote", "origin", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    let rep = k.json(["store", "gc", "--remote", "--json"]);
    assert_eq!(rep["remote_bundles_removed"], 0, "{rep}");
    assert_eq!(remote.list_bundles().unwrap().len(), 2);

    let a = Store::open_with(
        &home.join("store"),
        StoreOptions {
            remote_gc_grace: Duration::ZERO,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    a.set_remote(remote.clone());
    let rep = a.gc(true).unwrap();
    assert_eq!(rep.remote_bundles_removed, 1, "{rep:?}");
    let left: Vec<BlobId> = remote
        .list_bundles()
        .unwrap()
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(left, vec![keep]);
    // The kept blob still comes whole through its bundle.
    let b = store(&tmp.path().join("b"), &remote);
    b.pull(&keep).unwrap();
    let n = stored_chunks(&b, &keep);
    assert_eq!(b.fetch_missing(&[keep]).unwrap(), n);
    assert_eq!(b.stats().bundle_chunk_fetches, n);
    assert_eq!(read_all(&b, &keep), memory(200, 3));
}
