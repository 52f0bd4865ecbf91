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
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub(crate) const CACHE_PREFIX: &str = "cache:";

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

/// A cached step result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub layer: Option<BlobId>,
    pub layer_bytes: u64,
    /// The stage's ext4 disk after this step (without the final config), when the stage has
    /// one (a base image) and the step could update it.
    #[serde(default)]
    pub disk: Option<BlobId>,
}

impl StepRecord {
    pub(crate) fn referenced(&self) -> Vec<BlobId> {
        self.layer.into_iter().chain(self.disk).collect()
    }
}

/// Paths a stage's disks have that its trees lack: the image config for the guest agent.
const DISK_EXTRA: &[(&str, bool)] = &[(".kiln", true), (image::CONFIG_PATH_IN_DISK, false)];

/// The remote's name for the step or image of a key (remote names take no `:`).
fn remote_cache_name(key: &blake3::Hash) -> String {
    format!("build-cache/{}", key.to_hex())
}

pub(crate) fn get_step(store: &Store, id: &BlobId) -> Result<StepRecord> {
    let mut r = image::BlobRead::open(store, id)?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut buf).ctx("read", "step record")?;
    serde_json::from_slice(&buf).map_err(|e| Error::Invalid(format!("not a step record: {e}")))
}

fn chain(parent: &blake3::Hash, parts: &[&[u8]]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"kiln-step-v1");
    h.update(parent.as_bytes());
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()
}

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
                    allow_devices: false,
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

    /// The cached step of `key`: here, else (with `cache_from`) on the remote.
    fn lookup_cache(&mut self, key: &blake3::Hash) -> Result<Option<(BlobId, StepRecord)>> {
        if self.opts.no_cache {
            return Ok(None);
        }
        let name = format!("{CACHE_PREFIX}{}", key.to_hex());
        if let Some(id) = self.store.lookup_name(&name)? {
            if let Ok(rec) = get_step(self.store, &id) {
                return Ok(Some((id, rec)));
            }
        }
        if !self.opts.cache_from {
            return Ok(None);
        }
        let remote = || -> Result<Option<(BlobId, StepRecord)>> {
            let Some(id) = self.store.remote_name(&remote_cache_name(key))? else {
                return Ok(None);
            };
            self.store.pull(&id)?;
            let rec = get_step(self.store, &id)?;
            // Manifests only: the data comes when read.
            for b in rec.referenced() {
                self.store.pull(&b)?;
                image::keep(self.store, &b)?;
            }
            self.store.set_name(&name, &id)?;
            Ok(Some((id, rec)))
        };
        match remote() {
            Ok(found) => Ok(found),
            Err(e) => {
                tracing::warn!(error = %e, "step cache on the remote not reachable: a miss");
                Ok(None)
            }
        }
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

    /// Stores a step that ran: its layer, its upper directory as a cached tree (the next
    /// step's lower layer), its disk, then the record naming them under `cache:<key>`, last,
    /// so a kill never leaves a record pointing at something missing.
    fn record_step(
        &mut self,
        idx: usize,
        st: &mut StageState,
        ins: &Instruction,
        key: blake3::Hash,
        layer_file: Option<&Path>,
    ) -> Result<()> {
        let before = self.store.stats().bytes_written;
        let upper = match st.rootfs.as_mut() {
            Some(ov) => ov.take_upper()?,
            None => None,
        };
        // The step's tree on top (uncached until its layer id names it), so its disk can be
        // made while the layer is stored: both only read the upper directory.
        let with_tree = match (&upper, layer_file) {
            (Some(u), Some(_)) => {
                let ov = st.rootfs.as_mut().expect("had an upper");
                ov.push_lower(stage::BaseTree::uncached(u.clone()))?;
                true
            }
            _ => false,
        };
        let store = self.store;
        let (put, disk) = std::thread::scope(|s| {
            let put = s.spawn(move || -> Result<Option<(BlobId, u64)>> {
                let Some(p) = layer_file else { return Ok(None) };
                let size = std::fs::metadata(p).ctx("stat", p)?.len();
                Ok(Some((store.put_file(p, &PutOptions::default())?, size)))
            });
            let disk = if with_tree {
                self.step_disk(idx, st)
            } else {
                Ok(())
            };
            (put.join().expect("layer put does not panic"), disk)
        });
        let put = put?;
        disk?;
        let (layer, layer_bytes) = match put {
            Some((l, size)) => (Some(l), size),
            None => (None, 0),
        };
        if let Some(l) = layer {
            image::keep(self.store, &l)?;
            st.layers.push(l);
            st.layer_keys.push(Some(key));
            st.applied = st.layers.len();
            if let Some(u) = &upper {
                let name = stage::step_tree_name(&key, &l);
                let tree = stage::adopt_step_tree(self.tmp, &name, u)?;
                st.rootfs
                    .as_mut()
                    .expect("had an upper")
                    .replace_top(tree)?;
            }
        } else if let Some(u) = upper {
            let _ = std::fs::remove_dir_all(u);
        }
        let rec = StepRecord {
            layer,
            layer_bytes,
            disk: st.disk,
        };
        let rid = self.store.put_bytes(
            &serde_json::to_vec(&rec).expect("serializes"),
            &PutOptions::default(),
        )?;
        image::set_name_once(self.store, &format!("{CACHE_PREFIX}{}", key.to_hex()), &rid)?;
        self.records.push((key, rid));
        let stored = self.store.stats().bytes_written.saturating_sub(before);
        self.steps.push(StepReport {
            stage: idx,
            line: ins.line,
            instruction: ins.original.clone(),
            cached: false,
            layer,
            layer_bytes,
            stored_bytes: stored,
            millis: 0,
        });
        st.key = key;
        Ok(())
    }

    fn cache_hit(
        &mut self,
        idx: usize,
        st: &mut StageState,
        ins: &Instruction,
        key: blake3::Hash,
        (rid, rec): (BlobId, StepRecord),
    ) -> Result<()> {
        self.say(&format!("  {}: {} (cached)", ins.line, ins.original));
        if let Some(l) = rec.layer {
            st.layers.push(l);
            st.layer_keys.push(Some(key));
            if self.opts.redo_disks && st.disk.is_some() {
                // The step's tree on top, and its disk made again from it.
                let n0 = st.rootfs.as_ref().map_or(0, |o| o.layers());
                self.materialize(idx, st)?;
                if st.rootfs.as_ref().map_or(0, |o| o.layers()) == n0 + 1 {
                    self.step_disk(idx, st)?;
                }
            } else if st.disk.is_some() {
                st.disk = rec.disk;
            }
        }
        self.records.push((key, rid));
        self.steps.push(StepReport {
            stage: idx,
            line: ins.line,
            instruction: ins.original.clone(),
            cached: true,
            layer: rec.layer,
            layer_bytes: rec.layer_bytes,
            stored_bytes: 0,
            millis: 0,
        });
        st.key = key;
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

    fn run_step(
        &mut self,
        idx: usize,
        st: &mut StageState,
        ins: &Instruction,
        vars: &HashMap<String, String>,
        shell: &[String],
    ) -> Result<()> {
        let file = self.df.file.clone();
        for (k, _) in &ins.flags {
            if k != "network" && k != "mount" {
                return Err(derr(&file, ins, format!("RUN --{k} is not supported")));
            }
        }
        let mut mounts = Vec::new();
        let mut mount_key = Vec::new();
        for (_, v) in ins.flags.iter().filter(|(k, _)| k == "mount") {
            let v = dockerfile::expand_words(v, vars)
                .map_err(|e| derr(&file, ins, e))?
                .join("");
            let (m, k) = self
                .run_mount(idx, st, &v)
                .map_err(|e| derr(&file, ins, format!("RUN --mount={v}: {e}")))?;
            mounts.push(m);
            mount_key.extend_from_slice(&k);
        }
        let network = match ins.flags.iter().find(|(k, _)| k == "network") {
            Some((_, v)) if v == "none" => false,
            Some((_, v)) if v == "host" || v == "default" => true,
            Some((_, v)) => {
                return Err(derr(
                    &file,
                    ins,
                    format!("RUN --network={v}: use none|host|default"),
                ))
            }
            None => self.opts.network,
        };
        // The command and its stdin (a heredoc alone is the script; else it feeds stdin).
        let (argv, stdin) = match (&ins.args, ins.heredocs.first()) {
            (Args::Shell(s), Some(h)) => {
                let body = if h.expand {
                    dockerfile::expand_vars(&h.body, vars).map_err(|e| derr(&file, ins, e))?
                } else {
                    h.body.clone()
                };
                let rest = s.replace(&format!("<<{}", h.name), "");
                if rest.trim().is_empty() {
                    let mut v = shell.to_vec();
                    v.push(body);
                    (v, None)
                } else {
                    let mut v = shell.to_vec();
                    v.push(rest.trim().to_string());
                    (v, Some(body.into_bytes()))
                }
            }
            (Args::Shell(s), None) => {
                let mut v = shell.to_vec();
                v.push(s.clone());
                (v, None)
            }
            (Args::Exec(v), _) => (v.clone(), None),
        };
        let mut env = st.config.env.clone();
        let mut arg_keys: Vec<(&String, &String)> = st.args.iter().collect();
        arg_keys.sort();
        let mut arg_bytes = Vec::new();
        for (k, v) in arg_keys {
            if st.config.env_get(k).is_none() {
                env.push(format!("{k}={v}"));
            }
            arg_bytes.extend_from_slice(format!("{k}={v}\n").as_bytes());
        }
        if !env.iter().any(|kv| kv.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        let cfg = serde_json::to_vec(&(&env, &st.config.workdir, &st.config.user, network))
            .expect("serializes");
        let argv_bytes = serde_json::to_vec(&(&argv, &stdin)).expect("serializes");
        let key = chain(
            &st.key,
            &[b"RUN", &argv_bytes, &cfg, &arg_bytes, &mount_key],
        );
        if let Some(rec) = self.lookup_cache(&key)? {
            return self.cache_hit(idx, st, ins, key, rec);
        }
        self.say(&format!("  {}: {}", ins.line, ins.original));
        let root = self.fresh_upper(idx, st)?;
        let workdir = st.config.workdir.clone().unwrap_or_else(|| "/".into());
        mkdir_in_root(&root, &workdir)?;
        let spec = step_jail::RunSpec {
            rootfs: root.clone(),
            argv,
            env,
            workdir,
            user: st.config.user.clone(),
            network,
            stdin,
            memory_max: self.opts.memory_max,
            mounts,
        };
        let progress = &mut *self.progress;
        let on_line = &mut |line: &str| progress(&format!("    | {line}"));
        let outcome = match &self.vm_env {
            Some(vm) => crate::vm_isolation::run(&spec, vm, self.work.path(), on_line)?,
            None => step_jail::run(&spec, on_line)?,
        };
        if !outcome.success {
            return Err(Error::RunFailed {
                file,
                line: ins.line,
                cmd: ins.original.clone(),
                status: outcome.status,
                output: outcome.tail,
            });
        }
        let layer = self.upper_layer(st)?;
        self.record_step(idx, st, ins, key, layer.as_deref())
    }

    /// One `RUN --mount=...` spec: what to mount and what it adds to the step's key (a cache
    /// mount adds only its place: its content is a cache, not an input).
    fn run_mount(
        &mut self,
        idx: usize,
        st: &StageState,
        spec: &str,
    ) -> std::result::Result<(step_jail::Mount, Vec<u8>), String> {
        let mut kind = "bind".to_string();
        let (mut target, mut source, mut from, mut id) = (None, None, None, None);
        let (mut rw, mut mode, mut uid, mut gid) = (false, None, None, None);
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, "true"));
            match k {
                "type" => kind = v.to_string(),
                "target" | "dst" | "destination" => target = Some(v.to_string()),
                "source" | "src" => source = Some(v.to_string()),
                "from" => from = Some(v.to_string()),
                "id" => id = Some(v.to_string()),
                "rw" | "readwrite" => rw = v != "false",
                "ro" | "readonly" => rw = v == "false",
                "mode" => mode = Some(u32::from_str_radix(v, 8).map_err(|_| format!("mode={v}"))?),
                "uid" => uid = Some(v.parse::<u32>().map_err(|_| format!("uid={v}"))?),
                "gid" => gid = Some(v.parse::<u32>().map_err(|_| format!("gid={v}"))?),
                "sharing" | "required" | "size" => {}
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if !matches!(kind.as_str(), "bind" | "cache" | "tmpfs") {
            return Err(format!(
                "type={kind} is not supported (supported: bind, cache, tmpfs)"
            ));
        }
        let target = target.ok_or("needs target=PATH")?;
        // Relative targets are relative to the WORKDIR, as in BuildKit.
        let cwd = st.config.workdir.clone().unwrap_or_else(|| "/".into());
        let target = resolve_in(&cwd, &target);
        if target == "/" {
            return Err("cannot mount over /".into());
        }
        match kind.as_str() {
            "cache" => {
                let name = id.unwrap_or_else(|| target.clone());
                // Kept with the store (the kiln home), not in the temporary directory.
                let home = self.store.dir().parent().unwrap_or(self.tmp).to_path_buf();
                let dir = home
                    .join("build-cache")
                    .join(blake3::hash(name.as_bytes()).to_hex().as_str());
                if !dir.exists() {
                    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                    use std::os::unix::fs::PermissionsExt;
                    let perm = std::fs::Permissions::from_mode(mode.unwrap_or(0o755));
                    std::fs::set_permissions(&dir, perm).map_err(|e| e.to_string())?;
                    let c = CString::new(dir.as_os_str().as_encoded_bytes())
                        .map_err(|e| e.to_string())?;
                    // SAFETY: valid path; -1 keeps an id unchanged.
                    unsafe {
                        libc::chown(c.as_ptr(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))
                    };
                }
                let key = format!("cache:{name}:{target}\n").into_bytes();
                Ok((
                    step_jail::Mount {
                        source: Some(dir),
                        target,
                        readonly: false,
                    },
                    key,
                ))
            }
            "tmpfs" => Ok((
                step_jail::Mount {
                    source: None,
                    target: target.clone(),
                    readonly: false,
                },
                format!("tmpfs:{target}\n").into_bytes(),
            )),
            "bind" => {
                if rw {
                    return Err("rw bind mounts are not supported (writes would reach the \
                                build context or the other stage); copy the files instead"
                        .into());
                }
                let src = source.unwrap_or_else(|| ".".into());
                let rel = clean_rel(&src).ok_or("source leads outside its root")?;
                let (root, key_of_root) = match &from {
                    Some(f) => {
                        let s = self
                            .stage_index(f)
                            .filter(|&s| s < idx)
                            .ok_or_else(|| format!("from={f}: no earlier stage by that name"))?;
                        self.build_stage(s).map_err(|e| e.to_string())?;
                        let mut sst = self.stages[s].take().expect("built");
                        let r = self.materialize(s, &mut sst);
                        let k = sst.key;
                        self.stages[s] = Some(sst);
                        (r.map_err(|e| e.to_string())?, Some(k))
                    }
                    None => (self.opts.context.clone(), None),
                };
                let host = root.join(&rel);
                // No symlink may lead out of the context or stage root.
                let real = std::fs::canonicalize(&host).map_err(|e| format!("{src}: {e}"))?;
                let real_root = std::fs::canonicalize(&root).map_err(|e| e.to_string())?;
                if !real.starts_with(&real_root) {
                    return Err(format!("{src}: leads outside its root"));
                }
                let mut key = format!("bind:{target}:{src}:").into_bytes();
                match key_of_root {
                    Some(k) => key.extend_from_slice(k.as_bytes()),
                    None => key
                        .extend_from_slice(tree_hash(&real).map_err(|e| e.to_string())?.as_bytes()),
                }
                Ok((
                    step_jail::Mount {
                        source: Some(real),
                        target,
                        readonly: true,
                    },
                    key,
                ))
            }
            other => Err(format!(
                "type={other} is not supported (supported: bind, cache, tmpfs)"
            )),
        }
    }

    fn copy_step(
        &mut self,
        idx: usize,
        st: &mut StageState,
        ins: &Instruction,
        vars: &HashMap<String, String>,
    ) -> Result<()> {
        let file = self.df.file.clone();
        let mut from = None;
        let mut chown = None;
        let mut chmod = None;
        let mut checksum = None;
        for (k, v) in &ins.flags {
            let v = dockerfile::expand_words(v, vars)
                .map_err(|e| derr(&file, ins, e))?
                .join("");
            match k.as_str() {
                "from" => from = Some(v),
                "chown" => chown = Some(v),
                "chmod" => {
                    chmod = Some(u32::from_str_radix(&v, 8).map_err(|_| {
                        derr(&file, ins, format!("--chmod={v} is not an octal mode"))
                    })?)
                }
                "link" => {}
                "checksum" if ins.keyword == "ADD" => checksum = Some(v),
                other => {
                    return Err(derr(
                        &file,
                        ins,
                        format!("{} --{other} is not supported", ins.keyword),
                    ))
                }
            }
        }
        let mut w = match &ins.args {
            Args::Exec(v) => v.clone(),
            Args::Shell(s) => dockerfile::expand_words(s, vars).map_err(|e| derr(&file, ins, e))?,
        };
        if w.len() < 2 {
            return Err(derr(
                &file,
                ins,
                format!("{} needs a source and a destination", ins.keyword),
            ));
        }
        let dest_raw = w.pop().expect("len >= 2");
        let cwd = st.config.workdir.clone().unwrap_or_else(|| "/".into());
        // `.`/`..` (e.g. `COPY f .` under a WORKDIR) name a directory, as a trailing `/` does.
        let last_component = dest_raw.rsplit('/').next().unwrap_or("");
        let dest_is_dir =
            dest_raw.ends_with('/') || matches!(last_component, "." | "..") || w.len() > 1;
        let dest = resolve_in(&cwd, &dest_raw);
        // Ownership: resolved against the stage's /etc/passwd when given by name.
        let owner = match &chown {
            None => None,
            Some(c) => {
                let numeric = c.split(':').all(|p| p.parse::<u32>().is_ok());
                if numeric {
                    let mut it = c.split(':').map(|p| p.parse::<u32>().expect("checked"));
                    let u = it.next().unwrap_or(0);
                    Some((u, it.next().unwrap_or(u)))
                } else {
                    let root = self.materialize(idx, st)?;
                    Some(step_jail::resolve_user(&root, c)?)
                }
            }
        };
        // Where sources come from: the context, or an earlier stage (by its key).
        let from_stage = match &from {
            None => None,
            Some(f) => match self.stage_index(f).filter(|&s| s < idx) {
                Some(s) => {
                    self.build_stage(s)?;
                    Some((s, self.stages[s].as_ref().expect("built").key))
                }
                None => {
                    return Err(derr(
                        &file,
                        ins,
                        format!("--from={f}: no earlier stage by that name"),
                    ))
                }
            },
        };
        let tar_path = self
            .work
            .path()
            .join(format!("copy-{idx}-{}.tar", ins.line));
        let key = if let Some((s, sk)) = from_stage {
            // Keyed by the source stage's key: no need to read its files on a hit.
            let k = chain(
                &st.key,
                &[
                    b"COPY-FROM",
                    ins.original.as_bytes(),
                    sk.as_bytes(),
                    dest.as_bytes(),
                    format!("{owner:?}{chmod:?}").as_bytes(),
                ],
            );
            if let Some(rec) = self.lookup_cache(&k)? {
                return self.cache_hit(idx, st, ins, k, rec);
            }
            let mut sst = self.stages[s].take().expect("built");
            let r = self.materialize(s, &mut sst);
            self.stages[s] = Some(sst);
            let sroot = r?;
            let spec = CopySpec {
                srcs: &w,
                heredocs: &ins.heredocs,
                vars,
                dest: &dest,
                dest_is_dir,
                owner,
                chmod,
                checksum: checksum.as_deref(),
            };
            self.write_copy_tar(&sroot, false, &spec, &tar_path, ins)?;
            k
        } else {
            let spec = CopySpec {
                srcs: &w,
                heredocs: &ins.heredocs,
                vars,
                dest: &dest,
                dest_is_dir,
                owner,
                chmod,
                checksum: checksum.as_deref(),
            };
            self.write_copy_tar(&self.opts.context, true, &spec, &tar_path, ins)?;
            let h = hash_file(&tar_path)?;
            let k = chain(&st.key, &[b"COPY", h.as_bytes()]);
            if let Some(rec) = self.lookup_cache(&k)? {
                return self.cache_hit(idx, st, ins, k, rec);
            }
            k
        };
        // `COPY file /dir` without a trailing slash copies into /dir when the image has that
        // directory. The parent key fixes the parent tree, so the key need not say which; on a
        // miss, look and write the tar again with the file inside the directory.
        let single = (w.len() == 1 && !w[0].starts_with("<<") && !w[0].contains(['*', '?']))
            .then(|| clean_rel(&w[0]))
            .flatten()
            .filter(|_| !dest_is_dir);
        if let Some(rel) = single {
            let src_root = match from_stage {
                Some((s, _)) => {
                    let mut sst = self.stages[s].take().expect("built");
                    let r = self.materialize(s, &mut sst);
                    self.stages[s] = Some(sst);
                    r?
                }
                None => self.opts.context.clone(),
            };
            let src_is_dir = std::fs::symlink_metadata(src_root.join(&rel))
                .map(|m| m.is_dir())
                .unwrap_or(true);
            let name = rel.file_name().map(|n| n.to_string_lossy().into_owned());
            if let (false, Some(name)) = (src_is_dir, name) {
                let root = self.materialize(idx, st)?;
                if real_dir_in(&root, &dest) {
                    let inside = format!("{}/{name}", dest.trim_end_matches('/'));
                    let spec = CopySpec {
                        srcs: &w,
                        heredocs: &ins.heredocs,
                        vars,
                        dest: &inside,
                        dest_is_dir: false,
                        owner,
                        chmod,
                        checksum: checksum.as_deref(),
                    };
                    self.write_copy_tar(&src_root, from_stage.is_none(), &spec, &tar_path, ins)?;
                }
            }
        }
        self.say(&format!("  {}: {}", ins.line, ins.original));
        // Applied in a fresh upper directory: the step's tree, from which its disk is made.
        let root = self.fresh_upper(idx, st)?;
        let f = std::fs::File::open(&tar_path).ctx("open", &tar_path)?;
        layer::apply_layer(
            &root,
            f,
            &ApplyOptions {
                allow_devices: true,
            },
        )?;
        self.record_step(idx, st, ins, key, Some(&tar_path))
    }

    fn write_copy_tar(
        &self,
        src_root: &Path,
        is_context: bool,
        spec: &CopySpec<'_>,
        out: &Path,
        ins: &Instruction,
    ) -> Result<()> {
        let CopySpec {
            srcs,
            heredocs,
            vars,
            dest,
            dest_is_dir,
            owner,
            chmod,
            checksum,
        } = *spec;
        let file = self.df.file.clone();
        let f = std::fs::File::create(out).ctx("create", out)?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        let mut entries: Vec<(String, PathBuf)> = Vec::new(); // (dest path, host path)
        let mut inline: Vec<(String, Vec<u8>)> = Vec::new();
        let mut archives: Vec<PathBuf> = Vec::new();
        for s in srcs {
            if let Some(h) = s
                .strip_prefix("<<")
                .and_then(|n| heredocs.iter().find(|h| h.name == n))
            {
                let body = if h.expand {
                    dockerfile::expand_vars(&h.body, vars).map_err(|e| derr(&file, ins, e))?
                } else {
                    h.body.clone()
                };
                let d = if dest_is_dir {
                    format!("{}/{}", dest.trim_end_matches('/'), h.name)
                } else {
                    dest.to_string()
                };
                inline.push((d, body.into_bytes()));
                continue;
            }
            if ins.keyword == "ADD" && crate::add::is_url(s) {
                let add_err = |e: Error| derr(&file, ins, e.to_string());
                let d = if dest_is_dir {
                    let n = crate::add::url_file_name(s).map_err(add_err)?;
                    format!("{}/{n}", dest.trim_end_matches('/'))
                } else {
                    dest.to_string()
                };
                let host = crate::add::fetch_url(s, checksum, self.work.path()).map_err(add_err)?;
                entries.push((d, host));
                continue;
            }
            if checksum.is_some() {
                return Err(derr(&file, ins, "--checksum applies to URL sources only"));
            }
            let rel = clean_rel(s).ok_or_else(|| {
                derr(
                    &file,
                    ins,
                    format!("{s}: source leads outside the build context"),
                )
            })?;
            let matches = expand_glob(src_root, &rel);
            if matches.is_empty() {
                return Err(derr(
                    &file,
                    ins,
                    format!(
                        "{s}: no such file in the {}",
                        if is_context {
                            "build context"
                        } else {
                            "source stage"
                        }
                    ),
                ));
            }
            for m in matches {
                let host = src_root.join(&m);
                let meta = std::fs::symlink_metadata(&host).ctx("lstat", &host)?;
                if is_context && self.ignored(&m) {
                    continue;
                }
                if meta.is_dir() {
                    let mut stack = vec![PathBuf::new()];
                    while let Some(sub) = stack.pop() {
                        let dir = host.join(&sub);
                        for e in std::fs::read_dir(&dir).ctx("read dir", &dir)? {
                            let e = e.ctx("read dir", &dir)?;
                            let r = sub.join(e.file_name());
                            if is_context && self.ignored(&m.join(&r)) {
                                continue;
                            }
                            let d = format!("{}/{}", dest.trim_end_matches('/'), r.display());
                            if e.file_type().ctx("stat", e.path())?.is_dir() {
                                stack.push(r);
                            }
                            entries.push((d, e.path()));
                        }
                    }
                } else if ins.keyword == "ADD" && is_context && crate::add::is_archive(&host)? {
                    // A local tar archive is unpacked into the destination directory.
                    archives.push(host);
                } else {
                    let d = if dest_is_dir || dest.ends_with('/') {
                        format!(
                            "{}/{}",
                            dest.trim_end_matches('/'),
                            m.file_name()
                                .map(|f| f.to_string_lossy().into_owned())
                                .unwrap_or_default()
                        )
                    } else {
                        dest.to_string()
                    };
                    entries.push((d, host));
                }
            }
        }
        if dest_is_dir || entries.len() > 1 {
            // The destination directory itself, so its mode is defined.
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            let (u, g) = owner.unwrap_or((0, 0));
            h.set_uid(u as u64);
            h.set_gid(g as u64);
            let d = dest.trim_start_matches('/').trim_end_matches('/');
            if !d.is_empty() {
                b.append_data(&mut h, format!("{d}/"), std::io::empty())
                    .ctx("write", out)?;
            }
        }
        entries.sort();
        entries.dedup_by(|a, b| a.0 == b.0);
        for (d, host) in entries {
            let m = std::fs::symlink_metadata(&host).ctx("lstat", &host)?;
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&m, tar::HeaderMode::Deterministic);
            h.set_mtime(0);
            let mode = chmod.unwrap_or(m.mode() & 0o7777);
            h.set_mode(mode);
            let (u, g) = owner.unwrap_or((0, 0));
            h.set_uid(u as u64);
            h.set_gid(g as u64);
            let name = d.trim_start_matches('/').to_string();
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&host).ctx("readlink", &host)?;
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &name, &t).ctx("write", out)?;
            } else if m.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{name}/"), std::io::empty())
                    .ctx("write", out)?;
            } else if m.is_file() {
                let f = std::fs::File::open(&host).ctx("open", &host)?;
                h.set_size(m.len());
                b.append_data(&mut h, &name, f).ctx("write", out)?;
            } else {
                return Err(derr(
                    &file,
                    ins,
                    format!(
                        "{}: only files, directories and symlinks can be copied",
                        host.display()
                    ),
                ));
            }
        }
        for (i, a) in archives.iter().enumerate() {
            let scratch = self.work.path().join(format!("add-check-{}-{i}", ins.line));
            crate::add::append_archive(&mut b, a, dest, owner, &scratch)
                .map_err(|e| derr(&file, ins, e.to_string()))?;
        }
        for (d, data) in inline {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(chmod.unwrap_or(0o644));
            h.set_size(data.len() as u64);
            h.set_mtime(0);
            let (u, g) = owner.unwrap_or((0, 0));
            h.set_uid(u as u64);
            h.set_gid(g as u64);
            b.append_data(&mut h, d.trim_start_matches('/'), &data[..])
                .ctx("write", out)?;
        }
        let mut w = b.into_inner().ctx("finish", out)?;
        w.flush().ctx("write", out)?;
        Ok(())
    }

    fn ignored(&self, rel: &Path) -> bool {
        let comps: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let mut ignored = false;
        // A path is ignored if it or any parent matches the last matching pattern.
        for n in 1..=comps.len() {
            for (neg, pat) in &self.ignore {
                if glob_match(pat, &comps[..n]) {
                    ignored = !neg;
                }
            }
            if ignored && n < comps.len() {
                // Exceptions below an ignored directory still count.
                let deeper = self.ignore.iter().any(|(neg, _)| *neg);
                if !deeper {
                    return true;
                }
            }
        }
        ignored
    }

    /// The image cached under `final_key`: here, else (with `cache_from`) on the remote.
    fn cached_image(&self, cache_name: &str, final_key: &blake3::Hash) -> Result<Option<BlobId>> {
        if self.opts.no_cache || self.opts.redo_disks {
            return Ok(None);
        }
        if let Some(id) = self.store.lookup_name(cache_name)? {
            return Ok(Some(id));
        }
        if !self.opts.cache_from {
            return Ok(None);
        }
        let remote = || -> Result<Option<BlobId>> {
            let Some(id) = self.store.remote_name(&remote_cache_name(final_key))? else {
                return Ok(None);
            };
            self.store.pull(&id)?;
            let rec = image::get_record(self.store, &id)?;
            for b in rec.layers.iter().chain([&rec.disk]) {
                self.store.pull(b)?;
                image::keep(self.store, b)?;
            }
            image::keep(self.store, &id)?;
            self.store.set_name(cache_name, &id)?;
            Ok(Some(id))
        };
        remote().or_else(|e| {
            tracing::warn!(error = %e, "image cache on the remote not reachable: a miss");
            Ok(None)
        })
    }

    fn finish(mut self, target: usize) -> Result<BuildReport> {
        let mut st = self.stages[target].take().expect("target built");
        let final_key = chain(&st.key, &[b"IMAGE"]);
        let cache_name = format!("{CACHE_PREFIX}{}", final_key.to_hex());
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

    /// With `cache_to`: pushes every step record the build used or made (layer and disk
    /// first, then the record, then its remote name) and the image. Returns bytes uploaded.
    fn push_cache(&mut self, final_key: &blake3::Hash, image_id: &BlobId) -> Result<u64> {
        if !self.opts.cache_to {
            return Ok(0);
        }
        let t = std::time::Instant::now();
        let mut bytes = 0;
        let records = std::mem::take(&mut self.records);
        for (key, rid) in &records {
            let rec = get_step(self.store, rid)?;
            for b in rec.referenced().iter().chain([rid]) {
                bytes += self.store.push(b, &|_| {})?.bytes_uploaded;
            }
            self.store.push_name(&remote_cache_name(key), rid)?;
        }
        bytes += image::push(self.store, image_id)?;
        self.store
            .push_name(&remote_cache_name(final_key), image_id)?;
        self.say(&format!(
            "  step cache pushed: {} steps, {bytes} bytes uploaded in {:.2} s",
            records.len(),
            t.elapsed().as_secs_f64()
        ));
        Ok(bytes)
    }
}

/// What a COPY/ADD writes, after expansion.
#[derive(Clone, Copy)]
struct CopySpec<'a> {
    srcs: &'a [String],
    heredocs: &'a [dockerfile::Heredoc],
    vars: &'a HashMap<String, String>,
    dest: &'a str,
    dest_is_dir: bool,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
    /// ADD `--checksum` for a URL source.
    checksum: Option<&'a str>,
}

/// Content hash of a file or a directory tree (names, types, modes, contents; not times).
fn tree_hash(p: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let host = p.join(&rel);
        let m = std::fs::symlink_metadata(&host).ctx("lstat", &host)?;
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(&m.mode().to_le_bytes());
        if m.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&host)
                .ctx("read dir", &host)?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            names.sort();
            // Reversed so the stack pops them in order.
            for n in names.into_iter().rev() {
                stack.push(rel.join(n));
            }
        } else if m.file_type().is_symlink() {
            let t = std::fs::read_link(&host).ctx("readlink", &host)?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if m.is_file() {
            h.update(hash_file(&host)?.as_bytes());
        }
    }
    Ok(h.finalize())
}

fn hash_file(p: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(p).ctx("open", p)?;
    h.update_reader(f).ctx("read", p)?;
    Ok(h.finalize())
}

/// `path` made absolute against `cwd`, normalised (no `.`/`..`, no trailing slash).
fn resolve_in(cwd: &str, path: &str) -> String {
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", cwd.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in full.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A context-relative source path, or None if it leaves the context.
fn clean_rel(s: &str) -> Option<PathBuf> {
    let mut parts: Vec<&str> = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.iter().collect())
}

/// Expands `*`/`?` in the last component of a source path.
fn expand_glob(root: &Path, rel: &Path) -> Vec<PathBuf> {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return if std::fs::symlink_metadata(root.join(rel)).is_ok() {
            vec![rel.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out: Vec<PathBuf> = std::fs::read_dir(root.join(&parent))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| wildcard(&name, n))
                .map(|n| parent.join(n))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn wildcard(pat: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    fn m(p: &[char], s: &[char]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some('*'), _) => m(&p[1..], s) || (!s.is_empty() && m(p, &s[1..])),
            (Some('?'), Some(_)) => m(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &s[1..]),
            _ => false,
        }
    }
    m(&p, &s)
}

/// Matches path components against pattern components (`**` = any number of components).
fn glob_match(pat: &[String], path: &[String]) -> bool {
    match (pat.first(), path.first()) {
        (None, None) => true,
        (Some(p), _) if p == "**" => {
            glob_match(&pat[1..], path) || (!path.is_empty() && glob_match(pat, &path[1..]))
        }
        (Some(p), Some(c)) => wildcard(p, c) && glob_match(&pat[1..], &path[1..]),
        _ => false,
    }
}

fn read_dockerignore(context: &Path) -> Vec<(bool, Vec<String>)> {
    let Ok(text) = std::fs::read_to_string(context.join(".dockerignore")) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (neg, p) = match l.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, l),
            };
            let comps = p
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(String::from)
                .collect();
            (neg, comps)
        })
        .collect()
}

/// Whether the absolute in-image path `abs` is a directory reached through directories only
/// (a symlink on the way would resolve on the host, so it does not count).
fn real_dir_in(root: &Path, abs: &str) -> bool {
    let mut p = root.to_path_buf();
    for c in abs.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// `mkdir -p` of an absolute in-image path, never following symlinks out of the root.
fn mkdir_in_root(root: &Path, abs: &str) -> Result<()> {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_mtime(0);
    let p = abs.trim_start_matches('/');
    if p.is_empty() {
        return Ok(());
    }
    let target = root.join(p);
    if std::fs::symlink_metadata(&target)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        return Ok(());
    }
    t.append_data(&mut h, format!("{p}/"), std::io::empty())
        .ctx("write", "mkdir tar")?;
    let bytes = t.into_inner().ctx("finish", "mkdir tar")?;
    layer::apply_layer(root, &bytes[..], &ApplyOptions::default())?;
    Ok(())
}

/// Names referenced by cached steps (for [`crate::image::remove`]).
pub fn cached_blobs(store: &Store) -> Result<BTreeSet<BlobId>> {
    let mut out = BTreeSet::new();
    for (n, id) in store.names()? {
        if n.starts_with(CACHE_PREFIX) {
            out.insert(id);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_globs() {
        assert_eq!(resolve_in("/app", "sub/../x"), "/app/x");
        assert_eq!(resolve_in("/app", "/etc/"), "/etc");
        assert!(clean_rel("../x").is_none());
        assert!(wildcard("*.txt", "a.txt") && !wildcard("*.txt", "a.rs"));
        let p = |s: &str| s.split('/').map(String::from).collect::<Vec<_>>();
        assert!(glob_match(&p("**/*.log"), &p("a/b/c.log")));
        assert!(!glob_match(&p("*.log"), &p("a/c.log")));
    }
}
