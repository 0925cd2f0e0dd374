//! mem-verify: fill memory with a pattern, idle (so the host can reclaim it), verify.

use crate::arch::{pause, rdtsc};
use crate::boot::BootInfo;
use crate::memory::{Ram, PAGE};
use crate::report::Report;
use crate::stats::mix;
use crate::tsc::Clock;

pub fn run(
    info: &BootInfo,
    ram: &mut Ram,
    clock: &Clock,
    report: &mut Report,
) -> Result<(), &'static str> {
    let mem_mb = info.param_u64("vio.mem_mb", 64)?;
    let rounds = info.param_u64("vio.rounds", 3)?;
    let idle_ms = info.param_u64("vio.idle_ms", 100)?;
    let seed = info.param_u64("vio.seed", 1)?;
    let bytes = mem_mb << 20;
    let base = ram
        .alloc(bytes)
        .ok_or("vio.mem_mb does not fit in guest RAM")?;
    let pages = bytes / PAGE;
    let start = rdtsc();
    let mut last_progress = start;
    for round in 0..rounds {
        for p in 0..pages {
            fill(base + p * PAGE, round, seed);
        }
        report.writes += pages;
        let idle_until = rdtsc() + clock.ticks(idle_ms * 1_000_000);
        while rdtsc() < idle_until {
            pause();
        }
        for p in 0..pages {
            let t0 = rdtsc();
            if !verify(base + p * PAGE, round, seed) {
                report.mismatches += 1;
            }
            report.hist.record(clock.ns(rdtsc() - t0));
            report.reads += 1;
            report.ops += 1;
        }
        if clock.ns(rdtsc() - last_progress) >= 1_000_000_000 || round + 1 == rounds {
            last_progress = rdtsc();
            report.progress(clock.ns(rdtsc() - start));
        }
    }
    report.elapsed_ns = clock.ns(rdtsc() - start);
    Ok(())
}

fn word(addr: u64, round: u64, seed: u64) -> u64 {
    mix(addr ^ (round << 52) ^ seed.rotate_left(17))
}

fn fill(page: u64, round: u64, seed: u64) {
    let p = page as *mut u64;
    for i in 0..(PAGE / 8) {
        // SAFETY: the page lies in the range taken from the arena for this workload.
        unsafe {
            p.add(i as usize)
                .write_volatile(word(page + i * 8, round, seed))
        };
    }
}

fn verify(page: u64, round: u64, seed: u64) -> bool {
    let p = page as *const u64;
    let mut ok = true;
    for i in 0..(PAGE / 8) {
        // SAFETY: as in fill.
        ok &= unsafe { p.add(i as usize).read_volatile() } == word(page + i * 8, round, seed);
    }
    ok
}
