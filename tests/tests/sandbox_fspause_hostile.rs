//! A filesystem-only pause (`kiln sandbox pause --files-only`) attacked from inside the
//! sandbox by root (real runsc, the real kiln binary): symlinks to host-looking paths and to
//! the sandbox's secrets, FIFOs, names no shell likes, files swapped or growing while they are
//! read, floods of names, deep trees, sparse files far larger than the disk, and an agent
//! replaced by root with one that lies. Each pause ends within its bounds (saved, or refused
//! with the limit it passed), nothing on the host outside the sandbox changes, the store
//! verifies, and a resume brings back what was saved as it was (symlinks as symlinks).

use kiln_tests::sandbox::{
    app_home, assert_no_processes, create, exec, killed_after, listed, KillAll,
};
use kiln_tests::Kiln;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longer than any bounded pause here takes (the agent's idle timeout is 30 s).
const BOUND: Duration = Duration::from_secs(180);

/// What a command did, and its peak memory.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
    max_rss_mib: u64,
}

/// Runs `kiln ARGS`, killed (and the test failed) past `BOUND`; with the peak RSS of the
/// process (wait4's rusage).
fn run(k: &Kiln, args: &[&str]) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let child = k
        .cmd(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let t = Instant::now();
    let (status, rss) = loop {
        let mut status = 0;
        // SAFETY: rusage is plain integers; wait4 fills it for our own child.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child's pid with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            break (status, ru.ru_maxrss as u64 / 1024);
        }
        if t.elapsed() > BOUND {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("kiln {args:?} still running after {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::mem::forget(child); // reaped above
    Ran {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout: std::fs::read_to_string(out).unwrap_or_default(),
        stderr: std::fs::read_to_string(err).unwrap_or_default(),
        max_rss_mib: rss,
    }
}

/// A script run as root in the sandbox; its stdout.
fn root(k: &Kiln, id: &str, script: &str) -> String {
    let (out, err, code) = exec(k, id, &["--user", "root"], &["sh", "-c", script], b"");
    assert_eq!(code, 0, "{script}: {err}");
    out
}

fn state(k: &Kiln, id: &str) -> serde_json::Value {
    listed(k, id).unwrap_or_else(|| panic!("sandbox {id} gone"))
}

fn verify_store(k: &Kiln) {
    let v = run(k, &["store", "verify"]);
    assert!(v.ok, "store verify: {}{}", v.stdout, v.stderr);
}

/// Every file below `dir` on the host with its size and mtime: a snapshot to compare.
fn host_tree(dir: &Path) -> Vec<(PathBuf, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let md = e.path().symlink_metadata().unwrap();
            if md.is_dir() {
                todo.push(e.path());
            }
            out.push((
                e.path(),
                md.size(),
                md.mtime_nsec() + md.mtime() * 1_000_000_000,
            ));
        }
    }
    out.sort();
    out
}

/// Pauses (files only) and resumes `id`, both within bounds; the pause's peak RSS.
fn pause_resume(k: &Kiln, id: &str) -> u64 {
    let t = Instant::now();
    let p = run(k, &["sandbox", "pause", "--files-only", id]);
    assert!(p.ok, "pause: {}", p.stderr);
    let paused = t.elapsed();
    assert_eq!(state(k, id)["state"], "paused");
    let t = Instant::now();
    let r = run(k, &["sandbox", "resume", id]);
    assert!(r.ok, "resume: {}", r.stderr);
    eprintln!("pause {paused:?}, resume {:?}", t.elapsed());
    p.max_rss_mib
}

#[test]
fn symlinks_fifos_and_odd_names_come_back_as_they_were_and_nothing_leaves() {
    let Some((tmp, k)) = app_home() else {
        return;
    };
    let _guard = KillAll(k.clone());
    // A host directory with a file: the sandbox links to its host path.
    let canary = tmp.path().join("canary");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("file"), b"host").unwrap();
    let before = host_tree(&canary);
    let shadow = std::fs::metadata("/etc/shadow").ok().map(|m| m.len());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    let c = canary.display();
    root(
        &k,
        &id,
        &format!(
            "cd /work && echo plain > plain && ln -s /etc/shadow shadow && ln -s ../../.. up \
             && ln -s /proc/1/root proc1 && ln -s {c}/file hostfile && ln -s {c} hostdir \
             && ln -s /etc etcdir && ln -s loop loop && mkfifo fifo && mkdir -p d/e \
             && ln -s /work/plain d/e/back && echo nl > \"$(printf 'new\\nline')\" \
             && echo long > $(busybox seq -s '' 1 120 | busybox head -c 250) \
             && echo bad > \"$(printf 'bad\\377name')\" && chown -h 1234:1234 shadow"
        ),
    );
    // A FIFO with nobody writing: the save must never open it.
    let paused_rss = pause_resume(&k, &id);
    eprintln!("pause peak RSS {paused_rss} MiB");
    let links = root(
        &k,
        &id,
        "cd /work && for l in shadow up proc1 hostfile hostdir etcdir loop d/e/back; do \
         [ -L $l ] && echo \"$l -> $(busybox readlink $l)\" || echo \"$l not a link\"; done; \
         stat -c %u:%g shadow; cat plain; cat \"$(printf 'new\\nline')\"; \
         cat $(busybox seq -s '' 1 120 | busybox head -c 250); \
         [ -e fifo ] && echo fifo kept || echo no fifo",
    );
    let c = canary.display().to_string();
    let want = [
        "shadow -> /etc/shadow".to_string(),
        "up -> ../../..".into(),
        "proc1 -> /proc/1/root".into(),
        format!("hostfile -> {c}/file"),
        format!("hostdir -> {c}"),
        "etcdir -> /etc".into(),
        "loop -> loop".into(),
        "d/e/back -> /work/plain".into(),
        "1234:1234".into(),
        "plain".into(),
        "nl".into(),
        "long".into(),
        "no fifo".into(),
    ];
    assert_eq!(links.lines().collect::<Vec<_>>(), want, "{links}");
    // Nothing on the host moved.
    assert_eq!(host_tree(&canary), before);
    assert_eq!(std::fs::read(canary.join("file")).unwrap(), b"host");
    assert_eq!(
        std::fs::metadata("/etc/shadow").ok().map(|m| m.len()),
        shadow
    );
    verify_store(&k);
    k.ok(["sandbox", "kill", &id]);
    assert_no_processes(&id);
}

#[test]
fn files_swapped_and_growing_during_a_pause_never_hang_or_leak() {
    let Some((_tmp, k)) = app_home() else {
        return;
    };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    // /work/race changes between a file, links to a device and to a secret, a FIFO and a
    // link to a directory as fast as it can; /work/grow grows by whole lines.
    let start = "cd /work && (while :; do echo data > race; ln -sf /dev/zero race; rm -f race; \
                 mkfifo race; rm -f race; ln -s /etc/shadow race; rm -f race; ln -s / race; \
                 rm -f race; done) >/dev/null 2>&1 & \
                 (while :; do echo line >> /work/grow; done) >/dev/null 2>&1 &";
    for round in 0..3 {
        root(&k, &id, start);
        std::thread::sleep(Duration::from_millis(500));
        let rss = pause_resume(&k, &id);
        eprintln!("round {round}: pause peak RSS {rss} MiB");
        let seen = root(
            &k,
            &id,
            "cd /work; if [ -L race ]; then echo link $(busybox readlink race); \
             elif [ -f race ]; then echo file $(cat race); elif [ -e race ]; then echo other; \
             else echo none; fi; busybox grep -cv '^line$' grow; busybox wc -l < grow",
        );
        let lines: Vec<&str> = seen.lines().collect();
        assert!(
            [
                "link /dev/zero",
                "link /etc/shadow",
                "link /",
                "file data",
                "none"
            ]
            .contains(&lines[0]),
            "round {round}: /work/race came back as {:?}",
            lines[0]
        );
        // A prefix of whole lines: never more than the listing said, never other bytes.
        assert_eq!(lines[1], "0", "round {round}: {seen}");
        assert!(lines[2].trim().parse::<u64>().unwrap() > 0, "{seen}");
        // The loops were ended with the fresh boot.
        assert!(
            !root(&k, &id, "busybox ps").contains("while"),
            "a fresh boot"
        );
    }
    verify_store(&k);
    k.ok(["sandbox", "kill", &id]);
}

/// 5000 directories one in the other below /work/t (built 1000 at a time and moved into each
/// other: no path the shell names passes PATH_MAX).
const DEEP: &str =
    "cd /work && c=$(busybox seq 1000 | busybox sed 's/.*/d/' | busybox tr '\\n' /) \
                    && mkdir -p t/$c && for i in 2 3 4 5; do mkdir -p u/$c && mv t u/$c \
                    && mv u t; done";

#[test]
fn floods_of_names_and_deep_trees_are_saved_or_refused_within_limits() {
    let Some((_tmp, k)) = app_home() else {
        return;
    };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    // One directory with more names than one reply of the agent can carry (a page each).
    const N: u32 = 6_000;
    root(
        &k,
        &id,
        &format!(
            "mkdir /work/many && cd /work/many && busybox seq -w 1 {N} | busybox xargs \
             busybox touch && echo x > 0042"
        ),
    );
    let rss = pause_resume(&k, &id);
    eprintln!("{N} names: pause peak RSS {rss} MiB");
    let back = root(
        &k,
        &id,
        "ls /work/many | busybox wc -l; cat /work/many/0042",
    );
    assert_eq!(
        back.split_whitespace().collect::<Vec<_>>(),
        [&N.to_string(), "x"]
    );

    // 5000 levels: deeper than any path can name. Refused, the sandbox running on.
    root(&k, &id, DEEP);
    let p = run(&k, &["sandbox", "pause", "--files-only", &id]);
    assert!(!p.ok, "a 5000-level tree cannot be saved");
    assert!(
        p.stderr.contains("longer than 4096"),
        "the limit is named: {}",
        p.stderr
    );
    assert_eq!(state(&k, &id)["state"], "running");
    assert!(state(&k, &id).get("op").is_none());
    assert_eq!(root(&k, &id, "cat /work/many/0042"), "x\n");

    // The same at its timeout: the sandbox does not run on past it.
    k.ok(["sandbox", "kill", &id]);
    let id = create(
        &k,
        &["app", "--timeout", "600", "--on-timeout", "pause-files"],
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    root(&k, &id, DEEP);
    k.ok(["sandbox", "timeout", &id, "1"]);
    std::thread::sleep(Duration::from_secs(2));
    let rec = state(&k, &id);
    assert_eq!(rec["state"], "failed", "{rec}");
    assert!(
        rec.to_string().contains("could not be saved"),
        "the reason is said: {rec}"
    );
    assert_no_processes(&id);
    verify_store(&k);
    k.ok(["sandbox", "kill", &id]);
}

#[test]
fn sparse_files_past_the_disk_are_refused_and_big_ones_streamed() {
    let Some((_tmp, k)) = app_home() else {
        return;
    };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    root(
        &k,
        &id,
        "busybox truncate -s 1T /work/sparse 2>/dev/null || \
         busybox dd if=/dev/zero of=/work/sparse bs=1 count=1 seek=1099511627775",
    );
    let p = run(&k, &["sandbox", "pause", "--files-only", &id]);
    assert!(!p.ok, "a 1 TiB file is more than the disk");
    assert!(p.stderr.contains("disk size"), "{}", p.stderr);
    assert_eq!(state(&k, &id)["state"], "running");

    // 256 MiB of data: streamed into the store, never held in the host's memory.
    const MIB: u64 = 256;
    let sum = root(
        &k,
        &id,
        &format!(
            "rm /work/sparse && busybox dd if=/dev/urandom of=/work/big bs=1M count={MIB} \
             2>/dev/null && md5sum /work/big"
        ),
    );
    let rss = pause_resume(&k, &id);
    eprintln!("{MIB} MiB file: pause peak RSS {rss} MiB");
    assert!(
        rss < MIB,
        "the pause held {rss} MiB: buffered, not streamed"
    );
    assert_eq!(root(&k, &id, "md5sum /work/big"), sum);

    // kill -9 mid-save: the next reader settles it, the store verifies, nothing is left over
    // in the sandbox's directory.
    let dir = k.home.join("sandboxes").join(&id);
    let files = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let running = files(&dir);
    for delay in [300u64, 1500] {
        killed_after(
            &k,
            &["sandbox", "pause", "--files-only", &id],
            Duration::from_millis(delay),
        );
        let rec = state(&k, &id);
        eprintln!("pause killed after {delay} ms: {}", rec["state"]);
        assert!(rec.get("op").is_none(), "{rec}");
        match rec["state"].as_str().unwrap() {
            "running" => assert_eq!(files(&dir), running, "after a kill at {delay} ms"),
            "paused" => assert!(run(&k, &["sandbox", "resume", &id]).ok),
            s => panic!("left {s}: {rec}"),
        }
        verify_store(&k);
    }
    assert_eq!(root(&k, &id, "md5sum /work/big"), sum);
    k.ok(["sandbox", "kill", &id]);
}

/// An agent for the sandbox's socket that answers every request as `argv[1]` says: how root
/// in a sandbox would lie to the host.
const FAKE_AGENT: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <signal.h>
#include <fcntl.h>

static const char *mode;
static char out[1 << 20];

static int readn(int fd, void *b, size_t n) {
    size_t g = 0;
    while (g < n) { ssize_t r = read(fd, (char *)b + g, n - g); if (r <= 0) return -1; g += r; }
    return 0;
}
static int writen(int fd, const void *b, size_t n) {
    size_t g = 0;
    while (g < n) { ssize_t r = write(fd, (const char *)b + g, n - g); if (r <= 0) return -1; g += r; }
    return 0;
}
static int frame(int fd, char kind, const char *p, uint32_t n) {
    unsigned char h[5] = {n & 255, (n >> 8) & 255, (n >> 16) & 255, n >> 24, (unsigned char)kind};
    if (writen(fd, h, 5)) return -1;
    return n ? writen(fd, p, n) : 0;
}
static int entry(char *o, const char *dir, const char *name, const char *path, const char *kind,
                 unsigned long size) {
    char p[9000];
    if (!path) { snprintf(p, sizeof p, "%s%s%s", dir, strcmp(dir, "/") ? "/" : "", name); path = p; }
    return sprintf(o, "{\"name\":\"%s\",\"path\":\"%s\",\"kind\":\"%s\",\"size\":%lu,\"mode\":420,"
                   "\"uid\":0,\"gid\":0,\"mtime_ms\":0,\"symlink_target\":null}",
                   name, path, kind, size);
}
static void field(const char *req, const char *key, char *v, size_t cap) {
    char k[32]; snprintf(k, sizeof k, "\"%s\":\"", key);
    const char *p = strstr(req, k); v[0] = 0;
    if (!p) return;
    p += strlen(k);
    const char *e = strchr(p, '"'); size_t l = e ? (size_t)(e - p) : 0;
    if (l >= cap) l = cap - 1;
    memcpy(v, p, l); v[l] = 0;
}
static void serve(int c) {
    unsigned char h[5];
    if (readn(c, h, 5)) return;
    uint32_t n = h[0] | h[1] << 8 | h[2] << 16 | (uint32_t)h[3] << 24;
    if (n > (1 << 20)) return;
    char *req = calloc(n + 1, 1);
    if (readn(c, req, n)) return;
    char dir[9000], after[64];
    field(req, "path", dir, sizeof dir);
    field(req, "after", after, sizeof after);
    int first = after[0] == 0, len = 1;
    out[0] = '[';
    if (!strcmp(mode, "silent")) { sleep(3600); return; }
    if (!strcmp(mode, "huge")) { unsigned char big[5] = {255, 255, 255, 255, 'K'}; writen(c, big, 5); return; }
    if (h[4] == 'F') {  /* ReadFile: never ends */
        memset(out, 'A', 65536);
        while (frame(c, 'D', out, 65536) == 0) {}
        return;
    }
    if (!strcmp(mode, "escape") && first) {
        len += entry(out + len, dir, "x", "/../../x", "dir", 0);
    } else if (!strcmp(mode, "again")) {
        len += entry(out + len, dir, "a", NULL, "dir", 0);
    } else if (!strcmp(mode, "deep") && first) {
        char name[256]; memset(name, 'd', 250); name[250] = 0;
        len += entry(out + len, dir, name, NULL, "dir", 0);
    } else if (!strcmp(mode, "wide")) {
        long from = first ? 0 : atol(after + 1);
        for (int i = 1; i <= 2048; i++) {
            char name[32]; snprintf(name, sizeof name, "n%09ld", from + i);
            if (i > 1) out[len++] = ',';
            len += entry(out + len, dir, name, NULL, "file", 0);
        }
    } else if (!strcmp(mode, "endless") && first && !strcmp(dir, "/")) {
        len += entry(out + len, dir, "f", NULL, "file", 10);
    }
    out[len++] = ']';
    frame(c, 'K', out, len);
}
int main(int argc, char **argv) {
    mode = argv[1];
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, "/run/kiln/agent.sock");
    unlink(a.sun_path);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) { perror("bind"); return 1; }
    close(open("/tmp/fake.ready", O_CREAT | O_WRONLY, 0644));
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        if (fork() == 0) { serve(c); _exit(0); }
        close(c);
    }
}
"#;

#[test]
fn an_agent_replaced_by_root_gets_refusals_within_bounds() {
    let Some((tmp, k)) = app_home() else {
        return;
    };
    let src = tmp.path().join("fake.c");
    let bin = tmp.path().join("fake");
    std::fs::write(&src, FAKE_AGENT).unwrap();
    let cc = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .stderr(Stdio::piped())
        .output();
    match cc {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIP: cannot build a static test program: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIP: no C compiler for a static test program: {e}");
            return;
        }
    }
    let _guard = KillAll(k.clone());
    // (mode, whether the pause is refused, what the refusal says)
    let cases = [
        ("escape", Some("\"/../../x\" listed in \"/\"")),
        ("again", Some("out of order")),
        ("deep", Some("longer than 4096")),
        ("wide", Some("more than 500000 names")),
        ("huge", Some("exceeds")),
        ("silent", Some("did not answer within 30 s")),
        // Lies about a file's size and never stops sending it: only the size listed is read.
        ("endless", None),
    ];
    for (mode, refusal) in cases {
        let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
        k.ok([
            "sandbox",
            "cp",
            bin.to_str().unwrap(),
            &format!("{id}:/tmp/fake"),
        ]);
        root(
            &k,
            &id,
            &format!(
                "chmod 755 /tmp/fake; (/tmp/fake {mode} >/dev/null 2>&1 &); \
                 while [ ! -e /tmp/fake.ready ]; do sleep 0.05; done"
            ),
        );
        let t = Instant::now();
        let p = run(&k, &["sandbox", "pause", "--files-only", &id]);
        eprintln!(
            "{mode}: pause {} in {:?}, peak RSS {} MiB: {}",
            if p.ok { "saved" } else { "refused" },
            t.elapsed(),
            p.max_rss_mib,
            p.stderr.trim()
        );
        assert!(p.max_rss_mib < 1024, "{mode}: {} MiB", p.max_rss_mib);
        match refusal {
            Some(says) => {
                assert!(!p.ok, "{mode}: saved what a lying agent said");
                assert!(p.stderr.contains(says), "{mode}: {}", p.stderr);
                let rec = state(&k, &id);
                assert_eq!(rec["state"], "running", "{mode}: {rec}");
                assert!(rec.get("op").is_none(), "{mode}: {rec}");
            }
            None => {
                assert!(p.ok, "{mode}: {}", p.stderr);
                assert_eq!(state(&k, &id)["state"], "paused");
            }
        }
        verify_store(&k);
        k.ok(["sandbox", "kill", &id]);
        assert_no_processes(&id);
    }
}
