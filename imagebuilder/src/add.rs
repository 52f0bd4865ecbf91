//! What `ADD` does beyond `COPY`: remote URLs (downloaded, optionally checked against
//! `--checksum`) and local tar archives (gzip, bzip2, xz, zstd or plain, detected by their magic
//! bytes) unpacked into the destination.
//!
//! Both end up as entries of the step's layer tar, so the step cache key (the hash of that tar)
//! covers a URL's content and an archive's unpacked entries. An archive is first applied to a
//! scratch directory by the layer applier, so it meets the same rules as an image layer (no
//! `..`, no symlink escapes, no hardlinks out, no device nodes) and fails with that error.

use crate::error::{Error, IoCtx, Result};
use crate::layer::{self, ApplyOptions};
use sha2::Digest as _;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Whether an ADD source names a remote file.
pub(crate) fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// The file name a URL's content gets in a destination directory: its last path segment.
pub(crate) fn url_file_name(url: &str) -> Result<String> {
    let path = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(url)
        .split(['?', '#'])
        .next()
        .unwrap_or("");
    let name = path
        .split_once('/')
        .map(|(_, p)| p)
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        return Err(Error::Build(format!(
            "ADD {url}: cannot tell a file name from the URL; give a destination file name"
        )));
    }
    Ok(name.to_string())
}

/// A `--checksum=<alg>:<hex>` value, checked for form before anything is downloaded.
fn parse_checksum(c: &str) -> Result<(&str, String)> {
    let (alg, hexd) = c.split_once(':').unwrap_or(("", c));
    let len = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => {
            return Err(Error::Build(format!(
                "--checksum={c}: expected sha256:<hex> (or sha384:, sha512:)"
            )))
        }
    };
    if hexd.len() != len || !hexd.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Build(format!(
            "--checksum={c}: {alg} wants {len} hex digits"
        )));
    }
    Ok((alg, hexd.to_ascii_lowercase()))
}

/// Downloads `url` into a new file in `dir` (mode 0600, as Docker gives remote files) and
/// checks it against `checksum` if given. Returns the file's path.
pub(crate) fn fetch_url(url: &str, checksum: Option<&str>, dir: &Path) -> Result<PathBuf> {
    let want = checksum.map(parse_checksum).transpose()?;
    let path = dir.join(format!("add-{}", blake3::hash(url.as_bytes()).to_hex()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ctx("start", "tokio runtime")?;
    let fetched = rt.block_on(download(url, &path));
    let (sha256, sha384, sha512) = match fetched {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    if let Some((alg, hexd)) = want {
        let actual = match alg {
            "sha256" => sha256,
            "sha384" => sha384,
            _ => sha512,
        };
        if actual != hexd {
            let _ = std::fs::remove_file(&path);
            return Err(Error::DigestMismatch {
                what: format!("ADD {url} (--checksum)"),
                expected: format!("{alg}:{hexd}"),
                actual: format!("{alg}:{actual}"),
            });
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).ctx("chmod", &path)?;
    Ok(path)
}

/// Streams `url` to `to`, hashing on the way (the checksum's algorithm is only known to be
/// one of three; hashing all of them costs little next to the network).
async fn download(url: &str, to: &Path) -> Result<(String, String, String)> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| Error::Build(format!("ADD {url}: {what}: {e}"));
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| fail("http client", &e))?;
    let mut resp = client.get(url).send().await.map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        fail("cannot fetch", &msg)
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(Error::Build(format!(
            "ADD {url}: server answered HTTP {status}"
        )));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(to).ctx("create", to)?);
    let (mut h256, mut h384, mut h512) = (
        sha2::Sha256::new(),
        sha2::Sha384::new(),
        sha2::Sha512::new(),
    );
    let expected = resp.content_length();
    let mut total = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail("download", &e))? {
        h256.update(&chunk);
        h384.update(&chunk);
        h512.update(&chunk);
        out.write_all(&chunk).ctx("write", to)?;
        total += chunk.len() as u64;
    }
    out.flush().ctx("write", to)?;
    if let Some(len) = expected {
        if len != total {
            return Err(Error::Build(format!(
                "ADD {url}: download ended after {total} of {len} bytes"
            )));
        }
    }
    tracing::info!(url, bytes = total, "ADD downloaded");
    Ok((
        hex::encode(h256.finalize()),
        hex::encode(h384.finalize()),
        hex::encode(h512.finalize()),
    ))
}

/// A reader over `p`'s content, decompressed if it starts with a gzip, bzip2, xz or zstd
/// magic number.
fn open_decompressed(p: &Path) -> Result<Box<dyn Read>> {
    let f = std::fs::File::open(p).ctx("open", p)?;
    let mut r = std::io::BufReader::with_capacity(256 * 1024, f);
    let head = r.fill_buf().ctx("read", p)?.to_vec();
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(b"BZh") {
        Box::new(bzip2::read::MultiBzDecoder::new(r))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Box::new(lzma_rust2::XzReader::new(r, true))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r).ctx("open zstd", p)?)
    } else {
        Box::new(r)
    })
}

/// Whether a local ADD source is a tar archive (possibly compressed): its (decompressed) first
/// block carries the ustar magic. Anything else, compressed or not, is copied as a file.
pub(crate) fn is_archive(p: &Path) -> Result<bool> {
    let mut r = open_decompressed(p)?;
    let mut block = vec![0u8; 512];
    let mut n = 0;
    while n < block.len() {
        match r.read(&mut block[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            // Corrupt or truncated compressed data: not an archive, Docker copies it as is.
            Err(_) => return Ok(false),
        }
    }
    Ok(n == 512 && &block[257..262] == b"ustar")
}

/// One tar entry path moved below `dest` (an absolute directory in the image), refused if it
/// is not a plain relative path.
fn under(dest: &str, archive: &Path, raw: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::from(dest.trim_start_matches('/'));
    for c in raw.components() {
        match c {
            std::path::Component::Normal(s) => out.push(s),
            std::path::Component::CurDir | std::path::Component::RootDir => {}
            _ => {
                return Err(Error::UnsafeEntry {
                    path: raw.display().to_string(),
                    why: format!("in ADD archive {}: path contains `..`", archive.display()),
                })
            }
        }
    }
    Ok(out)
}

/// Appends the entries of the tar archive `archive` to the step tar `b`, moved below the image
/// directory `dest`, owned by `owner` if given (else as in the archive). `scratch` is an empty
/// directory to check the archive in: it is applied there first with the layer rules.
pub(crate) fn append_archive<W: Write>(
    b: &mut tar::Builder<W>,
    archive: &Path,
    dest: &str,
    owner: Option<(u32, u32)>,
    scratch: &Path,
) -> Result<()> {
    std::fs::create_dir_all(scratch).ctx("mkdir", scratch)?;
    let st = layer::apply_layer(
        scratch,
        open_decompressed(archive)?,
        &ApplyOptions {
            allow_devices: false,
        },
    )
    .map_err(|e| match e {
        Error::UnsafeEntry { path, why } => Error::UnsafeEntry {
            path,
            why: format!("{why} (in ADD archive {})", archive.display()),
        },
        other => Error::Build(format!("ADD archive {}: {other}", archive.display())),
    })?;
    tracing::debug!(archive = %archive.display(), entries = st.entries, "ADD archive checked");
    let _ = std::fs::remove_dir_all(scratch);

    let mut ar = tar::Archive::new(open_decompressed(archive)?);
    for e in ar.entries().ctx("read", archive)? {
        let mut e = e.ctx("read", archive)?;
        let raw = e.path().ctx("read", archive)?.into_owned();
        if raw
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".wh."))
        {
            return Err(Error::UnsafeEntry {
                path: raw.display().to_string(),
                why: format!(
                    "in ADD archive {}: `.wh.` names are layer whiteouts",
                    archive.display()
                ),
            });
        }
        let name = under(dest, archive, &raw)?;
        let mut h = e.header().clone();
        if let Some((u, g)) = owner {
            h.set_uid(u as u64);
            h.set_gid(g as u64);
        }
        let kind = h.entry_type();
        if kind.is_hard_link() {
            let target = e
                .link_name()
                .ctx("read", archive)?
                .ok_or_else(|| Error::BadLayer(format!("hardlink {raw:?} without a target")))?
                .into_owned();
            let target = under(dest, archive, &target)?;
            b.append_link(&mut h, &name, &target)
                .ctx("write", "step tar")?;
        } else if kind.is_symlink() {
            let target = e
                .link_name()
                .ctx("read", archive)?
                .ok_or_else(|| Error::BadLayer(format!("symlink {raw:?} without a target")))?
                .into_owned();
            b.append_link(&mut h, &name, &target)
                .ctx("write", "step tar")?;
        } else if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            // The tar crate folds PAX records into the entries they describe.
            continue;
        } else {
            b.append_data(&mut h, &name, &mut e)
                .ctx("write", "step tar")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_names() {
        assert_eq!(
            url_file_name("http://h:1/a/b.tar.gz?x=1").unwrap(),
            "b.tar.gz"
        );
        assert_eq!(url_file_name("https://h/f").unwrap(), "f");
        assert!(url_file_name("https://h/").is_err());
        assert!(url_file_name("https://h").is_err());
    }

    #[test]
    fn checksums() {
        assert!(parse_checksum(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(parse_checksum(&format!("sha256:{}", "a".repeat(63))).is_err());
        assert!(parse_checksum(&format!("md5:{}", "a".repeat(32))).is_err());
        assert!(parse_checksum("abc").is_err());
    }

    #[test]
    fn archives_are_detected_by_content_not_name() {
        let d = tempfile::tempdir().unwrap();
        let tar_path = d.path().join("x.bin");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "a", &b"hi"[..]).unwrap();
        let plain = b.into_inner().unwrap();
        std::fs::write(&tar_path, &plain).unwrap();
        assert!(is_archive(&tar_path).unwrap());
        let gz = d.path().join("y");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&plain).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert!(is_archive(&gz).unwrap());
        let zst = d.path().join("z.tar.zst");
        std::fs::write(&zst, zstd::encode_all(&plain[..], 1).unwrap()).unwrap();
        assert!(is_archive(&zst).unwrap());
        // A gzip of something that is not a tar, and a plain file: copied, not unpacked.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&[7u8; 4096]).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert!(!is_archive(&gz).unwrap());
        std::fs::write(&tar_path, b"just text").unwrap();
        assert!(!is_archive(&tar_path).unwrap());
    }
}
