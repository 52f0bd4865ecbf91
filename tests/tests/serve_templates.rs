//! E2B's template builder (`Template().from_template(..).copy(..).run_cmd(..)`,
//! `Template.build`) against `kiln serve`, with E2B's unmodified Python SDK: the steps run on
//! kiln's Dockerfile builder, a rebuild reuses its step cache, failures name the step and its
//! output, and the template is usable by alias from `Sandbox.create` and deletable.
//!
//! No internet here: the base is the `sdk` image the other serve tests use (no apt).

use kiln_tests::e2b;

const KEY: &str = "kiln_test_key_0123456789";

/// Python prelude: the SDK, a JSON printer, and a template over context `ctx`.
fn prelude(ctx: &std::path::Path) -> String {
    format!(
        r#"import json, time
from e2b import Template, Sandbox
from e2b.exceptions import BuildException
CTX = {ctx:?}
def tpl(cmd="cat /app/a.txt > /app/copy-of-a"):
    return (Template(file_context_path=CTX).from_template("sdk")
        .set_user("root")
        .run_cmd("mkdir -p /app && echo first > /app/first")
        .set_envs({{"GREETING": "hello world"}})
        .copy("a.txt", "/app/a.txt")
        .set_workdir("/app")
        .run_cmd(cmd))
"#
    )
}

/// The build log lines a script printed as `"logs"`.
fn logs(v: &serde_json::Value) -> Vec<String> {
    v["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sdk_template_build_rebuild_create_fail_delete() {
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let (s, py) = (&t.s, &t.py);
    let ctx = t.tmp.path().join("tpl-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("a.txt"), "one\n").unwrap();
    let pre = prelude(&ctx);

    // First build: nothing cached; the steps' lines come back as build logs.
    let build = |name: &str| {
        s.python(
            py,
            &format!(
                r#"{pre}
logs = []
info = Template.build(tpl(), "{name}", on_build_logs=lambda e: logs.append(e.message))
print(json.dumps({{"id": info.template_id, "build": info.build_id, "logs": logs}}))
"#
            ),
        )
    };
    let v = build("tpl-a");
    assert_eq!(v["id"], "tpl-a", "{v}");
    let first = logs(&v);
    assert!(
        first.iter().any(|l| l.contains("Uploaded 'a.txt'")),
        "{first:#?}"
    );
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("0 of ") && l.contains("steps cached")),
        "{first:#?}"
    );

    // The same template again, one copied file changed: the steps before the COPY come from
    // the builder's step cache, the COPY and what follows run again.
    std::fs::write(ctx.join("a.txt"), "two\n").unwrap();
    let second = logs(&build("tpl-a"));
    let cached: Vec<&String> = second.iter().filter(|l| l.ends_with("(cached)")).collect();
    assert!(
        cached.iter().any(|l| l.contains("mkdir -p /app")),
        "{second:#?}"
    );
    assert!(
        !second
            .iter()
            .any(|l| l.contains("COPY") && l.ends_with("(cached)")),
        "{second:#?}"
    );
    assert!(
        second.iter().any(|l| l.contains("Uploaded 'a.txt'")),
        "{second:#?}"
    );

    // By alias from Sandbox.create: the copied file (its new content), the RUN steps' files,
    // the ENV; listed, and known to Template.exists.
    let v = s.python(
        py,
        &format!(
            r#"{pre}
sbx = Sandbox.create("tpl-a", timeout=120)
r = sbx.commands.run("cat /app/a.txt /app/copy-of-a /app/first; echo $GREETING", user="root")
sbx.kill()
print(json.dumps({{"out": r.stdout, "exists": Template.exists("tpl-a"), "missing": Template.exists("tpl-none")}}))
"#
        ),
    );
    assert_eq!(v["out"], "two\ntwo\nfirst\nhello world\n", "{v}");
    assert_eq!(v["exists"], true);
    assert_eq!(v["missing"], false);
    let (code, list) = s.api("GET", "/templates", None);
    assert_eq!(code, 200);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|t| t["templateID"] == "tpl-a"),
        "{list}"
    );

    // A failing run_cmd: the SDK raises with the step's output, and the status names the
    // step (E2B numbers them from 1 after the base: this is the 6th instruction).
    let v = s.python(
        py,
        &format!(
            r#"{pre}
try:
    Template.build(tpl("echo doomed-output; exit 3"), "tpl-bad")
    print(json.dumps({{"raised": False}}))
except BuildException as e:
    print(json.dumps({{"raised": True, "msg": str(e), "exists": Template.exists("tpl-bad")}}))
"#
        ),
    );
    assert_eq!(v["raised"], true, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("step 6") && msg.contains("doomed-output"),
        "{msg}"
    );
    assert_eq!(v["exists"], false, "a failed build registers no template");
    let v = s.python(
        py,
        &format!(
            r#"{pre}
info = Template.build_in_background(tpl("echo doomed-output; exit 3"), "tpl-bad")
while True:
    st = Template.get_build_status(info, logs_offset=0)
    if st.status.value not in ("building", "waiting"):
        break
    time.sleep(0.2)
print(json.dumps({{"status": st.status.value, "step": st.reason.step,
  "reason_logs": [e.message for e in st.reason.log_entries]}}))
"#
        ),
    );
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["step"], "6", "{v}");
    assert!(
        v["reason_logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "doomed-output"),
        "{v}"
    );

    // Tags: assigned to the build, listed, usable as `name:tag`, removed.
    let v = s.python(
        py,
        &format!(
            r#"{pre}
Template.assign_tags("tpl-a", ["stable"])
tags = sorted(t.tag for t in Template.get_tags("tpl-a"))
sbx = Sandbox.create("tpl-a:stable", timeout=120)
out = sbx.commands.run("cat /app/a.txt", user="root").stdout
sbx.kill()
Template.remove_tags("tpl-a", ["stable"])
print(json.dumps({{"tags": tags, "out": out, "after": sorted(t.tag for t in Template.get_tags("tpl-a")),
  "exists": Template.exists("tpl-a:stable")}}))
"#
        ),
    );
    assert_eq!(v["tags"], serde_json::json!(["default", "stable"]), "{v}");
    assert_eq!(v["out"], "two\n");
    assert_eq!(v["after"], serde_json::json!(["default"]));
    assert_eq!(v["exists"], false);

    // Delete: gone from Sandbox.create's view and the alias lookup.
    let (code, _) = s.api("DELETE", "/templates/tpl-a", None);
    assert_eq!(code, 204);
    let (code, _) = s.api("DELETE", "/templates/tpl-a", None);
    assert_eq!(code, 404);
    let (code, _) = s.api("GET", "/templates/aliases/tpl-a", None);
    assert_eq!(code, 404);
}

#[test]
fn template_api_refuses_bad_input_and_unknown_builds() {
    let tmp = tempfile::tempdir().unwrap();
    let k = kiln_tests::Kiln::new(tmp.path().join("home"));
    let s = e2b::Serve::start(&k, KEY);
    let (code, body) = s.api("POST", "/v3/templates", Some("{}"));
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["code"], 400);
    let (code, _) = s.api("POST", "/v3/templates", Some(r#"{"name": "a b"}"#));
    assert_eq!(code, 400);
    let (code, v) = s.api(
        "POST",
        "/v3/templates",
        Some(r#"{"name": "tpl-x:v1", "tags": ["v2"]}"#),
    );
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["templateID"], "tpl-x");
    assert_eq!(v["tags"], serde_json::json!(["v2", "v1"]));
    let build = v["buildID"].as_str().unwrap().to_string();

    // The files hash is a name only when it is hex; the upload URL is signed.
    let (code, _) = s.api("GET", "/templates/tpl-x/files/..%2F..%2Fetc", None);
    assert_eq!(code, 400);
    let hash = "ab".repeat(32);
    let (code, v) = s.api("GET", &format!("/templates/tpl-x/files/{hash}"), None);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["present"], false);
    let url = v["url"].as_str().unwrap();
    let path = &url[url.find("/template-files/").unwrap()..];
    let (code, _) = kiln_tests::e2b::http(
        s.port,
        "PUT",
        &path.replace("signature=", "signature=x"),
        &[],
        Some("data"),
    )
    .unwrap();
    assert_eq!(code, 401);
    let (code, _) = kiln_tests::e2b::http(s.port, "PUT", path, &[], Some("data")).unwrap();
    assert_eq!(code, 201);
    let (code, v) = s.api("GET", &format!("/templates/tpl-x/files/{hash}"), None);
    assert_eq!((code, v["present"].clone()), (201, serde_json::json!(true)));
    let (code, _) = s.api("GET", &format!("/templates/tpl-none/files/{hash}"), None);
    assert_eq!(code, 404);

    // Steps kiln cannot translate are a 400; unknown builds a 404.
    let start = format!("/v2/templates/tpl-x/builds/{build}");
    for bad in [
        r#"{"steps": []}"#,
        r#"{"fromImage": "x", "steps": [{"type": "ADD", "args": ["a", "b"]}]}"#,
        r#"{"fromImage": "x", "startCmd": "two\nlines"}"#,
        r#"{"fromImage": "x", "steps": [{"type": "COPY", "args": ["a", "/b"], "filesHash": "0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
    ] {
        let (code, v) = s.api("POST", &start, Some(bad));
        assert_eq!(code, 400, "{bad}: {v}");
    }
    // As E2B: a build id that is no UUID is a 400, an unknown one a 404.
    let (code, _) = s.api(
        "POST",
        "/v2/templates/tpl-x/builds/nope",
        Some(r#"{"fromImage": "x"}"#),
    );
    assert_eq!(code, 400);
    let (code, _) = s.api(
        "POST",
        "/v2/templates/tpl-x/builds/00000000-0000-4000-8000-000000000000",
        Some(r#"{"fromImage": "x"}"#),
    );
    assert_eq!(code, 404);
    let (code, v) = s.api(
        "GET",
        &format!("/templates/tpl-x/builds/{build}/status"),
        None,
    );
    assert_eq!(
        (code, v["status"].clone()),
        (200, serde_json::json!("waiting")),
        "{v}"
    );
    let (code, _) = s.api(
        "GET",
        &format!("/templates/tpl-y/builds/{build}/status"),
        None,
    );
    assert_eq!(code, 404);
    let (code, _) = s.api(
        "GET",
        &format!("/templates/tpl-x/builds/{build}/status?limit=101"),
        None,
    );
    assert_eq!(code, 400);
    let (code, v) = s.api(
        "GET",
        &format!("/templates/tpl-x/builds/{build}/logs"),
        None,
    );
    assert_eq!(
        (code, v["logs"].clone()),
        (200, serde_json::json!([])),
        "{v}"
    );
}

#[test]
fn registry_base_concurrent_builds_and_a_daemon_killed_mid_build() {
    if !kiln_tests::registry::have("skopeo") {
        eprintln!("SKIP: skopeo not installed (apt-get install skopeo)");
        return;
    }
    let Some(mut t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let Some(reg) = kiln_tests::registry::Registry::start() else {
        return;
    };
    let oci = tempfile::tempdir().unwrap();
    let Some(layout) = kiln_tests::registry::busybox_layout(oci.path(), "bb") else {
        return;
    };
    reg.push(&layout, "bb", "tests/busybox:1");
    let image = format!("{}/tests/busybox:1", reg.addr());
    let ctx = t.tmp.path().join("tpl-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let pre = prelude(&ctx);

    // Two templates at once: one from a registry image (pulled by the build), one from a
    // template; both usable by alias.
    let v = t.s.python(
        &t.py,
        &format!(
            r#"{pre}
a = Template.build_in_background(Template().from_image("{image}").run_cmd("echo reg > /from-reg"), "tpl-reg")
b = Template.build_in_background(Template().from_template("sdk").run_cmd("echo b > /b", user="root"), "tpl-b")
done = {{}}
while len(done) < 2:
    for i in (a, b):
        st = Template.get_build_status(i, logs_offset=0)
        if st.status.value not in ("building", "waiting"):
            done[i.template_id] = st.status.value
    time.sleep(0.2)
outs = []
for name, cmd in (("tpl-reg", "cat /from-reg"), ("tpl-b", "cat /b")):
    sbx = Sandbox.create(name, timeout=120)
    outs.append(sbx.commands.run(cmd, user="root").stdout)
    sbx.kill()
print(json.dumps({{"done": done, "outs": outs}}))
"#
        ),
    );
    assert_eq!(
        v["done"],
        serde_json::json!({"tpl-reg": "ready", "tpl-b": "ready"}),
        "{v}"
    );
    assert_eq!(v["outs"], serde_json::json!(["reg\n", "b\n"]), "{v}");

    // A daemon killed while a build runs: no template, and the build unknown after restart.
    let v = t.s.python(
        &t.py,
        &format!(
            r#"{pre}
i = Template.build_in_background(Template().from_template("sdk").run_cmd("echo started; sleep 600"), "tpl-killed")
while not any("started" in e.message for e in Template.get_build_status(i, logs_offset=0).log_entries):
    time.sleep(0.2)
print(json.dumps({{"build": i.build_id}}))
"#
        ),
    );
    let build = v["build"].as_str().unwrap().to_string();
    t.s.restart();
    let (code, _) = t.s.api(
        "GET",
        &format!("/templates/tpl-killed/builds/{build}/status"),
        None,
    );
    assert_eq!(code, 404);
    let (code, _) = t.s.api("GET", "/templates/aliases/tpl-killed", None);
    assert_eq!(code, 404);
    let home = t.k.home.join("serve").join("template-builds");
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0, "{home:?}");
}

#[test]
fn js_sdk_template_build_and_create() {
    let Some(modules) = e2b::js_modules() else {
        eprintln!(
            "SKIP: E2B's JS SDK or node not installed (/opt/kiln-tools/e2b-js; scripts/install-deps)"
        );
        return;
    };
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let ctx = t.tmp.path().join("tpl-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("a.txt"), "from js\n").unwrap();
    let v = t.s.node(
        &modules,
        &format!(
            r#"import {{ Template, Sandbox }} from 'e2b'
const logs = []
const tpl = Template({{ fileContextPath: {ctx:?} }}).fromTemplate('sdk')
  .setUser('root')
  .copy('a.txt', '/app/a.txt')
  .runCmd('cat /app/a.txt > /app/b.txt')
const info = await Template.build(tpl, 'tpl-js', {{ onBuildLogs: (e) => logs.push(e.message) }})
const sbx = await Sandbox.create('tpl-js', {{ timeoutMs: 120000 }})
const run = await sbx.commands.run('cat /app/b.txt', {{ user: 'root' }})
await sbx.kill()
console.log(JSON.stringify({{ id: info.templateId, out: run.stdout, logs }}))
"#
        ),
    );
    assert_eq!(v["id"], "tpl-js", "{v}");
    assert_eq!(v["out"], "from js\n", "{v}");
}

/// Two daemons over two homes that share one S3 remote (a real SeaweedFS): a template built
/// through the SDK on the first builds from the remote's step cache on the second (no step
/// runs again), and a sandbox of it on the second has the first's files (fetched lazily).
#[test]
fn sdk_template_steps_are_shared_through_the_stores_remote() {
    let Some(s3) = kiln_tests::s3::S3Server::start_or_skip("sdk_template_steps_shared").unwrap()
    else {
        return;
    };
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = format!("s3://{}/templates", kiln_tests::s3::BUCKET);
    let with_remote = || {
        let mut t = e2b::sdk_serve(KEY, &env)?;
        s3.add_origin(&t.k, &url);
        // The daemon attaches the store's default remote when it starts.
        t.s.restart();
        Some(t)
    };
    let Some(a) = with_remote() else { return };
    let Some(b) = with_remote() else { return };
    // One base on both hosts, as a registry image would be: A's `sdk` image through the
    // remote (each home built its own, whose files differ in their times).
    let id = a.k.ok_str(["image", "push", "sdk"]);
    b.k.ok(["image", "rm", "sdk"]);
    b.k.ok(["image", "pull-from-remote", id.trim(), "--name", "sdk"]);
    let ctx = a.tmp.path().join("tpl-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("a.txt"), "shared\n").unwrap();
    let pre = prelude(&ctx);
    let build = |t: &e2b::SdkServe| -> Vec<String> {
        let v = t.s.python(
            &t.py,
            &format!(
                r#"{pre}
logs = []
Template.build(tpl(), "tpl-s3", on_build_logs=lambda e: logs.append(e.message))
sbx = Sandbox.create("tpl-s3", timeout=120)
out = sbx.commands.run("cat /app/copy-of-a /app/first", user="root").stdout
sbx.kill()
print(json.dumps({{"logs": logs, "out": out}}))
"#
            ),
        );
        assert_eq!(v["out"], "shared\nfirst\n", "{v}");
        logs(&v)
    };
    let first = build(&a);
    assert!(
        first.iter().any(|l| l.starts_with("0 of ")),
        "nothing cached on the first home: {first:#?}"
    );
    let second = build(&b);
    let ran: Vec<&String> = second
        .iter()
        .filter(|l| (l.contains(": RUN ") || l.contains(": COPY ")) && !l.ends_with("(cached)"))
        .collect();
    assert!(
        ran.is_empty(),
        "steps ran again on the second home: {ran:#?}\n{second:#?}"
    );
    assert!(
        second
            .iter()
            .any(|l| l.contains("RUN") && l.ends_with("(cached)")),
        "{second:#?}"
    );
}

/// Runs `body` after [`prelude`] against a fresh daemon; None after a SKIP.
fn with_prelude(body: &str) -> Option<serde_json::Value> {
    let t = e2b::sdk_serve(KEY, &[])?;
    let ctx = t.tmp.path().join("tpl-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    Some(t.s.python(&t.py, &format!("{}{body}", prelude(&ctx))))
}

/// `set_start_cmd(start, ready)`: every sandbox that boots from the template has the start
/// command running and its ready command passed when `Sandbox.create` returns (the command
/// taken literally: `$((1+1))` is the shell's), and a resume that boots afresh on saved files
/// (a filesystem-only pause) starts it again.
#[test]
fn sdk_template_start_and_ready_commands_run_at_every_boot() {
    let Some(v) = with_prelude(
        r#"
# Ready once this boot's flag exists (boot_id changes at every cold boot): a flag file
# alone could be a saved one.
FLAG = "/tmp/ready-$(cat /proc/sys/kernel/random/boot_id)"
tpl = (Template(file_context_path=CTX).from_template("sdk").set_user("root")
    .set_start_cmd("echo run-$((1+1)) >> /root/starts; sleep 1; touch " + FLAG + "; exec sleep 100000",
                   "test -f " + FLAG))
Template.build(tpl, "tpl-start")
PROBE = "cat /root/starts; test -f " + FLAG + " && echo ready"
sbx = Sandbox.create("tpl-start", timeout=120)
first = sbx.commands.run(PROBE, user="root").stdout
sbx.pause(mode="filesystem")
sbx2 = Sandbox.connect(sbx.sandbox_id, timeout=120)
again = sbx2.commands.run(PROBE, user="root").stdout
sbx2.kill()
print(json.dumps({"first": first, "again": again}))
"#,
    ) else {
        return;
    };
    assert_eq!(v["first"], "run-2\nready\n", "{v}");
    assert_eq!(v["again"], "run-2\nrun-2\nready\n", "{v}");
}

/// A ready command that never succeeds fails `Sandbox.create` after the wait (60 s) with its
/// last output, and leaves no sandbox behind.
#[test]
fn sdk_template_ready_command_that_never_passes_fails_the_create() {
    let Some(v) = with_prelude(
        r#"
tpl = (Template(file_context_path=CTX).from_template("sdk")
    .set_start_cmd("sleep 100000", "echo not-ready-yet >&2; exit 7"))
Template.build(tpl, "tpl-never")
try:
    Sandbox.create("tpl-never", timeout=120, request_timeout=120)
    print(json.dumps({"raised": False}))
except Exception as e:
    print(json.dumps({"raised": True, "msg": str(e), "left": len(Sandbox.list().next_items())}))
"#,
    ) else {
        return;
    };
    assert_eq!(v["raised"], true, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("ready command") && msg.contains("exit 7: not-ready-yet"),
        "{msg}"
    );
    assert_eq!(v["left"], 0, "{v}");
}

/// `from_image(image, username, password)`: the base is pulled from a registry that answers
/// only with those credentials (HTTP basic auth, a real distribution registry); a wrong
/// password fails the build at its base step, and an AWS login is refused with a 400.
#[test]
fn sdk_from_image_logs_in_to_its_registry() {
    if !kiln_tests::registry::have("skopeo") {
        eprintln!("SKIP: skopeo not installed (apt-get install skopeo)");
        return;
    }
    let Some(t) = e2b::sdk_serve(KEY, &[]) else {
        return;
    };
    let Some(reg) = kiln_tests::registry::Registry::start_with_basic_auth("kiln", "s3cret-pw")
    else {
        return;
    };
    let oci = tempfile::tempdir().unwrap();
    let Some(layout) = kiln_tests::registry::busybox_layout(oci.path(), "bb") else {
        return;
    };
    reg.push(&layout, "bb", "private/busybox:1");
    let image = format!("{}/private/busybox:1", reg.addr());
    let ctx = t.tmp.path().join("tpl-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let v = t.s.python(
        &t.py,
        &format!(
            r#"{pre}
def build(name, password):
    tpl = Template().from_image("{image}", username="kiln", password=password).run_cmd("echo private > /p")
    try:
        Template.build(tpl, name)
        return "ok"
    except BuildException as e:
        return str(e)
wrong = build("tpl-wrong", "nope")
right = build("tpl-priv", "s3cret-pw")
sbx = Sandbox.create("tpl-priv", timeout=120)
out = sbx.commands.run("cat /p", user="root").stdout
sbx.kill()
print(json.dumps({{"wrong": wrong, "right": right, "out": out}}))
"#,
            pre = prelude(&ctx)
        ),
    );
    assert_eq!(v["right"], "ok", "{v}");
    assert_eq!(v["out"], "private\n", "{v}");
    let wrong = v["wrong"].as_str().unwrap();
    assert!(
        wrong.contains("pulling") && !wrong.contains("s3cret"),
        "{wrong}"
    );
    // An AWS login: a 400 that says why, before anything is pulled.
    let (code, v) =
        t.s.api("POST", "/v3/templates", Some(r#"{"name": "tpl-aws"}"#));
    assert_eq!(code, 202, "{v}");
    let path = format!(
        "/v2/templates/tpl-aws/builds/{}",
        v["buildID"].as_str().unwrap()
    );
    let (code, v) = t.s.api(
        "POST",
        &path,
        Some(
            r#"{"fromImage": "x", "fromImageRegistry": {"type": "aws", "awsAccessKeyId": "a", "awsSecretAccessKey": "b", "awsRegion": "c"}}"#,
        ),
    );
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("AWS"), "{v}");
}
