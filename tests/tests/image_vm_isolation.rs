//! `kiln build --isolation=vm`: RUN steps in a Linux microVM through the guest agent.
//!
//! The whole path needs a host whose KVM boots stock Linux guests; on PVM hosts that test is
//! skipped with the reason and the CLI must refuse clearly. The pieces are tested here without
//! a VM: the step disk (the root plus the agent), the read-back of a disk changed through the
//! kernel's ext4 (a loop mount stands in for the guest) applied to an overlayfs stage root
//! (changes in the upper dir, deletions as whiteouts, the same layer tar the namespace sandbox
//! yields), and the exec request run by the agent's own server code.

use kiln_imagebuilder::step_jail::RunSpec;
use kiln_imagebuilder::vm_isolation as vmi;
use kiln_tests::registry::{busybox_build_home, have};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have_e2fsprogs() -> bool {
    if have("mkfs.ext4") && have("debugfs") && have("e2fsck") {
        return true;
    }
    eprintln!("SKIP: e2fsprogs (mkfs.ext4, debugfs, e2fsck) not installed");
    false
}

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn write(p: &Path, data: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// A stand-in agent binary (its bytes must arrive intact; it never runs here).
fn fake_agent(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("agent-bin");
    std::fs::write(&p, kiln_tests::pseudo_random(300_000, 7)).unwrap();
    p
}

#[test]
fn step_disk_holds_the_root_and_the_agent_and_reads_back_unchanged() {
    if !have_e2fsprogs() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    write(&root.join("etc/hostname"), "kiln\n");
    write(&root.join("usr/bin/tool"), "#!/bin/sh\necho tool\n");
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let agent = fake_agent(tmp.path());
    let disk = tmp.path().join("d.ext4");
    vmi::make_disk(&root, &agent, &disk).unwrap();

    let back = tmp.path().join("back");
    vmi::read_back(&disk, &back).unwrap();
    let got = back.join(".kiln/agent");
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&agent).unwrap());
    assert_eq!(
        std::fs::metadata(&got).unwrap().mode() & 0o7777,
        0o755,
        "the agent must be executable"
    );
    // Nothing changed: the diff finds nothing (mtimes survive mkfs -d and rdump; the agent's
    // directory and mkfs's lost+found are not part of the result).
    let ch = vmi::apply_changes(&back, &root).unwrap();
    assert_eq!(ch, vmi::Changes::default());
    assert!(!root.join(".kiln").exists() && !root.join("lost+found").exists());

    // The agent's directory is reserved.
    std::fs::create_dir(root.join(".kiln")).unwrap();
    let err = vmi::make_disk(&root, &agent, &disk)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/.kiln"), "{err}");
}

/// Layer tar entry names and their types.
fn tar_entries(path: &Path) -> Vec<(String, tar::EntryType)> {
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut v: Vec<_> = a
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_string(),
                e.header().entry_type(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn guest_changes_land_in_the_overlay_upper_dir_as_a_layer() {
    if !is_root() {
        eprintln!("SKIP: needs root (overlayfs and loop mounts)");
        return;
    }
    if !have_e2fsprogs() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let lower = t.join("lower");
    write(&lower.join("etc/keep"), "keep\n");
    write(&lower.join("etc/gone"), "gone\n");
    write(&lower.join("etc/same-size"), "aaaa\n");
    write(&lower.join("dir/old/inner"), "inner\n");
    write(&lower.join("bin/tool"), "tool\n");
    std::fs::set_permissions(
        lower.join("bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("etc/keep", lower.join("link")).unwrap();
    let (upper, work, merged, mnt) = (
        t.join("upper"),
        t.join("work"),
        t.join("merged"),
        t.join("mnt"),
    );
    for d in [&upper, &work, &merged, &mnt] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    if !sh(&format!(
        "mount -t overlay overlay -o {opts} {}",
        merged.display()
    )) {
        eprintln!("SKIP: cannot mount overlayfs here");
        return;
    }
    struct Unmount(Vec<std::path::PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for p in self.0.iter().rev() {
                let _ = Command::new("umount").arg(p).status();
            }
        }
    }
    let mut guard = Unmount(vec![merged.clone()]);

    let agent = fake_agent(t);
    let disk = t.join("step.ext4");
    vmi::make_disk(&merged, &agent, &disk).unwrap();
    // What a RUN in the guest does, through the kernel's ext4 on the same disk.
    if !sh(&format!(
        "mount -o loop {} {}",
        disk.display(),
        mnt.display()
    )) {
        eprintln!("SKIP: cannot loop-mount an ext4 image here");
        return;
    }
    guard.0.push(mnt.clone());
    let m = |p: &str| mnt.join(p);
    assert_eq!(
        std::fs::read(m(".kiln/agent")).unwrap(),
        std::fs::read(&agent).unwrap()
    );
    write(&m("etc/new"), "new\n");
    std::fs::remove_file(m("etc/gone")).unwrap();
    std::fs::remove_dir_all(m("dir/old")).unwrap();
    std::fs::set_permissions(m("bin/tool"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::remove_file(m("link")).unwrap();
    std::os::unix::fs::symlink("etc/new", m("link")).unwrap();
    write(&m("made/sub/file"), "deep\n");
    // Same size, same mtime second, other bytes: only the content comparison can see it.
    let mtime = std::fs::metadata(m("etc/same-size"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::write(m("etc/same-size"), "bbbb\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(m("etc/same-size"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(sh(&format!("umount {}", mnt.display())));
    guard.0.pop();
    // The kernel detaches (and flushes) an autoclear loop device after umount has returned:
    // read the image only once no loop device holds it.
    let t0 = std::time::Instant::now();
    while Command::new("losetup")
        .args(["-j", disk.to_str().unwrap()])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty())
    {
        assert!(t0.elapsed().as_secs() < 10, "loop device still attached");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    let back = t.join("back");
    vmi::read_back(&disk, &back).unwrap();
    let ch = vmi::apply_changes(&back, &merged).unwrap();
    let mut removed = ch.removed.clone();
    removed.sort();
    assert_eq!(removed, ["dir/old", "etc/gone"]);
    for w in [
        "etc/new",
        "bin/tool",
        "link",
        "made",
        "made/sub/file",
        "etc/same-size",
    ] {
        assert!(ch.written.iter().any(|x| x == w), "{w} not written: {ch:?}");
    }
    assert!(!ch.written.iter().any(|x| x == "etc/keep"), "{ch:?}");
    assert_eq!(
        std::fs::read_to_string(merged.join("etc/same-size")).unwrap(),
        "bbbb\n"
    );
    assert_eq!(
        std::fs::read_link(merged.join("link")).unwrap(),
        Path::new("etc/new")
    );

    // The upper dir is what the namespace sandbox would leave: changes and whiteouts only.
    assert!(sh(&format!("umount {}", merged.display())));
    guard.0.clear();
    let wh = std::fs::symlink_metadata(upper.join("etc/gone")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout"
    );
    assert!(
        !upper.join("etc/keep").exists(),
        "unchanged files are not copied up"
    );
    assert!(!upper.join(".kiln").exists() && !upper.join("lost+found").exists());
    assert_eq!(
        std::fs::metadata(upper.join("bin/tool")).unwrap().mode() & 0o7777,
        0o700
    );
    let tar_path = t.join("layer.tar");
    let n =
        kiln_imagebuilder::layer::write_upper(&upper, std::fs::File::create(&tar_path).unwrap())
            .unwrap();
    assert!(n > 0);
    let names: Vec<String> = tar_entries(&tar_path).into_iter().map(|e| e.0).collect();
    for want in [
        "etc/.wh.gone",
        "dir/.wh.old",
        "etc/new",
        "made/sub/file",
        "bin/tool",
        "link",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not in layer {names:?}"
        );
    }
    assert!(
        !names
            .iter()
            .any(|n| n.contains("keep") || n.contains(".kiln")),
        "{names:?}"
    );
}

#[test]
fn run_spec_executes_through_the_agent_protocol() {
    // The agent binary as a host process on a Unix socket (the same code serves vsock in a
    // guest); the VM step's client talks to it. Not in-process: the agent reaps every child.
    let bin = kiln_tests::kiln_bin().with_file_name("kiln-agent");
    if !bin.exists() {
        eprintln!(
            "SKIP: {} not built (cargo build -p kiln-agent)",
            bin.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let child = Command::new(&bin).arg("--unix").arg(&sock).spawn().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let t0 = std::time::Instant::now();
    let client = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 10, "agent did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let tmp = tempfile::tempdir().unwrap();
    let spec = RunSpec {
        rootfs: "/".into(),
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            // `partial` waits in stdout's line buffer while stderr's line arrives: the two
            // must not merge into one line.
            "echo \"greet=$GREETING\"; pwd; echo to-stderr >&2; cat; printf partial; sleep 0.2; \
             echo err-line >&2; echo -end; printf no-newline; exit 7"
                .into(),
        ],
        env: vec![
            "GREETING=hi there".into(),
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ],
        workdir: tmp.path().to_str().unwrap().into(),
        user: None,
        network: false,
        stdin: Some(b"from-stdin\n".to_vec()),
        memory_max: None,
        mounts: vec![],
    };
    let req = vmi::exec_request(&spec);
    let mut lines = Vec::new();
    let mut c = client;
    let (status, tail) = vmi::exec_streaming(&mut c, &req, spec.stdin.as_deref(), &mut |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert_eq!(status.code, Some(7));
    for want in [
        "greet=hi there",
        tmp.path().to_str().unwrap(),
        "to-stderr",
        "from-stdin",
        "err-line",
        "partial-end",
        "no-newline",
    ] {
        assert!(lines.iter().any(|l| l == want), "{want:?} not in {lines:?}");
        assert!(tail.contains(want), "{tail}");
    }
}

#[test]
fn vm_isolated_build_runs_in_a_linux_guest() {
    let Some((tmp, k)) = busybox_build_home() else {
        return;
    };
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let c = ctx.to_str().unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM bb\nWORKDIR /work\nRUN echo in-guest > made && rm /bin/true && uname -r\n",
    )
    .unwrap();
    if let Some(why) = vmi::linux_guest_unsupported() {
        // The CLI refuses clearly, before doing any work, and tags nothing.
        let err = k.fails(["build", "-t", "vmimg", "--isolation", "vm", c]);
        assert!(
            err.contains(&why) && err.contains("--isolation=namespace"),
            "{err}"
        );
        let ls = k.json(["image", "ls", "--json"]);
        assert_eq!(ls.as_array().unwrap().len(), 1, "only the base image: {ls}");
        eprintln!("SKIP: {why}");
        return;
    }
    if let Err(e) = vmi::guest_kernel(None) {
        eprintln!(
            "SKIP: no guest kernel; run scripts/linux-guest/build-kernel (about 12 minutes): {e}"
        );
        return;
    }
    let Ok(agent) = std::env::var("KILN_AGENT") else {
        eprintln!("SKIP: set KILN_AGENT to a static kiln-agent (scripts/linux-guest/README.md)");
        return;
    };
    let k = k.with_env([("KILN_AGENT".to_string(), agent)]);
    k.ok(["build", "-t", "vmimg", "--isolation", "vm", c]);
    // A namespace build on top sees the VM step's result.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM vmimg\nRUN cat /work/made && test ! -e /bin/true && test ! -e /.kiln\n",
    )
    .unwrap();
    let out = k.run(["build", "-t", "check", c]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("in-guest"), "{text}");
}

#[test]
fn step_vm_boots_with_the_disk_and_a_dead_guest_ends_the_step_with_its_console() {
    // The real VM assembly (step disk as virtio-blk, vsock, boot) with the freestanding test
    // guest instead of Linux: it overwrites the start of disk 0 with its pattern, verifies it
    // and resets without ever running an agent. The step must end (not hang) with an error
    // that names the cause and shows the guest's console.
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIP: /dev/kvm is not usable");
        return;
    }
    if !have_e2fsprogs() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    write(&root.join("etc/hostname"), "kiln\n");
    let env = vmi::VmEnv {
        kernel: kiln_testguest::elf_path().to_path_buf(),
        agent: fake_agent(tmp.path()),
        cmdline: "console=ttyS0 kt.mode=blktest kt.disk=0 kt.exit=1".into(),
        entry: kiln_vmm::EntryMode::User,
    };
    let spec = RunSpec {
        rootfs: root.clone(),
        argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
        env: vec![],
        workdir: "/".into(),
        user: None,
        network: false,
        stdin: None,
        memory_max: Some(64 << 20),
        mounts: vec![],
    };
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let t0 = std::time::Instant::now();
    let err = vmi::run(&spec, &env, &work, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("the guest ended"), "{err}");
    assert!(
        err.contains("kt: blktest ok"),
        "console tail missing: {err}"
    );
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
    eprintln!("{err}");
    // The step's scratch space is gone and the root untouched.
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
}
