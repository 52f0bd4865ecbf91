//! Snapshots of VMs with disks, with the kiln test guest on real KVM: the guest writes sector
//! patterns through virtio-blk (store overlays), the VM is snapshotted with its disks committed,
//! and restores/forks get their own overlay each: the pattern is there, the guest continues,
//! forks never see each other's writes, read-only disks stay read-only and the snapshot's disk
//! blob never changes. The `kiln` tests drive the same through the CLI (restore, fork,
//! suspend/resume) and across two homes through S3.
//!
//! Every first vsock connection to a restored guest must work (no retries): the VMM holds host
//! connections until the guest has handled its transport-reset event.

mod guest_support;

use guest_support::{connect_uds, GuestOpts, GuestVm};
use kiln_blockstore::{BlobId, Store};
use kiln_snapshotter::record::{self, DiskRef, VmShape};
use kiln_snapshotter::vm::{
    self as snapvm, Identity, LazyRestore, RestoredMemory, SnapshotRequest,
};
use kiln_tests::require_kvm;
use kiln_tests::Kiln;
use kiln_vmm::devices::virtio::block::{Block, DiskBackend};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const DISK_MIB: u64 = 8;
const RO_MIB: u64 = 4;
/// Sectors the tests write: the first MiB.
const SECTORS: u64 = 2048;

/// One request on a fresh connection (the first attempt must work, also right after restore).
fn ask(uds: &Path, line: &str) -> String {
    connect_uds(uds, 1).request(line)
}

fn blob_bytes(store: &Store, id: &BlobId) -> Vec<u8> {
    let r = store.open_blob(id).unwrap();
    let mut buf = vec![0u8; r.len() as usize];
    assert_eq!(r.read_at(0, &mut buf).unwrap(), buf.len());
    buf
}

/// The guest's sector pattern for `seed` over the first `sectors` sectors.
fn pattern(seed: u64, sectors: u64) -> Vec<u8> {
    let mut v = vec![0u8; (sectors * 512) as usize];
    kiln_testguest::fill_pattern(seed, 0, &mut v);
    v
}

fn overlay_bytes(o: &kiln_blockstore::Overlay, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = o.read_at(0, &mut buf).unwrap();
    assert_eq!(n, len);
    buf
}

/// A VM restored in this process over its own disk overlays.
struct Restored {
    vm: Option<kiln_vmm::Vm>,
    // Dropped after the VM (field order).
    _mem: RestoredMemory,
    uds: std::path::PathBuf,
    disks: Vec<Arc<kiln_blockstore::Overlay>>,
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.stop();
            let _ = vm.wait_timeout(Duration::from_secs(5));
        }
    }
}

fn restore(
    store: &Store,
    snap: &str,
    dir: &Path,
    tag: &str,
    memory_file: Option<&Path>,
) -> Restored {
    let (id, rec) = record::load_checked(store, snap).expect("load snapshot");
    let mem = match memory_file {
        // As `kiln vm fork`: forks map one materialized memory file copy-on-write.
        Some(f) => {
            let file = snapvm::materialize(store, &rec, f).unwrap();
            RestoredMemory::Mapped(
                kiln_snapshotter::Mapping::file_private(&file, rec.memory.size as usize).unwrap(),
            )
        }
        None => RestoredMemory::Lazy(
            snapvm::lazy_memory(
                store,
                &id,
                &rec,
                LazyRestore {
                    use_working_set: false,
                    record: false,
                    on_fatal: Arc::new(|m: &str| panic!("page handler failed: {m}")),
                },
            )
            .unwrap(),
        ),
    };
    let vmdir = dir.join(tag);
    std::fs::create_dir_all(&vmdir).unwrap();
    let disks = snapvm::disk_overlays(store, &rec, &vmdir).unwrap();
    let uds = vmdir.join("vsock.sock");
    let ident = Identity {
        serial_log: Some(vmdir.join("serial.log")),
        vsock_uds: Some(uds.clone()),
        disks: disks.clone(),
        ..Default::default()
    };
    // SAFETY: `mem` is dropped after the VM (Restored's field order; Drop stops the VM first).
    let vm = unsafe { snapvm::start_vm(&rec, &mem, &ident) }.expect("start restored VM");
    Restored {
        vm: Some(vm),
        _mem: mem,
        uds,
        disks,
    }
}

#[test]
fn disk_contents_survive_restore_and_forks_diverge() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let base = kiln_tests::pseudo_random((DISK_MIB << 20) as usize, 3);
    let base_id = store.put_bytes(&base, &Default::default()).unwrap();
    let ro_data = kiln_tests::pseudo_random((RO_MIB << 20) as usize, 4);
    let ro_id = store.put_bytes(&ro_data, &Default::default()).unwrap();
    let o0 = Arc::new(
        store
            .create_overlay(Some(&base_id), DISK_MIB << 20, &dir.path().join("o0"))
            .unwrap(),
    );
    let o1 = Arc::new(
        store
            .create_overlay(Some(&ro_id), RO_MIB << 20, &dir.path().join("o1"))
            .unwrap(),
    );
    let b0 = Block::new("data", DiskBackend::Overlay(o0.clone()), false).unwrap();
    let b1 = Block::new("ro", DiskBackend::Overlay(o1.clone()), true).unwrap();
    let g = GuestVm::start(GuestOpts {
        disks: vec![Box::new(b0), Box::new(b1)],
        ..Default::default()
    });
    g.wait_serial("kt: serving", Duration::from_secs(10));
    let uds = g.uds.clone().unwrap();
    assert_eq!(
        ask(&uds, "BLKINFO"),
        format!("OK 2 {} {}", DISK_MIB << 11, RO_MIB << 11)
    );
    assert_eq!(ask(&uds, &format!("BLKWRITE 0 0 {SECTORS} 11")), "OK");
    assert!(
        ask(&uds, "BLKWRITE 1 0 8 1").starts_with("ERR"),
        "the read-only disk refuses writes"
    );
    let counter: u64 = ask(&uds, "COUNTER")
        .trim_start_matches("OK ")
        .parse()
        .unwrap();

    // Snapshot: pause, commit both overlays, capture.
    g.vm.pause().unwrap();
    let d0 = o0.commit().unwrap();
    let d1 = o1.commit().unwrap();
    assert_eq!(d1, ro_id, "nothing was written to the read-only disk");
    let (rec, _) = snapvm::snapshot(
        &store,
        &g.vm,
        SnapshotRequest {
            shape: VmShape {
                mem_bytes: 64 << 20,
                vcpus: 1,
                cmdline: String::new(),
                vsock_cid: Some(3),
            },
            name: Some("disk"),
            parent: None,
            tracker: None,
            disks: vec![
                DiskRef {
                    blob: d0,
                    read_only: false,
                },
                DiskRef {
                    blob: d1,
                    read_only: true,
                },
            ],
        },
    )
    .unwrap();
    assert_eq!(rec.disks.len(), 2);
    drop(g); // stops the original: everything below comes from the store
    let mut want = base.clone();
    want[..(SECTORS * 512) as usize].copy_from_slice(&pattern(11, SECTORS));
    let snap_disk = blob_bytes(&store, &d0);
    assert!(
        snap_disk == want,
        "the committed disk holds the guest's writes"
    );

    // Restore: the pattern is there, the guest continues, the read-only disk stays so.
    let a = restore(&store, "disk", dir.path(), "a", None);
    assert_eq!(ask(&a.uds, &format!("BLKCHECK 0 0 {SECTORS} 11")), "OK");
    let after: u64 = ask(&a.uds, "COUNTER")
        .trim_start_matches("OK ")
        .parse()
        .unwrap();
    assert!(after > counter, "counter continues: {counter} -> {after}");
    let tail = &base[(SECTORS * 512) as usize..(2 * SECTORS * 512) as usize];
    assert_eq!(
        ask(&a.uds, &format!("BLKHASH 0 {SECTORS} {SECTORS}")),
        format!("OK 0x{:x}", kiln_testguest::checksum(tail)),
        "the base's untouched sectors read through the restored overlay"
    );
    assert!(ask(&a.uds, "BLKWRITE 1 0 8 1").starts_with("ERR"));
    assert_eq!(
        ask(&a.uds, &format!("BLKHASH 1 0 {}", RO_MIB << 11)),
        format!("OK 0x{:x}", kiln_testguest::checksum(&ro_data))
    );

    // Two forks (one memory file, copy-on-write) write different data to the same sectors.
    let mfile = dir.path().join("memory.img");
    let b = restore(&store, "disk", dir.path(), "b", Some(&mfile));
    let c = restore(&store, "disk", dir.path(), "c", Some(&mfile));
    assert_eq!(ask(&b.uds, &format!("BLKWRITE 0 0 {SECTORS} 21")), "OK");
    assert_eq!(ask(&c.uds, &format!("BLKWRITE 0 0 {SECTORS} 31")), "OK");
    assert_eq!(ask(&b.uds, &format!("BLKCHECK 0 0 {SECTORS} 21")), "OK");
    assert_eq!(ask(&c.uds, &format!("BLKCHECK 0 0 {SECTORS} 31")), "OK");
    assert_eq!(
        ask(&a.uds, &format!("BLKCHECK 0 0 {SECTORS} 11")),
        "OK",
        "the first restore does not see the forks' writes"
    );
    let n = (SECTORS * 512) as usize;
    assert!(overlay_bytes(&b.disks[0], n) == pattern(21, SECTORS));
    assert!(overlay_bytes(&c.disks[0], n) == pattern(31, SECTORS));
    assert!(
        blob_bytes(&store, &d0) == snap_disk,
        "the snapshot's disk blob is unchanged"
    );
    assert_ne!(b.disks[0].dir(), c.disks[0].dir(), "one overlay per fork");
}

/// The stored snapshot refuses a restore whose overlays do not match its disks.
#[test]
fn restore_refuses_missing_disk_overlays() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let base_id = store
        .put_bytes(&vec![7u8; 1 << 20], &Default::default())
        .unwrap();
    let o = Arc::new(
        store
            .create_overlay(Some(&base_id), 1 << 20, &dir.path().join("o"))
            .unwrap(),
    );
    let blk = Block::new("d", DiskBackend::Overlay(o.clone()), false).unwrap();
    let g = GuestVm::start(GuestOpts {
        disks: vec![Box::new(blk)],
        ..Default::default()
    });
    g.wait_serial("kt: serving", Duration::from_secs(10));
    g.vm.pause().unwrap();
    let shape = VmShape {
        mem_bytes: 64 << 20,
        vcpus: 1,
        cmdline: String::new(),
        vsock_cid: Some(3),
    };
    // A record without its disk is inconsistent and refused before any VM is built.
    let (_, rep) = snapvm::snapshot(
        &store,
        &g.vm,
        SnapshotRequest {
            shape: shape.clone(),
            name: Some("nodisk"),
            parent: None,
            tracker: None,
            disks: vec![],
        },
    )
    .unwrap();
    let e = record::load_checked(&store, &rep.snapshot.to_hex()).unwrap_err();
    assert!(e.to_string().contains("1 disks"), "{e}");
    let d = o.commit().unwrap();
    let (rec, _) = snapvm::snapshot(
        &store,
        &g.vm,
        SnapshotRequest {
            shape,
            name: Some("withdisk"),
            parent: None,
            tracker: None,
            disks: vec![DiskRef {
                blob: d,
                read_only: false,
            }],
        },
    )
    .unwrap();
    drop(g);
    let mem = RestoredMemory::Mapped(
        kiln_snapshotter::Mapping::file_private(
            &snapvm::materialize(&store, &rec, &dir.path().join("m.img")).unwrap(),
            rec.memory.size as usize,
        )
        .unwrap(),
    );
    let ident = Identity {
        vsock_uds: Some(dir.path().join("x.vsock")),
        ..Default::default()
    };
    // SAFETY: the VM is never built (the call fails before), and `mem` outlives the call.
    let e = unsafe { snapvm::build_vm(&rec, &mem, &ident) }
        .err()
        .expect("no overlays given");
    assert!(e.to_string().contains("0 overlays"), "{e}");

    // A disk blob this store lacks: a clear error, and no overlay of the other disk is left.
    let mut bad = rec.clone();
    let missing: BlobId = "ab".repeat(32).parse().unwrap();
    bad.disks.push(DiskRef {
        blob: missing,
        read_only: false,
    });
    let vmdir = dir.path().join("vm");
    std::fs::create_dir_all(&vmdir).unwrap();
    let e = snapvm::disk_overlays(&store, &bad, &vmdir).unwrap_err();
    assert!(e.to_string().contains("abab"), "{e}");
    assert!(!vmdir.join("disk0").exists(), "half-made overlays removed");
    let ok = snapvm::disk_overlays(&store, &rec, &vmdir).unwrap();
    assert_eq!(ok.len(), 1);
    assert!(
        snapvm::disk_overlays(&store, &rec, &vmdir).is_err(),
        "an existing overlay is never reused"
    );
}

/// Boots the test guest with a store disk via `kiln vm run -d`; returns (id, vsock path).
fn kiln_vm_with_disk(k: &Kiln, dir: &Path, disk: &str, tag: &str) -> (String, std::path::PathBuf) {
    let uds = dir.join(format!("{tag}.vsock"));
    let id = k.ok_str(kiln_tests::test_guest_vm_run(&[
        "--disk",
        disk,
        "-d",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]));
    (id, uds)
}

#[test]
fn kiln_restore_fork_and_suspend_resume_with_a_disk() {
    if let Some(why) = kiln_tests::kvm_unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = Kiln::new(dir.path().join("home"));
    let _vms = k.stop_vms_on_drop();
    let img = dir.path().join("base.img");
    let base = kiln_tests::pseudo_random((DISK_MIB << 20) as usize, 5);
    std::fs::write(&img, &base).unwrap();
    k.ok(["store", "put", img.to_str().unwrap(), "--name", "base"]);
    let (id, uds) = kiln_vm_with_disk(&k, dir.path(), "base", "a");
    assert_eq!(ask(&uds, &format!("BLKWRITE 0 0 {SECTORS} 41")), "OK");
    let snap = k.json(["snapshot", "create", &id, "--name", "warm", "--json"]);
    assert_eq!(snap["disks"], 1);
    // The VM runs on after the snapshot; its later writes are not in the snapshot.
    assert_eq!(ask(&uds, &format!("BLKWRITE 0 0 {SECTORS} 42")), "OK");
    let rec = k.json(["snapshot", "inspect", "warm"]);
    let disk_blob = rec["disks"][0]["blob"].as_str().unwrap().to_string();
    let disk_file = dir.path().join("disk-before.img");
    k.ok([
        "store",
        "get",
        &disk_blob,
        "-o",
        disk_file.to_str().unwrap(),
    ]);
    let disk_before = std::fs::read(&disk_file).unwrap();
    assert!(disk_before[..(SECTORS * 512) as usize] == pattern(41, SECTORS)[..]);

    // Restore and two forks, each on its own overlay.
    let ruds = dir.path().join("r.vsock");
    let r = k.ok_str([
        "vm",
        "restore",
        "warm",
        "-d",
        "--vsock-uds",
        ruds.to_str().unwrap(),
    ]);
    assert_eq!(ask(&ruds, &format!("BLKCHECK 0 0 {SECTORS} 41")), "OK");
    let fdir = dir.path().join("forks");
    k.ok([
        "vm",
        "fork",
        "warm",
        "-n",
        "2",
        "--vsock-dir",
        fdir.to_str().unwrap(),
    ]);
    let mut socks: Vec<_> = std::fs::read_dir(&fdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    socks.sort();
    assert_eq!(socks.len(), 2, "{socks:?}");
    for (i, s) in socks.iter().enumerate() {
        assert_eq!(ask(s, &format!("BLKCHECK 0 0 {SECTORS} 41")), "OK");
        assert_eq!(ask(s, &format!("BLKWRITE 0 0 {SECTORS} {}", 50 + i)), "OK");
    }
    for (i, s) in socks.iter().enumerate() {
        assert_eq!(
            ask(s, &format!("BLKCHECK 0 0 {SECTORS} {}", 50 + i)),
            "OK",
            "fork {i} sees only its own writes"
        );
    }
    assert_eq!(ask(&ruds, &format!("BLKCHECK 0 0 {SECTORS} 41")), "OK");
    assert_eq!(ask(&uds, &format!("BLKCHECK 0 0 {SECTORS} 42")), "OK");

    // Suspend the restored VM after it wrote, resume it: its disk write survives.
    assert_eq!(ask(&ruds, &format!("BLKWRITE 0 0 {SECTORS} 60")), "OK");
    k.ok(["vm", "suspend", &r, "--name", "parked"]);
    let resumed = k.ok_str(["vm", "resume", "parked"]);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(k.home.join("vms").join(&resumed).join("vm.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["disks"].as_array().unwrap().len(), 1);
    let vs = k.home.join("vms").join(&resumed).join("vsock.sock");
    assert_eq!(ask(&vs, &format!("BLKCHECK 0 0 {SECTORS} 60")), "OK");

    for s in &socks {
        let fid = s.file_stem().unwrap().to_str().unwrap().to_string();
        k.ok(["vm", "stop", &fid]);
    }
    k.ok(["vm", "stop", &resumed]);
    k.ok(["vm", "stop", &id]);
    k.ok([
        "store",
        "get",
        &disk_blob,
        "-o",
        disk_file.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&disk_file).unwrap() == disk_before,
        "the snapshot's disk blob is unchanged by restores and forks"
    );

    // A raw-file disk cannot be committed: a clear error, and the VM runs on.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let (rid, ruds) = kiln_vm_with_disk(&k, dir.path(), raw.to_str().unwrap(), "raw");
    assert_eq!(ask(&ruds, "BLKWRITE 0 0 8 3"), "OK");
    let e = k.fails(["snapshot", "create", &rid, "--name", "rawsnap"]);
    assert!(e.contains("store-backed") && e.contains("raw file"), "{e}");
    assert!(k
        .fails(["snapshot", "inspect", "rawsnap"])
        .contains("rawsnap"));
    assert_eq!(ask(&ruds, "BLKCHECK 0 0 8 3"), "OK", "the VM was resumed");
    k.ok(["vm", "stop", &rid]);
}
