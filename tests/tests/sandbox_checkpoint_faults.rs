//! A full disk while checkpointing (real runsc; the kiln home on a small tmpfs): the pause
//! fails with the reason, the sandbox keeps running, and the store holds nothing half
//! written: no blob without a name, no checkpoint hold left, `kiln store verify` clean. Once
//! room is made, the same sandbox pauses and resumes with its memory and files.

use kiln_tests::sandbox::{app_home, create, sh, KillAll, COUNTER_LOOP};
use kiln_tests::Kiln;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// A tmpfs mounted at a path, unmounted on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn avail(p: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

/// Blobs without a name, and `hold:ckpt:` names.
fn debris(k: &Kiln) -> (usize, Vec<String>) {
    let blobs = k.json(["store", "ls", "--json"]);
    let mut unnamed = 0;
    let mut ckpt_holds = Vec::new();
    for b in blobs.as_array().unwrap() {
        let names = b["names"].as_array().cloned().unwrap_or_default();
        if names.is_empty() {
            unnamed += 1;
        }
        for n in names {
            let n = n.as_str().unwrap().to_string();
            if n.starts_with("hold:ckpt:") {
                ckpt_holds.push(n);
            }
        }
    }
    (unnamed, ckpt_holds)
}

#[test]
fn a_full_disk_fails_the_pause_clearly_and_leaves_the_sandbox_running_and_the_store_clean() {
    let Some((tmp, built)) = app_home() else {
        return;
    };
    // The built home, copied onto a tmpfs of its own.
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=320m", "kiln-small"])
        .arg(&small)
        .status()
        .unwrap()
        .success();
    if !ok {
        eprintln!("SKIP: cannot mount a tmpfs here");
        return;
    }
    let _m = Mount(small.clone());
    let home = small.join("home");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(tmp.path().join("home"))
        .arg(&home)
        .status()
        .unwrap();
    assert!(cp.success());
    let k = Kiln::new(&home);
    let _g = KillAll(k.clone());
    let _ = built;
    // 1 GiB of memory: its /tmp (a tmpfs of half the memory) holds both fills below.
    let id = create(&k, &["app", "--memory", "1024"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    sh(&k, &id, &format!("echo kept >/work/note; {COUNTER_LOOP}"));
    let (unnamed0, _) = debris(&k);

    // Memory of ~60% of what is free: runsc's image of it fits, a second copy into the
    // store does not (random bytes do not compress).
    let fill = avail(&home) * 6 / 10 / MIB;
    sh(
        &k,
        &id,
        &format!("dd if=/dev/urandom of=/tmp/fill bs=1M count={fill} 2>/dev/null"),
    );
    let err = k.fails(["sandbox", "pause", &id]);
    eprintln!("pause on a full disk: {err}");
    assert!(
        err.contains("No space left") || err.contains("ENOSPC") || err.contains("space"),
        "{err}"
    );
    let check_running_and_clean = |what: &str| {
        let rec = k.json(["sandbox", "info", &id, "--json"]);
        assert_eq!(rec["state"], "running", "{what}: {rec}");
        assert!(
            kiln_tests::sandbox::counter_advances(&k, &id).is_some(),
            "{what}: the sandbox's counter stopped"
        );
        assert_eq!(sh(&k, &id, "cat /work/note"), "kept\n");
        let (unnamed, holds) = debris(&k);
        assert_eq!(unnamed, unnamed0, "{what}: blobs without a name were left");
        assert!(holds.is_empty(), "{what}: checkpoint holds left: {holds:?}");
        k.ok(["store", "verify"]);
        assert!(
            !home.join("sandboxes").join(&id).join("ckpt").exists(),
            "{what}: the failed checkpoint's files stayed"
        );
    };
    check_running_and_clean("the store full");

    // More memory than the disk holds: runsc's own write fails.
    sh(
        &k,
        &id,
        &format!("dd if=/dev/urandom of=/tmp/fill2 bs=1M count={fill} 2>/dev/null"),
    );
    let err = k.fails(["sandbox", "pause", &id]);
    eprintln!("pause with no room for runsc's image: {err}");
    check_running_and_clean("runsc's image too large");

    // With room again the same sandbox pauses and resumes whole.
    sh(&k, &id, "rm /tmp/fill /tmp/fill2");
    let before: u64 = kiln_tests::sandbox::counter(&k, &id);
    k.ok(["sandbox", "pause", &id]);
    k.ok(["sandbox", "resume", &id]);
    let after: u64 = kiln_tests::sandbox::counter(&k, &id);
    assert!(after >= before);
    assert_eq!(sh(&k, &id, "cat /work/note"), "kept\n");
    k.ok(["sandbox", "kill", &id]);
    k.ok(["store", "gc"]);
    let (_, holds) = debris(&k);
    assert!(holds.is_empty(), "{holds:?}");
}
