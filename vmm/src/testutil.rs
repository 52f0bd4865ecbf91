//! Tiny hand-assembled guests for tests and benchmarks that must not depend on the full test
//! guest: 64-bit ELF files entered like a Linux kernel.

/// Where the tiny guests are loaded and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// A 64-bit ELF (one PT_LOAD at 1 MiB) that runs `code` (position independent machine code).
pub fn elf_with_code(code: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    let phoff = 64u64;
    let code_off = 0x1000u64;
    // ELF header.
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    f.extend_from_slice(&phoff.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    f.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
                                              // Program header: PT_LOAD, R+X.
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&5u32.to_le_bytes());
    f.extend_from_slice(&code_off.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.resize(code_off as usize, 0);
    f.extend_from_slice(code);
    f
}

/// Machine code: print `msg` on COM1, then either reset through the i8042 or spin forever.
pub fn serial_code(msg: &[u8], reset: bool) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.extend_from_slice(&[0x48, 0x8d, 0x35]); // lea rsi, [rip + disp32]
    let disp_at = c.len();
    c.extend_from_slice(&[0; 4]);
    c.push(0xb9); // mov ecx, imm32
    c.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    c.extend_from_slice(&[0xac, 0xee, 0xe2, 0xfc]); // 1: lodsb; out dx, al; loop 1b
    if reset {
        c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    }
    c.extend_from_slice(&[0xeb, 0xfe]); // jmp .
    let msg_at = c.len();
    let disp = (msg_at - (disp_at + 4)) as u32;
    c[disp_at..disp_at + 4].copy_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(msg);
    c
}

/// An ELF guest that prints `msg` and resets.
pub fn hello_elf(msg: &[u8]) -> Vec<u8> {
    elf_with_code(&serial_code(msg, true))
}

/// An ELF guest that prints `msg` and then counts forever in RAX (for pause/resume and
/// save/restore: progress is visible in the registers).
pub fn spinner_elf(msg: &[u8]) -> Vec<u8> {
    let mut c = serial_code(msg, false);
    // Replace the final `jmp .` with: 1: inc rax; jmp 1b, keeping the message after it.
    let jmp = c
        .windows(2)
        .rposition(|w| w == [0xeb, 0xfe])
        .expect("serial_code ends with jmp .");
    let tail = c.split_off(jmp + 2);
    c.truncate(jmp);
    c.extend_from_slice(&[0x48, 0xff, 0xc0, 0xeb, 0xfb]); // inc rax; jmp -5
                                                          // The message moved by 3 bytes: fix the lea displacement.
    let disp = u32::from_le_bytes(c[7..11].try_into().unwrap()) + 3;
    c[7..11].copy_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(&tail);
    elf_with_code(&c)
}

/// An ELF guest that executes `int3` (not emulated under PVM; a breakpoint exception with no
/// IDT elsewhere): the VM must end with an error or a reset, never a VMM crash.
pub fn int3_elf() -> Vec<u8> {
    elf_with_code(&[0xcc, 0xeb, 0xfe])
}
