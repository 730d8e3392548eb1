//! Image references as mk3 computes them, bit for bit, so registries filled by mk3 stay cache
//! hits: the workspace ref of a base ref, and the base ref of a Dockerfile source.

use sha2::{Digest, Sha256};

/// mk3's build process version, part of every workspace ref hash.
pub const BUILD_PROCESS_VERSION: &str = "2";

/// `<workspace_repository>:<hex sha256(base_ref + "\n2\n")>`.
pub fn workspace_ref(workspace_repository: &str, base_ref: &str) -> String {
    let tag = hex::encode(Sha256::digest(format!(
        "{base_ref}\n{BUILD_PROCESS_VERSION}\n"
    )));
    format!("{workspace_repository}:{tag}")
}

/// The parts of a Dockerfile-from-git source that make its cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerfileKey<'a> {
    /// The revision to check out (`clone_taget`).
    pub clone_target: &'a str,
    /// The context directory.
    pub context_path: &'a str,
    /// The Dockerfile path.
    pub dockerfile_path: &'a str,
    /// The client's Dockerfile version.
    pub dockerfile_version: &'a str,
    /// The repository.
    pub remote_uri: &'a str,
}

/// `<base_repository>:<hex sha256(M + "\n")>`, M being `Key: value\n` lines sorted by key.
pub fn dockerfile_base_ref(base_repository: &str, key: &DockerfileKey<'_>) -> String {
    // Already in key order: CloneTarget < ContextPath < DockerfilePath < DockerfileVersion <
    // RemoteURI < Source.
    let manifest = format!(
        "CloneTarget: {}\nContextPath: {}\nDockerfilePath: {}\nDockerfileVersion: {}\nRemoteURI: {}\nSource: git\n",
        key.clone_target,
        key.context_path,
        key.dockerfile_path,
        key.dockerfile_version,
        key.remote_uri
    );
    let tag = hex::encode(Sha256::digest(format!("{manifest}\n")));
    format!("{base_repository}:{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_ref_matches_mk3_test_vector() {
        assert_eq!(
            workspace_ref("workspace", "source-image:latest"),
            "workspace:2b1325adbf901167f47a914a62d377c98f1e32e0837dafb95ca86ca9d08ab14e"
        );
    }

    #[test]
    fn dockerfile_key_lines_are_sorted_and_hashed_with_a_trailing_newline() {
        let key = DockerfileKey {
            clone_target: "main",
            context_path: ".",
            dockerfile_path: "Dockerfile",
            dockerfile_version: "v1",
            remote_uri: "https://example.com/repo.git",
        };
        let manifest = "CloneTarget: main\nContextPath: .\nDockerfilePath: Dockerfile\nDockerfileVersion: v1\nRemoteURI: https://example.com/repo.git\nSource: git\n\n";
        let expected = hex::encode(Sha256::digest(manifest));
        assert_eq!(
            dockerfile_base_ref("base", &key),
            format!("base:{expected}")
        );
        let mut lines: Vec<&str> = manifest.trim_end().lines().collect();
        let unsorted = lines.clone();
        lines.sort();
        assert_eq!(lines, unsorted);
    }
}
