//! `[auth]`: who may call the HTTP api. Tokens come from a file (`auth.tokens_file`, see
//! [`crate::auth`]), read and checked at start-up so a bad file stops the node with a
//! message naming it. Without tokens the api is open to whoever reaches it, which the
//! node allows only on a loopback address unless `auth.anonymous = true` says so.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::check::Check;
use super::error::ConfigError;
use crate::auth::TokenSet;

/// The api's access settings, checked.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// The tokens file and what it held at start-up; `None`: no tokens, the api is open.
    pub tokens: Option<(PathBuf, TokenSet)>,
    /// Serve without tokens on an address other than loopback.
    pub anonymous: bool,
    /// `/metrics` needs a token with `read` too (it is open by default, for scrapers).
    pub protect_metrics: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    tokens_file: String,
    anonymous: bool,
    protect_metrics: bool,
}

impl RawAuth {
    pub(super) fn validate(
        self,
        check: &Check<'_>,
        http_addr: SocketAddr,
    ) -> Result<AuthConfig, ConfigError> {
        let tokens = if self.tokens_file.is_empty() {
            None
        } else {
            let path = PathBuf::from(&self.tokens_file);
            let set = TokenSet::load(&path).map_err(|e| {
                check.invalid(
                    "auth.tokens_file",
                    &self.tokens_file,
                    format!("a TOML file of [[token]] entries with name, secret or sha256, and scopes; {e}"),
                )
            })?;
            Some((path, set))
        };
        if tokens.is_none() && !self.anonymous && !http_addr.ip().is_loopback() {
            return Err(ConfigError::Open { addr: http_addr });
        }
        Ok(AuthConfig {
            tokens,
            anonymous: self.anonymous,
            protect_metrics: self.protect_metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{load_err, load_ok, EnvGuard};
    use crate::config::LoadOptions;

    #[test]
    fn a_public_address_without_tokens_is_refused_unless_anonymous_says_so() {
        let mut env = EnvGuard::new();
        let public = LoadOptions {
            http_addr: Some("0.0.0.0:7070".into()),
            ..LoadOptions::default()
        };
        let msg = load_err(&public).to_string();
        assert!(msg.contains("0.0.0.0:7070"), "{msg}");
        assert!(msg.contains("auth.tokens_file"), "{msg}");
        assert!(msg.contains("auth.anonymous"), "{msg}");
        // Loopback needs nothing.
        assert!(load_ok(&LoadOptions::default()).auth.tokens.is_none());

        env.set("OPMESH_AUTH__ANONYMOUS", "true");
        let c = load_ok(&public);
        assert!(c.auth.anonymous && c.auth.tokens.is_none());
    }

    #[test]
    fn a_tokens_file_is_read_at_start_and_a_bad_one_is_named() {
        let mut env = EnvGuard::new();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(
            &path,
            "[[token]]\nname = \"ops\"\nsecret = \"ops-secret-0123456\"\nscopes = [\"admin\"]\n",
        )
        .unwrap();
        env.set("OPMESH_AUTH__TOKENS_FILE", path.to_str().unwrap());
        let public = LoadOptions {
            http_addr: Some("0.0.0.0:7070".into()),
            ..LoadOptions::default()
        };
        let c = load_ok(&public);
        let (p, set) = c.auth.tokens.as_ref().unwrap();
        assert_eq!(p, &path);
        assert_eq!(set.len(), 1);

        std::fs::write(&path, "[[token]]\nname = \"ops\"\nscopes = [\"admin\"]\n").unwrap();
        let msg = load_err(&public).to_string();
        assert!(
            msg.starts_with("invalid value for `auth.tokens_file`"),
            "{msg}"
        );
        assert!(
            msg.contains("exactly one of `secret` and `sha256`"),
            "{msg}"
        );

        env.set("OPMESH_AUTH__TOKENS_FILE", "/nonexistent/tokens.toml");
        let msg = load_err(&public).to_string();
        assert!(
            msg.contains("cannot read /nonexistent/tokens.toml"),
            "{msg}"
        );
    }
}
