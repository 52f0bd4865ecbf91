//! `kiln build`: a multi-stage Dockerfile with RUN, COPY, ENV, WORKDIR, USER over a busybox
//! image; cache hits and misses; failing RUN; syntax errors; --isolation=vm on this host.

use kiln_tests::registry::{build_steps, busybox_build_home};
use kiln_tests::Kiln;
use std::path::Path;

fn setup() -> Option<(tempfile::TempDir, Kiln)> {
    busybox_build_home()
}

fn disk_cat(disk: &Path, path: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(disk)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=bb
FROM $BASE AS builder
ARG FLAVOR=plain
RUN echo "built $FLAVOR" > /artifact
FROM bb
ENV GREETING="hi there" \
    OTHER=1
WORKDIR /app
COPY hello.txt ./
COPY data/a .
COPY --from=builder /artifact /app/artifact
COPY --chown=app:app data/ /data/
RUN echo "$GREETING" > greeting && cat hello.txt artifact
RUN <<EOF
echo from-heredoc > /app/heredoc
EOF
USER app
RUN id -u > /tmp/uid
CMD ["/bin/sh", "-c", "cat /app/greeting"]
"#;

#[test]
fn multi_stage_build_cache_hits_and_misses() {
    let Some((tmp, k)) = setup() else { return };
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("data")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello\n").unwrap();
    std::fs::write(ctx.join("data/a"), "a\n").unwrap();
    std::fs::write(ctx.join("data/secret.key"), "no\n").unwrap();
    std::fs::write(ctx.join(".dockerignore"), "**/*.key\n").unwrap();
    let c = ctx.to_str().unwrap();

    let cold = k.json(["build", "-t", "app", "--json", c]);
    assert_eq!(cold["cached"], false);
    assert!(
        build_steps(&cold).iter().all(|(_, cached)| !cached),
        "{cold}"
    );
    let disk = tmp.path().join("app.ext4");
    k.ok(["image", "export", "app", "-o", disk.to_str().unwrap()]);
    assert_eq!(disk_cat(&disk, "/app/greeting"), "hi there\n");
    assert_eq!(disk_cat(&disk, "/app/artifact"), "built plain\n");
    assert_eq!(disk_cat(&disk, "/app/heredoc"), "from-heredoc\n");
    assert_eq!(disk_cat(&disk, "/tmp/uid"), "1000\n");
    assert_eq!(disk_cat(&disk, "/data/a"), "a\n");
    assert_eq!(
        disk_cat(&disk, "/app/a"),
        "a\n",
        "COPY into `.` (the WORKDIR)"
    );
    assert_eq!(
        disk_cat(&disk, "/data/secret.key"),
        "",
        ".dockerignore not honoured"
    );
    let stat = std::process::Command::new("debugfs")
        .args(["-R", "stat /data/a"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&stat.stdout).contains("User:  1000"),
        "--chown"
    );
    let inspect = k.json(["image", "inspect", "app", "--json"]);
    let cfg = &inspect["record"]["config"];
    assert_eq!(cfg["workdir"], "/app");
    assert_eq!(cfg["user"], "app");
    assert!(cfg["env"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("GREETING=hi there")));

    // No change: every step cached, same image.
    let again = k.json(["build", "-t", "app", "--json", c]);
    assert_eq!(again["cached"], true);
    assert_eq!(again["image"], cold["image"]);
    assert!(
        build_steps(&again).iter().all(|(_, cached)| *cached),
        "{again}"
    );

    // One COPY'd file changes: steps before it hit, it and everything after miss.
    std::fs::write(ctx.join("hello.txt"), "changed\n").unwrap();
    let changed = k.json(["build", "-t", "app", "--json", c]);
    let s = build_steps(&changed);
    let pos = s
        .iter()
        .position(|(i, _)| i.starts_with("COPY hello.txt"))
        .unwrap();
    assert!(s[..pos].iter().all(|(_, c)| *c), "{s:?}");
    assert!(!s[pos].1, "{s:?}");
    let run = s
        .iter()
        .position(|(i, _)| i.starts_with("RUN echo \"$GREETING\""))
        .unwrap();
    assert!(!s[run].1, "{s:?}");
    assert_ne!(changed["image"], cold["image"]);
    // The builder stage did not rerun.
    assert!(
        s.iter()
            .any(|(i, c)| i.starts_with("RUN echo \"built") && *c),
        "{s:?}"
    );

    // A build arg used by a RUN is a cache input; --target stops at a stage.
    let t = k.json([
        "build",
        "-t",
        "builder",
        "--json",
        "--target",
        "builder",
        "--build-arg",
        "FLAVOR=fancy",
        c,
    ]);
    let s = build_steps(&t);
    assert!(s.iter().all(|(i, _)| !i.starts_with("COPY")), "{s:?}");
    assert!(!s.last().unwrap().1, "{s:?}");
    let bdisk = tmp.path().join("b.ext4");
    k.ok(["image", "export", "builder", "-o", bdisk.to_str().unwrap()]);
    assert_eq!(disk_cat(&bdisk, "/artifact"), "built fancy\n");

    // --no-cache reruns everything.
    let nc = k.json(["build", "-t", "app", "--json", "--no-cache", c]);
    assert!(build_steps(&nc).iter().all(|(_, cached)| !cached));
}

#[test]
fn failing_run_syntax_errors_and_vm_isolation() {
    let Some((tmp, k)) = setup() else { return };
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let c = ctx.to_str().unwrap();

    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM bb\nRUN echo before-fail && exit 7\n",
    )
    .unwrap();
    let err = k.fails(["build", "-t", "bad", c]);
    assert!(err.contains("exit code 7"), "{err}");
    assert!(err.contains("before-fail"), "{err}");
    assert!(err.contains("Dockerfile:2"), "{err}");

    std::fs::write(ctx.join("Dockerfile"), "FROM bb\n\nFROBNICATE x\n").unwrap();
    let err = k.fails(["build", "-t", "bad", c]);
    assert!(err.contains("Dockerfile:3: unknown instruction"), "{err}");

    std::fs::write(ctx.join("Dockerfile"), "FROM bb\nCOPY missing.txt /x\n").unwrap();
    let err = k.fails(["build", "-t", "bad", c]);
    assert!(
        err.contains("missing.txt") && err.contains("Dockerfile:2"),
        "{err}"
    );

    std::fs::write(ctx.join("Dockerfile"), "FROM bb\nCOPY ../outside /x\n").unwrap();
    let err = k.fails(["build", "-t", "bad", c]);
    assert!(err.contains("outside the build context"), "{err}");

    std::fs::write(ctx.join("Dockerfile"), "FROM bb\nRUN true\n").unwrap();
    let err = k.fails(["build", "-t", "bad", "--isolation", "vm", c]);
    assert!(err.contains("PVM"), "{err}");

    let ls = k.json(["image", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "only the base image: {ls}");
}

#[test]
fn run_steps_get_their_own_namespaces_and_cgroup() {
    let Some((tmp, k)) = setup() else { return };
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM bb\nRUN echo $$ > /pid && cat /proc/self/cgroup > /cgroup && ls /proc | wc -l > /nprocs\n",
    )
    .unwrap();
    k.ok([
        "build",
        "-t",
        "ns",
        "--memory-mib",
        "128",
        ctx.to_str().unwrap(),
    ]);
    let disk = tmp.path().join("ns.ext4");
    k.ok(["image", "export", "ns", "-o", disk.to_str().unwrap()]);
    // pid namespace: the shell is pid 1 and sees only a handful of /proc entries.
    assert_eq!(disk_cat(&disk, "/pid"), "1\n");
    let cg = disk_cat(&disk, "/cgroup");
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let v1 = Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists();
    if v2 || v1 {
        assert!(cg.contains("kiln-build-"), "RUN not in a kiln cgroup: {cg}");
    } else {
        eprintln!("SKIP: no writable cgroups on this host; limits not checked");
    }
}

fn fsck(disk: &Path) {
    let out = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .expect("e2fsck");
    assert!(
        out.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

const MOUNTS_DOCKERFILE: &str = r#"FROM bb AS tools
RUN echo tool-output > /tool.txt
FROM bb
RUN mkdir -p /existing /gone/deep && echo keep > /existing/old && echo x > /gone/deep/f
COPY hello.txt /existing
COPY hello.txt /newfile
RUN --mount=type=cache,target=/cache,id=c1 echo run >> /cache/log && wc -l < /cache/log > /cache-count
RUN --mount=type=bind,source=data,target=/mnt cat /mnt/a > /from-bind
RUN --mount=type=bind,from=tools,source=tool.txt,target=/t.txt cat /t.txt > /from-stage
RUN --mount=type=tmpfs,target=/scratch touch /scratch/x && ls /scratch > /scratch-list
RUN rm -rf /gone /root && rm /existing/old && ln /newfile /hardlink
"#;

#[test]
fn copy_into_existing_dir_run_mounts_and_disk_from_base() {
    let Some((tmp, k)) = setup() else { return };
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("data")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), MOUNTS_DOCKERFILE).unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello\n").unwrap();
    std::fs::write(ctx.join("data/a"), "from the context\n").unwrap();
    let c = ctx.to_str().unwrap();
    let first = k.json(["build", "-t", "m", "--json", "--no-cache", c]);
    let disk = tmp.path().join("m.ext4");
    let d = disk.to_str().unwrap();
    k.ok(["image", "export", "m", "-o", d]);
    // The disk is the base image's disk updated in place: it must be a clean file system.
    fsck(&disk);
    assert_eq!(
        disk_cat(&disk, "/existing/hello.txt"),
        "hello\n",
        "COPY into a dir"
    );
    assert_eq!(disk_cat(&disk, "/newfile"), "hello\n");
    assert_eq!(disk_cat(&disk, "/hardlink"), "hello\n");
    assert_eq!(disk_cat(&disk, "/cache-count"), "1\n");
    assert_eq!(disk_cat(&disk, "/from-bind"), "from the context\n");
    assert_eq!(disk_cat(&disk, "/from-stage"), "tool-output\n");
    assert_eq!(disk_cat(&disk, "/scratch-list"), "x\n");
    let ls = |p: &str| {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("ls -l {p}")])
            .arg(&disk)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let root = ls("/");
    for gone in ["gone", "root", "cache", "mnt", "scratch", "t.txt"] {
        assert!(
            !root.split_whitespace().any(|w| w == gone),
            "/{gone} must not be in the image: {root}"
        );
    }
    assert!(!ls("/existing").contains(" old"), "{}", ls("/existing"));

    // The cache mount persists between builds (even --no-cache ones); its content is not an
    // input, so a plain rebuild is fully cached, and the image is the same.
    let again = k.json(["build", "-t", "m2", "--json", "--no-cache", c]);
    k.ok(["image", "export", "m2", "-o", d]);
    assert_eq!(disk_cat(&disk, "/cache-count"), "2\n");
    assert_ne!(again["image"], first["image"]);
    let cached = k.json(["build", "-t", "m3", "--json", c]);
    assert_eq!(cached["cached"], true, "{cached}");

    // A bind-mounted context file is an input: changing it reruns that RUN.
    std::fs::write(ctx.join("data/a"), "changed\n").unwrap();
    let changed = k.json(["build", "-t", "m4", "--json", c]);
    let s = build_steps(&changed);
    let pos = s
        .iter()
        .position(|(i, _)| i.contains("source=data"))
        .unwrap();
    assert!(s[..pos].iter().all(|(_, c)| *c), "{s:?}");
    assert!(!s[pos].1, "{s:?}");
    k.ok(["image", "export", "m4", "-o", d]);
    fsck(&disk);
    assert_eq!(disk_cat(&disk, "/from-bind"), "changed\n");

    // Same input, same disk: a second home builds the same image from the same base (steps
    // without RUN, whose files carry the time they were written).
    let det = ctx.join("Det.Dockerfile");
    std::fs::write(
        &det,
        "FROM bb\nWORKDIR /w\nCOPY hello.txt data/ ./\nRUN true\nCOPY hello.txt /etc\n",
    )
    .unwrap();
    let det = det.to_str().unwrap();
    let one = k.json(["build", "-t", "d", "--json", "-f", det, c]);
    let k2 = Kiln::new(tmp.path().join("home2"));
    let layout = tmp.path().join("oci");
    k2.ok([
        "image",
        "import",
        &format!("oci:{}:bb", layout.display()),
        "bb",
    ]);
    let two = k2.json(["build", "-t", "d", "--json", "-f", det, c]);
    assert_eq!(one["disk"], two["disk"], "disk is deterministic");
    k.ok(["image", "export", "d", "-o", d]);
    fsck(&disk);
    assert_eq!(disk_cat(&disk, "/etc/hello.txt"), "hello\n");
    assert_eq!(disk_cat(&disk, "/w/a"), "changed\n");

    // Unsupported mounts are clear errors.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM bb\nRUN --mount=type=secret,id=x true\n",
    )
    .unwrap();
    let err = k.fails(["build", "-t", "bad", c]);
    assert!(
        err.contains("Dockerfile:2") && err.contains("type=secret is not supported"),
        "{err}"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM bb\nRUN --mount=type=bind,source=data,target=/m,rw true\n",
    )
    .unwrap();
    let err = k.fails(["build", "-t", "bad", c]);
    assert!(err.contains("rw bind mounts are not supported"), "{err}");
}

#[test]
fn a_killed_build_leaves_nothing_running_and_the_next_build_cleans_up() {
    let Some((tmp, k)) = setup() else { return };
    // A private KILN_TMPDIR, so only this test's build directories are looked at.
    let ktmp = tmp.path().join("ktmp");
    let k = k.with_env([("KILN_TMPDIR".to_string(), ktmp.display().to_string())]);
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    // A sleep this test can recognise among other tests' processes by its argument.
    let secs = 600 + std::process::id() % 1000;
    let marker = format!("sleep\0{secs}\0");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM bb\nRUN sleep {secs}\n"),
    )
    .unwrap();
    let c = ctx.to_str().unwrap();
    let mut child = k
        .cmd(["build", "-t", "slow", c])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&*ktmp.to_string_lossy())
    };
    let running = || {
        std::fs::read_dir("/proc").unwrap().any(|e| {
            std::fs::read(e.unwrap().path().join("cmdline"))
                .map(|c| c == marker.as_bytes())
                .unwrap_or(false)
        })
    };
    let t = std::time::Instant::now();
    while !(mounted() && running()) {
        assert!(t.elapsed().as_secs() < 20, "the RUN never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL: no cleanup in kiln
    child.wait().unwrap();
    let t = std::time::Instant::now();
    while running() {
        assert!(t.elapsed().as_secs() < 5, "the RUN outlived kiln");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(mounted(), "the stage overlay stays behind a SIGKILL");
    std::fs::write(ctx.join("Dockerfile"), "FROM bb\nRUN true\n").unwrap();
    k.ok(["build", "-t", "quick", c]);
    assert!(!mounted(), "the next build unmounts a dead build's overlay");
    let left: Vec<_> = std::fs::read_dir(&ktmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("build-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
