//! TLS on the gRPC port: the server's certificate and, with `clientCAFile`, the clients'
//! (mTLS), re-read when the files change; and the handshakes, off the accept loop.
//!
//! Every new connection is handshaken with the configuration the files hold at that moment
//! (see [`crate::reload`]): cert-manager's rotation is picked up by the next connection, and a
//! half-written rotation (a new certificate with the old key) keeps the last good pair. Open
//! connections keep the certificate they started with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::reload::{ReadError, Reloading};

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections handshaken but not yet taken by the server; past it, accepting pauses.
const READY_CONNECTIONS: usize = 64;

/// The TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file cannot be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A file holds no usable PEM of the expected kind.
    #[error("tls.{key} {path}: {detail}")]
    Pem {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the certificates (a key that does not match the certificate, say).
    #[error("tls: {0}")]
    Rustls(String),
}

/// The server side of TLS: the current rustls configuration, rebuilt when its files change.
pub struct ServerTls {
    config: Reloading<rustls::ServerConfig, Error>,
    mutual: bool,
}

impl ServerTls {
    /// Reads and checks the files `config` names; fails with the file and what is wrong.
    pub fn load(config: &TlsConfig) -> Result<Self, Error> {
        let mut paths = vec![config.cert_file.clone(), config.key_file.clone()];
        paths.extend(config.client_ca_file.clone());
        let named = paths.clone();
        let reloading =
            Reloading::open(paths, move |files: &[Vec<u8>]| server_config(&named, files))?;
        Ok(Self {
            config: reloading,
            mutual: config.client_ca_file.is_some(),
        })
    }

    /// Whether clients must present a certificate signed by `clientCAFile`.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// The acceptor for a new connection, with the files as they are now.
    fn acceptor(&self) -> TlsAcceptor {
        let (config, error) = self.config.current();
        if let Some(e) = error {
            tracing::warn!(error = %e, "keeping the last good TLS certificates");
        }
        TlsAcceptor::from(config)
    }

    /// Accepts connections on `listener` until `shutdown`, handshakes each in a task of its
    /// own (a slow or hostile client never holds up the next `accept`), and yields the
    /// connections whose handshake succeeded. Refused handshakes are logged with the peer's
    /// address and rustls' reason.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (ready, incoming) = tokio::sync::mpsc::channel(READY_CONNECTIONS);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = ready.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: wait instead of spinning.
                        tracing::warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let tls = Arc::clone(&self);
                let ready = ready.clone();
                tokio::spawn(async move {
                    // The files are looked at here, not in the accept loop.
                    if let Some(tls) = handshake(tls.acceptor(), stream, peer).await {
                        let _ = ready.send(Ok(tls)).await;
                    }
                });
            }
        });
        ReceiverStream::new(incoming)
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::info!(%peer, ?HANDSHAKE_TIMEOUT, "TLS handshake not finished in time");
            None
        }
    }
}

/// The rustls configuration of `files` (certificate chain, key, and optionally the client
/// CA), as read from `paths`.
fn server_config(paths: &[PathBuf], files: &[Vec<u8>]) -> Result<rustls::ServerConfig, Error> {
    let certs = certificates("certFile", &paths[0], &files[0])?;
    let key = PrivateKeyDer::from_pem_slice(&files[1]).map_err(|e| Error::Pem {
        key: "keyFile",
        path: paths[1].clone(),
        detail: format!("no private key in PEM form ({e})"),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Rustls(e.to_string()))?;
    let builder = match (paths.get(2), files.get(2)) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("clientCAFile", path, pem)? {
                roots.add(ca).map_err(|e| Error::Pem {
                    key: "clientCAFile",
                    path: path.clone(),
                    detail: format!("not a CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| Error::Rustls(format!("certFile and keyFile do not go together: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn certificates(
    key: &'static str,
    path: &std::path::Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem_error = |detail: String| Error::Pem {
        key,
        path: path.to_owned(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error("holds no certificate".into()));
    }
    Ok(certs)
}
