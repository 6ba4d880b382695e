//! A node's identity: its own key (generated on the node, never sent anywhere), the certificate
//! cloudcore issued for the node's name, and the mesh CA that signed it.
//!
//! The files live in `<data_dir>/identity/` (directory 0700, key 0600): `node.key` (PKCS#8),
//! `node.crt` and `mesh-ca.crt`. The node asks for a certificate over its authenticated hub
//! link ([`Identity::request`]); cloudcore signs it for the name the node authenticated as,
//! publishes its fingerprint in the Node's status, and every node accepts exactly that
//! certificate from that peer ([`verify::PeerVerifier`]). A new certificate is due in the last
//! third of the validity, or as soon as the synced fingerprint says this one was revoked.

pub mod verify;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use crate::message::{CertificateIssued, CertificateRequest};
use crate::model::NodeCertificate;
use rcgen::PublicKeyData;

/// Directory of the identity files inside a node's `data_dir`.
pub const IDENTITY_DIR: &str = "identity";
const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const CA_FILE: &str = "mesh-ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot make a certificate request: {0}")]
    Request(String),
    #[error("the issued certificate is not usable: {0}")]
    Answer(String),
}

/// Whether the node with `data_dir` holds a certificate (it joined, and may log in to a TLS
/// hub without its token).
pub fn has_certificate(data_dir: &Path) -> bool {
    data_dir.join(IDENTITY_DIR).join(CERT_FILE).exists()
}

/// SHA-256 of a certificate (DER), lower-case hex: how the mesh names one certificate.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a certificate says, as far as the mesh cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names of its subjectAltName (node certificates carry the node's name only).
    pub names: Vec<String>,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    /// The SubjectPublicKeyInfo (DER), to match the certificate with a key.
    pub public_key: Vec<u8>,
}

/// Reads a certificate (DER).
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("subjectAltName: {e}")),
    };
    let validity = cert.validity();
    Ok(CertInfo {
        names,
        not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
        not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
        public_key: cert.public_key().raw.to_vec(),
    })
}

/// The certificate a node holds.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: CertificateDer<'static>,
    /// The mesh CA: the one trust anchor of direct paths.
    pub ca: CertificateDer<'static>,
    pub fingerprint: String,
    pub info: CertInfo,
}

impl Issued {
    /// When a new certificate is due: two thirds into the validity.
    pub fn renew_at_ms(&self) -> i64 {
        let (from, to) = (self.info.not_before_ms, self.info.not_after_ms);
        to - (to - from).max(0) / 3
    }

    pub fn is_valid_at(&self, now_ms: i64) -> bool {
        (self.info.not_before_ms..self.info.not_after_ms).contains(&now_ms)
    }
}

/// Why a node asks for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// It has none (first start, or its files were removed or belong to another key or name).
    Missing,
    /// Its certificate is in the last third of its validity, or expired.
    Renewal,
    /// The synced Node status no longer shows its certificate: deleted, re-joined or revoked.
    Revoked,
}

impl Need {
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Missing => "missing",
            Need::Renewal => "renewal",
            Need::Revoked => "revoked",
        }
    }
}

/// The node's key and certificate.
pub struct Identity {
    node: String,
    dir: PathBuf,
    key: rcgen::KeyPair,
    issued: watch::Sender<Option<Arc<Issued>>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Writes `contents` to `path` with `mode` through a temporary file and a rename, so a crash
/// leaves the old file or the new one, never a torn one.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Identity {
    /// Opens the node's identity under `data_dir`, generating its key on first use. A stored
    /// certificate is kept only if it is for this key and this node name.
    pub fn open(data_dir: &Path, node: &str) -> Result<Identity, IdentityError> {
        let dir = data_dir.join(IDENTITY_DIR);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(&dir))?;
        let key_path = dir.join(KEY_FILE);
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => {
                let mode = std::fs::metadata(&key_path)
                    .map_err(io_err(&key_path))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %key_path.display(), mode = format!("{:o}", mode & 0o777),
                        "the node key was readable by other users; made it 0600");
                    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io_err(&key_path))?;
                }
                rcgen::KeyPair::from_pem(&pem).map_err(|e| IdentityError::Invalid {
                    path: key_path.clone(),
                    reason: format!("not a private key: {e}"),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rcgen::KeyPair::generate()
                    .map_err(|e| IdentityError::Request(e.to_string()))?;
                write_file_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                    .map_err(io_err(&key_path))?;
                tracing::info!(path = %key_path.display(), "generated the node key");
                key
            }
            Err(e) => return Err(io_err(&key_path)(e)),
        };
        let identity = Identity {
            node: node.to_string(),
            dir,
            key,
            issued: watch::Sender::new(None),
        };
        match identity.load_stored() {
            Ok(Some(issued)) => {
                identity.issued.send_replace(Some(Arc::new(issued)));
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(%reason, "ignoring the stored node certificate; a new one will be requested")
            }
        }
        Ok(identity)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn load_stored(&self) -> Result<Option<Issued>, String> {
        let cert_path = self.dir.join(CERT_FILE);
        let ca_path = self.dir.join(CA_FILE);
        if !cert_path.exists() {
            return Ok(None);
        }
        let cert = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let ca = CertificateDer::from_pem_file(&ca_path)
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        self.check(cert, ca).map(Some)
    }

    /// A certificate is this node's when it is for this key and names this node, and the CA
    /// signed it.
    fn check(
        &self,
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
    ) -> Result<Issued, String> {
        let info = cert_info(&cert)?;
        if info.public_key != self.key.subject_public_key_info() {
            return Err("the certificate is for another key".into());
        }
        if !info.names.iter().any(|n| n == &self.node) {
            return Err(format!(
                "the certificate is for {:?}, not for node {:?}",
                info.names, self.node
            ));
        }
        verify::chain_to(&ca, &cert, &self.node).map_err(|e| e.to_string())?;
        Ok(Issued {
            fingerprint: fingerprint(&cert),
            cert,
            ca,
            info,
        })
    }

    /// A certificate request (PEM) for this node's key and name.
    pub fn request(&self) -> Result<CertificateRequest, IdentityError> {
        let mut params = rcgen::CertificateParams::new(vec![self.node.clone()])
            .map_err(|e| IdentityError::Request(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, self.node.as_str());
        let csr = params
            .serialize_request(&self.key)
            .and_then(|c| c.pem())
            .map_err(|e| IdentityError::Request(e.to_string()))?;
        Ok(CertificateRequest { csr })
    }

    /// Takes an issued certificate after checking it is this node's (key, name, CA, the
    /// fingerprint the cloud published), and stores it.
    pub fn install(&self, answer: &CertificateIssued) -> Result<Arc<Issued>, IdentityError> {
        let bad = |reason: String| IdentityError::Answer(reason);
        let cert = CertificateDer::from_pem_slice(answer.certificate.as_bytes())
            .map_err(|e| bad(format!("certificate: {e}")))?;
        let ca = CertificateDer::from_pem_slice(answer.ca.as_bytes())
            .map_err(|e| bad(format!("CA certificate: {e}")))?;
        let issued = self.check(cert, ca).map_err(bad)?;
        if issued.fingerprint != answer.fingerprint {
            return Err(bad(format!(
                "its fingerprint is {}, the cloud published {}",
                issued.fingerprint, answer.fingerprint
            )));
        }
        // The CA first: a node that stops in between keeps its old certificate, which still
        // chains to a CA it trusts (the CA only changes when cloudcore's data_dir is replaced).
        let ca_path = self.dir.join(CA_FILE);
        write_file_atomic(&ca_path, answer.ca.as_bytes(), 0o644).map_err(io_err(&ca_path))?;
        let cert_path = self.dir.join(CERT_FILE);
        write_file_atomic(&cert_path, answer.certificate.as_bytes(), 0o644)
            .map_err(io_err(&cert_path))?;
        let issued = Arc::new(issued);
        self.issued.send_replace(Some(issued.clone()));
        tracing::info!(fingerprint = %issued.fingerprint, not_after_ms = issued.info.not_after_ms, "node certificate installed");
        Ok(issued)
    }

    /// The certificate the node holds, if any.
    pub fn current(&self) -> Option<Arc<Issued>> {
        self.issued.borrow().clone()
    }

    /// Follows the certificate as it is issued and renewed.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Issued>>> {
        self.issued.subscribe()
    }

    /// The key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// Certificate and key for authenticating to the hub (mTLS), while the certificate is
    /// valid.
    pub fn client_auth(&self) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let issued = self.current().filter(|i| i.is_valid_at(now_ms()))?;
        Some((vec![issued.cert.clone()], self.private_key()))
    }

    /// Whether the node should ask for a certificate now. `synced` is what this node's copy
    /// of its own Node object says; it is trusted only when `view_current` (the node is in
    /// sync with the cloud, and its view includes the write of its latest certificate).
    pub fn need(
        &self,
        synced: Option<&NodeCertificate>,
        view_current: bool,
        now_ms: i64,
    ) -> Option<Need> {
        let Some(issued) = self.current() else {
            return Some(Need::Missing);
        };
        if now_ms >= issued.renew_at_ms() || !issued.is_valid_at(now_ms) {
            return Some(Need::Renewal);
        }
        if view_current && synced.map(|c| c.fingerprint.as_str()) != Some(&issued.fingerprint) {
            return Some(Need::Revoked);
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A mesh CA for tests, issuing as cloudcore does.

    use super::*;

    /// A node with an identity issued by `ca`, and the status the cloud would publish for it.
    pub fn node(
        dir: &Path,
        ca: &TestCa,
        name: &str,
    ) -> (std::sync::Arc<Identity>, crate::model::NodeCertificate) {
        let id = Identity::open(&dir.join(name), name).expect("open");
        let issued = ca.issue(&id.request().expect("csr").csr, name, -60, 3600);
        id.install(&issued).expect("install");
        let synced = crate::model::NodeCertificate {
            fingerprint: issued.fingerprint,
            not_after_ms: issued.not_after_ms,
        };
        (std::sync::Arc::new(id), synced)
    }

    pub struct TestCa {
        pub key: rcgen::KeyPair,
        pub params: rcgen::CertificateParams,
        pub cert: rcgen::Certificate,
    }

    impl TestCa {
        pub fn new(name: &str) -> TestCa {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).expect("self-signed");
            TestCa { key, params, cert }
        }

        pub fn der(&self) -> CertificateDer<'static> {
            self.cert.der().clone()
        }

        /// Signs `csr_pem` for `name` (whatever the request says), valid `[from, to)` seconds
        /// around now.
        pub fn issue(&self, csr_pem: &str, name: &str, from: i64, to: i64) -> CertificateIssued {
            let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("csr");
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
            let now = now_ms() / 1000;
            params.not_before =
                time::OffsetDateTime::from_unix_timestamp(now + from).expect("time");
            params.not_after = time::OffsetDateTime::from_unix_timestamp(now + to).expect("time");
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
            let cert = params.signed_by(&csr.public_key, &issuer).expect("sign");
            CertificateIssued {
                fingerprint: fingerprint(cert.der()),
                certificate: cert.pem(),
                ca: self.cert.pem(),
                not_after_ms: (now + to) * 1000,
                resource_version: 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestCa;
    use super::*;

    #[test]
    fn the_key_is_made_once_with_mode_0600_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Identity::open(dir.path(), "edge-1").expect("open");
        let key_path = dir.path().join(IDENTITY_DIR).join(KEY_FILE);
        let mode = std::fs::metadata(&key_path)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join(IDENTITY_DIR))
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let b = Identity::open(dir.path(), "edge-1").expect("reopen");
        assert_eq!(
            a.key.subject_public_key_info(),
            b.key.subject_public_key_info()
        );
        assert_eq!(a.need(None, false, now_ms()), Some(Need::Missing));
    }

    #[test]
    fn an_issued_certificate_is_checked_stored_and_loaded_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("mesh");
        let id = Identity::open(dir.path(), "edge-1").expect("open");
        let csr = id.request().expect("csr").csr;
        assert!(
            csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{csr}"
        );

        // For another name, for another key, a fingerprint that is not the cloud's: refused.
        let other = ca.issue(&csr, "edge-2", -60, 3600);
        assert!(id.install(&other).is_err());
        let stranger = Identity::open(&dir.path().join("x"), "edge-1").expect("other key");
        let wrong_key = ca.issue(&stranger.request().expect("csr").csr, "edge-1", -60, 3600);
        assert!(id.install(&wrong_key).is_err());
        let mut lied = ca.issue(&csr, "edge-1", -60, 3600);
        lied.fingerprint = "00".repeat(32);
        assert!(id.install(&lied).is_err());
        assert!(id.current().is_none());

        let good = ca.issue(&csr, "edge-1", -60, 3600);
        let issued = id.install(&good).expect("install");
        assert_eq!(issued.fingerprint, good.fingerprint);
        assert!(id.client_auth().is_some());
        let synced = NodeCertificate {
            fingerprint: good.fingerprint.clone(),
            not_after_ms: good.not_after_ms,
        };
        assert_eq!(id.need(Some(&synced), true, now_ms()), None);
        // Revoked: the synced status shows another certificate, or none.
        let replaced = NodeCertificate {
            fingerprint: "ff".repeat(32),
            ..synced.clone()
        };
        assert_eq!(
            id.need(Some(&replaced), true, now_ms()),
            Some(Need::Revoked)
        );
        assert_eq!(id.need(None, true, now_ms()), Some(Need::Revoked));
        assert_eq!(
            id.need(None, false, now_ms()),
            None,
            "a stale view proves nothing"
        );
        // Renewal in the last third of the validity.
        let late = issued.renew_at_ms() + 1;
        assert_eq!(id.need(Some(&synced), true, late), Some(Need::Renewal));

        let again = Identity::open(dir.path(), "edge-1").expect("reopen");
        assert_eq!(
            again.current().map(|i| i.fingerprint.clone()),
            Some(good.fingerprint.clone())
        );
        // Another node name on the same data_dir does not take this certificate.
        let renamed = Identity::open(dir.path(), "edge-9").expect("reopen");
        assert!(renamed.current().is_none());
    }
}
