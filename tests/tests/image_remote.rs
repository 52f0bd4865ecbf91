//! `kiln image push` / `kiln image pull-from-remote` through a real SeaweedFS: an image
//! imported in one home, pushed, and pulled into an empty home exports the same disk bytes.

use kiln_tests::registry::{busybox_layout, have};
use kiln_tests::s3::{S3Server, BUCKET};
use kiln_tests::Kiln;

#[test]
fn image_pushed_from_one_home_exports_identically_from_another() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: image import needs root (chown, mknod)");
        return;
    }
    if !have("mkfs.ext4") {
        eprintln!("SKIP: e2fsprogs (mkfs.ext4) not installed");
        return;
    }
    let Some(s3) =
        S3Server::start_or_skip("image_pushed_from_one_home_exports_identically_from_another")
            .unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let Some(layout) = busybox_layout(tmp.path(), "bb") else {
        return;
    };
    let a = Kiln::new(tmp.path().join("a")).with_env(s3.env());
    let b = Kiln::new(tmp.path().join("b")).with_env(s3.env());
    let url = format!("s3://{BUCKET}/images");
    for k in [&a, &b] {
        s3.add_origin(k, &url);
    }

    a.ok([
        "image",
        "import",
        &format!("oci:{}:bb", layout.display()),
        "bb",
    ]);
    let rec_a = a.json(["image", "inspect", "bb", "--json"]);
    let id = a.ok_str(["image", "push", "bb", "--remote", "origin"]);
    assert_eq!(
        serde_json::json!(id),
        rec_a["id"],
        "push prints the image id"
    );

    // An id the remote does not hold: a clear error, and no name left behind.
    let missing = "ab".repeat(32);
    let err = b.fails(["image", "pull-from-remote", &missing, "--name", "ghost"]);
    assert!(err.contains(&missing[..16]), "{err}");
    assert!(b.fails(["image", "inspect", "ghost"]).contains("ghost"));

    // B knows nothing of the image until it pulls it.
    assert!(b.fails(["image", "inspect", &id]).contains(&id[..8]));
    let out = b.ok_str(["image", "pull-from-remote", &id, "--name", "copy"]);
    assert!(out.starts_with(&id), "{out}");
    let rec_b = b.json(["image", "inspect", "copy", "--json"]);
    assert_eq!(rec_a, rec_b, "same record (id, disk, layers, config)");
    // Only manifests came over: the disk's data is still all remote.
    let disk = rec_b["record"]["disk"].as_str().unwrap();
    let st = b.json(["store", "stat", disk, "--json"]);
    assert_eq!(st["local_chunks"], 0, "pull fetches manifests only: {st}");

    let (da, db) = (tmp.path().join("a.ext4"), tmp.path().join("b.ext4"));
    a.ok(["image", "export", "bb", "-o", da.to_str().unwrap()]);
    b.ok(["image", "export", "copy", "-o", db.to_str().unwrap()]);
    let (da, db) = (std::fs::read(da).unwrap(), std::fs::read(db).unwrap());
    assert_eq!(
        da.len() as u64,
        rec_a["record"]["disk_size"].as_u64().unwrap()
    );
    assert!(da == db, "exported disks differ");
    // The layers came along too: a pulled image can be materialized (e.g. as a build base).
    for l in rec_b["record"]["layers"].as_array().unwrap() {
        let st = b.json(["store", "stat", l.as_str().unwrap(), "--json"]);
        assert!(st["size"].as_u64().unwrap() > 0, "{st}");
    }

    // A home whose default remote is another (empty) one pulls with `--remote origin`: every
    // fetch must go to origin, also the data later commands read, which only attach the
    // default remote. So the data comes over now, and export works without origin.
    let c = Kiln::new(tmp.path().join("c")).with_env(s3.env());
    c.ok([
        "remote",
        "add",
        "empty",
        &format!("s3://{BUCKET}/empty"),
        "--endpoint",
        &s3.endpoint(),
    ]);
    s3.add_origin(&c, &url);
    // Through the default remote the image is not found.
    let err = c.fails(["image", "pull-from-remote", &id, "--name", "x"]);
    assert!(err.contains(&id[..16]), "{err}");
    let out = c.run([
        "image",
        "pull-from-remote",
        &id,
        "--name",
        "viaorigin",
        "--remote",
        "origin",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("from \"origin\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = c.json(["store", "stat", disk, "--json"]);
    assert!(
        st["local_chunks"].as_u64().unwrap() > 0,
        "data fetched now: {st}"
    );
    // Forget origin entirely: the image still exports, identical.
    c.ok(["remote", "rm", "origin"]);
    let dc = tmp.path().join("c.ext4");
    c.ok(["image", "export", "viaorigin", "-o", dc.to_str().unwrap()]);
    assert!(
        std::fs::read(&dc).unwrap() == da,
        "export after pull --remote origin differs"
    );
    assert_eq!(
        c.json(["image", "inspect", "viaorigin", "--json"]),
        rec_a,
        "same record"
    );
}
