//! Process requests against the agent binary: users, ttys, the process table, background
//! processes and reconnects, signals, stdin, and bounded memory under flooding output.

mod common;

use common::*;
use kiln_agent::client::{self, ClientError};
use kiln_agent::protocol::{self, ErrorKind, ExitStatus, Kind, ProcessRef, TtySize};
use std::time::{Duration, Instant};

fn connect_all(a: &Agent, target: &ProcessRef) -> (protocol::Started, Vec<u8>, ExitStatus) {
    let mut started = None;
    let mut out = Vec::new();
    let st = client::connect_process(
        &mut a.conn(),
        target,
        |s| started = Some(s),
        |_, d| out.extend_from_slice(d),
    )
    .unwrap();
    (started.expect("Started frame"), out, st)
}

fn find(a: &Agent, pid: i32) -> protocol::ProcessInfo {
    client::list_processes(&mut a.conn())
        .unwrap()
        .into_iter()
        .find(|p| p.pid == pid)
        .expect("listed")
}

#[test]
fn exec_as_another_user() {
    if !is_root() {
        eprintln!("SKIP: switching users needs root");
        return;
    }
    let a = Agent::start();
    let mut r = sh("id -u; id -g; id -G; echo $HOME $USER $LOGNAME");
    r.user = Some("nobody".into());
    let out = client::exec(&mut a.conn(), &r, b"", |_, _| {}).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "65534", "{text}");
    // One group only: supplementary groups are cleared.
    assert_eq!(lines[2], lines[1], "{text}");
    assert!(lines[3].ends_with(" nobody nobody"), "{text}");
    r.user = Some("4242:4343".into());
    r.argv = vec!["sh".into(), "-c".into(), "id -u; id -g".into()];
    let out = client::exec(&mut a.conn(), &r, b"", |_, _| {}).unwrap();
    assert_eq!(out.stdout, b"4242\n4343\n");
    r.user = Some("no-such-user".into());
    let e = client::exec(&mut a.conn(), &r, b"", |_, _| {}).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound), "{e}");
}

#[test]
fn exec_on_a_tty_and_resize_it() {
    let a = Agent::start();
    let mut r = sh("tty; stty size; echo err >&2");
    r.tty = Some(TtySize { cols: 80, rows: 24 });
    r.stdin = false;
    let out = client::exec(&mut a.conn(), &r, b"", |_, _| {}).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert!(text.contains("24 80\r\n"), "{text:?}");
    // Everything comes as Stdout on a tty.
    assert!(text.contains("err"), "{text:?}");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status.code, Some(0));

    // A program that cannot start is a clear error on a tty as well.
    let mut bad = req(&["/no/such/program"]);
    bad.tty = Some(TtySize { cols: 80, rows: 24 });
    let e = client::exec(&mut a.conn(), &bad, b"", |_, _| {}).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("/no/such/program"), "{e}");

    let mut r = sh("read x; stty size");
    r.tty = Some(TtySize { cols: 80, rows: 24 });
    r.stdin = false;
    r.background = true;
    r.tag = Some("resize-me".into());
    let pid = a.start_bg(&r);
    let t = ProcessRef::tag("resize-me");
    client::resize(&mut a.conn(), &t, 100, 30).unwrap();
    client::send_stdin(&mut a.conn(), &t, b"go\n").unwrap();
    let (s, out, st) = connect_all(&a, &t);
    assert_eq!(s.pid, pid);
    assert_eq!(st.code, Some(0));
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("30 100"), "{text:?}");
    // A process without a tty cannot be resized (one that lives on: a process that ended
    // while its starter was still connected is forgotten once its exit was sent).
    let pid = a.start_bg(&protocol::ExecRequest {
        background: true,
        stdin: false,
        ..sh("sleep 5")
    });
    let e = client::resize(&mut a.conn(), &ProcessRef::pid(pid), 1, 1).unwrap_err();
    assert!(
        e.to_string().contains("no tty") || e.kind() == Some(ErrorKind::Invalid),
        "{e}"
    );
}

#[test]
fn background_processes_survive_disconnects_and_replay_output() {
    let a = Agent::start();
    let mut r = sh("echo one; echo oops >&2; sleep 0.3; echo two; exit 7");
    r.background = true;
    r.stdin = false;
    r.tag = Some("bg".into());
    let pid = a.start_bg(&r);
    // The connection is gone; the process still runs to its end.
    a.wait_until(10, || !find(&a, pid).running);
    let info = find(&a, pid);
    assert_eq!(info.exit.unwrap().code, Some(7));
    assert_eq!(info.tag.as_deref(), Some("bg"));
    let (s, out, st) = connect_all(&a, &ProcessRef::tag("bg"));
    assert_eq!((s.pid, s.dropped), (pid, 0));
    assert_eq!(st.code, Some(7));
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("one\n") && text.contains("two\n") && text.contains("oops\n"));
    // Replayed in order, kinds kept.
    let mut kinds = Vec::new();
    client::connect_process(
        &mut a.conn(),
        &ProcessRef::pid(pid),
        |_| {},
        |k, d| kinds.push((k, d.to_vec())),
    )
    .unwrap();
    assert!(
        kinds.contains(&(Kind::Stderr, b"oops\n".to_vec())),
        "{kinds:?}"
    );
    // The last chunk is stdout ending with "two" (a reader scheduled late may take "one"
    // with it in one read).
    let (kind, last) = kinds.last().unwrap();
    assert!(
        *kind == Kind::Stdout && last.ends_with(b"two\n"),
        "{kinds:?}"
    );
    let stdout: Vec<u8> = kinds
        .iter()
        .filter(|(k, _)| *k == Kind::Stdout)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(stdout, b"one\ntwo\n");

    // Attaching while it runs: the buffered output, then the live output.
    r.argv[2] = "echo early; sleep 0.5; echo late".into();
    r.tag = Some("live".into());
    let t0 = Instant::now();
    a.start_bg(&r);
    std::thread::sleep(Duration::from_millis(150));
    let (_, out, st) = connect_all(&a, &ProcessRef::tag("live"));
    assert_eq!(out, b"early\nlate\n");
    assert_eq!(st.code, Some(0));
    assert!(t0.elapsed() >= Duration::from_millis(500));

    // Output nobody reads is bounded: the oldest is dropped and counted.
    r.argv = vec![
        "head".into(),
        "-c".into(),
        "3000000".into(),
        "/dev/zero".into(),
    ];
    r.tag = Some("big".into());
    let pid = a.start_bg(&r);
    // Exited and drained: the exit is recorded before the pump has read the pipe's last
    // bytes, and attaching meanwhile replays the buffer and then streams the rest.
    a.wait_until(10, || {
        let p = find(&a, pid);
        !p.running && p.dropped + protocol::RING_BYTES as u64 >= 3_000_000
    });
    let (s, out, _) = connect_all(&a, &ProcessRef::pid(pid));
    assert!(s.dropped > 0, "{s:?}");
    assert_eq!(s.dropped + out.len() as u64, 3_000_000);
    assert!(out.len() <= protocol::RING_BYTES);
    assert_eq!(find(&a, pid).dropped, s.dropped);

    let e = client::connect_process(&mut a.conn(), &ProcessRef::tag("nope"), |_| {}, |_, _| {})
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound));
    assert!(e.to_string().contains("no process with tag nope"), "{e}");
}

#[test]
fn foreground_processes_die_with_their_connection() {
    let a = Agent::start();
    let mut r = sh("sleep 30");
    r.tag = Some("fg".into());
    let pid = a.start_bg(&r); // not background: dropping the connection kills it
    a.wait_until(10, || !find(&a, pid).running);
    assert_eq!(find(&a, pid).exit.unwrap().signal, Some(9));
    assert!(!find(&a, pid).background);
}

#[test]
fn list_and_signal() {
    let a = Agent::start();
    let mut r = sh("sleep 30");
    r.background = true;
    r.stdin = false;
    r.tag = Some("sleeper".into());
    r.cwd = Some("/tmp".into());
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let pid = a.start_bg(&r);
    let info = find(&a, pid);
    assert!(info.running && info.exit.is_none() && info.background);
    assert_eq!(info.argv, r.argv);
    assert_eq!(info.cwd.as_deref(), Some("/tmp"));
    assert!(info.started_ms >= before && info.started_ms < before + 10_000);

    client::signal(&mut a.conn(), &ProcessRef::tag("sleeper"), 15).unwrap();
    let (_, _, st) = connect_all(&a, &ProcessRef::pid(pid));
    assert_eq!(
        st,
        ExitStatus {
            code: None,
            signal: Some(15)
        }
    );
    assert!(!find(&a, pid).running);
    // An exited process cannot be signalled; an unknown one is not found.
    let e = client::signal(&mut a.conn(), &ProcessRef::pid(pid), 15).unwrap_err();
    assert!(matches!(e, ClientError::Agent { .. }), "{e}");
    let e = client::signal(&mut a.conn(), &ProcessRef::pid(9_999_999), 15).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound));
    assert!(e.to_string().contains("no process with pid 9999999"), "{e}");
}

#[test]
fn stdin_of_a_background_process() {
    let a = Agent::start();
    let mut r = protocol::ExecRequest {
        background: true,
        stdin: false,
        ..req(&["cat"])
    };
    r.tag = Some("cat".into());
    let pid = a.start_bg(&r);
    let t = ProcessRef::tag("cat");
    client::send_stdin(&mut a.conn(), &t, b"hello\n").unwrap();
    let big: Vec<u8> = (0..2_500_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    client::send_stdin(&mut a.conn(), &ProcessRef::pid(pid), &big).unwrap();
    client::close_stdin(&mut a.conn(), &t).unwrap();
    let mut out = Vec::new();
    let st = client::connect_process(&mut a.conn(), &t, |_| {}, |_, d| out.extend_from_slice(d))
        .unwrap();
    assert_eq!(st.code, Some(0));
    // The buffer keeps the last RING_BYTES; everything arrived in order.
    let mut want = b"hello\n".to_vec();
    want.extend_from_slice(&big);
    assert!(want.ends_with(&out), "{} bytes", out.len());
    assert!(out.len() >= protocol::RING_BYTES - 64 * 1024);
    let e = client::send_stdin(&mut a.conn(), &t, b"late").unwrap_err();
    assert!(
        e.to_string().contains("closed") || e.kind().is_some(),
        "{e}"
    );
}

#[test]
fn exec_stream_feeds_stdin_from_a_reader() {
    let a = Agent::start();
    let input: Vec<u8> = (0..1_000_000u32).map(|i| (i % 256) as u8).collect();
    let mut pid = 0;
    let mut n = 0usize;
    let st = client::exec_stream(
        &mut a.conn(),
        &req(&["wc", "-c"]),
        Some(Box::new(std::io::Cursor::new(input))),
        |p| pid = p,
        |_, d| {
            n += String::from_utf8_lossy(d)
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        },
    )
    .unwrap();
    assert!(pid > 0);
    assert_eq!((st.code, n), (Some(0), 1_000_000));
}

#[test]
fn flooding_output_keeps_the_agent_small() {
    use std::io::Read;
    let a = Agent::start();
    let rss0 = a.rss();
    let mut s = a.conn();
    let total = 200u64 << 20;
    let r = req(&["head", "-c", &total.to_string(), "/dev/zero"]);
    protocol::write_json(&mut s, Kind::Exec, &r).unwrap();
    protocol::write_frame(&mut s, Kind::Stdin, b"").unwrap();
    let mut got = 0u64;
    let mut max_rss = 0;
    // A slow reader: the process waits on its pipe.
    for _ in 0..10 {
        let (k, d) = protocol::read_frame(&mut s).unwrap().unwrap();
        assert!(matches!(k, Kind::Started | Kind::Stdout), "{k:?}");
        if k == Kind::Stdout {
            got += d.len() as u64;
        }
        std::thread::sleep(Duration::from_millis(100));
        max_rss = max_rss.max(a.rss());
    }
    assert!(got < 8 << 20, "the agent read ahead {got} bytes");
    // Then drain quickly.
    let t0 = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let status = loop {
        let (k, d) = protocol::read_frame(&mut s).unwrap().unwrap();
        match k {
            Kind::Stdout => got += d.len() as u64,
            Kind::Exit => break protocol::parse_json::<ExitStatus>(k, &d).unwrap(),
            k => panic!("unexpected {k:?}"),
        }
        if got % (16 << 20) < d.len() as u64 {
            max_rss = max_rss.max(a.rss());
        }
        assert!(t0.elapsed() < Duration::from_secs(120));
    };
    let _ = s.read(&mut buf);
    eprintln!(
        "agent RSS: {} KiB at start, at most {} KiB",
        rss0 >> 10,
        max_rss >> 10
    );
    assert_eq!(status.code, Some(0));
    assert_eq!(got, total);
    assert!(
        max_rss < 64 << 20,
        "agent RSS reached {} MiB (started at {} MiB)",
        max_rss >> 20,
        rss0 >> 20
    );
}

#[test]
fn exited_entries_are_bounded_and_delivered_ones_leave_at_once() {
    let a = Agent::start();
    let exited = || {
        client::list_processes(&mut a.conn())
            .unwrap()
            .into_iter()
            .filter(|p| !p.running)
            .collect::<Vec<_>>()
    };
    // Their client received their end: nothing is kept.
    for i in 0..20 {
        let out = client::exec(&mut a.conn(), &sh(&format!("exit {i}")), b"", |_, _| {}).unwrap();
        assert_eq!(out.status.code, Some(i));
    }
    // (The agent takes them out right after sending their end.)
    a.wait_until(10, || exited().is_empty());
    // Their client went away: kept for reconnects, the KEEP_EXITED that ended last. They end
    // only once every client is gone (a process ending while its client still listens is
    // delivered, and so not kept: under load that happened before the client's close); the
    // last one ends after all the others, so it must be kept and the first to end must go.
    let gate = tempfile::tempdir().unwrap();
    let (go, go_last) = (gate.path().join("go"), gate.path().join("go-last"));
    let n = protocol::KEEP_EXITED + 6;
    for i in 0..n {
        let gate = if i + 1 == n { &go_last } else { &go };
        a.start_bg(&protocol::ExecRequest {
            background: true,
            stdin: false,
            ..sh(&format!(
                "while [ ! -e {} ]; do sleep 0.05; done; exit {i}",
                gate.display()
            ))
        });
    }
    let running = || {
        client::list_processes(&mut a.conn())
            .unwrap()
            .iter()
            .filter(|p| p.running)
            .count()
    };
    std::fs::write(&go, b"").unwrap();
    a.wait_until(30, || {
        running() == 1 && exited().len() == protocol::KEEP_EXITED
    });
    std::fs::write(&go_last, b"").unwrap();
    let last = Some(n as i32 - 1);
    a.wait_until(30, || {
        let l = exited();
        running() == 0
            && l.len() == protocol::KEEP_EXITED
            && l.iter().any(|p| p.exit.unwrap().code == last)
    });
}

#[test]
fn exit_is_not_held_up_by_a_process_left_behind() {
    let a = Agent::start();
    let t0 = Instant::now();
    // The backgrounded sleep keeps stdout and stderr open after sh exits.
    let out = a.exec(&["sh", "-c", "sleep 3 & echo hi"], b"").unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.status.code),
        (&b"hi\n"[..], Some(0))
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
}
