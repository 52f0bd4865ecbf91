//! `kiln image ...` and `kiln build`.
use crate::cli::{print_json, Home};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use kiln_imagebuilder::build::{BuildOptions, Isolation};
use kiln_imagebuilder::oci::PullOptions;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from an OCI registry (plain http for localhost/127.0.0.1 or --insecure)
    Pull {
        /// e.g. 127.0.0.1:5000/busybox:1 or docker.io/library/debian:12
        reference: String,
        /// Local name (default: the reference)
        #[arg(long)]
        name: Option<String>,
        /// Use plain http for this registry
        #[arg(long)]
        insecure: bool,
        /// Accept character/block device nodes in layers
        #[arg(long)]
        allow_devices: bool,
    },
    /// Import `oci:DIR[:TAG]` or `docker-archive:FILE`
    Import {
        source: String,
        /// Local name for the image
        name: String,
        #[arg(long)]
        allow_devices: bool,
    },
    /// List images
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show an image's record (disk, layers, config, history)
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an image name
    Rm { name: String },
    /// Give an image another name
    Tag { name: String, new_name: String },
    /// Write an image's ext4 disk to a file
    Export {
        name: String,
        #[arg(short, long)]
        output: std::path::PathBuf,
    },
    /// Push an image (record, disk, layers) to a remote; prints the image id
    Push {
        name: String,
        /// Remote name [default: the default remote]
        #[arg(long)]
        remote: Option<String>,
    },
    /// Make an image pushed from another home usable here (manifests now, data lazily)
    PullFromRemote {
        /// Image id (as printed by `push`), or a local image name to re-fetch
        id_or_name: String,
        /// Local name [default: ID_OR_NAME]
        #[arg(long)]
        name: Option<String>,
        /// Remote name [default: the default remote]
        #[arg(long)]
        remote: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum IsolationArg {
    Namespace,
    Vm,
}

/// Build a VM image from a Dockerfile.
#[derive(Args)]
pub struct BuildArgs {
    /// Build context directory
    context: std::path::PathBuf,
    /// Name of the resulting image (without: only its id is printed)
    #[arg(short = 't', long = "tag")]
    tag: Option<String>,
    /// Dockerfile (default: CONTEXT/Dockerfile)
    #[arg(short = 'f', long = "file")]
    file: Option<std::path::PathBuf>,
    /// KEY=VALUE build arguments
    #[arg(long = "build-arg")]
    build_args: Vec<String>,
    /// Stop at this stage
    #[arg(long)]
    target: Option<String>,
    /// Ignore the step cache
    #[arg(long)]
    no_cache: bool,
    /// Where RUN executes: namespace (Linux namespaces on the host) or vm (a Linux microVM per
    /// RUN step through the guest agent; needs hardware virtualization, a guest kernel and a
    /// static kiln-agent, see scripts/linux-guest/README.md)
    #[arg(long, value_enum, default_value = "namespace")]
    isolation: IsolationArg,
    /// Guest kernel for --isolation=vm (default: KILN_GUEST_KERNEL, then the
    /// scripts/linux-guest/build-kernel cache)
    #[arg(long)]
    kernel: Option<std::path::PathBuf>,
    /// RUN steps' network: host (default) or none
    #[arg(long, default_value = "host")]
    network: String,
    /// Memory limit for RUN steps in MiB (cgroup v2 memory.max)
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Plain http for registries FROM pulls from
    #[arg(long)]
    insecure: bool,
    /// Print the build report as JSON on stdout
    #[arg(long)]
    json: bool,
    /// Reuse steps pushed to a remote by other machines: `--cache-from` (the default remote)
    /// or `--cache-from=REMOTE`; their data is fetched lazily, only what the build reads
    #[arg(long, value_name = "REMOTE", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    cache_from: Option<String>,
    /// Push the build's steps and image to a remote: `--cache-to` (the default remote) or
    /// `--cache-to=REMOTE`
    #[arg(long, value_name = "REMOTE", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    cache_to: Option<String>,
    /// Make every step's disk again from its layer instead of using the cached one (checks
    /// that the block-level cache gives what a build from scratch gives)
    #[arg(long, hide = true)]
    redo_disks: bool,
}

/// The local store, with the default remote attached if one is configured: an image pulled
/// from a remote has its data fetched lazily, on export, build or boot.
fn open_store(home: &Home) -> anyhow::Result<kiln_blockstore::Store> {
    crate::store::open_with_remote(home, None, false)
}

/// Where staging root file systems and disk images are made: KILN_TMPDIR, else /dev/shm (tmpfs:
/// these files are deleted right after, and on the store's file system the store's syncfs would
/// write them all to disk first), else `<home>/tmp`.
fn tmp_dir(home: &Home) -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("KILN_TMPDIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.join("kiln-tmp");
    }
    home.root().join("tmp")
}

pub fn run(home: &Home, c: ImageCommand) -> anyhow::Result<()> {
    // These two open the store with a remote attached; the rest work on the local store only.
    let c = match c {
        ImageCommand::Push { name, remote } => return push(home, &name, remote.as_deref()),
        ImageCommand::PullFromRemote {
            id_or_name,
            name,
            remote,
        } => return pull_from_remote(home, id_or_name, name, remote.as_deref()),
        other => other,
    };
    let store = open_store(home)?;
    match c {
        ImageCommand::Pull {
            reference,
            name,
            insecure,
            allow_devices,
        } => {
            let opts = PullOptions {
                insecure,
                allow_devices,
                ..Default::default()
            };
            let progress = PullBars::new();
            let (id, rec) = kiln_imagebuilder::oci::pull_with_progress(
                &store,
                &tmp_dir(home),
                &reference,
                name.as_deref(),
                &opts,
                &progress,
            )
            .with_context(|| format!("pulling {reference}"))?;
            println!("{id} disk {} ({} layers)", rec.disk, rec.layers.len());
        }
        ImageCommand::Import {
            source,
            name,
            allow_devices,
        } => {
            let opts = PullOptions {
                allow_devices,
                ..Default::default()
            };
            let (id, rec) =
                kiln_imagebuilder::oci::import(&store, &tmp_dir(home), &source, &name, &opts)
                    .with_context(|| format!("importing {source}"))?;
            println!("{id} disk {} ({} layers)", rec.disk, rec.layers.len());
        }
        ImageCommand::Ls { json } => {
            let list = kiln_imagebuilder::image::list(&store)?;
            if json {
                return print_json(&list);
            }
            println!(
                "{:<40} {:<16} {:<16} {:>10} SOURCE",
                "NAME", "ID", "DISK", "SIZE"
            );
            for i in list {
                println!(
                    "{:<40} {:<16} {:<16} {:>9}M {}",
                    i.name,
                    &i.id.to_hex()[..16],
                    &i.disk.to_hex()[..16],
                    i.disk_size >> 20,
                    i.source
                );
            }
        }
        ImageCommand::Inspect { name, json } => {
            let (id, rec) = kiln_imagebuilder::image::lookup(&store, &name)?;
            if json {
                return print_json(&serde_json::json!({ "id": id, "record": rec }));
            }
            println!("id:       {id}");
            println!("disk:     {} ({} MiB)", rec.disk, rec.disk_size >> 20);
            println!("source:   {}", rec.source);
            if let Some(p) = &rec.parent {
                println!("parent:   {p}");
            }
            println!("layers:   {}", rec.layers.len());
            println!("env:      {:?}", rec.config.env);
            println!("entrypoint: {:?}", rec.config.entrypoint);
            println!("cmd:      {:?}", rec.config.cmd);
            println!("workdir:  {:?}", rec.config.workdir);
            println!("user:     {:?}", rec.config.user);
            for h in &rec.history {
                println!("  {h}");
            }
        }
        ImageCommand::Rm { name } => kiln_imagebuilder::image::remove(&store, &name)?,
        ImageCommand::Tag { name, new_name } => {
            let (id, _) = kiln_imagebuilder::image::lookup(&store, &name)?;
            kiln_imagebuilder::image::tag(&store, &new_name, &id)?;
        }
        ImageCommand::Export { name, output } => {
            let (_, rec) = kiln_imagebuilder::image::lookup(&store, &name)?;
            store
                .export(&rec.disk, &output)
                .with_context(|| format!("exporting to {}", output.display()))?;
            eprintln!("wrote {} ({} bytes)", output.display(), rec.disk_size);
        }
        // Handled above, before the store was opened.
        ImageCommand::Push { .. } | ImageCommand::PullFromRemote { .. } => {}
    }
    Ok(())
}

/// Pull progress on stderr: a byte bar per layer when stderr is a terminal, else one line per
/// layer when it is down (logs and CI stay readable). stdout is left alone.
struct PullBars {
    /// Bars for a terminal, None otherwise.
    multi: Option<indicatif::MultiProgress>,
    layers: std::cell::RefCell<std::collections::HashMap<usize, PullLayer>>,
}

struct PullLayer {
    label: String,
    bar: indicatif::ProgressBar,
    done: u64,
    started: std::time::Instant,
}

impl PullBars {
    fn new() -> PullBars {
        use std::io::IsTerminal;
        PullBars {
            multi: std::io::stderr()
                .is_terminal()
                .then(indicatif::MultiProgress::new),
            layers: Default::default(),
        }
    }
}

impl kiln_imagebuilder::oci::PullProgress for PullBars {
    fn layer_start(&self, index: usize, count: usize, digest: &str, size: u64) {
        let short = digest.strip_prefix("sha256:").unwrap_or(digest);
        let label = format!(
            "layer {}/{count} {}",
            index + 1,
            &short[..short.len().min(12)]
        );
        let bar = match &self.multi {
            Some(m) => m.add(crate::cli::progress_bar(size, &label)),
            None => indicatif::ProgressBar::hidden(),
        };
        let layer = PullLayer {
            label,
            bar,
            done: 0,
            started: std::time::Instant::now(),
        };
        self.layers.borrow_mut().insert(index, layer);
    }

    fn layer_bytes(&self, index: usize, done: u64) {
        if let Some(l) = self.layers.borrow_mut().get_mut(&index) {
            l.done = done;
            l.bar.set_position(done);
        }
    }

    fn layer_done(&self, index: usize) {
        let layers = self.layers.borrow();
        let Some(l) = layers.get(&index) else { return };
        if self.multi.is_some() {
            l.bar.finish();
        } else {
            let secs = l.started.elapsed().as_secs_f64();
            eprintln!(
                "{}: {} bytes in {secs:.2} s ({:.1} MB/s)",
                l.label,
                l.done,
                l.done as f64 / secs.max(1e-6) / 1e6
            );
        }
    }

    fn message(&self, msg: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => eprintln!("{msg}"),
        }
    }
}

fn push(home: &Home, name: &str, remote: Option<&str>) -> anyhow::Result<()> {
    let store = crate::store::open_with_remote(home, remote, true)?;
    let (id, _) = kiln_imagebuilder::image::lookup(&store, name)?;
    let bytes = kiln_imagebuilder::image::push(&store, &id)
        .with_context(|| format!("pushing image {name}"))?;
    println!("{id}");
    eprintln!("{bytes} bytes uploaded");
    Ok(())
}

fn pull_from_remote(
    home: &Home,
    id_or_name: String,
    name: Option<String>,
    remote: Option<&str>,
) -> anyhow::Result<()> {
    let store = crate::store::open_with_remote(home, remote, true)?;
    let id = match id_or_name.parse::<kiln_blockstore::BlobId>() {
        Ok(id) => id,
        Err(_) => {
            kiln_imagebuilder::image::lookup(&store, &id_or_name)
                .with_context(|| {
                    format!("{id_or_name:?} is neither an image id nor a local image")
                })?
                .0
        }
    };
    let name = name.unwrap_or(id_or_name);
    // Later commands attach only the default remote, so data left in another remote would be
    // out of reach: from a remote named explicitly, fetch the data now, before the name is set.
    if let Some(r) = remote {
        if crate::store::default_remote_name(home)?.as_deref() != Some(r) {
            let fetch = || -> anyhow::Result<u64> {
                store.pull(&id)?;
                let rec = kiln_imagebuilder::image::get_record(&store, &id)?;
                let mut chunks = store.prefetch(&id)?;
                for b in rec.layers.iter().chain([&rec.disk]) {
                    store.pull(b)?;
                    chunks += store
                        .prefetch(b)
                        .with_context(|| format!("fetching blob {b}"))?;
                }
                Ok(chunks)
            };
            let chunks =
                fetch().with_context(|| format!("fetching image {id} from remote {r:?}"))?;
            eprintln!("fetched {chunks} chunks from {r:?} (not the default remote)");
        }
    }
    let rec = kiln_imagebuilder::image::pull(&store, &id, &name)
        .with_context(|| format!("pulling image {id} from the remote"))?;
    println!("{id} disk {} ({} layers)", rec.disk, rec.layers.len());
    Ok(())
}

pub fn build(home: &Home, a: BuildArgs) -> anyhow::Result<()> {
    // One remote per store: --cache-from and --cache-to name the same one (empty = default).
    let remote = match (a.cache_from.as_deref(), a.cache_to.as_deref()) {
        (Some(f), Some(t)) if f != t => anyhow::bail!(
            "--cache-from {f:?} and --cache-to {t:?}: one remote per build (the same for both)"
        ),
        (Some(r), _) | (None, Some(r)) => Some(r),
        (None, None) => None,
    };
    let store = match remote {
        Some(r) => crate::store::open_with_remote(home, Some(r).filter(|r| !r.is_empty()), true)?,
        None => open_store(home)?,
    };
    let mut build_args = std::collections::HashMap::new();
    for kv in &a.build_args {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--build-arg {kv:?}: expected KEY=VALUE"))?;
        build_args.insert(k.to_string(), v.to_string());
    }
    let network = match a.network.as_str() {
        "host" | "default" => true,
        "none" => false,
        other => anyhow::bail!("--network {other}: use host or none"),
    };
    let opts = BuildOptions {
        context: a.context.clone(),
        dockerfile: a.file.clone(),
        tag: a.tag.clone(),
        build_args,
        target: a.target.clone(),
        no_cache: a.no_cache,
        network,
        isolation: match a.isolation {
            IsolationArg::Namespace => Isolation::Namespace,
            IsolationArg::Vm => Isolation::Vm,
        },
        memory_max: a.memory_mib.map(|m| m << 20),
        insecure_registry: a.insecure,
        guest_kernel: a.kernel.clone(),
        cache_from: a.cache_from.is_some(),
        cache_to: a.cache_to.is_some(),
        redo_disks: a.redo_disks,
    };
    let report = kiln_imagebuilder::build::build(&store, &tmp_dir(home), &opts, &mut |line| {
        eprintln!("{line}")
    })?;
    if a.json {
        print_json(&report)?;
    } else {
        println!("{}", report.image);
    }
    Ok(())
}
