//! A gVisor sandbox's writable layer on host disk, bounded by the sandbox's disk size.
//!
//! runsc keeps the root overlay's upper layer in a "filestore": with
//! `--overlay2=root:dir=DIR` the `runsc run`/`restore` process creates a file in DIR, unlinks
//! it at once and hands its descriptor to the sentry, which backs the upper tmpfs with it
//! (writes are `pwrite`s to it, reads and mmaps map it; deleted files punch holes). So file
//! data lives in host page cache and on disk, not in the sentry's memory. gVisor has no size
//! limit for that layer (the upper tmpfs of the root overlay is mounted without `size=`), so
//! the bound is the file system DIR is on: every run and restore gets a fresh, empty ext4 of
//! the sandbox's disk size in a sparse image (`disk.img`), loop-mounted on `disk/` in the
//! sandbox's own directory. A write past it fails with ENOSPC inside; the sandbox lives on.
//!
//! - Neither `disk/` nor the image is visible inside the sandbox, and the filestore has no
//!   name at all (runsc unlinks it): nothing there is sandbox-writable by name.
//! - The loop device is configured with `LO_FLAGS_AUTOCLEAR` (it goes when its last user does:
//!   the mount, or this process if it dies before mounting) and direct I/O (the image's pages
//!   are not cached a second time under the file system's own); the ext4 is mounted with
//!   `discard`, so space the sandbox frees is punched out of the image.
//! - The empty ext4 is made once per size by `mkfs.ext4` into `<home>/disks/` (a few hundred
//!   KiB of metadata in a sparse file) and copied for each run, holes kept: a sandbox start
//!   pays a copy of its written blocks, not a process of its own.
//! - A checkpoint saves the filestore's pages in the state file, and `runsc restore` writes
//!   them into a new filestore: nothing on this disk outlives its run. [`detach`] (from the
//!   driver's `kill`, and when a paused container is forgotten) unmounts and deletes it all.

use crate::error::{Error, IoCtx, Result};
use crate::hostfs;
use crate::record::SandboxDir;
use crate::sandboxes::{MAX_DISK_MIB, MIN_DEFAULT_DISK_MIB};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The image file and its mount point in the sandbox's directory.
const IMAGE: &str = "disk.img";
const MOUNT: &str = "disk";

// linux/loop.h (not in the libc crate).
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// What a checkpoint's state says of where its files were (`"overlay"`): the writable layer's
/// pages are in a filestore of their own, and runsc restores them only into one ("inconsistent
/// private memory files" otherwise).
pub const OVERLAY: &str = "disk";

/// Refuses a checkpoint made while the writable layer was in the sentry's memory (before
/// sandbox disks): runsc could not restore it with a filestore.
pub fn check_checkpoint(state: &serde_json::Value) -> Result<()> {
    match state.get("overlay").and_then(|v| v.as_str()) {
        Some(OVERLAY) => Ok(()),
        _ => Err(Error::Invalid(
            "this checkpoint keeps the sandbox's files in memory (made by a kiln without \
             sandbox disks); it cannot be restored by this one"
                .into(),
        )),
    }
}

/// The `--overlay2` value that puts the root overlay's filestore on this sandbox's disk.
pub fn overlay_flag(dir: &SandboxDir) -> Result<String> {
    let mount = mount_point(dir)?;
    let s = mount
        .to_str()
        .filter(|s| !s.contains([':', ',']))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: runsc's --overlay2 cannot take this path (not UTF-8, or a ':' or ',' in it)",
                mount.display()
            ))
        })?;
    Ok(format!("--overlay2=root:dir={s}"))
}

fn mount_point(dir: &SandboxDir) -> Result<PathBuf> {
    let p = dir.sub(MOUNT);
    std::path::absolute(&p).ctx("resolve", &p)
}

/// Bytes of an image whose ext4 (as [`mkfs`] makes it) has `disk_mib` MiB free, give or take
/// one: ext4 keeps 2% back for delayed allocation (at most 16 MiB), bitmaps and group
/// descriptors take about 0.01%, the rest under 2 MiB (measured here, 16 MiB to 1 TiB).
fn image_bytes(disk_mib: u64) -> u64 {
    let mib = disk_mib
        .saturating_add((disk_mib / 50).min(16))
        .saturating_add(disk_mib / 4096)
        .saturating_add(2);
    mib.saturating_mul(1 << 20)
}

/// Makes a fresh, empty disk of `disk_mib` MiB (a copy of the empty one of that size in
/// `templates`) and mounts it where [`overlay_flag`] points, after removing whatever an
/// earlier run left. A record without a disk size (0) gets the default one.
pub fn attach(dir: &SandboxDir, disk_mib: u64, templates: &Path) -> Result<()> {
    let disk_mib = match disk_mib {
        0 => MIN_DEFAULT_DISK_MIB,
        d => d,
    };
    if disk_mib > MAX_DISK_MIB {
        return Err(Error::Invalid(format!(
            "a disk of {disk_mib} MiB (1 to {MAX_DISK_MIB} MiB)"
        )));
    }
    detach(dir)?;
    let t = std::time::Instant::now();
    let image = dir.sub(IMAGE);
    let mount = mount_point(dir)?;
    std::fs::create_dir_all(&mount).ctx("create", &mount)?;
    let template = template(templates, image_bytes(disk_mib))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&image)
        .ctx("create", &image)?;
    let made = (|| {
        copy_sparse(&template, &file).ctx("copy the empty disk into", &image)?;
        let dev = loop_attach(&file).ctx("attach a loop device to", &image)?;
        mount_ext4(&dev.path, &mount).ctx("mount", &mount)
        // `dev` closes here: from now on the mount alone keeps the loop device.
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_file(&image);
        return Err(e);
    }
    tracing::debug!(
        disk_mib,
        ms = t.elapsed().as_millis() as u64,
        "sandbox disk attached"
    );
    Ok(())
}

/// Unmounts the sandbox's disk and deletes its image. Idempotent; the loop device goes with
/// the mount (autoclear).
pub fn detach(dir: &SandboxDir) -> Result<()> {
    let mount = dir.sub(MOUNT);
    hostfs::unmount_all(&mount).ctx("unmount", &mount)?;
    let image = dir.sub(IMAGE);
    match std::fs::remove_file(&image) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).ctx("remove", &image),
    }
    match std::fs::remove_dir(&mount) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx("remove", &mount),
    }
}

/// `(used, total)` bytes of the sandbox's disk while it is mounted, as envd's metrics count
/// them (`statfs`: total = all data blocks, used = total - available to its user); `None`
/// when no disk is mounted (the sandbox is paused or gone). The mount point is in the
/// sandbox's own host directory, which the sandbox cannot name or write.
pub fn space(dir: &SandboxDir) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mount = dir.sub(MOUNT);
    // Not a mount point (the disk is detached): statfs would describe the host's file system.
    if std::fs::metadata(&mount).ok()?.dev() == std::fs::metadata(dir.path()).ok()?.dev() {
        return None;
    }
    let path = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a writable statvfs; statvfs(3) writes only
    // into it.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let total = (st.f_blocks as u64).saturating_mul(st.f_frsize as u64);
    let avail = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    Some((total.saturating_sub(avail), total))
}

/// The empty ext4 image of `bytes` in `templates`, made if missing (under a temporary name,
/// renamed when complete: a concurrent start or a kill mid-way leaves no half-made one; the
/// temporary files of makers that died are removed by the next one).
fn template(templates: &Path, bytes: u64) -> Result<std::fs::File> {
    let path = templates.join(format!("ext4-{bytes}.img"));
    if let Ok(f) = std::fs::File::open(&path) {
        return Ok(f);
    }
    std::fs::create_dir_all(templates).ctx("create", templates)?;
    remove_orphans(templates);
    let pid = std::process::id();
    // Unique per call: threads of one process may make the same size at once.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = templates.join(format!(
        ".tmp-{pid}-{bytes}-{}-{seq}",
        crate::record::now_ms()
    ));
    let made = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("create", &tmp)?;
        f.set_len(bytes).ctx("size", &tmp)?;
        mkfs(&tmp)?;
        f.sync_all().ctx("sync", &tmp)?;
        std::fs::rename(&tmp, &path).ctx("rename into", &path)
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&path).ctx("open", &path)
}

/// Removes the temporary images of template makers that are gone (`.tmp-PID-...`).
fn remove_orphans(templates: &Path) {
    let Ok(entries) = std::fs::read_dir(templates) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".tmp-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Copies `from` into the empty `to`, same length, holes kept (only the data extents are
/// read and written, found with SEEK_DATA/SEEK_HOLE).
fn copy_sparse(from: &std::fs::File, to: &std::fs::File) -> std::io::Result<()> {
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let seek = |whence: libc::c_int, at: u64| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek(2) on a descriptor `from` owns; it moves only that file's offset.
        let r = unsafe { libc::lseek(from.as_raw_fd(), at as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut at = 0;
    while at < len {
        let Some(data) = seek(libc::SEEK_DATA, at)? else {
            break;
        };
        let end = seek(libc::SEEK_HOLE, data)?.unwrap_or(len).min(len);
        let (mut off_in, mut off_out) = (data as i64, data as i64);
        let mut left = end - data;
        while left > 0 {
            // SAFETY: copy_file_range(2) between two descriptors this function borrows,
            // with offsets it owns; no memory of ours is touched.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    left as usize,
                    0,
                )
            };
            match n {
                n if n > 0 => left -= n as u64,
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ => return Err(std::io::Error::last_os_error()),
            }
        }
        at = end;
    }
    Ok(())
}

/// An ext4 for one file: no journal (nothing on it outlives the run, so there is nothing to
/// recover), no reserved blocks, no room to grow, a handful of inodes.
fn mkfs(image: &Path) -> Result<()> {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-N", "16"])
        .args([
            "-O",
            "^has_journal,^resize_inode",
            "-E",
            "nodiscard,root_owner=0:0",
        ])
        .arg(image)
        .output()
        .ctx("run mkfs.ext4 for", image)?;
    if !out.status.success() {
        return Err(Error::Driver {
            what: "making the sandbox's disk (mkfs.ext4)".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A loop device bound to `file`, open.
struct LoopDev {
    _fd: OwnedFd,
    path: PathBuf,
}

fn check(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_dev(path: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds a free loop device to `file` (autoclear, direct I/O when the host file system allows
/// it), retrying when another process takes the same free device first.
fn loop_attach(file: &std::fs::File) -> std::io::Result<LoopDev> {
    // Threads of one process (kiln serve) take turns: they would all be handed the same
    // free device and race for it.
    static ATTACHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ATTACHING.lock().unwrap_or_else(|p| p.into_inner());
    let ctl = open_dev(c"/dev/loop-control")?;
    let mut flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
    let mut last = None;
    // EBUSY comes back for as long as a device GET_FREE hands out is still claimed: raced
    // by a concurrent attach (the next GET_FREE gives another), or one just released whose
    // teardown has not finished (GET_FREE gives the same one again): give that time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut busy_wait = std::time::Duration::from_millis(1);
    while std::time::Instant::now() < deadline {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; the result is checked.
        let n = check(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
        let dev = match open_dev(&c) {
            Ok(d) => d,
            // Just made by the kernel: its node may not be there yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(e),
        };
        // SAFETY: all-zero is a valid loop_config (no offset, no limit, no name).
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = file.as_raw_fd() as u32;
        cfg.block_size = 4096;
        cfg.info.lo_flags = flags;
        // SAFETY: LOOP_CONFIGURE reads one loop_config (linux/loop.h layout) from our pointer.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        match check(r) {
            Ok(_) => return Ok(LoopDev { _fd: dev, path }),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                last = Some(e);
                std::thread::sleep(busy_wait);
                busy_wait = (busy_wait * 2).min(std::time::Duration::from_millis(50));
            }
            // A host file system without O_DIRECT: buffered it is.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & LO_FLAGS_DIRECT_IO != 0 => {
                flags &= !LO_FLAGS_DIRECT_IO;
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free loop device")))
}

fn mount_ext4(dev: &Path, at: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (src, dst) = (c(dev)?, c(at)?);
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
    // SAFETY: mount(2) with valid NUL-terminated strings; the result is checked.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            c"ext4".as_ptr(),
            flags,
            c"discard".as_ptr().cast(),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_sizes_saturate() {
        assert_eq!(image_bytes(0), 2 << 20);
        assert_eq!(image_bytes(2048), (2048 + 16 + 2) << 20);
        assert_eq!(image_bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn sparse_copies_keep_data_and_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let tmp = tempfile::tempdir().unwrap();
        let from = std::fs::File::create_new(tmp.path().join("from")).unwrap();
        from.set_len(64 << 20).unwrap();
        from.write_all_at(b"head", 0).unwrap();
        from.write_all_at(&[7u8; 70_000], 5 << 20).unwrap();
        from.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        let from = std::fs::File::open(tmp.path().join("from")).unwrap();
        let to = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp.path().join("to"))
            .unwrap();
        copy_sparse(&from, &to).unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("from")).unwrap(),
            std::fs::read(tmp.path().join("to")).unwrap()
        );
        // Holes stay holes: far less than the 64 MiB is allocated.
        assert!(to.metadata().unwrap().blocks() * 512 < 4 << 20);
    }

    #[test]
    fn templates_are_made_once_and_leave_no_temporary_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join(".tmp-999999999-1-2");
        std::fs::write(&dead, b"left by a maker killed mid-way").unwrap();
        if let Err(e) = template(tmp.path(), 64 << 20) {
            eprintln!("SKIP: mkfs.ext4 unavailable: {e}");
            return;
        }
        let made = std::fs::metadata(tmp.path().join(format!("ext4-{}.img", 64 << 20))).unwrap();
        template(tmp.path(), 64 << 20).unwrap();
        let again = std::fs::metadata(tmp.path().join(format!("ext4-{}.img", 64 << 20))).unwrap();
        assert_eq!(made.modified().unwrap(), again.modified().unwrap());
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("ext4-{}.img", 64 << 20)]);
    }
}
