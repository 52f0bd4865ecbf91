//! The block-level step cache with a real Dockerfile of the most common kind: a Debian base
//! from a local registry, `apt-get install python3-minimal`, `COPY app.py`, `RUN python3 -m
//! compileall`. Checked: the image runs python3 (its disk loop-mounted read-only, the app run
//! in a chroot), a one-file change reruns only the steps from that COPY on and gives the disk
//! a build from scratch of the same step results gives (`--redo-disks`), the step cache shared
//! through SeaweedFS (a second, empty home reuses the first home's apt step and fetches only
//! some chunks, and builds the same disk), and every disk passes `e2fsck -fn`.
//!
//! The apt step reaches deb.debian.org (KILN_DEBIAN_MIRROR is not used by apt inside the
//! image); the test SKIPs with the reason when it cannot.

use kiln_tests::registry::{build_steps, can_build_or_skip, debian_layout, Registry};
use kiln_tests::s3::{S3Server, BUCKET};
use kiln_tests::Kiln;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fsck(disk: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck {}: {}",
        disk.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A read-only loop mount, unmounted on drop (also when an assertion fails).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Runs `argv` chrooted into the exported disk `disk`; returns stdout.
fn run_in(disk: &Path, mnt: &Path, argv: &[&str]) -> String {
    std::fs::create_dir_all(mnt).unwrap();
    let st = Command::new("mount")
        .args(["-o", "loop,ro,noload"])
        .arg(disk)
        .arg(mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount {}", disk.display());
    let _m = Mounted(mnt.to_path_buf());
    let out = Command::new("chroot")
        .arg(mnt)
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?} in the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn export(k: &Kiln, name: &str, to: &Path) -> PathBuf {
    k.ok(["image", "export", name, "-o", to.to_str().unwrap()]);
    fsck(to);
    to.to_path_buf()
}

#[test]
fn debian_apt_steps_cached_at_block_level_and_shared_through_s3() {
    if !can_build_or_skip(&["skopeo", "mkfs.ext4", "debugfs", "e2fsck", "chroot"]) {
        return;
    }
    let Some(layout) = debian_layout() else {
        return;
    };
    let Some(reg) = Registry::start() else {
        return;
    };
    let s3 = S3Server::start_or_skip("debian_apt_steps_cached_at_block_level").unwrap();
    reg.push(&layout, "base", "tests/debian:bookworm");
    let r = format!("{}/tests/debian:bookworm", reg.addr());
    let tmp = tempfile::tempdir().unwrap();
    let env = s3.as_ref().map(|s| s.env()).unwrap_or_default();
    // Each home its own KILN_TMPDIR (tmpfs, as the default), so B shares no extracted tree,
    // step tree or working disk with A: an empty machine.
    let shm = tempfile::Builder::new()
        .prefix("kiln-build-cache-test")
        .tempdir_in("/dev/shm")
        .unwrap();
    let tmpdir = |h: &str| {
        let d = shm.path().join(h);
        vec![("KILN_TMPDIR".to_string(), d.to_str().unwrap().to_string())]
    };
    let a = Kiln::new(tmp.path().join("a"))
        .with_env(env.clone())
        .with_env(tmpdir("a"));
    let b = Kiln::new(tmp.path().join("b"))
        .with_env(env)
        .with_env(tmpdir("b"));
    let url = format!("s3://{BUCKET}/build-cache");
    if let Some(s3) = &s3 {
        for k in [&a, &b] {
            s3.add_origin(k, &url);
        }
    }
    let push: &[&str] = if s3.is_some() { &["--cache-to"] } else { &[] };

    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    // The last RUN resets the times it leaves (the compiled file and directories would carry
    // the build's clock): so two homes can be compared byte for byte.
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {r}\n\
             RUN apt-get update && apt-get install -y --no-install-recommends python3-minimal\n\
             COPY app.py /app/\n\
             RUN python3 -m compileall -q /app && find /app -exec touch -h -d @0 {{}} +\n\
             CMD [\"python3\", \"/app/app.py\"]\n"
        ),
    )
    .unwrap();
    let app = |v: &str| {
        std::fs::write(ctx.join("app.py"), format!("print('app {v}')\n")).unwrap();
    };
    let c = ctx.to_str().unwrap();
    let build = |k: &Kiln, extra: &[&str]| -> Result<serde_json::Value, String> {
        let mut args = vec!["build", "--json"];
        args.extend_from_slice(extra);
        args.push(c);
        let out = k.run(&args);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    };

    // Cold, in home A (and pushed).
    app("v1");
    let mut args = vec!["-t", "app"];
    args.extend_from_slice(push);
    let v1 = match build(&a, &args) {
        Ok(v) => v,
        Err(e) if e.contains("RUN failed") && e.contains("apt-get") => {
            eprintln!(
                "SKIP: apt-get inside the build cannot reach the Debian mirror: {}",
                e.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
            );
            return;
        }
        Err(e) => panic!("cold build failed: {e}"),
    };
    assert_eq!(v1["cached"], false);
    let d1 = export(&a, "app", &tmp.path().join("v1.ext4"));
    let mnt = tmp.path().join("mnt");
    assert_eq!(run_in(&d1, &mnt, &["python3", "/app/app.py"]), "app v1\n");
    // compileall ran inside the build and its output is in the image.
    assert!(run_in(&d1, &mnt, &["ls", "/app/__pycache__"]).contains("app.cpython-"));

    // No change: the image from the cache.
    let same = build(&a, &["-t", "app"]).unwrap();
    assert_eq!(same["cached"], true);
    assert_eq!(same["image"], v1["image"]);

    // One file changed: the apt step is reused, the COPY and what follows rerun.
    app("v2");
    let mut args = vec!["-t", "app2"];
    args.extend_from_slice(push);
    let v2 = build(&a, &args).unwrap();
    let s = build_steps(&v2);
    assert_eq!(s.len(), 3, "{s:?}");
    assert!(s[0].1 && !s[1].1 && !s[2].1, "{s:?}");
    let d2 = export(&a, "app2", &tmp.path().join("v2.ext4"));
    assert_eq!(run_in(&d2, &mnt, &["python3", "/app/app.py"]), "app v2\n");
    // Stored: the two small steps' layers and the chunks their disk changes touch, far less
    // than the apt step stored.
    let stored = v2["stored_bytes"].as_u64().unwrap();
    let cold_stored = v1["stored_bytes"].as_u64().unwrap();
    eprintln!("stored: cold {cold_stored} bytes, one-file rebuild {stored} bytes");
    assert!(stored * 10 < cold_stored, "{stored} vs {cold_stored}");

    // The same step results with every step disk made again from the layers: the same disk.
    let redo = build(&a, &["-t", "app2-redo", "--redo-disks"]).unwrap();
    assert!(build_steps(&redo).iter().all(|(_, c)| *c), "{redo}");
    assert_eq!(redo["disk"], v2["disk"], "step disks from the cache differ");

    let Some(_s3) = s3 else {
        return; // start_or_skip said why
    };
    // Home B, empty: the image A pushed comes from the remote's step cache, manifests only.
    let b2 = build(&b, &["-t", "app2", "--cache-from"]).unwrap();
    assert_eq!(b2["cached"], true, "{b2}");
    assert_eq!(b2["image"], v2["image"]);
    let fetched = b2["remote_chunks_fetched"].as_u64().unwrap();
    assert!(fetched < 16, "a cached image fetched {fetched} chunks");

    // A new app.py in B: the apt step from A, only the last two steps run here, and only
    // the chunks they read are fetched.
    app("v3");
    let b3 = build(&b, &["-t", "app3", "--cache-from"]).unwrap();
    let s = build_steps(&b3);
    assert!(s[0].1 && !s[1].1 && !s[2].1, "{s:?}");
    let fetched = b3["remote_chunks_fetched"].as_u64().unwrap();
    let db3 = export(&b, "app3", &tmp.path().join("b3.ext4"));
    assert_eq!(run_in(&db3, &mnt, &["python3", "/app/app.py"]), "app v3\n");
    let disk = b3["disk"].as_str().unwrap();
    let st = b.json(["store", "stat", disk, "--json"]);
    let apt_layer = v1["steps"][0]["layer"].as_str().unwrap();
    let lt = a.json(["store", "stat", apt_layer, "--json"]);
    let whole = st["unique_chunks"].as_u64().unwrap() + lt["unique_chunks"].as_u64().unwrap();
    eprintln!("home B fetched {fetched} of {whole} chunks");
    assert!(fetched > 0 && fetched < whole, "{fetched} of {whole}");

    // Determinism across homes: A builds the same inputs locally to the same disk.
    let a3 = build(&a, &["-t", "app3"]).unwrap();
    assert_eq!(a3["disk"], b3["disk"], "two homes, two disks");
}

/// The step records of a home (decoded from the store's name files): (name, record id).
fn cache_records(k: &Kiln) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(k.store_dir().join("names")).unwrap() {
        let e = e.unwrap();
        // Name files are named by the hex of the name.
        let hexname = e.file_name().to_string_lossy().into_owned();
        let bytes: Option<Vec<u8>> = (0..hexname.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hexname.get(i..i + 2)?, 16).ok())
            .collect();
        let Some(name) = bytes.and_then(|b| String::from_utf8(b).ok()) else {
            continue;
        };
        if name.starts_with("cache:") {
            let id = std::fs::read_to_string(e.path()).unwrap();
            out.push((name, id.trim().to_string()));
        }
    }
    out
}

/// kill -9 of builds at many moments (steps running, layers and disks being stored, the
/// working disk being updated): afterwards every step record names blobs that exist, the next
/// build succeeds with an e2fsck-clean disk, and that disk is the one the steps' layers give
/// when every step disk is made again (so no working disk was left wrong but marked good).
#[test]
fn killed_builds_leave_the_step_cache_consistent() {
    let Some((tmp, k)) = kiln_tests::registry::busybox_build_home() else {
        return;
    };
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM bb\n\
         RUN i=0; while [ $i -lt 400 ]; do echo line $i >> /many; i=$((i+1)); done\n\
         COPY a.txt /a.txt\n\
         RUN cat /a.txt /many > /both && touch -d @0 /both\n",
    )
    .unwrap();
    let c = ctx.to_str().unwrap();
    for i in 0..14u64 {
        std::fs::write(ctx.join("a.txt"), format!("round {i}\n")).unwrap();
        let mut cmd = k.cmd(["build", "-t", "k"]);
        if i % 3 == 0 {
            cmd.arg("--no-cache");
        }
        let mut child = cmd
            .arg(c)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20 + (i * 37) % 400));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    std::fs::write(ctx.join("a.txt"), "final\n").unwrap();
    let rep = k.json(["build", "-t", "k", "--json", c]);
    let disk = tmp.path().join("k.ext4");
    export(&k, "k", &disk);
    let records = cache_records(&k);
    assert!(!records.is_empty());
    for (name, id) in &records {
        let f = tmp.path().join("rec.json");
        k.ok(["store", "get", id, "-o", f.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        let mut refs: Vec<&serde_json::Value> = vec![&v["layer"], &v["disk"]];
        if let Some(layers) = v["layers"].as_array() {
            refs.extend(layers); // the image record of a final key
        }
        for r in refs.into_iter().filter_map(|r| r.as_str()) {
            let st = k.run(["store", "stat", r]);
            assert!(st.status.success(), "{name} names {r}, which is missing");
        }
    }
    let out = k.run(["store", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let redo = k.json(["build", "-t", "k-redo", "--json", "--redo-disks", c]);
    assert_eq!(redo["disk"], rep["disk"]);
}
