//! The records the control plane stores, and the secrets it hands out.
//!
//! Secrets (enrollment tokens, gateway credentials, API tokens) are random 256-bit values;
//! the cloud keeps only their SHA-256, so a copy of its store lets no one in.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::error::{CloudError, Result};
use crate::selector::Labels;

/// What an API token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read the fleet, pipelines, deployments and status.
    Viewer,
    /// Also deploy and roll back.
    Deployer,
    /// Also manage gateways and tokens, and read the audit log.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = CloudError;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "viewer" => Ok(Self::Viewer),
            "deployer" => Ok(Self::Deployer),
            "admin" => Ok(Self::Admin),
            other => Err(CloudError::Invalid(format!(
                "unknown role '{other}'; the roles are viewer, deployer and admin"
            ))),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Viewer => "viewer",
            Self::Deployer => "deployer",
            Self::Admin => "admin",
        })
    }
}

/// A gateway the cloud knows, enrolled or not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayRecord {
    pub id: String,
    pub name: String,
    pub labels: Labels,
    /// SHA-256 of the gateway's credential, once it has enrolled.
    pub credential_hash: Option<String>,
    pub created_at_ms: u64,
    pub enrolled_at_ms: Option<u64>,
    /// What the gateway called itself when it enrolled.
    pub hostname: Option<String>,
    pub revoked: bool,
    /// When the gateway's stream last spoke, as of the last time the cloud stopped.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
}

/// A one-time enrollment token, stored by its hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrollment {
    pub gateway_id: String,
    pub created_at_ms: u64,
    pub used_at_ms: Option<u64>,
}

/// An API token for the CLI and the console, stored by its hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub created_at_ms: u64,
}

/// One immutable, signed version of a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineVersion {
    pub pipeline: String,
    pub version: u64,
    /// The deployment that created this version.
    pub deployment: String,
    /// The SQL file it was compiled from, whole.
    pub sql: String,
    /// The signed `PlanEnvelope` bytes and their signature, as gateways receive them.
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    #[serde(with = "base64_bytes")]
    pub signature: Vec<u8>,
    pub created_at_ms: u64,
    pub created_by: String,
}

/// A deployment: which pipeline versions go to which gateways.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub name: String,
    pub selector: String,
    /// Settles two deployments that put the same pipeline on one gateway: higher wins, then newer.
    pub priority: i32,
    /// Pipeline name -> version, what the deployment runs now.
    pub pipelines: BTreeMap<String, u64>,
    /// Earlier pipeline sets, newest last, for rollback.
    pub history: Vec<BTreeMap<String, u64>>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub updated_by: String,
    /// A staged rollout in progress: canaries run `pipelines`, the others `rollout.stable`.
    #[serde(default)]
    pub rollout: Option<Rollout>,
    /// Why the last staged rollout was stopped and rolled back.
    #[serde(default)]
    pub failure: Option<String>,
}

/// A staged rollout: the new versions go to a few canary gateways first and reach the rest
/// only after every canary ran them healthily for the bake time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// Gateway ids.
    pub canaries: Vec<String>,
    /// What the other gateways run meanwhile, and what the canaries return to on failure.
    pub stable: BTreeMap<String, u64>,
    pub started_at_ms: u64,
    pub bake_ms: u64,
    /// A canary whose pipeline counts more errors than this fails the rollout.
    pub max_errors: u64,
    /// When each canary was first seen running every new version healthily; not stored,
    /// so a restarted cloud bakes again from the start.
    #[serde(skip)]
    pub healthy_since_ms: BTreeMap<String, u64>,
}

/// One change, who made it and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: u64,
    /// `token:NAME` for API callers, `gateway:NAME` for gateways.
    pub actor: String,
    pub action: String,
    pub detail: String,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new random secret, `prefix` + 43 URL-safe base64 characters.
pub fn new_secret(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CloudError::Storage("the system random generator failed".into()))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The SHA-256 of a secret, hex: what the store keeps.
pub fn secret_hash(secret: &str) -> String {
    digest(&SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_and_hashes_stable() {
        let a = new_secret("wt_").expect("secret");
        let b = new_secret("wt_").expect("secret");
        assert_ne!(a, b);
        assert!(a.starts_with("wt_") && a.len() == 3 + 43, "{a}");
        assert_eq!(secret_hash(&a), secret_hash(&a));
        assert_ne!(secret_hash(&a), secret_hash(&b));
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Viewer < Role::Deployer && Role::Deployer < Role::Admin);
        assert_eq!("deployer".parse::<Role>().expect("role"), Role::Deployer);
        let error = "root".parse::<Role>().expect_err("unknown role");
        assert!(
            error.to_string().contains("viewer, deployer and admin"),
            "{error}"
        );
    }
}
