//! The deployment's certificate authority: created on first start
//! (`DIR/ca.pem`, `DIR/ca.key` 0600), reloaded afterwards, and used to sign
//! every certificate. Only the public key of a CSR is used: the CA decides
//! every name, usage and date.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use portico_proto::api::{self, Identity};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use rustls::pki_types::CertificateDer;

use crate::error::Error;
use crate::util;

/// How long the CA itself is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a leaf's validity starts, for clocks that lag.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A loaded CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    sha256: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("sha256", &self.sha256).finish()
    }
}

/// What a certificate is for; the CA derives its names from this alone.
#[derive(Debug, Clone)]
pub enum Profile {
    /// A connector (client auth) or edge (client and server auth, plus the
    /// edge's DNS name) tunnel certificate.
    Agent(Identity),
    /// The router API's server certificate.
    RouterServer,
    /// An edge's public certificate for `*.<apps_domain>` and the domain,
    /// plus `*.<suffix>` for each of `wildcards` (the suffixes of wildcard
    /// apps deeper than the apps domain, such as `corp.<apps_domain>`).
    PublicWildcard {
        apps_domain: String,
        wildcards: Vec<String>,
    },
}

/// A signed certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// Lower-case hex serial.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
}

/// Why a CSR cannot be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    #[error("not a valid, self-signed PKCS#10 CSR in PEM")]
    Invalid(#[source] rcgen::Error),
    #[error("signing failed")]
    Sign(#[source] rcgen::Error),
    #[error("random number generator failed")]
    Random,
}

impl Ca {
    /// Loads the CA from `dir`, or creates it there when neither file
    /// exists. Refuses to replace half a CA.
    pub fn load_or_create(dir: &Path) -> Result<Ca, Error> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Ca::load(&cert_path, &key_path),
            (false, false) => Ca::create(&cert_path, &key_path),
            (true, false) => Err(Error::CaIncomplete {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(Error::CaIncomplete {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, Error> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| Error::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| Error::Ca {
            what: "reading ca.key",
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| Error::Ca {
            what: "reading ca.pem",
            source,
        })?;
        let cert_der = pem_to_der(&cert_pem).ok_or(Error::Ca {
            what: "reading ca.pem",
            source: rcgen::Error::CouldNotParseCertificate,
        })?;
        tracing::info!(path = %cert_path.display(), "loaded CA");
        Ok(Ca::assemble(issuer, cert_pem, cert_der))
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<Ca, Error> {
        let key = KeyPair::generate().map_err(|source| Error::Ca {
            what: "generating the CA key",
            source,
        })?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Portico CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Portico");
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        params.serial_number = Some(serial().map_err(|_| Error::Random)?.0);
        let key_pem = key.serialize_pem();
        let certified = CertifiedIssuer::self_signed(params, key).map_err(|source| Error::Ca {
            what: "self-signing the CA",
            source,
        })?;
        let cert_pem = certified.pem();
        let cert_der = certified.der().clone();
        write_file(key_path, key_pem.as_bytes(), 0o600)?;
        write_file(cert_path, cert_pem.as_bytes(), 0o644)?;
        // Reload from what was written, so a fresh CA and a reloaded one are
        // the same thing.
        let issuer = Issuer::from_ca_cert_pem(
            &cert_pem,
            KeyPair::from_pem(&key_pem).map_err(|source| Error::Ca {
                what: "reading ca.key",
                source,
            })?,
        )
        .map_err(|source| Error::Ca {
            what: "reading ca.pem",
            source,
        })?;
        tracing::info!(path = %cert_path.display(), "created a new CA");
        Ok(Ca::assemble(issuer, cert_pem, cert_der))
    }

    fn assemble(
        issuer: Issuer<'static, KeyPair>,
        cert_pem: String,
        cert_der: CertificateDer<'static>,
    ) -> Ca {
        let sha256 = util::sha256_hex(cert_der.as_ref());
        Ca {
            issuer,
            cert_pem,
            cert_der,
            sha256,
        }
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Lower-case hex SHA-256 of the CA certificate (DER): what join tokens pin.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Signs a certificate for the public key of `csr_pem` (whose signature
    /// is checked); everything else in the CSR is ignored.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        profile: &Profile,
        ttl: Duration,
    ) -> Result<Issued, CsrError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CsrError::Invalid)?;
        self.sign(&csr.public_key, profile, ttl)
    }

    /// Signs a certificate for `public_key`.
    pub fn sign(
        &self,
        public_key: &impl PublicKeyData,
        profile: &Profile,
        ttl: Duration,
    ) -> Result<Issued, CsrError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let dns = |name: String| Ia5String::try_from(name).map(SanType::DnsName);
        let uri = |name: String| Ia5String::try_from(name).map(SanType::URI);
        let sans: Vec<SanType> = match profile {
            Profile::Agent(identity) => {
                let mut sans: Vec<SanType> = identity
                    .to_uris()
                    .into_iter()
                    .map(uri)
                    .collect::<Result<_, _>>()?;
                match identity {
                    Identity::Connector { id, .. } => {
                        params
                            .distinguished_name
                            .push(DnType::CommonName, id.as_str());
                        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                    }
                    Identity::Edge { id, .. } => {
                        params
                            .distinguished_name
                            .push(DnType::CommonName, id.as_str());
                        sans.push(dns(api::edge_server_name(id))?);
                        params.extended_key_usages = vec![
                            ExtendedKeyUsagePurpose::ServerAuth,
                            ExtendedKeyUsagePurpose::ClientAuth,
                        ];
                    }
                }
                sans
            }
            Profile::RouterServer => {
                params
                    .distinguished_name
                    .push(DnType::CommonName, api::ROUTER_SERVER_NAME);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                vec![
                    dns(api::ROUTER_SERVER_NAME.to_owned())?,
                    dns("localhost".to_owned())?,
                ]
            }
            Profile::PublicWildcard {
                apps_domain,
                wildcards,
            } => {
                params
                    .distinguished_name
                    .push(DnType::CommonName, apps_domain.as_str());
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                let mut sans = vec![dns(format!("*.{apps_domain}"))?, dns(apps_domain.clone())?];
                for suffix in wildcards {
                    sans.push(dns(format!("*.{suffix}"))?);
                }
                sans
            }
        };
        params.subject_alt_names = sans;
        let now = SystemTime::now();
        let not_after = now + ttl;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let (serial_number, serial) = serial()?;
        params.serial_number = Some(serial_number);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(CsrError::Sign)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            serial,
            not_after: not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }
}

impl From<rcgen::Error> for CsrError {
    fn from(e: rcgen::Error) -> Self {
        CsrError::Sign(e)
    }
}

/// A random positive 16-byte serial and its hex form.
fn serial() -> Result<(SerialNumber, String), CsrError> {
    let mut bytes = util::random_bytes::<16>().map_err(|_| CsrError::Random)?;
    // Positive and exactly 16 bytes in DER: clear the sign bit, keep the
    // first byte non-zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok((SerialNumber::from_slice(&bytes), util::hex(&bytes)))
}

fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

/// Writes `bytes` to `path` with `mode`, atomically (temp file + rename).
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let tmp: PathBuf = path.with_extension("tmp");
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    file.write_all(bytes).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    Ok(())
}
