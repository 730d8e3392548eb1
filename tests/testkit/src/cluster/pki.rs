//! The test cluster's certificates, made fresh for each cluster: a CA, the API server's
//! serving certificate, client certificates for the admin (`system:masters`) and the node
//! (`system:node:localhost`), the kubelet's serving certificate, and the service-account
//! signing key.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::KeyPair;

pub use crate::pki::Pair;
use crate::pki::{Authority, Issue};

/// The node's name: the API server reaches the kubelet by it, so it must resolve to loopback.
pub const NODE_NAME: &str = "localhost";

/// Where the certificates and keys are, PEM files in one directory.
pub struct Pki {
    dir: PathBuf,
    authority: Authority,
}

impl Pki {
    /// Makes every certificate the cluster needs under `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let authority = Authority::create(dir, "image-builder-test-cluster-ca")?;
        let pki = Self {
            dir: dir.to_owned(),
            authority,
        };
        let serving_names = [
            "localhost",
            "127.0.0.1",
            "10.214.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        let node = format!("system:node:{NODE_NAME}");
        for (name, common_name, organization, alt_names) in [
            ("apiserver", "kube-apiserver", None, &serving_names[..]),
            ("admin", "admin", Some("system:masters"), &[][..]),
            (
                "apiserver-kubelet-client",
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
                &[][..],
            ),
            ("node", node.as_str(), Some("system:nodes"), &[][..]),
            ("kubelet", NODE_NAME, None, &["localhost", "127.0.0.1"][..]),
        ] {
            pki.authority.issue(
                name,
                &Issue {
                    common_name,
                    organization,
                    alt_names,
                    ..Issue::default()
                },
            )?;
        }
        let service_accounts = KeyPair::generate()?;
        std::fs::write(dir.join("sa.key"), service_accounts.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), service_accounts.public_key_pem())?;
        Ok(pki)
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.authority.ca()
    }

    /// The certificate and key named `name` (`apiserver`, `admin`, `node`, `kubelet`,
    /// `apiserver-kubelet-client`).
    pub fn pair(&self, name: &str) -> Pair {
        self.authority.pair(name)
    }

    /// The service-account signing key and its public half.
    pub fn service_account_keys(&self) -> Pair {
        Pair {
            cert: self.dir.join("sa.pub"),
            key: self.dir.join("sa.key"),
        }
    }
}
