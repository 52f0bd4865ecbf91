//! `kiln store ...` (blobs in the local block store) and `kiln remote ...` (S3 remotes).
//!
//! Remotes are kept in `KILN_HOME/remotes.json`: name, `s3://bucket/prefix`, endpoint and
//! region only. Credentials never go there; they come from the AWS default chain
//! (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws/credentials`, `AWS_PROFILE`, ...).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_blockstore::remote::{RemoteConfig, S3Remote};
use kiln_blockstore::{BlobId, PutOptions, Store};
use serde::{Deserialize, Serialize};

use crate::cli::{print_json, progress_bar, Home};

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Store a file as a blob and print its id
    #[command(after_help = "Examples:\n  \
        kiln store put disk.img --name base-disk\n  \
        kiln store put mem.bin --chunk-size 64K\n  \
        tar c rootfs | kiln store put - --name rootfs-tar")]
    Put {
        /// File to store (`-` reads standard input)
        file: PathBuf,
        /// Also point this name at the new blob
        #[arg(long)]
        name: Option<String>,
        /// Chunk size: a power of two from 4K to 16M (e.g. 64K, 512K, 4M) [default: 512K]
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
    },
    /// Write a blob to a file (zero ranges stay holes)
    #[command(after_help = "Examples:\n  \
        kiln store get base-disk -o /tmp/disk.img\n  \
        kiln store get 3f1c9a2e -o out.bin   # unique id prefix (>= 8 hex digits)")]
    Get {
        /// Blob name, id or unique id prefix
        blob: String,
        /// Output file (written atomically: complete or not at all)
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a blob (or a byte range of it) to standard output
    #[command(after_help = "Examples:\n  \
        kiln store cat base-disk | sha256sum\n  \
        kiln store cat base-disk --offset 1M --length 4096 | xxd | head")]
    Cat {
        /// Blob name, id or unique id prefix
        blob: String,
        /// Start at this byte offset (only the chunks of the range are read or fetched)
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// Read at most this many bytes [default: to the end]
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
    },
    /// List blobs in the local store, newest first
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a blob's size, chunking and how much of it is local
    Stat {
        /// Blob name, id or unique id prefix
        blob: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove blobs (and the names pointing at them); their chunks go at the next `gc`
    #[command(after_help = "Examples:\n  \
        kiln store rm old-disk && kiln store gc\n  \
        kiln store rm --name-only latest   # drop just the name")]
    Rm {
        /// Blob names, ids or unique id prefixes
        #[arg(required = true)]
        blobs: Vec<String>,
        /// Only remove the name, keep the blob
        #[arg(long)]
        name_only: bool,
    },
    /// Check every manifest and local chunk against its hash
    #[command(
        after_help = "Exits non-zero when something is damaged or missing. Runs offline unless \
        --repair or --remote is given; then it also confirms that the remote holds the chunks \
        that are not local.\n\n\
        Examples:\n  \
        kiln store verify\n  \
        kiln store verify --repair   # re-fetch damaged chunks from the default remote"
    )]
    Verify {
        /// Re-fetch damaged or missing chunks from the remote
        #[arg(long)]
        repair: bool,
        /// Remote to check against and repair from [default with --repair: the default remote]
        #[arg(long)]
        remote: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete chunks no blob references (and leftovers of interrupted writes)
    #[command(after_help = "Examples:\n  \
        kiln store gc\n  \
        kiln store gc --remote   # also delete unreferenced chunks (and bundles) in the default remote")]
    Gc {
        /// Also collect the remote: chunks no remote or local manifest references, and bundles
        /// of blobs the remote lacks (older than a grace period, so concurrent pushes from
        /// other hosts are safe)
        #[arg(long = "remote")]
        remote_too: bool,
        /// Remote to collect [default: the default remote]
        #[arg(long = "remote-name", value_name = "NAME")]
        remote_name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Upload a blob to a remote (only the chunks the remote lacks, then the manifest)
    #[command(after_help = "Examples:\n  \
        kiln store push base-disk\n  \
        kiln store push base-disk --remote backup")]
    Push(PushPullArgs),
    /// Make a remote blob available locally; its data is then fetched lazily on read
    #[command(after_help = "Examples:\n  \
        kiln store pull 9d0f...e3 --name base-disk   # full 64-digit id\n  \
        kiln store pull 9d0f...e3 --all              # also download every chunk now")]
    Pull {
        #[command(flatten)]
        args: PushPullArgs,
        /// Download every chunk now instead of lazily
        #[arg(long)]
        all: bool,
        /// Point this local name at the pulled blob
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Args)]
pub struct PushPullArgs {
    /// Blob name or id (pull needs the full 64-digit id)
    blob: String,
    /// Remote name [default: the default remote]
    #[arg(long)]
    remote: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum RemoteCommand {
    /// Add an S3-compatible remote (credentials come from the AWS environment, never stored)
    #[command(after_help = "The first remote added becomes the default.\n\
        Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials (AWS_PROFILE).\n\n\
        Examples:\n  \
        kiln remote add origin s3://kiln-store/prod --endpoint http://127.0.0.1:8333\n  \
        kiln remote add aws s3://my-bucket/kiln --region eu-west-1 --default")]
    Add {
        /// A short name for the remote
        name: String,
        /// Where blobs go: s3://BUCKET[/PREFIX]
        url: String,
        /// Endpoint URL of an S3-compatible server (path-style addressing is used); omit for AWS
        #[arg(long)]
        endpoint: Option<String>,
        /// Region [default: us-east-1]
        #[arg(long)]
        region: Option<String>,
        /// Make it the default remote
        #[arg(long)]
        default: bool,
        /// Do not check that the bucket is reachable with the current credentials
        #[arg(long)]
        no_check: bool,
    },
    /// List configured remotes
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Forget a remote (its data stays in the bucket)
    Rm { name: String },
}

// ---------------------------------------------------------------- remotes.json

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct RemoteEntry {
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    region: Option<String>,
}

#[derive(Serialize, Deserialize, Default, Debug)]
struct Remotes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<String>,
    #[serde(default)]
    remotes: BTreeMap<String, RemoteEntry>,
}

fn remotes_path(home: &Home) -> PathBuf {
    home.root().join("remotes.json")
}

impl Remotes {
    fn load(home: &Home) -> Result<Remotes> {
        let p = remotes_path(home);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Remotes::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Written to a temp file and renamed, so a crash never leaves half a file.
    fn save(&self, home: &Home) -> Result<()> {
        let p = remotes_path(home);
        std::fs::create_dir_all(home.root())
            .with_context(|| format!("creating {}", home.root().display()))?;
        let json = serde_json::to_string_pretty(self)?;
        kiln_atomicfile::write(&p, json.as_bytes(), kiln_atomicfile::Options::DURABLE)
            .with_context(|| format!("writing {}", p.display()))
    }

    /// The named remote, or the default one. `Ok(None)` when none is configured and none asked.
    fn pick(&self, name: Option<&str>) -> Result<Option<(String, RemoteEntry)>> {
        match name {
            Some(n) => match self.remotes.get(n) {
                Some(e) => Ok(Some((n.to_string(), e.clone()))),
                None => bail!(
                    "no remote named {n:?} (configured: {})",
                    self.names_for_message()
                ),
            },
            None => Ok(self
                .default
                .as_ref()
                .and_then(|d| self.remotes.get(d).map(|e| (d.clone(), e.clone())))),
        }
    }

    fn names_for_message(&self) -> String {
        if self.remotes.is_empty() {
            "none; add one with `kiln remote add`".into()
        } else {
            self.remotes.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }
}

fn remote_config(e: &RemoteEntry) -> Result<RemoteConfig> {
    let mut cfg = RemoteConfig::from_url(&e.url)?;
    cfg.endpoint = e.endpoint.clone();
    cfg.region = e.region.clone();
    Ok(cfg)
}

fn connect(name: &str, e: &RemoteEntry) -> Result<Arc<S3Remote>> {
    let cfg = remote_config(e)?;
    let r = S3Remote::connect(&cfg).with_context(|| format!("remote {name:?} ({})", e.url))?;
    Ok(Arc::new(r))
}

// ---------------------------------------------------------------- store commands

fn open_store(home: &Home) -> Result<Store> {
    let dir = home.store_dir();
    Store::open(&dir).with_context(|| format!("opening the block store in {}", dir.display()))
}

/// Opens the store with `remote` (or the default remote) attached. When `required`, having no
/// remote is an error; otherwise the store works local-only.
pub(crate) fn open_with_remote(home: &Home, remote: Option<&str>, required: bool) -> Result<Store> {
    let store = open_store(home)?;
    match Remotes::load(home)?.pick(remote)? {
        Some((name, entry)) => {
            tracing::debug!(remote = %name, url = %entry.url, "attaching remote");
            store.set_remote(connect(&name, &entry)?);
        }
        None if required => bail!(
            "no remote configured: add one with `kiln remote add NAME s3://BUCKET/PREFIX \
             --endpoint URL`"
        ),
        None => {}
    }
    Ok(store)
}

/// The name of the default remote, if one is configured.
pub(crate) fn default_remote_name(home: &Home) -> Result<Option<String>> {
    Ok(Remotes::load(home)?.default)
}

fn resolve(store: &Store, blob: &str) -> Result<BlobId> {
    store
        .resolve(blob)
        .with_context(|| format!("resolving {blob:?}"))
}

pub fn run(home: &Home, c: StoreCommand) -> Result<()> {
    run_store(home, c).map_err(tidy)
}

pub fn run_remote(home: &Home, c: RemoteCommand) -> Result<()> {
    run_remote_inner(home, c).map_err(tidy)
}

/// Drops links of an error chain that only repeat the previous link (library errors often
/// show their source in their own message), so `error: a: b: b` prints as `error: a: b`.
fn tidy(e: anyhow::Error) -> anyhow::Error {
    let mut parts: Vec<String> = Vec::new();
    for link in e.chain() {
        let t = link.to_string();
        if !parts.last().is_some_and(|p| p.contains(&t)) {
            parts.push(t);
        }
    }
    anyhow::anyhow!(parts.join(": "))
}

fn run_store(home: &Home, c: StoreCommand) -> Result<()> {
    match c {
        StoreCommand::Put {
            file,
            name,
            chunk_size,
        } => put(home, &file, name, chunk_size),
        StoreCommand::Get { blob, output } => {
            let store = open_with_remote(home, None, false)?;
            let id = resolve(&store, &blob)?;
            store
                .export(&id, &output)
                .with_context(|| format!("writing blob {id} to {}", output.display()))
        }
        StoreCommand::Cat {
            blob,
            offset,
            length,
        } => cat(home, &blob, offset, length),
        StoreCommand::Ls { json } => {
            let store = open_store(home)?;
            let list = store.list()?;
            if json {
                return print_json(&list);
            }
            println!("{:<16}  {:>12}  {:>8}  NAMES", "ID", "SIZE", "CHUNK");
            for b in list {
                println!(
                    "{:<16}  {:>12}  {:>8}  {}",
                    &b.id.to_hex()[..16],
                    human(b.size),
                    human(b.chunk_size as u64),
                    b.names.join(",")
                );
            }
            Ok(())
        }
        StoreCommand::Stat { blob, json } => {
            let store = open_store(home)?;
            let id = resolve(&store, &blob)?;
            let st = store.stat(&id)?;
            if json {
                return print_json(&st);
            }
            println!("id:            {}", st.id);
            println!("names:         {}", st.names.join(", "));
            println!("size:          {} ({} bytes)", human(st.size), st.size);
            println!("chunk size:    {}", human(st.chunk_size as u64));
            println!(
                "chunks:        {} ({} all-zero, {} distinct stored)",
                st.chunks, st.zero_chunks, st.unique_chunks
            );
            println!(
                "local:         {} of {} distinct chunks, {} compressed",
                st.local_chunks,
                st.unique_chunks,
                human(st.local_bytes)
            );
            Ok(())
        }
        StoreCommand::Rm { blobs, name_only } => {
            let store = open_store(home)?;
            for b in blobs {
                if name_only {
                    if !store.remove_name(&b)? {
                        bail!("no name {b:?}");
                    }
                    continue;
                }
                let id = resolve(&store, &b)?;
                store.remove_blob(&id)?;
                println!("{id}");
            }
            Ok(())
        }
        StoreCommand::Verify {
            repair,
            remote,
            json,
        } => verify(home, repair, remote, json),
        StoreCommand::Gc {
            remote_too,
            remote_name,
            json,
        } => {
            let store = open_with_remote(home, remote_name.as_deref(), remote_too)?;
            let rep = store.gc(remote_too)?;
            if json {
                return print_json(&rep);
            }
            println!(
                "{} live blobs; removed {} chunks ({}), {} temp files, {} stale pins; \
                 merged {} small packs; evicted {} chunks; {} remote chunks and {} remote \
                 bundles removed",
                rep.live_blobs,
                rep.chunks_removed,
                human(rep.bytes_freed),
                rep.tmp_files_removed,
                rep.stale_pins_removed,
                rep.packs_merged,
                rep.chunks_evicted,
                rep.remote_chunks_removed,
                rep.remote_bundles_removed
            );
            Ok(())
        }
        StoreCommand::Push(a) => push(home, a),
        StoreCommand::Pull { args, all, name } => pull(home, args, all, name),
    }
}

fn verify(home: &Home, repair: bool, remote: Option<String>, json: bool) -> Result<()> {
    // Without --repair or --remote, verify is purely local (works offline); remote-only
    // chunks are then trusted from the local record of what was pushed or pulled.
    let store = if repair || remote.is_some() {
        open_with_remote(home, remote.as_deref(), true)?
    } else {
        open_store(home)?
    };
    let rep = store.verify(repair)?;
    if json {
        print_json(&rep)?;
    } else {
        println!(
            "{} blobs, {} chunks checked, {} remote-only",
            rep.blobs, rep.chunks_checked, rep.remote_only
        );
        for c in &rep.damaged {
            println!("damaged chunk {c}");
        }
        for c in &rep.missing {
            println!("missing chunk {c}");
        }
        for c in &rep.repaired {
            println!("repaired chunk {c}");
        }
        for b in &rep.corrupt_manifests {
            println!("corrupt manifest {b}");
        }
        for p in &rep.damaged_packs {
            println!("damaged pack index {}", p.display());
        }
        println!("{}", if rep.ok { "ok" } else { "NOT OK" });
    }
    if !rep.ok {
        bail!(
            "store is damaged{}",
            if repair {
                " and could not be fully repaired"
            } else {
                " (try `kiln store verify --repair`)"
            }
        );
    }
    Ok(())
}

fn put(home: &Home, file: &Path, name: Option<String>, chunk_size: Option<u64>) -> Result<()> {
    let store = open_store(home)?;
    let chunk_size = match chunk_size {
        None => None,
        Some(cs) => Some(u32::try_from(cs).context("chunk size too large")?),
    };
    let stdin = file.as_os_str() == "-";
    let total = if stdin {
        0
    } else {
        std::fs::metadata(file)
            .with_context(|| format!("reading {}", file.display()))?
            .len()
    };
    let bar = progress_bar(total, "put");
    let b2 = bar.clone();
    let opts = PutOptions {
        chunk_size,
        name,
        progress: Some(Arc::new(move |n| b2.set_position(n))),
    };
    let id = if stdin {
        store.put_reader(std::io::stdin().lock(), &opts)
    } else {
        store.put_file(file, &opts)
    }
    .with_context(|| format!("storing {}", file.display()))?;
    bar.finish_and_clear();
    println!("{id}");
    Ok(())
}

fn cat(home: &Home, blob: &str, offset: u64, length: Option<u64>) -> Result<()> {
    let store = open_with_remote(home, None, false)?;
    let id = resolve(&store, blob)?;
    let r = store.open_blob(&id)?;
    let end = match length {
        Some(l) => offset.saturating_add(l).min(r.len()),
        None => r.len(),
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; (r.manifest().chunk_size as usize).max(64 * 1024)];
    let mut off = offset;
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = r
            .read_at(off, &mut buf[..want])
            .with_context(|| format!("reading blob {id} at offset {off}"))?;
        if n == 0 {
            break;
        }
        match out.write_all(&buf[..n]) {
            Ok(()) => {}
            // `kiln store cat X | head` is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
        off += n as u64;
    }
    out.flush().ok();
    Ok(())
}

fn push(home: &Home, a: PushPullArgs) -> Result<()> {
    let store = open_with_remote(home, a.remote.as_deref(), true)?;
    let id = resolve(&store, &a.blob)?;
    let st = store.stat(&id)?;
    let bar = progress_bar(st.local_bytes, "push");
    let rep = store
        .push(&id, &|n| bar.set_position(n))
        .with_context(|| format!("pushing blob {id}"))?;
    bar.finish_and_clear();
    if a.json {
        return print_json(&rep);
    }
    eprintln!(
        "pushed {}: {} of {} chunks uploaded ({})",
        id,
        rep.chunks_uploaded,
        rep.chunks,
        human(rep.bytes_uploaded)
    );
    println!("{id}");
    Ok(())
}

#[derive(Serialize)]
struct PullReport {
    blob: BlobId,
    size: u64,
    chunks: u64,
    chunks_fetched: u64,
    bytes_fetched: u64,
}

fn pull(home: &Home, a: PushPullArgs, all: bool, name: Option<String>) -> Result<()> {
    let store = open_with_remote(home, a.remote.as_deref(), true)?;
    let id: BlobId = match store.lookup_name(&a.blob)? {
        Some(id) => id,
        None => a.blob.parse().with_context(|| {
            format!(
                "pull needs a blob's full 64-digit id (or a local name), got {:?}",
                a.blob
            )
        })?,
    };
    store
        .pull(&id)
        .with_context(|| format!("pulling blob {id}"))?;
    if let Some(n) = &name {
        store.set_name(n, &id)?;
    }
    let st = store.stat(&id)?;
    if all {
        // Reading every chunk fetches and keeps it locally (fetches are verified by hash).
        let r = store.open_blob(&id)?;
        let bar = progress_bar(r.len(), "pull");
        let mut buf = vec![0u8; r.manifest().chunk_size as usize];
        let mut off = 0;
        while off < r.len() {
            let n = r
                .read_at(off, &mut buf)
                .with_context(|| format!("fetching blob {id} at offset {off}"))?;
            off += n as u64;
            bar.set_position(off);
        }
        bar.finish_and_clear();
    }
    let stats = store.stats();
    let rep = PullReport {
        blob: id,
        size: st.size,
        chunks: st.unique_chunks,
        chunks_fetched: stats.remote_chunk_fetches,
        bytes_fetched: stats.remote_bytes_fetched,
    };
    if a.json {
        return print_json(&rep);
    }
    eprintln!(
        "pulled {}: {} in {} chunks{}",
        id,
        human(rep.size),
        rep.chunks,
        if all {
            format!(
                ", fetched {} ({})",
                rep.chunks_fetched,
                human(rep.bytes_fetched)
            )
        } else {
            " (data is fetched lazily on read)".into()
        }
    );
    println!("{id}");
    Ok(())
}

// ---------------------------------------------------------------- remote commands

#[derive(Serialize)]
struct RemoteRow<'a> {
    name: &'a str,
    url: &'a str,
    endpoint: Option<&'a str>,
    region: Option<&'a str>,
    default: bool,
}

fn run_remote_inner(home: &Home, c: RemoteCommand) -> Result<()> {
    let mut remotes = Remotes::load(home)?;
    match c {
        RemoteCommand::Add {
            name,
            url,
            endpoint,
            region,
            default,
            no_check,
        } => {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!("bad remote name {name:?}: use letters, digits, '-', '_' or '.'");
            }
            let entry = RemoteEntry {
                url,
                endpoint,
                region,
            };
            // Validates the URL and endpoint before anything is saved.
            let remote = connect(&name, &entry)?;
            if !no_check {
                remote.check().with_context(|| {
                    format!(
                        "checking remote {name:?} ({}); use --no-check to add it anyway",
                        entry.url
                    )
                })?;
            }
            remotes.remotes.insert(name.clone(), entry);
            if default || remotes.default.is_none() {
                remotes.default = Some(name);
            }
            remotes.save(home)
        }
        RemoteCommand::Ls { json } => {
            let rows: Vec<RemoteRow> = remotes
                .remotes
                .iter()
                .map(|(n, e)| RemoteRow {
                    name: n,
                    url: &e.url,
                    endpoint: e.endpoint.as_deref(),
                    region: e.region.as_deref(),
                    default: remotes.default.as_deref() == Some(n),
                })
                .collect();
            if json {
                return print_json(&rows);
            }
            for r in rows {
                println!(
                    "{}{}\t{}\t{}",
                    r.name,
                    if r.default { " (default)" } else { "" },
                    r.url,
                    r.endpoint.unwrap_or("AWS")
                );
            }
            Ok(())
        }
        RemoteCommand::Rm { name } => {
            if remotes.remotes.remove(&name).is_none() {
                bail!(
                    "no remote named {name:?} (configured: {})",
                    remotes.names_for_message()
                );
            }
            if remotes.default.as_deref() == Some(name.as_str()) {
                // Keep a default when exactly one remote is left; otherwise make it explicit.
                remotes.default = if remotes.remotes.len() == 1 {
                    remotes.remotes.keys().next().cloned()
                } else {
                    None
                };
            }
            remotes.save(home)
        }
    }
}

// ---------------------------------------------------------------- helpers

/// "512K", "4M", "1G", "4096", "64KiB" -> bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("unknown size unit in {s:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy_drops_repeated_links() {
        #[derive(Debug)]
        struct Inner;
        impl std::fmt::Display for Inner {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("cannot reach S3")
            }
        }
        impl std::error::Error for Inner {}
        #[derive(Debug)]
        struct Outer(Inner);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "remote: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Outer(Inner)).context("pushing blob x");
        assert_eq!(
            format!("{:#}", tidy(e)),
            "pushing blob x: remote: cannot reach S3"
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("K").is_err());
    }

    #[test]
    fn remotes_file_round_trips_and_picks_default() {
        let dir = std::env::temp_dir().join(format!("kiln-remotes-{}", std::process::id()));
        let home = Home::resolve(Some(dir.clone()));
        let mut r = Remotes::default();
        assert!(r.pick(None).unwrap().is_none());
        r.remotes.insert(
            "a".into(),
            RemoteEntry {
                url: "s3://b/p".into(),
                endpoint: Some("http://127.0.0.1:1".into()),
                region: None,
            },
        );
        r.default = Some("a".into());
        r.save(&home).unwrap();
        let back = Remotes::load(&home).unwrap();
        assert_eq!(back.pick(None).unwrap().unwrap().0, "a");
        assert!(back.pick(Some("zz")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
