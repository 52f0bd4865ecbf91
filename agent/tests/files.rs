//! File requests against the agent binary: writes with mode and owner (atomic, and in place as
//! envd writes), metadata in xattrs, stat (symlinks as envd reports them), listings,
//! directory changes with distinguishable errors, and watching a directory (envd's events,
//! `Sync`).

mod common;

use common::*;
use kiln_agent::client;
use kiln_agent::protocol::{
    self, ErrorKind, Event, EventOp, FileKind, FileRequest, Kind, LinkTarget, WatchRequest,
    WatchStarted,
};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
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

/// A watch connection spoken to directly: the request, then `Sync`s and events.
struct RawWatch(std::os::unix::net::UnixStream);

impl RawWatch {
    fn start(a: &Agent, path: &str, recursive: bool, include_entry: bool) -> RawWatch {
        let mut s = a.conn();
        let req = WatchRequest {
            path: path.into(),
            recursive,
            include_entry,
            allow_network_mounts: false,
        };
        protocol::write_json(&mut s, Kind::WatchDir, &req).unwrap();
        let (k, d) = protocol::read_frame(&mut s).unwrap().unwrap();
        assert_eq!(k, Kind::Ok, "{}", String::from_utf8_lossy(&d));
        let started: WatchStarted = protocol::parse_json(k, &d).unwrap();
        assert!(started.sync);
        RawWatch(s)
    }

    /// Every event of a change made before this call, and nothing else pending.
    fn sync(&mut self) -> Vec<Event> {
        protocol::write_frame(&mut self.0, Kind::Sync, b"").unwrap();
        let mut out = Vec::new();
        loop {
            match protocol::read_frame(&mut self.0).unwrap().unwrap() {
                (Kind::Event, d) => out.push(protocol::parse_json(Kind::Event, &d).unwrap()),
                (Kind::Ok, _) => return out,
                (k, d) => panic!("{k:?} {}", String::from_utf8_lossy(&d)),
            }
        }
    }
}

fn ops(events: &[Event]) -> Vec<(String, EventOp)> {
    events.iter().map(|e| (e.name.clone(), e.op)).collect()
}

fn set_xattr(path: &std::path::Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings and value.len() readable bytes.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
}

#[test]
fn in_place_writes_show_envd_events_and_keep_metadata() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let f = format!("{root}/f.txt");
    let mut w = RawWatch::start(&a, &root, false, true);
    let mut req = FileRequest {
        path: f.clone(),
        in_place: true,
        metadata: Some(BTreeMap::from([
            ("author".to_string(), "kiln".to_string()),
            ("stage".to_string(), "one".to_string()),
        ])),
        ..Default::default()
    };
    if is_root() {
        (req.uid, req.gid) = (Some(65534), Some(65534));
    }
    let (n, info) = client::write_file_info(&mut a.conn(), &req, &b"first"[..]).unwrap();
    let info = info.expect("protocol 3 answers with the file");
    assert_eq!((n, info.size, info.mode), (5, 5, 0o644));
    assert_eq!(info.metadata, req.metadata.clone().unwrap());
    // A new file: CREATE, then CHMOD for the owner (as root), WRITE, CHMOD per metadata key.
    let seen = ops(&w.sync());
    assert_eq!(seen[0], ("f.txt".into(), EventOp::Create), "{seen:?}");
    assert!(seen.contains(&("f.txt".into(), EventOp::Write)), "{seen:?}");
    assert!(seen.iter().all(|(n, _)| n == "f.txt"), "{seen:?}");

    // An existing file is written into (same inode, mode kept): no CREATE, a WRITE; its
    // metadata is replaced (a key not given again goes); the entry comes with the event.
    let ino = std::fs::metadata(&f).unwrap().ino();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    w.sync();
    req.metadata = Some(BTreeMap::from([("stage".to_string(), "two".to_string())]));
    let (_, info) = client::write_file_info(&mut a.conn(), &req, &b"second!"[..]).unwrap();
    let info = info.unwrap();
    assert_eq!(
        (info.mode, info.metadata.get("stage").map(String::as_str)),
        (0o640, Some("two"))
    );
    assert!(!info.metadata.contains_key("author"), "{:?}", info.metadata);
    assert_eq!(std::fs::metadata(&f).unwrap().ino(), ino);
    let events = w.sync();
    let seen = ops(&events);
    assert!(!seen.iter().any(|(_, o)| *o == EventOp::Create), "{seen:?}");
    // The entry is read as the event is: the last WRITE's is the content's.
    let write = events
        .iter()
        .rev()
        .find(|e| e.op == EventOp::Write)
        .expect("a WRITE");
    assert_eq!(write.entry.as_ref().map(|e| e.size), Some(7));
    assert_eq!(std::fs::read(&f).unwrap(), b"second!");

    // None leaves the metadata alone; xattrs set by others show, under the prefix only, and
    // only when UTF-8.
    req.metadata = None;
    client::write_file(&mut a.conn(), &req, &b"third"[..]).unwrap();
    set_xattr(Path::new(&f), "user.e2b.outside", b"yes");
    set_xattr(Path::new(&f), "user.other", b"no");
    set_xattr(Path::new(&f), "user.e2b.binary", b"\xff\xfe");
    let st = client::stat(&mut a.conn(), &f).unwrap();
    assert_eq!(
        st.metadata,
        BTreeMap::from([
            ("outside".to_string(), "yes".to_string()),
            ("stage".to_string(), "two".to_string())
        ])
    );
    // A rename keeps them; a listing shows them.
    let moved = client::rename(&mut a.conn(), &f, &format!("{root}/g.txt")).unwrap();
    assert_eq!(moved.metadata, st.metadata);
    let listed = client::list_dir(&mut a.conn(), &root, 1).unwrap();
    assert_eq!(listed[0].metadata, st.metadata);

    // The atomic write's temp file is never reported.
    w.sync();
    client::write_file(
        &mut a.conn(),
        &file_req(&format!("{root}/atomic"), 0o600),
        &b"x"[..],
    )
    .unwrap();
    let seen = ops(&w.sync());
    assert!(seen.iter().all(|(n, _)| n == "atomic"), "{seen:?}");
    assert!(
        seen.contains(&("atomic".into(), EventOp::Create)),
        "{seen:?}"
    );

    // A directory in the way is refused as invalid, and left alone.
    std::fs::create_dir(format!("{root}/d")).unwrap();
    req.path = format!("{root}/d");
    let e = client::write_file(&mut a.conn(), &req, &b"x"[..]).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");
    assert!(e.to_string().contains("path is a directory"), "{e}");
}

#[test]
fn watches_follow_envd_rules_and_sync_is_exact() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join("old")).unwrap();
    let mut w = RawWatch::start(&a, root.to_str().unwrap(), true, false);
    // Each change's events are there at the next Sync, every time.
    for i in 0..20 {
        std::fs::write(root.join(format!("f{i}")), b"x").unwrap();
        let seen = ops(&w.sync());
        assert!(
            seen.contains(&(format!("f{i}"), EventOp::Create)),
            "round {i}: {seen:?}"
        );
    }
    // A subdirectory that was there is watched; one made later is watched from its CREATE,
    // with nothing made up for its contents; its own changes are named after it.
    std::fs::write(root.join("old/a"), b"1").unwrap();
    std::fs::create_dir(root.join("new")).unwrap();
    let seen = ops(&w.sync());
    assert!(
        seen.contains(&("old/a".into(), EventOp::Create)),
        "{seen:?}"
    );
    assert!(seen.contains(&("new".into(), EventOp::Create)), "{seen:?}");
    std::fs::write(root.join("new/b"), b"1").unwrap();
    let seen = ops(&w.sync());
    assert_eq!(
        seen,
        [
            ("new/b".into(), EventOp::Create),
            ("new/b".into(), EventOp::Write)
        ]
    );
    std::fs::set_permissions(root.join("new"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let seen = ops(&w.sync());
    assert_eq!(
        seen,
        [
            ("new".into(), EventOp::Chmod),
            ("new".into(), EventOp::Chmod)
        ],
        "the parent's event and the directory's own, as fsnotify reports them"
    );
    // A directory moved within the tree keeps being watched under its new name.
    std::fs::rename(root.join("new"), root.join("moved")).unwrap();
    let seen = ops(&w.sync());
    assert_eq!(
        seen,
        [
            ("new".into(), EventOp::Rename),
            ("moved".into(), EventOp::Create)
        ]
    );
    std::fs::write(root.join("moved/c"), b"").unwrap();
    assert_eq!(ops(&w.sync()), [("moved/c".into(), EventOp::Create)]);
    // A removed subdirectory is reported once, by its parent.
    std::fs::remove_dir_all(root.join("old")).unwrap();
    let seen = ops(&w.sync());
    assert_eq!(
        seen,
        [
            ("old/a".into(), EventOp::Remove),
            ("old".into(), EventOp::Remove)
        ]
    );
    // The watched directory itself: named ".".
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(ops(&w.sync()), [(".".into(), EventOp::Chmod)]);
}

#[test]
fn symlinks_say_where_they_lead() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let r = root.to_str().unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/f"), b"hello").unwrap();
    std::fs::set_permissions(root.join("d/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    set_xattr(&root.join("d/f"), "user.e2b.k", b"v");
    std::os::unix::fs::symlink("d/f", root.join("l1")).unwrap();
    std::os::unix::fs::symlink(root.join("l1"), root.join("l2")).unwrap();
    std::os::unix::fs::symlink("d", root.join("ld")).unwrap();
    std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
    let st = |n: &str| client::stat(&mut a.conn(), &format!("{r}/{n}")).unwrap();
    let l2 = st("l2");
    assert_eq!(l2.kind, FileKind::Symlink);
    assert_eq!(
        l2.symlink_target.as_deref(),
        Some(format!("{r}/l1").as_str())
    );
    assert_eq!(
        l2.link,
        Some(LinkTarget {
            path: format!("{r}/d/f"),
            kind: Some(FileKind::File),
            mode: 0o600
        })
    );
    // Metadata is read through the link, as envd does.
    assert_eq!(l2.metadata.get("k").map(String::as_str), Some("v"));
    assert_eq!(st("ld").link.unwrap().kind, Some(FileKind::Dir));
    let d = st("dangling");
    assert_eq!(
        d.link,
        Some(LinkTarget {
            path: format!("{r}/dangling"),
            kind: None,
            mode: 0
        })
    );
    assert!(st("d/f").link.is_none());
}

#[test]
fn in_place_writes_do_not_follow_names_others_planted() {
    if !is_root() {
        eprintln!("SKIP: needs root (files owned by another user)");
        return;
    }
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let victim = root.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let write = |name: &str, data: &[u8]| {
        let req = FileRequest {
            path: root.join(name).to_str().unwrap().into(),
            in_place: true,
            uid: Some(1000),
            gid: Some(1000),
            ..Default::default()
        };
        client::write_file(&mut a.conn(), &req, data).unwrap();
    };
    // A symlink another user planted is replaced, not written through.
    std::os::unix::fs::symlink(&victim, root.join("planted")).unwrap();
    std::os::unix::fs::lchown(root.join("planted"), Some(65534), Some(65534)).unwrap();
    write("planted", b"mine");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let md = std::fs::symlink_metadata(root.join("planted")).unwrap();
    assert!(md.is_file() && md.uid() == 1000, "{md:?}");
    assert_eq!(std::fs::read(root.join("planted")).unwrap(), b"mine");
    // So is another name of a file the user does not own.
    std::fs::hard_link(&victim, root.join("hard")).unwrap();
    write("hard", b"mine too");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::metadata(&victim).unwrap().nlink(), 1);
    // A symlink root (or the user) made is written through, as envd does.
    std::fs::write(root.join("target"), b"old").unwrap();
    std::os::unix::fs::symlink("target", root.join("trusted")).unwrap();
    write("trusted", b"new");
    assert!(std::fs::symlink_metadata(root.join("trusted"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(root.join("target")).unwrap(), b"new");
    assert_eq!(std::fs::metadata(root.join("target")).unwrap().uid(), 1000);
}

#[test]
fn a_name_of_255_bytes_is_written_atomically() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n".repeat(255));
    let req = file_req(path.to_str().unwrap(), 0o644);
    client::write_file(&mut a.conn(), &req, &b"long"[..]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"long");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left"
    );
}

#[test]
fn regular_only_reads_refuse_fifos_devices_and_symlinks_without_blocking() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("plain"), b"0123456789").unwrap();
    std::os::unix::fs::symlink(d.join("plain"), d.join("link")).unwrap();
    let fifo = std::ffi::CString::new(d.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    for (name, why) in [
        ("fifo", "not a regular file"),
        ("link", ""),
        ("/dev/zero", "not a regular file"),
    ] {
        let p = d.join(name);
        let e = client::open_file(a.conn(), p.to_str().unwrap(), 1 << 20)
            .err()
            .unwrap_or_else(|| panic!("{name} was opened"));
        assert!(e.kind().is_some(), "{name}: {e}");
        assert!(e.to_string().contains(why), "{name}: {e}");
    }
    // At most the limit, though the file has more.
    let mut r = client::open_file(a.conn(), d.join("plain").to_str().unwrap(), 4).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut got).unwrap();
    assert_eq!(got, b"0123");
}

#[test]
fn a_big_directory_is_listed_page_by_page_in_name_order() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let n = 8000;
    for i in 0..n {
        std::fs::write(dir.path().join(format!("f{i:05}")), b"").unwrap();
    }
    let p = dir.path().to_str().unwrap();
    // Too big for one frame at once.
    assert!(client::list_dir(&mut a.conn(), p, 1).is_err());
    let mut names = Vec::new();
    loop {
        let page = client::list_dir_page(&mut a.conn(), p, names.last().map(String::as_str), 1000)
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 1000);
        names.extend(page.into_iter().map(|e| e.name));
    }
    let want: Vec<String> = (0..n).map(|i| format!("f{i:05}")).collect();
    assert_eq!(names, want);
    // Not through a symlink.
    let link = dir.path().with_extension("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let e = client::list_dir_page(&mut a.conn(), link.to_str().unwrap(), None, 10).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");
    std::fs::remove_file(link).unwrap();
}
