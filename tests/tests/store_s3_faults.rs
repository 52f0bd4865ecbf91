//! Faults around the S3 tier, through the real `kiln` binary and a real SeaweedFS:
//! damaged local chunks (detected, named, repaired from S3), S3 down, wrong credentials.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_tests::s3::{S3Server, BUCKET};
use kiln_tests::{pseudo_random, Kiln};

fn put_file(k: &Kiln, dir: &Path, data: &[u8], name: &str) -> String {
    let f = dir.join(format!("{name}.bin"));
    std::fs::write(&f, data).unwrap();
    k.ok_str([
        "store",
        "put",
        f.to_str().unwrap(),
        "--name",
        name,
        "--chunk-size",
        "64K",
    ])
}

#[test]
fn damaged_chunk_is_named_and_repaired_from_s3() {
    let Some(s3) = S3Server::start_or_skip("damaged_chunk_is_named_and_repaired_from_s3").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path().join("home")).with_env(s3.env());
    let data = pseudo_random(6 * 64 * 1024, 7);
    put_file(&k, tmp.path(), &data, "d");
    s3.add_origin(&k, &format!("s3://{BUCKET}/faults"));
    k.ok(["store", "push", "d"]);

    // Flip bytes in the middle of one stored chunk (a zstd frame).
    let victim = {
        let store = kiln_blockstore::Store::open(&k.store_dir()).unwrap();
        let m = store.manifest(&store.resolve("d").unwrap()).unwrap();
        let ids: Vec<_> = m.chunks.iter().flatten().copied().collect();
        assert_eq!(ids.len(), 6);
        let loc = store.local_chunk(&ids[3]).expect("chunk is local");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&loc.path)
            .unwrap();
        let mut bytes = vec![0u8; 16];
        let mid = loc.offset + loc.len / 2;
        f.read_exact_at(&mut bytes, mid).unwrap();
        bytes.iter_mut().for_each(|b| *b ^= 0xa5);
        f.write_all_at(&bytes, mid).unwrap();
        ids[3]
    };
    let chunk_hex = victim.to_hex();

    // Reading it fails, naming the chunk; nothing damaged reaches stdout.
    let out = k.run(["store", "cat", "d"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("integrity"), "{err}");
    assert!(
        err.contains(&chunk_hex),
        "error names the chunk {chunk_hex}: {err}"
    );
    assert!(out.stdout.len() < data.len());
    assert!(
        data.starts_with(&out.stdout),
        "bytes before the damage are correct"
    );

    // verify finds it (and fails); --repair heals it from S3.
    let err = k.fails(["store", "verify"]);
    assert!(err.contains("damaged"), "{err}");
    let rep = k.run(["store", "verify", "--json"]);
    let rep: serde_json::Value = serde_json::from_slice(&rep.stdout).unwrap();
    assert_eq!(rep["damaged"], serde_json::json!([chunk_hex]), "{rep}");
    let rep = k.json(["store", "verify", "--repair", "--json"]);
    assert_eq!(rep["repaired"], serde_json::json!([chunk_hex]), "{rep}");
    assert_eq!(rep["ok"], true, "{rep}");
    assert!(
        k.ok(["store", "cat", "d"]) == data,
        "healed blob reads back exactly"
    );
    k.ok(["store", "verify"]);
}

#[test]
fn s3_down_fails_fast_and_clean_then_works_when_back() {
    let Some(mut s3) =
        S3Server::start_or_skip("s3_down_fails_fast_and_clean_then_works_when_back").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = Kiln::new(tmp.path().join("a")).with_env(s3.env());
    let b = Kiln::new(tmp.path().join("b")).with_env(s3.env());
    let url = format!("s3://{BUCKET}/down");
    s3.add_origin(&a, &url);
    s3.add_origin(&b, &url);
    let data = pseudo_random(5 * 64 * 1024 + 99, 3);
    let id = put_file(&a, tmp.path(), &data, "d");

    s3.stop();
    let t = Instant::now();
    let err = a.fails(["store", "push", "d"]);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "push with S3 down took {:?}",
        t.elapsed()
    );
    assert!(
        err.contains("cannot reach S3 endpoint") && err.contains(&s3.endpoint()),
        "{err}"
    );
    let err = b.fails(["store", "pull", &id]);
    assert!(err.contains("cannot reach S3 endpoint"), "{err}");
    // Nothing half-done: B has no blob; local reads in A still work without S3.
    assert_eq!(b.json(["store", "ls", "--json"]), serde_json::json!([]));
    assert!(a.ok(["store", "cat", "d"]) == data);

    s3.restart().unwrap();
    // The failed push left no manifest in the remote (chunks may be there: harmless).
    assert!(s3
        .remote(BUCKET, "down")
        .list_manifests()
        .unwrap()
        .is_empty());
    a.ok(["store", "push", "d"]);
    assert_eq!(s3.remote(BUCKET, "down").list_manifests().unwrap().len(), 1);
    b.ok(["store", "pull", &id, "--name", "d"]);
    assert!(b.ok(["store", "cat", "d"]) == data);

    // S3 goes away in the middle of lazy reads: a clear error, no partial local state, and
    // the same read succeeds once it is back.
    let c = Kiln::new(tmp.path().join("c")).with_env(s3.env());
    s3.add_origin(&c, &url);
    c.ok(["store", "pull", &id, "--name", "d"]);
    s3.stop();
    let err = c.fails(["store", "cat", "d"]);
    assert!(err.contains("cannot reach S3 endpoint"), "{err}");
    assert_eq!(c.json(["store", "stat", "d", "--json"])["local_chunks"], 0);
    c.ok(["store", "verify"]); // remote-only chunks are fine, not damage
    s3.restart().unwrap();
    assert!(c.ok(["store", "cat", "d"]) == data);
}

#[test]
fn wrong_credentials_are_reported_without_leaking_the_secret() {
    let Some(s3) =
        S3Server::start_or_skip("wrong_credentials_are_reported_without_leaking_the_secret")
            .unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let secret = "not-the-secret-4242";
    let mut env = s3.env();
    for (k, v) in &mut env {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = secret.into();
        }
    }
    let bad = Kiln::new(tmp.path().join("a")).with_env(env);
    let url = format!("s3://{BUCKET}/creds");
    // `remote add` checks the bucket with the current credentials...
    let err = bad.fails([
        "remote",
        "add",
        "origin",
        &url,
        "--endpoint",
        &s3.endpoint(),
    ]);
    assert!(err.contains("denied access"), "{err}");
    assert!(!err.contains(secret), "secret leaked: {err}");
    assert!(
        !tmp.path().join("a/remotes.json").exists(),
        "failed add saved nothing"
    );
    // ...and --no-check adds it anyway; then push fails clearly and uploads no manifest.
    bad.ok([
        "remote",
        "add",
        "origin",
        &url,
        "--endpoint",
        &s3.endpoint(),
        "--no-check",
    ]);
    let remotes = std::fs::read_to_string(tmp.path().join("a/remotes.json")).unwrap();
    assert!(
        !remotes.contains(secret) && !remotes.contains("AWS"),
        "{remotes}"
    );
    let id = put_file(&bad, tmp.path(), &pseudo_random(100_000, 1), "d");
    let err = bad.fails(["store", "push", "d"]);
    assert!(err.contains("denied access"), "{err}");
    assert!(!err.contains(secret), "secret leaked: {err}");
    assert!(s3
        .remote(BUCKET, "creds")
        .list_manifests()
        .unwrap()
        .is_empty());
    // No credentials at all: a clear message saying where they come from.
    let none = Kiln::new(tmp.path().join("a")).with_env(
        s3.env()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET")),
    );
    let out = none
        .cmd(["store", "push", "d"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("credentials"),
        "{err}"
    );
    // Right credentials: the same command works.
    let good = Kiln::new(tmp.path().join("a")).with_env(s3.env());
    good.ok(["store", "push", "d"]);
    assert_eq!(
        s3.remote(BUCKET, "creds").list_manifests().unwrap()[0]
            .id
            .to_hex(),
        id
    );
}
