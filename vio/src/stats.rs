//! Statistics that are cheap to record from hot paths (fault-in, restore), a log limiter for
//! events a guest can trigger at will, and the one-line form of an error chain for logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Log-linear buckets, 8 per power of two: ~12% resolution, lock-free recording.
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..64 * 8).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LatencyHistogram {
    fn index(ns: u64) -> usize {
        if ns < 8 {
            return ns as usize;
        }
        let msb = 63 - ns.leading_zeros() as usize;
        msb * 8 + ((ns >> (msb - 3)) & 7) as usize
    }

    pub fn record(&self, ns: u64) {
        self.buckets[Self::index(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// The lower bound of the bucket holding the `pct`th percentile.
    pub fn percentile(&self, pct: u64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = (total * pct).div_ceil(100).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return if i < 8 {
                    i as u64
                } else {
                    (8 + (i % 8) as u64) << (i / 8 - 3)
                };
            }
        }
        0
    }
}

/// Logs the first few occurrences of a guest-triggered event, then one in `every`, so a
/// hostile guest cannot flood the log.
pub struct LogLimiter {
    count: AtomicU64,
    first: u64,
    every: u64,
}

impl LogLimiter {
    pub const fn new(first: u64, every: u64) -> Self {
        LogLimiter {
            count: AtomicU64::new(0),
            first,
            every,
        }
    }

    /// Counts one occurrence; true when this one should be logged.
    pub fn hit(&self) -> bool {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        n < self.first || (self.every != 0 && n.is_multiple_of(self.every))
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles() {
        let h = LatencyHistogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(50);
        assert!((440_000..=500_000).contains(&p50), "{p50}");
        let p99 = h.percentile(99);
        assert!((860_000..=990_000).contains(&p99), "{p99}");
        assert_eq!(LatencyHistogram::default().percentile(50), 0);
    }
}

#[cfg(test)]
mod log_limiter_tests {
    #[test]
    fn limits() {
        let l = super::LogLimiter::new(2, 10);
        let logged: Vec<bool> = (0..21).map(|_| l.hit()).collect();
        assert_eq!(logged.iter().filter(|&&b| b).count(), 4); // 0, 1, 10, 20
        assert_eq!(l.count(), 21);
    }
}

/// "message: source: source", each text once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}
