//! E2B's JS SDK (npm `e2b`, unmodified, from `/opt/kiln-tools/e2b-js`) against a real
//! `kiln serve` and real gVisor sandboxes, one part of `tests/js/sdk.mjs` per test:
//! - commands: output streamed to `onStdout`/`onStderr` while the process still runs,
//!   `sendStdin`, background commands with `wait()` and `kill()`, exit codes;
//! - files: `watchDir` sees what `files.write`, a command, `rename` and `remove` do (no
//!   temp names), and read/write/list/getInfo/exists/rename/remove have their outcomes;
//! - pause: `pause()` (and the deprecated `betaPause()`) then `Sandbox.connect()` /
//!   `connect()` resume the sandbox with its files and a running process's memory (a counter
//!   continues where it was);
//! - lifecycle: `getInfo`, `setTimeout` (instance and static) move the end, a short one
//!   ends the sandbox;
//! - more: a command as root with cwd and envs, signed download/upload URLs, file metadata,
//!   a snapshot, filesystem-only pause then connect, fork, a command timeout, a missing cwd.
//!
//! Skips (with `SKIP:`) without node and the JS SDK, gVisor or E2B's Python SDK (the
//! helpers' daemon setup asks for it).

use kiln_tests::e2b;
use serde_json::Value;

const KEY: &str = "kiln_test_js_key_0123456789";

/// Runs part `part` of tests/js/sdk.mjs against its own daemon; None after a SKIP line.
fn run(part: &str) -> Option<(e2b::SdkServe, Value)> {
    let Some(modules) = e2b::js_modules() else {
        eprintln!(
            "SKIP: E2B's JS SDK or node not installed (/opt/kiln-tools/e2b-js; scripts/install-deps)"
        );
        return None;
    };
    let t = e2b::sdk_serve(KEY, &[])?;
    let script = format!("const PART = {part:?}\n{}", include_str!("../js/sdk.mjs"));
    let v = t.s.node(&modules, &script);
    Some((t, v))
}

#[test]
fn js_sdk_commands_stream_take_stdin_wait_and_kill() {
    let Some((_t, v)) = run("commands") else {
        return;
    };
    // Printed before the process blocked on stdin, so delivered while it ran.
    assert_eq!(v["first"], true, "{v}");
    assert_eq!(
        v["beforeInput"],
        serde_json::json!({"stdout": "out1\n", "stderr": "err1\n"}),
        "{v}"
    );
    assert_eq!(v["second"], true, "{v}");
    assert_eq!(v["afterFirstInput"]["stdout"], "out1\ngot hello\n", "{v}");
    assert_eq!(v["end"]["name"], "CommandExitError", "{v}");
    assert_eq!(v["end"]["exitCode"], 3, "{v}");
    assert_eq!(
        v["final"],
        serde_json::json!({
            "stdout": "out1\ngot hello\ngot world\n", "stderr": "err1\nerr2\n",
            "hStdout": "out1\ngot hello\ngot world\n", "hStderr": "err1\nerr2\n",
        }),
        "{v}"
    );
    let ticks: Vec<&str> = v["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(ticks.concat(), "tick1\ntick2\ntick3\n", "{v}");
    assert!(
        ticks.len() >= 3,
        "one callback per line printed over time: {v}"
    );
    assert_eq!(
        v["ticksResult"],
        serde_json::json!({"exitCode": 0, "stdout": "tick1\ntick2\ntick3\n"})
    );
    assert_eq!(
        v["waited"],
        serde_json::json!({"exitCode": 0, "stdout": "done\n"})
    );
    assert_eq!(v["listedBefore"], true, "{v}");
    assert_eq!(v["killed"], true, "{v}");
    assert_eq!(
        v["killedWait"]["name"], "CommandExitError",
        "a killed command's wait() fails: {v}"
    );
    assert_eq!(v["listedAfter"], false, "{v}");
    assert_eq!(v["killAgain"], false, "{v}");
    assert_eq!(v["exit7"]["exitCode"], 7, "{v}");
    assert_eq!(
        v["cat"],
        serde_json::json!({"exitCode": 0, "stdout": "piped\neof\n"}),
        "{v}"
    );
    assert_eq!(
        v["connected"],
        serde_json::json!({"exitCode": 0, "stdout": "after-connect\n", "callbacks": "after-connect\n"}),
        "{v}"
    );
    assert_eq!(v["ptyEchoed"], true, "{v}");
    assert_eq!(v["ptyKilled"], true, "{v}");
}

#[test]
fn js_sdk_files_and_watch() {
    let Some((_t, v)) = run("files") else {
        return;
    };
    assert_eq!(
        v["writeInfo"],
        serde_json::json!({"name": "a.txt", "path": "/home/app/w/a.txt", "type": "file"}),
        "{v}"
    );
    for key in [
        "aCreated",
        "bWritten",
        "bRemoved",
        "aRenamed",
        "cRemoved",
        "subRemoved",
    ] {
        assert_eq!(v[key], true, "{key}: {v}");
    }
    // What envd reports for the same operations (files.write: CREATE, CHMOD, WRITE; no temp
    // names; a rename: RENAME of the old name, CREATE of the new; makeDir: CREATE, CHMOD of
    // its owner), nothing after stop(). The recursive watch's subdirectory shows here as
    // itself only.
    let ev = |n: &str, t: &str| serde_json::json!([n, t]);
    assert_eq!(
        v["events"],
        serde_json::json!([
            ev("a.txt", "create"),
            ev("a.txt", "chmod"),
            ev("a.txt", "write"),
            ev("b.txt", "create"),
            ev("b.txt", "write"),
            ev("b.txt", "remove"),
            ev("a.txt", "rename"),
            ev("c.txt", "create"),
            ev("c.txt", "remove"),
            ev("sub", "create"),
            ev("sub", "chmod"),
            ev("sub", "remove"),
        ]),
        "{v}"
    );
    assert_eq!(v["deepWritten"], true, "{v}");
    assert_eq!(
        v["deepEntry"],
        serde_json::json!({"path": "/home/app/w/sub/n.txt", "size": 6, "type": "file"}),
        "{v}"
    );
    assert_eq!(
        v["deepNames"],
        serde_json::json!(["sub", "sub/n.txt"]),
        "{v}"
    );
    assert_eq!(
        v["moved"],
        serde_json::json!({"name": "c.txt", "path": "/home/app/w/c.txt"})
    );
    assert_eq!(v["cContent"], "alpha\n");
    assert_eq!(v["bytesBack"], serde_json::json!([0, 1, 2, 250, 255]));
    assert_eq!(
        v["list"],
        serde_json::json!([
            ["bin.dat", "file", 5],
            ["one.txt", "file", 3],
            ["two.txt", "file", 7]
        ]),
        "{v}"
    );
    assert_eq!(
        v["getInfo"],
        serde_json::json!({"name": "two.txt", "type": "file", "size": 7, "path": "/home/app/d/two.txt"})
    );
    assert_eq!(v["exists"], serde_json::json!([true, false]));
    assert_eq!(v["afterRename"], serde_json::json!([false, "one"]));
    assert_eq!(v["afterRemove"], false);
    // The SDK's NotFoundError for files.
    assert_eq!(v["readMissing"]["name"], "FileNotFoundError", "{v}");
    assert_eq!(v["shellSees"], "w\nx", "{v}");
}

#[test]
fn js_sdk_pause_and_connect_keep_files_and_memory() {
    let Some((_t, v)) = run("pause") else {
        return;
    };
    let n = |k: &str| v[k].as_i64().unwrap_or_else(|| panic!("{k}: {v}"));
    assert!(n("beforePause") >= 1005, "{v}");
    assert_eq!(v["paused"], true, "{v}");
    assert_eq!(v["pausedAgain"], false, "pausing a paused sandbox: {v}");
    assert_eq!(v["stateWhilePaused"], "paused", "{v}");
    assert_eq!(v["runningWhilePaused"], false, "{v}");
    assert_eq!(v["stateAfter"], "running", "{v}");
    // The counter went on from where it was: its memory came back (a fresh process would
    // start at 1001; nothing counts while paused).
    assert!(n("afterResume") >= n("beforePause"), "{v}");
    assert!(n("afterResume") <= n("beforePause") + 5, "{v}");
    assert_eq!(v["counted"], true, "it keeps counting: {v}");
    assert!(n("later") > n("afterResume"), "{v}");
    assert_eq!(v["kept"], "kept across pause\n", "{v}");
    assert_eq!(v["counterListed"], true, "{v}");
    assert_eq!(v["betaPaused"], true, "{v}");
    assert_eq!(v["stateBeta"], "paused", "{v}");
    assert!(n("afterBeta") >= n("later"), "{v}");
    assert_eq!(v["countedBeta"], true, "{v}");
    assert_eq!(v["counterListedBeta"], true, "{v}");
}

#[test]
fn js_sdk_info_and_timeouts() {
    let Some((_t, v)) = run("lifecycle") else {
        return;
    };
    let info = &v["info"];
    assert_eq!(info["sandboxId"], v["id"], "{v}");
    assert_eq!(info["templateId"], "sdk", "{v}");
    assert_eq!(info["state"], "running", "{v}");
    assert_eq!(info["envdVersion"], "0.6.4", "{v}");
    assert!(info["cpuCount"].as_u64().unwrap() >= 1, "{v}");
    assert!(info["memoryMB"].as_u64().unwrap() >= 64, "{v}");
    let span = info["spanMs"].as_i64().unwrap();
    assert!((295_000..=305_000).contains(&span), "timeoutMs 300000: {v}");
    let set = v["endAfterSet"].as_i64().unwrap();
    assert!(
        (590_000..=600_000).contains(&set),
        "setTimeout(600000): {v}"
    );
    let set = v["endAfterStaticSet"].as_i64().unwrap();
    assert!(
        (390_000..=400_000).contains(&set),
        "Sandbox.setTimeout(400000): {v}"
    );
    assert_eq!(v["runningBeforeExpiry"], true, "{v}");
    assert_eq!(v["expired"], true, "{v}");
    assert_eq!(v["infoAfterExpiry"]["name"], "SandboxNotFoundError", "{v}");
    assert_eq!(v["killAfterExpiry"], false, "{v}");
}

#[test]
fn js_sdk_urls_metadata_filesystem_pause_fork_and_errors() {
    let Some((_t, v)) = run("more") else {
        return;
    };
    let ok = |k: &str| v[k].get("ok").unwrap_or_else(|| panic!("{k}: {v}")).clone();
    assert_eq!(ok("rootRun"), "root\n/tmp\ny\n", "{v}");
    assert_eq!(ok("downloadUrl"), serde_json::json!([200, "download me"]));
    assert_eq!(ok("uploadUrl"), serde_json::json!([200, "uploaded"]));
    assert_eq!(ok("listRunning"), serde_json::json!(["running"]));
    assert_eq!(ok("snapshot"), serde_json::json!(["string", 1]));
    assert_eq!(ok("fsPause"), serde_json::json!([true, "fs kept"]));
    assert_eq!(ok("writeMeta"), serde_json::json!([{"k": "v"}, {"k": "v"}]));
    assert_eq!(ok("runTimeout")["name"], "TimeoutError", "{v}");
    // envd's answer for a working directory that does not exist (it was an exec failure of
    // the fallback shell).
    assert_eq!(
        ok("missingCwd"),
        serde_json::json!({"name": "InvalidArgumentError", "exitCode": null,
            "message": "[invalid_argument] cwd '/nope' does not exist"}),
        "{v}"
    );
    assert_eq!(ok("fork"), "fs kept", "{v}");
}
