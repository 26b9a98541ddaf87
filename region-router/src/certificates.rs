//! Uploaded certificates for hosts of custom domains (`portico cert
//! upload`): each upload is parsed and checked here before it is stored,
//! and each fault is its own error, named for the admin who must fix it.
//!
//! The checks, in order: the PEM parses (bounded: [`MAX_CERT_CHAIN_PEM`],
//! [`MAX_CHAIN_CERTS`], [`MAX_CERT_KEY_PEM`]); the key is one rustls can
//! sign with and is the leaf's (their public keys compared); every
//! certificate of the chain is within its validity; the leaf is not
//! self-signed (its issuer is itself and its own key verifies it); each
//! certificate is signed by the next one; the leaf names DNS hosts in its
//! subjectAltName, and covers every host the upload names (webpki's name
//! check, as clients make it).
//!
//! What is not checked: that the chain ends at a root browsers trust.
//! Portico does not know its users' trust stores (a private CA is common
//! for internal apps), so a chain to an unknown root is accepted; a leaf
//! that is its own issuer never is.

use portico_proto::api::{
    CertificateUpload, MAX_CERT_CHAIN_PEM, MAX_CERT_KEY_PEM, MAX_CHAIN_CERTS, MAX_UPLOAD_HOSTS,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::config::check_dns_name;
use crate::store::CertificateRecord;

/// Why an upload is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CertError {
    #[error("the chain is {len} bytes of PEM; at most {max} are accepted")]
    ChainTooLarge { len: usize, max: usize },
    #[error("the key is {len} bytes of PEM; at most {max} are accepted")]
    KeyTooLarge { len: usize, max: usize },
    #[error("the chain holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("the chain is not valid PEM")]
    ChainPem {
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the chain holds {len} certificates; at most {max} (the leaf first, then its intermediates)")]
    TooManyCertificates { len: usize, max: usize },
    #[error("certificate {index} of the chain (0 is the leaf) is not a valid X.509 certificate")]
    Unparsable {
        index: usize,
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    #[error("the key holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey,
    #[error("the key is not valid PEM")]
    KeyPem {
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the private key cannot sign TLS handshakes (an RSA, ECDSA P-256/P-384 or Ed25519 key is needed)")]
    KeyUnusable {
        #[source]
        source: rustls::Error,
    },
    #[error("key mismatch: the private key is not the key of the certificate {subject:?}; upload the key that was made with its request")]
    KeyMismatch { subject: String },
    #[error("expired: the certificate {subject:?} was valid until {not_after}, and it is now {now}; renew it with its issuer")]
    Expired {
        subject: String,
        not_after: String,
        now: String,
    },
    #[error("not yet valid: the certificate {subject:?} is valid from {not_before}, and it is now {now}; upload it then, or check this machine's clock")]
    NotYetValid {
        subject: String,
        not_before: String,
        now: String,
    },
    #[error("self-signed: the certificate {subject:?} is its own issuer, which no browser trusts; upload one issued by a certificate authority")]
    SelfSigned { subject: String },
    #[error("the chain is broken: certificate {index} ({subject:?}, issued by {issuer:?}) is not signed by the next one ({next:?}); put the leaf first, then each issuer in order")]
    ChainBroken {
        index: usize,
        subject: String,
        issuer: String,
        next: String,
    },
    #[error("the certificate {subject:?} names no DNS host in its subjectAltName (a common name alone is ignored by browsers)")]
    NoNames { subject: String },
    #[error("the certificate {subject:?} is not one TLS clients can check (webpki refuses it)")]
    LeafUnusable {
        subject: String,
        #[source]
        source: rustls::Error,
    },
    #[error("give at least one host the certificate is for (--host or --app)")]
    NoHosts,
    #[error("at most {max} hosts per upload")]
    TooManyHosts { max: usize },
    #[error("{host:?} is not a valid host name: {reason}")]
    InvalidHost { host: String, reason: String },
    #[error("host not covered: the certificate names {}, none of which covers {host:?}", names.join(", "))]
    HostNotCovered { host: String, names: Vec<String> },
}

impl CertError {
    /// The request field at fault.
    pub(crate) fn field(&self) -> &'static str {
        match self {
            CertError::KeyTooLarge { .. }
            | CertError::NoKey
            | CertError::KeyPem { .. }
            | CertError::KeyUnusable { .. }
            | CertError::KeyMismatch { .. } => "key_pem",
            CertError::NoHosts
            | CertError::TooManyHosts { .. }
            | CertError::InvalidHost { .. }
            | CertError::HostNotCovered { .. } => "hosts",
            _ => "chain_pem",
        }
    }
}

/// Checks an upload at `now` (seconds since the Unix epoch) and makes the
/// record to store.
pub(crate) fn validate(
    upload: &CertificateUpload,
    now: u64,
) -> Result<CertificateRecord, CertError> {
    if upload.chain_pem.len() > MAX_CERT_CHAIN_PEM {
        return Err(CertError::ChainTooLarge {
            len: upload.chain_pem.len(),
            max: MAX_CERT_CHAIN_PEM,
        });
    }
    if upload.key_pem.len() > MAX_CERT_KEY_PEM {
        return Err(CertError::KeyTooLarge {
            len: upload.key_pem.len(),
            max: MAX_CERT_KEY_PEM,
        });
    }
    let hosts = hosts(&upload.hosts)?;
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(upload.chain_pem.as_bytes()) {
        let der = item.map_err(|source| CertError::ChainPem { source })?;
        if chain.len() == MAX_CHAIN_CERTS {
            return Err(CertError::TooManyCertificates {
                len: chain.len() + 1,
                max: MAX_CHAIN_CERTS,
            });
        }
        chain.push(der);
    }
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let parsed = chain
        .iter()
        .enumerate()
        .map(|(index, der)| {
            X509Certificate::from_der(der)
                .map(|(_, c)| c)
                .map_err(|source| CertError::Unparsable { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = &parsed[0];
    let subject = leaf.subject().to_string();

    // The key, and that it is the leaf's.
    let key = PrivateKeyDer::from_pem_slice(upload.key_pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey,
        source => CertError::KeyPem { source },
    })?;
    let signer = portico_agent::pki::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| CertError::KeyUnusable { source })?;
    let certified = CertifiedKey::new(chain.clone(), signer);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch { subject })
        }
        Err(source) => return Err(CertError::KeyUnusable { source }),
    }

    // Validity, of every certificate in the chain.
    let now_i = i64::try_from(now).unwrap_or(i64::MAX);
    for c in &parsed {
        let v = c.validity();
        if v.not_after.timestamp() < now_i {
            return Err(CertError::Expired {
                subject: c.subject().to_string(),
                not_after: rfc3339(v.not_after.timestamp()),
                now: rfc3339(now_i),
            });
        }
        if v.not_before.timestamp() > now_i {
            return Err(CertError::NotYetValid {
                subject: c.subject().to_string(),
                not_before: rfc3339(v.not_before.timestamp()),
                now: rfc3339(now_i),
            });
        }
    }

    // Not its own issuer; each one signed by the next.
    if leaf.subject() == leaf.issuer() && leaf.verify_signature(None).is_ok() {
        return Err(CertError::SelfSigned { subject });
    }
    for (index, pair) in parsed.windows(2).enumerate() {
        if pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .is_err()
        {
            return Err(CertError::ChainBroken {
                index,
                subject: pair[0].subject().to_string(),
                issuer: pair[0].issuer().to_string(),
                next: pair[1].subject().to_string(),
            });
        }
    }

    // Its names, and the hosts asked for.
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                let d = d.to_ascii_lowercase();
                if !names.contains(&d) {
                    names.push(d);
                }
            }
        }
    }
    if names.is_empty() {
        return Err(CertError::NoNames { subject });
    }
    let end_entity = rustls::server::ParsedCertificate::try_from(&chain[0])
        .map_err(|source| CertError::LeafUnusable { subject, source })?;
    for host in &hosts {
        let covered = ServerName::try_from(host.as_str())
            .ok()
            .is_some_and(|name| rustls::client::verify_server_name(&end_entity, &name).is_ok());
        if !covered {
            return Err(CertError::HostNotCovered {
                host: host.clone(),
                names,
            });
        }
    }

    let digest = ring::digest::digest(&ring::digest::SHA256, &chain[0]);
    let id: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(CertificateRecord {
        id,
        names,
        issuer: leaf.issuer().to_string(),
        not_before: u64::try_from(leaf.validity().not_before.timestamp()).unwrap_or(0),
        not_after: u64::try_from(leaf.validity().not_after.timestamp()).unwrap_or(0),
        chain_pem: upload.chain_pem.clone(),
        key_pem: upload.key_pem.clone(),
        uploaded_at: now,
    })
}

/// The hosts of an upload, lower case, each a DNS name.
fn hosts(raw: &[String]) -> Result<Vec<String>, CertError> {
    if raw.is_empty() {
        return Err(CertError::NoHosts);
    }
    if raw.len() > MAX_UPLOAD_HOSTS {
        return Err(CertError::TooManyHosts {
            max: MAX_UPLOAD_HOSTS,
        });
    }
    raw.iter()
        .map(|h| {
            let host = h.trim().trim_end_matches('.').to_ascii_lowercase();
            check_dns_name(&host).map_err(|reason| CertError::InvalidHost {
                host: h.clone(),
                reason,
            })?;
            Ok(host)
        })
        .collect()
}

/// `2026-12-02T19:00:00Z`.
pub(crate) fn rfc3339(secs: i64) -> String {
    let t = match u64::try_from(secs) {
        Ok(s) => std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
        Err(_) => std::time::UNIX_EPOCH,
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    const NOW: u64 = 1_800_000_000; // 2027-01-15

    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name.push(DnType::CommonName, "Test CA");
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf_params(names: &[&str], from: u64, until: u64) -> CertificateParams {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.not_before = time(from).into();
        p.not_after = time(until).into();
        p
    }

    fn time(secs: u64) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    fn upload(chain: String, key: &KeyPair, hosts: &[&str]) -> CertificateUpload {
        CertificateUpload {
            chain_pem: chain,
            key_pem: key.serialize_pem(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A leaf for `names` issued by `ca`, valid around NOW, and its key;
    /// the chain PEM is the leaf then the CA.
    fn issued(ca: &CertifiedIssuer<'static, KeyPair>, names: &[&str]) -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let cert = leaf_params(names, NOW - 86400, NOW + 30 * 86400)
            .signed_by(&key, ca)
            .unwrap();
        (format!("{}{}", cert.pem(), ca.pem()), key)
    }

    #[test]
    fn a_good_chain_is_stored_with_its_names_and_validity() {
        let ca = ca();
        let (chain, key) = issued(&ca, &["*.corp.test", "corp.test"]);
        let rec = validate(&upload(chain, &key, &["hr.corp.test", "corp.test"]), NOW).unwrap();
        assert_eq!(rec.names, ["*.corp.test", "corp.test"]);
        assert_eq!(rec.not_after, NOW + 30 * 86400);
        assert_eq!(rec.id.len(), 16);
        assert!(rec.issuer.contains("Test CA"), "{}", rec.issuer);
    }

    #[test]
    fn each_fault_is_its_own_error() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();

        let expired = leaf_params(&["hr.corp.test"], NOW - 90 * 86400, NOW - 86400)
            .signed_by(&key, &ca)
            .unwrap();
        let e = validate(&upload(expired.pem(), &key, &["hr.corp.test"]), NOW).unwrap_err();
        assert!(matches!(e, CertError::Expired { .. }), "{e}");
        assert!(e.to_string().starts_with("expired: "), "{e}");

        let future = leaf_params(&["hr.corp.test"], NOW + 86400, NOW + 90 * 86400)
            .signed_by(&key, &ca)
            .unwrap();
        let e = validate(&upload(future.pem(), &key, &["hr.corp.test"]), NOW).unwrap_err();
        assert!(matches!(e, CertError::NotYetValid { .. }), "{e}");

        let own = leaf_params(&["hr.corp.test"], NOW - 86400, NOW + 86400)
            .self_signed(&key)
            .unwrap();
        let e = validate(&upload(own.pem(), &key, &["hr.corp.test"]), NOW).unwrap_err();
        assert!(matches!(e, CertError::SelfSigned { .. }), "{e}");

        let (chain, _) = issued(&ca, &["hr.corp.test"]);
        let other = KeyPair::generate().unwrap();
        let e = validate(&upload(chain.clone(), &other, &["hr.corp.test"]), NOW).unwrap_err();
        assert!(matches!(e, CertError::KeyMismatch { .. }), "{e}");
        assert_eq!(e.field(), "key_pem");

        let (chain, key2) = issued(&ca, &["*.corp.test"]);
        let e = validate(&upload(chain, &key2, &["a.hr.corp.test"]), NOW).unwrap_err();
        assert!(
            matches!(&e, CertError::HostNotCovered { host, names } if host == "a.hr.corp.test" && names == &["*.corp.test"]),
            "{e}"
        );
        assert_eq!(e.field(), "hosts");
    }

    #[test]
    fn a_chain_out_of_order_or_malformed_input_is_refused_clearly() {
        let ca = ca();
        let other_ca = self::ca();
        let key = KeyPair::generate().unwrap();
        let leaf = leaf_params(&["hr.corp.test"], NOW - 86400, NOW + 86400)
            .signed_by(&key, &ca)
            .unwrap();
        let wrong = format!("{}{}", leaf.pem(), other_ca.pem());
        let e = validate(&upload(wrong, &key, &["hr.corp.test"]), NOW).unwrap_err();
        assert!(matches!(e, CertError::ChainBroken { index: 0, .. }), "{e}");

        let e = validate(&upload(String::new(), &key, &["hr.corp.test"]), NOW).unwrap_err();
        assert!(matches!(e, CertError::NoCertificate), "{e}");
        let e = validate(&upload(leaf.pem(), &key, &[]), NOW).unwrap_err();
        assert!(matches!(e, CertError::NoHosts), "{e}");
        let mut u = upload(leaf.pem(), &key, &["hr.corp.test"]);
        u.key_pem = "not a key".into();
        let e = validate(&u, NOW).unwrap_err();
        assert!(matches!(e, CertError::NoKey), "{e}");
        let big = "A".repeat(MAX_CERT_CHAIN_PEM + 1);
        let e = validate(&upload(big, &key, &["hr.corp.test"]), NOW).unwrap_err();
        assert!(matches!(e, CertError::ChainTooLarge { .. }), "{e}");
        let many = leaf.pem().repeat(MAX_CHAIN_CERTS + 1);
        let e = validate(&upload(many, &key, &["hr.corp.test"]), NOW).unwrap_err();
        assert!(matches!(e, CertError::TooManyCertificates { .. }), "{e}");
    }
}
