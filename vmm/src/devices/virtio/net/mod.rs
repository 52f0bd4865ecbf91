//! virtio-net over a TAP: one RX and one TX queue, the MAC in config space.
//!
//! One worker thread per device waits (epoll) on the two queue notifications, the TAP and a stop
//! eventfd. Frames cross as they are: a TAP opened with `IFF_VNET_HDR` reads and writes the same
//! 12-byte virtio-net header the guest uses, so an RX frame is one `read` into a host buffer and
//! one copy into the guest's chain, a TX frame one copy out of the chain and one `write`.
//!
//! Offloads (checksum, TSO) are not offered. The header path is in place (TUNSETOFFLOAD is the
//! only missing step), but they pay off only for a guest TCP stack moving large segments, and no
//! such guest runs on this project's hosts (PVM: no Linux guest boots; the test guest sends
//! small UDP/ICMP frames), so their gain cannot be measured here and they stay off until it can.
//! Without them every frame is at most [`MAX_FRAME_LEN`] bytes, fully checksummed.
//!
//! A hostile guest cannot stop the device or the VMM: TX chains that are oversized, empty,
//! device-writable or point outside guest memory are dropped and counted ([`NetStats`]); RX
//! chains too small or unwritable lose that one frame (counted); a queue whose avail index runs
//! more than a queue size ahead stops being served until the driver resets the device; at most
//! [`BATCH`] chains are taken per queue per round, so a TX flood cannot starve RX or a pause.
//! The host is not busy-spun either: with no RX buffers posted the TAP is not polled until the
//! driver kicks the RX queue. A TAP that fails (deleted, EIO) only costs frames: TX frames are
//! counted as errors, and reading is retried every [`TAP_RETRY`].
//!
//! Pause (deactivate/activate) keeps the TAP; a restored or forked VM gets a new one (see
//! [`persist`]).

pub mod persist;
pub mod tap;

pub use persist::{MacAddr, NetRestoreError, NetState, NicSpec};
pub use tap::{Tap, TapError};

use super::persist::DeviceState;
use super::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::persist::Persist;
use serde::Serialize;
use std::io::ErrorKind;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Feature bit: the device has a MAC address in config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `struct virtio_net_hdr_v1` (virtio 1.x always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame (without the virtio-net header) either way: the TAP's largest
/// (MTU 65535 + Ethernet and VLAN headers), as Linux and Firecracker use.
pub const MAX_FRAME_LEN: usize = 65550;
/// Smallest TX frame passed on: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;
/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Most chains taken from one queue before the worker looks at its other sources.
pub const BATCH: usize = 64;
/// How long a failing TAP rests before it is read again.
pub const TAP_RETRY: Duration = Duration::from_millis(100);

const RXQ: usize = 0;
const TXQ: usize = 1;
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_TAP: u64 = 3;

/// Frame counters (since the device was created; not saved in snapshots).
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the TAP lost to the guest: its buffer was too small or unwritable.
    pub rx_dropped: AtomicU64,
    /// TAP read failures.
    pub rx_errors: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Malformed TX chains (oversized, too short, device-writable, outside guest memory), and
    /// frames sent while no TAP is attached.
    pub tx_dropped: AtomicU64,
    /// TAP write failures (link down, TAP gone, queue full).
    pub tx_errors: AtomicU64,
    /// Times a queue was found corrupt and left until the driver resets the device.
    pub queue_errors: AtomicU64,
    /// Times the worker woke up (a busy-spinning worker shows here).
    pub wakeups: AtomicU64,
}

/// [`NetStats`] as plain numbers.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_errors: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tx_errors: u64,
    pub queue_errors: u64,
    pub wakeups: u64,
}

impl NetStats {
    pub fn snapshot(&self) -> NetCounters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCounters {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            rx_errors: l(&self.rx_errors),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
            tx_errors: l(&self.tx_errors),
            queue_errors: l(&self.queue_errors),
            wakeups: l(&self.wakeups),
        }
    }
}

fn inc(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The virtio-net device.
pub struct Net {
    mac: MacAddr,
    /// `None`: no host side (a restored VM given no TAP); the guest's frames are dropped.
    tap: Option<Arc<Tap>>,
    stats: Arc<NetStats>,
    worker: Option<(EventFd, std::thread::JoinHandle<Vec<Queue>>)>,
}

impl Net {
    /// A NIC on `spec`'s TAP (opened now) with `spec`'s MAC or a random one.
    pub fn new(spec: &NicSpec) -> Result<Net, TapError> {
        let tap = Tap::open(&spec.tap, spec.netns.as_deref())?;
        Ok(Net::with_tap(
            Some(tap),
            spec.mac.unwrap_or_else(MacAddr::random),
        ))
    }

    /// A NIC over an already open TAP (or packet descriptor).
    pub fn with_tap(tap: Option<Tap>, mac: MacAddr) -> Net {
        Net {
            mac,
            tap: tap.map(Arc::new),
            stats: Arc::new(NetStats::default()),
            worker: None,
        }
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn tap_name(&self) -> Option<&str> {
        self.tap.as_deref().map(Tap::name)
    }

    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], then fields of features not offered.
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.mac.0.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Failed("virtio-net already active".into()));
        }
        if ctx.queues.len() != 2 || ctx.queue_events.len() != 2 {
            return Err(ActivateError::Failed("virtio-net needs 2 queues".into()));
        }
        let fail = |e: std::io::Error| ActivateError::Failed(format!("virtio-net: {e}"));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(fail)?;
        let mut queues = ctx.queues.into_iter();
        let mut events = ctx.queue_events.into_iter();
        let worker = Worker {
            mem: ctx.mem,
            rxq: queues.next().expect("2 queues"),
            txq: queues.next().expect("2 queues"),
            rx_evt: events.next().expect("2 events"),
            tx_evt: events.next().expect("2 events"),
            stop: stop.try_clone().map_err(fail)?,
            interrupt: ctx.interrupt,
            tap: self.tap.clone(),
            stats: self.stats.clone(),
            frame: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
            tx_frame: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
            pending: None,
            broken: [false; 2],
            tap_retry: None,
            more: false,
        };
        let handle = std::thread::Builder::new()
            .name(format!("net-{}", self.tap_name().unwrap_or("none")))
            .spawn(move || worker.run())
            .map_err(fail)?;
        self.worker = Some((stop, handle));
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        let (stop, handle) = self.worker.take()?;
        let _ = stop.write(1);
        match handle.join() {
            Ok(q) => Some(q),
            Err(_) => {
                tracing::error!("virtio-net worker panicked");
                None
            }
        }
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Net(self.save())
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.stats.snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.deactivate();
    }
}

struct Worker {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    stop: EventFd,
    interrupt: Interrupt,
    tap: Option<Arc<Tap>>,
    stats: Arc<NetStats>,
    /// One RX frame with its header, read from the TAP.
    frame: Vec<u8>,
    /// One TX frame with its header, gathered from the guest.
    tx_frame: Vec<u8>,
    /// Length of a frame read from the TAP and waiting in `frame` for an RX buffer.
    pending: Option<usize>,
    /// Queue found corrupt: not served until the driver resets the device.
    broken: [bool; 2],
    /// The TAP failed: not read before this time.
    tap_retry: Option<Instant>,
    /// A queue had more than [`BATCH`] chains: come back without waiting.
    more: bool,
}

impl Worker {
    fn run(mut self) -> Vec<Queue> {
        let epoll = match self.setup_epoll() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "virtio-net worker: epoll");
                return vec![self.rxq, self.txq];
            }
        };
        let mut tap_armed = self.tap.is_some();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            // Work that needs no event: kicks before activation or while paused, batches left.
            self.more = false;
            self.process_tx();
            self.process_rx();
            // Poll the TAP only while a frame read from it has somewhere to go.
            let want_tap = self.tap.is_some()
                && self.pending.is_none()
                && !self.broken[RXQ]
                && self.tap_retry.is_none_or(|t| Instant::now() >= t);
            if want_tap != tap_armed {
                if let Some(t) = &self.tap {
                    let ev = if want_tap {
                        EventSet::IN
                    } else {
                        EventSet::empty()
                    };
                    if let Err(e) = epoll.ctl(
                        ControlOperation::Modify,
                        t.as_raw_fd(),
                        EpollEvent::new(ev, TOKEN_TAP),
                    ) {
                        tracing::warn!(error = %e, "virtio-net: epoll_ctl on the TAP");
                    }
                }
                tap_armed = want_tap;
            }
            let timeout = if self.more {
                0
            } else if let Some(t) = self.tap_retry {
                t.saturating_duration_since(Instant::now())
                    .as_millis()
                    .clamp(1, i32::MAX as u128) as i32
            } else {
                -1
            };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-net worker: epoll_wait; stops");
                    return vec![self.rxq, self.txq];
                }
            };
            inc(&self.stats.wakeups, 1);
            if self.tap_retry.is_some_and(|t| Instant::now() >= t) {
                self.tap_retry = None;
            }
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_RX => {
                        let _ = self.rx_evt.read();
                    }
                    TOKEN_TX => {
                        let _ = self.tx_evt.read();
                    }
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        // Hand the queues back with the guest's TX chains consumed.
                        self.process_tx();
                        return vec![self.rxq, self.txq];
                    }
                    _ => {}
                }
            }
        }
    }

    fn setup_epoll(&self) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let mut fds = vec![
            (self.rx_evt.as_raw_fd(), TOKEN_RX),
            (self.tx_evt.as_raw_fd(), TOKEN_TX),
            (self.stop.as_raw_fd(), TOKEN_STOP),
        ];
        if let Some(t) = &self.tap {
            fds.push((t.as_raw_fd(), TOKEN_TAP));
        }
        for (fd, token) in fds {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(epoll)
    }

    /// Whether queue `qi` can be served: a driver that moves avail.idx more than a queue size
    /// ahead is broken (the ring's contents are meaningless), so the queue is left until reset.
    fn queue_ok(&mut self, qi: usize) -> bool {
        if self.broken[qi] {
            return false;
        }
        let q = if qi == RXQ { &self.rxq } else { &self.txq };
        if !q.ready() {
            return false; // the driver did not set this queue up: nothing to serve
        }
        let ok = match q.avail_idx(&self.mem, Ordering::Acquire) {
            Ok(avail) => (avail - Wrapping(q.next_avail())).0 <= q.size(),
            Err(_) => false,
        };
        if !ok {
            tracing::warn!(
                queue = qi,
                "virtio-net: corrupt queue; not served until the driver resets the device"
            );
            inc(&self.stats.queue_errors, 1);
            self.broken[qi] = true;
        }
        ok
    }

    /// Sends up to [`BATCH`] frames the guest queued.
    fn process_tx(&mut self) {
        let mut used = false;
        let mut n = 0;
        while self.queue_ok(TXQ) {
            if n == BATCH {
                self.more = true;
                break;
            }
            // Kicks are not needed while we are taking chains anyway.
            let _ = self.txq.disable_notification(&self.mem);
            let Some(chain) = self.txq.pop_descriptor_chain(&self.mem) else {
                match self.txq.enable_notification(&self.mem) {
                    Ok(true) => continue, // published meanwhile
                    _ => break,
                }
            };
            n += 1;
            let head = chain.head_index();
            let mut len = 0usize;
            let mut ok = true;
            let mut ends = false;
            for d in chain {
                let dl = d.len() as usize;
                // A chain cut short (looping, `next` out of range) still has NEXT set here.
                ends = !d.has_next();
                if d.is_write_only() || len + dl > self.tx_frame.len() {
                    ok = false;
                    break;
                }
                if self
                    .mem
                    .read_slice(&mut self.tx_frame[len..len + dl], d.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
                len += dl;
            }
            if self.txq.add_used(&self.mem, head, 0).is_ok() {
                used = true;
            }
            if !ok || !ends || len < VNET_HDR_LEN + MIN_FRAME_LEN {
                inc(&self.stats.tx_dropped, 1);
                continue;
            }
            // No offloads were offered: whatever the guest put in the header, the frame is sent
            // as a plain, complete one.
            self.tx_frame[..VNET_HDR_LEN].fill(0);
            let Some(tap) = &self.tap else {
                inc(&self.stats.tx_dropped, 1);
                continue;
            };
            match tap.write(&self.tx_frame[..len]) {
                Ok(_) => {
                    inc(&self.stats.tx_frames, 1);
                    inc(&self.stats.tx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Err(e) => {
                    if self.stats.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(tap = tap.name(), error = %e, "virtio-net: TAP write failed (further failures are only counted)");
                    }
                }
            }
        }
        if used {
            signal_used(&self.mem, &self.txq, &self.interrupt);
        }
    }

    /// Moves frames from the TAP into the guest's RX buffers (up to [`BATCH`]).
    fn process_rx(&mut self) {
        let mut used = false;
        for _ in 0..BATCH {
            if !self.queue_ok(RXQ) {
                break;
            }
            if self.pending.is_none() && !self.read_tap() {
                break;
            }
            let len = self.pending.expect("a frame is pending");
            let Some(chain) = self.rxq.pop_descriptor_chain(&self.mem) else {
                // No buffer: wait for the driver's kick (asked for here), TAP unpolled.
                match self.rxq.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            // While buffers last, refills need no kick.
            let _ = self.rxq.disable_notification(&self.mem);
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let cap: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
            let mut written = 0usize;
            let ends = descs.last().is_some_and(|d| !d.has_next());
            let mut ok = ends && descs.iter().all(|d| d.is_write_only()) && cap >= len as u64;
            if ok {
                for d in &descs {
                    if written == len {
                        break;
                    }
                    let k = (d.len() as usize).min(len - written);
                    if self
                        .mem
                        .write_slice(&self.frame[written..written + k], d.addr())
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                    written += k;
                }
            }
            self.pending = None;
            if self
                .rxq
                .add_used(&self.mem, head, if ok { len as u32 } else { 0 })
                .is_ok()
            {
                used = true;
            }
            if ok {
                inc(&self.stats.rx_frames, 1);
                inc(&self.stats.rx_bytes, (len - VNET_HDR_LEN) as u64);
            } else {
                inc(&self.stats.rx_dropped, 1);
            }
        }
        if used {
            signal_used(&self.mem, &self.rxq, &self.interrupt);
        }
    }

    /// Reads one frame from the TAP into `frame` (as the guest will see it). Returns false if
    /// there is none (or no TAP, or it is resting after a failure).
    fn read_tap(&mut self) -> bool {
        let Some(tap) = &self.tap else {
            return false;
        };
        if self.tap_retry.is_some() {
            return false;
        }
        loop {
            match tap.read(&mut self.frame) {
                Ok(n) if n >= VNET_HDR_LEN => {
                    // No offloads: a plain frame; num_buffers is 1 without MRG_RXBUF.
                    self.frame[..10].fill(0);
                    self.frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    self.pending = Some(n);
                    return true;
                }
                Ok(_) => {
                    inc(&self.stats.rx_errors, 1);
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    if self.stats.rx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(tap = tap.name(), error = %e, "virtio-net: TAP read failed; retrying every {TAP_RETRY:?}");
                    }
                    self.tap_retry = Some(Instant::now() + TAP_RETRY);
                    return false;
                }
            }
        }
    }
}

/// Interrupts the driver unless it suppressed interrupts (VRING_AVAIL_F_NO_INTERRUPT: a polling
/// driver's TX queue; an idle one keeps them on its RX queue to be woken).
fn signal_used(mem: &GuestMemoryMmap, q: &Queue, interrupt: &Interrupt) {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    let flags: u16 = mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
    if flags & VRING_AVAIL_F_NO_INTERRUPT == 0 {
        interrupt.signal_used_queue();
    }
}

#[cfg(test)]
mod tests;
