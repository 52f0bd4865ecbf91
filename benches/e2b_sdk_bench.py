#!/usr/bin/env python3
"""E2B SDK benchmark against `kiln serve`; prints one JSON object on stdout.

Run with the SDK venv's Python (root, gVisor/runsc, umoci, static /bin/busybox needed):

    /opt/kiln-tools/e2b-venv/bin/python benches/e2b_sdk_bench.py [KILN_BIN]

KILN_BIN (argument or env) defaults to target/release/kiln, else target/debug/kiln.
KILN_AGENT defaults to the static agent under target/x86_64-unknown-linux-gnu/{release,debug}.

It starts its own `kiln serve` on a free 127.0.0.1 port with a temp KILN_HOME, imports a
busybox image with a /bin/bash shim (as the serve tests' `sdk` image: the SDK runs
`/bin/bash -l -c CMD`), and measures:
  1. `commands.run("true")` through the SDK vs an Exec of ["true"] straight to the agent's
     Unix socket (p50/p90 of 30 each; ratio of p50s, goal <= 1.5x);
  2. create to first command (`Sandbox.create` + `commands.run("true")`), p50/p90 of 10,
     from the image and from a snapshot, beside published medians (E2B 491 ms, Daytona 186 ms);
  3. requests/s of `commands.run("true")` over 8 sandboxes, 8 threads, 10 s or 400 requests.
Every sandbox and the daemon are killed at the end, also on error. Progress goes to stderr.
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "kiln-bench-key"
DEADLINE = time.monotonic() + float(os.environ.get("KILN_BENCH_BUDGET_S", "900"))
RUN_N, CREATE_N, TP_SANDBOXES, TP_WINDOW_S, TP_MAX = 30, 10, 8, 10.0, 400
PUBLISHED_MS = {"e2b": 491, "daytona": 186}


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def left():
    return DEADLINE - time.monotonic()


def check_budget(what):
    if left() <= 0:
        raise TimeoutError(f"time budget exhausted before {what}")


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 3)


def stats(ms):
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90),
            "min_ms": round(min(ms), 3) if ms else None}


def find_bin(name, candidates):
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise FileNotFoundError(f"no {name} among {candidates}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    def __init__(self):
        self.kiln = find_bin("kiln", [sys.argv[1] if len(sys.argv) > 1 else None,
                                      os.environ.get("KILN_BIN"),
                                      os.path.join(ROOT, "target/release/kiln"),
                                      os.path.join(ROOT, "target/debug/kiln")])
        self.agent = os.environ.get("KILN_AGENT") or find_bin("kiln-agent", [
            os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/kiln-agent"),
            os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/debug/kiln-agent")])
        self.tmp = tempfile.mkdtemp(prefix="kiln-e2b-bench-")
        self.home = os.path.join(self.tmp, "home")
        self.port = free_port()
        self.daemon = None
        self.env = dict(os.environ, KILN_HOME=self.home, KILN_AGENT=self.agent)
        self.env.pop("KILN_LOG", None)

    def k(self, *args, timeout=300):
        r = subprocess.run([self.kiln, *args], env=self.env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"kiln {args} failed ({r.returncode}): {r.stderr[-2000:]}")
        return r.stdout

    def build_image(self):
        """The serve tests' busybox image (registry::busybox_rootfs) plus the `sdk` image's
        bash shim and app home, put straight into the rootfs, OCI layout by umoci, imported."""
        root = os.path.join(self.tmp, "rootfs")
        for d in ["bin", "etc", "tmp", "root", "home/app", "work"]:
            os.makedirs(os.path.join(root, d), exist_ok=True)
        shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
        for a in ["sh", "echo", "cat", "ls", "mkdir", "touch", "id", "rm", "env", "pwd", "sleep",
                  "true", "false", "wc", "chmod", "head"]:
            os.symlink("busybox", os.path.join(root, "bin", a))
        with open(os.path.join(root, "bin/bash"), "w") as f:
            f.write('#!/bin/sh\nexec /bin/sh "$@"\n')
        os.chmod(os.path.join(root, "bin/bash"), 0o755)
        with open(os.path.join(root, "etc/passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
        with open(os.path.join(root, "etc/group"), "w") as f:
            f.write("root:x:0:\napp:x:1000:\n")
        os.chmod(os.path.join(root, "tmp"), 0o1777)
        for d in ["home/app", "work"]:
            os.chown(os.path.join(root, d), 1000, 1000)
        layout = os.path.join(self.tmp, "oci")
        image = f"{layout}:sdk"

        def umoci(*a):
            subprocess.run(["umoci", *a], check=True, capture_output=True, timeout=120)
        umoci("init", "--layout", layout)
        umoci("new", "--image", image)
        umoci("insert", "--image", image, root, "/")
        umoci("config", "--image", image, "--config.env", "PATH=/bin", "--config.cmd", "sh",
              "--config.workingdir", "/work", "--config.user", "app")
        self.k("image", "import", f"oci:{image}", "sdk")

    def start(self):
        os.makedirs(self.home, exist_ok=True)
        self.logf = open(os.path.join(self.tmp, "serve.log"), "ab")
        env = dict(self.env, KILN_API_KEY=KEY, KILN_LOG="info")
        self.daemon = subprocess.Popen(
            [self.kiln, "serve", "--listen", f"127.0.0.1:{self.port}"], env=env,
            stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf, start_new_session=True)
        t = time.monotonic()
        while time.monotonic() - t < 30:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"kiln serve exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if b" 204 " in s.recv(100):
                        break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"kiln serve not healthy in 30 s: {self.log_tail()}")
        url = f"http://127.0.0.1:{self.port}"
        os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY,
                          E2B_DOMAIN=f"localhost:{self.port}")

    def log_tail(self):
        try:
            with open(os.path.join(self.tmp, "serve.log"), "rb") as f:
                return f.read()[-3000:].decode(errors="replace")
        except OSError:
            return ""

    def cleanup(self):
        try:
            if os.path.isdir(os.path.join(self.home, "sandboxes")):
                out = self.k("sandbox", "ls", "--json", timeout=60)
                for r in json.loads(out or "[]"):
                    subprocess.run([self.kiln, "sandbox", "kill", r["id"]], env=self.env,
                                   capture_output=True, timeout=60)
        except Exception as e:  # noqa: BLE001 - cleanup goes on
            log("sandbox cleanup:", e)
        if self.daemon and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
        if os.environ.get("KILN_BENCH_KEEP"):
            log("kept", self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def agent_exec(sock_path, argv):
    """One Exec over the agent's Unix socket: frame = u32 LE len, kind byte, payload."""
    payload = json.dumps({"argv": argv, "stdin": False}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(struct.pack("<I", len(payload)) + b"E" + payload)
        f = s.makefile("rb")
        for _ in range(10000):
            head = f.read(5)
            if len(head) < 5:
                raise RuntimeError("agent closed before Exit")
            n, kind = struct.unpack("<I", head[:4])[0], head[4:5]
            body = f.read(n)
            if kind == b"X":
                return json.loads(body)
            if kind == b"!":
                raise RuntimeError(f"agent error: {body!r}")
        raise RuntimeError("no Exit in 10000 frames")


def timed(n, fn, budget_s):
    out, t0 = [], time.monotonic()
    for _ in range(n):
        if time.monotonic() - t0 > budget_s or left() <= 0:
            break
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main(env, result):
    from e2b import Sandbox

    log("kiln", env.kiln, "agent", env.agent, "home", env.home)
    t = time.monotonic()
    env.build_image()
    result["setup"] = {"image_import_s": round(time.monotonic() - t, 2)}
    env.start()
    kw = dict(timeout=300, request_timeout=60)

    # 1. commands.run round trip: SDK vs the agent's socket.
    check_budget("round trip")
    sbx = Sandbox.create("sdk", **kw)
    run = lambda s=sbx: s.commands.run("true", timeout=30, request_timeout=30)  # noqa: E731
    for _ in range(3):
        run()
    info = json.loads(env.k("sandbox", "info", sbx.sandbox_id, "--json"))
    agent = info["agent"]
    if not os.path.isabs(agent):
        agent = os.path.join(env.home, agent)
    for _ in range(3):
        agent_exec(agent, ["true"])
    # Interleaved, so drift (page cache, CPU frequency, other load) hits all three alike.
    sdk_ms, agent_ms, shim_ms = [], [], []
    t0 = time.monotonic()
    for _ in range(RUN_N):
        if time.monotonic() - t0 > 180 or left() <= 0:
            break
        for xs, fn in ((sdk_ms, run), (agent_ms, lambda: agent_exec(agent, ["true"])),
                       (shim_ms, lambda: agent_exec(agent, ["/bin/bash", "-l", "-c", "true"]))):
            t = time.perf_counter()
            fn()
            xs.append((time.perf_counter() - t) * 1000)
    sdk, direct = stats(sdk_ms), stats(agent_ms)
    ratio = round(sdk["p50_ms"] / direct["p50_ms"], 2)
    result["round_trip"] = {
        "sdk_commands_run_true": sdk, "agent_socket_exec_true": direct,
        "agent_socket_exec_bash_l_c_true": stats(shim_ms),
        "ratio_p50": ratio, "ratio_p90": round(sdk["p90_ms"] / direct["p90_ms"], 2),
        "goal_ratio": 1.5, "meets_goal": ratio <= 1.5,
        "note": "the SDK runs /bin/bash -l -c true (shim -> sh -c), the agent row runs argv [true]"}

    # 2. create to first command: from the image and from a snapshot.
    def create_first(template):
        t = time.perf_counter()
        s = Sandbox.create(template, **kw)
        s.commands.run("true", timeout=30, request_timeout=30)
        ms = (time.perf_counter() - t) * 1000
        s.kill()
        return ms

    check_budget("create from image")
    img = [create_first("sdk") for _ in range(CREATE_N) if left() > 0]
    check_budget("snapshot")
    t = time.perf_counter()
    snap = sbx.create_snapshot()
    snap_ms = (time.perf_counter() - t) * 1000
    snapped = [create_first(snap.snapshot_id) for _ in range(CREATE_N) if left() > 0]
    result["create_to_first_command"] = {
        "from_image": stats(img), "from_snapshot": stats(snapped),
        "create_snapshot_ms": round(snap_ms, 1),
        "published_median_ms": PUBLISHED_MS}
    try:
        Sandbox.delete_snapshot(snap.snapshot_id)
    except Exception as e:  # noqa: BLE001
        log("delete_snapshot:", e)
    sbx.kill()

    # 3. throughput over 8 sandboxes, 8 threads.
    check_budget("throughput")
    boxes = [Sandbox.create("sdk", **kw) for _ in range(TP_SANDBOXES)]
    for b in boxes:
        b.commands.run("true", timeout=30, request_timeout=30)
    lock, count, errors, lat = threading.Lock(), [0], [], []
    stop_at = [0.0]

    def worker(b):
        while True:
            with lock:
                if count[0] >= TP_MAX or time.monotonic() >= stop_at[0]:
                    return
                count[0] += 1
            t = time.perf_counter()
            try:
                b.commands.run("true", timeout=30, request_timeout=30)
                with lock:
                    lat.append((time.perf_counter() - t) * 1000)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e)[:200])

    stop_at[0] = time.monotonic() + TP_WINDOW_S
    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker, args=(b,), daemon=True) for b in boxes]
    for th in ths:
        th.start()
    for th in ths:
        th.join(TP_WINDOW_S + 40)
    wall = time.perf_counter() - t0
    result["throughput"] = {
        "sandboxes": TP_SANDBOXES, "threads": TP_SANDBOXES, "ok": len(lat),
        "errors": len(errors), "first_errors": errors[:3], "wall_s": round(wall, 3),
        "rps": round(len(lat) / wall, 1), "latency": stats(lat),
        "limit": f"{TP_WINDOW_S:.0f} s or {TP_MAX} requests"}
    for b in boxes:
        b.kill()


def run_main(name, main, *args, **fields):
    """Runs `main(env, result, *args)`, prints the result as one JSON object (with the error
    and the daemon's log tail on failure) and exits 1 on failure; the daemon, the sandboxes
    and the temp dir are cleaned up also on SIGTERM."""
    result = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    env = None

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        env = Env()
        result["kiln_bin"] = env.kiln
        main(env, result, *args)
    except BaseException as e:  # noqa: BLE001 - report, clean up, exit non-zero
        code = 1
        import traceback
        result["error"] = repr(e)[:1000]
        result["traceback"] = traceback.format_exc()[-1500:]
        if env is not None:
            result["serve_log_tail"] = env.log_tail()[-1500:]
    finally:
        if env is not None:
            env.cleanup()
    print(json.dumps(result))
    sys.exit(code)


if __name__ == "__main__":
    run_main("e2b_sdk", main)
