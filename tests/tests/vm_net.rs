//! virtio-net end to end on real KVM with the test guest and real TAPs, each in a network
//! namespace the test creates (all traffic stays there): ARP, ICMP echo and UDP echo through
//! the queues; a guest feeding the device malformed chains; a TAP that disappears; snapshot,
//! two restores and two `kiln vm fork`s each on their own TAP in their own namespace at the
//! same guest address; a killed VMM lets go of its TAP.

mod guest_support;

use guest_support::{GuestOpts, GuestVm};
use kiln_tests::tapns::{netns_unavailable, ping, udp_echo, NetNs};
use kiln_tests::Kiln;
use kiln_vmm::devices::virtio::net::{Net, NicSpec};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const HOST_CIDR: &str = "10.77.0.1/24";
const TAP: &str = "ktap0";
const MAC: &str = "02:4b:00:00:00:02";

macro_rules! require_net {
    () => {
        kiln_tests::require_kvm!();
        if let Some(why) = netns_unavailable() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

fn ns_with_tap(tag: &str) -> NetNs {
    let ns = NetNs::new(tag).unwrap();
    ns.add_tap(TAP, HOST_CIDR).unwrap();
    ns
}

fn nic(ns: &NetNs) -> Box<Net> {
    Box::new(
        Net::new(&NicSpec {
            tap: TAP.into(),
            netns: Some(ns.name.clone().into()),
            mac: Some(MAC.parse().unwrap()),
        })
        .expect("attach to the TAP in the namespace"),
    )
}

fn boot(ns: &NetNs, extra: &str) -> GuestVm {
    let cmdline = format!("kt.ip={GUEST} {extra}");
    GuestVm::start(GuestOpts {
        cmdline: &cmdline,
        vsock: false,
        disks: vec![nic(ns)],
        ..GuestOpts::default()
    })
}

fn pings(ns: &NetNs, n: u16) -> u16 {
    ns.run(move || ping(GUEST, n, Duration::from_secs(2)))
        .unwrap()
        .unwrap()
}

fn echo(ns: &NetNs, port: u16, payload: Vec<u8>) {
    ns.run(move || udp_echo(SocketAddrV4::new(GUEST, port), &payload, 6))
        .unwrap()
        .unwrap();
}

#[test]
fn arp_ping_udp_echo_and_a_vanishing_tap() {
    require_net!();
    let ns = ns_with_tap("a");
    let g = boot(&ns, "");
    assert!(ns.tap_attached(TAP), "the VMM holds the TAP open");
    let s = g.wait_serial("kt: serving", Duration::from_secs(10));
    assert!(s.contains("kt: virtio-net at"), "{s}");

    // ICMP through the device; the kernel resolved the guest's address by ARP on the way.
    assert_eq!(pings(&ns, 3), 3);
    assert_eq!(ns.neighbour(&GUEST.to_string()).as_deref(), Some(MAC));
    // UDP echo on any port, from one byte to a full 1500-byte IP packet.
    for (i, len) in [1usize, 100, 1472].into_iter().enumerate() {
        let p: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
        echo(&ns, 7000 + i as u16, p);
    }
    // Another address on the link gets no answer (the guest answers ARP for its own only).
    let other = ns
        .run(|| udp_echo(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 3), 7), b"x", 1))
        .unwrap();
    assert!(other.is_err(), "10.77.0.3 must not answer");

    // The TAP disappears under the running VM: frames are lost, the VMM and guest are not.
    ns.ip(&["link", "del", TAP]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(g.vm.state(), kiln_vmm::RunState::Running);
    g.vm.stop();
    assert!(
        g.vm.wait_timeout(Duration::from_secs(10)).is_some(),
        "the VM stops cleanly after losing its TAP"
    );
}

#[test]
fn misbehaving_guest_never_hurts_the_vmm() {
    require_net!();
    let ns = ns_with_tap("m");
    let g = boot(&ns, &format!("kt.mac={MAC} kt.mode=netmisbehave"));
    let s = g.wait_serial(
        "kt: netmisbehave rx-bad-buffers posted",
        Duration::from_secs(30),
    );
    assert!(
        s.contains("kt: netmisbehave tx done passed=10 failed=0"),
        "every malformed TX case returned and the device kept sending:\n{s}"
    );
    for case in [
        "oversized-frame",
        "outside-ram",
        "looping-chain",
        "head-out-of-range",
        "avail-idx-jump",
    ] {
        assert!(s.contains(&format!("kt: netmisbehave {case}:")), "{case}");
    }
    // RX: the first three buffers are malformed; the next frames from the host land on them
    // and are lost (the neighbour entry is static so no ARP is lost with them).
    ns.ip(&[
        "neigh",
        "replace",
        &GUEST.to_string(),
        "lladdr",
        MAC,
        "dev",
        TAP,
        "nud",
        "permanent",
    ])
    .unwrap();
    let t0 = Instant::now();
    while !g.serial_text().contains("rx-bad-buffers: returned=3/3") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "bad RX buffers never returned"
        );
        ns.run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"filler", SocketAddrV4::new(GUEST, 9)).unwrap();
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    // The device still works both ways.
    assert_eq!(pings(&ns, 3), 3);
    echo(&ns, 4242, b"still alive".to_vec());
    assert_eq!(g.vm.state(), kiln_vmm::RunState::Running);
    // And it counted what it refused: eight unusable TX chains (the header-offload case is a
    // valid frame, sent plain), the corrupt avail index, three bad RX buffers.
    let m = &g.vm.device_metrics()[0];
    assert_eq!(m["type"], 1);
    let c = &m["metrics"];
    assert_eq!(c["tx_dropped"], 8, "{m}");
    assert_eq!(c["queue_errors"], 1, "{m}");
    assert_eq!(c["rx_dropped"], 3, "{m}");
    assert!(c["tx_frames"].as_u64().unwrap() >= 11, "{m}");
}

fn pid_of(k: &Kiln, id: &str) -> i32 {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(k.home.join("vms").join(id).join("vm.json")).unwrap(),
    )
    .unwrap();
    meta["pid"].as_i64().unwrap() as i32
}

#[test]
fn snapshot_restore_and_forks_each_get_their_own_tap() {
    require_net!();
    let dir = tempfile::tempdir().unwrap();
    let k = Kiln::new(dir.path().join("home"));
    let _vms = k.stop_vms_on_drop();
    let (a, b, c) = (ns_with_tap("sa"), ns_with_tap("sb"), ns_with_tap("sc"));
    let tap_arg = |ns: &NetNs| format!("{TAP}@{}", ns.name);
    let id = k.ok_str(kiln_tests::test_guest_vm_run(&[
        "-d",
        "--cmdline",
        &format!("kt.ip={GUEST}"),
        "--net-tap",
        &tap_arg(&a),
        "--net-mac",
        MAC,
    ]));
    let id = id.trim();
    assert_eq!(pings(&a, 3), 3);
    k.json(["snapshot", "create", id, "--name", "net1", "--json"]);
    // Two VMs from the snapshot (a restore and a fork of it), each on the TAP of its own
    // namespace: same guest, same MAC, same address, no shared TAP.
    let r1 = k.ok_str([
        "snapshot",
        "restore",
        "net1",
        "-d",
        "--net-tap",
        &tap_arg(&b),
    ]);
    let r2 = k.ok_str([
        "snapshot",
        "restore",
        "net1",
        "-d",
        "--net-tap",
        &tap_arg(&c),
    ]);
    for (ns, what) in [(&a, "original"), (&b, "restore"), (&c, "fork")] {
        assert_eq!(pings(ns, 3), 3, "{what} answers in its namespace");
        assert_eq!(
            ns.neighbour(&GUEST.to_string()).as_deref(),
            Some(MAC),
            "{what} keeps the guest's MAC"
        );
    }
    echo(&b, 5000, b"restored".to_vec());
    echo(&c, 5001, b"forked".to_vec());
    // `kiln vm fork -n 2`, one TAP each (over one copy-on-write memory file).
    let (d, e) = (ns_with_tap("sd"), ns_with_tap("se"));
    let forks = k.ok_str([
        "vm",
        "fork",
        "net1",
        "-n",
        "2",
        "--net-tap",
        &tap_arg(&d),
        "--net-tap",
        &tap_arg(&e),
    ]);
    assert_eq!(forks.lines().count(), 2, "{forks}");
    for ns in [&d, &e] {
        assert_eq!(pings(ns, 3), 3, "fork in {} answers", ns.name);
        echo(ns, 6000, b"fork".to_vec());
    }
    let err = k.fails(["vm", "fork", "net1", "-n", "2", "--net-tap", &tap_arg(&d)]);
    assert!(err.contains("2 forks need 2 TAPs"), "{err}");

    // A bad TAP name is refused before anything runs.
    let err = k.fails(["snapshot", "restore", "net1", "--net-tap", "bad/name"]);
    assert!(err.contains("invalid TAP name"), "{err}");

    // kill -9 of one VMM: its TAP loses its reader (the descriptor closed with the process);
    // the others go on.
    let pid = pid_of(&k, r2.trim());
    assert!(c.tap_attached(TAP));
    // SAFETY: signals a child VMM process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    while c.tap_attached(TAP) {
        assert!(t0.elapsed() < Duration::from_secs(10), "TAP still attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pings(&c, 1), 0, "nothing answers on the killed VM's TAP");
    assert_eq!(pings(&b, 1), 1);
    let _ = k.run(["vm", "stop", r1.trim()]);
}

#[test]
fn bad_nic_arguments_are_clear_errors() {
    require_net!();
    let dir = tempfile::tempdir().unwrap();
    let k = Kiln::new(dir.path().join("home"));
    let _vms = k.stop_vms_on_drop();
    let err = k.fails(kiln_tests::test_guest_vm_run(&["--net-tap", "a/b"]));
    assert!(err.contains("invalid TAP name"), "{err}");
    let err = k.fails(kiln_tests::test_guest_vm_run(&[
        "--net-tap",
        "ktap0",
        "--net-mac",
        "01:00:00:00:00:01",
    ]));
    assert!(err.contains("multicast"), "{err}");
    let err = k.fails(kiln_tests::test_guest_vm_run(&[
        "-d",
        "--net-tap",
        &format!("ktap0@kt-no-such-ns-{}", std::process::id()),
    ]));
    assert!(err.contains("network namespace"), "{err}");
}
