//! Shared helpers for the test-guest tests: boot the kiln test guest in a real KVM VM through the
//! vmm library, watch its serial log, talk to it over vsock.
#![allow(dead_code)]

use kiln_vmm::devices::virtio::vsock::Vsock;
use kiln_vmm::{GuestMemorySource, Vm, VmConfig};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct GuestVm {
    /// Not dropped when a test fails: a wedged device could block the stop forever, and a
    /// hanging test is worse than a leaked VM in a test process that is about to exit.
    pub vm: std::mem::ManuallyDrop<Vm>,
    pub dir: tempfile::TempDir,
    pub serial: PathBuf,
    pub uds: Option<PathBuf>,
}

pub struct GuestOpts<'a> {
    pub mem_mib: u64,
    pub cmdline: &'a str,
    pub vsock: bool,
    pub disks: Vec<Box<dyn kiln_vmm::VirtioDevice>>,
}

impl Default for GuestOpts<'_> {
    fn default() -> Self {
        GuestOpts {
            mem_mib: 64,
            cmdline: "",
            vsock: true,
            disks: Vec::new(),
        }
    }
}

impl GuestVm {
    pub fn start(opts: GuestOpts) -> GuestVm {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let config = VmConfig {
            mem_bytes: opts.mem_mib << 20,
            kernel: Some(kiln_testguest::elf_path().to_path_buf()),
            cmdline: opts.cmdline.to_string(),
            serial_log: Some(serial.clone()),
            ..VmConfig::default()
        };
        let mut vm = Vm::new(config, GuestMemorySource::Anonymous).expect("create VM");
        for d in opts.disks {
            vm.add_virtio_device(d).expect("add disk");
        }
        let uds = if opts.vsock {
            let p = dir.path().join("vsock.sock");
            vm.add_virtio_device(Box::new(Vsock::new(3, &p).expect("vsock device")))
                .expect("add vsock");
            Some(p)
        } else {
            None
        };
        // PVM emulates CPL 0 guest code instruction by instruction; the test guest runs at CPL 3.
        vm.set_entry_mode(kiln_vmm::EntryMode::User);
        vm.boot().expect("boot");
        vm.start().expect("start");
        GuestVm {
            vm: std::mem::ManuallyDrop::new(vm),
            dir,
            serial,
            uds,
        }
    }

    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the serial log contains `needle`; panics with the log after `timeout`.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let mut s = self.serial_text();
            // Only complete lines: the guest may be mid-line.
            s.truncate(s.rfind('\n').map_or(0, |i| i + 1));
            if s.contains(needle) {
                return s;
            }
            if let Some(r) = self.vm_exited() {
                panic!("VM exited ({r}) before printing {needle:?}; serial:\n{s}");
            }
            if t0.elapsed() > timeout {
                panic!("timed out waiting for {needle:?} on serial; serial so far:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn vm_exited(&self) -> Option<String> {
        match self.vm.state() {
            kiln_vmm::RunState::Exited(r) => Some(format!("{r:?}")),
            _ => None,
        }
    }

    /// Opens a host-initiated vsock connection to guest `port`.
    pub fn connect(&self, port: u32) -> Conn {
        connect_uds(self.uds.as_ref().expect("VM has vsock"), port)
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- guest serial log ---\n{}--- end ---",
                self.serial_text()
            );
            return;
        }
        if !matches!(self.vm.state(), kiln_vmm::RunState::Exited(_)) {
            self.vm.stop();
            let _ = self.vm.wait_timeout(Duration::from_secs(5));
        }
        // SAFETY: the only place the VM is dropped, and `self.vm` is not used afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.vm) };
    }
}

/// A line-oriented connection to the guest's request server.
pub struct Conn {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
    pub host_port: u32,
}

pub fn connect_uds(uds: &Path, port: u32) -> Conn {
    let s = UnixStream::connect(uds).expect("connect to vsock UDS");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = s.try_clone().unwrap();
    writeln!(writer, "CONNECT {port}").unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).expect("CONNECT reply");
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad CONNECT reply {line:?}"));
    Conn {
        reader,
        writer,
        host_port,
    }
}

impl Conn {
    /// Sends one request line, returns the reply line (without newline).
    pub fn request(&mut self, line: &str) -> String {
        writeln!(self.writer, "{line}").unwrap();
        self.read_line()
    }

    pub fn read_line(&mut self) -> String {
        let mut s = String::new();
        let n = self.reader.read_line(&mut s).expect("read reply");
        assert!(n > 0, "connection closed by the guest");
        s.trim_end_matches('\n').to_string()
    }

    /// Sends a request whose reply is `OK <value>` and returns the value.
    pub fn ok(&mut self, line: &str) -> String {
        let r = self.request(line);
        r.strip_prefix("OK")
            .unwrap_or_else(|| panic!("{line:?} failed: {r:?}"))
            .trim()
            .to_string()
    }
}

pub fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("not hex: {s:?}"))
}
