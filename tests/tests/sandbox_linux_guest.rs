//! The microvm driver end to end with a real Linux guest: a sandbox created from an image (a
//! busybox root file system as the image's disk blob), commands run through the kiln agent
//! (PID 1, over vsock), pause/resume (checkpoint with stop, restore: the guest's processes and
//! files continue) and fork (two restores of one checkpoint diverge).
//!
//! Needs KVM with hardware virtualization (VT-x/AMD-V), a guest kernel
//! (`scripts/linux-guest/build-kernel` or KILN_GUEST_KERNEL), a static kiln-agent (KILN_AGENT)
//! and busybox-static. On PVM hosts (this project's CI machines) no stock Linux guest boots:
//! the test prints `SKIP: /dev/kvm is PVM; stock Linux guests cannot boot` and returns. The
//! same lifecycle runs here with kiln's test guest in `sandbox_microvm.rs`.

use kiln_agent::protocol::ExecRequest;
use kiln_blockstore::{PutOptions, Store};
use kiln_imagebuilder::image::{ImageConfig, ImageRecord};
use kiln_runtime::microvm::MicrovmDriver;
use kiln_runtime::{PendingNetwork, Runtime, SandboxDir, SandboxRecord};
use kiln_tests::kiln_bin;
use std::path::Path;
use std::process::Command;

/// Why stock Linux guests cannot run here, if they cannot.
fn linux_guest_unsupported() -> Option<String> {
    if let Some(why) = kiln_tests::kvm_unavailable() {
        return Some(why);
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists()
        || std::fs::read_to_string("/proc/modules")
            .map(|m| m.lines().any(|l| l.starts_with("kvm_pvm ")))
            .unwrap_or(false);
    pvm.then(|| "/dev/kvm is PVM; stock Linux guests cannot boot".into())
}

fn record(id: &str, image: &ImageRecord) -> SandboxRecord {
    serde_json::from_value(serde_json::json!({
        "schema": 1, "id": id, "name": null, "image": image.disk.to_hex(), "source": "test",
        "snapshot": null, "runtime": "microvm", "cpus": 1, "memory_mib": 256, "disk_mib": 0,
        "env": {}, "metadata": {}, "state": "starting", "created_ms": 0, "timeout_secs": null,
        "deadline_ms": null, "on_timeout": "kill", "agent": null, "generation": 0,
        "defaults": {"env": [], "cwd": null, "user": null, "cmd": []}, "driver": null
    }))
    .expect("a sandbox record")
}

fn sh(driver: &MicrovmDriver, d: &SandboxDir, r: &SandboxRecord, line: &str) -> String {
    let mut c = driver.connect(d, r).expect("connect to the agent");
    let req = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), line.into()],
        stdin: false,
        ..Default::default()
    };
    let out = kiln_agent::client::exec(&mut c, &req, b"", |_, _| {}).expect("exec");
    assert_eq!(
        out.status.code,
        Some(0),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A busybox root file system as an ext4 image.
fn busybox_disk(dir: &Path) -> Option<std::path::PathBuf> {
    let bb = Path::new("/bin/busybox");
    if !bb.exists() {
        return None;
    }
    let root = dir.join("root");
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", ".kiln"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(bb, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let img = dir.join("root.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("64M")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(img)
}

#[test]
fn linux_sandbox_exec_pause_resume_fork() {
    if let Some(why) = linux_guest_unsupported() {
        eprintln!("SKIP: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let driver = MicrovmDriver::new(store.clone(), kiln_bin(), None);
    if let Err(why) = driver.available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let Some(img) = busybox_disk(tmp.path()) else {
        eprintln!("SKIP: no /bin/busybox or mkfs.ext4 (apt install busybox-static e2fsprogs)");
        return;
    };
    let disk = store.put_file(&img, &PutOptions::default()).unwrap();
    let image = ImageRecord {
        schema: 1,
        disk,
        disk_size: std::fs::metadata(&img).unwrap().len(),
        layers: Vec::new(),
        config: ImageConfig::default(),
        parent: None,
        source: "busybox".into(),
        history: Vec::new(),
    };
    let mk = |id: &str| {
        let d = tmp.path().join("sandboxes").join(id);
        std::fs::create_dir_all(&d).unwrap();
        SandboxDir::new(d)
    };

    // Create and exec.
    let a = mk("a");
    let mut ra = record("a", &image);
    driver
        .start(&a, &mut ra, &image, &PendingNetwork::none())
        .expect("start");
    assert_eq!(sh(&driver, &a, &ra, "echo hello"), "hello");
    sh(&driver, &a, &ra, "echo one > /tmp/state");

    // Pause and resume: files (in memory: /tmp) continue.
    let p = driver.checkpoint(&a, &mut ra, true).expect("pause");
    assert!(driver.exited(&a, &ra).is_some());
    driver
        .restore(&a, &mut ra, &p, &image, &PendingNetwork::none())
        .expect("resume");
    assert_eq!(sh(&driver, &a, &ra, "cat /tmp/state"), "one");

    // Fork: two restores of one checkpoint diverge.
    let f = driver.checkpoint(&a, &mut ra, false).expect("checkpoint");
    let (b, c) = (mk("b"), mk("c"));
    let (mut rb, mut rc) = (record("b", &image), record("c", &image));
    driver
        .restore(&b, &mut rb, &f, &image, &PendingNetwork::none())
        .expect("fork b");
    driver
        .restore(&c, &mut rc, &f, &image, &PendingNetwork::none())
        .expect("fork c");
    sh(&driver, &b, &rb, "echo b > /tmp/state");
    sh(&driver, &c, &rc, "echo c > /tmp/state");
    assert_eq!(sh(&driver, &b, &rb, "cat /tmp/state"), "b");
    assert_eq!(sh(&driver, &c, &rc, "cat /tmp/state"), "c");
    assert_eq!(sh(&driver, &a, &ra, "cat /tmp/state"), "one");

    for (d, r) in [(&a, &ra), (&b, &rb), (&c, &rc)] {
        driver.kill(d, r).expect("kill");
        assert!(!d.sub("vm").exists());
    }
}
