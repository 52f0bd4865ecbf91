//! The microvm driver through the `Runtime` trait, with kiln's freestanding test guest (no
//! Linux guest boots on this host's PVM; the test guest answers the agent's `Health` on port
//! 10000 and keeps its state in guest memory): start from an image whose disk is a store blob,
//! connect, pause (checkpoint + stop) and resume, fork (checkpoint without stop, two restores
//! diverge), kill leaves no process and no files. Also: CLI errors name their cause once.

use kiln_blockstore::{PutOptions, Store};
use kiln_imagebuilder::image::{ImageConfig, ImageRecord};
use kiln_runtime::microvm::{connect_port, MicrovmDriver};
use kiln_runtime::{PendingNetwork, Runtime, SandboxDir, SandboxRecord};
use kiln_tests::{kiln_bin, require_kvm, Kiln};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

fn record(id: &str, image: &ImageRecord) -> SandboxRecord {
    serde_json::from_value(serde_json::json!({
        "schema": 1, "id": id, "name": null, "image": image.disk.to_hex(), "source": "test",
        "snapshot": null, "runtime": "microvm", "cpus": 1, "memory_mib": 64, "disk_mib": 0,
        "env": {}, "metadata": {}, "state": "starting", "created_ms": 0, "timeout_secs": null,
        "deadline_ms": null, "on_timeout": "kill", "agent": null, "generation": 0,
        "defaults": {"env": [], "cwd": null, "user": null, "cmd": []}, "driver": null
    }))
    .expect("a sandbox record")
}

/// One request line to the test guest on a line-protocol port, through the sandbox's vsock.
fn ask(rec: &SandboxRecord, line: &str) -> String {
    let vsock = rec.agent.as_ref().expect("agent socket");
    let s = connect_port(vsock, 5000, Duration::from_secs(10)).expect("vsock connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    writeln!(w, "{line}").unwrap();
    let mut r = BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out).unwrap();
    out.trim().to_string()
}

fn pid_of(rec: &SandboxRecord) -> u32 {
    rec.driver["pid"].as_u64().expect("driver pid") as u32
}

fn alive(pid: u32) -> bool {
    kiln_runtime::microvm::vms::process_alive(pid)
}

/// A store in `home` with a 4 MiB disk image, and the microvm driver running the test guest.
fn test_guest_image(home: &Path) -> (Store, ImageRecord, MicrovmDriver) {
    let store = Store::open(&home.join("store")).unwrap();
    let disk = store
        .put_bytes(&vec![0x5au8; 4 << 20], &PutOptions::default())
        .unwrap();
    let image = ImageRecord {
        schema: 1,
        disk,
        disk_size: 4 << 20,
        layers: Vec::new(),
        config: ImageConfig::default(),
        parent: None,
        source: "test".into(),
        history: Vec::new(),
    };
    let driver = MicrovmDriver::with_test_guest(
        store.clone(),
        kiln_bin(),
        kiln_testguest::elf_path().to_path_buf(),
    );
    driver.available().expect("the test guest runs here");
    (store, image, driver)
}

fn sandbox(root: &Path, id: &str) -> SandboxDir {
    let d = root.join("sandboxes").join(id);
    std::fs::create_dir_all(&d).unwrap();
    SandboxDir::new(d)
}

#[test]
fn lifecycle_start_pause_resume_fork_kill_with_the_test_guest() {
    require_kvm!();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let (store, image, driver) = test_guest_image(home);
    // Linux guests are refused here with a reason (PVM, or no kernel).
    let linux = MicrovmDriver::new(store.clone(), kiln_bin(), None);
    if let Err(why) = linux.available() {
        eprintln!("linux guests: {why}");
    }

    // Start: the guest answers Health through connect() and line requests on other ports.
    let a = sandbox(home, "a");
    let mut ra = record("a", &image);
    driver
        .start(&a, &mut ra, &image, &PendingNetwork::none())
        .expect("start");
    assert!(ra.agent.as_ref().unwrap().starts_with(a.path()));
    let mut c = driver.connect(&a, &ra).expect("connect");
    let h = kiln_agent::client::health(&mut c).expect("health over the agent port");
    assert_eq!(h.protocol, 2);
    assert_eq!(driver.exited(&a, &ra), None);
    assert!(ask(&ra, "BLKINFO").starts_with("OK 1 "), "one disk");
    let filled = ask(&ra, "FILL 16 8 7");
    assert!(filled.starts_with("OK 0x"), "{filled}");
    let image_manifest = store.manifest(&image.disk).unwrap();

    // Pause: checkpoint with stop; the VMM ends. Resume: memory continues.
    let pa = driver
        .checkpoint(&a, &mut ra, true)
        .expect("checkpoint stop");
    assert!(!pa.blobs.is_empty());
    assert_eq!(pa.state["diff"], false, "the first checkpoint is full");
    let pid = pid_of(&ra);
    let t = std::time::Instant::now();
    while alive(pid) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(pid), "the VMM ended after checkpoint(stop)");
    assert!(driver.exited(&a, &ra).is_some());
    driver
        .restore(&a, &mut ra, &pa, &image, &PendingNetwork::none())
        .expect("restore");
    assert_ne!(pid_of(&ra), pid);
    assert_eq!(ask(&ra, "CHECK 16 8 7"), "OK", "memory continued");
    assert!(
        ask(&ra, "GEN").starts_with("OK gen=1 "),
        "generation bumped"
    );

    // Fork: checkpoint without stop (a diff, the VM restored with tracking), two restores.
    let fa = driver
        .checkpoint(&a, &mut ra, false)
        .expect("checkpoint run on");
    assert_eq!(
        fa.state["diff"], true,
        "after a restore the checkpoint is a diff"
    );
    assert_eq!(driver.exited(&a, &ra), None, "still running");
    assert_eq!(ask(&ra, "CHECK 16 8 7"), "OK");
    let b = sandbox(home, "b");
    let cdir = sandbox(home, "c");
    let mut rb = record("b", &image);
    let mut rc = record("c", &image);
    driver
        .restore(&b, &mut rb, &fa, &image, &PendingNetwork::none())
        .expect("fork b");
    driver
        .restore(&cdir, &mut rc, &fa, &image, &PendingNetwork::none())
        .expect("fork c");
    assert_eq!(ask(&rb, "CHECK 16 8 7"), "OK");
    assert_eq!(ask(&rc, "CHECK 16 8 7"), "OK");
    ask(&rb, "FILL 16 8 8");
    ask(&rc, "FILL 16 8 9");
    assert_eq!(ask(&rb, "CHECK 16 8 8"), "OK");
    assert_eq!(ask(&rc, "CHECK 16 8 9"), "OK");
    assert!(ask(&rb, "CHECK 16 8 9").starts_with("BAD"), "forks diverge");
    assert_eq!(ask(&ra, "CHECK 16 8 7"), "OK", "the original is untouched");
    assert_ne!(
        ask(&rb, "GEN"),
        ask(&rc, "GEN"),
        "each fork has its own identity"
    );

    // Kill: no process, no files; twice is fine.
    for (d, r) in [(&a, &ra), (&b, &rb), (&cdir, &rc)] {
        let pid = pid_of(r);
        driver.kill(d, r).expect("kill");
        assert!(!alive(pid), "VMM {pid} gone");
        assert!(!d.sub("vm").exists(), "VM files gone");
        driver.kill(d, r).expect("kill again");
        assert!(driver.exited(d, r).is_some());
    }
    // The image's disk blob was never modified.
    assert_eq!(
        store.manifest(&image.disk).unwrap().chunks,
        image_manifest.chunks
    );
}

/// The microvm driver on sandbox networks: the VMM opens the TAP the network layer made in the
/// sandbox's own router namespace, and the test guest (configured with the sandbox's guest
/// address) answers ping and UDP echo there; after a pause the restore, and each fork, gets a
/// fresh namespace and TAP and answers at the same address without noticing. Everything runs in
/// namespaces of the test's own.
#[test]
fn network_start_resume_and_forks_each_answer_on_their_own_tap() {
    require_kvm!();
    if let Some(why) = kiln_tests::net::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let net = kiln_tests::net::TestNet::new();
    net.enter();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let (_store, image, driver) = test_guest_image(home);
    let proxy = kiln_runtime::helpers::dns_proxy_command(&kiln_bin());
    let policy = kiln_network::NetworkPolicy::default();
    let attach = |d: &SandboxDir, r: &mut SandboxRecord| {
        kiln_runtime::helpers::dns_proxy_spec(&d.net()).unwrap();
        let a = kiln_network::attach(
            &r.id,
            kiln_network::GuestKind::Tap,
            &policy,
            &d.net(),
            &proxy,
        )
        .expect("attach");
        r.net = Some(a);
    };
    // Ping and UDP echo from inside the sandbox's router namespace.
    let answers = |r: &SandboxRecord| {
        let a = r.net.clone().unwrap();
        std::thread::spawn(move || {
            kiln_tests::net::enter(&a.router_ns);
            let pings = kiln_tests::tapns::ping(a.guest_ip, 3, Duration::from_secs(2)).unwrap();
            let echo =
                kiln_tests::tapns::udp_echo(std::net::SocketAddrV4::new(a.guest_ip, 7), b"kiln", 5);
            (pings, echo.is_ok())
        })
        .join()
        .unwrap()
    };
    // Namespace names are host-wide: ids unique to this run.
    let ids: Vec<String> = (0..3)
        .map(|i| format!("n{}x{i}", std::process::id()))
        .collect();
    let dirs: Vec<SandboxDir> = ids.iter().map(|i| sandbox(home, i)).collect();
    let mut recs: Vec<SandboxRecord> = ids.iter().map(|i| record(i, &image)).collect();
    /// Ends every VMM and DNS proxy under the home and removes the networks, also on failure.
    struct Cleanup<'a>(&'a Path, Vec<(String, std::path::PathBuf)>);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for pid in kiln_tests::sandbox::processes_mentioning(&self.0.display().to_string()) {
                // SAFETY: kill(2) of a process this test started (its command line names our
                // temporary home).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            for (id, state) in &self.1 {
                kiln_network::detach(id, state);
            }
        }
    }
    let _cleanup = Cleanup(
        home,
        ids.iter()
            .zip(&dirs)
            .map(|(i, d)| (i.clone(), d.net()))
            .collect(),
    );

    attach(&dirs[0], &mut recs[0]);
    driver
        .start(&dirs[0], &mut recs[0], &image, &PendingNetwork::none())
        .expect("start");
    assert_eq!(
        answers(&recs[0]),
        (3, true),
        "the started VM answers on its TAP"
    );

    // Pause: the VMM ends and the namespace goes; resume on a fresh one.
    let pause = driver
        .checkpoint(&dirs[0], &mut recs[0], true)
        .expect("pause");
    let old_ns = recs[0].net.as_ref().unwrap().router_ns.clone();
    kiln_network::detach(&recs[0].id, &dirs[0].net());
    assert!(!Path::new("/run/netns").join(&old_ns).exists());
    attach(&dirs[0], &mut recs[0]);
    driver
        .restore(
            &dirs[0],
            &mut recs[0],
            &pause,
            &image,
            &PendingNetwork::none(),
        )
        .expect("resume");
    assert_eq!(answers(&recs[0]), (3, true), "the resumed VM answers");

    // Two forks, each on its own namespace and TAP, all three at once.
    let fork = driver
        .checkpoint(&dirs[0], &mut recs[0], false)
        .expect("fork");
    for i in 1..3 {
        let (d, r) = (&dirs[i], &mut recs[i]);
        attach(d, r);
        driver
            .restore(d, r, &fork, &image, &PendingNetwork::none())
            .expect("fork restore");
    }
    let mut namespaces: Vec<String> = recs
        .iter()
        .map(|r| r.net.as_ref().unwrap().router_ns.clone())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    assert_eq!(namespaces.len(), 3, "{namespaces:?}");
    let got: Vec<(u16, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = recs.iter().map(|r| s.spawn(|| answers(r))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (d, r) in dirs.iter().zip(&recs) {
        driver.kill(d, r).expect("kill");
        kiln_network::detach(&r.id, &d.net());
    }
    assert_eq!(got, vec![(3, true); 3], "each VM answers on its own TAP");
    for r in &recs {
        let ns = &r.net.as_ref().unwrap().router_ns;
        assert!(!Path::new("/run/netns").join(ns).exists(), "{ns} removed");
    }
}

/// Errors name each cause once (snapshotter's store errors used to print theirs twice).
#[test]
fn cli_errors_name_their_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path());
    let elf = kiln_testguest::elf_path().display().to_string();
    let cause = "no blob or name matches \"nope\"";
    for args in [
        vec![
            "vm", "run", "--kernel", &elf, "--entry", "user", "--disk", "nope",
        ],
        vec!["snapshot", "restore", "nope"],
        vec!["vm", "restore", "nope", "-d"],
    ] {
        let err = k.fails(&args);
        assert_eq!(err.matches(cause).count(), 1, "kiln {args:?}: {err}");
    }
}

/// `kiln snapshot restore` in the foreground echoes the guest's serial output to stdout, as
/// `kiln vm run` does (it used to write it only to the VM's serial.log).
#[test]
fn foreground_restore_echoes_serial_like_vm_run() {
    require_kvm!();
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path().join("home"));
    let _vms = k.stop_vms_on_drop();
    let uds = tmp.path().join("a.vsock");
    let id = k.ok_str(kiln_tests::test_guest_vm_run(&[
        "-d",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]));
    k.ok(["snapshot", "create", &id, "--name", "echo", "--stop"]);
    let ruds = tmp.path().join("r.vsock");
    let child = k
        .cmd([
            "snapshot",
            "restore",
            "echo",
            "--id",
            "fg",
            "--vsock-uds",
            ruds.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The restored guest prints its vsock transport reset on serial; then end it.
    let t = std::time::Instant::now();
    let log = tmp.path().join("home/vms/fg/serial.log");
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("transport reset")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "no serial output");
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = connect_port(&ruds, 5000, Duration::from_secs(10)).unwrap();
    writeln!(&s, "RESET").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("kt: vsock transport reset"),
        "stdout: {stdout}"
    );
}
