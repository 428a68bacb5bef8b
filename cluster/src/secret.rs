//! The cluster's shared secret: the key both ends of a link prove they hold when it opens
//! (see [`crate::transport`]'s handshake).
//!
//! A [`Secret`] never prints its bytes: `Debug` and `Display` show `<redacted>`, so a
//! configuration, an error or a log line that carries one cannot leak it. Only
//! [`Secret::expose`] hands the bytes out, for the HMAC and nothing else.

use std::fmt;

/// What [`Secret`]'s `Debug` and `Display` show instead of the bytes.
const REDACTED: &str = "<redacted>";

/// The shared secret of a cluster. Cheap enough to clone (a few dozen bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// The secret's bytes, for authenticating cluster links; never log or print them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(REDACTED, f)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s.into_bytes())
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.as_bytes().to_vec())
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }
}

impl From<&[u8]> for Secret {
    fn from(bytes: &[u8]) -> Self {
        Secret(bytes.to_vec())
    }
}

impl<const N: usize> From<&[u8; N]> for Secret {
    fn from(bytes: &[u8; N]) -> Self {
        Secret(bytes.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_never_prints_its_bytes() {
        let s = Secret::from("hunter2-but-longer".to_string());
        assert_eq!(format!("{s:?}"), "\"<redacted>\"");
        assert_eq!(s.to_string(), "<redacted>");
        assert!(!format!("{s:?} {s} {s:#?}").contains("hunter2"));
        assert_eq!(s.expose(), b"hunter2-but-longer");
    }

    #[test]
    fn every_source_holds_the_same_bytes() {
        let want = Secret::new(b"abc".to_vec());
        for s in [
            Secret::from("abc".to_string()),
            Secret::from("abc"),
            Secret::from(b"abc".to_vec()),
            Secret::from(&b"abc"[..]),
            Secret::from(b"abc"),
        ] {
            assert_eq!(s, want);
        }
    }
}
