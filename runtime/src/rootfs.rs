//! Images as directory trees for runtimes that take a root directory (gVisor): the image's
//! layers applied once into `KILN_HOME/rootfs/<image id>/`, shared read-only by every sandbox
//! of that image (each sandbox's writes stay in its own overlay). Built in a temp directory and
//! renamed into place, so a tree is either complete or absent, whatever is killed when.

use crate::error::{Error, IoCtx, Result};
use kiln_blockstore::{BlobId, Store};
use kiln_imagebuilder::image::ImageRecord;
use std::path::{Path, PathBuf};

/// The image's tree, extracted now if it is not there yet.
pub fn ensure(
    store: &Store,
    home: &Path,
    image_id: &BlobId,
    image: &ImageRecord,
) -> Result<PathBuf> {
    let root = home.join("rootfs");
    let dst = root.join(image_id.to_hex());
    if dst.is_dir() {
        return Ok(dst);
    }
    std::fs::create_dir_all(&root).ctx("create", &root)?;
    // Unique per call: two threads of one process (the daemon) may extract the same image.
    let tmp = root.join(format!(
        ".tmp-{}-{}",
        image_id.to_hex(),
        crate::record::new_id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).ctx("create", &tmp)?;
    let t = std::time::Instant::now();
    let built = if image.layers.is_empty() {
        dump_disk(store, &image.disk, &tmp)
    } else {
        kiln_imagebuilder::image::materialize(store, &image.layers, &tmp).map_err(Error::from)
    };
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match std::fs::rename(&tmp, &dst) {
        Ok(()) => {}
        // Another process finished the same tree first: use theirs.
        Err(_) if dst.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e).ctx("rename", &dst);
        }
    }
    tracing::info!(image = %image_id, ms = t.elapsed().as_millis() as u64, "image tree extracted");
    Ok(dst)
}

/// Images without layers (a raw disk import): copy the ext4 disk's tree out with debugfs.
fn dump_disk(store: &Store, disk: &BlobId, into: &Path) -> Result<()> {
    let img = into.with_extension("disk");
    store.export(disk, &img)?;
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", into.display()))
        .arg(&img)
        .output();
    let _ = std::fs::remove_file(&img);
    let out = out.ctx("run debugfs for", &img)?;
    if !out.status.success() {
        return Err(Error::Driver {
            what: "copying the image's disk tree (debugfs rdump)".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}
