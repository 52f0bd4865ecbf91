//! virtio-vsock through the real VMM with the kiln test guest: host-to-guest and guest-to-host
//! connections, many connections at once, flow control under load, and the request protocol.

mod guest_support;

use guest_support::{GuestOpts, GuestVm};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

#[test]
fn vsock_echo_both_ways() {
    require_kvm!();
    let g = GuestVm::start(GuestOpts::default());
    g.wait_serial("kt: serving", Duration::from_secs(10));

    // Host -> guest.
    let mut c = g.connect(1234);
    assert!(
        c.host_port >= 1 << 30,
        "host port comes from the ephemeral range"
    );
    assert_eq!(c.request("PING"), "PONG");
    assert_eq!(
        c.request("ECHO hello vsock  with spaces"),
        "hello vsock  with spaces"
    );
    let a: u64 = c.ok("COUNTER").parse().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let b: u64 = c.ok("COUNTER").parse().unwrap();
    assert!(b > a, "guest main loop counter advances ({a} -> {b})");
    assert!(c.request("NOSUCHTHING").starts_with("ERR"));

    // Guest -> host: the guest dials host port 5000, i.e. `<uds>_5000`.
    let uds = g.uds.clone().unwrap();
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let mut w = s;
        writeln!(w, "host saw: {}", line.trim_end()).unwrap();
        line
    });
    assert_eq!(
        c.request("DIAL 5000 hi from the guest"),
        "OK host saw: hi from the guest"
    );
    assert_eq!(server.join().unwrap(), "hi from the guest\n");

    // A dial to a port nobody listens on is refused, and the guest says so.
    let r = c.request("DIAL 5001 anyone?");
    assert!(r.starts_with("ERR dial"), "{r}");
    assert_eq!(c.request("PING"), "PONG");
}

#[test]
fn vsock_many_connections_and_flow_control() {
    require_kvm!();
    let g = GuestVm::start(GuestOpts::default());
    g.wait_serial("kt: serving", Duration::from_secs(10));

    let mut conns: Vec<_> = (0..8).map(|i| g.connect(100 + i)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.request(&format!("ECHO conn {i}")), format!("conn {i}"));
    }
    let ports: std::collections::HashSet<u32> = conns.iter().map(|c| c.host_port).collect();
    assert_eq!(ports.len(), 8, "every connection gets its own host port");

    // Pipeline far more than any buffer holds in both directions: 4000 lines of ~1 KiB
    // (4 MiB, far more than either side's window) written before reading, through the credit scheme on both sides.
    let c = &mut conns[3];
    let payload: String = (0..1000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut w = c.writer.try_clone().unwrap();
    let p2 = payload.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..4000 {
            writeln!(w, "ECHO {i} {p2}").unwrap();
        }
    });
    for i in 0..4000 {
        assert_eq!(c.read_line(), format!("{i} {payload}"));
    }
    writer.join().unwrap();

    // Closing connections frees them in the guest (its table has 16 slots).
    drop(conns);
    for round in 0..3 {
        let conns: Vec<_> = (0..12).map(|i| g.connect(200 + i)).collect();
        for mut c in conns {
            assert_eq!(c.request("PING"), "PONG", "round {round}");
        }
    }
}

#[test]
fn vsock_connect_to_bad_line_is_refused_and_device_survives() {
    require_kvm!();
    let g = GuestVm::start(GuestOpts::default());
    g.wait_serial("kt: serving", Duration::from_secs(10));
    let uds = g.uds.clone().unwrap();
    for bad in [
        "HELLO\n",
        "CONNECT\n",
        "CONNECT x\n",
        "CONNECT 99999999999\n",
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bad.as_bytes()).unwrap();
        let mut r = String::new();
        let _ = BufReader::new(s).read_line(&mut r);
        assert!(r.starts_with("ERR") || r.is_empty(), "{bad:?} -> {r:?}");
    }
    let mut c = g.connect(7);
    assert_eq!(c.request("PING"), "PONG");
}
