//! The generation-id page and the idle port with a tiny hand-assembled CPL 3 guest (no test
//! guest, no devices): it loops reading the generation into r8 and the id's low half into r9,
//! counting in rcx, and idles on port 0x500 every iteration.

use kiln_vmm::devices::genid::{GENID_BASE, REG_GENERATION, REG_ID};
use kiln_vmm::{testutil, EntryMode, GuestMemorySource, Vm, VmConfig, VmState};
use std::time::{Duration, Instant};

fn kvm_available() -> bool {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm is not available");
        return false;
    }
    true
}

/// Where the loop's `out` instruction is.
const OUT_OFFSET: u64 = 35;

fn genid_idle_loop() -> Vec<u8> {
    let mut c = Vec::new();
    let movabs_rax = |c: &mut Vec<u8>, addr: u64| {
        c.extend_from_slice(&[0x48, 0xa1]); // mov rax, [moffs64]
        c.extend_from_slice(&addr.to_le_bytes());
    };
    movabs_rax(&mut c, GENID_BASE + REG_GENERATION);
    c.extend_from_slice(&[0x49, 0x89, 0xc0]); // mov r8, rax
    movabs_rax(&mut c, GENID_BASE + REG_ID);
    c.extend_from_slice(&[0x49, 0x89, 0xc1]); // mov r9, rax
    c.extend_from_slice(&[0x48, 0xff, 0xc1]); // inc rcx
    c.extend_from_slice(&[0x31, 0xc0]); // xor eax, eax (sleep: the VMM's default)
    c.extend_from_slice(&[0x66, 0xba, 0x00, 0x05]); // mov dx, 0x500
    assert_eq!(c.len() as u64, OUT_OFFSET);
    c.push(0xef); // out dx, eax
    let back = -(c.len() as i64 + 2);
    c.extend_from_slice(&[0xeb, back as i8 as u8]); // jmp to the start
    testutil::elf_with_code(&c)
}

fn start(dir: &std::path::Path, name: &str, restore: Option<(&Vm, &VmState)>) -> Vm {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, genid_idle_loop()).unwrap();
    let config = VmConfig {
        mem_bytes: 32 << 20,
        kernel: Some(kernel),
        serial_log: Some(dir.join(format!("{name}.serial"))),
        ..Default::default()
    };
    match restore {
        None => {
            let vm = Vm::new(config, GuestMemorySource::Anonymous).unwrap();
            vm.set_entry_mode(EntryMode::User);
            vm.boot().unwrap();
            vm.start().unwrap();
            vm
        }
        Some((src, state)) => {
            use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
            let mem =
                kiln_vmm::memory::create(config.mem_bytes, GuestMemorySource::Anonymous).unwrap();
            for r in src.memory().iter() {
                let mut buf = vec![0u8; r.len() as usize];
                src.memory().read_slice(&mut buf, r.start_addr()).unwrap();
                mem.write_slice(&buf, r.start_addr()).unwrap();
            }
            Vm::restore(config, GuestMemorySource::Provided(mem), state).unwrap()
        }
    }
}

/// Lets the guest run for `t`, pauses it, returns its state (and how long the pause took).
fn run_then_pause(vm: &Vm, t: Duration) -> (VmState, Duration) {
    std::thread::sleep(t);
    let t0 = Instant::now();
    vm.pause().unwrap();
    let took = t0.elapsed();
    (vm.save_state().unwrap(), took)
}

#[test]
fn guest_reads_generation_zero_then_next_generation_after_restore() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = start(dir.path(), "boot", None);
    let (s, _) = run_then_pause(&vm, Duration::from_millis(100));
    let r = s.vcpus[0].regs;
    assert!(r.rcx > 0, "guest never looped");
    assert_eq!(r.r8, 0, "a booted VM is generation 0");
    assert_eq!(r.r9, vm.generation_id().id[0]);
    assert_eq!(s.genid, vm.generation_id());

    // Two restores of the same state ("forks"): generation 1, each with its own id.
    let forks: Vec<Vm> = (0..2)
        .map(|i| start(dir.path(), &format!("fork{i}"), Some((&vm, &s))))
        .collect();
    let mut ids = Vec::new();
    for (i, f) in forks.iter().enumerate() {
        let (fs, _) = run_then_pause(f, Duration::from_millis(50));
        assert!(fs.vcpus[0].regs.rcx > r.rcx, "fork {i} continued the loop");
        assert_eq!(fs.vcpus[0].regs.r8, 1, "fork {i}: generation");
        assert_eq!(fs.vcpus[0].regs.r9, f.generation_id().id[0], "fork {i}: id");
        ids.push(f.generation_id().id);
        f.stop();
        f.wait();
    }
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[0], s.genid.id);
    vm.stop();
    vm.wait();
}

#[test]
fn idle_vcpu_sleeps_and_answers_pause_and_stop_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = start(dir.path(), "idle", None);
    let (s1, _) = run_then_pause(&vm, Duration::from_millis(50));
    vm.resume().unwrap();
    let (s2, pause) = run_then_pause(&vm, Duration::from_millis(300));
    // Each iteration sleeps ~10 ms: about 30 in 300 ms (a busy loop with two MMIO reads would
    // do thousands).
    let n = s2.vcpus[0].regs.rcx - s1.vcpus[0].regs.rcx;
    assert!((5..=200).contains(&n), "{n} idle iterations in 300 ms");
    assert!(
        pause < Duration::from_millis(50),
        "pausing an idle vCPU took {pause:?}"
    );
    // The vCPU was parked on its idle OUT: the pause let KVM finish that instruction, so the
    // saved RIP is past it (state saved mid-exit would replay the access after a restore).
    // Under PVM RIP is already past an OUT when it exits, so this only bites on VT-x/AMD-V
    // hosts, where KVM advances RIP on the next KVM_RUN.
    let out_at = testutil::LOAD_ADDR + OUT_OFFSET;
    for _ in 0..5 {
        vm.resume().unwrap();
        let (s, _) = run_then_pause(&vm, Duration::from_millis(15));
        let rip = s.vcpus[0].regs.rip;
        assert_ne!(rip, out_at, "saved state is mid-instruction");
        assert!(
            (testutil::LOAD_ADDR..out_at + 3).contains(&rip),
            "rip {rip:#x}"
        );
    }
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let t = Instant::now();
    vm.stop();
    assert_eq!(
        vm.wait_timeout(Duration::from_secs(2)),
        Some(kiln_vmm::ExitReason::Stopped)
    );
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "stop took {:?}",
        t.elapsed()
    );
}
