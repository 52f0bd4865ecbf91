//! VM state as plain serde data, captured while paused and restored into a fresh VM.
//!
//! As Firecracker's Persist: each stateful piece has one state type; [`Persist`] ties a type to
//! it. The snapshotter stores these (serde) next to the memory and disk blobs.

use crate::devices::genid::GenIdState;
use crate::devices::legacy::SerialState;
use crate::devices::virtio::mmio::MmioTransportState;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// Save/restore of one component.
pub trait Persist: Sized {
    /// Plain-data state.
    type State: Serialize + for<'de> Deserialize<'de>;
    /// What restoring needs besides the state (fds, memory, ...).
    type Context;
    type Error;
    fn save(&self) -> Self::State;
    fn restore(ctx: Self::Context, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Format version of [`VmState`]; bump on incompatible changes.
pub const VM_STATE_VERSION: u32 = 1;

/// Everything but memory and disk contents.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    /// Guest memory size in bytes (the memory handed to restore must have this layout).
    pub mem_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub serial: SerialState,
    /// The generation-id page (states saved before it existed load as generation 0).
    #[serde(default)]
    pub genid: GenIdState,
    /// One per virtio device, in the order the devices were added (their mmio slot order).
    pub virtio: Vec<VirtioDeviceState>,
}

/// One virtio device: its type, transport state and device-specific state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub device_type: u32,
    pub transport: MmioTransportState,
    pub device: serde_json::Value,
}

/// One vCPU's architectural state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<(u32, u64)>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}
