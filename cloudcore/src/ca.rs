//! The mesh CA: cloudcore's own certificate authority for node certificates.
//!
//! Created at first start under `data_dir` (`mesh-ca.key`, mode 0600, and `mesh-ca.crt`),
//! ECDSA P-256 with rcgen on ring. It signs one kind of certificate: a node's, for the name the
//! node authenticated as, whatever its request claims; only the request's public key is used
//! (after its signature proved the node holds the key).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgehub::identity::{fingerprint, write_file_atomic};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateDer;

/// Files of the CA inside `data_dir`.
pub const CA_KEY_FILE: &str = "mesh-ca.key";
pub const CA_CERT_FILE: &str = "mesh-ca.crt";

/// How long the CA itself is valid. Node certificates are short-lived and renewed; the CA is
/// the trust anchor every node stores, so replacing it means re-issuing every node.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86400);
/// Clock skew allowed between cloudcore and nodes when a certificate starts.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    Files { path: String, reason: String },
    #[error("invalid certificate request: {0}")]
    Request(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A certificate the CA issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    pub pem: String,
    pub fingerprint: String,
    pub not_after_ms: i64,
}

pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn offset(secs: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| CaError::Sign(e.to_string()))
}

impl MeshCa {
    /// Loads the CA from `data_dir`, creating it on first start. A key without its certificate
    /// is what a crash between the two writes leaves: that key never signed anything, so a
    /// new CA replaces it.
    pub fn load_or_create(data_dir: &Path) -> Result<MeshCa, CaError> {
        let key_path = data_dir.join(CA_KEY_FILE);
        let cert_path = data_dir.join(CA_CERT_FILE);
        let files = |path: &Path, reason: String| CaError::Files {
            path: path.display().to_string(),
            reason,
        };
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => {
                let key_pem = std::fs::read_to_string(&key_path)
                    .map_err(|e| files(&key_path, e.to_string()))?;
                let cert_pem = std::fs::read_to_string(&cert_path)
                    .map_err(|e| files(&cert_path, e.to_string()))?;
                let key = KeyPair::from_pem(&key_pem)
                    .map_err(|e| files(&key_path, format!("not a private key: {e}")))?;
                Self::from_parts(key, cert_pem).map_err(|reason| files(&cert_path, reason))
            }
            (false, true) => Err(files(
                &key_path,
                format!(
                    "missing, but {} exists: restore the key (every node's certificate chains to it)",
                    cert_path.display()
                ),
            )),
            (_, false) => {
                std::fs::create_dir_all(data_dir).map_err(|e| files(data_dir, e.to_string()))?;
                let (key, cert_pem) = Self::generate(SystemTime::now())?;
                write_file_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                    .map_err(|e| files(&key_path, e.to_string()))?;
                write_file_atomic(&cert_path, cert_pem.as_bytes(), 0o644)
                    .map_err(|e| files(&cert_path, e.to_string()))?;
                tracing::info!(path = %cert_path.display(), "created the mesh CA");
                Self::from_parts(key, cert_pem).map_err(|reason| files(&cert_path, reason))
            }
        }
    }

    fn generate(now: SystemTime) -> Result<(KeyPair, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "edgemesh mesh CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = unix(now);
        params.not_before = offset(now - BACKDATE.as_secs() as i64)?;
        params.not_after = offset(now + CA_VALIDITY.as_secs() as i64)?;
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((key, cert.pem()))
    }

    fn from_parts(key: KeyPair, cert_pem: String) -> Result<MeshCa, String> {
        use rustls::pki_types::pem::PemObject;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("not a certificate: {e}"))?;
        let info = edgehub::identity::cert_info(&cert_der)?;
        if info.public_key != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err("the CA certificate is not for the CA key next to it".into());
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| e.to_string())?;
        Ok(MeshCa {
            issuer,
            cert_pem,
            cert_der,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Signs a certificate for `node`, valid for `validity` from `now`, with the public key of
    /// `csr_pem` (whose signature must prove the requester holds the key). The request's names
    /// and extensions are ignored.
    pub fn issue(
        &self,
        csr_pem: &str,
        node: &str,
        validity: Duration,
        now: SystemTime,
    ) -> Result<IssuedCert, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Request(e.to_string()))?;
        let mut params = CertificateParams::new(vec![node.to_string()])
            .map_err(|e| CaError::Request(format!("node name {node:?}: {e}")))?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // One certificate for both ends of a direct path, and for logging in to the hub.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let now = unix(now);
        let not_after = now.saturating_add(validity.as_secs() as i64);
        params.not_before = offset(now - BACKDATE.as_secs() as i64)?;
        params.not_after = offset(not_after)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(IssuedCert {
            fingerprint: fingerprint(cert.der()),
            pem: cert.pem(),
            not_after_ms: not_after.saturating_mul(1000),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub::identity::{cert_info, Identity};
    use edgehub::message::CertificateIssued;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_ca_is_created_once_and_its_key_is_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = MeshCa::load_or_create(dir.path()).expect("create");
        let b = MeshCa::load_or_create(dir.path()).expect("load");
        assert_eq!(a.cert_pem(), b.cert_pem());
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The certificate without its key is an error naming the key file, never a new CA.
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).expect("rm");
        let e = MeshCa::load_or_create(dir.path()).err().expect("refused");
        assert!(e.to_string().contains(CA_KEY_FILE), "{e}");
        // A key whose certificate was never written is replaced.
        std::fs::remove_file(dir.path().join(CA_CERT_FILE)).expect("rm");
        std::fs::write(dir.path().join(CA_KEY_FILE), "junk").expect("write");
        let c = MeshCa::load_or_create(dir.path()).expect("recreated");
        assert_ne!(c.cert_pem(), a.cert_pem());
    }

    #[test]
    fn a_node_gets_a_certificate_for_its_own_name_whatever_it_asks_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = MeshCa::load_or_create(&dir.path().join("cloud")).expect("ca");
        // The node claims "edge-2" but authenticated as "edge-1".
        let claimer = Identity::open(&dir.path().join("node"), "edge-2").expect("identity");
        let csr = claimer.request().expect("csr").csr;
        let now = SystemTime::now();
        let cert = ca
            .issue(&csr, "edge-1", Duration::from_secs(86400), now)
            .expect("issued");
        let der = {
            use rustls::pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(cert.pem.as_bytes()).expect("pem")
        };
        let info = cert_info(&der).expect("parse");
        assert_eq!(info.names, vec!["edge-1".to_string()]);
        assert_eq!(cert.fingerprint, fingerprint(&der));
        assert_eq!(cert.not_after_ms, (unix(now) + 86400) * 1000);
        // The real edge-1, with its own key, takes a certificate issued the same way.
        let node = Identity::open(&dir.path().join("edge-1"), "edge-1").expect("identity");
        let cert = ca
            .issue(
                &node.request().expect("csr").csr,
                "edge-1",
                Duration::from_secs(3600),
                now,
            )
            .expect("issued");
        node.install(&CertificateIssued {
            certificate: cert.pem.clone(),
            ca: ca.cert_pem().to_string(),
            fingerprint: cert.fingerprint.clone(),
            not_after_ms: cert.not_after_ms,
            resource_version: 1,
        })
        .expect("the node accepts it");
    }

    #[test]
    fn a_request_that_is_not_one_or_whose_signature_is_broken_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = MeshCa::load_or_create(dir.path()).expect("ca");
        let week = Duration::from_secs(7 * 86400);
        for bad in ["", "garbage", ca.cert_pem()] {
            assert!(matches!(
                ca.issue(bad, "edge-1", week, SystemTime::now()),
                Err(CaError::Request(_))
            ));
        }
        let node = Identity::open(&dir.path().join("n"), "edge-1").expect("identity");
        let csr = node.request().expect("csr").csr;
        // Flip one character of the base64 body: the signature no longer verifies.
        let mut lines: Vec<String> = csr.lines().map(String::from).collect();
        let mid = lines.len() / 2;
        let flipped: String = lines[mid]
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 10 {
                    if c == 'A' {
                        'B'
                    } else {
                        'A'
                    }
                } else {
                    c
                }
            })
            .collect();
        lines[mid] = flipped;
        assert!(ca
            .issue(&lines.join("\n"), "edge-1", week, SystemTime::now())
            .is_err());
    }
}
