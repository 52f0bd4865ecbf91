//! kill -9 of `kiln sandbox pause --files-only` and of the resumes that boot afresh
//! (`resume` of a filesystem-only pause, `resume --reboot` of a full one) at moments across
//! each (real runsc, the real kiln binary): the next reader finds the sandbox running or
//! paused, never failed or gone, its file intact, and the next pause or resume works.

use kiln_tests::sandbox::{app_home, create, killed_after, timed, KillAll};
use kiln_tests::Kiln;
use std::time::Duration;

const MOMENTS: u32 = 5;

fn moments(d: Duration) -> Vec<Duration> {
    kiln_tests::sandbox::moments(d, MOMENTS)
}

/// The sandbox's state after the reconcile of `kiln sandbox ls`; a running one still has
/// `/work/kept` as written.
fn settled(k: &Kiln, id: &str, kept: &[u8], what: &str) -> String {
    let ls = k.json(["sandbox", "ls", "--json"]);
    let rec = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{what}: sandbox {id} gone"))
        .clone();
    assert!(rec.get("op").is_none(), "{what}: still under way: {rec}");
    let state = rec["state"].as_str().unwrap().to_string();
    match state.as_str() {
        "running" => {
            let back = k.ok(["sandbox", "exec", id, "--", "cat", "/work/kept"]);
            assert!(back == kept, "{what}: /work/kept changed");
        }
        "paused" => {}
        _ => panic!("{what}: sandbox left {state}: {rec}"),
    }
    state
}

#[test]
fn killed_filesystem_pauses_and_fresh_boots_finish_or_roll_back() {
    let Some((tmp, k)) = app_home() else {
        return;
    };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let kept = kiln_tests::pseudo_random(256 << 10, 7);
    let local = tmp.path().join("kept");
    std::fs::write(&local, &kept).unwrap();
    k.ok([
        "sandbox",
        "cp",
        local.to_str().unwrap(),
        &format!("{id}:/work/kept"),
    ]);
    let pause = timed(&k, &["sandbox", "pause", "--files-only", &id]);
    let resume = timed(&k, &["sandbox", "resume", &id]);
    eprintln!("filesystem pause {pause:?}, resume {resume:?}");
    for (i, d) in moments(pause).into_iter().enumerate() {
        killed_after(&k, &["sandbox", "pause", "--files-only", &id], d);
        let what = format!("filesystem pause killed after {d:?}");
        let left = settled(&k, &id, &kept, &what);
        eprintln!("{what}: {left}");
        if left == "running" {
            k.ok(["sandbox", "pause", "--files-only", &id]);
        }
        assert_eq!(settled(&k, &id, &kept, &what), "paused", "{what}");
        // A resume of it (a fresh boot), killed at the same moment of its own run.
        let d = moments(resume)[i];
        killed_after(&k, &["sandbox", "resume", &id], d);
        let what = format!("resume of a filesystem pause killed after {d:?}");
        let left = settled(&k, &id, &kept, &what);
        eprintln!("{what}: {left}");
        if left == "paused" {
            k.ok(["sandbox", "resume", &id]);
        }
        assert_eq!(settled(&k, &id, &kept, &what), "running", "{what}");
    }
    // A full pause resumed with a reboot, killed mid-way: paused as before, or rebooted.
    k.ok(["sandbox", "pause", &id]);
    let reboot = timed(&k, &["sandbox", "resume", "--reboot", &id]);
    for d in moments(reboot) {
        k.ok(["sandbox", "pause", &id]);
        killed_after(&k, &["sandbox", "resume", "--reboot", &id], d);
        let what = format!("resume --reboot killed after {d:?}");
        let left = settled(&k, &id, &kept, &what);
        eprintln!("{what}: {left}");
        if left == "paused" {
            k.ok(["sandbox", "resume", "--reboot", &id]);
        }
        assert_eq!(settled(&k, &id, &kept, &what), "running", "{what}");
    }
    k.ok(["sandbox", "kill", &id]);
}
