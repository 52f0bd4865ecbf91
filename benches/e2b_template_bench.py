#!/usr/bin/env python3
"""E2B's template builder through `kiln serve` against `kiln build` of the same Dockerfile;
prints one JSON object on stdout.

Run with the SDK venv's Python (root, gVisor/runsc, umoci, static /bin/busybox needed):

    /opt/kiln-tools/e2b-venv/bin/python benches/e2b_template_bench.py [KILN_BIN] [--rounds N]

It starts its own `kiln serve` on a free 127.0.0.1 port with a temp KILN_HOME (the `sdk`
busybox image of benches/e2b_sdk_bench.py as base) and times, N rounds (default 3), each
round both ways one after the other (so load hits both alike):
  - cold: `kiln build --no-cache` vs `Template.build(.., skip_cache=True)`;
  - no change: the same build again;
  - one file changed: a new content for the copied `app.txt`.
The template: RUN, COPY of a small file, COPY of 8 MiB, WORKDIR, RUN. The SDK's time is
from `Template.build` called to returned: hashing and uploading the files, the build, and
its status polls (every 200 ms, the SDK's own). Ratios are of medians (goal: <= 1.2x).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2b_sdk_bench import log, check_budget, run_main  # noqa: E402

DOCKERFILE = """FROM sdk
USER root
RUN mkdir -p /app && echo first > /app/first
COPY app.txt /app/app.txt
COPY data.bin /app/data.bin
WORKDIR /app
RUN cat /app/app.txt > /app/copy && ls /app > /app/listing
"""


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if n == 0 else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def template(ctx):
    from e2b import Template
    return (Template(file_context_path=ctx).from_template("sdk")
            .set_user("root")
            .run_cmd("mkdir -p /app && echo first > /app/first")
            .copy("app.txt", "/app/app.txt")
            .copy("data.bin", "/app/data.bin")
            .set_workdir("/app")
            .run_cmd("cat /app/app.txt > /app/copy && ls /app > /app/listing"))


def main(env, result, rounds):
    from e2b import Template
    env.build_image()
    env.start()
    ctx = os.path.join(env.tmp, "ctx")
    os.makedirs(ctx)
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write(DOCKERFILE)
    with open(os.path.join(ctx, "data.bin"), "wb") as f:
        f.write(os.urandom(8 << 20))

    def write_app(tag):
        with open(os.path.join(ctx, "app.txt"), "w") as f:
            f.write(f"{tag} {time.time_ns()}\n")

    def kiln_build(*flags):
        t = time.monotonic()
        env.k("build", *flags, "-t", "df-tpl", ctx, timeout=600)
        return (time.monotonic() - t) * 1000

    def sdk_build(**kw):
        t = time.monotonic()
        Template.build(template(ctx), "sdk-tpl", **kw)
        return (time.monotonic() - t) * 1000

    ways = {"kiln_build": {"cold": [], "no_change": [], "one_file": []},
            "sdk": {"cold": [], "no_change": [], "one_file": []}}
    write_app("first")
    for r in range(rounds):
        check_budget(f"round {r + 1}")
        for way, cold, warm in (("kiln_build", lambda: kiln_build("--no-cache"), kiln_build),
                                ("sdk", lambda: sdk_build(skip_cache=True), sdk_build)):
            ways[way]["cold"].append(cold())
            ways[way]["no_change"].append(warm())
            write_app(f"{way}-{r}")
            ways[way]["one_file"].append(warm())
            log(way, f"round {r + 1}:", {k: round(v[-1]) for k, v in ways[way].items()})
    for way, scen in ways.items():
        result[way] = {k: {"median_ms": round(median(v), 1), "runs_ms": [round(x) for x in v]}
                       for k, v in scen.items()}
    result["ratio_sdk_to_kiln_build"] = {
        k: round(median(ways["sdk"][k]) / median(ways["kiln_build"][k]), 3)
        for k in ("cold", "no_change", "one_file")}
    result["goal"] = "ratio <= 1.2 in each scenario"
    with open("/proc/loadavg") as f:
        result["loadavg"] = f.read().split()[:3]


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:]]
    rounds = 3
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds = max(1, int(argv[i + 1]))
        del argv[i:i + 2]
    sys.argv = sys.argv[:1] + argv
    run_main("e2b_template", main, rounds, rounds=rounds)
