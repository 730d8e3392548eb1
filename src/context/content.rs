//! Content keys of Dockerfile sources (`builds.baseImageKey: content`): what a build of a source would
//! see, named by git's own hashes, read without a checkout.
//!
//! Each remote has a bare repository under `dataDir/keys`, kept between requests; a request
//! fetches only the commit its target names, shallow (`--depth 1`) and without blobs
//! (`--filter=blob:none`, where the server allows it): commits and trees are all a key needs.
//! The Dockerfile's blob id hashes its bytes and the context directory's tree id hashes every
//! file under it, so no file is read, let alone hashed twice. Fetches into one repository
//! take turns; different remotes fetch at once.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use image_builder_state::{CloneTargetMode, DockerfileSource};
use sha2::{Digest, Sha256};

use super::{Error, git, validate_paths};
use crate::credentials::GitCredentials;
use crate::steps::{ReadSource, SourceContent, StepError, StepErrorKind};

/// The bare repositories content keys are read from, one per remote.
pub struct ContentKeys {
    root: PathBuf,
    turns: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// One entry of a tree, as `git ls-tree` lists it.
struct Entry {
    mode: String,
    kind: String,
    id: String,
}

impl ContentKeys {
    /// Repositories live in `root/<hash of the remote>.git`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            turns: parking_lot::Mutex::default(),
        }
    }

    /// The content `source` names now.
    pub async fn read(
        &self,
        source: &DockerfileSource,
        credentials: Option<&GitCredentials>,
    ) -> Result<SourceContent, Error> {
        validate_paths(source)?;
        let name = hex::encode(&Sha256::digest(source.remote_uri.as_bytes())[..16]);
        let repo = self.root.join(format!("{name}.git"));
        let turn = Arc::clone(self.turns.lock().entry(name).or_default());
        let _turn = turn.lock().await;
        if !repo.join("HEAD").is_file() {
            tokio::fs::create_dir_all(&repo)
                .await
                .map_err(|source| Error::Io {
                    path: repo.clone(),
                    source,
                })?;
            quiet(&repo, None, &["init", "--bare", "--quiet", "."], "init").await?;
        }
        let commit = fetch(&repo, source, credentials).await?;
        let dockerfile_path = match source.dockerfile_path.as_str() {
            "" => "Dockerfile",
            path => path,
        };
        let dockerfile = match entry(&repo, &commit, dockerfile_path).await? {
            // A symlinked Dockerfile is keyed by its link; its target counts through the
            // context when it lies there.
            Some(e) if e.kind == "blob" && (e.mode.starts_with("100") || e.mode == "120000") => {
                e.id
            }
            _ => return Err(Error::NoDockerfile(dockerfile_path.to_owned())),
        };
        let context = match entry(&repo, &commit, &source.context_path).await? {
            Some(e) if e.kind == "tree" => e.id,
            _ => return Err(Error::NoContext(source.context_path.clone())),
        };
        Ok(SourceContent {
            commit,
            dockerfile,
            context,
        })
    }
}

#[async_trait]
impl ReadSource for ContentKeys {
    async fn content(
        &self,
        source: &DockerfileSource,
        credentials: Option<&GitCredentials>,
    ) -> Result<SourceContent, StepError> {
        self.read(source, credentials)
            .await
            .map_err(|err| match &err {
                // A caller waits on the answer: say which of its inputs git refused.
                Error::Git { tail, .. } => {
                    let kind = git_failure_kind(tail);
                    StepError::from_source(kind, err)
                }
                _ => err.into(),
            })
    }
}

/// What a git fetch's last complaint says of the request: credentials wanted or refused, a
/// repository or revision that does not exist, or a remote that could not be reached.
fn git_failure_kind(tail: &str) -> StepErrorKind {
    let tail = tail.to_ascii_lowercase();
    if tail.contains("authentication failed")
        || tail.contains("could not read username")
        || tail.contains("terminal prompts disabled")
    {
        StepErrorKind::Unauthenticated
    } else if tail.contains("couldn't find remote ref")
        || tail.contains("not our ref")
        || tail.contains("not found")
        || tail.contains("does not appear to be a git repository")
        || tail.contains("unknown revision")
        || tail.contains("needed a single revision")
    {
        StepErrorKind::Missing
    } else {
        StepErrorKind::Unavailable
    }
}

/// Fetches the commit the source's target names into `repo`; returns its id.
async fn fetch(
    repo: &Path,
    source: &DockerfileSource,
    credentials: Option<&GitCredentials>,
) -> Result<String, Error> {
    let target = source.clone_target.as_str();
    let wanted = match source.target_mode {
        CloneTargetMode::RemoteHead => "HEAD".to_owned(),
        CloneTargetMode::RemoteCommit => target.to_owned(),
        CloneTargetMode::RemoteBranch | CloneTargetMode::LocalBranch => {
            format!("refs/heads/{target}")
        }
    };
    let shallow = [
        "-c",
        "fetch.writeCommitGraph=false",
        "fetch",
        "--quiet",
        "--no-tags",
        "--depth",
        "1",
        "--filter=blob:none",
        "--",
        &source.remote_uri,
        &wanted,
    ];
    if let Err(e) = quiet(repo, credentials, &shallow, "fetch").await {
        // A server that refuses a commit by id still serves its branches.
        if source.target_mode != CloneTargetMode::RemoteCommit {
            return Err(e);
        }
        let everything = [
            "fetch",
            "--quiet",
            "--no-tags",
            "--filter=blob:none",
            "--",
            &source.remote_uri,
            "refs/heads/*:refs/heads/*",
        ];
        quiet(repo, credentials, &everything, "fetch").await?;
    }
    let named = match source.target_mode {
        CloneTargetMode::RemoteCommit => format!("{target}^{{commit}}"),
        _ => "FETCH_HEAD^{commit}".to_owned(),
    };
    let out = quiet(repo, None, &["rev-parse", "--verify", &named], "rev-parse").await?;
    Ok(out.trim().to_owned())
}

/// The entry at `path` in `commit`'s tree (the root tree for an empty path or `.`).
async fn entry(repo: &Path, commit: &str, path: &str) -> Result<Option<Entry>, Error> {
    let parts: Vec<String> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        let tree = format!("{commit}^{{tree}}");
        let out = quiet(repo, None, &["rev-parse", "--verify", &tree], "rev-parse").await?;
        return Ok(Some(Entry {
            mode: "040000".into(),
            kind: "tree".into(),
            id: out.trim().to_owned(),
        }));
    }
    let path = parts.join("/");
    let out = quiet(repo, None, &["ls-tree", commit, "--", &path], "ls-tree").await?;
    // `<mode> <type> <id>\t<path>`; the path must be the entry itself, not one inside it.
    Ok(out.lines().find_map(|line| {
        let (meta, name) = line.split_once('\t')?;
        let mut meta = meta.split(' ');
        let entry = Entry {
            mode: meta.next()?.to_owned(),
            kind: meta.next()?.to_owned(),
            id: meta.next()?.to_owned(),
        };
        (name == path).then_some(entry)
    }))
}

/// Runs git in `repo`; its stdout, or its last line of complaint.
async fn quiet(
    repo: &Path,
    credentials: Option<&GitCredentials>,
    args: &[&str],
    action: &'static str,
) -> Result<String, Error> {
    let mut cmd = git(credentials);
    cmd.arg("-C").arg(repo).args(args);
    let out = crate::process::output(cmd).await.map_err(|e| Error::Git {
        action,
        status: "not started".into(),
        tail: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(Error::Git {
        action,
        status: out.status.to_string(),
        // A server without partial clone says so on every fetch; that is not why it failed.
        tail: crate::process::complaint(&out.stderr, &["filtering not recognized"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, script: &str) -> String {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn source(
        remote: &Path,
        mode: CloneTargetMode,
        target: &str,
        context: &str,
    ) -> DockerfileSource {
        DockerfileSource {
            remote_uri: format!("file://{}", remote.display()),
            target_mode: mode,
            clone_target: target.into(),
            dockerfile_path: "app/Dockerfile".into(),
            context_path: context.into(),
            dockerfile_version: "1".into(),
            git_auth: false,
        }
    }

    #[tokio::test]
    async fn keys_follow_the_context_and_the_dockerfile_not_the_rest_of_the_repository() {
        let remote = tempfile::tempdir().unwrap();
        let r = remote.path();
        sh(
            r,
            "git init -q -b main . && mkdir app docs && echo 'FROM x' > app/Dockerfile && echo one > app/file && echo readme > docs/readme && git add . && git commit -qm one",
        );
        let first = sh(r, "git rev-parse HEAD");
        let data = tempfile::tempdir().unwrap();
        let keys = ContentKeys::new(data.path().join("keys"));
        let read = |mode, target: &str, context: &str| {
            let source = source(r, mode, target, context);
            let keys = &keys;
            async move { keys.read(&source, None).await }
        };
        let one = read(CloneTargetMode::RemoteHead, "", "app").await.unwrap();
        assert_eq!(one.commit, first);
        assert_eq!(one.context, sh(r, "git rev-parse HEAD:app"));
        assert_eq!(one.dockerfile, sh(r, "git rev-parse HEAD:app/Dockerfile"));
        // A change outside the context: a new commit, the same content.
        sh(r, "echo changed > docs/readme && git commit -qam docs");
        let docs = read(CloneTargetMode::RemoteBranch, "main", "./app/")
            .await
            .unwrap();
        assert_ne!(docs.commit, one.commit);
        assert_eq!(
            (&docs.context, &docs.dockerfile),
            (&one.context, &one.dockerfile)
        );
        // A change inside the context: new content.
        sh(r, "echo two > app/file && git commit -qam file");
        let file = read(CloneTargetMode::RemoteHead, "", "app").await.unwrap();
        assert_ne!(file.context, one.context);
        assert_eq!(file.dockerfile, one.dockerfile);
        // The root context covers everything; an older commit by id reads as it was.
        let root = read(CloneTargetMode::RemoteHead, "", ".").await.unwrap();
        assert_eq!(root.context, sh(r, "git rev-parse 'HEAD^{tree}'"));
        let old = read(CloneTargetMode::RemoteCommit, &first, "app")
            .await
            .unwrap();
        assert_eq!(old, one);
        // What is not there is said precisely.
        assert!(matches!(
            read(CloneTargetMode::RemoteHead, "", "nowhere").await,
            Err(Error::NoContext(_))
        ));
        assert!(matches!(
            read(CloneTargetMode::RemoteHead, "", "app/file").await,
            Err(Error::NoContext(_))
        ));
        assert!(matches!(
            read(CloneTargetMode::RemoteBranch, "no-such-branch", "app").await,
            Err(Error::Git { .. })
        ));
    }
}
