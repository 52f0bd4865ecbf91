//! The agent's wire protocol: length-prefixed frames over one stream (vsock in a guest, a Unix
//! socket in tests).
//!
//! Frame: `u32` little-endian payload length, one kind byte, the payload. Control payloads are
//! JSON; data payloads are raw bytes. A connection carries one request:
//!
//! - exec: client sends `Exec` (JSON [`ExecRequest`]), then any number of `Stdin` frames, an
//!   empty `Stdin` frame meaning end of input. The agent streams `Stdout` / `Stderr` frames as
//!   output appears and ends with `Exit` (JSON [`ExitStatus`]) or `Error` (UTF-8 message).
//! - write file: `WriteFile` (JSON [`FileRequest`]) then `Data` frames, an empty one ending the
//!   content; the agent answers `Ok` or `Error`. The file appears atomically (temp + rename).
//! - read file: `ReadFile` (JSON [`FileRequest`]); the agent answers `Data` frames, an empty one
//!   ending the content, or `Error`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

/// Largest frame payload accepted (bigger transfers are split into several frames).
pub const MAX_FRAME: usize = 1 << 20;
/// vsock port the agent listens on inside a guest.
pub const AGENT_PORT: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Exec = b'E',
    Stdin = b'I',
    Stdout = b'O',
    Stderr = b'R',
    Exit = b'X',
    WriteFile = b'W',
    ReadFile = b'F',
    Data = b'D',
    Ok = b'K',
    Error = b'!',
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Exec, Stdin, Stdout, Stderr, Exit, WriteFile, ReadFile, Data, Ok, Error,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in PATH if it has no slash.
    pub argv: Vec<String>,
    /// Environment (replaces the agent's, except PATH which defaults to a standard one).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, if the process exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRequest {
    pub path: String,
    /// Permission bits for WriteFile (default 0644).
    #[serde(default)]
    pub mode: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0:#04x}")]
    BadKind(u8),
    #[error("bad JSON in {0:?} frame: {1}")]
    Json(Kind, serde_json::Error),
    #[error("unexpected {0:?} frame")]
    Unexpected(Kind),
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    if payload.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(payload.len()));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[4] = kind as u8;
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

pub fn write_json<T: Serialize>(
    w: &mut impl Write,
    kind: Kind,
    v: &T,
) -> Result<(), ProtocolError> {
    let bytes = serde_json::to_vec(v).map_err(|e| ProtocolError::Json(kind, e))?;
    write_frame(w, kind, &bytes)
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read) -> Result<Option<(Kind, Vec<u8>)>, ProtocolError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    // Checked after the payload is consumed, so the peer can still read our error reply.
    let kind = Kind::from_byte(head[4]).ok_or(ProtocolError::BadKind(head[4]))?;
    Ok(Some((kind, payload)))
}

pub fn parse_json<T: for<'de> Deserialize<'de>>(
    kind: Kind,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Json(kind, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello").unwrap();
        write_json(
            &mut buf,
            Kind::Exit,
            &ExitStatus {
                code: Some(3),
                signal: None,
            },
        )
        .unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((Kind::Stdout, b"hello".to_vec()))
        );
        let (k, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(parse_json::<ExitStatus>(k, &p).unwrap().code, Some(3));
        assert!(read_frame(&mut r).unwrap().is_none());

        let mut bad = &[5u8, 0, 0, 0, b'?', 1, 2, 3, 4, 5][..];
        assert!(matches!(
            read_frame(&mut bad),
            Err(ProtocolError::BadKind(b'?'))
        ));
        let mut huge = &[0xff, 0xff, 0xff, 0x7f, b'D'][..];
        assert!(matches!(
            read_frame(&mut huge),
            Err(ProtocolError::TooLarge(_))
        ));
        let mut cut = &[9u8, 0, 0, 0, b'D', 1][..];
        assert!(matches!(read_frame(&mut cut), Err(ProtocolError::Io(_))));
        assert!(write_frame(&mut Vec::new(), Kind::Data, &vec![0; MAX_FRAME + 1]).is_err());
    }
}
