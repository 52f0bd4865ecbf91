//! virtio-blk driven by the kiln test guest through the real VMM: pattern round trips verified
//! on the host, checksums computed in the guest against the host's, and the misbehaving-guest
//! suite (malformed descriptors, out-of-range addresses, looping chains, oversize requests).

mod guest_support;

use guest_support::{parse_hex, GuestOpts, GuestVm};
use kiln_tests::require_kvm;
use kiln_vmm::devices::virtio::block::engine::FileEngine;
use kiln_vmm::devices::virtio::block::{Block, DiskBackend};
use std::time::Duration;

fn disk(
    dir: &std::path::Path,
    name: &str,
    mib: u64,
    engine: FileEngine,
) -> (std::path::PathBuf, Block) {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(mib << 20).unwrap();
    let backend = DiskBackend::File {
        path: path.clone(),
        engine,
        direct: false,
    };
    (
        path,
        Block::new(name, backend, false).expect("block device"),
    )
}

#[test]
fn blktest_mode_writes_pattern_the_host_can_verify() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (path, blk) = disk(dir.path(), "d0.img", 16, FileEngine::Uring);
    let g = GuestVm::start(GuestOpts {
        cmdline: "kt.mode=blktest",
        vsock: false,
        disks: vec![Box::new(blk)],
        ..Default::default()
    });
    let log = g.wait_serial("kt: blktest ", Duration::from_secs(30));
    let line = log.lines().find(|l| l.starts_with("kt: blktest ")).unwrap();
    assert!(
        line.starts_with("kt: blktest ok sectors=16384 hash="),
        "{line}\n{log}"
    );
    let data = std::fs::read(&path).unwrap();
    let mut want = vec![0u8; 8 << 20];
    kiln_testguest::fill_pattern(42, 0, &mut want);
    assert!(
        data[..8 << 20] == want[..],
        "the disk holds the guest's pattern"
    );
    assert!(
        data[8 << 20..].iter().all(|&b| b == 0),
        "nothing written past the range"
    );
    let hash = parse_hex(line.rsplit('=').next().unwrap());
    assert_eq!(
        hash,
        kiln_testguest::checksum(&want),
        "guest and host checksums agree"
    );
}

#[test]
fn blk_requests_over_vsock_on_two_disks() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (p0, b0) = disk(dir.path(), "a.img", 8, FileEngine::Uring);
    let (p1, b1) = disk(dir.path(), "b.img", 4, FileEngine::Sync);
    // Host-written content on disk 1, read and hashed by the guest.
    let mut host_data = vec![0u8; 4 << 20];
    kiln_testguest::fill_pattern(5, 0, &mut host_data);
    std::fs::write(&p1, &host_data).unwrap();

    let g = GuestVm::start(GuestOpts {
        disks: vec![Box::new(b0), Box::new(b1)],
        ..Default::default()
    });
    g.wait_serial("kt: serving", Duration::from_secs(10));
    let mut c = g.connect(1);
    assert_eq!(c.ok("BLKINFO"), "2 16384 8192");
    // Unaligned, odd-sized range crossing the guest's 1 MiB request size.
    assert_eq!(c.ok("BLKWRITE 0 1001 3001 77"), "");
    assert_eq!(c.ok("BLKFLUSH 0"), "");
    assert_eq!(c.ok("BLKCHECK 0 1001 3001 77"), "");
    assert!(c.request("BLKCHECK 0 1001 3001 78").starts_with("BAD 1001"));
    let got = parse_hex(&c.ok("BLKHASH 1 0 8192"));
    assert_eq!(got, kiln_testguest::checksum(&host_data));
    assert_eq!(c.ok("BLKCHECK 1 0 8192 5"), "");
    // Out of range and bad disk numbers are errors, not crashes.
    assert!(c.request("BLKHASH 0 16000 1000").starts_with("ERR"));
    assert!(c.request("BLKHASH 7 0 1").starts_with("ERR"));

    let data = std::fs::read(&p0).unwrap();
    let mut want = vec![0u8; 3001 * 512];
    kiln_testguest::fill_pattern(77, 1001 * 512, &mut want);
    assert!(data[1001 * 512..4002 * 512] == want[..]);
    assert!(data[..1001 * 512].iter().all(|&b| b == 0));
    assert!(data[4002 * 512..].iter().all(|&b| b == 0));
}

#[test]
fn misbehaving_guest_gets_errors_or_resets_and_the_vmm_survives() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (_p, blk) = disk(dir.path(), "scratch.img", 4, FileEngine::Uring);
    let g = GuestVm::start(GuestOpts {
        mem_mib: 48,
        cmdline: "kt.mode=misbehave",
        disks: vec![Box::new(blk)],
        ..Default::default()
    });
    let log = g.wait_serial("kt: misbehave done", Duration::from_secs(60));
    let cases: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("kt: misbehave ") && l.contains("->"))
        .collect();
    assert_eq!(cases.len(), 20, "{log}");
    for l in &cases {
        assert!(l.ends_with("-> recovered"), "device did not recover: {l}");
    }
    assert!(
        log.contains("kt: misbehave done passed=20 failed=0"),
        "{log}"
    );
    // Requests that are well-formed but wrong get an error status, not silence.
    for (case, status) in [
        ("sector-past-end", "status=1"),
        ("unknown-type", "status=2"),
    ] {
        let l = cases.iter().find(|l| l.contains(case)).unwrap();
        assert!(l.contains("replies=1/1") && l.contains(status), "{l}");
    }
    // The VM is still alive and answering.
    g.wait_serial("kt: serving", Duration::from_secs(10));
    let mut c = g.connect(9);
    assert_eq!(c.request("PING"), "PONG");
    assert_eq!(c.ok("BLKWRITE 0 0 8 1"), "");
    assert_eq!(c.ok("BLKCHECK 0 0 8 1"), "");
}

#[test]
fn bench_mode_completes_without_errors() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (_p, blk) = disk(dir.path(), "bench.img", 16, FileEngine::Uring);
    let g = GuestVm::start(GuestOpts {
        cmdline: "kt.mode=bench kt.bench=rand kt.qd=32 kt.bs=4096 kt.n=3000",
        vsock: false,
        disks: vec![Box::new(blk)],
        ..Default::default()
    });
    let log = g.wait_serial("kt: bench done", Duration::from_secs(60));
    let line = log
        .lines()
        .find(|l| l.starts_with("kt: bench done"))
        .unwrap_or_else(|| panic!("{log}"));
    let json: serde_json::Value =
        serde_json::from_str(line.trim_start_matches("kt: bench done ")).unwrap();
    assert_eq!(json["requests"], 3000);
    assert_eq!(json["errors"], 0);
    assert_eq!(json["qd"], 32);
}
