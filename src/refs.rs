//! Image references as mk3 computes them, bit for bit, so registries filled by mk3 stay cache
//! hits: the workspace ref of a base ref, and the base ref of a Dockerfile source; and the
//! content-addressed base ref (`builds.baseImageKey: content`), which adds what the source holds.

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

/// What a Dockerfile source holds, by git's hashes: the content part of a content key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentKey<'a> {
    /// The context directory's tree id.
    pub context_tree: &'a str,
    /// The Dockerfile's blob id.
    pub dockerfile_blob: &'a str,
}

/// `<base_repository>:<hex sha256(M + "\n")>`, M being `Key: value\n` lines sorted by key.
pub fn dockerfile_base_ref(base_repository: &str, key: &DockerfileKey<'_>) -> String {
    base_ref_of(base_repository, key, None)
}

/// mk3's hash with two more lines, `ContentContext` and `ContentDockerfile`, in their sorted
/// places: a change to a file in the context or to the Dockerfile is a new key, a change
/// elsewhere in the repository is not. Never equal to an mk3 key of the same source.
pub fn content_base_ref(
    base_repository: &str,
    key: &DockerfileKey<'_>,
    content: &ContentKey<'_>,
) -> String {
    base_ref_of(base_repository, key, Some(content))
}

fn base_ref_of(
    base_repository: &str,
    key: &DockerfileKey<'_>,
    content: Option<&ContentKey<'_>>,
) -> String {
    // In key order: CloneTarget < ContentContext < ContentDockerfile < ContextPath <
    // DockerfilePath < DockerfileVersion < RemoteURI < Source.
    let content = content.map_or_else(String::new, |c| {
        format!(
            "ContentContext: {}\nContentDockerfile: {}\n",
            c.context_tree, c.dockerfile_blob
        )
    });
    let manifest = format!(
        "CloneTarget: {}\n{content}ContextPath: {}\nDockerfilePath: {}\nDockerfileVersion: {}\nRemoteURI: {}\nSource: git\n",
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

    fn key() -> DockerfileKey<'static> {
        DockerfileKey {
            clone_target: "main",
            context_path: ".",
            dockerfile_path: "Dockerfile",
            dockerfile_version: "v1",
            remote_uri: "https://example.com/repo.git",
        }
    }

    /// The manifest's lines are in key order, as mk3 writes them.
    fn assert_sorted(manifest: &str) {
        let mut lines: Vec<&str> = manifest.trim_end().lines().collect();
        let written = lines.clone();
        lines.sort();
        assert_eq!(lines, written);
    }

    #[test]
    fn dockerfile_key_lines_are_sorted_and_hashed_with_a_trailing_newline() {
        let key = key();
        let manifest = "CloneTarget: main\nContextPath: .\nDockerfilePath: Dockerfile\nDockerfileVersion: v1\nRemoteURI: https://example.com/repo.git\nSource: git\n\n";
        let expected = hex::encode(Sha256::digest(manifest));
        assert_eq!(
            dockerfile_base_ref("base", &key),
            format!("base:{expected}")
        );
        assert_sorted(manifest);
    }

    #[test]
    fn content_keys_add_sorted_lines_and_follow_the_content() {
        let key = key();
        let content = ContentKey {
            context_tree: "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            dockerfile_blob: "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
        };
        let manifest = "CloneTarget: main\nContentContext: 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nContentDockerfile: e69de29bb2d1d6434b8b29ae775ad8c2e48c5391\nContextPath: .\nDockerfilePath: Dockerfile\nDockerfileVersion: v1\nRemoteURI: https://example.com/repo.git\nSource: git\n\n";
        assert_eq!(
            content_base_ref("base", &key, &content),
            format!("base:{}", hex::encode(Sha256::digest(manifest)))
        );
        assert_sorted(manifest);
        assert_ne!(
            content_base_ref("base", &key, &content),
            dockerfile_base_ref("base", &key)
        );
        let other_file = ContentKey {
            context_tree: "0000000000000000000000000000000000000001",
            ..content.clone()
        };
        assert_ne!(
            content_base_ref("base", &key, &content),
            content_base_ref("base", &key, &other_file)
        );
    }
}
