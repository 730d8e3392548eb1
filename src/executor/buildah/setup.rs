//! What buildah needs before its first command, written at start: its directories, owned by
//! root of its user namespace; the signature lookaside and network helper configuration; and
//! the cleanup of what killed builders left.

use std::path::{Path, PathBuf};

use super::{Buildah, Error};

/// The directories under buildah's own that root of its namespace writes: the storage, the
/// storage's runtime state, temporary files, its home (where it looks for per-user
/// configuration) and its `XDG_RUNTIME_DIR` (else it keeps runtime files in `tmp`).
const NAMESPACE_DIRS: [&str; 5] = ["root", "runroot", "tmp", "home", "runtime"];

impl Buildah {
    /// Makes the namespace's directories, owned by its root; `dir` and its parent (the data
    /// dir) get search permission for others, so that the namespace reaches them without
    /// being able to list them.
    pub(super) fn prepare_dirs(&self) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let failed = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Config { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(failed(&self.dir))?;
        for dir in [Some(self.dir.as_path()), self.dir.parent()]
            .into_iter()
            .flatten()
        {
            let mode = std::fs::metadata(dir)
                .map_err(failed(dir))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
                    .map_err(failed(dir))?;
            }
        }
        for name in NAMESPACE_DIRS {
            let path = self.dir.join(name);
            if path.exists() && !self.namespace.owns(&path) {
                tracing::warn!(
                    path = %path.display(),
                    "removing builder files made outside the builder's user namespace (the layer cache starts empty)"
                );
                std::fs::remove_dir_all(&path).map_err(failed(&path))?;
            }
            std::fs::create_dir_all(&path)
                .and_then(|()| self.namespace.give(&path))
                .map_err(failed(&path))?;
        }
        Ok(())
    }

    /// Points signature lookaside at buildah's own home: the built-in default for root,
    /// `/var/lib/containers/sigstore`, is out of the namespace's reach, and reading it fails
    /// every pull. (containers/image reads `$HOME/.config/containers/registries.d` first.)
    pub(super) fn write_lookaside_conf(&self) -> Result<(), Error> {
        let home = self.dir.join("home");
        let dir = home.join(".config/containers/registries.d");
        let conf = dir.join("default.yaml");
        let text = format!(
            "# Written by image-builder at start.\ndefault-docker:\n  lookaside: file://{}\n",
            home.join("sigstore").display()
        );
        // Every directory on the way belongs to the namespace: buildah makes others beside.
        let mut made = home;
        for part in [".config", "containers", "registries.d"] {
            made.push(part);
            std::fs::create_dir_all(&made)
                .and_then(|()| self.namespace.give(&made))
                .map_err(|source| Error::Config {
                    path: made.clone(),
                    source,
                })?;
        }
        std::fs::write(&conf, text).map_err(|source| Error::Config { path: conf, source })
    }

    /// Puts a `slirp4netns` first on buildah's PATH that runs the machine's with
    /// `--disable-host-loopback`: buildah 1.28 starts it for every RUN step without that flag,
    /// and slirp4netns then forwards 10.0.2.2 to the host's loopback, where the service's
    /// ports are (tests/isolation.rs connects there). The helper is root's, out of the
    /// namespace's reach. `--enable-sandbox` and `--enable-seccomp` confine slirp4netns
    /// itself, which parses every packet a Dockerfile sends.
    pub(super) fn write_network_helper(&self) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.helpers_dir();
        let helper = bin.join("slirp4netns");
        let failed = |source| Error::Config {
            path: helper.clone(),
            source,
        };
        let real = find_program("slirp4netns", &bin).ok_or_else(|| {
            failed(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "slirp4netns is not on PATH (package slirp4netns; scripts/setup.sh installs it): RUN steps need it for their network",
            ))
        })?;
        let quoted = real.display().to_string().replace('\'', "'\\''");
        let script = format!(
            "#!/bin/sh\n# Written by image-builder at start: RUN steps never reach the host's loopback.\nexec '{quoted}' --disable-host-loopback --enable-sandbox --enable-seccomp \"$@\"\n"
        );
        std::fs::create_dir_all(&bin)
            .and_then(|()| std::fs::write(&helper, script))
            .and_then(|()| {
                std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))
            })
            .map_err(failed)
    }

    /// Programs buildah finds before the machine's (see [`Buildah::write_network_helper`]).
    pub(super) fn helpers_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    pub(super) fn registries_conf(&self) -> PathBuf {
        self.dir.join("registries.conf")
    }

    /// Where buildah keeps its temporary files (a RUN step's runtime directory, pulled
    /// layers): inside its own directory rather than `/var/tmp`, so that what a killed builder
    /// leaves is found and removed at the next start ([`Buildah::remove_temp_files`]).
    pub(super) fn temp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Removes what killed builders left in the temporary directory. Only while no build runs.
    pub async fn remove_temp_files(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut entries = tokio::fs::read_dir(self.temp_dir()).await?;
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            let gone = if entry.file_type().await?.is_dir() {
                tokio::fs::remove_dir_all(&path).await
            } else {
                tokio::fs::remove_file(&path).await
            };
            if gone.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The first `name` on PATH outside `except`.
fn find_program(name: &str, except: &Path) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .filter(|dir| dir != except)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}
