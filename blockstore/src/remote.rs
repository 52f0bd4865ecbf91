//! S3 tier: chunks and blob manifests as objects in an S3-compatible bucket.
//!
//! Object layout under the configured prefix: `<prefix>/chunks/<hex>` (chunk bytes exactly as
//! the caller hands them, i.e. zstd-compressed), `<prefix>/blobs/<hex>` (manifests) and
//! `<prefix>/bundles/<blob hex>` (many of a blob's chunks in one object, see [`crate::bundle`]).
//! Chunks and manifests are immutable and content-addressed, so every write is idempotent and
//! a retried or concurrent upload of the same id is harmless; a bundle may be rewritten by a
//! later push of its blob, and every version of it is as good (its frames are checked on read).
//!
//! The API is blocking: callers are plain threads (CLI, VMM I/O workers). An `S3Remote` owns a
//! small tokio runtime and drives the async SDK with `block_on`; it must therefore not be used
//! from inside another tokio runtime's async context.
//!
//! Failures are bounded in time (2 s connect timeout, short per-attempt timeouts, 3 attempts) so
//! "S3 is down" surfaces in seconds as [`RemoteError::Unreachable`], and errors name what failed
//! without ever including credentials.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use tokio::task::JoinSet;
use tracing::warn;

use crate::id::{BlobId, ChunkId, Digest};

/// Where a remote lives. Holds no secrets unless `credentials` is set explicitly (tests, tools);
/// normally credentials come from the AWS default chain (env vars, ~/.aws/credentials, ...).
#[derive(Clone, Default)]
pub struct RemoteConfig {
    /// Endpoint URL of an S3-compatible server (`http://127.0.0.1:8333`); `None` = AWS.
    pub endpoint: Option<String>,
    /// Region, `us-east-1` when `None`.
    pub region: Option<String>,
    pub bucket: String,
    /// Key prefix inside the bucket (no leading/trailing `/` needed), may be empty.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`); `None` = on iff a custom endpoint is set.
    pub path_style: Option<bool>,
    /// Explicit access key/secret instead of the default credential chain.
    pub credentials: Option<StaticCredentials>,
}

/// An access key id and secret. `Debug` never shows the secret.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StaticCredentials({}, <secret>)", self.access_key_id)
    }
}

impl fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl RemoteConfig {
    /// Parses `s3://bucket/prefix/...` into bucket and prefix (the rest of the config default).
    pub fn from_url(url: &str) -> Result<RemoteConfig, RemoteError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            RemoteError::Config(format!(
                "remote URL must look like s3://bucket/prefix, got {url:?}"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(RemoteError::Config(format!(
                "remote URL {url:?} has no bucket"
            )));
        }
        Ok(RemoteConfig {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            ..RemoteConfig::default()
        })
    }

    /// `s3://bucket/prefix` (for messages).
    pub fn url(&self) -> String {
        let prefix = self.prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, prefix)
        }
    }
}

/// What went wrong talking to S3. Messages name the endpoint/bucket/key, never secrets.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid remote configuration: {0}")]
    Config(String),
    #[error("cannot reach S3 endpoint {endpoint} ({detail})")]
    Unreachable { endpoint: String, detail: String },
    #[error("S3 request to {endpoint} timed out ({op} {key})")]
    Timeout {
        endpoint: String,
        op: &'static str,
        key: String,
    },
    #[error(
        "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or configure \
         ~/.aws/credentials ({detail})"
    )]
    NoCredentials { detail: String },
    #[error(
        "S3 denied access to s3://{bucket} ({code}): check the access key and secret \
         (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials) and the bucket policy"
    )]
    AccessDenied { bucket: String, code: String },
    #[error("bucket {bucket:?} does not exist at {endpoint}")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error("not found in the remote: s3://{bucket}/{key}")]
    NotFound { bucket: String, key: String },
    #[error("S3 {op} s3://{bucket}/{key} failed: {detail}")]
    Other {
        op: &'static str,
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("reading a chunk to upload: {0}")]
    Source(#[source] std::io::Error),
    #[error("cannot start the S3 client runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl RemoteError {
    /// True when the object simply is not there (as opposed to S3 failing).
    pub fn is_not_found(&self) -> bool {
        matches!(self, RemoteError::NotFound { .. })
    }
}

/// One object listed from the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub id: Digest,
    pub last_modified: SystemTime,
    pub size: u64,
}

/// A connected S3 remote (cheap to share behind an `Arc`).
pub struct S3Remote {
    rt: tokio::runtime::Runtime,
    client: Client,
    bucket: String,
    /// Normalised: empty, or ending in `/`.
    prefix: String,
    endpoint: String,
}

impl fmt::Debug for S3Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "S3Remote(s3://{}/{} at {})",
            self.bucket, self.prefix, self.endpoint
        )
    }
}

/// How many HEAD/GET/PUT requests run at once when the caller does not say.
pub const DEFAULT_PARALLELISM: usize = 16;

/// Bytes per part of a bundle's multipart upload (S3 wants at least 5 MiB but the last).
pub const BUNDLE_PART: usize = 8 << 20;
/// Parts of one bundle uploaded at once.
pub const BUNDLE_PARTS_IN_FLIGHT: usize = 4;
/// Byte ranges of one bundle read at once.
pub const BUNDLE_RANGES_IN_FLIGHT: usize = 8;

impl S3Remote {
    /// Builds a client for `cfg`. Does no network I/O (so purely local commands keep working
    /// when S3 is down); use [`S3Remote::check`] to validate reachability and credentials.
    pub fn connect(cfg: &RemoteConfig) -> Result<S3Remote, RemoteError> {
        if cfg.bucket.is_empty() {
            return Err(RemoteError::Config("bucket name is empty".into()));
        }
        if let Some(ep) = &cfg.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(RemoteError::Config(format!(
                    "endpoint must be an http:// or https:// URL, got {ep:?}"
                )));
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-s3")
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        let region = cfg
            .region
            .clone()
            .unwrap_or_else(|| "us-east-1".to_string());
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            // Retries are bounded and quick: a dead endpoint must fail in seconds.
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(1)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .read_timeout(Duration::from_secs(20))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .operation_timeout(Duration::from_secs(90))
                    .build(),
            );
        if let Some(ep) = &cfg.endpoint {
            loader = loader.endpoint_url(ep);
        }
        if let Some(c) = &cfg.credentials {
            loader = loader.credentials_provider(Credentials::new(
                &c.access_key_id,
                &c.secret_access_key,
                None,
                None,
                "kiln-static",
            ));
        }
        let shared = rt.block_on(loader.load());
        let s3conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.path_style.unwrap_or(cfg.endpoint.is_some()))
            // S3-compatible servers differ in their support for the newer default checksum
            // trailers; content addressing already verifies every byte we read back.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .stalled_stream_protection(StalledStreamProtectionConfig::enabled().build())
            .build();
        let prefix = cfg.prefix.trim_matches('/');
        Ok(S3Remote {
            rt,
            client: Client::from_conf(s3conf),
            bucket: cfg.bucket.clone(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            endpoint: cfg.endpoint.clone().unwrap_or_else(|| "AWS S3".to_string()),
        })
    }

    /// `s3://bucket/prefix` (for messages).
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
            .trim_end_matches('/')
            .to_string()
    }

    fn chunk_key(&self, id: &ChunkId) -> String {
        format!("{}chunks/{}", self.prefix, id.to_hex())
    }

    fn blob_key(&self, id: &BlobId) -> String {
        format!("{}blobs/{}", self.prefix, id.to_hex())
    }

    fn bundle_key(&self, id: &BlobId) -> String {
        format!("{}bundles/{}", self.prefix, id.to_hex())
    }

    fn ref_key(&self, name: &str) -> String {
        format!("{}refs/{}", self.prefix, name)
    }

    /// Checks that the endpoint answers, the credentials are accepted and the bucket exists.
    pub fn check(&self) -> Result<(), RemoteError> {
        let client = &self.client;
        let r = self
            .rt
            .block_on(async { client.head_bucket().bucket(&self.bucket).send().await });
        match r {
            Ok(_) => Ok(()),
            // HEAD has no body, so a missing bucket is a bare 404.
            Err(e) if status(&e) == Some(404) => Err(RemoteError::NoSuchBucket {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
            }),
            Err(e) => Err(self.map_err("HEAD bucket", String::new(), e)),
        }
    }

    /// Creates the bucket if it does not exist (tests, demos, first-time setup).
    pub fn ensure_bucket(&self) -> Result<(), RemoteError> {
        match self.check() {
            Ok(()) => return Ok(()),
            Err(RemoteError::NoSuchBucket { .. }) => {}
            Err(e) => return Err(e),
        }
        let client = &self.client;
        let r = self
            .rt
            .block_on(async { client.create_bucket().bucket(&self.bucket).send().await });
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.map_err("CREATE bucket", String::new(), e)),
        }
    }

    /// Uploads one chunk's stored (compressed) bytes.
    pub fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<(), RemoteError> {
        self.put_object(self.chunk_key(id), bytes)
    }

    /// Downloads one chunk's stored bytes. The caller verifies them against `id`.
    pub fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, RemoteError> {
        self.get_object(self.chunk_key(id))
    }

    /// Downloads several chunks concurrently (four times [`DEFAULT_PARALLELISM`] in flight:
    /// chunks of 4 KiB pages are latency, not bandwidth), in the order given.
    pub fn get_chunks(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, RemoteError> {
        let keys = ids.iter().map(|id| self.chunk_key(id)).collect();
        self.per_key(
            keys,
            DEFAULT_PARALLELISM * 4,
            "GET",
            |c, b, k, ep| async move { get(&c, &b, k, &ep).await },
        )
    }

    /// Runs `op` on every key with up to `width` requests in flight; results in key order,
    /// the first error ends it.
    fn per_key<T, F, Fut>(
        &self,
        keys: Vec<String>,
        width: usize,
        what: &str,
        op: F,
    ) -> Result<Vec<T>, RemoteError>
    where
        T: Send + 'static,
        F: Fn(Client, String, String, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, RemoteError>> + Send + 'static,
    {
        let mut out: Vec<Option<T>> = (0..keys.len()).map(|_| None).collect();
        let mut failed = None;
        let futs = keys.into_iter().map(|k| {
            op(
                self.client.clone(),
                self.bucket.clone(),
                k,
                self.endpoint.clone(),
            )
        });
        self.in_flight(futs, width, what, |i, r| match r {
            Ok(v) => {
                out[i] = Some(v);
                true
            }
            Err(e) => {
                failed = Some(e);
                false
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(out
                .into_iter()
                .map(|o| o.expect("every index filled"))
                .collect()),
        }
    }

    /// Runs the futures `futs` with up to `width` in flight, calling `each(index, result)` as
    /// each completes (on the calling thread); `each` returning false ends it (requests still
    /// in flight are dropped).
    fn in_flight<T, Fut>(
        &self,
        futs: impl Iterator<Item = Fut>,
        width: usize,
        what: &str,
        mut each: impl FnMut(usize, Result<T, RemoteError>) -> bool,
    ) where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T, RemoteError>> + Send + 'static,
    {
        let mut futs = futs.enumerate();
        self.rt.block_on(async {
            let mut set = JoinSet::new();
            loop {
                while set.len() < width.max(1) {
                    let Some((i, fut)) = futs.next() else { break };
                    set.spawn(async move { (i, fut.await) });
                }
                let Some(joined) = set.join_next().await else {
                    return;
                };
                let (i, r) = joined.unwrap_or_else(|e| panic!("S3 {what} task panicked: {e}"));
                if !each(i, r) {
                    return;
                }
            }
        })
    }

    /// Whether each chunk exists in the remote.
    ///
    /// Two ways, chosen by cost: one LIST page returns up to 1000 keys for about the price of
    /// ~70 HEADs in flight (measured on loopback SeaweedFS: 624 ids, 142 ms by 32 parallel
    /// HEADs, 11 ms by LIST; `store_s3_cold` bench). So for 64+ ids the prefix is listed, but
    /// only up to `ids/64` pages: a prefix much larger than the question (a bucket shared by
    /// many blobs) falls back to HEADs, bounding the worst case at about twice the HEAD cost.
    pub fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, RemoteError> {
        if ids.len() >= 64 {
            let prefix = format!("{}chunks/", self.prefix);
            if let Some(listed) = self.list_bounded(prefix, ids.len() / 64)? {
                let set = id_set(&listed);
                return Ok(ids.iter().map(|id| set.contains(id)).collect());
            }
        }
        self.head_chunks(ids)
    }

    /// Existence by parallel HEADs only (the baseline `has_chunks` is measured against).
    pub fn head_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, RemoteError> {
        let keys = ids.iter().map(|id| self.chunk_key(id)).collect();
        self.per_key(
            keys,
            DEFAULT_PARALLELISM * 2,
            "HEAD",
            |c, b, k, ep| async move { head(&c, &b, k, &ep).await },
        )
    }

    /// Uploads chunks with up to `parallelism` requests in flight. `chunks` is pulled lazily
    /// (so memory stays bounded by `parallelism` chunks); `progress` is called with each
    /// uploaded chunk's stored size. Stops at the first error (already uploaded chunks stay:
    /// they are content-addressed, so a retry skips or overwrites them harmlessly).
    pub fn put_chunks<I>(
        &self,
        chunks: I,
        parallelism: usize,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), RemoteError>
    where
        I: IntoIterator<Item = std::io::Result<(ChunkId, Vec<u8>)>>,
    {
        let parallelism = parallelism.max(1);
        let mut iter = chunks.into_iter();
        self.rt.block_on(async {
            let mut set = JoinSet::new();
            let mut exhausted = false;
            loop {
                while !exhausted && set.len() < parallelism {
                    match iter.next() {
                        None => exhausted = true,
                        Some(item) => {
                            let (id, bytes) = item.map_err(RemoteError::Source)?;
                            let len = bytes.len() as u64;
                            let (c, b, k, ep) = (
                                self.client.clone(),
                                self.bucket.clone(),
                                self.chunk_key(&id),
                                self.endpoint.clone(),
                            );
                            set.spawn(
                                async move { put(&c, &b, k, bytes, &ep).await.map(|()| len) },
                            );
                        }
                    }
                }
                match set.join_next().await {
                    None => return Ok(()),
                    Some(joined) => progress(joined.expect("S3 PUT task panicked")?),
                }
            }
        })
    }

    /// Uploads a blob manifest. Push order matters: chunks first, manifest last, so a visible
    /// manifest always has all its chunks.
    pub fn put_manifest(&self, id: &BlobId, bytes: &[u8]) -> Result<(), RemoteError> {
        self.put_object(self.blob_key(id), bytes)
    }

    /// Downloads a blob manifest ([`RemoteError::NotFound`] if it was never pushed).
    pub fn get_manifest(&self, id: &BlobId) -> Result<Vec<u8>, RemoteError> {
        self.get_object(self.blob_key(id))
    }

    fn put_object(&self, key: String, bytes: &[u8]) -> Result<(), RemoteError> {
        let data = bytes.to_vec();
        self.rt
            .block_on(put(&self.client, &self.bucket, key, data, &self.endpoint))
    }

    fn get_object(&self, key: String) -> Result<Vec<u8>, RemoteError> {
        self.rt
            .block_on(get(&self.client, &self.bucket, key, &self.endpoint))
    }

    /// Whether a blob manifest exists in the remote.
    pub fn has_manifest(&self, id: &BlobId) -> Result<bool, RemoteError> {
        let key = self.blob_key(id);
        self.rt
            .block_on(head(&self.client, &self.bucket, key, &self.endpoint))
    }

    /// Every chunk in the remote with its last-modified time (for remote GC's grace period).
    pub fn list_chunks(&self) -> Result<Vec<Listed>, RemoteError> {
        self.list(format!("{}chunks/", self.prefix))
    }

    /// Every blob manifest in the remote.
    pub fn list_manifests(&self) -> Result<Vec<Listed>, RemoteError> {
        self.list(format!("{}blobs/", self.prefix))
    }

    /// Deletes chunks (batched DeleteObjects; missing ones are not an error).
    pub fn delete_chunks(&self, ids: &[ChunkId]) -> Result<(), RemoteError> {
        let keys: Vec<String> = ids.iter().map(|id| self.chunk_key(id)).collect();
        self.delete(keys)
    }

    /// Deletes blob manifests (missing ones are not an error).
    pub fn delete_manifests(&self, ids: &[BlobId]) -> Result<(), RemoteError> {
        let keys: Vec<String> = ids.iter().map(|id| self.blob_key(id)).collect();
        self.delete(keys)
    }

    /// Every bundle (named by its blob) with its last-modified time.
    pub fn list_bundles(&self) -> Result<Vec<Listed>, RemoteError> {
        self.list(format!("{}bundles/", self.prefix))
    }

    /// Deletes bundles (missing ones are not an error).
    pub fn delete_bundles(&self, ids: &[BlobId]) -> Result<(), RemoteError> {
        let keys: Vec<String> = ids.iter().map(|id| self.bundle_key(id)).collect();
        self.delete(keys)
    }

    /// Uploads blob `id`'s bundle, its bytes streamed from `pieces` in order: one PUT when it
    /// fits in one part ([`BUNDLE_PART`]), else a multipart upload with
    /// [`BUNDLE_PARTS_IN_FLIGHT`] parts in flight, so memory stays bounded however large it is.
    /// An error from `pieces` or S3 aborts the upload: no partial bundle becomes visible.
    pub fn put_bundle(
        &self,
        id: &BlobId,
        pieces: &mut dyn Iterator<Item = std::io::Result<Vec<u8>>>,
    ) -> Result<(), RemoteError> {
        let key = self.bundle_key(id);
        let mut next_part = || -> Result<Option<Vec<u8>>, RemoteError> {
            let mut part = Vec::new();
            while part.len() < BUNDLE_PART {
                match pieces.next() {
                    None => break,
                    Some(p) => part.extend_from_slice(&p.map_err(RemoteError::Source)?),
                }
            }
            Ok((!part.is_empty()).then_some(part))
        };
        let Some(first) = next_part()? else {
            return self.put_object(key, &[]);
        };
        let Some(second) = next_part()? else {
            return self
                .rt
                .block_on(put(&self.client, &self.bucket, key, first, &self.endpoint));
        };
        let up = self
            .rt
            .block_on(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&key)
                    .send(),
            )
            .map_err(|e| self.map_err("CREATE MULTIPART", key.clone(), e))?;
        let upload = up.upload_id().unwrap_or_default().to_string();
        let parts = [Ok(Some(first)), Ok(Some(second))]
            .into_iter()
            .chain(std::iter::from_fn(|| Some(next_part())))
            .map_while(|p| p.transpose());
        let r = self.upload_parts(&key, &upload, parts);
        if r.is_err() {
            let abort = self.rt.block_on(
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&key)
                    .upload_id(&upload)
                    .send(),
            );
            if let Err(e) = abort {
                warn!(key, "aborting a multipart upload failed: {e}");
            }
        }
        r
    }

    /// The parts of multipart upload `upload`, then its completion.
    fn upload_parts(
        &self,
        key: &str,
        upload: &str,
        parts: impl Iterator<Item = Result<Vec<u8>, RemoteError>>,
    ) -> Result<(), RemoteError> {
        let mut failed = None;
        let mut done = Vec::new();
        let futs = parts.enumerate().map_while(|(i, p)| {
            let body = match p {
                Ok(b) => b,
                Err(e) => {
                    failed = Some(e);
                    return None;
                }
            };
            let (client, bucket, key, upload, ep) = (
                self.client.clone(),
                self.bucket.clone(),
                key.to_string(),
                upload.to_string(),
                self.endpoint.clone(),
            );
            let n = i as i32 + 1;
            Some(async move {
                let r = client
                    .upload_part()
                    .bucket(&bucket)
                    .key(&key)
                    .upload_id(upload)
                    .part_number(n)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map_err(|e| map_sdk_error("PUT PART", &bucket, key, &ep, e))?;
                Ok(CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(r.e_tag().map(str::to_string))
                    .build())
            })
        });
        let mut s3_err = None;
        self.in_flight(futs, BUNDLE_PARTS_IN_FLIGHT, "PUT PART", |_, r| match r {
            Ok(p) => {
                done.push(p);
                true
            }
            Err(e) => {
                s3_err = Some(e);
                false
            }
        });
        if let Some(e) = failed.or(s3_err) {
            return Err(e);
        }
        done.sort_by_key(|p| p.part_number());
        self.rt
            .block_on(
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(done))
                            .build(),
                    )
                    .send(),
            )
            .map(|_| ())
            .map_err(|e| self.map_err("COMPLETE MULTIPART", key.to_string(), e))
    }

    /// The last `len` bytes of blob `id`'s bundle and the bundle's size; `Ok(None)` when
    /// there is no bundle. A server answering more than `len` bytes is an error.
    pub fn bundle_tail(
        &self,
        id: &BlobId,
        len: u64,
    ) -> Result<Option<(Vec<u8>, u64)>, RemoteError> {
        let key = self.bundle_key(id);
        let r = self.rt.block_on(get_range(
            &self.client,
            &self.bucket,
            key.clone(),
            format!("bytes=-{}", len.max(1)),
            len.max(1),
            &self.endpoint,
        ));
        let (body, range) = match r {
            Ok(x) => x,
            Err(RemoteError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        // "bytes FIRST-LAST/SIZE"; a server ignoring the range sent the whole object.
        let size = match range {
            None => body.len() as u64,
            Some(cr) => cr
                .rsplit_once('/')
                .and_then(|(_, n)| n.parse::<u64>().ok())
                .ok_or_else(|| RemoteError::Other {
                    op: "GET",
                    bucket: self.bucket.clone(),
                    key,
                    detail: format!("unexpected Content-Range {cr:?}"),
                })?,
        };
        Ok(Some((body, size)))
    }

    /// Reads byte ranges `(start, len)` of blob `id`'s bundle, [`BUNDLE_RANGES_IN_FLIGHT`] at
    /// once, calling `each(index, bytes)` on this thread as each arrives (so at most that many
    /// ranges are in memory). A range answered with other than `len` bytes is an error.
    pub fn bundle_ranges(
        &self,
        id: &BlobId,
        ranges: &[(u64, u64)],
        each: &mut dyn FnMut(usize, Result<Vec<u8>, RemoteError>),
    ) {
        let key = self.bundle_key(id);
        let futs = ranges.iter().map(|&(start, len)| {
            let (client, bucket, key, ep) = (
                self.client.clone(),
                self.bucket.clone(),
                key.clone(),
                self.endpoint.clone(),
            );
            async move {
                let last = start.saturating_add(len.max(1) - 1);
                let (body, _) = get_range(
                    &client,
                    &bucket,
                    key.clone(),
                    format!("bytes={start}-{last}"),
                    len,
                    &ep,
                )
                .await?;
                if body.len() as u64 != len {
                    return Err(RemoteError::Other {
                        op: "GET",
                        bucket,
                        key,
                        detail: format!("asked {len} bytes at {start}, got {}", body.len()),
                    });
                }
                Ok(body)
            }
        });
        self.in_flight(futs, BUNDLE_RANGES_IN_FLIGHT, "GET range", |i, r| {
            each(i, r);
            true
        });
    }

    fn list(&self, prefix: String) -> Result<Vec<Listed>, RemoteError> {
        Ok(self
            .list_bounded(prefix, usize::MAX)?
            .expect("unbounded listing completes"))
    }

    /// Lists `prefix`; `None` if it takes more than `max_pages` pages.
    fn list_bounded(
        &self,
        prefix: String,
        max_pages: usize,
    ) -> Result<Option<Vec<Listed>>, RemoteError> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            let mut pages = 0;
            loop {
                if pages == max_pages {
                    return Ok(None);
                }
                pages += 1;
                let r = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&prefix)
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| self.map_err("LIST", prefix.clone(), e))?;
                for obj in r.contents() {
                    let Some(key) = obj.key() else { continue };
                    // Foreign objects under our prefix (not a hex id) are skipped, not fatal.
                    let Ok(id) = key[prefix.len()..].parse::<Digest>() else {
                        continue;
                    };
                    let secs = obj.last_modified().map(|t| t.secs()).unwrap_or(0).max(0) as u64;
                    out.push(Listed {
                        id,
                        last_modified: UNIX_EPOCH + Duration::from_secs(secs),
                        size: obj.size().unwrap_or(0).max(0) as u64,
                    });
                }
                match r.next_continuation_token() {
                    Some(t) if r.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => return Ok(Some(out)),
                }
            }
        })
    }

    fn delete(&self, keys: Vec<String>) -> Result<(), RemoteError> {
        self.rt.block_on(async {
            // DeleteObjects takes at most 1000 keys per request.
            for batch in keys.chunks(1000) {
                let objects = batch
                    .iter()
                    .map(|k| ObjectIdentifier::builder().key(k).build())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| RemoteError::Config(e.to_string()))?;
                let delete = Delete::builder()
                    .set_objects(Some(objects))
                    .quiet(true)
                    .build()
                    .map_err(|e| RemoteError::Config(e.to_string()))?;
                let r = self
                    .client
                    .delete_objects()
                    .bucket(&self.bucket)
                    .delete(delete)
                    .send()
                    .await
                    .map_err(|e| self.map_err("DELETE", batch[0].clone(), e))?;
                if let Some(err) = r.errors().first() {
                    return Err(RemoteError::Other {
                        op: "DELETE",
                        bucket: self.bucket.clone(),
                        key: err.key().unwrap_or_default().to_string(),
                        detail: format!(
                            "{} {}",
                            err.code().unwrap_or_default(),
                            err.message().unwrap_or_default()
                        ),
                    });
                }
            }
            Ok(())
        })
    }

    fn map_err<E, R>(&self, op: &'static str, key: String, e: SdkError<E, R>) -> RemoteError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + HasStatus,
    {
        map_sdk_error(op, &self.bucket, key, &self.endpoint, e)
    }
}

/// The HTTP status of a raw response (lets `map_sdk_error` stay generic).
trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn status<E, R: HasStatus>(e: &SdkError<E, R>) -> Option<u16> {
    e.raw_response().map(|r| r.status_code())
}

fn map_sdk_error<E, R>(
    op: &'static str,
    bucket: &str,
    key: String,
    endpoint: &str,
    e: SdkError<E, R>,
) -> RemoteError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + HasStatus,
{
    let endpoint = endpoint.to_string();
    let bucket = bucket.to_string();
    match &e {
        SdkError::TimeoutError(_) => return RemoteError::Timeout { endpoint, op, key },
        SdkError::DispatchFailure(d) => {
            if d.is_timeout() {
                return RemoteError::Timeout { endpoint, op, key };
            }
            let detail = source_chain(&e);
            if detail.contains("credential") || detail.contains("Credential") {
                return RemoteError::NoCredentials { detail };
            }
            return RemoteError::Unreachable { endpoint, detail };
        }
        SdkError::ConstructionFailure(_) => {
            let detail = source_chain(&e);
            if detail.contains("credential") || detail.contains("Credential") {
                return RemoteError::NoCredentials { detail };
            }
            return RemoteError::Other {
                op,
                bucket,
                key,
                detail,
            };
        }
        _ => {}
    }
    let code = e.code().map(str::to_string);
    match (code.as_deref(), status(&e)) {
        (Some("NoSuchBucket"), _) => RemoteError::NoSuchBucket { bucket, endpoint },
        (Some("NoSuchKey" | "NotFound"), _) | (None, Some(404)) => {
            RemoteError::NotFound { bucket, key }
        }
        (
            Some(
                c @ ("AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidToken"
                | "ExpiredToken"
                | "AuthorizationHeaderMalformed"),
            ),
            _,
        ) => RemoteError::AccessDenied {
            bucket,
            code: c.to_string(),
        },
        (None, Some(403)) => RemoteError::AccessDenied {
            bucket,
            code: "403 Forbidden".into(),
        },
        (Some(c), s) => RemoteError::Other {
            op,
            bucket,
            key,
            detail: format!(
                "{c}: {} (HTTP {})",
                e.message().unwrap_or(""),
                s.unwrap_or(0)
            ),
        },
        (None, s) => RemoteError::Other {
            op,
            bucket,
            key,
            detail: format!("HTTP {}: {}", s.unwrap_or(0), source_chain(&e)),
        },
    }
}

/// "outer: inner: innermost" (the SDK's top-level Display is often just "dispatch failure").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}

async fn put(
    client: &Client,
    bucket: &str,
    key: String,
    bytes: Vec<u8>,
    endpoint: &str,
) -> Result<(), RemoteError> {
    client
        .put_object()
        .bucket(bucket)
        .key(&key)
        .body(ByteStream::from(bytes))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| map_sdk_error("PUT", bucket, key, endpoint, e))
}

async fn get(
    client: &Client,
    bucket: &str,
    key: String,
    endpoint: &str,
) -> Result<Vec<u8>, RemoteError> {
    let r = client
        .get_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .map_err(|e| map_sdk_error("GET", bucket, key.clone(), endpoint, e))?;
    let body = r.body.collect().await.map_err(|e| RemoteError::Other {
        op: "GET",
        bucket: bucket.to_string(),
        key,
        detail: format!("reading the body: {}", source_chain(&e)),
    })?;
    Ok(body.into_bytes().to_vec())
}

/// GET with a `Range` header, reading at most `max` bytes of body (a longer answer is an
/// error, so a hostile or broken server cannot make us allocate more); returns the body and
/// the Content-Range the server sent, if any.
async fn get_range(
    client: &Client,
    bucket: &str,
    key: String,
    range: String,
    max: u64,
    endpoint: &str,
) -> Result<(Vec<u8>, Option<String>), RemoteError> {
    let r = client
        .get_object()
        .bucket(bucket)
        .key(&key)
        .range(range)
        .send()
        .await
        .map_err(|e| map_sdk_error("GET", bucket, key.clone(), endpoint, e))?;
    let too_long = |n: u64| RemoteError::Other {
        op: "GET",
        bucket: bucket.to_string(),
        key: key.clone(),
        detail: format!("answered {n} bytes or more for a range of {max}"),
    };
    let announced = r.content_length().unwrap_or(0).max(0) as u64;
    if announced > max {
        return Err(too_long(announced));
    }
    let content_range = r.content_range().map(str::to_string);
    let mut body = r.body;
    let mut out = Vec::with_capacity(announced as usize);
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| RemoteError::Other {
            op: "GET",
            bucket: bucket.to_string(),
            key: key.clone(),
            detail: format!("reading the body: {}", source_chain(&e)),
        })?;
        if (out.len() + piece.len()) as u64 > max {
            return Err(too_long((out.len() + piece.len()) as u64));
        }
        out.extend_from_slice(&piece);
    }
    Ok((out, content_range))
}

async fn head(
    client: &Client,
    bucket: &str,
    key: String,
    endpoint: &str,
) -> Result<bool, RemoteError> {
    match client.head_object().bucket(bucket).key(&key).send().await {
        Ok(_) => Ok(true),
        Err(e) => match map_sdk_error("HEAD", bucket, key, endpoint, e) {
            RemoteError::NotFound { .. } => Ok(false),
            other => Err(other),
        },
    }
}

/// Ids present in `listed` (helper for GC-style set operations).
pub fn id_set(listed: &[Listed]) -> HashSet<Digest> {
    listed.iter().map(|l| l.id).collect()
}

/// Shared handle type the store keeps.
pub type SharedRemote = Arc<S3Remote>;

fn to_store_error(e: RemoteError) -> crate::Error {
    match e {
        RemoteError::NotFound { bucket, key } => {
            crate::Error::NotFound(format!("s3://{bucket}/{key} in the remote"))
        }
        other => crate::Error::remote(other),
    }
}

impl crate::tier::RemoteTier for S3Remote {
    fn put_chunk(&self, id: &ChunkId, compressed: &[u8]) -> crate::Result<()> {
        S3Remote::put_chunk(self, id, compressed).map_err(to_store_error)
    }
    fn get_chunk(&self, id: &ChunkId) -> crate::Result<Vec<u8>> {
        S3Remote::get_chunk(self, id).map_err(to_store_error)
    }
    fn get_chunks(&self, ids: &[ChunkId]) -> crate::Result<Vec<Vec<u8>>> {
        S3Remote::get_chunks(self, ids).map_err(to_store_error)
    }
    fn has_chunks(&self, ids: &[ChunkId]) -> crate::Result<Vec<bool>> {
        S3Remote::has_chunks(self, ids).map_err(to_store_error)
    }
    fn put_manifest(&self, id: &BlobId, bytes: &[u8]) -> crate::Result<()> {
        S3Remote::put_manifest(self, id, bytes).map_err(to_store_error)
    }
    fn get_manifest(&self, id: &BlobId) -> crate::Result<Vec<u8>> {
        S3Remote::get_manifest(self, id).map_err(to_store_error)
    }
    fn list_chunks(&self) -> crate::Result<Vec<(ChunkId, SystemTime)>> {
        let listed = S3Remote::list_chunks(self).map_err(to_store_error)?;
        Ok(listed
            .into_iter()
            .map(|l| (l.id, l.last_modified))
            .collect())
    }
    fn list_manifests(&self) -> crate::Result<Vec<BlobId>> {
        let listed = S3Remote::list_manifests(self).map_err(to_store_error)?;
        Ok(listed.into_iter().map(|l| l.id).collect())
    }
    fn delete_chunks(&self, ids: &[ChunkId]) -> crate::Result<()> {
        S3Remote::delete_chunks(self, ids).map_err(to_store_error)
    }
    fn put_ref(&self, name: &str, id: &BlobId) -> crate::Result<()> {
        crate::tier::check_ref_name(name)?;
        self.put_object(self.ref_key(name), id.to_hex().as_bytes())
            .map_err(to_store_error)
    }
    fn get_ref(&self, name: &str) -> crate::Result<Option<BlobId>> {
        crate::tier::check_ref_name(name)?;
        match self.get_object(self.ref_key(name)) {
            Ok(b) => crate::tier::parse_ref(name, &b).map(Some),
            Err(RemoteError::NotFound { .. }) => Ok(None),
            Err(e) => Err(to_store_error(e)),
        }
    }
    fn put_bundle(
        &self,
        blob: &BlobId,
        pieces: &mut dyn Iterator<Item = crate::Result<Vec<u8>>>,
    ) -> crate::Result<()> {
        // The store's own error (a local read) is kept as it is, not as an S3 failure.
        let mut source = None;
        let mut io = pieces.map(|p| {
            p.map_err(|e| {
                source = Some(e);
                std::io::Error::other("reading a chunk for the bundle failed")
            })
        });
        let r = S3Remote::put_bundle(self, blob, &mut io);
        drop(io);
        match source {
            Some(e) => Err(e),
            None => r.map_err(to_store_error),
        }
    }
    fn bundle_tail(&self, blob: &BlobId, len: u64) -> crate::Result<Option<(Vec<u8>, u64)>> {
        S3Remote::bundle_tail(self, blob, len).map_err(to_store_error)
    }
    fn bundle_ranges(
        &self,
        blob: &BlobId,
        ranges: &[(u64, u64)],
        each: &mut dyn FnMut(usize, crate::Result<Vec<u8>>),
    ) {
        S3Remote::bundle_ranges(self, blob, ranges, &mut |i, r| {
            each(i, r.map_err(to_store_error))
        })
    }
    fn list_bundles(&self) -> crate::Result<Vec<(BlobId, SystemTime)>> {
        let listed = S3Remote::list_bundles(self).map_err(to_store_error)?;
        Ok(listed
            .into_iter()
            .map(|l| (l.id, l.last_modified))
            .collect())
    }
    fn delete_bundles(&self, ids: &[BlobId]) -> crate::Result<()> {
        S3Remote::delete_bundles(self, ids).map_err(to_store_error)
    }
    fn describe(&self) -> String {
        format!("{} at {}", self.url(), self.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing_and_key_layout() {
        let cfg = RemoteConfig::from_url("s3://bkt/some/prefix/").unwrap();
        assert_eq!(cfg.bucket, "bkt");
        assert_eq!(cfg.prefix, "some/prefix");
        assert_eq!(cfg.url(), "s3://bkt/some/prefix");
        assert!(RemoteConfig::from_url("http://x").is_err());
        assert!(RemoteConfig::from_url("s3:///p").is_err());
        let cfg = RemoteConfig::from_url("s3://bkt").unwrap();
        assert_eq!(cfg.prefix, "");

        let r = S3Remote::connect(&RemoteConfig {
            endpoint: Some("http://127.0.0.1:1".into()),
            prefix: "p/q/".into(),
            ..cfg
        })
        .unwrap();
        let id = Digest::of(b"x");
        assert_eq!(r.chunk_key(&id), format!("p/q/chunks/{}", id.to_hex()));
        assert_eq!(r.blob_key(&id), format!("p/q/blobs/{}", id.to_hex()));
        assert_eq!(r.bundle_key(&id), format!("p/q/bundles/{}", id.to_hex()));
        assert_eq!(r.url(), "s3://bkt/p/q");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let cfg = RemoteConfig {
            bucket: "b".into(),
            credentials: Some(StaticCredentials {
                access_key_id: "AKID".into(),
                secret_access_key: "supersecret".into(),
            }),
            ..RemoteConfig::default()
        };
        let s = format!("{cfg:?}");
        assert!(s.contains("AKID") && !s.contains("supersecret"), "{s}");
    }

    #[test]
    fn unreachable_endpoint_fails_fast_and_clearly() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let r = S3Remote::connect(&RemoteConfig {
            endpoint: Some("http://127.0.0.1:1".into()),
            bucket: "b".into(),
            credentials: Some(StaticCredentials {
                access_key_id: "a".into(),
                secret_access_key: "b".into(),
            }),
            ..RemoteConfig::default()
        })
        .unwrap();
        let t = std::time::Instant::now();
        let err = r.get_chunk(&Digest::of(b"x")).unwrap_err();
        assert!(matches!(err, RemoteError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
    }
}
