//! E2B's REST bodies as kiln reads and answers them: one typed struct per schema of
//! e2b-dev/infra `spec/openapi.yml` at commit 54693ff353d2 (2026-08-22), under the schema's
//! own name and with its field names (requests: the fields kiln reads; an unknown field is
//! ignored, as E2B's server ignores it). `tests/tests/serve_contract.rs` checks every answer
//! against E2B's generated client (declared status, declared fields, required ones present).
//! kiln adds no field of its own to these bodies: what only kiln knows goes to its CLI.
//! The answers a client reads back and the requests it sends derive both directions: the
//! client ([`crate::client`]) speaks through these same structs.

use kiln_runtime::record::{OnTimeout, SandboxRecord, State as SbxState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The `clientID` of every sandbox (E2B's names the node's client; kiln has one).
pub const CLIENT_ID: &str = "kiln";

/// `SandboxState`: what the API calls a sandbox that exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
}

impl SandboxState {
    /// `None` for a sandbox that failed or stopped: to the API it is gone.
    pub fn of(rec: &SandboxRecord) -> Option<SandboxState> {
        match rec.state {
            SbxState::Starting | SbxState::Running => Some(SandboxState::Running),
            SbxState::Paused { .. } => Some(SandboxState::Paused),
            SbxState::Stopped | SbxState::Failed { .. } => None,
        }
    }
}

/// `Error`: every non-2xx answer, `code` being the HTTP status.
#[derive(Serialize, Deserialize)]
pub struct Error<'a> {
    pub code: u16,
    #[serde(borrow)]
    pub message: std::borrow::Cow<'a, str>,
}

/// `Sandbox`: the answer of create, connect, resume and each fork.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    pub traffic_access_token: Option<String>,
    pub domain: Option<String>,
}

impl Sandbox {
    pub fn of(rec: &SandboxRecord, domain: &str, envd_version: &str) -> Sandbox {
        Sandbox {
            template_id: rec.source.clone(),
            sandbox_id: rec.id.clone(),
            client_id: CLIENT_ID.into(),
            envd_version: envd_version.into(),
            alias: rec.name.clone(),
            envd_access_token: rec.access.envd_token.clone(),
            traffic_access_token: rec.access.traffic_token.clone(),
            domain: Some(domain.to_string()),
        }
    }
}

/// `ListedSandbox`: one entry of the sandbox lists.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// [`CLIENT_ID`]; in cluster mode, the id of the node that owns the sandbox.
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub end_at: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub metadata: BTreeMap<String, String>,
    pub state: SandboxState,
    pub envd_version: String,
}

/// `SandboxDetail`: `GET /sandboxes/{sandboxID}`.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(flatten)]
    pub listed: ListedSandbox,
    pub domain: Option<String>,
    pub allow_internet_access: bool,
    pub network: SandboxNetworkConfig,
    pub lifecycle: SandboxLifecycle,
    /// What the latest pause saved; a paused sandbox only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_mode: Option<SandboxPauseMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
}

/// `SandboxPauseMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxPauseMode {
    /// Memory and files: a resume continues where it left off.
    Full,
    /// Files only: a resume boots afresh on them.
    Filesystem,
}

/// `SandboxNetworkConfig`, as a detail reports it.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetworkConfig {
    pub allow_public_traffic: bool,
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
}

/// `SandboxOnTimeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxOnTimeout {
    Kill,
    Pause,
}

impl From<OnTimeout> for SandboxOnTimeout {
    fn from(o: OnTimeout) -> Self {
        match o {
            OnTimeout::Kill => SandboxOnTimeout::Kill,
            OnTimeout::Pause | OnTimeout::PauseFilesystem => SandboxOnTimeout::Pause,
        }
    }
}

/// `SandboxLifecycle`.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct SandboxLifecycle {
    pub auto_resume: bool,
    pub on_timeout: SandboxOnTimeout,
}

/// `SandboxForkResult`: one per requested fork (kiln forks all or nothing, so each holds its
/// sandbox).
#[derive(Serialize, Deserialize, Debug)]
pub struct SandboxForkResult {
    pub sandbox: Sandbox,
}

/// `SnapshotInfo`: a created or listed snapshot; its id is a valid `templateID`.
#[derive(Serialize, Deserialize, Debug)]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

impl SnapshotInfo {
    pub fn named(name: &str) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: name.to_string(),
            names: vec![name.to_string()],
        }
    }
}

/// E2B's `TemplateRequestResponseV3`.
#[derive(Serialize)]
pub struct TemplateRequestResponseV3 {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// E2B's `BuildLogEntry`.
#[derive(Serialize)]
pub struct BuildLogEntry {
    pub timestamp: String,
    pub message: String,
    pub level: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// E2B's `BuildStatusReason`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusReason {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub log_entries: Vec<BuildLogEntry>,
}

/// E2B's `TemplateBuildInfo`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildInfo {
    pub logs: Vec<String>,
    pub log_entries: Vec<BuildLogEntry>,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// E2B's `TemplateBuildLogsResponse`.
#[derive(Serialize)]
pub struct TemplateBuildLogsResponse {
    pub logs: Vec<BuildLogEntry>,
}

/// E2B's `TemplateBuildFileUpload`.
#[derive(Serialize)]
pub struct TemplateBuildFileUpload {
    pub present: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// E2B's `AssignedTemplateTags`.
#[derive(Serialize)]
pub struct AssignedTemplateTags {
    pub tags: Vec<String>,
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// E2B's `TemplateTag`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateTag {
    pub tag: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub created_at: String,
}

/// E2B's `TemplateAliasResponse`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateAliasResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// kiln has no teams: nothing is public.
    pub public: bool,
}

/// E2B's `SandboxMetric` (read back too: another node's, in cluster mode).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    /// Deprecated in the spec, still required.
    pub timestamp: String,
    pub timestamp_unix: u64,
    pub cpu_count: u32,
    pub cpu_used_pct: f32,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// E2B's `SandboxesWithMetrics`.
#[derive(Serialize, Deserialize)]
pub struct SandboxesWithMetrics {
    pub sandboxes: BTreeMap<String, SandboxMetric>,
}

/// E2B's `Template`: a kiln image as the template list shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub public: bool,
    pub aliases: Vec<String>,
    pub names: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// kiln has no teams: always null.
    pub created_by: Option<()>,
    pub last_spawned_at: Option<String>,
    pub spawn_count: u64,
    pub build_count: u64,
    pub envd_version: &'static str,
    /// `TemplateBuildStatus`.
    pub build_status: &'static str,
}

// Request bodies: the fields kiln reads, each checked by its handler.

/// E2B's `NewSandbox`.
#[derive(Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub timeout: Option<Value>,
    pub auto_pause: Option<bool>,
    /// `false`: the timeout's pause keeps only the file system.
    pub auto_pause_memory: Option<bool>,
    pub auto_resume: Option<AutoResume>,
    pub secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    pub network: Option<NetworkConfig>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
}

/// E2B's `SandboxAutoResumeConfig`.
#[derive(Deserialize, Serialize, Default)]
pub struct AutoResume {
    pub enabled: bool,
}

/// The body of `POST /sandboxes/{id}/timeout`.
#[derive(Deserialize, Serialize, Default)]
pub struct TimeoutRequest {
    pub timeout: Option<Value>,
}

/// The body of `POST /sandboxes/{id}/refreshes`.
#[derive(Deserialize)]
pub struct RefreshRequest {
    pub duration: Option<Value>,
}

/// E2B's `SandboxPauseRequest`.
#[derive(Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PauseRequest {
    /// `false`: keep only the file system; a resume boots the sandbox afresh.
    pub memory: Option<bool>,
    /// Accepted; kiln's pause always needs an agent that answers.
    #[allow(dead_code)]
    pub require_healthy_guest: Option<bool>,
}

/// E2B's `ResumedSandbox`.
#[derive(Deserialize)]
pub struct ResumeRequest {
    pub timeout: Option<Value>,
    /// `false`: boot afresh on the saved files (E2B's `onResume: "reboot"`).
    pub memory: Option<bool>,
}

/// E2B's `ConnectSandbox` (v1) and `ConnectSandboxV2`.
#[derive(Deserialize, Serialize, Default)]
pub struct ConnectRequest {
    pub timeout: Option<Value>,
    /// `false`: a paused sandbox boots afresh on its saved files.
    pub memory: Option<bool>,
}

/// The body of `POST /sandboxes/{id}/fork`.
#[derive(Deserialize, Serialize, Default)]
pub struct ForkRequest {
    pub timeout: Option<Value>,
    pub count: Option<usize>,
}

/// E2B's `SandboxSnapshotRequest`.
#[derive(Deserialize, Serialize, Default)]
#[allow(dead_code)]
pub struct SnapshotRequest {
    pub name: Option<String>,
    pub memory: Option<bool>,
}

/// E2B's `TemplateBuildRequestV3`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildRequest {
    pub name: Option<String>,
    /// Deprecated spelling of `name`.
    pub alias: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Accepted; kiln sizes sandboxes at create, not per template.
    #[allow(dead_code)]
    pub cpu_count: Option<u32>,
    #[serde(rename = "memoryMB")]
    #[allow(dead_code)]
    pub memory_mb: Option<u32>,
    #[serde(rename = "minFreeDiskMB")]
    #[allow(dead_code)]
    pub min_free_disk_mb: Option<u32>,
}

/// E2B's `AssignTemplateTagsRequest`.
#[derive(Deserialize)]
pub struct AssignTags {
    pub target: String,
    pub tags: Vec<String>,
}

/// E2B's `DeleteTemplateTagsRequest`.
#[derive(Deserialize)]
pub struct DeleteTags {
    pub name: String,
    pub tags: Vec<String>,
}

/// E2B's `SandboxNetworkConfig` (create) and `SandboxNetworkUpdateConfig` (update): the
/// fields kiln reads; the others are checked in [`policy_of`].
#[derive(Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    pub allow_out: Option<Vec<String>>,
    pub deny_out: Option<Vec<String>>,
    pub egress_proxy: Option<Value>,
    pub rules: Option<Value>,
    /// Only in the update body, in snake case as E2B spells it there.
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    /// Only on create (default true).
    pub allow_public_traffic: Option<bool>,
    /// Only on create.
    pub mask_request_host: Option<String>,
}

/// E2B's `TemplateBuildStartV2`.
#[derive(Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct BuildStart {
    pub from_image: Option<String>,
    pub from_template: Option<String>,
    /// How to log in to `fromImage`'s registry.
    pub from_image_registry: Option<FromImageRegistry>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Started in the background by every sandbox that boots from the template.
    pub start_cmd: Option<String>,
    /// Run until it exits 0 before such a sandbox is handed out.
    pub ready_cmd: Option<String>,
}

/// E2B's `FromImageRegistry`: kiln logs in to a general registry with a user and password;
/// AWS ECR and GCP Artifact Registry logins are refused (no cloud SDK in kiln). `Debug`
/// shows no secret.
#[derive(Deserialize, Clone)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FromImageRegistry {
    Registry { username: String, password: String },
    Aws {},
    Gcp {},
}

impl std::fmt::Debug for FromImageRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FromImageRegistry::Registry { username, .. } => f
                .debug_struct("Registry")
                .field("username", username)
                .finish_non_exhaustive(),
            FromImageRegistry::Aws {} => f.write_str("Aws"),
            FromImageRegistry::Gcp {} => f.write_str("Gcp"),
        }
    }
}

/// E2B's `TemplateStep`.
#[derive(Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Vec<String>,
    pub files_hash: Option<String>,
    /// Per-step `force` (skip_cache on one layer): accepted; the builder's cache decides per
    /// step from its inputs, and `force` of the whole build (`skip_cache`) rebuilds it all.
    #[serde(default)]
    #[allow(dead_code)]
    pub force: bool,
    #[allow(dead_code)]
    pub force_upload: Option<bool>,
}
