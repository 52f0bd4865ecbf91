//! `kiln snapshot ...` end to end on real KVM with the test guest: snapshot a running VM
//! (full, then diff + stop = suspend), restore it in a new VMM process (lazy memory) and fork it.

mod guest_support;

use guest_support::connect_uds;
use kiln_tests::Kiln;
use std::path::Path;

use kiln_tests::kvm_unavailable;

/// A request on a fresh vsock connection (the first one to a restored guest must work too).
fn ask(uds: &Path, line: &str) -> String {
    connect_uds(uds, 1).request(line)
}

#[test]
fn suspend_with_diff_then_restore_and_fork() {
    if let Some(why) = kvm_unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = Kiln::new(dir.path().join("home"));
    let _vms = k.stop_vms_on_drop();
    let uds = dir.path().join("a.vsock");
    let id = k.ok_str(kiln_tests::test_guest_vm_run(&[
        "-d",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]));
    let id = id.trim().to_string();
    assert!(ask(&uds, "FILL 16 8 42").starts_with("OK"));
    let full = k.json(["snapshot", "create", &id, "--name", "warm", "--json"]);
    assert_eq!(full["diff"], false);
    assert_eq!(full["copied_via"], "process_vm_readv", "{full}");
    assert!(
        ask(&uds, "FILL 30 2 43").starts_with("OK"),
        "the VM runs on after a snapshot"
    );
    let counter: u64 = ask(&uds, "COUNTER")
        .trim_start_matches("OK ")
        .parse()
        .unwrap();
    let diff = k.json([
        "snapshot", "create", &id, "--name", "warm2", "--diff", "--stop", "--json",
    ]);
    assert_eq!(diff["diff"], true);
    assert_eq!(diff["layers"], 2);
    assert_eq!(
        diff["diff_from"], "tracked_writes",
        "the VMM tracked writes since the full snapshot: no pass over all memory"
    );
    let changed = diff["changed_pages"].as_u64().unwrap();
    assert!(
        (512..1024).contains(&changed),
        "diff holds the 2 MiB (512 pages) written plus a few pages: {changed}"
    );
    let ls = k.ok_str(["snapshot", "ls"]);
    assert!(ls.contains("warm2"), "{ls}");

    // Resume from the suspended state in a new VMM process.
    let ruds = dir.path().join("r.vsock");
    let r = k.ok_str([
        "snapshot",
        "restore",
        "warm2",
        "-d",
        "--vsock-uds",
        ruds.to_str().unwrap(),
    ]);
    let r = r.trim().to_string();
    assert_eq!(ask(&ruds, "CHECK 16 8 42"), "OK");
    assert_eq!(ask(&ruds, "CHECK 30 2 43"), "OK");
    let after: u64 = ask(&ruds, "COUNTER")
        .trim_start_matches("OK ")
        .parse()
        .unwrap();
    assert!(after > counter, "counter continues: {counter} -> {after}");
    // The restored VMM tracks writes from the moment its memory equals warm2: its first diff
    // takes only the pages the guest wrote since (counters, stack), not all of RAM.
    let d = k.json([
        "snapshot", "create", &r, "--name", "warm3", "--diff", "--json",
    ]);
    assert_eq!(d["diff_from"], "tracked_writes");
    let changed = d["changed_pages"].as_u64().unwrap();
    assert!(changed < 64, "only the guest's own bookkeeping: {changed}");
    // A VMM whose tracking does not match (here: its tag is gone, as after a snapshot that
    // failed half-way) falls back to comparing all memory with the parent, still exactly.
    assert!(ask(&ruds, "FILL 40 1 44").starts_with("OK"));
    std::fs::remove_file(k.home.join("vms").join(&r).join("snapshot.tracking")).unwrap();
    let d = k.json([
        "snapshot", "create", &r, "--name", "warm4", "--diff", "--json",
    ]);
    assert_eq!(d["diff_from"], "memory_stream");
    let changed = d["changed_pages"].as_u64().unwrap();
    assert!(
        (256..512).contains(&changed),
        "the 1 MiB written plus a few pages: {changed}"
    );
    k.ok(["vm", "stop", &r]);
    // Four layers (full, tracked diff, tracked diff, streamed diff) restore exactly.
    let r4uds = dir.path().join("r4.vsock");
    let r4 = k.ok_str([
        "snapshot",
        "restore",
        "warm4",
        "-d",
        "--vsock-uds",
        r4uds.to_str().unwrap(),
    ]);
    for check in ["CHECK 16 8 42", "CHECK 30 2 43", "CHECK 40 1 44"] {
        assert_eq!(ask(&r4uds, check), "OK", "{check} after restoring warm4");
    }
    k.ok(["vm", "stop", r4.trim()]);

    // Fork the full snapshot three times: every fork starts from it and diverges alone.
    let fdir = dir.path().join("forks");
    std::fs::create_dir_all(&fdir).unwrap();
    k.ok([
        "snapshot",
        "fork",
        "warm",
        "-n",
        "3",
        "--vsock-dir",
        fdir.to_str().unwrap(),
    ]);
    let socks: Vec<_> = std::fs::read_dir(&fdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(socks.len(), 3, "{socks:?}");
    for (i, s) in socks.iter().enumerate() {
        assert_eq!(ask(s, "CHECK 16 8 42"), "OK");
        assert!(
            ask(s, "CHECK 30 2 43").starts_with("BAD"),
            "fork of the first snapshot lacks the later write"
        );
        assert!(ask(s, &format!("FILL 40 1 {}", 500 + i)).starts_with("OK"));
    }
    for (i, s) in socks.iter().enumerate() {
        assert_eq!(ask(s, &format!("CHECK 40 1 {}", 500 + i)), "OK");
    }
    for s in &socks {
        let fid = s.file_stem().unwrap().to_str().unwrap().to_string();
        k.ok(["vm", "stop", &fid]);
    }

    // Bad input: a name that is no snapshot, a damaged record.
    let out = k.run(["snapshot", "restore", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
}
