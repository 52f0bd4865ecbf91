//! `kiln image import` of OCI layouts and docker-archives: contents, config, determinism,
//! and the bad inputs (malicious layers, digest mismatch) that must leave no image behind.

use kiln_tests::registry::{busybox_layout, have};
use kiln_tests::Kiln;
use std::path::Path;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: image tests need root (chown, mknod, namespaces)");
        return false;
    }
    if !have("mkfs.ext4") || !have("debugfs") {
        eprintln!("SKIP: e2fsprogs (mkfs.ext4, debugfs) not installed");
        return false;
    }
    true
}

/// `debugfs -R "cat PATH"` on an exported disk.
fn disk_cat(disk: &Path, path: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(disk)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn entry(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    // Raw name bytes: the tar crate's own setters refuse `..`, which is the point here.
    let g = h.as_gnu_mut().expect("gnu header");
    g.name[..path.len()].copy_from_slice(path.as_bytes());
    g.linkname[..link.len()].copy_from_slice(link.as_bytes());
    if kind == tar::EntryType::Block {
        h.set_device_major(8).expect("major");
        h.set_device_minor(0).expect("minor");
    }
    h.set_cksum();
    b.append(&h, data).expect("append");
}

/// A docker-archive with one layer built by `layer`, and an optional wrong diff_id.
fn docker_archive(
    dir: &Path,
    name: &str,
    layer: impl FnOnce(&mut tar::Builder<Vec<u8>>),
    diff_id: Option<&str>,
) -> std::path::PathBuf {
    let mut l = tar::Builder::new(Vec::new());
    layer(&mut l);
    let layer_bytes = l.into_inner().expect("layer tar");
    let config = match diff_id {
        Some(d) => format!(
            r#"{{"config":{{"Env":["PATH=/bin"]}},"rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        ),
        None => r#"{"config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}}"#.to_string(),
    };
    let manifest = r#"[{"Config":"config.json","RepoTags":["x:1"],"Layers":["l/layer.tar"]}]"#;
    let mut a = tar::Builder::new(Vec::new());
    for (p, d) in [
        ("manifest.json", manifest.as_bytes()),
        ("config.json", config.as_bytes()),
        ("l/layer.tar", &layer_bytes[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        a.append_data(&mut h, p, d).expect("append");
    }
    let path = dir.join(name);
    std::fs::write(&path, a.into_inner().expect("archive")).expect("write archive");
    path
}

#[test]
fn import_oci_layout_gives_a_deterministic_disk_with_config() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(layout) = busybox_layout(tmp.path(), "bb") else {
        return;
    };
    let k1 = Kiln::new(tmp.path().join("home1"));
    let k2 = Kiln::new(tmp.path().join("home2"));
    let src = format!("oci:{}:bb", layout.display());
    k1.ok(["image", "import", &src, "bb"]);
    k2.ok(["image", "import", &src, "other-name"]);
    let a = k1.json(["image", "inspect", "bb", "--json"]);
    let b = k2.json(["image", "inspect", "other-name", "--json"]);
    // Same input, two stores, two extractions: same disk blob id.
    assert_eq!(a["record"]["disk"], b["record"]["disk"]);
    assert_eq!(a["record"]["config"]["cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(a["record"]["config"]["workdir"], "/root");
    let disk = tmp.path().join("bb.ext4");
    k1.ok(["image", "export", "bb", "-o", disk.to_str().unwrap()]);
    let cfg: serde_json::Value =
        serde_json::from_str(&disk_cat(&disk, "/.kiln/config.json")).expect("config in disk");
    assert_eq!(cfg["env"], serde_json::json!(["PATH=/bin"]));
    assert!(disk_cat(&disk, "/etc/passwd").contains("app:x:1000"));
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // ls, tag, rm.
    k1.ok(["image", "tag", "bb", "bb2"]);
    let ls = k1.json(["image", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 2);
    k1.ok(["image", "rm", "bb"]);
    let ls = k1.json(["image", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert!(k1.fails(["image", "inspect", "bb"]).contains("not found"));
}

#[test]
fn malicious_layers_are_refused_and_nothing_is_tagged() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    let victim_s = victim.to_str().unwrap().to_string();
    type Layer = Box<dyn FnOnce(&mut tar::Builder<Vec<u8>>)>;
    let cases: Vec<(&str, Layer, &str)> = vec![
        (
            "dotdot",
            Box::new(|b| entry(b, tar::EntryType::Regular, "../../evil", "", b"x")),
            "`..`",
        ),
        (
            "abs-symlink",
            Box::new(move |b| {
                entry(b, tar::EntryType::Symlink, "esc", &victim_s, b"");
                entry(b, tar::EntryType::Regular, "esc/evil", "", b"x");
            }),
            "outside the root",
        ),
        (
            "rel-symlink",
            Box::new(|b| {
                entry(
                    b,
                    tar::EntryType::Symlink,
                    "d",
                    "../../../../../../../../tmp",
                    b"",
                );
                entry(b, tar::EntryType::Regular, "d/evil", "", b"x");
            }),
            "outside the root",
        ),
        (
            "hardlink-out",
            Box::new(|b| entry(b, tar::EntryType::Link, "h", "../../../../etc/passwd", b"")),
            "outside the root",
        ),
        (
            "device",
            Box::new(|b| entry(b, tar::EntryType::Block, "dev/sda", "", b"")),
            "device nodes are not allowed",
        ),
    ];
    let k = Kiln::new(tmp.path().join("home"));
    for (name, layer, want) in cases {
        let a = docker_archive(tmp.path(), &format!("{name}.tar"), layer, None);
        let err = k.fails([
            "image",
            "import",
            &format!("docker-archive:{}", a.display()),
            name,
        ]);
        assert!(err.contains(want), "{name}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(&victim).unwrap().count(),
        0,
        "wrote outside the root"
    );
    assert!(!Path::new("/tmp/evil").exists());
    let ls = k.json(["image", "ls", "--json"]);
    assert_eq!(
        ls,
        serde_json::json!([]),
        "a failed import tagged something"
    );
}

#[test]
fn digest_mismatch_is_refused() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path().join("home"));
    let wrong = format!("sha256:{}", "0".repeat(64));
    let a = docker_archive(
        tmp.path(),
        "m.tar",
        |b| entry(b, tar::EntryType::Regular, "f", "", b"data"),
        Some(&wrong),
    );
    let err = k.fails([
        "image",
        "import",
        &format!("docker-archive:{}", a.display()),
        "m",
    ]);
    assert!(err.contains("digest mismatch"), "{err}");
    // A corrupted blob in an OCI layout.
    let Some(layout) = busybox_layout(tmp.path(), "bb") else {
        return;
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&mdigest[7..])).unwrap(),
    )
    .unwrap();
    let ldigest = manifest["layers"][0]["digest"].as_str().unwrap();
    let lpath = layout.join("blobs/sha256").join(&ldigest[7..]);
    let mut bytes = std::fs::read(&lpath).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&lpath, bytes).unwrap();
    let err = k.fails([
        "image",
        "import",
        &format!("oci:{}:bb", layout.display()),
        "bb",
    ]);
    assert!(err.contains("digest mismatch"), "{err}");
    assert_eq!(k.json(["image", "ls", "--json"]), serde_json::json!([]));
}
