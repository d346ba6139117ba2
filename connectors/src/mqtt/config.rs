//! Options of the `mqtt` source and sink.
//!
//! Options about the broker connection ([`BrokerConfig`]) are shared by both; the rest are
//! per direction ([`MqttSourceConfig`], [`MqttSinkConfig`]). All come from one `WITH (...)`
//! list and are split by name before serde reads them, so each struct still rejects options
//! it does not know.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};
use serde_json::Map;

use crate::decode::DecodeOptions;
use crate::error::{ConnectorError, Result};
use crate::file::TimestampFormat;
use crate::registry::{ConnectorSpec, lenient, parse_options};
use crate::time::TimeUnit;

/// The broker a source or sink uses when its options name none.
const FALLBACK_URL: &str = "mqtt://127.0.0.1:1883";

/// Largest accepted `batch_size`, as for files.
const MAX_BATCH_SIZE: usize = 1 << 20;

static DEFAULT_URL: RwLock<Option<String>> = RwLock::new(None);

/// Sets the broker used by every `mqtt` source and sink whose options have no `url`: the
/// gateway calls this with its site broker (embedded or external), so pipelines need not
/// repeat it. Until called, the default is `mqtt://127.0.0.1:1883`.
pub fn set_default_url(url: &str) {
    if let Ok(mut default) = DEFAULT_URL.write() {
        *default = Some(url.to_owned());
    }
}

/// The broker used when a pipeline names none; see [`set_default_url`].
pub fn default_url() -> String {
    DEFAULT_URL
        .read()
        .ok()
        .and_then(|d| d.clone())
        .unwrap_or_else(|| FALLBACK_URL.to_owned())
}

/// How to reach and log in to the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `mqtt://host:port` (plain TCP) or `mqtts://host:port` (TLS). Unset: the gateway's
    /// broker.
    pub url: Option<String>,
    /// MQTT client identifier. Required with `clean_session = false`, so that the broker can
    /// find the session again; otherwise a unique one is made up.
    pub client_id: Option<String>,
    /// User name for brokers that require a login.
    pub username: Option<String>,
    /// Password; prefer `password_env` so the secret stays out of the SQL.
    pub password: Option<String>,
    /// Name of an environment variable of the gateway holding the password.
    pub password_env: Option<String>,
    /// PEM file of the certificate authority to trust for `mqtts://`; unset: the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that authenticate clients by certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Interval of MQTT keep-alive pings, e.g. `'30s'`.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Largest message accepted (source) or sent (sink), in bytes. A bigger incoming message
    /// is dead-lettered with the reason `message too large`.
    #[serde(deserialize_with = "lenient::value")]
    pub max_message_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: None,
            client_id: None,
            username: None,
            password: None,
            password_env: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keep_alive: Duration::from_secs(30),
            max_message_bytes: 1 << 20,
        }
    }
}

/// Option names of [`BrokerConfig`], used to split a `WITH` list.
const BROKER_KEYS: &[&str] = &[
    "url",
    "client_id",
    "username",
    "password",
    "password_env",
    "ca_file",
    "cert_file",
    "key_file",
    "keep_alive",
    "max_message_bytes",
];

/// A broker address taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (also `tcp://`, `ssl://`).
    pub fn parse(url: &str) -> Result<Self> {
        let invalid = |why: &str| {
            Err(ConnectorError::config(
                "mqtt",
                format!("option 'url' = '{url}': {why}; expected e.g. 'mqtt://127.0.0.1:1883'"),
            ))
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return invalid("no scheme");
        };
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" | "tls" => true,
            _ => return invalid("the scheme must be mqtt:// or mqtts://"),
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') {
            return invalid("give only host and port (credentials go in username/password)");
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            match bracketed.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, port)) => match port.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return invalid("bad IPv6 address"),
                },
                None => return invalid("bad IPv6 address"),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return invalid("no host");
        }
        let port = match port {
            None => {
                if tls {
                    8883
                } else {
                    1883
                }
            }
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return invalid("the port must be a number from 1 to 65535"),
            },
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

impl BrokerConfig {
    /// The broker URL in effect.
    pub fn effective_url(&self) -> String {
        self.url.clone().unwrap_or_else(default_url)
    }

    /// Checks what can be checked without touching the network.
    pub fn validate(&self, clean_session: bool) -> Result<()> {
        let invalid = |message: String| Err(ConnectorError::config("mqtt", message));
        if let Some(url) = &self.url {
            BrokerAddress::parse(url)?;
        }
        if !clean_session && self.client_id.as_deref().is_none_or(str::is_empty) {
            return invalid(
                "option 'client_id' is required with clean_session = false: the broker keeps \
                 the session under that name"
                    .into(),
            );
        }
        if self.password.is_some() && self.password_env.is_some() {
            return invalid("give either 'password' or 'password_env', not both".into());
        }
        if (self.password.is_some() || self.password_env.is_some()) && self.username.is_none() {
            return invalid("a password needs a 'username'".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return invalid("'cert_file' and 'key_file' go together".into());
        }
        if self.keep_alive < Duration::from_secs(1) {
            return invalid("option 'keep_alive' must be at least 1s".into());
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > 256 << 20 {
            return invalid("option 'max_message_bytes' must be between 1 and 268435456".into());
        }
        Ok(())
    }

    /// rumqttc options for this broker, with `client_id` (or `fallback_id`) as the identity.
    pub fn mqtt_options(&self, fallback_id: &str, clean_session: bool) -> Result<MqttOptions> {
        let url = self.effective_url();
        let address = BrokerAddress::parse(&url)?;
        let id = self
            .client_id
            .clone()
            .unwrap_or_else(|| fallback_id.to_owned());
        let mut options = MqttOptions::new(id, address.host.clone(), address.port);
        options.set_keep_alive(self.keep_alive);
        options.set_clean_session(clean_session);
        // The client refuses (and disconnects on) packets above its own limit, so that limit
        // is set well above ours: an oversized message is then dead-lettered by Weir instead
        // of dropping the connection again on every redelivery.
        let client_limit = (self.max_message_bytes.saturating_mul(4)).max(64 << 20);
        options.set_max_packet_size(client_limit, self.max_message_bytes.max(1 << 20) + 65_536);
        if let Some(username) = &self.username {
            let password = match (&self.password, &self.password_env) {
                (Some(password), _) => password.clone(),
                (None, Some(variable)) => std::env::var(variable).map_err(|_| {
                    ConnectorError::config(
                        "mqtt",
                        format!(
                            "option 'password_env': environment variable '{variable}' is not set"
                        ),
                    )
                })?,
                (None, None) => String::new(),
            };
            options.set_credentials(username.clone(), password);
        }
        if address.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls_config()?,
            )));
        }
        Ok(options)
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let tls_error = |message: String| ConnectorError::config("mqtt", format!("TLS: {message}"));
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in read_pem_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| tls_error(format!("'{}': {e}", path.display())))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    // A system store with one unparsable certificate is still usable.
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(tls_error(
                "no trusted certificate authority: set option 'ca_file'".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_pem_certs(cert)?;
                let file = std::fs::read(key).map_err(|e| ConnectorError::io("reading", key, e))?;
                let key = rustls_pemfile::private_key(&mut file.as_slice())
                    .map_err(|e| tls_error(format!("'{}': {e}", key.display())))?
                    .ok_or_else(|| {
                        tls_error(format!("'{}' holds no private key", key.display()))
                    })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_error(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

fn read_pem_certs(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let file = std::fs::read(path).map_err(|e| ConnectorError::io("reading", path, e))?;
    let certs: std::result::Result<Vec<_>, _> =
        rustls_pemfile::certs(&mut file.as_slice()).collect();
    let certs = certs
        .map_err(|e| ConnectorError::config("mqtt", format!("TLS: '{}': {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ConnectorError::config(
            "mqtt",
            format!("TLS: '{}' holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// MQTT quality of service: 0 (at most once) or 1 (at least once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Qos(pub u8);

impl Qos {
    pub fn level(self) -> QoS {
        match self.0 {
            0 => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        }
    }
}

impl<'de> Deserialize<'de> for Qos {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let level: u8 = lenient::value(deserializer)?;
        match level {
            0 | 1 => Ok(Self(level)),
            2 => Err(serde::de::Error::custom(
                "QoS 2 is not supported: use 1 (at least once; duplicates are removed downstream by sequence number)",
            )),
            other => Err(serde::de::Error::custom(format!(
                "QoS must be 0 or 1, not {other}"
            ))),
        }
    }
}

/// How an incoming message's payload is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    /// JSON: one sample object, an array of sample objects, or a block of samples with a rate.
    #[default]
    Json,
    /// CSV lines, fields in the order of the source's columns (minus those filled from the
    /// topic), no header.
    Csv,
    /// Sparkplug B protobuf (NBIRTH/NDATA/DBIRTH/DDATA): one row per metric.
    Sparkplug,
}

/// `WITH` options of the `mqtt` source, besides the [`BrokerConfig`] ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSourceConfig {
    /// Topic filter; `+` and `#` wildcards, and `{column}` for a level that fills a column,
    /// e.g. `plant1/{sensor}/vibration`.
    pub topic: String,
    /// 0 or 1.
    pub qos: Qos,
    /// `true`: a fresh session on every connect. `false`: the broker keeps the subscription
    /// and queues QoS 1 messages while the gateway is away (needs `client_id`).
    #[serde(deserialize_with = "lenient::value")]
    pub clean_session: bool,
    /// `json`, `csv` or `sparkplug`.
    pub format: MessageFormat,
    /// Unit of epoch-number timestamps: `s`, `ms`, `us` or `ns`.
    pub time_unit: TimeUnit,
    /// JSON blocks and Sparkplug: the column that receives the values.
    pub value_column: Option<String>,
    /// Most rows in one batch.
    #[serde(deserialize_with = "lenient::value")]
    pub batch_size: usize,
    /// Longest a decoded row waits for its batch to fill, e.g. `'10ms'`.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// When a QoS 1 message is acknowledged to the broker: `receipt` (at once) or
    /// `checkpoint` (once the checkpoint covering it is on disk, so a crash loses nothing:
    /// the broker redelivers; needs qos 1 and a persistent session).
    pub ack: AckMode,
    /// Sparkplug: after a sequence gap, or data from a node or device whose birth was not
    /// seen, ask the edge node for a rebirth (NCMD `Node Control/Rebirth`), as a Sparkplug
    /// host application does. Off for a gateway that only listens.
    #[serde(deserialize_with = "lenient::value")]
    pub rebirth: bool,
}

/// When the `mqtt` source acknowledges QoS 1 messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    #[default]
    Receipt,
    Checkpoint,
}

impl Default for MqttSourceConfig {
    fn default() -> Self {
        Self {
            topic: String::new(),
            qos: Qos(1),
            clean_session: true,
            format: MessageFormat::Json,
            time_unit: TimeUnit::Millis,
            value_column: None,
            batch_size: 8192,
            linger: Duration::from_millis(10),
            ack: AckMode::Receipt,
            rebirth: true,
        }
    }
}

impl MqttSourceConfig {
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(ConnectorError::config("mqtt", message));
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return invalid(format!(
                "option 'batch_size' must be between 1 and {MAX_BATCH_SIZE}, not {}",
                self.batch_size
            ));
        }
        if self.linger > Duration::from_secs(10) {
            return invalid("option 'linger' must be at most 10s".into());
        }
        if self.format == MessageFormat::Csv && self.value_column.is_some() {
            return invalid("option 'value_column' applies to json and sparkplug only".into());
        }
        if self.ack == AckMode::Checkpoint && (self.qos.0 != 1 || self.clean_session) {
            return invalid(
                "ack = 'checkpoint' needs qos = 1 and clean_session = false: only a persistent \
                 session redelivers what was not acknowledged"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn decode_options(&self) -> DecodeOptions {
        DecodeOptions {
            time_unit: self.time_unit,
            value_column: self.value_column.clone(),
        }
    }
}

/// How result rows become messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// One JSON object per row.
    #[default]
    Row,
    /// One JSON array per batch and topic.
    Batch,
}

/// `WITH` options of the `mqtt` sink, besides the [`BrokerConfig`] ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSinkConfig {
    /// Topic, optionally built from columns: `alerts/{sensor}`.
    pub topic: String,
    /// 0 or 1.
    pub qos: Qos,
    /// Ask the broker to keep the last message per topic for new subscribers.
    #[serde(deserialize_with = "lenient::value")]
    pub retain: bool,
    /// `row` (one message per row) or `batch` (one JSON array per batch and topic).
    pub mode: PublishMode,
    /// How timestamps are written: `rfc3339` (UTC), `epoch_ms` or `epoch_ns`.
    pub timestamps: TimestampFormat,
}

impl Default for MqttSinkConfig {
    fn default() -> Self {
        Self {
            topic: String::new(),
            qos: Qos(1),
            retain: false,
            mode: PublishMode::Row,
            timestamps: TimestampFormat::default(),
        }
    }
}

/// Splits a spec's options into the broker part and the rest, and reads both.
pub(crate) fn split_options<T: serde::de::DeserializeOwned>(
    spec: &ConnectorSpec,
) -> Result<(BrokerConfig, T)> {
    let mut broker = Map::new();
    let mut rest = Map::new();
    for (key, value) in &spec.options {
        if BROKER_KEYS.contains(&key.as_str()) {
            broker.insert(key.clone(), value.clone());
        } else {
            rest.insert(key.clone(), value.clone());
        }
    }
    let broker_spec = ConnectorSpec {
        options: broker,
        ..ConnectorSpec::new("mqtt")
    };
    let rest_spec = ConnectorSpec {
        options: rest,
        ..ConnectorSpec::new("mqtt")
    };
    let broker: BrokerConfig = parse_options("mqtt", &broker_spec)?;
    let rest: T = parse_options("mqtt", &rest_spec).map_err(|error| match error {
        // serde lists the direction's own options; name the connection ones too.
        ConnectorError::Config { component, message } if message.starts_with("unknown field") => {
            ConnectorError::Config {
                component,
                message: format!(
                    "{message}, or a connection option: {}",
                    BROKER_KEYS.join(", ")
                ),
            }
        }
        other => other,
    })?;
    Ok((broker, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_default_ports_and_clear_errors() {
        let plain = BrokerAddress::parse("mqtt://10.0.0.5").expect("ok");
        assert_eq!(
            (plain.host.as_str(), plain.port, plain.tls),
            ("10.0.0.5", 1883, false)
        );
        let tls = BrokerAddress::parse("mqtts://broker.site:9883/").expect("ok");
        assert_eq!(
            (tls.host.as_str(), tls.port, tls.tls),
            ("broker.site", 9883, true)
        );
        assert_eq!(BrokerAddress::parse("mqtts://b").expect("ok").port, 8883);
        let v6 = BrokerAddress::parse("mqtt://[::1]:1884").expect("ok");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1884));
        for (url, why) in [
            ("localhost:1883", "no scheme"),
            ("http://x", "mqtt:// or mqtts://"),
            ("mqtt://x:0", "port"),
            ("mqtt://x:http", "port"),
            ("mqtt://user:pw@x", "credentials"),
            ("mqtt://:1883", "no host"),
        ] {
            let error = BrokerAddress::parse(url).expect_err(url).to_string();
            assert!(error.contains(why), "{url}: {error}");
        }
    }

    #[test]
    fn options_split_into_broker_and_direction_and_unknown_ones_are_named() {
        let spec = ConnectorSpec::new("mqtt")
            .with_option("url", "mqtt://127.0.0.1:1999")
            .with_option("topic", "a/+")
            .with_option("qos", "0")
            .with_option("keep_alive", "5s");
        let (broker, source): (BrokerConfig, MqttSourceConfig) = split_options(&spec).expect("ok");
        assert_eq!(broker.url.as_deref(), Some("mqtt://127.0.0.1:1999"));
        assert_eq!(broker.keep_alive, Duration::from_secs(5));
        assert_eq!(source.qos, Qos(0));
        assert_eq!(source.topic, "a/+");

        let typo = spec.clone().with_option("topc", "x");
        let error = split_options::<MqttSourceConfig>(&typo)
            .expect_err("typo")
            .to_string();
        assert!(error.contains("unknown field `topc`"), "{error}");
        assert!(error.contains("client_id"), "{error}");

        let qos2 = spec.with_option("qos", 2);
        let error = split_options::<MqttSourceConfig>(&qos2)
            .expect_err("qos 2")
            .to_string();
        assert!(error.contains("QoS 2 is not supported"), "{error}");
    }

    #[test]
    fn persistent_sessions_need_a_client_id_and_passwords_a_user() {
        let broker = BrokerConfig::default();
        assert!(broker.validate(true).is_ok());
        let error = broker.validate(false).expect_err("no id").to_string();
        assert!(error.contains("client_id' is required"), "{error}");
        let with_password = BrokerConfig {
            password: Some("x".into()),
            ..BrokerConfig::default()
        };
        assert!(with_password.validate(true).is_err());
        let unset_env = BrokerConfig {
            username: Some("u".into()),
            password_env: Some("WEIR_TEST_SURELY_UNSET_VARIABLE".into()),
            ..BrokerConfig::default()
        };
        let error = unset_env
            .mqtt_options("id", true)
            .expect_err("unset")
            .to_string();
        assert!(error.contains("is not set"), "{error}");
    }

    #[test]
    fn tls_without_a_readable_ca_file_is_a_clear_error() {
        let broker = BrokerConfig {
            url: Some("mqtts://127.0.0.1:8883".into()),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..BrokerConfig::default()
        };
        let error = broker
            .mqtt_options("id", true)
            .expect_err("no file")
            .to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
