//! Crash loop: `kiln store put` and `kiln store gc` killed with SIGKILL at random moments.
//! After every kill the store must verify clean, and every visible blob must read back as
//! exactly one of the inputs (no dangling references, no torn blobs).

use std::collections::HashMap;
use std::time::Duration;

use kiln_tests::{pseudo_random, Kiln};
use rand::{Rng, SeedableRng};

#[test]
fn kill_9_during_put_and_gc_leaves_a_consistent_store() {
    let seed: u64 = std::env::var("KILN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash loop seed {seed} (rerun with KILN_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path().join("home"));

    // Inputs: hash of content -> content, so any visible blob can be matched to its input.
    let mut inputs: HashMap<kiln_blockstore::Digest, Vec<u8>> = HashMap::new();
    let mut files = Vec::new();
    for i in 0..6u64 {
        // 3-6 MiB, 64 KiB chunks, with a shared prefix so blobs share chunks (gc must not
        // delete chunks a surviving blob still uses).
        let mut data = pseudo_random(1 << 20, 999);
        data.extend(pseudo_random((2 + i as usize % 4) << 20, i));
        let f = tmp.path().join(format!("in{i}.bin"));
        std::fs::write(&f, &data).unwrap();
        inputs.insert(kiln_blockstore::Digest::of(&data), data);
        files.push(f);
    }
    k.ok([
        "store",
        "put",
        files[0].to_str().unwrap(),
        "--name",
        "keep",
        "--chunk-size",
        "64K",
    ]);

    let mut killed = 0;
    for iter in 0..20 {
        let gc = rng.random_bool(0.35);
        let mut cmd = if gc {
            // Give gc something to collect: drop a random blob other than "keep".
            let list = k.json(["store", "ls", "--json"]);
            let victims: Vec<String> = list
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| !b["names"].as_array().unwrap().iter().any(|n| n == "keep"))
                .map(|b| b["id"].as_str().unwrap().to_string())
                .collect();
            if !victims.is_empty() {
                let v = &victims[rng.random_range(0..victims.len())];
                k.ok(["store", "rm", v]);
            }
            k.cmd(["store", "gc"])
        } else {
            let f = &files[rng.random_range(0..files.len())];
            k.cmd(["store", "put", f.to_str().unwrap(), "--chunk-size", "64K"])
        };
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.random_range(0..60_000)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();

        // Invariants after every crash.
        let out = k.run(["store", "verify", "--json"]);
        let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(
            out.status.success() && rep["ok"] == true,
            "iteration {iter} ({}): verify failed: {rep}\n{}",
            if gc { "gc" } else { "put" },
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("killed {killed} of 20 processes mid-flight");

    // A clean gc after the storm, then every visible blob reads back as one of the inputs.
    k.ok(["store", "gc"]);
    k.ok(["store", "verify"]);
    let list = k.json(["store", "ls", "--json"]);
    let list = list.as_array().unwrap();
    assert!(!list.is_empty(), "at least 'keep' survives");
    for b in list {
        let id = b["id"].as_str().unwrap();
        let bytes = k.ok(["store", "cat", id]);
        assert!(
            inputs.contains_key(&kiln_blockstore::Digest::of(&bytes)),
            "blob {id} ({} bytes) matches no input",
            bytes.len()
        );
    }
    // And the store still takes new writes.
    let id = k.ok_str([
        "store",
        "put",
        files[5].to_str().unwrap(),
        "--chunk-size",
        "64K",
    ]);
    assert!(
        k.ok(["store", "cat", &id])
            == inputs[&kiln_blockstore::Digest::of(&std::fs::read(&files[5]).unwrap())]
    );
}
