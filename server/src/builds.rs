//! Template builds for E2B's SDK (`Template.build`), run on kiln's Dockerfile builder.
//!
//! E2B's steps (`fromImage`/`fromTemplate`, then COPY, RUN, ENV, WORKDIR, USER) become one
//! Dockerfile line each, so the builder's step cache works as for `kiln build`: a rebuild
//! with one changed copied file reuses every step before that COPY. A COPY's files are the
//! tar the SDK uploaded for its `filesHash` ([`Builds::files_dir`]), unpacked into the build's
//! context as `<hash>/`; the Dockerfile copies `<hash>/<src>` from there.
//!
//! With a remote attached to the daemon's store (`kiln remote add`), builds look their steps
//! up there and push them, as `kiln build --cache-from --cache-to` does.
//!
//! Builds run on a blocking thread each (builds of different templates run at once); their
//! status and logs live in this daemon's memory only. The image is named (the template
//! registered) only when the builder's last step succeeded, so a daemon killed mid-build
//! leaves no template, and the build is unknown (404) after a restart. Build directories
//! left by such a daemon are removed at the next start.

use crate::control::types::{BuildStart, FromImageRegistry};
use kiln_runtime::start_cmd::{READY_LABEL, START_LABEL};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The most log entries one build keeps (the oldest go first past it).
const MAX_LOG_ENTRIES: usize = 20_000;
/// The longest log line kept, in bytes.
const MAX_LOG_LINE: usize = 4096;
/// Past this many builds in memory, finished or never started ones older than an hour go.
const MAX_BUILDS: usize = 1024;
/// The most an upload may unpack to (a gzip bomb stops here).
const MAX_UNPACKED: u64 = 16 << 30;
/// How many of the last output lines a failed step's reason carries.
const REASON_LINES: usize = 20;
/// E2B's step name of the base image (the SDK maps it to `from_image`'s stack trace).
pub const BASE_STEP: &str = "base";
/// E2B's step name of what follows the last step (naming the image).
pub const FINALIZE_STEP: &str = "finalize";

/// Where a build stands (E2B's `TemplateBuildStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Requested (`POST /v3/templates`), steps not posted yet.
    Waiting,
    Building,
    Ready,
    Error,
}

/// One build log line (E2B's `BuildLogEntry`).
#[derive(Clone, Debug)]
pub struct LogLine {
    pub ms: u64,
    pub level: &'static str,
    pub message: String,
    pub step: Option<String>,
}

/// Why a build failed (E2B's `BuildStatusReason`).
#[derive(Clone, Debug)]
pub struct Reason {
    pub message: String,
    pub step: Option<String>,
    pub logs: Vec<LogLine>,
}

/// One build.
#[derive(Debug)]
pub struct Build {
    /// The template (kiln image name) it makes.
    pub template: String,
    /// Tags: each also names the image as `template:tag` (`default` is the name itself).
    pub tags: Vec<String>,
    pub status: Status,
    pub logs: Vec<LogLine>,
    /// Entries dropped from the front of `logs` (offsets stay those of the whole log).
    pub dropped: usize,
    pub reason: Option<Reason>,
    created_ms: u64,
}

/// What publishes a built template to the cluster: its names and image.
pub type Publish =
    Box<dyn FnOnce(&[String], &kiln_blockstore::BlobId) -> Result<(), String> + Send>;

impl Build {
    /// The image names the build gives: the template's, and `template:tag` for each tag.
    fn names(&self) -> Vec<String> {
        std::iter::once(self.template.clone())
            .chain(
                self.tags
                    .iter()
                    .filter(|t| *t != "default")
                    .map(|t| format!("{}:{t}", self.template)),
            )
            .collect()
    }

    fn log(&mut self, level: &'static str, message: &str, step: Option<String>) {
        let mut message = message.to_string();
        if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        if self.logs.len() >= MAX_LOG_ENTRIES {
            self.logs.remove(0);
            self.dropped += 1;
        }
        self.logs.push(LogLine {
            ms: kiln_runtime::record::now_ms(),
            level,
            message,
            step,
        });
    }
}

/// The daemon's builds and their directories.
pub struct Builds {
    builds: Mutex<HashMap<String, Arc<Mutex<Build>>>>,
    /// `serve/template-files`: uploaded COPY sources, one file per hash (0700, no sandbox
    /// can write it: sandboxes see only their own roots).
    pub files_dir: PathBuf,
    /// `serve/template-builds`: one directory per running build (context and Dockerfile).
    work_dir: PathBuf,
    /// The builder's scratch and step-tree cache (the one `kiln build` uses).
    build_tmp: PathBuf,
}

/// Whether `s` is a files hash the SDK sends (SHA-256, lower-case hex): only such names are
/// ever used as file names.
pub fn valid_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Builds {
    /// The builds of a daemon whose files are under `serve_dir`; removes what a daemon killed
    /// mid-build or mid-upload left.
    pub fn new(serve_dir: &Path, build_tmp: PathBuf) -> Builds {
        let files_dir = serve_dir.join("template-files");
        let work_dir = serve_dir.join("template-builds");
        let _ = std::fs::remove_dir_all(&work_dir);
        for d in [&files_dir, &work_dir] {
            if let Err(e) = std::fs::create_dir_all(d) {
                tracing::warn!("create {}: {e}", d.display());
            }
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
        if let Ok(rd) = std::fs::read_dir(&files_dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Builds {
            builds: Mutex::default(),
            files_dir,
            work_dir,
            build_tmp,
        }
    }

    /// Registers a requested build of `template` (waiting for its steps).
    pub fn request(&self, template: &str, tags: Vec<String>) -> String {
        let id = uuid_like();
        let b = Build {
            template: template.to_string(),
            tags,
            status: Status::Waiting,
            logs: Vec::new(),
            dropped: 0,
            reason: None,
            created_ms: kiln_runtime::record::now_ms(),
        };
        let mut builds = self.builds.lock().unwrap();
        if builds.len() >= MAX_BUILDS {
            let hour_ago = kiln_runtime::record::now_ms().saturating_sub(3_600_000);
            builds.retain(|_, b| {
                let b = b.lock().unwrap();
                b.status == Status::Building || b.created_ms > hour_ago
            });
        }
        builds.insert(id.clone(), Arc::new(Mutex::new(b)));
        id
    }

    /// The build `id` of `template`, if this daemon knows it.
    pub fn get(&self, template: &str, id: &str) -> Option<Arc<Mutex<Build>>> {
        let b = self.builds.lock().unwrap().get(id).cloned()?;
        let same = b.lock().unwrap().template == template;
        same.then_some(b)
    }

    /// Whether a build of `template` was requested from this daemon.
    pub fn has_template(&self, template: &str) -> bool {
        self.builds
            .lock()
            .unwrap()
            .values()
            .any(|b| b.lock().unwrap().template == template)
    }

    /// Whether an upload for `hash` is stored.
    pub fn has_files(&self, hash: &str) -> bool {
        valid_hash(hash) && self.files_dir.join(hash).is_file()
    }

    /// Starts build `build` with `start` (already checked by [`dockerfile`]) on a blocking
    /// thread: its handle (dropping it does not stop the build); None when it was started
    /// before.
    /// `publish`, when given (cluster mode), gets the template's names and image once it is
    /// built, and the build is ready only once it has returned Ok.
    pub fn start(
        self: &Arc<Self>,
        sandboxes: Arc<kiln_runtime::Sandboxes>,
        build: Arc<Mutex<Build>>,
        id: String,
        start: BuildStart,
        publish: Option<Publish>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        {
            let mut b = build.lock().unwrap();
            if b.status != Status::Waiting {
                return None;
            }
            b.status = Status::Building;
        }
        let me = self.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let dir = me.work_dir.join(&id);
            let res = me.run(&sandboxes, &build, &dir, &start).and_then(|image| {
                let Some(publish) = publish else {
                    return Ok(image);
                };
                let names = build.lock().unwrap().names();
                build.lock().unwrap().log(
                    "info",
                    "publishing the template to the cluster (its image to the store's remote)",
                    Some(FINALIZE_STEP.into()),
                );
                match publish(&names, &image) {
                    Ok(()) => Ok(image),
                    Err(e) => Err(Reason {
                        message: format!(
                            "the template was built on this node but not published to the \
                             cluster: {e}"
                        ),
                        step: Some(FINALIZE_STEP.into()),
                        logs: Vec::new(),
                    }),
                }
            });
            let _ = std::fs::remove_dir_all(&dir);
            let mut b = build.lock().unwrap();
            match res {
                Ok(image) => {
                    let m = format!("template {} ready: {image}", b.template);
                    b.log("info", &m, None);
                    b.status = Status::Ready;
                }
                Err(reason) => {
                    tracing::info!(build = %id, "template build failed: {}", reason.message);
                    b.log("error", &reason.message.clone(), reason.step.clone());
                    b.reason = Some(reason);
                    b.status = Status::Error;
                }
            }
        });
        Some(handle)
    }

    fn run(
        &self,
        sandboxes: &kiln_runtime::Sandboxes,
        build: &Arc<Mutex<Build>>,
        dir: &Path,
        start: &BuildStart,
    ) -> Result<kiln_blockstore::BlobId, Reason> {
        let store = sandboxes.store();
        let template = build.lock().unwrap().template.clone();
        let tags = build.lock().unwrap().tags.clone();
        let fail = |message: String, step: Option<&str>| Reason {
            message,
            step: step.map(str::to_string),
            logs: Vec::new(),
        };
        let plan = dockerfile(start).map_err(|m| fail(m, None))?;
        // The base: a local image (a template is one) or pulled; named by id in the
        // Dockerfile, so the builder resolves it as this step did.
        let base = plan.base.clone();
        let say = |m: &str| build.lock().unwrap().log("info", m, Some(BASE_STEP.into()));
        say(&format!("FROM {base}"));
        let (base_id, base_rec) = match kiln_imagebuilder::image::lookup(store, &base) {
            Ok(x) => x,
            Err(kiln_imagebuilder::Error::ImageNotFound(_)) if start.from_image.is_some() => {
                let credentials = match &start.from_image_registry {
                    Some(FromImageRegistry::Registry { username, password }) => {
                        Some(kiln_imagebuilder::oci::Credentials {
                            username: username.clone(),
                            password: password.clone(),
                        })
                    }
                    _ => None,
                };
                let opts = kiln_imagebuilder::oci::PullOptions {
                    credentials,
                    ..Default::default()
                };
                kiln_imagebuilder::oci::pull(store, &self.build_tmp, &base, None, &opts, &|m| {
                    say(m)
                })
                .map_err(|e| fail(format!("pulling {base}: {e}"), Some(BASE_STEP)))?
            }
            Err(e) => return Err(fail(format!("base {base}: {e}"), Some(BASE_STEP))),
        };
        let ctx = dir.join("context");
        std::fs::create_dir_all(&ctx)
            .map_err(|e| fail(format!("create {}: {e}", ctx.display()), None))?;
        for (hash, step) in &plan.files {
            let at = ctx.join(hash);
            if at.exists() {
                continue;
            }
            let src = self.files_dir.join(hash);
            let f = std::fs::File::open(&src).map_err(|e| {
                fail(
                    format!("the files of step {step} ({hash}) were not uploaded: {e}"),
                    Some(step),
                )
            })?;
            std::fs::create_dir(&at).map_err(|e| fail(format!("create: {e}"), Some(step)))?;
            kiln_imagebuilder::layer::decompress(f)
                .and_then(|r| {
                    let r = Bounded {
                        r,
                        left: MAX_UNPACKED,
                    };
                    kiln_imagebuilder::layer::apply_layer(&at, r, &Default::default())
                })
                .map_err(|e| {
                    fail(
                        format!("unpacking the files of step {step}: {e}"),
                        Some(step),
                    )
                })?;
        }
        let user = base_rec.config.user.clone().filter(|u| !u.is_empty());
        let text = plan.text(&base_id.to_hex(), user.as_deref().unwrap_or("root"));
        let df = dir.join("Dockerfile");
        std::fs::write(&df, &text).map_err(|e| fail(format!("write Dockerfile: {e}"), None))?;
        let lines = plan.line_steps();
        let opts = kiln_imagebuilder::build::BuildOptions {
            context: ctx,
            dockerfile: Some(df),
            tag: Some(template.clone()),
            no_cache: start.force,
            network: true,
            // A daemon whose store has a remote shares its steps through it, as `kiln build
            // --cache-from --cache-to` does: a template built on one host builds from cache
            // (and its image is fetched lazily) on every host of that remote.
            cache_from: store.has_remote(),
            cache_to: store.has_remote(),
            ..Default::default()
        };
        // The step of a progress line: the builder prints `  N: INSTRUCTION` as each starts.
        let mut current: Option<String> = Some(BASE_STEP.into());
        let mut tail: Vec<String> = Vec::new();
        let res = kiln_imagebuilder::build::build(store, &self.build_tmp, &opts, &mut |line| {
            if let Some(n) = line
                .strip_prefix("  ")
                .and_then(|l| l.split_once(": "))
                .and_then(|(n, _)| n.parse::<usize>().ok())
            {
                current = lines.get(n).cloned().flatten();
                tail.clear();
            } else if let Some(out) = line.strip_prefix("    | ") {
                tail.push(out.to_string());
                if tail.len() > REASON_LINES {
                    tail.remove(0);
                }
            }
            build.lock().unwrap().log("info", line, current.clone());
        });
        let report = res.map_err(|e| {
            use kiln_imagebuilder::Error as E;
            let step = match &e {
                E::RunFailed { line, .. } | E::Dockerfile { line, .. } => {
                    lines.get(*line).cloned().flatten()
                }
                _ => current.clone(),
            };
            let message = match &e {
                E::RunFailed {
                    status,
                    cmd,
                    output,
                    ..
                } => format!(
                    "step {} failed: {cmd}: {status}\n{output}",
                    step.as_deref().unwrap_or("?")
                ),
                e => format!("step {} failed: {e}", step.as_deref().unwrap_or("?")),
            };
            let now = kiln_runtime::record::now_ms();
            Reason {
                message,
                logs: tail
                    .iter()
                    .map(|l| LogLine {
                        ms: now,
                        level: "error",
                        message: l.clone(),
                        step: step.clone(),
                    })
                    .collect(),
                step,
            }
        })?;
        let cached = report.steps.iter().filter(|s| s.cached).count();
        build.lock().unwrap().log(
            "info",
            &format!(
                "{cached} of {} steps cached; image {}",
                report.steps.len(),
                report.image
            ),
            Some(FINALIZE_STEP.into()),
        );
        for t in tags.iter().filter(|t| *t != "default") {
            kiln_imagebuilder::image::tag(store, &format!("{template}:{t}"), &report.image)
                .map_err(|e| fail(format!("tag {t}: {e}"), Some(FINALIZE_STEP)))?;
        }
        Ok(report.image)
    }
}

/// A reader that fails past `left` bytes.
struct Bounded<R> {
    r: R,
    left: u64,
}

impl<R: std::io::Read> std::io::Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other(format!("unpacks to more than {MAX_UNPACKED} bytes"))
        })?;
        Ok(n)
    }
}

/// A build id in E2B's form (a UUID v4's layout, 122 random bits).
fn uuid_like() -> String {
    let h = crate::random_token("");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// A template's steps as Dockerfile lines, each with its E2B step name.
#[derive(Debug)]
pub struct Plan {
    /// The base image reference or template name.
    pub base: String,
    /// Lines after FROM, with the E2B step (1-based, as the SDK numbers its stack traces).
    lines: Vec<(Line, String)>,
    /// The uploaded files each COPY needs: (hash, step).
    pub files: Vec<(String, String)>,
}

#[derive(Debug)]
enum Line {
    Text(String),
    /// `USER u`: a USER step's (`sticky`: RUN steps return to it), or a RUN step's own.
    User {
        name: String,
        sticky: bool,
    },
    /// Back to the user of the last USER step, else the base image's (after a RUN step's own).
    RestoreUser,
}

impl Plan {
    /// The Dockerfile, from image `base_id` whose USER is `base_user`.
    fn text(&self, base_id: &str, base_user: &str) -> String {
        let mut out = format!("FROM {base_id}\n");
        let mut user = base_user.to_string();
        for (l, _) in &self.lines {
            match l {
                Line::Text(t) => out.push_str(t),
                Line::User { name, sticky } => {
                    if *sticky {
                        user = name.clone();
                    }
                    out.push_str(&format!("USER {name}"));
                }
                Line::RestoreUser => out.push_str(&format!("USER {user}")),
            }
            out.push('\n');
        }
        out
    }

    /// The E2B step of each Dockerfile line (index = line number).
    fn line_steps(&self) -> Vec<Option<String>> {
        let mut v = vec![None, Some(BASE_STEP.to_string())];
        v.extend(self.lines.iter().map(|(_, s)| Some(s.clone())));
        v
    }
}

/// What may be a user name, a path or an image reference on one Dockerfile line.
fn one_line(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.contains(['\n', '\r', '\0']) {
        return Err(format!("{what} {s:?}: must be one non-empty line"));
    }
    Ok(())
}

/// `s` as a JSON string (for exec-form and JSON-form Dockerfile arguments).
fn json(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// Translates E2B's steps into a [`Plan`]; the error is the 400 message.
pub fn dockerfile(start: &BuildStart) -> Result<Plan, String> {
    match &start.from_image_registry {
        None | Some(FromImageRegistry::Registry { .. }) => {}
        Some(FromImageRegistry::Aws {} | FromImageRegistry::Gcp {}) => {
            return Err(
                "fromImageRegistry: kiln logs in to registries with a username and \
                 password (type \"registry\"); AWS and GCP logins are not supported"
                    .into(),
            )
        }
    }
    let base = match (&start.from_image, &start.from_template) {
        (Some(i), None) => i.trim().to_string(),
        (None, Some(t)) => t
            .trim()
            .strip_suffix(":default")
            .unwrap_or(t.trim())
            .to_string(),
        _ => return Err("exactly one of fromImage and fromTemplate is required".into()),
    };
    if base.is_empty()
        || base.len() > 512
        || !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/:@-".contains(&b))
    {
        return Err(format!("base image {base:?}: not an image reference"));
    }
    let mut lines = Vec::new();
    let mut files = Vec::new();
    for (i, s) in start.steps.iter().enumerate() {
        let step = (i + 1).to_string();
        let bad = |m: String| format!("step {step} ({}): {m}", s.kind);
        let mut push = |l: Line| lines.push((l, step.clone()));
        match (s.kind.as_str(), s.args.as_slice()) {
            ("RUN", [cmd]) | ("RUN", [cmd, _]) if !cmd.is_empty() => {
                let user = s.args.get(1).filter(|u| !u.is_empty());
                if let Some(u) = user {
                    one_line("user", u).map_err(bad)?;
                    if u.contains(' ') {
                        return Err(bad(format!("user {u:?}")));
                    }
                    push(Line::User {
                        name: u.clone(),
                        sticky: false,
                    });
                }
                push(Line::Text(format!(
                    "RUN [\"/bin/sh\", \"-c\", {}]",
                    json(cmd)
                )));
                if user.is_some() {
                    push(Line::RestoreUser);
                }
            }
            ("COPY", [src, dest, rest @ ..]) if rest.len() <= 2 => {
                let hash = s.files_hash.as_deref().unwrap_or_default();
                if !valid_hash(hash) {
                    return Err(bad("filesHash must be 64 lower-case hex digits".into()));
                }
                one_line("source", src).map_err(bad)?;
                one_line("destination", dest).map_err(bad)?;
                if src.starts_with('/') || src.split('/').any(|c| c == "..") {
                    return Err(bad(format!("source {src:?} must be relative, without ..")));
                }
                let mut flags = String::new();
                if let Some(u) = rest.first().filter(|u| !u.is_empty()) {
                    one_line("user", u).map_err(bad)?;
                    if u.contains(' ') {
                        return Err(bad(format!("user {u:?}")));
                    }
                    flags.push_str(&format!("--chown={u} "));
                }
                if let Some(m) = rest.get(1).filter(|m| !m.is_empty()) {
                    if m.len() > 4 || !m.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                        return Err(bad(format!("mode {m:?} is not octal")));
                    }
                    flags.push_str(&format!("--chmod={m} "));
                }
                push(Line::Text(format!(
                    "COPY {flags}[{}, {}]",
                    json(&format!("{hash}/{src}")),
                    json(dest)
                )));
                files.push((hash.to_string(), step.clone()));
            }
            ("ENV", kv) if !kv.is_empty() && kv.len() % 2 == 0 => {
                let mut t = String::from("ENV");
                for p in kv.chunks(2) {
                    let (k, v) = (&p[0], &p[1]);
                    let name_ok = k.bytes().next().is_some_and(|b| !b.is_ascii_digit())
                        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if !name_ok || v.contains(['\n', '\r', '\0']) {
                        return Err(bad(format!(
                            "{k:?}: a name of [A-Za-z0-9_], a value of one line"
                        )));
                    }
                    t.push_str(&format!(" {k}={}", quoted(v)));
                }
                push(Line::Text(t));
            }
            ("WORKDIR", [p]) => {
                one_line("path", p).map_err(bad)?;
                push(Line::Text(format!("WORKDIR {}", p.replace('$', "\\$"))));
            }
            ("USER", [u]) => {
                one_line("user", u).map_err(bad)?;
                if u.contains(' ') {
                    return Err(bad(format!("user {u:?}")));
                }
                push(Line::User {
                    name: u.clone(),
                    sticky: true,
                });
            }
            (k, _) => {
                return Err(bad(format!(
                "{k} with {} arguments is not a step kiln knows (COPY, RUN, ENV, WORKDIR, USER)",
                s.args.len()
            )))
            }
        }
    }
    // The start and ready commands ride on the image as labels; every sandbox that boots
    // from it runs them (kiln_runtime::start_cmd).
    let mut labels = String::new();
    for (label, cmd, what) in [
        (START_LABEL, &start.start_cmd, "startCmd"),
        (READY_LABEL, &start.ready_cmd, "readyCmd"),
    ] {
        if let Some(c) = cmd.as_deref().filter(|c| !c.trim().is_empty()) {
            one_line(what, c)?;
            labels.push_str(&format!(" {label}={}", quoted(c)));
        }
    }
    if !labels.is_empty() {
        lines.push((Line::Text(format!("LABEL{labels}")), FINALIZE_STEP.into()));
    }
    Ok(Plan { base, lines, files })
}

/// A Dockerfile `ENV`/`LABEL` value in double quotes, taken literally (no `$` expansion).
fn quoted(v: &str) -> String {
    let v = v
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "\\$");
    format!("\"{v}\"")
}

/// Where the builder keeps scratch and step trees: the rule `kiln build` follows
/// (`KILN_TMPDIR`, else `/dev/shm/kiln-tmp`, else `KILN_HOME/tmp`), so both share one cache.
pub fn build_tmp(home: &Path) -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_TMPDIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.join("kiln-tmp");
    }
    home.join("tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::types::Step;

    fn step(kind: &str, args: &[&str], hash: Option<&str>) -> Step {
        Step {
            kind: kind.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            files_hash: hash.map(str::to_string),
            force: false,
            force_upload: None,
        }
    }

    #[test]
    fn steps_become_dockerfile_lines() {
        let h = "a".repeat(64);
        let start = BuildStart {
            from_template: Some("sdk".into()),
            steps: vec![
                step("USER", &["app"], None),
                step("RUN", &["echo \"hi\"\nls", "root"], None),
                step("COPY", &["x.txt", "/app/", "", "0755"], Some(&h)),
                step("ENV", &["A", "1 $B", "C", "\"q\""], None),
                step("WORKDIR", &["/app"], None),
            ],
            ..Default::default()
        };
        let p = dockerfile(&start).unwrap();
        assert_eq!(p.base, "sdk");
        let text = p.text("ID", "root");
        assert_eq!(
            text,
            format!(
                "FROM ID\nUSER app\nUSER root\nRUN [\"/bin/sh\", \"-c\", \"echo \\\"hi\\\"\\nls\"]\n\
                 USER app\nCOPY --chmod=0755 [\"{h}/x.txt\", \"/app/\"]\n\
                 ENV A=\"1 \\$B\" C=\"\\\"q\\\"\"\nWORKDIR /app\n"
            )
        );
        let steps = p.line_steps();
        assert_eq!(steps[1].as_deref(), Some("base"));
        assert_eq!(steps[2].as_deref(), Some("1"));
        assert_eq!(steps[3].as_deref(), Some("2"));
        assert_eq!(steps[5].as_deref(), Some("2"));
        assert_eq!(steps[6].as_deref(), Some("3"));
        assert_eq!(p.files, vec![(h.clone(), "3".to_string())]);
        kiln_imagebuilder::dockerfile::parse(&text, "Dockerfile").unwrap();
    }

    #[test]
    fn start_and_ready_commands_become_labels_taken_literally() {
        let start = BuildStart {
            from_template: Some("base".into()),
            start_cmd: Some(r#"echo "$HOME" \ x"#.into()),
            ready_cmd: Some("test -f /tmp/ready".into()),
            ..Default::default()
        };
        let plan = dockerfile(&start).unwrap();
        let text = plan.text("id", "root");
        assert!(
            text.ends_with(&format!(
                "LABEL {START_LABEL}=\"echo \\\"\\$HOME\\\" \\\\ x\" {READY_LABEL}=\"test -f /tmp/ready\"\n"
            )),
            "{text}"
        );
        let two_lines = BuildStart {
            start_cmd: Some("a\nb".into()),
            ..start
        };
        assert!(dockerfile(&two_lines).is_err());
    }

    #[test]
    fn bad_steps_are_refused() {
        let h = "a".repeat(64);
        let bad = [
            step("COPY", &["../x", "/a"], Some(&h)),
            step("COPY", &["/etc/passwd", "/a"], Some(&h)),
            step("COPY", &["x", "/a"], Some("../../etc")),
            step("COPY", &["x", "/a"], None),
            step("ENV", &["A"], None),
            step("ENV", &["A=B", "1"], None),
            step("USER", &["a\nRUN x"], None),
            step("WORKDIR", &[], None),
            step("ADD", &["x", "y"], None),
        ];
        for s in bad {
            let start = BuildStart {
                from_image: Some("debian".into()),
                steps: vec![s.clone()],
                ..Default::default()
            };
            assert!(dockerfile(&start).is_err(), "{s:?}");
        }
        let no_base = BuildStart::default();
        assert!(dockerfile(&no_base).is_err());
        let bad_base = BuildStart {
            from_image: Some("a b".into()),
            ..Default::default()
        };
        assert!(dockerfile(&bad_base).is_err());
        assert!(!valid_hash(&"A".repeat(64)));
        assert!(valid_hash(&"0".repeat(64)));
    }
}
