//! Single calls and their answers: expected status codes, cancel, retry, the ops API's view.

use super::*;

impl Playback {
    /// Plays one of this module's steps.
    pub(super) async fn call_step(&mut self, step: &Step) -> Check {
        match step {
            Step::ExpectCall {
                call,
                reference,
                dockerfile,
                build_id,
                code,
            } => {
                let want = code.code();
                let mut client = self.client().await?;
                let got = match call {
                    model::CallName::Build => {
                        let source = self
                            .source(reference.as_deref(), dockerfile.as_ref(), None)
                            .ok();
                        let request = pb::BuildRequest {
                            source,
                            ..Default::default()
                        };
                        match client.build(request).await {
                            Ok(mut stream) => loop {
                                match stream.get_mut().message().await {
                                    Ok(Some(_)) => {}
                                    Ok(None) => break tonic::Code::Ok,
                                    Err(e) => break e.code(),
                                }
                            },
                            Err(e) => e.code(),
                        }
                    }
                    model::CallName::ResolveBaseImage => {
                        let r = reference
                            .as_deref()
                            .map(|r| expand(&self.env.vars, r))
                            .unwrap_or_default();
                        code_of(
                            client
                                .resolve_base_image(pb::ResolveBaseImageRequest {
                                    r#ref: r,
                                    ..Default::default()
                                })
                                .await,
                        )
                    }
                    model::CallName::ResolveWorkspaceImage => {
                        let source = self
                            .source(reference.as_deref(), dockerfile.as_ref(), None)
                            .ok();
                        code_of(
                            client
                                .resolve_workspace_image(pb::ResolveWorkspaceImageRequest {
                                    source,
                                    ..Default::default()
                                })
                                .await,
                        )
                    }
                    model::CallName::Logs => {
                        let id = build_id.clone().unwrap_or_default();
                        code_of(
                            client
                                .logs(pb::LogsRequest {
                                    build_id: id,
                                    ..Default::default()
                                })
                                .await,
                        )
                    }
                };
                ensure!(got == want, "{call:?} answered {got:?}, expected {want:?}");
                Ok(())
            }
            Step::Cancel { build, reason } => {
                let id = self.build_id(build).await?;
                self.ops()
                    .await?
                    .cancel_build(image_builder_proto::ops::CancelBuildRequest {
                        build_id: id,
                        reason: reason.clone(),
                    })
                    .await
                    .map_err(|e| format!("CancelBuild: {}", e.message()))?;
                Ok(())
            }
            Step::Retry { build } => {
                let id = self.build_id(build).await?;
                self.ops()
                    .await?
                    .retry_build(image_builder_proto::ops::RetryBuildRequest { build_id: id })
                    .await
                    .map_err(|e| format!("RetryBuild: {}", e.message()))?;
                // The first attempt's stream has ended; follow the build by its journal now.
                let t = self.tracked(build)?;
                t.state.lock().responses.clear();
                Ok(())
            }
            Step::ExpectState {
                build,
                state,
                attempt,
            } => {
                let got = self.ops_view(build).await?;
                ensure!(
                    got.state == state.as_str(),
                    "{build} is {}, expected {}",
                    got.state,
                    state.as_str()
                );
                if let Some(attempt) = attempt {
                    ensure!(
                        got.attempt == *attempt,
                        "{build} is on attempt {}, expected {attempt}",
                        got.attempt
                    );
                }
                Ok(())
            }
            other => Err(format!("{} is not played here", other.kind())),
        }
    }
}

pub(super) fn code_of<T>(result: Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}
