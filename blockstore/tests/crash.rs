//! Crash safety: child processes doing puts and gc are killed with SIGKILL at random moments,
//! again and again; afterwards every visible blob must read back whole and correct, and
//! `verify` must find no dangling reference.
//!
//! The children are this same test binary re-executed with `KILN_CRASH_CHILD` set.

use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_blockstore::{Error, PutOptions, Store};
use rand::{Rng, RngCore, SeedableRng};

const CS: u32 = 16 * 1024;

/// Deterministic content for `seed`: sizes vary (small puts fsync files one by one, large ones
/// use syncfs), the first chunk is shared by all (dedup), some chunks are zero.
fn content(seed: u64) -> Vec<u8> {
    let size = (seed % 7) as usize * 90_000 + 20_000;
    let mut v = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    rand::rngs::StdRng::seed_from_u64(0).fill_bytes(&mut v[..CS as usize]);
    if size > 3 * CS as usize {
        v[CS as usize * 2..CS as usize * 3].fill(0);
    }
    v
}

fn child(mode: &str, dir: &std::path::Path) {
    let store = Store::open(dir).unwrap();
    let mut r = rand::rngs::StdRng::from_os_rng();
    loop {
        let seed = r.random_range(0..40u64);
        match mode {
            "put" => {
                let opts = PutOptions {
                    chunk_size: Some(CS),
                    name: Some(format!("seed-{seed}")),
                    progress: None,
                };
                store.put_bytes(&content(seed), &opts).unwrap();
            }
            _ => {
                if let Ok(id) = store.resolve(&format!("seed-{seed}")) {
                    let _ = store.remove_blob(&id);
                }
                store.gc(false).unwrap();
            }
        }
    }
}

/// Entry point of the child processes (does nothing when run as a normal test).
#[test]
fn crash_child_entrypoint() {
    if let (Ok(mode), Ok(dir)) = (
        std::env::var("KILN_CRASH_CHILD"),
        std::env::var("KILN_CRASH_DIR"),
    ) {
        child(&mode, std::path::Path::new(&dir));
    }
}

fn check(dir: &std::path::Path) -> usize {
    let store = Store::open(dir).unwrap();
    let mut n = 0;
    for id in store.blob_ids().unwrap() {
        let r = store.open_blob(&id).unwrap();
        let mut buf = vec![0u8; r.len() as usize];
        match r.read_at(0, &mut buf) {
            Ok(_) => {}
            Err(e @ (Error::MissingChunk { .. } | Error::Integrity { .. })) => {
                panic!("visible blob {id} is damaged after a crash: {e}")
            }
            Err(e) => panic!("{e}"),
        }
        n += 1;
    }
    for (name, id) in store.names().unwrap() {
        if !store.contains(&id) {
            continue; // name written, blob removed by gc child: a dangling name is harmless
        }
        let seed: u64 = name.strip_prefix("seed-").unwrap().parse().unwrap();
        let r = store.open_blob(&id).unwrap();
        let mut buf = vec![0u8; r.len() as usize];
        r.read_at(0, &mut buf).unwrap();
        assert!(buf == content(seed), "{name} has wrong content");
    }
    let rep = store.verify(false).unwrap();
    assert!(rep.ok, "{rep:?}");
    n
}

#[test]
fn kill_9_during_puts_and_gc_leaves_a_consistent_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    Store::open(&dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(42);
    let mut seen = 0;
    for round in 0..15 {
        let spawn = |mode: &str| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "crash_child_entrypoint",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("KILN_CRASH_CHILD", mode)
                .env("KILN_CRASH_DIR", &dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut kids = vec![spawn("put"), spawn("put")];
        if round % 2 == 1 {
            kids.push(spawn("gc"));
        }
        std::thread::sleep(Duration::from_millis(r.random_range(30..400)));
        for k in &mut kids {
            k.kill().unwrap(); // SIGKILL
            k.wait().unwrap();
        }
        seen += check(&dir);
    }
    assert!(seen > 0, "the children made progress before being killed");
    // gc after all the crashes cleans up leftovers and still keeps every visible blob.
    let store = Store::open(&dir).unwrap();
    store.gc(false).unwrap();
    assert!(
        std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none(),
        "gc removed orphaned tmp files"
    );
    check(&dir);
}
