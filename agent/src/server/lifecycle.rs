//! `Health` and `Generation`: what the host asks after a boot, a restore or a fork.

use super::{fail, io_fail, send_json, Conn, Res};
use crate::genid::{Actions, SystemActions};
use crate::protocol::*;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static GENERATION: AtomicU64 = AtomicU64::new(0);

fn started() -> Instant {
    static T: OnceLock<Instant> = OnceLock::new();
    *T.get_or_init(Instant::now)
}

/// Records the agent's start (for `Health`'s uptime), sets up the allocator and starts the
/// reaper.
pub fn init() {
    started();
    tune_allocator();
    super::start_reaper();
}

/// glibc's malloc, tuned for an agent whose threads come and go with its requests: few arenas
/// (one per thread would hold each thread's freed memory apart), and large buffers (frames of
/// up to 1 MiB, 64 KiB reads) always mapped and unmapped, not kept in the heap once freed (the
/// default threshold rises after the first such free). Everything the agent keeps goes into
/// every checkpoint of its sandbox.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Gives the memory the allocator holds free back to the kernel (before a checkpoint: it
/// would be saved with the sandbox otherwise).
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `$KILN_AGENT_RUN_DIR`, default `/run/kiln`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("KILN_AGENT_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/kiln"))
}

pub fn health() -> HealthInfo {
    HealthInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        generation: GENERATION.load(Ordering::SeqCst),
        uptime_ms: started().elapsed().as_millis() as u64,
        oom_kills: crate::limits::oom_kills(),
    }
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 1024 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn generation(req: GenerationRequest, c: &Conn) -> Res<()> {
    let Some(seed) = parse_hex(&req.seed_hex) else {
        return fail(
            ErrorKind::Invalid,
            "seed_hex: want an even number of hex digits (at most 1024)",
        );
    };
    // Two hosts' requests are applied one after the other, the file matching the counter.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut sys = SystemActions;
    // gVisor (and an unprivileged agent) refuse to set the clock: reported, not an error.
    let clock_set = req.unix_time_ns != 0 && sys.set_clock(req.unix_time_ns).is_ok();
    let mut entropy_credited = false;
    if !seed.is_empty() {
        // Writing mixes the seed in (without credit) wherever /dev/urandom exists; the ioctl
        // also credits it, when permitted.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .and_then(|mut f| f.write_all(&seed));
        entropy_credited = sys.reseed(&seed).is_ok();
    }
    let dir = run_dir();
    std::fs::create_dir_all(&dir).map_err(|e| io_fail(&dir.to_string_lossy(), e))?;
    let path = dir.join("generation");
    write_replacing(&dir, &path, format!("{}\n", req.generation).as_bytes())
        .map_err(|e| io_fail(&path.to_string_lossy(), e))?;
    GENERATION.store(req.generation, Ordering::SeqCst);
    send_json(
        c,
        Kind::Ok,
        &GenerationReply {
            generation: req.generation,
            clock_set,
            entropy_credited,
        },
    )
}

/// Writes `path` by renaming a new file over it. The directory (/run/kiln) is shared with every
/// root process in the sandbox, which may have put symlinks or anything else under any name:
/// the temporary file is created exclusively (never through a symlink) under a fresh name, and
/// a rename replaces whatever `path` was without following it.
fn write_replacing(
    dir: &std::path::Path,
    path: &std::path::Path,
    data: &[u8],
) -> std::io::Result<()> {
    let mut last = None;
    for attempt in 0..16u32 {
        let tmp = dir.join(format!(".generation.{}.{attempt}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => f,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let written = f
            .write_all(data)
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return written;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary name")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_seeds() {
        assert_eq!(super::parse_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(super::parse_hex(""), Some(vec![]));
        assert_eq!(super::parse_hex("abc"), None);
        assert_eq!(super::parse_hex("zz"), None);
    }
}
