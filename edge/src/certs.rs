//! Certificates that can be replaced while listeners run: a rustls
//! `ResolvesServerCert` backed by an `ArcSwapOption<CertifiedKey>`.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use portico_agent::pki;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::Error;

/// The certificate a listener presents; swapped on renewal.
#[derive(Debug, Default)]
pub(crate) struct CertStore {
    current: ArcSwapOption<CertifiedKey>,
}

impl CertStore {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(CertStore::default())
    }

    /// Installs a new chain and key; handshakes from now on present it.
    pub(crate) fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), Error> {
        let ck =
            CertifiedKey::from_der(chain, key, &pki::provider()).map_err(|source| Error::Tls {
                what: "certificate",
                source,
            })?;
        self.current.store(Some(Arc::new(ck)));
        Ok(())
    }

    /// Installs a PEM chain and key.
    pub(crate) fn set_pem(&self, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
        self.set(
            pki::parse_certs_pem(cert_pem)?,
            pki::parse_key_pem(key_pem)?,
        )
    }

    pub(crate) fn is_set(&self) -> bool {
        self.current.load().is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// The edge's identity certificate also authenticates it as a client, on
/// the mesh links it dials to other edges.
impl rustls::client::ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

/// The public listener's certificates: the uploaded ones (custom domains,
/// from `EdgeConfig.certificates`) chosen by the handshake's SNI with
/// [`portico_proto::api::pick_certificate`], and, when none covers the
/// name (or there is no SNI), the edge's own public certificate.
#[derive(Debug)]
pub(crate) struct SniCerts {
    uploaded: ArcSwap<Vec<Uploaded>>,
    fallback: Arc<CertStore>,
}

/// One usable uploaded certificate.
#[derive(Debug)]
pub(crate) struct Uploaded {
    pub(crate) id: String,
    pub(crate) names: Vec<String>,
    pub(crate) not_after: u64,
    key: Arc<CertifiedKey>,
}

impl SniCerts {
    pub(crate) fn new(fallback: Arc<CertStore>) -> Arc<Self> {
        Arc::new(SniCerts {
            uploaded: ArcSwap::from_pointee(Vec::new()),
            fallback,
        })
    }

    /// Installs the config's uploaded certificates (at most
    /// `MAX_CERTIFICATES`). One whose PEM or key does not load is logged
    /// and left out; one already loaded (same id) is kept as it is.
    /// Returns what is installed now.
    pub(crate) fn set_uploaded(
        &self,
        certs: &[portico_proto::api::EdgeCertificate],
    ) -> Arc<Vec<Uploaded>> {
        let current = self.uploaded.load_full();
        let unchanged = certs.len() == current.len()
            && certs
                .iter()
                .zip(current.iter())
                .all(|(c, u)| c.id == u.id && c.not_after == u.not_after);
        if unchanged {
            return current;
        }
        let mut next = Vec::new();
        for c in certs.iter().take(portico_proto::api::MAX_CERTIFICATES) {
            if let Some(u) = current.iter().find(|u| u.id == c.id) {
                next.push(Uploaded {
                    id: u.id.clone(),
                    names: c.names.clone(),
                    not_after: c.not_after,
                    key: Arc::clone(&u.key),
                });
                continue;
            }
            let loaded = pki::parse_certs_pem(&c.chain_pem)
                .map_err(Error::from)
                .and_then(|chain| Ok((chain, pki::parse_key_pem(&c.key_pem)?)))
                .and_then(|(chain, key)| {
                    CertifiedKey::from_der(chain, key, &pki::provider()).map_err(|source| {
                        Error::Tls {
                            what: "uploaded certificate",
                            source,
                        }
                    })
                });
            match loaded {
                Ok(key) => next.push(Uploaded {
                    id: c.id.clone(),
                    names: c.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                    not_after: c.not_after,
                    key: Arc::new(key),
                }),
                Err(e) => tracing::warn!(
                    certificate = %c.id,
                    names = ?c.names,
                    error = %portico_agent::error_chain(&e),
                    "uploaded certificate unusable; its hosts get the edge's own certificate"
                ),
            }
        }
        let next = Arc::new(next);
        self.uploaded.store(Arc::clone(&next));
        next
    }

    /// The uploaded certificate for `host`, if one covers it.
    pub(crate) fn pick(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let uploaded = self.uploaded.load();
        let i = portico_proto::api::pick_certificate(
            uploaded.iter().map(|u| (u.names.as_slice(), u.not_after)),
            host,
        )?;
        Some(Arc::clone(&uploaded[i].key))
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .and_then(|sni| self.pick(sni))
            .or_else(|| self.fallback.current.load_full())
    }
}
