//! A template build's COPY sources: `GET /templates/{id}/files/{hash}` says whether the tar of
//! files `hash` is stored and, when not, where to upload it. E2B answers with a presigned
//! storage URL; kiln with one of its own on this daemon, `PUT /template-files/{hash}?
//! expires=E&signature=S`, which needs no API key (the SDK sends none to that URL): S is
//! unpadded base64url of SHA-256 of `template-files:<hash>:<E>:<API key>`, compared in
//! constant time, and E (unix seconds) bounds how long it is good for.
//!
//! Uploads are bounded ([`MAX_UPLOAD`]), written to a temp file in `serve/template-files`
//! (the daemon's own directory: no sandbox can write it) and renamed to `<hash>` when whole;
//! the hash is only used as a name once it is 64 hex digits. An upload cut off leaves its temp
//! file, removed at once, or at the next start after a kill.

use super::types::TemplateBuildFileUpload;
use super::*;
use base64::Engine;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

/// The largest upload accepted (one COPY's tar, gzipped).
pub const MAX_UPLOAD: u64 = 4 << 30;
/// How long an upload URL is good for.
const URL_SECS: u64 = 3600;

fn check_hash(hash: &str) -> ApiResult<()> {
    if !crate::builds::valid_hash(hash) {
        return Err(ApiError::bad_request(format!(
            "invalid files hash {:?}: 64 lower-case hex digits (SHA-256)",
            hash.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

fn signature(key: &str, hash: &str, expires: u64) -> String {
    let digest = Sha256::digest(format!("template-files:{hash}:{expires}:{key}").as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
}

/// `GET /templates/{id}/files/{hash}`: 201 (as E2B) with `present`, and the upload URL when
/// the files are not stored yet; 404 when no build of template `id` was requested.
pub(super) async fn file_upload_link(
    State(state): State<Arc<AppState>>,
    Path((id, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<(StatusCode, Json<TemplateBuildFileUpload>)> {
    check_hash(&hash)?;
    if !state.builds.has_template(&id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template '{id}' not found (request a build first: POST /v3/templates)"),
        ));
    }
    let present = state.builds.has_files(&hash);
    let url = (!present).then(|| {
        // The address the client reached this daemon at: the upload comes back the same way.
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let expires = kiln_runtime::record::now_ms() / 1000 + URL_SECS;
        format!(
            "http://{host}/template-files/{hash}?expires={expires}&signature={}",
            signature(&state.api_key, &hash, expires)
        )
    });
    Ok((
        StatusCode::CREATED,
        Json(TemplateBuildFileUpload { present, url }),
    ))
}

/// A temp file that is removed unless it was renamed into place.
struct Partial(std::path::PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `PUT /template-files/{hash}?expires=&signature=`: 201 when stored; 401 for a missing,
/// wrong or expired signature, 413 past [`MAX_UPLOAD`].
pub(super) async fn upload_files(
    State(state): State<Arc<AppState>>,
    Path(hash): Path<String>,
    uri: Uri,
    req: Request,
) -> ApiResult<StatusCode> {
    check_hash(&hash)?;
    let q: BTreeMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let expires: u64 = q
        .get("expires")
        .and_then(|e| e.parse().ok())
        .ok_or_else(|| unauthorized("missing or malformed expires"))?;
    let given = q
        .get("signature")
        .ok_or_else(|| unauthorized("missing signature query parameter"))?;
    if !crate::constant_time_eq(
        given.as_bytes(),
        signature(&state.api_key, &hash, expires).as_bytes(),
    ) {
        return Err(unauthorized("invalid signature"));
    }
    if expires < kiln_runtime::record::now_ms() / 1000 {
        return Err(unauthorized("signature is already expired"));
    }
    let dir = state.builds.files_dir.clone();
    let partial = Partial(dir.join(format!(".upload-{hash}-{}", crate::random_token(""))));
    let internal = |e: std::io::Error| {
        tracing::warn!("storing template files {hash}: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("storing the upload: {e}"),
        )
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial.0)
        .map_err(internal)?;
    let mut n: u64 = 0;
    let mut stream = req.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        n = n.saturating_add(chunk.len() as u64);
        if n > MAX_UPLOAD {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("uploads are at most {MAX_UPLOAD} bytes"),
            ));
        }
        tokio::task::block_in_place(|| f.write_all(&chunk)).map_err(internal)?;
    }
    let target = dir.join(&hash);
    tokio::task::block_in_place(|| {
        f.sync_all()?;
        std::fs::rename(&partial.0, &target)
    })
    .map_err(internal)?;
    tracing::info!(hash = %hash, bytes = n, "template files uploaded");
    Ok(StatusCode::CREATED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_hash_expiry_and_key() {
        let h = "a".repeat(64);
        let s = signature("k", &h, 10);
        assert_eq!(s, signature("k", &h, 10));
        assert_ne!(s, signature("k", &h, 11));
        assert_ne!(s, signature("j", &h, 10));
        assert_ne!(s, signature("k", &"b".repeat(64), 10));
        assert!(check_hash("../x").is_err());
        assert!(check_hash(&h).is_ok());
    }
}
