//! `kiln build` against `buildah bud --isolation chroot --layers` on the same Dockerfile and
//! context, same run: cold build (`--no-cache`, base image already local), no-change rebuild,
//! one-file-change rebuild; plus bytes stored per step against the step's layer tar.
//!
//! `cargo run --release -p kiln-benches --bin image_build [-- --runs 3 --base debian|busybox]`
//!
//! Base: a Debian bookworm minbase root file system if one is cached at
//! /var/cache/kiln-bench/debian-rootfs (made by `debootstrap --variant=minbase bookworm`, see
//! README), else the busybox root file system the tests use. Prints one JSON object.
//!
//! kiln keeps extracted base trees in `KILN_TMPDIR/rootfs-cache` (an import leaves its tree
//! there, as buildah's storage holds the extracted base). Unless `KILN_TMPDIR` is set, the bench
//! uses a fresh one under /dev/shm, so nothing from earlier runs is warm, and removes it after.

use kiln_tests::registry::{busybox_rootfs, have};
use kiln_tests::Kiln;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_tests::registry::DEBIAN_ROOTFS;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An OCI layout holding `rootfs` as tag `base` (umoci), cached next to a cached rootfs.
fn layout_for(rootfs: &Path, at: &Path) -> anyhow::Result<PathBuf> {
    let layout = at.join("oci");
    if layout.join("index.json").exists() {
        return Ok(layout);
    }
    let image = format!("{}:base", layout.display());
    sh(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))?;
    sh(Command::new("umoci").args(["new", "--image", &image]))?;
    sh(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(rootfs)
        .arg("/"))?;
    sh(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.cmd",
        "/bin/sh",
    ]))?;
    Ok(layout)
}

fn write_context(ctx: &Path, base: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(ctx.join("src"))?;
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            r#"FROM {base}
ENV APP=/app
WORKDIR /app
RUN mkdir -p /opt/tool && i=0 && while [ $i -lt 2000 ]; do echo "line $i"; i=$((i+1)); done > /opt/tool/data
COPY deps.txt /app/deps.txt
RUN cat /app/deps.txt /opt/tool/data > /app/combined.txt
COPY src/ /app/src/
RUN ls /app/src > /app/manifest.txt
CMD ["/bin/sh"]
"#
        ),
    )?;
    std::fs::write(ctx.join("deps.txt"), "dep-a\ndep-b\ndep-c\n")?;
    for i in 0..50 {
        std::fs::write(
            ctx.join(format!("src/file{i}.txt")),
            kiln_tests::pseudo_random(4096, i),
        )?;
    }
    Ok(())
}

fn timed(cmd: &mut Command) -> anyhow::Result<(f64, String)> {
    let t = Instant::now();
    let out = sh(cmd)?;
    Ok((t.elapsed().as_secs_f64(), out))
}

fn main() -> anyhow::Result<()> {
    let runs: usize = arg("--runs", 3);
    // Bench binaries sit next to `kiln` in <target>/<profile>/ (tests sit one level deeper).
    if std::env::var_os("KILN_BIN").is_none() {
        let kiln = std::env::current_exe()?.with_file_name("kiln");
        anyhow::ensure!(
            kiln.exists(),
            "{} missing: cargo build [--release] -p kiln first",
            kiln.display()
        );
        std::env::set_var("KILN_BIN", kiln);
    }
    let want_base: String = arg(
        "--base",
        if Path::new(DEBIAN_ROOTFS).join("etc/debian_version").exists() {
            "debian".to_string()
        } else {
            "busybox".to_string()
        },
    );
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "image_build needs root (namespaces, chroot)"
    );
    anyhow::ensure!(have("umoci"), "umoci is needed (apt-get install umoci)");
    let tmp = tempfile::tempdir()?;
    let _kiln_tmp = if std::env::var_os("KILN_TMPDIR").is_none() {
        let d = tempfile::Builder::new()
            .prefix("kiln-bench-tmp")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                Path::new("/dev/shm")
            } else {
                tmp.path()
            })?;
        std::env::set_var("KILN_TMPDIR", d.path());
        Some(d)
    } else {
        None
    };
    let (rootfs, layout_dir) = if want_base == "debian" {
        // The tests' helper: debootstraps once into the shared cache, or says why it cannot.
        let rootfs = kiln_tests::registry::debian_rootfs()
            .ok_or_else(|| anyhow::anyhow!("no Debian root at {DEBIAN_ROOTFS} (see above)"))?;
        let layout_dir = rootfs.parent().expect("cache dir").join("debian");
        (rootfs, layout_dir)
    } else {
        let r = busybox_rootfs(tmp.path())
            .ok_or_else(|| anyhow::anyhow!("a static busybox is needed"))?;
        (r, tmp.path().join("bb"))
    };
    std::fs::create_dir_all(&layout_dir)?;
    let layout = layout_for(&rootfs, &layout_dir)?;
    let base_src = format!("oci:{}:base", layout.display());

    // kiln.
    let k = Kiln::new(tmp.path().join("home"));
    let t_import = Instant::now();
    k.ok(["image", "import", &base_src, "bench-base"]);
    let import_s = t_import.elapsed().as_secs_f64();
    let kctx = tmp.path().join("kctx");
    write_context(&kctx, "bench-base")?;
    let kc = kctx.to_str().expect("utf-8");
    let mut k_cold = Vec::new();
    let mut k_nochange = Vec::new();
    let mut k_onefile = Vec::new();
    let mut per_step = serde_json::Value::Null;
    let mut onefile_steps = serde_json::Value::Null;
    let mut cold_disk_stored = serde_json::Value::Null;
    let mut onefile_disk_stored = serde_json::Value::Null;
    let kiln = |args: &[&str]| -> anyhow::Result<(f64, serde_json::Value)> {
        let (s, out) = timed(&mut k.cmd(args))?;
        Ok((s, serde_json::from_str(&out)?))
    };
    for r in 0..runs {
        let (s, rep) = kiln(&["build", "-t", "bench", "--json", "--no-cache", kc])?;
        k_cold.push(s);
        if r == 0 {
            per_step = rep["steps"].clone();
            cold_disk_stored = rep["disk_stored_bytes"].clone();
        }
        let (s, rep) = kiln(&["build", "-t", "bench", "--json", kc])?;
        anyhow::ensure!(rep["cached"] == true, "no-change rebuild was not cached");
        k_nochange.push(s);
        std::fs::write(kctx.join("src/file0.txt"), format!("changed {r}"))?;
        let (s, rep) = kiln(&["build", "-t", "bench", "--json", kc])?;
        k_onefile.push(s);
        onefile_steps = rep["steps"].clone();
        onefile_disk_stored = rep["disk_stored_bytes"].clone();
    }

    // buildah, same Dockerfile with the same base (pulled into its storage beforehand).
    let buildah = if have("buildah") {
        let bctx = tmp.path().join("bctx");
        let base_name = "localhost/kiln-bench-base:latest";
        sh(Command::new("skopeo")
            .args(["copy", "--quiet", &base_src])
            .arg(format!("containers-storage:{base_name}")))
        .and_then(|_| {
            write_context(&bctx, base_name)?;
            let bc = bctx.to_str().expect("utf-8").to_string();
            let bud = |extra: &[&str]| {
                let mut c = Command::new("buildah");
                c.args([
                    "bud",
                    "--quiet",
                    "--isolation",
                    "chroot",
                    "--layers",
                    "-t",
                    "kiln-bench",
                ])
                .args(extra)
                .arg(&bc);
                c
            };
            let (mut cold, mut nochange, mut onefile) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..runs {
                cold.push(timed(&mut bud(&["--no-cache"]))?.0);
                nochange.push(timed(&mut bud(&[]))?.0);
                std::fs::write(bctx.join("src/file0.txt"), format!("changed {r}"))?;
                onefile.push(timed(&mut bud(&[]))?.0);
            }
            let _ = Command::new("buildah")
                .args(["rmi", "-f", "kiln-bench"])
                .output();
            let _ = Command::new("buildah")
                .args(["rmi", "-f", base_name])
                .output();
            let _ = Command::new("buildah").args(["rmi", "--prune"]).output();
            Ok(serde_json::json!({
                "cold_s": median(cold),
                "nochange_s": median(nochange),
                "onefile_s": median(onefile),
            }))
        })
        .unwrap_or_else(|e| serde_json::json!({ "unavailable": e.to_string() }))
    } else {
        serde_json::json!({ "unavailable": "buildah not installed (apt-get install buildah)" })
    };

    let kiln_res = serde_json::json!({
        "base_import_s": import_s,
        "cold_s": median(k_cold.clone()),
        "nochange_s": median(k_nochange.clone()),
        "onefile_s": median(k_onefile.clone()),
    });
    let ratio = |key: &str| match (buildah[key].as_f64(), kiln_res[key].as_f64()) {
        (Some(b), Some(k)) if k > 0.0 => serde_json::json!(b / k),
        _ => serde_json::Value::Null,
    };
    let steps = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        serde_json::json!({
                            "instruction": s["instruction"],
                            "cached": s["cached"],
                            "layer_tar_bytes": s["layer_bytes"],
                            "stored_bytes": s["stored_bytes"],
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let out = serde_json::json!({
        "bench": "image_build",
        "base": want_base,
        "runs": runs,
        "kiln": kiln_res,
        "buildah": buildah,
        "speedup_vs_buildah": {
            "cold": ratio("cold_s"),
            "nochange": ratio("nochange_s"),
            "onefile": ratio("onefile_s"),
        },
        "cold_steps": steps(&per_step),
        "onefile_steps": steps(&onefile_steps),
        "disk_stored_bytes": { "cold_first_run": cold_disk_stored, "onefile": onefile_disk_stored },
        "notes": "kiln's build ends in a deterministic ext4 disk blob in its store (the base \
                  image's disk updated and its changed chunks stored, included); buildah's in \
                  containers-storage layers. Both have the base image locally (imported: for \
                  kiln that leaves the extracted tree in its rootfs cache) before timing. \
                  Medians of --runs.",
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
