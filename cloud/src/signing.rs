//! Plan signatures: the cloud signs every pipeline version with its Ed25519 key; gateways
//! verify the bytes with the public key they received at enrollment before decoding them.
//!
//! The key lives in `<data>/plan-signing.key` (PKCS#8, mode 0600), created on first start.

use std::path::Path;

use prost::Message;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use weir_proto::cloud::{DesiredManifest, PlanEnvelope, SignedPlan};

use crate::error::{CloudError, Result};

/// The cloud's plan-signing key.
pub struct PlanSigner {
    key: Ed25519KeyPair,
}

impl PlanSigner {
    /// Loads the key from `path`, or creates it there if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let pkcs8 = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let generated = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| CloudError::Storage("cannot generate a signing key".into()))?;
                crate::files::write_secret(path, generated.as_ref())?;
                tracing::info!(path = %path.display(), "created the plan-signing key");
                generated.as_ref().to_vec()
            }
            Err(source) => {
                return Err(CloudError::Io {
                    what: format!("reading the plan-signing key {}", path.display()),
                    source,
                });
            }
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|error| {
            CloudError::Storage(format!(
                "the plan-signing key {} is not a valid Ed25519 PKCS#8 key: {error}",
                path.display()
            ))
        })?;
        Ok(Self { key })
    }

    /// The raw 32-byte public key gateways verify with.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    pub fn sign(&self, envelope: &PlanEnvelope) -> SignedPlan {
        let payload = envelope.encode_to_vec();
        let signature = self.key.sign(&payload).as_ref().to_vec();
        SignedPlan { payload, signature }
    }

    /// Signs a gateway's whole desired state: the encoded manifest and its signature.
    pub fn sign_manifest(&self, manifest: &DesiredManifest) -> (Vec<u8>, Vec<u8>) {
        let bytes = manifest.encode_to_vec();
        let signature = self.key.sign(&bytes).as_ref().to_vec();
        (bytes, signature)
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::{ED25519, UnparsedPublicKey};

    use super::*;

    #[test]
    fn the_key_survives_a_restart_and_signatures_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plan-signing.key");
        let first = PlanSigner::load_or_create(&path).expect("create");
        let again = PlanSigner::load_or_create(&path).expect("load");
        assert_eq!(first.public_key(), again.public_key());
        let envelope = PlanEnvelope {
            pipeline: "rms".into(),
            version: 3,
            ..PlanEnvelope::default()
        };
        let signed = again.sign(&envelope);
        let key = UnparsedPublicKey::new(&ED25519, first.public_key());
        assert!(key.verify(&signed.payload, &signed.signature).is_ok());
        let mut tampered = signed.payload.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key.verify(&tampered, &signed.signature).is_err());
    }

    #[test]
    fn a_corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plan-signing.key");
        std::fs::write(&path, b"not a key").expect("write");
        let Err(error) = PlanSigner::load_or_create(&path) else {
            panic!("a corrupt key must not load");
        };
        assert!(error.to_string().contains("not a valid Ed25519"), "{error}");
    }
}
