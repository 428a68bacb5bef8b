//! The process's resident memory, read from `/proc/self/status` (Linux only; elsewhere
//! every reading is `None`): the current resident set (`VmRSS`) and its high-water mark
//! (`VmHWM`), kept by the kernel, so that no spike between two samples is missed.
//!
//! `VmHWM` covers the whole life of the process (start-up included) unless it is reset:
//! writing `5` to `/proc/self/clear_refs` (Linux 4.0 and later) sets it to the current
//! resident set. [`reset_peak`] does that and checks that it took; where it did not (an
//! older kernel, a sandbox that refuses the write), the peak read afterwards is the
//! lifetime one, which can only be higher than the truth, and the report says so.

use serde::Serialize;

/// Where a reported peak comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakSource {
    /// `VmHWM` after it was reset (when the idle reading was taken).
    VmhwmReset,
    /// `VmHWM` over the process's whole life: the reset was not possible.
    VmhwmLifetime,
}

impl PeakSource {
    /// How the text report names it.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            PeakSource::VmhwmReset => "VmHWM since idle",
            PeakSource::VmhwmLifetime => {
                "VmHWM since the process started: it could not be reset, so start-up is included"
            }
        }
    }
}

/// A reading of `/proc/self/status`, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Memory {
    pub rss: u64,
    pub hwm: u64,
}

/// The process's resident set and its high-water mark now.
pub(crate) fn read() -> Option<Memory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status)
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text, in bytes.
pub(crate) fn parse_status(status: &str) -> Option<Memory> {
    Some(Memory {
        rss: field_kb(status, "VmRSS:")? * 1024,
        hwm: field_kb(status, "VmHWM:")? * 1024,
    })
}

fn field_kb(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// How far above the resident set a freshly reset high-water mark may read: the set
/// can shrink between the reset and the reading.
const RESET_SLACK: u64 = 4 << 20;

/// Resets `VmHWM` to the current resident set; returns whether it did. A write that the
/// kernel accepts but ignores is told apart by reading the mark back.
pub(crate) fn reset_peak() -> bool {
    #[cfg(test)]
    let _quiet = tests::quiet();
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        return false;
    }
    read().is_some_and(was_reset)
}

/// Whether a reading taken just after a reset shows the reset: the mark is the resident
/// set, give or take what was freed since. (A mark that was never above the resident
/// set passes too: then the lifetime mark is the same figure.)
pub(crate) fn was_reset(after: Memory) -> bool {
    after.hwm <= after.rss + RESET_SLACK
}

/// The peak since [`reset_peak`] (or since start-up, when the reset failed).
pub(crate) fn peak() -> Option<u64> {
    read().map(|m| m.hwm.max(m.rss))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Mutex, MutexGuard};

    /// Held by a test that reads the mark across a window in which no other test of
    /// this process may reset it.
    static QUIET: Mutex<()> = Mutex::new(());

    pub(crate) fn quiet() -> MutexGuard<'static, ()> {
        QUIET.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by every test that resets the mark and reads it back later (an in-process
    /// bench run, the test below): one reset at a time in this process, so one test's
    /// reset cannot put another's peak below its idle reading.
    pub(crate) static RESETS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[test]
    fn status_fields_are_parsed_in_bytes() {
        let status =
            "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    4321 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(
            parse_status(status),
            Some(Memory {
                rss: 1234 * 1024,
                hwm: 4321 * 1024
            })
        );
        assert_eq!(parse_status("Name:\tx\nVmRSS:\t 12 kB\n"), None);
        assert_eq!(parse_status("VmHWM:\t12 MB\nVmRSS:\t12 kB\n"), None);
        assert_eq!(parse_status("VmHWM:\tlots kB\nVmRSS:\t12 kB\n"), None);
    }

    #[test]
    fn a_reset_is_recognised_by_the_mark_meeting_the_resident_set() {
        let mb = 1 << 20;
        assert!(was_reset(Memory {
            rss: 100 * mb,
            hwm: 100 * mb
        }));
        assert!(was_reset(Memory {
            rss: 100 * mb,
            hwm: 102 * mb
        }));
        assert!(!was_reset(Memory {
            rss: 100 * mb,
            hwm: 300 * mb
        }));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_peak_sees_memory_touched_and_freed_and_a_reset_forgets_it() {
        let _alone = RESETS.blocking_lock();
        let window = quiet();
        let before = read().unwrap();
        let big = vec![1u8; 64 << 20];
        drop(std::hint::black_box(big));
        // No sampling: the kernel's mark saw the 64 MB however briefly they lived.
        let after = read().unwrap();
        drop(window);
        assert!(
            after.hwm >= before.rss + (60 << 20),
            "{after:?} after {before:?}"
        );
        if reset_peak() {
            let reset = read().unwrap();
            assert!(reset.hwm < after.hwm, "{reset:?} after {after:?}");
        }
    }
}
