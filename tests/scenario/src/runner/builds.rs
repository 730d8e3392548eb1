//! Submitting builds, waiting for them and asserting what they made.

use super::logs::drain;
use super::*;

impl Playback {
    /// Plays one of this module's steps.
    pub(super) async fn build_step(&mut self, step: &Step) -> Check {
        match step {
            Step::Build(spec) => self.build(spec).await,
            Step::Wait {
                build,
                status,
                timeout_s,
            } => {
                let want = status.map(proto_status);
                let timeout = Duration::from_secs(timeout_s.unwrap_or(180));
                for name in self.members(build)? {
                    let (got, message) = tokio::time::timeout(timeout, self.final_status(&name))
                        .await
                        .map_err(|_| format!("{name} did not end within {timeout:?}"))??;
                    if let Some(want) = want {
                        ensure!(
                            got == want,
                            "{name} ended {} ({message}), expected {}",
                            got.as_str_name(),
                            want.as_str_name()
                        );
                    }
                }
                Ok(())
            }
            Step::WaitLog { build, contains } => {
                let id = self.build_id(build).await?;
                let mut client = self.client().await?;
                let mut stream = client
                    .logs(pb::LogsRequest {
                        build_id: id,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("Logs: {e}"))?
                    .into_inner();
                let mut seen = Vec::new();
                let needle = expand(&self.env.vars, contains);
                while !String::from_utf8_lossy(&seen).contains(&needle) {
                    match stream.message().await.map_err(|e| format!("Logs: {e}"))? {
                        Some(chunk) => seen.extend(chunk.content),
                        None => return Err(format!("{build}'s log ended without {needle:?}")),
                    }
                }
                Ok(())
            }
            Step::ExpectStatus {
                build,
                status,
                message_contains,
            } => {
                let want = proto_status(*status);
                let (got, message) = self.final_status(build).await?;
                ensure!(
                    got == want,
                    "{build} ended {} ({message}), expected {}",
                    got.as_str_name(),
                    want.as_str_name()
                );
                if let Some(text) = message_contains {
                    let text = expand(&self.env.vars, text);
                    ensure!(
                        message.contains(&text),
                        "{build}'s message {message:?} lacks {text:?}"
                    );
                }
                Ok(())
            }
            Step::ExpectImage {
                build,
                file,
                content,
            } => {
                let reference = self.workspace_ref(build).await?;
                let creds = self.env.registry_creds.as_deref();
                fixtures::skopeo_inspect_as(&reference, creds)
                    .map_err(|e| format!("{reference} is not in the registry: {e}"))?;
                if let Some(file) = file {
                    let bytes = fixtures::read_file_from_image_as(&reference, file, creds)
                        .map_err(|e| format!("{file} in {reference}: {e}"))?;
                    if let Some(content) = content {
                        let got = String::from_utf8_lossy(&bytes);
                        ensure!(
                            got == content.as_str(),
                            "{file} holds {got:?}, expected {content:?}"
                        );
                    }
                }
                Ok(())
            }
            Step::ExpectTopLayer {
                build,
                differs_from,
                same_as,
            } => {
                let (other, same) = match (differs_from, same_as) {
                    (Some(other), None) => (other, false),
                    (None, Some(other)) => (other, true),
                    _ => return Err("name one of differs_from and same_as".into()),
                };
                let mine = self.top_layer(build).await?;
                let theirs = self.top_layer(other).await?;
                if same {
                    ensure!(
                        mine == theirs,
                        "{build} ends in layer {mine}, {other} in {theirs}: expected the same"
                    );
                } else {
                    ensure!(
                        mine != theirs,
                        "{build} and {other} both end in layer {mine}: expected a new one"
                    );
                }
                Ok(())
            }
            Step::ExpectSameBuild { builds } => {
                let mut ids = std::collections::BTreeSet::new();
                for name in builds {
                    for member in self.members(name)? {
                        let id = self.build_id(&member).await?;
                        ids.insert(id);
                    }
                }
                ensure!(ids.len() == 1, "the builds have ids {ids:?}, expected one");
                Ok(())
            }
            Step::ExpectBuilds { count } => {
                let n = self.list_builds().await?.len();
                ensure!(n == *count, "the service has {n} builds, expected {count}");
                Ok(())
            }
            other => Err(format!("{} is not played here", other.kind())),
        }
    }

    /// The last layer of the workspace image build `name` pushed, read by the digest it
    /// journaled.
    async fn top_layer(&self, name: &str) -> Result<String, String> {
        let build = self.ops_view(name).await?;
        ensure!(!build.digest.is_empty(), "{name} journaled no image digest");
        let image: oci_client::Reference = build
            .workspace_ref
            .parse()
            .map_err(|e| format!("{}: {e}", build.workspace_ref))?;
        let reference = format!(
            "{}/{}@{}",
            image.registry(),
            image.repository(),
            build.digest
        );
        let inspected = fixtures::skopeo_inspect_as(&reference, self.env.registry_creds.as_deref())
            .map_err(|e| format!("{reference} is not in the registry: {e}"))?;
        inspected["Layers"]
            .as_array()
            .and_then(|layers| layers.last())
            .and_then(|layer| layer.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("{reference} has no layers: {inspected}"))
    }

    /// Build names behind a build or group name.
    fn members(&self, name: &str) -> Result<Vec<String>, String> {
        if let Some(group) = self.groups.get(name) {
            return Ok(group.clone());
        }
        ensure!(self.builds.contains_key(name), "no build named {name:?}");
        Ok(vec![name.to_owned()])
    }

    pub(super) fn source(
        &self,
        reference: Option<&str>,
        dockerfile: Option<&DockerfileSpec>,
        version: Option<&str>,
    ) -> Result<pb::BuildSource, String> {
        let from = match (reference, dockerfile) {
            (Some(r), None) => pb::build_source::From::Ref(pb::BuildSourceReference {
                r#ref: expand(&self.env.vars, r),
            }),
            (None, Some(d)) => {
                let repo = self
                    .env
                    .repos
                    .get(&d.repo)
                    .ok_or_else(|| format!("no git repository named {:?}", d.repo))?;
                let mode = match d.mode {
                    model::CloneMode::Head => cs::CloneTargetMode::RemoteHead,
                    model::CloneMode::Branch => cs::CloneTargetMode::RemoteBranch,
                    model::CloneMode::Commit => cs::CloneTargetMode::RemoteCommit,
                };
                pb::build_source::From::File(pb::BuildSourceDockerfile {
                    source: Some(cs::WorkspaceInitializer {
                        spec: Some(cs::workspace_initializer::Spec::Git(cs::GitInitializer {
                            remote_uri: self
                                .env
                                .remotes
                                .get(&d.repo)
                                .cloned()
                                .unwrap_or_else(|| repo.uri()),
                            target_mode: mode as i32,
                            clone_taget: expand(&self.env.vars, &d.target),
                            ..Default::default()
                        })),
                    }),
                    dockerfile_version: version
                        .map(str::to_owned)
                        .unwrap_or_else(|| d.version.clone()),
                    dockerfile_path: d.path.clone(),
                    context_path: d.context.clone(),
                })
            }
            (None, None) => return Err("name a source: ref or dockerfile".into()),
            (Some(_), Some(_)) => return Err("give ref or dockerfile, not both".into()),
        };
        Ok(pb::BuildSource { from: Some(from) })
    }

    pub(super) fn auth(&self, spec: &model::AuthSpec) -> pb::BuildRegistryAuth {
        use base64::Engine;
        let mode = if spec.allow_all {
            pb::build_registry_auth::Mode::Total(pb::BuildRegistryAuthTotal { allow_all: true })
        } else {
            pb::build_registry_auth::Mode::Selective(pb::BuildRegistryAuthSelective {
                allow_baserep: spec.allow_baserep,
                allow_workspacerep: spec.allow_workspacerep,
                any_of: spec
                    .any_of
                    .iter()
                    .map(|h| expand(&self.env.vars, h))
                    .collect(),
            })
        };
        let additional = spec
            .additional
            .iter()
            .map(|(host, creds)| {
                (
                    expand(&self.env.vars, host),
                    base64::engine::general_purpose::STANDARD.encode(creds),
                )
            })
            .collect();
        pb::BuildRegistryAuth {
            mode: Some(mode),
            additional,
        }
    }

    pub(super) async fn build(&mut self, spec: &model::BuildStepSpec) -> Check {
        let count = spec.count.unwrap_or(1);
        let mut names = Vec::new();
        for i in 0..count {
            let name = if spec.count.is_some() {
                format!("{}.{i}", spec.name)
            } else {
                spec.name.clone()
            };
            let version = spec.distinct.then(|| format!("v{i}"));
            let request = pb::BuildRequest {
                source: Some(self.source(
                    spec.reference.as_deref(),
                    spec.dockerfile.as_ref(),
                    version.as_deref(),
                )?),
                force_rebuild: spec.force_rebuild,
                triggered_by: "scenario".into(),
                auth: spec.auth.as_ref().map(|a| self.auth(a)),
                ..Default::default()
            };
            let tracked = self.follow(request).await?;
            self.builds.insert(name.clone(), tracked);
            names.push(name);
        }
        if spec.count.is_some() {
            self.groups.insert(spec.name.clone(), names);
        }
        Ok(())
    }

    /// Submits a Build and follows its stream in the background.
    async fn follow(&self, request: pb::BuildRequest) -> Result<Tracked, String> {
        let mut client = self.client().await?;
        let state = Arc::new(Mutex::new(CallState::default()));
        let (ended_tx, ended) = watch::channel(false);
        let (first_tx, first) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            let mut first_tx = Some(first_tx);
            let mut record = |f: &mut dyn FnMut(&mut CallState)| {
                f(&mut shared.lock());
                if let Some(tx) = first_tx.take() {
                    let _ = tx.send(());
                }
            };
            match client.build(request).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(r)) => record(&mut |s| {
                                if let Some(info) = &r.info
                                    && !info.build_id.is_empty()
                                {
                                    s.build_id = info.build_id.clone();
                                }
                                s.responses.push(r.clone());
                            }),
                            Ok(None) => break,
                            Err(e) => {
                                record(&mut |s| s.error = Some(e.clone()));
                                break;
                            }
                        }
                    }
                }
                Err(e) => record(&mut |s| s.error = Some(e.clone())),
            }
            let _ = ended_tx.send(true);
        });
        // The first message (running, or the cache hit) or the call's error arrives before
        // the call counts as submitted, so later steps see its build id.
        let _ = first.await;
        Ok(Tracked { state, ended })
    }

    pub(super) fn tracked(&self, name: &str) -> Result<&Tracked, String> {
        self.builds
            .get(name)
            .ok_or_else(|| format!("no build named {name:?}"))
    }

    /// What the ops API says of build `name` (`GetBuild`).
    pub(super) async fn ops_view(
        &self,
        name: &str,
    ) -> Result<image_builder_proto::ops::Build, String> {
        let id = self.build_id(name).await?;
        Ok(self
            .ops()
            .await?
            .get_build(image_builder_proto::ops::GetBuildRequest { build_id: id })
            .await
            .map_err(|e| format!("GetBuild: {}", e.message()))?
            .into_inner())
    }

    pub(super) async fn build_id(&self, name: &str) -> Result<String, String> {
        let t = self.tracked(name)?;
        let state = t.state.lock();
        if !state.build_id.is_empty() {
            return Ok(state.build_id.clone());
        }
        match &state.error {
            Some(e) => Err(format!(
                "{name}'s Build call failed: {} {}",
                e.code(),
                e.message()
            )),
            None => Err(format!(
                "{name} has no build id (a cache hit starts no build)"
            )),
        }
    }

    /// The final status of a build and its message: from its stream, or (when the stream
    /// broke with the service) from the journal through Logs and ListBuilds.
    async fn final_status(&self, name: &str) -> Result<(pb::BuildStatus, String), String> {
        let t = self.tracked(name)?;
        let mut ended = t.ended.clone();
        ended
            .wait_for(|e| *e)
            .await
            .map_err(|_| "stream task vanished")?;
        let (last, error, id) = {
            let s = t.state.lock();
            (
                s.responses.last().cloned(),
                s.error.clone(),
                s.build_id.clone(),
            )
        };
        if let Some(last) = &last {
            let status = pb::BuildStatus::try_from(last.status).unwrap_or(pb::BuildStatus::Unknown);
            if matches!(
                status,
                pb::BuildStatus::DoneSuccess | pb::BuildStatus::DoneFailure
            ) {
                return Ok((status, last.message.clone()));
            }
        }
        if id.is_empty() {
            return Err(format!("{name}'s Build call failed: {error:?}"));
        }
        // The stream broke (restart): the journal has the answer. Logs ends when the build does.
        self.full_log(name).await?;
        let info = self
            .list_builds()
            .await?
            .into_iter()
            .find(|b| b.build_id == id)
            .ok_or_else(|| format!("build {id} is not listed"))?;
        Ok((
            pb::BuildStatus::try_from(info.status).unwrap_or(pb::BuildStatus::Unknown),
            String::from("(stream ended with the service; status from ListBuilds)"),
        ))
    }

    /// mk3's ListBuilds: the builds the service lists.
    async fn list_builds(&self) -> Result<Vec<pb::BuildInfo>, String> {
        Ok(self
            .client()
            .await?
            .list_builds(pb::ListBuildsRequest {})
            .await
            .map_err(|e| format!("ListBuilds: {e}"))?
            .into_inner()
            .builds)
    }

    pub(super) async fn workspace_ref(&self, name: &str) -> Result<String, String> {
        let t = self.tracked(name)?;
        if let Some(r) = t.state.lock().responses.last() {
            return Ok(r.r#ref.clone());
        }
        let id = self.build_id(name).await?;
        let list = self
            .client()
            .await?
            .list_builds(pb::ListBuildsRequest {})
            .await
            .map_err(|e| format!("ListBuilds: {e}"))?;
        list.into_inner()
            .builds
            .into_iter()
            .find(|b| b.build_id == id)
            .map(|b| b.r#ref)
            .ok_or_else(|| format!("build {id} is not listed"))
    }

    pub(super) async fn full_log(&self, name: &str) -> Result<Vec<u8>, String> {
        let id = self.build_id(name).await?;
        let mut client = self.client().await?;
        let mut request = tonic::Request::new(pb::LogsRequest {
            build_id: id,
            ..Default::default()
        });
        request.metadata_mut().insert(
            LOG_OFFSET_METADATA,
            tonic::metadata::MetadataValue::from_static("0"),
        );
        let stream = client
            .logs(request)
            .await
            .map_err(|e| format!("Logs: {e}"))?
            .into_inner();
        drain(stream).await.map_err(|e| format!("Logs: {e}"))
    }
}

/// The Build status a scenario names.
fn proto_status(name: model::StatusName) -> pb::BuildStatus {
    match name {
        model::StatusName::Unknown => pb::BuildStatus::Unknown,
        model::StatusName::Running => pb::BuildStatus::Running,
        model::StatusName::DoneSuccess => pb::BuildStatus::DoneSuccess,
        model::StatusName::DoneFailure => pb::BuildStatus::DoneFailure,
    }
}
