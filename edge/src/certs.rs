//! Certificates that can be replaced while listeners run: a rustls
//! `ResolvesServerCert` backed by an `ArcSwapOption<CertifiedKey>`.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
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
