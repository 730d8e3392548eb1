//! The test cluster's certificates, made fresh for each cluster: a CA, the API server's
//! serving certificate, client certificates for the admin (`system:masters`) and the node
//! (`system:node:localhost`), the kubelet's serving certificate, and the service-account
//! signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use anyhow::Result;

/// The node's name: the API server reaches the kubelet by it, so it must resolve to loopback.
pub const NODE_NAME: &str = "localhost";

/// Where the certificates and keys are, PEM files in one directory.
pub struct Pki {
    dir: PathBuf,
}

/// One certificate and its key.
pub struct Pair {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
}

impl Pki {
    /// Makes every certificate the cluster needs under `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pki = Self {
            dir: dir.to_owned(),
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "image-builder-test-cluster-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        std::fs::write(pki.ca(), ca.pem())?;

        let serving_names = [
            "localhost",
            "127.0.0.1",
            "10.214.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        pki.issue(&ca, "apiserver", "kube-apiserver", None, &serving_names)?;
        pki.issue(&ca, "admin", "admin", Some("system:masters"), &[])?;
        pki.issue(
            &ca,
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            &[],
        )?;
        pki.issue(
            &ca,
            "node",
            &format!("system:node:{NODE_NAME}"),
            Some("system:nodes"),
            &[],
        )?;
        pki.issue(&ca, "kubelet", NODE_NAME, None, &["localhost", "127.0.0.1"])?;
        let service_accounts = KeyPair::generate()?;
        std::fs::write(dir.join("sa.key"), service_accounts.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), service_accounts.public_key_pem())?;
        Ok(pki)
    }

    fn issue(
        &self,
        ca: &CertifiedIssuer<'_, KeyPair>,
        name: &str,
        common_name: &str,
        organization: Option<&str>,
        alt_names: &[&str],
    ) -> Result<()> {
        let mut params = CertificateParams::new(
            alt_names
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<Vec<_>>(),
        )?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if let Some(o) = organization {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, ca)?;
        let pair = self.pair(name);
        std::fs::write(&pair.cert, cert.pem())?;
        std::fs::write(&pair.key, key.serialize_pem())?;
        Ok(())
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate and key named `name` (`apiserver`, `admin`, `node`, `kubelet`,
    /// `apiserver-kubelet-client`).
    pub fn pair(&self, name: &str) -> Pair {
        Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        }
    }

    /// The service-account signing key and its public half.
    pub fn service_account_keys(&self) -> Pair {
        Pair {
            cert: self.dir.join("sa.pub"),
            key: self.dir.join("sa.key"),
        }
    }
}
