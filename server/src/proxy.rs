//! Ports other than envd's, proxied into the sandbox through the agent: each request gets a
//! fresh TCP connection to `127.0.0.1:port` inside the sandbox (the agent's `Dial`), HTTP/1.1
//! over it; an upgrade (WebSocket and the like) becomes a raw byte pipe both ways. A port
//! nothing listens on is answered as E2B's proxy does: 502 "... port is not open ...".
//!
//! Requests keep their Host, or get the sandbox's `maskRequestHost` (`${PORT}` replaced by
//! the port; the original Host then in `X-Forwarded-Host`, as E2B's proxy does). Header names
//! keep the case they were sent in, both ways: the daemon's HTTP/1 server records it
//! ([`crate::serve`]) and the client here writes it back (hyper's `preserve_header_case`),
//! which hyper would otherwise lower-case.

use crate::envd::agent;
use crate::AppState;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use std::sync::Arc;

pub async fn handle(
    state: Arc<AppState>,
    sandbox_id: String,
    port: u16,
    mask_request_host: Option<String>,
    mut req: Request,
) -> Response {
    if let Some(mask) = mask_request_host {
        let masked = mask.replace("${PORT}", &port.to_string());
        if let Ok(v) = HeaderValue::from_str(&masked) {
            if let Some(original) = req.headers_mut().insert(header::HOST, v) {
                req.headers_mut().insert("x-forwarded-host", original);
            }
        }
    }
    let sandboxes = state.sandboxes.clone();
    let id = sandbox_id.clone();
    let dialed = tokio::task::spawn_blocking(move || sandboxes.dial(&id, port)).await;
    let stream = match dialed {
        Ok(Ok(s)) => s,
        Ok(Err(kiln_runtime::Error::Agent(e))) => {
            let body = serde_json::json!({
                "sandboxId": sandbox_id,
                "port": port,
                "code": 502,
                "message": format!("The sandbox is running but port is not open ({e})"),
            });
            return (
                StatusCode::BAD_GATEWAY,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response();
        }
        Ok(Err(e)) => return agent::from_runtime(&sandbox_id, e).unary(),
        Err(e) => return agent::json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => return agent::json_error(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    match send(stream, req).await {
        Ok(resp) => resp,
        Err(SendError::Handshake(e)) => {
            agent::json_error(StatusCode::BAD_GATEWAY, &format!("proxy: {e}"))
        }
        Err(SendError::Send(e)) => agent::json_error(
            StatusCode::BAD_GATEWAY,
            &format!("proxy: the sandbox's port {port} answered badly: {e}"),
        ),
    }
}

/// Why [`send`] got no answer.
pub(crate) enum SendError {
    Handshake(hyper::Error),
    Send(hyper::Error),
}

/// Sends `req` as HTTP/1.1 over `io` (header case kept) and returns the answer, its body
/// streamed; an upgrade (101) becomes a byte pipe between the client and `io`'s peer. Shared
/// by the port proxy and cluster mode's forwarding to a sandbox's owner ([`crate::cluster`]).
pub(crate) async fn send<S>(io: S, mut req: Request) -> Result<Response, SendError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Handshake)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let client_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let mut resp = sender.send_request(req).await.map_err(SendError::Send)?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_up) = client_upgrade {
            let server_up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(s)) = (client_up.await, server_up.await) {
                    let mut c = TokioIo::new(c);
                    let mut s = TokioIo::new(s);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
            });
        }
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}
