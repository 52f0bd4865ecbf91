//! Host side of the agent protocol: one function per request, each on a fresh connection
//! (`stream`, any `Read + Write`: a vsock or Unix socket). The agent's `Error` answers come
//! back as [`ClientError::Agent`] with their [`ErrorKind`].

use crate::protocol::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{self, Read, Write};

/// What an exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("agent: {message}")]
    Agent { kind: ErrorKind, message: String },
    #[error("agent closed the connection early")]
    Closed,
    /// Reading the caller's input or writing its output.
    #[error("local I/O: {0}")]
    Local(io::Error),
}

impl ClientError {
    /// The agent's error kind, if the agent refused the request.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Agent { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

fn agent_error(data: &[u8]) -> ClientError {
    let e = ErrorReply::parse(data);
    ClientError::Agent {
        kind: e.kind,
        message: e.message,
    }
}

/// Streams that can be cloned, so that one thread writes while another reads.
pub trait TryCloneStream: Read + Write + Send + Sized + 'static {
    fn try_clone_stream(&self) -> io::Result<Self>;
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl TryCloneStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// A connected socket of another family (vsock) as a file.
impl TryCloneStream for std::fs::File {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// Sends a request's frames. The agent may refuse a request before reading all of it and close
/// the connection; the write then fails (EPIPE), and the agent's error frame is the answer.
fn send_request<S: Read + Write>(
    stream: &mut S,
    send: impl FnOnce(&mut S) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    match send(stream) {
        Ok(()) => Ok(()),
        // Only a failed write means the agent may have answered (a local failure does not).
        Err(e @ ClientError::Protocol(_)) => match read_frame(stream) {
            Ok(Some((Kind::Error, data))) => Err(agent_error(&data)),
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Reads the one answer frame: the `Ok` payload, or the agent's error.
fn answer<S: Read>(stream: &mut S) -> Result<Vec<u8>, ClientError> {
    match read_frame(stream)?.ok_or(ClientError::Closed)? {
        (Kind::Ok, d) => Ok(d),
        (Kind::Error, d) => Err(agent_error(&d)),
        (k, _) => Err(ProtocolError::Unexpected(k).into()),
    }
}

/// A request of one JSON frame, answered by one `Ok` frame.
fn call<S: Read + Write, Q: Serialize>(
    stream: &mut S,
    kind: Kind,
    req: &Q,
) -> Result<Vec<u8>, ClientError> {
    write_json(stream, kind, req)?;
    answer(stream)
}

fn call_json<S: Read + Write, Q: Serialize, T: DeserializeOwned>(
    stream: &mut S,
    kind: Kind,
    req: &Q,
) -> Result<T, ClientError> {
    let d = call(stream, kind, req)?;
    Ok(parse_json(Kind::Ok, &d)?)
}

/// Reads a process's frames up to its exit: `Started`, output, `Exit`.
fn follow<S: Read>(
    stream: &mut S,
    mut on_started: impl FnMut(Started),
    mut on_output: impl FnMut(Kind, &[u8]),
) -> Result<ExitStatus, ClientError> {
    loop {
        let (kind, data) = read_frame(stream)?.ok_or(ClientError::Closed)?;
        match kind {
            Kind::Started => on_started(parse_json(kind, &data)?),
            Kind::Stdout | Kind::Stderr => on_output(kind, &data),
            Kind::Exit => return Ok(parse_json(kind, &data)?),
            Kind::Error => return Err(agent_error(&data)),
            k => return Err(ProtocolError::Unexpected(k).into()),
        }
    }
}

/// Starts `req` as a background process with its stdin closed (at end of file, so a program
/// that reads it does not wait forever) and returns once the agent says it started; the
/// process runs on after this connection closes.
pub fn start_background<S: Read + Write>(
    stream: &mut S,
    req: &ExecRequest,
) -> Result<Started, ClientError> {
    let req = ExecRequest {
        background: true,
        stdin: true,
        tty: None,
        ..req.clone()
    };
    send_request(stream, |s| {
        write_json(s, Kind::Exec, &req)?;
        Ok(write_frame(s, Kind::Stdin, b"")?)
    })?;
    match read_frame(stream)?.ok_or(ClientError::Closed)? {
        (Kind::Started, d) => Ok(parse_json(Kind::Started, &d)?),
        (Kind::Error, d) => Err(agent_error(&d)),
        // Output or an exit before `Started` cannot come; anything else is a fault.
        (k, _) => Err(ProtocolError::Unexpected(k).into()),
    }
}

/// Runs a command over a fresh connection, feeding `stdin` (unless `req.stdin` is false) and
/// collecting the output. `on_output` sees each chunk as it arrives (kind is `Stdout` or
/// `Stderr`).
pub fn exec<S: Read + Write>(
    stream: &mut S,
    req: &ExecRequest,
    stdin: &[u8],
    mut on_output: impl FnMut(Kind, &[u8]),
) -> Result<ExecOutput, ClientError> {
    send_request(stream, |s| {
        write_json(s, Kind::Exec, req)?;
        if req.stdin {
            for chunk in stdin.chunks(MAX_FRAME) {
                write_frame(s, Kind::Stdin, chunk)?;
            }
            write_frame(s, Kind::Stdin, b"")?;
        }
        Ok(())
    })?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = follow(
        stream,
        |_| {},
        |kind, data| {
            match kind {
                Kind::Stdout => stdout.extend_from_slice(data),
                _ => stderr.extend_from_slice(data),
            }
            on_output(kind, data);
        },
    )?;
    Ok(ExecOutput {
        stdout,
        stderr,
        status,
    })
}

/// Runs a command, streaming its stdin from `stdin` (on a thread of its own, over a clone of
/// the stream) while passing its output to `on_output`; `on_started` gets the pid first.
/// With `stdin: None` the process's stdin is closed at once, except on a tty (where it stays
/// open for `send_stdin`). Returns at the process's exit; the stdin thread, if still reading
/// `stdin`, ends at its next read.
pub fn exec_stream<S: TryCloneStream>(
    stream: &mut S,
    req: &ExecRequest,
    stdin: Option<Box<dyn Read + Send>>,
    mut on_started: impl FnMut(i32),
    on_output: impl FnMut(Kind, &[u8]),
) -> Result<ExitStatus, ClientError> {
    write_json(stream, Kind::Exec, req)?;
    if req.stdin {
        match stdin {
            Some(mut input) => {
                let mut w = stream.try_clone_stream().map_err(ProtocolError::from)?;
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match input.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if write_frame(&mut w, Kind::Stdin, &buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = write_frame(&mut w, Kind::Stdin, b"");
                });
            }
            // The agent may have refused the request (no such program) and closed already:
            // its answer is what to report, so a failed close of stdin is left to `follow`.
            None if req.tty.is_none() => {
                let _ = write_frame(stream, Kind::Stdin, b"");
            }
            None => {}
        }
    }
    follow(stream, |s| on_started(s.pid), on_output)
}

/// Attaches to a process in the agent's table: `on_started` gets its pid and the count of
/// output bytes already dropped, `on_output` its buffered then live output; returns its exit.
pub fn connect_process<S: Read + Write>(
    stream: &mut S,
    target: &ProcessRef,
    on_started: impl FnMut(Started),
    on_output: impl FnMut(Kind, &[u8]),
) -> Result<ExitStatus, ClientError> {
    write_json(stream, Kind::Connect, target)?;
    follow(stream, on_started, on_output)
}

pub fn list_processes<S: Read + Write>(stream: &mut S) -> Result<Vec<ProcessInfo>, ClientError> {
    call_json(stream, Kind::List, &serde_json::json!({}))
}

/// Sends `signal` to the process's group.
pub fn signal<S: Read + Write>(
    stream: &mut S,
    target: &ProcessRef,
    signal: i32,
) -> Result<(), ClientError> {
    let req = SignalRequest {
        target: target.clone(),
        signal,
    };
    call(stream, Kind::Signal, &req).map(drop)
}

pub fn send_stdin<S: Read + Write>(
    stream: &mut S,
    target: &ProcessRef,
    data: &[u8],
) -> Result<(), ClientError> {
    send_request(stream, |s| {
        write_json(s, Kind::SendStdin, target)?;
        for chunk in data.chunks(MAX_FRAME) {
            write_frame(s, Kind::Data, chunk)?;
        }
        Ok(write_frame(s, Kind::Data, b"")?)
    })?;
    answer(stream).map(drop)
}

pub fn close_stdin<S: Read + Write>(
    stream: &mut S,
    target: &ProcessRef,
) -> Result<(), ClientError> {
    call(stream, Kind::CloseStdin, target).map(drop)
}

pub fn resize<S: Read + Write>(
    stream: &mut S,
    target: &ProcessRef,
    cols: u16,
    rows: u16,
) -> Result<(), ClientError> {
    let req = ResizeRequest {
        target: target.clone(),
        cols,
        rows,
    };
    call(stream, Kind::Resize, &req).map(drop)
}

/// Writes `content` to `req.path` atomically; returns the bytes written.
pub fn write_file<S: Read + Write>(
    stream: &mut S,
    req: &FileRequest,
    content: impl Read,
) -> Result<u64, ClientError> {
    write_file_info(stream, req, content).map(|(n, _)| n)
}

/// [`write_file`], with the written file's info (None from agents before protocol 3).
pub fn write_file_info<S: Read + Write>(
    stream: &mut S,
    req: &FileRequest,
    mut content: impl Read,
) -> Result<(u64, Option<FileInfo>), ClientError> {
    let mut total = 0u64;
    send_request(stream, |s| {
        write_json(s, Kind::WriteFile, req)?;
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The request is cut off (the caller drops the connection): the agent drops
                // the partial file.
                Err(e) => return Err(ClientError::Local(e)),
            };
            write_frame(s, Kind::Data, &buf[..n])?;
            total += n as u64;
        }
        Ok(write_frame(s, Kind::Data, b"")?)
    })?;
    let d = answer(stream)?;
    let info = if d.is_empty() {
        None
    } else {
        Some(parse_json(Kind::Ok, &d)?)
    };
    Ok((total, info))
}

/// Reads `path` into `out`; returns the bytes read.
pub fn read_file<S: Read + Write>(
    stream: &mut S,
    path: &str,
    mut out: impl Write,
) -> Result<u64, ClientError> {
    let req = FileRequest {
        path: path.into(),
        ..Default::default()
    };
    write_json(stream, Kind::ReadFile, &req)?;
    let mut total = 0u64;
    loop {
        match read_frame(stream)?.ok_or(ClientError::Closed)? {
            (Kind::Data, d) if d.is_empty() => return Ok(total),
            (Kind::Data, d) => {
                out.write_all(&d).map_err(ClientError::Local)?;
                total += d.len() as u64;
            }
            (Kind::Error, d) => return Err(agent_error(&d)),
            (k, _) => return Err(ProtocolError::Unexpected(k).into()),
        }
    }
}

fn path_req(path: &str) -> PathRequest {
    PathRequest { path: path.into() }
}

pub fn stat<S: Read + Write>(stream: &mut S, path: &str) -> Result<FileInfo, ClientError> {
    call_json(stream, Kind::Stat, &path_req(path))
}

/// The entries up to `depth` levels below `path` (1: its children), sorted by path.
pub fn list_dir<S: Read + Write>(
    stream: &mut S,
    path: &str,
    depth: u32,
) -> Result<Vec<FileInfo>, ClientError> {
    let req = ListDirRequest {
        path: path.into(),
        depth,
        limit: 0,
        after: None,
    };
    call_json(stream, Kind::ListDir, &req)
}

/// One page of the directory `path`: at most `limit` children whose name sorts after
/// `after` (see [`ListDirRequest`]); an empty page ends the listing.
pub fn list_dir_page<S: Read + Write>(
    stream: &mut S,
    path: &str,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<FileInfo>, ClientError> {
    let req = ListDirRequest {
        path: path.into(),
        depth: 1,
        limit: limit.max(1),
        after: after.map(str::to_string),
    };
    call_json(stream, Kind::ListDir, &req)
}

/// A regular file's content as a reader (`regular_only`, see [`FileRequest`]), at most `limit`
/// bytes: what the agent sends past them is not read (the connection is dropped with the
/// reader), so a file that grows meanwhile, or an agent that never stops, costs no more. The
/// agent's refusal comes back here, before any content.
pub fn open_file<S: Read + Write>(
    mut stream: S,
    path: &str,
    limit: u64,
) -> Result<FileReader<S>, ClientError> {
    let req = FileRequest {
        path: path.into(),
        regular_only: true,
        ..Default::default()
    };
    write_json(&mut stream, Kind::ReadFile, &req)?;
    let mut r = FileReader {
        stream,
        buf: Vec::new(),
        at: 0,
        left: limit,
        done: false,
    };
    r.next_frame()?;
    Ok(r)
}

/// See [`open_file`].
pub struct FileReader<S> {
    stream: S,
    buf: Vec<u8>,
    at: usize,
    left: u64,
    done: bool,
}

impl<S: Read> FileReader<S> {
    fn next_frame(&mut self) -> Result<(), ClientError> {
        match read_frame(&mut self.stream)?.ok_or(ClientError::Closed)? {
            (Kind::Data, d) if d.is_empty() => self.done = true,
            (Kind::Data, mut d) => {
                let keep = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(d.len());
                d.truncate(keep);
                self.left -= keep as u64;
                self.buf = d;
                self.at = 0;
            }
            (Kind::Error, d) => return Err(agent_error(&d)),
            (k, _) => return Err(ProtocolError::Unexpected(k).into()),
        }
        Ok(())
    }
}

impl<S: Read> Read for FileReader<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            if self.done || self.left == 0 {
                return Ok(0);
            }
            self.next_frame().map_err(io::Error::other)?;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// `mkdir -p`; false if `path` was a directory already.
pub fn make_dir<S: Read + Write>(stream: &mut S, path: &str) -> Result<bool, ClientError> {
    let req = MakeDirRequest {
        path: path.into(),
        mode: None,
    };
    let r: MakeDirReply = call_json(stream, Kind::MakeDir, &req)?;
    Ok(r.created)
}

pub fn rename<S: Read + Write>(
    stream: &mut S,
    from: &str,
    to: &str,
) -> Result<FileInfo, ClientError> {
    let req = RenameRequest {
        from: from.into(),
        to: to.into(),
    };
    call_json(stream, Kind::Rename, &req)
}

/// Concatenates `req.sources` into `req.destination` and removes them (protocol 3).
pub fn compose<S: Read + Write>(
    stream: &mut S,
    req: &ComposeRequest,
) -> Result<FileInfo, ClientError> {
    call_json(stream, Kind::Compose, req)
}

/// Makes a directory or symlink as `req` says (protocol 3 agents of this kiln).
pub fn set_node<S: Read + Write>(stream: &mut S, req: &NodeRequest) -> Result<(), ClientError> {
    call(stream, Kind::SetNode, req).map(drop)
}

/// Removes a file, or a directory recursively.
pub fn remove<S: Read + Write>(stream: &mut S, path: &str) -> Result<(), ClientError> {
    call(stream, Kind::Remove, &path_req(path)).map(drop)
}

/// Watches a directory, passing each event to `on_event` until it returns false; the
/// connection is then dropped, which ends the watch in the agent.
pub fn watch_dir<S: Read + Write>(
    mut stream: S,
    path: &str,
    recursive: bool,
    mut on_event: impl FnMut(Event) -> bool,
) -> Result<(), ClientError> {
    let req = WatchRequest {
        path: path.into(),
        recursive,
        include_entry: false,
        allow_network_mounts: false,
    };
    call(&mut stream, Kind::WatchDir, &req)?;
    loop {
        match read_frame(&mut stream)?.ok_or(ClientError::Closed)? {
            (Kind::Event, d) => {
                if !on_event(parse_json(Kind::Event, &d)?) {
                    return Ok(());
                }
            }
            (Kind::Error, d) => return Err(agent_error(&d)),
            (k, _) => return Err(ProtocolError::Unexpected(k).into()),
        }
    }
}

/// Connects the stream to TCP `127.0.0.1:port` inside the sandbox; the returned stream then
/// carries raw bytes both ways (shut down writes to pass on an end of stream).
pub fn dial<S: Read + Write>(stream: S, port: u16) -> Result<S, ClientError> {
    dial_host(stream, "127.0.0.1", port)
}

/// [`dial`] to another address (as the sandbox resolves `host`).
pub fn dial_host<S: Read + Write>(mut stream: S, host: &str, port: u16) -> Result<S, ClientError> {
    let req = DialRequest {
        port,
        host: host.into(),
    };
    call(&mut stream, Kind::Dial, &req)?;
    Ok(stream)
}

pub fn health<S: Read + Write>(stream: &mut S) -> Result<HealthInfo, ClientError> {
    call_json(stream, Kind::Health, &serde_json::json!({}))
}

/// Asks the agent to close its listener and connections before a checkpoint; returns once it
/// has (and closed this connection too).
pub fn quiesce<S: Read + Write>(stream: &mut S) -> Result<(), ClientError> {
    call(stream, Kind::Quiesce, &serde_json::json!({}))?;
    // The agent closes its end right after its answer: wait for that, so no connection of
    // ours is open when the checkpoint starts.
    let mut rest = [0u8; 64];
    while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
    Ok(())
}

/// Tells the agent the VM's new generation (after a restore or fork).
pub fn set_generation<S: Read + Write>(
    stream: &mut S,
    req: &GenerationRequest,
) -> Result<GenerationReply, ClientError> {
    call_json(stream, Kind::Generation, req)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted agent: reads come from `input`, writes go to `output`.
    struct Fake {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn fake(frames: &[(Kind, &[u8])]) -> Fake {
        let mut input = Vec::new();
        for (k, p) in frames {
            write_frame(&mut input, *k, p).unwrap();
        }
        Fake {
            input: io::Cursor::new(input),
            output: Vec::new(),
        }
    }

    #[test]
    fn exec_skips_started_and_reads_old_and_new_errors() {
        let mut s = fake(&[
            (Kind::Started, br#"{"pid":42}"#),
            (Kind::Stdout, b"hi"),
            (Kind::Exit, br#"{"code":0,"signal":null}"#),
        ]);
        let out = exec(&mut s, &ExecRequest::default(), b"in", |_, _| {}).unwrap();
        assert_eq!(
            (out.stdout.as_slice(), out.status.code),
            (&b"hi"[..], Some(0))
        );
        // Exec, one stdin frame, the empty one.
        let mut w = &s.output[..];
        let kinds: Vec<Kind> = std::iter::from_fn(|| read_frame(&mut w).unwrap())
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kinds, [Kind::Exec, Kind::Stdin, Kind::Stdin]);

        let mut s = fake(&[(Kind::Error, b"plain old message")]);
        let e = stat(&mut s, "/x").unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::Other));
        assert_eq!(e.to_string(), "agent: plain old message");
        let mut s = fake(&[(
            Kind::Error,
            br#"{"kind":"not_found","message":"not found: /x"}"#,
        )]);
        let e = stat(&mut s, "/x").unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::NotFound));
        assert!(matches!(fake(&[]).input.read(&mut [0]), Ok(0)));
    }

    #[test]
    fn a_failing_local_reader_does_not_wait_for_the_agent() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        // No frames to read: waiting for an answer would fail with Closed, not Local.
        let mut s = fake(&[]);
        let req = FileRequest {
            path: "/x".into(),
            ..Default::default()
        };
        let e = write_file(&mut s, &req, Broken).unwrap_err();
        assert!(matches!(e, ClientError::Local(_)), "{e}");
    }
}
