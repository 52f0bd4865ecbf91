//! Sandbox disks on gVisor (real runsc, the real kiln binary): a sandbox's file writes go to
//! an ext4 of its disk size loop-mounted in its own directory (gVisor's overlay filestore),
//! not into host RAM; they survive pause and resume byte for byte; writing past the disk size
//! fails inside with ENOSPC and the sandbox lives on; and kill, pause, fork and kill -9 of
//! kiln leave no mount, loop device or file behind.

use kiln_tests::sandbox::{app_home, create, exec, killed_after, sh, KillAll};
use kiln_tests::Kiln;
use std::path::Path;
use std::time::Duration;

/// The sandbox's processes: its runsc processes (they carry its own `--root`) and their
/// descendants (the platform's stub processes).
fn sandbox_processes(k: &Kiln, id: &str) -> Vec<u32> {
    let root = format!(
        "--root={}",
        k.home.join("sandboxes").join(id).join("runsc").display()
    );
    let mut pids: Vec<u32> = kiln_tests::sandbox::processes()
        .into_iter()
        .filter(|(_, argv)| argv.contains(&root))
        .map(|(pid, _)| pid)
        .collect();
    loop {
        let more: Vec<u32> = kiln_tests::sandbox::processes()
            .into_iter()
            .map(|(pid, _)| pid)
            .filter(|pid| !pids.contains(pid) && parent(*pid).is_some_and(|p| pids.contains(&p)))
            .collect();
        if more.is_empty() {
            return pids;
        }
        pids.extend(more);
    }
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Memory of a set of processes, KiB: resident (anonymous, file pages, shared memory; each
/// process counted whole) and proportional (shared pages divided among their users).
#[derive(Debug, Default, Clone, Copy)]
struct Mem {
    anon: u64,
    file: u64,
    shmem: u64,
    pss: u64,
}

fn kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn memory(pids: &[u32]) -> Mem {
    let mut m = Mem::default();
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        m.anon += kib(&status, "RssAnon:");
        m.file += kib(&status, "RssFile:");
        m.shmem += kib(&status, "RssShmem:");
        m.pss += kib(&rollup, "Pss:");
    }
    m
}

/// What a sandbox disk can leave on the host under `home`: mounts, loop devices backed by a
/// file there, and disk images.
fn leftovers(home: &Path) -> Vec<String> {
    let home = home.to_string_lossy().into_owned();
    let mut out = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mounts.lines() {
        if let Some(at) = l.split(' ').nth(4).filter(|at| at.starts_with(&home)) {
            out.push(format!("mount {at}"));
        }
    }
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = e.path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(&backing) {
            if b.starts_with(&home) {
                out.push(format!("{}: {}", e.file_name().to_string_lossy(), b.trim()));
            }
        }
    }
    for e in std::fs::read_dir(Path::new(&home).join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for name in ["disk.img", "disk"] {
            if e.path().join(name).exists() {
                out.push(format!("{}", e.path().join(name).display()));
            }
        }
    }
    out
}

/// Waits (bounded: a loop device is cleared a moment after its last user goes) until nothing
/// of any sandbox disk is left under the home; panics with what is.
fn assert_nothing_left(k: &Kiln, what: &str) {
    let t = std::time::Instant::now();
    loop {
        let left = leftovers(&k.home);
        if left.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: left {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes used on the sandbox's disk, as the host sees it.
fn disk_used(k: &Kiln, id: &str) -> u64 {
    let p = k.home.join("sandboxes").join(id).join("disk");
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: statvfs writes one struct into st; all-zero is a valid initial value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a struct to write.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs {}", p.display());
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

fn id_of(rec: &serde_json::Value) -> String {
    rec["id"].as_str().unwrap().to_string()
}

#[test]
fn two_gib_written_stay_on_disk_not_in_ram_and_survive_pause_resume() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let rec = create(&k, &["app", "--memory", "512", "--disk", "2560"]);
    assert_eq!(rec["disk_mib"], 2560);
    let id = id_of(&rec);
    let before = memory(&sandbox_processes(&k, &id));

    // 2 GiB of zeros with random stretches in it (at the start, the middle and the end), so
    // the checksum proves where every byte went; zeros keep the checkpoint small.
    let t = std::time::Instant::now();
    sh(
        &k,
        &id,
        "dd if=/dev/zero of=/work/big bs=1M count=2048 2>/dev/null && \
         for at in 0 1000 2040; do \
           dd if=/dev/urandom of=/work/big bs=1M count=8 seek=$at conv=notrunc 2>/dev/null; \
         done",
    );
    let wrote = t.elapsed();
    let after = memory(&sandbox_processes(&k, &id));
    let sum = sh(&k, &id, "md5sum /work/big");
    assert_eq!(
        sh(&k, &id, "stat -c %s /work/big"),
        format!("{}\n", 2u64 << 30)
    );
    let used = disk_used(&k, &id);
    let read = memory(&sandbox_processes(&k, &id));
    eprintln!(
        "2 GiB written in {wrote:?}; host disk used {} MiB; sandbox memory KiB before \
         {before:?}, after writing {after:?}, after reading it all {read:?}",
        used >> 20
    );
    assert!(
        used >= 2 << 30,
        "the data is on the sandbox's disk: {used} bytes used"
    );
    // In memory (the old overlay) the sandbox held the 2 GiB as shared memory. Writes are
    // pwrites into the filestore: its processes hold what they held before.
    let grew = |m: Mem| (m.anon + m.shmem).saturating_sub(before.anon + before.shmem);
    assert!(grew(after) < 128 << 10, "memory after writing: {after:?}");
    assert!(after.pss < 256 << 10, "PSS after writing: {after:?}");
    // Reads go through the sentry's mapping of the filestore: its page cache then shows as
    // the sentry's RssFile (reclaimable, unlike shared memory), nothing else grows.
    assert!(grew(read) < 128 << 10, "memory after reading: {read:?}");

    let t = std::time::Instant::now();
    k.ok(["sandbox", "pause", &id]);
    let paused = t.elapsed();
    assert_nothing_left(&k, "paused");
    let t = std::time::Instant::now();
    k.ok(["sandbox", "resume", &id]);
    let resumed = t.elapsed();
    eprintln!("pause {paused:?}, resume {resumed:?}");
    assert_eq!(
        sh(&k, &id, "md5sum /work/big"),
        sum,
        "the data after resume"
    );
    // Restored onto a new disk: the random stretches (the checkpoint dropped the zeros, which
    // read back as zeros all the same).
    let used = disk_used(&k, &id);
    assert!(used >= 24 << 20, "{used} bytes on the restored disk");
    k.ok(["sandbox", "kill", &id]);
    assert_nothing_left(&k, "killed");
}

#[test]
fn writing_past_the_disk_size_fails_inside_and_the_sandbox_lives_on() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = id_of(&create(&k, &["app", "--disk", "64"]));
    sh(
        &k,
        &id,
        "dd if=/dev/urandom of=/work/keep bs=1M count=2 2>/dev/null",
    );
    let keep = sh(&k, &id, "md5sum /work/keep");

    let (_, err, code) = exec(
        &k,
        &id,
        &[],
        &["sh", "-c", "dd if=/dev/zero of=/work/fill bs=1M count=128"],
        b"",
    );
    assert_ne!(code, 0, "128 MiB on a 64 MiB disk: {err}");
    assert!(err.contains("No space left on device"), "{err}");
    // It filled the disk up to its size (give or take a MiB), no further.
    let filled: u64 = sh(&k, &id, "stat -c %s /work/fill").trim().parse().unwrap();
    let total = (filled >> 20) + 2;
    assert!(
        (62..=65).contains(&total),
        "{total} MiB written on a 64 MiB disk"
    );
    // The sandbox answers, its other files are intact, and freed space is free again.
    assert_eq!(sh(&k, &id, "echo alive"), "alive\n");
    assert_eq!(sh(&k, &id, "md5sum /work/keep"), keep);
    sh(&k, &id, "rm /work/fill");
    sh(
        &k,
        &id,
        "dd if=/dev/zero of=/work/again bs=1M count=48 2>/dev/null && rm /work/again",
    );
    // Full again, of data a checkpoint keeps (it drops all-zero pages: they read back as
    // zeros and take no room after a restore), and a pause and resume carry the full disk.
    exec(
        &k,
        &id,
        &[],
        &["sh", "-c", "dd if=/dev/urandom of=/work/fill bs=1M"],
        b"",
    );
    k.ok(["sandbox", "pause", &id]);
    k.ok(["sandbox", "resume", &id]);
    assert_eq!(sh(&k, &id, "md5sum /work/keep"), keep);
    let (_, err, code) = exec(
        &k,
        &id,
        &[],
        &["sh", "-c", "dd if=/dev/zero of=/work/more bs=1M count=8"],
        b"",
    );
    assert!(
        code != 0 && err.contains("No space left on device"),
        "{err}"
    );
    assert_eq!(sh(&k, &id, "echo alive"), "alive\n");
    k.ok(["sandbox", "kill", &id]);
    assert_nothing_left(&k, "killed");

    // Bad sizes are refused before anything starts.
    for bad in ["0", "-1", "99999999999"] {
        let out = k.run(["sandbox", "create", "app", "--disk", bad]);
        assert!(!out.status.success(), "--disk {bad}");
    }
    assert_nothing_left(&k, "refused");
}

#[test]
fn forks_have_disks_of_their_own_and_kills_and_crashes_leave_nothing() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = id_of(&create(&k, &["app", "--disk", "128"]));
    sh(&k, &id, "echo parent > /work/f");
    let forks = k.json(["sandbox", "fork", &id, "-n", "2", "--json"]);
    let forks: Vec<String> = forks.as_array().unwrap().iter().map(id_of).collect();
    assert_eq!(forks.len(), 2);
    for (i, f) in forks.iter().enumerate() {
        assert_eq!(sh(&k, f, "cat /work/f"), "parent\n");
        sh(
            &k,
            f,
            &format!(
                "echo fork{i} > /work/f; dd if=/dev/zero of=/work/z bs=1M count=16 2>/dev/null"
            ),
        );
    }
    // Each wrote its own disk.
    for (i, f) in forks.iter().enumerate() {
        assert_eq!(sh(&k, f, "cat /work/f"), format!("fork{i}\n"));
        assert!(disk_used(&k, f) >= 16 << 20);
    }
    assert_eq!(sh(&k, &id, "cat /work/f"), "parent\n");
    for s in forks.iter().chain([&id]) {
        k.ok(["sandbox", "kill", s]);
    }
    assert_nothing_left(&k, "forks killed");

    // kill -9 of kiln at moments across create, pause, resume and kill: the next command
    // (ls reconciles) finishes or rolls back, and once everything is killed nothing is left.
    let id = id_of(&create(&k, &["app", "--disk", "128", "--name", "crash"]));
    for ms in [5u64, 40, 120, 300, 700] {
        let d = Duration::from_millis(ms);
        killed_after(&k, &["sandbox", "create", "app", "--disk", "128"], d);
        killed_after(&k, &["sandbox", "pause", "crash"], d);
        k.ok(["sandbox", "ls"]);
        killed_after(&k, &["sandbox", "resume", "crash"], d);
        k.ok(["sandbox", "ls"]);
    }
    for s in kiln_tests::sandbox::ids(&k) {
        if s != id {
            killed_after(&k, &["sandbox", "kill", &s], Duration::from_millis(20));
        }
    }
    k.ok(["sandbox", "ls"]);
    for s in kiln_tests::sandbox::ids(&k) {
        k.ok(["sandbox", "kill", &s]);
    }
    assert!(kiln_tests::sandbox::ids(&k).is_empty());
    assert_nothing_left(&k, "after kill -9s");
}
