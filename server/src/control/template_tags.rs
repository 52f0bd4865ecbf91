//! Template tags (the SDK's `Template.assign_tags`, `remove_tags`, `get_tags`): a tag `t` of
//! template `name` is the kiln image name `name:t` (as template builds name them), `default`
//! being `name` itself. `buildID` is the image id's first 128 bits in UUID form (E2B's
//! `format: uuid`).

use super::types::{AssignedTemplateTags, TemplateTag};
use super::*;
use kiln_imagebuilder::image;
use types::{AssignTags, DeleteTags};

/// An image id as the UUID E2B's `buildID` fields are.
fn build_uuid(h: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The image name of tag `tag` of template `name`.
fn tagged(name: &str, tag: &str) -> String {
    if tag == "default" {
        name.to_string()
    } else {
        format!("{name}:{tag}")
    }
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("template '{what}' not found"),
    )
}

/// `POST /templates/tags`: 201; 404 when the target names no template.
pub(super) async fn assign_tags(
    State(state): State<Arc<AppState>>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<AssignedTemplateTags>)> {
    let req: AssignTags = body(&bytes, false)?;
    for t in &req.tags {
        check_tag(t)?;
    }
    if req.tags.is_empty() {
        return Err(ApiError::bad_request("tags is empty"));
    }
    let target = req.target.trim().to_string();
    let (name, tag) = target
        .rsplit_once(':')
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .unwrap_or((target.clone(), "default".into()));
    if let Some(c) = &state.cluster {
        c.fetch_template(&state.sandboxes, &tagged(&name, &tag))
            .await?;
    }
    let sb = state.sandboxes.clone();
    let tags = req.tags.clone();
    let id = blocking(move || {
        let store = sb.store();
        let (id, _) = match image::lookup(store, &tagged(&name, &tag)) {
            Err(kiln_imagebuilder::Error::ImageNotFound(_)) => return Ok(None),
            r => r?,
        };
        for t in &tags {
            image::tag(store, &tagged(&name, t), &id)?;
        }
        Ok(Some(id))
    })
    .await?
    .ok_or_else(|| not_found(&target))?;
    if let Some(c) = state.cluster.clone() {
        let n = target.rsplit_once(':').map_or(target.as_str(), |(n, _)| n);
        let names: Vec<String> = req.tags.iter().map(|t| tagged(n, t)).collect();
        let sb = state.sandboxes.clone();
        tokio::task::spawn_blocking(move || c.publish_image(&sb, &names, &id))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    }
    Ok((
        StatusCode::CREATED,
        Json(AssignedTemplateTags {
            tags: req.tags,
            build_id: build_uuid(&id.to_hex()),
        }),
    ))
}

/// `DELETE /templates/tags`: 204; 404 when the template has none of them.
pub(super) async fn delete_tags(
    State(state): State<Arc<AppState>>,
    forwarded: Option<axum::Extension<crate::cluster::Forwarded>>,
    bytes: Bytes,
) -> ApiResult<StatusCode> {
    let req: DeleteTags = body(&bytes, false)?;
    for t in &req.tags {
        check_tag(t)?;
    }
    let name = req.name.trim().to_string();
    let names: Vec<String> = req.tags.iter().map(|t| tagged(&name, t)).collect();
    // Cluster mode: out of the catalog, then out of every other node's home (told by the
    // node asked, never by those it tells).
    let mut removed = 0;
    if let Some(c) = state.cluster.as_ref().filter(|_| forwarded.is_none()) {
        for n in &names {
            if let Some(e) = c.template(n).await? {
                c.unpublish(&[(n.clone(), e.id)]).await?;
                removed += 1;
            }
        }
        c.delete_everywhere("/templates/tags", bytes.clone()).await;
    }
    let sb = state.sandboxes.clone();
    removed += blocking(move || {
        let mut removed = 0;
        for n in &names {
            match image::remove(sb.store(), n) {
                Ok(()) => removed += 1,
                Err(kiln_imagebuilder::Error::ImageNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(removed)
    })
    .await?;
    if removed == 0 {
        return Err(not_found(&name));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{id}/tags`: 200; 404 for a template with no image.
pub(super) async fn get_tags(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<TemplateTag>>> {
    let sb = state.sandboxes.clone();
    let images = blocking(move || Ok(image::list(sb.store())?)).await?;
    // name -> (image id, created ms): this home's, then the cluster's (which win).
    let mut all: BTreeMap<String, (String, u64)> = images
        .into_iter()
        .map(|i| (i.name, (i.id.to_hex(), 0)))
        .collect();
    if let Some(c) = &state.cluster {
        for (n, e) in c.templates().await? {
            if e.kind == kiln_cluster::TemplateKind::Image {
                all.insert(n, (e.id, e.updated_ms));
            }
        }
    }
    let prefix = format!("{id}:");
    let tags: Vec<TemplateTag> = all
        .iter()
        .filter_map(|(name, (image, ms))| {
            let tag = if *name == id {
                "default"
            } else {
                name.strip_prefix(&prefix)?
            };
            Some(TemplateTag {
                tag: tag.to_string(),
                build_id: build_uuid(image),
                created_at: rfc3339(*ms),
            })
        })
        .collect();
    if tags.is_empty() {
        return Err(not_found(&id));
    }
    Ok(Json(tags))
}
