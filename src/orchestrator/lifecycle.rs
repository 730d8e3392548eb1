//! Builds after they started: cancel (journaled first, then stopped), retry (the next attempt of
//! the same build) and retention (`sweep`).

use super::*;

impl Orchestrator {
    /// Cancels a build: the intent is journaled first, then the build's task stops its step
    /// (builder processes, work directory) and journals Cancelled. A restart in between
    /// finishes the cancel. Every client following the build sees it end.
    pub async fn cancel(
        &self,
        id: BuildId,
        reason: String,
        requested_by: String,
    ) -> Result<CancelOutcome, Error> {
        let view = self.view(id)?;
        if view.phase().is_final() {
            return Err(Error::Conflict(format!(
                "build {id} has ended ({}); there is nothing to cancel",
                view.phase()
            )));
        }
        let reason = if reason.trim().is_empty() {
            "cancelled by an operator".to_owned()
        } else {
            reason
        };
        self.inner
            .journal
            .request_cancel(id, reason, requested_by.clone())
            .await
            .map_err(|e| match e {
                journal::Error::Illegal { .. } => {
                    Error::Conflict(format!("build {id} has ended; there is nothing to cancel"))
                }
                other => other.into(),
            })?;
        let flight = self.lock_flights().values().find(|f| f.id == id).map(|f| {
            (
                f.cancel.clone(),
                f.joined.load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        let joined = match flight {
            Some((cancel, joined)) => {
                cancel.cancel();
                joined
            }
            None => 0,
        };
        tracing::info!(build_id = %id, joined, requested_by, "build cancel requested");
        Ok(CancelOutcome { joined })
    }

    /// Runs a failed or cancelled build again, as its next attempt under the same id, with
    /// the installation's credentials only.
    pub async fn retry(&self, id: BuildId, requested_by: String) -> Result<RetryOutcome, Error> {
        let view = self.view(id)?;
        if !matches!(
            view.phase(),
            image_builder_state::Phase::Failed | image_builder_state::Phase::Cancelled
        ) {
            return Err(Error::Conflict(format!(
                "build {id} is {}; only a failed or cancelled build can be retried",
                view.phase()
            )));
        }
        let (created, rx) = watch::channel(false);
        let flight = Flight::new(id, view.attempt + 1, rx);
        {
            let mut flights = self.lock_flights();
            if let Some(other) = flights.get(&view.workspace_ref) {
                return Err(Error::Conflict(format!(
                    "build {} is making the same workspace image right now; follow it instead",
                    other.id
                )));
            }
            flights.insert(view.workspace_ref.clone(), flight.clone());
        }
        // As in `submit`: the durable part finishes even if the caller goes away.
        let retry = tokio::spawn(
            self.clone()
                .start_attempt(view, flight, created, requested_by),
        );
        retry.await.map_err(|e| {
            tracing::error!(error = %e, "retrying a build failed");
            Error::JoinFailed
        })?
    }

    /// Journals the next attempt of the failed or cancelled build `view` and starts it; its
    /// flight is forgotten if that fails.
    async fn start_attempt(
        self,
        view: BuildView,
        flight: Flight,
        created: watch::Sender<bool>,
        requested_by: String,
    ) -> Result<RetryOutcome, Error> {
        let id = view.id;
        let forget = ForgetUnlessKept::new(&self.inner, &view.workspace_ref, &flight);
        let attempt = view.attempt + 1;
        let marker = format!(
            "==== attempt {attempt} of build {id} (retry requested; the log above is of earlier attempts) ====\n"
        );
        task::failpoint("retry.journal");
        self.inner.journal.log(id, marker.into_bytes()).await?;
        let view = self.inner.journal.retry(id, requested_by.clone()).await?;
        tracing::info!(build_id = %id, attempt, requested_by, "build retry requested");
        forget.keep();
        let _ = created.send(true);
        self.inner.metrics.build_started();
        let needs_request_credentials = view.spec.had_request_auth;
        self.spawn(view, task::Start::Retried, flight.cancel.clone(), None);
        Ok(RetryOutcome {
            attempt,
            needs_request_credentials,
        })
    }

    /// Removes finished builds that ended more than `retention` ago, with their logs. Returns
    /// how many. Live builds are never touched; each removal is one small commit, so builds
    /// running meanwhile are not held up.
    pub async fn sweep(&self, retention: Duration) -> Result<usize, Error> {
        let cutoff = image_builder_state::now_ms() - retention.as_millis() as i64;
        let old = self.inner.journal.ended_before(cutoff).await?;
        let mut removed = 0;
        for id in old {
            if self.lock_flights().values().any(|f| f.id == id) {
                continue;
            }
            match self.inner.journal.remove(id).await {
                Ok(()) => removed += 1,
                // Retried meanwhile: it is live again.
                Err(journal::Error::Illegal { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if removed > 0 {
            tracing::info!(removed, ?retention, "removed builds past their retention");
        }
        Ok(removed)
    }
}
