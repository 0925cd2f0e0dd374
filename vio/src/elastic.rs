//! Elastic passthrough's policy: when a `vio` device should run snooped (memory reclaimable,
//! the VMM on every doorbell) and when as plain passthrough (all memory mapped, the VMM off the
//! data path). The mechanics of a switch live with the device front end; this is the decision,
//! from the request rate alone, with hysteresis.

use std::time::{Duration, Instant};

/// How a device runs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Snoop,
    Passthrough,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Snoop => "snoop",
            Mode::Passthrough => "passthrough",
        }
    }
}

/// How a device is asked to run: a fixed mode, or chosen by its request rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    Fixed(Mode),
    Auto,
}

impl Setting {
    pub fn name(self) -> &'static str {
        match self {
            Setting::Fixed(m) => m.name(),
            Setting::Auto => "auto",
        }
    }
}

/// Auto mode's thresholds: passthrough once the rate has stayed at or above `iops_high` for
/// `dwell`, snoop again once it has stayed at or below `iops_low` for `dwell`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub iops_high: u64,
    pub iops_low: u64,
    pub dwell: Duration,
}

/// Follows a device's request rate and says when auto mode should switch.
#[derive(Debug)]
pub struct AutoPolicy {
    pub thresholds: Thresholds,
    /// Since when the rate has been past the threshold that leads away from the current mode.
    past_since: Option<Instant>,
    last: Option<(Instant, u64)>,
    /// The rate over the last sample, in requests per second.
    pub iops: u64,
}

impl AutoPolicy {
    pub fn new(thresholds: Thresholds) -> Self {
        AutoPolicy {
            thresholds,
            past_since: None,
            last: None,
            iops: 0,
        }
    }

    /// Forgets the rate history, e.g. after a switch: the new mode's counter is another one,
    /// and the dwell starts again.
    pub fn restart(&mut self) {
        self.past_since = None;
        self.last = None;
    }

    /// Takes a sample of a running request count (`ops`, wrapping) at `now` in mode `mode`;
    /// returns the mode to switch to, if the rate has stayed past a threshold for the dwell.
    pub fn sample(&mut self, now: Instant, ops: u64, mode: Mode) -> Option<Mode> {
        let (t, n) = self.last.replace((now, ops))?;
        let dt = now.saturating_duration_since(t).as_nanos().max(1);
        self.iops = (u128::from(ops.wrapping_sub(n)) * 1_000_000_000 / dt) as u64;
        let (past, to) = match mode {
            Mode::Snoop => (self.iops >= self.thresholds.iops_high, Mode::Passthrough),
            Mode::Passthrough => (self.iops <= self.thresholds.iops_low, Mode::Snoop),
        };
        if !past {
            self.past_since = None;
            return None;
        }
        let since = *self.past_since.get_or_insert(t);
        (now.saturating_duration_since(since) >= self.thresholds.dwell).then_some(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        iops_high: 1000,
        iops_low: 100,
        dwell: Duration::from_millis(300),
    };

    /// Feeds `rates` (requests per second), one 100 ms sample each; returns the switches, by
    /// sample number, following them.
    fn run(rates: &[u64]) -> Vec<(usize, Mode)> {
        let mut p = AutoPolicy::new(T);
        let t0 = Instant::now();
        let (mut ops, mut mode, mut out) = (0u64, Mode::Snoop, Vec::new());
        p.sample(t0, ops, mode);
        for (i, r) in rates.iter().enumerate() {
            ops = ops.wrapping_add(r / 10);
            if let Some(to) = p.sample(t0 + Duration::from_millis(100 * (i as u64 + 1)), ops, mode)
            {
                out.push((i, to));
                mode = to;
                p.restart();
                p.sample(t0 + Duration::from_millis(100 * (i as u64 + 1)), ops, mode);
            }
        }
        out
    }

    #[test]
    fn switches_only_after_the_dwell() {
        assert_eq!(run(&[5000, 5000]), vec![], "a burst shorter than the dwell");
        assert_eq!(run(&[5000, 5000, 5000]), vec![(2, Mode::Passthrough)]);
        assert_eq!(
            run(&[5000, 5000, 50, 5000, 5000, 5000]),
            vec![(5, Mode::Passthrough)],
            "a dip restarts the dwell"
        );
    }

    #[test]
    fn hysteresis_in_both_directions() {
        let mut rates = vec![5000; 3];
        rates.extend([500; 6]); // between the thresholds: stays in passthrough
        rates.extend([0; 3]);
        assert_eq!(run(&rates), vec![(2, Mode::Passthrough), (11, Mode::Snoop)]);
    }

    #[test]
    fn a_wrapping_counter_is_a_rate_not_a_spike() {
        let mut p = AutoPolicy::new(T);
        let t0 = Instant::now();
        p.sample(t0, u64::MAX - 9, Mode::Snoop);
        p.sample(t0 + Duration::from_secs(1), 10, Mode::Snoop);
        assert_eq!(p.iops, 20);
    }
}
