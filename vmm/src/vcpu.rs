//! vCPU threads: one per vCPU, each running KVM_RUN and dispatching port/MMIO exits to devices.
//!
//! Control (pause, resume, stop) goes through [`VcpuHandle`]: the requester sets the wanted state
//! and kicks the thread out of KVM_RUN with a signal until it acknowledges. While paused, the
//! thread holds no lock on the vCPU fd, so the VM can read or write its state.
//!
//! A guest write to the idle port ([`crate::devices::idle`]) parks the thread, outside KVM_RUN
//! and without the fd lock, until a device or a control request wakes it or the guest's
//! timeout passes.

use crate::devices::idle::{self, IdleWaker, IDLE_PORT, IDLE_PORT_SIGNATURE};
use crate::devices::legacy::{ExitReason, SerialDevice, I8042, I8042_CMD, I8042_DATA, SERIAL_PORT};
use crate::devices::MmioBus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

/// The port-I/O devices.
pub struct PioBus {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Mutex<I8042>,
    /// The VM's idle wake-ups (see [`crate::devices::idle`]).
    pub idle: Arc<IdleWaker>,
}

impl PioBus {
    fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read((p - SERIAL_PORT) as u8);
            }
            I8042_DATA | I8042_CMD if data.len() == 1 => data[0] = lock(&self.i8042).read(port),
            IDLE_PORT if data.len() == 1 => data[0] = IDLE_PORT_SIGNATURE,
            // Nothing here: floating bus.
            _ => data.fill(0xff),
        }
    }

    /// Returns true when the write reset the machine.
    fn write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                lock(&self.serial).write((p - SERIAL_PORT) as u8, data[0]);
                false
            }
            I8042_DATA | I8042_CMD if data.len() == 1 => lock(&self.i8042).write(port, data[0]),
            _ => false,
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking device thread must not take the VMM down with poisoned locks.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctl {
    Running,
    PauseRequested,
    Paused,
    ExitRequested,
    Exited,
}

struct Shared {
    fd: Mutex<VcpuFd>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// Woken on every control request, so an idle vCPU answers it at once.
    idle: Arc<IdleWaker>,
}

/// Control of one vCPU thread.
pub struct VcpuHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    pub index: u8,
}

const KICK_INTERVAL: Duration = Duration::from_millis(1);

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The handler does nothing: its only job is to make KVM_RUN return EINTR.
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            tracing::error!(error = %e, "cannot install the vCPU kick signal handler");
        }
    });
}

impl VcpuHandle {
    /// Creates the handle; the thread starts paused (call [`Self::resume`] to run).
    pub fn spawn(
        index: u8,
        fd: VcpuFd,
        pio: Arc<PioBus>,
        mmio: MmioBus,
        exit: Sender<ExitReason>,
    ) -> std::io::Result<Self> {
        install_kick_handler();
        let shared = Arc::new(Shared {
            fd: Mutex::new(fd),
            ctl: Mutex::new(Ctl::Paused),
            cv: Condvar::new(),
            idle: pio.idle.clone(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run_loop(index, &s, &pio, &mmio, &exit))?;
        Ok(VcpuHandle {
            shared,
            thread: Some(thread),
            index,
        })
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: pthread_kill on a live thread handle (we hold the JoinHandle, so the thread
            // has not been joined); the signal has a no-op handler installed.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), kick_signal());
            }
        }
    }

    /// Blocks until the thread is out of KVM_RUN and parked (or has exited).
    pub fn pause(&self) {
        let mut c = lock(&self.shared.ctl);
        if *c == Ctl::Running {
            *c = Ctl::PauseRequested;
            self.shared.idle.wake();
        }
        while *c == Ctl::PauseRequested {
            drop(c);
            self.kick();
            c = lock(&self.shared.ctl);
            if *c == Ctl::PauseRequested {
                c = self
                    .shared
                    .cv
                    .wait_timeout(c, KICK_INTERVAL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }

    pub fn resume(&self) {
        let mut c = lock(&self.shared.ctl);
        if matches!(*c, Ctl::Paused | Ctl::PauseRequested) {
            *c = Ctl::Running;
            self.shared.cv.notify_all();
        }
    }

    /// Stops the thread and joins it.
    pub fn stop(&mut self) {
        {
            let mut c = lock(&self.shared.ctl);
            if *c != Ctl::Exited {
                *c = Ctl::ExitRequested;
                self.shared.cv.notify_all();
            }
        }
        self.shared.idle.wake();
        loop {
            if *lock(&self.shared.ctl) == Ctl::Exited {
                break;
            }
            self.kick();
            let c = lock(&self.shared.ctl);
            if *c != Ctl::Exited {
                let _ = self.shared.cv.wait_timeout(c, KICK_INTERVAL);
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Runs `f` on the vCPU fd. Call only while paused or before the first resume, or it waits
    /// for the current KVM_RUN to return.
    pub fn with_fd<R>(&self, f: impl FnOnce(&VcpuFd) -> R) -> R {
        f(&lock(&self.shared.fd))
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// What the run loop does after an exit was handled.
enum Step {
    Continue,
    Idle(Duration),
    End(ExitReason),
}

fn run_loop(index: u8, s: &Shared, pio: &PioBus, mmio: &MmioBus, exit: &Sender<ExitReason>) {
    // Differs from the waker's count, so the first idle request returns at once (a restored
    // guest idles right away, and may have work it has not polled yet).
    let mut idle_seen = pio.idle.events().wrapping_sub(1);
    // The last KVM_RUN returned an exit whose instruction KVM finishes only on the next KVM_RUN.
    let mut pending_exit = false;
    loop {
        if pending_exit && *lock(&s.ctl) != Ctl::Running {
            if let Some(r) = complete_pending_exit(index, s, pio, mmio) {
                tracing::info!(vcpu = index, ?r, "vCPU stopped the VM");
                let _ = exit.send(r);
                let mut c = lock(&s.ctl);
                *c = Ctl::Exited;
                s.cv.notify_all();
                return;
            }
        }
        {
            let mut c = lock(&s.ctl);
            loop {
                match *c {
                    Ctl::Running => break,
                    Ctl::PauseRequested => {
                        *c = Ctl::Paused;
                        s.cv.notify_all();
                    }
                    Ctl::Paused => c = s.cv.wait(c).unwrap_or_else(|p| p.into_inner()),
                    Ctl::ExitRequested | Ctl::Exited => {
                        *c = Ctl::Exited;
                        s.cv.notify_all();
                        return;
                    }
                }
            }
        }
        let mut fd = lock(&s.fd);
        let run = fd.run();
        pending_exit = run.is_ok();
        let step = match run {
            Ok(exit) => handle_exit(index, exit, pio, mmio),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
            Err(e) => Step::End(ExitReason::Error(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        };
        let end = match step {
            Step::Continue => None,
            Step::Idle(t) => {
                // Without the fd lock: a pause that wakes us finds the vCPU ready to park.
                drop(fd);
                pio.idle.idle(&mut idle_seen, t);
                continue;
            }
            Step::End(r) => Some(r),
        };
        if let Some(reason) = end {
            let reason = match reason {
                ExitReason::Error(msg) if msg.contains("internal error") => {
                    ExitReason::Error(format!("{msg}{}", internal_error_detail(&mut fd)))
                }
                r => r,
            };
            drop(fd);
            tracing::info!(vcpu = index, ?reason, "vCPU stopped the VM");
            let _ = exit.send(reason);
            let mut c = lock(&s.ctl);
            *c = Ctl::Exited;
            s.cv.notify_all();
            return;
        }
    }
}

/// Lets KVM finish the instruction behind the last exit (an IN gets its data, RIP moves past an
/// OUT or an MMIO access) without running the guest further: KVM completes such exits only on
/// the next KVM_RUN, and state saved before that would replay the access on restore. KVM's API
/// documents `immediate_exit` for exactly this. Returns why the VM must end, if it must.
fn complete_pending_exit(
    index: u8,
    s: &Shared,
    pio: &PioBus,
    mmio: &MmioBus,
) -> Option<ExitReason> {
    let mut fd = lock(&s.fd);
    fd.set_kvm_immediate_exit(1);
    let mut end = None;
    // String I/O can need a few more round trips; anything else returns EINTR at once.
    for _ in 0..64 {
        match fd.run() {
            Ok(exit) => match handle_exit(index, exit, pio, mmio) {
                Step::End(r) => {
                    end = Some(r);
                    break;
                }
                Step::Continue | Step::Idle(_) => {}
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
            Err(e) => {
                end = Some(ExitReason::Error(format!(
                    "vCPU {index}: KVM_RUN (completing an exit) failed: {e}"
                )));
                break;
            }
        }
    }
    fd.set_kvm_immediate_exit(0);
    end
}

fn internal_error_detail(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` union member is the
    // one KVM filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    format!(
        " (suberror {}, data [{}]); on PVM hosts this means the guest used an instruction the \
         hypervisor cannot emulate (e.g. cmpxchg16b, xrstor, int3)",
        internal.suberror,
        data.join(", ")
    )
}

fn handle_exit(index: u8, exit: VcpuExit<'_>, pio: &PioBus, mmio: &MmioBus) -> Step {
    let end = match exit {
        VcpuExit::IoIn(port, data) => {
            pio.read(port, data);
            None
        }
        VcpuExit::IoOut(IDLE_PORT, data) => return Step::Idle(idle::idle_timeout(data)),
        VcpuExit::IoOut(port, data) => pio.write(port, data).then_some(ExitReason::Reset),
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                tracing::debug!(vcpu = index, addr, "MMIO read of unmapped address");
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                tracing::debug!(vcpu = index, addr, "MMIO write to unmapped address");
            }
            None
        }
        VcpuExit::Hlt => Some(ExitReason::Shutdown),
        VcpuExit::Shutdown => {
            tracing::warn!(vcpu = index, "guest triple-faulted (KVM_EXIT_SHUTDOWN)");
            Some(ExitReason::Reset)
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::Shutdown),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
            other => Some(ExitReason::Error(format!(
                "vCPU {index}: system event {other}"
            ))),
        },
        VcpuExit::InternalError => Some(ExitReason::Error(format!(
            "vCPU {index}: KVM internal error"
        ))),
        VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::Error(format!(
            "vCPU {index}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => None,
        other => Some(ExitReason::Error(format!(
            "vCPU {index}: unexpected exit {other:?}"
        ))),
    };
    end.map_or(Step::Continue, Step::End)
}
