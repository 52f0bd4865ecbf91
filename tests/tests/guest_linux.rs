//! Linux guests: a kernel built by scripts/linux-guest/build-kernel, the kiln agent as PID 1,
//! exec over vsock. Needs a host whose KVM can run stock guests (VT-x/AMD-V); on PVM hosts it
//! is skipped with the reason.

use std::path::PathBuf;

/// Why stock Linux guests cannot run here, if they cannot.
fn linux_guest_unsupported() -> Option<String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm is not usable".into());
    }
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists()
        || std::fs::read_to_string("/proc/modules")
            .map(|m| m.lines().any(|l| l.starts_with("kvm_pvm ")))
            .unwrap_or(false);
    if pvm {
        return Some("/dev/kvm is PVM; stock Linux guests cannot boot".into());
    }
    None
}

/// The cached kernel, if `scripts/linux-guest/build-kernel` was run (KILN_GUEST_KERNEL overrides).
fn guest_kernel() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KILN_GUEST_KERNEL") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var("KILN_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kiln/kernels")
        });
    std::fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("vmlinux"))
        .find(|p| p.exists())
}

#[test]
fn linux_guest_boots_and_agent_runs_commands() {
    if let Some(why) = linux_guest_unsupported() {
        eprintln!("SKIP: {why}");
        return;
    }
    let Some(kernel) = guest_kernel() else {
        eprintln!("SKIP: no guest kernel; run scripts/linux-guest/build-kernel (about 12 minutes)");
        return;
    };
    // A real run needs a root filesystem with the agent as init (see the image builder); boot
    // the kernel far enough to prove the config: it must reach the virtio-mmio probe and mount
    // attempt, and panic cleanly (panic=-1 reboots through the i8042) without a root disk.
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let config = kiln_vmm::VmConfig {
        mem_bytes: 256 << 20,
        kernel: Some(kernel),
        cmdline: "console=ttyS0 reboot=k panic=-1 root=/dev/vda".into(),
        serial_log: Some(serial.clone()),
        ..kiln_vmm::VmConfig::default()
    };
    let vm = kiln_vmm::Vm::new(config, kiln_vmm::GuestMemorySource::Anonymous).unwrap();
    vm.boot().unwrap();
    vm.start().unwrap();
    let exit = vm.wait_timeout(std::time::Duration::from_secs(60));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(exit.is_some(), "kernel did not end within 60 s:\n{log}");
    assert!(log.contains("Linux version"), "{log}");
    assert!(
        log.contains("VFS: Unable to mount root fs") || log.contains("Kernel panic"),
        "{log}"
    );
}
