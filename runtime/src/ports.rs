//! Port forwarding: a host TCP connection carried to a TCP port inside a sandbox through its
//! agent (`Dial`), so a server in the sandbox is reachable without a network device.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;

/// Copies bytes both ways until both directions ended; each end of stream is passed on as a
/// shutdown of writes, so half-closed protocols (HTTP/1.0 requests, `nc -q`) work.
pub fn splice(tcp: TcpStream, agent: UnixStream) -> std::io::Result<()> {
    let (mut tcp_r, mut agent_w) = (tcp.try_clone()?, agent.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = copy(&mut tcp_r, &mut agent_w);
        let _ = agent_w.shutdown(Shutdown::Write);
    });
    let (mut agent_r, mut tcp_w) = (agent, tcp);
    let _ = copy(&mut agent_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

fn copy(r: &mut impl Read, w: &mut impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Serves `listener` forever: each accepted connection is spliced to a fresh agent
/// connection from `dial` (on a thread of its own). A failing dial closes that connection
/// and is reported to `on_error`.
pub fn forward(
    listener: TcpListener,
    dial: impl Fn() -> crate::Result<UnixStream> + Send + Sync + 'static,
    on_error: impl Fn(&crate::Error) + Send + Sync + 'static,
) -> std::io::Result<()> {
    let dial = std::sync::Arc::new(dial);
    let on_error = std::sync::Arc::new(on_error);
    for conn in listener.incoming() {
        let tcp = conn?;
        let (dial, on_error) = (dial.clone(), on_error.clone());
        std::thread::spawn(move || match dial() {
            Ok(agent) => {
                let _ = splice(tcp, agent);
            }
            Err(e) => on_error(&e),
        });
    }
    Ok(())
}
