//! The paravirtual idle port. On PVM hosts guests run at CPL 3, where `hlt` is not available,
//! so a polling guest with nothing to do writes [`IDLE_PORT`] instead: the vCPU thread then
//! sleeps until a device has news for the guest (an interrupt was raised, e.g. vsock RX
//! queued), the VMM wants the vCPU (pause, stop), or the timeout passes, and returns to the
//! guest, which polls its queues again.
//!
//! Port protocol: a 4-byte (or 1/2-byte) write of the longest sleep in microseconds; 0 means
//! [`DEFAULT_IDLE`], larger values are capped at [`MAX_IDLE`]. A 1-byte read returns
//! [`IDLE_PORT_SIGNATURE`] (a missing device reads 0xff), so a guest can tell whether it may use
//! the port.
//!
//! Wake-ups are never lost: [`IdleWaker`] counts wake events, and each vCPU remembers the count
//! it last returned at; an idle request with events it has not seen returns at once.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The idle port (unused by PC legacy devices and by Linux).
pub const IDLE_PORT: u16 = 0x0500;
/// What a 1-byte read of [`IDLE_PORT`] returns ('K').
pub const IDLE_PORT_SIGNATURE: u8 = 0x4b;
/// Sleep used when the guest asks for 0.
pub const DEFAULT_IDLE: Duration = Duration::from_millis(10);
/// Longest sleep a guest can ask for (bounds how stale guest timers get).
pub const MAX_IDLE: Duration = Duration::from_millis(10);

/// Wake events shared by the devices (through [`crate::Interrupt`]), the vCPU controls and the
/// idle vCPUs of one VM.
#[derive(Debug, Default)]
pub struct IdleWaker {
    state: Mutex<WakerState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct WakerState {
    events: u64,
    /// vCPUs asleep in [`IdleWaker::idle`]: a wake with none skips the futex syscall, which
    /// matters at one wake per device interrupt.
    sleepers: u32,
}

impl IdleWaker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Something happened that an idle vCPU must look at.
    pub fn wake(&self) {
        let mut st = self.lock();
        st.events = st.events.wrapping_add(1);
        if st.sleepers > 0 {
            self.cv.notify_all();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps until the event count differs from `*seen` or `timeout` passes; updates `*seen`.
    /// Returns true if woken by an event.
    pub fn idle(&self, seen: &mut u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        st.sleepers += 1;
        let woken = loop {
            if st.events != *seen {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        st.sleepers -= 1;
        *seen = st.events;
        woken
    }

    /// The current event count (a vCPU starts from a value that differs, so its first idle
    /// request returns at once: a restored guest may have missed events while it was saved).
    pub fn events(&self) -> u64 {
        self.lock().events
    }
}

/// The sleep a guest's idle write asks for.
pub fn idle_timeout(data: &[u8]) -> Duration {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    match u32::from_le_bytes(b) {
        0 => DEFAULT_IDLE,
        us => Duration::from_micros(u64::from(us)).min(MAX_IDLE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn idle_times_out_without_events() {
        let w = IdleWaker::new();
        let mut seen = w.events();
        let t = Instant::now();
        assert!(!w.idle(&mut seen, Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn an_event_before_the_idle_request_is_not_lost() {
        let w = IdleWaker::new();
        let mut seen = w.events();
        w.wake();
        let t = Instant::now();
        assert!(w.idle(&mut seen, Duration::from_secs(5)));
        assert!(t.elapsed() < Duration::from_secs(1));
        // Seen now: the next idle sleeps.
        assert!(!w.idle(&mut seen, Duration::from_millis(5)));
    }

    #[test]
    fn a_wake_ends_the_sleep_early() {
        let w = Arc::new(IdleWaker::new());
        let w2 = w.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            w2.wake();
        });
        let mut seen = w.events();
        let t = Instant::now();
        assert!(w.idle(&mut seen, Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(5));
        waker.join().unwrap();
    }

    #[test]
    fn guest_timeouts_are_bounded() {
        assert_eq!(idle_timeout(&0u32.to_le_bytes()), DEFAULT_IDLE);
        assert_eq!(
            idle_timeout(&500u32.to_le_bytes()),
            Duration::from_micros(500)
        );
        assert_eq!(idle_timeout(&u32::MAX.to_le_bytes()), MAX_IDLE);
        assert_eq!(idle_timeout(&[100]), Duration::from_micros(100));
    }
}
