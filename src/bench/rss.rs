//! The process's resident memory, read from `/proc/self/status` (Linux only; elsewhere
//! every reading is `None`), and a sampler that tracks its peak during a run.
//!
//! The kernel's own high-water mark (`VmHWM`) covers the whole life of the process, so
//! it cannot tell one run from the previous one; sampling `VmRSS` every few milliseconds
//! can, at the price of missing a spike shorter than the interval.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Resident set size of this process in bytes.
pub(crate) fn current_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A thread that reads the RSS every `every` and keeps the highest reading. A thread,
/// not a task: a busy runtime must not delay the samples.
pub(crate) struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl PeakSampler {
    /// Starts sampling; `None` where the RSS cannot be read.
    pub(crate) fn start(every: Duration) -> Option<Self> {
        let first = current_rss()?;
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(first));
        let thread = std::thread::Builder::new()
            .name("bench-rss".into())
            .spawn({
                let stop = stop.clone();
                let peak = peak.clone();
                move || {
                    while !stop.load(Ordering::Acquire) {
                        if let Some(rss) = current_rss() {
                            peak.fetch_max(rss, Ordering::AcqRel);
                        }
                        std::thread::sleep(every);
                    }
                }
            })
            .ok()?;
        Some(PeakSampler { stop, peak, thread })
    }

    /// Stops sampling and returns the peak, this last reading included.
    pub(crate) fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
        if let Some(rss) = current_rss() {
            self.peak.fetch_max(rss, Ordering::AcqRel);
        }
        self.peak.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_parsed_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_sampler_sees_memory_that_is_touched() {
        let sampler = PeakSampler::start(Duration::from_millis(1)).unwrap();
        let before = current_rss().unwrap();
        let big = vec![1u8; 64 << 20];
        std::thread::sleep(Duration::from_millis(20));
        drop(std::hint::black_box(big));
        let peak = sampler.finish();
        assert!(peak >= before + (60 << 20), "peak {peak}, before {before}");
    }
}
