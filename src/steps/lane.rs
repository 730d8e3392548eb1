//! Whose work a step does, for the resources steps share (a registry host's requests): a
//! caller waiting for an answer or a build ([`Lane`]), and which caller ([`CallerId`]).

/// Whose work a step does: a caller of the API waiting for its answer, or a build. Shared
/// resources (a registry host's requests) queue each lane on its own, so the work of many
/// builds never delays an answer a caller waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// An API call waits for the answer (a cache check before `running`, ResolveBaseImage).
    Caller,
    /// A build's step.
    Build,
}

/// Which client an API call's work is for (one connection): a caller's requests to a shared resource (a
/// registry host) queue per client and are served in turn, so one client's burst of calls
/// cannot hold up another client's answer. A client is one connection (its peer address);
/// work outside any call, or over a connection without one, is the unnamed client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CallerId(Option<std::net::SocketAddr>);

tokio::task_local! {
    static CALLER: CallerId;
}

impl CallerId {
    /// The client at the other end of a connection.
    pub fn of_peer(peer: Option<std::net::SocketAddr>) -> Self {
        Self(peer)
    }

    /// Runs `work` (an API call's handling) on this client's behalf.
    pub async fn serve<F: std::future::Future>(self, work: F) -> F::Output {
        CALLER.scope(self, work).await
    }

    /// The client the running API call serves (the unnamed one outside any).
    pub fn current() -> Self {
        CALLER.try_with(|client| *client).unwrap_or_default()
    }
}
