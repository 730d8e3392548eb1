//! A client per credential: oci-client keeps one credential per registry and client, so
//! clients are never shared between credentials, and callers with the same credential share its
//! connections and tokens.

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::time::Duration;

use super::{Registry, anonymous};
use crate::credentials::Secret;

/// The key of the anonymous client among [`Registry::clients`].
pub(super) const ANONYMOUS: [u8; 32] = [0; 32];

/// Clients kept for credentials, at most.
const MAX_CLIENTS: usize = 256;

/// A client and the credential it presents.
pub(super) struct Session {
    pub(super) client: Client,
    pub(super) auth: RegistryAuth,
    /// The credential's fingerprint ([`ANONYMOUS`] for none).
    pub(super) credential: [u8; 32],
}

impl Registry {
    /// A client for `image`'s registry presenting `secret`: the shared anonymous client, or the
    /// one kept for this credential (oci-client keeps one credential per registry and client,
    /// so clients are never shared between credentials; callers with the same credential share
    /// its connections and tokens).
    pub(super) async fn session(&self, image: &Reference, secret: Option<&Secret>) -> Session {
        match secret {
            None => {
                let host = image.resolve_registry();
                let openness = self
                    .open_hosts
                    .check(&self.http, self.scheme(image), host)
                    .await;
                if openness.closed {
                    // Its empty credentials are kept as tokens: start from a clean client.
                    self.clients.lock().remove(&ANONYMOUS);
                }
                let session = Session {
                    client: self.client(ANONYMOUS),
                    auth: RegistryAuth::Anonymous,
                    credential: ANONYMOUS,
                };
                if openness.open {
                    anonymous::skip_challenge(&session, image).await;
                }
                session
            }
            Some(secret) => {
                let credential = secret.fingerprint();
                let client = self.client(credential);
                let auth = secret.registry_auth();
                client
                    .store_auth_if_needed(image.resolve_registry(), &auth)
                    .await;
                Session {
                    client,
                    auth,
                    credential,
                }
            }
        }
    }

    /// The client kept for a credential's fingerprint (or [`ANONYMOUS`]).
    fn client(&self, fingerprint: [u8; 32]) -> Client {
        let mut clients = self.clients.lock();
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients
            .entry(fingerprint)
            .or_insert_with(|| Client::new(client_config(&self.insecure, self.timeout)))
            .clone()
    }

    /// `http` for the registries configured insecure, else `https`.
    pub(super) fn scheme(&self, reference: &Reference) -> &'static str {
        let host = reference.resolve_registry();
        if self
            .insecure
            .iter()
            .any(|h| h == reference.registry() || h == host)
        {
            "http"
        } else {
            "https"
        }
    }
}

fn client_config(insecure: &[String], timeout: Duration) -> ClientConfig {
    ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure.to_vec()),
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(timeout.min(Duration::from_secs(10))),
        read_timeout: Some(timeout),
        ..Default::default()
    }
}
