//! Helpers the engine's integration tests share.

use std::time::{Duration, Instant};

/// Waits until `cond` holds, failing the test after `deadline`.
pub async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
