//! Cross-home restore through S3: a snapshot taken in home A, pushed to a real S3 server
//! (SeaweedFS on loopback), pulled into an empty home B and restored there lazily; B fetches
//! only the chunks the guest touches.

use kiln_blockstore::Store;
use kiln_snapshotter::record::{self, VmShape};
use kiln_snapshotter::vm::{
    self as snapvm, Identity, LazyRestore, RestoredMemory, SnapshotRequest,
};
use kiln_tests::s3::S3Server;
use kiln_tests::Kiln;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const BUCKET: &str = "kiln-snap-test";

#[test]
fn snapshot_restores_in_another_home_fetching_only_touched_chunks() {
    kiln_tests::require_kvm!();
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
    let vm = kiln_tests::boot_test_guest(64 << 20, &uds, &dir.path().join("a.serial")).unwrap();
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
    // A working set recorded in A (as its first restore would) travels with the push.
    let ws = vec![17u32, 16, 300];
    record::save_working_set(&a, &rep.snapshot, &ws).unwrap();
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
    assert_eq!(
        record::working_set(&b, &id).unwrap(),
        Some(ws),
        "the pull brought A's working set"
    );
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

/// `kiln vm suspend` of a VM with a store disk in home A, `kiln snapshot push`, then in an
/// empty home B `kiln snapshot pull` + `kiln vm resume`: the guest's disk writes are there, and
/// the disk blob is read lazily from S3 (B holds none of its chunks until the guest reads).
#[test]
fn suspend_with_a_disk_resumes_in_another_home() {
    kiln_tests::require_kvm!();
    let Some(s3) = S3Server::start_or_skip("suspend_with_a_disk_resumes_in_another_home").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = Kiln::new(tmp.path().join("a")).with_env(s3.env());
    let b = Kiln::new(tmp.path().join("b")).with_env(s3.env());
    let _vms = (a.stop_vms_on_drop(), b.stop_vms_on_drop());
    let url = format!("s3://{}/suspend", kiln_tests::s3::BUCKET);
    for k in [&a, &b] {
        s3.add_origin(k, &url);
    }
    let base = kiln_tests::pseudo_random(8 << 20, 9);
    let img = tmp.path().join("base.img");
    std::fs::write(&img, &base).unwrap();
    a.ok(["store", "put", img.to_str().unwrap(), "--name", "base"]);
    let uds = tmp.path().join("a.vsock");
    let vm = a.ok_str(kiln_tests::test_guest_vm_run(&[
        "--disk",
        "base",
        "-d",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]));
    assert_eq!(ask(&uds, "BLKWRITE 0 0 2048 71"), "OK");
    a.ok(["vm", "suspend", &vm, "--name", "parked"]);
    let pushed = a.ok_str(["snapshot", "push", "parked"]);
    let snap = pushed.split_whitespace().next().unwrap().to_string();

    b.ok(["snapshot", "pull", &snap, "--name", "parked"]);
    let rec = b.json(["snapshot", "inspect", "parked"]);
    let disk = rec["disks"][0]["blob"].as_str().unwrap().to_string();
    let st = b.json(["store", "stat", &disk, "--json"]);
    assert_eq!(st["local_chunks"], 0, "pull fetches manifests only: {st}");
    let unique = st["unique_chunks"].as_u64().unwrap();
    let id = b.ok_str(["vm", "resume", "parked"]);
    let vs = b.home.join("vms").join(&id).join("vsock.sock");
    assert_eq!(ask(&vs, "BLKCHECK 0 0 2048 71"), "OK");
    // 1 MiB of the base the guest never wrote, read through the overlay from S3.
    assert_eq!(
        ask(&vs, "BLKHASH 0 2048 2048"),
        format!(
            "OK 0x{:x}",
            kiln_testguest::checksum(&base[1 << 20..2 << 20])
        )
    );
    b.ok(["vm", "stop", &id]);
    let st = b.json(["store", "stat", &disk, "--json"]);
    let local = st["local_chunks"].as_u64().unwrap();
    eprintln!("disk chunks in home B after the guest's reads: {local} of {unique}");
    assert!(
        local <= unique / 2,
        "only the chunks the guest read came over: {local} of {unique}"
    );
}
