//! Server streams: a blocking producer (an agent connection read on its own thread) sends
//! messages; a tokio task frames them as connect envelopes, adds keepalives when the stream
//! is quiet (the `Keepalive-Ping-Interval` header, in seconds, as envd reads it) and ends the
//! stream at the deadline (`Connect-Timeout-Ms`). When the client goes away the agent
//! connection is shut down, which ends the producer.

use super::connect::{self, Code, RpcError};
use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use std::convert::Infallible;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// envd's keepalive interval when the client names none.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// What a producer sends.
pub enum Msg {
    Event(serde_json::Value),
    End(Option<RpcError>),
}

/// The producer's side.
#[derive(Clone)]
pub struct Sink(pub mpsc::Sender<Msg>);

impl Sink {
    /// Sends one message from a blocking thread; false once the stream is gone.
    pub fn send(&self, m: Msg) -> bool {
        self.0.blocking_send(m).is_ok()
    }
}

pub fn channel() -> (Sink, mpsc::Receiver<Msg>) {
    let (tx, rx) = mpsc::channel(64);
    (Sink(tx), rx)
}

pub fn keepalive_interval(h: &HeaderMap) -> Duration {
    h.get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_KEEPALIVE)
}

/// The call's deadline (`Connect-Timeout-Ms`; absent or 0: none).
pub fn timeout(h: &HeaderMap) -> Result<Option<Duration>, RpcError> {
    match h
        .get("connect-timeout-ms")
        .map(|v| v.to_str().unwrap_or("x"))
    {
        None => Ok(None),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(0) => Ok(None),
            Ok(ms) => Ok(Some(Duration::from_millis(ms))),
            Err(_) => Err(RpcError::new(
                Code::InvalidArgument,
                format!("invalid Connect-Timeout-Ms {v:?}"),
            )),
        },
    }
}

/// How a stream is driven.
pub struct Pump {
    pub keepalive: Duration,
    pub keepalive_msg: serde_json::Value,
    pub deadline: Option<Duration>,
    /// Run when the deadline passes (envd kills a started process then).
    pub on_deadline: Option<Box<dyn FnOnce() + Send>>,
    /// Shut down when the client goes away or the stream ends early.
    pub abort: Option<UnixStream>,
}

impl Pump {
    /// The streaming response: `first` (already received from the producer), then the rest.
    pub fn respond(
        mut self,
        first: Vec<serde_json::Value>,
        mut rx: mpsc::Receiver<Msg>,
    ) -> Response {
        let (btx, brx) = mpsc::channel::<Bytes>(16);
        tokio::spawn(async move {
            let deadline = self.deadline.map(|d| Instant::now() + d);
            let mut ended = false;
            for m in &first {
                if btx.send(connect::message(m)).await.is_err() {
                    self.shutdown();
                    return;
                }
            }
            let mut quiet_until = Instant::now() + self.keepalive;
            loop {
                let far = Instant::now() + Duration::from_secs(86_400 * 365);
                let out = tokio::select! {
                    m = rx.recv() => match m {
                        Some(Msg::Event(v)) => {
                            quiet_until = Instant::now() + self.keepalive;
                            connect::message(&v)
                        }
                        Some(Msg::End(e)) => {
                            ended = true;
                            connect::end_stream(e.as_ref())
                        }
                        None => {
                            ended = true;
                            connect::end_stream(Some(&RpcError::new(
                                Code::Unknown,
                                "the stream ended without its end event",
                            )))
                        }
                    },
                    _ = tokio::time::sleep_until(quiet_until) => {
                        quiet_until = Instant::now() + self.keepalive;
                        connect::message(&self.keepalive_msg)
                    }
                    _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => {
                        if let Some(f) = self.on_deadline.take() {
                            tokio::task::spawn_blocking(f);
                        }
                        ended = true;
                        connect::end_stream(Some(&RpcError::new(
                            Code::DeadlineExceeded,
                            "the operation timed out",
                        )))
                    }
                    _ = btx.closed() => {
                        self.shutdown();
                        return;
                    }
                };
                if btx.send(out).await.is_err() || ended {
                    self.shutdown();
                    return;
                }
            }
        });
        connect::stream_response(body_of(brx))
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.abort.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A response body fed by a channel.
pub fn body_of(rx: mpsc::Receiver<Bytes>) -> Body {
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Body::from_stream(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_as_envd_reads_them() {
        let mut h = HeaderMap::new();
        assert_eq!(keepalive_interval(&h), DEFAULT_KEEPALIVE);
        assert_eq!(timeout(&h).unwrap(), None);
        h.insert("Keepalive-Ping-Interval", "50".parse().unwrap());
        h.insert("Connect-Timeout-Ms", "1500".parse().unwrap());
        assert_eq!(keepalive_interval(&h), Duration::from_secs(50));
        assert_eq!(timeout(&h).unwrap(), Some(Duration::from_millis(1500)));
        h.insert("Connect-Timeout-Ms", "0".parse().unwrap());
        assert_eq!(timeout(&h).unwrap(), None);
        h.insert("Connect-Timeout-Ms", "soon".parse().unwrap());
        assert_eq!(timeout(&h).unwrap_err().code, Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_stream_frames_events_keepalives_and_its_end() {
        use http_body_util::BodyExt;
        let (sink, rx) = channel();
        let pump = Pump {
            keepalive: Duration::from_millis(30),
            keepalive_msg: serde_json::json!({"event": {"keepalive": {}}}),
            deadline: None,
            on_deadline: None,
            abort: None,
        };
        let resp = pump.respond(vec![serde_json::json!({"n": 0})], rx);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            sink.send(Msg::Event(serde_json::json!({"n": 1})));
            sink.send(Msg::End(None));
        });
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let mut r = connect::EnvelopeReader::default();
        r.push(&body);
        let mut msgs = Vec::new();
        while let Some((flags, p)) = r.next_envelope().unwrap() {
            msgs.push((flags, String::from_utf8(p.to_vec()).unwrap()));
        }
        assert_eq!(msgs.first().unwrap().1, r#"{"n":0}"#);
        assert!(msgs.iter().any(|m| m.1.contains("keepalive")), "{msgs:?}");
        assert_eq!(msgs[msgs.len() - 2].1, r#"{"n":1}"#);
        assert_eq!(
            msgs.last().unwrap(),
            &(connect::END_STREAM, "{}".to_string())
        );
    }
}
