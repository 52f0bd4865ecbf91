//! The vsock worker: moves packets between the virtqueues and host Unix sockets.
//!
//! Flow control follows the virtio-vsock credit scheme: the guest tells us its receive buffer
//! (`buf_alloc`) and how much of it it consumed (`fwd_cnt`); we never queue more unconsumed bytes
//! than that, and stop reading the host socket while the guest has no room. In the other
//! direction we advertise [`BUF_ALLOC`] per connection and count bytes as consumed once they are
//! written to the host socket; a guest that overruns it gets its connection reset.

use super::packet::*;
use crate::devices::virtio::{ActivateContext, Interrupt};
use crate::memory::GuestMemoryMmap;
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Receive buffer we advertise per connection (bytes from the guest not yet written to the host).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload accepted in one guest packet.
const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Most packets waiting for guest rx buffers before host sockets stop being read.
const MAX_RX_BACKLOG: usize = 512;
const MAX_CONNS: usize = 1024;
/// First host-side port given to host-initiated connections (as Firecracker).
const FIRST_HOST_PORT: u32 = 1 << 30;
const MAX_CONNECT_LINE: usize = 64;
/// How long host CONNECTs wait for the guest to acknowledge a transport reset (see
/// [`ResetAck`]) before they go ahead anyway (a driver that never reposts event buffers).
const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(2);

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const TOKEN_CONN_BASE: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host connected to the Unix socket; waiting for its `CONNECT <port>` line.
    AwaitConnect,
    /// REQUEST sent to the guest; waiting for RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// Host-side port (our end) and guest port.
    local_port: u32,
    peer_port: u32,
    connect_line: Vec<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes queued towards the guest so far.
    rx_cnt: u32,
    /// Bytes from the guest written to the host socket so far, and the last value told to it.
    fwd_cnt: u32,
    fwd_sent: u32,
    /// Bytes from the guest waiting for the host socket to accept them.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are our `OK <port>` line, not guest data (not credited).
    preamble: usize,
    /// SHUTDOWN flags the guest sent so far (they accumulate). SEND: once `to_host` drains the
    /// host socket's write side is shut (its reader sees end of stream) while host bytes still
    /// flow to the guest; RCV: the host socket is no longer read; both: the connection ends
    /// once `to_host` drains.
    guest_shut: u32,
    /// `shutdown(Write)` was done on the host socket.
    host_write_shut: bool,
    credit_requested: bool,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            connect_line: Vec::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_sent: 0,
            to_host: VecDeque::new(),
            preamble: 0,
            guest_shut: 0,
            host_write_shut: false,
            credit_requested: false,
            interest: EventSet::empty(),
        }
    }

    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A packet waiting for a guest rx buffer.
struct RxPkt {
    hdr: Header,
    payload: Vec<u8>,
    /// Sent bytes of `payload` (an RW packet larger than one rx buffer goes out in pieces).
    sent: usize,
}

/// Where a transport reset (sent to a restored guest) stands. Until the guest has handled it,
/// host CONNECTs stay unread in their sockets: a driver that polls its rx queue before its event
/// queue would otherwise accept the new connection and then drop it with the reset. The guest
/// shows it handled the event by posting a fresh event buffer (the event queue's avail index
/// moves), as Linux and the kiln test guest do right after handling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetAck {
    Done,
    /// The event is not delivered yet (no event buffer posted).
    AwaitDelivery {
        deadline: Instant,
    },
    /// Delivered when the event queue's avail index was `avail`.
    AwaitRepost {
        avail: Wrapping<u16>,
        deadline: Instant,
    },
}

/// Connection state that survives deactivation (pause).
pub struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    /// (host port, guest port) -> connection key.
    by_ports: HashMap<(u32, u32), u64>,
    next_key: u64,
    next_host_port: u32,
    rx_backlog: VecDeque<RxPkt>,
    reset_ack: ResetAck,
}

impl Muxer {
    pub fn new(cid: u64, uds_path: PathBuf, listener: UnixListener) -> Muxer {
        Muxer {
            cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_key: TOKEN_CONN_BASE,
            next_host_port: FIRST_HOST_PORT,
            rx_backlog: VecDeque::new(),
            reset_ack: ResetAck::Done,
        }
    }

    /// Host CONNECTs wait (see [`ResetAck`]).
    fn connects_held(&self) -> bool {
        self.reset_ack != ResetAck::Done
    }

    fn hdr(&self, c: Option<&Conn>, src_port: u32, dst_port: u32, op: u16, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.map_or(0, |c| c.fwd_cnt),
        }
    }

    fn queue_ctrl(&mut self, key: Option<u64>, src_port: u32, dst_port: u32, op: u16, flags: u32) {
        let c = key.and_then(|k| self.conns.get(&k));
        let hdr = self.hdr(c, src_port, dst_port, op, flags);
        self.rx_backlog.push_back(RxPkt {
            hdr,
            payload: Vec::new(),
            sent: 0,
        });
    }

    fn rst(&mut self, src_port: u32, dst_port: u32) {
        self.queue_ctrl(None, src_port, dst_port, OP_RST, 0);
    }

    fn remove(&mut self, key: u64, epoll: &Epoll) {
        if let Some(c) = self.conns.remove(&key) {
            if !c.interest.is_empty() {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.by_ports.remove(&(c.local_port, c.peer_port));
        }
    }

    /// Resets a connection from our side: RST to the guest, host socket closed.
    fn reset_conn(&mut self, key: u64, epoll: &Epoll) {
        if let Some(c) = self.conns.get(&key) {
            if c.state != ConnState::AwaitConnect {
                let (l, p) = (c.local_port, c.peer_port);
                self.rst(l, p);
            }
        }
        self.remove(key, epoll);
    }

    fn alloc_host_port(&mut self) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.by_ports.keys().any(|(l, _)| *l == p) {
                return p;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNS || stream.set_nonblocking(true).is_err() {
                        tracing::warn!("vsock: too many connections; refusing a host connection");
                        continue;
                    }
                    let key = self.next_key;
                    self.next_key += 1;
                    self.conns
                        .insert(key, Conn::new(stream, ConnState::AwaitConnect, 0, 0));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    /// The host side of a connection is readable (or hung up).
    fn host_readable(&mut self, key: u64, epoll: &Epoll) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        match c.state {
            ConnState::AwaitConnect => {
                let mut b = [0u8; MAX_CONNECT_LINE];
                let room = MAX_CONNECT_LINE - c.connect_line.len();
                // Read byte-wise up to the newline so no payload byte is swallowed.
                let mut got_line = false;
                for _ in 0..room {
                    match c.stream.read(&mut b[..1]) {
                        Ok(0) => {
                            self.remove(key, epoll);
                            return;
                        }
                        Ok(_) if b[0] == b'\n' => {
                            got_line = true;
                            break;
                        }
                        Ok(_) => c.connect_line.push(b[0]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                        Err(_) => {
                            self.remove(key, epoll);
                            return;
                        }
                    }
                }
                let port = if got_line {
                    parse_connect(&c.connect_line)
                } else {
                    None
                };
                let Some(port) = port else {
                    let _ = c.stream.write_all(b"ERR bad CONNECT line\n");
                    self.remove(key, epoll);
                    return;
                };
                let local = self.alloc_host_port();
                let c = self.conns.get_mut(&key).expect("present");
                c.local_port = local;
                c.peer_port = port;
                c.state = ConnState::Connecting;
                self.by_ports.insert((local, port), key);
                self.queue_ctrl(Some(key), local, port, OP_REQUEST, 0);
            }
            ConnState::Connecting => {}
            ConnState::Established => {
                let free = c.peer_free() as usize;
                if free == 0 {
                    if !c.credit_requested {
                        c.credit_requested = true;
                        let (l, p) = (c.local_port, c.peer_port);
                        self.queue_ctrl(Some(key), l, p, OP_CREDIT_REQUEST, 0);
                    }
                    return;
                }
                let mut buf = vec![0u8; free.min(MAX_PKT_PAYLOAD)];
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        // Host closed: tell the guest, forget the connection.
                        let (l, p) = (c.local_port, c.peer_port);
                        self.queue_ctrl(Some(key), l, p, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                        self.remove(key, epoll);
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                        let (l, p) = (c.local_port, c.peer_port);
                        let mut hdr = self.hdr(None, l, p, OP_RW, 0);
                        hdr.len = n as u32;
                        self.rx_backlog.push_back(RxPkt {
                            hdr,
                            payload: buf,
                            sent: 0,
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => self.reset_conn(key, epoll),
                }
            }
        }
    }

    /// Writes pending guest bytes to the host socket.
    fn host_writable(&mut self, key: u64, epoll: &Epoll) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    let ours = n.min(c.preamble);
                    c.preamble -= ours;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset_conn(key, epoll);
                    return;
                }
            }
        }
        if c.to_host.is_empty() && c.guest_shut & SHUTDOWN_SEND != 0 {
            if c.guest_shut & SHUTDOWN_RCV != 0 {
                let (l, p) = (c.local_port, c.peer_port);
                self.rst(l, p);
                self.remove(key, epoll);
                return;
            }
            if !c.host_write_shut {
                c.host_write_shut = true;
                if c.stream.shutdown(std::net::Shutdown::Write).is_err() {
                    self.reset_conn(key, epoll);
                }
            }
            return;
        }
        // Reopen the guest's window before it runs dry.
        if c.fwd_cnt.wrapping_sub(c.fwd_sent) >= BUF_ALLOC / 4 {
            let (l, p) = (c.local_port, c.peer_port);
            self.queue_ctrl(Some(key), l, p, OP_CREDIT_UPDATE, 0);
        }
    }

    /// One packet from the guest's tx queue.
    fn guest_packet(&mut self, hdr: Header, payload: &[u8], epoll: &Epoll) {
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(?hdr, "vsock: dropping packet with wrong CIDs");
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.rst(hdr.dst_port, hdr.src_port);
            }
            return;
        }
        let key = self.by_ports.get(&(hdr.dst_port, hdr.src_port)).copied();
        if let Some(c) = key.and_then(|k| self.conns.get_mut(&k)) {
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = hdr.fwd_cnt;
            c.credit_requested = false;
        }
        match (hdr.op, key) {
            (OP_REQUEST, None) => self.guest_connect(hdr),
            (OP_RESPONSE, Some(k)) if self.conns[&k].state == ConnState::Connecting => {
                let c = self.conns.get_mut(&k).expect("present");
                c.state = ConnState::Established;
                let reply = format!("OK {}\n", c.local_port);
                // Written ahead of any data: the host reads it before the stream's bytes.
                c.to_host.extend(reply.as_bytes());
                c.preamble = reply.len();
                self.host_writable(k, epoll);
            }
            (OP_RW, Some(k)) if self.conns[&k].state == ConnState::Established => {
                let c = self.conns.get_mut(&k).expect("present");
                if c.guest_shut & SHUTDOWN_SEND != 0 {
                    tracing::debug!("vsock: data after the guest shut down sending; resetting");
                    self.reset_conn(k, epoll);
                    return;
                }
                if c.to_host.len() - c.preamble + payload.len() > BUF_ALLOC as usize {
                    tracing::debug!("vsock: guest overran its credit; resetting the connection");
                    self.reset_conn(k, epoll);
                    return;
                }
                c.to_host.extend(payload);
                self.host_writable(k, epoll);
            }
            (OP_CREDIT_UPDATE, Some(_)) => {}
            (OP_CREDIT_REQUEST, Some(k)) => {
                self.queue_ctrl(Some(k), hdr.dst_port, hdr.src_port, OP_CREDIT_UPDATE, 0)
            }
            (OP_SHUTDOWN, Some(k)) => {
                let c = self.conns.get_mut(&k).expect("present");
                c.guest_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.host_writable(k, epoll);
            }
            (OP_RST, Some(k)) => self.remove(k, epoll),
            (OP_RST, None) => {}
            (_, Some(k)) => self.reset_conn(k, epoll),
            (_, None) => self.rst(hdr.dst_port, hdr.src_port),
        }
    }

    /// Guest connects to host port `hdr.dst_port`: connect to `<uds>_<port>`.
    fn guest_connect(&mut self, hdr: Header) {
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = if self.conns.len() >= MAX_CONNS {
            None
        } else {
            UnixStream::connect(&path)
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .map_err(
                    |e| tracing::debug!(path = ?path, error = %e, "vsock: guest connect failed"),
                )
                .ok()
        };
        let Some(stream) = stream else {
            self.rst(hdr.dst_port, hdr.src_port);
            return;
        };
        let key = self.next_key;
        self.next_key += 1;
        let mut c = Conn::new(stream, ConnState::Established, hdr.dst_port, hdr.src_port);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        self.conns.insert(key, c);
        self.by_ports.insert((hdr.dst_port, hdr.src_port), key);
        self.queue_ctrl(Some(key), hdr.dst_port, hdr.src_port, OP_RESPONSE, 0);
    }

    /// Brings every connection's epoll registration in line with what it can do now.
    fn update_interest(&mut self, epoll: &Epoll) {
        let backlog_full = self.rx_backlog.len() >= MAX_RX_BACKLOG;
        let held = self.connects_held();
        let mut dead = Vec::new();
        for (&key, c) in self.conns.iter_mut() {
            let mut want = EventSet::empty();
            let readable = match c.state {
                ConnState::AwaitConnect => !held,
                ConnState::Connecting => false,
                ConnState::Established => !backlog_full && c.peer_free() > 0,
            };
            if readable && c.guest_shut & SHUTDOWN_RCV == 0 {
                want |= EventSet::IN;
            }
            if !c.to_host.is_empty() {
                want |= EventSet::OUT;
            }
            if want == c.interest {
                continue;
            }
            let fd = c.stream.as_raw_fd();
            let r = if want.is_empty() {
                epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
            } else if c.interest.is_empty() {
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(want, key))
            } else {
                epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(want, key))
            };
            match r {
                Ok(()) => c.interest = want,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: epoll_ctl failed; dropping connection");
                    dead.push(key);
                }
            }
        }
        for k in dead {
            if let Some(c) = self.conns.get_mut(&k) {
                c.interest = EventSet::empty();
            }
            self.reset_conn(k, epoll);
        }
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    s.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// The running device: queues plus the muxer, owned by the worker thread.
pub struct Worker {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    interrupt: Interrupt,
    muxer: Muxer,
    stop: EventFd,
    epoll: Epoll,
    send_reset_event: bool,
}

impl Worker {
    pub fn new(
        ctx: ActivateContext,
        muxer: Muxer,
        stop: EventFd,
        send_reset_event: bool,
    ) -> Result<Worker, (std::io::Error, Box<Muxer>)> {
        let setup = || -> std::io::Result<Epoll> {
            let epoll = Epoll::new()?;
            for (i, e) in ctx.queue_events.iter().enumerate() {
                epoll.ctl(
                    ControlOperation::Add,
                    e.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )?;
            }
            epoll.ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )?;
            epoll.ctl(
                ControlOperation::Add,
                muxer.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )?;
            Ok(epoll)
        };
        let epoll = match setup() {
            Ok(e) => e,
            Err(e) => return Err((e, Box::new(muxer))),
        };
        let mut muxer = muxer;
        // Paused before the event went out: send it now.
        let send_reset_event =
            send_reset_event || matches!(muxer.reset_ack, ResetAck::AwaitDelivery { .. });
        if send_reset_event {
            muxer.reset_ack = ResetAck::AwaitDelivery {
                deadline: Instant::now() + RESET_ACK_TIMEOUT,
            };
        }
        // Connections were registered with a previous epoll instance.
        for c in muxer.conns.values_mut() {
            c.interest = EventSet::empty();
        }
        Ok(Worker {
            mem: ctx.mem,
            queues: ctx.queues,
            events: ctx.queue_events,
            interrupt: ctx.interrupt,
            muxer,
            stop,
            epoll,
            send_reset_event,
        })
    }

    pub fn into_parts(self) -> (Muxer, Vec<Queue>) {
        (self.muxer, self.queues)
    }

    pub fn run(mut self) -> Worker {
        let mut events = vec![EpollEvent::default(); 64];
        // Work the driver queued before activation (or while paused).
        self.process_tx();
        self.process_events_queue();
        self.process_rx();
        loop {
            self.check_reset_ack();
            self.muxer.update_interest(&self.epoll);
            let timeout = match self.muxer.reset_ack {
                ResetAck::Done => -1,
                ResetAck::AwaitDelivery { deadline } | ResetAck::AwaitRepost { deadline, .. } => {
                    deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis()
                        .clamp(1, i32::MAX as u128) as i32
                }
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock: epoll_wait failed; worker stops");
                    return self;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    t if t == RXQ as u64 || t == TXQ as u64 || t == EVQ as u64 => {
                        let _ = self.events[t as usize].read();
                    }
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        // Hand back the queues with everything the guest sent so far consumed.
                        self.process_tx();
                        self.process_rx();
                        return self;
                    }
                    TOKEN_LISTENER => self.muxer.accept(),
                    key => {
                        let set = ev.event_set();
                        if set.intersects(EventSet::OUT) {
                            self.muxer.host_writable(key, &self.epoll);
                        }
                        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                            self.muxer.host_readable(key, &self.epoll);
                        }
                    }
                }
            }
            self.process_tx();
            self.process_events_queue();
            self.process_rx();
        }
    }

    /// Consumes every packet the guest queued for transmission.
    fn process_tx(&mut self) {
        let mut used = false;
        while let Some(chain) = self.queues[TXQ].pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut buf = Vec::new();
            let mut ok = true;
            for d in chain {
                if d.is_write_only() {
                    ok = false; // device-writable buffers have no place in a tx chain
                    break;
                }
                let len = d.len() as usize;
                if buf.len() + len > HDR_SIZE + MAX_PKT_PAYLOAD {
                    ok = false;
                    break;
                }
                let start = buf.len();
                buf.resize(start + len, 0);
                if self.mem.read_slice(&mut buf[start..], d.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            if let Err(e) = self.queues[TXQ].add_used(&self.mem, head, 0) {
                tracing::debug!(error = ?e, "vsock: add_used (tx) failed");
            }
            used = true;
            let hdr = match Header::parse(&buf) {
                Some(h) if ok && h.len as usize <= buf.len() - HDR_SIZE => h,
                Some(h) => {
                    tracing::debug!(?h, "vsock: malformed tx packet");
                    // Unreadable or inconsistent: reset the connection it claims to belong to.
                    if h.op != OP_RST && h.src_cid == self.muxer.cid {
                        if let Some(k) = self.muxer.by_ports.get(&(h.dst_port, h.src_port)).copied()
                        {
                            self.muxer.reset_conn(k, &self.epoll);
                        }
                    }
                    continue;
                }
                None => continue,
            };
            let payload = &buf[HDR_SIZE..HDR_SIZE + hdr.len as usize];
            self.muxer.guest_packet(hdr, payload, &self.epoll);
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }

    /// Delivers queued packets into the guest's rx buffers.
    fn process_rx(&mut self) {
        let mut used = false;
        while !self.muxer.rx_backlog.is_empty() {
            let Some(chain) = self.queues[RXQ].pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let cap: usize = if descs.iter().all(|d| d.is_write_only()) {
                descs.iter().map(|d| d.len() as usize).sum()
            } else {
                0
            };
            if cap < HDR_SIZE {
                // Unusable buffer: return it empty and keep the packet for the next one.
                let _ = self.queues[RXQ].add_used(&self.mem, head, 0);
                used = true;
                continue;
            }
            let pkt = self.muxer.rx_backlog.front_mut().expect("non-empty");
            let rest = pkt.payload.len() - pkt.sent;
            let n = rest.min(cap - HDR_SIZE);
            let mut hdr = pkt.hdr;
            hdr.len = n as u32;
            // Credit fields are filled at delivery time so the guest sees current values.
            let key = self
                .muxer
                .by_ports
                .get(&(hdr.src_port, hdr.dst_port))
                .copied();
            if let Some(c) = key.and_then(|k| self.muxer.conns.get_mut(&k)) {
                hdr.fwd_cnt = c.fwd_cnt;
                c.fwd_sent = c.fwd_cnt;
            }
            let mut bytes = Vec::with_capacity(HDR_SIZE + n);
            bytes.extend_from_slice(&hdr.to_bytes());
            bytes.extend_from_slice(&pkt.payload[pkt.sent..pkt.sent + n]);
            let mut off = 0;
            let mut write_ok = true;
            for d in &descs {
                if off == bytes.len() {
                    break;
                }
                let k = (d.len() as usize).min(bytes.len() - off);
                if self
                    .mem
                    .write_slice(&bytes[off..off + k], d.addr())
                    .is_err()
                {
                    write_ok = false;
                    break;
                }
                off += k;
            }
            let _ =
                self.queues[RXQ].add_used(&self.mem, head, if write_ok { off as u32 } else { 0 });
            used = true;
            if !write_ok {
                // The guest's buffer points outside its memory: this connection's stream is now
                // broken, so reset it (a control packet is simply retried with the next buffer).
                if pkt.hdr.op == OP_RW {
                    self.muxer.rx_backlog.pop_front();
                    if let Some(k) = key {
                        self.muxer.reset_conn(k, &self.epoll);
                    }
                }
                continue;
            }
            pkt.sent += n;
            if pkt.sent >= pkt.payload.len() {
                self.muxer.rx_backlog.pop_front();
            }
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }

    fn process_events_queue(&mut self) {
        if !self.send_reset_event {
            return;
        }
        if let Some(chain) = self.queues[EVQ].pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut written = 0;
            if let Some(d) = chain
                .into_iter()
                .find(|d| d.is_write_only() && d.len() >= 4)
            {
                if self
                    .mem
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                    .is_ok()
                {
                    written = 4;
                }
            }
            // Read before the guest can see the event: a polling guest may repost its buffer
            // right after add_used, and that repost must count as the acknowledgement.
            let avail = self.queues[EVQ].avail_idx(&self.mem, Ordering::Acquire);
            let _ = self.queues[EVQ].add_used(&self.mem, head, written);
            self.send_reset_event = false;
            self.muxer.reset_ack = match avail {
                Ok(avail) => ResetAck::AwaitRepost {
                    avail,
                    deadline: Instant::now() + RESET_ACK_TIMEOUT,
                },
                Err(_) => ResetAck::Done,
            };
            self.interrupt.signal_used_queue();
        }
    }

    /// Releases held host CONNECTs once the guest handled the transport reset (or timed out).
    fn check_reset_ack(&mut self) {
        let done = match self.muxer.reset_ack {
            ResetAck::Done => return,
            ResetAck::AwaitDelivery { deadline } => Instant::now() >= deadline,
            ResetAck::AwaitRepost { avail, deadline } => {
                Instant::now() >= deadline
                    || self.queues[EVQ]
                        .avail_idx(&self.mem, Ordering::Acquire)
                        .map_or(true, |a| a != avail)
            }
        };
        if done {
            tracing::debug!(state = ?self.muxer.reset_ack, "vsock: host connects proceed after the transport reset");
            self.muxer.reset_ack = ResetAck::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_line_parsing_is_strict() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
