//! The gateway's configuration, layered: built-in defaults, then a TOML file, then
//! `WEIR__SECTION__KEY` environment variables, then command-line flags.
//!
//! ```toml
//! name = "plant1-gw"
//! pipelines_dir = "/etc/weir/pipelines"
//!
//! [broker]
//! mode = "embedded"              # or "external", with url = "mqtt://10.0.0.5:1883"
//! [broker.embedded]
//! listen = "127.0.0.1:1883"
//!
//! [admin]
//! listen = "127.0.0.1:9464"
//! token_env = "WEIR_ADMIN_TOKEN" # required when listen is not a loopback address
//!
//! [cloud]
//! url = "http://cloud.example:8470"  # the gateway dials out; no inbound port is needed
//! ```
//!
//! Unknown keys are errors, reported with the key's path and where it came from (the file or
//! the environment variable), so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use weir_connectors::mqtt::EmbeddedBrokerConfig;

use crate::error::{GatewayError, Result};

/// Everything `weir gateway` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// This gateway's name, shown by `weir top` and in metrics. Default: the host name.
    pub name: String,
    /// A directory of `.sql` files whose pipelines start with the gateway.
    pub pipelines_dir: Option<PathBuf>,
    /// A directory where each pipeline's dead letters (malformed input, with the reason) are
    /// written as `<pipeline>.jsonl`; unset: the most recent are kept in memory and shown by
    /// `GET /api/pipelines/NAME`.
    pub dead_letters: Option<PathBuf>,
    /// Where the gateway keeps what must survive a restart: its cloud credential, the
    /// last plans the cloud sent, and the uplink queue of results bound for the cloud
    /// (`uplink/`).
    pub data_dir: PathBuf,
    /// The site's MQTT broker.
    pub broker: BrokerSection,
    /// The local admin API.
    pub admin: AdminSection,
    /// The pipeline runtime.
    pub engine: EngineSection,
    /// The Weir cloud this gateway takes its pipelines from.
    pub cloud: CloudSection,
    /// Longest a shutdown (SIGTERM, Ctrl-C) waits for in-flight batches to reach the sinks.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            name: default_name(),
            pipelines_dir: None,
            dead_letters: None,
            data_dir: PathBuf::from("weir-gateway"),
            broker: BrokerSection::default(),
            admin: AdminSection::default(),
            engine: EngineSection::default(),
            cloud: CloudSection::default(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Which broker the gateway's MQTT sources and sinks use by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    /// Run an MQTT broker inside the gateway.
    #[default]
    Embedded,
    /// Use the site's broker at `url`.
    External,
    /// No broker: pipelines name theirs in their `url` option.
    None,
}

/// `[broker]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    /// `embedded`, `external` or `none`.
    pub mode: BrokerMode,
    /// The site broker for `mode = "external"`: `mqtt://host:port` or `mqtts://host:port`.
    pub url: Option<String>,
    /// The embedded broker's settings.
    pub embedded: EmbeddedBrokerConfig,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            mode: BrokerMode::Embedded,
            url: None,
            embedded: EmbeddedBrokerConfig::default(),
        }
    }
}

/// `[cloud]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudSection {
    /// The cloud's address, `http://host:8470`; unset: the gateway runs only local pipelines.
    pub url: Option<String>,
    /// Longest wait between two attempts to reach the cloud (attempts back off from 200 ms,
    /// with jitter, up to this).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// The certificate authority of an `https://` cloud (its `tls/ca.pem`); needed at
    /// enrollment, then kept in `data_dir`.
    pub ca_file: Option<PathBuf>,
    /// Bytes per second of queued results the uplink sends after an outage, e.g. `"4MiB"`;
    /// results produced meanwhile are sent at once, ahead of the backlog.
    pub drain_rate: String,
}

impl Default for CloudSection {
    fn default() -> Self {
        Self {
            url: None,
            max_backoff: Duration::from_secs(30),
            ca_file: None,
            drain_rate: "4MiB".into(),
        }
    }
}

impl CloudSection {
    /// `drain_rate` in bytes per second.
    pub fn drain_rate_bytes(&self) -> Result<u64> {
        weir_connectors::cloud::parse_bytes(&self.drain_rate)
            .ok()
            .filter(|&rate| rate >= 1024)
            .ok_or_else(|| {
                GatewayError::Config(format!(
                    "cloud.drain_rate must be a size per second of at least 1KiB, such as \"4MiB\", not \"{}\"",
                    self.drain_rate
                ))
            })
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Address of the admin API; loopback by default.
    pub listen: SocketAddr,
    /// Bearer token required by the admin API (not by `/health`). Prefer `token_env`.
    pub token: Option<String>,
    /// Name of an environment variable holding the token.
    pub token_env: Option<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            token: None,
            token_env: None,
        }
    }
}

impl AdminSection {
    /// The token in effect, read from the environment if so configured.
    pub fn effective_token(&self) -> Result<Option<String>> {
        match (&self.token, &self.token_env) {
            (Some(token), _) => Ok(Some(token.clone())),
            (None, Some(variable)) => match std::env::var(variable) {
                Ok(token) if !token.is_empty() => Ok(Some(token)),
                _ => Err(GatewayError::Config(format!(
                    "admin.token_env: environment variable '{variable}' is not set"
                ))),
            },
            (None, None) => Ok(None),
        }
    }
}

/// `[engine]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Worker threads running pipeline actors.
    pub workers: usize,
    /// Batches in flight per edge of a pipeline before its upstream waits (backpressure).
    pub in_flight: usize,
    /// After this long without data, a source's watermark follows the wall clock so that
    /// windows of a quiet sensor still close.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Restarts of a failing pipeline before it is marked failed.
    pub max_restarts: u32,
    /// How often every pipeline takes a checkpoint into `data_dir` (state, source position,
    /// and the `cloud` sinks' results, in one atomic write); `"0s"` turns checkpoints off.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Rows whose event time is further ahead of the gateway's clock than this (a sensor
    /// with a wrong clock) are dead-lettered instead of moving the watermark so far that
    /// every other row becomes late; `"0s"` turns the bound off.
    #[serde(with = "humantime_serde")]
    pub max_event_ahead: Duration,
}

impl Default for EngineSection {
    fn default() -> Self {
        let engine = weir_engine::EngineOptions::default();
        Self {
            workers: engine.workers,
            in_flight: engine.in_flight,
            idle_timeout: engine.idle_timeout,
            max_restarts: engine.max_restarts,
            checkpoint_interval: Duration::from_secs(1),
            max_event_ahead: Duration::from_secs(300),
        }
    }
}

impl EngineSection {
    pub fn options(&self) -> weir_engine::EngineOptions {
        weir_engine::EngineOptions {
            workers: self.workers,
            in_flight: self.in_flight,
            idle_timeout: self.idle_timeout,
            max_restarts: self.max_restarts,
            max_event_ahead: (!self.max_event_ahead.is_zero()).then_some(self.max_event_ahead),
            ..weir_engine::EngineOptions::default()
        }
    }
}

/// Settings given on the command line; each overrides the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `embedded`, `none`, or a broker URL (which means `external`).
    pub broker: Option<String>,
    pub admin: Option<SocketAddr>,
    pub pipelines_dir: Option<PathBuf>,
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// The cloud URL.
    pub cloud: Option<String>,
    pub cloud_ca: Option<PathBuf>,
}

impl Overrides {
    fn as_json(&self) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        if let Some(broker) = &self.broker {
            let section = match broker.as_str() {
                "embedded" | "none" => serde_json::json!({ "mode": broker }),
                url => serde_json::json!({ "mode": "external", "url": url }),
            };
            root.insert("broker".into(), section);
        }
        if let Some(admin) = self.admin {
            root.insert(
                "admin".into(),
                serde_json::json!({ "listen": admin.to_string() }),
            );
        }
        if let Some(dir) = &self.pipelines_dir {
            root.insert("pipelines_dir".into(), serde_json::json!(dir));
        }
        if let Some(name) = &self.name {
            root.insert("name".into(), serde_json::json!(name));
        }
        if let Some(dir) = &self.data_dir {
            root.insert("data_dir".into(), serde_json::json!(dir));
        }
        let mut cloud = serde_json::Map::new();
        if let Some(url) = &self.cloud {
            cloud.insert("url".into(), serde_json::json!(url));
        }
        if let Some(ca) = &self.cloud_ca {
            cloud.insert("ca_file".into(), serde_json::json!(ca));
        }
        if !cloud.is_empty() {
            root.insert("cloud".into(), serde_json::Value::Object(cloud));
        }
        serde_json::Value::Object(root)
    }
}

impl GatewayConfig {
    /// Loads the layered configuration: defaults, `file` (if given; it must exist), the
    /// environment, then `overrides`. Checks it with [`Self::validate`].
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self> {
        Self::load_with_env(file, overrides, Env::prefixed("WEIR__").split("__"))
    }

    fn load_with_env(file: Option<&Path>, overrides: &Overrides, env: Env) -> Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(GatewayError::Config(format!(
                    "{}: no such configuration file",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        let figment = figment
            .merge(env)
            .merge(Serialized::defaults(overrides.as_json()));
        let config: Self = figment.extract().map_err(|error| {
            GatewayError::Config(
                error
                    .into_iter()
                    .map(describe_figment_error)
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: combinations of settings.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(GatewayError::Config(message));
        if self.name.trim().is_empty() {
            return invalid("name: must not be empty".into());
        }
        match self.broker.mode {
            BrokerMode::External => match &self.broker.url {
                None => {
                    return invalid(
                        "broker.url: required with broker.mode = \"external\", e.g. \
                         \"mqtt://10.0.0.5:1883\""
                            .into(),
                    );
                }
                Some(url) => {
                    weir_connectors::mqtt::config::BrokerAddress::parse(url)
                        .map_err(|e| GatewayError::Config(format!("broker.url: {e}")))?;
                }
            },
            BrokerMode::Embedded => self
                .broker
                .embedded
                .validate()
                .map_err(|e| GatewayError::Config(format!("broker.embedded: {e}")))?,
            BrokerMode::None => {}
        }
        if self.broker.mode != BrokerMode::External && self.broker.url.is_some() {
            return invalid(
                "broker.url: only used with broker.mode = \"external\"; set the mode too".into(),
            );
        }
        if !self.admin.listen.ip().is_loopback()
            && self.admin.token.is_none()
            && self.admin.token_env.is_none()
        {
            return invalid(format!(
                "admin: listening on {} (not loopback) requires a token: set admin.token_env",
                self.admin.listen
            ));
        }
        if self.admin.token.is_some() && self.admin.token_env.is_some() {
            return invalid("admin: give either token or token_env, not both".into());
        }
        if let Some(url) = &self.cloud.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return invalid(format!(
                "cloud.url: '{url}' must start with http:// or https://, e.g. \"http://cloud.example:8470\""
            ));
        }
        if self.engine.workers == 0 || self.engine.in_flight == 0 {
            return invalid("engine.workers and engine.in_flight must be at least 1".into());
        }
        if let Some(dir) = &self.pipelines_dir
            && !dir.is_dir()
        {
            return invalid(format!(
                "pipelines_dir: '{}' is not a directory",
                dir.display()
            ));
        }
        Ok(())
    }

    /// The configuration as TOML, for `weir config check --print`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// One figment error as "key: what is wrong (where it was set)".
fn describe_figment_error(error: figment::Error) -> String {
    let key = error.path.join(".");
    let origin = error
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(source) => format!(" (in {source})"),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    if key.is_empty() {
        format!("{}{origin}", error.kind)
    } else {
        format!("{key}: {}{origin}", error.kind)
    }
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        file.write_all(text.as_bytes()).expect("write");
        file
    }

    fn no_env() -> Env {
        Env::prefixed("WEIR_TEST_NOTHING_SET__").split("__")
    }

    fn load(text: &str, overrides: &Overrides) -> Result<GatewayConfig> {
        let file = file(text);
        GatewayConfig::load_with_env(Some(file.path()), overrides, no_env())
    }

    #[test]
    fn defaults_then_file_then_flags() {
        let config = load(
            "name = \"plant1-gw\"\n[admin]\nlisten = \"127.0.0.1:9999\"\n[engine]\nidle_timeout = \"250ms\"\n",
            &Overrides {
                broker: Some("mqtt://10.0.0.5:1884".into()),
                ..Overrides::default()
            },
        )
        .expect("valid");
        assert_eq!(config.name, "plant1-gw");
        assert_eq!(config.admin.listen.port(), 9999);
        assert_eq!(config.engine.idle_timeout, Duration::from_millis(250));
        assert_eq!(config.broker.mode, BrokerMode::External);
        assert_eq!(config.broker.url.as_deref(), Some("mqtt://10.0.0.5:1884"));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    // Jail's closure type is figment's, and its error type is large; nothing to shrink here.
    #[allow(clippy::result_large_err)]
    fn environment_variables_override_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("weir.toml", "[admin]\nlisten = \"127.0.0.1:9999\"\n")?;
            jail.set_env("WEIR__ADMIN__LISTEN", "127.0.0.1:7777");
            jail.set_env("WEIR__BROKER__EMBEDDED__LISTEN", "127.0.0.1:2883");
            let config = GatewayConfig::load(Some(Path::new("weir.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(config.admin.listen.port(), 7777);
            assert_eq!(config.broker.embedded.listen.port(), 2883);
            jail.set_env("WEIR__ADMIN__LISTN", "x");
            let error = GatewayConfig::load(Some(Path::new("weir.toml")), &Overrides::default())
                .expect_err("unknown key")
                .to_string();
            assert!(error.contains("admin.listn"), "{error}");
            assert!(
                error.contains("WEIR__"),
                "names the variable's origin: {error}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_file() {
        let error = load("[admin]\nlisen = \"127.0.0.1:1\"\n", &Overrides::default())
            .expect_err("typo")
            .to_string();
        assert!(error.contains("admin.lisen"), "{error}");
        assert!(error.contains("unknown field"), "{error}");
        assert!(error.contains(".toml"), "names the file: {error}");
        let error = load("[engine]\nidle_timeout = \"soon\"\n", &Overrides::default())
            .expect_err("bad duration")
            .to_string();
        assert!(error.contains("engine.idle_timeout"), "{error}");
        let error = load("[broker]\nmode = \"cloud\"\n", &Overrides::default())
            .expect_err("bad mode")
            .to_string();
        assert!(error.contains("broker.mode"), "{error}");
    }

    #[test]
    fn combinations_are_checked() {
        let error = load("[broker]\nmode = \"external\"\n", &Overrides::default())
            .expect_err("no url")
            .to_string();
        assert!(error.contains("broker.url: required"), "{error}");
        let error = load(
            "[admin]\nlisten = \"0.0.0.0:9464\"\n",
            &Overrides::default(),
        )
        .expect_err("open admin without a token")
        .to_string();
        assert!(error.contains("requires a token"), "{error}");
        assert!(
            load(
                "[admin]\nlisten = \"0.0.0.0:9464\"\ntoken = \"s3cret\"\n",
                &Overrides::default()
            )
            .is_ok()
        );
        let error = load(
            "pipelines_dir = \"/nonexistent/weir\"\n",
            &Overrides::default(),
        )
        .expect_err("no dir")
        .to_string();
        assert!(error.contains("not a directory"), "{error}");
        let error = GatewayConfig::load_with_env(
            Some(Path::new("/nonexistent/weir.toml")),
            &Overrides::default(),
            no_env(),
        )
        .expect_err("no file")
        .to_string();
        assert!(error.contains("no such configuration file"), "{error}");
    }

    #[test]
    fn the_cloud_section_is_checked_and_flags_override_it() {
        let error = load(
            "[cloud]\nurl = \"cloud.example:8470\"\n",
            &Overrides::default(),
        )
        .expect_err("no scheme")
        .to_string();
        assert!(
            error.contains("cloud.url: 'cloud.example:8470' must start with http"),
            "{error}"
        );
        let error = load(
            "[cloud]\nurl = \"https://c:1\"\nca = \"x\"\n",
            &Overrides::default(),
        )
        .expect_err("typo")
        .to_string();
        assert!(
            error.contains("cloud.ca") && error.contains("unknown field"),
            "{error}"
        );
        let overrides = Overrides {
            cloud: Some("https://cloud.example:8470".into()),
            cloud_ca: Some("/etc/weir/ca.pem".into()),
            data_dir: Some("/var/lib/weir".into()),
            ..Overrides::default()
        };
        let config = load(
            "data_dir = \"/tmp/weir\"\n[cloud]\nurl = \"http://old:1\"\nmax_backoff = \"5s\"\n",
            &overrides,
        )
        .expect("valid");
        assert_eq!(
            config.cloud.url.as_deref(),
            Some("https://cloud.example:8470")
        );
        assert_eq!(
            config.cloud.ca_file,
            Some(PathBuf::from("/etc/weir/ca.pem"))
        );
        assert_eq!(
            config.cloud.max_backoff,
            Duration::from_secs(5),
            "the file's value stays"
        );
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/weir"));
    }

    #[test]
    fn the_printed_configuration_loads_back_unchanged() {
        let config = load("name = \"gw\"\n", &Overrides::default()).expect("valid");
        let again = load(&config.to_toml(), &Overrides::default()).expect("round trip");
        assert_eq!(again, config);
    }
}
