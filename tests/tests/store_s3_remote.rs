//! The S3 tier's own API against a real SeaweedFS: object layout, existence checks, listing,
//! deletion, prefix isolation, parallel upload, and remote gc through `kiln store gc --remote`.

use std::collections::HashSet;
use std::sync::Arc;

use kiln_blockstore::remote::RemoteError;
use kiln_blockstore::{Digest, PutOptions, Store, StoreOptions};
use kiln_tests::s3::{S3Server, BUCKET};
use kiln_tests::{pseudo_random, Kiln};

#[test]
fn chunk_and_manifest_objects_round_trip() {
    let Some(s3) = S3Server::start_or_skip("chunk_and_manifest_objects_round_trip").unwrap() else {
        return;
    };
    let r = s3.remote(BUCKET, "api/one");
    let other = s3.remote(BUCKET, "api/two");
    // 100 chunks: enough for has_chunks to answer from a LIST; 3 go by HEAD.
    let chunks: Vec<(Digest, Vec<u8>)> = (0..100u64)
        .map(|i| {
            let b = pseudo_random(1000 + i as usize * 37, i);
            (Digest::of(&b), b)
        })
        .collect();
    let ids: Vec<Digest> = chunks.iter().map(|c| c.0).collect();

    assert_eq!(r.has_chunks(&ids).unwrap(), vec![false; 100]);
    let mut uploaded = 0u64;
    r.put_chunks(chunks.iter().cloned().map(Ok), 8, &mut |n| uploaded += n)
        .unwrap();
    assert_eq!(
        uploaded,
        chunks.iter().map(|c| c.1.len() as u64).sum::<u64>()
    );
    assert_eq!(r.has_chunks(&ids).unwrap(), vec![true; 100]);
    assert_eq!(r.head_chunks(&ids).unwrap(), vec![true; 100]);
    assert_eq!(r.get_chunk(&ids[7]).unwrap(), chunks[7].1);
    let got = r.get_chunks(&ids[10..20]).unwrap();
    for (g, c) in got.iter().zip(&chunks[10..20]) {
        assert_eq!(g, &c.1);
    }
    // Another prefix in the same bucket sees none of it.
    assert_eq!(other.has_chunks(&ids[..3]).unwrap(), vec![false; 3]);
    assert!(other.list_chunks().unwrap().is_empty());

    let listed: HashSet<Digest> = r.list_chunks().unwrap().iter().map(|l| l.id).collect();
    assert_eq!(listed, ids.iter().copied().collect());
    let l = r.list_chunks().unwrap();
    let age = std::time::SystemTime::now()
        .duration_since(l[0].last_modified)
        .unwrap_or_default();
    assert!(age.as_secs() < 600, "last_modified is recent: {age:?}");

    let m = Digest::of(b"manifest");
    match r.get_manifest(&m) {
        Err(e @ RemoteError::NotFound { .. }) => assert!(e.to_string().contains(&m.to_hex())),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!r.has_manifest(&m).unwrap());
    r.put_manifest(&m, b"manifest").unwrap();
    assert_eq!(r.get_manifest(&m).unwrap(), b"manifest");
    assert_eq!(r.list_manifests().unwrap()[0].id, m);

    r.delete_chunks(&ids[..25]).unwrap();
    r.delete_chunks(&ids[..2]).unwrap(); // already gone: not an error
    let have = r.has_chunks(&ids).unwrap();
    assert_eq!(have.iter().filter(|h| **h).count(), 75);
    assert!(have[25..].iter().all(|h| *h));
    assert_eq!(
        r.head_chunks(&ids).unwrap(),
        have,
        "LIST and HEAD answers agree"
    );
    assert_eq!(r.has_chunks(&ids[..3]).unwrap(), vec![false; 3]);
    assert_eq!(r.has_chunks(&ids[30..33]).unwrap(), vec![true; 3]);
    assert!(r.get_chunk(&ids[0]).unwrap_err().is_not_found());
    r.delete_manifests(&[m]).unwrap();
    assert!(r.list_manifests().unwrap().is_empty());

    // A bucket that does not exist is named as such.
    let err = s3.remote("no-such-bucket", "").check().unwrap_err();
    assert!(matches!(err, RemoteError::NoSuchBucket { .. }), "{err}");
    assert!(err.to_string().contains("no-such-bucket"), "{err}");
}

#[test]
fn remote_gc_deletes_only_unreferenced_chunks() {
    let Some(s3) = S3Server::start_or_skip("remote_gc_deletes_only_unreferenced_chunks").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // Two blobs sharing their first 4 chunks, pushed through the library.
    let store = Store::open(&tmp.path().join("home/store")).unwrap();
    let remote = Arc::new(s3.remote(BUCKET, "gc"));
    store.set_remote(remote.clone());
    let shared = pseudo_random(4 * 65536, 1);
    let mut a = shared.clone();
    a.extend(pseudo_random(3 * 65536, 2));
    let mut b = shared.clone();
    b.extend(pseudo_random(2 * 65536, 3));
    let opts = PutOptions {
        chunk_size: Some(65536),
        ..PutOptions::default()
    };
    let ida = store.put_bytes(&a, &opts).unwrap();
    let idb = store.put_bytes(&b, &opts).unwrap();
    store.push(&ida, &|_| {}).unwrap();
    store.push(&idb, &|_| {}).unwrap();
    assert_eq!(remote.list_chunks().unwrap().len(), 4 + 3 + 2);
    // An orphan chunk nobody references (e.g. from a push that died before its manifest).
    let orphan = pseudo_random(5000, 9);
    remote.put_chunk(&Digest::of(&orphan), &orphan).unwrap();
    drop(store);

    // B's manifest disappears from the remote; gc --remote may then drop B's own chunks and
    // the orphan, but only those older than the grace period: with the default (1 h) nothing
    // goes, which is what protects concurrent pushes from other hosts.
    remote.delete_manifests(&[idb]).unwrap();
    let k = Kiln::new(tmp.path().join("home")).with_env(s3.env());
    s3.add_origin(&k, &format!("s3://{BUCKET}/gc"));
    k.ok(["store", "rm", &idb.to_hex()]);
    let rep = k.json(["store", "gc", "--remote", "--json"]);
    assert_eq!(rep["remote_chunks_removed"], 0, "{rep}");
    assert_eq!(remote.list_chunks().unwrap().len(), 10);
    // With no grace period, the same gc deletes B's own chunks and the orphan, nothing else.
    let store = Store::open_with(
        &tmp.path().join("home/store"),
        StoreOptions {
            remote_gc_grace: std::time::Duration::ZERO,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.set_remote(remote.clone());
    let rep = store.gc(true).unwrap();
    assert_eq!(rep.remote_chunks_removed, 3, "{rep:?}");
    assert_eq!(remote.list_chunks().unwrap().len(), 7);
    // A's data stays complete and readable from the remote alone.
    let fresh = Kiln::new(tmp.path().join("fresh")).with_env(s3.env());
    s3.add_origin(&fresh, &format!("s3://{BUCKET}/gc"));
    fresh.ok(["store", "pull", &ida.to_hex()]);
    assert!(fresh.ok(["store", "cat", &ida.to_hex()]) == a);
}
