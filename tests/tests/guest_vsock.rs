//! virtio-vsock through the real VMM with the kiln test guest: host-to-guest and guest-to-host
//! connections, many connections at once, flow control under load, and the request protocol.

mod guest_support;

use guest_support::{GuestOpts, GuestVm};
use kiln_tests::require_kvm;
use std::io::{BufRead, BufReader, Read, Write};
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

    // Guest -> host: the guest dials host port 5000, i.e. `<uds>_5000`, sends its text and shuts
    // down its sending side: the host reads to the end of the stream, and its answer, written
    // after that, still reaches the guest (a half-closed connection).
    let uds = g.uds.clone().unwrap();
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        writeln!(s, "host saw: {}", text.trim_end()).unwrap();
        text
    });
    // Pipelined behind the DIAL, the PING's reply still comes second: replies keep request order.
    write!(c.writer, "DIAL 5000 hi from the guest\nPING\n").unwrap();
    assert_eq!(c.read_line(), "OK host saw: hi from the guest");
    assert_eq!(c.read_line(), "PONG");
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

/// A host that writes requests but does not read the replies for a while: every buffer on the
/// reply path fills up (the host socket, the device's queue, the guest's output buffer), and the
/// guest must then stop consuming requests (its receive credit runs out, the device stops
/// reading the host socket, the host's writer blocks) instead of dropping replies. Once the host
/// reads, every reply arrives, in order.
#[test]
fn vsock_stalled_host_reader_loses_no_reply() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    require_kvm!();
    let g = GuestVm::start(GuestOpts::default());
    g.wait_serial("kt: serving", Duration::from_secs(10));
    let mut c = g.connect(9);
    // A lost reply shows as a reader waiting for bytes that never come: fail in seconds.
    c.writer
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    // ~1.5 MiB of replies: several times what the reply path can buffer (~0.5 MiB).
    const LINES: usize = 1500;
    let payload: String = (0..1000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let written = Arc::new(AtomicUsize::new(0));
    let mut w = c.writer.try_clone().unwrap();
    let (p2, n2) = (payload.clone(), written.clone());
    let writer = std::thread::spawn(move || {
        for i in 0..LINES {
            writeln!(w, "ECHO {i} {p2}").unwrap();
            n2.fetch_add(1, Ordering::Relaxed);
        }
    });
    // Read nothing until the writer is done or has stopped making progress (back-pressure).
    let mut last = usize::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = written.load(Ordering::Relaxed);
        if now == LINES || now == last {
            break;
        }
        last = now;
    }
    let stalled_at = written.load(Ordering::Relaxed);
    eprintln!("writer stalled after {stalled_at} of {LINES} requests");
    for i in 0..LINES {
        let mut got = String::new();
        match c.reader.read_line(&mut got) {
            Ok(n) if n > 0 => {}
            r => panic!("reply {i} (writer stalled at {stalled_at}): {r:?}"),
        }
        let got = got.trim_end_matches('\n');
        if got != format!("{i} {payload}") {
            panic!(
                "reply {i} (writer stalled at {stalled_at}): got {:?}...",
                &got[..got.len().min(40)]
            );
        }
    }
    writer.join().unwrap();
    assert!(
        stalled_at < LINES,
        "the guest consumed all {LINES} requests while nobody read its replies: \
         replies must have been buffered without bound or dropped"
    );
    assert_eq!(c.request("PING"), "PONG");
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

/// Parses `OK gen=<n> id=<hex> time_ns=<n> rand=0x<hex>` (the test guest's `GEN` reply).
fn parse_gen(reply: &str) -> (u64, String, u64, u64) {
    let f = |k: &str| {
        reply
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in GEN reply {reply:?}"))
            .to_string()
    };
    assert!(reply.starts_with("OK "), "GEN failed: {reply:?}");
    (
        f("gen=").parse().unwrap(),
        f("id="),
        f("time_ns=").parse().unwrap(),
        guest_support::parse_hex(&f("rand=")),
    )
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A restored copy of a paused VM (its memory copied, its vsock on `uds`), started.
fn restore_copy(
    src: &kiln_vmm::Vm,
    state: &kiln_vmm::VmState,
    dir: &std::path::Path,
    name: &str,
) -> kiln_vmm::Vm {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let mem_bytes = state.mem_bytes;
    let fresh =
        kiln_vmm::memory::create(mem_bytes, kiln_vmm::GuestMemorySource::Anonymous).unwrap();
    for r in src.memory().iter() {
        let mut buf = vec![0u8; r.len() as usize];
        src.memory().read_slice(&mut buf, r.start_addr()).unwrap();
        fresh.write_slice(&buf, r.start_addr()).unwrap();
    }
    let config = kiln_vmm::VmConfig {
        mem_bytes,
        serial_log: Some(dir.join(format!("{name}.serial"))),
        ..Default::default()
    };
    let mut vm = kiln_vmm::Vm::new(config, kiln_vmm::GuestMemorySource::Provided(fresh)).unwrap();
    let res = kiln_vmm::devices::virtio::persist::DeviceResources {
        vsock_uds: Some(dir.join(format!("{name}.vsock"))),
        ..Default::default()
    };
    vm.add_restored_devices(state, res).unwrap();
    vm.restore_state(state).unwrap();
    vm.start().unwrap();
    vm
}

#[test]
fn generation_id_boot_restore_and_forks() {
    require_kvm!();
    let g = GuestVm::start(GuestOpts::default());
    g.wait_serial("kt: serving", Duration::from_secs(10));
    let mut c = g.connect(1);

    // Plain boot: generation 0, the id the VMM reports, live host time and entropy.
    let (gen0, id0, t, r1) = parse_gen(&c.request("GEN"));
    assert_eq!(gen0, 0);
    assert_eq!(id0, g.vm.generation_id().id_hex());
    assert_ne!(id0, "0".repeat(32));
    let host = now_ns();
    assert!(
        t <= host && host - t < 5_000_000_000,
        "guest read host time {t}, host {host}"
    );
    let (_, _, _, r2) = parse_gen(&c.request("GEN"));
    assert_ne!(r1, r2, "every read of the random register is fresh");
    drop(c);

    // Snapshot it (in-process: paused state + a copy of memory) and fork it twice.
    g.vm.pause().unwrap();
    let state = g.vm.save_state().unwrap();
    assert_eq!(state.genid.generation, 0);
    let dir = tempfile::tempdir().unwrap();
    let forks: Vec<kiln_vmm::Vm> = (0..2)
        .map(|i| restore_copy(&g.vm, &state, dir.path(), &format!("f{i}")))
        .collect();
    let mut ids = Vec::new();
    for (i, f) in forks.iter().enumerate() {
        let mut c = guest_support::connect_uds(&dir.path().join(format!("f{i}.vsock")), 1);
        let (gen, id, _, _) = parse_gen(&c.request("GEN"));
        assert_eq!(gen, 1, "fork {i}: a restore is the next generation");
        assert_eq!(id, f.generation_id().id_hex(), "fork {i}");
        assert_ne!(id, id0, "fork {i} has a new id");
        ids.push(id);
    }
    assert_ne!(
        ids[0], ids[1],
        "two forks of one snapshot have distinct ids"
    );

    // A snapshot of a fork restores as generation 2; the state saved old states still load.
    forks[0].pause().unwrap();
    let s1 = forks[0].save_state().unwrap();
    let again = restore_copy(&forks[0], &s1, dir.path(), "g2");
    let mut c = guest_support::connect_uds(&dir.path().join("g2.vsock"), 1);
    assert_eq!(parse_gen(&c.request("GEN")).0, 2);
    drop(c);

    let mut json = serde_json::to_value(&state).unwrap();
    json.as_object_mut().unwrap().remove("genid");
    let old: kiln_vmm::VmState = serde_json::from_value(json).unwrap();
    assert_eq!(
        old.genid.generation, 0,
        "states from before the device load as generation 0"
    );

    for vm in forks.iter().chain([&again]) {
        vm.stop();
        assert!(vm.wait_timeout(Duration::from_secs(5)).is_some());
    }
    g.vm.resume().unwrap();
}

#[test]
fn idle_guest_sleeps_wakes_on_requests_and_pauses_promptly() {
    require_kvm!();
    let g = GuestVm::start(GuestOpts::default());
    g.wait_serial("kt: serving (idle port)", Duration::from_secs(10));
    let mut c = g.connect(1);

    // Idle: the main loop runs about once per idle sleep (~10 ms) instead of millions of
    // times a second. After a request it spins kt.idle=2000 times before idling.
    let a: u64 = c.ok("COUNTER").parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b: u64 = c.ok("COUNTER").parse().unwrap();
    assert!(b > a, "the counter keeps counting while idle ({a} -> {b})");
    assert!(
        b - a < 20_000,
        "guest did not idle: {} loop iterations in 300 ms",
        b - a
    );

    // A request wakes the idle vCPU at once: replies come far faster than the 10 ms idle sleep.
    let mut lat = Vec::new();
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(25));
        let t = std::time::Instant::now();
        assert_eq!(c.request("PING"), "PONG");
        lat.push(t.elapsed());
    }
    lat.sort();
    eprintln!("PING after idle: median {:?}, max {:?}", lat[7], lat[14]);
    assert!(
        lat[7] < Duration::from_millis(3),
        "idle guest woke late: {lat:?}"
    );

    // Pause, save and stop act at once on an idle vCPU.
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    g.vm.pause().unwrap();
    let pause = t.elapsed();
    let s1 = g.vm.save_state().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let s2 = g.vm.save_state().unwrap();
    assert_eq!(
        s1.vcpus[0].regs.rip, s2.vcpus[0].regs.rip,
        "paused means paused"
    );
    assert!(
        pause < Duration::from_millis(100),
        "pausing an idle vCPU took {pause:?}"
    );
    g.vm.resume().unwrap();
    assert_eq!(c.request("PING"), "PONG");
    let c2: u64 = c.ok("COUNTER").parse().unwrap();
    assert!(c2 > b, "counter continues after the pause");
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    g.vm.stop();
    let r = g.vm.wait_timeout(Duration::from_secs(2));
    assert_eq!(r, Some(kiln_vmm::ExitReason::Stopped));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "stop took {:?}",
        t.elapsed()
    );
}

/// The whole user path: `kiln vm run`, `kiln snapshot create`, `kiln vm fork`, `kiln vm
/// restore` (separate VMM processes) and the generation each guest reads.
#[test]
fn generation_id_through_the_kiln_cli() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let k = kiln_tests::Kiln::new(dir.path().join("home"));
    let _vms = k.stop_vms_on_drop();
    let uds = dir.path().join("src.vsock");
    let id = k.ok_str(kiln_tests::test_guest_vm_run(&[
        "-d",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]));
    let id = id.trim().to_string();
    let gen = |uds: &std::path::Path| {
        let (g, id, _, _) = parse_gen(&guest_support::connect_uds(uds, 1).request("GEN"));
        (g, id)
    };
    let (g0, id0) = gen(&uds);
    assert_eq!(g0, 0);
    k.ok(["snapshot", "create", &id, "--name", "s"]);
    assert_eq!(
        gen(&uds),
        (0, id0.clone()),
        "the snapshotted VM itself is unchanged"
    );

    let fdir = dir.path().join("forks");
    std::fs::create_dir_all(&fdir).unwrap();
    k.ok([
        "vm",
        "fork",
        "s",
        "-n",
        "2",
        "--vsock-dir",
        fdir.to_str().unwrap(),
    ]);
    let mut ids = std::collections::HashSet::new();
    let mut forks = Vec::new();
    for e in std::fs::read_dir(&fdir).unwrap() {
        let p = e.unwrap().path();
        let (g, fid) = gen(&p);
        assert_eq!(g, 1, "fork {}", p.display());
        assert_ne!(fid, id0);
        ids.insert(fid);
        forks.push(p.file_stem().unwrap().to_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 2, "two forks, two ids");

    // A snapshot of a fork, restored: generation 2.
    k.ok(["snapshot", "create", &forks[0], "--name", "s2"]);
    let ruds = dir.path().join("r.vsock");
    k.ok([
        "vm",
        "restore",
        "s2",
        "-d",
        "--vsock-uds",
        ruds.to_str().unwrap(),
    ]);
    assert_eq!(gen(&ruds).0, 2);
}
