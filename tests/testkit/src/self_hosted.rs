//! The self-hosted scenario setup: everything a scenario names is started here, on loopback:
//! a registry (with the scenario's users, or the ECR token moto hands out), the fault proxy,
//! moto, base images, git repositories, and the service binary itself, which the runner may
//! stop, kill and start again.

use image_builder_scenario::Fault;
use image_builder_scenario::environment::{
    Environment, FaultInjector, PullSecret, ServiceProcess, Setup, first_user, make_fixtures,
    write_pull_secret,
};
use image_builder_scenario::model::{self, ProxyMode};

use crate::{FaultProxy, GitHttpServer, LocalRegistry, MotoServer, Service};

/// The ECR host name ECR scenarios reach their registry by (moto's default account).
const ECR_NAME: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";

/// Starts every part of a scenario's environment, the service binary at `binary` included.
#[derive(Debug, Clone)]
pub struct SelfHosted {
    /// The `image-builder` binary.
    pub binary: std::path::PathBuf,
}

/// The service, with the environment it gets at every start beside `FAILPOINTS`.
struct ControlledService {
    service: Service,
    base_env: Vec<(String, String)>,
}

impl ServiceProcess for ControlledService {
    fn stop(&mut self) {
        self.service.stop();
    }

    fn kill(&mut self) {
        self.service.kill();
    }

    fn start(&mut self, failpoints: &str) -> Result<String, String> {
        let mut env: Vec<(&str, &str)> = self
            .base_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.push(("FAILPOINTS", failpoints));
        self.service.set_env(&env);
        self.service
            .kill_and_restart()
            .map_err(|e| format!("restart: {e}"))?;
        Ok(self.service.grpc_url())
    }

    fn log(&self) -> String {
        self.service.log()
    }

    fn metrics_url(&self) -> String {
        self.service.metrics_url()
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.service.data_dir()
    }
}

impl FaultInjector for FaultProxy {
    fn inject(&self, fault: Fault) {
        FaultProxy::inject(self, fault);
    }

    fn clear(&self) {
        FaultProxy::clear(self);
    }

    fn served(&self) -> u64 {
        FaultProxy::served(self)
    }
}

#[async_trait::async_trait]
impl Setup for SelfHosted {
    async fn set_up(&self, env: &model::Environment) -> Result<Environment, String> {
        let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        let ecr_token = MotoServer::token_password();
        let moto = if env.ecr {
            crate::alias_loopback(ECR_NAME)
                .map_err(|e| format!("alias {ECR_NAME} to loopback in /etc/hosts: {e}"))?;
            Some(MotoServer::start().map_err(|e| format!("moto: {e}"))?)
        } else {
            None
        };
        let mut users: Vec<(&str, &str)> = env
            .registry_users
            .iter()
            .map(|u| (u.user.as_str(), u.password.as_str()))
            .collect();
        if env.ecr {
            users.insert(0, ("AWS", ecr_token.as_str()));
        }
        let on_cluster = env.executor == model::ExecutorKind::Kubernetes;
        let cluster = if on_cluster {
            Some(
                tokio::task::spawn_blocking(crate::cluster::shared)
                    .await
                    .map_err(|e| format!("cluster: {e}"))?
                    .map_err(|e| format!("cluster: {e:#}"))?,
            )
        } else {
            None
        };
        // Builder pods have no host network: they reach a registry on the pod gateway.
        let registry = if on_cluster {
            LocalRegistry::start_for_pods(&users)
        } else {
            LocalRegistry::start_with_users(&users)
        }
        .map_err(|e| format!("registry: {e}"))?;
        let direct_addr = registry.addr().to_owned();
        keep.push(Box::new(registry));
        let proxy = match env.proxy {
            ProxyMode::None => None,
            _ => Some(
                FaultProxy::start(&direct_addr)
                    .await
                    .map_err(|e| format!("fault proxy: {e}"))?,
            ),
        };
        let mut proxy_addr = proxy
            .as_ref()
            .map(|p| p.addr().to_owned())
            .unwrap_or_default();
        // Under ECR, the service reaches the registry (or the proxy) by an ECR host name.
        let mut registry_addr = direct_addr.clone();
        if moto.is_some() {
            let port = |addr: &str| addr.rsplit(':').next().unwrap_or_default().to_owned();
            registry_addr = format!("{ECR_NAME}:{}", port(&registry_addr));
            if !proxy_addr.is_empty() {
                proxy_addr = format!("{ECR_NAME}:{}", port(&proxy_addr));
            }
        }
        let via_base = if proxy.is_some() {
            proxy_addr.clone()
        } else {
            registry_addr.clone()
        };
        let via_workspace = if env.proxy == ProxyMode::All {
            &proxy_addr
        } else {
            &registry_addr
        };
        let creds = if env.ecr {
            Some(format!("AWS:{ecr_token}"))
        } else {
            first_user(env)
        };
        let vars = vec![
            ("${registry}".to_owned(), registry_addr.clone()),
            ("${proxy}".to_owned(), proxy_addr.clone()),
        ];
        let (vars, repos) = make_fixtures(env, vars, &direct_addr, &via_base, creds.as_deref())?;

        let secrets_dir = tempfile::Builder::new()
            .prefix("scenario-secrets-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let mut config = serde_json::json!({
            "baseImageRepository": format!("{via_workspace}/base-images"),
            "workspaceImageRepository": format!("{via_workspace}/workspace"),
            "registry": {"insecure": [registry_addr, proxy_addr]},
            // The environment's git repositories live on this machine.
            "builds": {"allowLocalRepositories": true},
        });
        if proxy_addr.is_empty() {
            config["registry"]["insecure"] = serde_json::json!([registry_addr]);
        }
        let hosts = vec![registry_addr.clone(), proxy_addr.clone()];
        let pull_secret = match &env.pull_secret {
            Some(user) => {
                let path = secrets_dir.path().join("pull-secret.json");
                let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
                write_pull_secret(&path, &names, user)?;
                config["pullSecretFile"] = path.display().to_string().into();
                Some(PullSecret {
                    path,
                    user: user.user.clone(),
                    hosts,
                })
            }
            None => None,
        };
        let mut base_env: Vec<(&str, &str)> = Vec::new();
        let mut kubeconfig: Option<String> = None;
        if let Some(moto) = &moto {
            config["enableAdditionalECRAuth"] = true.into();
            config["registry"]["ecrEndpoint"] = moto.endpoint().into();
            base_env.extend([
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ]);
        }
        let mut remotes = std::collections::HashMap::new();
        if let Some(cluster) = cluster {
            let (namespace, mut executor) = {
                let cluster = cluster.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let namespace = cluster.create_namespace("scenario")?;
                    let executor = cluster.executor_config(&namespace)?;
                    Ok((namespace, executor))
                })
                .await
                .map_err(|e| format!("cluster: {e}"))?
                .map_err(|e| format!("cluster: {e:#}"))?
            };
            // Builder pods share their steps through a layer cache repository of this
            // scenario's own, as an installation's pods do.
            executor["layerCacheRepository"] =
                format!("{via_workspace}/{namespace}/layer-cache").into();
            config["executor"] = executor;
            kubeconfig = Some(cluster.kubeconfig.display().to_string());
            // Builder pods cannot read this machine's files: they clone over HTTP.
            for (name, repo) in &repos {
                let server = GitHttpServer::start_for_pods(repo, None)
                    .map_err(|e| format!("git server: {e}"))?;
                remotes.insert(name.clone(), server.uri());
                keep.push(Box::new(server));
            }
        }
        if let Some(kubeconfig) = &kubeconfig {
            base_env.push(("KUBECONFIG", kubeconfig.as_str()));
        }
        // The scenario's keys are merged in (RFC 7386): a group it names keeps the keys it
        // does not.
        json_patch::merge(&mut config, &serde_json::Value::Object(env.config.clone()));
        let mut first_env = base_env.clone();
        first_env.push(("FAILPOINTS", env.failpoints.as_str()));
        // A fixed port, so that clients such as `builds logs --follow` find the service again
        // after a restart. Another process may take a free port before the service binds it:
        // then another one.
        let mut tries = 0;
        let service = loop {
            let port = crate::free_port().map_err(|e| format!("free port: {e}"))?;
            config["grpcAddress"] = format!("127.0.0.1:{port}").into();
            match Service::start_with_env(&self.binary, config.clone(), &first_env) {
                Err(e) if tries < 3 && e.to_string().contains("Address already in use") => {
                    tries += 1;
                }
                started => break started.map_err(|e| format!("service: {e}"))?,
            }
        };
        let grpc_url = service.grpc_url();
        let base_env = base_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if let Some(moto) = moto {
            keep.push(Box::new(moto));
        }
        keep.push(Box::new(secrets_dir));
        let client = service.client_options();
        Ok(Environment {
            grpc_url,
            client,
            cli_binary: self.binary.clone(),
            vars,
            repos,
            remotes,
            registry_creds: creds,
            pull_secret,
            service: Some(Box::new(ControlledService { service, base_env })),
            faults: proxy.map(|p| Box::new(p) as Box<dyn FaultInjector>),
            keep,
        })
    }

    fn controls_service(&self) -> bool {
        true
    }
}
