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
    let epoch = rfc3339(0);
    Ok(Json(
        images
            .into_iter()
            .map(|i| types::Template {
                template_id: i.name.clone(),
                build_id: i.id.to_hex(),
                cpu_count,
                memory_mb: kiln_runtime::DEFAULT_MEMORY_MIB,
                disk_size_mb: i.disk_size.div_ceil(1 << 20),
                public: false,
                aliases: vec![i.name.clone()],
                names: vec![i.name],
                created_at: epoch.clone(),
                updated_at: epoch.clone(),
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
) -> ApiResult<StatusCode> {
    let name = strip_tag(&id).to_string();
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
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template '{id}' not found"),
        ))
    }
}
