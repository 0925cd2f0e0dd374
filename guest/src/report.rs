//! The guest's machine-readable output lines.

use crate::stats::Histogram;
use crate::tsc::Clock;

pub struct Report {
    pub workload: &'static str,
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub io_errors: u64,
    pub mismatches: u64,
    /// Deliberately malformed requests (blk-verify `vio.bad_every`): failed as they must, or
    /// (a bug in whatever is below) succeeded.
    pub bad_failed: u64,
    pub bad_succeeded: u64,
    /// Duration of the measured part of the workload.
    pub elapsed_ns: u64,
    pub hist: Histogram,
    /// Workload-specific figures, appended to the result line.
    extras: [(&'static str, u64); 12],
    n_extras: usize,
}

impl Report {
    pub const fn new(workload: &'static str) -> Self {
        Report {
            workload,
            ops: 0,
            reads: 0,
            writes: 0,
            io_errors: 0,
            mismatches: 0,
            bad_failed: 0,
            bad_succeeded: 0,
            elapsed_ns: 0,
            hist: Histogram::new(),
            extras: [("", 0); 12],
            n_extras: 0,
        }
    }

    /// Adds `"key":value` to the result line (the first twelve).
    pub fn extra(&mut self, key: &'static str, value: u64) {
        if let Some(e) = self.extras.get_mut(self.n_extras) {
            *e = (key, value);
            self.n_extras += 1;
        }
    }

    fn iops(&self, elapsed_ns: u64) -> u64 {
        if elapsed_ns == 0 {
            0
        } else {
            (self.ops as u128 * 1_000_000_000 / elapsed_ns as u128) as u64
        }
    }

    pub fn progress(&self, elapsed_ns: u64) {
        crate::println!(
            "VIO-GUEST-PROGRESS {{\"workload\":\"{}\",\"ops\":{},\"io_errors\":{},\"mismatches\":{},\"elapsed_ns\":{},\"iops\":{}}}",
            self.workload,
            self.ops,
            self.io_errors,
            self.mismatches,
            elapsed_ns,
            self.iops(elapsed_ns)
        );
    }

    pub fn result(&self, clock: &Clock) {
        let elapsed_ns = self.elapsed_ns;
        let mut extras = crate::serial::Serial;
        use core::fmt::Write;
        let _ = write!(extras, "VIO-GUEST-RESULT {{");
        for (k, v) in &self.extras[..self.n_extras] {
            let _ = write!(extras, "\"{k}\":{v},");
        }
        crate::println!(
            "\"workload\":\"{}\",\"ops\":{},\"reads\":{},\"writes\":{},\"io_errors\":{},\"mismatches\":{},\"bad_failed\":{},\"bad_succeeded\":{},\"elapsed_ns\":{},\"iops\":{},\"lat_p50_ns\":{},\"lat_p99_ns\":{},\"lat_max_ns\":{},\"tsc_khz\":{}}}",
            self.workload,
            self.ops,
            self.reads,
            self.writes,
            self.io_errors,
            self.mismatches,
            self.bad_failed,
            self.bad_succeeded,
            elapsed_ns,
            self.iops(elapsed_ns),
            self.hist.percentile(50),
            self.hist.percentile(99),
            self.hist.max,
            clock.khz
        );
    }
}
