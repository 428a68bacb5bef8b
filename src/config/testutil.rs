//! What the config tests share: an [`EnvGuard`] that serializes every test touching
//! the process environment (one lock for all of them, whatever section they test), a
//! user file in a temporary directory, and `load` that must succeed or must fail.

use std::ffi::OsString;
use std::io::Write;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{load, Config, ConfigError, LoadOptions};

/// Serializes every test that reads or writes the process environment, and restores
/// it afterwards. On creation it removes every `OPMESH_*` variable (and the pod's
/// `POD_NAME` and `POD_NAMESPACE`), so a developer's shell cannot change what the tests
/// see.
pub(crate) struct EnvGuard {
    saved: Vec<(OsString, Option<OsString>)>,
    _lock: MutexGuard<'static, ()>,
}

static ENV_LOCK: Mutex<()> = Mutex::new(());

impl EnvGuard {
    pub(crate) fn new() -> Self {
        let lock = ENV_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let mut guard = EnvGuard {
            saved: Vec::new(),
            _lock: lock,
        };
        for (name, _) in std::env::vars_os() {
            let name_str = name.to_string_lossy();
            if name_str.starts_with("OPMESH_")
                || name_str == "POD_NAME"
                || name_str == "POD_NAMESPACE"
            {
                guard.save(&name);
                std::env::remove_var(&name);
            }
        }
        guard
    }

    fn save(&mut self, name: &OsString) {
        if !self.saved.iter().any(|(n, _)| n == name) {
            self.saved.push((name.clone(), std::env::var_os(name)));
        }
    }

    pub(super) fn set(&mut self, name: &str, value: &str) {
        self.save(&name.into());
        std::env::set_var(name, value);
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (name, value) in self.saved.drain(..).rev() {
            match value {
                Some(v) => std::env::set_var(&name, v),
                None => std::env::remove_var(&name),
            }
        }
    }
}

pub(super) fn user_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(contents.as_bytes()).expect("write temp file");
    f
}

pub(super) fn with_file(file: &tempfile::NamedTempFile) -> LoadOptions {
    LoadOptions {
        config_file: Some(file.path().to_owned()),
        ..LoadOptions::default()
    }
}

pub(crate) fn load_ok(opts: &LoadOptions) -> Config {
    load(opts).unwrap_or_else(|e| panic!("config should load: {e}"))
}

pub(super) fn load_err(opts: &LoadOptions) -> ConfigError {
    match load(opts) {
        Ok(c) => panic!("config should be rejected, got {c:?}"),
        Err(e) => e,
    }
}

pub(super) fn profile(name: &str) -> LoadOptions {
    LoadOptions {
        profile: Some(name.into()),
        ..LoadOptions::default()
    }
}
