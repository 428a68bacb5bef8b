//! `[handlers]`: which built-in handlers a node registers (`builtin`: a deployment that
//! serves real traffic turns `sleep` off), and `[[handlers.http]]`: operation types
//! served by POSTing to a URL, each with its timeout and a retry policy that falls back
//! to `[retry]` key by key.

use std::time::Duration;

use serde::Deserialize;

use super::check::{is_http_url, Check, INITIAL_BACKOFF_MS, MAX_ATTEMPTS, MAX_BACKOFF_MS};
use super::error::ConfigError;
use crate::handlers::{Builtin, HttpTarget};
use crate::op::validate_type_name;
use crate::RetryPolicy;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHandlers {
    /// config/default.toml lists them all.
    builtin: Vec<String>,
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
}

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
                Some(b) if !builtin.contains(&b) => builtin.push(b),
                _ => {
                    return Err(check.invalid(
                        &format!("handlers.builtin[{i}]"),
                        name,
                        format!("one of {}, listed once", builtin_names()),
                    ))
                }
            }
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
            if !is_http_url(&t.url) {
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
            });
        }
        Ok((builtin, http_handlers))
    }
}

fn builtin_names() -> String {
    Builtin::ALL.map(Builtin::name).join(", ")
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
        let file = user_file("[handlers]\nbuiltin = [\"echo\", \"resize\"]\n");
        let c = load_ok(&with_file(&file));
        assert_eq!(c.builtin_handlers, [Builtin::Echo, Builtin::Resize]);

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
                "`handlers.builtin[1]`: \"nap\" (allowed: one of echo, sleep, resize, listed once)",
            ),
            ("[\"echo\", \"echo\"]", "`handlers.builtin[1]`: \"echo\""),
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
            "[handlers]\nbuiltin = [\"echo\"]\n\n[cluster]\naddr = \"127.0.0.1:7071\"\n\
             secret = \"correct-horse-battery-staple\"\nserves = [\"sleep\"]\n",
        );
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.contains("`cluster.serves[0]`: \"sleep\""), "{msg}");
        assert!(msg.contains("handler for, listed once: echo)"), "{msg}");

        let file = user_file(
            "[handlers]\nbuiltin = [\"echo\"]\n[[handlers.http]]\ntype = \"sleep\"\n\
             url = \"http://x\"\ntimeout_ms = 1\n",
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
}
