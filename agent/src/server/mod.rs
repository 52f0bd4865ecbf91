//! Serving one connection: the first frame names the request (see [`crate::protocol`]), a
//! handler in [`process`], [`files`], [`watch`], [`ports`] or [`lifecycle`] serves it.

mod files;
mod lifecycle;
mod ports;
mod process;
pub mod quiesce;
mod watch;
mod xattr;

use crate::protocol::*;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

pub use lifecycle::init;
pub use process::start_reaper;

/// A handler's failure, sent to the client as an `Error` frame.
#[derive(Debug)]
pub(crate) struct Fail(pub ErrorReply);

impl From<ProtocolError> for Fail {
    fn from(e: ProtocolError) -> Fail {
        let kind = match e {
            ProtocolError::Io(_) => ErrorKind::Other,
            _ => ErrorKind::Invalid,
        };
        Fail(ErrorReply::new(kind, e.to_string()))
    }
}

pub(crate) type Res<T> = Result<T, Fail>;

pub(crate) fn fail<T>(kind: ErrorKind, message: impl Into<String>) -> Res<T> {
    Err(Fail(ErrorReply::new(kind, message)))
}

pub(crate) fn io_fail(what: &str, e: std::io::Error) -> Fail {
    Fail(ErrorReply::io(what, &e))
}

/// A connection, shared by the threads serving it (`&File` reads and writes).
pub(crate) type Conn = Arc<File>;

pub(crate) fn send(c: &Conn, kind: Kind, payload: &[u8]) -> Res<()> {
    Ok(write_frame(&mut &**c, kind, payload)?)
}

pub(crate) fn send_json<T: serde::Serialize>(c: &Conn, kind: Kind, v: &T) -> Res<()> {
    Ok(write_json(&mut &**c, kind, v)?)
}

pub(crate) fn shutdown(c: &File, how: libc::c_int) {
    // SAFETY: shutdown(2) on a descriptor we own; errors (not a socket) are harmless.
    unsafe { libc::shutdown(c.as_raw_fd(), how) };
}

/// Serves one request on a connection (a connected Unix or vsock socket). Errors are reported
/// to the client when possible; the result is an error only if the request could not be read.
pub fn serve(conn: OwnedFd) -> Result<(), ProtocolError> {
    serve_accepted(conn, quiesce::epoch())
}

/// [`serve`] for a connection accepted when [`quiesce::epoch`] was `epoch` (taken by the
/// accept loop, before the connection's thread may run late).
pub fn serve_accepted(conn: OwnedFd, epoch: u64) -> Result<(), ProtocolError> {
    let c: Conn = Arc::new(File::from(conn));
    quiesce::track(&c);
    let (r, answer) = match read_frame(&mut &*c) {
        Ok(None) => return Ok(()),
        Ok(Some((kind, payload))) => (Ok(()), dispatch(kind, &payload, &c, epoch)),
        Err(e) => (
            Err(ProtocolError::Io(std::io::Error::other(e.to_string()))),
            Err(e.into()),
        ),
    };
    if let Err(Fail(e)) = answer {
        let _ = send_json(&c, Kind::Error, &e);
    }
    // The answer is complete: the client sees the end of the stream (threads still reading the
    // connection, e.g. an exec's stdin, end when the client closes it).
    shutdown(&c, libc::SHUT_WR);
    r
}

fn dispatch(kind: Kind, p: &[u8], c: &Conn, epoch: u64) -> Res<()> {
    match kind {
        Kind::Exec => process::exec(parse_json(kind, p)?, c),
        Kind::Connect => process::connect(parse_json(kind, p)?, c),
        Kind::List => send_json(c, Kind::Ok, &process::list()),
        Kind::Signal => process::signal(parse_json(kind, p)?, c),
        Kind::SendStdin => process::send_stdin(parse_json(kind, p)?, c),
        Kind::CloseStdin => process::close_stdin(parse_json(kind, p)?, c),
        Kind::Resize => process::resize(parse_json(kind, p)?, c),
        Kind::WriteFile => files::write_file(parse_json(kind, p)?, c),
        Kind::ReadFile => files::read_file(parse_json(kind, p)?, c),
        Kind::Stat => files::stat(parse_json(kind, p)?, c),
        Kind::ListDir => files::list_dir(parse_json(kind, p)?, c),
        Kind::MakeDir => files::make_dir(parse_json(kind, p)?, c),
        Kind::Rename => files::rename(parse_json(kind, p)?, c),
        Kind::Remove => files::remove(parse_json(kind, p)?, c),
        Kind::Compose => files::compose(parse_json(kind, p)?, c),
        Kind::SetNode => files::set_node(parse_json(kind, p)?, c),
        Kind::WatchDir => watch::watch_dir(parse_json(kind, p)?, c),
        Kind::Dial => ports::dial(parse_json(kind, p)?, c),
        Kind::Health => send_json(c, Kind::Ok, &lifecycle::health()),
        Kind::Generation => lifecycle::generation(parse_json(kind, p)?, c),
        Kind::Quiesce => quiesce::quiesce(c, epoch),
        k => Err(ProtocolError::Unexpected(k).into()),
    }
}

/// Reads the connection on a thread of its own, passing every frame to `on_frame`, until the
/// client closes it (or it fails); then calls `on_close`.
pub(crate) fn watch_conn(
    c: &Conn,
    mut on_frame: impl FnMut(Kind, &[u8]) + Send + 'static,
    on_close: impl FnOnce() + Send + 'static,
) {
    let c = c.clone();
    std::thread::spawn(move || {
        while let Ok(Some((kind, data))) = read_frame(&mut &*c) {
            on_frame(kind, &data);
        }
        on_close();
    });
}

/// Reads `Data` frames up to the empty one that ends them, passing each to `sink` with `target`.
/// After a failure (or with an `Err` target) the rest is read and dropped, so that the client,
/// still sending, then reads the error instead of a broken pipe.
pub(crate) fn read_data<T>(
    c: &Conn,
    target: Res<T>,
    mut sink: impl FnMut(&mut T, &[u8]) -> Res<()>,
) -> Res<T> {
    let mut state = target;
    loop {
        let (kind, data) = read_frame(&mut &**c)?.ok_or_else(|| {
            Fail(ErrorReply::new(
                ErrorKind::Invalid,
                "connection closed before the end of the data",
            ))
        })?;
        if kind != Kind::Data {
            return fail(
                ErrorKind::Invalid,
                format!("unexpected {kind:?} frame in data"),
            );
        }
        if data.is_empty() {
            return state;
        }
        if let Ok(t) = &mut state {
            if let Err(e) = sink(t, &data) {
                state = Err(e);
            }
        }
    }
}
