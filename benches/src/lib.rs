//! Shared helpers for kiln benchmarks.

/// True when /dev/kvm can be opened read-write (VM benchmarks skip otherwise).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
