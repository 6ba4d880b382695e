//! TLS configuration for the hub and the API: rustls with the ring provider only, so the
//! binaries carry one TLS stack.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} = {path}: cannot read certificates: {reason}")]
    Certs {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{key} = {path}: no certificate found in the file")]
    NoCerts { key: &'static str, path: PathBuf },
    #[error("{key} = {path}: cannot read a private key: {reason}")]
    Key {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file. `key` is the config key that named the file, so an
/// error tells the operator which setting to fix.
pub fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            key,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Server configuration from a certificate chain and its key (PEM files).
pub fn server_config(
    cert_key: &'static str,
    cert: &Path,
    key_key: &'static str,
    key: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_clients(cert_key, cert, key_key, key, None)
}

/// [`server_config`] that also asks clients for a certificate of `client_ca` (optional for
/// them: a client without one authenticates otherwise).
pub fn server_config_with_clients(
    cert_key: &'static str,
    cert: &Path,
    key_key: &'static str,
    key: &Path,
    client_ca: Option<CertificateDer<'static>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert_key, cert)?;
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        key: key_key,
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, private_key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client configuration that trusts exactly the CA certificates in `ca` (PEM).
pub fn client_config(ca_key: &'static str, ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with_auth(ca_key, ca, None)
}

/// [`client_config`] that presents `auth` (a certificate chain and its key) when the server
/// asks for one.
pub fn client_config_with_auth(
    ca_key: &'static str,
    ca: &Path,
    auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_key, ca)? {
        roots.add(cert)?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
