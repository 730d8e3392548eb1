//! The registry adapter: resolves references to digests, looks up images, and copies an image
//! from one reference to another, over oci-client. The only module that speaks the OCI
//! distribution protocol.

mod anonymous;
mod attempts;
mod coalesce;
mod error;
mod known;
mod limits;
mod retry;
mod steps;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciDescriptor,
};
use oci_client::secrets::RegistryAuth;

use crate::credentials::Secret;
pub use crate::credentials::{Keychain, NoCredentials};
use crate::steps::Progress;
use crate::telemetry::Metrics;
use oci_client::{Client, Reference};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use attempts::{copy_blob, lookup_once, resolve_once};
use coalesce::{Coalescer, Question};
pub use error::Error;
use limits::DEFAULT_PER_HOST;
use limits::HostLimits;
use retry::Resource;
pub use retry::RetryPolicy;

/// Media types we accept when resolving: single-platform manifests and indexes.
const RESOLVE_MEDIA_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Media types we copy: single-platform manifests (the base ref is always one).
const COPY_MEDIA_TYPES: &[&str] = &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE];

/// Blobs of one image copied at once, at most.
const BLOB_COPIES_AT_ONCE: usize = 4;

/// A registry client for every registry the service talks to.
pub struct Registry {
    http: reqwest::Client,
    insecure: Vec<String>,
    retry: RetryPolicy,
    timeout: Duration,
    metrics: Option<Arc<Metrics>>,
    /// One client per credential (by fingerprint), so connections and registry tokens are
    /// reused across builds; at most [`MAX_CLIENTS`], then started afresh.
    clients: parking_lot::Mutex<HashMap<[u8; 32], Client>>,
    /// Identical lookups and resolutions in flight.
    lookups: Coalescer<Option<String>>,
    resolutions: Coalescer<String>,
    /// Identical blob copies (one blob into one repository) in flight.
    blob_copies: Coalescer<()>,
    /// Requests in flight per host and lane.
    limits: HostLimits,
    /// Registries that need no credentials.
    open_hosts: anonymous::OpenHosts,
    /// Manifests by digest and repositories' blobs, seen lately.
    known: known::KnownContent,
    /// References parsed lately: parsing is a regular-expression match that cost a cache hit
    /// about a sixth of its CPU, and the same few references come back all the time.
    parsed: quick_cache::sync::Cache<String, Reference>,
}

/// Parsed references kept, at most (a few hundred bytes each).
const PARSED_REFERENCES: usize = 1024;

/// The key of the anonymous client among [`Registry::clients`].
const ANONYMOUS: [u8; 32] = [0; 32];

/// Clients kept for credentials, at most.
const MAX_CLIENTS: usize = 256;

/// The parts of a manifest a copy needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestBlobs {
    #[serde(default)]
    media_type: Option<String>,
    config: OciDescriptor,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

/// The parts of an index resolution needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestKind {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<oci_client::manifest::ImageIndexEntry>>,
}

/// Parses a reference the docker way (`alpine` is `docker.io/library/alpine:latest`).
pub fn parse_reference(reference: &str) -> Result<Reference, Error> {
    reference
        .parse()
        .map_err(|e: oci_client::ParseError| Error::BadReference {
            reference: reference.to_owned(),
            detail: e.to_string(),
        })
}

/// `registry/repository@digest`: the pinned form mk3 answers with (of a blob, too: which
/// repository holds it).
fn pinned(reference: &Reference, digest: &str) -> String {
    format!(
        "{}/{}@{}",
        reference.registry(),
        reference.repository(),
        digest
    )
}

impl Registry {
    /// A client that speaks plain HTTP to `insecure_registries` and HTTPS to the rest, with
    /// default retries and timeouts.
    pub fn new(insecure_registries: &[String]) -> Self {
        Self::with_policy(
            insecure_registries,
            RetryPolicy::default(),
            Duration::from_secs(60),
        )
    }

    /// A client with the given retry policy; `timeout` bounds each wait for a registry's
    /// answer (connecting, and each read), so a stalled registry is a transient fault.
    pub fn with_policy(
        insecure_registries: &[String],
        retry: RetryPolicy,
        timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        Self {
            http,
            insecure: insecure_registries.to_vec(),
            retry,
            timeout,
            metrics: None,
            clients: parking_lot::Mutex::new(HashMap::new()),
            lookups: Coalescer::default(),
            resolutions: Coalescer::default(),
            blob_copies: Coalescer::default(),
            limits: HostLimits::new(DEFAULT_PER_HOST),
            open_hosts: anonymous::OpenHosts::default(),
            known: known::KnownContent::default(),
            parsed: quick_cache::sync::Cache::new(PARSED_REFERENCES),
        }
    }

    /// [`parse_reference`], remembering the last [`PARSED_REFERENCES`] references parsed.
    /// What a reference means does not change, so the cache is never stale.
    fn parse(&self, reference: &str) -> Result<Reference, Error> {
        if let Some(parsed) = self.parsed.get(reference) {
            return Ok(parsed);
        }
        let parsed = parse_reference(reference)?;
        self.parsed.insert(reference.to_owned(), parsed.clone());
        Ok(parsed)
    }

    /// Sends at most `per_host` requests at once to one registry host for builds, and as
    /// many for callers waiting on an answer; more wait their turn, first come first served.
    pub fn with_requests_per_host(mut self, per_host: usize) -> Self {
        self.limits = HostLimits::new(per_host);
        self
    }

    /// Counts every registry request in `metrics` (by host, outcome and whether it was a
    /// retry).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A client for `image`'s registry presenting `secret`: the shared anonymous client, or the
    /// one kept for this credential (oci-client keeps one credential per registry and client,
    /// so clients are never shared between credentials; callers with the same credential share
    /// its connections and tokens).
    async fn session(&self, image: &Reference, secret: Option<&Secret>) -> Session {
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
    fn scheme(&self, reference: &Reference) -> &'static str {
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

    /// Resolves a reference to `registry/repository@sha256:…`; an index resolves to its
    /// linux/amd64 manifest. Transient faults are retried. A manifest read on the way is kept
    /// for the copy that may follow.
    pub async fn resolve(
        &self,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, Error> {
        self.ask_manifest(
            &self.resolutions,
            "resolve",
            reference,
            keychain,
            progress,
            resolve_once,
        )
        .await
    }

    /// Runs `op`; if a registry refused a credential that can be renewed (an ECR token),
    /// renews it and runs `op` once more.
    async fn renewing<T, F, Fut>(
        &self,
        keychain: &dyn Keychain,
        hosts: &[&str],
        progress: &dyn Progress,
        op: F,
    ) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        match op().await {
            Err(err @ Error::Unauthorized { .. }) => {
                let mut renewed = false;
                for host in hosts {
                    renewed |= keychain.renew(host).await;
                }
                if !renewed {
                    return Err(err);
                }
                progress
                    .line(format!(
                        "{err}; renewed the registry token and trying once more"
                    ))
                    .await;
                op().await
            }
            other => other,
        }
    }

    /// The manifest digest of an image, or `None` if the registry does not have it.
    /// Transient faults are retried.
    pub async fn lookup(
        &self,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<Option<String>, Error> {
        self.ask_manifest(
            &self.lookups,
            "lookup",
            reference,
            keychain,
            progress,
            lookup_once,
        )
        .await
    }

    /// Asks `once` about `reference`'s manifest with the keychain's pull credential: retried,
    /// shared with identical questions in flight, asked again once after a renewed credential.
    async fn ask_manifest<T, F>(
        &self,
        in_flight: &Coalescer<T>,
        kind: &'static str,
        reference: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
        once: F,
    ) -> Result<T, Error>
    where
        T: Clone,
        F: AsyncFn(&Registry, &Session, &Reference, &str) -> Result<T, Error>,
    {
        let image = self.parse(reference)?;
        self.renewing(keychain, &[image.registry()], progress, || async {
            let secret = keychain.pull(image.registry()).await;
            let question = Question::new(kind, &image.whole(), secret.as_ref(), progress.lane());
            in_flight
                .answer(question, || async {
                    let session = self.session(&image, secret.as_ref()).await;
                    self.retrying(Resource::Manifest(&image), progress, || {
                        once(self, &session, &image, reference)
                    })
                    .await
                })
                .await
        })
        .await
    }

    /// Copies the image `from` (a single-platform manifest) to `to`, then confirms `to` exists
    /// with the same manifest digest, which it returns. `from` is read with the keychain's pull
    /// credential, `to` written with its push credential. Safe to run again after an
    /// interruption: a blob already there is mounted again (one request) or found present.
    pub async fn copy(
        &self,
        from: &str,
        to: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, Error> {
        let source = self.parse(from)?;
        let target = self.parse(to)?;
        let hosts = [source.registry(), target.registry()];
        self.renewing(keychain, &hosts, progress, || {
            self.copy_once(&source, &target, from, to, keychain, progress)
        })
        .await
    }

    async fn copy_once(
        &self,
        source: &Reference,
        target: &Reference,
        from: &str,
        to: &str,
        keychain: &dyn Keychain,
        progress: &dyn Progress,
    ) -> Result<String, Error> {
        let (source, target) = (source.clone(), target.clone());
        let reader = self
            .session(&source, keychain.pull(source.registry()).await.as_ref())
            .await;
        let writer = self
            .session(&target, keychain.push(target.registry()).await.as_ref())
            .await;
        let what = format!("image {from}");
        let (manifest, digest) = match self.known.manifest(reader.credential, &source) {
            Some(kept) => kept,
            None => {
                let (bytes, digest) = self
                    .retrying(Resource::Manifest(&source), progress, || async {
                        reader
                            .client
                            .pull_manifest_raw(&source, &reader.auth, COPY_MEDIA_TYPES)
                            .await
                            .map_err(|e| fail(&source, &what, e))
                    })
                    .await?;
                self.known
                    .keep_manifest(reader.credential, &source, &digest, &bytes);
                (bytes, digest)
            }
        };
        let blobs: ManifestBlobs =
            serde_json::from_slice(&manifest).map_err(|e| Error::Invalid {
                registry: source.registry().to_owned(),
                what: what.clone(),
                detail: format!("manifest does not list config and layers: {e}"),
            })?;
        // Each blob once: a manifest may list one twice, and two copies of one blob into one
        // repository at once are what docker-registry 2.8 was seen to lose.
        let mut all: Vec<&OciDescriptor> = Vec::with_capacity(blobs.layers.len() + 1);
        for blob in std::iter::once(&blobs.config).chain(&blobs.layers) {
            if !all.iter().any(|seen| seen.digest == blob.digest) {
                all.push(blob);
            }
        }
        let ends = CopyEnds {
            source: &source,
            reader: &reader,
            target: &target,
            writer: &writer,
        };
        // Blobs the target repository was seen to hold (an earlier copy put or found them
        // there) are taken as present; the rest are copied.
        let numbered: Vec<(usize, &OciDescriptor)> = all
            .iter()
            .enumerate()
            .map(|(i, blob)| (i + 1, *blob))
            .collect();
        let (trusted, unknown): (Vec<_>, Vec<_>) = numbered
            .iter()
            .partition(|(_, blob)| self.known.holds_blob(&target, &blob.digest));
        for (n, blob) in &trusted {
            progress
                .line(format!(
                    "blob {n}/{} {} already present (seen there before)",
                    all.len(),
                    blob.digest
                ))
                .await;
        }
        self.copy_blobs(&ends, &unknown, all.len(), progress)
            .await?;
        let media_type = blobs
            .media_type
            .unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_owned());
        let content_type: reqwest::header::HeaderValue =
            media_type.parse().map_err(|_| Error::Invalid {
                registry: source.registry().to_owned(),
                what: what.clone(),
                detail: format!("media type {media_type:?} is not a header value"),
            })?;
        let push_manifest = || {
            self.retrying(Resource::Manifest(&target), progress, || async {
                writer
                    .client
                    .push_manifest_raw(&target, manifest.clone(), content_type.clone())
                    .await
                    .map_err(|e| fail(&target, &format!("manifest of {to}"), e))
            })
        };
        let location = match push_manifest().await {
            Ok(location) => location,
            // The registry may have lost a blob since it was seen there or put there
            // (deleted, collected, or lost to a race of its own): the manifest is refused as
            // naming an unknown blob. Copy every blob again, then push once more.
            Err(err) if matches!(err.root(), Error::NotFound { .. } | Error::Invalid { .. }) => {
                progress
                    .line(format!(
                        "{err}; copying the image's {} blobs again and pushing once more",
                        all.len()
                    ))
                    .await;
                for blob in &all {
                    self.known.forget_blob(&target, &blob.digest);
                }
                self.copy_blobs(&ends, &numbered, all.len(), progress)
                    .await?;
                push_manifest().await?
            }
            Err(err) => return Err(err),
        };
        progress
            .line(format!("pushed manifest {digest} to {to}"))
            .await;
        // The registry names what it stored in the manifest's location (distribution does:
        // `/v2/<name>/manifests/<digest>`); only if it does not is it asked once more.
        let found = match digest_in_location(&location) {
            Some(stored) => Some(stored.to_owned()),
            None => {
                self.retrying(Resource::Manifest(&target), progress, || {
                    lookup_once(self, &writer, &target, to)
                })
                .await?
            }
        };
        match found {
            Some(found) if found == digest => Ok(digest),
            Some(found) => Err(Error::Invalid {
                registry: target.registry().to_owned(),
                what: format!("image {to}"),
                detail: format!("after the push it has digest {found}, expected {digest}"),
            }),
            None => Err(Error::NotFound {
                what: format!("image {to} right after pushing it"),
            }),
        }
    }
}

impl Registry {
    /// Copies `blobs` (each with its place among the image's `of` blobs) into the target
    /// repository, a few side by side (each still taking a slot at its host), and remembers
    /// the repository holds each one copied or found.
    async fn copy_blobs(
        &self,
        ends: &CopyEnds<'_>,
        blobs: &[(usize, &OciDescriptor)],
        of: usize,
        progress: &dyn Progress,
    ) -> Result<(), Error> {
        let same_registry = ends.source.registry() == ends.target.registry();
        let mut copies = Vec::with_capacity(blobs.len());
        for &(n, blob) in blobs {
            copies.push(async move {
                let question = Question::by_fingerprint(
                    "copy blob",
                    &pinned(ends.target, &blob.digest),
                    ends.writer.credential,
                    progress.lane(),
                );
                let copy = || {
                    self.retrying(Resource::Blob(ends.source, &blob.digest), progress, || {
                        copy_blob(ends, blob, same_registry, (n, of), progress)
                    })
                };
                let asked = std::sync::atomic::AtomicBool::new(false);
                let shared = self
                    .blob_copies
                    .answer(question, || {
                        asked.store(true, std::sync::atomic::Ordering::Relaxed);
                        copy()
                    })
                    .await;
                match shared {
                    Ok(()) if !asked.load(std::sync::atomic::Ordering::Relaxed) => {
                        progress
                            .line(format!(
                                "blob {n}/{of} {} copied there by another build at the same time",
                                blob.digest
                            ))
                            .await;
                    }
                    Ok(()) => {}
                    Err(err) if asked.load(std::sync::atomic::Ordering::Relaxed) => {
                        return Err(err);
                    }
                    // Another build's copy failed: it read another source, maybe with another
                    // credential. This one tries its own.
                    Err(_) => copy().await?,
                }
                self.known.hold_blob(ends.target, &blob.digest);
                Ok::<_, Error>(())
            });
        }
        futures::stream::iter(copies)
            .buffer_unordered(BLOB_COPIES_AT_ONCE)
            .try_collect::<()>()
            .await
    }
}

/// The digest a manifest's location names as its last path segment, if it names one.
fn digest_in_location(location: &str) -> Option<&str> {
    let last = location.split('?').next()?.rsplit('/').next()?;
    let hex = last.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(last)
}

/// A client and the credential it presents.
struct Session {
    client: Client,
    auth: RegistryAuth,
    /// The credential's fingerprint ([`ANONYMOUS`] for none).
    credential: [u8; 32],
}

/// Both ends of a copy.
struct CopyEnds<'a> {
    source: &'a Reference,
    reader: &'a Session,
    target: &'a Reference,
    writer: &'a Session,
}

fn fail(reference: &Reference, what: &str, err: oci_client::errors::OciDistributionError) -> Error {
    Error::classify(reference.registry(), what, err)
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

#[cfg(test)]
mod tests {
    use super::{Error, Registry, digest_in_location, parse_reference};

    #[test]
    fn a_remembered_reference_reads_as_a_fresh_parse_and_a_bad_one_is_refused_each_time() {
        let registry = Registry::new(&[]);
        for reference in ["alpine", "r.example:5000/a/b:1", "r.example/a@sha256:00"] {
            let fresh = parse_reference(reference).map(|r| r.whole());
            assert_eq!(
                registry.parse(reference).map(|r| r.whole()).ok(),
                fresh.clone().ok()
            );
            assert_eq!(
                registry.parse(reference).map(|r| r.whole()).ok(),
                fresh.ok()
            );
        }
        assert_eq!(
            registry.parse("alpine").unwrap().whole(),
            "docker.io/library/alpine:latest"
        );
        for _ in 0..2 {
            assert!(matches!(
                registry.parse("Not A Reference"),
                Err(Error::BadReference { .. })
            ));
        }
    }

    #[test]
    fn a_manifest_location_names_its_digest_only_when_it_is_one() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            digest_in_location(&format!("http://r:5000/v2/a/b/manifests/{digest}")),
            Some(digest.as_str())
        );
        assert_eq!(
            digest_in_location(&format!("/v2/a/manifests/{digest}?x=1")),
            Some(digest.as_str())
        );
        assert_eq!(digest_in_location("http://r/v2/a/manifests/latest"), None);
        assert_eq!(
            digest_in_location("http://r/v2/a/manifests/sha256:abc"),
            None
        );
    }
}
