//! `tracing`: where OpenTelemetry traces go and how many build attempts are traced.

use serde::Deserialize;

use super::{Error, invalid};

/// The `tracing` group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingConfig {
    /// The OTLP/HTTP (protobuf) collector, e.g. `http://127.0.0.1:4318`; `/v1/traces` is
    /// added to a URL without a path.
    pub otlp_endpoint: String,
    /// The share of build attempts traced, 0.0 to 1.0; a Build request whose `traceparent`
    /// is sampled is always traced. Default 1.0.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
}

fn default_sample_ratio() -> f64 {
    1.0
}

impl TracingConfig {
    pub(super) fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "tracing.sampleRatio",
                "must be between 0.0 and 1.0",
            ));
        }
        let endpoint = &self.otlp_endpoint;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(invalid(
                "tracing.otlpEndpoint",
                format!("{endpoint:?} is not a URL, e.g. \"http://127.0.0.1:4318\""),
            ));
        }
        Ok(())
    }
}
