//! API tokens: who may call the HTTP api and what they may do.
//!
//! A tokens file (`auth.tokens_file`) lists named tokens, each with a secret (or the
//! SHA-256 of one) and its scopes:
//!
//! ```toml
//! [[token]]
//! name = "deployer"   # shown in the audit trail and logs, never the secret
//! secret = "…"        # or sha256 = "<64 hex digits of the secret's SHA-256>"
//! scopes = ["admin"]  # admin ⊇ submit ⊇ read
//! ```
//!
//! A request presents `Authorization: Bearer <secret>`. [`TokenSet::verify`] hashes it
//! once and compares the digest with every token's in constant time (all of them, every
//! time), so neither the answer's content nor its timing tells which bytes matched. The
//! set keeps digests only; a secret is never logged, printed or shown in an error.
//!
//! [`Tokens`] is the live set the api reads: [`Tokens::watch`] reads the file again every
//! [`RELOAD_EVERY`] and swaps in what it holds when it changed and parses (a Kubernetes
//! Secret update), so tokens are added and revoked without a restart; a file that no
//! longer parses is logged and the previous set kept.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// How often a running node reads its tokens file again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// The shortest secret a tokens file may hold (a guessable secret is no secret).
pub const MIN_SECRET_LEN: usize = 16;

/// What a token allows; each scope includes those below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// GET of operations, routes, the cluster, metrics, events and failures.
    Read,
    /// `read`, and POST of operations and batches.
    Submit,
    /// Everything: route writes, cluster join and leave, the audit trail.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Submit, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A known token: its name, the digest of its secret and its widest scope.
#[derive(Clone)]
struct Token {
    name: Arc<str>,
    digest: [u8; 32],
    scope: Scope,
}

/// Who presented a token that matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub name: Arc<str>,
    pub scope: Scope,
}

/// The tokens of one version of the file.
#[derive(Clone, Default)]
pub struct TokenSet {
    tokens: Vec<Token>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: the digests stay out of every printout.
        f.debug_list()
            .entries(
                self.tokens
                    .iter()
                    .map(|t| format!("{} ({})", t.name, t.scope)),
            )
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    secret: Option<String>,
    sha256: Option<String>,
    scopes: Vec<String>,
}

impl TokenSet {
    /// Parses a tokens file's text. Every error names the entry and the field (never a
    /// secret's value).
    pub fn parse(text: &str) -> Result<TokenSet, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        if raw.token.is_empty() {
            return Err("no [[token]] entries".into());
        }
        let mut tokens: Vec<Token> = Vec::with_capacity(raw.token.len());
        for (i, t) in raw.token.into_iter().enumerate() {
            let at = format!("token[{i}]");
            if !crate::config::is_token_name(&t.name) {
                return Err(format!(
                    "{at}: `name` {:?} must be 1 to 64 characters from A-Z a-z 0-9 _ . - @",
                    t.name
                ));
            }
            if tokens.iter().any(|o| *o.name == *t.name) {
                return Err(format!("{at}: `name` {:?} is used twice", t.name));
            }
            let digest = match (t.secret, t.sha256) {
                (Some(s), None) if s.len() >= MIN_SECRET_LEN => Sha256::digest(s.as_bytes()).into(),
                (Some(_), None) => {
                    return Err(format!(
                        "{at} ({}): `secret` must be at least {MIN_SECRET_LEN} bytes",
                        t.name
                    ))
                }
                (None, Some(hex)) => parse_hex_digest(&hex)
                    .ok_or_else(|| format!("{at} ({}): `sha256` must be 64 hex digits", t.name))?,
                _ => {
                    return Err(format!(
                        "{at} ({}): give exactly one of `secret` and `sha256`",
                        t.name
                    ))
                }
            };
            let mut scope = None;
            for s in &t.scopes {
                let parsed = Scope::parse(s).ok_or_else(|| {
                    format!(
                        "{at} ({}): unknown scope {s:?} (scopes: read, submit, admin)",
                        t.name
                    )
                })?;
                scope = scope.max(Some(parsed));
            }
            let scope = scope.ok_or_else(|| format!("{at} ({}): `scopes` is empty", t.name))?;
            tokens.push(Token {
                name: t.name.into(),
                digest,
                scope,
            });
        }
        Ok(TokenSet { tokens })
    }

    /// Reads and parses the tokens file at `path`.
    pub fn load(path: &Path) -> Result<TokenSet, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        TokenSet::parse(&text)
    }

    /// The token whose secret is `secret`, if any. Compares against every token in
    /// constant time.
    pub fn verify(&self, secret: &[u8]) -> Option<Holder> {
        let digest: [u8; 32] = Sha256::digest(secret).into();
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(t);
            }
        }
        found.map(|t| Holder {
            name: t.name.clone(),
            scope: t.scope,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The live token set of a running node, swapped whole when the file changes.
pub struct Tokens {
    path: PathBuf,
    set: ArcSwap<TokenSet>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("path", &self.path)
            .field("set", &**self.set.load())
            .finish()
    }
}

impl Tokens {
    /// The set read at start-up from `path`.
    pub fn new(path: PathBuf, set: TokenSet) -> Arc<Tokens> {
        Arc::new(Tokens {
            path,
            set: ArcSwap::from_pointee(set),
        })
    }

    /// See [`TokenSet::verify`].
    pub fn verify(&self, secret: &[u8]) -> Option<Holder> {
        self.set.load().verify(secret)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again; swaps the set in when its text changed since `last` and it
    /// parses. Returns the text read (to compare with next time).
    fn reload(&self, last: &mut Option<String>) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                if last.is_some() {
                    tracing::warn!(file = %self.path.display(), error = %e,
                        "cannot read the API tokens file; keeping the tokens loaded before");
                    *last = None;
                }
                return;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        match TokenSet::parse(&text) {
            Ok(set) => {
                tracing::info!(file = %self.path.display(), tokens = set.len(), "API tokens reloaded");
                self.set.store(Arc::new(set));
            }
            Err(e) => tracing::warn!(file = %self.path.display(), error = %e,
                "the API tokens file does not parse; keeping the tokens loaded before"),
        }
        *last = Some(text);
    }

    /// Reads the file every [`RELOAD_EVERY`] until `stop`, taking in what changed.
    pub async fn watch(self: Arc<Tokens>, stop: CancellationToken) {
        let mut last = std::fs::read_to_string(&self.path).ok();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let me = self.clone();
            let mut seen = last.take();
            // File reads block; they are small and rare, but keep them off the workers.
            last = tokio::task::spawn_blocking(move || {
                me.reload(&mut seen);
                seen
            })
            .await
            .unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[token]]
        name = "deployer"
        secret = "deployer-secret-0123"
        scopes = ["admin"]

        [[token]]
        name = "reader"
        sha256 = "SHA"
        scopes = ["read"]

        [[token]]
        name = "app"
        secret = "app-secret-0123456"
        scopes = ["read", "submit"]
    "#;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn file() -> String {
        FILE.replace("SHA", &hex(&Sha256::digest(b"reader-secret-0123")))
    }

    #[test]
    fn secrets_and_digests_verify_to_their_names_and_widest_scope() {
        let set = TokenSet::parse(&file()).unwrap();
        let holder = |s: &str| {
            set.verify(s.as_bytes())
                .map(|h| (h.name.to_string(), h.scope))
        };
        assert_eq!(
            holder("deployer-secret-0123"),
            Some(("deployer".into(), Scope::Admin))
        );
        assert_eq!(
            holder("reader-secret-0123"),
            Some(("reader".into(), Scope::Read))
        );
        assert_eq!(
            holder("app-secret-0123456"),
            Some(("app".into(), Scope::Submit))
        );
        assert_eq!(holder("app-secret-012345"), None);
        assert_eq!(holder(""), None);
        let shown = format!("{set:?}");
        assert!(shown.contains("deployer (admin)"), "{shown}");
        assert!(!shown.contains("secret-0123"), "{shown}");
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_entry_and_field_never_the_secret() {
        let cases = [
            ("", "no [[token]] entries"),
            ("[[token]]\nname = \"a\"\nsecret = \"short\"\nscopes = [\"read\"]", "token[0] (a): `secret` must be at least 16 bytes"),
            ("[[token]]\nname = \"a\"\nscopes = [\"read\"]", "exactly one of `secret` and `sha256`"),
            ("[[token]]\nname = \"a\"\nsha256 = \"abc\"\nscopes = [\"read\"]", "`sha256` must be 64 hex digits"),
            ("[[token]]\nname = \"a\"\nsecret = \"0123456789abcdefX\"\nscopes = [\"root\"]", "unknown scope \"root\""),
            ("[[token]]\nname = \"a\"\nsecret = \"0123456789abcdefX\"\nscopes = []", "`scopes` is empty"),
            ("[[token]]\nname = \"a b\"\nsecret = \"0123456789abcdefX\"\nscopes = [\"read\"]", "token[0]: `name` \"a b\""),
            ("[[token]]\nname = \"a\"\nsecret = \"0123456789abcdefX\"\nscopes = [\"read\"]\n[[token]]\nname = \"a\"\nsecret = \"0123456789abcdefY\"\nscopes = [\"read\"]", "token[1]: `name` \"a\" is used twice"),
            ("[[token]]\nname = \"a\"\nsecret = \"0123456789abcdefX\"\nscope = [\"read\"]", "unknown field `scope`"),
        ];
        for (text, want) in cases {
            let e = TokenSet::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("0123456789abcdef"), "the secret leaked: {e}");
        }
    }

    #[test]
    fn reload_swaps_in_a_changed_file_and_keeps_the_old_set_when_the_new_one_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, file()).unwrap();
        let tokens = Tokens::new(path.clone(), TokenSet::load(&path).unwrap());
        let mut last = std::fs::read_to_string(&path).ok();
        assert!(tokens.verify(b"app-secret-0123456").is_some());

        std::fs::write(
            &path,
            "[[token]]\nname = \"new\"\nsecret = \"new-secret-0123456\"\nscopes = [\"read\"]",
        )
        .unwrap();
        tokens.reload(&mut last);
        assert!(tokens.verify(b"app-secret-0123456").is_none(), "revoked");
        assert!(tokens.verify(b"new-secret-0123456").is_some(), "added");

        std::fs::write(&path, "not toml [").unwrap();
        tokens.reload(&mut last);
        assert!(tokens.verify(b"new-secret-0123456").is_some(), "kept");
        std::fs::remove_file(&path).unwrap();
        tokens.reload(&mut last);
        assert!(tokens.verify(b"new-secret-0123456").is_some(), "kept");
    }
}
