//! vCPU register setup for a 64-bit entry with identity-mapped paging, as a Linux 64-bit boot
//! loader leaves the CPU.

use super::*;
use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR0_NW: u64 = 0x2000_0000;
const X86_CR0_CD: u64 = 0x4000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// CPU setup errors.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM ioctl {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("writing boot page tables/GDT into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, CpuError> {
    r.map_err(|e| CpuError::Kvm(what, e))
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Privilege level the guest starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryMode {
    /// CPL 0, as the Linux boot protocol requires.
    #[default]
    Kernel,
    /// CPL 3 with IOPL 3 (port I/O and cli/sti allowed, no other privileged instructions), for
    /// freestanding guests on PVM hosts: PVM runs guest CPL 0 code through its instruction
    /// emulator (~5000x slower measured here) but CPL 3 code natively.
    User,
}

/// Writes the GDT, an empty IDT and identity page tables for 0..4 GiB into guest memory
/// (pages are user-accessible so [`EntryMode::User`] guests can use them; accessed/dirty bits
/// are preset so the hypervisor never has to set them).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let gdt = [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // tss
        gdt_entry(0xa0fb, 0, 0xfffff), // code, 64-bit, DPL 3
        gdt_entry(0xc0f3, 0, 0xfffff), // data, DPL 3
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    // PML4[0] -> PDPT; PDPT[0..4] -> PD pages; each PD maps 1 GiB with 2 MiB pages.
    mem.write_obj(PDPT_ADDR | 0x27, GuestAddress(PML4_ADDR))?;
    for pd in 0..4u64 {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | 0x27, GuestAddress(PDPT_ADDR + pd * 8))?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            mem.write_obj(phys | 0xe7, GuestAddress(pd_addr + i * 8))?;
        }
    }
    Ok(())
}

/// Puts `vcpu` into 64-bit mode at `entry` with RSI = boot_params.
pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64, mode: EntryMode) -> Result<(), CpuError> {
    let mut sregs: kvm_sregs = kvm("KVM_GET_SREGS", vcpu.get_sregs())?;
    let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
    let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
    let tss = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 6 * 8 - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let (code, data) = match mode {
        EntryMode::Kernel => (code, data),
        EntryMode::User => {
            let mut c = segment_from_gdt(gdt_entry(0xa0fb, 0, 0xfffff), 4);
            let mut d = segment_from_gdt(gdt_entry(0xc0f3, 0, 0xfffff), 5);
            c.selector |= 3;
            d.selector |= 3;
            (c, d)
        }
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    // Reset leaves CD|NW (caches disabled) set; a boot loader hands over with caching on.
    sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    kvm("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;

    let regs = kvm_regs {
        // Bit 1 is reserved-one; IOPL 3 for user entry.
        rflags: match mode {
            EntryMode::Kernel => 0x2,
            EntryMode::User => 0x3002,
        },
        rip: entry,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    kvm("KVM_SET_FPU", vcpu.set_fpu(&fpu))?;
    Ok(())
}

/// CPUID for vCPU `index`: what KVM supports, with the APIC ids and topology leaves patched.
pub fn setup_cpuid(vcpu: &VcpuFd, supported: &CpuId, index: u8, count: u8) -> Result<(), CpuError> {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processor count; EDX bit 28 HTT.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= 1 << 28;
                }
                // ECX bit 31: running under a hypervisor.
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => {
                // x2APIC id.
                e.edx = u32::from(index);
            }
            _ => {}
        }
    }
    kvm("KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))
}

/// The boot MSRs a Linux boot loader guarantees (as Firecracker sets them).
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    // MTRRs enabled with write-back as the default memory type, as firmware leaves them
    // (MTRRs off means uncacheable memory).
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WB: u64 = 6;
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ];
    let list: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).expect("fixed small MSR list");
    let n = kvm("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
    if n != list.len() {
        // PVM (and some hosts) refuse a few of these; the guest sets its own later.
        tracing::debug!(
            set = n,
            wanted = list.len(),
            "some boot MSRs were not accepted"
        );
    }
    Ok(())
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as the MP spec's virtual-wire mode.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = kvm("KVM_GET_LAPIC", vcpu.get_lapic())?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    kvm("KVM_SET_LAPIC", vcpu.set_lapic(&lapic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.l, 1);
        assert_eq!(code.present, 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.type_, 3);
    }
}
