//! `GET /templates/aliases/{alias}` (the SDK's `Template.exists`): kiln's template aliases
//! are the names of its images and sandbox snapshots, each its own `templateID` (as `GET
//! /templates` lists them); `name:tag` as E2B spells a tagged alias, `:default` being the name
//! itself (an image name may hold a `:` of its own, which is tried first).
use super::types::TemplateAliasResponse;
use super::*;

/// 200 with the template an alias names, 404 (E2B's messages) when none, 400 when it cannot
/// be a name.
pub(super) async fn get_alias(
    State(state): State<Arc<AppState>>,
    Path(alias): Path<String>,
) -> ApiResult<Json<TemplateAliasResponse>> {
    let alias = alias.trim().to_string();
    if kiln_imagebuilder::image::check_name(&alias).is_err() {
        return Err(ApiError::bad_request(format!(
            "Invalid alias format: {alias:?} (1-100 characters from [a-zA-Z0-9._/:@-])"
        )));
    }
    let sb = state.sandboxes.clone();
    let names = blocking(move || {
        let mut names: Vec<String> = kiln_imagebuilder::image::list(sb.store())?
            .into_iter()
            .map(|i| i.name)
            .collect();
        names.extend(
            kiln_runtime::sandbox_snapshot::list(sb.store())?
                .into_iter()
                .map(|(n, _)| n),
        );
        Ok(names)
    })
    .await?;
    let mut names = names;
    if let Some(c) = &state.cluster {
        names.extend(c.templates().await?.into_iter().map(|(n, _)| n));
    }
    let found = |n: &str| names.iter().any(|x| x == n);
    let (name, tag) = match alias.rsplit_once(':') {
        Some((n, t)) if !found(&alias) => (n, Some(t)),
        _ => (alias.as_str(), None),
    };
    if !found(name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template '{name}' not found"),
        ));
    }
    if let Some(t) = tag.filter(|t| !t.eq_ignore_ascii_case("default")) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("tag '{t}' does not exist for template '{name}'"),
        ));
    }
    Ok(Json(TemplateAliasResponse {
        template_id: name.to_string(),
        public: false,
    }))
}
