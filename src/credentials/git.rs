//! Git credentials of a request: the ones its `GitConfig` carried, or the user-info of its
//! remote URL. Kept in memory only; their `Debug` shows nothing.

/// Credentials for cloning over HTTP(S), from the request's `GitConfig`. Kept in memory only.
#[derive(Clone)]
pub struct GitCredentials {
    /// The user name.
    pub user: String,
    /// The password or token.
    pub password: String,
}

/// The user-info of a git remote URL as the client sent it (`user:password` in
/// `https://user:password@host/r.git`, still percent-encoded). Split off at the edge: the
/// journal, replies and git's argv get the URL without it; git gets the credential through
/// its environment; mk3's ref hash puts it back, so refs match what mk3 computes.
#[derive(Clone)]
pub struct UrlUserinfo(String);

impl std::fmt::Debug for UrlUserinfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlUserinfo(<redacted>)")
    }
}

impl UrlUserinfo {
    /// Splits the user-info off `uri` when it holds a credential: a password, or on http(s)
    /// any user (a token sent as the user name). Returns the URI without it.
    pub fn split(uri: &str) -> (String, Option<Self>) {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return (uri.to_owned(), None);
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return (uri.to_owned(), None);
        };
        let userinfo = &rest[..at];
        let web = matches!(scheme, "http" | "https");
        if !(web || userinfo.contains(':')) {
            return (uri.to_owned(), None);
        }
        (
            format!("{scheme}://{}", &rest[at + 1..]),
            Some(Self(userinfo.to_owned())),
        )
    }

    /// `uri` (split by [`UrlUserinfo::split`]) as the client sent it.
    pub fn restore(&self, uri: &str) -> String {
        match uri.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{}@{rest}", self.0),
            None => uri.to_owned(),
        }
    }

    /// The credential, percent-decoded.
    pub fn credentials(&self) -> GitCredentials {
        let (user, password) = self.0.split_once(':').unwrap_or((&self.0, ""));
        GitCredentials {
            user: percent_decode(user),
            password: percent_decode(password),
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GitCredentials(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn url_userinfo_is_split_off_restored_exactly_and_decoded() {
        let sent = "https://bob:p%40ss:w@git.example:8443/r.git";
        let (bare, info) = UrlUserinfo::split(sent);
        assert_eq!(bare, "https://git.example:8443/r.git");
        let info = info.unwrap();
        assert_eq!(info.restore(&bare), sent);
        let c = info.credentials();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("bob", "p@ss:w"));
        assert!(!format!("{info:?}").contains("bob"));

        let (bare, info) = UrlUserinfo::split("https://TOKEN@host/r.git");
        assert_eq!(bare, "https://host/r.git");
        assert_eq!(info.unwrap().credentials().user, "TOKEN");
        // An ssh user is no secret; no user-info at all stays as it is.
        for uri in ["ssh://git@host/r.git", "https://host/a@b", "/srv/r.git"] {
            let (bare, info) = UrlUserinfo::split(uri);
            assert_eq!((bare.as_str(), info.is_none()), (uri, true));
        }
    }

    #[test]
    fn git_credentials_never_show_in_debug() {
        let creds = GitCredentials {
            user: "u".into(),
            password: "p".into(),
        };
        assert_eq!(format!("{creds:?}"), "GitCredentials(<redacted>)");
    }
}
