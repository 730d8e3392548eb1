//! Registry faults through the proxy, and rotating the installation's pull secret.

use super::*;

impl Playback {
    /// Plays one of this module's steps.
    pub(super) async fn fault_step(&mut self, step: &Step) -> Check {
        match step {
            Step::Fault(fault) => {
                let mut fault = fault.clone();
                fault.path_contains = expand(&self.env.vars, &fault.path_contains);
                self.proxy()?.inject(fault);
                Ok(())
            }
            Step::ClearFaults {} => {
                self.proxy()?.clear();
                Ok(())
            }
            Step::ExpectFaultsServed { at_least } => {
                let served = self.proxy()?.served();
                ensure!(
                    served >= *at_least,
                    "the proxy served {served} faults, expected at least {at_least}"
                );
                Ok(())
            }
            Step::RotatePullSecret { password } => {
                let secret = self
                    .env
                    .pull_secret
                    .clone()
                    .ok_or("the scenario has no pull_secret in its environment")?;
                let hosts: Vec<&str> = secret.hosts.iter().map(String::as_str).collect();
                write_pull_secret(
                    &secret.path,
                    &hosts,
                    &model::UserSpec {
                        user: secret.user,
                        password: password.clone(),
                    },
                )
            }
            Step::Commit { repo, files } => {
                let git = self
                    .env
                    .repos
                    .get(repo)
                    .ok_or_else(|| format!("the scenario has no git repository {repo:?}"))?;
                let files: Vec<(String, String)> = files
                    .iter()
                    .map(|(path, content)| (path.clone(), expand(&self.env.vars, content)))
                    .collect();
                let borrowed: Vec<(&str, &str)> = files
                    .iter()
                    .map(|(p, c)| (p.as_str(), c.as_str()))
                    .collect();
                git.commit(&borrowed, "scenario step")
                    .map(drop)
                    .map_err(|e| format!("committing to {repo}: {e}"))
            }
            other => Err(format!("{} is not played here", other.kind())),
        }
    }

    pub(super) fn proxy(&self) -> Result<&dyn FaultInjector, String> {
        self.env
            .faults
            .as_deref()
            .ok_or_else(|| "the scenario has no fault proxy: set environment.proxy".to_owned())
    }
}
