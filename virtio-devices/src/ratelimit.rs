use std::sync::atomic::{AtomicU64, Ordering};

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
    #[test]
    fn limits() {
        let l = super::LogLimiter::new(2, 10);
        let logged: Vec<bool> = (0..21).map(|_| l.hit()).collect();
        assert_eq!(logged.iter().filter(|&&b| b).count(), 4); // 0, 1, 10, 20
        assert_eq!(l.count(), 21);
    }
}
