//! Property tests over every parser that takes outside input: the config file, scenario files,
//! image references, the log-offset metadata, Build requests (and, in `state/`, journal
//! records). Each runs a bounded number of random cases: no input panics, and refusals are
//! precise and bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use image_builder::api::build_request;
use image_builder::api::image_builder::parse_log_offset;
use image_builder::config::Config;
use image_builder::proto::builder as pb;
use image_builder::proto::contentservice as cs;
use proptest::prelude::*;

/// Text that looks like what each parser takes, and noise.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,300}",
        "[a-z0-9./:@_-]{0,80}",
        "[\\PC\\x00-\\x1f]{0,64}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_text_never_panics(input in text()) {
        let _ = Config::parse(&input);
    }

    #[test]
    fn a_bad_config_value_is_refused_naming_its_key(
        key in prop_oneof![
            Just("/builds/timeout"), Just("/builds/maxConcurrent"), Just("/grpcAddress"),
            Just("/builds/maxLogBytes"), Just("/builds/retention"),
            Just("/builds/allowLocalRepositories"), Just("/registry/timeout"),
            Just("/registry/insecure"), Just("/access/operators"), Just("/tracing/sampleRatio"),
        ],
        value in prop_oneof![Just(serde_json::json!("nope")), Just(serde_json::json!(-1)), Just(serde_json::json!([1]))],
    ) {
        let mut config = serde_json::json!({
            "baseImageRepository": "r/b",
            "workspaceImageRepository": "r/w",
            "tracing": {"otlpEndpoint": "http://127.0.0.1:4318"},
        });
        set(&mut config, key, value);
        let dotted = key.trim_start_matches('/').replace('/', ".");
        match Config::parse(&config.to_string()) {
            Ok(_) => prop_assert!(false, "{dotted} = {} was accepted", config.pointer(key).unwrap()),
            Err(e) => prop_assert!(e.to_string().contains(&dotted), "{e}"),
        }
    }

    /// Valid documents with hostile values at any key the configuration reads, flat keys of
    /// the old layout among them: parsing never panics, and a refusal names a key.
    #[test]
    fn config_documents_with_hostile_values_never_panic(
        entries in proptest::collection::vec((config_key(), hostile_value()), 0..6),
        executor in prop_oneof![Just("local"), Just("kubernetes"), Just("docker")],
    ) {
        let mut config = serde_json::json!({
            "baseImageRepository": "127.0.0.1:5000/base",
            "workspaceImageRepository": "127.0.0.1:5000/ws",
            "executor": {"kind": executor, "namespace": "ns", "builderImage": "r/b:1"},
        });
        if executor == "local" {
            config["executor"] = serde_json::json!({"kind": "local"});
        }
        for (key, value) in entries {
            set(&mut config, key, value);
        }
        if let Err(e) = Config::parse(&config.to_string()) {
            let message = e.to_string();
            prop_assert!(message.starts_with("config key `"), "{message}");
        }
    }

    #[test]
    fn scenario_text_never_panics(input in text()) {
        let _ = image_builder_scenario::model::parse(&input);
    }

    /// Whole scenario documents (JSON is YAML): an environment and steps of every kind, with
    /// fields every step takes and hostile values, so that parsing goes past the document's
    /// shape into each step's fields.
    #[test]
    fn scenario_documents_with_hostile_fields_never_panic(
        name in text(),
        environment in proptest::collection::vec((scenario_field(), hostile_value()), 0..4),
        steps in proptest::collection::vec(
            (scenario_step(), proptest::collection::vec((scenario_field(), hostile_value()), 0..4)),
            0..6,
        ),
    ) {
        let environment: serde_json::Map<String, serde_json::Value> = environment
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let steps: Vec<serde_json::Value> = steps
            .into_iter()
            .map(|(step, fields)| {
                let body: serde_json::Map<String, serde_json::Value> =
                    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                serde_json::json!({ step: body })
            })
            .collect();
        let document = serde_json::json!({
            "name": name,
            "environment": environment,
            "steps": steps,
        });
        if let Err(e) = image_builder_scenario::model::parse(&document.to_string()) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn references_never_panic(input in text()) {
        if let Err(e) = image_builder::registry::parse_reference(&input) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn log_offsets_parse_exactly_or_are_refused_briefly(n in any::<u64>(), junk in proptest::collection::vec(any::<u8>(), 0..5000)) {
        prop_assert_eq!(parse_log_offset(n.to_string().as_bytes()).unwrap(), n);
        prop_assert_eq!(parse_log_offset(format!(" {n} ").as_bytes()).unwrap(), n);
        if let Err(status) = parse_log_offset(&junk) {
            prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
            prop_assert!(status.message().len() <= 1024, "{} bytes", status.message().len());
        }
    }

    #[test]
    fn build_requests_never_panic_and_refusals_are_bounded(
        reference in text(),
        uri in text(),
        target in text(),
        mode in 0i32..6,
        dockerfile in text(),
        context in text(),
        any_of in proptest::collection::vec(text(), 0..80),
        file in any::<bool>(),
    ) {
        let from = if file {
            pb::build_source::From::File(pb::BuildSourceDockerfile {
                source: Some(cs::WorkspaceInitializer {
                    spec: Some(cs::workspace_initializer::Spec::Git(cs::GitInitializer {
                        remote_uri: uri,
                        target_mode: mode,
                        clone_taget: target,
                        ..Default::default()
                    })),
                }),
                dockerfile_version: "1".into(),
                dockerfile_path: dockerfile,
                context_path: context,
            })
        } else {
            pb::build_source::From::Ref(pb::BuildSourceReference { r#ref: reference })
        };
        let request = pb::BuildRequest {
            source: Some(pb::BuildSource { from: Some(from) }),
            auth: Some(pb::BuildRegistryAuth {
                mode: Some(pb::build_registry_auth::Mode::Selective(pb::BuildRegistryAuthSelective {
                    any_of,
                    ..Default::default()
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Err(e) = build_request(&request) {
            let status = tonic::Status::from(e);
            prop_assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", status.message());
            prop_assert!(status.message().len() <= 1100, "{} bytes", status.message().len());
        }
    }
}

/// Sets the JSON pointer `key` of `document`, making the objects on its way.
fn set(document: &mut serde_json::Value, key: &str, value: serde_json::Value) {
    let mut at = document;
    for part in key.trim_start_matches('/').split('/') {
        if !at.is_object() {
            *at = serde_json::json!({});
        }
        at = &mut at[part];
    }
    *at = value;
}

/// Every key the configuration reads, as a JSON pointer, and the flat layout's keys.
fn config_key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/baseImageRepository",
        "/workspaceImageRepository",
        "/pullSecretFile",
        "/enableAdditionalECRAuth",
        "/grpcAddress",
        "/metricsAddress",
        "/dataDir",
        "/tls",
        "/tls/certFile",
        "/tls/clientCAFile",
        "/allowInsecure",
        "/builds",
        "/builds/timeout",
        "/builds/maxConcurrent",
        "/builds/maxLogBytes",
        "/builds/retention",
        "/builds/baseImageKey",
        "/registry",
        "/registry/insecure",
        "/registry/timeout",
        "/registry/retryBudget",
        "/registry/requestsPerHost",
        "/registry/ecrEndpoint",
        "/access/operators",
        "/access/viewers",
        "/access/operatorTokenFile",
        "/tracing",
        "/tracing/otlpEndpoint",
        "/tracing/sampleRatio",
        "/executor/kind",
        "/executor/layerCacheSize",
        "/executor/namespace",
        "/executor/builderImage",
        "/executor/podTimeout",
        "/executor/seccompProfile",
        "/executor/tolerations",
        "/executor/resources",
        "/executor/layerCacheRepository",
        "/buildTimeout",
        "/maxConcurrentBuilds",
        "/insecureRegistries",
        "/registryTimeout",
        "/operators",
        "/layerCacheSize",
        "/retention",
        "/unknownKey",
    ])
}

/// Values of every JSON type, at the edges of what each key takes.
fn hostile_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        prop::sample::select(vec![
            json!(null),
            json!(true),
            json!(0),
            json!(-1),
            json!(u64::MAX),
            json!(1e308),
            json!(f64::MIN_POSITIVE),
            json!(""),
            json!("0s"),
            json!("18446744073709551615s"),
            json!("99999999999 GiB"),
            json!("../../etc/passwd"),
            json!("http://"),
            json!("127.0.0.1:99999"),
            json!("*"),
            json!([]),
            json!([""]),
            json!({}),
            json!({"kind": "kubernetes"}),
            json!([{"key": 1}]),
        ]),
        "[\\PC\\x00-\\x1f]{0,40}".prop_map(serde_json::Value::from),
    ]
}

/// Every step a scenario names, and one it does not.
fn scenario_step() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "build",
        "wait",
        "wait_log",
        "listen",
        "detach",
        "restart",
        "kill",
        "fault",
        "clear_faults",
        "wait_for_point",
        "advance",
        "expect_status",
        "expect_log",
        "expect_listeners",
        "expect_image",
        "expect_top_layer",
        "expect_same_build",
        "expect_builds",
        "expect_concurrency",
        "expect_call",
        "expect_metric",
        "expect_faults_served",
        "expect_service_log",
        "rotate_pull_secret",
        "commit",
        "cancel",
        "follow_logs",
        "expect_followed",
        "retry",
        "expect_state",
        "expect_no_leak",
        "nonsense",
    ])
}

/// The fields scenario steps and environments take.
fn scenario_field() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "as",
        "build",
        "dockerfile",
        "repo",
        "ref",
        "status",
        "timeout_s",
        "count",
        "distinct",
        "point",
        "listener",
        "slow",
        "contains",
        "not_contains",
        "sequence",
        "prefix",
        "at_most",
        "at_least",
        "code",
        "call",
        "message_contains",
        "path",
        "value",
        "values",
        "kind",
        "times",
        "files",
        "force_rebuild",
        "auth",
        "any_of",
        "state",
        "reason",
        "same_as",
        "differs_from",
        "attempt",
        "follower",
        "file",
        "content",
        "context",
        "version",
        "config",
        "base_images",
        "git",
        "proxy",
        "registry_users",
        "pull_secret",
        "ecr",
        "executor",
        "failpoints",
        "payload_mb",
        "user",
        "password",
        "mode",
        "target",
    ])
}
