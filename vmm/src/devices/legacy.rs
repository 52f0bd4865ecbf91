//! Legacy PC devices: the 8250 serial port (vm-superio) and the bits of the i8042 controller a
//! guest uses to reset the machine.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::mpsc::Sender;
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_DATA: u16 = 0x60;
pub const I8042_CMD: u16 = 0x64;
const I8042_RESET_CMD: u8 = 0xfe;

/// Raises an interrupt by writing an irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial port and where its output goes.
pub struct SerialDevice {
    inner: Serial<IrqFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

/// Serial state (vm-superio's register file, as plain serde data).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            inner: Serial::new(IrqFdTrigger(irq), out),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.inner.write(offset, value) {
            tracing::debug!(error = ?e, "serial write failed");
        }
    }

    pub fn flush(&mut self) {
        let _ = self.inner.writer_mut().flush();
    }

    pub fn save(&self) -> SerialState {
        let s = self.inner.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    pub fn restore(
        state: &SerialState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let s = SuperioState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let inner = Serial::from_state(&s, IrqFdTrigger(irq), NoEvents, out)
            .map_err(|e| format!("{e:?}"))?;
        Ok(SerialDevice { inner })
    }
}

/// Why the guest stopped, as seen by a device or a vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 0xFE, triple fault, KVM_SYSTEM_EVENT reset): a clean end.
    Reset,
    /// The guest powered off (KVM_SYSTEM_EVENT shutdown) or halted with interrupts off.
    Shutdown,
    /// The host asked the VM to stop.
    Stopped,
    /// The VM could not continue (e.g. PVM's KVM_EXIT_INTERNAL_ERROR on an unemulated instruction).
    Error(String),
}

/// The part of the i8042 keyboard controller guests use to reboot.
pub struct I8042 {
    exit: Sender<ExitReason>,
}

impl I8042 {
    pub fn new(exit: Sender<ExitReason>) -> Self {
        I8042 { exit }
    }

    pub fn read(&mut self, _port: u16) -> u8 {
        // Status 0: output buffer empty, input buffer empty, so guests never wait on us.
        0
    }

    /// Returns true when the write reset the machine.
    pub fn write(&mut self, port: u16, value: u8) -> bool {
        if port == I8042_CMD && value == I8042_RESET_CMD {
            let _ = self.exit.send(ExitReason::Reset);
            return true;
        }
        false
    }
}

/// How many bytes a serial log file holds at most: a guest can write its serial port forever,
/// and the log is a host file.
pub const SERIAL_LOG_MAX: u64 = 8 << 20;

/// Serial output to a log file (line-buffered, at most [`SERIAL_LOG_MAX`] bytes, the excess
/// dropped), optionally mirrored to stdout.
pub struct SerialOut {
    file: Option<std::io::LineWriter<std::fs::File>>,
    stdout: bool,
    /// Bytes the log file may still take.
    room: u64,
}

impl SerialOut {
    /// `file` may hold output already (a restored VM appends): that counts against the bound.
    pub fn new(file: Option<std::fs::File>, stdout: bool) -> Self {
        let used = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        SerialOut {
            file: file.map(std::io::LineWriter::new),
            stdout,
            room: SERIAL_LOG_MAX.saturating_sub(used),
        }
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let (Some(f), true) = (&mut self.file, self.room > 0) {
            let n = buf
                .len()
                .min(usize::try_from(self.room).unwrap_or(usize::MAX));
            f.write_all(&buf[..n])?;
            self.room -= n as u64;
            if self.room == 0 {
                f.write_all(b"\n[kiln: serial log limit reached; further output dropped]\n")?;
                f.flush()?;
            }
        }
        if self.stdout {
            let mut o = std::io::stdout().lock();
            o.write_all(buf)?;
            if buf.contains(&b'\n') {
                o.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(f) = &mut self.file {
            f.flush()?;
        }
        if self.stdout {
            std::io::stdout().flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_log_is_bounded_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap()
        };
        let line = [b'x'; 4095];
        let mut out = SerialOut::new(Some(open()), false);
        for _ in 0..(SERIAL_LOG_MAX as usize / 4096 / 2) {
            out.write_all(&line).unwrap();
            out.write_all(b"\n").unwrap();
        }
        out.flush().unwrap();
        drop(out);
        // A restored VM appends to the same log: the bound holds for the sum.
        let mut out = SerialOut::new(Some(open()), false);
        for _ in 0..(SERIAL_LOG_MAX as usize / 4096) {
            out.write_all(&line).unwrap();
            out.write_all(b"\n").unwrap();
        }
        out.flush().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= SERIAL_LOG_MAX + 128, "{len}");
        assert!(len >= SERIAL_LOG_MAX, "{len}");
    }
}
