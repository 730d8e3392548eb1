//! The registry adapter against a real registry: index resolution and copies.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use async_trait::async_trait;
use image_builder::registry::{self, NoCredentials, Registry};
use image_builder::steps::{Progress, Untracked};
use image_builder_testkit::{self as testkit, BaseImage, LocalRegistry};
use oci_client::Reference;
use oci_client::client::{Client, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;

struct Lines(std::sync::Mutex<Vec<String>>);

#[async_trait]
impl Progress for Lines {
    async fn line(&self, text: String) {
        self.0.lock().unwrap().push(text);
    }
}

/// Resolves `from` and copies what it names to `to`, as a build of a reference does; the
/// copy's lines go to `progress`.
async fn resolve_and_copy(
    registry: &Registry,
    from: &str,
    to: &str,
    progress: &dyn Progress,
) -> Result<String, registry::Error> {
    let pinned = registry.resolve(from, &NoCredentials, &Untracked).await?;
    registry.copy(&pinned, to, &NoCredentials, progress).await
}

fn digest_of(reference: &str) -> String {
    testkit::skopeo_inspect(reference).unwrap()["Digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn an_index_resolves_to_its_linux_amd64_manifest() {
    let local = LocalRegistry::start().unwrap();
    let addr = local.addr().to_owned();
    let amd64 = testkit::push_image(
        &BaseImage::busybox(0).unwrap(),
        &addr,
        "multi/busybox:amd64",
    )
    .unwrap();
    let other = testkit::push_image(
        &BaseImage::busybox(1024).unwrap(),
        &addr,
        "multi/busybox:arm64",
    )
    .unwrap();
    let (amd64_digest, other_digest) = (digest_of(&amd64), digest_of(&other));
    // An index listing the arm64 entry first, so picking the first entry would be wrong.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other_digest, "size": 1,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64_digest, "size": 1,
             "platform": {"architecture": "amd64", "os": "linux"}}
        ]
    });
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![addr.clone()]),
        ..Default::default()
    });
    let target: Reference = format!("{addr}/multi/busybox:1").parse().unwrap();
    client
        .store_auth_if_needed(target.registry(), &RegistryAuth::Anonymous)
        .await;
    client
        .push_manifest_raw(
            &target,
            serde_json::to_vec(&index).unwrap(),
            "application/vnd.oci.image.index.v1+json".parse().unwrap(),
        )
        .await
        .unwrap();

    let registry = Registry::new(std::slice::from_ref(&addr));
    let resolved = registry
        .resolve(
            &format!("{addr}/multi/busybox:1"),
            &NoCredentials,
            &Untracked,
        )
        .await
        .unwrap();
    assert_eq!(resolved, format!("{addr}/multi/busybox@{amd64_digest}"));
    // A plain manifest resolves to itself, tag dropped.
    let plain = registry
        .resolve(&amd64, &NoCredentials, &Untracked)
        .await
        .unwrap();
    assert_eq!(plain, format!("{addr}/multi/busybox@{amd64_digest}"));
}

#[tokio::test]
async fn copy_within_a_registry_mounts_and_is_safe_to_repeat() {
    let local = LocalRegistry::start().unwrap();
    let addr = local.addr().to_owned();
    let base =
        testkit::push_image(&BaseImage::busybox(0).unwrap(), &addr, "src/busybox:1").unwrap();
    let registry = Registry::new(std::slice::from_ref(&addr));
    let pinned = registry
        .resolve(&base, &NoCredentials, &Untracked)
        .await
        .unwrap();
    let to = format!("{addr}/dst/workspace:abc");

    let lines = Lines(Default::default());
    let digest = registry
        .copy(&pinned, &to, &NoCredentials, &lines)
        .await
        .unwrap();
    assert_eq!(digest, digest_of(&base));
    assert_eq!(digest_of(&to), digest);
    let first = lines.0.lock().unwrap().clone();
    assert!(
        first.iter().any(|l| l.contains("mounted from src/busybox")),
        "{first:?}"
    );

    // Running the step again in the same process finds every blob present without asking,
    // and succeeds.
    let again = Lines(Default::default());
    assert_eq!(
        registry
            .copy(&pinned, &to, &NoCredentials, &again)
            .await
            .unwrap(),
        digest
    );
    let second = again.0.lock().unwrap().clone();
    assert!(
        second
            .iter()
            .filter(|l| l.contains("already present"))
            .count()
            >= 2,
        "{second:?}"
    );
    // And in a new process (as after a crash), which knows nothing yet: each blob is mounted
    // again, which the registry takes for one already there, and the copy succeeds.
    let restarted = Registry::new(std::slice::from_ref(&addr));
    let after_crash = Lines(Default::default());
    assert_eq!(
        resolve_and_copy(&restarted, &base, &to, &after_crash)
            .await
            .unwrap(),
        digest
    );
    let third = after_crash.0.lock().unwrap().clone();
    assert!(
        third.iter().filter(|l| l.contains("mounted from")).count() >= 2,
        "{third:?}"
    );

    assert_eq!(
        registry
            .lookup(
                &format!("{addr}/dst/workspace:missing"),
                &NoCredentials,
                &Untracked
            )
            .await
            .unwrap(),
        None
    );
    let err = registry
        .resolve(
            &format!("{addr}/src/busybox:missing"),
            &NoCredentials,
            &Untracked,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, registry::Error::NotFound { .. }), "{err}");
    // Nothing listens on port 1: a transient fault, retried until the budget is spent.
    let policy = registry::RetryPolicy {
        budget: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let closed = Registry::with_policy(
        &["127.0.0.1:1".into()],
        policy,
        std::time::Duration::from_secs(1),
    );
    let lines = Lines(Default::default());
    let err = closed
        .resolve("127.0.0.1:1/x:y", &NoCredentials, &lines)
        .await
        .unwrap_err();
    let registry::Error::RetriesExhausted { attempts, .. } = &err else {
        panic!("expected the budget to run out: {err}");
    };
    assert!(*attempts >= 3, "{err}");
    assert!(err.root().is_transient(), "{err}");
    assert!(err.to_string().contains("registry.retryBudget"), "{err}");
    let retries = lines.0.lock().unwrap().clone();
    assert_eq!(
        retries.len() as u32,
        attempts - 1,
        "one line per retry: {retries:?}"
    );
    assert!(retries[0].contains("retrying in"), "{retries:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_lookups_at_once_make_one_request_and_a_moved_tag_is_seen_next() {
    use image_builder_testkit::FaultProxy;

    let local = LocalRegistry::start().unwrap();
    testkit::push_image(
        &BaseImage::busybox(0).unwrap(),
        local.addr(),
        "co/busybox:1",
    )
    .unwrap();
    let proxy = FaultProxy::start(local.addr()).await.unwrap();
    // Every manifest request takes half a second: the lookups below overlap.
    proxy.delay("/manifests/", 500);
    let via = proxy.addr().to_owned();
    let registry = std::sync::Arc::new(Registry::new(std::slice::from_ref(&via)));
    let reference = format!("{via}/co/busybox:1");
    let lookups: Vec<_> = (0..50)
        .map(|_| {
            let registry = std::sync::Arc::clone(&registry);
            let reference = reference.clone();
            tokio::spawn(async move {
                registry
                    .lookup(&reference, &NoCredentials, &Untracked)
                    .await
            })
        })
        .collect();
    let mut digests = std::collections::BTreeSet::new();
    for lookup in lookups {
        digests.insert(lookup.await.unwrap().unwrap().unwrap());
    }
    assert_eq!(digests.len(), 1, "{digests:?}");
    assert_eq!(
        proxy.served(),
        1,
        "50 identical lookups at once made one request"
    );

    // Nothing is cached past the request: the tag moved, the next lookup sees it.
    testkit::push_image(
        &BaseImage::busybox(1024).unwrap(),
        local.addr(),
        "co/busybox:1",
    )
    .unwrap();
    let moved = registry
        .lookup(&reference, &NoCredentials, &Untracked)
        .await
        .unwrap()
        .unwrap();
    assert!(!digests.contains(&moved), "the moved tag is seen");
    assert_eq!(proxy.served(), 2);
}

/// oci-client asks `/v2/` for a challenge before every request it holds no token for, and a
/// registry that needs no credentials gives none to hold: each anonymous lookup was two round
/// trips. Now the host's `/v2/` is asked once and lookups go out alone.
#[tokio::test]
async fn anonymous_lookups_of_an_open_registry_are_one_request_each() {
    use image_builder_testkit::FaultProxy;

    let local = LocalRegistry::start().unwrap();
    testkit::push_image(
        &BaseImage::busybox(0).unwrap(),
        local.addr(),
        "open/busybox:1",
    )
    .unwrap();
    let proxy = FaultProxy::start(local.addr()).await.unwrap();
    let via = proxy.addr().to_owned();
    let registry = Registry::new(std::slice::from_ref(&via));
    let reference = format!("{via}/open/busybox:1");
    for _ in 0..10 {
        registry
            .lookup(&reference, &NoCredentials, &Untracked)
            .await
            .unwrap()
            .unwrap();
    }
    let requests = proxy.requests();
    let pings = requests.iter().filter(|p| *p == "/v2/").count();
    let manifests = requests
        .iter()
        .filter(|p| p.contains("/manifests/"))
        .count();
    assert_eq!(manifests, 10, "{requests:?}");
    assert_eq!(
        pings, 1,
        "one challenge question for ten lookups: {requests:?}"
    );
    // And a registry that wants credentials still gets asked for its challenge: the
    // credential tests (basic and token auth) run against such registries.
}

/// A copy asks the registry only what it does not know: the manifest its resolve read a
/// moment before is not read again, a blob is mounted within the registry in one request
/// (no check first), and a blob the target repository was seen to hold is not asked about
/// again. A blob the registry lost since (deleted here) is found out by the manifest push:
/// the copy mounts the image's blobs again and pushes once more.
#[tokio::test]
async fn a_copy_asks_only_what_it_does_not_know_and_recovers_a_blob_lost_since() {
    use image_builder_testkit::FaultProxy;

    let local = LocalRegistry::start().unwrap();
    // Three images sharing every layer, each with a config of its own.
    testkit::bench::distinct_images(local.addr(), "kn/busybox", 3)
        .await
        .unwrap();
    let (manifest, _) =
        testkit::bench::manifest_of(&reqwest::Client::new(), local.addr(), "kn/busybox", "v0")
            .await
            .unwrap();
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert!(!layers.is_empty());
    // A digest's hex names it in a path and in an (escaped) query alike.
    let hex = |digest: &str| digest.trim_start_matches("sha256:").to_owned();
    let proxy = FaultProxy::start(local.addr()).await.unwrap();
    let via = proxy.addr().to_owned();
    let registry = Registry::new(std::slice::from_ref(&via));

    let mut results = Vec::new();
    for i in 0..3 {
        if i == 2 {
            // The registry loses a shared layer from the workspace repository.
            let gone = reqwest::Client::new()
                .delete(format!(
                    "http://{}/v2/kn/ws/blobs/{}",
                    local.addr(),
                    layers[0]
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(gone.status().as_u16(), 202, "the registry deleted the blob");
        }
        let before = proxy.calls().len();
        let to = format!("{via}/kn/ws:{i}");
        let lines = Lines(Default::default());
        let digest = resolve_and_copy(&registry, &format!("{via}/kn/busybox:v{i}"), &to, &lines)
            .await
            .unwrap();
        let direct = format!("{}/kn/ws:{i}", local.addr());
        assert_eq!(digest_of(&direct), digest, "image {i} arrived whole");
        let calls = proxy.calls()[before..].to_vec();
        let lines = lines.0.lock().unwrap().clone();
        results.push((calls, lines));
    }
    let count = |calls: &[(String, String)], method: &str, part: &str| {
        calls
            .iter()
            .filter(|(m, p)| m == method && p.contains(part))
            .count()
    };
    for (i, (calls, _)) in results.iter().enumerate() {
        assert_eq!(
            count(calls, "GET", "/manifests/"),
            1,
            "image {i}: the resolve's read only, not the copy's: {calls:?}"
        );
    }
    let (first, _) = &results[0];
    for layer in &layers {
        let about: Vec<_> = first
            .iter()
            .filter(|(_, p)| p.contains(&hex(layer)))
            .collect();
        assert_eq!(about.len(), 1, "one request per layer: {first:?}");
        assert!(
            about[0].0 == "POST" && about[0].1.contains("mount="),
            "a mount: {first:?}"
        );
    }
    let (second, _) = &results[1];
    for layer in &layers {
        assert!(
            !second.iter().any(|(_, p)| p.contains(&hex(layer))),
            "a layer copied by the first image is not asked about again: {second:?}"
        );
    }
    assert_eq!(count(second, "PUT", "/manifests/"), 1, "{second:?}");
    let (third, lines) = &results[2];
    assert_eq!(
        count(third, "PUT", "/manifests/"),
        2,
        "refused for the lost blob, then pushed again: {third:?}"
    );
    assert!(
        third
            .iter()
            .any(|(m, p)| m == "POST" && p.contains(&hex(&layers[0]))),
        "the lost layer was mounted again: {third:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("blobs again and pushing once more")),
        "{lines:?}"
    );
}

/// Two copies at once of images that share a layer mount that layer into the workspace
/// repository once: docker-registry 2.8 was seen to lose a blob mounted into one repository
/// many times at once, and the second copy has nothing to ask that the first is not asking.
#[tokio::test(flavor = "multi_thread")]
async fn copies_at_once_of_a_shared_layer_mount_it_once() {
    use image_builder_testkit::FaultProxy;

    let local = LocalRegistry::start().unwrap();
    testkit::bench::distinct_images(local.addr(), "once/busybox", 4)
        .await
        .unwrap();
    let proxy = FaultProxy::start(local.addr()).await.unwrap();
    // Mounts take a while: the copies overlap.
    proxy.delay("/blobs/uploads/", 300);
    let via = proxy.addr().to_owned();
    let registry = std::sync::Arc::new(Registry::new(std::slice::from_ref(&via)));
    let copies: Vec<_> = (0..4)
        .map(|i| {
            let registry = std::sync::Arc::clone(&registry);
            let via = via.clone();
            tokio::spawn(async move {
                let (from, to) = (
                    format!("{via}/once/busybox:v{i}"),
                    format!("{via}/once/ws:{i}"),
                );
                resolve_and_copy(&registry, &from, &to, &Untracked).await
            })
        })
        .collect();
    for copy in copies {
        copy.await.unwrap().unwrap();
    }
    let mounts: Vec<String> = proxy
        .calls()
        .into_iter()
        .filter(|(m, p)| m == "POST" && p.contains("mount="))
        .map(|(_, p)| p)
        .collect();
    // Four configs of their own and the layers they share, each mounted once.
    let distinct: std::collections::BTreeSet<_> = mounts.iter().collect();
    assert_eq!(
        distinct.len(),
        mounts.len(),
        "a blob mounted twice: {mounts:?}"
    );
    assert!(mounts.len() > 4, "{mounts:?}");
}

/// Copies at once of one blob into one repository share one copy, but only its success: when
/// the copy asked first fails (here the blob cannot be read from its source repository), a
/// copy of the same blob from another source tries its own and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_shared_blob_copy_that_fails_leaves_the_others_to_try_their_own() {
    use image_builder_testkit::{Fault, FaultKind, FaultProxy};

    let local = LocalRegistry::start().unwrap();
    testkit::bench::distinct_images(local.addr(), "s1/busybox", 2)
        .await
        .unwrap();
    // A second source repository holding the same layer (and v1's config).
    let addr = local.addr().to_owned();
    let setup = Registry::new(std::slice::from_ref(&addr));
    resolve_and_copy(
        &setup,
        &format!("{addr}/s1/busybox:v1"),
        &format!("{addr}/s2/busybox:v1"),
        &Untracked,
    )
    .await
    .unwrap();

    let (manifest, _) =
        testkit::bench::manifest_of(&reqwest::Client::new(), &addr, "s1/busybox", "v0")
            .await
            .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let hex = layer.trim_start_matches("sha256:");

    let proxy = FaultProxy::start(local.addr()).await.unwrap();
    // The shared layer cannot be taken from s1: its mount from there and its reads there fail,
    // every time (s1's own config copies fine, so s1's copy of the layer ends in an error of
    // its own rather than being dropped with a failed copy).
    for path_contains in [
        format!("{hex}&from=s1"),
        format!("/v2/s1/busybox/blobs/{layer}"),
    ] {
        proxy.inject(Fault {
            path_contains,
            method: None,
            kind: FaultKind::Status {
                code: 500,
                retry_after: None,
            },
            times: None,
        });
    }
    let via = proxy.addr().to_owned();
    let policy = registry::RetryPolicy {
        budget: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let registry = std::sync::Arc::new(Registry::with_policy(
        std::slice::from_ref(&via),
        policy,
        std::time::Duration::from_secs(5),
    ));
    let copy = |source: &'static str, tag: &'static str| {
        let registry = std::sync::Arc::clone(&registry);
        let via = via.clone();
        tokio::spawn(async move {
            let (from, to) = (format!("{via}/{source}"), format!("{via}/ws/busybox:{tag}"));
            resolve_and_copy(&registry, &from, &to, &Untracked).await
        })
    };
    let failing = copy("s1/busybox:v0", "a");
    // The other copy starts once s1's copy asks for the shared layer (a fixed head start was
    // not enough on a loaded machine: s2's copy could take the layer first).
    let asked = format!("/v2/s1/busybox/blobs/{layer}");
    let started = std::time::Instant::now();
    while !proxy
        .requests()
        .iter()
        .any(|r| r.contains(&asked) || r.contains(&format!("{hex}&from=s1")))
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "s1's copy never asked for the layer: {:?}",
            proxy.requests()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let other = copy("s2/busybox:v1", "b");
    assert!(
        failing.await.unwrap().is_err(),
        "the layer cannot be read from s1"
    );
    let digest = other
        .await
        .unwrap()
        .expect("the copy from s2 does not take s1's failure for its own");
    assert_eq!(digest_of(&format!("{addr}/ws/busybox:b")), digest);
    // s2's copy of the layer joined s1's and asked nothing of its own until s1's had failed:
    // its first request for the layer comes after s1's last.
    let requests = proxy.requests();
    let for_layer_from = |source: &str| {
        let (mount, read) = (
            format!("{hex}&from={source}"),
            format!("/v2/{source}/busybox/blobs/{layer}"),
        );
        move |r: &&String| r.contains(&mount) || r.contains(&read)
    };
    let last_from_s1 = requests
        .iter()
        .rposition(|r| for_layer_from("s1")(&r))
        .expect("s1's copy asked for the layer");
    let first_from_s2 = requests
        .iter()
        .position(|r| for_layer_from("s2")(&r))
        .expect("s2's copy asked for the layer once s1's failed");
    assert!(
        first_from_s2 > last_from_s1,
        "s2's copy asked for the layer (request {first_from_s2}) before s1's shared copy ended (request {last_from_s1}): it did not join it\n{requests:#?}"
    );
}
