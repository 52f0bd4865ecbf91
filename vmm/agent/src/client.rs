//! Host side of the agent protocol.

use crate::protocol::*;
use std::io::{Read, Write};

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
    #[error("agent: {0}")]
    Agent(String),
    #[error("agent closed the connection early")]
    Closed,
}

fn agent_error(data: &[u8]) -> ClientError {
    ClientError::Agent(String::from_utf8_lossy(data).into_owned())
}

/// Sends a request's frames. The agent may refuse a request before reading all of it and close
/// the connection; the write then fails (EPIPE), and the agent's error frame is the answer.
fn send_request<S: Read + Write>(
    stream: &mut S,
    send: impl FnOnce(&mut S) -> Result<(), ProtocolError>,
) -> Result<(), ClientError> {
    match send(stream) {
        Ok(()) => Ok(()),
        Err(e) => match read_frame(stream) {
            Ok(Some((Kind::Error, data))) => Err(agent_error(&data)),
            _ => Err(e.into()),
        },
    }
}

/// Runs a command over a fresh connection, feeding `stdin` and collecting the output.
/// `on_output` sees each chunk as it arrives (kind is `Stdout` or `Stderr`).
pub fn exec<S: Read + Write>(
    stream: &mut S,
    req: &ExecRequest,
    stdin: &[u8],
    mut on_output: impl FnMut(Kind, &[u8]),
) -> Result<ExecOutput, ClientError> {
    send_request(stream, |s| {
        write_json(s, Kind::Exec, req)?;
        for chunk in stdin.chunks(MAX_FRAME) {
            write_frame(s, Kind::Stdin, chunk)?;
        }
        write_frame(s, Kind::Stdin, b"")
    })?;
    let mut out = ExecOutput {
        stdout: Vec::new(),
        stderr: Vec::new(),
        status: ExitStatus {
            code: None,
            signal: None,
        },
    };
    loop {
        let (kind, data) = read_frame(stream)?.ok_or(ClientError::Closed)?;
        match kind {
            Kind::Stdout => out.stdout.extend_from_slice(&data),
            Kind::Stderr => out.stderr.extend_from_slice(&data),
            Kind::Exit => {
                out.status = parse_json(kind, &data)?;
                return Ok(out);
            }
            Kind::Error => return Err(agent_error(&data)),
            k => return Err(ProtocolError::Unexpected(k).into()),
        }
        on_output(kind, &data);
    }
}

pub fn write_file<S: Read + Write>(
    stream: &mut S,
    path: &str,
    mode: u32,
    content: &[u8],
) -> Result<(), ClientError> {
    send_request(stream, |s| {
        let req = FileRequest {
            path: path.into(),
            mode: Some(mode),
        };
        write_json(s, Kind::WriteFile, &req)?;
        for chunk in content.chunks(MAX_FRAME) {
            write_frame(s, Kind::Data, chunk)?;
        }
        write_frame(s, Kind::Data, b"")
    })?;
    match read_frame(stream)?.ok_or(ClientError::Closed)? {
        (Kind::Ok, _) => Ok(()),
        (Kind::Error, d) => Err(agent_error(&d)),
        (k, _) => Err(ProtocolError::Unexpected(k).into()),
    }
}

pub fn read_file<S: Read + Write>(stream: &mut S, path: &str) -> Result<Vec<u8>, ClientError> {
    write_json(
        stream,
        Kind::ReadFile,
        &FileRequest {
            path: path.into(),
            mode: None,
        },
    )?;
    let mut content = Vec::new();
    loop {
        match read_frame(stream)?.ok_or(ClientError::Closed)? {
            (Kind::Data, d) if d.is_empty() => return Ok(content),
            (Kind::Data, d) => content.extend_from_slice(&d),
            (Kind::Error, d) => return Err(agent_error(&d)),
            (k, _) => return Err(ProtocolError::Unexpected(k).into()),
        }
    }
}
