//! Registries that need no credentials, remembered, so an anonymous request is one round trip.
//!
//! oci-client asks a registry's `/v2/` for its auth challenge before any request it has no
//! token for, and keeps the token it gets; a registry that needs no credentials answers with
//! no challenge, so there is no token to keep and oci-client asks `/v2/` again before every
//! request: each lookup cost two round trips (measured: a cache hit took 1.97× the two HEADs
//! it needs). Here a host's `/v2/` is asked once (again after [`REMEMBER_FOR`]); if it answers
//! 200 with no challenge, anonymous requests to it carry empty Basic credentials, which
//! oci-client keeps as the token, so they go out at once. A registry that does want
//! credentials challenges at `/v2/` and is never put on the list.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use oci_client::Reference;
use oci_client::token_cache::{RegistryOperation, RegistryTokenType};
use parking_lot::Mutex;

use super::Session;

/// How long a host's answer is trusted.
pub(super) const REMEMBER_FOR: Duration = Duration::from_secs(60);

/// Hosts remembered at most; past it the list starts afresh.
const MAX_HOSTS: usize = 1024;

/// What each registry host's `/v2/` said lately.
#[derive(Default)]
pub(super) struct OpenHosts {
    seen: Mutex<HashMap<String, (bool, Instant)>>,
}

impl OpenHosts {
    /// Whether `host` (reached with `scheme`) needs no credentials, asking it at most once
    /// per [`REMEMBER_FOR`], and whether it was open before but is not now (then the empty
    /// credentials kept for it must go). A failed request counts as "not open" (oci-client
    /// then does what it always does).
    pub(super) async fn check(&self, http: &reqwest::Client, scheme: &str, host: &str) -> Openness {
        let before = self.seen.lock().get(host).copied();
        if let Some((open, at)) = before
            && at.elapsed() < REMEMBER_FOR
        {
            return Openness {
                open,
                closed: false,
            };
        }
        let open = match http.get(format!("{scheme}://{host}/v2/")).send().await {
            Ok(answer) => {
                answer.status().is_success()
                    && !answer
                        .headers()
                        .contains_key(reqwest::header::WWW_AUTHENTICATE)
            }
            Err(_) => false,
        };
        let mut seen = self.seen.lock();
        if seen.len() >= MAX_HOSTS {
            seen.clear();
        }
        seen.insert(host.to_owned(), (open, Instant::now()));
        Openness {
            open,
            closed: !open && before.is_some_and(|(was, _)| was),
        }
    }
}

/// What [`OpenHosts::check`] found.
pub(super) struct Openness {
    /// The host needs no credentials.
    pub open: bool,
    /// It did not either, until now.
    pub closed: bool,
}

/// Lets an anonymous `session` send requests for `image` to a registry known to be open
/// without asking `/v2/` first.
pub(super) async fn skip_challenge(session: &Session, image: &Reference) {
    for op in [RegistryOperation::Pull, RegistryOperation::Push] {
        session
            .client
            .tokens
            .insert(
                image,
                op,
                RegistryTokenType::Basic(String::new(), String::new()),
            )
            .await;
    }
}
