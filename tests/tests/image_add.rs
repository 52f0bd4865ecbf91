//! `ADD` in `kiln build`: remote URLs served by a small HTTP server in this process (with and
//! without `--checksum`, 404, nothing listening, cache keyed by the content), local tar archives
//! in every compression unpacked into the destination, and archives that try to escape.

use kiln_tests::registry::{build_steps, busybox_build_home, free_port, have};
use kiln_tests::Kiln;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn setup() -> Option<(tempfile::TempDir, Kiln)> {
    busybox_build_home()
}

/// An HTTP/1.1 server on 127.0.0.1 serving `files` (path -> body), 404 for anything else;
/// counts requests. It lives as long as the test process (a detached thread).
struct Http {
    port: u16,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    hits: Arc<AtomicUsize>,
}

impl Http {
    fn start() -> Http {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Default::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let (f, h) = (files.clone(), hits.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let line = String::from_utf8_lossy(&req)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let target = line.split_whitespace().nth(1).unwrap_or("");
                let path = target.split('?').next().unwrap_or("").to_string();
                let body = f.lock().unwrap().get(&path).cloned();
                let (status, body) = match body {
                    Some(b) => ("200 OK", b),
                    None => ("404 Not Found", b"not found\n".to_vec()),
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body);
            }
        });
        Http { port, files, hits }
    }

    fn serve(&self, path: &str, body: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), body.to_vec());
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn debugfs(disk: &Path, req: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(req)
        .arg(disk)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn export(k: &Kiln, name: &str, dir: &Path) -> std::path::PathBuf {
    let disk = dir.join(format!("{name}.ext4"));
    k.ok(["image", "export", name, "-o", disk.to_str().unwrap()]);
    disk
}

fn sha256_hex(b: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn build_json(k: &Kiln, ctx: &Path, file: &str, tag: &str) -> serde_json::Value {
    k.json([
        "build",
        "-t",
        tag,
        "--json",
        "-f",
        ctx.join(file).to_str().unwrap(),
        ctx.to_str().unwrap(),
    ])
}

fn build_fails(k: &Kiln, ctx: &Path, file: &str, tag: &str) -> String {
    let err = k.fails([
        "build",
        "-t",
        tag,
        "-f",
        ctx.join(file).to_str().unwrap(),
        ctx.to_str().unwrap(),
    ]);
    // Nothing tagged.
    k.fails(["image", "inspect", tag]);
    err
}

#[test]
fn add_urls_checksums_and_their_failures() {
    let Some((tmp, k)) = setup() else {
        return;
    };
    let http = Http::start();
    http.serve("/files/hello.txt", b"hello v1\n");
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    let w = |name: &str, body: String| std::fs::write(ctx.join(name), body).unwrap();
    w(
        "Dockerfile",
        format!(
            "FROM bb\nADD {} /srv/\nADD {} /srv/renamed\nRUN cat /srv/hello.txt > /srv/seen\n",
            http.url("/files/hello.txt"),
            http.url("/files/hello.txt?x=1"),
        ),
    );
    let cold = build_json(&k, &ctx, "Dockerfile", "url");
    let disk = export(&k, "url", tmp.path());
    assert_eq!(debugfs(&disk, "cat /srv/hello.txt"), "hello v1\n");
    assert_eq!(debugfs(&disk, "cat /srv/renamed"), "hello v1\n");
    assert_eq!(debugfs(&disk, "cat /srv/seen"), "hello v1\n");
    // Remote files get mode 0600, as with Docker.
    let st = debugfs(&disk, "stat /srv/hello.txt");
    assert!(st.contains("Mode:  0600"), "{st}");

    // Same content: the URL is fetched again, and every step is a cache hit.
    let before = http.hits.load(Ordering::SeqCst);
    let again = build_json(&k, &ctx, "Dockerfile", "url");
    assert!(
        http.hits.load(Ordering::SeqCst) > before,
        "URL not re-checked"
    );
    assert_eq!(again["image"], cold["image"]);
    assert!(build_steps(&again).iter().all(|(_, c)| *c), "{again}");
    // New content behind the same URL: the ADD reruns (the key covers the content).
    http.serve("/files/hello.txt", b"hello v2\n");
    let changed = build_json(&k, &ctx, "Dockerfile", "url");
    let s = build_steps(&changed);
    assert!(s.iter().any(|(i, c)| i.starts_with("ADD") && !c), "{s:?}");
    assert!(
        s.iter().any(|(i, c)| i.starts_with("RUN") && !c),
        "RUN after a changed ADD must rerun: {s:?}"
    );
    let disk = export(&k, "url", tmp.path());
    assert_eq!(debugfs(&disk, "cat /srv/seen"), "hello v2\n");

    // --checksum: the right digest passes, a wrong one fails with both digests shown.
    let good = sha256_hex(b"hello v2\n");
    w(
        "Dockerfile.sum",
        format!(
            "FROM bb\nADD --checksum=sha256:{good} {} /srv/f\n",
            http.url("/files/hello.txt")
        ),
    );
    build_json(&k, &ctx, "Dockerfile.sum", "sum");
    let disk = export(&k, "sum", tmp.path());
    assert_eq!(debugfs(&disk, "cat /srv/f"), "hello v2\n");
    let bad = "0".repeat(64);
    w(
        "Dockerfile.bad",
        format!(
            "FROM bb\nADD --checksum=sha256:{bad} {} /srv/f\n",
            http.url("/files/hello.txt")
        ),
    );
    let err = build_fails(&k, &ctx, "Dockerfile.bad", "bad");
    assert!(
        err.contains("digest mismatch") && err.contains(&good) && err.contains(&bad),
        "{err}"
    );
    assert!(err.contains("Dockerfile.bad:2"), "line number: {err}");
    w(
        "Dockerfile.badform",
        format!(
            "FROM bb\nADD --checksum=md5:abc {} /srv/f\n",
            http.url("/files/hello.txt")
        ),
    );
    let err = build_fails(&k, &ctx, "Dockerfile.badform", "badform");
    assert!(err.contains("--checksum=md5:abc"), "{err}");
    w("local.txt", "x".into());
    w(
        "Dockerfile.localsum",
        format!("FROM bb\nADD --checksum=sha256:{good} local.txt /srv/\n"),
    );
    let err = build_fails(&k, &ctx, "Dockerfile.localsum", "localsum");
    assert!(err.contains("URL sources only"), "{err}");

    // 404 and nothing listening: clear errors, nothing tagged.
    w(
        "Dockerfile.404",
        format!("FROM bb\nADD {} /srv/\n", http.url("/files/missing.txt")),
    );
    let err = build_fails(&k, &ctx, "Dockerfile.404", "nf");
    assert!(err.contains("HTTP 404"), "{err}");
    assert!(err.contains("missing.txt"), "{err}");
    w(
        "Dockerfile.down",
        format!(
            "FROM bb\nADD http://127.0.0.1:{}/f.txt /srv/\n",
            free_port()
        ),
    );
    let err = build_fails(&k, &ctx, "Dockerfile.down", "down");
    assert!(err.contains("cannot fetch"), "{err}");
    // A URL without a file name needs a destination file name.
    w(
        "Dockerfile.noname",
        format!("FROM bb\nADD {} /srv/\n", http.url("/")),
    );
    let err = build_fails(&k, &ctx, "Dockerfile.noname", "noname");
    assert!(err.contains("file name"), "{err}");
}

/// Writes a raw tar entry (name bytes as given, so `..` can be expressed) to `out`.
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, body: &[u8]) {
    let mut h = tar::Header::new_ustar();
    {
        let b = h.as_mut_bytes();
        b[..name.len()].copy_from_slice(name.as_bytes());
        b[157..157 + link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(body.len() as u64);
    h.set_mtime(0);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

#[test]
fn add_unpacks_local_archives_and_refuses_escapes() {
    let Some((tmp, k)) = setup() else {
        return;
    };
    for tool in ["tar", "gzip", "bzip2", "xz", "zstd"] {
        if !have(tool) {
            eprintln!("SKIP: {tool} is needed to make the test archives");
            return;
        }
    }
    // A tree with a subdirectory, a symlink, a hardlink and an executable.
    let payload = tmp.path().join("payload");
    std::fs::create_dir_all(payload.join("dir")).unwrap();
    std::fs::write(payload.join("dir/file.txt"), "payload\n").unwrap();
    std::fs::write(payload.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::os::unix::fs::symlink("dir/file.txt", payload.join("link")).unwrap();
    std::fs::hard_link(payload.join("dir/file.txt"), payload.join("hard")).unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    let tar = |flags: &[&str], out: &str| {
        let st = Command::new("tar")
            .args(flags)
            .arg("-f")
            .arg(ctx.join(out))
            .arg("-C")
            .arg(&payload)
            .args(["--owner=0", "--group=0", "--mtime=@0", "--sort=name", "."])
            .status()
            .unwrap();
        assert!(st.success(), "tar {flags:?}");
    };
    Command::new("chmod")
        .arg("755")
        .arg(payload.join("run.sh"))
        .status()
        .unwrap();
    tar(&["-cz"], "a.tar.gz");
    tar(&["-cj"], "a.tar.bz2");
    tar(&["-cJ"], "a.tar.xz");
    tar(&["--zstd", "-c"], "a.tar.zst");
    tar(&["-c"], "a.tar");
    // Named like an archive, but not one: a gzip of plain text, copied as it is.
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo not a tar | gzip -n > {}",
            ctx.join("notatar.gz").display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    // A tar archive with a name that does not say so: unpacked all the same.
    std::fs::copy(ctx.join("a.tar.xz"), ctx.join("blob.bin")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM bb\n\
         ADD a.tar.gz /opt/gz/\n\
         ADD a.tar.bz2 /opt/bz2\n\
         ADD a.tar.xz /opt/xz/\n\
         ADD a.tar.zst /opt/zst/\n\
         ADD a.tar /opt/plain/\n\
         ADD blob.bin /opt/blob/\n\
         ADD notatar.gz /opt/\n\
         ADD --chown=1000:1000 a.tar.gz /opt/owned/\n\
         COPY a.tar.gz /opt/copied/\n\
         RUN /opt/gz/run.sh > /opt/ran && cat /opt/zst/link > /opt/via-link\n",
    )
    .unwrap();
    let cold = build_json(&k, &ctx, "Dockerfile", "arch");
    let disk = export(&k, "arch", tmp.path());
    for d in ["gz", "bz2", "xz", "zst", "plain", "blob", "owned"] {
        assert_eq!(
            debugfs(&disk, &format!("cat /opt/{d}/dir/file.txt")),
            "payload\n",
            "ADD of the {d} archive"
        );
        let link = debugfs(&disk, &format!("stat /opt/{d}/link"));
        assert!(
            link.contains("Fast link dest: \"dir/file.txt\""),
            "{d}: {link}"
        );
        // The hardlink is one inode with the file (link count 2).
        let hard = debugfs(&disk, &format!("stat /opt/{d}/hard"));
        assert!(hard.contains("Links: 2"), "{d}: {hard}");
    }
    assert_eq!(debugfs(&disk, "cat /opt/ran"), "run\n");
    assert_eq!(debugfs(&disk, "cat /opt/via-link"), "payload\n");
    let owned = debugfs(&disk, "stat /opt/owned/dir/file.txt");
    assert!(
        owned.contains("User:  1000"),
        "--chown on unpacked files: {owned}"
    );
    let plain = debugfs(&disk, "stat /opt/gz/dir/file.txt");
    assert!(
        plain.contains("User:     0"),
        "owner from the archive: {plain}"
    );
    // Not a tar: copied as the gzip file it is. COPY never unpacks.
    let ng = debugfs(&disk, "stat /opt/notatar.gz");
    assert!(ng.contains("Type: regular"), "{ng}");
    let cp = debugfs(&disk, "stat /opt/copied/a.tar.gz");
    assert!(cp.contains("Type: regular"), "{cp}");
    assert!(debugfs(&disk, "ls /opt/copied").contains("a.tar.gz"));

    // No change: all cached. A changed archive reruns its step and the ones after.
    let again = build_json(&k, &ctx, "Dockerfile", "arch");
    assert_eq!(again["image"], cold["image"]);
    assert!(build_steps(&again).iter().all(|(_, c)| *c), "{again}");
    std::fs::write(payload.join("dir/file.txt"), "payload v2\n").unwrap();
    tar(&["--zstd", "-c"], "a.tar.zst");
    let changed = build_json(&k, &ctx, "Dockerfile", "arch");
    let s = build_steps(&changed);
    let first_miss = s.iter().position(|(_, c)| !c).expect("a miss");
    assert_eq!(s[first_miss].0, "ADD a.tar.zst /opt/zst/", "{s:?}");
    let disk = export(&k, "arch", tmp.path());
    assert_eq!(debugfs(&disk, "cat /opt/via-link"), "payload v2\n");
    assert_eq!(debugfs(&disk, "cat /opt/gz/dir/file.txt"), "payload\n");

    // Archives that try to leave their destination: refused with the layer rules, nothing
    // tagged, nothing written outside.
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot.tar",
            {
                let mut t = Vec::new();
                raw_entry(&mut t, "../escaped", tar::EntryType::Regular, "", b"evil");
                t.resize(t.len() + 1024, 0);
                t
            },
            "..",
        ),
        (
            "symlink.tar",
            {
                let mut t = Vec::new();
                raw_entry(
                    &mut t,
                    "out",
                    tar::EntryType::Symlink,
                    victim.to_str().unwrap(),
                    b"",
                );
                raw_entry(&mut t, "out/pwned", tar::EntryType::Regular, "", b"evil");
                t.resize(t.len() + 1024, 0);
                t
            },
            "symlink",
        ),
        (
            "relsymlink.tar",
            {
                let mut t = Vec::new();
                raw_entry(&mut t, "up", tar::EntryType::Symlink, "../../../../..", b"");
                raw_entry(&mut t, "up/pwned", tar::EntryType::Regular, "", b"evil");
                t.resize(t.len() + 1024, 0);
                t
            },
            "symlink",
        ),
        (
            "hardlink.tar",
            {
                let mut t = Vec::new();
                raw_entry(&mut t, "h", tar::EntryType::Link, "../../etc/passwd", b"");
                t.resize(t.len() + 1024, 0);
                t
            },
            "..",
        ),
        (
            "whiteout.tar",
            {
                let mut t = Vec::new();
                raw_entry(&mut t, ".wh.bin", tar::EntryType::Regular, "", b"");
                t.resize(t.len() + 1024, 0);
                t
            },
            "whiteout",
        ),
        (
            "device.tar",
            {
                let mut t = Vec::new();
                raw_entry(&mut t, "sda", tar::EntryType::Block, "", b"");
                t.resize(t.len() + 1024, 0);
                t
            },
            "device",
        ),
    ];
    for (name, bytes, why) in cases {
        std::fs::write(ctx.join(name), bytes).unwrap();
        let df = format!("Dockerfile.{name}");
        std::fs::write(ctx.join(&df), format!("FROM bb\nADD {name} /opt/x/\n")).unwrap();
        let err = build_fails(&k, &ctx, &df, "evil");
        assert!(
            err.to_lowercase().contains(why) && err.contains(name),
            "{name}: {err}"
        );
        assert!(err.contains(&format!("{df}:2")), "line number: {err}");
        assert_eq!(
            std::fs::read_dir(&victim).unwrap().count(),
            0,
            "{name} wrote outside"
        );
    }
    assert!(!tmp.path().join("escaped").exists());
}
