//! Put + push from one home, pull + read from another, through the real `kiln` binary and a
//! real SeaweedFS; lazy reads fetch only the chunks they touch.

use std::sync::Arc;

use kiln_blockstore::{PutOptions, Store};
use kiln_tests::s3::{S3Server, BUCKET};
use kiln_tests::{pseudo_random, Kiln};

const CHUNK: usize = 64 * 1024;

/// 20 chunks of 64 KiB: random, a zero run (chunks 8-11), random again, and a partial tail.
fn sample() -> Vec<u8> {
    let mut data = pseudo_random(8 * CHUNK, 1);
    data.extend(std::iter::repeat_n(0u8, 4 * CHUNK));
    data.extend(pseudo_random(7 * CHUNK + 1234, 2));
    data
}

#[test]
fn push_from_one_home_pull_lazily_into_another() {
    let Some(s3) = S3Server::start_or_skip("push_from_one_home_pull_lazily_into_another").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = Kiln::new(tmp.path().join("a")).with_env(s3.env());
    let b = Kiln::new(tmp.path().join("b")).with_env(s3.env());
    let data = sample();
    let file = tmp.path().join("disk.img");
    std::fs::write(&file, &data).unwrap();
    let url = format!("s3://{BUCKET}/roundtrip");

    let id = a.ok_str([
        "store",
        "put",
        file.to_str().unwrap(),
        "--name",
        "disk",
        "--chunk-size",
        "64K",
    ]);
    assert_eq!(id.len(), 64, "put prints the blob id: {id:?}");
    s3.add_origin(&a, &url);
    let push = a.json(["store", "push", "disk", "--json"]);
    let stored = 20 - 4; // distinct non-zero chunks
    assert_eq!(push["chunks"], stored, "{push}");
    assert_eq!(push["chunks_uploaded"], stored, "{push}");
    // Pushing again uploads nothing: the remote already has every chunk.
    let again = a.json(["store", "push", "disk", "--json"]);
    assert_eq!(again["chunks_uploaded"], 0, "{again}");

    // A second, empty home: nothing local until pulled.
    s3.add_origin(&b, &url);
    assert!(b.fails(["store", "cat", "disk"]).contains("disk"));
    let pull = b.json(["store", "pull", &id, "--name", "disk", "--json"]);
    assert_eq!(
        pull["chunks_fetched"], 0,
        "pull fetches only the manifest: {pull}"
    );
    let st = b.json(["store", "stat", "disk", "--json"]);
    assert_eq!(st["local_chunks"], 0, "{st}");
    assert_eq!(st["size"], data.len(), "{st}");

    // A range inside chunks 2..=3 fetches exactly those two chunks.
    let off = 2 * CHUNK + 100;
    let len = CHUNK + 10;
    let part = b.ok([
        "store",
        "cat",
        "disk",
        "--offset",
        &off.to_string(),
        "--length",
        &len.to_string(),
    ]);
    assert_eq!(part, &data[off..off + len]);
    let st = b.json(["store", "stat", "disk", "--json"]);
    assert_eq!(
        st["local_chunks"], 2,
        "lazy read fetched only the touched chunks: {st}"
    );

    // A range in the zero run touches no stored chunk at all.
    let zeros = b.ok([
        "store",
        "cat",
        "disk",
        "--offset",
        &(9 * CHUNK).to_string(),
        "--length",
        "1000",
    ]);
    assert_eq!(zeros, vec![0u8; 1000]);
    assert_eq!(
        b.json(["store", "stat", "disk", "--json"])["local_chunks"],
        2
    );

    // The whole blob, via get (atomic file) and cat (stdout): byte-identical.
    let out = tmp.path().join("out.img");
    b.ok(["store", "get", "disk", "-o", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data, "get: bytes differ");
    assert!(b.ok(["store", "cat", &id]) == data, "cat: bytes differ");
    assert_eq!(
        b.json(["store", "stat", "disk", "--json"])["local_chunks"],
        stored
    );
    b.ok(["store", "verify"]);
}

#[test]
fn library_lazy_read_counts_remote_fetches() {
    let Some(s3) = S3Server::start_or_skip("library_lazy_read_counts_remote_fetches").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = sample();
    let a = Store::open(&tmp.path().join("a")).unwrap();
    a.set_remote(Arc::new(s3.remote(BUCKET, "lib")));
    let opts = PutOptions {
        chunk_size: Some(CHUNK as u32),
        ..PutOptions::default()
    };
    let id = a.put_bytes(&data, &opts).unwrap();
    a.push(&id, &|_| {}).unwrap();

    let b = Store::open(&tmp.path().join("b")).unwrap();
    b.set_remote(Arc::new(s3.remote(BUCKET, "lib")));
    b.pull(&id).unwrap();
    assert_eq!(b.stats().remote_chunk_fetches, 0);
    let r = b.open_blob(&id).unwrap();
    let mut buf = vec![0u8; 3000];
    // Straddles chunks 14 and 15.
    let off = (15 * CHUNK - 1000) as u64;
    assert_eq!(r.read_at(off, &mut buf).unwrap(), 3000);
    assert_eq!(buf, &data[off as usize..off as usize + 3000]);
    assert_eq!(b.stats().remote_chunk_fetches, 2);
    // Re-reading the same range is served locally.
    r.read_at(off, &mut buf).unwrap();
    assert_eq!(b.stats().remote_chunk_fetches, 2);
    // The tail (partial last chunk) reads back exactly.
    let tail = data.len() as u64 - 500;
    let mut t = vec![0u8; 1000];
    assert_eq!(r.read_at(tail, &mut t).unwrap(), 500);
    assert_eq!(&t[..500], &data[tail as usize..]);
    assert_eq!(b.stats().remote_chunk_fetches, 3);
}
