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
    k.ok(["image", "pull", &r]);
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
