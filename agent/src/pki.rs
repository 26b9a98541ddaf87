//! Keys, CSRs, certificate parsing, and the rustls verifiers that pin the
//! router's CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portico_proto::api::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::PkiError;

/// The one crypto provider of every Portico process: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A fresh ECDSA P-256 key pair.
pub fn generate_key() -> Result<rcgen::KeyPair, PkiError> {
    Ok(rcgen::KeyPair::generate()?)
}

/// A PKCS#10 CSR for `key`. It names nothing: the router decides the names.
pub fn csr_pem(key: &rcgen::KeyPair) -> Result<String, PkiError> {
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    Ok(params.serialize_request(key)?.pem()?)
}

/// Every certificate in a PEM bundle, in order. At least one is required.
pub fn parse_certs_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PkiError::BadPem {
            what: "certificate",
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoPem {
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The private key in a PEM document (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => PkiError::NoPem {
            what: "private key",
        },
        source => PkiError::BadPem {
            what: "private key",
            source,
        },
    })
}

fn parse<'a>(
    cert: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, PkiError> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| PkiError::BadCertificate {
            what: "not X.509 DER",
            source: e.into(),
        })
}

/// The Portico identity a certificate names in its URI SANs.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, PkiError> {
    let cert = parse(cert)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate {
            what: "malformed subject alternative names",
            source: e.into(),
        })?
        .ok_or(PkiError::NoIdentity)?;
    let uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Some(&**uri),
        _ => None,
    });
    Identity::from_uris(uris).ok_or(PkiError::NoIdentity)
}

/// The DNS names a certificate's subject alternative names list, as
/// written (`*.corp.apps.example.com` included); none when it has no SAN
/// extension.
pub fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, PkiError> {
    let cert = parse(cert)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate {
            what: "malformed subject alternative names",
            source: e.into(),
        })?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(name) => {
                        Some(name.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A certificate's validity period.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), PkiError> {
    let cert = parse(cert)?;
    let v = cert.validity();
    Ok((
        to_system_time(v.not_before.timestamp()),
        to_system_time(v.not_after.timestamp()),
    ))
}

/// When a certificate expires.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, PkiError> {
    Ok(validity(cert)?.1)
}

/// The hex serial number of a certificate.
pub fn serial_hex(cert: &CertificateDer<'_>) -> Result<String, PkiError> {
    Ok(parse(cert)?.raw_serial_as_string().replace(':', ""))
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A root store holding the certificates of a PEM bundle (the router CA).
pub fn root_store(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs_pem(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A verifier of client certificates signed by the CA. With `optional`,
/// clients without a certificate are let in (the router API serves admins
/// with bearer tokens and agents with certificates on one listener).
pub fn client_verifier(
    ca_pem: &str,
    optional: bool,
) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca_pem)?), provider());
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    Ok(builder.build()?)
}

/// Who may present a client certificate to a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A connector: the tunnel listener.
    Connector,
    /// An edge: the mesh listener.
    Edge,
}

impl Role {
    fn admits(self, identity: &Identity) -> bool {
        matches!(
            (self, identity),
            (Role::Connector, Identity::Connector { .. }) | (Role::Edge, Identity::Edge { .. })
        )
    }
}

/// A client verifier that checks the chain against the CA, as
/// [`client_verifier`] does, and then that the certificate names a `role`
/// identity: a connector certificate on the mesh port, or an edge
/// certificate on the tunnel port, fails the TLS handshake itself.
pub fn role_verifier(ca_pem: &str, role: Role) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    Ok(Arc::new(RoleVerifier {
        inner: client_verifier(ca_pem, false)?,
        role,
    }))
}

#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    role: Role,
}

impl ClientCertVerifier for RoleVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match identity_of(end_entity) {
            Ok(identity) if self.role.admits(&identity) => Ok(verified),
            // Chains to the CA, but names another role (or none): refused
            // as a certificate not meant for this use.
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server verifier that checks the chain against the CA and the fixed
/// `name`, whatever host or address the client dialed. The router is
/// verified as [`portico_proto::api::ROUTER_SERVER_NAME`] this way.
pub fn fixed_name_verifier(
    ca_pem: &str,
    name: &str,
) -> Result<Arc<dyn ServerCertVerifier>, PkiError> {
    Ok(Arc::new(FixedName {
        inner: Verify::Ca(ca_verifier(ca_pem)?),
        name: Expected::Name(server_name(name)?),
    }))
}

/// The webpki verifier of servers that chain to the CA of `ca_pem`.
fn ca_verifier(ca_pem: &str) -> Result<Arc<WebPkiServerVerifier>, PkiError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(ca_pem)?), provider())
        .build()
        .map_err(|e| PkiError::BadCertificate {
            what: "the CA cannot verify servers",
            source: e.into(),
        })
}

/// A server verifier for first contact: the server must present, in its
/// chain, a CA certificate whose SHA-256 is `ca_sha256`, and its leaf must
/// chain to that CA and carry `name`.
pub fn pinned_verifier(
    ca_sha256: &str,
    name: &str,
) -> Result<Arc<dyn ServerCertVerifier>, PkiError> {
    Ok(Arc::new(FixedName {
        inner: Verify::Pinned(ca_sha256.to_ascii_lowercase()),
        name: Expected::Name(server_name(name)?),
    }))
}

fn server_name(name: &str) -> Result<ServerName<'static>, PkiError> {
    ServerName::try_from(name.to_owned()).map_err(|source| PkiError::BadServerName {
        name: name.to_owned(),
        source,
    })
}

#[derive(Debug)]
enum Verify {
    Ca(Arc<WebPkiServerVerifier>),
    Pinned(String),
}

/// The name a server's certificate must carry, whatever was dialled.
#[derive(Debug)]
enum Expected {
    Name(ServerName<'static>),
    /// The name of the edge the leaf's own identity names, which must be
    /// of this region: any edge of the region (not an edge of another
    /// region, not a connector).
    EdgeOf(portico_proto::ids::RegionId),
}

#[derive(Debug)]
struct FixedName {
    inner: Verify,
    name: Expected,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialed: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let edge_name;
        let name = match &self.name {
            Expected::Name(n) => n,
            Expected::EdgeOf(want) => {
                let id = match identity_of(end_entity) {
                    Ok(Identity::Edge { id, region }) if region == *want => id,
                    // Not an edge, or an edge of another region: not what
                    // was dialled.
                    _ => {
                        return Err(rustls::Error::InvalidCertificate(
                            rustls::CertificateError::InvalidPurpose,
                        ))
                    }
                };
                edge_name = server_name(&portico_proto::api::edge_server_name(&id))
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                &edge_name
            }
        };
        match &self.inner {
            Verify::Ca(v) => v.verify_server_cert(end_entity, intermediates, name, ocsp, now),
            Verify::Pinned(pin) => {
                let ca = intermediates
                    .iter()
                    .find(|c| sha256_hex(c.as_ref()) == *pin)
                    .ok_or(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::UnknownIssuer,
                    ))?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                v.verify_server_cert(end_entity, intermediates, name, ocsp, now)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

/// A server verifier for a tunnel endpoint found by its region's name
/// (`<region>.tunnel.<domain>`), whose edge is not known before the
/// handshake: the chain must verify against the CA for the name the leaf's
/// own edge identity gives ([`portico_proto::api::edge_server_name`]), and
/// that edge must be of `region`. The dialer reads which edge it reached
/// from the peer certificate ([`identity_of`]).
pub fn region_edge_verifier(
    ca_pem: &str,
    region: &portico_proto::ids::RegionId,
) -> Result<Arc<dyn ServerCertVerifier>, PkiError> {
    Ok(Arc::new(FixedName {
        inner: Verify::Ca(ca_verifier(ca_pem)?),
        name: Expected::EdgeOf(region.clone()),
    }))
}

/// A server verifier that accepts any certificate, while still checking
/// that the handshake is signed by the key in it. Only for backends whose
/// app turned validation off, and for load tests run with `--insecure`;
/// never for Portico's own links.
pub fn insecure_verifier() -> Arc<dyn ServerCertVerifier> {
    Arc::new(AcceptAny)
}

#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

fn tls12_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn verify_schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::{ConnectorId, GroupId};
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    #[test]
    fn identity_and_validity_read_back() {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let id = Identity::Connector {
            id: ConnectorId::new("c-1").unwrap(),
            group: GroupId::default_group(),
        };
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = id
            .to_uris()
            .into_iter()
            .map(|u| rcgen::SanType::URI(u.try_into().unwrap()))
            .collect();
        let key = generate_key().unwrap();
        let cert = leaf.signed_by(&key, &ca).unwrap();
        let der = cert.der().clone();
        assert_eq!(identity_of(&der).unwrap(), id);
        assert!(not_after(&der).unwrap() > SystemTime::now());
        // A certificate without Portico URIs has no identity.
        assert!(matches!(identity_of(ca.der()), Err(PkiError::NoIdentity)));
        // PEM round trips.
        let pem = cert.pem();
        assert_eq!(parse_certs_pem(&pem).unwrap(), vec![der]);
        assert!(parse_key_pem(&key.serialize_pem()).is_ok());
        assert!(matches!(
            parse_certs_pem("junk"),
            Err(PkiError::NoPem { .. })
        ));
        assert!(csr_pem(&key).unwrap().contains("CERTIFICATE REQUEST"));
    }

    /// A CA and a leaf of `identity` signed by it, with the edge's DNS name
    /// `dns` (as the router's CA issues edge certificates).
    fn leaf(
        ca: &CertifiedIssuer<'_, KeyPair>,
        identity: &Identity,
        dns: Option<String>,
    ) -> CertificateDer<'static> {
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = identity
            .to_uris()
            .into_iter()
            .map(|u| rcgen::SanType::URI(u.try_into().unwrap()))
            .chain(dns.map(|d| rcgen::SanType::DnsName(d.try_into().unwrap())))
            .collect();
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        leaf.signed_by(&generate_key().unwrap(), ca)
            .unwrap()
            .der()
            .clone()
    }

    fn new_ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap()
    }

    #[test]
    fn the_region_verifier_takes_any_edge_of_its_region_from_the_ca_and_nothing_else() {
        use portico_proto::ids::{EdgeId, RegionId};
        let ca = new_ca();
        let eu = RegionId::new("eu-west").unwrap();
        let v = region_edge_verifier(&ca.pem(), &eu).unwrap();
        let edge = |id: &str, region: &str| Identity::Edge {
            id: EdgeId::new(id).unwrap(),
            region: RegionId::new(region).unwrap(),
        };
        let name = |id: &str| {
            Some(portico_proto::api::edge_server_name(
                &EdgeId::new(id).unwrap(),
            ))
        };
        let dialed = ServerName::try_from("eu-west.tunnel.apps.test").unwrap();
        let check = |cert: &CertificateDer<'_>| {
            v.verify_server_cert(cert, &[], &dialed, &[], UnixTime::now())
        };
        // Either edge of eu-west, whatever name was dialled.
        assert!(check(&leaf(&ca, &edge("e1", "eu-west"), name("e1"))).is_ok());
        assert!(check(&leaf(&ca, &edge("e2", "eu-west"), name("e2"))).is_ok());
        // An edge of another region, a connector, a certificate whose DNS
        // name is another edge's than its identity, and an edge of the
        // right region from another CA: refused.
        let purpose = |r: Result<ServerCertVerified, rustls::Error>| {
            matches!(
                r,
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::InvalidPurpose
                ))
            )
        };
        assert!(purpose(check(&leaf(
            &ca,
            &edge("u1", "us-east"),
            name("u1")
        ))));
        let connector = Identity::Connector {
            id: ConnectorId::new("c-1").unwrap(),
            group: GroupId::default_group(),
        };
        assert!(purpose(check(&leaf(&ca, &connector, None))));
        assert!(check(&leaf(&ca, &edge("e1", "eu-west"), name("e2"))).is_err());
        let other = new_ca();
        assert!(check(&leaf(&other, &edge("e1", "eu-west"), name("e1"))).is_err());
    }
}
