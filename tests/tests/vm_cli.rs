//! `kiln vm ...` end to end on real KVM with the kiln test guest: boot to the first serial line,
//! block I/O through a store overlay verified on the host after commit, pause/resume, two VMs at
//! once, a misbehaving guest, bad input.

mod guest_support;

use kiln_tests::Kiln;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_tests::{kvm_unavailable, require_kvm};

fn setup() -> (tempfile::TempDir, Kiln) {
    let dir = tempfile::tempdir().unwrap();
    let kiln = Kiln::new(dir.path().join("home"));
    (dir, kiln)
}

/// `kiln vm run` in the foreground with the test guest at user entry (fast on PVM hosts).
fn run_args(extra: &[&str]) -> Vec<String> {
    kiln_tests::test_guest_vm_run(extra)
}

fn vm_dir(k: &Kiln, id: &str) -> PathBuf {
    k.home.join("vms").join(id)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ls(k: &Kiln) -> serde_json::Value {
    k.json(["vm", "ls", "--json"])
}

fn state_of(k: &Kiln, id: &str) -> String {
    ls(k)
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .map(|e| e["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn boots_to_first_serial_line_and_exits_cleanly() {
    require_kvm!();
    let (_d, k) = setup();
    let out =
        String::from_utf8(k.ok(run_args(&["--id", "boot1", "--cmdline", "kt.exit=1"]))).unwrap();
    assert!(
        out.starts_with(kiln_testguest::BANNER),
        "first serial line is not the banner: {out:?}"
    );
    let log = std::fs::read_to_string(vm_dir(&k, "boot1").join("serial.log")).unwrap();
    assert_eq!(log, out, "serial log and stdout differ");
    assert!(log.contains("kt: exit"));
    assert!(
        state_of(&k, "boot1").contains("exited (reset)"),
        "{}",
        ls(&k)
    );
    assert_eq!(
        String::from_utf8(k.ok(["vm", "logs", "boot1"])).unwrap(),
        log
    );
}

#[test]
fn block_io_through_a_store_overlay_round_trips_after_commit() {
    require_kvm!();
    let (d, k) = setup();
    // A 16 MiB base disk with a recognisable tail the guest does not touch.
    let base = kiln_tests::pseudo_random(16 << 20, 7);
    let img = d.path().join("base.img");
    std::fs::write(&img, &base).unwrap();
    let base_id = k.ok_str(["store", "put", img.to_str().unwrap(), "--name", "base"]);
    let base_id = base_id.trim().to_string();
    let out = k.ok_str(run_args(&[
        "--id",
        "blk1",
        "--disk",
        "base",
        "--commit",
        "--cmdline",
        "kt.mode=blktest kt.exit=1",
    ]));
    assert!(
        out.contains("kt: blktest ok"),
        "guest self test failed:\n{out}"
    );
    let exit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_dir(&k, "blk1").join("exit.json")).unwrap())
            .unwrap();
    let new_id = exit["committed"][0]
        .as_str()
        .expect("disk committed")
        .to_string();
    assert_ne!(new_id, base_id);
    // The base blob is unchanged; the new blob has the guest's pattern then the base's tail.
    let got = d.path().join("out.img");
    k.ok(["store", "get", &new_id, "-o", got.to_str().unwrap()]);
    let got = std::fs::read(&got).unwrap();
    assert_eq!(got.len(), base.len());
    let mut want = vec![0u8; 8 << 20];
    kiln_testguest::fill_pattern(42, 0, &mut want);
    assert!(
        got[..8 << 20] == want[..],
        "guest writes are not in the committed blob"
    );
    assert!(got[8 << 20..] == base[8 << 20..], "untouched part changed");
    let orig = d.path().join("orig.img");
    k.ok(["store", "get", &base_id, "-o", orig.to_str().unwrap()]);
    assert!(std::fs::read(&orig).unwrap() == base, "base blob changed");
}

#[test]
fn raw_file_disk_io_uring_and_sync() {
    require_kvm!();
    let (d, k) = setup();
    for engine in ["uring", "sync"] {
        let img = d.path().join(format!("{engine}.img"));
        std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
        let out = k.ok_str(run_args(&[
            "--disk",
            img.to_str().unwrap(),
            "--disk-engine",
            engine,
            "--cmdline",
            "kt.mode=blktest kt.exit=1",
        ]));
        assert!(out.contains("kt: blktest ok"), "{engine}: {out}");
        let mut want = vec![0u8; 8 << 20];
        kiln_testguest::fill_pattern(42, 0, &mut want);
        assert!(
            std::fs::read(&img).unwrap() == want,
            "{engine}: file content"
        );
    }
}

/// Stops detached VMs even when an assertion fails, so no VMM outlives the test.
struct StopOnDrop<'a>(&'a Kiln, &'static [&'static str]);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for id in self.1 {
            let _ = self.0.run(["vm", "stop", id]);
        }
    }
}

fn save_state(k: &Kiln, id: &str, path: &Path) -> serde_json::Value {
    k.ok(["vm", "save-state", id, path.to_str().unwrap()]);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn detached_pause_resume_stop_and_two_vms_at_once() {
    require_kvm!();
    let (d, k) = setup();
    let uds = d.path().join("vma.sock");
    let _guard = StopOnDrop(&k, &["vma", "vmb"]);
    let a = k.ok_str(run_args(&[
        "-d",
        "--id",
        "vma",
        "--cmdline",
        "kt.mode=serve",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]));
    let b = k.ok_str(run_args(&[
        "-d",
        "--id",
        "vmb",
        "--cmdline",
        "kt.mode=serve",
    ]));
    assert_eq!(a.trim(), "vma");
    assert_eq!(b.trim(), "vmb");
    for id in ["vma", "vmb"] {
        wait_for("guest to serve", Duration::from_secs(20), || {
            std::fs::read_to_string(vm_dir(&k, id).join("serial.log"))
                .map(|s| s.contains("kt: serving"))
                .unwrap_or(false)
        });
        assert_eq!(state_of(&k, id), "running");
    }
    let mut conn = guest_support::connect_uds(&uds, 1000);
    let counter = |c: &mut guest_support::Conn| c.ok("COUNTER").parse::<u64>().unwrap();
    let c1 = counter(&mut conn);
    // Saving state needs a paused VM.
    let err = k.fails([
        "vm",
        "save-state",
        "vma",
        d.path().join("x.json").to_str().unwrap(),
    ]);
    assert!(err.contains("paused"), "{err}");
    k.ok(["vm", "pause", "vma"]);
    assert_eq!(state_of(&k, "vma"), "paused");
    assert_eq!(state_of(&k, "vmb"), "running");
    let s1 = save_state(&k, "vma", &d.path().join("s1.json"));
    std::thread::sleep(Duration::from_millis(50));
    let s2 = save_state(&k, "vma", &d.path().join("s2.json"));
    assert_eq!(
        s1["vcpus"][0]["regs"], s2["vcpus"][0]["regs"],
        "a paused guest moved"
    );
    assert_eq!(s1["vcpus"].as_array().unwrap().len(), 1);
    // A paused guest does not answer; after resume it does, and its counter moved on.
    writeln_req(&mut conn, "COUNTER");
    std::thread::sleep(Duration::from_millis(200));
    k.ok(["vm", "resume", "vma"]);
    assert_eq!(state_of(&k, "vma"), "running");
    let reply = conn.read_line();
    let c2: u64 = reply.strip_prefix("OK ").unwrap().parse().unwrap();
    assert!(c2 > c1, "counter did not advance: {c1} -> {c2}");
    std::thread::sleep(Duration::from_millis(50));
    assert!(counter(&mut conn) > c2, "guest does not run after resume");
    drop(conn);
    for id in ["vma", "vmb"] {
        k.ok(["vm", "stop", id]);
        assert!(state_of(&k, id).contains("exited (stopped)"), "{}", ls(&k));
    }
    let err = k.fails(["vm", "pause", "vma"]);
    assert!(err.contains("not running"), "{err}");
}

fn writeln_req(c: &mut guest_support::Conn, line: &str) {
    use std::io::Write;
    writeln!(c.writer, "{line}").unwrap();
}

#[test]
fn misbehaving_guest_gets_errors_and_vmm_survives() {
    require_kvm!();
    let (d, k) = setup();
    let img = d.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let out = k.ok_str(run_args(&[
        "--disk",
        img.to_str().unwrap(),
        "--cmdline",
        "kt.mode=misbehave kt.exit=1",
    ]));
    assert!(out.contains("kt: misbehave done"), "{out}");
    assert!(out.contains("failed=0"), "{out}");
    assert!(out.contains("kt: exit"), "{out}");
}

#[test]
fn guest_cpu_errors_are_vm_errors() {
    require_kvm!();
    let (d, k) = setup();
    let elf = d.path().join("int3.elf");
    std::fs::write(&elf, kiln_vmm::testutil::int3_elf()).unwrap();
    let out = k.run([
        "vm",
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--id",
        "bad",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    // PVM: KVM_EXIT_INTERNAL_ERROR (a failed VM); hardware virtualization: a triple fault
    // (no IDT), i.e. a reset. Either way the VMM itself exits normally, never by a signal.
    assert!(out.status.code().is_some(), "VMM crashed: {:?}", out.status);
    if !out.status.success() {
        assert!(err.contains("VM bad failed"), "{err}");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let (d, k) = setup();
    let e = k.fails(["vm", "run", "--kernel", "/nonexistent/vmlinux"]);
    assert!(e.contains("does not exist"), "{e}");
    let junk = d.path().join("junk");
    std::fs::write(&junk, b"not a kernel at all").unwrap();
    if kvm_unavailable().is_none() {
        let e = k.fails(["vm", "run", "--kernel", junk.to_str().unwrap()]);
        assert!(e.contains("neither a 64-bit ELF"), "{e}");
        let e = k.fails(run_args(&["--disk", "no-such-blob-or-file"]));
        assert!(e.contains("neither a file nor a blob"), "{e}");
        let small = d.path().join("small.img");
        std::fs::write(&small, [0u8; 100]).unwrap();
        let e = k.fails(run_args(&["--disk", small.to_str().unwrap()]));
        assert!(e.contains("multiple of 512"), "{e}");
    }
    let e = k.fails([
        "vm",
        "run",
        "--kernel",
        junk.to_str().unwrap(),
        "--mem",
        "100000000",
    ]);
    assert!(e.contains("out of range"), "{e}");
    let e = k.fails(["vm", "pause", "nope"]);
    assert!(e.contains("no VM"), "{e}");
    let e = k.fails(["vm", "pause", "../etc"]);
    assert!(e.contains("invalid VM id"), "{e}");
}

#[test]
fn a_detached_vm_whose_home_is_deleted_stops_itself() {
    require_kvm!();
    let (_d, k) = setup();
    let _guard = StopOnDrop(&k, &["orphan"]);
    k.ok(run_args(&[
        "-d",
        "--id",
        "orphan",
        "--cmdline",
        "kt.mode=serve",
    ]));
    let pid = ls(&k)[0]["pid"].as_u64().expect("pid of a running VM") as i32;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = || unsafe { libc::kill(pid, 0) } == 0;
    assert!(alive());
    std::fs::remove_dir_all(&k.home).unwrap();
    wait_for("the orphaned VMM to exit", Duration::from_secs(10), || {
        !alive() || is_zombie(pid)
    });
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}
