//! `kiln sandbox --server URL` (issue 20): the CLI driving a real `kiln serve` through E2B's
//! API from a home of its own (empty: nothing it does can be local), then a cluster of three
//! nodes through two different ones. gVisor sandboxes from the tests' `app` image.
//!
//! Skips (with `SKIP:`) when gVisor cannot run here (not root, no runsc); the cluster test
//! also without etcd, SeaweedFS or E2B's Python SDK (the cluster fixture's).

use kiln_tests::cluster::{fixture, start_nodes};
use kiln_tests::e2b::{free_port, Serve};
use kiln_tests::sandbox::{app_home, exec, KillAll};
use kiln_tests::Kiln;

const KEY: &str = "kiln_cli_test_key_0123456789";

/// A `kiln` with an empty home of its own whose sandbox commands go to `url` with `key`.
fn client(dir: &std::path::Path, url: &str, key: &str) -> Kiln {
    Kiln::new(dir.join("client-home")).with_env([
        ("KILN_SERVER".to_string(), url.to_string()),
        ("E2B_API_KEY".to_string(), key.to_string()),
    ])
}

/// The sandbox ids of `kiln sandbox ls --json` (E2B's `ListedSandbox` list) with their state.
fn listed(cli: &Kiln) -> Vec<(String, String)> {
    let v = cli.json(["sandbox", "ls", "--json"]);
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| {
            (
                s["sandboxID"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn cli_drives_a_server() {
    let Some((tmp, k)) = app_home() else {
        return;
    };
    let _cleanup = KillAll(k.clone());
    let s = Serve::start(&k, KEY);
    let cli = client(tmp.path(), &s.url(), KEY);

    // create: the id on stdout; the sandbox is the server's, none in the client's home.
    let id = cli.ok_str([
        "sandbox",
        "create",
        "app",
        "--timeout",
        "300",
        "--metadata",
        "suite=cli",
        "--env",
        "MODE=remote",
    ]);
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{id:?}"
    );
    assert!(!cli.home.join("sandboxes").exists());

    // exec: output streamed, the sandbox's env, stdin passed through, exit codes passed on.
    let (out, err, code) = exec(
        &cli,
        &id,
        &[],
        &["sh", "-c", "echo $MODE > /work/f; cat /work/f; cat"],
        b"piped in\n",
    );
    assert_eq!((out.as_str(), code), ("remote\npiped in\n", 0), "{err}");
    let (out, err, code) = exec(
        &cli,
        &id,
        &["--cwd", "/tmp", "--env", "X=1"],
        &["sh", "-c", "echo $X $(pwd); echo oops >&2; exit 7"],
        b"",
    );
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        ("1 /tmp\n", "oops\n", 7)
    );

    // -t: a terminal in the sandbox (`script` gives the CLI one).
    if kiln_tests::registry::have("script") {
        let line = format!(
            "{} sandbox exec -t {id} -- sh -c 'test -t 0 && echo on a tty; exit 5'",
            kiln_tests::kiln_bin().display()
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("KILN_HOME", &cli.home)
            .envs([("KILN_SERVER", s.url()), ("E2B_API_KEY", KEY.to_string())])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("on a tty"), "{text}");
        assert_eq!(out.status.code(), Some(5), "{text}");
    }

    // ^C to the CLI kills the command, as on the home (envd alone would keep it).
    let mut child = cli
        .cmd([
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo started; sleep 300",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(std::time::Duration::from_secs(20));
    assert_eq!(line.as_deref(), Ok("started\n"));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let (out, _, code) = exec(
        &cli,
        &id,
        &[],
        &["sh", "-c", "grep -l 'slee[p]' /proc/[0-9]*/cmdline"],
        b"",
    );
    assert_eq!((out.as_str(), code), ("", 1), "the command outlived ^C");

    // cp both ways.
    let local = tmp.path().join("in.txt");
    std::fs::write(&local, b"copied\n").unwrap();
    cli.ok([
        "sandbox",
        "cp",
        local.to_str().unwrap(),
        &format!("{id}:/work/in.txt"),
    ]);
    let back = tmp.path().join("back.txt");
    cli.ok([
        "sandbox",
        "cp",
        &format!("{id}:/work/in.txt"),
        back.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&back).unwrap(), b"copied\n");

    // ls and info.
    assert_eq!(listed(&cli), vec![(id.clone(), "running".to_string())]);
    let table = cli.ok_str(["sandbox", "ls"]);
    assert!(table.contains(&id) && table.contains("running"), "{table}");
    let info = cli.ok_str(["sandbox", "info", &id]);
    assert!(info.contains("meta:     suite=cli"), "{info}");
    assert!(info.contains("killed in"), "{info}");

    // pause: listed paused, its data plane refused clearly; resume: the file is there.
    assert_eq!(
        cli.ok_str(["sandbox", "pause", &id]),
        format!("{id} paused")
    );
    assert_eq!(listed(&cli), vec![(id.clone(), "paused".to_string())]);
    let err = cli.fails(["sandbox", "exec", &id, "--", "true"]);
    assert!(err.contains("is paused"), "{err}");
    assert_eq!(cli.ok_str(["sandbox", "resume", &id]), id);
    let (out, err, code) = exec(&cli, &id, &[], &["cat", "/work/f"], b"");
    assert_eq!((out.as_str(), code), ("remote\n", 0), "{err}");

    // timeout.
    let t = cli.ok_str(["sandbox", "timeout", &id, "600"]);
    assert!(t.starts_with(&format!("{id} killed in 5")), "{t}");

    // What has no API counterpart: exit code 2, saying why.
    for args in [
        vec!["logs", id.as_str()],
        vec!["port", id.as_str(), "80"],
        vec!["network", id.as_str()],
        vec!["create", "app", "--cpus", "2"],
        vec!["timeout", id.as_str(), "0"],
    ] {
        let mut a = vec!["sandbox"];
        a.extend(&args);
        let out = cli.run(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("needs a local home"), "{args:?}: {err}");
    }

    // snapshot, snapshots, fork: a fork sees the file.
    cli.ok(["sandbox", "snapshot", &id, "--name", "warm"]);
    let snaps = cli.ok_str(["sandbox", "snapshots"]);
    assert!(snaps.lines().any(|l| l.starts_with("warm ")), "{snaps}");
    let fork = cli.ok_str(["sandbox", "fork", &id]);
    let (out, err, code) = exec(&cli, &fork, &[], &["cat", "/work/f"], b"");
    assert_eq!((out.as_str(), code), ("remote\n", 0), "{err}");
    cli.ok(["sandbox", "kill", &fork]);

    // kill; then it is not found, with the server's status.
    assert_eq!(cli.ok_str(["sandbox", "kill", &id]), format!("{id} killed"));
    let err = cli.fails(["sandbox", "info", &id]);
    assert!(err.contains("(404)") && err.contains(&id), "{err}");
    assert_eq!(listed(&cli), vec![]);

    // A wrong key, no server there, https, a bad URL: one clear line each.
    let wrong = client(tmp.path(), &s.url(), "not-the-key");
    let err = wrong.fails(["sandbox", "ls"]);
    assert!(
        err.contains("refused the API key") && err.contains("(401)"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let nobody = client(
        tmp.path(),
        &format!("http://127.0.0.1:{}", free_port()),
        KEY,
    );
    let err = nobody.fails(["sandbox", "ls"]);
    assert!(err.contains("cannot reach http://127.0.0.1:"), "{err}");
    let err = client(tmp.path(), "https://127.0.0.1:1", KEY).fails(["sandbox", "ls"]);
    assert!(err.contains("https is not supported"), "{err}");
    let err = client(tmp.path(), "http://127.0.0.1:1/api", KEY).fails(["sandbox", "ls"]);
    assert!(err.contains("invalid server URL"), "{err}");
    let no_key =
        Kiln::new(tmp.path().join("client-home")).with_env([("KILN_SERVER".to_string(), s.url())]);
    let out = no_key
        .cmd(["sandbox", "ls"])
        .env_remove("E2B_API_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no API key"), "{err}");
}

/// A cluster of three: created through n1, listed and run in through n3, killed through n2.
#[test]
fn cli_drives_a_cluster_through_any_node() {
    let Some(f) = fixture("cli-cluster-secret-0123456789", 3) else {
        return;
    };
    let nodes: Vec<Serve> = start_nodes(&f.etcd, &f.homes, KEY, &f.secret, 0);
    let through = |i: usize| client(f.tmp.path(), &nodes[i].url(), KEY);
    let (n1, n2, n3) = (through(0), through(1), through(2));

    let id = n1.ok_str(["sandbox", "create", "sdk", "--timeout", "300"]);
    let v = n3.json(["sandbox", "ls", "--json"]);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["sandboxID"], id.as_str(), "{v}");
    assert_eq!(list[0]["clientID"], "n1", "{v}");
    let table = n3.ok_str(["sandbox", "ls"]);
    assert!(table.contains(&id) && table.contains(" n1 "), "{table}");
    let (out, err, code) = exec(
        &n3,
        &id,
        &[],
        &["sh", "-c", "echo through n3 > /work/f; cat /work/f; exit 3"],
        b"",
    );
    assert_eq!((out.as_str(), code), ("through n3\n", 3), "{err}");
    assert_eq!(n2.ok_str(["sandbox", "kill", &id]), format!("{id} killed"));
    let err = n3.fails(["sandbox", "info", &id]);
    assert!(err.contains("(404)"), "{err}");
}

/// Not a check: the CLI's cost through a server against the same command on the home, one
/// run alternating (README, "The CLI against a server or cluster"). Run with
/// `cargo nextest run -p kiln-tests --test serve_cli --run-ignored only --no-capture`.
#[test]
#[ignore]
fn measure_local_against_server() {
    let Some((tmp, k)) = app_home() else {
        return;
    };
    let _cleanup = KillAll(k.clone());
    let s = Serve::start(&k, KEY);
    let cli = client(tmp.path(), &s.url(), KEY);
    let (lid, rid) = (
        k.ok_str(["sandbox", "create", "app"]),
        cli.ok_str(["sandbox", "create", "app"]),
    );
    let ms = |k: &Kiln, args: &[&str]| -> (f64, String) {
        let t = std::time::Instant::now();
        let out = k.ok_str(args);
        (t.elapsed().as_secs_f64() * 1000.0, out)
    };
    // (what, local, through the server) milliseconds of each round.
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = ["exec true", "ls", "create"]
        .into_iter()
        .map(|w| (w, Vec::new(), Vec::new()))
        .collect();
    for round in 0..15 {
        rows[0]
            .1
            .push(ms(&k, &["sandbox", "exec", &lid, "--", "true"]).0);
        rows[0]
            .2
            .push(ms(&cli, &["sandbox", "exec", &rid, "--", "true"]).0);
        rows[1].1.push(ms(&k, &["sandbox", "ls"]).0);
        rows[1].2.push(ms(&cli, &["sandbox", "ls"]).0);
        if round < 5 {
            for (kiln, side) in [(&k, 1), (&cli, 2)] {
                let (t, id) = ms(kiln, &["sandbox", "create", "app"]);
                kiln.ok(["sandbox", "kill", &id]);
                match side {
                    1 => rows[2].1.push(t),
                    _ => rows[2].2.push(t),
                }
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    eprintln!(
        "load {}",
        std::fs::read_to_string("/proc/loadavg").unwrap().trim()
    );
    for (what, local, server) in rows {
        eprintln!(
            "{what}: local {:.1} ms, through the server {:.1} ms (medians)",
            median(local),
            median(server)
        );
    }
}
