//! The agent's protocol and exec logic, tested as a host process over a Unix socket (the same
//! code serves vsock inside a Linux guest).

mod common;

use common::*;
use kiln_agent::client;
use kiln_agent::protocol::{self, ExecRequest, Kind};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

#[test]
fn exec_streams_output_and_returns_exit_codes() {
    let a = Agent::start();
    let out = a
        .exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], b"")
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, Some(3));

    // stdin is delivered (several frames) and closed.
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = a.exec(&["wc", "-c"], &input).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3000000");
    assert_eq!(out.status.code, Some(0));

    let out = a.exec(&["sh", "-c", "kill -9 $$"], b"").unwrap();
    assert_eq!(
        out.status,
        protocol::ExitStatus {
            code: None,
            signal: Some(9)
        }
    );

    let mut req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo $FOO; pwd".into()],
        ..Default::default()
    };
    req.env.insert("FOO".into(), "bar".into());
    req.cwd = Some("/tmp".into());
    let out = client::exec(&mut a.conn(), &req, b"", |_, _| {}).unwrap();
    assert_eq!(out.stdout, b"bar\n/tmp\n");

    // Concurrent execs on separate connections.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let sock = a.sock.clone();
            std::thread::spawn(move || {
                let req = ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), format!("sleep 0.2; exit {i}")],
                    ..Default::default()
                };
                let mut s = UnixStream::connect(sock).unwrap();
                client::exec(&mut s, &req, b"", |_, _| {})
                    .unwrap()
                    .status
                    .code
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), Some(i as i32));
    }
}

#[test]
fn exec_output_arrives_while_the_process_runs() {
    let a = Agent::start();
    let t0 = Instant::now();
    let mut first_chunk_at = None;
    let req = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo early; sleep 1; echo late".into(),
        ],
        ..Default::default()
    };
    let out = client::exec(&mut a.conn(), &req, b"", |k, _| {
        if k == Kind::Stdout && first_chunk_at.is_none() {
            first_chunk_at = Some(t0.elapsed());
        }
    })
    .unwrap();
    assert_eq!(out.stdout, b"early\nlate\n");
    let first = first_chunk_at.unwrap();
    assert!(
        first + Duration::from_millis(500) < t0.elapsed(),
        "output is streamed, not buffered to the end ({first:?} of {:?})",
        t0.elapsed()
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    let a = Agent::start();
    let e = a.exec(&["/no/such/program"], b"").unwrap_err();
    assert!(e.to_string().contains("/no/such/program"), "{e}");
    let e = a.exec(&[], b"").unwrap_err();
    assert!(e.to_string().contains("empty argv"), "{e}");
    // Unknown frame kind: an error frame, then the connection closes.
    let mut s = a.conn();
    s.write_all(&[1, 0, 0, 0, b'?', 0]).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert!(
        buf.len() > 5 && buf[4] == b'!',
        "error frame expected, got {buf:?}"
    );
    // Invalid JSON.
    let mut s = a.conn();
    protocol::write_frame(&mut s, Kind::Exec, b"{not json").unwrap();
    let (k, msg) = protocol::read_frame(&mut s).unwrap().unwrap();
    assert_eq!(k, Kind::Error);
    assert!(String::from_utf8_lossy(&msg).contains("JSON"));
    // The agent keeps serving.
    assert_eq!(a.exec(&["true"], b"").unwrap().status.code, Some(0));
}

#[test]
fn files_round_trip_atomically() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    let p = path.to_str().unwrap();
    let content: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let n = client::write_file(&mut a.conn(), &file_req(p, 0o600), &content[..]).unwrap();
    assert_eq!(n, content.len() as u64);
    assert_eq!(std::fs::read(&path).unwrap(), content);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(read_all(&a, p).unwrap(), content);
    let e = read_all(&a, "/no/such/file").unwrap_err();
    assert!(e.to_string().contains("/no/such/file"), "{e}");
    let e = client::write_file(&mut a.conn(), &file_req("/no/such/dir/x", 0o644), &b"x"[..])
        .unwrap_err();
    assert!(e.to_string().contains("/no/such/dir"), "{e}");
    // A write cut off mid-file leaves neither a partial file nor a temp file behind.
    {
        let mut s = a.conn();
        let q = dir.path().join("cut.bin");
        let req = protocol::FileRequest {
            path: q.to_str().unwrap().into(),
            ..Default::default()
        };
        protocol::write_json(&mut s, Kind::WriteFile, &req).unwrap();
        protocol::write_frame(&mut s, Kind::Data, b"partial").unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f.bin")]);
}
