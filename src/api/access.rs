//! Who may call what. mk3's service is open to every client the transport admits (gitpod's
//! server keeps working unchanged); the ops service's reads need a viewer, its cancel and
//! retry an operator.
//!
//! A caller is known by its client certificate (under mTLS: the subject's common name and
//! every DNS, e-mail, URI and IP subject alternative name) or by the bearer token of
//! `access.operatorTokenFile` (`authorization: Bearer …`, compared in constant time, never logged).
//! A certificate is authorized when one of its names is in the role's list (`operators`,
//! `viewers`), or the list holds `*` (any client the transport admits); the token is an
//! operator's, so it may do everything.

use std::path::PathBuf;
use subtle::ConstantTimeEq;
use tonic::{Code, Request, Status};

use super::status::refuse;

use crate::config::AccessConfig;
use crate::reload::{ReadError, Reloading};

/// The list entry that admits every client the transport admits.
pub const ANYONE: &str = "*";

/// Shortest operator token accepted: a guessable token is no lock.
const MIN_TOKEN_BYTES: usize = 16;

/// Certificate names quoted back in a refusal, at most (bounded echo).
const NAMES_SHOWN: usize = 4;
/// Characters of one certificate name quoted back, at most.
const NAME_SHOWN_CHARS: usize = 64;

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Reads: GetBuild, ListBuilds, Journal.
    Viewer,
    /// Changes: CancelBuild, RetryBuild.
    Operator,
}

impl Role {
    fn list_key(self) -> &'static str {
        match self {
            Role::Viewer => "access.viewers",
            Role::Operator => "access.operators",
        }
    }
}

/// The operator token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It cannot be read.
    #[error("access.operatorTokenFile: {0}")]
    Read(#[from] ReadError),
    /// It holds no usable token.
    #[error(
        "access.operatorTokenFile {path}: must hold one token of at least {MIN_TOKEN_BYTES} printable characters, without spaces"
    )]
    Token {
        /// The file.
        path: PathBuf,
    },
}

/// An authorized caller, as the journal records it: a name, never a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A client certificate, by the name that matched the role's list.
    Certificate(String),
    /// The holder of the operator token.
    Token,
    /// Nobody in particular: the role's list holds `*` and the client presented nothing.
    Anyone,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Certificate(name) => write!(f, "certificate {name}"),
            Identity::Token => f.write_str("operator token"),
            Identity::Anyone => f.write_str("anonymous client"),
        }
    }
}

/// The ops service's access rules, from the config.
pub struct Access {
    operators: Vec<String>,
    viewers: Vec<String>,
    token: Option<Reloading<OperatorToken, Error>>,
}

/// The operator token, as SHA-256 (what is compared, so the comparison also hides the length).
struct OperatorToken([u8; 32]);

fn digest(token: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token).into()
}

impl Access {
    /// The rules `config` sets; fails when `access.operatorTokenFile` cannot be used.
    pub fn from_config(config: &AccessConfig) -> Result<Self, Error> {
        let token = match &config.operator_token_file {
            None => None,
            Some(path) => {
                let named = path.clone();
                Some(Reloading::open(
                    vec![path.clone()],
                    move |files: &[Vec<u8>]| parse_token(&named, &files[0]),
                )?)
            }
        };
        Ok(Self {
            operators: config.operators.clone(),
            viewers: config.viewers().to_vec(),
            token,
        })
    }

    /// Who is calling `call` and whether they may, or the status that says what is missing:
    /// `Unauthenticated` when the caller showed nothing usable, `PermissionDenied` when it
    /// showed who it is and that is not enough.
    pub fn authorize<T>(
        &self,
        request: &Request<T>,
        role: Role,
        call: &str,
    ) -> Result<Identity, Status> {
        let names = certificate_names(request);
        let list = match role {
            Role::Viewer => &self.viewers,
            Role::Operator => &self.operators,
        };
        let key = role.list_key();
        if let Some(name) = names.iter().flatten().find(|n| list.contains(n)) {
            return Ok(Identity::Certificate(name.clone()));
        }
        if let Some(presented) = bearer(request)? {
            return self.check_token(&presented, call);
        }
        if list.iter().any(|entry| entry == ANYONE) {
            return Ok(match names.as_ref().and_then(|n| n.first()) {
                Some(name) => Identity::Certificate(name.clone()),
                None => Identity::Anyone,
            });
        }
        if list.is_empty() && self.token.is_none() {
            return Err(refuse(
                Code::PermissionDenied,
                format!(
                    "{call} is refused: this service names no {key} and no access.operatorTokenFile; \
                 its operator must configure one of them"
                ),
            ));
        }
        match names {
            Some(names) => Err(refuse(
                Code::PermissionDenied,
                format!(
                    "{call} needs a client certificate named in `{key}`; this one names {}",
                    shown(&names)
                ),
            )),
            None => Err(refuse(
                Code::Unauthenticated,
                format!("{call} needs {}", self.what_admits(key)),
            )),
        }
    }

    fn check_token(&self, presented: &str, call: &str) -> Result<Identity, Status> {
        let Some(token) = &self.token else {
            return Err(refuse(
                Code::Unauthenticated,
                format!(
                    "{call}: bearer tokens are not accepted here (no access.operatorTokenFile is configured)"
                ),
            ));
        };
        let (expected, error) = token.current();
        if let Some(e) = error {
            tracing::warn!(error = %e, "keeping the last good operator token");
        }
        if bool::from(digest(presented.as_bytes()).ct_eq(&expected.0)) {
            Ok(Identity::Token)
        } else {
            Err(refuse(
                Code::Unauthenticated,
                format!("{call}: the bearer token is not the operator token"),
            ))
        }
    }

    fn what_admits(&self, key: &str) -> String {
        match self.token {
            Some(_) => format!(
                "a client certificate named in `{key}` (mTLS) or the operator token \
                 (`authorization: Bearer …`, the CLI's --token-file)"
            ),
            None => format!("a client certificate named in `{key}` (mTLS)"),
        }
    }
}

fn parse_token(path: &std::path::Path, bytes: &[u8]) -> Result<OperatorToken, Error> {
    let token = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
    if token.len() < MIN_TOKEN_BYTES || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::Token {
            path: path.to_owned(),
        });
    }
    Ok(OperatorToken(digest(token.as_bytes())))
}

/// The bearer token of the request, if it carries one.
fn bearer<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let Some(value) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| {
        refuse(
            Code::Unauthenticated,
            "the authorization header is not text: use `Bearer <token>`",
        )
    })?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Ok(Some(token.trim().to_owned()))
        }
        _ => Err(refuse(
            Code::Unauthenticated,
            "the authorization header is not `Bearer <token>`",
        )),
    }
}

/// The names of the client certificate the connection was made with, if any: the subject's
/// common name, then the subject alternative names (`DNS`, e-mail, `URI`, IP), each as the
/// bare value.
fn certificate_names<T>(request: &Request<T>) -> Option<Vec<String>> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    Some(names_of(leaf.as_ref()))
}

/// The names a DER certificate carries, as [`certificate_names`] lists them.
fn names_of(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::RFC822Name(n) | GeneralName::URI(n) => {
                    names.push((*n).to_owned());
                }
                GeneralName::IPAddress(bytes) => {
                    if let Ok(octets) = <[u8; 4]>::try_from(*bytes) {
                        names.push(std::net::Ipv4Addr::from(octets).to_string());
                    } else if let Ok(octets) = <[u8; 16]>::try_from(*bytes) {
                        names.push(std::net::Ipv6Addr::from(octets).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    names
}

/// Certificate names as a refusal quotes them: a few, each cut short.
fn shown(names: &[String]) -> String {
    if names.is_empty() {
        return "nothing usable (no common name, no subject alternative name)".into();
    }
    let mut quoted: Vec<String> = names
        .iter()
        .take(NAMES_SHOWN)
        .map(|n| format!("{:?}", n.chars().take(NAME_SHOWN_CHARS).collect::<String>()))
        .collect();
    if names.len() > NAMES_SHOWN {
        quoted.push(format!("and {} more", names.len() - NAMES_SHOWN));
    }
    quoted.join(", ")
}
