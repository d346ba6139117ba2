//! TLS for the cloud's one port. With `--tls`, the cloud makes its own certificate authority
//! on first start (`<data>/tls/ca.pem`, `ca.key`) and a server certificate signed by it for
//! `localhost`, `127.0.0.1`, `::1` and every `--tls-name` (`server.pem`, `server.key`).
//! Gateways and the CLI trust `ca.pem`, given to them at enrollment. Operators with their own
//! PKI give `--tls-cert` and `--tls-key` instead. Delete `server.pem` to issue a new server
//! certificate (say, for a new name) from the same authority.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::error::{CloudError, Result};

/// How the cloud serves its port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP/2 and HTTP/1.1: only for loopback, or with `--insecure`.
    #[default]
    Off,
    /// A certificate from the cloud's own authority, for these extra names.
    SelfSigned { names: Vec<String> },
    /// The operator's certificate chain and key, PEM.
    Files { cert: PathBuf, key: PathBuf },
}

/// The server's certificate chain and key, PEM, and where the CA for clients is.
pub struct ServerIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The file clients must trust, when the cloud made it.
    pub ca_file: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(CloudError::io(format!("reading {}", path.display())))
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    if secret {
        crate::files::write_secret(path, bytes)
    } else {
        std::fs::write(path, bytes).map_err(CloudError::io(format!("writing {}", path.display())))
    }
}

fn authority_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Weir cloud certificate authority");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn tls_error(error: rcgen::Error) -> CloudError {
    CloudError::Storage(format!("cannot make the TLS certificates: {error}"))
}

/// The identity to serve with for `mode`, creating the authority and server certificate in
/// `<data_dir>/tls` when the cloud makes its own.
pub fn server_identity(mode: &TlsMode, data_dir: &Path) -> Result<Option<ServerIdentity>> {
    match mode {
        TlsMode::Off => Ok(None),
        TlsMode::Files { cert, key } => Ok(Some(ServerIdentity {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            ca_file: None,
        })),
        TlsMode::SelfSigned { names } => self_signed(&data_dir.join("tls"), names).map(Some),
    }
}

fn self_signed(dir: &Path, names: &[String]) -> Result<ServerIdentity> {
    std::fs::create_dir_all(dir).map_err(CloudError::io(format!("creating {}", dir.display())))?;
    let (ca_file, ca_key_file) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert_file, key_file) = (dir.join("server.pem"), dir.join("server.key"));
    if cert_file.exists() && key_file.exists() {
        return Ok(ServerIdentity {
            cert_pem: read(&cert_file)?,
            key_pem: read(&key_file)?,
            ca_file: Some(ca_file),
        });
    }
    let ca_params = authority_params()?;
    let ca_key = if ca_key_file.exists() && ca_file.exists() {
        let pem = String::from_utf8_lossy(&read(&ca_key_file)?).into_owned();
        KeyPair::from_pem(&pem).map_err(tls_error)?
    } else {
        let key = KeyPair::generate().map_err(tls_error)?;
        let ca = ca_params.self_signed(&key).map_err(tls_error)?;
        write(&ca_key_file, key.serialize_pem().as_bytes(), true)?;
        write(&ca_file, ca.pem().as_bytes(), false)?;
        tracing::info!(ca = %ca_file.display(), "created the cloud's certificate authority");
        key
    };
    let mut subject_names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    subject_names.extend(names.iter().cloned());
    let mut params = CertificateParams::new(subject_names.clone()).map_err(tls_error)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "weir cloud");
    params.distinguished_name = name;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(tls_error)?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).map_err(tls_error)?;
    let ca_pem = read(&ca_file)?;
    // The chain: the server certificate, then the authority that signed it.
    let mut chain = cert.pem().into_bytes();
    chain.extend_from_slice(&ca_pem);
    write(&cert_file, &chain, false)?;
    write(&key_file, key.serialize_pem().as_bytes(), true)?;
    tracing::info!(names = %subject_names.join(","), "issued the server certificate");
    Ok(ServerIdentity {
        cert_pem: chain,
        key_pem: key.serialize_pem().into_bytes(),
        ca_file: Some(ca_file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_is_made_once_and_the_server_certificate_reissued_from_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mode = TlsMode::SelfSigned {
            names: vec!["cloud.plant1.example".into()],
        };
        let first = server_identity(&mode, dir.path())
            .expect("tls")
            .expect("identity");
        let ca = std::fs::read(dir.path().join("tls/ca.pem")).expect("ca");
        let again = server_identity(&mode, dir.path())
            .expect("tls")
            .expect("identity");
        assert_eq!(
            first.cert_pem, again.cert_pem,
            "an existing certificate is reused"
        );
        std::fs::remove_file(dir.path().join("tls/server.pem")).expect("remove");
        let reissued = server_identity(&mode, dir.path())
            .expect("tls")
            .expect("identity");
        assert_ne!(reissued.cert_pem, first.cert_pem);
        assert_eq!(
            std::fs::read(dir.path().join("tls/ca.pem")).expect("ca"),
            ca,
            "same CA"
        );
        assert!(
            String::from_utf8_lossy(&reissued.cert_pem)
                .matches("BEGIN CERTIFICATE")
                .count()
                == 2
        );
    }

    #[test]
    fn missing_certificate_files_name_the_file() {
        let mode = TlsMode::Files {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let Err(error) = server_identity(&mode, Path::new("/tmp")) else {
            panic!("missing files must fail");
        };
        assert!(
            error.to_string().contains("/nonexistent/cert.pem"),
            "{error}"
        );
    }
}
