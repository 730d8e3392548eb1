//! The user namespace the local builder runs in: root inside it is the first id of the
//! subordinate range `/etc/subuid` and `/etc/subgid` give the service's user, an unprivileged
//! id on the host. buildah, its storage and every RUN step live in it, so a Dockerfile that
//! escapes its container is still nobody on the host. util-linux's `unshare` makes the
//! namespace and `newuidmap`/`newgidmap` (package uidmap) map it, checking the same files.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use tokio::process::Command;

/// Ids a user namespace needs: enough for the users images commonly carry (`nobody` is 65534).
pub const MIN_IDS: u32 = 65_536;

/// No subordinate ids to map, or files that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// `/etc/subuid` or `/etc/subgid`.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The user has no range large enough.
    #[error(
        "{path} gives the user {user} (uid {uid}) no range of at least {MIN_IDS} ids: local builds run in a user namespace mapped from it; add a line such as `{user}:200000:{MIN_IDS}` to /etc/subuid and /etc/subgid (scripts/setup.sh does) that no other user's range overlaps"
    )]
    NoRange {
        /// `/etc/subuid` or `/etc/subgid`.
        path: PathBuf,
        /// The user's name.
        user: String,
        /// The user's id.
        uid: u32,
    },
}

/// A block of subordinate ids: host ids `first .. first + count` are ids `0 .. count` inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// The host id of root inside.
    pub first: u32,
    /// How many ids are mapped.
    pub count: u32,
}

/// The uid and gid ranges of one user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserNamespace {
    /// Subordinate uids.
    pub uids: IdRange,
    /// Subordinate gids.
    pub gids: IdRange,
}

impl UserNamespace {
    /// The namespace of this process's user, from `/etc/subuid` and `/etc/subgid`.
    pub fn of_current_user() -> Result<Self, Error> {
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let user = user_name(uid).unwrap_or_else(|| uid.to_string());
        Self::from_files(
            Path::new("/etc/subuid"),
            Path::new("/etc/subgid"),
            &user,
            uid,
        )
    }

    fn from_files(subuid: &Path, subgid: &Path, user: &str, uid: u32) -> Result<Self, Error> {
        let range = |path: &Path| {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })?;
            first_range(&text, user, uid).ok_or_else(|| Error::NoRange {
                path: path.to_owned(),
                user: user.to_owned(),
                uid,
            })
        };
        Ok(Self {
            uids: range(subuid)?,
            gids: range(subgid)?,
        })
    }

    /// `program` run as root of a new user namespace (and mount namespace, so that what it
    /// mounts stays its own), mapped from the subordinate ranges.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(self.unshare_args()).arg(program);
        cmd
    }

    /// The arguments of util-linux's `unshare` that run the program after them so.
    pub fn unshare_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--map-users={},0,{}", self.uids.first, self.uids.count),
            format!("--map-groups={},0,{}", self.gids.first, self.gids.count),
        ];
        args.extend(
            [
                "--setuid",
                "0",
                "--setgid",
                "0",
                "--mount",
                "--propagation",
                "private",
                "--",
            ]
            .map(str::to_owned),
        );
        args
    }

    /// Gives `path` to root of the namespace.
    pub fn give(&self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uids.first), Some(self.gids.first))
    }

    /// Whether `path` belongs to root of the namespace.
    pub fn owns(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .is_ok_and(|m| m.uid() == self.uids.first && m.gid() == self.gids.first)
    }
}

/// The first range of at least [`MIN_IDS`] ids `text` (subuid(5) format: `user:first:count`,
/// the user by name or by id) gives the user.
fn first_range(text: &str, user: &str, uid: u32) -> Option<IdRange> {
    let uid = uid.to_string();
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.split(':');
            let owner = fields.next()?;
            let first = fields.next()?.parse().ok()?;
            let count = fields.next()?.parse().ok()?;
            (owner == user || owner == uid).then_some(IdRange { first, count })
        })
        .find(|range| range.count >= MIN_IDS)
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: an all-zero passwd is a valid value to be filled.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives the use of `pwd`.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success `pw_name` points at a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_first_large_enough_range_of_the_user_by_name_or_id_is_taken() {
        let text =
            "# comment\nalice:100000:65536\nroot:300000:1000\nroot:400000:65536\n0:500000:65536\n";
        assert_eq!(
            first_range(text, "root", 0),
            Some(IdRange {
                first: 400_000,
                count: 65_536
            })
        );
        assert_eq!(
            first_range("0:500000:70000\n", "root", 0),
            Some(IdRange {
                first: 500_000,
                count: 70_000
            })
        );
        assert_eq!(first_range(text, "bob", 1001), None);
        assert_eq!(first_range("root:x:65536\nroot:1:2:3\n", "root", 0), None);
    }

    #[test]
    fn a_user_without_a_range_is_told_which_line_to_add() {
        let dir = tempfile::tempdir().unwrap();
        let subuid = dir.path().join("subuid");
        let subgid = dir.path().join("subgid");
        std::fs::write(&subuid, "root:200000:65536\n").unwrap();
        std::fs::write(&subgid, "").unwrap();
        let err = UserNamespace::from_files(&subuid, &subgid, "root", 0).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("subgid") && text.contains("root:200000:65536"),
            "{text}"
        );
        std::fs::write(&subgid, "root:300000:65536\n").unwrap();
        let ns = UserNamespace::from_files(&subuid, &subgid, "root", 0).unwrap();
        assert_eq!((ns.uids.first, ns.gids.first), (200_000, 300_000));
    }
}
