//! The VMM process's control socket: JSON lines over a Unix socket, one request per line, one
//! response line each. Extensible: new commands are new `cmd` values.
//!
//! Requests: `{"cmd":"status"}` (id, state, pid, memory regions' host addresses, ...),
//! `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"stop"}`,
//! `{"cmd":"save_state","path":P}` (paused VM; writes `VmState` JSON to P),
//! `{"cmd":"save_memory","path":P}` (paused VM; raw guest RAM in region order),
//! `{"cmd":"track_writes","since":TAG}` (paused VM; track guest memory writes from now on,
//! under TAG, e.g. the id of the snapshot just taken),
//! `{"cmd":"save_dirty_memory","path":P,"since":TAG}` (paused VM; the pages written since
//! track_writes TAG: u64 LE count, u32 LE page indices in image order, the pages; fails if
//! writes since TAG were not tracked),
//! `{"cmd":"commit_disk","disk":N}` (overlay disk N -> new blob; pauses around the commit),
//! `{"cmd":"flush_disks"}`.
//! Responses: `{"ok":true, ...}` or `{"ok":false,"error":"..."}`.

use crate::vm::{RunState, Vm};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Stop,
    SaveState { path: PathBuf },
    SaveMemory { path: PathBuf },
    TrackWrites { since: String },
    SaveDirtyMemory { path: PathBuf, since: String },
    CommitDisk { disk: usize },
    FlushDisks,
}

/// What the server needs besides the VM: the overlay behind each disk (None for raw files).
pub struct ControlContext {
    pub vm: Arc<Vm>,
    pub overlays: Vec<Option<Arc<kiln_blockstore::Overlay>>>,
    pub id: String,
    pub tracking: WriteTracking,
}

/// Guest memory writes tracked for diff snapshots over the control socket: the KVM dirty log
/// (the guest's writes) and the VMM's bitmap (its own), accumulated since `track_writes`.
/// Saving dirty memory does not reset it, so a snapshot that fails later loses nothing.
#[derive(Default)]
pub struct WriteTracking {
    inner: std::sync::Mutex<Option<Tracked>>,
}

impl WriteTracking {
    /// Track guest memory writes from now on under the tag `since` (replacing earlier
    /// tracking). The VM must not run: a write between the reset and the start would be lost.
    pub fn start(&self, vm: &Vm, since: String) -> Result<(), String> {
        let e = |err: crate::Error| err.to_string();
        let mut t = self.inner.lock().unwrap();
        *t = None;
        vm.set_dirty_logging(true).map_err(e)?;
        let mut written = Vec::new();
        for r in vm.memory_regions() {
            vm.take_dirty_bitmap(r.slot).map_err(e)?;
            crate::memory::take_written(vm.memory(), r.slot);
            written.push(vec![0u64; (r.size / 4096).div_ceil(64) as usize]);
        }
        *t = Some(Tracked { since, written });
        Ok(())
    }
}

struct Tracked {
    since: String,
    /// Per memory region, pages written (bit i of word w = page w*64+i).
    written: Vec<Vec<u64>>,
}

/// Serves `path` on a background thread until the process exits.
pub fn serve(path: &Path, ctx: Arc<ControlContext>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let vm = ctx.vm.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || handle_conn(conn, &ctx));
            }
        })?;
    watch_socket(path.to_path_buf(), vm)
}

/// Stops the VM once its control socket is gone (its directory or whole home was deleted):
/// nothing can reach such a VM any more, so it would otherwise run on unseen until killed.
fn watch_socket(path: PathBuf, vm: Arc<Vm>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("control-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            if !path.exists() {
                tracing::warn!(socket = %path.display(), "control socket removed; stopping the VM");
                vm.stop();
                return;
            }
        })?;
    Ok(())
}

fn handle_conn(conn: UnixStream, ctx: &ControlContext) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let mut stop_after_reply = false;
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Stop) => {
                // Stopping can end this process before a reply written afterwards leaves it:
                // acknowledge first, then stop.
                stop_after_reply = true;
                serde_json::json!({ "ok": true })
            }
            Ok(req) => match execute(ctx, req) {
                Ok(mut v) => {
                    v["ok"] = true.into();
                    v
                }
                Err(e) => serde_json::json!({ "ok": false, "error": e }),
            },
            Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
        };
        let mut s = resp.to_string();
        s.push('\n');
        let written = out.write_all(s.as_bytes()).and_then(|_| out.flush());
        if stop_after_reply {
            ctx.vm.stop();
        }
        if written.is_err() {
            return;
        }
    }
}

fn execute(ctx: &ControlContext, req: Request) -> Result<serde_json::Value, String> {
    let vm = &ctx.vm;
    let e = |e: crate::Error| e.to_string();
    Ok(match req {
        Request::Status => serde_json::json!({
            "id": ctx.id,
            "state": vm.state(),
            "pid": std::process::id(),
            "mem_bytes": vm.memory_regions().iter().map(|r| r.size).sum::<u64>(),
            "generation": vm.generation_id().generation,
            "generation_id": vm.generation_id().id_hex(),
            "devices": vm.device_metrics(),
            // Where guest RAM lives in this process, in image order: a snapshotter in another
            // process can copy it with process_vm_readv instead of a FIFO.
            "regions": vm.memory_regions().iter()
                .map(|r| serde_json::json!({ "host_addr": r.host_addr, "size": r.size }))
                .collect::<Vec<_>>(),
        }),
        Request::Pause => {
            vm.pause().map_err(e)?;
            serde_json::json!({ "state": vm.state() })
        }
        Request::Resume => {
            vm.resume().map_err(e)?;
            serde_json::json!({ "state": vm.state() })
        }
        // handle_conn answers Stop before stopping; this arm only keeps the match total.
        Request::Stop => {
            vm.stop();
            serde_json::json!({})
        }
        Request::SaveState { path } => {
            let state = vm.save_state().map_err(e)?;
            let json = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
            write_atomic(&path, &json)?;
            serde_json::json!({ "path": path, "bytes": json.len() })
        }
        Request::SaveMemory { path } => {
            if vm.state() != RunState::Paused {
                return Err("save_memory needs a paused VM".into());
            }
            let mut f =
                std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut total = 0u64;
            for r in vm.memory_regions() {
                // SAFETY: the region is live guest memory of this VM (host_addr/size come from
                // its mapping) and the guest is paused, so the bytes are stable.
                let bytes = unsafe {
                    std::slice::from_raw_parts(r.host_addr as *const u8, r.size as usize)
                };
                f.write_all(bytes).map_err(|e| e.to_string())?;
                total += r.size;
            }
            match f.sync_all() {
                // A FIFO (the snapshotter streams memory through one) has nothing to sync.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                r => r.map_err(|e| e.to_string())?,
            }
            serde_json::json!({ "path": path, "bytes": total })
        }
        Request::TrackWrites { since } => {
            if vm.state() != RunState::Paused {
                return Err("track_writes needs a paused VM".into());
            }
            ctx.tracking.start(vm, since.clone())?;
            serde_json::json!({})
        }
        Request::SaveDirtyMemory { path, since } => {
            if vm.state() != RunState::Paused {
                return Err("save_dirty_memory needs a paused VM".into());
            }
            let mut t = ctx.tracking.inner.lock().unwrap();
            let tracked = match t.as_mut() {
                Some(tr) if tr.since == since => tr,
                _ => return Err(format!("writes since {since} were not tracked")),
            };
            let regions = vm.memory_regions();
            for (r, acc) in regions.iter().zip(tracked.written.iter_mut()) {
                let taken = vm.take_dirty_bitmap(r.slot);
                let kvm = match taken {
                    Ok(b) => b,
                    Err(err) => {
                        // The log may be gone in part: never answer from it again.
                        *t = None;
                        return Err(format!("reading the dirty log: {err}"));
                    }
                };
                let own = crate::memory::take_written(vm.memory(), r.slot).unwrap_or_default();
                for (i, a) in acc.iter_mut().enumerate() {
                    *a |= kvm.get(i).copied().unwrap_or(0) | own.get(i).copied().unwrap_or(0);
                }
            }
            let pages = written_pages(&regions, &tracked.written);
            write_pages(&path, &pages).map_err(|err| format!("{}: {err}", path.display()))?;
            serde_json::json!({ "path": path, "pages": pages.len() })
        }
        Request::CommitDisk { disk } => {
            let overlay = ctx
                .overlays
                .get(disk)
                .ok_or_else(|| format!("no disk {disk}"))?
                .clone()
                .ok_or_else(|| format!("disk {disk} is a raw file, not a store overlay"))?;
            let was_running = vm.state() == RunState::Running;
            if was_running {
                vm.pause().map_err(e)?;
            }
            let r = overlay.flush().and_then(|_| overlay.commit());
            if was_running {
                vm.resume().map_err(e)?;
            }
            let blob = r.map_err(|e| e.to_string())?;
            serde_json::json!({ "blob": blob.to_hex() })
        }
        Request::FlushDisks => {
            for o in ctx.overlays.iter().flatten() {
                o.flush().map_err(|e| e.to_string())?;
            }
            serde_json::json!({})
        }
    })
}

/// (page index in image order, host address) of every page set in `written` (per region).
fn written_pages(regions: &[crate::RegionInfo], written: &[Vec<u64>]) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut base = 0u64;
    for (r, bits) in regions.iter().zip(written) {
        let npages = r.size / 4096;
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let p = w as u64 * 64 + u64::from(word.trailing_zeros());
                word &= word - 1;
                if p < npages {
                    out.push(((base + p) as u32, r.host_addr + p * 4096));
                }
            }
        }
        base += npages;
    }
    out
}

/// Writes the `save_dirty_memory` format: count, indices, pages.
fn write_pages(path: &Path, pages: &[(u32, u64)]) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    w.write_all(&(pages.len() as u64).to_le_bytes())?;
    for &(i, _) in pages {
        w.write_all(&i.to_le_bytes())?;
    }
    for &(_, host) in pages {
        // SAFETY: `host` is the address of a whole page inside a live region of this VM's
        // memory (written_pages), and the guest is paused (checked by the caller).
        w.write_all(unsafe { std::slice::from_raw_parts(host as *const u8, 4096) })?;
    }
    w.flush()
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), String> {
    kiln_atomicfile::write(path, data, kiln_atomicfile::Options::PLAIN)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Sends one request to the control socket at `path` and returns the response (an error if
/// the VMM answered `ok: false`).
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value, String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("connecting to {}: {e}", path.display()))?;
    s.set_read_timeout(Some(timeout)).ok();
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    BufReader::new(s)
        .read_line(&mut resp)
        .map_err(|e| format!("reading the VMM's answer: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&resp).map_err(|e| format!("bad answer {resp:?}: {e}"))?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("VMM refused").to_string())
    }
}
