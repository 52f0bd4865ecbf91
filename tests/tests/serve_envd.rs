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
