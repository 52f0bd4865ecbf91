//! virtio-net frames per second with the test guest, against a veth pair in the same run.
//!
//! Device path: a TAP in a namespace this benchmark creates, the test guest (UDP echo on any
//! port) behind kiln's virtio-net; a host thread in that namespace sends UDP datagrams and
//! counts the echoes. Baseline: the same client, in another namespace, against a host echo
//! thread across a veth pair (kernel-only path: what a NIC costs with no VM in between). Each
//! echo is two frames through the device (one RX, one TX).
//!
//! Measured per round (rounds alternate device and baseline): ping-pong round trips (one
//! datagram in flight: latency), and windowed echoes (`--window` datagrams in flight: frames/s)
//! for 64-byte and 1400-byte payloads. Reports medians over rounds and device/baseline ratios.
//!
//! `cargo run --release -p kiln-benches --bin vm_net [-- --rounds 5 --n 100000 --window 32
//! --pingpong 5000]` (root: namespaces, TAP, veth; ~10 s)

use anyhow::{bail, Context, Result};
use kiln_benches::{arg, median};
use kiln_tests::tapns::{netns_unavailable, NetNs};
use kiln_vmm::devices::virtio::net::{Net, NicSpec};
use kiln_vmm::{GuestMemorySource, Vm, VmConfig};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const VETH_SERVER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const PORT: u16 = 7;

/// Ping-pong: `n` round trips of a 64-byte datagram; microseconds each.
fn pingpong(dst: SocketAddrV4, n: usize) -> Result<Vec<f64>> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0u8; 2048];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let p = (i as u64).to_le_bytes().repeat(8);
        let t0 = Instant::now();
        s.send_to(&p, dst)?;
        loop {
            match s.recv_from(&mut buf) {
                Ok((k, _)) if buf[..k] == p[..] => {
                    out.push(t0.elapsed().as_secs_f64() * 1e6);
                    break;
                }
                Ok(_) => continue,
                Err(_) => break, // lost: not counted
            }
        }
    }
    Ok(out)
}

/// Windowed echoes: keeps `window` datagrams of `size` bytes in flight until `n` came back
/// (or 30 s passed). Returns (echoes per second, lost).
fn windowed(dst: SocketAddrV4, n: u64, window: u64, size: usize) -> Result<(f64, u64)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = vec![0u8; 65536];
    let payload = vec![0x5au8; size];
    let (mut sent, mut got, mut lost) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    while got < n && t0.elapsed() < Duration::from_secs(30) {
        while sent - got - lost < window && sent < n + lost {
            s.send_to(&payload, dst)?;
            sent += 1;
        }
        match s.recv_from(&mut buf) {
            Ok((k, _)) if k == size => got += 1,
            Ok(_) => {}
            Err(_) => lost += sent - got - lost, // timed out: the window is gone
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if got == 0 {
        bail!("no echoes from {dst}");
    }
    Ok((got as f64 / secs, lost))
}

struct Sample {
    rtt_us: Vec<f64>,
    small: (f64, u64),
    large: (f64, u64),
}

fn measure(ns: &NetNs, dst: SocketAddrV4, pp: usize, n: u64, window: u64) -> Result<Sample> {
    ns.run(move || -> Result<Sample> {
        // Warm-up: ARP resolved, caches hot.
        pingpong(dst, 50)?;
        Ok(Sample {
            rtt_us: pingpong(dst, pp)?,
            small: windowed(dst, n, window, 64)?,
            large: windowed(dst, n / 2, window, 1400)?,
        })
    })?
}

fn boot_guest(ns: &NetNs, dir: &std::path::Path) -> Result<Vm> {
    let serial = dir.join("serial.log");
    let config = VmConfig {
        mem_bytes: 64 << 20,
        kernel: Some(kiln_testguest::elf_path().to_path_buf()),
        cmdline: format!("kt.ip={GUEST}"),
        serial_log: Some(serial.clone()),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(config, GuestMemorySource::Anonymous)?;
    let nic = Net::new(&NicSpec {
        tap: "kbtap0".into(),
        netns: Some(ns.name.clone().into()),
        mac: None,
    })?;
    vm.add_virtio_device(Box::new(nic))?;
    vm.set_entry_mode(kiln_vmm::EntryMode::User);
    vm.boot()?;
    vm.start()?;
    let t0 = Instant::now();
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("kt: serving")
    {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("test guest did not come up");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(vm)
}

/// Server side of the baseline: a UDP echo thread in `ns` until `stop`.
fn echo_server(ns: &NetNs, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let path = format!("/run/netns/{}", ns.name);
    let file = std::fs::File::open(&path).with_context(|| path.clone())?;
    Ok(std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only, with a namespace fd we hold.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return;
        }
        let s = UdpSocket::bind(SocketAddrV4::new(VETH_SERVER, PORT)).expect("bind echo");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    }))
}

fn main() -> Result<()> {
    if !kiln_benches::kvm_usable() {
        eprintln!("SKIP: /dev/kvm not usable");
        return Ok(());
    }
    if let Some(why) = netns_unavailable() {
        eprintln!("SKIP: {why}");
        return Ok(());
    }
    let rounds: usize = arg("--rounds", 5);
    let n: u64 = arg("--n", 100_000);
    let window: u64 = arg("--window", 32);
    let pp: usize = arg("--pingpong", 5000);
    let dir = tempfile::tempdir()?;

    let vns = NetNs::new("bv")?;
    vns.add_tap("kbtap0", "10.77.0.1/24")?;
    let vm = boot_guest(&vns, dir.path())?;

    let (cns, sns) = (NetNs::new("bc")?, NetNs::new("bs")?);
    let (vc, vs) = (
        format!("kbc{}", std::process::id() % 100000),
        format!("kbs{}", std::process::id() % 100000),
    );
    kiln_tests::tapns::ip(&["link", "add", &vc, "type", "veth", "peer", "name", &vs])?;
    kiln_tests::tapns::ip(&["link", "set", &vc, "netns", &cns.name])?;
    kiln_tests::tapns::ip(&["link", "set", &vs, "netns", &sns.name])?;
    cns.ip(&["addr", "add", "10.78.0.1/24", "dev", &vc])?;
    sns.ip(&["addr", "add", "10.78.0.2/24", "dev", &vs])?;
    cns.ip(&["link", "set", &vc, "up"])?;
    sns.ip(&["link", "set", &vs, "up"])?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&sns, stop.clone())?;

    let (mut dev, mut base) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        dev.push(measure(
            &vns,
            SocketAddrV4::new(GUEST, PORT),
            pp,
            n,
            window,
        )?);
        base.push(measure(
            &cns,
            SocketAddrV4::new(VETH_SERVER, PORT),
            pp,
            n,
            window,
        )?);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    vm.stop();
    let _ = vm.wait_timeout(Duration::from_secs(10));

    let summary = |v: &[Sample]| {
        let rtt = median(v.iter().map(|s| median(s.rtt_us.clone())).collect());
        let small = median(v.iter().map(|s| s.small.0).collect());
        let large = median(v.iter().map(|s| s.large.0).collect());
        let lost: u64 = v.iter().map(|s| s.small.1 + s.large.1).sum();
        (rtt, small, large, lost)
    };
    let (d_rtt, d_small, d_large, d_lost) = summary(&dev);
    let (b_rtt, b_small, b_large, b_lost) = summary(&base);
    let out = serde_json::json!({
        "bench": "vm_net",
        "rounds": rounds,
        "window": window,
        "echoes_per_round": n,
        "virtio_net": {
            "pingpong_rtt_us_median": d_rtt,
            "echoes_per_s_64b": d_small,
            "device_frames_per_s_64b": 2.0 * d_small,
            "echoes_per_s_1400b": d_large,
            "device_mbit_per_s_1400b": 2.0 * d_large * 1400.0 * 8.0 / 1e6,
            "lost": d_lost,
        },
        "baseline_veth": {
            "pingpong_rtt_us_median": b_rtt,
            "echoes_per_s_64b": b_small,
            "echoes_per_s_1400b": b_large,
            "lost": b_lost,
        },
        "ratio_rtt": d_rtt / b_rtt,
        "ratio_echoes_64b": d_small / b_small,
        "ratio_echoes_1400b": d_large / b_large,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
