//! A template's start and ready commands (E2B's `set_start_cmd` / `set_ready_cmd`), kept as
//! labels of the template's image: every sandbox that boots afresh from it (create from the
//! image, a resume that boots on saved files) starts the start command in the background,
//! as the image's user, in its working directory and environment, then runs the ready
//! command every [`READY_EVERY`] until it exits 0. The sandbox is handed out only then; a
//! ready command that never succeeds within [`READY_WAIT`] fails the create or resume.
//! A restore from memory runs neither: its processes come back as they were.

use crate::error::{Error, Result};
use crate::record::SandboxRecord;
use crate::sandboxes::{ExecOptions, Sandboxes};
use kiln_imagebuilder::image::ImageRecord;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The image label holding the start command (a shell command line).
pub const START_LABEL: &str = "dev.kiln.start-cmd";
/// The image label holding the ready command (a shell command line; exit 0 = ready).
pub const READY_LABEL: &str = "dev.kiln.ready-cmd";
/// How long a sandbox may take to become ready (within the SDKs' default request timeout).
pub const READY_WAIT: Duration = Duration::from_secs(60);
/// The longest one run of the ready command may take.
const READY_ATTEMPT: Duration = Duration::from_secs(20);
/// How often the ready command runs.
const READY_EVERY: Duration = Duration::from_millis(200);
/// The ready command's output kept for the error (its tail).
const OUTPUT_TAIL: usize = 2000;

/// Starts `image`'s start command and waits for its ready command, if it has them.
pub(crate) fn run(
    sandboxes: &Sandboxes,
    connect: &dyn Fn() -> Result<UnixStream>,
    rec: &SandboxRecord,
    image: &ImageRecord,
) -> Result<()> {
    let labels = &image.config.labels;
    let shell = |cmd: &str| {
        sandboxes.exec_request(
            rec,
            ExecOptions {
                argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
                env: Default::default(),
                cwd: None,
                user: None,
            },
        )
    };
    if let Some(start) = labels.get(START_LABEL).filter(|c| !c.is_empty()) {
        let mut req = shell(start);
        req.tag = Some("start".into());
        let started = kiln_agent::client::start_background(&mut connect()?, &req)?;
        tracing::info!(id = %rec.id, pid = started.pid, "started the template's start command");
    }
    let Some(ready) = labels.get(READY_LABEL).filter(|c| !c.is_empty()) else {
        return Ok(());
    };
    // Its stdin is closed at once (`exec` with no input): a check is not interactive.
    let req = shell(ready);
    let t = Instant::now();
    let mut last = String::new();
    loop {
        let left = READY_WAIT.saturating_sub(t.elapsed()).min(READY_ATTEMPT);
        let mut s = connect()?;
        // A ready command that hangs is cut off (the agent ends it with its connection) and
        // counts as one that failed.
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| Error::Driver {
                what: "the ready command".into(),
                detail: e.to_string(),
            })?;
        match kiln_agent::client::exec(&mut s, &req, b"", |_, _| {}) {
            Ok(out) if out.status.code == Some(0) => return Ok(()),
            Ok(out) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                let mut cut = text.len().saturating_sub(OUTPUT_TAIL);
                while !text.is_char_boundary(cut) {
                    cut += 1;
                }
                let how = match (out.status.code, out.status.signal) {
                    (Some(c), _) => format!("exit {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    (None, None) => "ended".to_string(),
                };
                last = format!("{how}: {}", text[cut..].trim());
            }
            // A run cut off by the overall deadline says less than the run before it.
            Err(_) if left < READY_ATTEMPT && !last.is_empty() => {}
            Err(e) => last = e.to_string(),
        }
        if t.elapsed() + READY_EVERY >= READY_WAIT {
            return Err(Error::NotReady {
                id: rec.id.clone(),
                cmd: ready.clone(),
                secs: READY_WAIT.as_secs(),
                last,
            });
        }
        std::thread::sleep(READY_EVERY);
    }
}
