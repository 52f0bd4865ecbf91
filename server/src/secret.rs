//! The API key (random, kept in a 0600 file), the move of envd access tokens from the old
//! `serve/tokens/` files into the sandboxes' records, and constant-time comparison.

use std::path::Path;

/// `prefix` + 32 hex digits (128 bits) from the OS RNG.
pub use kiln_runtime::record::new_token as random_token;

/// Equal in time independent of where `a` and `b` differ (the length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Writes `dir/name` with mode 0600 atomically, durably.
pub(crate) fn write_private(dir: &Path, name: &str, value: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    kiln_atomicfile::write(
        &dir.join(name),
        value.as_bytes(),
        kiln_atomicfile::Options::PRIVATE_DURABLE,
    )
}

/// The key in `path`, or a new one written there (0600) when the file does not exist.
pub fn load_or_create_api_key(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(k) if !k.trim().is_empty() => return Ok(k.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key = random_token("kiln_");
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "api-key".into());
    write_private(dir, &name, &key)?;
    Ok(key)
}

/// Moves the tokens a `kiln serve` before this one kept in `dir/<id>` (`serve/tokens/`)
/// into the records of their sandboxes, where the data plane now reads them; tokens of
/// sandboxes that are gone are dropped. A file is removed only once its token is safe in the
/// record (or its sandbox is gone), so a failure leaves it for the next start.
pub(crate) fn migrate_tokens(sandboxes: &kiln_runtime::Sandboxes, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let (mut moved, mut dropped) = (0, 0);
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let done = if id.starts_with('.') {
            true
        } else {
            // An unreadable or empty file still marks the sandbox secure: with no token its
            // data plane refuses everyone, never no one.
            let token = std::fs::read_to_string(&path).unwrap_or_default();
            match sandboxes.adopt_envd_token(&id, token.trim()) {
                Ok(_) => {
                    moved += 1;
                    true
                }
                Err(kiln_runtime::Error::NotFound(_)) => {
                    dropped += 1;
                    true
                }
                Err(err) => {
                    tracing::warn!(id, "moving its access token into its record: {err}");
                    false
                }
            }
        };
        if done {
            let _ = std::fs::remove_file(&path);
        }
    }
    let _ = std::fs::remove_dir(dir);
    if moved + dropped > 0 {
        tracing::info!(
            moved,
            dropped,
            "access tokens moved from {} into the sandboxes' records (dropped: sandboxes gone)",
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_generated_once_private() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("serve/api-key");
        let k = load_or_create_api_key(&p).unwrap();
        assert!(k.starts_with("kiln_") && k.len() == 37);
        assert_eq!(load_or_create_api_key(&p).unwrap(), k);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_ne!(random_token(""), random_token(""));
    }
}
