//! `Dial`: a TCP connection inside the sandbox, spliced to the agent connection.

use super::{shutdown, Conn, Res};
use crate::protocol::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

fn connect(host: &str, port: u16) -> Res<TcpStream> {
    let addrs = (host, port).to_socket_addrs().map_err(|e| {
        super::Fail(ErrorReply::new(
            ErrorKind::Invalid,
            format!("dial {host}:{port}: {e}"),
        ))
    })?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, DIAL_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound));
    let message = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => format!("connection refused: {host}:{port}"),
        _ => format!("dial {host}:{port}: {e}"),
    };
    Err(super::Fail(ErrorReply::new(ErrorKind::of_io(&e), message)))
}

/// Copies `from` to `to` until the end of `from`, then shuts down writes with `done`.
fn copy(mut from: impl Read, mut to: impl Write, done: impl FnOnce()) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done();
}

pub fn dial(req: DialRequest, c: &Conn) -> Res<()> {
    let tcp = connect(&req.host, req.port)?;
    let _ = tcp.set_nodelay(true);
    super::send(c, Kind::Ok, b"")?;
    let tcp2 = tcp.try_clone().map_err(|e| super::io_fail("dup", e))?;
    let c2 = c.clone();
    let up = std::thread::spawn(move || {
        copy(&*c2, &tcp2, || {
            let _ = tcp2.shutdown(Shutdown::Write);
        })
    });
    copy(&tcp, &**c, || shutdown(c, libc::SHUT_WR));
    let _ = up.join();
    Ok(())
}
