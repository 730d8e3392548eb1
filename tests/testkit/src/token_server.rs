//! A registry token server (the `WWW-Authenticate: Bearer` flow of the distribution spec): it
//! checks basic auth and issues an ES256 JWT for the requested scopes, signed by a
//! self-signed certificate whose bundle the registry trusts (`auth.token` in its config).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{Error, Result};

/// The `service` the registry names in its challenge.
pub const TOKEN_SERVICE: &str = "image-builder-tests";
/// The issuer the registry expects in tokens.
pub const TOKEN_ISSUER: &str = "image-builder-test-issuer";

struct Issuer {
    basic: String,
    key: jsonwebtoken::EncodingKey,
    x5c: String,
}

/// A running token server; stops when dropped.
pub struct TokenServer {
    realm: String,
    bundle_pem: String,
    stop: CancellationToken,
}

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    service: String,
    #[serde(default)]
    scope: Option<String>,
}

impl TokenServer {
    /// Starts a token server that gives tokens to `user` with `password` only.
    pub async fn start(user: &str, password: &str) -> Result<Self> {
        let failed = |e: &dyn std::fmt::Display| Error::Command {
            command: "token server".into(),
            detail: e.to_string(),
        };
        let cert = rcgen::generate_simple_self_signed(vec!["image-builder-test-issuer".to_owned()])
            .map_err(|e| failed(&e))?;
        let key =
            jsonwebtoken::EncodingKey::from_ec_pem(cert.signing_key.serialize_pem().as_bytes())
                .map_err(|e| failed(&e))?;
        let issuer = Arc::new(Issuer {
            basic: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
            key,
            x5c: base64::engine::general_purpose::STANDARD.encode(cert.cert.der()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let realm = format!("http://{}/token", listener.local_addr()?);
        let stop = CancellationToken::new();
        let app = axum::Router::new()
            .route("/token", axum::routing::get(token))
            .with_state(issuer);
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await;
        });
        Ok(Self {
            realm,
            bundle_pem: cert.cert.pem(),
            stop,
        })
    }

    /// The token endpoint, for the registry's `realm`.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The certificate the registry must trust (`rootcertbundle`).
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn token(
    State(issuer): State<Arc<Issuer>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> axum::response::Response {
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == issuer.basic);
    if !authorized {
        return (StatusCode::UNAUTHORIZED, "credentials required").into_response();
    }
    let access: Vec<serde_json::Value> = query
        .scope
        .iter()
        .flat_map(|s| s.split(' '))
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": "image-builder",
        "aud": query.service,
        "exp": now + 300,
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": uuid::Uuid::now_v7().to_string(),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.x5c = Some(vec![issuer.x5c.clone()]);
    match jsonwebtoken::encode(&header, &claims, &issuer.key) {
        Ok(jwt) => {
            axum::Json(serde_json::json!({"token": jwt, "access_token": jwt, "expires_in": 300}))
                .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
