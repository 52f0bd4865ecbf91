//! Templates (images and sandbox snapshots as E2B lists them).

use super::*;

/// kiln images as E2B templates: one per image name; the name is the `templateID`.
pub(super) async fn list_templates(
    State(state): State<Arc<AppState>>,
) -> ApiResult<Json<Vec<types::Template>>> {
    let sb = state.sandboxes.clone();
    // What a sandbox of this template gets unless its create says otherwise.
    let cpu_count = sb.default_runtime().map_or(1, kiln_runtime::default_cpus);
    let images = blocking(move || Ok(kiln_imagebuilder::image::list(sb.store())?)).await?;
    // name -> (image id, disk MiB, updated ms): this home's images, then the cluster's
    // (which win: a name published since may mean a newer image than this home holds).
    let mut all: BTreeMap<String, (String, u64, u64)> = images
        .into_iter()
        .map(|i| (i.name, (i.id.to_hex(), i.disk_size.div_ceil(1 << 20), 0)))
        .collect();
    if let Some(c) = &state.cluster {
        for (name, e) in c.templates().await? {
            if e.kind == kiln_cluster::TemplateKind::Image {
                all.insert(name, (e.id, e.disk_mib, e.updated_ms));
            }
        }
    }
    Ok(Json(
        all.into_iter()
            .map(|(name, (id, disk_mib, updated_ms))| types::Template {
                template_id: name.clone(),
                build_id: id,
                cpu_count,
                memory_mb: kiln_runtime::DEFAULT_MEMORY_MIB,
                disk_size_mb: disk_mib,
                public: false,
                aliases: vec![name.clone()],
                names: vec![name],
                created_at: rfc3339(updated_ms),
                updated_at: rfc3339(updated_ms),
                created_by: None,
                last_spawned_at: None,
                spawn_count: 0,
                build_count: 1,
                envd_version: ENVD_VERSION,
                build_status: "ready",
            })
            .collect(),
    ))
}

/// Deletes a template: a sandbox snapshot (the SDK's `delete_snapshot`), else an image and
/// its tags (`name:tag`, as template builds name them; the SDK's `Template.delete`). Names
/// go at once; data once no sandbox needs it (chunks with the next gc).
pub(super) async fn delete_template(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    forwarded: Option<axum::Extension<crate::cluster::Forwarded>>,
) -> ApiResult<StatusCode> {
    let name = strip_tag(&id).to_string();
    // Cluster mode: the names leave the catalog first, so no node pulls them again, then
    // every other node drops its copy (told by the node asked, never by those it tells).
    let mut unpublished = false;
    if let Some(c) = state.cluster.as_ref().filter(|_| forwarded.is_none()) {
        let tagged = format!("{name}:");
        let names: Vec<(String, String)> = c
            .templates()
            .await?
            .into_iter()
            .filter(|(n, _)| *n == name || n.starts_with(&tagged))
            .map(|(n, e)| (n, e.id))
            .collect();
        c.unpublish(&names).await?;
        unpublished = !names.is_empty();
        let path = format!("/templates/{}", path_segment(&id));
        c.delete_everywhere(&path, Bytes::new()).await;
    }
    let sb = state.sandboxes.clone();
    let removed = blocking(move || {
        if sb.remove_snapshot(&name)? {
            return Ok(true);
        }
        let store = sb.store();
        let tagged = format!("{name}:");
        let mut removed = false;
        for i in kiln_imagebuilder::image::list(store)? {
            if i.name == name || i.name.starts_with(&tagged) {
                match kiln_imagebuilder::image::remove(store, &i.name) {
                    Ok(()) => removed = true,
                    Err(kiln_imagebuilder::Error::ImageNotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(removed)
    })
    .await?;
    if removed || unpublished {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template '{id}' not found"),
        ))
    }
}

/// `s` as one path segment: every byte but the unreserved ones and `:`/`@` percent-encoded
/// (a name from the client, sent on to the other nodes as it was asked).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' | b'@' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_name_is_one_path_segment() {
        assert_eq!(super::path_segment("tpl-c:v1.2"), "tpl-c:v1.2");
        assert_eq!(
            super::path_segment("a/b c\r\n?#%"),
            "a%2Fb%20c%0D%0A%3F%23%25"
        );
    }
}
