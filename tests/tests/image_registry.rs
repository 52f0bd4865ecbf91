//! `kiln image pull` against a real registry (docker-registry on loopback) holding a busybox
//! image the test builds and pushes with skopeo; unreachable registry and 404.

use kiln_tests::registry::{busybox_layout, free_port, have, Registry};
use kiln_tests::Kiln;

#[test]
fn pull_from_a_real_registry_and_the_failures() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: image tests need root");
        return;
    }
    if !have("skopeo") {
        eprintln!("SKIP: skopeo not installed (apt-get install skopeo)");
        return;
    }
    let Some(reg) = Registry::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let Some(layout) = busybox_layout(tmp.path(), "bb") else {
        return;
    };
    reg.push(&layout, "bb", "tests/busybox:1");
    let k = Kiln::new(tmp.path().join("home"));
    let r = format!("{}/tests/busybox:1", reg.addr());
    // Not a terminal: one plain line per layer on stderr, stdout only the result.
    let out = k.run(["image", "pull", &r]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let layer_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("layer ")).collect();
    assert_eq!(layer_lines.len(), 1, "{stderr}");
    assert!(
        layer_lines[0].starts_with("layer 1/1 ") && layer_lines[0].contains(" bytes in "),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\r'),
        "no bar redraws off a terminal: {stderr:?}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("(1 layers)"), "{stdout}");
    let pulled = k.json(["image", "inspect", &r, "--json"]);
    assert_eq!(
        pulled["record"]["config"]["cmd"],
        serde_json::json!(["/bin/sh"])
    );
    assert_eq!(pulled["record"]["layers"].as_array().unwrap().len(), 1);
    // The same image imported from the layout gives the same disk (determinism across paths).
    k.ok([
        "image",
        "import",
        &format!("oci:{}:bb", layout.display()),
        "local",
    ]);
    let local = k.json(["image", "inspect", "local", "--json"]);
    assert_eq!(pulled["record"]["disk"], local["record"]["disk"]);
    // A pulled image is usable as a FROM base.
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}/tests/busybox:1\nRUN echo ok > /ok\n", reg.addr()),
    )
    .unwrap();
    k.ok(["build", "-t", "on-pulled", ctx.to_str().unwrap()]);

    // On a terminal (a pty from script(1)): a byte progress bar per layer.
    if have("script") {
        let cmd = k.cmd(["image", "pull", &r, "--name", "tty"]);
        let line = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| format!("'{}'", a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ");
        let out = std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("KILN_HOME", &k.home)
            .env("COLUMNS", "120")
            .output()
            .unwrap();
        let tty = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{tty}");
        assert!(tty.contains("layer 1/1") && tty.contains("[===="), "{tty}");
        k.ok(["image", "rm", "tty"]);
    }

    // 404: the registry answers, the repository does not exist.
    let err = k.fails(["image", "pull", &format!("{}/tests/nope:1", reg.addr())]);
    assert!(
        err.to_lowercase().contains("unknown") || err.contains("404") || err.contains("not found"),
        "{err}"
    );
    // Nothing listening.
    let dead = free_port();
    let err = k.fails(["image", "pull", &format!("127.0.0.1:{dead}/x/y:1")]);
    assert!(err.contains("registry"), "{err}");
    let names: Vec<String> = k
        .json(["image", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}
