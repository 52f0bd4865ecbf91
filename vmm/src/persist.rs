//! VM state as plain serde data, captured while paused and restored into a fresh VM.
//!
//! As Firecracker's Persist: each stateful piece has one state type; [`Persist`] ties a type to
//! it. Each virtio device implements it beside its code (`devices/virtio/*/persist.rs`); the
//! VMM rebuilds a snapshot's devices from their states ([`crate::Vm::add_restored_devices`]).
//! The snapshotter stores these (serde) next to the memory and disk blobs.

use crate::devices::genid::GenIdState;
use crate::devices::legacy::SerialState;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::devices::virtio::persist::DeviceState;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// Save/restore of one component.
pub trait Persist: Sized {
    /// Plain-data state (what a snapshot keeps of the component).
    type State: Serialize + for<'de> Deserialize<'de>;
    /// What restoring needs besides the state: host resources a snapshot never holds (a disk
    /// backend, a socket path, a TAP), each restore or fork naming its own.
    type ConstructorArgs;
    type Error: std::error::Error;
    /// The component's state (plain data: saving cannot fail).
    fn save(&self) -> Self::State;
    /// A component that continues from `state` on `args`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
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

/// One virtio device: its transport state and device-specific state. Serialized as
/// `{"device_type": N, "transport": {..}, "device": {..}}`, the shape kiln always wrote, so
/// states saved by earlier versions load.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "VirtioDeviceIn")]
pub struct VirtioDeviceState {
    pub transport: MmioTransportState,
    pub device: DeviceState,
}

impl VirtioDeviceState {
    /// The virtio device type id (`TYPE_BLOCK`, ...).
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }
}

impl Serialize for VirtioDeviceState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            device_type: u32,
            transport: &'a MmioTransportState,
            device: &'a DeviceState,
        }
        Out {
            device_type: self.device_type(),
            transport: &self.transport,
            device: &self.device,
        }
        .serialize(s)
    }
}

/// [`VirtioDeviceState`] as read: the device type says how to read the device's own state.
#[derive(Deserialize)]
struct VirtioDeviceIn {
    device_type: u32,
    transport: MmioTransportState,
    device: serde_json::Value,
}

impl TryFrom<VirtioDeviceIn> for VirtioDeviceState {
    type Error = String;
    fn try_from(r: VirtioDeviceIn) -> Result<Self, String> {
        Ok(VirtioDeviceState {
            transport: r.transport,
            device: DeviceState::from_json(r.device_type, r.device)?,
        })
    }
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
