//! Dockerfile builds with a step cache in the block store.
//!
//! Every instruction extends a chain key: `key = blake3(parent key, instruction after variable
//! expansion, what it reads)`, where "what it reads" is the deterministic layer tar a COPY would
//! write (so the content, names and modes of the context files, not their mtimes), the key of a
//! `--from` stage, the build args in scope for RUN. A step that changes files stores its result
//! as an OCI layer tar blob plus a small JSON step record named `cache:<key>`; the final image
//! is named `cache:<final key>` too. So a rebuild with nothing changed only hashes context files
//! and looks names up, and a changed COPY input reruns from that step on.
//!
//! The record also names the step's ext4 disk (see [`crate::stepdisk`]), and the step's upper
//! directory is kept in the step-tree cache. So a cache hit only records the step's layer and
//! disk; the first miss mounts the stage root from the cached trees (a tree not cached is
//! applied from its layer once) and continues the disk chain from the last hit's disk. With
//! `cache_from`/`cache_to` the records and their blobs also live in the store's remote, under
//! `build-cache/<key>`.

use crate::dockerfile::{self, Args, Dockerfile, Instruction};
use crate::error::{Error, IoCtx, Result};
use crate::image::{self, ImageConfig, ImageRecord};
use crate::layer::{self, ApplyOptions};
use crate::stage::{self, OverlayRoot};
use crate::step_jail;
use crate::stepdisk;
use kiln_blockstore::{BlobId, PutOptions, Store};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

mod cache;
mod context;
mod copy;
mod run;

pub use crate::build_cache::StepRecord;
use crate::build_cache::{self, chain};
use context::*;

/// Where RUN executes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// Linux namespaces + chroot + cgroup limits on the host.
    #[default]
    Namespace,
    /// Inside a microVM through the guest agent.
    Vm,
}

/// Everything `kiln build` takes.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub context: PathBuf,
    /// Default: `<context>/Dockerfile`.
    pub dockerfile: Option<PathBuf>,
    /// Name for the image (None: only the image id is reported).
    pub tag: Option<String>,
    pub build_args: HashMap<String, String>,
    pub target: Option<String>,
    pub no_cache: bool,
    /// Give RUN steps the host's network (default true in the CLI).
    pub network: bool,
    pub isolation: Isolation,
    pub memory_max: Option<u64>,
    /// For FROM images that must be pulled.
    pub insecure_registry: bool,
    /// Guest kernel for `Isolation::Vm` (default: KILN_GUEST_KERNEL, then the build-kernel cache).
    pub guest_kernel: Option<PathBuf>,
    /// Look steps missing here up in the store's remote (pulled lazily: manifests now, data
    /// when read).
    pub cache_from: bool,
    /// Push the build's steps and image to the store's remote, named by their keys.
    pub cache_to: bool,
    /// Ignore the disks of cached steps and make each again from its layer and the previous
    /// step's disk (a check that the block-level cache gives what a build from scratch gives).
    pub redo_disks: bool,
}

/// One step of a build, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub stage: usize,
    pub line: usize,
    pub instruction: String,
    pub cached: bool,
    pub layer: Option<BlobId>,
    /// Uncompressed size of the step's layer tar.
    pub layer_bytes: u64,
    /// New bytes the store wrote for it (compressed chunks not already present).
    pub stored_bytes: u64,
    pub millis: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BuildReport {
    pub image: BlobId,
    pub disk: BlobId,
    pub tag: Option<String>,
    /// Whether the whole image came from the cache.
    pub cached: bool,
    /// New bytes the store wrote for the final ext4 disk (its config; a fresh mkfs when the
    /// step disks could not be used).
    pub disk_stored_bytes: u64,
    /// New bytes the store wrote in all: layers, step disks, records.
    pub stored_bytes: u64,
    /// Chunks fetched from the remote (steps reused from another machine).
    pub remote_chunks_fetched: u64,
    /// Bytes uploaded to the remote by `cache_to`.
    pub pushed_bytes: u64,
    pub steps: Vec<StepReport>,
}

/// Paths a stage's disks have that its trees lack: the image config for the guest agent.
const DISK_EXTRA: &[(&str, bool)] = &[(".kiln", true), (image::CONFIG_PATH_IN_DISK, false)];

/// A build stage in progress.
struct StageState {
    key: blake3::Hash,
    layers: Vec<BlobId>,
    /// The step key of each layer (None for the FROM image's): names its cached tree.
    layer_keys: Vec<Option<blake3::Hash>>,
    config: ImageConfig,
    parent: Option<String>,
    /// How many of `layers` (the first ones) are the FROM image's: the base tree comes from
    /// the extracted-tree cache.
    base_layers: usize,
    /// The FROM image's disk, where the stage's chain of step disks starts (its working copy's
    /// name), and the disk after the steps so far (None: no base image, or a step could not
    /// update it; the final disk is then made with mkfs).
    chain_root: Option<BlobId>,
    disk: Option<BlobId>,
    disk_size: u64,
    /// Staging root (mounted lazily) and how many of `layers` are applied to it.
    rootfs: Option<OverlayRoot>,
    applied: usize,
    /// ARG values in scope (declared in this stage).
    args: HashMap<String, String>,
    history: Vec<String>,
}

struct Builder<'a> {
    /// Before `work`: fields drop in order, and the stages' overlay mounts (inside `work`)
    /// must be gone before `work` is deleted.
    stages: Vec<Option<StageState>>,
    store: &'a Store,
    tmp: &'a Path,
    work: tempfile::TempDir,
    opts: &'a BuildOptions,
    df: Dockerfile,
    ignore: Vec<(bool, Vec<String>)>,
    steps: Vec<StepReport>,
    progress: &'a mut dyn FnMut(&str),
    global_args: HashMap<String, String>,
    /// Set with `--isolation=vm`.
    vm_env: Option<crate::vm_isolation::VmEnv>,
    /// Step records used or made (key, record id), for `cache_to`.
    records: Vec<(blake3::Hash, BlobId)>,
    /// Scratch directories made so far (for unique names).
    scratch_seq: usize,
}

/// Builds the Dockerfile described by `opts` and tags the result.
pub fn build(
    store: &Store,
    tmp: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<BuildReport> {
    if let Some(t) = &opts.tag {
        image::check_name(t)?;
    }
    // Fails before any work when the host, kernel or agent is missing.
    let vm_env = match opts.isolation {
        Isolation::Vm => Some(crate::vm_isolation::check(opts.guest_kernel.as_deref())?),
        Isolation::Namespace => None,
    };
    let df_path = opts
        .dockerfile
        .clone()
        .unwrap_or_else(|| opts.context.join("Dockerfile"));
    let text = std::fs::read_to_string(&df_path).ctx("read Dockerfile", &df_path)?;
    let file = df_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "Dockerfile".into());
    let df = dockerfile::parse(&text, &file)?;
    let ignore = read_dockerignore(&opts.context);
    std::fs::create_dir_all(tmp).ctx("mkdir", tmp)?;
    stage::clean_stale_builds(tmp);
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(tmp)
        .ctx("create build dir in", tmp)?;
    stage::claim_build_dir(work.path())?;
    let mut global_args = HashMap::new();
    for a in &df.global_args {
        let (k, v) = parse_arg(a, &df.file, &HashMap::new())?;
        let v = opts.build_args.get(&k).cloned().or(v).unwrap_or_default();
        global_args.insert(k, v);
    }
    let n = df.stages.len();
    let mut b = Builder {
        store,
        tmp,
        work,
        opts,
        df,
        ignore,
        stages: (0..n).map(|_| None).collect(),
        steps: Vec::new(),
        progress,
        global_args,
        vm_env,
        records: Vec::new(),
        scratch_seq: 0,
    };
    let stats0 = store.stats();
    let target = match &opts.target {
        Some(t) => b
            .stage_index(t)
            .ok_or_else(|| Error::Build(format!("no stage named {t:?} (--target)")))?,
        None => n - 1,
    };
    b.build_stage(target)?;
    let mut report = b.finish(target)?;
    let stats = store.stats();
    report.stored_bytes = stats.bytes_written.saturating_sub(stats0.bytes_written);
    report.remote_chunks_fetched = stats
        .remote_chunk_fetches
        .saturating_sub(stats0.remote_chunk_fetches);
    Ok(report)
}

fn parse_arg(
    ins: &Instruction,
    file: &str,
    vars: &HashMap<String, String>,
) -> Result<(String, Option<String>)> {
    let Args::Shell(s) = &ins.args else {
        return Err(derr(file, ins, "ARG takes NAME[=default]"));
    };
    let words = dockerfile::expand_words(s, vars).map_err(|e| derr(file, ins, e))?;
    let [w] = words.as_slice() else {
        return Err(derr(file, ins, "ARG takes one NAME[=default]"));
    };
    Ok(match w.split_once('=') {
        Some((k, v)) => (k.to_string(), Some(v.to_string())),
        None => (w.clone(), None),
    })
}

fn derr(file: &str, ins: &Instruction, msg: impl Into<String>) -> Error {
    Error::Dockerfile {
        file: file.to_string(),
        line: ins.line,
        msg: msg.into(),
    }
}

impl Builder<'_> {
    fn stage_index(&self, name: &str) -> Option<usize> {
        let lname = name.to_ascii_lowercase();
        self.df
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(lname.as_str()))
            .or_else(|| {
                name.parse::<usize>()
                    .ok()
                    .filter(|&i| i < self.df.stages.len())
            })
    }

    fn say(&mut self, s: &str) {
        (self.progress)(s);
    }

    /// Variables visible to expansion in a stage: ENV then stage ARGs.
    fn vars(st: &StageState) -> HashMap<String, String> {
        let mut v: HashMap<String, String> = st.args.clone();
        for kv in &st.config.env {
            if let Some((k, val)) = kv.split_once('=') {
                v.insert(k.to_string(), val.to_string());
            }
        }
        v
    }

    fn build_stage(&mut self, idx: usize) -> Result<()> {
        if self.stages[idx].is_some() {
            return Ok(());
        }
        let stage = self.df.stages[idx].clone();
        let file = self.df.file.clone();
        let Args::Shell(from_s) = &stage.from.args else {
            unreachable!("parser checks FROM")
        };
        let base_word = from_s.split_whitespace().next().unwrap_or_default();
        let base = dockerfile::expand_words(base_word, &self.global_args)
            .map_err(|e| derr(&file, &stage.from, e))?
            .join("");
        self.say(&format!("[stage {idx}] FROM {base}"));
        let mut st = if base == "scratch" {
            StageState {
                key: chain(&blake3::hash(b""), &[b"FROM scratch"]),
                layers: Vec::new(),
                layer_keys: Vec::new(),
                config: ImageConfig::default(),
                parent: None,
                base_layers: 0,
                chain_root: None,
                disk: None,
                disk_size: 0,
                rootfs: None,
                applied: 0,
                args: HashMap::new(),
                history: Vec::new(),
            }
        } else if let Some(src) = self.stage_index(&base).filter(|&s| s < idx) {
            self.build_stage(src)?;
            let s = self.stages[src].as_ref().expect("built");
            StageState {
                key: chain(&s.key, &[b"FROM stage"]),
                layers: s.layers.clone(),
                layer_keys: s.layer_keys.clone(),
                config: s.config.clone(),
                parent: s.parent.clone(),
                base_layers: s.base_layers,
                chain_root: s.chain_root,
                disk: s.disk,
                disk_size: s.disk_size,
                rootfs: None,
                applied: 0,
                args: HashMap::new(),
                history: s.history.clone(),
            }
        } else {
            let (id, rec) = self.base_image(&base)?;
            StageState {
                key: chain(&blake3::hash(b""), &[b"FROM image", id.as_bytes()]),
                layers: rec.layers.clone(),
                layer_keys: vec![None; rec.layers.len()],
                config: rec.config.clone(),
                parent: Some(format!("{base} ({id})")),
                base_layers: rec.layers.len(),
                chain_root: Some(rec.disk),
                disk: Some(rec.disk),
                disk_size: rec.disk_size,
                rootfs: None,
                applied: 0,
                args: HashMap::new(),
                history: Vec::new(),
            }
        };
        for ins in &stage.instructions {
            let t0 = std::time::Instant::now();
            self.step(idx, &mut st, ins).map_err(|e| match e {
                e @ (Error::Dockerfile { .. } | Error::RunFailed { .. }) => e,
                Error::Build(m) if m.starts_with(&format!("{file}:")) => Error::Build(m),
                other => Error::Build(format!("{file}:{}: {}: {other}", ins.line, ins.keyword)),
            })?;
            if let Some(last) = self.steps.last_mut() {
                if last.line == ins.line && last.stage == idx {
                    last.millis = t0.elapsed().as_millis() as u64;
                }
            }
        }
        self.stages[idx] = Some(st);
        Ok(())
    }

    /// A FROM image: a local image by that name, else pulled.
    fn base_image(&mut self, base: &str) -> Result<(BlobId, ImageRecord)> {
        match image::lookup(self.store, base) {
            Ok(x) => Ok(x),
            Err(Error::ImageNotFound(_)) => {
                self.say(&format!("  pulling {base}"));
                let opts = crate::oci::PullOptions {
                    insecure: self.opts.insecure_registry,
                    ..Default::default()
                };
                crate::oci::pull(self.store, self.tmp, base, None, &opts, &|m| {
                    eprintln!("  {m}")
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure the stage's staging root is mounted with all its layers: each step's from
    /// the step cache, or applied from its layer (and then kept in the cache).
    fn materialize(&mut self, idx: usize, st: &mut StageState) -> Result<PathBuf> {
        if st.rootfs.is_none() {
            let base = if st.base_layers > 0 {
                Some(stage::base_tree(
                    self.store,
                    self.tmp,
                    &st.layers[..st.base_layers],
                )?)
            } else {
                None
            };
            let dir = self.work.path().join(format!("stage-{idx}"));
            st.rootfs = Some(OverlayRoot::new(&dir, base)?);
            st.applied = st.base_layers;
        }
        while st.applied < st.layers.len() {
            let i = st.applied;
            let name = st.layer_keys[i].map(|k| stage::step_tree_name(&k, &st.layers[i]));
            let cached = match &name {
                Some(n) => stage::step_tree(self.tmp, n)?,
                None => None,
            };
            let ov = st.rootfs.as_mut().expect("set above");
            match cached {
                Some(t) => ov.push_lower(t)?,
                None => {
                    let t = std::time::Instant::now();
                    ov.seal()?;
                    let root = ov.root()?;
                    image::materialize(self.store, &st.layers[i..=i], &root)?;
                    if let Some(u) = ov.take_upper()? {
                        let tree = match &name {
                            Some(n) => stage::adopt_step_tree(self.tmp, n, &u)?,
                            None => stage::BaseTree::uncached(u),
                        };
                        ov.push_lower(tree)?;
                    }
                    tracing::info!(
                        stage = idx,
                        layer = i,
                        ms = t.elapsed().as_millis() as u64,
                        "layer applied (its tree was not cached)"
                    );
                }
            }
            st.applied += 1;
        }
        st.rootfs.as_mut().expect("set above").root()
    }

    fn scratch(&mut self, what: &str) -> PathBuf {
        self.scratch_seq += 1;
        self.work
            .path()
            .join(format!("{what}-{}", self.scratch_seq))
    }

    /// Updates the stage's disk with its top layer (the last step's upper directory, just
    /// pushed): the step's disk, sharing every unchanged chunk with the previous one.
    fn step_disk(&mut self, idx: usize, st: &mut StageState) -> Result<()> {
        let (Some(from), Some(chain_root)) = (st.disk, st.chain_root) else {
            return Ok(());
        };
        let scratch = self.scratch("disk");
        let ov = st.rootfs.as_mut().expect("materialized");
        ov.unmount()?;
        let n = ov.layers();
        let changed: BTreeSet<PathBuf> = layer::scan_upper(ov.layer(n - 1))?.into_keys().collect();
        let sdir = self.work.path().join(format!("stage-{idx}"));
        let before = ov.view(n - 1, &sdir.join("lo"))?;
        let after = ov.view(n, &sdir.join("hi"))?;
        let wd = stepdisk::open(self.tmp, &chain_root)?;
        let disk = wd.update(
            self.store,
            &from,
            before.path(),
            DISK_EXTRA,
            after.path(),
            &changed,
            &scratch,
        )?;
        drop((after, before, wd));
        let _ = std::fs::remove_dir_all(&scratch);
        if let Some(d) = disk {
            image::keep(self.store, &d)?;
        } else {
            tracing::info!(
                stage = idx,
                "the disk cannot take this step: mkfs at the end"
            );
        }
        st.disk = disk;
        Ok(())
    }

    fn step(&mut self, idx: usize, st: &mut StageState, ins: &Instruction) -> Result<()> {
        let file = self.df.file.clone();
        let vars = Self::vars(st);
        let words = |s: &str| dockerfile::expand_words(s, &vars).map_err(|e| derr(&file, ins, e));
        let shell = st
            .config
            .shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
        let as_cmd = |a: &Args| match a {
            Args::Exec(v) => v.clone(),
            Args::Shell(s) => {
                let mut v = shell.clone();
                v.push(s.clone());
                v
            }
        };
        st.history.push(ins.original.clone());
        match ins.keyword.as_str() {
            "ENV" | "LABEL" => {
                let Args::Shell(s) = &ins.args else {
                    return Err(derr(&file, ins, "expects KEY=VALUE pairs"));
                };
                let w = words(s)?;
                let mut pairs = Vec::new();
                if w.len() >= 2 && !w[0].contains('=') && ins.keyword == "ENV" {
                    // Legacy `ENV KEY value with spaces`.
                    pairs.push((w[0].clone(), w[1..].join(" ")));
                } else {
                    for x in &w {
                        let (k, v) = x
                            .split_once('=')
                            .ok_or_else(|| derr(&file, ins, format!("{x:?} is not KEY=VALUE")))?;
                        pairs.push((k.to_string(), v.to_string()));
                    }
                }
                if pairs.is_empty() {
                    return Err(derr(&file, ins, "needs at least one KEY=VALUE"));
                }
                for (k, v) in pairs {
                    if ins.keyword == "ENV" {
                        st.config.env_set(&k, &v);
                    } else {
                        st.config.labels.insert(k, v);
                    }
                }
                self.meta_step(st, ins);
            }
            "ARG" => {
                let (k, default) = parse_arg(ins, &file, &vars)?;
                let v = self
                    .opts
                    .build_args
                    .get(&k)
                    .cloned()
                    .or(default)
                    .or_else(|| self.global_args.get(&k).cloned())
                    .unwrap_or_default();
                st.args.insert(k.clone(), v.clone());
                st.key = chain(&st.key, &[b"ARG", k.as_bytes(), v.as_bytes()]);
            }
            "EXPOSE" => {
                let Args::Shell(s) = &ins.args else {
                    return Err(derr(&file, ins, "EXPOSE takes ports"));
                };
                for p in words(s)? {
                    let p = if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    };
                    if !st.config.exposed_ports.contains(&p) {
                        st.config.exposed_ports.push(p);
                    }
                }
                self.meta_step(st, ins);
            }
            "CMD" => {
                st.config.cmd = Some(as_cmd(&ins.args));
                self.meta_step(st, ins);
            }
            "ENTRYPOINT" => {
                st.config.entrypoint = Some(as_cmd(&ins.args));
                self.meta_step(st, ins);
            }
            "SHELL" => {
                let Args::Exec(v) = &ins.args else {
                    return Err(derr(&file, ins, "SHELL must be a JSON array"));
                };
                if v.is_empty() {
                    return Err(derr(&file, ins, "SHELL needs a program"));
                }
                st.config.shell = Some(v.clone());
                self.meta_step(st, ins);
            }
            "USER" => {
                let Args::Shell(s) = &ins.args else {
                    return Err(derr(&file, ins, "USER takes a name"));
                };
                let u = words(s)?.join(" ");
                if u.is_empty() {
                    return Err(derr(&file, ins, "USER needs a user"));
                }
                st.config.user = Some(u);
                self.meta_step(st, ins);
            }
            "MAINTAINER" | "STOPSIGNAL" | "VOLUME" | "HEALTHCHECK" | "ONBUILD" => {
                tracing::warn!(
                    line = ins.line,
                    "{} is recorded in history only",
                    ins.keyword
                );
                self.meta_step(st, ins);
            }
            "WORKDIR" => {
                let Args::Shell(s) = &ins.args else {
                    return Err(derr(&file, ins, "WORKDIR takes a path"));
                };
                let p = words(s)?.join(" ");
                let abs = resolve_in(st.config.workdir.as_deref().unwrap_or("/"), &p);
                st.config.workdir = Some(abs.clone());
                let key = chain(&st.key, &[b"WORKDIR", abs.as_bytes()]);
                if let Some(rec) = self.lookup_cache(&key)? {
                    return self.cache_hit(idx, st, ins, key, rec);
                }
                self.say(&format!("  {}: {}", ins.line, ins.original));
                let root = self.fresh_upper(idx, st)?;
                mkdir_in_root(&root, &abs)?;
                let layer = self.upper_layer(st)?;
                self.record_step(idx, st, ins, key, layer.as_deref())?;
            }
            "RUN" => self.run_step(idx, st, ins, &vars, &shell)?,
            "COPY" | "ADD" => self.copy_step(idx, st, ins, &vars)?,
            other => return Err(derr(&file, ins, format!("{other} is not supported"))),
        }
        Ok(())
    }

    /// A step that only changes the config: its effect is in the key, nothing is stored.
    fn meta_step(&mut self, st: &mut StageState, ins: &Instruction) {
        let cfg = serde_json::to_vec(&st.config).expect("serializes");
        st.key = chain(&st.key, &[b"META", ins.original.as_bytes(), &cfg]);
    }

    /// The stage's root, mounted with an empty upper directory: what happens to it until
    /// [`Self::upper_layer`] is one step's change.
    fn fresh_upper(&mut self, idx: usize, st: &mut StageState) -> Result<PathBuf> {
        self.materialize(idx, st)?;
        let ov = st.rootfs.as_mut().expect("materialized");
        ov.seal()?;
        ov.root()
    }

    /// Writes what changed since [`Self::fresh_upper`] as a layer file; None when nothing did.
    /// The upper directory stays for [`Self::record_step`].
    fn upper_layer(&self, st: &mut StageState) -> Result<Option<PathBuf>> {
        let ov = st.rootfs.as_mut().expect("materialized");
        ov.unmount()?;
        let path = self.work.path().join(format!(
            "layer-{}.tar",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let f = std::fs::File::create(&path).ctx("create", &path)?;
        let mut w = std::io::BufWriter::new(f);
        let n = layer::write_upper(ov.upper(), &mut w)?;
        w.flush().ctx("write", &path)?;
        if n == 0 {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(path))
    }

    fn finish(mut self, target: usize) -> Result<BuildReport> {
        let mut st = self.stages[target].take().expect("target built");
        let final_key = chain(&st.key, &[b"IMAGE"]);
        let cache_name = build_cache::local_name(&final_key);
        if let Some(id) = self.cached_image(&cache_name, &final_key)? {
            if let Ok(rec) = image::get_record(self.store, &id) {
                self.name_image(&id, true)?;
                let pushed_bytes = self.push_cache(&final_key, &id)?;
                return Ok(BuildReport {
                    image: id,
                    disk: rec.disk,
                    tag: self.opts.tag.clone(),
                    cached: true,
                    disk_stored_bytes: 0,
                    stored_bytes: 0,
                    remote_chunks_fetched: 0,
                    pushed_bytes,
                    steps: self.steps,
                });
            }
        }
        let before = self.store.stats().bytes_written;
        let (disk, disk_size) = match self.config_disk(&st)? {
            Some(d) => (d, st.disk_size),
            None => {
                let root = self.materialize(target, &mut st)?;
                self.say("  writing ext4 disk (mkfs)");
                let scratch = self.scratch("final");
                std::fs::create_dir_all(&scratch).ctx("mkdir", &scratch)?;
                image::commit_rootfs(self.store, &root, &st.config, &st.layers, &scratch)?
            }
        };
        let disk_stored_bytes = self.store.stats().bytes_written.saturating_sub(before);
        let df_name = self.df.file.clone();
        let rec = ImageRecord {
            schema: 1,
            disk,
            disk_size,
            layers: st.layers.clone(),
            config: st.config.clone(),
            parent: st.parent.clone(),
            source: format!("build {df_name}"),
            history: st.history.clone(),
        };
        let id = image::put_record(self.store, &rec)?;
        image::set_name_once(self.store, &cache_name, &id)?;
        self.name_image(&id, false)?;
        let pushed_bytes = self.push_cache(&final_key, &id)?;
        Ok(BuildReport {
            image: id,
            disk,
            tag: self.opts.tag.clone(),
            cached: false,
            disk_stored_bytes,
            stored_bytes: 0,
            remote_chunks_fetched: 0,
            pushed_bytes,
            steps: self.steps,
        })
    }

    /// Tags the image if the build has a tag, and says so.
    fn name_image(&mut self, id: &BlobId, cached: bool) -> Result<()> {
        let how = if cached { " (cached)" } else { "" };
        match self.opts.tag.clone() {
            Some(t) => {
                image::tag(self.store, &t, id)?;
                self.say(&format!("image {id}{how} tagged {t}"));
            }
            None => self.say(&format!("image {id}{how}")),
        }
        Ok(())
    }

    /// The final disk: the last step's disk with the image config written into it. None when
    /// the stage has no step disk (no base image, or a step could not update it).
    fn config_disk(&mut self, st: &StageState) -> Result<Option<BlobId>> {
        let (Some(from), Some(chain_root)) = (st.disk, st.chain_root) else {
            return Ok(None);
        };
        let dir = self.scratch("config");
        let (tree, empty) = (dir.join("tree"), dir.join("empty"));
        std::fs::create_dir_all(&tree).ctx("mkdir", &tree)?;
        std::fs::create_dir_all(&empty).ctx("mkdir", &empty)?;
        image::write_config(&tree, &st.config)?;
        let changed: BTreeSet<PathBuf> = [".kiln", image::CONFIG_PATH_IN_DISK]
            .into_iter()
            .map(PathBuf::from)
            .collect();
        let wd = stepdisk::open(self.tmp, &chain_root)?;
        let disk = wd.update(
            self.store,
            &from,
            &empty,
            DISK_EXTRA,
            &tree,
            &changed,
            &dir.join("scratch"),
        )?;
        if let Some(d) = disk {
            image::keep(self.store, &d)?;
        }
        Ok(disk)
    }
}
