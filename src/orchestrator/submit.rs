//! Where a request becomes a build: its refs resolved, answered from the cache, joined to the
//! running build of the same workspace image (single flight), or journaled as a new build.

use super::*;
use futures::FutureExt;

use crate::credentials::RequestAuth;

impl Orchestrator {
    /// Resolves a reference to its pinned base ref (`ResolveBaseImage`), with the registry
    /// credentials `request` allows.
    pub async fn resolve_base(
        &self,
        reference: &str,
        request: &RequestAuth,
    ) -> Result<String, Error> {
        if reference.trim().is_empty() {
            return Err(Error::InvalidRequest(
                "ref is empty: name an image, e.g. alpine:3.20".into(),
            ));
        }
        Ok(self
            .inner
            .steps
            .resolver
            .resolve(
                reference,
                &self.inner.credentials.keychain(request),
                &Untracked,
            )
            .await?)
    }

    /// The refs a source resolves to (asks the registry for reference sources; with content
    /// keys, reads a Dockerfile source's content with `git` credentials).
    /// `remote_userinfo` is what the request's git remote URL carried: mk3 hashes the URL as
    /// sent, so it goes back in for the hash (and nowhere else).
    async fn resolve_refs(
        &self,
        source: &BuildSource,
        remote_userinfo: Option<&UrlUserinfo>,
        git: Option<&GitCredentials>,
        request: &RequestAuth,
    ) -> Result<ResolvedRefs, Error> {
        let (base_ref, commit) = match source {
            BuildSource::Reference { reference } => {
                let base_ref = self.resolve_base(reference, request).await?;
                let last_bases = &self.inner.last_bases;
                if last_bases.get(reference).as_ref() != Some(&base_ref) {
                    last_bases.insert(reference.clone(), base_ref.clone());
                }
                (base_ref, None)
            }
            BuildSource::Dockerfile(d) => {
                let remote_uri = remote_userinfo
                    .map_or_else(|| d.remote_uri.clone(), |u| u.restore(&d.remote_uri));
                let key = DockerfileKey {
                    clone_target: &d.clone_target,
                    context_path: &d.context_path,
                    dockerfile_path: &d.dockerfile_path,
                    dockerfile_version: &d.dockerfile_version,
                    remote_uri: &remote_uri,
                };
                match &self.inner.steps.content {
                    None => (
                        refs::dockerfile_base_ref(&self.inner.repos.base, &key),
                        None,
                    ),
                    Some(reader) => {
                        self.check_local_remote(&d.remote_uri)?;
                        let content = reader.content(d, git).await?;
                        let base_ref = refs::content_base_ref(
                            &self.inner.repos.base,
                            &key,
                            &refs::ContentKey {
                                context_tree: &content.context,
                                dockerfile_blob: &content.dockerfile,
                            },
                        );
                        (base_ref, Some(content.commit))
                    }
                }
            }
        };
        let workspace_ref = refs::workspace_ref(&self.inner.repos.workspace, &base_ref);
        Ok(ResolvedRefs {
            base_ref,
            workspace_ref,
            commit,
        })
    }

    /// The refs a source resolves to, and the workspace image's digest if it exists already.
    ///
    /// The workspace ref follows from the resolved base, so the two registry questions come
    /// one after the other; for a reference source resolved before, the workspace image the
    /// last resolve led to is asked about beside the new resolve, and that answer is taken
    /// only when the new resolve names the same base. Every call still resolves its tag (a
    /// moved tag is seen by the next request) and nothing is answered from memory: a moved
    /// tag costs one lookup more, never a wrong answer.
    pub async fn resolve_and_look_up(
        &self,
        source: &BuildSource,
        remote_userinfo: Option<&UrlUserinfo>,
        git: Option<&GitCredentials>,
        request: &RequestAuth,
    ) -> Result<(ResolvedRefs, Option<String>), Error> {
        let resolve = self.resolve_refs(source, remote_userinfo, git, request);
        let early = match source {
            BuildSource::Reference { reference } => self
                .inner
                .last_bases
                .get(reference)
                .map(|base_ref| refs::workspace_ref(&self.inner.repos.workspace, &base_ref)),
            BuildSource::Dockerfile(_) => None,
        };
        let Some(early) = early else {
            let refs = resolve.await?;
            let found = self.lookup_own(&refs.workspace_ref).await?;
            return Ok((refs, found));
        };
        // A failed resolve drops the early lookup; its own failure matters only if taken.
        let looked_up = self.lookup_own(&early).map(Ok);
        let (refs, looked_up) = futures::future::try_join(resolve, looked_up).await?;
        let found = if refs.workspace_ref == early {
            looked_up?
        } else {
            tracing::debug!(
                workspace_ref = %refs.workspace_ref,
                "the base moved since the last resolve: the early lookup is not used"
            );
            self.lookup_own(&refs.workspace_ref).await?
        };
        Ok((refs, found))
    }

    /// Refuses a remote on the service's own machine unless the configuration allows them.
    fn check_local_remote(&self, remote_uri: &str) -> Result<(), Error> {
        if image_builder_state::build::is_local_remote(remote_uri)
            && !self.inner.limits.allow_local_repositories
        {
            return Err(Error::InvalidRequest(
                "source.file.source.git.remote_uri names a repository on the service's own machine; those are refused unless the configuration sets builds.allowLocalRepositories".into(),
            ));
        }
        Ok(())
    }

    /// The manifest digest of an image of the installation's own repositories (a workspace
    /// image, a Dockerfile build's base image), looked up with the installation's credentials
    /// as mk3 does.
    async fn lookup_own(&self, reference: &str) -> Result<Option<String>, Error> {
        Ok(self
            .inner
            .steps
            .cache
            .lookup(
                reference,
                &self.inner.credentials.installation(),
                &Untracked,
            )
            .await?)
    }

    /// Accepts a build request: a cache hit, a join, or a new durable build. `secrets` stay
    /// in memory for the build's steps and are never journaled.
    pub async fn submit(
        &self,
        spec: BuildSpec,
        secrets: BuildSecrets,
        parent: Option<TraceParent>,
    ) -> Result<Submitted, Error> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let mut spec = spec;
        if let BuildSource::Dockerfile(d) = &spec.source {
            self.check_local_remote(&d.remote_uri)?;
        }
        let remote_userinfo = secrets.remote_userinfo.as_ref();
        let (resolved, found) = if spec.force_rebuild {
            let resolve = self.resolve_refs(
                &spec.source,
                remote_userinfo,
                secrets.git.as_ref(),
                &secrets.registry,
            );
            (resolve.await?, None)
        } else {
            let resolve = self.resolve_and_look_up(
                &spec.source,
                remote_userinfo,
                secrets.git.as_ref(),
                &secrets.registry,
            );
            resolve.await?
        };
        let ResolvedRefs {
            base_ref,
            workspace_ref,
            commit,
        } = resolved;
        // A content key names one commit's content: the build checks out that commit.
        if let (BuildSource::Dockerfile(d), Some(commit)) = (&mut spec.source, commit) {
            d.target_mode = image_builder_state::CloneTargetMode::RemoteCommit;
            d.clone_target = commit;
        }
        let checked = std::time::Instant::now();
        if found.is_some() {
            self.inner.metrics.cache_hit();
            return Ok(Submitted::CacheHit {
                base_ref,
                workspace_ref,
            });
        }
        let (flight, leader) = {
            let mut flights = self.lock_flights();
            match flights.get(&workspace_ref) {
                Some(flight) => {
                    flight
                        .joined
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (flight.clone(), None)
                }
                None => {
                    let (created, rx) = watch::channel(false);
                    let flight = Flight::new(BuildId::new(), 1, rx);
                    flights.insert(workspace_ref.clone(), flight.clone());
                    (flight, Some(created))
                }
            }
        };
        let id = flight.id;
        let Some(created) = leader else {
            let mut rx = flight.created;
            rx.wait_for(|c| *c).await.map_err(|_| Error::JoinFailed)?;
            let view = self.inner.journal.view(id)?;
            let created_at_ms = view.map(|v| v.created_at_ms).unwrap_or_default();
            return Ok(Submitted::Running {
                id,
                joined: true,
                base_ref,
                workspace_ref,
                created_at_ms,
            });
        };
        // The durable part runs in a task of its own: a caller that goes away (a deadline, a
        // dropped connection) cannot leave the flight half-made for later callers to join.
        let refs = ResolvedRefs {
            base_ref,
            workspace_ref,
            commit: None,
        };
        let accept = tokio::spawn(self.clone().accept(
            spec,
            secrets,
            refs,
            Accepting {
                flight,
                created,
                checked,
            },
            parent,
        ));
        accept.await.map_err(|e| {
            tracing::error!(error = %e, "accepting a build failed");
            Error::JoinFailed
        })?
    }

    /// Records the new build of `flight` and starts it; its flight is forgotten if that fails.
    async fn accept(
        self,
        spec: BuildSpec,
        secrets: BuildSecrets,
        refs: ResolvedRefs,
        accepting: Accepting,
        parent: Option<TraceParent>,
    ) -> Result<Submitted, Error> {
        let Accepting {
            flight,
            created,
            checked,
        } = accepting;
        let ResolvedRefs {
            base_ref,
            workspace_ref,
            ..
        } = refs;
        let id = flight.id;
        let forget = ForgetUnlessKept::new(&self.inner, &workspace_ref, &flight);
        task::failpoint("submit.create");
        let view = self
            .inner
            .journal
            .create(id, spec, base_ref.clone(), workspace_ref.clone())
            .await?;
        forget.keep();
        self.inner.secrets.lock().insert(id, secrets);
        let _ = created.send(true);
        self.inner.metrics.build_started();
        tracing::info!(build_id = %id, %workspace_ref, "build accepted");
        let created_at_ms = view.created_at_ms;
        self.spawn(
            view,
            task::Start::Accepted { checked },
            flight.cancel.clone(),
            parent,
        );
        Ok(Submitted::Running {
            id,
            joined: false,
            base_ref,
            workspace_ref,
            created_at_ms,
        })
    }
}

/// A build being accepted: its flight, the signal that it is journaled, and when the
/// registry was checked for it (base resolved, workspace image absent).
struct Accepting {
    flight: Flight,
    created: watch::Sender<bool>,
    checked: std::time::Instant,
}
