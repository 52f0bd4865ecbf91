"""E2B REST contract check of a live `kiln serve` (E2B_API_URL, E2B_API_KEY in the environment).

The authority is the E2B SDK's own generated API client (e2b.api.client, generated from E2B's
spec/openapi.yml): for every response kiln gives, the generated module of that operation must
declare its status code (`raise_on_unexpected_status`), parse its body into the declared model
(required fields present, types and enum values right), and the parsed models may carry no
field the spec does not declare. The requests cover every route kiln serves, on good and bad
input (unknown ids, malformed bodies, wrong states, no API key).

Prints one JSON line: {"checked": ["GET /sandboxes/{sandboxID} 404", ...],
"violations": ["...", ...], "routes": ["GET /sandboxes/{sandboxID}", ...]}.
"""

import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
import time

import attrs
import httpx

import e2b.api.client.api as api_pkg
from e2b.api.client import errors
from e2b.api.client.client import Client
from e2b.api.client.models.error import Error

URL = os.environ["E2B_API_URL"].rstrip("/")
KEY = os.environ["E2B_API_KEY"]
TEMPLATE = sys.argv[1] if len(sys.argv) > 1 else "sdk"


def routes():
    """(method, template, regex, module) for every operation in the generated client; literal
    routes first, so /sandboxes/metrics is not taken for /sandboxes/{sandboxID}."""
    out = []
    for group in pkgutil.iter_modules(api_pkg.__path__):
        pkg = importlib.import_module(f"{api_pkg.__name__}.{group.name}")
        for op in pkgutil.iter_modules(pkg.__path__):
            mod = importlib.import_module(f"{pkg.__name__}.{op.name}")
            src = inspect.getsource(mod._get_kwargs)
            method = re.search(r'"method": "(\w+)"', src).group(1).upper()
            url = re.search(r'"url": f?"([^"]+)"', src).group(1)
            regex = "^" + re.sub(r"\{[^}]+\}", "[^/]+", url) + "$"
            out.append((method, url, re.compile(regex), mod))
    out.sort(key=lambda r: r[1].count("{"))
    return out


ROUTES = routes()

# What E2B's own API answers beyond its spec, which kiln follows (e2b-dev/infra):
# - 400 with an Error body on any operation whose request fails the spec's schema: the API
#   runs every request through oapi-codegen's validator middleware (packages/api/main.go).
# - 404 for an unknown template where the spec declares none: the template cache's
#   ErrorToAPIError (packages/api/internal/cache/templates/errors.go), used by sandbox create
#   and template delete; and for an unknown build to start
#   (packages/api/internal/handlers/template_start_build_v2.go).
BEYOND_SPEC = {
    ("POST", "/sandboxes", 404),
    ("POST", "/v2/sandboxes", 404),
    ("DELETE", "/templates/{template_id}", 404),
    ("POST", "/v2/templates/{template_id}/builds/{build_id}", 404),
}
CLIENT = Client(base_url=URL, raise_on_unexpected_status=True)
checked = []
violations = []


def undeclared(value, where):
    """Fields of parsed models that the spec does not declare (a model with no declared
    field of its own is a free-form map, as metadata is)."""
    found = []
    if isinstance(value, list):
        for i, v in enumerate(value):
            found += undeclared(v, f"{where}[{i}]")
    elif attrs.has(type(value)):
        declared = [f.name for f in attrs.fields(type(value)) if f.name != "additional_properties"]
        extra = getattr(value, "additional_properties", {})
        if declared and extra:
            found.append(f"{where}: undeclared {sorted(extra)}")
        for name in declared:
            found += undeclared(getattr(value, name), f"{where}.{name}")
    return found


def check(method, path, resp):
    route = next(((u, m) for (meth, u, rx, m) in ROUTES if meth == method and rx.match(path)), None)
    if route is None:
        violations.append(f"{method} {path}: no such operation in E2B's spec")
        return None
    url, mod = route
    what = f"{method} {url} {resp.status_code}"
    checked.append(what)
    try:
        parsed = mod._parse_response(client=CLIENT, response=resp)
    except errors.UnexpectedStatus:
        if resp.status_code == 400 or (method, url, resp.status_code) in BEYOND_SPEC:
            return error_body(what, resp)
        violations.append(f"{what}: status not declared by the spec ({resp.text[:200]})")
        return None
    except Exception as e:  # a required field missing, a wrong type or enum value
        violations.append(f"{what}: body does not parse as the spec's model: "
                          f"{type(e).__name__}: {e} ({resp.text[:300]})")
        return None
    for v in undeclared(parsed, "body"):
        violations.append(f"{what}: {v}")
    return parsed


def error_body(what, resp):
    """An answer E2B gives beyond its spec carries E2B's Error body."""
    try:
        parsed = Error.from_dict(resp.json())
    except Exception as e:
        violations.append(f"{what}: not an Error body: {type(e).__name__}: {e} ({resp.text[:200]})")
        return None
    for v in undeclared(parsed, "body"):
        violations.append(f"{what}: {v}")
    return parsed


def call(method, path, body=None, expect=None, key=KEY, params=None):
    headers = {"X-API-Key": key} if key is not None else {}
    kw = {"params": params, "headers": headers, "timeout": 120}
    if body is not None:
        kw["content"] = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers["Content-Type"] = "application/json"
    resp = httpx.request(method, URL + path, **kw)
    check(method, path, resp)
    if expect is not None and resp.status_code not in (expect if isinstance(expect, tuple) else (expect,)):
        violations.append(f"{method} {path}: expected {expect}, got {resp.status_code}: {resp.text[:300]}")
    return resp


def main():
    unknown = "0123456789abcdef"
    # Authentication.
    call("GET", "/sandboxes", expect=401, key=None)
    call("GET", "/sandboxes", expect=401, key="wrong-key")
    call("POST", "/sandboxes", {"templateID": TEMPLATE}, expect=401, key=None)
    call("GET", f"/sandboxes/{unknown}", expect=401, key=None)
    call("DELETE", f"/sandboxes/{unknown}", expect=401, key=None)
    call("GET", "/templates", expect=401, key=None)
    call("GET", "/snapshots", expect=401, key=None)

    # Create: good and bad.
    sbx = call("POST", "/sandboxes", {"templateID": TEMPLATE, "timeout": 300,
                                      "metadata": {"suite": "contract"}}, expect=201).json()
    sid = sbx["sandboxID"]
    call("POST", "/sandboxes", {"templateID": "no-such-template"}, expect=(400, 404))
    call("POST", "/sandboxes", b"{not json", expect=400)
    call("POST", "/sandboxes", {"timeout": 30}, expect=400)
    call("POST", "/sandboxes", {"templateID": TEMPLATE, "timeout": -5}, expect=400)
    call("POST", "/sandboxes", {"templateID": TEMPLATE, "metadata": "nope"}, expect=400)

    # Reads.
    call("GET", "/sandboxes", expect=200)
    call("GET", "/sandboxes", params={"metadata": "suite=contract"}, expect=200)
    call("GET", "/v2/sandboxes", params={"state": "running,paused", "limit": "5"}, expect=200)
    call("GET", "/v2/sandboxes", params={"state": "sleeping"}, expect=400)
    call("GET", "/v2/sandboxes", params={"limit": "-1"}, expect=400)
    call("GET", "/v2/sandboxes", params={"nextToken": "%%%garbage"}, expect=400)
    call("GET", f"/sandboxes/{sid}", expect=200)
    call("GET", f"/sandboxes/{unknown}", expect=404)
    call("GET", f"/sandboxes/{sid}/metrics", expect=200)
    call("GET", f"/sandboxes/{unknown}/metrics", expect=404)
    call("GET", "/sandboxes/metrics", params={"sandbox_ids": sid}, expect=200)
    call("GET", "/sandboxes/metrics", expect=400)

    # Lifecycle of a running sandbox.
    call("POST", f"/sandboxes/{sid}/timeout", {"timeout": 600}, expect=204)
    call("POST", f"/sandboxes/{sid}/timeout", {"timeout": "x"}, expect=400)
    call("POST", f"/sandboxes/{unknown}/timeout", {"timeout": 60}, expect=404)
    call("POST", f"/sandboxes/{sid}/refreshes", {"duration": 60}, expect=204)
    call("POST", f"/sandboxes/{unknown}/refreshes", {"duration": 60}, expect=404)
    call("PUT", f"/sandboxes/{sid}/network", {"allowOut": ["10.0.0.0/8"]}, expect=(204, 400, 409))
    call("PUT", f"/sandboxes/{sid}/network", {"allowOut": "nope"}, expect=400)
    call("PUT", f"/sandboxes/{unknown}/network", {}, expect=404)
    call("POST", f"/sandboxes/{sid}/resume", {}, expect=409)
    call("POST", f"/sandboxes/{sid}/connect", {"timeout": 300}, expect=200)
    call("POST", f"/sandboxes/{unknown}/connect", {"timeout": 300}, expect=404)
    snap = call("POST", f"/sandboxes/{sid}/snapshots", {"name": "contract-snap"}, expect=201)
    call("POST", f"/sandboxes/{unknown}/snapshots", {}, expect=404)
    call("GET", "/snapshots", expect=200)
    call("GET", "/snapshots", params={"sandboxID": sid}, expect=200)
    fork = call("POST", f"/sandboxes/{sid}/fork", {"count": 1, "timeout": 120}, expect=(200, 201))
    call("POST", f"/sandboxes/{sid}/fork", {"count": 0}, expect=400)
    call("POST", f"/sandboxes/{unknown}/fork", {"count": 1}, expect=404)

    # Paused.
    call("POST", f"/sandboxes/{sid}/pause", {}, expect=204)
    call("POST", f"/sandboxes/{sid}/pause", {}, expect=409)
    call("POST", f"/sandboxes/{unknown}/pause", {}, expect=404)
    call("GET", f"/sandboxes/{sid}", expect=200)
    call("GET", f"/sandboxes/{sid}/metrics", expect=(200, 409))
    call("POST", f"/sandboxes/{sid}/fork", {"count": 1}, expect=409)
    detail = call("GET", f"/sandboxes/{sid}", expect=200).json()
    if detail.get("pauseMode") != "full":
        violations.append(f"a full pause reports pauseMode {detail.get('pauseMode')!r}")
    call("POST", f"/sandboxes/{sid}/resume", {"timeout": 300}, expect=201)
    call("POST", f"/sandboxes/{sid}/pause", {"memory": False}, expect=204)
    detail = call("GET", f"/sandboxes/{sid}", expect=200).json()
    if detail.get("pauseMode") != "filesystem":
        violations.append(f"a filesystem pause reports pauseMode {detail.get('pauseMode')!r}")
    call("POST", f"/v2/sandboxes/{sid}/connect", {"timeout": 300}, expect=(200, 201))
    call("POST", f"/sandboxes/{sid}/pause", {}, expect=204)
    call("POST", f"/v2/sandboxes/{sid}/connect", {"timeout": 300, "memory": False}, expect=201)
    call("POST", "/sandboxes", {"templateID": TEMPLATE, "autoPauseMemory": False}, expect=400)
    call("POST", "/sandboxes", {"templateID": TEMPLATE, "autoPause": True, "autoPauseMemory": False,
                                "autoResume": {"enabled": True}}, expect=400)

    # Templates and aliases.
    call("GET", "/templates", expect=200)
    call("GET", f"/templates/aliases/{TEMPLATE}", expect=200)
    call("GET", "/templates/aliases/no-such-alias", expect=404)
    call("DELETE", "/templates/no-such-template", expect=404)

    # Template builds (E2B's template SDK): create, files, start, status, logs, tags.
    call("POST", "/v3/templates", {}, expect=400)
    tpl = call("POST", "/v3/templates", {"name": "contract-tpl:v1"}, expect=202).json()
    build = tpl.get("buildID", "x")
    hash_ = "ab" * 32
    call("GET", f"/templates/contract-tpl/files/{hash_}", expect=201)
    call("GET", "/templates/contract-tpl/files/not-hex", expect=400)
    call("GET", f"/templates/no-such-template/files/{hash_}", expect=404)
    call("POST", f"/v2/templates/contract-tpl/builds/{build}", {"steps": []}, expect=400)
    call("POST", "/v2/templates/contract-tpl/builds/nope", {"fromImage": "x"}, expect=400)
    call("POST", "/v2/templates/contract-tpl/builds/00000000-0000-4000-8000-000000000000",
         {"fromImage": "x"}, expect=404)
    call("GET", f"/templates/contract-tpl/builds/{build}/status", expect=200)
    call("GET", f"/templates/contract-tpl/builds/{build}/status", params={"limit": "101"}, expect=400)
    call("GET", f"/templates/no-such-template/builds/{build}/status", expect=404)
    call("GET", f"/templates/contract-tpl/builds/{build}/logs", expect=200)
    call("GET", f"/templates/contract-tpl/builds/{build}/logs", params={"limit": "-1"}, expect=400)
    call("POST", "/templates/tags", {"target": f"{TEMPLATE}:default", "tags": ["contract"]},
         expect=(201, 404))
    call("GET", f"/templates/{TEMPLATE}/tags", expect=(200, 404))
    call("DELETE", "/templates/tags", {"name": f"{TEMPLATE}", "tags": ["contract"]},
         expect=(204, 400, 404))

    # Kill.
    try:
        for f in fork.json() if isinstance(fork.json(), list) else []:
            if isinstance(f, dict) and "sandboxID" in f:
                call("DELETE", f"/sandboxes/{f['sandboxID']}", expect=204)
    except ValueError:
        pass
    call("DELETE", f"/sandboxes/{sid}", expect=204)
    call("DELETE", f"/sandboxes/{sid}", expect=404)
    call("GET", f"/sandboxes/{sid}", expect=404)
    if snap.status_code == 201:
        snap_id = snap.json().get("snapshotID")
        if snap_id:
            call("DELETE", f"/templates/{snap_id}", expect=204)

    served = sorted({c.rsplit(" ", 1)[0] for c in checked})
    print(json.dumps({"checked": checked, "violations": violations, "routes": served}))


if __name__ == "__main__":
    main()
