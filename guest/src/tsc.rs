//! TSC frequency. CPUID is not trapped at CPL3 on every host (PVM on AMD returns the host's
//! leaves), so the primary source is the ACPI PM timer both Cloud Hypervisor and
//! vio-hypervisor expose at port 0x608.

use crate::arch::{cpuid, inl, rdtsc};

const PM_TIMER_PORT: u16 = 0x608;
const PM_TIMER_HZ: u64 = 3_579_545;
const PM_MASK: u32 = 0x00ff_ffff; // 24-bit counters are allowed; use what both widths share
const CALIBRATION_TICKS: u32 = (PM_TIMER_HZ / 100) as u32; // 10 ms

pub struct Clock {
    pub khz: u64,
    /// Where the frequency came from, for the record.
    pub source: &'static str,
}

impl Clock {
    pub fn new() -> Self {
        let (khz, source) = tsc_khz();
        Clock { khz, source }
    }

    pub fn ns(&self, ticks: u64) -> u64 {
        ((ticks as u128 * 1_000_000) / self.khz as u128) as u64
    }

    pub fn ticks(&self, ns: u64) -> u64 {
        ((ns as u128 * self.khz as u128) / 1_000_000) as u64
    }
}

fn pm() -> u32 {
    inl(PM_TIMER_PORT) & PM_MASK
}

fn pm_timer_khz() -> Option<u64> {
    // Start on a tick edge; a timer that never moves (absent: reads all ones) is unusable.
    let first = pm();
    let mut t0 = first;
    let mut spins = 0;
    while t0 == first {
        t0 = pm();
        spins += 1;
        if spins > 10_000 {
            return None;
        }
    }
    let c0 = rdtsc();
    loop {
        let t = pm();
        let d = t.wrapping_sub(t0) & PM_MASK;
        if d >= CALIBRATION_TICKS {
            let c = rdtsc() - c0;
            return Some(c * PM_TIMER_HZ / d as u64 / 1000);
        }
    }
}

fn tsc_khz() -> (u64, &'static str) {
    if let Some(khz) = pm_timer_khz() {
        return (khz, "acpi-pm-timer");
    }
    let (max_hv, ..) = cpuid(0x4000_0000);
    if max_hv >= 0x4000_0010 {
        let (khz, ..) = cpuid(0x4000_0010);
        if khz != 0 {
            return (khz as u64, "cpuid-0x40000010");
        }
    }
    let (max, ..) = cpuid(0);
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15);
        if den != 0 && num != 0 && crystal != 0 {
            return (
                crystal as u64 * num as u64 / den as u64 / 1000,
                "cpuid-0x15",
            );
        }
    }
    if max >= 0x16 {
        let (mhz, ..) = cpuid(0x16);
        if mhz != 0 {
            return (mhz as u64 * 1000, "cpuid-0x16");
        }
    }
    (2_000_000, "assumed-2ghz")
}
