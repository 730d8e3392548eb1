//! `access`: who may use the ops API. Certificates are named by their subject's common name or
//! any subject alternative name; the operator token is a file (see `api/access.rs`).

use std::path::PathBuf;

use serde::Deserialize;

use super::{Error, invalid};

/// The `access` group.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AccessConfig {
    /// Who may cancel and retry builds: client certificate names, or `*` for any client the
    /// transport admits. Default: nobody but the holder of `operatorTokenFile`.
    pub operators: Vec<String>,
    /// Who may read builds, journals and logs, as `operators`. Default: the same as
    /// `operators`.
    pub viewers: Option<Vec<String>>,
    /// A file holding the operator token (at least 16 printable characters): a client that
    /// sends `authorization: Bearer <token>` is an operator. Re-read when it changes.
    pub operator_token_file: Option<PathBuf>,
}

impl AccessConfig {
    /// Who may read: `viewers`, or `operators` when it is not given.
    pub fn viewers(&self) -> &[String] {
        self.viewers.as_deref().unwrap_or(&self.operators)
    }

    pub(super) fn validate(&self) -> Result<(), Error> {
        for (key, list) in [
            ("access.operators", Some(&self.operators)),
            ("access.viewers", self.viewers.as_ref()),
        ] {
            for (i, entry) in list.into_iter().flatten().enumerate() {
                if entry.trim().is_empty()
                    || entry.len() > 256
                    || entry.chars().any(char::is_control)
                {
                    return Err(invalid(
                        &format!("{key}[{i}]"),
                        "must be a certificate name (1 to 256 printable characters) or \"*\"",
                    ));
                }
            }
        }
        Ok(())
    }
}
