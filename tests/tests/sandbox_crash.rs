//! kill -9 of `kiln sandbox pause|resume|snapshot|fork|kill` at many moments of each (real
//! runsc, the real kiln binary): whoever next takes the sandbox's lock finishes the operation or
//! rolls it back. Afterwards the sandbox is listed running or paused (never failed, never gone;
//! gone after a kill), a file written before is byte-identical, a background counter goes on,
//! exactly one set of runsc processes is left for it (none while paused), no network namespace
//! outlives a paused sandbox, and the next pause or resume works the first time.

use kiln_tests::sandbox::{
    app_home, create, killed_after, listed, sh, timed, KillAll, COUNTER_LOOP,
};
use kiln_tests::Kiln;
use std::path::Path;
use std::time::Duration;

/// How many moments each operation is killed at, spread over its measured duration.
const MOMENTS: u32 = 6;

/// A sandbox under test: its id, the bytes of `/work/kept` and the last counter seen.
struct Subject {
    id: String,
    kept: Vec<u8>,
    count: u64,
}

/// A running sandbox with a file written and a counter counting.
fn subject(k: &Kiln, tmp: &Path) -> Subject {
    let id = create(k, &["app"])["id"].as_str().unwrap().to_string();
    let kept = kiln_tests::pseudo_random(256 << 10, 16);
    let local = tmp.join(format!("kept-{id}"));
    std::fs::write(&local, &kept).unwrap();
    k.ok([
        "sandbox",
        "cp",
        local.to_str().unwrap(),
        &format!("{id}:/work/kept"),
    ]);
    sh(k, &id, COUNTER_LOOP);
    std::thread::sleep(Duration::from_millis(200));
    let mut s = Subject { id, kept, count: 0 };
    s.count = count(k, &s.id);
    s
}

fn count(k: &Kiln, id: &str) -> u64 {
    kiln_tests::sandbox::counter(k, id)
}

/// Live (not zombie) processes whose command line holds the argument `arg`: (pid, parent
/// pid, argv).
fn processes_with(arg: &str) -> Vec<(u32, u32, Vec<String>)> {
    let mut out = Vec::new();
    for (pid, argv) in kiln_tests::sandbox::processes() {
        if !argv.iter().any(|a| a == arg) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        if fields.first() == Some(&"Z") {
            continue;
        }
        let ppid = fields.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        out.push((pid, ppid, argv));
    }
    out
}

/// The roots of the sandbox's runsc process trees (those whose parent is none of them), each
/// named by its runsc subcommand: a running sandbox has exactly `["boot", "gofer"]`.
fn runsc_sets(k: &Kiln, id: &str) -> Vec<String> {
    let root = format!(
        "--root={}",
        k.home.join("sandboxes").join(id).join("runsc").display()
    );
    let procs = processes_with(&root);
    let mut roots: Vec<String> = procs
        .iter()
        .filter(|(_, ppid, _)| !procs.iter().any(|(p, _, _)| p == ppid))
        .map(|(_, _, argv)| {
            ["boot", "gofer", "run", "restore", "checkpoint"]
                .into_iter()
                .find(|c| argv.iter().any(|a| a == c))
                .unwrap_or("other")
                .to_string()
        })
        .collect();
    roots.sort();
    roots
}

/// Network namespaces of sandbox `id` (kiln names them after its id).
fn namespaces(id: &str) -> Vec<String> {
    let short: String = id.chars().take(12).collect();
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("kiln-{short}")))
        .collect()
}

/// `MOMENTS` delays spread over `d`, from just after the start to just before the end.
fn moments(d: Duration) -> Vec<Duration> {
    kiln_tests::sandbox::moments(d, MOMENTS)
}

/// Checks what the reconcile left of `s` and returns its state: running (one runsc process
/// set, the file intact, the counter on from where it was) or paused (nothing running, no
/// network namespace). `what` names the interrupted operation in failures.
fn settled(k: &Kiln, s: &mut Subject, with_net: bool, what: &str) -> String {
    let rec = listed(k, &s.id).unwrap_or_else(|| panic!("{what}: sandbox {} gone", s.id));
    let state = rec["state"].as_str().unwrap().to_string();
    assert!(rec.get("op").is_none(), "{what}: still under way: {rec}");
    match state.as_str() {
        "running" => {
            assert_eq!(runsc_sets(k, &s.id), ["boot", "gofer"], "{what}: {rec}");
            if with_net {
                assert_eq!(namespaces(&s.id).len(), 2, "{what}: {rec}");
            }
            let back = k.ok(["sandbox", "exec", &s.id, "--", "cat", "/work/kept"]);
            assert!(back == s.kept, "{what}: /work/kept changed");
            let c = count(k, &s.id);
            assert!(c >= s.count, "{what}: counter went back {} -> {c}", s.count);
            let Some((_, c2)) = kiln_tests::sandbox::counter_advances(k, &s.id) else {
                panic!("{what}: counter stopped at {c}");
            };
            s.count = c2;
        }
        "paused" => {
            assert_eq!(runsc_sets(k, &s.id), Vec::<String>::new(), "{what}: {rec}");
            assert_eq!(namespaces(&s.id), Vec::<String>::new(), "{what}: {rec}");
        }
        _ => panic!("{what}: sandbox left {state}: {rec}"),
    }
    state
}

/// A gVisor home (None after a SKIP line), with its guard.
fn home() -> Option<(tempfile::TempDir, Kiln, KillAll)> {
    let (tmp, k) = app_home()?;
    let guard = KillAll(k.clone());
    Some((tmp, k, guard))
}

/// kill -9 of pause and resume at moments across each; after each the sandbox is paused or
/// running as described in [`settled`], and the next pause and resume work the first time.
fn pause_and_resume(k: &Kiln, tmp: &Path, with_net: bool) {
    let mut s = subject(k, tmp);
    let pause = timed(k, &["sandbox", "pause", &s.id]);
    let resume = timed(k, &["sandbox", "resume", &s.id]);
    eprintln!("pause {pause:?}, resume {resume:?}");
    for (i, d) in moments(pause).into_iter().enumerate() {
        s.count = count(k, &s.id);
        killed_after(k, &["sandbox", "pause", &s.id], d);
        let what = format!("pause killed after {d:?}");
        let left = settled(k, &mut s, with_net, &what);
        if left == "running" {
            k.ok(["sandbox", "pause", &s.id]);
        }
        let outcome = settled(k, &mut s, with_net, &what);
        assert_eq!(outcome, "paused", "{what}: the next pause");
        eprintln!("{what}: {left}");
        // Killed resumes at the same moment of a resume, one per pause.
        let d = moments(resume)[i];
        killed_after(k, &["sandbox", "resume", &s.id], d);
        let what = format!("resume killed after {d:?}");
        let left = settled(k, &mut s, with_net, &what);
        if left == "paused" {
            k.ok(["sandbox", "resume", &s.id]);
        }
        let outcome = settled(k, &mut s, with_net, &what);
        assert_eq!(outcome, "running", "{what}: the next resume");
        eprintln!("{what}: {left}");
    }
    k.ok(["sandbox", "kill", &s.id]);
    assert_eq!(runsc_sets(k, &s.id), Vec::<String>::new());
}

#[test]
fn killed_pauses_and_resumes_finish_or_roll_back() {
    let Some((tmp, k, _guard)) = home() else {
        return;
    };
    pause_and_resume(&k, tmp.path(), false);
}

#[test]
fn killed_pauses_and_resumes_with_a_network_leave_one_set_of_namespaces() {
    if let Some(why) = kiln_tests::net::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let Some((tmp, k, _guard)) = home() else {
        return;
    };
    // kiln and its sandboxes' networks live in namespaces of the test's own.
    let net = kiln_tests::net::TestNet::new();
    net.enter();
    let k = k.with_env(net.kiln_env());
    let _guard = KillAll(k.clone());
    pause_and_resume(&k, tmp.path(), true);
}

#[test]
fn killed_snapshots_and_forks_leave_the_source_running_and_no_half_made_fork() {
    let Some((tmp, k, _guard)) = home() else {
        return;
    };
    let mut s = subject(&k, tmp.path());
    let snapshot = timed(&k, &["sandbox", "snapshot", &s.id, "--name", "timed"]);
    for (i, d) in moments(snapshot).into_iter().enumerate() {
        let name = format!("s{i}");
        killed_after(&k, &["sandbox", "snapshot", &s.id, "--name", &name], d);
        let what = format!("snapshot killed after {d:?}");
        assert_eq!(settled(&k, &mut s, false, &what), "running");
    }
    let fork = timed(&k, &["sandbox", "fork", &s.id, "-n", "2"]);
    let source = s.id.clone();
    let forks = |k: &Kiln| -> Vec<String> {
        k.json(["sandbox", "ls", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .filter(|f| *f != source)
            .collect()
    };
    for f in forks(&k) {
        k.ok(["sandbox", "kill", &f]);
    }
    for d in moments(fork) {
        killed_after(&k, &["sandbox", "fork", &s.id, "-n", "2"], d);
        let what = format!("fork killed after {d:?}");
        assert_eq!(settled(&k, &mut s, false, &what), "running");
        // Forks that were made are whole sandboxes; half-made ones are gone with their
        // processes.
        for f in forks(&k) {
            let rec = listed(&k, &f).unwrap();
            assert_eq!(rec["state"], "running", "{what}: fork {rec}");
            assert_eq!(runsc_sets(&k, &f), ["boot", "gofer"], "{what}: fork {f}");
            let back = k.ok(["sandbox", "exec", &f, "--", "cat", "/work/kept"]);
            assert!(back == s.kept, "{what}: fork {f}: /work/kept differs");
            k.ok(["sandbox", "kill", &f]);
        }
        for e in std::fs::read_dir(k.home.join("sandboxes"))
            .unwrap()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".new-") {
                let id = name.trim_start_matches(".new-");
                assert_eq!(runsc_sets(&k, id), Vec::<String>::new(), "{what}: {name}");
                continue;
            }
            assert!(
                name == s.id || name.starts_with('.'),
                "{what}: left behind: {name}"
            );
        }
    }
    // The next pause and resume work the first time.
    k.ok(["sandbox", "pause", &s.id]);
    assert_eq!(
        settled(&k, &mut s, false, "pause after the sweep"),
        "paused"
    );
    k.ok(["sandbox", "resume", &s.id]);
    assert_eq!(
        settled(&k, &mut s, false, "resume after the sweep"),
        "running"
    );
}

#[test]
fn killed_kills_finish_on_the_next_read() {
    let Some((tmp, k, _guard)) = home() else {
        return;
    };
    let probe = subject(&k, tmp.path());
    let kill = timed(&k, &["sandbox", "kill", &probe.id]);
    for d in moments(kill) {
        let s = subject(&k, tmp.path());
        killed_after(&k, &["sandbox", "kill", &s.id], d);
        let what = format!("kill killed after {d:?}");
        // Killed before it began: the sandbox runs on untouched, and a kill works.
        if let Some(rec) = listed(&k, &s.id) {
            assert_eq!(rec["state"], "running", "{what}: {rec}");
            assert!(rec.get("op").is_none(), "{what}: {rec}");
            k.ok(["sandbox", "kill", &s.id]);
            assert!(listed(&k, &s.id).is_none(), "{what}");
        }
        assert_eq!(runsc_sets(&k, &s.id), Vec::<String>::new(), "{what}");
        let left: Vec<String> = std::fs::read_dir(k.home.join("sandboxes"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(&s.id))
            .collect();
        assert!(left.is_empty(), "{what}: directory left: {left:?}");
    }
}
