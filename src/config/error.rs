//! [`ConfigError`]: why the settings could not be loaded, and how figment's errors
//! become one that names the key, the value's origin and, never, the cluster secret.

use std::path::PathBuf;

use figment::error::Kind;
use figment::providers::{Format, Toml};
use figment::Figment;

use super::layers::{origin_of, PROFILES};

/// Why the settings could not be loaded. Each is fatal: the node must not start.
///
/// Messages carry their cause inline (no `source()` chain), so printing the error with
/// `{}` tells the whole story.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown profile `{name}` (known profiles: {})", PROFILES.join(", "))]
    UnknownProfile { name: String },

    #[error("cannot read config file `{}`: {error}", path.display())]
    ReadFile {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A key no section has; `key` is its dotted path, `origin` where it was set.
    #[error("unknown key `{key}` in {origin} (expected one of: {})", expected.join(", "))]
    UnknownKey {
        key: String,
        origin: String,
        expected: Vec<String>,
    },

    /// A value of the wrong type, a missing key, or a file that is not TOML: figment's
    /// message, with the key path and where the value came from.
    #[error("{message}")]
    Parse {
        message: String,
        error: Box<figment::Error>,
    },

    /// A value of the right type outside its allowed range or shape.
    #[error(
        "invalid value for `{key}`: {value} (allowed: {allowed}){}",
        origin.as_deref().map(|o| format!(" in {o}")).unwrap_or_default()
    )]
    Invalid {
        key: String,
        value: String,
        allowed: String,
        origin: Option<String>,
    },

    /// A file named by `key` that cannot be used: missing, unreadable, or not what the
    /// key needs (a PEM certificate, key or CA bundle). `error` names the file.
    #[error(
        "invalid value for `{key}`{}: {error}",
        origin.as_deref().map(|o| format!(" in {o}")).unwrap_or_default()
    )]
    File {
        key: String,
        error: String,
        origin: Option<String>,
    },

    /// A key left empty that the value of another key requires; `origin` is where that
    /// other key (`needed_by`) was set, `hint` how to set `key`.
    #[error(
        "`{key}` must be set because `{needed_by}` is set{}: {hint}",
        origin.as_deref().map(|o| format!(" in {o}")).unwrap_or_default()
    )]
    Missing {
        key: String,
        needed_by: String,
        origin: Option<String>,
        hint: String,
    },

    /// The api would serve anyone on a non-loopback address: no tokens, and
    /// `auth.anonymous` does not say that is meant.
    #[error(
        "http.addr {addr} is not a loopback address and the api has no tokens: set \
         `auth.tokens_file` (OPMESH_AUTH__TOKENS_FILE) to a tokens file, or \
         `auth.anonymous = true` (OPMESH_AUTH__ANONYMOUS=true) to serve anyone who can \
         reach the port"
    )]
    Open { addr: std::net::SocketAddr },
}

impl ConfigError {
    /// A user file that is not TOML: where and why, without the parser's excerpt of the
    /// line.
    pub(super) fn syntax(
        path: &std::path::Path,
        text: &str,
        error: &<Toml as Format>::Error,
    ) -> Self {
        let mut message = format!("config file `{}`: TOML parse error", path.display());
        if let Some(span) = error.span() {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            message.push_str(&format!(" at line {line}, column {column}"));
        }
        message.push_str(&format!(": {}", error.message().trim_end()));
        ConfigError::Parse {
            error: Box::new(figment::Error::from(message.clone())),
            message,
        }
    }

    pub(super) fn from_figment(error: figment::Error, figment: &Figment) -> Self {
        if let Kind::UnknownField(field, expected) = &error.kind {
            let mut path = error.path.clone();
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let key = path.join(".");
            // The error carries the metadata of the enclosing table, which may come from
            // another layer than the stray key; ask for the key itself.
            let origin = figment
                .find_metadata(&key)
                .or(error.metadata.as_ref())
                .map_or_else(|| "the configuration".into(), |md| origin_of(md, &path));
            return ConfigError::UnknownKey {
                key,
                origin,
                expected: expected.iter().map(|s| s.to_string()).collect(),
            };
        }
        let message = error
            .clone()
            .into_iter()
            .map(|e| {
                let kind = e.kind.to_string();
                let kind = kind.trim_end();
                let origin = e.metadata.as_ref().map(|md| origin_of(md, &e.path));
                match (e.path.is_empty(), origin) {
                    // A whole layer failed (a TOML syntax error): say which, then why.
                    (true, Some(origin)) => format!("{origin}: {kind}"),
                    (true, None) => kind.to_owned(),
                    (false, origin) => {
                        let mut line = format!("{kind} for key `{}`", e.path.join("."));
                        if let Some(origin) = origin {
                            line.push_str(&format!(" in {origin}"));
                        }
                        line
                    }
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        ConfigError::Parse {
            message,
            error: Box::new(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testutil::{load_err, user_file, with_file, EnvGuard};
    use crate::config::LoadOptions;

    #[test]
    fn value_of_the_wrong_type_names_key_and_variable() {
        let mut env = EnvGuard::new();
        env.set("OPMESH_ENGINE__QUEUE_CAPACITY", "lots");
        let err = load_err(&LoadOptions::default());
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("for key `engine.queue_capacity`"), "{msg}");
        assert!(
            msg.contains("environment variable `OPMESH_ENGINE__QUEUE_CAPACITY`"),
            "{msg}"
        );
    }

    #[test]
    fn missing_or_malformed_user_file_is_an_error() {
        let _env = EnvGuard::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("absent.toml");
        let err = load_err(&LoadOptions {
            config_file: Some(path.clone()),
            ..LoadOptions::default()
        });
        assert!(matches!(err, ConfigError::ReadFile { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));

        let file = user_file("[engine\nbatch_size = 3\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.starts_with("config file `"), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn malformed_user_file_reports_line_and_column_without_quoting_it() {
        let _env = EnvGuard::new();
        let file = user_file("[engine]\nbatch_size = 3\nqueue_capacity = = 4\n");
        let err = load_err(&with_file(&file));
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("config file `"), "{msg}");
        assert!(
            msg.contains("TOML parse error at line 3, column 18: "),
            "{msg}"
        );
        assert!(!msg.contains("queue_capacity"), "{msg}");
    }
}
