//! Dial (a TCP connection inside the sandbox over the agent connection), health and the
//! generation request.

mod common;

use common::*;
use kiln_agent::client;
use kiln_agent::protocol::{ErrorKind, GenerationRequest, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};

#[test]
fn dial_pipes_bytes_both_ways_with_half_close() {
    let a = Agent::start();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        // Reads to the client's end of stream (its shutdown, passed on), then answers.
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(b"echo:").unwrap();
        s.write_all(&got).unwrap();
    });
    let mut s = client::dial(a.conn(), port).unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    s.write_all(&payload).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap(); // ends when the server closes
    server.join().unwrap();
    assert_eq!(&back[..5], b"echo:");
    assert!(back[5..] == payload[..], "payload differs");

    // A closed port.
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let e = client::dial(a.conn(), port).unwrap_err();
    assert!(e.to_string().contains("connection refused"), "{e}");
}

#[test]
fn health_and_generation() {
    let run = tempfile::tempdir().unwrap();
    let run_dir = run.path().join("kiln");
    let a = Agent::start_with_env(&[("KILN_AGENT_RUN_DIR", run_dir.to_str().unwrap())]);
    let h = client::health(&mut a.conn()).unwrap();
    assert_eq!(h.protocol, PROTOCOL_VERSION);
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.generation, 0);
    assert!(h.uptime_ms < 60_000);

    let req = GenerationRequest {
        generation: 7,
        // 0: leave the (host's) clock alone in this test.
        unix_time_ns: 0,
        seed_hex: "0123456789abcdef".repeat(4),
    };
    let r = client::set_generation(&mut a.conn(), &req).unwrap();
    assert_eq!(r.generation, 7);
    assert!(!r.clock_set);
    assert_eq!(
        std::fs::read_to_string(run_dir.join("generation")).unwrap(),
        "7\n"
    );
    let h2 = client::health(&mut a.conn()).unwrap();
    assert_eq!(h2.generation, 7);
    assert!(h2.uptime_ms >= h.uptime_ms);

    let bad = GenerationRequest {
        seed_hex: "xyz".into(),
        ..req
    };
    let e = client::set_generation(&mut a.conn(), &bad).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");
    assert_eq!(client::health(&mut a.conn()).unwrap().generation, 7);
    let names: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("generation")]);
}
