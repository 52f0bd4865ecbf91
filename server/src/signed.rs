//! Signed file URLs (the SDK's `download_url()` / `upload_url()` of a secure sandbox): `GET`
//! / `POST /files?path=P[&username=U]&signature=v1_S[&signature_expiration=E]`, where S is
//! envd's signature: unpadded base64 of SHA-256 of `P:read|write:U:<envd access token>[:E]`
//! (packages/envd/internal/api/auth.go). Such a request needs no `X-Access-Token`; envd
//! answers 401 with `missing signature query parameter`, `invalid signature` or `signature is
//! already expired`, and so does kiln.
//!
//! With `E2B_SANDBOX_URL` (kiln's documented setup) the SDK's URL is that address plus
//! `/files?...`: it names no sandbox. The signature does: it is made with one sandbox's
//! token, so the daemon finds the secure sandbox whose token yields it ([`sandbox_of`]).

use crate::envd::{agent, files};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine;
use kiln_runtime::SandboxRecord;
use sha2::{Digest, Sha256};

/// A `/files` request's signing fields.
struct Signed {
    path: String,
    operation: &'static str,
    username: String,
    signature: Option<String>,
    expiration: Option<String>,
}

impl Signed {
    /// The fields of a `GET` (read) or `POST` (write) of `/files`; None for anything else.
    fn of(method: &Method, uri: &Uri) -> Option<Signed> {
        let operation = match *method {
            Method::GET => "read",
            Method::POST => "write",
            _ => return None,
        };
        if uri.path() != "/files" {
            return None;
        }
        let mut q = files::query(uri);
        Some(Signed {
            path: q.remove("path").unwrap_or_default(),
            operation,
            username: q.remove("username").unwrap_or_default(),
            signature: q.remove("signature"),
            expiration: q.remove("signature_expiration"),
        })
    }

    /// envd's signature of these fields with `token`.
    fn expected(&self, token: &str) -> String {
        let mut raw = format!("{}:{}:{}:{token}", self.path, self.operation, self.username);
        if let Some(e) = &self.expiration {
            raw.push(':');
            raw.push_str(e);
        }
        let digest = Sha256::digest(raw.as_bytes());
        format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        )
    }

    /// Whether the signature is `token`'s (constant time).
    fn signed_by(&self, token: &str) -> bool {
        self.signature
            .as_ref()
            .is_some_and(|s| crate::constant_time_eq(s.as_bytes(), self.expected(token).as_bytes()))
    }

    /// envd's verdict with `token`.
    fn check(&self, token: Option<&str>) -> Result<(), &'static str> {
        if self.signature.is_none() {
            return Err("missing signature query parameter");
        }
        if !token.is_some_and(|t| self.signed_by(t)) {
            return Err("invalid signature");
        }
        // envd parses the expiration as an integer (a malformed one is a 400 before this);
        // a value that is no number has expired.
        let now = kiln_runtime::record::now_ms() / 1000;
        match self.expiration.as_deref().map(str::parse::<u64>) {
            Some(Ok(e)) if e < now => Err("signature is already expired"),
            Some(Err(_)) => Err("signature is already expired"),
            _ => Ok(()),
        }
    }
}

/// The sandbox a signed `/files` request that names none is for: the secure sandbox among
/// `records` whose envd token made its signature. None when the request is not a signed
/// `/files` request or no sandbox signed it.
pub fn sandbox_of<'a>(
    method: &Method,
    uri: &Uri,
    records: &'a [SandboxRecord],
) -> Option<&'a SandboxRecord> {
    let s = Signed::of(method, uri)?;
    s.signature.as_ref()?;
    records.iter().find(|r| {
        r.access.secure
            && r.access
                .envd_token
                .as_deref()
                .is_some_and(|t| s.signed_by(t))
    })
}

/// Whether a request for a signed `/files` URL names a signed request at all (it has a
/// signature), so one no sandbox signed is answered as envd answers it.
pub fn is_signed(method: &Method, uri: &Uri) -> bool {
    Signed::of(method, uri).is_some_and(|s| s.signature.is_some())
}

/// envd's answer to a signed request no sandbox signed.
pub fn invalid() -> Response {
    agent::json_error(StatusCode::UNAUTHORIZED, "invalid signature")
}

/// For a request to envd's port of the secure sandbox `rec` that carries no access token:
/// `Some(Ok)` when it is a `/files` request signed with the sandbox's token and not expired,
/// `Some(Err(answer))` when it is a `/files` request that is not (envd's 401s), None when it
/// is no `/files` request (the token rules apply).
pub fn verdict(
    rec: &SandboxRecord,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<Result<(), Response>> {
    if !rec.access.secure || headers.contains_key("x-access-token") {
        return None;
    }
    let s = Signed::of(method, uri)?;
    Some(
        s.check(rec.access.envd_token.as_deref())
            .map_err(|m| agent::json_error(StatusCode::UNAUTHORIZED, m)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_sdks() {
        // e2b.sandbox.signature.get_signature("/home/user/a.txt", "read", None, "tok", None)
        let s = Signed {
            path: "/home/user/a.txt".into(),
            operation: "read",
            username: String::new(),
            signature: None,
            expiration: None,
        };
        assert_eq!(
            s.expected("tok"),
            "v1_Zkbb3914oLJLvMBzCAHQhm2ydBLxbSx2eQUR/kLdvIY"
        );
    }

    #[test]
    fn verdicts_are_envds() {
        let uri: Uri = "/files?path=%2Fa&signature=x".parse().unwrap();
        let mut s = Signed::of(&Method::GET, &uri).unwrap();
        assert_eq!(s.check(Some("tok")), Err("invalid signature"));
        s.signature = Some(s.expected("tok"));
        assert_eq!(s.check(Some("tok")), Ok(()));
        assert_eq!(s.check(Some("other")), Err("invalid signature"));
        assert_eq!(s.check(None), Err("invalid signature"));
        s.expiration = Some("1".into());
        s.signature = Some(s.expected("tok"));
        assert_eq!(s.check(Some("tok")), Err("signature is already expired"));
        s.expiration = Some(u64::MAX.to_string());
        s.signature = Some(s.expected("tok"));
        assert_eq!(s.check(Some("tok")), Ok(()));
        s.signature = None;
        assert_eq!(
            s.check(Some("tok")),
            Err("missing signature query parameter")
        );
        assert!(Signed::of(&Method::PUT, &uri).is_none());
        assert!(Signed::of(&Method::GET, &"/filesx?path=a".parse().unwrap()).is_none());
    }
}
