//! What sandboxes keep in the store, and for how long (real runsc, the real kiln binary): a
//! paused sandbox's state is kept while it is paused, a snapshot while a name or a sandbox needs
//! it, and not a moment longer: after kill and gc the store is back to what images need.

use kiln_tests::sandbox::{app_home, create, sh, KillAll};
use kiln_tests::Kiln;

/// Bytes of chunk data on disk (packs) in the home's store.
fn store_bytes(k: &Kiln) -> u64 {
    std::fs::read_dir(k.store_dir().join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Every store name (decoded from the name files).
fn names(k: &Kiln) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(k.store_dir().join("names"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let h = e.file_name().to_string_lossy().into_owned();
            String::from_utf8(hex::decode(h).ok()?).ok()
        })
        .collect();
    v.sort();
    v
}

fn blob_count(k: &Kiln) -> usize {
    std::fs::read_dir(k.store_dir().join("blobs"))
        .unwrap()
        .flatten()
        .count()
}

fn gc(k: &Kiln) {
    k.ok(["store", "gc"]);
}

/// 8 MiB of incompressible data in the sandbox's writable layer, so every checkpoint is large.
fn fill(k: &Kiln, id: &str, file: &str) {
    sh(
        k,
        id,
        &format!("head -c 8388608 /dev/urandom > /work/{file}; sync; wc -c < /work/{file}"),
    );
}

#[test]
fn pause_state_snapshots_and_forks_are_freed_once_nothing_needs_them() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    gc(&k);
    let (base_bytes, base_names, base_blobs) = (store_bytes(&k), names(&k), blob_count(&k));

    // Pause/resume cycles: at most one paused state is kept at any time.
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    fill(&k, &id, "big");
    let mut paused_sizes = Vec::new();
    for _ in 0..6 {
        k.ok(["sandbox", "pause", &id]);
        gc(&k);
        paused_sizes.push(store_bytes(&k) - base_bytes);
        let holds: Vec<String> = names(&k)
            .into_iter()
            .filter(|n| n.starts_with("hold:"))
            .collect();
        assert!(
            holds
                .iter()
                .all(|n| n.starts_with(&format!("hold:sandbox:{id}:"))),
            "{holds:?}"
        );
        k.ok(["sandbox", "resume", &id]);
        gc(&k);
        // Resumed (gVisor reads the whole state back): nothing of the pause is needed.
        assert_eq!(names(&k), base_names, "holds left after resume");
    }
    let (first, last) = (paused_sizes[0], *paused_sizes.last().unwrap());
    assert!(
        first > 4 << 20,
        "the paused state holds the 8 MiB file: {first}"
    );
    assert!(
        last < first + first / 2,
        "paused state grew with the history: {paused_sizes:?}"
    );

    // A named snapshot outlives its sandbox; a fork's snapshot only its forks.
    k.ok(["sandbox", "snapshot", &id, "--name", "warm"]);
    let forks = k.json(["sandbox", "fork", &id, "-n", "2", "--json"]);
    assert_eq!(forks.as_array().unwrap().len(), 2);
    k.ok(["sandbox", "pause", &id]);
    k.ok(["sandbox", "kill", &id]);
    for f in forks.as_array().unwrap() {
        k.ok(["sandbox", "kill", f["id"].as_str().unwrap()]);
    }
    gc(&k);
    let with_snapshot = store_bytes(&k) - base_bytes;
    assert!(with_snapshot > 4 << 20, "the named snapshot is kept");
    assert!(
        with_snapshot < 2 * first,
        "only the named snapshot is kept: {with_snapshot} vs one state {first}"
    );
    let from_snapshot = create(&k, &["--snapshot", "warm"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sh(&k, &from_snapshot, "wc -c < /work/big").trim(),
        "8388608"
    );
    k.ok(["sandbox", "kill", &from_snapshot]);

    // Removing the name frees it; nothing is left but what the image needs.
    let out = k.ok_str(["sandbox", "snapshots"]);
    assert!(out.contains("warm"), "{out}");
    k.ok(["sandbox", "snapshots", "rm", "warm"]);
    let err = k.fails(["sandbox", "snapshots", "rm", "warm"]);
    assert!(err.contains("no snapshot named warm"), "{err}");
    gc(&k);
    assert_eq!(names(&k), base_names);
    assert_eq!(blob_count(&k), base_blobs);
    let left = store_bytes(&k);
    assert!(
        left <= base_bytes + (64 << 10),
        "store holds {left} bytes after everything is gone, {base_bytes} before"
    );
}

#[test]
fn killing_a_paused_sandbox_frees_its_state() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    gc(&k);
    let (base_bytes, base_names) = (store_bytes(&k), names(&k));
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    fill(&k, &id, "big");
    k.ok(["sandbox", "pause", &id]);
    gc(&k);
    assert!(store_bytes(&k) > base_bytes + (4 << 20));
    k.ok(["sandbox", "kill", &id]);
    gc(&k);
    assert_eq!(names(&k), base_names);
    assert!(store_bytes(&k) <= base_bytes + (64 << 10));
}
