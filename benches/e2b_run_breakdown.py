#!/usr/bin/env python3
"""Where the time of the E2B SDK's `commands.run("true")` goes, against `kiln serve`; prints
one JSON object on stdout (progress on stderr).

    /opt/kiln-tools/e2b-venv/bin/python benches/e2b_run_breakdown.py [KILN_BIN]

Same setup as benches/e2b_sdk_bench.py (its `Env`: own `kiln serve` on loopback, temp home, the
busybox `sdk` image with a /bin/bash shim). The SDK's data plane (E2B_SANDBOX_URL) goes through
a byte-copying TCP proxy on loopback that timestamps every chunk, so each call splits into:
  - sdk_before_send: from the call to the first request byte (the SDK building the request);
  - serve: from the first request byte to the last response byte (kiln serve + the agent +
    the process; the proxy's own copy is a few tens of microseconds each way);
  - sdk_after_receive: from the last response byte until `run` returns.
Interleaved with the same command straight to the agent's Unix socket (argv
["/bin/bash", "-l", "-c", "true"], what the SDK asks for, and ["true"]), and kiln serve's own
log line for each Start request (time until the process's start event). Then 20 calls under
cProfile: the SDK functions with the most own time.
"""

import cProfile
import io
import json
import os
import pstats
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2b_sdk_bench import Env, agent_exec, log, stats  # noqa: E402

N = 30


class Proxy:
    """127.0.0.1:port -> 127.0.0.1:target, recording (time, direction, bytes, head) per chunk."""

    def __init__(self, target):
        self.target = target
        self.events, self.lock = [], threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            c, _ = self.sock.accept()
            s = socket.create_connection(("127.0.0.1", self.target))
            for a, b, d in ((c, s, "req"), (s, c, "resp")):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self.pump, args=(a, b, d), daemon=True).start()

    def pump(self, a, b, d):
        try:
            while True:
                buf = a.recv(65536)
                if not buf:
                    break
                with self.lock:
                    self.events.append((time.perf_counter(), d, len(buf), buf[:60]))
                b.sendall(buf)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def between(self, t0, t1):
        with self.lock:
            return [e for e in self.events if t0 <= e[0] <= t1]


def main(env, result):
    from e2b import Sandbox

    env.build_image()
    env.start()
    proxy = Proxy(env.port)
    os.environ["E2B_SANDBOX_URL"] = f"http://127.0.0.1:{proxy.port}"
    sbx = Sandbox.create("sdk", timeout=300, request_timeout=60)
    run = lambda: sbx.commands.run("true", timeout=30, request_timeout=30)  # noqa: E731
    for _ in range(3):
        run()
    info = json.loads(env.k("sandbox", "info", sbx.sandbox_id, "--json"))
    agent = info["agent"]
    if not os.path.isabs(agent):
        agent = os.path.join(env.home, agent)
    parts = {"sdk_total": [], "sdk_before_send": [], "serve": [], "sdk_after_receive": [],
             "agent_bash_l_c_true": [], "agent_true": []}
    requests_per_call, heads = [], set()
    for _ in range(N):
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
        ev = proxy.between(t0, t1)
        req = [e for e in ev if e[1] == "req"]
        resp = [e for e in ev if e[1] == "resp"]
        if req and resp:
            parts["sdk_total"].append((t1 - t0) * 1000)
            parts["sdk_before_send"].append((req[0][0] - t0) * 1000)
            parts["serve"].append((resp[-1][0] - req[0][0]) * 1000)
            parts["sdk_after_receive"].append((t1 - resp[-1][0]) * 1000)
        starts = [e for e in req if re.match(rb"^[A-Z]+ /", e[3])]
        requests_per_call.append(len(starts))
        heads.update(e[3].split(b"\r\n")[0].decode(errors="replace") for e in starts)
        for key, argv in (("agent_bash_l_c_true", ["/bin/bash", "-l", "-c", "true"]),
                          ("agent_true", ["true"])):
            t = time.perf_counter()
            agent_exec(agent, argv)
            parts[key].append((time.perf_counter() - t) * 1000)
    result["parts_ms"] = {k: stats(v) for k, v in parts.items()}
    result["http_requests_per_call"] = sorted(set(requests_per_call))
    result["request_lines"] = sorted(heads)

    # kiln serve's own time per Start request (its log: until the start event is sent).
    served = []
    with open(os.path.join(env.tmp, "serve.log"), "rb") as f:
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read().decode(errors="replace"))
        for line in text.splitlines():
            if "process.Process/Start" in line:
                m = re.search(r"ms=(\d+)", line)
                if m:
                    served.append(float(m.group(1)))
    result["serve_log_start_ms"] = stats(served[-N:])

    # The SDK's own time: 20 calls under cProfile, the functions with the most own time.
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    result["cprofile_20_calls_by_own_time"] = [
        line.strip() for line in out.getvalue().splitlines()
        if line.strip() and (line.strip()[0].isdigit() or "ncalls" in line)][:14]
    sbx.kill()


if __name__ == "__main__":
    result = {"bench": "e2b_run_breakdown", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "load_avg_start": open("/proc/loadavg").read().split()[:3]}
    env, code = None, 0
    try:
        env = Env()
        log("kiln", env.kiln)
        main(env, result)
    except BaseException as e:  # noqa: BLE001 - report, clean up, exit non-zero
        code = 1
        import traceback
        result["error"] = repr(e)[:1000]
        result["traceback"] = traceback.format_exc()[-1500:]
    finally:
        if env is not None:
            env.cleanup()
    result["load_avg_end"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(result, indent=1))
    sys.exit(code)
