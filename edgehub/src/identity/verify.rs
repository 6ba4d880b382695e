//! Checking a peer node's certificate against this node's own copy of the mesh, so it works
//! offline too: the chain must end at the mesh CA, the certificate must name the node, and it
//! must be exactly the certificate whose fingerprint that node's synced Node status shows. A
//! deleted or re-joined node's old certificate is refused everywhere as soon as the change
//! reaches a node (its fingerprint is gone from the status or replaced).
//!
//! [`PeerVerifier::verify`] is the check; [`MeshCertVerifier`] plugs it into rustls (QUIC or
//! TLS) in both roles: as a client it expects the node it dials (the TLS server name is the
//! node name), as a server it accepts any node of the mesh and names it.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use tokio::sync::watch;

use super::{fingerprint, Identity};
use crate::view::MeshView;

/// Why a peer's certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("this node has no mesh CA yet (it has not been issued a certificate)")]
    NoCa,
    #[error("not a valid certificate of this mesh's CA for {name}: {reason}")]
    Chain { name: String, reason: String },
    #[error("the certificate is node {holder}'s, not {expected}'s")]
    WrongNode { expected: String, holder: String },
    #[error(
        "the certificate is not the one node {node} holds now (revoked, replaced or unknown node)"
    )]
    Revoked { node: String },
    #[error("no node of the mesh holds this certificate (revoked or replaced)")]
    Unknown,
}

/// The CA's rustls verifier, built once per CA.
fn webpki_for(ca: &CertificateDer<'static>) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| e.to_string())?;
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn check_chain(
    webpki: &WebPkiServerVerifier,
    cert: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    name: &str,
    now: UnixTime,
) -> Result<(), PeerError> {
    let chain = |reason: String| PeerError::Chain {
        name: name.to_string(),
        reason,
    };
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| chain(e.to_string()))?;
    webpki
        .verify_server_cert(cert, intermediates, &server_name, &[], now)
        .map(|_| ())
        .map_err(|e| chain(e.to_string()))
}

/// Whether `cert` is a valid certificate of `ca` for `name` now.
pub(crate) fn chain_to(
    ca: &CertificateDer<'static>,
    cert: &CertificateDer<'_>,
    name: &str,
) -> Result<(), PeerError> {
    let webpki = webpki_for(ca).map_err(|reason| PeerError::Chain {
        name: name.to_string(),
        reason,
    })?;
    check_chain(&webpki, cert, &[], name, UnixTime::now())
}

/// Checks peers' certificates against this node's mesh CA and its synced view.
pub struct PeerVerifier {
    identity: Arc<Identity>,
    view: watch::Receiver<Arc<MeshView>>,
    /// The verifier of the current CA, keyed by the CA's fingerprint.
    webpki: Mutex<Option<(String, Arc<WebPkiServerVerifier>)>>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier").finish_non_exhaustive()
    }
}

impl PeerVerifier {
    /// `identity` supplies the mesh CA (it comes with the node's own certificate), `view` the
    /// synced Node objects.
    pub fn new(identity: Arc<Identity>, view: watch::Receiver<Arc<MeshView>>) -> Self {
        PeerVerifier {
            identity,
            view,
            webpki: Mutex::new(None),
        }
    }

    fn webpki(&self) -> Result<Arc<WebPkiServerVerifier>, PeerError> {
        let ca = self.identity.current().ok_or(PeerError::NoCa)?.ca.clone();
        let ca_fp = fingerprint(&ca);
        let mut cached = self.webpki.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((fp, v)) = cached.as_ref() {
            if *fp == ca_fp {
                return Ok(v.clone());
            }
        }
        let v = webpki_for(&ca).map_err(|reason| PeerError::Chain {
            name: String::new(),
            reason,
        })?;
        *cached = Some((ca_fp, v.clone()));
        Ok(v)
    }

    /// The node whose synced status holds the certificate with `fingerprint`.
    pub fn node_of(&self, fingerprint: &str) -> Option<String> {
        let view = self.view.borrow().clone();
        view.nodes
            .values()
            .find(|n| {
                n.certificate()
                    .is_some_and(|c| c.fingerprint == fingerprint)
            })
            .map(|n| n.metadata.name.clone())
    }

    /// Accepts `end_entity` only if it chains to the mesh CA, is valid `now`, names the node,
    /// and is the certificate that node's synced status shows. With `expected` (dialling a
    /// node) that node; without (accepting) whichever node holds it. Returns the node's name.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        expected: Option<&str>,
        now: UnixTime,
    ) -> Result<String, PeerError> {
        let webpki = self.webpki()?;
        let fp = fingerprint(end_entity);
        let holder = self.node_of(&fp);
        let name = match (expected, holder) {
            (Some(e), Some(h)) if e == h => h,
            (Some(e), Some(h)) => {
                // Check the chain first: a certificate of another CA is that, whatever it is.
                check_chain(&webpki, end_entity, intermediates, &h, now)?;
                return Err(PeerError::WrongNode {
                    expected: e.to_string(),
                    holder: h,
                });
            }
            (Some(e), None) => {
                check_chain(&webpki, end_entity, intermediates, e, now)?;
                return Err(PeerError::Revoked {
                    node: e.to_string(),
                });
            }
            (None, Some(h)) => h,
            (None, None) => return Err(PeerError::Unknown),
        };
        check_chain(&webpki, end_entity, intermediates, &name, now)?;
        Ok(name)
    }
}

/// [`PeerVerifier`] as rustls' verifier of servers (expects the node named as the server name)
/// and of clients (accepts any node of the mesh; client authentication is mandatory).
#[derive(Debug)]
pub struct MeshCertVerifier {
    peer: Arc<PeerVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl MeshCertVerifier {
    pub fn new(peer: Arc<PeerVerifier>) -> Arc<Self> {
        Arc::new(MeshCertVerifier {
            peer,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

/// The handshake-signature checks both verifier traits need: rustls' own, with ring's
/// algorithms (only the certificate checks differ between the roles).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

fn refused(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ServerCertVerifier for MeshCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ServerName::DnsName(name) = server_name else {
            return Err(rustls::Error::General(
                "a mesh peer is dialled by node name, not by address".into(),
            ));
        };
        self.peer
            .verify(end_entity, intermediates, Some(name.as_ref()), now)
            .map(|_| ServerCertVerified::assertion())
            .map_err(refused)
    }

    handshake_signatures!();
}

impl ClientCertVerifier for MeshCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.peer
            .verify(end_entity, intermediates, None, now)
            .map(|_| ClientCertVerified::assertion())
            .map_err(refused)
    }

    handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::{node, TestCa};
    use crate::model::{Node, NodeCertificate};
    use rustls::pki_types::pem::PemObject;
    use std::collections::BTreeMap;

    fn view(nodes: &[(&str, Option<&NodeCertificate>)]) -> MeshView {
        let mut v = MeshView::default();
        for (name, cert) in nodes {
            let mut n = Node::new(name, BTreeMap::new());
            n.set_certificate(*cert);
            v.nodes.insert(name.to_string(), Arc::new(n));
        }
        v
    }

    fn cert_of(id: &Identity) -> CertificateDer<'static> {
        id.current().expect("issued").cert.clone()
    }

    #[test]
    fn only_the_synced_certificate_of_the_named_node_from_our_ca_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("mesh");
        let (me, _) = node(dir.path(), &ca, "me");
        let (a, a_cert) = node(dir.path(), &ca, "a");
        let (b, b_cert) = node(dir.path(), &ca, "b");
        let (tx, rx) = watch::channel(Arc::new(view(&[
            ("a", Some(&a_cert)),
            ("b", Some(&b_cert)),
        ])));
        let v = PeerVerifier::new(me, rx);
        let now = UnixTime::now();

        assert_eq!(v.verify(&cert_of(&a), &[], Some("a"), now), Ok("a".into()));
        assert_eq!(v.verify(&cert_of(&a), &[], None, now), Ok("a".into()));
        // A's certificate presented as B's.
        assert_eq!(
            v.verify(&cert_of(&a), &[], Some("b"), now),
            Err(PeerError::WrongNode {
                expected: "b".into(),
                holder: "a".into()
            })
        );

        // From another CA, even for a name and key the mesh knows.
        let rogue_ca = TestCa::new("rogue");
        let stolen = rogue_ca.issue(&a.request().expect("csr").csr, "a", -60, 3600);
        let rogue_cert =
            CertificateDer::from_pem_slice(stolen.certificate.as_bytes()).expect("pem");
        assert_eq!(
            v.verify(&rogue_cert, &[], None, now),
            Err(PeerError::Unknown)
        );
        let rogue_synced = NodeCertificate {
            fingerprint: stolen.fingerprint.clone(),
            not_after_ms: stolen.not_after_ms,
        };
        // Even if the synced status named it (it cannot: the cloud only publishes its own).
        tx.send_replace(Arc::new(view(&[
            ("a", Some(&rogue_synced)),
            ("b", Some(&b_cert)),
        ])));
        assert!(matches!(
            v.verify(&rogue_cert, &[], Some("a"), now),
            Err(PeerError::Chain { .. })
        ));

        // Revoked: A re-joined (status now empty) or was deleted (no Node at all).
        tx.send_replace(Arc::new(view(&[("a", None), ("b", Some(&b_cert))])));
        assert_eq!(
            v.verify(&cert_of(&a), &[], Some("a"), now),
            Err(PeerError::Revoked { node: "a".into() })
        );
        assert_eq!(
            v.verify(&cert_of(&a), &[], None, now),
            Err(PeerError::Unknown)
        );
        tx.send_replace(Arc::new(view(&[("b", Some(&b_cert))])));
        assert_eq!(
            v.verify(&cert_of(&a), &[], Some("a"), now),
            Err(PeerError::Revoked { node: "a".into() })
        );
        assert_eq!(v.verify(&cert_of(&b), &[], Some("b"), now), Ok("b".into()));

        // Expired (the synced fingerprint still matches).
        let old = Identity::open(&dir.path().join("old"), "old").expect("open");
        let expired = ca.issue(&old.request().expect("csr").csr, "old", -7200, -3600);
        let expired_cert =
            CertificateDer::from_pem_slice(expired.certificate.as_bytes()).expect("pem");
        let expired_synced = NodeCertificate {
            fingerprint: expired.fingerprint,
            not_after_ms: expired.not_after_ms,
        };
        tx.send_replace(Arc::new(view(&[("old", Some(&expired_synced))])));
        assert!(matches!(
            v.verify(&expired_cert, &[], Some("old"), now),
            Err(PeerError::Chain { .. })
        ));
    }

    #[test]
    fn a_node_without_a_certificate_has_no_ca_to_check_against() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = Arc::new(Identity::open(dir.path(), "me").expect("open"));
        let (_tx, rx) = watch::channel(Arc::new(MeshView::default()));
        let v = PeerVerifier::new(me, rx);
        let ca = TestCa::new("mesh");
        assert_eq!(
            v.verify(&ca.der(), &[], None, UnixTime::now()),
            Err(PeerError::NoCa)
        );
    }

    /// Both roles over a real TLS 1.3 handshake (tokio-rustls over an in-memory pipe): mutual
    /// authentication with node certificates, and a refused peer.
    #[tokio::test]
    async fn mutual_tls_between_two_nodes_with_the_mesh_verifier() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("mesh");
        let (a, a_cert) = node(dir.path(), &ca, "a");
        let (b, b_cert) = node(dir.path(), &ca, "b");
        let both = Arc::new(view(&[("a", Some(&a_cert)), ("b", Some(&b_cert))]));
        let (_ta, ra) = watch::channel(both.clone());
        let (_tb, rb) = watch::channel(both);
        let va = MeshCertVerifier::new(Arc::new(PeerVerifier::new(a.clone(), ra)));
        let vb = MeshCertVerifier::new(Arc::new(PeerVerifier::new(b.clone(), rb)));

        let handshake = |dial: &'static str| {
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(va.clone())
                .with_client_auth_cert(vec![cert_of(&a)], a.private_key())
                .expect("client");
            let server = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .with_client_cert_verifier(vb.clone())
                .with_single_cert(vec![cert_of(&b)], b.private_key())
                .expect("server");
            async move {
                let (c, s) = tokio::io::duplex(64 << 10);
                let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
                let name = ServerName::try_from(dial).expect("name");
                let (c, s) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
                (
                    c.map(|_| ()),
                    s.map(|s| {
                        s.get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| fingerprint(c))
                    }),
                )
            }
        };
        let (c, s) = handshake("b").await;
        c.expect("a dials b");
        assert_eq!(s.expect("b accepts a"), Some(a_cert.fingerprint.clone()));
        // a dials "c" but b answers: b's certificate is not c's.
        let (c, _) = handshake("c").await;
        assert!(c.is_err());
    }
}
