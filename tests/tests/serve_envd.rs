//! `kiln serve`'s data plane (envd's protocol) driven by E2B's real Python SDK against a
//! gVisor sandbox: commands (stdout, stderr, exit code, envs, cwd, user, background with
//! on_stdout, kill, connect, stdin), files (write, read, list, make_dir, remove, rename,
//! exists, get_info, watch_dir) and a server in the sandbox reached through `get_host(port)`.
//!
//! The sandbox is created with the CLI and the SDK is pointed at it directly (E2B_SANDBOX_URL
//! plus the sandbox id), so this exercises the data plane alone. Skips (with a SKIP line)
//! without root, runsc, the image tools, or E2B's Python SDK (`/opt/kiln-tools/e2b-venv`, which
//! scripts/install-deps makes; `KILN_E2B_VENV` overrides it).

use kiln_tests::sandbox::{app_home, create, KillAll};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The SDK's commands run `/bin/bash -l -c CMD`: busybox has no bash, so a shim.
const ENVD_DOCKERFILE: &str = "FROM app
USER root
RUN printf '#!/bin/sh\\nexec /bin/sh \"$@\"\\n' > /bin/bash && chmod 755 /bin/bash && mkdir -p /home/app && chown app:app /home/app && sed -i 's#^app:x:\\([0-9]*\\):\\([0-9]*\\):[^:]*:[^:]*:#app:x:\\1:\\2::/home/app:#' /etc/passwd
USER app
";

const SCRIPT: &str = r#"
import os, sys, time, threading, httpx
from packaging.version import Version
from e2b import Sandbox, ConnectionConfig
from e2b.exceptions import NotFoundException, SandboxException
from e2b.sandbox.commands.command_handle import CommandExitException

sid, port = sys.argv[1], int(sys.argv[2])
cfg = ConnectionConfig(extra_sandbox_headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
sbx = Sandbox(sandbox_id=sid, sandbox_domain=f"localhost:{port}", envd_version=Version("0.6.4"),
              envd_access_token=None, traffic_access_token=None, connection_config=cfg)
def ok(name): print("OK", name, flush=True)

r = sbx.commands.run("echo out; echo err >&2; echo $GREETING $FOO; pwd; id -un")
assert r.exit_code == 0, r
lines = r.stdout.splitlines()
assert lines[0] == "out" and r.stderr == "err\n", (r.stdout, r.stderr)
assert lines[1] == "hello", lines   # image ENV, FOO unset
assert lines[2] == "/work" and lines[3] == "app", lines  # image WORKDIR and USER
ok("run")

r = sbx.commands.run("echo $FOO; pwd; id -un", envs={"FOO": "bar"}, cwd="/tmp", user="root")
assert r.stdout.splitlines() == ["bar", "/tmp", "root"], r.stdout
ok("run envs cwd user")

try:
    sbx.commands.run("exit 3")
    raise AssertionError("no exception")
except CommandExitException as e:
    assert e.exit_code == 3 and e.error == "exit status 3", (e.exit_code, e.error)
ok("exit code")

got = []
h = sbx.commands.run("for i in 1 2 3; do echo tick$i; sleep 0.2; done; sleep 60", background=True)
time.sleep(0.1)
c = sbx.commands.connect(h.pid)
seen = []
def follow():
    try:
        for out, err, _ in c:
            if out: seen.append(out)
    except Exception as e:
        seen.append(("exc", str(e)))
t = threading.Thread(target=follow, daemon=True); t.start()
deadline = time.time() + 20
while "tick3" not in "".join(x for x in seen if isinstance(x, str)) and time.time() < deadline:
    time.sleep(0.1)
assert "tick1" in "".join(x for x in seen if isinstance(x, str)), seen
ok("connect")
pids = [p.pid for p in sbx.commands.list()]
assert h.pid in pids, (h.pid, pids)
ok("list")
assert sbx.commands.kill(h.pid) is True
try:
    h.wait(on_stdout=lambda s: got.append(s))
    raise AssertionError("killed command ended well")
except CommandExitException as e:
    assert e.exit_code == -1 and "killed" in (e.error or ""), (e.exit_code, e.error)
assert any("tick" in s for s in got), got
assert sbx.commands.kill(h.pid) is False
ok("background kill")

h = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
sbx.commands.send_stdin(h.pid, "hi there\n")
r = h.wait()
assert r.stdout == "got:hi there\n", r.stdout
h = sbx.commands.run("cat", background=True, stdin=True)
sbx.commands.send_stdin(h.pid, "abc")
sbx.commands.close_stdin(h.pid)
assert h.wait().stdout == "abc"
ok("stdin")

info = sbx.files.write("/work/dir/a.txt", "hello file")
assert info.path == "/work/dir/a.txt" and info.name == "a.txt", info
assert sbx.files.read("/work/dir/a.txt") == "hello file"
data = bytes(range(256)) * 1000
sbx.files.write("rel/b.bin", data)  # relative: under the user's home
assert bytes(sbx.files.read("/home/app/rel/b.bin", format="bytes")) == data
sbx.files.write_files([{"path": "/work/m1", "data": "one"}, {"path": "/work/m2", "data": b"two"}])
assert sbx.files.read("/work/m2") == "two"
sbx.files.write("/work/oct.txt", iter([b"str", b"eamed"]))  # octet-stream upload
assert sbx.files.read("/work/oct.txt") == "streamed"
ok("write read")

st = sbx.files.get_info("/work/dir/a.txt")
assert st.size == 10 and st.owner == "app" and st.permissions == "-rw-r--r--", st
assert st.type.value == "file", st.type
assert sbx.files.exists("/work/dir") and not sbx.files.exists("/work/nope")
ok("get_info exists")

names = sorted(e.name for e in sbx.files.list("/work"))
assert {"dir", "m1", "m2", "oct.txt"} <= set(names), names
deep = [e.path for e in sbx.files.list("/work", depth=2)]
assert "/work/dir/a.txt" in deep, deep
d = [e for e in sbx.files.list("/work") if e.name == "dir"][0]
assert d.type.value == "dir", d
ok("list")

assert sbx.files.make_dir("/work/new/deep") is True
assert sbx.files.make_dir("/work/new/deep") is False
assert sbx.files.get_info("/work/new").owner == "app"
ok("make_dir")

e = sbx.files.rename("/work/dir/a.txt", "/work/moved/a2.txt")
assert e.path == "/work/moved/a2.txt", e
assert sbx.files.read("/work/moved/a2.txt") == "hello file"
ok("rename")

sbx.files.remove("/work/moved")
assert not sbx.files.exists("/work/moved")
sbx.files.remove("/work/moved")  # gone already: no error, as envd
try:
    sbx.files.read("/work/moved/a2.txt")
    raise AssertionError("read of a removed file")
except NotFoundException:
    pass
ok("remove")

sbx.files.make_dir("/work/w")
events = []
w = sbx.files.watch_dir("/work/w", include_entry=True)  # CreateWatcher / GetWatcherEvents
sbx.files.write("/work/w/x.txt", "1")
sbx.commands.run("rm /work/w/x.txt")
deadline = time.time() + 10
while time.time() < deadline and not any(ev.type.value == "remove" for ev in events):
    events.extend(w.get_new_events())
    time.sleep(0.1)
w.stop()
kinds = {(ev.name, ev.type.value) for ev in events}
assert ("x.txt", "remove") in kinds and any(k[0] == "x.txt" and k[1] in ("create", "write") for k in kinds), kinds
try:
    w.get_new_events()
    raise AssertionError("events of a removed watcher")
except (NotFoundException, SandboxException):
    pass
ok("watch_dir")

sbx.files.write("/work/www/index.html", "served from the sandbox")
srv = sbx.commands.run("httpd -f -p 8123 -h /work/www", background=True, timeout=0)
host = sbx.get_host(8123)
assert host == f"8123-{sid}.localhost:{port}", host
body = None
for _ in range(50):
    r = httpx.get(f"http://127.0.0.1:{port}/index.html", headers={"Host": host})
    if r.status_code == 200:
        body = r.text
        break
    time.sleep(0.2)
assert body == "served from the sandbox", body
r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": sbx.get_host(8124)})
assert r.status_code == 502 and "port is not open" in r.json()["message"], r.text
srv.kill()
ok("get_host")

assert sbx.is_running()
ok("health")
print("ALL OK", flush=True)
"#;

#[test]
fn the_python_sdk_drives_the_data_plane() {
    // The SDK scripts/install-deps installs (it looked in other places and skipped in CI).
    let Some(python) = kiln_tests::e2b::python_or_skip() else {
        return;
    };
    let Some((tmp, k)) = app_home() else { return };
    let ctx = tmp.path().join("envd-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), ENVD_DOCKERFILE).unwrap();
    k.ok(["build", "-t", "envd", ctx.to_str().unwrap()]);
    let guard = KillAll(Kiln2::from(&k));
    let rec = create(&k, &["envd"]);
    let id = rec["id"].as_str().unwrap().to_string();

    // `kiln serve` on a free loopback port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut serve = k
        .cmd(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("KILN_API_KEY", "test-key")
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln serve");
    let mut err = BufReader::new(serve.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("kiln serve exited before listening");
        }
        if line.contains("listening on") {
            break;
        }
    }
    // Keep draining its log so it never blocks on a full pipe.
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for l in err.lines().map_while(Result::ok) {
            all.push_str(&l);
            all.push('\n');
        }
        all
    });

    let out = Command::new(&python)
        .args(["-c", SCRIPT, &id, &port.to_string()])
        .env("E2B_SANDBOX_URL", format!("http://127.0.0.1:{port}"))
        .env("E2B_API_URL", format!("http://127.0.0.1:{port}"))
        .env("E2B_API_KEY", "test-key")
        .env("E2B_DOMAIN", format!("localhost:{port}"))
        .output()
        .expect("run python");
    let _ = serve.kill();
    let _ = serve.wait();
    let log = log.join().unwrap_or_default();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "python SDK script failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- kiln serve\n{log}"
    );
    drop(guard);
}

/// A second handle on the same home for the cleanup guard.
struct Kiln2;

impl Kiln2 {
    fn from(k: &kiln_tests::Kiln) -> kiln_tests::Kiln {
        kiln_tests::Kiln::new(k.home.clone())
    }
}

/// A static `setxattr PATH NAME VALUE` for inside the sandbox (busybox has none), built with
/// the host's C compiler; None (after a SKIP line) without one.
fn setxattr_helper(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let src = dir.join("setxattr.c");
    std::fs::write(
        &src,
        "#include <string.h>\n#include <stdio.h>\n#include <sys/xattr.h>\n\
         int main(int c, char **v) {\n  if (c != 4) return 2;\n\
         if (setxattr(v[1], v[2], v[3], strlen(v[3]), 0)) { perror(\"setxattr\"); return 1; }\n\
         return 0;\n}\n",
    )
    .unwrap();
    let bin = dir.join("setxattr");
    let built = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        eprintln!(
            "SKIP: no static C toolchain (cc -static): xattrs set inside the sandbox not checked"
        );
        return None;
    }
    Some(bin)
}

/// What envd shows for the same operations, through the SDK against a sandbox the daemon
/// created: watch events (E2B's own tests' counts: a new file is CREATE, CHMOD, WRITE, there
/// at once for `get_new_events()`; no temp names; recursive watches), file metadata (write
/// result, get_info, list, rename, overwrite, xattrs set inside the sandbox), `/files/compose`,
/// symlinks (the target's type and the resolved target), and health (`is_running()` false once paused or
/// killed, true again after connect; a command cut off by a kill is "not running").
const EVENTS_METADATA_HEALTH: &str = r#"
import json, threading, time
from e2b import Sandbox, SandboxNotRunningException
out = {}
def evs(h):
    return [[e.name, e.type.name] for e in h.get_new_events()]

sbx = Sandbox.create("envd", timeout=300)

# Watching: E2B's test_watch (get_new_events right after the write).
sbx.files.make_dir("wd")
h = sbx.files.watch_dir("wd")
sbx.files.write("wd/f.txt", "This file will be watched.")
out["new_file"] = evs(h)
sbx.files.write("wd/f.txt", "This file has been modified.")
out["overwrite"] = evs(h)
sbx.commands.run("echo hi >> /home/app/wd/f.txt; rm /home/app/wd/f.txt")
out["shell"] = evs(h)
h.stop()
sbx.files.make_dir("rd/nested")
h = sbx.files.watch_dir("rd", recursive=True)
sbx.files.write("rd/nested/f.txt", "x")
out["recursive"] = evs(h)
sbx.files.make_dir("rd/later")
sbx.files.write("rd/later/g.txt", "y")
out["recursive_later"] = evs(h)
h.stop()
h = sbx.files.watch_dir("wd", allow_network_mounts=True)
sbx.files.write("wd/n.txt", "mounts allowed")
out["network_mounts_allowed"] = evs(h)
h.stop()
h = sbx.files.watch_dir("wd", include_entry=True)
sbx.files.write("wd/e.txt", "entry")
got = h.get_new_events()
w = [e for e in got if e.type.name == "WRITE"]
out["entry"] = w and [w[-1].entry.name, w[-1].entry.path, w[-1].entry.type.name, w[-1].entry.size]
h.stop()

# Metadata: E2B's test_metadata.
md = {"author": "mish", "purpose": "upload"}
out["md_write"] = sbx.files.write("m.txt", "c", metadata=md).metadata
out["md_info"] = sbx.files.get_info("m.txt").metadata
out["md_octet"] = sbx.files.write("mo.txt", "c", metadata=md, use_octet_stream=True).metadata
out["md_none"] = [sbx.files.write("n.txt", "c").metadata, sbx.files.get_info("n.txt").metadata]
infos = sbx.files.write_files([{"path": "mm1.txt", "data": "1"}, {"path": "mm2.txt", "data": "2"}],
                              metadata={"source": "suite"})
out["md_multi"] = [i.metadata for i in infos] + [sbx.files.get_info("mm2.txt").metadata]
sbx.files.make_dir("ml")
sbx.files.write("ml/l.txt", "c", metadata={"tag": "listed"})
out["md_list"] = [e.metadata for e in sbx.files.list("ml") if e.name == "l.txt"]
sbx.files.write("r1.txt", "c", metadata={"stage": "renamed"})
out["md_rename"] = sbx.files.rename("r1.txt", "r2.txt").metadata
sbx.files.write("o.txt", "first", metadata={"author": "mish"})
out["md_overwrite"] = [sbx.files.write("o.txt", "second").metadata, sbx.files.get_info("o.txt").metadata]
if XATTR_HELPER:
    sbx.files.write("x.txt", "c")
    sbx.commands.run("/bin/setxattr /home/app/x.txt user.e2b.author mish && /bin/setxattr /home/app/x.txt user.other no")
    out["md_xattr"] = sbx.files.get_info("x.txt").metadata

# envd 0.6.4's /files/compose (no SDK method: through the SDK's own envd client).
sbx.files.write("c1.txt", "one,")
sbx.files.write("c2.txt", "two")
r = sbx._envd_api.post("/files/compose", json={"source_paths": ["c1.txt", "c2.txt"], "destination": "cdir/c.txt"})
out["compose"] = [r.status_code, r.json(), sbx.files.read("cdir/c.txt"), sbx.files.exists("c1.txt"),
                  sbx.files.get_info("cdir/c.txt").owner]
r = sbx._envd_api.post("/files/compose", json={"source_paths": ["nope"], "destination": "x"})
out["compose_missing"] = [r.status_code, r.json()["message"]]

# Symlinks: E2B's test_info.
sbx.files.make_dir("sl")
sbx.files.write("sl/t.txt", "Hello")
sbx.commands.run("ln -s t.txt link && ln -s /home/app/sl sl_dir && ln -s nowhere dangling", cwd="/home/app/sl")
i = sbx.files.get_info("sl/link")
out["symlink"] = [i.type.name, i.symlink_target]
i = sbx.files.get_info("sl/sl_dir")
out["symlink_dir"] = [i.type.name, i.symlink_target]
i = sbx.files.get_info("sl/dangling")
out["symlink_dangling"] = [i.type and i.type.name, i.symlink_target]
out["symlink_listed"] = sorted([e.name, e.type and e.type.name] for e in sbx.files.list("sl"))

# Health (raw: envd's /health needs no token; E2B's proxy's 502 when not running).
import httpx, os
def raw_health(sid):
    r = httpx.get(os.environ["E2B_SANDBOX_URL"] + "/health", headers={"E2b-Sandbox-Id": sid})
    return [r.status_code, r.json()["message"] if r.content else None]
out["running"] = sbx.is_running()
out["raw_running"] = raw_health(sbx.sandbox_id)
sbx.pause()
out["paused_running"] = sbx.is_running()
out["raw_paused"] = raw_health(sbx.sandbox_id)
sbx = Sandbox.connect(sbx.sandbox_id)
out["resumed_running"] = sbx.is_running()
caught = {}
def long_command():
    try:
        sbx.commands.run("sleep 60")
        caught["result"] = "finished"
    except Exception as e:
        caught["type"] = type(e).__name__
        caught["not_running"] = isinstance(e, SandboxNotRunningException)
        caught["message"] = str(e)
t = threading.Thread(target=long_command)
t.start()
time.sleep(2)
Sandbox.kill(sbx.sandbox_id)
t.join(60)
out["killed_command"] = caught
out["killed_running"] = sbx.is_running()
out["raw_killed"] = raw_health(sbx.sandbox_id)
print(json.dumps(out))
"#;

#[test]
fn the_python_sdk_sees_envd_events_metadata_symlinks_and_health() {
    let Some(python) = kiln_tests::e2b::python_or_skip() else {
        return;
    };
    let Some((tmp, k)) = kiln_tests::e2b::sdk_home() else {
        return;
    };
    let ctx = tmp.path().join("envdx-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let helper = setxattr_helper(&ctx);
    let copy = if helper.is_some() {
        "USER root\nCOPY setxattr /bin/setxattr\nUSER app\n"
    } else {
        ""
    };
    std::fs::write(ctx.join("Dockerfile"), format!("FROM sdk\n{copy}")).unwrap();
    k.ok(["build", "-t", "envd", ctx.to_str().unwrap()]);
    let _guard = KillAll(Kiln2::from(&k));
    let s = kiln_tests::e2b::Serve::start(&k, "test-key-envd");
    let script = format!(
        "XATTR_HELPER = {}\n{EVENTS_METADATA_HEALTH}",
        if helper.is_some() { "True" } else { "False" }
    );
    let v = s.python(&python, &script);
    let pairs = |key: &str| -> Vec<(String, String)> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {v}"))
            .iter()
            .map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()))
            .collect()
    };
    let p = |n: &str, t: &str| (n.to_string(), t.to_string());

    // A new file: exactly what envd reports (E2B's test_watch_iterated counts 3).
    assert_eq!(
        pairs("new_file"),
        [
            p("f.txt", "CREATE"),
            p("f.txt", "CHMOD"),
            p("f.txt", "WRITE")
        ],
        "{v}"
    );
    // An existing one: its owner set again (CHMOD), then truncated and written (WRITE).
    let over = pairs("overwrite");
    assert_eq!(over.first(), Some(&p("f.txt", "CHMOD")), "{v}");
    assert!(
        over.contains(&p("f.txt", "WRITE")) && !over.iter().any(|e| e.1 == "CREATE"),
        "{v}"
    );
    let shell = pairs("shell");
    assert!(
        shell.contains(&p("f.txt", "WRITE")) && shell.contains(&p("f.txt", "REMOVE")),
        "{v}"
    );
    // E2B's test_watch_recursive_directory_changes: 3 events, the first the CREATE.
    assert_eq!(
        pairs("recursive"),
        [
            p("nested/f.txt", "CREATE"),
            p("nested/f.txt", "CHMOD"),
            p("nested/f.txt", "WRITE")
        ],
        "{v}"
    );
    let later = pairs("recursive_later");
    assert!(
        later.contains(&p("later", "CREATE")) && later.contains(&p("later/g.txt", "WRITE")),
        "{v}"
    );
    assert!(
        pairs("network_mounts_allowed").contains(&p("n.txt", "WRITE")),
        "{v}"
    );
    for key in [
        "new_file",
        "overwrite",
        "shell",
        "recursive",
        "recursive_later",
    ] {
        assert!(
            pairs(key)
                .iter()
                .all(|(n, _)| !n.contains("kiln-agent-tmp")),
            "a temp name in {key}: {v}"
        );
    }
    assert_eq!(
        v["entry"],
        serde_json::json!(["e.txt", "/home/app/wd/e.txt", "FILE", 5]),
        "{v}"
    );

    let md = serde_json::json!({"author": "mish", "purpose": "upload"});
    for key in ["md_write", "md_info", "md_octet"] {
        assert_eq!(v[key], md, "{key}: {v}");
    }
    assert_eq!(v["md_none"], serde_json::json!([null, null]), "{v}");
    let multi = serde_json::json!({"source": "suite"});
    assert_eq!(
        v["md_multi"],
        serde_json::json!([multi, multi, multi]),
        "{v}"
    );
    assert_eq!(v["md_list"], serde_json::json!([{"tag": "listed"}]), "{v}");
    assert_eq!(
        v["md_rename"],
        serde_json::json!({"stage": "renamed"}),
        "{v}"
    );
    assert_eq!(v["md_overwrite"], serde_json::json!([null, null]), "{v}");
    if helper.is_some() {
        assert_eq!(v["md_xattr"], serde_json::json!({"author": "mish"}), "{v}");
    }

    assert_eq!(
        v["compose"],
        serde_json::json!([
            200,
            {"path": "/home/app/cdir/c.txt", "name": "c.txt", "type": "file"},
            "one,two",
            false,
            "app"
        ]),
        "{v}"
    );
    assert_eq!(
        v["compose_missing"],
        serde_json::json!([404, "source file not found: nope"]),
        "{v}"
    );
    assert_eq!(
        v["symlink"],
        serde_json::json!(["FILE", "/home/app/sl/t.txt"]),
        "{v}"
    );
    assert_eq!(
        v["symlink_dir"],
        serde_json::json!(["DIR", "/home/app/sl"]),
        "{v}"
    );
    assert_eq!(
        v["symlink_dangling"],
        serde_json::json!([null, "/home/app/sl/dangling"]),
        "{v}"
    );
    // The dangling link has no type: the SDK leaves it out of listings (as with envd).
    assert_eq!(
        v["symlink_listed"],
        serde_json::json!([["link", "FILE"], ["sl_dir", "DIR"], ["t.txt", "FILE"]]),
        "{v}"
    );

    assert_eq!(v["running"], true, "{v}");
    assert_eq!(v["raw_running"], serde_json::json!([204, null]), "{v}");
    for key in ["raw_paused", "raw_killed"] {
        assert_eq!(v[key][0], 502, "{key}: {v}");
        assert!(
            v[key][1].as_str().unwrap_or("").contains("was not found"),
            "{key}: {v}"
        );
    }
    assert_eq!(v["paused_running"], false, "{v}");
    assert_eq!(v["resumed_running"], true, "{v}");
    let killed = &v["killed_command"];
    assert_eq!(killed["not_running"], true, "{v}");
    assert!(
        killed["message"]
            .as_str()
            .unwrap_or("")
            .contains("was killed"),
        "{v}"
    );
    assert_eq!(v["killed_running"], false, "{v}");
}

/// envd's `GET /metrics` (envd 0.2.4+, `mem_cache` 0.5.9+: in 0.6.4) through the data plane:
/// the access token is needed when the sandbox has one (401 without), the answer carries
/// envd's fields with the sandbox's real numbers (its CPUs and memory, a busy loop's CPU,
/// the 8 MiB it wrote on its disk), and a paused sandbox answers E2B's proxy's 502. Neither
/// SDK calls it (their `get_metrics` is the REST API's), so raw HTTP.
#[test]
fn envd_metrics_are_the_sandboxes_own() {
    let Some(python) = kiln_tests::e2b::python_or_skip() else {
        return;
    };
    let Some((_tmp, k)) = kiln_tests::e2b::sdk_home() else {
        return;
    };
    let _guard = KillAll(Kiln2::from(&k));
    let s = kiln_tests::e2b::Serve::start(&k, "test-key-envd-metrics");
    let v = s.python(
        &python,
        r#"import json
from e2b import Sandbox
sbx = Sandbox.create("sdk", timeout=300)
sbx.commands.run("dd if=/dev/urandom of=/home/app/blob bs=1M count=8 && sync")
busy = sbx.commands.run("while :; do :; done", background=True, timeout=0)
print(json.dumps({"id": sbx.sandbox_id, "token": sbx._envd_access_token}))
"#,
    );
    let id = v["id"].as_str().unwrap();
    let token = v["token"].as_str().expect("the SDK's sandboxes are secure");
    let get = |token: Option<&str>| {
        let mut h = vec![("E2b-Sandbox-Id", id), ("E2b-Sandbox-Port", "49983")];
        if let Some(t) = token {
            h.push(("X-Access-Token", t));
        }
        let (code, body) = kiln_tests::e2b::http(s.port, "GET", "/metrics", &h, None).unwrap();
        (
            code,
            serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
        )
    };
    assert_eq!(get(None).0, 401);
    assert_eq!(get(Some("wrong")).0, 401);

    // The busy loop shows once the daemon has a reading to measure CPU from (its sweep).
    let t = std::time::Instant::now();
    let m = loop {
        let (code, m) = get(Some(token));
        assert_eq!(code, 200, "{m}");
        if m["cpu_used_pct"].as_f64().unwrap() > 20.0 || t.elapsed().as_secs() > 60 {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let (_, d) = s.api("GET", &format!("/sandboxes/{id}"), None);
    let mib = d["memoryMB"].as_u64().unwrap();
    assert!(
        m["cpu_used_pct"].as_f64().unwrap() > 20.0,
        "a busy loop: {m}"
    );
    assert!(m["cpu_used_pct"].as_f64().unwrap() <= 100.0, "{m}");
    assert_eq!(m["cpu_count"], d["cpuCount"], "{m}");
    assert_eq!(m["mem_total"].as_u64(), Some(mib << 20), "{m}");
    assert_eq!(m["mem_total_mib"].as_u64(), Some(mib), "{m}");
    let used = m["mem_used"].as_u64().unwrap();
    assert!(used > 1 << 20 && used < mib << 20, "{m}");
    assert_eq!(m["mem_used_mib"].as_u64(), Some(used >> 20), "{m}");
    assert!(m["mem_cache"].is_u64(), "{m}");
    let disk = m["disk_used"].as_u64().unwrap();
    assert!(
        disk >= 8 << 20 && disk < m["disk_total"].as_u64().unwrap(),
        "the 8 MiB written are on its disk: {m}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((m["ts"].as_i64().unwrap() - now).abs() <= 5, "{m}");

    let (code, body) = s.api("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!(code, 204, "{body}");
    let (code, m) = get(Some(token));
    assert_eq!(code, 502, "{m}");
    assert!(
        m["message"]
            .as_str()
            .unwrap_or("")
            .contains("was not found"),
        "{m}"
    );
}
