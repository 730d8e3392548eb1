//! Local git repositories made in a temp dir, as build contexts.

use std::path::Path;

use super::Result;
use super::process::run;

/// A git repository on disk, reachable as `file://…`.
pub struct GitRepo {
    dir: tempfile::TempDir,
}

impl GitRepo {
    /// A repository on branch `main` with `files` committed.
    pub fn new(files: &[(&str, &str)]) -> Result<Self> {
        let repo = Self {
            dir: tempfile::Builder::new().prefix("git-repo-").tempdir()?,
        };
        repo.git(&["init", "--quiet", "--initial-branch", "main"])?;
        repo.git(&["config", "user.email", "tests@image-builder"])?;
        repo.git(&["config", "user.name", "tests"])?;
        repo.commit(files, "initial")?;
        Ok(repo)
    }

    fn git(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-C", self.path_str()];
        all.extend_from_slice(args);
        run("git", &all)
    }

    fn path_str(&self) -> &str {
        self.dir.path().to_str().unwrap_or_default()
    }

    /// The repository's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `file:///…` of the repository.
    pub fn uri(&self) -> String {
        format!("file://{}", self.path_str())
    }

    /// Writes `files` and commits them on the current branch; returns the commit hash.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> Result<String> {
        for (name, content) in files {
            let path = self.dir.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
        }
        self.git(&["add", "--all"])?;
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message])?;
        self.head()
    }

    /// Adds a symlink `link` pointing at `target` and commits it.
    pub fn commit_symlink(&self, link: &str, target: &str) -> Result<String> {
        std::os::unix::fs::symlink(target, self.dir.path().join(link))?;
        self.commit(&[], "symlink")
    }

    /// Creates branch `name` at HEAD and switches to it.
    pub fn branch(&self, name: &str) -> Result<()> {
        self.git(&["checkout", "--quiet", "-b", name]).map(drop)
    }

    /// Switches to an existing branch.
    pub fn switch(&self, name: &str) -> Result<()> {
        self.git(&["checkout", "--quiet", name]).map(drop)
    }

    /// The current commit hash.
    pub fn head(&self) -> Result<String> {
        Ok(self.git(&["rev-parse", "HEAD"])?.trim().to_owned())
    }
}
