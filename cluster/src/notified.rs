//! Waiting for a condition that a [`Notify`] announces, with a deadline.

use std::time::Duration;

use tokio::sync::Notify;

/// What `check` answers once it answers something, waking each time `changed` is
/// notified, for at most `wait`; after that, `check`'s last answer. `check` is asked after
/// registering for the next notification, so a change in between is not missed.
pub(crate) async fn until<T>(
    changed: &Notify,
    wait: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(v) = check() {
            return Some(v);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return check();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, OnceLock};
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn a_waiter_sees_a_value_set_a_moment_later_or_gives_up() {
        let (cell, set) = (Arc::new(OnceLock::new()), Arc::new(Notify::new()));
        let setter = {
            let (cell, set) = (cell.clone(), set.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let _ = cell.set(7);
                set.notify_waiters();
            })
        };
        let waited = Instant::now();
        assert_eq!(
            until(&set, Duration::from_secs(10), || cell.get()).await,
            Some(&7)
        );
        assert!(waited.elapsed() < Duration::from_secs(5), "woken when set");
        setter.await.unwrap();
        // Set already: answered at once.
        assert_eq!(until(&set, Duration::ZERO, || cell.get()).await, Some(&7));
        // Never set: none, after the wait.
        let never: OnceLock<u8> = OnceLock::new();
        let started = Instant::now();
        assert_eq!(
            until(&set, Duration::from_millis(50), || never.get()).await,
            None
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
