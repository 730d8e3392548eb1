//! Certificate authorities made by a test (rcgen): a CA, and certificates it signs with the
//! names, usages and validity a test asks for, written as PEM files.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// One certificate and its key, PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
}

/// What a certificate is for.
#[derive(Clone, Debug, Default)]
pub struct Issue<'a> {
    /// The subject's common name.
    pub common_name: &'a str,
    /// The subject's organization, if any.
    pub organization: Option<&'a str>,
    /// Subject alternative names (DNS names or IP addresses).
    pub alt_names: &'a [&'a str],
    /// Already expired (valid in the year 2000 only).
    pub expired: bool,
    /// Usable to serve TLS (server auth) and to authenticate as a client (client auth); both
    /// when neither is set.
    pub server: bool,
    /// See `server`.
    pub client: bool,
}

/// A certificate authority whose files live in one directory.
pub struct Authority {
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    /// A new CA named `common_name`, its certificate written to `dir/ca.pem`.
    pub fn create(dir: &Path, common_name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.join("ca.pem"), issuer.pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            issuer,
        })
    }

    /// The CA's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Signs a certificate as `spec` says, written as `dir/<name>.pem` and `<name>-key.pem`.
    pub fn issue(&self, name: &str, spec: &Issue<'_>) -> Result<Pair> {
        let mut params = CertificateParams::new(
            spec.alt_names
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<Vec<_>>(),
        )?;
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name);
        if let Some(o) = spec.organization {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2000, 12, 31);
        }
        let both = !spec.server && !spec.client;
        if spec.server || both {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client || both {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let pair = self.pair(name);
        std::fs::write(&pair.cert, cert.pem())?;
        std::fs::write(&pair.key, key.serialize_pem())?;
        Ok(pair)
    }

    /// The files of the certificate named `name`.
    pub fn pair(&self, name: &str) -> Pair {
        Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        }
    }
}
