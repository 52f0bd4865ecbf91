//! vmm: a thin KVM virtual machine monitor for kiln.
//!
//! One [`Vm`] = KVM VM + guest memory (anonymous or handed in by the caller) + vCPU threads +
//! devices (8250 serial, i8042 reset, virtio-mmio devices such as virtio-blk). The VM's state
//! (vCPUs, interrupt controllers, clock, devices) can be captured as serde data while paused and
//! restored into a fresh VM: see [`persist`].

pub mod arch;
pub mod control;
pub mod devices;
pub mod host;
pub mod kernel_cache;
pub mod memory;
pub mod persist;
#[doc(hidden)]
pub mod testutil;
pub mod vcpu;
pub mod vm;

pub use arch::cpu::EntryMode;
pub use devices::legacy::ExitReason;
pub use devices::virtio::{ActivateContext, ActivateError, Interrupt, VirtioDevice};
pub use memory::{GuestMemorySource, RegionInfo};
pub use persist::VmState;
pub use vm::{MmioSlot, RunState, Vm, VmConfig};

/// VMM errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(#[from] memory::MemoryError),
    #[error("KVM: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Boot(#[from] arch::boot::BootError),
    #[error(transparent)]
    Cpu(#[from] arch::cpu::CpuError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("VM state: {0}")]
    State(String),
    #[error("saved VM state does not fit this VM: {0}")]
    BadState(String),
    #[error(transparent)]
    DeviceRestore(#[from] devices::virtio::persist::DeviceRestoreError),
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}
