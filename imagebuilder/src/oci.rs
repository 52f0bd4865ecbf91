//! Images in: registry pulls (oci-client), OCI layout directories and docker-archive tars.
//!
//! Every source is reduced to (config JSON, layer files with the digest each must have). Then
//! [`ingest`] checks digests, applies the layers to a staging directory (which refuses unsafe
//! entries), and only when all of that succeeded puts layers, disk and record in the store and
//! tags the image. A failure leaves no name behind.

use crate::error::{Error, IoCtx, Result};
use crate::image::{self, ImageConfig, ImageRecord};
use crate::layer::{self, ApplyOptions};
use kiln_blockstore::{BlobId, PutOptions, Store};
use sha2::Digest as _;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A layer file and the digest it must have.
struct LayerFile {
    path: PathBuf,
    /// `sha256:<hex>` of the file as it is (compressed), if known.
    digest: Option<String>,
    /// `sha256:<hex>` of the uncompressed tar (the OCI diff_id), if known.
    diff_id: Option<String>,
}

/// Options for pulls and imports.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Plain http even for a registry that is not on localhost.
    pub insecure: bool,
    /// Accept device nodes in layers.
    pub allow_devices: bool,
    /// Log in with these (HTTP basic auth) instead of the Docker config's entry.
    pub credentials: Option<Credentials>,
}

/// A registry user and password; its `Debug` does not show the password.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

fn sha256_file(p: &Path, decompress: bool) -> Result<String> {
    let f = std::fs::File::open(p).ctx("open", p)?;
    let mut r: Box<dyn Read> = if decompress {
        layer::decompress(f)?
    } else {
        Box::new(f)
    };
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).ctx("read", p)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn check_digest(what: &str, expected: &str, actual: &str) -> Result<()> {
    if !expected.eq_ignore_ascii_case(actual) {
        return Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// Verifies, applies and stores an image; tags it `name`. Returns the image id and record.
fn ingest(
    store: &Store,
    tmp: &Path,
    name: &str,
    config_json: &[u8],
    layers: &[LayerFile],
    source: String,
    opts: &PullOptions,
) -> Result<(BlobId, ImageRecord)> {
    image::check_name(name)?;
    let config = ImageConfig::from_oci_json(config_json)?;
    let diff_ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(config_json)
        .ok()
        .and_then(|v| {
            v.pointer("/rootfs/diff_ids")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default();
    std::fs::create_dir_all(tmp).ctx("mkdir", tmp)?;
    let stage = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(tmp)
        .ctx("create staging dir in", tmp)?;
    let rootfs = stage.path().join("rootfs");
    std::fs::create_dir(&rootfs).ctx("mkdir", &rootfs)?;
    let apply = ApplyOptions {
        allow_devices: opts.allow_devices,
    };
    // Layers are kept uncompressed in the store (which compresses chunks itself): builds then
    // apply them without paying for gunzip every time.
    let mut plain = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if let Some(d) = &l.digest {
            check_digest(&format!("layer {i}"), d, &sha256_file(&l.path, false)?)?;
        }
        let tar_path = stage.path().join(format!("layer-{i}.tar"));
        let diff_id = {
            let f = std::fs::File::open(&l.path).ctx("open", &l.path)?;
            let mut r = layer::decompress(f)?;
            let mut out =
                std::io::BufWriter::new(std::fs::File::create(&tar_path).ctx("create", &tar_path)?);
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r.read(&mut buf).ctx("decompress", &l.path)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                std::io::Write::write_all(&mut out, &buf[..n]).ctx("write", &tar_path)?;
            }
            std::io::Write::flush(&mut out).ctx("write", &tar_path)?;
            format!("sha256:{}", hex::encode(h.finalize()))
        };
        if let Some(d) = l.diff_id.clone().or_else(|| diff_ids.get(i).cloned()) {
            check_digest(&format!("layer {i} (uncompressed)"), &d, &diff_id)?;
        }
        let f = std::fs::File::open(&tar_path).ctx("open", &tar_path)?;
        let st = layer::apply_layer(&rootfs, f, &apply)?;
        tracing::info!(
            layer = i,
            entries = st.entries,
            bytes = st.bytes,
            "applied layer"
        );
        plain.push(tar_path);
    }
    // Everything checked: now write to the store.
    let mut ids = Vec::new();
    for p in &plain {
        ids.push(store.put_file(p, &PutOptions::default())?);
        let _ = std::fs::remove_file(p);
    }
    let (disk, disk_size) = image::commit_rootfs(store, &rootfs, &config, &ids, stage.path())?;
    // Builds over this image start from this tree instead of extracting it again.
    crate::stage::adopt_tree(tmp, &ids, &rootfs);
    let rec = ImageRecord {
        schema: 1,
        disk,
        disk_size,
        layers: ids,
        config,
        parent: None,
        source,
        history: Vec::new(),
    };
    let id = image::put_record(store, &rec)?;
    image::tag(store, name, &id)?;
    Ok((id, rec))
}

/// `oci:DIR[:TAG]` or `docker-archive:FILE`, tagged `name`.
pub fn import(
    store: &Store,
    tmp: &Path,
    source: &str,
    name: &str,
    opts: &PullOptions,
) -> Result<(BlobId, ImageRecord)> {
    // A docker archive's unpacked files back its layers until ingest has read them.
    let mut _unpacked_archive = None;
    let (config, layers) = if let Some(rest) = source.strip_prefix("oci:") {
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') => (d, Some(t)),
            _ => (rest, None),
        };
        read_oci_layout(Path::new(dir), tag)?
    } else if let Some(file) = source.strip_prefix("docker-archive:") {
        std::fs::create_dir_all(tmp).ctx("mkdir", tmp)?;
        let unpacked = tempfile::Builder::new()
            .prefix("archive-")
            .tempdir_in(tmp)
            .ctx("create dir in", tmp)?;
        let f = std::fs::File::open(file).ctx("open", file)?;
        layer::apply_layer(unpacked.path(), f, &ApplyOptions::default())?;
        let parsed = read_docker_archive(unpacked.path())?;
        _unpacked_archive = Some(unpacked);
        parsed
    } else {
        return Err(Error::BadSource(format!(
            "{source:?}: expected oci:DIR[:TAG] or docker-archive:FILE"
        )));
    };
    ingest(
        store,
        tmp,
        name,
        &config,
        &layers,
        format!("import {source}"),
        opts,
    )
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let b = std::fs::read(p).ctx("read", p)?;
    serde_json::from_slice(&b).map_err(|e| Error::BadSource(format!("{}: {e}", p.display())))
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hexd) = digest
        .split_once(':')
        .ok_or_else(|| Error::BadSource(format!("bad digest {digest:?}")))?;
    if alg != "sha256" || hexd.len() != 64 || !hexd.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::BadSource(format!("unsupported digest {digest:?}")));
    }
    Ok(dir.join("blobs").join(alg).join(hexd))
}

fn pick_amd64(index: &serde_json::Value) -> Option<serde_json::Value> {
    index.get("manifests")?.as_array()?.iter().find_map(|m| {
        let p = m.get("platform")?;
        (p.get("os")?.as_str()? == "linux" && p.get("architecture")?.as_str()? == "amd64")
            .then(|| m.clone())
    })
}

fn read_oci_layout(dir: &Path, tag: Option<&str>) -> Result<(Vec<u8>, Vec<LayerFile>)> {
    let index = read_json(&dir.join("index.json"))?;
    let manifests = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let ref_name = |m: &serde_json::Value| {
        m.pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(|v| v.as_str())
            .map(String::from)
    };
    let mut desc = match tag {
        Some(t) => manifests
            .iter()
            .find(|m| ref_name(m).as_deref() == Some(t))
            .cloned()
            .ok_or_else(|| {
                Error::BadSource(format!(
                    "no tag {t:?} in {} (tags: {:?})",
                    dir.display(),
                    manifests.iter().filter_map(ref_name).collect::<Vec<_>>()
                ))
            })?,
        None if manifests.len() == 1 => manifests[0].clone(),
        None => {
            return Err(Error::BadSource(format!(
                "{} holds {} images: name one with oci:DIR:TAG (tags: {:?})",
                dir.display(),
                manifests.len(),
                manifests.iter().filter_map(ref_name).collect::<Vec<_>>()
            )))
        }
    };
    // Follow nested indexes down to the linux/amd64 manifest.
    for _ in 0..4 {
        let digest = desc
            .get("digest")
            .and_then(|d| d.as_str())
            .ok_or_else(|| Error::BadSource("descriptor without digest".into()))?
            .to_string();
        let p = blob_path(dir, &digest)?;
        check_digest(
            &format!("manifest {digest}"),
            &digest,
            &sha256_file(&p, false)?,
        )?;
        let doc = read_json(&p)?;
        if doc.get("manifests").is_some() {
            desc = pick_amd64(&doc)
                .ok_or_else(|| Error::BadSource("image index has no linux/amd64 image".into()))?;
            continue;
        }
        let cfg_digest = doc
            .pointer("/config/digest")
            .and_then(|d| d.as_str())
            .ok_or_else(|| Error::BadSource("manifest without config".into()))?;
        let cfg_path = blob_path(dir, cfg_digest)?;
        check_digest("config", cfg_digest, &sha256_file(&cfg_path, false)?)?;
        let config = std::fs::read(&cfg_path).ctx("read", &cfg_path)?;
        let mut layers = Vec::new();
        for l in doc
            .get("layers")
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default()
        {
            let d = l
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or_else(|| Error::BadSource("layer without digest".into()))?;
            layers.push(LayerFile {
                path: blob_path(dir, d)?,
                digest: Some(d.to_string()),
                diff_id: None,
            });
        }
        return Ok((config, layers));
    }
    Err(Error::BadSource("image indexes nested too deep".into()))
}

fn read_docker_archive(dir: &Path) -> Result<(Vec<u8>, Vec<LayerFile>)> {
    let m = read_json(&dir.join("manifest.json"))?;
    let first = m
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| Error::BadSource("manifest.json lists no image".into()))?;
    let cfg = first
        .get("Config")
        .and_then(|c| c.as_str())
        .ok_or_else(|| Error::BadSource("manifest.json without Config".into()))?;
    let safe = |p: &str| -> Result<PathBuf> {
        if p.split('/').any(|c| c == "..") || p.starts_with('/') {
            return Err(Error::BadSource(format!(
                "unsafe path {p:?} in manifest.json"
            )));
        }
        Ok(dir.join(p))
    };
    let config = std::fs::read(safe(cfg)?).ctx("read", safe(cfg)?)?;
    let mut layers = Vec::new();
    for l in first
        .get("Layers")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default()
    {
        let p = l
            .as_str()
            .ok_or_else(|| Error::BadSource("bad Layers entry".into()))?;
        // docker-archive layers are checked against the config's diff_ids.
        layers.push(LayerFile {
            path: safe(p)?,
            digest: None,
            diff_id: None,
        });
    }
    Ok((config, layers))
}

/// Credentials for `registry` from the docker config (`$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`), else anonymous.
fn docker_auth(registry: &str) -> oci_client::secrets::RegistryAuth {
    use oci_client::secrets::RegistryAuth;
    let path = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
        .map(|d| d.join("config.json"));
    let Some(v) = path.and_then(|p| std::fs::read(p).ok()) else {
        return RegistryAuth::Anonymous;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&v) else {
        return RegistryAuth::Anonymous;
    };
    let auths = v.get("auths").and_then(|a| a.as_object());
    let entry = auths.and_then(|a| {
        a.iter().find_map(|(k, v)| {
            let host = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("");
            let host = if host == "index.docker.io" {
                "docker.io"
            } else {
                host
            };
            (host == registry).then_some(v)
        })
    });
    let Some(auth) = entry.and_then(|e| e.get("auth")).and_then(|a| a.as_str()) else {
        return RegistryAuth::Anonymous;
    };
    match base64_decode(auth).and_then(|b| String::from_utf8(b).ok()) {
        Some(s) => match s.split_once(':') {
            Some((u, p)) => RegistryAuth::Basic(u.to_string(), p.to_string()),
            None => RegistryAuth::Anonymous,
        },
        None => RegistryAuth::Anonymous,
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Whether a registry host is served over plain http by default.
fn is_local(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(registry);
    host == "localhost" || host == "127.0.0.1" || host == "[::1]"
}

/// What a pull reports while it runs (for progress bars; every method defaults to nothing).
pub trait PullProgress {
    /// Layer `index` (0-based, of `count`) starts downloading; `size` bytes are expected.
    fn layer_start(&self, _index: usize, _count: usize, _digest: &str, _size: u64) {}
    /// `done` bytes of layer `index` are down so far.
    fn layer_bytes(&self, _index: usize, _done: u64) {}
    /// Layer `index` is completely down.
    fn layer_done(&self, _index: usize) {}
    /// A phase after the downloads (checking, unpacking, writing the disk).
    fn message(&self, _msg: &str) {}
}

/// Line-per-layer progress through a `Fn(&str)`, for callers that only print lines.
struct Lines<'a>(&'a dyn Fn(&str));

impl PullProgress for Lines<'_> {
    fn layer_start(&self, index: usize, count: usize, digest: &str, size: u64) {
        (self.0)(&format!(
            "layer {}/{count} {digest} ({size} bytes)",
            index + 1
        ));
    }
    fn message(&self, msg: &str) {
        (self.0)(msg)
    }
}

/// An AsyncWrite that reports how many bytes went through it.
struct Counting<'a, W> {
    inner: W,
    done: u64,
    report: &'a dyn Fn(u64),
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            this.done += n as u64;
            (this.report)(this.done);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Pulls `reference` from its registry and tags it `name` (default: the reference itself);
/// `progress` gets a line per layer.
pub fn pull(
    store: &Store,
    tmp: &Path,
    reference: &str,
    name: Option<&str>,
    opts: &PullOptions,
    progress: &dyn Fn(&str),
) -> Result<(BlobId, ImageRecord)> {
    pull_with_progress(store, tmp, reference, name, opts, &Lines(progress))
}

/// [`pull`] reporting per-layer byte counts to `progress`.
pub fn pull_with_progress(
    store: &Store,
    tmp: &Path,
    reference: &str,
    name: Option<&str>,
    opts: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<(BlobId, ImageRecord)> {
    let r: oci_client::Reference = reference
        .parse()
        .map_err(|e| Error::BadSource(format!("bad image reference {reference:?}: {e}")))?;
    let registry = r.resolve_registry().to_string();
    let protocol = if opts.insecure || is_local(&registry) {
        oci_client::client::ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        oci_client::client::ClientProtocol::Https
    };
    let config = oci_client::client::ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        ..Default::default()
    };
    let client = oci_client::Client::new(config);
    let auth = match &opts.credentials {
        Some(c) => oci_client::secrets::RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => docker_auth(&registry),
    };
    std::fs::create_dir_all(tmp).ctx("mkdir", tmp)?;
    let dl = tempfile::Builder::new()
        .prefix("pull-")
        .tempdir_in(tmp)
        .ctx("create dir in", tmp)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ctx("start", "tokio runtime")?;
    let reg_err =
        |e: oci_client::errors::OciDistributionError| Error::Registry(format!("{reference}: {e}"));
    let (config_json, layers) = rt.block_on(async {
        let (manifest, _digest, config) = client
            .pull_manifest_and_config(&r, &auth)
            .await
            .map_err(reg_err)?;
        let cfg_actual = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(config.as_bytes()))
        );
        check_digest("config", &manifest.config.digest, &cfg_actual)?;
        let mut layers = Vec::new();
        for (i, l) in manifest.layers.iter().enumerate() {
            let size = u64::try_from(l.size).unwrap_or(0);
            progress.layer_start(i, manifest.layers.len(), &l.digest, size);
            let path = dl.path().join(format!("layer-{i}"));
            let f = tokio::fs::File::create(&path).await.ctx("create", &path)?;
            let report = |done| progress.layer_bytes(i, done);
            let mut w = Counting {
                inner: tokio::io::BufWriter::new(f),
                done: 0,
                report: &report,
            };
            client.pull_blob(&r, l, &mut w).await.map_err(reg_err)?;
            tokio::io::AsyncWriteExt::flush(&mut w)
                .await
                .ctx("write", &path)?;
            progress.layer_done(i);
            layers.push(LayerFile {
                path,
                digest: Some(l.digest.clone()),
                diff_id: None,
            });
        }
        Ok::<_, Error>((config.into_bytes(), layers))
    })?;
    progress.message("checking and unpacking layers, writing the disk");
    ingest(
        store,
        tmp,
        name.unwrap_or(reference),
        &config_json,
        &layers,
        format!("pull {reference}"),
        opts,
    )
}
