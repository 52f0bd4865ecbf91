//! Templates across the cluster ([`kiln_cluster::templates`]): a template built or a snapshot
//! taken through one node's API is pushed to the store's S3 remote, then published under its
//! names in etcd, before the API says it is ready; a node asked to create a sandbox from a
//! name it lacks (or holds at another id) pulls it from the remote by the catalog's id
//! (record and manifests: the data comes lazily, on read) and names it here. Lists and
//! `Template.exists` through any node see the whole catalog; a delete through any node
//! removes the names from it.

use super::Cluster;
use crate::control::ApiError;
use axum::http::StatusCode;
use kiln_blockstore::BlobId;
use kiln_cluster::{TemplateEntry, TemplateKind};
use kiln_runtime::Sandboxes;
use std::sync::Arc;

/// The template names this home holds because the cluster's catalog had them (published
/// from here, or pulled), with the id of each: `name id` a line in `serve/cluster-templates`.
/// A name held that the catalog no longer has was deleted while this node did not hear of
/// it (down, or the delete's node died before telling it): its copy goes at its next create
/// if it is still that id (not one built here since), so a delete holds on every node, not
/// only on those live at the time.
pub(crate) struct Held {
    file: std::path::PathBuf,
    lock: std::sync::Mutex<()>,
}

impl Held {
    pub(crate) fn new(serve_dir: &std::path::Path) -> Held {
        Held {
            file: serve_dir.join("cluster-templates"),
            lock: Default::default(),
        }
    }

    fn read(&self) -> std::collections::BTreeMap<String, String> {
        std::fs::read_to_string(&self.file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, id)| (n.to_string(), id.to_string()))
            .collect()
    }

    /// The id name `name` was held at.
    fn id_of(&self, name: &str) -> Option<String> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.read().remove(name)
    }

    /// Records `names` as held at `id` (None: no longer held); a failure to write is logged
    /// (the copy then merely outlives a delete it missed).
    fn set(&self, names: &[String], id: Option<&str>) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.read();
        for n in names {
            match id {
                Some(id) => all.insert(n.clone(), id.to_string()),
                None => all.remove(n),
            };
        }
        let text: String = all.iter().map(|(n, id)| format!("{n} {id}\n")).collect();
        let opts = kiln_atomicfile::Options::PLAIN;
        if let Err(e) = kiln_atomicfile::write(&self.file, text.as_bytes(), opts) {
            tracing::warn!("{}: {e}", self.file.display());
        }
    }
}

/// Why a template could not be published or fetched.
fn failed(what: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, what)
}

impl Cluster {
    /// Pushes image `id` to the store's remote, then points each of `names` at it in the
    /// cluster's catalog. Blocking (a build's thread calls it).
    pub(crate) fn publish_image(
        &self,
        sandboxes: &Sandboxes,
        names: &[String],
        id: &BlobId,
    ) -> Result<(), String> {
        let disk_mib = kiln_imagebuilder::image::get_record(sandboxes.store(), id)
            .map_err(|e| e.to_string())?
            .disk_size
            .div_ceil(1 << 20);
        self.publish(sandboxes, names, TemplateKind::Image, id, disk_mib, || {
            kiln_imagebuilder::image::push(sandboxes.store(), id).map_err(|e| e.to_string())
        })
    }

    /// Pushes sandbox snapshot `id` (with its image) to the store's remote, then points
    /// `name` at it in the cluster's catalog. Blocking.
    pub(crate) fn publish_snapshot(
        &self,
        sandboxes: &Sandboxes,
        name: &str,
        id: &BlobId,
    ) -> Result<(), String> {
        self.publish(
            sandboxes,
            &[name.to_string()],
            TemplateKind::Snapshot,
            id,
            0,
            || {
                // No name in the remote: the catalog names it, and a delete there must leave
                // no name a node could still pull it by.
                kiln_runtime::sandbox_snapshot::push(sandboxes.store(), id, None)
                    .map_err(|e| e.to_string())
            },
        )
    }

    fn publish(
        &self,
        sandboxes: &Sandboxes,
        names: &[String],
        kind: TemplateKind,
        id: &BlobId,
        disk_mib: u64,
        push: impl FnOnce() -> Result<u64, String>,
    ) -> Result<(), String> {
        if !sandboxes.store().has_remote() {
            return Err(format!(
                "this node's store has no S3 remote (kiln remote add), so no other node of \
                 the cluster could use {}",
                names.join(", ")
            ));
        }
        let rt = tokio::runtime::Handle::current();
        for n in names {
            rt.block_on(self.check_kind(n, kind))?;
        }
        let t = std::time::Instant::now();
        let bytes = push().map_err(|e| format!("pushing it to the store's remote: {e}"))?;
        let entry = TemplateEntry::new(kind, id.to_hex(), &self.node_id, disk_mib);
        self.held.set(names, Some(&id.to_hex()));
        for n in names {
            rt.block_on(self.templates.publish(n, &entry))
                .map_err(|e| format!("publishing {n} in the cluster's catalog: {e}"))?;
        }
        tracing::info!(
            names = names.join(","),
            id = %id,
            bytes,
            ms = t.elapsed().as_millis() as u64,
            "published to the cluster"
        );
        Ok(())
    }

    /// Err (why) when `name` is in the catalog as the other kind: an image template and a
    /// sandbox snapshot never share a name, so a name means the same thing on every node.
    pub(crate) async fn check_kind(&self, name: &str, kind: TemplateKind) -> Result<(), String> {
        let what = |k: TemplateKind| match k {
            TemplateKind::Image => "a template (an image)",
            TemplateKind::Snapshot => "a sandbox snapshot",
        };
        match self.templates.get(name).await {
            Ok(Some((e, _))) if e.kind != kind => Err(format!(
                "{name} is {} in the cluster (published by node {}); pick another name or \
                 delete it first",
                what(e.kind),
                e.node
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("reading {name} from the cluster's catalog: {e}")),
        }
    }

    /// Removes `names` (each with the id it was seen pointing at) from the cluster's
    /// catalog: a name published again meanwhile (a rebuild) stays.
    pub(crate) async fn unpublish(&self, names: &[(String, String)]) -> Result<(), ApiError> {
        for (n, id) in names {
            self.templates
                .remove(n, Some(id))
                .await
                .map_err(|e| failed(format!("removing {n} from the cluster's catalog: {e}")))?;
        }
        Ok(())
    }

    /// [`Cluster::drop_deleted`] for every name this home holds from the catalog (at join:
    /// deletes made while the node was away). Failures are logged.
    pub(crate) async fn drop_all_deleted(&self, sandboxes: &Arc<Sandboxes>) {
        let held: Vec<String> = {
            let _g = self.held.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.held.read().into_keys().collect()
        };
        for name in held {
            match self.template(&name).await {
                Ok(None) => {
                    if let Err(e) = self.drop_deleted(sandboxes, &name).await {
                        tracing::warn!(template = name, "{}", e.message);
                    }
                }
                Ok(Some(_)) => {}
                Err(e) => tracing::warn!(template = name, "{}", e.message),
            }
        }
    }

    /// A name the catalog does not have: if this home holds it from the catalog, it was
    /// deleted while this node missed the delete: its copy goes here too (the create then
    /// answers as for any unknown template).
    async fn drop_deleted(&self, sandboxes: &Arc<Sandboxes>, name: &str) -> Result<(), ApiError> {
        let held: Vec<(String, String)> = [name, name.strip_suffix(":default").unwrap_or(name)]
            .into_iter()
            .filter_map(|n| Some((n.to_string(), self.held.id_of(n)?)))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = held.iter().map(|(n, _)| n.clone()).collect();
        let sb = sandboxes.clone();
        let dropped = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let store = sb.store();
            for (n, id) in &held {
                // Only the copy the catalog gave: not one built here since under the name.
                let image = kiln_imagebuilder::image::lookup(store, n).ok().map(|x| x.0);
                if image.is_some_and(|i| i.to_hex() == *id) {
                    kiln_imagebuilder::image::remove(store, n).map_err(|e| e.to_string())?;
                }
                let snapshot = kiln_runtime::sandbox_snapshot::list(store)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|(s, _)| s == n);
                if snapshot.is_some_and(|(_, i)| i.to_hex() == *id) {
                    sb.remove_snapshot(n).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| failed(e.to_string()))?;
        match dropped {
            Ok(()) => {
                tracing::info!(
                    names = names.join(","),
                    "dropped templates the cluster deleted"
                );
                self.held.set(&names, None);
                Ok(())
            }
            Err(e) => Err(failed(format!(
                "dropping {} (deleted in the cluster): {e}",
                names.join(", ")
            ))),
        }
    }

    /// Sends `DELETE path` with `body` (a template's, its tags') to every other live node,
    /// so each drops its own copy (a node that pulled a template keeps it under its name).
    /// Best effort, at once to all ([`Cluster::ask`]): a node that misses it drops its copy
    /// when it joins again or creates from the name ([`Held`]).
    pub(crate) async fn delete_everywhere(&self, path: &str, body: axum::body::Bytes) {
        let nodes = match self.others().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(path, "not sent to the other nodes: {e}");
                return;
            }
        };
        let sends = nodes.iter().map(|(node, info)| {
            let req = axum::http::Request::delete(path)
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .body(axum::body::Body::from(body.clone()));
            async move {
                let Ok(req) = req else {
                    tracing::warn!(node, path, "not a request path");
                    return;
                };
                match self.ask(node, info, req).await {
                    Some(r) if r.status().is_success() || r.status() == 404 => {}
                    Some(r) => tracing::warn!(node, path, status = %r.status(), "refused"),
                    None => tracing::warn!(node, path, "node did not answer"),
                }
            }
        });
        futures_util::future::join_all(sends).await;
    }

    /// The cluster's templates (name order).
    pub(crate) async fn templates(&self) -> Result<Vec<(String, TemplateEntry)>, ApiError> {
        self.templates
            .list()
            .await
            .map_err(|e| failed(format!("reading the cluster's templates: {e}")))
    }

    /// Template `name` in the cluster's catalog.
    pub(crate) async fn template(&self, name: &str) -> Result<Option<TemplateEntry>, ApiError> {
        match self.templates.get(name).await {
            Ok(e) => Ok(e.map(|(e, _)| e)),
            Err(e) => Err(failed(format!(
                "reading template {name} from the cluster: {e}"
            ))),
        }
    }

    /// The nodes that hold template `name` (none: unknown to the catalog, or etcd away).
    pub(crate) async fn holders(&self, name: &str) -> Vec<String> {
        match self.template(name).await {
            Ok(Some(e)) => e.holders,
            _ => Vec::new(),
        }
    }

    /// Makes template `name` (as a create names it) what the cluster's catalog says here:
    /// pulled from the remote and named when this home lacks it or holds another id under
    /// it. A name the catalog does not know is left to this home (local images and
    /// snapshots stay usable on their node).
    pub(crate) async fn fetch_template(
        &self,
        sandboxes: &Arc<Sandboxes>,
        name: &str,
    ) -> Result<(), ApiError> {
        let mut found = None;
        for n in [name, name.strip_suffix(":default").unwrap_or(name)] {
            if let Some(e) = self.template(n).await? {
                found = Some((n.to_string(), e));
                break;
            }
        }
        let Some((name, entry)) = found else {
            return self.drop_deleted(sandboxes, name).await;
        };
        let id: BlobId = entry.id.parse().map_err(|e| {
            failed(format!(
                "template {name} in the cluster's catalog names no blob id ({e})"
            ))
        })?;
        let (sb, n) = (sandboxes.clone(), name.clone());
        let pulled = tokio::task::spawn_blocking(move || -> Result<bool, String> {
            match entry.kind {
                TemplateKind::Image => {
                    let store = sb.store();
                    let here = kiln_imagebuilder::image::lookup(store, &n)
                        .ok()
                        .map(|x| x.0);
                    if here == Some(id) {
                        return Ok(false);
                    }
                    kiln_imagebuilder::image::pull(store, &id, &n).map_err(|e| e.to_string())?;
                }
                TemplateKind::Snapshot => {
                    sb.pull_snapshot(&n, &id).map_err(|e| e.to_string())?;
                }
            }
            Ok(true)
        })
        .await
        .map_err(|e| failed(format!("pulling template {name}: {e}")))?
        .map_err(|e| {
            failed(format!(
                "template {name} (published by node {}) could not be pulled from the \
                 store's remote: {e}",
                entry.node
            ))
        })?;
        if pulled {
            tracing::info!(template = name, id = %id, "pulled a template of the cluster");
        }
        self.held.set(std::slice::from_ref(&name), Some(&entry.id));
        if let Err(e) = self
            .templates
            .add_holder(&name, &entry.id, &self.node_id)
            .await
        {
            tracing::warn!(template = name, "could not note this node as a holder: {e}");
        }
        Ok(())
    }
}
