//! `[handlers]`: which built-in handlers a node registers (`builtin` for `echo` and
//! `resize`; `builtin_sleep` for `sleep`, which holds a running slot as long as it is
//! asked to, so a deployment that serves real traffic turns it off), and `[[handlers.http]]`: operation types
//! served by POSTing to a URL, each with its timeout, a retry policy that falls back
//! to `[retry]` key by key, and what it trusts and accepts: its `ca_file` (read here,
//! so a bad one stops start-up), the largest answer it reads (`max_response_bytes`) and
//! whether it follows redirects.

use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::check::{
    is_http_url, Check, INITIAL_BACKOFF_MS, KIB, MAX_ATTEMPTS, MAX_BACKOFF_MS, MIB,
};
use super::error::ConfigError;
use crate::handlers::{Builtin, HttpTarget};
use crate::op::validate_type_name;
use crate::RetryPolicy;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHandlers {
    /// config/default.toml lists them all (but `sleep`, which `builtin_sleep` turns on).
    builtin: Vec<String>,
    builtin_sleep: bool,
    #[serde(default)]
    http: Vec<RawHttpTarget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpTarget {
    #[serde(rename = "type")]
    op_type: String,
    url: String,
    timeout_ms: u64,
    max_attempts: Option<u64>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    ca_file: Option<String>,
    max_response_bytes: Option<u64>,
    follow_redirects: Option<bool>,
}

/// The largest answer a webhook reads when its entry sets none.
const DEFAULT_MAX_RESPONSE_BYTES: u64 = MIB;
const MAX_RESPONSE_BYTES: RangeInclusive<u64> = KIB..=256 * MIB;

impl RawHandlers {
    /// `max_type_len` is `engine.max_type_len`; `retry` the `[retry]` policy, which an
    /// entry's own retry keys override one by one.
    pub(super) fn validate(
        self,
        check: &Check<'_>,
        max_type_len: usize,
        retry: &RetryPolicy,
    ) -> Result<(Vec<Builtin>, Vec<HttpTarget>), ConfigError> {
        let mut builtin: Vec<Builtin> = Vec::with_capacity(self.builtin.len());
        for (i, name) in self.builtin.iter().enumerate() {
            match Builtin::from_name(name) {
                Some(b) if b != Builtin::Sleep && !builtin.contains(&b) => builtin.push(b),
                _ => {
                    return Err(check.invalid(
                        &format!("handlers.builtin[{i}]"),
                        name,
                        format!(
                            "one of {}, listed once (`sleep` is turned on by \
                             handlers.builtin_sleep)",
                            listed_builtin_names()
                        ),
                    ))
                }
            }
        }
        if self.builtin_sleep {
            builtin.push(Builtin::Sleep);
        }
        let mut http_handlers: Vec<HttpTarget> = Vec::with_capacity(self.http.len());
        for (i, t) in self.http.into_iter().enumerate() {
            let prefix = format!("handlers.http[{i}]");
            let key = |name: &str| format!("{prefix}.{name}");

            let type_ok = validate_type_name(&t.op_type, max_type_len).is_ok();
            if !type_ok {
                return Err(check.invalid(
                    &key("type"),
                    &t.op_type,
                    format!(
                        "1 to engine.max_type_len ({max_type_len}) characters from \
                         A-Z a-z 0-9 _ - . : /"
                    ),
                ));
            }
            // Built-in names stay reserved when their handler is off.
            if Builtin::from_name(&t.op_type).is_some()
                || http_handlers.iter().any(|h| h.op_type == t.op_type)
            {
                return Err(check.invalid(
                    &key("type"),
                    &t.op_type,
                    format!(
                        "a type no other handler has (built in: {})",
                        builtin_names()
                    ),
                ));
            }
            // Parsed as reqwest will (`is_http_url` alone lets `http://a b` through).
            if !is_http_url(&t.url) || reqwest::Url::parse(&t.url).is_err() {
                return Err(check.invalid(
                    &key("url"),
                    &t.url,
                    "an http:// or https:// URL with a host",
                ));
            }
            let timeout = check.millis(&key("timeout_ms"), t.timeout_ms, 1..=600_000)?;

            let max_attempts = match t.max_attempts {
                Some(n) => check.range(&key("max_attempts"), n, MAX_ATTEMPTS)? as u32,
                None => retry.max_attempts,
            };
            let initial_ms = match t.initial_backoff_ms {
                Some(ms) => check.range(&key("initial_backoff_ms"), ms, INITIAL_BACKOFF_MS)?,
                None => retry.initial_backoff.as_millis() as u64,
            };
            let max_ms = match t.max_backoff_ms {
                Some(ms) => check.range(&key("max_backoff_ms"), ms, MAX_BACKOFF_MS)?,
                None => retry.max_backoff.as_millis() as u64,
            };
            check.backoff_order(&prefix, initial_ms, max_ms, t.max_backoff_ms.is_some())?;
            let trust = match t.ca_file.as_deref().filter(|f| !f.is_empty()) {
                None => Vec::new(),
                Some(file) => crate::tls::read_ca_file(Path::new(file))
                    .map_err(|e| check.file(&key("ca_file"), e))?,
            };
            let max_response_bytes = check.count(
                &key("max_response_bytes"),
                t.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
                MAX_RESPONSE_BYTES,
            )?;

            http_handlers.push(HttpTarget {
                op_type: t.op_type,
                url: t.url,
                timeout,
                retry: RetryPolicy {
                    max_attempts,
                    initial_backoff: Duration::from_millis(initial_ms),
                    max_backoff: Duration::from_millis(max_ms),
                    ..retry.clone()
                },
                trust,
                max_response_bytes,
                follow_redirects: t.follow_redirects.unwrap_or(false),
            });
        }
        Ok((builtin, http_handlers))
    }
}

fn builtin_names() -> String {
    Builtin::ALL.map(Builtin::name).join(", ")
}

/// The built-in handlers `handlers.builtin` lists (all but `sleep`).
fn listed_builtin_names() -> String {
    Builtin::ALL
        .into_iter()
        .filter(|b| *b != Builtin::Sleep)
        .map(Builtin::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The types this node has a handler for: the built-in ones it registers, then
/// `targets`' in order.
pub(super) fn handled_types<'a>(builtin: &[Builtin], targets: &'a [HttpTarget]) -> Vec<&'a str> {
    builtin
        .iter()
        .map(|b| b.name())
        .chain(targets.iter().map(|h| h.op_type.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::testutil::{load_err, load_ok, user_file, with_file, EnvGuard};
    use crate::config::LoadOptions;
    use crate::handlers::Builtin;

    #[test]
    fn builtin_handlers_can_be_turned_off_one_by_one() {
        let mut env = EnvGuard::new();
        let file = user_file("[handlers]\nbuiltin = [\"resize\"]\n");
        let c = load_ok(&with_file(&file));
        assert_eq!(c.builtin_handlers, [Builtin::Resize, Builtin::Sleep]);
        let file = user_file("[handlers]\nbuiltin_sleep = false\n");
        let c = load_ok(&with_file(&file));
        assert_eq!(c.builtin_handlers, [Builtin::Echo, Builtin::Resize]);
        env.set("OPMESH_HANDLERS__BUILTIN_SLEEP", "false");

        env.set("OPMESH_HANDLERS__BUILTIN", "echo");
        assert_eq!(
            load_ok(&LoadOptions::default()).builtin_handlers,
            [Builtin::Echo]
        );
        env.set("OPMESH_HANDLERS__BUILTIN", "");
        assert!(load_ok(&LoadOptions::default()).builtin_handlers.is_empty());
        drop(env);
        let _env = EnvGuard::new();

        for (list, expected) in [
            (
                "[\"echo\", \"nap\"]",
                "`handlers.builtin[1]`: \"nap\" (allowed: one of echo, resize, listed once \
                 (`sleep` is turned on by handlers.builtin_sleep))",
            ),
            ("[\"echo\", \"echo\"]", "`handlers.builtin[1]`: \"echo\""),
            ("[\"sleep\"]", "`handlers.builtin[0]`: \"sleep\""),
        ] {
            let file = user_file(&format!("[handlers]\nbuiltin = {list}\n"));
            let msg = load_err(&with_file(&file)).to_string();
            assert!(msg.contains(expected), "{list}: {msg}");
        }
    }

    #[test]
    fn a_type_whose_builtin_is_off_is_neither_served_nor_free_for_an_http_handler() {
        let _env = EnvGuard::new();
        let file = user_file(
            "[handlers]\nbuiltin = [\"echo\"]\nbuiltin_sleep = false\n\n[cluster]\n\
             addr = \"127.0.0.1:7071\"\nsecret = \"correct-horse-battery-staple\"\n\
             serves = [\"sleep\"]\n",
        );
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.contains("`cluster.serves[0]`: \"sleep\""), "{msg}");
        assert!(msg.contains("handler for, listed once: echo)"), "{msg}");

        let file = user_file(
            "[handlers]\nbuiltin = [\"echo\"]\nbuiltin_sleep = false\n[[handlers.http]]\n\
             type = \"sleep\"\nurl = \"http://x\"\ntimeout_ms = 1\n",
        );
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.contains("`handlers.http[0].type`: \"sleep\""), "{msg}");
    }

    #[test]
    fn http_handlers_load_with_their_own_or_the_default_retry() {
        let _env = EnvGuard::new();
        let file = user_file(
            r#"
            [retry]
            max_attempts = 4

            [[handlers.http]]
            type = "webhook"
            url = "https://hooks.example.com/in"
            timeout_ms = 2500

            [[handlers.http]]
            type = "audit.log"
            url = "http://127.0.0.1:9000/audit"
            timeout_ms = 100
            max_attempts = 1
            max_backoff_ms = 50
            "#,
        );
        let c = load_ok(&with_file(&file));
        let [a, b] = &c.http_handlers[..] else {
            panic!("two handlers expected: {:?}", c.http_handlers)
        };
        assert_eq!(a.op_type, "webhook");
        assert_eq!(a.url, "https://hooks.example.com/in");
        assert_eq!(a.timeout, Duration::from_millis(2500));
        assert_eq!(a.retry, c.engine.retry);
        assert_eq!(a.retry.max_attempts, 4);

        assert_eq!(b.op_type, "audit.log");
        assert_eq!(b.retry.max_attempts, 1);
        assert_eq!(b.retry.initial_backoff, Duration::from_millis(10));
        assert_eq!(b.retry.max_backoff, Duration::from_millis(50));
        assert_eq!(b.retry.multiplier, c.engine.retry.multiplier);
    }

    #[test]
    fn bad_http_handlers_are_rejected_naming_the_entry() {
        let _env = EnvGuard::new();
        let cases = [
            (
                "type = \"a\"\nurl = \"ftp://x\"\ntimeout_ms = 1",
                "`handlers.http[0].url`: \"ftp://x\"",
            ),
            (
                "type = \"echo\"\nurl = \"http://x\"\ntimeout_ms = 1",
                "`handlers.http[0].type`: \"echo\"",
            ),
            (
                "type = \"a b\"\nurl = \"http://x\"\ntimeout_ms = 1",
                "`handlers.http[0].type`: \"a b\"",
            ),
            (
                "type = \"a\"\nurl = \"http://x\"\ntimeout_ms = 0",
                "`handlers.http[0].timeout_ms`: 0 (allowed: 1..=600000)",
            ),
            (
                "type = \"a\"\nurl = \"http://x\"\ntimeout_ms = 1\ninitial_backoff_ms = 5000",
                "`handlers.http[0].initial_backoff_ms`: 5000 (allowed: 0..=1000",
            ),
        ];
        for (entry, expected) in cases {
            let file = user_file(&format!("[[handlers.http]]\n{entry}\n"));
            let msg = load_err(&with_file(&file)).to_string();
            assert!(msg.contains(expected), "{entry:?}: {msg}");
        }

        let dup = "[[handlers.http]]\ntype = \"a\"\nurl = \"http://x\"\ntimeout_ms = 1\n";
        let file = user_file(&format!("{dup}{dup}"));
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.contains("`handlers.http[1].type`: \"a\""), "{msg}");

        let file = user_file("[[handlers.http]]\ntype = \"a\"\ntimeout_ms = 1\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.contains("missing field `url`"), "{msg}");
    }

    #[test]
    fn webhook_tls_cap_and_redirects_have_defaults_and_checked_values() {
        let _env = EnvGuard::new();
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::tls::testutil::Ca::new("hooks ca");
        let ca_file = crate::tls::testutil::write(dir.path(), "ca.pem", &ca.cert.pem());
        let file = user_file(&format!(
            "[[handlers.http]]\ntype = \"a\"\nurl = \"https://x/\"\ntimeout_ms = 1\n\
             [[handlers.http]]\ntype = \"b\"\nurl = \"https://x/\"\ntimeout_ms = 1\n\
             ca_file = {ca_file:?}\nmax_response_bytes = 2048\nfollow_redirects = true\n"
        ));
        let c = load_ok(&with_file(&file));
        let [a, b] = &c.http_handlers[..] else {
            panic!("two handlers expected")
        };
        assert_eq!(
            (a.trust.len(), a.max_response_bytes, a.follow_redirects),
            (0, 1 << 20, false)
        );
        assert_eq!(
            (b.trust.len(), b.max_response_bytes, b.follow_redirects),
            (1, 2048, true)
        );

        let absent = dir.path().join("absent.pem");
        let cases = [
            (
                "max_response_bytes = 1023".to_owned(),
                "`handlers.http[0].max_response_bytes`: 1023 (allowed: 1024..=268435456)"
                    .to_owned(),
            ),
            (
                format!("ca_file = {absent:?}"),
                format!(
                    "invalid value for `handlers.http[0].ca_file` in config file `{}`: \
                     cannot read `{}`",
                    "{file}",
                    absent.display()
                ),
            ),
            (
                "url = \"http://a b/\"".to_owned(),
                "`handlers.http[0].url`: \"http://a b/\"".to_owned(),
            ),
        ];
        for (line, expected) in cases {
            let file = user_file(&format!(
                "[[handlers.http]]\ntype = \"a\"\ntimeout_ms = 1\n{}{line}\n",
                if line.starts_with("url") {
                    ""
                } else {
                    "url = \"https://x/\"\n"
                }
            ));
            let expected = expected.replace("{file}", &file.path().display().to_string());
            let msg = load_err(&with_file(&file)).to_string();
            assert!(msg.contains(&expected), "{line}: {msg}");
        }
    }

    #[test]
    fn a_webhook_url_is_shown_redacted_in_debug_output() {
        let _env = EnvGuard::new();
        let file = user_file(
            "[[handlers.http]]\ntype = \"a\"\nurl = \"https://u:pw@x/in?token=secret\"\n\
             timeout_ms = 1\n",
        );
        let c = load_ok(&with_file(&file));
        assert_eq!(c.http_handlers[0].url, "https://u:pw@x/in?token=secret");
        let debug = format!("{c:?}");
        assert!(debug.contains("\"https://x/in\""), "{debug}");
        assert!(
            !debug.contains("secret") && !debug.contains("pw"),
            "{debug}"
        );
    }
}
