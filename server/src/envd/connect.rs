//! The connect protocol (connectrpc.com/docs/protocol) as envd speaks it, JSON codec only:
//! unary calls (`application/json` bodies, errors as an HTTP status plus `{code, message}`)
//! and streams (`application/connect+json`: envelopes of a flags byte, a big-endian `u32`
//! length and the message; the last one has flag [`END_STREAM`] and carries `{}` or
//! `{"error": {code, message}}`, the HTTP status staying 200).

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Envelope flag: the payload is compressed (we never compress and refuse compressed input).
pub const COMPRESSED: u8 = 0x01;
/// Envelope flag: the end-of-stream message.
pub const END_STREAM: u8 = 0x02;
/// Largest request message accepted.
pub const MAX_MESSAGE: usize = 16 << 20;

pub const JSON: &str = "application/json";
pub const STREAM_JSON: &str = "application/connect+json";

/// Connect error codes (the gRPC set, by their connect names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code (the protocol's table).
    pub fn http_status(self) -> StatusCode {
        let n = match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        };
        StatusCode::from_u16(n).expect("valid status")
    }
}

/// An RPC's failure as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

/// A unary answer: the message as JSON.
pub fn unary_ok<T: Serialize>(msg: &T) -> Response {
    match serde_json::to_vec(msg) {
        Ok(body) => ([(header::CONTENT_TYPE, JSON)], body).into_response(),
        Err(e) => unary_error(&RpcError::new(Code::Internal, format!("encode: {e}"))),
    }
}

/// A unary error: its status and `{code, message}`.
pub fn unary_error(e: &RpcError) -> Response {
    let body = serde_json::to_vec(&e.json()).unwrap_or_default();
    (e.code.http_status(), [(header::CONTENT_TYPE, JSON)], body).into_response()
}

/// One envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[flags]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// A stream message envelope.
pub fn message<T: Serialize>(msg: &T) -> Bytes {
    envelope(
        0,
        &serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

/// The end-of-stream envelope: `{}` or `{"error": ...}`.
pub fn end_stream(err: Option<&RpcError>) -> Bytes {
    let body = match err {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({"error": e.json()}),
    };
    envelope(END_STREAM, &serde_json::to_vec(&body).unwrap_or_default())
}

/// A stream response (status 200) whose body is `body`.
pub fn stream_response(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_JSON));
    r
}

/// A stream that failed before its first message: just the end-of-stream error.
pub fn stream_error(e: &RpcError) -> Response {
    stream_response(Body::from(end_stream(Some(e))))
}

/// Reads envelopes out of a byte stream that arrives in pieces.
#[derive(Default)]
pub struct EnvelopeReader {
    buf: BytesMut,
}

impl EnvelopeReader {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete envelope `(flags, payload)`, if one is buffered.
    pub fn next_envelope(&mut self) -> Result<Option<(u8, Bytes)>, RpcError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_MESSAGE {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("message of {len} bytes exceeds the {MAX_MESSAGE}-byte limit"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let flags = self.buf[0];
        self.buf.advance(5);
        let payload = self.buf.split_to(len).freeze();
        if flags & COMPRESSED != 0 {
            return Err(RpcError::new(
                Code::Unimplemented,
                "compressed messages are not supported",
            ));
        }
        Ok(Some((flags, payload)))
    }

    /// Bytes left over that do not make a whole envelope.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Decodes a JSON message (an empty body is the empty message).
pub fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, RpcError> {
    let data = if data.is_empty() { &b"{}"[..] } else { data };
    serde_json::from_slice(data)
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("invalid request: {e}")))
}

/// The single request message of a server-streaming call, from its whole body.
pub fn decode_stream_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    let mut r = EnvelopeReader::default();
    r.push(body);
    match r.next_envelope()? {
        Some((flags, payload)) if flags & END_STREAM == 0 => decode(&payload),
        _ => Err(RpcError::new(
            Code::InvalidArgument,
            "stream request carries no message",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_in_pieces() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&message(&serde_json::json!({"a": 1})));
        wire.extend_from_slice(&end_stream(None));
        let mut r = EnvelopeReader::default();
        // Byte by byte: nothing is returned until an envelope is whole.
        let mut got = Vec::new();
        for b in &wire {
            r.push(&[*b]);
            while let Some(e) = r.next_envelope().unwrap() {
                got.push(e);
            }
        }
        assert_eq!(r.pending(), 0);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 0);
        assert_eq!(&got[0].1[..], br#"{"a":1}"#);
        assert_eq!(got[1].0, END_STREAM);
        assert_eq!(&got[1].1[..], b"{}");
        assert_eq!(&wire[..5], &[0, 0, 0, 0, 7]);
    }

    #[test]
    fn end_stream_carries_the_error_and_unary_errors_their_status() {
        let e = RpcError::new(Code::NotFound, "process with pid 7 not found");
        let b = end_stream(Some(&e));
        assert_eq!(b[0], END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&b[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "process with pid 7 not found");
        assert_eq!(unary_error(&e).status(), StatusCode::NOT_FOUND);
        assert_eq!(Code::AlreadyExists.http_status(), StatusCode::CONFLICT);
        assert_eq!(Code::Canceled.http_status().as_u16(), 499);
        assert_eq!(
            Code::Unauthenticated.http_status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn bad_envelopes_are_refused() {
        let mut r = EnvelopeReader::default();
        r.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.next_envelope().unwrap_err().code, Code::ResourceExhausted);
        let mut r = EnvelopeReader::default();
        r.push(&envelope(COMPRESSED, b"x"));
        assert_eq!(r.next_envelope().unwrap_err().code, Code::Unimplemented);
        assert!(decode_stream_request::<serde_json::Value>(&end_stream(None)).is_err());
        let v: serde_json::Value =
            decode_stream_request(&message(&serde_json::json!({"x": true}))).unwrap();
        assert_eq!(v["x"], true);
        assert_eq!(
            decode::<serde_json::Value>(b"").unwrap(),
            serde_json::json!({})
        );
        assert_eq!(
            decode::<serde_json::Value>(b"{").unwrap_err().code,
            Code::InvalidArgument
        );
    }
}
