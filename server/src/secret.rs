//! The API key and the per-sandbox envd access tokens: random, kept in 0600 files, compared in
//! constant time.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `prefix` + 32 hex digits (128 bits) from the OS RNG.
pub fn random_token(prefix: &str) -> String {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: getrandom writes at most the remaining length into the buffer we own.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EINTR), "getrandom: {e}");
            continue;
        }
        got += n as usize;
    }
    format!("{prefix}{}", hex::encode(b))
}

/// Equal in time independent of where `a` and `b` differ (the length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Writes `dir/name` with mode 0600 atomically (temp file, rename).
pub(crate) fn write_private(dir: &Path, name: &str, value: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(value.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
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

/// Every `dir/<id>` token file.
pub(crate) fn load_tokens(dir: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Ok(t) = std::fs::read_to_string(e.path()) {
            out.insert(name, t.trim().to_string());
        }
    }
    out
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
