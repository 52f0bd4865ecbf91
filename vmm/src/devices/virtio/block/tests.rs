//! virtio-blk with hand-built split queues in real guest memory: well-formed requests through
//! every engine, and a misbehaving driver (garbage descriptors, out-of-range addresses, looping
//! chains, oversize requests) that must get error statuses, never a crash or a hang.

use super::engine::FileEngine;
use super::request::*;
use super::*;
use crate::devices::virtio::ActivateContext;
use crate::memory::GuestMemoryMmap;
use proptest::prelude::*;
use std::time::{Duration, Instant};
use vm_memory::{Address, Bytes, GuestAddress};

const MEM: usize = 4 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A driver's view of one split queue.
struct Driver {
    mem: GuestMemoryMmap,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        Driver { mem, avail_idx: 0 }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(DESC + u64::from(i) * 16);
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, a.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used(&self, n: u16) -> (u32, u32) {
        let a = USED + 4 + u64::from(n % QSIZE) * 8;
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    /// header at 0x10000 + 32*head; status at 0x20000 + head.
    fn request(&mut self, head: u16, ty: u32, sector: u64, data: &[(u64, u32)], status: bool) {
        let hdr = 0x10000 + 32 * u64::from(head);
        self.mem.write_obj(ty, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        let dev_writes = ty == VIRTIO_BLK_T_IN || ty == VIRTIO_BLK_T_GET_ID;
        let mut i = head;
        let n = data.len() as u16 + 1 + u16::from(status);
        let mut left = n;
        let next = |i: u16| (i + 1) % QSIZE;
        left -= 1;
        self.desc(i, hdr, 16, if left > 0 { F_NEXT } else { 0 }, next(i));
        for &(addr, len) in data {
            i = next(i);
            left -= 1;
            let mut f = if dev_writes { F_WRITE } else { 0 };
            if left > 0 {
                f |= F_NEXT;
            }
            self.desc(i, addr, len, f, next(i));
        }
        if status {
            i = next(i);
            self.mem
                .write_obj(0xffu8, GuestAddress(0x20000 + u64::from(head)))
                .unwrap();
            self.desc(i, 0x20000 + u64::from(head), 1, F_WRITE, 0);
        }
        self.publish(head);
    }

    fn status(&self, head: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(0x20000 + u64::from(head)))
            .unwrap()
    }
}

struct Running {
    dev: Block,
    kick: EventFd,
}

fn start(driver: &Driver, backend: DiskBackend, read_only: bool) -> Running {
    start_with(driver, backend, read_only, VIRTIO_F_VERSION_1).0
}

/// Also returns the interrupt eventfd.
fn start_with(
    driver: &Driver,
    backend: DiskBackend,
    read_only: bool,
    features: u64,
) -> (Running, EventFd) {
    let mut dev = Block::new("test-disk", backend, read_only).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    dev.activate(ActivateContext {
        mem: driver.mem.clone(),
        queues: vec![driver.queue()],
        queue_events: vec![kick.try_clone().unwrap()],
        interrupt: Interrupt::new(irq.try_clone().unwrap()),
        acked_features: features,
    })
    .unwrap();
    (Running { dev, kick }, irq)
}

fn wait_used(driver: &Driver, n: u16) {
    let t = Instant::now();
    while driver.used_idx() != n {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "device did not complete: used {} want {n}",
            driver.used_idx()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn disk(size: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
    let f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(f.path(), &data).unwrap();
    (f, data)
}

fn file_backend(f: &tempfile::NamedTempFile, engine: FileEngine) -> DiskBackend {
    DiskBackend::File {
        path: f.path().to_path_buf(),
        engine,
        direct: true,
    }
}

fn round_trip(engine: FileEngine) {
    let (f, data) = disk(1 << 20);
    let mut d = Driver::new();
    let r = start(&d, file_backend(&f, engine), false);
    // Read 8 KiB at sector 8 into two 4 KiB page-aligned buffers (O_DIRECT path).
    d.request(
        0,
        VIRTIO_BLK_T_IN,
        8,
        &[(0x100000, 4096), (0x101000, 4096)],
        true,
    );
    // Write 1 KiB (unaligned for O_DIRECT: buffered path) at sector 3.
    d.mem
        .write_slice(&[0xab; 1024], GuestAddress(0x200200))
        .unwrap();
    d.request(4, VIRTIO_BLK_T_OUT, 3, &[(0x200200, 1024)], true);
    d.request(8, VIRTIO_BLK_T_FLUSH, 0, &[], true);
    d.request(10, VIRTIO_BLK_T_GET_ID, 0, &[(0x300000, 20)], true);
    r.kick.write(1).unwrap();
    wait_used(&d, 4);
    let mut got = vec![0u8; 8192];
    d.mem.read_slice(&mut got, GuestAddress(0x100000)).unwrap();
    assert_eq!(got, data[4096..4096 + 8192]);
    for h in [0, 4, 8, 10] {
        assert_eq!(d.status(h), VIRTIO_BLK_S_OK, "request {h}");
    }
    let lens: std::collections::HashMap<u32, u32> = (0..4).map(|i| d.used(i)).collect();
    assert_eq!(lens[&0], 8193);
    assert_eq!(lens[&4], 1);
    assert_eq!(lens[&10], 21);
    let mut id = [0u8; 9];
    d.mem.read_slice(&mut id, GuestAddress(0x300000)).unwrap();
    assert_eq!(&id, b"test-disk");
    let mut dev = r.dev;
    let q = dev.deactivate().expect("block device hands its queue back");
    assert_eq!(q[0].next_avail(), 4);
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[1536..2560], &[0xab; 1024][..]);
    assert_eq!(on_disk[2560..], data[2560..]);
}

#[test]
fn round_trip_uring() {
    round_trip(FileEngine::Uring);
}

#[test]
fn round_trip_sync() {
    round_trip(FileEngine::Sync);
}

/// Every page the device writes is in the VMM's dirty bitmap (diff snapshots rely on it): the
/// data buffers io_uring fills through raw pointers, the status byte, the used ring; a buffer
/// the device only reads is not.
fn device_writes_are_tracked(engine: FileEngine) {
    let (f, data) = disk(1 << 20);
    let mut d = Driver::new();
    let r = start(&d, file_backend(&f, engine), false);
    d.request(
        0,
        VIRTIO_BLK_T_IN,
        8,
        &[(0x100000, 4096), (0x102000, 4096)],
        true,
    );
    d.mem
        .write_slice(&[0xab; 4096], GuestAddress(0x200000))
        .unwrap();
    d.request(4, VIRTIO_BLK_T_OUT, 64, &[(0x200000, 4096)], true);
    // Forget the driver's own writes (descriptors, headers, avail ring, buffer contents).
    crate::memory::take_written(&d.mem, 0).unwrap();
    r.kick.write(1).unwrap();
    wait_used(&d, 2);
    let bits = crate::memory::take_written(&d.mem, 0).unwrap();
    let dirty = |addr: u64| bits[(addr / 4096 / 64) as usize] >> (addr / 4096 % 64) & 1 == 1;
    let mut got = vec![0u8; 4096];
    d.mem.read_slice(&mut got, GuestAddress(0x102000)).unwrap();
    assert_eq!(got, data[8192..12288]);
    assert!(
        dirty(0x100000) && dirty(0x102000),
        "data buffers the device filled"
    );
    assert!(dirty(0x20000), "status bytes");
    assert!(dirty(USED), "used ring");
    assert!(!dirty(0x101000), "untouched page between the buffers");
    assert!(!dirty(0x200000), "buffer the device only read");
}

#[test]
fn device_writes_are_tracked_uring() {
    device_writes_are_tracked(FileEngine::Uring);
}

#[test]
fn device_writes_are_tracked_sync() {
    device_writes_are_tracked(FileEngine::Sync);
}

#[test]
fn many_requests_in_flight_uring() {
    let (f, data) = disk(4 << 20);
    let mut d = Driver::new();
    let r = start(&d, file_backend(&f, FileEngine::Uring), false);
    // 8 requests of 2 descriptors + status = 3 descs each, 16 descriptors: use heads 0,3,6,9,12
    // (5 at a time), several rounds.
    let mut done = 0u16;
    for round in 0..10u64 {
        for (k, head) in [0u16, 3, 6, 9, 12].into_iter().enumerate() {
            let sector = (round * 5 + k as u64) * 8;
            d.request(
                head,
                VIRTIO_BLK_T_IN,
                sector,
                &[(0x100000 + u64::from(head) * 0x1000, 4096)],
                true,
            );
        }
        r.kick.write(1).unwrap();
        done += 5;
        wait_used(&d, done);
        for (k, head) in [0u16, 3, 6, 9, 12].into_iter().enumerate() {
            let off = ((round * 5 + k as u64) * 8 * 512) as usize;
            let mut got = vec![0u8; 4096];
            d.mem
                .read_slice(&mut got, GuestAddress(0x100000 + u64::from(head) * 0x1000))
                .unwrap();
            assert_eq!(got, data[off..off + 4096], "round {round} head {head}");
            assert_eq!(d.status(head), VIRTIO_BLK_S_OK);
        }
    }
}

/// With EVENT_IDX the device interrupts only when the used ring passes the driver's used_event,
/// and publishes avail_event (the next chain it wants a kick for).
#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let (f, data) = disk(1 << 20);
    let mut d = Driver::new();
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
    // A polling driver: no interrupt wanted.
    d.mem.write_obj(0xffffu16, used_event).unwrap();
    let (r, irq) = start_with(
        &d,
        file_backend(&f, FileEngine::Uring),
        false,
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
    );
    for (head, sector) in [(0u16, 0u64), (3, 8)] {
        d.request(
            head,
            VIRTIO_BLK_T_IN,
            sector,
            &[(0x100000 + u64::from(head) * 0x1000, 4096)],
            true,
        );
    }
    r.kick.write(1).unwrap();
    wait_used(&d, 2);
    let mut got = vec![0u8; 4096];
    d.mem.read_slice(&mut got, GuestAddress(0x103000)).unwrap();
    assert_eq!(got, data[8 * 512..8 * 512 + 4096]);
    // The worker may still be deciding about the interrupt right after the used index moved.
    std::thread::sleep(Duration::from_millis(50));
    assert!(irq.read().is_err(), "interrupt despite used_event");
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.mem.read_obj::<u16>(avail_event).unwrap() != 2 {
        assert!(Instant::now() < deadline, "avail_event not published");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Now ask for an interrupt at the next completion (used index 2 -> 3).
    d.mem.write_obj(2u16, used_event).unwrap();
    d.request(6, VIRTIO_BLK_T_IN, 16, &[(0x106000, 4096)], true);
    r.kick.write(1).unwrap();
    wait_used(&d, 3);
    while irq.read().is_err() {
        assert!(Instant::now() < deadline, "no interrupt at used_event");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.status(6), VIRTIO_BLK_S_OK);
}

/// Each bad request gets IOERR/UNSUPP (or no status when it has no status byte), and the device
/// keeps serving good requests afterwards.
#[test]
fn misbehaving_driver_gets_errors() {
    let (f, _) = disk(64 << 10);
    let mut d = Driver::new();
    let r = start(&d, file_backend(&f, FileEngine::Uring), false);
    // (request type, sector, data descriptors (addr, len), expected status)
    type Case = (u32, u64, Vec<(u64, u32)>, u8);
    let cases: Vec<Case> = vec![
        // beyond the end of the disk
        (
            VIRTIO_BLK_T_IN,
            128,
            vec![(0x100000, 512)],
            VIRTIO_BLK_S_IOERR,
        ),
        // sector * 512 overflows
        (
            VIRTIO_BLK_T_IN,
            u64::MAX / 2,
            vec![(0x100000, 512)],
            VIRTIO_BLK_S_IOERR,
        ),
        // buffer outside guest memory
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![(MEM as u64 - 256, 512)],
            VIRTIO_BLK_S_IOERR,
        ),
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![(u64::MAX - 100, 512)],
            VIRTIO_BLK_S_IOERR,
        ),
        // not a multiple of 512
        (
            VIRTIO_BLK_T_OUT,
            0,
            vec![(0x100000, 100)],
            VIRTIO_BLK_S_IOERR,
        ),
        // oversize
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![(0x100000, MAX_REQUEST_BYTES as u32 + 512)],
            VIRTIO_BLK_S_IOERR,
        ),
        // unknown type
        (77, 0, vec![], VIRTIO_BLK_S_UNSUPP),
    ];
    let mut n = 0;
    for (ty, sector, data, want) in &cases {
        d.request(0, *ty, *sector, data, true);
        r.kick.write(1).unwrap();
        n += 1;
        wait_used(&d, n);
        assert_eq!(
            d.status(0),
            *want,
            "case type {ty} sector {sector} data {data:?}"
        );
    }
    // Header in a device-writable descriptor / wrong data direction.
    d.desc(0, 0x10000, 16, F_NEXT | F_WRITE, 1);
    d.desc(1, 0x20000, 1, F_WRITE, 0);
    d.mem.write_obj(0xffu8, GuestAddress(0x20000)).unwrap();
    d.publish(0);
    // Looping chain: 2 -> 3 -> 2 ... (the queue size bounds the walk).
    d.desc(2, 0x10000, 16, F_NEXT, 3);
    d.desc(3, 0x100000, 512, F_NEXT | F_WRITE, 2);
    d.publish(2);
    // No status descriptor at all.
    d.desc(5, 0x10000, 16, 0, 0);
    d.publish(5);
    // Head index out of range.
    d.publish(QSIZE + 3);
    r.kick.write(1).unwrap();
    let t = Instant::now();
    while d.used_idx() < n + 3 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(d.used_idx() >= n + 3, "bad chains were not all answered");
    assert_eq!(d.status(0), VIRTIO_BLK_S_IOERR);

    // Read-only disk refuses writes.
    let mut ro_driver = Driver::new();
    let ro = start(&ro_driver, file_backend(&f, FileEngine::Sync), true);
    ro_driver.request(0, VIRTIO_BLK_T_OUT, 0, &[(0x100000, 512)], true);
    ro.kick.write(1).unwrap();
    wait_used(&ro_driver, 1);
    assert_eq!(ro_driver.status(0), VIRTIO_BLK_S_IOERR);
    assert!(ro.dev.avail_features() & (1 << 5) != 0);
    drop(ro);
    drop(r);
}

#[test]
fn bad_disks_are_refused() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), [0u8; 1000]).unwrap();
    assert!(matches!(
        Block::new("x", file_backend(&f, FileEngine::Sync), false),
        Err(BlockError::BadSize { .. })
    ));
    let missing = DiskBackend::File {
        path: "/nonexistent/disk.img".into(),
        engine: FileEngine::Sync,
        direct: false,
    };
    assert!(matches!(
        Block::new("x", missing, false),
        Err(BlockError::Open { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]
    /// Random descriptor tables and headers: the parser never panics, and whatever it accepts
    /// lies inside guest memory and the disk.
    #[test]
    fn parser_accepts_only_valid_requests(
        descs in prop::collection::vec((any::<u64>(), any::<u32>(), 0u16..8, 0u16..QSIZE), QSIZE as usize),
        near in prop::collection::vec((0u64..(MEM as u64 + 8192), 0u32..70000), QSIZE as usize),
        use_near in prop::collection::vec(any::<bool>(), QSIZE as usize),
        ty in prop_oneof![Just(0u32), Just(1u32), Just(4u32), Just(8u32), any::<u32>()],
        sector in prop_oneof![0u64..200, any::<u64>()],
        head in 0u16..QSIZE,
        read_only in any::<bool>(),
    ) {
        let mut d = Driver::new();
        for i in 0..QSIZE as usize {
            let (mut addr, mut len, flags, next) = descs[i];
            if use_near[i] {
                addr = near[i].0;
                len = near[i].1;
            }
            d.desc(i as u16, addr, len, flags, next);
        }
        let hdr = descs[head as usize].0;
        let _ = d.mem.write_obj(ty, GuestAddress(hdr));
        let _ = d.mem.write_obj(sector, GuestAddress(hdr.wrapping_add(8)));
        d.publish(head);
        let mut q = d.queue();
        let capacity = 1u64 << 20;
        if let Some(chain) = q.pop_descriptor_chain(&d.mem) {
            let parsed = request::parse(chain, capacity, read_only);
            if let Ok((req, status)) = parsed.outcome {
                prop_assert!(host_range(&d.mem, status, 1).is_some());
                let mut total = 0u64;
                for s in &req.segments {
                    prop_assert!(host_range(&d.mem, GuestAddress(s.guest_addr), u64::from(s.len)).is_some());
                    total += u64::from(s.len);
                }
                prop_assert_eq!(total, req.data_len);
                prop_assert!(req.data_len <= MAX_REQUEST_BYTES);
                if matches!(req.kind, RequestKind::Read | RequestKind::Write) {
                    prop_assert!(req.offset + req.data_len <= capacity);
                    prop_assert_eq!(req.data_len % 512, 0);
                }
                if req.kind == RequestKind::Write {
                    prop_assert!(!read_only);
                }
            }
        }
    }
}

/// A driver that moves avail.idx far ahead must not make the worker spin: it stops serving the
/// queue and still answers deactivate (the transport's reset) promptly.
#[test]
fn avail_index_jump_does_not_wedge_the_worker() {
    let (f, _) = disk(64 << 10);
    let d = Driver::new();
    let r = start(&d, file_backend(&f, FileEngine::Uring), false);
    d.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    r.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut dev = r.dev;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let q = dev.deactivate();
        let _ = tx.send(q.is_some());
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(true),
        "worker wedged"
    );
}
