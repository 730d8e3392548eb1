//! How the service's own clients (the `builds` CLI and the scenario runner) reach it: the
//! address, TLS (a CA to trust, a client certificate for mTLS) and the operator token the ops
//! service asks for. Files are named, never their contents, so no secret is ever in argv.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::builder::image_builder_client::ImageBuilderClient;
use crate::ops::build_ops_client::BuildOpsClient;

/// TLS material and the operator token, as files (flags or environment variables).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClientOptions {
    /// PEM file of the CA that signed the service's certificate; speaks TLS when given.
    #[arg(long, env = "IMAGE_BUILDER_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of this client's certificate, for a service that asks for one (mTLS).
    #[arg(
        long,
        env = "IMAGE_BUILDER_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key",
        global = true
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --tls-cert.
    #[arg(
        long,
        env = "IMAGE_BUILDER_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert",
        global = true
    )]
    pub tls_key: Option<PathBuf>,
    /// File holding the operator token (the service's access.operatorTokenFile), sent as
    /// `authorization: Bearer …` on ops calls.
    #[arg(
        long,
        env = "IMAGE_BUILDER_TOKEN_FILE",
        value_name = "FILE",
        global = true
    )]
    pub token_file: Option<PathBuf>,
}

/// A client cannot be set up or cannot connect.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A named file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which option named it.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token file holds something that cannot be a header value.
    #[error("the token file {0} does not hold a token (printable ASCII)")]
    Token(PathBuf),
    /// The address is not a URL.
    #[error("{address:?} is not a service address (host:port or https://host:port): {detail}")]
    Address {
        /// What was given.
        address: String,
        /// Why it is not usable.
        detail: String,
    },
    /// The service did not answer.
    #[error("cannot reach image-builder at {url}: {detail}")]
    Connect {
        /// Where it was looked for.
        url: String,
        /// What went wrong, with its causes.
        detail: String,
    },
}

/// Adds the operator token to every call, when there is one.
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// An ops client, with the operator token.
pub type OpsClient = BuildOpsClient<InterceptedService<Channel, BearerToken>>;

/// An mk3 client.
pub type BuilderClient = ImageBuilderClient<Channel>;

/// Connects clients as [`ClientOptions`] say, as often as needed (files are read once).
#[derive(Clone, Debug, Default)]
pub struct Connector {
    tls: Option<ClientTlsConfig>,
    token: BearerToken,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

impl ClientOptions {
    /// Reads the files and makes the connector.
    pub fn connector(&self) -> Result<Connector, Error> {
        let mut tls = None;
        if let Some(ca) = &self.tls_ca {
            let ca = Certificate::from_pem(read("--tls-ca", ca)?);
            tls = Some(ClientTlsConfig::new().ca_certificate(ca));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let identity = Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?);
            tls = Some(
                tls.unwrap_or_else(|| ClientTlsConfig::new().with_native_roots())
                    .identity(identity),
            );
        }
        let token = match &self.token_file {
            None => None,
            Some(path) => {
                let bytes = read("--token-file", path)?;
                let token = String::from_utf8(bytes).map_err(|_| Error::Token(path.clone()))?;
                let value = format!("Bearer {}", token.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| Error::Token(path.clone()))?;
                Some(value)
            }
        };
        Ok(Connector {
            tls,
            token: BearerToken(token),
        })
    }

    /// These options as environment variables, for a child `image-builder` command.
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        [
            ("IMAGE_BUILDER_TLS_CA", &self.tls_ca),
            ("IMAGE_BUILDER_TLS_CERT", &self.tls_cert),
            ("IMAGE_BUILDER_TLS_KEY", &self.tls_key),
            ("IMAGE_BUILDER_TOKEN_FILE", &self.token_file),
        ]
        .into_iter()
        .filter_map(|(name, path)| path.clone().map(|p| (name, p)))
        .collect()
    }
}

impl Connector {
    /// The URL of `address` (`host:port` or a URL): `https` when TLS is set up.
    pub fn url(&self, address: &str) -> String {
        if address.contains("://") {
            address.to_owned()
        } else if self.tls.is_some() {
            format!("https://{address}")
        } else {
            format!("http://{address}")
        }
    }

    /// A channel to the service at `address`.
    pub async fn channel(&self, address: &str) -> Result<Channel, Error> {
        let url = self.url(address);
        let mut endpoint = Endpoint::from_shared(url.clone()).map_err(|e| Error::Address {
            address: address.to_owned(),
            detail: e.to_string(),
        })?;
        if url.starts_with("https://") {
            let tls = self
                .tls
                .clone()
                .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
            endpoint = endpoint.tls_config(tls).map_err(|e| Error::Address {
                address: address.to_owned(),
                detail: e.to_string(),
            })?;
        }
        endpoint.connect().await.map_err(|e| Error::Connect {
            url,
            detail: causes(&e),
        })
    }

    /// An ops client for the service at `address`.
    pub async fn ops(&self, address: &str) -> Result<OpsClient, Error> {
        let channel = self.channel(address).await?;
        Ok(BuildOpsClient::with_interceptor(
            channel,
            self.token.clone(),
        ))
    }

    /// An mk3 client for the service at `address`.
    pub async fn builder(&self, address: &str) -> Result<BuilderClient, Error> {
        Ok(ImageBuilderClient::new(self.channel(address).await?))
    }
}

/// An error and its causes, on one line: tonic's transport errors say little at the top.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
