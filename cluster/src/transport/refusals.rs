//! How often a refused connection is logged: at most once per remote address per
//! [`WINDOW`], the next line saying how many were refused from that address without a
//! line of their own. A stranger hammering the cluster port cannot flood the log, and
//! the first refusal from anyone is always logged.
//!
//! Kept apart from the accept loop, a pure decision with the time passed in.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// At most one logged refusal per address in this long.
pub(super) const WINDOW: Duration = Duration::from_secs(10);

/// Addresses tracked at once; beyond it, new addresses share one entry.
const MAX_TRACKED: usize = 1024;

/// The last logged refusal and the count since, per address (`None`: the addresses
/// that found the table full).
#[derive(Default)]
pub(super) struct RefusalLog {
    by_addr: HashMap<Option<IpAddr>, Noted>,
}

struct Noted {
    logged_at: Instant,
    suppressed: u64,
}

impl RefusalLog {
    /// A connection from `ip` was refused at `now`. `Some(n)`: log it, saying `n`
    /// refusals from the same address went unlogged since the last line; `None`: count it
    /// and stay quiet.
    pub(super) fn note(&mut self, ip: IpAddr, now: Instant) -> Option<u64> {
        let key = if self.by_addr.contains_key(&Some(ip)) || self.make_room(now) {
            Some(ip)
        } else {
            None
        };
        match self.by_addr.entry(key) {
            Entry::Vacant(e) => {
                e.insert(Noted {
                    logged_at: now,
                    suppressed: 0,
                });
                Some(0)
            }
            Entry::Occupied(e) => {
                let noted = e.into_mut();
                if now.saturating_duration_since(noted.logged_at) >= WINDOW {
                    let suppressed = std::mem::take(&mut noted.suppressed);
                    noted.logged_at = now;
                    Some(suppressed)
                } else {
                    noted.suppressed += 1;
                    None
                }
            }
        }
    }

    /// Whether a new address can have an entry, after forgetting those last logged a
    /// window ago or more (their next refusal is logged anyway; a count they held is
    /// lost).
    fn make_room(&mut self, now: Instant) -> bool {
        if self.by_addr.len() < MAX_TRACKED {
            return true;
        }
        self.by_addr
            .retain(|_, n| now.saturating_duration_since(n.logged_at) < WINDOW);
        self.by_addr.len() < MAX_TRACKED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_line_per_address_per_window_with_the_count_in_between() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(ip(1), t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.note(ip(1), t0 + Duration::from_secs(i)), None);
        }
        // Another address is logged on its own.
        assert_eq!(log.note(ip(2), t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(log.note(ip(1), t0 + WINDOW), Some(5));
        assert_eq!(log.note(ip(1), t0 + WINDOW + Duration::from_secs(1)), None);
        assert_eq!(log.note(ip(1), t0 + 3 * WINDOW), Some(1));
    }

    #[test]
    fn a_full_table_forgets_old_entries_then_shares_one() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            assert_eq!(log.note(IpAddr::from(i.to_be_bytes()), t0), Some(0));
        }
        // Full of recent entries: the newcomers share one.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.note(ip(200), t1), Some(0));
        assert_eq!(log.note(ip(201), t1), None);
        assert!(log.by_addr.len() <= MAX_TRACKED + 1);
        // A window later the old entries make room.
        let t2 = t0 + WINDOW;
        assert_eq!(log.note(ip(202), t2), Some(0));
        assert_eq!(log.note(ip(202), t2), None);
        assert!(log.by_addr.len() <= 3);
    }
}
