//! Builds the freestanding guest ELF with the system gcc (no `x86_64-unknown-none` Rust target is
//! available here). Flags keep the code to plain integer instructions: PVM cannot emulate
//! cmpxchg16b, xrstor or int3, and the guest never enables SSE/AVX state.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &[
    "start.S", "main.c", "lib.c", "virtio.c", "blk.c", "vsock.c", "cmd.c", "net.c",
];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let elf = out.join("kiln-testguest.elf");
    println!("cargo:rerun-if-changed=guest");
    for f in SOURCES.iter().chain(["kt.h", "link.ld"].iter()) {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    let cc = std::env::var("KILN_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let mut cmd = Command::new(&cc);
    cmd.args([
        "-std=gnu11",
        "-O2",
        "-g",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-Werror",
        "-ffreestanding",
        "-fno-builtin",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-fno-pic",
        "-fno-pie",
        "-mcmodel=small",
        "-mno-red-zone",
        "-mgeneral-regs-only",
        "-mno-cx16",
        "-march=x86-64",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-fcf-protection=none",
        "-fno-tree-loop-distribute-patterns",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,-z,noexecstack",
    ])
    .arg(format!("-Wl,-T,{}", dir.join("link.ld").display()))
    .arg("-o")
    .arg(&elf);
    for s in SOURCES {
        cmd.arg(dir.join(s));
    }
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("kiln-testguest: cannot run `{cc}` to build the test guest: {e}")
    });
    if !output.status.success() {
        panic!(
            "kiln-testguest: building the guest with `{cc}` failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    println!("cargo:rustc-env=KILN_TESTGUEST_ELF={}", elf.display());
}
