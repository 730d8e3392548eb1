//! A fault-injecting HTTP proxy in front of a registry: forwards every request unchanged
//! (streaming bodies both ways, keeping upload locations pointed at the proxy) unless a fault
//! rule matches, in which case it answers with an HTTP error (optionally with `Retry-After`),
//! resets the connection in the middle of a body, adds latency, or stalls.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Response, StatusCode};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Result;
pub use image_builder_scenario::{Fault, FaultKind};

struct Rule {
    fault: Fault,
    left: Option<u32>,
}

struct Shared {
    upstream: String,
    rules: Mutex<Vec<Rule>>,
    served: AtomicU64,
    /// Every request's arrival and answer, in order.
    events: Mutex<Vec<Event>>,
    client: reqwest::Client,
}

/// What happened to a request at the proxy: its method, and its path with the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The request came in.
    Arrived(String, String),
    /// Its answer's head went out (faults, latency included).
    Answered(String, String),
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Starts a proxy for the registry at `upstream` (`host:port`, plain HTTP).
    pub async fn start(upstream: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            rules: Mutex::new(Vec::new()),
            served: AtomicU64::new(0),
            events: Mutex::new(Vec::new()),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
        });
        let stop = CancellationToken::new();
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&shared));
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await;
        });
        Ok(Self { addr, shared, stop })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Adds a fault rule (rules are tried in the order added).
    pub fn inject(&self, fault: Fault) {
        let left = fault.times;
        self.shared.rules.lock().push(Rule { fault, left });
    }

    /// Delays every request whose path contains `path_contains` by `ms` before it goes on
    /// (a registry further away, or one slow at that kind of request).
    pub fn delay(&self, path_contains: &str, ms: u64) {
        self.inject(Fault {
            path_contains: path_contains.to_owned(),
            method: None,
            kind: FaultKind::Latency { ms },
            times: None,
        });
    }

    /// Removes every fault rule.
    pub fn clear(&self) {
        self.shared.rules.lock().clear();
    }

    /// The path (with the query) of every request forwarded or answered so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.calls().into_iter().map(|(_, path)| path).collect()
    }

    /// The method and path (with the query) of every request forwarded or answered so far,
    /// in order.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Arrived(method, path) => Some((method, path)),
                Event::Answered(..) => None,
            })
            .collect()
    }

    /// Every request's arrival and answer so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.shared.events.lock().clone()
    }

    /// How many requests got a fault so far.
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Shared {
    /// The fault for this request, if a rule matches and has uses left.
    fn fault_for(&self, method: &str, path: &str) -> Option<FaultKind> {
        let mut rules = self.rules.lock();
        let rule = rules.iter_mut().find(|r| {
            path.contains(&r.fault.path_contains)
                && r.fault
                    .method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && r.left != Some(0)
        })?;
        if let Some(left) = rule.left.as_mut() {
            *left -= 1;
        }
        self.served.fetch_add(1, Ordering::SeqCst);
        Some(rule.fault.kind.clone())
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response<Body> {
    let method = request.method().as_str().to_owned();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    shared
        .events
        .lock()
        .push(Event::Arrived(method.clone(), path.clone()));
    let response = answer(&shared, request, &method, &path).await;
    shared.events.lock().push(Event::Answered(method, path));
    response
}

/// Forwards `request`, or answers it with the fault a rule names.
async fn answer(shared: &Shared, request: Request, method: &str, path: &str) -> Response<Body> {
    let fault = shared.fault_for(method, path);
    let mut cut_after = None;
    match fault {
        Some(FaultKind::Status { code, retry_after }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = if code == 429 {
                r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"injected by the fault proxy"}]}"#
            } else if code == 401 {
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"injected by the fault proxy"}]}"#
            } else {
                "injected by the fault proxy"
            };
            let mut response = plain(status, body);
            if let Some(seconds) = retry_after
                && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
            {
                response.headers_mut().insert("retry-after", value);
            }
            return response;
        }
        Some(FaultKind::Stall) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return plain(StatusCode::GATEWAY_TIMEOUT, "stalled");
        }
        Some(FaultKind::Latency { ms }) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Some(FaultKind::ResetMidBody { after_bytes }) => cut_after = Some(after_bytes),
        None => {}
    }

    let url = format!("http://{}{path}", shared.upstream);
    let proxy_host = request.headers().get("host").cloned();
    let mut upstream = shared.client.request(request.method().clone(), &url);
    for (name, value) in request.headers() {
        if name != "host" {
            upstream = upstream.header(name, value);
        }
    }
    if let Some(host) = proxy_host {
        // The registry builds upload locations from these: keep clients talking to us.
        upstream = upstream.header("x-forwarded-host", host);
    }
    let body = reqwest::Body::wrap_stream(request.into_body().into_data_stream());
    let Ok(answer) = upstream.body(body).send().await else {
        return plain(StatusCode::BAD_GATEWAY, "upstream unreachable");
    };
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        response = response.header(name, value);
    }
    let stream = answer.bytes_stream();
    let body = match cut_after {
        None => Body::from_stream(stream),
        Some(limit) => {
            let mut sent = 0u64;
            Body::from_stream(stream.map(move |chunk| {
                let chunk = chunk.map_err(std::io::Error::other)?;
                if sent + chunk.len() as u64 > limit {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "reset by the fault proxy",
                    ));
                }
                sent += chunk.len() as u64;
                Ok(chunk)
            }))
        }
    };
    response
        .body(body)
        .unwrap_or_else(|_| plain(StatusCode::BAD_GATEWAY, "bad upstream answer"))
}
