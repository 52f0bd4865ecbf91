//! Pause modes through E2B's real Python SDK against `kiln serve` (gVisor): a filesystem-only
//! pause (`pause(mode="filesystem")`, or `lifecycle={"on_timeout": {"action": "pause", "mode":
//! "filesystem"}}`) keeps the sandbox's files and boots it afresh on `connect` (processes
//! gone, a new `/proc/sys/kernel/random/boot_id`); a full pause keeps processes and boot id;
//! `connect(on_resume="reboot")` boots a fully paused sandbox afresh on its files; wrong
//! combinations are refused as E2B refuses them.
//!
//! Skips (with `SKIP:`) when gVisor cannot run here or the SDK is not installed.

use kiln_tests::e2b;

const KEY: &str = "kiln_test_key_0123456789";

/// The SDK, a JSON printer, and helpers every script here uses.
const PY: &str = r#"import json, time
from e2b import Sandbox, InvalidArgumentException

def boot_id(s):
    return s.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()

def sleepers(s):
    return [p.pid for p in s.commands.list() if "sleep" in " ".join([p.cmd] + list(p.args))]

def state(id):
    return Sandbox.get_info(id).state.value
"#;

#[test]
fn python_sdk_filesystem_pause_boots_afresh_and_full_pause_goes_on() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let v = t.s.python(
        &t.py,
        &format!(
            r#"{PY}
out = {{}}
sbx = Sandbox.create("sdk", timeout=120)
sbx.files.write("/home/app/note.txt", "kept")
sbx.commands.run("mkdir -p /home/app/d/e && chmod 700 /home/app/d && ln -s note.txt /home/app/link")
# A name of the image removed, a file of it changed: so they stay.
sbx.commands.run("rm /bin/false && echo extra:x:2000: >> /etc/group", user="root")
sbx.commands.run("sleep 1000", background=True)
out["before"] = {{"boot_id": boot_id(sbx), "sleepers": len(sleepers(sbx))}}

sbx.pause(mode="filesystem")
out["paused"] = state(sbx.sandbox_id)
sbx.connect()
out["fs"] = {{
    "state": state(sbx.sandbox_id),
    "note": sbx.files.read("/home/app/note.txt"),
    "link": sbx.commands.run("busybox readlink /home/app/link").stdout.strip(),
    "d_mode": sbx.commands.run("stat -c %a /home/app/d").stdout.strip(),
    "e": sbx.files.exists("/home/app/d/e"),
    "gone": sbx.files.exists("/bin/false"),
    "group": sbx.files.read("/etc/group"),
    "boot_id": boot_id(sbx),
    "sleepers": len(sleepers(sbx)),
}}

# A full pause: the process and the boot id go on.
sbx.commands.run("sleep 1000", background=True)
sbx.pause()
sbx.connect()
out["full"] = {{"boot_id": boot_id(sbx), "sleepers": len(sleepers(sbx)),
               "note": sbx.files.read("/home/app/note.txt")}}

# A full pause resumed with a reboot: its files, a fresh boot.
sbx.files.write("/home/app/later.txt", "after the full pause")
sbx.pause()
sbx.connect(on_resume="reboot")
out["reboot"] = {{"boot_id": boot_id(sbx), "sleepers": len(sleepers(sbx)),
                 "later": sbx.files.read("/home/app/later.txt"),
                 "note": sbx.files.read("/home/app/note.txt")}}
# A running sandbox: reboot is a no-op.
sbx.connect(on_resume="reboot")
out["running_reboot"] = boot_id(sbx) == out["reboot"]["boot_id"]

try:
    Sandbox.connect(sbx.sandbox_id, on_resume="bogus")
    out["bogus"] = None
except InvalidArgumentException as e:
    out["bogus"] = str(e)
sbx.kill()
print(json.dumps(out))
"#
        ),
    );
    let before = &v["before"];
    assert_eq!(before["sleepers"], 1, "{v}");
    assert_eq!(
        before["boot_id"].as_str().map(str::len),
        Some(36),
        "gVisor gives a boot id: {v}"
    );
    assert_eq!(v["paused"], "paused", "{v}");
    let fs = &v["fs"];
    assert_eq!(fs["state"], "running", "{v}");
    assert_eq!(fs["note"], "kept", "{v}");
    assert_eq!(fs["link"], "note.txt", "{v}");
    assert_eq!(fs["d_mode"], "700", "{v}");
    assert_eq!(fs["e"], true, "{v}");
    assert_eq!(fs["gone"], false, "a removed image file stays removed: {v}");
    assert!(
        fs["group"]
            .as_str()
            .is_some_and(|g| g.ends_with("extra:x:2000:\n")),
        "a changed image file stays changed: {v}"
    );
    assert_eq!(
        fs["sleepers"], 0,
        "a filesystem-only pause boots afresh: {v}"
    );
    assert_ne!(fs["boot_id"], before["boot_id"], "{v}");
    let full = &v["full"];
    assert_eq!(full["sleepers"], 1, "a full pause keeps processes: {v}");
    assert_eq!(full["boot_id"], fs["boot_id"], "and the boot: {v}");
    assert_eq!(full["note"], "kept", "{v}");
    let reboot = &v["reboot"];
    assert_eq!(reboot["sleepers"], 0, "{v}");
    assert_ne!(reboot["boot_id"], full["boot_id"], "{v}");
    assert_eq!(reboot["later"], "after the full pause", "{v}");
    assert_eq!(reboot["note"], "kept", "{v}");
    assert_eq!(v["running_reboot"], true, "{v}");
    assert!(
        v["bogus"]
            .as_str()
            .is_some_and(|m| m.contains("on_resume must be one of")),
        "{v}"
    );
}

#[test]
fn python_sdk_auto_pause_keeping_files_only() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let v = t.s.python(
        &t.py,
        &format!(
            r#"{PY}
out = {{}}
sbx = Sandbox.create("sdk", timeout=4, lifecycle={{"on_timeout": {{"action": "pause", "mode": "filesystem"}}}})
out["lifecycle"] = sbx.get_info().lifecycle
sbx.files.write("/home/app/note.txt", "kept")
sbx.commands.run("sleep 1000", background=True)
first = boot_id(sbx)
t = time.time()
s = None
while time.time() - t < 60:
    s = state(sbx.sandbox_id)
    if s == "paused":
        break
    time.sleep(0.25)
out["state"] = s
sbx.connect(timeout=120)
out["after"] = {{"note": sbx.files.read("/home/app/note.txt"), "sleepers": len(sleepers(sbx)),
                "new_boot": boot_id(sbx) != first, "state": state(sbx.sandbox_id)}}
try:
    Sandbox.create("sdk", lifecycle={{"on_timeout": {{"action": "pause", "mode": "filesystem"}}, "auto_resume": True}})
    out["sdk_refuses"] = None
except InvalidArgumentException as e:
    out["sdk_refuses"] = str(e)
sbx.kill()
print(json.dumps(out))
"#
        ),
    );
    assert_eq!(
        v["lifecycle"],
        serde_json::json!({"on_timeout": "pause", "auto_resume": false}),
        "{v}"
    );
    assert_eq!(v["state"], "paused", "the timeout paused it: {v}");
    let after = &v["after"];
    assert_eq!(after["note"], "kept", "{v}");
    assert_eq!(after["sleepers"], 0, "{v}");
    assert_eq!(after["new_boot"], true, "{v}");
    assert_eq!(after["state"], "running", "{v}");
    assert!(v["sdk_refuses"].is_string(), "{v}");

    // What the API answers for the combinations the SDK refuses before asking.
    for (body, msg) in [
        (
            r#"{"templateID": "sdk", "autoPause": true, "autoPauseMemory": false, "autoResume": {"enabled": true}}"#,
            "cannot be combined with autoResume",
        ),
        (
            r#"{"templateID": "sdk", "autoPauseMemory": false}"#,
            "autoPauseMemory=false only applies when autoPause is true.",
        ),
    ] {
        let (code, v) = t.s.api("POST", "/v2/sandboxes", Some(body));
        assert_eq!(code, 400, "{body}: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| m.contains(msg)),
            "{body}: {v}"
        );
    }
}
