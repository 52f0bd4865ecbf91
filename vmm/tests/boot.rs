//! Boots tiny hand-assembled guests on real KVM.

use kiln_vmm::{testutil, ExitReason, GuestMemorySource, RunState, Vm, VmConfig};
use std::time::Duration;

fn kvm_available() -> bool {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is not available");
        return false;
    }
    true
}

fn config(dir: &std::path::Path, elf: &[u8]) -> VmConfig {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf).unwrap();
    VmConfig {
        mem_bytes: 32 << 20,
        kernel: Some(kernel),
        serial_log: Some(dir.join("serial.log")),
        ..Default::default()
    }
}

#[test]
fn hello_guest_prints_and_resets() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &testutil::hello_elf(b"hello from kiln\n"));
    let vm = Vm::new(cfg, GuestMemorySource::Anonymous).unwrap();
    vm.boot().unwrap();
    vm.start().unwrap();
    let reason = vm
        .wait_timeout(Duration::from_secs(10))
        .expect("guest did not reset");
    assert_eq!(reason, ExitReason::Reset);
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    assert_eq!(log, "hello from kiln\n");
}

#[test]
fn pause_save_restore_continues_counting() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &testutil::spinner_elf(b"spinning\n"));
    let vm = Vm::new(cfg.clone(), GuestMemorySource::Anonymous).unwrap();
    vm.boot().unwrap();
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    assert_eq!(vm.state(), RunState::Paused);
    let s1 = vm.save_state().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let s2 = vm.save_state().unwrap();
    // Paused means paused: the counter does not move.
    assert_eq!(s1.vcpus[0].regs.rax, s2.vcpus[0].regs.rax);
    assert!(s1.vcpus[0].regs.rax > 0, "guest never ran");
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    vm.pause().unwrap();
    let s3 = vm.save_state().unwrap();
    assert!(
        s3.vcpus[0].regs.rax > s1.vcpus[0].regs.rax,
        "guest did not run after resume"
    );

    // The state is plain serde data.
    let json = serde_json::to_vec(&s3).unwrap();
    let state: kiln_vmm::VmState = serde_json::from_slice(&json).unwrap();

    // Restore into a fresh VM with a copy of the memory.
    let fresh = kiln_vmm::memory::GuestMemoryMmap::from_ranges(
        &kiln_vmm::memory::layout(cfg.mem_bytes).unwrap(),
    )
    .unwrap();
    copy_memory(vm.memory(), &fresh);
    vm.stop();
    vm.wait();
    let mut cfg2 = cfg.clone();
    cfg2.serial_log = Some(dir.path().join("serial2.log"));
    let vm2 = Vm::restore(cfg2, GuestMemorySource::Provided(fresh), &state).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    vm2.pause().unwrap();
    let s4 = vm2.save_state().unwrap();
    assert!(
        s4.vcpus[0].regs.rax > state.vcpus[0].regs.rax,
        "restored guest did not continue: {} <= {}",
        s4.vcpus[0].regs.rax,
        state.vcpus[0].regs.rax
    );
    assert_eq!(s4.vcpus[0].regs.rip >> 12, state.vcpus[0].regs.rip >> 12);
    vm2.stop();
    assert_eq!(vm2.wait(), ExitReason::Stopped);
}

fn copy_memory(from: &kiln_vmm::memory::GuestMemoryMmap, to: &kiln_vmm::memory::GuestMemoryMmap) {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    for r in from.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        from.read_slice(&mut buf, r.start_addr()).unwrap();
        to.write_slice(&buf, r.start_addr()).unwrap();
    }
}

#[test]
fn int3_is_a_vm_error_not_a_crash() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &testutil::int3_elf());
    let vm = Vm::new(cfg, GuestMemorySource::Anonymous).unwrap();
    vm.boot().unwrap();
    vm.start().unwrap();
    let reason = vm
        .wait_timeout(Duration::from_secs(10))
        .expect("VM hung on int3");
    // PVM: KVM_EXIT_INTERNAL_ERROR; hardware virtualization: a triple fault (no IDT) = reset.
    assert!(
        matches!(reason, ExitReason::Error(_) | ExitReason::Reset),
        "unexpected {reason:?}"
    );
}

#[test]
fn bad_kernels_are_clear_errors() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), b"this is not a kernel");
    let vm = Vm::new(cfg.clone(), GuestMemorySource::Anonymous).unwrap();
    let e = vm.boot().unwrap_err().to_string();
    assert!(e.contains("neither a 64-bit ELF"), "{e}");
    let mut missing = cfg.clone();
    missing.kernel = Some(dir.path().join("nope"));
    let vm = Vm::new(missing, GuestMemorySource::Anonymous).unwrap();
    let e = vm.boot().unwrap_err().to_string();
    assert!(e.contains("cannot open kernel"), "{e}");
    let mut huge = cfg;
    huge.mem_bytes = 1 << 50;
    let e = Vm::new(huge, GuestMemorySource::Anonymous)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("invalid"), "{e}");
}
