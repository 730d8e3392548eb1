//! Files the service re-reads when their content changes (registry credentials, TLS
//! certificates, the operator token), as Kubernetes and cert-manager rotate them: no restart.
//!
//! [`Reloading`] owns the rule for all of them: the files are read again when asked, parsed
//! only when the SHA-256 of their bytes changed (so a rotation is seen whatever size and
//! modification time say, and an unchanged file costs no parse), and a file that went bad
//! keeps the last good value, with the error returned for the caller to log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::Digest;

/// A file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// Turns the files' bytes, in the order of their paths, into the value.
type Parse<T, E> = Box<dyn Fn(&[Vec<u8>]) -> Result<T, E> + Send + Sync>;

struct Loaded<T> {
    digest: [u8; 32],
    value: Arc<T>,
}

/// A value parsed from one or more files, parsed again when any of them changes.
pub struct Reloading<T, E> {
    paths: Vec<PathBuf>,
    parse: Parse<T, E>,
    loaded: Mutex<Loaded<T>>,
}

impl<T, E: From<ReadError>> Reloading<T, E> {
    /// Reads and parses the files; fails when they cannot be read or parsed. `parse` gets the
    /// files' bytes in the order of `paths`.
    pub fn open(
        paths: Vec<PathBuf>,
        parse: impl Fn(&[Vec<u8>]) -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let (digest, bytes) = read_all(&paths)?;
        let value = Arc::new(parse(&bytes)?);
        Ok(Self {
            paths,
            parse: Box::new(parse),
            loaded: Mutex::new(Loaded { digest, value }),
        })
    }

    /// The value as the files are now. When they cannot be read or parsed, the last good
    /// value and the reason.
    pub fn current(&self) -> (Arc<T>, Option<E>) {
        match self.refresh() {
            Ok(value) => (value, None),
            Err(e) => (Arc::clone(&self.loaded.lock().value), Some(e)),
        }
    }

    /// The value last loaded, without looking at the files.
    pub fn last(&self) -> Arc<T> {
        Arc::clone(&self.loaded.lock().value)
    }

    fn refresh(&self) -> Result<Arc<T>, E> {
        let (digest, bytes) = read_all(&self.paths)?;
        let mut loaded = self.loaded.lock();
        if loaded.digest != digest {
            *loaded = Loaded {
                digest,
                value: Arc::new((self.parse)(&bytes)?),
            };
            tracing::info!(files = ?self.paths, "reloaded after a change");
        }
        Ok(Arc::clone(&loaded.value))
    }
}

fn read_all(paths: &[PathBuf]) -> Result<([u8; 32], Vec<Vec<u8>>), ReadError> {
    let mut hash = sha2::Sha256::new();
    let mut all = Vec::with_capacity(paths.len());
    for path in paths {
        let bytes = read(path)?;
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
        all.push(bytes);
    }
    Ok((hash.finalize().into(), all))
}

fn read(path: &Path) -> Result<Vec<u8>, ReadError> {
    std::fs::read(path).map_err(|source| ReadError {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error(transparent)]
        Read(#[from] ReadError),
        #[error("bad")]
        Bad,
    }

    fn parse(bytes: &[Vec<u8>]) -> Result<String, TestError> {
        let text = String::from_utf8_lossy(&bytes[0]).into_owned();
        if text.contains("bad") {
            Err(TestError::Bad)
        } else {
            Ok(text)
        }
    }

    #[test]
    fn a_change_is_seen_and_a_bad_file_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let r = Reloading::open(vec![path.clone()], parse).unwrap();
        assert_eq!(*r.current().0, "one");
        // Same length, same second: still seen.
        std::fs::write(&path, "two").unwrap();
        assert_eq!(*r.current().0, "two");
        std::fs::write(&path, "bad").unwrap();
        let (value, error) = r.current();
        assert_eq!(*value, "two");
        assert!(matches!(error, Some(TestError::Bad)));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(r.current().1, Some(TestError::Read(_))));
        assert_eq!(*r.last(), "two");
    }
}
