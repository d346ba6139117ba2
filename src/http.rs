//! The CLI's HTTP client: rustls on the ring provider (the one crypto library of the
//! process), trusting a given CA or else the system's roots, speaking HTTP/2 or HTTP/1.1.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

/// A client builder whose TLS trusts `ca` (PEM) if given, else the system's certificates.
pub fn client_builder(ca: Option<&Path>) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let mut found = 0;
            for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
                let certificate =
                    certificate.with_context(|| format!("{} is not PEM", ca.display()))?;
                roots
                    .add(certificate)
                    .with_context(|| format!("{} holds an unusable certificate", ca.display()))?;
                found += 1;
            }
            anyhow::ensure!(found > 0, "{} holds no PEM certificate", ca.display());
        }
        None => {
            // Unreadable system certificates only matter for https, where the handshake
            // then says which certificate it could not verify.
            for certificate in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(certificate);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder().tls_backend_preconfigured(config))
}
