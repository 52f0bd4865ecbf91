//! `kiln sandbox` end to end on gVisor (real runsc, the real kiln binary, the static agent as
//! the sandbox's init): exec, files, users, signals, background processes, ports, pause and
//! resume, snapshots, forks, and what bad input and killed commands leave behind.

use kiln_tests::sandbox::{
    app_home, assert_no_processes, create, exec, ids, read, sh, KillAll, COUNTER_LOOP,
};
use std::io::{Read, Write};
use std::time::Duration;

#[test]
fn exec_env_user_stdin_signals_and_output_floods() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let rec = create(
        &k,
        &[
            "app",
            "--name",
            "dev",
            "--env",
            "X=1",
            "--metadata",
            "team=a",
        ],
    );
    assert_eq!(rec["state"], "running");
    assert_eq!(rec["runtime"], "gvisor");
    assert_eq!(rec["metadata"]["team"], "a");
    let id = rec["id"].as_str().unwrap();

    let (out, err, code) = exec(
        &k,
        "dev",
        &[],
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        b"",
    );
    assert_eq!((out.as_str(), err.as_str(), code), ("out\n", "err\n", 3));

    // The image's ENV, WORKDIR and USER are the defaults; the sandbox's and the exec's env add.
    let (out, _, code) = exec(
        &k,
        id,
        &["--env", "Y=2"],
        &["sh", "-c", "echo $GREETING $X $Y; pwd; id -u"],
        b"",
    );
    assert_eq!((out.as_str(), code), ("hello 1 2\n/work\n1000\n", 0));
    let (out, _, _) = exec(
        &k,
        id,
        &["--user", "root", "--cwd", "/tmp"],
        &["sh", "-c", "id -u; pwd"],
        b"",
    );
    assert_eq!(out, "0\n/tmp\n");

    let (out, _, code) = exec(&k, id, &[], &["cat"], b"piped input\x00\xff");
    assert_eq!(
        (out.as_bytes(), code),
        (&b"piped input\x00\xef\xbf\xbd"[..], 0)
    );

    let (_, _, code) = exec(&k, id, &[], &["sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(code, 128 + 15, "killed by SIGTERM");
    let (_, err, code) = exec(&k, id, &[], &["no-such-program"], b"");
    assert_ne!(code, 0);
    assert!(
        err.contains("No such file") || err.contains("no such program"),
        "{err}"
    );

    // 64 MiB of output streams through (bounded buffers on the way).
    let out = k
        .cmd([
            "sandbox",
            "exec",
            id,
            "--",
            "head",
            "-c",
            "67108864",
            "/dev/zero",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 64 << 20);
    assert!(out.stdout.iter().all(|&b| b == 0));

    k.ok(["sandbox", "kill", "dev"]);
    assert!(ids(&k).is_empty());
    assert_no_processes(id);
    assert!(!k.home.join("sandboxes").join(id).exists());
}

#[test]
fn files_round_trip_keep_modes_and_never_escape_the_sandbox() {
    let Some((tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();

    let data = kiln_tests::pseudo_random(10 << 20, 9);
    let local = tmp.path().join("blob");
    std::fs::write(&local, &data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o750)).unwrap();
    k.ok([
        "sandbox",
        "cp",
        local.to_str().unwrap(),
        &format!("{id}:/work/blob"),
    ]);
    assert_eq!(
        sh(&k, &id, "stat -c '%a %s' /work/blob"),
        format!("750 {}\n", 10 << 20)
    );
    let back = tmp.path().join("back");
    k.ok([
        "sandbox",
        "cp",
        &format!("{id}:/work/blob"),
        back.to_str().unwrap(),
    ]);
    assert!(read(&back) == data, "10 MiB differ after a round trip");

    // Paths are the sandbox's: `..` stops at its root, and the host file never appears.
    let name = format!("kiln-escape-{}", std::process::id());
    let host = std::path::Path::new("/tmp").join(&name);
    let _ = std::fs::remove_file(&host);
    k.ok([
        "sandbox",
        "cp",
        local.to_str().unwrap(),
        &format!("{id}:../../../../../tmp/{name}"),
    ]);
    assert!(!host.exists(), "a sandbox path reached the host");
    let (out, _, _) = exec(
        &k,
        &id,
        &["--user", "root"],
        &["wc", "-c", &format!("/tmp/{name}")],
        b"",
    );
    assert_eq!(out, format!("{} /tmp/{name}\n", 10 << 20));
    // Nor does the image's shared tree change when the sandbox writes over its files.
    let (_, err, code) = exec(
        &k,
        &id,
        &["--user", "root"],
        &[
            "sh",
            "-c",
            "echo changed > /bin/busybox-note && rm /bin/cat",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    let tree = std::fs::read_dir(k.home.join("rootfs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(tree.join("bin/cat").exists() && !tree.join("bin/busybox-note").exists());

    let missing = tmp.path().join("missing");
    let err = k.fails([
        "sandbox",
        "cp",
        &format!("{id}:/nope"),
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("/nope"), "{err}");
    assert!(!missing.exists(), "a failed copy left a file");
    let err = k.fails(["sandbox", "cp", local.to_str().unwrap(), "nosuchsandbox:/x"]);
    assert!(err.contains("no sandbox \"nosuchsandbox\""), "{err}");
}

#[test]
fn background_processes_reconnect_and_ports_forward_through_the_agent() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let rec = create(&k, &["app"]);
    let id = rec["id"].as_str().unwrap().to_string();
    let sock = std::path::PathBuf::from(rec["agent"].as_str().unwrap());
    use kiln_agent::client;
    use kiln_agent::protocol::{ExecRequest, Kind, ProcessRef};
    use std::os::unix::net::UnixStream;

    // A tagged background process outlives its client; a reconnect replays its output.
    let req = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo started; sleep 0.5; echo later; exit 7".into(),
        ],
        tag: Some("job".into()),
        background: true,
        stdin: false,
        ..ExecRequest::default()
    };
    let mut s = UnixStream::connect(&sock).unwrap();
    kiln_agent::protocol::write_json(&mut s, Kind::Exec, &req).unwrap();
    let (kind, _) = kiln_agent::protocol::read_frame(&mut s).unwrap().unwrap();
    assert_eq!(kind, Kind::Started);
    drop(s);
    let mut out = Vec::new();
    let status = client::connect_process(
        &mut UnixStream::connect(&sock).unwrap(),
        &ProcessRef {
            pid: None,
            tag: Some("job".into()),
        },
        |_| {},
        |_, d| out.extend_from_slice(d),
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "started\nlater\n");
    assert_eq!(status.code, Some(7));

    // A server inside, reached from the host through `kiln sandbox port`.
    sh(&k, &id, "mkdir -p /work/www && echo hello-from-inside > /work/www/index.html && httpd -p 8080 -h /work/www");
    let mut fwd = k
        .cmd(["sandbox", "port", &id, "8080"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(fwd.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line.trim().to_string();
    let mut body = String::new();
    for _ in 0..2 {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
        body.clear();
        c.read_to_string(&mut body).unwrap();
        assert!(body.contains("hello-from-inside"), "{body}");
    }
    let _ = fwd.kill();
    let _ = fwd.wait();
}

#[test]
fn pause_resume_snapshot_and_fork_continue_memory_and_files() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app", "--name", "src"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // An in-memory counter (a shell variable) written out every 50 ms.
    sh(&k, &id, &format!("echo kept > /work/state; {COUNTER_LOOP}"));
    let count = |id: &str| -> u64 { kiln_tests::sandbox::counter(&k, id) };
    std::thread::sleep(Duration::from_millis(400));
    let before = count(&id);

    let paused = k.json(["sandbox", "pause", &id, "--json"]);
    assert_eq!(paused["state"], "paused");
    let err = k.fails(["sandbox", "exec", &id, "--", "true"]);
    assert!(err.contains("paused"), "{err}");
    k.ok(["sandbox", "resume", "src"]);
    let after = count(&id);
    assert!(after >= before, "counter went back: {before} -> {after}");
    assert!(
        kiln_tests::sandbox::counter_advances(&k, &id).is_some(),
        "counter stopped after resume"
    );
    assert_eq!(sh(&k, &id, "cat /work/state"), "kept\n");
    assert_ne!(
        sh(&k, &id, "cat /run/kiln/generation").trim(),
        "0",
        "restore bumps the generation"
    );

    // Two sandboxes from one snapshot diverge; the source keeps running.
    let snap = k.json(["sandbox", "snapshot", &id, "--name", "warm", "--json"]);
    assert_eq!(snap["name"], "warm");
    let a = create(&k, &["--snapshot", "warm"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = create(&k, &["--snapshot", "warm"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    sh(&k, &a, "echo a > /work/mine");
    sh(&k, &b, "echo b > /work/mine");
    assert_eq!(sh(&k, &a, "cat /work/mine /work/state"), "a\nkept\n");
    assert_eq!(sh(&k, &b, "cat /work/mine /work/state"), "b\nkept\n");
    assert!(count(&a) >= before && count(&b) >= before);
    sh(&k, &id, "test ! -e /work/mine");

    // fork -n 4 of the running sandbox: four answering, separate copies.
    let forks = k.json(["sandbox", "fork", &id, "-n", "4", "--json"]);
    let forks: Vec<String> = forks
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(forks.len(), 4);
    for (i, f) in forks.iter().enumerate() {
        sh(&k, f, &format!("echo {i} > /work/fork"));
    }
    for (i, f) in forks.iter().enumerate() {
        assert_eq!(
            sh(&k, f, "cat /work/fork /work/state"),
            format!("{i}\nkept\n")
        );
    }
    assert!(count(&id) > after, "the source runs on after the fork");
    let all = ids(&k);
    assert_eq!(all.len(), 7, "{all:?}");
    for s in &all {
        k.ok(["sandbox", "kill", s]);
        assert_no_processes(s);
    }
}

#[test]
fn pause_in_one_home_resume_in_another_through_s3() {
    let Some((tmp, a)) = app_home() else { return };
    let Some(s3) = kiln_tests::s3::S3Server::start_or_skip("sandbox_pause_across_homes").unwrap()
    else {
        return;
    };
    s3.create_bucket("sbx").unwrap();
    let a = a.with_env(s3.env());
    let b = kiln_tests::Kiln::new(tmp.path().join("home-b")).with_env(s3.env());
    let _ga = KillAll(a.clone());
    let _gb = KillAll(b.clone());
    s3.add_origin(&a, "s3://sbx/kiln");
    s3.add_origin(&b, "s3://sbx/kiln");

    let id = create(&a, &["app"])["id"].as_str().unwrap().to_string();
    sh(
        &a,
        &id,
        &format!("echo travelled > /work/note; {COUNTER_LOOP}"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let before: u64 = kiln_tests::sandbox::counter(&a, &id);
    let paused = a.json(["sandbox", "pause", &id, "--push", "--json"]);
    let snap = paused["saved"].as_str().unwrap().to_string();

    // Home B has never seen the image: it comes from S3 with the snapshot.
    let rec = b.json(["sandbox", "resume", &snap, "--json"]);
    let bid = rec["id"].as_str().unwrap();
    assert_eq!(sh(&b, bid, "cat /work/note"), "travelled\n");
    let after: u64 = kiln_tests::sandbox::counter(&b, bid);
    assert!(after >= before, "{before} -> {after}");

    // A named snapshot pushed from B is found by its name in A (the remote's names).
    b.ok([
        "sandbox",
        "snapshot",
        bid,
        "--name",
        "travelled-snap",
        "--push",
    ]);
    let rec = a.json(["sandbox", "resume", "travelled-snap", "--json"]);
    let aid = rec["id"].as_str().unwrap();
    assert_eq!(sh(&a, aid, "cat /work/note"), "travelled\n");
}

#[test]
fn debian_image_runs_with_its_own_users() {
    if let Some(why) = kiln_tests::sandbox::gvisor_unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let Some(layout) = kiln_tests::registry::debian_layout() else {
        return;
    };
    let Some(reg) = kiln_tests::registry::Registry::start() else {
        return;
    };
    reg.push(&layout, "base", "tests/debian:bookworm");
    let tmp = tempfile::tempdir().unwrap();
    let k = kiln_tests::Kiln::new(tmp.path().join("home"));
    let _guard = KillAll(k.clone());
    let r = format!("{}/tests/debian:bookworm", reg.addr());
    k.ok(["image", "pull", &r]);
    let id = create(&k, &[&r])["id"].as_str().unwrap().to_string();
    assert!(sh(&k, &id, "cat /etc/os-release").contains("bookworm"));
    assert!(sh(&k, &id, "dpkg-query -W -f='${Package}\\n' dpkg").contains("dpkg"));
    let (out, _, code) = exec(&k, &id, &["--user", "nobody"], &["id", "-u"], b"");
    assert_eq!((out.as_str(), code), ("65534\n", 0));
}

#[test]
fn bad_input_dead_runtimes_and_killed_commands_leave_nothing_half_made() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let err = k.fails(["sandbox", "create", "nope"]);
    assert!(err.contains("\"nope\""), "{err}");
    assert_eq!(err.matches("nope").count(), 1, "cause said once: {err}");
    let err = k.fails(["sandbox", "exec", "nosuch", "--", "true"]);
    assert!(err.contains("no sandbox \"nosuch\""), "{err}");
    let err = k.fails(["sandbox", "create", "app", "--runtime", "microvm"]);
    assert!(
        err.contains("runtime microvm cannot run on this host"),
        "{err}"
    );
    let err = k.fails(["sandbox", "create", "app", "--name", "bad/name"]);
    assert!(err.contains("sandbox name"), "{err}");

    let id = create(&k, &["app", "--name", "one"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let err = k.fails(["sandbox", "create", "app", "--name", "one"]);
    assert!(err.contains("named \"one\" exists"), "{err}");
    k.ok(["sandbox", "snapshot", &id, "--name", "g"]);
    let err = k.fails([
        "sandbox",
        "create",
        "--snapshot",
        "g",
        "--runtime",
        "microvm",
    ]);
    assert!(err.contains("taken under the gvisor runtime"), "{err}");

    // A runtime that dies: the state says so, with the cause.
    let rec = k.json(["sandbox", "info", &id, "--json"]);
    let pid = rec["driver"]["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) of the sandbox's runsc process, which this test owns.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = std::time::Instant::now();
    loop {
        let rec = k.json(["sandbox", "info", &id, "--json"]);
        if rec["state"] == "failed" {
            assert!(rec["cause"].as_str().unwrap().contains("gone"), "{rec}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "still {rec}");
        std::thread::sleep(Duration::from_millis(50));
    }
    k.ok(["sandbox", "kill", &id]);
    assert_no_processes(&id);

    // kill -9 of `create` at several moments: afterwards no sandbox is half made, and none of
    // the killed creates' runsc processes is left.
    for delay_ms in [30u64, 150, 400, 900] {
        let mut child = k.cmd(["sandbox", "create", "app"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let list = k.json(["sandbox", "ls", "--json"]);
        for r in list.as_array().unwrap() {
            assert_eq!(r["state"], "running", "half-made sandbox: {r}");
            let sid = r["id"].as_str().unwrap();
            assert_eq!(sh(&k, sid, "echo ok"), "ok\n");
            k.ok(["sandbox", "kill", sid]);
        }
        let sandboxes = k.home.join("sandboxes");
        for e in std::fs::read_dir(&sandboxes).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(name.starts_with('.'), "left behind: {name}");
            if name.starts_with(".new-") {
                assert_no_processes(name.trim_start_matches(".new-"));
            }
        }
    }

    // kill -9 of `pause` at several moments: the sandbox ends up running (agent answering) or
    // paused (and resumable), never stuck.
    for delay_ms in [20u64, 120, 300] {
        let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
        let mut child = k.cmd(["sandbox", "pause", &id]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(200));
        let rec = k.json(["sandbox", "info", &id, "--json"]);
        match rec["state"].as_str().unwrap() {
            "running" => assert_eq!(sh(&k, &id, "echo ok"), "ok\n"),
            "paused" => {
                k.ok(["sandbox", "resume", &id]);
                assert_eq!(sh(&k, &id, "echo ok"), "ok\n");
            }
            "failed" => assert!(rec["cause"].as_str().unwrap().contains("pause"), "{rec}"),
            s => panic!("sandbox {id} left {s}: {rec}"),
        }
        k.ok(["sandbox", "kill", &id]);
        assert_no_processes(&id);
    }
}

#[test]
fn timeouts_kill_or_pause() {
    let Some((_tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let killed = create(&k, &["app", "--timeout", "1"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The timeout counts from when create returns: 3 s leave room for the write on a
    // loaded host.
    let paused = create(&k, &["app", "--timeout", "3", "--on-timeout", "pause"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = std::time::Instant::now();
    sh(&k, &paused, "echo before > /work/t");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the write took {:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(t.elapsed()));
    let list = k.json(["sandbox", "ls", "--json"]);
    let states: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().into(),
                r["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![(paused.clone(), "paused".to_string())],
        "{list}"
    );
    assert_no_processes(&killed);
    k.ok(["sandbox", "resume", &paused]);
    assert_eq!(sh(&k, &paused, "cat /work/t"), "before\n");
}

#[test]
fn an_agent_that_never_answers_fails_create_with_the_console_tail_and_leaves_nothing() {
    let Some((tmp, k)) = app_home() else { return };
    if !kiln_tests::registry::have("gcc") {
        eprintln!("SKIP: gcc is needed to build a fake agent");
        return;
    }
    // A static init that prints a line and never listens.
    let src = tmp.path().join("fake.c");
    std::fs::write(&src, "#include <stdio.h>\n#include <unistd.h>\nint main(void){puts(\"fake agent here\");fflush(stdout);sleep(600);return 0;}\n").unwrap();
    let bin = tmp.path().join("fake-agent");
    let st = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let k = k.with_env([
        ("KILN_AGENT".to_string(), bin.display().to_string()),
        ("KILN_AGENT_TIMEOUT".to_string(), "2".to_string()),
    ]);
    let t = std::time::Instant::now();
    let err = k.fails(["sandbox", "create", "app"]);
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(err.contains("did not answer within 2 s"), "{err}");
    assert!(err.contains("fake agent here"), "no console tail: {err}");
    assert!(ids(&k).is_empty());
    assert!(
        kiln_tests::sandbox::processes_mentioning(&k.home.display().to_string())
            .iter()
            .all(|p| !std::fs::read(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .starts_with(b"runsc")),
        "runsc processes left"
    );
}

/// A runsc too old for kiln, none at all, and a platform this host cannot run: each refused
/// with what is wrong and what kiln needs, before anything is made.
#[test]
fn old_or_missing_runsc_and_unusable_platforms_are_refused_clearly() {
    let Some((tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    // runsc 20221219 as Debian bookworm ships it: only its version line matters here.
    let old = tmp.path().join("old-runsc");
    std::fs::write(
        &old,
        "#!/bin/sh\necho 'runsc version 0.0~20221219.0'\necho 'spec: 1.0.2-dev'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let with = |key: &str, value: &str| k.clone().with_env([(key.to_string(), value.to_string())]);
    let err = with("KILN_RUNSC", old.to_str().unwrap()).fails(["sandbox", "create", "app"]);
    assert!(
        err.contains("release 20221219") && err.contains("20240729 or newer"),
        "{err}"
    );
    let missing = tmp.path().join("no-such-runsc");
    let err = with("KILN_RUNSC", missing.to_str().unwrap()).fails(["sandbox", "create", "app"]);
    assert!(
        err.contains("not found") && err.contains("20240729"),
        "{err}"
    );
    let err = with("KILN_GVISOR_PLATFORM", "qemu").fails(["sandbox", "create", "app"]);
    assert!(err.contains("systrap, kvm or ptrace"), "{err}");
    if kiln_runtime::microvm::kvm_unsupported(true).is_some() {
        let err = with("KILN_GVISOR_PLATFORM", "kvm").fails(["sandbox", "create", "app"]);
        assert!(err.contains("hardware virtualization"), "{err}");
    }
    let listed = k.json(["sandbox", "ls", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}
