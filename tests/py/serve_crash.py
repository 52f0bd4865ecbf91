"""E2B SDK clients and the final checker for tests/tests/serve_crash.rs.

    serve_crash.py client N SEED JOURNAL STOPFILE TEMPLATE
        Loops over random operations (create, commands.run, files write/read, pause,
        connect, fork, kill) on sandboxes of its own until STOPFILE exists, journalling
        every step (JSON lines) so the checker knows what must have survived. The daemon is
        killed under it at random moments: each operation is retried while the daemon is
        down, within a bounded budget. Prints a JSON summary (op -> outcome counts) last.

    serve_crash.py check JOURNAL_DIR
        Reads every client's journal, lists the daemon's sandboxes, and checks each: a
        sandbox a client got back and never killed must be listed (running or paused), a
        paused one must resume, its file must be byte-identical to what the journal allows,
        and a command must run; a killed one must not be listed. Prints one JSON report.

The file each client writes is FILE in the sandbox; its content is journalled by sha256.
After a write that did not come back, both the old and the new content are allowed (the
write may or may not have happened before the daemon died); the client then rewrites it
until a write is confirmed.
"""

import concurrent.futures
import hashlib
import json
import os
import random
import sys
import time

from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException, SandboxNotFoundException

FILE = "/work/crash.bin"
# Sandboxes outlive the test: no timeout may expire while it runs.
SBX_TIMEOUT = 1800
# One request's bound; a pause/resume/fork under load on 2 cores takes seconds, not minutes.
REQUEST_TIMEOUT = 90
# How long one operation keeps retrying while the daemon is down or restarting.
OP_BUDGET = float(os.environ.get("KILN_CRASH_OP_BUDGET", "45"))
# Live sandboxes per client.
CAP = int(os.environ.get("KILN_CRASH_CAP", "2"))


def sha(b):
    return hashlib.sha256(b).hexdigest()


def err_text(e):
    """One line: the daemon's messages may carry a log tail."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


class Gone(Exception):
    """The daemon answered 404 for a sandbox."""


def read_sha(sbx):
    """sha256 of FILE in the sandbox, None when it does not exist."""
    try:
        return sha(bytes(sbx.files.read(FILE, format="bytes", request_timeout=REQUEST_TIMEOUT)))
    except NotFoundException as e:
        if FILE in str(e):
            return None  # never written
        raise


def gone(sid):
    """Whether the control plane answers 404 for the sandbox (False on any other error)."""
    try:
        Sandbox.get_info(sid, request_timeout=REQUEST_TIMEOUT)
        return False
    except SandboxNotFoundException:
        return True
    except Exception:
        return False


class Client:
    def __init__(self, n, seed, journal, stopfile, template):
        self.n = n
        self.rng = random.Random(seed * 1000 + n)
        self.journal = open(journal, "a", buffering=1)
        self.stopfile = stopfile
        self.template = template
        # id -> {"sbx": Sandbox or None, "state": running|paused|unknown,
        #        "allowed": [sha...], "absent_ok": bool, "kill_tried": bool}
        self.live = {}
        self.seq = 0
        self.stats = {}
        self.tour = list(self.TOUR)
        # id -> when this client got it (newest first for the tour).
        self.order = {}

    def log(self, ev, **kw):
        if ev == "created":
            self.order[kw["id"]] = len(self.order)
        kw["ev"] = ev
        kw["t"] = round(time.time(), 3)
        kw["client"] = self.n
        self.journal.write(json.dumps(kw) + "\n")

    def count(self, op, outcome):
        self.stats.setdefault(op, {}).setdefault(outcome, 0)
        self.stats[op][outcome] += 1

    def stopping(self):
        return os.path.exists(self.stopfile)

    def expect(self, sid):
        s = self.live[sid]
        self.log("expect", id=sid, allowed=s["allowed"], absent_ok=s["absent_ok"])

    def retry(self, op, sid, fn):
        """Runs fn until it returns, retrying any error within OP_BUDGET (less once the test
        asks to stop). Raises Gone when the daemon says the sandbox does not exist, the last
        error when the budget is spent."""
        start = time.time()
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                r = fn(attempt)
                self.count(op, "ok" if attempt == 1 else "ok-after-retry")
                return r
            except (SandboxNotFoundException, Gone) as e:
                self.count(op, "404")
                raise Gone(err_text(e))
            except Exception as e:  # the daemon is down, restarting, or refused
                last = e
                status = getattr(e, "status_code", None)
                if isinstance(status, int) and status >= 500:
                    # A live daemon failed the request (a dead one answers nothing).
                    self.log("daemon-error", op=op, id=sid, status=status, err=err_text(e))
                # The data plane says "The sandbox X was not found" (502): ask the control
                # plane, whose 404 is definite.
                if sid and "not found" in str(e).lower() and gone(sid):
                    self.count(op, "404")
                    raise Gone(err_text(e))
            budget = min(OP_BUDGET, 20) if self.stopping() else OP_BUDGET
            if time.time() - start > budget:
                self.count(op, "gave-up")
                self.log("gave-up", op=op, id=sid, attempts=attempt, err=err_text(last))
                raise last
            time.sleep(delay)
            delay = min(delay * 1.6, 2.0)

    def lost(self, sid, op, why):
        """The daemon says the sandbox does not exist: lost, unless a kill of ours may have
        reached it first."""
        s = self.live.pop(sid)
        if s["kill_tried"]:
            self.log("kill-ok", id=sid, how="404 after an unanswered kill")
        else:
            self.log("lost", id=sid, op=op, err=why)

    def handle(self, sid):
        """A Sandbox object for the data plane (connected first when it may be paused; one
        attempt, the caller retries)."""
        s = self.live[sid]
        if s["state"] != "running" or s["sbx"] is None:
            s["sbx"] = Sandbox.connect(sid, timeout=SBX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
            s["state"] = "running"
            self.count("connect", "ok")
        return s["sbx"]

    # ---- operations ----

    def op_create(self):
        self.seq += 1
        nonce = f"c{self.n}-{self.seq}"
        self.log("create-try", nonce=nonce)

        def go(attempt):
            return Sandbox.create(
                self.template,
                timeout=SBX_TIMEOUT,
                metadata={"crash_client": str(self.n), "nonce": nonce},
                request_timeout=REQUEST_TIMEOUT,
            )

        sbx = self.retry("create", None, go)
        sid = sbx.sandbox_id
        self.live[sid] = {"sbx": sbx, "state": "running", "allowed": [], "absent_ok": True,
                          "kill_tried": False}
        self.log("created", id=sid, via="create", nonce=nonce)
        self.expect(sid)

    def op_run(self, sid):
        word = f"alive{self.rng.randrange(10**6)}"

        def go(attempt):
            sbx = self.handle(sid)
            r = sbx.commands.run(f"echo {word}", timeout=30, request_timeout=REQUEST_TIMEOUT)
            if r.stdout != word + "\n":
                raise RuntimeError(f"echo said {r.stdout!r}")
            return r

        self.retry("run", sid, go)

    def op_write(self, sid):
        self.seq += 1
        size = self.rng.choice([0, 1, 100, 4096, 70000, self.rng.randrange(1, 200000)])
        data = random.Random(f"{self.n}-{self.seq}").randbytes(size)
        h = sha(data)
        s = self.live[sid]
        # Until a write comes back, the old content and this one are both possible.
        s["allowed"] = sorted(set(s["allowed"]) | {h})
        self.log("write-try", id=sid, sha=h, size=size)
        self.expect(sid)

        def go(attempt):
            sbx = self.handle(sid)
            sbx.files.write(FILE, data, request_timeout=REQUEST_TIMEOUT)

        self.retry("write", sid, go)
        s["allowed"] = [h]
        s["absent_ok"] = False
        self.log("write-ok", id=sid, sha=h)
        self.expect(sid)

    def op_read(self, sid):
        s = self.live[sid]

        def go(attempt):
            return read_sha(self.handle(sid))

        got = self.retry("read", sid, go)
        ok = (got is None and s["absent_ok"]) or got in s["allowed"]
        if not ok:
            self.log("mismatch", id=sid, got=got, allowed=s["allowed"], absent_ok=s["absent_ok"])
            self.count("read", "MISMATCH")
        elif got is not None:
            # Reading settles an ambiguous write.
            s["allowed"] = [got]
            s["absent_ok"] = False
            self.expect(sid)

    def op_pause(self, sid):
        s = self.live[sid]
        s["state"] = "unknown"
        self.retry("pause", sid, lambda a: Sandbox.pause(sid, request_timeout=REQUEST_TIMEOUT))
        s["state"] = "paused"
        s["sbx"] = None
        self.log("paused", id=sid)

    def op_connect(self, sid):
        s = self.live[sid]
        sbx = self.retry("connect", sid, lambda a: Sandbox.connect(
            sid, timeout=SBX_TIMEOUT, request_timeout=REQUEST_TIMEOUT))
        s["sbx"] = sbx
        s["state"] = "running"

    def op_fork(self, sid):
        s = self.live[sid]
        count = self.rng.choice([1, 1, 2])

        def go(attempt):
            sbx = self.handle(sid)
            out = sbx.fork(count=count, timeout=SBX_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
            errs = [e for e in out if isinstance(e, Exception)]
            ok = [f for f in out if not isinstance(f, Exception)]
            # Whatever came back is ours to track, even when some forks failed.
            for f in ok:
                self.live[f.sandbox_id] = {"sbx": f, "state": "running",
                                           "allowed": list(s["allowed"]),
                                           "absent_ok": s["absent_ok"], "kill_tried": False}
                self.log("created", id=f.sandbox_id, via="fork", parent=sid)
                self.expect(f.sandbox_id)
            if errs:
                raise RuntimeError(f"{len(errs)} of {count} forks failed: {err_text(errs[0])}")
            return ok

        self.retry("fork", sid, go)

    def op_kill(self, sid):
        s = self.live[sid]
        self.log("kill-try", id=sid)

        def go(attempt):
            sent_before = s["kill_tried"]
            s["kill_tried"] = True
            if Sandbox.kill(sid, request_timeout=REQUEST_TIMEOUT):
                return
            if not sent_before:
                # 404 before any kill of ours can have reached the daemon.
                s["kill_tried"] = False
                raise Gone("kill answered 404")

        self.retry("kill", sid, go)
        self.live.pop(sid)
        self.log("kill-ok", id=sid)

    # Every client starts with each operation once, so each is exercised whatever the
    # random draws; one that a kill kept from succeeding comes round again (a fork under load
    # can outlast every window the daemon is up in); then random ones.
    TOUR = ["create", "write", "read", "pause", "connect", "run", "fork", "kill"]

    def succeeded(self, op):
        done = self.stats.get(op, {})
        return done.get("ok", 0) + done.get("ok-after-retry", 0) > 0

    def step(self):
        if not self.tour and len(self.live) <= CAP:
            self.tour = [op for op in self.TOUR if not self.succeeded(op)]
        ids = sorted(self.live)
        if self.tour:
            op = self.tour.pop(0)
            if op == "create" or not ids:
                return self.op_create()
            # The newest sandbox: after the fork, the kill takes the fork.
            sid = max(ids, key=lambda i: self.order[i])
            return self.run_op(op, sid)
        if not ids or (len(ids) < CAP and self.rng.random() < 0.3):
            return self.op_create()
        sid = self.rng.choice(ids)
        ops = [("run", 14), ("write", 18), ("read", 14), ("pause", 12), ("connect", 10),
               ("fork", 8 if len(ids) < CAP + 1 else 0), ("kill", 6 + 20 * (len(ids) > CAP))]
        op = self.rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        self.run_op(op, sid)

    def run_op(self, op, sid):
        try:
            getattr(self, "op_" + op)(sid)
        except Gone as e:
            if sid in self.live:
                self.lost(sid, op, str(e))
        except Exception:
            # Given up: the sandbox's state is unknown now; the next op connects first.
            if sid in self.live:
                self.live[sid]["state"] = "unknown"

    def run(self):
        self.log("start")
        while not self.stopping():
            try:
                self.step()
            except Exception as e:
                self.log("error", err=err_text(e))
        self.log("stop", live=sorted(self.live))
        print(json.dumps(self.stats), flush=True)


# ---- the final check ----

def read_journals(d):
    """id -> what the journals say about it; daemon errors of no sandbox (creates)."""
    ids = {}
    unowned = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(d, name)) as f:
            for line in f:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue  # a client killed mid-line
                sid = ev.get("id")
                if not sid:
                    if ev["ev"] == "daemon-error":
                        unowned.append(ev)  # a create
                    continue
                s = ids.setdefault(sid, {"client": ev["client"], "created": None,
                                         "killed": False, "kill_tried": False, "lost": None,
                                         "allowed": [], "absent_ok": True, "mismatch": [],
                                         "daemon_errors": []})
                e = ev["ev"]
                if e == "created":
                    s["created"] = ev.get("via")
                    s["parent"] = ev.get("parent")
                elif e == "expect":
                    s["allowed"] = ev["allowed"]
                    s["absent_ok"] = ev["absent_ok"]
                elif e == "kill-try":
                    s["kill_tried"] = True
                elif e == "kill-ok":
                    s["killed"] = True
                elif e == "lost":
                    s["lost"] = f"{ev['op']}: {ev['err']}"
                elif e == "mismatch":
                    s["mismatch"].append(ev)
                elif e == "daemon-error":
                    s["daemon_errors"].append(ev)
    return ids, unowned


def until(what, fn, budget=60):
    """fn() retried on errors other than a 404 for up to budget seconds."""
    start = time.time()
    while True:
        try:
            return fn()
        except (SandboxNotFoundException, Gone):
            raise
        except Exception as e:
            if time.time() - start > budget:
                raise RuntimeError(f"{what}: {err_text(e)}")
            time.sleep(0.5)


def listed():
    out = {}
    pages = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING, SandboxState.PAUSED]),
                         limit=100, request_timeout=REQUEST_TIMEOUT)
    while pages.has_next:
        for i in pages.next_items():
            out[i.sandbox_id] = i.state.value
    return out


def check_one(sid, state, j):
    """Problems of one listed sandbox (empty: usable, its file as journalled)."""
    problems = []
    try:
        if state == "paused":
            sbx = until("connect (resume)", lambda: Sandbox.connect(
                sid, timeout=SBX_TIMEOUT, request_timeout=REQUEST_TIMEOUT), budget=120)
        else:
            sbx = until("connect", lambda: Sandbox.connect(
                sid, timeout=SBX_TIMEOUT, request_timeout=REQUEST_TIMEOUT))
    except Exception as e:
        return [f"listed {state} but connect{' (resume)' if state == 'paused' else ''} "
                f"failed: {err_text(e)}"]
    try:
        r = until("commands.run", lambda: sbx.commands.run(
            "echo alive", timeout=30, request_timeout=REQUEST_TIMEOUT))
        if r.stdout != "alive\n":
            problems.append(f"commands.run('echo alive') said {r.stdout!r}")
    except Exception as e:
        problems.append(f"listed {state} but a command does not run: {err_text(e)}")
    if j is not None:
        try:
            got = until("files.read", lambda: read_sha(sbx))
            if not ((got is None and j["absent_ok"]) or got in j["allowed"]):
                problems.append(
                    f"{FILE} is {'absent' if got is None else 'sha256 ' + got[:16]}, the "
                    f"journal allows {[a[:16] for a in j['allowed']]}"
                    f"{' or absent' if j['absent_ok'] else ''}")
        except Exception as e:
            problems.append(f"files.read failed: {err_text(e)}")
    try:
        now = until("get_info", lambda: Sandbox.get_info(sid, request_timeout=REQUEST_TIMEOUT))
        if now.state.value != "running":
            problems.append(f"after connect its state is {now.state.value}")
    except Exception as e:
        problems.append(f"get_info after connect failed: {err_text(e)}")
    return problems


def check(d):
    journal, unowned = read_journals(d)
    seen = until("list", listed, budget=120)
    violations = []

    def bad(sid, what):
        violations.append({"id": sid, "what": what})

    for d in unowned:
        bad("global", f"the daemon answered {d['status']} to {d['op']}: {d['err']}")
    for sid, j in sorted(journal.items()):
        for m in j["mismatch"]:
            bad(sid, f"during the run a read gave {str(m['got'])[:16]}, the journal allowed "
                     f"{[a[:16] for a in m['allowed']]}")
        for d in j["daemon_errors"]:
            bad(sid, f"the daemon answered {d['status']} to {d['op']}: {d['err']}")
        if sid in seen:
            if j["killed"]:
                bad(sid, f"killed (the kill was answered) but still listed as {seen[sid]}")
            continue
        if j["lost"]:
            bad(sid, f"lost: a client got 404 for it without killing it ({j['lost']})")
        elif not (j["killed"] or j["kill_tried"]):
            bad(sid, "lost: never killed, but not listed")
        # else gone, as asked; the test checks that it left nothing behind
    to_check = {sid: st for sid, st in seen.items()
                if not (sid in journal and journal[sid]["killed"])}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        futs = {sid: ex.submit(check_one, sid, st, journal.get(sid))
                for sid, st in to_check.items()}
        for sid, f in sorted(futs.items()):
            for p in f.result():
                bad(sid, p)
    print(json.dumps({
        "listed": seen,
        "journaled": sorted(journal),
        "unjournaled": sorted(set(seen) - set(journal)),
        "violations": violations,
        "expected_alive": sorted(s for s, j in journal.items()
                                 if not j["killed"] and not j["kill_tried"]),
    }), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "client":
        n, seed, journal, stopfile, template = sys.argv[2:7]
        Client(int(n), int(seed), journal, stopfile, template).run()
    elif sys.argv[1] == "check":
        check(sys.argv[2])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")
