//! Cross-home restore through S3: a snapshot taken in home A, pushed to a real S3 server
//! (SeaweedFS on loopback), pulled into an empty home B and restored there lazily; B fetches
//! only the chunks the guest touches.

use blockstore::Store;
use kiln_tests::s3::S3Server;
use snapshotter::record::{self, VmShape};
use snapshotter::vm::{self as snapvm, Identity, LazyRestore, RestoredMemory, SnapshotRequest};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const BUCKET: &str = "kiln-snap-test";

#[test]
fn snapshot_restores_in_another_home_fetching_only_touched_chunks() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("SKIP: /dev/kvm not usable: {e}");
        return;
    }
    let Some(s3) = S3Server::start_or_skip("snapshot_restores_in_another_home").unwrap() else {
        return;
    };
    s3.create_bucket(BUCKET).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::open(&tmp.path().join("a")).unwrap();
    a.set_remote(Arc::new(s3.remote(BUCKET, "snap")));

    // Home A: boot at CPL 3, put 32 MiB of data in RAM, snapshot, push.
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("a.vsock");
    let config = vmm::VmConfig {
        mem_bytes: 64 << 20,
        kernel: Some(kiln_testguest::elf_path().to_path_buf()),
        serial_log: Some(dir.path().join("a.serial")),
        ..Default::default()
    };
    let mut vm = vmm::Vm::new(config, vmm::GuestMemorySource::Anonymous).unwrap();
    vm.add_virtio_device(Box::new(
        vmm::devices::virtio::vsock::Vsock::new(3, &uds).unwrap(),
    ))
    .unwrap();
    vm.set_entry_mode(vmm::EntryMode::User);
    vm.boot().unwrap();
    vm.start().unwrap();
    assert_eq!(ask(&uds, "PING"), "PONG");
    vm.pause().unwrap();
    let mut buf = vec![0u8; 32 << 20];
    kiln_testguest::fill_pattern(7, 16 << 20, &mut buf);
    vm.memory()
        .write_slice(&buf, GuestAddress(16 << 20))
        .unwrap();
    let shape = VmShape {
        mem_bytes: 64 << 20,
        vcpus: 1,
        cmdline: String::new(),
        vsock_cid: Some(3),
    };
    let (rec, rep) = snapvm::snapshot(
        &a,
        &vm,
        SnapshotRequest {
            shape,
            name: Some("s"),
            parent: None,
            tracker: None,
            disks: vec![],
        },
    )
    .unwrap();
    vm.stop();
    let _ = vm.wait_timeout(Duration::from_secs(5));
    drop(vm);
    let sent = record::push(&a, &rep.snapshot).unwrap();
    assert!(sent > 30 << 20, "pushed the memory: {sent}");
    let stored_chunks = a
        .manifest(&rec.memory.layers[0].blob)
        .unwrap()
        .chunks
        .iter()
        .filter(|c| c.is_some())
        .count() as u64;

    // Home B: empty; pull manifests only, restore lazily, touch a little.
    let b = Store::open(&tmp.path().join("b")).unwrap();
    b.set_remote(Arc::new(s3.remote(BUCKET, "snap")));
    record::pull(&b, &rep.snapshot, Some("s")).unwrap();
    let base = b.stats().remote_chunk_fetches;
    assert!(
        base <= 2,
        "pull fetches the record only, no memory: {base} chunks"
    );
    let (id, rec) = record::load_checked(&b, "s").unwrap();
    let t0 = Instant::now();
    let lazy = snapvm::lazy_memory(
        &b,
        &id,
        &rec,
        LazyRestore {
            use_working_set: false,
            record: false,
            on_fatal: Arc::new(|m: &str| panic!("{m}")),
        },
    )
    .unwrap();
    let mem = RestoredMemory::Lazy(lazy);
    let ruds = tmp.path().join("b.vsock");
    // SAFETY: mem outlives the VM (stopped and dropped below first).
    let vm = unsafe {
        snapvm::start_vm(
            &rec,
            &mem,
            &Identity {
                vsock_uds: Some(ruds.clone()),
                ..Default::default()
            },
        )
    }
    .unwrap();
    let reply = ask(&ruds, "CHECK 20 1 7");
    let first_reply = t0.elapsed();
    assert_eq!(reply, "OK", "guest memory from S3 is exact");
    let fetched = b.stats().remote_chunk_fetches - base;
    eprintln!("cold restore over S3: first CHECK reply after {first_reply:?}, {fetched} of {stored_chunks} chunks fetched");
    assert!(
        fetched > 0 && fetched < stored_chunks / 2,
        "fetched {fetched} of {stored_chunks} chunks: only what the guest touched"
    );
    vm.stop();
    let _ = vm.wait_timeout(Duration::from_secs(5));
    drop(vm);
    drop(mem);
}

/// One request on a fresh vsock connection (the first one to a restored guest must work).
fn ask(uds: &std::path::Path, line: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    write!(w, "CONNECT 1\n{line}\n").unwrap();
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "CONNECT reply {ok:?}");
    let mut reply = String::new();
    assert!(
        r.read_line(&mut reply).unwrap() > 0,
        "{line}: closed by the guest"
    );
    reply.trim_end().to_string()
}
