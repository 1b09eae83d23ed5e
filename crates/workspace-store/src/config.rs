//! `[workspace_storage]`: where and how conversations are persisted.
//!
//! ```toml
//! [workspace_storage]
//! bucket = "nestor-workspaces"
//! prefix = "nestor"                       # keys are {prefix}/{user}/{conversation}/...
//! endpoint = "http://127.0.0.1:9000"      # MinIO, moto, Ceph…; omit for AWS S3
//! region = "us-east-1"
//! path_style = true                       # default: true with an endpoint, false without
//! # access_key_id / secret_access_key / session_token: default from the environment
//! push_interval_secs = 60
//! on_delete = "keep"                      # or "purge"
//! [workspace_storage.quota]
//! max_bytes = 10737418240                 # per conversation, both areas together
//! max_files = 200000
//! [workspace_storage.user_quota]
//! max_bytes = 107374182400                # per user, all their conversations together
//! max_files = 2000000
//! ```
//!
//! Credentials, first found wins: `access_key_id` + `secret_access_key` here; the
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` environment; the shared
//! credentials file (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`, profile
//! `AWS_PROFILE` or `default`); then object_store's chain (web identity / IRSA, ECS/EKS container
//! credentials, instance metadata). The region likewise: here, `AWS_REGION` /
//! `AWS_DEFAULT_REGION`, `~/.aws/config` (`AWS_CONFIG_FILE`), then `us-east-1`. Every other
//! `AWS_*` variable object_store knows (e.g. `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`) applies too, with
//! this section taking precedence.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::keys::validate_prefix;

const MIB: u64 = 1024 * 1024;
/// S3's smallest multipart part (except the last).
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;

/// A secret from the config file: never printed.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// What deleting a conversation does to its stored copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDelete {
    /// Push one last time and keep the stored copy (it can be restored or inspected later).
    #[default]
    Keep,
    /// Stop pushing and delete every stored object of the conversation.
    Purge,
}

/// Per-conversation limits, both areas (workspace and state) counted together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Total bytes of regular files.
    pub max_bytes: Option<u64>,
    /// Number of files and symlinks.
    pub max_files: Option<u64>,
}

/// How a failed push is retried before it is reported as failed (the periodic pusher tries
/// again at its next tick anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts per push, the first included.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self { max_attempts: 5, initial_backoff_ms: 1_000, max_backoff_ms: 30_000 }
    }
}

impl RetrySettings {
    /// The pause before attempt `attempt + 1` (`attempt` counts from 1): doubling from the
    /// initial backoff, capped, with up to 25% random jitter added.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let base = self.initial_backoff_ms.saturating_mul(1u64 << exp).min(self.max_backoff_ms);
        let jitter = if base >= 4 { rand::random::<u64>() % (base / 4) } else { 0 };
        Duration::from_millis(base + jitter)
    }
}

/// The `[workspace_storage]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkspaceStorageConfig {
    /// The bucket (must exist).
    pub bucket: String,
    /// Key prefix, `/`-separated segments, no leading or trailing slash. May be empty.
    pub prefix: String,
    /// An S3-compatible endpoint (`http(s)://host[:port]`); `None` for AWS S3.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted ones
    /// (`bucket.endpoint/key`). Default: true with an `endpoint`, false for AWS.
    pub path_style: Option<bool>,
    /// Allow plain HTTP. Default: true exactly when `endpoint` starts with `http://`.
    pub allow_http: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// How often the periodic pusher pushes a running conversation.
    pub push_interval_secs: u64,
    pub quota: QuotaConfig,
    /// Per-user limits: every stored conversation of the user, both areas, together.
    pub user_quota: QuotaConfig,
    pub on_delete: OnDelete,
    /// Transfers (and hashes) in flight per pull or push.
    pub concurrency: usize,
    /// Files larger than this are uploaded in multipart parts of this size.
    pub part_size_bytes: u64,
    /// Parts of one multipart upload in flight at once.
    pub parts_in_flight: usize,
    /// At most this many bytes of file content are held in memory for uploads at once, over
    /// all concurrent transfers of this store. At least `part_size × (parts_in_flight + 1)`.
    pub buffer_budget_bytes: u64,
    /// Large objects are downloaded in ranged requests of this size (each one bounded by
    /// `request_timeout_secs`).
    pub download_chunk_bytes: u64,
    /// Bound on every single request (connect to last byte).
    pub request_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub retry: RetrySettings,
    /// A tree with more entries than this is refused (bounds the walk and the manifest).
    pub max_entries: u64,
}

impl Default for WorkspaceStorageConfig {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            prefix: "nestor".into(),
            endpoint: None,
            region: None,
            path_style: None,
            allow_http: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            push_interval_secs: 60,
            quota: QuotaConfig::default(),
            user_quota: QuotaConfig::default(),
            on_delete: OnDelete::Keep,
            concurrency: 8,
            part_size_bytes: 8 * MIB,
            parts_in_flight: 2,
            buffer_budget_bytes: 64 * MIB,
            download_chunk_bytes: 32 * MIB,
            request_timeout_secs: 60,
            connect_timeout_secs: 5,
            retry: RetrySettings::default(),
            max_entries: 1_000_000,
        }
    }
}

impl WorkspaceStorageConfig {
    /// A config for `bucket` with every other setting at its default.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self { bucket: bucket.into(), ..Self::default() }
    }

    pub fn push_interval(&self) -> Duration {
        Duration::from_secs(self.push_interval_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// Whether requests are path-style (see [`WorkspaceStorageConfig::path_style`]).
    pub fn effective_path_style(&self) -> bool {
        self.path_style.unwrap_or(self.endpoint.is_some())
    }

    /// Checks every setting; the message names the setting at fault.
    pub fn validate(&self) -> Result<(), StoreError> {
        let err = |m: String| Err(StoreError::Config(m));
        if self.bucket.is_empty() {
            return err("workspace_storage.bucket is required".into());
        }
        if let Err(m) = validate_bucket(&self.bucket) {
            return err(format!("workspace_storage.bucket: {m}"));
        }
        if let Err(m) = validate_prefix(&self.prefix) {
            return err(format!("workspace_storage.prefix: {m}"));
        }
        if let Some(ep) = &self.endpoint {
            let uri: http::Uri = match ep.parse() {
                Ok(u) => u,
                Err(e) => return err(format!("workspace_storage.endpoint {ep:?} is not a URL: {e}")),
            };
            match uri.scheme_str() {
                Some("http") | Some("https") => {}
                _ => return err(format!("workspace_storage.endpoint {ep:?} must start with http:// or https://")),
            }
            if uri.host().is_none_or(str::is_empty) {
                return err(format!("workspace_storage.endpoint {ep:?} has no host"));
            }
            if uri.query().is_some() {
                return err(format!("workspace_storage.endpoint {ep:?} must not have a query"));
            }
            if uri.scheme_str() == Some("http") && self.allow_http == Some(false) {
                return err(format!(
                    "workspace_storage.endpoint {ep:?} is plain HTTP but allow_http = false"
                ));
            }
        }
        if let Some(r) = &self.region {
            if r.is_empty() || !r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return err(format!("workspace_storage.region {r:?} is not a region name"));
            }
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) => return err("workspace_storage.access_key_id is set but secret_access_key is not".into()),
            (None, Some(_)) => return err("workspace_storage.secret_access_key is set but access_key_id is not".into()),
            (Some(k), Some(_)) if k.is_empty() => return err("workspace_storage.access_key_id is empty".into()),
            _ => {}
        }
        if self.session_token.is_some() && self.access_key_id.is_none() {
            return err("workspace_storage.session_token needs access_key_id and secret_access_key".into());
        }
        if !(1..=86_400).contains(&self.push_interval_secs) {
            return err(format!(
                "workspace_storage.push_interval_secs = {} must be between 1 and 86400",
                self.push_interval_secs
            ));
        }
        if self.quota.max_bytes == Some(0) || self.quota.max_files == Some(0) {
            return err("workspace_storage.quota limits must be positive (omit one for no limit)".into());
        }
        if self.user_quota.max_bytes == Some(0) || self.user_quota.max_files == Some(0) {
            return err("workspace_storage.user_quota limits must be positive (omit one for no limit)".into());
        }
        if !(1..=256).contains(&self.concurrency) {
            return err(format!("workspace_storage.concurrency = {} must be between 1 and 256", self.concurrency));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size_bytes) {
            return err(format!(
                "workspace_storage.part_size_bytes = {} must be between {MIN_PART_SIZE} (5 MiB, S3's minimum part) and {MAX_PART_SIZE}",
                self.part_size_bytes
            ));
        }
        if !(1..=64).contains(&self.parts_in_flight) {
            return err(format!("workspace_storage.parts_in_flight = {} must be between 1 and 64", self.parts_in_flight));
        }
        let need = self.part_size_bytes.saturating_mul(self.parts_in_flight as u64 + 1);
        if self.buffer_budget_bytes < need {
            return err(format!(
                "workspace_storage.buffer_budget_bytes = {} is below part_size_bytes × (parts_in_flight + 1) = {need}",
                self.buffer_budget_bytes
            ));
        }
        if self.download_chunk_bytes < MIB {
            return err("workspace_storage.download_chunk_bytes must be at least 1 MiB".into());
        }
        if !(1..=3600).contains(&self.request_timeout_secs) {
            return err("workspace_storage.request_timeout_secs must be between 1 and 3600".into());
        }
        if !(1..=300).contains(&self.connect_timeout_secs) {
            return err("workspace_storage.connect_timeout_secs must be between 1 and 300".into());
        }
        let r = &self.retry;
        if !(1..=100).contains(&r.max_attempts) {
            return err("workspace_storage.retry.max_attempts must be between 1 and 100".into());
        }
        if r.initial_backoff_ms == 0 || r.max_backoff_ms < r.initial_backoff_ms || r.max_backoff_ms > 3_600_000 {
            return err("workspace_storage.retry: need 0 < initial_backoff_ms <= max_backoff_ms <= 3600000".into());
        }
        if self.max_entries == 0 {
            return err("workspace_storage.max_entries must be positive".into());
        }
        Ok(())
    }

    /// The object_store client for this config (validated first).
    pub fn build_object_store(&self) -> Result<Arc<dyn ObjectStore>, StoreError> {
        self.validate()?;
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&self.bucket);
        let path_style = self.effective_path_style();
        b = b.with_virtual_hosted_style_request(!path_style);
        let mut allow_http = self.allow_http.unwrap_or(false);
        if let Some(ep) = &self.endpoint {
            let ep = ep.trim_end_matches('/');
            b = b.with_endpoint(if path_style { ep.to_owned() } else { virtual_hosted(ep, &self.bucket) });
            allow_http = self.allow_http.unwrap_or(ep.starts_with("http://"));
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region = self
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| shared_config_value(&aws_config_file(), &profile_name(), "region", true))
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(region);
        if let (Some(k), Some(s)) = (&self.access_key_id, &self.secret_access_key) {
            b = b.with_access_key_id(k).with_secret_access_key(&s.0);
            if let Some(t) = &self.session_token {
                b = b.with_token(&t.0);
            }
        } else if env("AWS_ACCESS_KEY_ID").is_none() {
            let file = aws_credentials_file();
            let profile = profile_name();
            let key = shared_config_value(&file, &profile, "aws_access_key_id", false);
            let secret = shared_config_value(&file, &profile, "aws_secret_access_key", false);
            if let (Some(k), Some(s)) = (key, secret) {
                b = b.with_access_key_id(k).with_secret_access_key(s);
                if let Some(t) = shared_config_value(&file, &profile, "aws_session_token", false) {
                    b = b.with_token(t);
                }
            }
        }
        // (allow_http lives in the client options: set here, after from_env, so it wins.)
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_timeout(self.request_timeout())
            .with_connect_timeout(Duration::from_secs(self.connect_timeout_secs))
            .with_pool_idle_timeout(Duration::from_secs(30));
        // object_store retries a failed request a little (a dropped connection); longer
        // outages are the push retry's business, which reports them in the status.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: self.request_timeout(),
        };
        let s3 = b
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| StoreError::Config(format!("workspace_storage: {e}")))?;
        Ok(Arc::new(s3))
    }
}

/// `https://host:port/path` → `https://bucket.host:port/path`.
fn virtual_hosted(endpoint: &str, bucket: &str) -> String {
    match endpoint.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{bucket}.{rest}"),
        None => endpoint.to_owned(),
    }
}

/// S3's bucket naming rules (the subset every S3-compatible store accepts).
fn validate_bucket(b: &str) -> Result<(), String> {
    if !(3..=63).contains(&b.len()) {
        return Err(format!("{b:?} must be 3 to 63 characters"));
    }
    if !b.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.') {
        return Err(format!("{b:?} may only contain lower-case letters, digits, '-' and '.'"));
    }
    let first = b.as_bytes()[0];
    let last = b.as_bytes()[b.len() - 1];
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err(format!("{b:?} must start and end with a letter or digit"));
    }
    if b.contains("..") {
        return Err(format!("{b:?} must not contain '..'"));
    }
    Ok(())
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

fn profile_name() -> String {
    std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "default".into())
}

fn aws_credentials_file() -> Option<PathBuf> {
    std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".aws/credentials")))
}

fn aws_config_file() -> Option<PathBuf> {
    std::env::var_os("AWS_CONFIG_FILE").map(PathBuf::from).or_else(|| home().map(|h| h.join(".aws/config")))
}

/// One value from an AWS shared config or credentials file (INI). In the config file profiles
/// other than `default` are written `[profile NAME]`.
fn shared_config_value(file: &Option<PathBuf>, profile: &str, key: &str, config_file: bool) -> Option<String> {
    let path = file.as_ref()?;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > 1024 * 1024 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    parse_ini_value(&text, profile, key, config_file)
}

pub(crate) fn parse_ini_value(text: &str, profile: &str, key: &str, config_file: bool) -> Option<String> {
    let wanted_section = if config_file && profile != "default" { format!("profile {profile}") } else { profile.to_owned() };
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = name.trim() == wanted_section;
            continue;
        }
        if in_section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    let v = v.trim();
                    return (!v.is_empty()).then(|| v.to_owned());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> WorkspaceStorageConfig {
        WorkspaceStorageConfig::new("my-bucket")
    }

    fn config_err(c: &WorkspaceStorageConfig) -> String {
        match c.validate() {
            Err(StoreError::Config(m)) => m,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn deserializes_the_documented_section() {
        let t: toml::Value = toml::from_str(
            r#"
            [workspace_storage]
            bucket = "nestor-workspaces"
            prefix = "nestor/prod"
            endpoint = "http://127.0.0.1:9000"
            region = "eu-west-1"
            access_key_id = "AK"
            secret_access_key = "SK"
            push_interval_secs = 30
            on_delete = "purge"
            [workspace_storage.quota]
            max_bytes = 1000
            max_files = 10
            [workspace_storage.user_quota]
            max_files = 100
            [workspace_storage.retry]
            max_attempts = 3
            "#,
        )
        .unwrap();
        let c: WorkspaceStorageConfig = t["workspace_storage"].clone().try_into().unwrap();
        c.validate().unwrap();
        assert_eq!(c.on_delete, OnDelete::Purge);
        assert_eq!(c.quota, QuotaConfig { max_bytes: Some(1000), max_files: Some(10) });
        assert_eq!(c.user_quota, QuotaConfig { max_bytes: None, max_files: Some(100) });
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.retry.initial_backoff_ms, 1000);
        assert!(c.effective_path_style());
        assert!(!format!("{c:?}").contains("SK"), "secret printed: {c:?}");
        assert_eq!(c.push_interval(), Duration::from_secs(30));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let r: Result<WorkspaceStorageConfig, _> = toml::from_str("bucket = \"b-1\"\nbukket = \"x\"\n");
        assert!(r.unwrap_err().to_string().contains("bukket"));
        let r: Result<WorkspaceStorageConfig, _> = toml::from_str("bucket = \"b-1\"\non_delete = \"shred\"\n");
        assert!(r.is_err());
    }

    #[test]
    fn validation_names_the_setting() {
        ok().validate().unwrap();
        type Change = Box<dyn Fn(&mut WorkspaceStorageConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.bucket.clear()), "bucket is required"),
            (Box::new(|c| c.bucket = "My_Bucket".into()), "bucket"),
            (Box::new(|c| c.prefix = "/abs".into()), "prefix"),
            (Box::new(|c| c.prefix = "a/../b".into()), "prefix"),
            (Box::new(|c| c.endpoint = Some("ftp://x".into())), "endpoint"),
            (Box::new(|c| c.endpoint = Some("not a url".into())), "endpoint"),
            (Box::new(|c| {
                c.endpoint = Some("http://h:9000".into());
                c.allow_http = Some(false)
            }), "allow_http"),
            (Box::new(|c| c.access_key_id = Some("k".into())), "secret_access_key is not"),
            (Box::new(|c| c.secret_access_key = Some(Secret("s".into()))), "access_key_id is not"),
            (Box::new(|c| c.push_interval_secs = 0), "push_interval_secs"),
            (Box::new(|c| c.quota.max_bytes = Some(0)), "quota"),
            (Box::new(|c| c.user_quota.max_files = Some(0)), "user_quota"),
            (Box::new(|c| c.concurrency = 0), "concurrency"),
            (Box::new(|c| c.part_size_bytes = 1024), "part_size_bytes"),
            (Box::new(|c| c.buffer_budget_bytes = MIB), "buffer_budget_bytes"),
            (Box::new(|c| c.retry.max_attempts = 0), "max_attempts"),
            (Box::new(|c| c.retry.max_backoff_ms = 1), "retry"),
            (Box::new(|c| c.region = Some("eu west".into())), "region"),
        ];
        for (change, needle) in cases {
            let mut c = ok();
            change(&mut c);
            let m = config_err(&c);
            assert!(m.contains(needle), "{m:?} should mention {needle:?}");
        }
    }

    #[test]
    fn builds_clients_for_aws_and_compatible_endpoints() {
        ok().build_object_store().unwrap();
        let mut c = ok();
        c.endpoint = Some("http://127.0.0.1:9000/".into());
        c.access_key_id = Some("a".into());
        c.secret_access_key = Some(Secret("b".into()));
        c.build_object_store().unwrap();
        c.path_style = Some(false);
        c.build_object_store().unwrap();
        assert_eq!(virtual_hosted("https://s3.example.com:9000", "b"), "https://b.s3.example.com:9000");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let r = RetrySettings { max_attempts: 10, initial_backoff_ms: 100, max_backoff_ms: 1000 };
        let ms = |a| r.backoff(a).as_millis() as u64;
        assert!((100..125).contains(&ms(1)));
        assert!((200..250).contains(&ms(2)));
        assert!((400..500).contains(&ms(3)));
        assert!((1000..1250).contains(&ms(9)));
        assert!((1000..1250).contains(&ms(u32::MAX)));
    }

    #[test]
    fn shared_credentials_files() {
        let creds = "[default]\naws_access_key_id = AK1\naws_secret_access_key=SK1\n\n[work]\n# c\naws_access_key_id = AK2\n";
        assert_eq!(parse_ini_value(creds, "default", "aws_access_key_id", false).as_deref(), Some("AK1"));
        assert_eq!(parse_ini_value(creds, "default", "aws_secret_access_key", false).as_deref(), Some("SK1"));
        assert_eq!(parse_ini_value(creds, "work", "aws_access_key_id", false).as_deref(), Some("AK2"));
        assert_eq!(parse_ini_value(creds, "work", "aws_secret_access_key", false), None);
        let config = "[default]\nregion = us-west-2\n[profile work]\nregion=eu-central-1\n";
        assert_eq!(parse_ini_value(config, "work", "region", true).as_deref(), Some("eu-central-1"));
        assert_eq!(parse_ini_value(config, "default", "region", true).as_deref(), Some("us-west-2"));
    }
}
