//! The flat layout the configuration had before its groups: each of its keys is moved to the
//! key that replaced it before the document is read, and named in a warning at start, so that
//! existing files keep working while their owners move them over.

use serde_json::{Map, Value};

use super::{Error, invalid};

/// A key of the flat layout found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyKey {
    /// Read as `new`.
    Moved {
        /// The flat key the file used.
        old: &'static str,
        /// The dotted key that replaced it.
        new: &'static str,
    },
    /// Read and dropped: it means nothing with the configured executor.
    Ignored {
        /// The flat key the file used.
        old: &'static str,
        /// Why it is dropped.
        why: &'static str,
    },
}

impl std::fmt::Display for LegacyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Moved { old, new } => write!(
                f,
                "config key `{old}` is now `{new}`: it is still read, but move it, as it will not always be"
            ),
            Self::Ignored { old, why } => write!(f, "config key `{old}` is ignored: {why}"),
        }
    }
}

/// Each flat key and the dotted key (`group.name`) that replaced it.
pub(super) const MOVES: &[(&str, &str)] = &[
    ("buildTimeout", "builds.timeout"),
    ("maxConcurrentBuilds", "builds.maxConcurrent"),
    ("maxLogBytes", "builds.maxLogBytes"),
    ("retention", "builds.retention"),
    ("baseImageKey", "builds.baseImageKey"),
    ("allowLocalRepositories", "builds.allowLocalRepositories"),
    ("insecureRegistries", "registry.insecure"),
    ("registryTimeout", "registry.timeout"),
    ("registryRetryBudget", "registry.retryBudget"),
    ("registryRequestsPerHost", "registry.requestsPerHost"),
    ("ecrEndpoint", "registry.ecrEndpoint"),
    ("operators", "access.operators"),
    ("viewers", "access.viewers"),
    ("operatorTokenFile", "access.operatorTokenFile"),
    ("layerCacheSize", "executor.layerCacheSize"),
];

/// Moves the flat keys of `document` into their groups; returns what it found, in the
/// table's order. A key set under both names is refused rather than one silently winning.
pub(super) fn regroup(document: &mut Value) -> Result<Vec<LegacyKey>, Error> {
    let Some(top) = document.as_object_mut() else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for &(old, new) in MOVES {
        let Some((group, key)) = new.split_once('.') else {
            continue;
        };
        let Some(value) = top.remove(old) else {
            continue;
        };
        if group == "executor" && !executor_is_local(top) {
            found.push(LegacyKey::Ignored {
                old,
                why: "only the local executor keeps a layer cache on this machine",
            });
            continue;
        }
        let members = top.entry(group).or_insert_with(|| {
            let mut members = Map::new();
            if group == "executor" {
                members.insert("kind".to_owned(), "local".into());
            }
            Value::Object(members)
        });
        let Some(members) = members.as_object_mut() else {
            return Err(invalid(group, "must be an object"));
        };
        if members.contains_key(key) {
            return Err(invalid(
                old,
                format!("is the old name of `{new}`, which is set too: remove `{old}`"),
            ));
        }
        members.insert(key.to_owned(), value);
        found.push(LegacyKey::Moved { old, new });
    }
    Ok(found)
}

/// Whether the document's executor is the local one (given or by default).
fn executor_is_local(top: &Map<String, Value>) -> bool {
    match top.get("executor") {
        None => true,
        Some(executor) => executor.get("kind").and_then(Value::as_str) == Some("local"),
    }
}
