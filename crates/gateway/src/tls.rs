//! Serving https and wss directly (`--tls-cert`, `--tls-key`).
//!
//! The files are read and checked when the configuration is built, before
//! any port is bound, so a wrong path or a key that does not fit the
//! certificate stops the binary with a clear message. The TLS handshake runs
//! in each connection's own task, under the same deadline as the HTTP
//! request head, so a client that stalls in it holds nothing but its socket.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::Error;

/// A loaded certificate chain and key, ready to accept connections.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    cert: PathBuf,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("cert", &self.cert).finish()
    }
}

impl Tls {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key
    /// (PKCS#8, PKCS#1 or SEC1), and checks that they belong together.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Tls, Error> {
        let bad = |what: &str, path: &Path, why: String| {
            Error::Tls(format!("{what} {}: {why}", path.display()))
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad("certificate", cert, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(bad(
                "certificate",
                cert,
                "no PEM CERTIFICATE block in the file".into(),
            ));
        }
        let private_key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| bad("private key", key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .map_err(|e| {
                Error::Tls(format!(
                    "certificate {} and key {} do not make a usable pair: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
        // hyper serves HTTP/1.1 only, which WebSockets need anyway.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert: cert.to_owned(),
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}
