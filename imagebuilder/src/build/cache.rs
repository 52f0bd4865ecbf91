//! The build's side of the step cache: looking steps and images up (here, else on the remote
//! with `cache_from`), recording a step that ran, reusing one that hit, pushing with `cache_to`.
//! What a cache entry is and how it is named: [`crate::build_cache`].

use super::*;
use crate::build_cache::{get_step, StepRecord};

impl Builder<'_> {
    /// The cached step of `key`: here, else (with `cache_from`) on the remote.
    pub(super) fn lookup_cache(
        &mut self,
        key: &blake3::Hash,
    ) -> Result<Option<(BlobId, StepRecord)>> {
        if self.opts.no_cache {
            return Ok(None);
        }
        let name = build_cache::local_name(key);
        if let Some(id) = self.store.lookup_name(&name)? {
            if let Ok(rec) = get_step(self.store, &id) {
                return Ok(Some((id, rec)));
            }
        }
        if !self.opts.cache_from {
            return Ok(None);
        }
        let remote = || -> Result<Option<(BlobId, StepRecord)>> {
            let Some(id) = self.store.remote_name(&build_cache::remote_name(key))? else {
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

    /// Stores a step that ran: its layer, its upper directory as a cached tree (the next
    /// step's lower layer), its disk, then the record naming them under `cache:<key>`, last,
    /// so a kill never leaves a record pointing at something missing.
    pub(super) fn record_step(
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
        image::set_name_once(self.store, &build_cache::local_name(&key), &rid)?;
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

    pub(super) fn cache_hit(
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

    /// The image cached under `final_key`: here, else (with `cache_from`) on the remote.
    pub(super) fn cached_image(
        &self,
        cache_name: &str,
        final_key: &blake3::Hash,
    ) -> Result<Option<BlobId>> {
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
            let Some(id) = self
                .store
                .remote_name(&build_cache::remote_name(final_key))?
            else {
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

    /// With `cache_to`: pushes every step record the build used or made (layer and disk
    /// first, then the record, then its remote name) and the image. Returns bytes uploaded.
    pub(super) fn push_cache(
        &mut self,
        final_key: &blake3::Hash,
        image_id: &BlobId,
    ) -> Result<u64> {
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
            self.store.push_name(&build_cache::remote_name(key), rid)?;
        }
        bytes += image::push(self.store, image_id)?;
        self.store
            .push_name(&build_cache::remote_name(final_key), image_id)?;
        self.say(&format!(
            "  step cache pushed: {} steps, {bytes} bytes uploaded in {:.2} s",
            records.len(),
            t.elapsed().as_secs_f64()
        ));
        Ok(bytes)
    }
}
