//! x86_64 machine setup: where things live in guest memory, long-mode CPU state, CPUID, MSRs,
//! the local APIC, and the Linux boot protocol (kernel, initrd, command line, boot_params).

pub mod boot;
pub mod cpu;

/// GDT (null, code64, data, tss).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (the guest installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// Linux boot_params ("zero page"); RSI points here at entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four page directories of 2 MiB pages (0..4 GiB, so the
/// virtio-mmio windows below 4 GiB are reachable too).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted (Linux's COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area: low RAM in the e820 map ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Guests get at most this much memory below the gap for the initrd (Linux's default
/// initrd_addr_max).
pub const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
