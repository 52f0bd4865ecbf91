//! E2B's Python SDK against a sandbox from a minimal image (issue 19, item 11): no
//! `/etc/passwd`, no `/etc/group`, no bash, as any `FROM scratch` image. The SDK acts as
//! `root` (uid 0 on every image) and runs every command as `/bin/bash -l -c`, which becomes
//! the image's `/bin/sh`. A named user that does not exist is still refused as envd does.
//!
//! Skips (with `SKIP:`) when gVisor or E2B's Python SDK is missing.

use kiln_tests::e2b::{self, Serve};
use kiln_tests::sandbox::{app_home, KillAll};

const KEY: &str = "kiln_test_minimal_key_01";

/// The busybox `app` image with its users and any bash taken away.
const MINIMAL_DOCKERFILE: &str = "FROM app
USER root
RUN rm -f /etc/passwd /etc/group /bin/bash
WORKDIR /
";

const SCRIPT: &str = r#"
import json
from e2b import Sandbox
from e2b.exceptions import AuthenticationException, InvalidArgumentException
out = {}
sbx = Sandbox.create("minimal", timeout=120)
r = sbx.commands.run("id -u; id -g; echo $HOME; ls /etc/passwd 2>&1 || true; echo $0")
out["run"] = r.stdout.splitlines()
r = sbx.commands.run("id -u", user="root")
out["run_root"] = r.stdout.strip()
w = sbx.files.write("hello.txt", "hi there")
out["write_path"] = w.path
out["read"] = sbx.files.read("hello.txt")
out["list"] = sorted(e.name for e in sbx.files.list("/root"))
try:
    sbx.commands.run("true", user="ghost")
    out["ghost"] = "accepted"
except (AuthenticationException, InvalidArgumentException) as e:
    out["ghost"] = str(e)
sbx.kill()
print(json.dumps(out))
"#;

#[test]
fn the_sdk_works_on_an_image_without_users_or_bash() {
    let Some(py) = e2b::python_or_skip() else {
        return;
    };
    let Some((tmp, k)) = app_home() else { return };
    let ctx = tmp.path().join("minimal-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), MINIMAL_DOCKERFILE).unwrap();
    k.ok(["build", "-t", "minimal", ctx.to_str().unwrap()]);
    let _cleanup = KillAll(k.clone());
    let s = Serve::start(&k, KEY);
    let out = s.python(&py, SCRIPT);
    let run: Vec<&str> = out["run"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(run[..3], ["0", "0", "/root"], "uid, gid, HOME: {out}");
    assert!(
        run[3].contains("No such file"),
        "the image has no /etc/passwd: {out}"
    );
    // `$0` of `bash -l -c`'s stand-in.
    assert_eq!(run[4], "/bin/sh", "{out}");
    assert_eq!(out["run_root"], "0", "{out}");
    assert_eq!(out["write_path"], "/root/hello.txt", "{out}");
    assert_eq!(out["read"], "hi there", "{out}");
    assert!(
        out["list"]
            .as_array()
            .unwrap()
            .contains(&"hello.txt".into()),
        "{out}"
    );
    let ghost = out["ghost"].as_str().unwrap();
    assert!(ghost.contains("invalid username: 'ghost'"), "{out}");
}
