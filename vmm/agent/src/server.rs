//! Serving one connection: exec with streamed output, file writes and reads.

use crate::protocol::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Exit statuses collected by the reaper, keyed by pid (only for processes we spawned).
struct Children {
    map: Mutex<HashMap<i32, Option<ExitStatus>>>,
    cv: Condvar,
}

fn children() -> &'static Children {
    static C: OnceLock<Children> = OnceLock::new();
    C.get_or_init(|| {
        // One thread reaps every child (as PID 1 that includes orphans re-parented to us), so
        // zombies never pile up and exec requests learn their child's status from the table.
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_loop)
            .expect("spawning the reaper thread");
        Children {
            map: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
        }
    })
}

fn reap_loop() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer; -1 waits for any child.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            // No children right now (ECHILD): wait a little for the next spawn.
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        let st = if libc::WIFEXITED(status) {
            ExitStatus {
                code: Some(libc::WEXITSTATUS(status)),
                signal: None,
            }
        } else if libc::WIFSIGNALED(status) {
            ExitStatus {
                code: None,
                signal: Some(libc::WTERMSIG(status)),
            }
        } else {
            continue;
        };
        let c = children();
        let mut m = c.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = m.get_mut(&pid) {
            *slot = Some(st);
            c.cv.notify_all();
        }
    }
}

type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(w: &SharedWriter, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    let mut g = w.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *g, kind, payload)
}

/// Serves one request on a connection. Errors are reported to the client when possible.
pub fn serve(
    mut reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
) -> Result<(), ProtocolError> {
    let w: SharedWriter = Arc::new(Mutex::new(writer));
    let r = match read_frame(&mut reader) {
        Ok(None) => return Ok(()),
        Ok(Some((kind, payload))) => dispatch(kind, payload, reader, &w),
        Err(e) => Err(e),
    };
    if let Err(e) = &r {
        let _ = send(&w, Kind::Error, e.to_string().as_bytes());
    }
    r
}

fn dispatch(
    kind: Kind,
    payload: Vec<u8>,
    mut reader: Box<dyn Read + Send>,
    w: &SharedWriter,
) -> Result<(), ProtocolError> {
    match kind {
        Kind::Exec => parse_json(kind, &payload).and_then(|req| exec(req, reader, w)),
        Kind::WriteFile => {
            parse_json(kind, &payload).and_then(|req| write_file(req, &mut reader, w))
        }
        Kind::ReadFile => parse_json(kind, &payload).and_then(|req| read_file(req, w)),
        k => Err(ProtocolError::Unexpected(k)),
    }
}

fn exec(
    req: ExecRequest,
    mut reader: Box<dyn Read + Send>,
    w: &SharedWriter,
) -> Result<(), ProtocolError> {
    let Some(prog) = req.argv.first() else {
        send(w, Kind::Error, b"exec: empty argv")?;
        return Ok(());
    };
    let mut cmd = Command::new(prog);
    cmd.args(&req.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .envs(&req.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let reg = children();
    // Register before spawning finishes: hold the table lock so the reaper cannot record (and
    // drop) the status of a child that exits at once.
    let mut table = reg.map.lock().unwrap_or_else(|p| p.into_inner());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            drop(table);
            send(w, Kind::Error, format!("exec {prog}: {e}").as_bytes())?;
            return Ok(());
        }
    };
    let pid = child.id() as i32;
    table.insert(pid, None);
    drop(table);

    let pump = |mut src: Box<dyn Read + Send>, kind: Kind, w: SharedWriter| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match src.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if send(&w, kind, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    let out = pump(
        Box::new(child.stdout.take().expect("piped")),
        Kind::Stdout,
        w.clone(),
    );
    let err = pump(
        Box::new(child.stderr.take().expect("piped")),
        Kind::Stderr,
        w.clone(),
    );
    let mut stdin = child.stdin.take();
    // Stdin frames are fed from their own thread: the child may exit without reading them.
    std::thread::spawn(move || {
        while let Ok(Some((kind, data))) = read_frame(&mut reader) {
            if kind != Kind::Stdin || data.is_empty() {
                break;
            }
            let Some(s) = stdin.as_mut() else { break };
            if s.write_all(&data).is_err() {
                break;
            }
        }
        drop(stdin.take());
    });
    let _ = out.join();
    let _ = err.join();
    let mut table = reg.map.lock().unwrap_or_else(|p| p.into_inner());
    let status = loop {
        if let Some(Some(st)) = table.get(&pid) {
            let st = *st;
            table.remove(&pid);
            break st;
        }
        table = reg.cv.wait(table).unwrap_or_else(|p| p.into_inner());
    };
    drop(table);
    let g = &mut *w.lock().unwrap_or_else(|p| p.into_inner());
    write_json(g, Kind::Exit, &status)
}

/// Reads and drops a file's data frames up to the empty one that ends them.
fn drain_file_frames(reader: &mut Box<dyn Read + Send>) -> Result<(), String> {
    loop {
        match read_frame(reader).map_err(|e| e.to_string())? {
            Some((Kind::Data, data)) if !data.is_empty() => {}
            Some((Kind::Data, _)) => return Ok(()),
            Some((kind, _)) => return Err(format!("unexpected {kind:?} frame in file data")),
            None => return Err("connection closed before the end of the file".into()),
        }
    }
}

fn write_file(
    req: FileRequest,
    reader: &mut Box<dyn Read + Send>,
    w: &SharedWriter,
) -> Result<(), ProtocolError> {
    let path = Path::new(&req.path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        send(w, Kind::Error, b"write: path has no file name")?;
        return Ok(());
    };
    let tmp = dir.join(format!(".{}.kiln-agent-tmp", name.to_string_lossy()));
    let result = (|| -> Result<(), String> {
        let mut f = match std::fs::File::create(&tmp) {
            Ok(f) => f,
            Err(e) => {
                // The file's data frames belong to this request: consume them so the client,
                // still sending, reads this error instead of a broken pipe.
                drain_file_frames(reader)?;
                return Err(format!("create {}: {e}", tmp.display()));
            }
        };
        loop {
            let (kind, data) = read_frame(reader)
                .map_err(|e| e.to_string())?
                .ok_or("connection closed before the end of the file")?;
            if kind != Kind::Data {
                return Err(format!("unexpected {kind:?} frame in file data"));
            }
            if data.is_empty() {
                break;
            }
            f.write_all(&data)
                .map_err(|e| format!("write {}: {e}", tmp.display()))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(
            req.mode.unwrap_or(0o644) & 0o7777,
        ))
        .map_err(|e| format!("chmod: {e}"))?;
        f.sync_all().map_err(|e| format!("fsync: {e}"))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
    })();
    match result {
        Ok(()) => send(w, Kind::Ok, b""),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            send(
                w,
                Kind::Error,
                format!("write {}: {e}", req.path).as_bytes(),
            )
        }
    }
}

fn read_file(req: FileRequest, w: &SharedWriter) -> Result<(), ProtocolError> {
    let mut f = match std::fs::File::open(&req.path) {
        Ok(f) => f,
        Err(e) => return send(w, Kind::Error, format!("read {}: {e}", req.path).as_bytes()),
    };
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) => return send(w, Kind::Error, format!("read {}: {e}", req.path).as_bytes()),
        };
        send(w, Kind::Data, &buf[..n])?;
        if n == 0 {
            return Ok(());
        }
    }
}
