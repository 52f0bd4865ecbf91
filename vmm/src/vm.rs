//! A VM: KVM VM fd, guest memory, vCPU threads, devices; boot, pause/resume, state capture and
//! restore, dirty logging.

use crate::arch::cpu::EntryMode;
use crate::arch::{boot, cpu};
use crate::devices::genid::{GenIdDevice, GenIdState, GENID_BASE, GENID_SIZE};
use crate::devices::idle::IdleWaker;
use crate::devices::legacy::{ExitReason, SerialDevice, SerialOut, I8042, SERIAL_IRQ};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::persist::{restore_devices, DeviceResources};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::MmioBus;
use crate::memory::GuestMemoryMmap;
use crate::memory::{self, GuestMemorySource, RegionInfo, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::persist::{VcpuState, VirtioDeviceState, VmState, VM_STATE_VERSION};
use crate::vcpu::{PioBus, VcpuHandle};
use crate::Error;
use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First GSI handed to virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins available to virtio devices.
pub const MAX_VIRTIO_DEVICES: usize = 24 - VIRTIO_IRQ_BASE as usize;
/// Most vCPUs accepted.
pub const MAX_VCPUS: u8 = 32;

/// What a VM is made of (besides devices added with [`Vm::add_virtio_device`]).
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub mem_bytes: u64,
    pub vcpus: u8,
    /// Kernel (ELF vmlinux or bzImage). Unused when restoring from state.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `virtio_mmio.device=` entries are appended for every virtio device.
    pub cmdline: String,
    /// Serial output file (created/appended).
    pub serial_log: Option<PathBuf>,
    /// Also copy serial output to stdout.
    pub serial_stdout: bool,
    /// Log guest writes (KVM dirty log) from the start. Turning the log on later re-registers
    /// guest memory, which costs ~5 ms on this host (KVM write-protects the whole slot), paid
    /// inside a snapshot's pause or before a restored VM runs; from the start it costs nothing
    /// measurable. KVM then maps guest memory with 4 KiB pages only.
    pub track_dirty_pages: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_bytes: 128 << 20,
            vcpus: 1,
            kernel: None,
            initrd: None,
            cmdline: "console=ttyS0 reboot=k panic=1".into(),
            serial_log: None,
            serial_stdout: false,
            track_dirty_pages: false,
        }
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Built, not started.
    Created,
    Running,
    Paused,
    Exited(ExitReason),
}

/// A virtio device's window on the MMIO bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

impl MmioSlot {
    /// The Linux kernel command-line announcement for this device.
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.size / 1024,
            self.base,
            self.irq
        )
    }
}

struct VirtioEntry {
    slot: MmioSlot,
    transport: Arc<Mutex<MmioTransport>>,
}

/// A microVM.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    config: VmConfig,
    serial: Arc<Mutex<SerialDevice>>,
    serial_irq: EventFd,
    pio: Arc<PioBus>,
    mmio: MmioBus,
    genid: Arc<Mutex<GenIdDevice>>,
    virtio: Vec<VirtioEntry>,
    vcpu_fds: Mutex<Vec<VcpuFd>>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    exit_tx: Sender<ExitReason>,
    exit_rx: Mutex<Receiver<ExitReason>>,
    state: Mutex<RunState>,
    dirty_log: AtomicBool,
    entry_mode: Mutex<EntryMode>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn serial_out(config: &VmConfig) -> Result<SerialOut, Error> {
    let file = match &config.serial_log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::Io(format!("opening serial log {}", p.display()), e))?,
        ),
        None => None,
    };
    Ok(SerialOut::new(file, config.serial_stdout))
}

impl Vm {
    /// Creates the VM: KVM objects, memory (from `memory`), interrupt controllers, vCPUs, serial
    /// and i8042. Add virtio devices next, then [`Vm::boot`] (or [`Vm::restore_state`]) and
    /// [`Vm::start`].
    pub fn new(config: VmConfig, memory: GuestMemorySource) -> Result<Vm, Error> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "{} vCPUs requested; 1..={MAX_VCPUS} are supported",
                config.vcpus
            )));
        }
        let mem = memory::create(config.mem_bytes, memory)?;
        let kvm = Kvm::new().map_err(|e| Error::Kvm("open /dev/kvm", e))?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        let vm = VmParts { fd, mem };
        vm.register_memory(config.track_dirty_pages)?;
        let VmParts { fd, mem } = vm;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let (exit_tx, exit_rx) = channel();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io("eventfd".into(), e))?;
        fd.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq
                .try_clone()
                .map_err(|e| Error::Io("eventfd".into(), e))?,
            Box::new(serial_out(&config)?),
        )));
        let pio = Arc::new(PioBus {
            serial: serial.clone(),
            i8042: Mutex::new(I8042::new(exit_tx.clone())),
            idle: Arc::new(IdleWaker::new()),
        });
        let genid = Arc::new(Mutex::new(GenIdDevice::new(GenIdState::boot())));
        let mut mmio = MmioBus::default();
        mmio.insert(GENID_BASE, GENID_SIZE, genid.clone());
        let mut vcpu_fds = Vec::new();
        for i in 0..config.vcpus {
            vcpu_fds.push(
                fd.create_vcpu(u64::from(i))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?,
            );
        }
        let dirty_log = AtomicBool::new(config.track_dirty_pages);
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            mem,
            config,
            serial,
            serial_irq,
            pio,
            mmio,
            genid,
            virtio: Vec::new(),
            vcpu_fds: Mutex::new(vcpu_fds),
            vcpus: Mutex::new(Vec::new()),
            exit_tx,
            exit_rx: Mutex::new(exit_rx),
            state: Mutex::new(RunState::Created),
            dirty_log,
            entry_mode: Mutex::new(EntryMode::Kernel),
        })
    }

    /// Adds a virtio device on the next virtio-mmio slot (before boot/restore).
    pub fn add_virtio_device(&mut self, device: Box<dyn VirtioDevice>) -> Result<MmioSlot, Error> {
        if *lock(&self.state) != RunState::Created {
            return Err(Error::State(
                "devices can only be added before the VM starts".into(),
            ));
        }
        if self.virtio.len() >= MAX_VIRTIO_DEVICES {
            return Err(Error::Config(format!(
                "at most {MAX_VIRTIO_DEVICES} virtio devices are supported"
            )));
        }
        let i = self.virtio.len() as u64;
        let slot = MmioSlot {
            base: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            irq: VIRTIO_IRQ_BASE + i as u32,
        };
        let ioerr = |e| Error::Io("eventfd".into(), e);
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(ioerr)?;
        self.fd
            .register_irqfd(&irqfd, slot.irq)
            .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
        let mut events = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let e = EventFd::new(EFD_NONBLOCK).map_err(ioerr)?;
            self.fd
                .register_ioevent(
                    &e,
                    &IoEventAddress::Mmio(slot.base + REG_QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            events.push(e);
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            self.mem.clone(),
            Interrupt::new(irqfd).with_idle_waker(self.pio.idle.clone()),
            events,
        )));
        self.mmio.insert(slot.base, slot.size, transport.clone());
        self.virtio.push(VirtioEntry { slot, transport });
        Ok(slot)
    }

    /// Adds the virtio devices of `state` (a saved VM), rebuilt on the host resources `res`
    /// names, in their saved order: then [`Vm::restore_state`].
    pub fn add_restored_devices(
        &mut self,
        state: &VmState,
        res: DeviceResources,
    ) -> Result<(), Error> {
        for d in restore_devices(&state.virtio, res)? {
            self.add_virtio_device(d)?;
        }
        Ok(())
    }

    /// Each virtio device's type and counters (`VirtioDevice::metrics`), in device order.
    pub fn device_metrics(&self) -> Vec<serde_json::Value> {
        self.virtio
            .iter()
            .map(|v| {
                let t = lock(&v.transport);
                serde_json::json!({ "type": t.device().device_type(), "metrics": t.device().metrics() })
            })
            .collect()
    }

    /// The full kernel command line the guest gets.
    pub fn kernel_cmdline(&self) -> String {
        let mut c = self.config.cmdline.trim().to_string();
        for v in &self.virtio {
            if !c.is_empty() {
                c.push(' ');
            }
            c.push_str(&v.slot.cmdline_entry());
        }
        c
    }

    /// The privilege level [`Vm::boot`] starts the guest at (default: CPL 0, Linux).
    pub fn set_entry_mode(&self, mode: EntryMode) {
        *lock(&self.entry_mode) = mode;
    }

    /// Loads the kernel and sets every vCPU up for a 64-bit Linux-protocol entry.
    pub fn boot(&self) -> Result<(), Error> {
        let kernel = self
            .config
            .kernel
            .as_deref()
            .ok_or_else(|| Error::Config("no kernel given".into()))?;
        let info = boot::load(
            &self.mem,
            kernel,
            self.config.initrd.as_deref(),
            &self.kernel_cmdline(),
        )?;
        cpu::write_boot_tables(&self.mem)?;
        // Asked here, not in `new`: a restored VM takes its CPUID from the saved state, and the
        // query costs ~0.4 ms on this host (every host CPUID leaf traps to its hypervisor).
        let supported_cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let fds = lock(&self.vcpu_fds);
        let n = fds.len() as u8;
        for (i, v) in fds.iter().enumerate() {
            cpu::setup_cpuid(v, &supported_cpuid, i as u8, n)?;
            cpu::setup_msrs(v)?;
            if i == 0 {
                cpu::setup_long_mode(v, info.entry, *lock(&self.entry_mode))?;
            }
            cpu::setup_lapic(v)?;
        }
        Ok(())
    }

    /// Starts the vCPU threads.
    pub fn start(&self) -> Result<(), Error> {
        let mut st = lock(&self.state);
        if *st != RunState::Created {
            return Err(Error::State(format!("cannot start a VM in state {st:?}")));
        }
        let fds: Vec<VcpuFd> = lock(&self.vcpu_fds).drain(..).collect();
        let mut handles = lock(&self.vcpus);
        for (i, fd) in fds.into_iter().enumerate() {
            let h = VcpuHandle::spawn(
                i as u8,
                fd,
                self.pio.clone(),
                self.mmio.clone(),
                self.exit_tx.clone(),
            )
            .map_err(|e| Error::Io("spawning vCPU thread".into(), e))?;
            handles.push(h);
        }
        for h in handles.iter() {
            h.resume();
        }
        *st = RunState::Running;
        Ok(())
    }

    pub fn state(&self) -> RunState {
        lock(&self.state).clone()
    }

    /// Stops the vCPUs (out of KVM_RUN) and the devices (in-flight requests completed).
    pub fn pause(&self) -> Result<(), Error> {
        let mut st = lock(&self.state);
        match *st {
            RunState::Running => {}
            RunState::Paused => return Ok(()),
            ref s => return Err(Error::State(format!("cannot pause a VM in state {s:?}"))),
        }
        for h in lock(&self.vcpus).iter() {
            h.pause();
        }
        for v in &self.virtio {
            lock(&v.transport).suspend();
        }
        lock(&self.serial).flush();
        *st = RunState::Paused;
        Ok(())
    }

    pub fn resume(&self) -> Result<(), Error> {
        let mut st = lock(&self.state);
        match *st {
            RunState::Paused => {}
            RunState::Running => return Ok(()),
            ref s => return Err(Error::State(format!("cannot resume a VM in state {s:?}"))),
        }
        for v in &self.virtio {
            lock(&v.transport).resume();
        }
        for h in lock(&self.vcpus).iter() {
            h.resume();
        }
        *st = RunState::Running;
        Ok(())
    }

    /// Asks the VM to stop; [`Vm::wait`] then returns [`ExitReason::Stopped`].
    pub fn stop(&self) {
        let _ = self.exit_tx.send(ExitReason::Stopped);
    }

    /// Blocks until the guest or the host ends the VM; stops vCPUs and devices, flushes serial.
    pub fn wait(&self) -> ExitReason {
        let reason = lock(&self.exit_rx)
            .recv()
            .unwrap_or(ExitReason::Error("exit channel closed".into()));
        self.shutdown(reason.clone());
        reason
    }

    /// Like [`Vm::wait`] with a timeout; `None` if the VM is still running.
    pub fn wait_timeout(&self, t: std::time::Duration) -> Option<ExitReason> {
        let reason = lock(&self.exit_rx).recv_timeout(t).ok()?;
        self.shutdown(reason.clone());
        Some(reason)
    }

    fn shutdown(&self, reason: ExitReason) {
        for h in lock(&self.vcpus).iter_mut() {
            h.stop();
        }
        for v in &self.virtio {
            let mut t = lock(&v.transport);
            t.resume(); // a paused device has nothing running; make deactivate below uniform
            t.device_mut().deactivate();
        }
        lock(&self.serial).flush();
        *lock(&self.state) = RunState::Exited(reason);
    }

    /// What the guest reads from its generation-id page (see [`crate::devices::genid`]).
    pub fn generation_id(&self) -> GenIdState {
        lock(&self.genid).state()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest memory regions (slot, guest address, host address, size).
    pub fn memory_regions(&self) -> Vec<RegionInfo> {
        memory::regions(&self.mem)
    }

    /// Turns KVM dirty-page logging on or off for all memory slots.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), Error> {
        if self.dirty_log.load(Ordering::SeqCst) == on {
            return Ok(());
        }
        VmPartsRef {
            fd: &self.fd,
            mem: &self.mem,
        }
        .register_memory(on)?;
        self.dirty_log.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// The dirty bitmap of memory slot `slot` since the last call (one bit per 4 KiB page, bit i
    /// of word w = page w*64+i), and clears it. Dirty logging must be on.
    pub fn take_dirty_bitmap(&self, slot: u32) -> Result<Vec<u64>, Error> {
        if !self.dirty_log.load(Ordering::SeqCst) {
            return Err(Error::State("dirty logging is off".into()));
        }
        let region = self
            .mem
            .iter()
            .nth(slot as usize)
            .ok_or_else(|| Error::Config(format!("no memory slot {slot}")))?;
        self.fd
            .get_dirty_log(slot, region.len() as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))
    }

    fn ensure_paused(&self, what: &str) -> Result<(), Error> {
        let st = lock(&self.state);
        if *st != RunState::Paused {
            return Err(Error::State(format!(
                "{what} needs a paused VM (it is {st:?})"
            )));
        }
        Ok(())
    }

    /// Captures vCPU, interrupt controller, clock and device state. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        self.ensure_paused("saving state")?;
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msr_indices: Vec<u32> = msr_list.as_slice().to_vec();
        let mut vcpus = Vec::new();
        for h in lock(&self.vcpus).iter() {
            vcpus.push(h.with_fd(|fd| save_vcpu(fd, &msr_indices))?);
        }
        let chip = |id: u32| -> Result<kvm_irqchip, Error> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        let mut clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        // Only the clock value is meaningful in a fresh VM.
        clock.flags = 0;
        Ok(VmState {
            version: VM_STATE_VERSION,
            mem_bytes: self.config.mem_bytes,
            vcpus,
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock,
            serial: lock(&self.serial).save(),
            genid: lock(&self.genid).state(),
            virtio: self
                .virtio
                .iter()
                .map(|v| {
                    let t = lock(&v.transport);
                    VirtioDeviceState {
                        transport: t.save(),
                        device: t.device().save_state(),
                    }
                })
                .collect(),
        })
    }

    /// Restores state saved by [`Vm::save_state`] into this fresh VM (created with the same
    /// memory size, vCPU count and devices, memory holding the saved contents). Then
    /// [`Vm::start`] continues the guest where it was.
    pub fn restore_state(&self, state: &VmState) -> Result<(), Error> {
        if *lock(&self.state) != RunState::Created {
            return Err(Error::State(
                "restore needs a VM that has not started".into(),
            ));
        }
        let bad = |m: String| Err(Error::BadState(m));
        if state.version != VM_STATE_VERSION {
            return bad(format!(
                "state version {} (expected {VM_STATE_VERSION})",
                state.version
            ));
        }
        if state.mem_bytes != self.config.mem_bytes {
            return bad(format!(
                "state is for {} bytes of memory, VM has {}",
                state.mem_bytes, self.config.mem_bytes
            ));
        }
        let fds = lock(&self.vcpu_fds);
        if state.vcpus.len() != fds.len() {
            return bad(format!(
                "state has {} vCPUs, VM has {}",
                state.vcpus.len(),
                fds.len()
            ));
        }
        if state.virtio.len() != self.virtio.len() {
            return bad(format!(
                "state has {} virtio devices, VM has {}",
                state.virtio.len(),
                self.virtio.len()
            ));
        }
        for (s, v) in state.virtio.iter().zip(&self.virtio) {
            let t = lock(&v.transport).device().device_type();
            if s.device_type() != t {
                return bad(format!(
                    "virtio device type {} in state, {} in VM",
                    s.device_type(),
                    t
                ));
            }
        }
        self.fd
            .set_clock(&state.clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        for c in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        for (fd, s) in fds.iter().zip(&state.vcpus) {
            restore_vcpu(fd, s)?;
        }
        let irq = self
            .serial_irq
            .try_clone()
            .map_err(|e| Error::Io("eventfd".into(), e))?;
        let serial = SerialDevice::restore(&state.serial, irq, Box::new(serial_out(&self.config)?))
            .map_err(|e| Error::BadState(format!("serial: {e}")))?;
        *lock(&self.serial) = serial;
        for (s, v) in state.virtio.iter().zip(&self.virtio) {
            lock(&v.transport)
                .restore(&s.transport)
                .map_err(|e| Error::BadState(format!("virtio device: {e}")))?;
        }
        // Every restore is a new instance of the guest (a fork, a resume elsewhere, a rollback):
        // it sees the next generation and a new id.
        lock(&self.genid).set_state(state.genid.next());
        Ok(())
    }

    /// Creates a VM from `config` and `memory` (already holding the guest's memory contents),
    /// restores `state` into it and starts it. For VMs with extra devices, use [`Vm::new`],
    /// add the devices, [`Vm::restore_state`] and [`Vm::start`].
    pub fn restore(
        config: VmConfig,
        memory: GuestMemorySource,
        state: &VmState,
    ) -> Result<Vm, Error> {
        let vm = Vm::new(config, memory)?;
        vm.restore_state(state)?;
        vm.start()?;
        Ok(vm)
    }
}

struct VmParts {
    fd: VmFd,
    mem: GuestMemoryMmap,
}

impl VmParts {
    fn register_memory(&self, dirty_log: bool) -> Result<(), Error> {
        VmPartsRef {
            fd: &self.fd,
            mem: &self.mem,
        }
        .register_memory(dirty_log)
    }
}

struct VmPartsRef<'a> {
    fd: &'a VmFd,
    mem: &'a GuestMemoryMmap,
}

impl VmPartsRef<'_> {
    fn register_memory(&self, dirty_log: bool) -> Result<(), Error> {
        for (slot, r) in self.mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of guest memory owned by `mem`, which the VM
            // keeps alive for as long as the VM fd exists.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }
}

fn save_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?;
    // Read MSRs in one batch; KVM stops at the first it cannot read, so skip that one and go on.
    let mut msrs = Vec::new();
    let mut rest: &[u32] = msr_indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("{e:?}")))?;
        let n = fd.get_msrs(&mut m).map_err(kvm_err("KVM_GET_MSRS"))?;
        msrs.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        msrs,
        regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
        debugregs: fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
    })
}

fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), Error> {
    let cpuid =
        CpuId::from_entries(&s.cpuid).map_err(|e| Error::BadState(format!("cpuid: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // SAFETY: the xsave buffer is the legacy 4 KiB kvm_xsave that KVM_GET_XSAVE produced.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let m = Msrs::from_entries(&entries).map_err(|e| Error::BadState(format!("msrs: {e:?}")))?;
    let n = fd.set_msrs(&m).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        tracing::warn!(
            set = n,
            total = entries.len(),
            "not every saved MSR was accepted"
        );
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
