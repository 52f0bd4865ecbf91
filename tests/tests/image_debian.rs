//! A real Debian image through the registry: a `debootstrap --variant=minbase bookworm` root
//! file system (cached between runs, see `kiln_tests::registry::debian_rootfs`) packed with
//! umoci, pushed to a local docker-registry with skopeo, pulled with `kiln image pull`, then
//! used as the base of a Dockerfile whose RUN steps use Debian's own tools (useradd, dpkg),
//! with COPY, ENV, WORKDIR and USER; the result is checked inside the ext4 disk with debugfs.

use kiln_tests::registry::{can_build_or_skip, debian_layout, Registry};
use kiln_tests::Kiln;
use std::path::Path;
use std::process::Command;

fn debugfs(disk: &Path, req: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(req)
        .arg(disk)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn debian_minbase_pull_and_build() {
    if !can_build_or_skip(&["skopeo", "mkfs.ext4", "debugfs"]) {
        return;
    }
    let Some(layout) = debian_layout() else {
        return;
    };
    let Some(reg) = Registry::start() else {
        return;
    };
    reg.push(&layout, "base", "tests/debian:bookworm");
    let tmp = tempfile::tempdir().unwrap();
    let k = Kiln::new(tmp.path().join("home"));
    let r = format!("{}/tests/debian:bookworm", reg.addr());
    let out = k.run(["image", "pull", &r]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("layer 1/1 "), "{stderr}");
    let base = k.json(["image", "inspect", &r, "--json"]);
    assert_eq!(
        base["record"]["config"]["cmd"],
        serde_json::json!(["/bin/sh"])
    );
    let base_disk = tmp.path().join("base.ext4");
    k.ok(["image", "export", &r, "-o", base_disk.to_str().unwrap()]);
    assert!(
        debugfs(&base_disk, "cat /usr/lib/os-release").contains("bookworm"),
        "not the Debian root"
    );

    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("app.conf"), "port=8080\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            r#"FROM {r}
ENV GREETING="hello from debian" DEBIAN_FRONTEND=noninteractive
RUN echo hi > /etc/x && useradd -m -u 1234 -s /bin/bash app && dpkg-query -W -f='${{Version}}' base-files > /etc/base-files-version
WORKDIR /srv/app
COPY --chown=app:app app.conf ./
RUN chown app:app /srv/app && echo "$GREETING" > /srv/app/greeting
USER app
RUN id -un > /srv/app/whoami && pwd > /srv/app/pwd
CMD ["/bin/bash"]
"#
        ),
    )
    .unwrap();
    let report = k.json(["build", "-t", "deb-app", "--json", ctx.to_str().unwrap()]);
    assert_eq!(report["cached"], false);
    let disk = tmp.path().join("app.ext4");
    k.ok(["image", "export", "deb-app", "-o", disk.to_str().unwrap()]);
    assert_eq!(debugfs(&disk, "cat /etc/x"), "hi\n");
    assert!(
        debugfs(&disk, "cat /etc/passwd").contains("app:x:1234:1234::/home/app:/bin/bash"),
        "useradd"
    );
    assert!(
        debugfs(&disk, "stat /home/app").contains("User:  1234"),
        "useradd -m"
    );
    let version = debugfs(&disk, "cat /etc/base-files-version");
    assert!(version.starts_with("12"), "dpkg-query ran: {version:?}");
    assert_eq!(debugfs(&disk, "cat /srv/app/app.conf"), "port=8080\n");
    assert!(
        debugfs(&disk, "stat /srv/app/app.conf").contains("User:  1234"),
        "COPY --chown by name"
    );
    assert_eq!(
        debugfs(&disk, "cat /srv/app/greeting"),
        "hello from debian\n"
    );
    assert_eq!(debugfs(&disk, "cat /srv/app/whoami"), "app\n");
    assert_eq!(debugfs(&disk, "cat /srv/app/pwd"), "/srv/app\n");
    assert!(
        debugfs(&disk, "stat /srv/app/whoami").contains("User:  1234"),
        "USER app"
    );
    let rec = k.json(["image", "inspect", "deb-app", "--json"]);
    let cfg = &rec["record"]["config"];
    assert_eq!(cfg["workdir"], "/srv/app");
    assert_eq!(cfg["user"], "app");
    assert_eq!(cfg["cmd"], serde_json::json!(["/bin/bash"]));
    assert!(cfg["env"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("GREETING=hello from debian")));
    // The base's files are there, unchanged by the build.
    assert_eq!(
        debugfs(&disk, "cat /usr/lib/os-release"),
        debugfs(&base_disk, "cat /usr/lib/os-release")
    );

    // No change: nothing reruns, same image.
    let again = k.json(["build", "-t", "deb-app", "--json", ctx.to_str().unwrap()]);
    assert_eq!(again["cached"], true);
    assert_eq!(again["image"], report["image"]);
}
