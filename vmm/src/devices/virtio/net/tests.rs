//! virtio-net with hand-built split queues in real guest memory and a datagram socket pair in
//! place of the TAP (same one-frame-per-read semantics): frames both ways, and a misbehaving
//! driver whose chains are dropped and counted while the device keeps working.

use super::*;
use crate::devices::virtio::ActivateContext;
use std::os::fd::{FromRawFd, OwnedFd};
use vm_memory::{Address, GuestAddress};

const MEM: usize = 4 << 20;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Ring bases per queue (desc, avail, used).
const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x2000, 0x3000), (0x5000, 0x6000, 0x7000)];
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;

struct Rig {
    mem: GuestMemoryMmap,
    net: Net,
    host: OwnedFd,
    kicks: Vec<EventFd>,
    avail: [u16; 2],
    stats: Arc<NetStats>,
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into the array, which we then own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Rig {
    fn new() -> Rig {
        Rig::build(true)
    }

    /// `tx_ready: false`: the driver never enabled the TX queue.
    fn build(tx_ready: bool) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("pair{}", N.fetch_add(1, Ordering::Relaxed));
        let (dev, host) = socketpair();
        let mut net = Net::with_tap(
            Some(Tap::from_fd(dev, &name)),
            "02:00:00:00:00:07".parse().unwrap(),
        );
        let stats = net.stats();
        let mut kicks = Vec::new();
        let mut events = Vec::new();
        for _ in 0..2 {
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            events.push(e.try_clone().unwrap());
            kicks.push(e);
        }
        let queues = RINGS
            .iter()
            .map(|&(d, a, u)| {
                let mut q = Queue::new(QSIZE).unwrap();
                q.set_size(QSIZE);
                q.set_desc_table_address(Some(d as u32), Some(0));
                q.set_avail_ring_address(Some(a as u32), Some(0));
                q.set_used_ring_address(Some(u as u32), Some(0));
                q.set_ready(d == RINGS[RXQ].0 || tx_ready);
                q
            })
            .collect();
        net.activate(ActivateContext {
            mem: mem.clone(),
            queues,
            queue_events: events,
            interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            acked_features: VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC,
        })
        .unwrap();
        Rig {
            mem,
            net,
            host,
            kicks,
            avail: [0; 2],
            stats,
        }
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(RINGS[q].0 + u64::from(i) * 16);
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, a.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    fn publish(&mut self, q: usize, head: u16) {
        let slot = u64::from(self.avail[q] % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(RINGS[q].1 + 4 + slot * 2))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.set_avail_idx(q, self.avail[q]);
    }

    fn set_avail_idx(&self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(RINGS[q].1 + 2))
            .unwrap();
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(RINGS[q].2 + 2)).unwrap()
    }

    fn used(&self, q: usize, n: u16) -> (u32, u32) {
        let a = RINGS[q].2 + 4 + u64::from(n % QSIZE) * 8;
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    fn wait_used(&self, q: usize, n: u16) {
        let t = Instant::now();
        while self.used_idx(q) < n {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "queue {q}: {} used, waiting for {n}",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// RX buffer `i`: one device-writable descriptor of `len` bytes.
    fn post_rx(&mut self, i: u16, len: u32) {
        self.desc(RXQ, i, RX_BUFS + u64::from(i) * 0x1_0000, len, F_WRITE, 0);
        self.publish(RXQ, i);
    }

    fn host_send(&self, frame: &[u8]) {
        // SAFETY: sends from a valid buffer.
        let n = unsafe { libc::send(self.host.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n as usize, frame.len());
    }

    fn host_recv(&self) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 70000];
        let t = Instant::now();
        loop {
            // SAFETY: receives into a valid buffer.
            let n = unsafe { libc::recv(self.host.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) };
            if n >= 0 {
                b.truncate(n as usize);
                return Some(b);
            }
            if t.elapsed() > Duration::from_millis(500) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A TX frame of `payload` after a (garbage) header, split over two descriptors.
    fn send_tx(&mut self, head: u16, payload: &[u8]) {
        let base = TX_BUFS + u64::from(head) * 0x1_0000;
        self.mem
            .write_slice(&[0xee; VNET_HDR_LEN], GuestAddress(base))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(base + 0x100))
            .unwrap();
        self.desc(TXQ, head, base, VNET_HDR_LEN as u32, F_NEXT, head + 1);
        self.desc(TXQ, head + 1, base + 0x100, payload.len() as u32, 0, 0);
        self.publish(TXQ, head);
        self.kick(TXQ);
    }
}

fn frame(n: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(seed)).collect();
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 7]);
    f
}

fn with_hdr(f: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v.extend_from_slice(f);
    v
}

#[test]
fn config_space_has_the_mac() {
    let rig = Rig::new();
    let mut b = [0u8; 8];
    rig.net.read_config(0, &mut b);
    assert_eq!(b, [2, 0, 0, 0, 0, 7, 0, 0]);
    let mut one = [0u8; 1];
    rig.net.read_config(5, &mut one);
    assert_eq!(one, [7]);
    rig.net.read_config(u64::MAX, &mut one);
    assert_eq!(one, [0]);
    assert_eq!(
        rig.net.avail_features() & VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MAC
    );
}

#[test]
fn frames_both_ways() {
    let mut rig = Rig::new();
    // RX: the frame lands in the posted buffer behind a header with num_buffers = 1.
    rig.post_rx(0, 2048);
    rig.kick(RXQ);
    let f = frame(100, 3);
    let mut with_junk_hdr = vec![0x55u8; VNET_HDR_LEN];
    with_junk_hdr.extend_from_slice(&f);
    rig.host_send(&with_junk_hdr);
    rig.wait_used(RXQ, 1);
    let (id, len) = rig.used(RXQ, 0);
    assert_eq!((id, len as usize), (0, VNET_HDR_LEN + f.len()));
    let mut got = vec![0u8; len as usize];
    rig.mem.read_slice(&mut got, GuestAddress(RX_BUFS)).unwrap();
    let mut want = with_hdr(&f);
    want[10] = 1;
    assert_eq!(got, want);

    // TX: gathered from two descriptors; the guest's header is replaced by a plain one.
    let f2 = frame(60, 5);
    rig.send_tx(0, &f2);
    assert_eq!(rig.host_recv().unwrap(), with_hdr(&f2));
    rig.wait_used(TXQ, 1);
    let s = rig.stats.snapshot();
    assert_eq!((s.rx_frames, s.tx_frames), (1, 1));
    assert_eq!(s.tx_bytes, 60);
}

#[test]
fn frames_wait_for_rx_buffers() {
    let mut rig = Rig::new();
    for i in 0..3u8 {
        rig.host_send(&with_hdr(&frame(64, i + 1)));
    }
    // The worker sleeps until a kick instead of spinning on the readable TAP.
    let w0 = rig.stats.snapshot().wakeups;
    std::thread::sleep(Duration::from_millis(300));
    let woke = rig.stats.snapshot().wakeups - w0;
    assert!(
        woke <= 1,
        "worker woke {woke} times in 300 ms with no RX buffers"
    );
    assert_eq!(rig.used_idx(RXQ), 0);
    // Buffers posted with a kick: every frame arrives, in order.
    for i in 0..3 {
        rig.post_rx(i, 2048);
    }
    rig.kick(RXQ);
    rig.wait_used(RXQ, 3);
    for i in 0..3u16 {
        let (id, _) = rig.used(RXQ, i);
        let mut got = vec![0u8; 64];
        rig.mem
            .read_slice(
                &mut got,
                GuestAddress(RX_BUFS + u64::from(id) * 0x1_0000 + 12),
            )
            .unwrap();
        assert_eq!(got, frame(64, i as u8 + 1));
    }
}

#[test]
fn bad_rx_buffers_lose_only_their_frame() {
    let mut rig = Rig::new();
    // Too small, device-readable, outside guest memory.
    rig.post_rx(0, 20);
    rig.desc(RXQ, 1, RX_BUFS, 2048, 0, 0);
    rig.publish(RXQ, 1);
    rig.desc(RXQ, 2, 1 << 40, 2048, F_WRITE, 0);
    rig.publish(RXQ, 2);
    rig.post_rx(3, 2048);
    rig.kick(RXQ);
    for i in 0..4u8 {
        rig.host_send(&with_hdr(&frame(100, i + 1)));
    }
    rig.wait_used(RXQ, 4);
    for i in 0..3 {
        assert_eq!(rig.used(RXQ, i).1, 0, "bad buffer {i} returned empty");
    }
    assert_eq!(rig.used(RXQ, 3), (3, 112));
    let s = rig.stats.snapshot();
    assert_eq!((s.rx_dropped, s.rx_frames), (3, 1));
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mut rig = Rig::new();
    let base = TX_BUFS;
    // 0: outside guest memory. 1: device-writable. 2: larger than any frame (two 64 KiB
    // descriptors). 3: zero length. 4: only a header. 5: a chain looping on itself.
    rig.desc(TXQ, 0, 1 << 40, 100, 0, 0);
    rig.desc(TXQ, 1, base, 100, F_WRITE, 0);
    rig.desc(TXQ, 2, base, 0x1_0000, F_NEXT, 3);
    rig.desc(TXQ, 3, base, 0x1_0000, 0, 0);
    rig.desc(TXQ, 4, base, 0, 0, 0);
    rig.desc(TXQ, 5, base, VNET_HDR_LEN as u32, 0, 0);
    rig.desc(TXQ, 6, base, 100, F_NEXT, 6);
    for h in [0, 1, 2, 4, 5, 6] {
        rig.publish(TXQ, h);
    }
    rig.kick(TXQ);
    rig.wait_used(TXQ, 6);
    assert!(
        rig.host_recv().is_none(),
        "no malformed frame reaches the TAP"
    );
    assert_eq!(rig.stats.snapshot().tx_dropped, 6);
    // Still working.
    let f = frame(80, 9);
    rig.send_tx(8, &f);
    assert_eq!(rig.host_recv().unwrap(), with_hdr(&f));
    assert_eq!(rig.stats.snapshot().tx_frames, 1);
}

#[test]
fn corrupt_avail_index_stops_the_queue_not_the_device() {
    let mut rig = Rig::new();
    rig.set_avail_idx(TXQ, QSIZE + 5);
    rig.kick(TXQ);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.stats.snapshot().queue_errors, 1);
    // RX still works, and the device stops cleanly.
    rig.post_rx(0, 2048);
    rig.kick(RXQ);
    rig.host_send(&with_hdr(&frame(64, 1)));
    rig.wait_used(RXQ, 1);
    let qs = rig.net.deactivate().expect("queues handed back");
    assert_eq!(qs.len(), 2);
}

#[test]
fn tx_flood_does_not_starve_rx_and_gone_peer_is_counted() {
    let mut rig = Rig::new();
    // Every TX slot holds the same valid frame, re-published over and over by a thread.
    let base = TX_BUFS;
    rig.mem
        .write_slice(&with_hdr(&frame(64, 2)), GuestAddress(base))
        .unwrap();
    for i in 0..QSIZE {
        rig.desc(TXQ, i, base, 76, 0, 0);
    }
    // The peer stops reading: its socket buffer fills, sends fail, and are counted.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mem, kick, stop2) = (
        rig.mem.clone(),
        rig.kicks[TXQ].try_clone().unwrap(),
        stop.clone(),
    );
    let flood = std::thread::spawn(move || {
        let mut idx = 0u16;
        while !stop2.load(Ordering::Relaxed) {
            let used: u16 = mem.read_obj(GuestAddress(RINGS[TXQ].2 + 2)).unwrap();
            while idx.wrapping_sub(used) < QSIZE {
                mem.write_obj(
                    idx % QSIZE,
                    GuestAddress(RINGS[TXQ].1 + 4 + u64::from(idx % QSIZE) * 2),
                )
                .unwrap();
                idx = idx.wrapping_add(1);
                mem.write_obj(idx, GuestAddress(RINGS[TXQ].1 + 2)).unwrap();
            }
            let _ = kick.write(1);
            std::thread::yield_now();
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    rig.post_rx(0, 2048);
    rig.kick(RXQ);
    rig.host_send(&with_hdr(&frame(64, 1)));
    rig.wait_used(RXQ, 1);
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let s = rig.stats.snapshot();
    assert!(s.tx_frames + s.tx_errors > 100, "{s:?}");
    assert!(s.tx_errors > 0, "a full peer makes writes fail: {s:?}");
    assert!(rig.net.deactivate().is_some());
}

#[test]
fn a_queue_the_driver_never_enabled_is_left_alone() {
    let mut rig = Rig::build(false);
    rig.kick(TXQ);
    rig.post_rx(0, 2048);
    rig.kick(RXQ);
    rig.host_send(&with_hdr(&frame(64, 4)));
    rig.wait_used(RXQ, 1);
    std::thread::sleep(Duration::from_millis(20));
    let s = rig.stats.snapshot();
    assert_eq!(
        (s.rx_frames, s.queue_errors, s.tx_dropped),
        (1, 0, 0),
        "{s:?}"
    );
    assert!(rig.net.deactivate().is_some());
}
