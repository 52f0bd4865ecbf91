//! File requests against the agent binary: writes with mode and owner, stat, listings,
//! directory changes with distinguishable errors, and watching a directory.

mod common;

use common::*;
use kiln_agent::client;
use kiln_agent::protocol::{ErrorKind, EventOp, FileKind, FileRequest};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

#[test]
fn ten_mib_round_trip_with_mode_owner_and_parents() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/sub/f.bin");
    let p = path.to_str().unwrap();
    let content: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut req = FileRequest {
        path: p.into(),
        mode: Some(0o750),
        ..Default::default()
    };
    // Without make_parents the missing directory is an error.
    let e = client::write_file(&mut a.conn(), &req, &content[..]).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound), "{e}");
    req.make_parents = true;
    if is_root() {
        req.uid = Some(65534);
        req.gid = Some(65534);
    }
    let n = client::write_file(&mut a.conn(), &req, &content[..]).unwrap();
    assert_eq!(n, content.len() as u64);
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o750);
    if is_root() {
        assert_eq!((md.uid(), md.gid()), (65534, 65534));
    }
    let mut back = Vec::new();
    assert_eq!(
        client::read_file(&mut a.conn(), p, &mut back).unwrap(),
        content.len() as u64
    );
    assert!(back == content, "content differs");
    let info = client::stat(&mut a.conn(), p).unwrap();
    assert_eq!(info.kind, FileKind::File);
    assert_eq!(
        (info.size, info.mode, info.name.as_str()),
        (10 << 20, 0o750, "f.bin")
    );
    assert_eq!(info.uid, md.uid());
    let mtime_ms = md.mtime() * 1000 + md.mtime_nsec() / 1_000_000;
    assert_eq!(info.mtime_ms, mtime_ms);
    // Only the file is left in its directory (no temp files).
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f.bin")]);
}

#[test]
fn stat_list_make_rename_remove() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let at = |rel: &str| format!("{root}/{rel}");

    assert!(client::make_dir(&mut a.conn(), &at("a/b/c")).unwrap());
    assert!(!client::make_dir(&mut a.conn(), &at("a/b")).unwrap());
    std::fs::write(at("a/b/c/f.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink("b/c/f.txt", at("a/link")).unwrap();
    let e = client::make_dir(&mut a.conn(), &at("a/b/c/f.txt")).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Exists), "{e}");

    let l = client::stat(&mut a.conn(), &at("a/link")).unwrap();
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(l.symlink_target.as_deref(), Some("b/c/f.txt"));
    assert_eq!(
        client::stat(&mut a.conn(), &at("a")).unwrap().kind,
        FileKind::Dir
    );

    let names = |depth| -> Vec<String> {
        client::list_dir(&mut a.conn(), &root, depth)
            .unwrap()
            .into_iter()
            .map(|i| {
                i.path
                    .strip_prefix(&format!("{root}/"))
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(names(1), ["a"]);
    assert_eq!(names(2), ["a", "a/b", "a/link"]);
    assert_eq!(names(9), ["a", "a/b", "a/b/c", "a/b/c/f.txt", "a/link"]);
    let e = client::list_dir(&mut a.conn(), &at("a/b/c/f.txt"), 1).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");

    let moved = client::rename(&mut a.conn(), &at("a/b/c/f.txt"), &at("g.txt")).unwrap();
    assert_eq!((moved.name.as_str(), moved.size), ("g.txt", 5));
    assert_eq!(moved.path, at("g.txt"));
    let e = client::rename(&mut a.conn(), &at("a/b/c/f.txt"), &at("h.txt")).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound), "{e}");

    client::remove(&mut a.conn(), &at("a")).unwrap();
    client::remove(&mut a.conn(), &at("g.txt")).unwrap();
    assert!(std::fs::read_dir(&root).unwrap().next().is_none());
    for e in [
        client::remove(&mut a.conn(), &at("a")).unwrap_err(),
        client::stat(&mut a.conn(), &at("g.txt")).unwrap_err(),
        client::list_dir(&mut a.conn(), &at("a"), 1).unwrap_err(),
    ] {
        assert_eq!(e.kind(), Some(ErrorKind::NotFound), "{e}");
        assert!(e.to_string().starts_with("agent: not found:"), "{e}");
    }
}

#[test]
fn watch_dir_reports_changes_until_the_client_leaves() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let stream = a.conn();
    let r = root.to_str().unwrap().to_string();
    let watcher = std::thread::spawn(move || {
        client::watch_dir(stream, &r, true, |ev| {
            let last = ev.name == "x.txt" && ev.op == EventOp::Remove;
            let _ = tx.send(ev);
            !last
        })
    });
    // The watch is in place once a probe shows up.
    let mut n = 0;
    let first = loop {
        std::fs::write(root.join(format!("probe{n}")), b"").unwrap();
        n += 1;
        if let Ok(ev) = rx.recv_timeout(Duration::from_millis(100)) {
            break ev;
        }
        assert!(n < 100, "no event");
    };
    assert!(first.name.starts_with("probe"), "{first:?}");
    std::fs::write(root.join("x.txt"), b"data").unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(root.join("sub/y"), b"1").unwrap();
    std::fs::set_permissions(root.join("sub/y"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(root.join("sub/y"), root.join("sub/z")).unwrap();
    std::fs::remove_file(root.join("x.txt")).unwrap();
    watcher.join().unwrap().unwrap();
    let events: Vec<_> = rx.try_iter().map(|e| (e.name, e.op)).collect();
    for want in [
        ("x.txt", EventOp::Create),
        ("x.txt", EventOp::Write),
        ("sub", EventOp::Create),
        ("sub/y", EventOp::Create),
        ("sub/y", EventOp::Write),
        ("sub/y", EventOp::Chmod),
        ("sub/y", EventOp::Rename),
        ("sub/z", EventOp::Create),
        ("x.txt", EventOp::Remove),
    ] {
        assert!(
            events.iter().any(|(n, o)| n == want.0 && *o == want.1),
            "{want:?} missing from {events:?}"
        );
    }
    // The watch ended with the connection: the agent's thread for it is gone.
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", a.child.id()))
            .unwrap()
            .count()
    };
    a.wait_until(5, || threads() <= 2);
    let e = client::watch_dir(a.conn(), "/no/such/dir", false, |_| true).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound), "{e}");
}
