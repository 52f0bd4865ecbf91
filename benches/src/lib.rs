//! Shared helpers for kiln benchmarks.

/// True when /dev/kvm can be opened read-write (VM benchmarks skip otherwise).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The value after `--name` on the command line, parsed, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (the upper one for an even count); NaN for an empty `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg says them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The gVisor platform the gVisor benches use for kiln and for their raw runsc baselines
/// alike: `--platform P`, else `KILN_GVISOR_PLATFORM`, else systrap. The bench exports it as
/// `KILN_GVISOR_PLATFORM` before it starts anything, so kiln (in-process or the CLI) uses it too.
pub fn gvisor_platform() -> String {
    let from_env = std::env::var("KILN_GVISOR_PLATFORM")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "systrap".into());
    let p = arg("--platform", from_env);
    // SAFETY: called from main before the bench starts any thread.
    unsafe { std::env::set_var("KILN_GVISOR_PLATFORM", &p) };
    p
}
