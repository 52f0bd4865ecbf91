//! Test support: real servers (S3) and a runner for the built `kiln` binary.
//!
//! Tests that need something this host lacks print `SKIP: <reason>` on stderr and return;
//! `scripts/test` collects those lines at the end of a run.

pub mod cluster;
pub mod e2b;
pub mod etcd;
pub mod net;
pub mod registry;
pub mod s3;
pub mod sandbox;
pub mod tapns;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

/// A free loopback port for a server a test starts, and may restart on the same port.
///
/// Chosen below the kernel's ephemeral range (and above the SeaweedFS slots' gRPC ports), never
/// by binding port 0: a port in the ephemeral range can be taken while its server is down,
/// by any outgoing connection, or by a client retrying against the dead port whose connection
/// the kernel happens to give that same port as its source (a TCP self-connection, which then
/// holds the port as long as the client waits). Seen once in CI: a `kiln serve` restarted
/// after kill -9 found its port "already in use".
///
/// A port that binds now can still be handed to another test before its server binds it
/// (nextest runs tests as parallel processes; an etcd cluster asks for six ports in a row), so
/// each port handed out is also reserved until this test process exits: an exclusive lock on
/// a file named after it in [`PORT_LOCKS`], kept open for the process's life. Seen once in CI:
/// two etcd members of different tests given the same port.
pub fn free_port() -> u16 {
    const FIRST: u16 = 28_500;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > FIRST + 100 {
        let span = ephemeral_low - FIRST;
        let start = rand::random::<u16>() % span;
        for i in 0..span {
            let port = FIRST + (start + i) % span;
            if reserve(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}

/// Where [`free_port`] keeps its per-port lock files, shared by every test process.
pub const PORT_LOCKS: &str = "/tmp/kiln-test-ports";

/// Takes `port` for this process unless another test process (or an earlier call here) holds it.
/// The lock file stays open, and locked, until the process exits.
fn reserve(port: u16) -> bool {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    static DIR_USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let dir = Path::new(PORT_LOCKS);
    let usable = *DIR_USABLE.get_or_init(|| {
        if std::fs::create_dir(dir).is_ok() {
            // Tests run as different users share the directory, like /tmp itself.
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));
        }
        let c = std::ffi::CString::new(PORT_LOCKS).unwrap();
        // SAFETY: access() reads a NUL-terminated path and touches no memory of ours.
        unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
    });
    if !usable {
        // No shared place to reserve in: the bind check alone, as before.
        return true;
    }
    let path = dir.join(port.to_string());
    // flock needs no write access: another user's lock file is opened read-only.
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .open(&path)
        .or_else(|_| std::fs::File::open(&path));
    let Ok(file) = opened else {
        return false;
    };
    if file.try_lock().is_err() {
        return false;
    }
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
    true
}

/// The `kiln` binary of this build.
///
/// `env!("CARGO_BIN_EXE_kiln")` only exists inside the `api` package, so it is found next to
/// the running executable instead: tests run from `<target>/<profile>/deps/`, benchmarks from
/// `<target>/<profile>/`, and `kiln` is in `<target>/<profile>/` (this also honours
/// CARGO_TARGET_DIR and the build profile).
/// `cargo test`/`nextest` do not build other packages' binaries, so `scripts/test` runs
/// `cargo build --workspace` first; if the binary is missing it is built here once.
/// Override with `KILN_BIN=/path/to/kiln`.
pub fn kiln_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // Tests live in <target>/<profile>/deps/, benchmark binaries in <target>/<profile>/.
    let mut profile_dir = exe
        .parent()
        .expect("executable has a directory")
        .to_path_buf();
    if profile_dir.file_name() == Some(OsStr::new("deps")) {
        profile_dir.pop();
    }
    let bin = profile_dir.join("kiln");
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        if bin.exists() {
            return;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "kiln-cli"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if profile_dir.file_name() == Some(OsStr::new("release")) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build -p kiln-cli");
        assert!(st.success(), "cargo build -p kiln-cli failed");
    });
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

/// Runs `kiln` with its own KILN_HOME and environment (e.g. [`s3::S3Server::env`]).
#[derive(Clone, Debug)]
pub struct Kiln {
    pub home: PathBuf,
    env: Vec<(String, String)>,
}

impl Kiln {
    /// `kiln` with home `home` (created on first use by kiln itself). Its sandboxes get no
    /// network device (`KILN_NETWORK=none`): a sandbox network puts a veth with an address,
    /// forwarding and an nftables table into the namespace kiln runs in, and tests do that only
    /// inside namespaces of their own (`net::TestNet::kiln_env` turns it back on).
    pub fn new(home: impl Into<PathBuf>) -> Kiln {
        Kiln {
            home: home.into(),
            env: vec![("KILN_NETWORK".into(), "none".into())],
        }
    }

    /// Adds environment variables for every run.
    pub fn with_env(mut self, env: impl IntoIterator<Item = (String, String)>) -> Kiln {
        self.env.extend(env);
        self
    }

    /// The block store directory inside the home.
    pub fn store_dir(&self) -> PathBuf {
        self.home.join("store")
    }

    /// A ready-to-run command (stdin closed; the caller may add more).
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(kiln_bin());
        c.args(args)
            .env("KILN_HOME", &self.home)
            .env_remove("KILN_LOG")
            .stdin(std::process::Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs and returns the output, whatever the exit status.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd(args).output().expect("running kiln")
    }

    /// Runs, asserts success, returns stdout.
    pub fn ok<I, S>(&self, args: I) -> Vec<u8>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "kiln {:?} failed ({}):\n{}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs, asserts success, returns stdout as a trimmed string.
    pub fn ok_str<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        String::from_utf8(self.ok(args))
            .expect("utf-8 output")
            .trim()
            .to_string()
    }

    /// Runs, asserts success, parses stdout as JSON.
    pub fn json<I, S>(&self, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        serde_json::from_slice(&self.ok(args)).expect("JSON output")
    }

    /// Runs, asserts failure, returns stderr.
    pub fn fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.run(&args);
        assert!(
            !out.status.success(),
            "kiln {:?} unexpectedly succeeded; stdout:\n{}",
            args,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A guard that stops every running VM of this home when dropped, also when the test
    /// panics: detached VMM processes must not outlive their test.
    pub fn stop_vms_on_drop(&self) -> StopVms {
        StopVms(self.clone())
    }
}

/// See [`Kiln::stop_vms_on_drop`].
pub struct StopVms(Kiln);

impl Drop for StopVms {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.0.home.join("vms")) else {
            return;
        };
        for e in rd.flatten() {
            if e.path().join("control.sock").exists() {
                let _ = self.0.run(["vm", "stop", &e.file_name().to_string_lossy()]);
            }
        }
    }
}

/// Boots the freestanding test guest in this process and starts its vCPU: user-mode entry
/// (PVM emulates CPL 0 code ~5000x slower), a vsock device (CID 3) on `uds`, serial to
/// `serial_log`.
pub fn boot_test_guest(
    mem_bytes: u64,
    uds: &Path,
    serial_log: &Path,
) -> anyhow::Result<kiln_vmm::Vm> {
    let config = kiln_vmm::VmConfig {
        mem_bytes,
        kernel: Some(kiln_testguest::elf_path().to_path_buf()),
        serial_log: Some(serial_log.to_path_buf()),
        ..Default::default()
    };
    let mut vm = kiln_vmm::Vm::new(config, kiln_vmm::GuestMemorySource::Anonymous)?;
    let vsock = kiln_vmm::devices::virtio::vsock::Vsock::new(3, uds)?;
    vm.add_virtio_device(Box::new(vsock))?;
    vm.set_entry_mode(kiln_vmm::EntryMode::User);
    vm.boot()?;
    vm.start()?;
    Ok(vm)
}

/// `kiln vm run` arguments for the freestanding test guest (64 MiB, user-mode entry, which
/// runs natively on PVM hosts), followed by `extra`.
pub fn test_guest_vm_run(extra: &[&str]) -> Vec<String> {
    let elf = kiln_testguest::elf_path().display().to_string();
    let base = [
        "vm", "run", "--kernel", &elf, "--entry", "user", "--mem", "64",
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// Why VM tests cannot run here (no usable /dev/kvm), if they cannot.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm not usable: {e}")),
    }
}

/// Returns from the calling test, printing `SKIP: <reason>`, when KVM is not usable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(why) = $crate::kvm_unavailable() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough to exercise zstd.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
