//! The `vio` device's counters: per queue and in total, for `vm.counters`.

use super::snoop::Snoop;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use vio::elastic::Mode;
use vio::spec::PAGE_SIZE;
use vio::SnoopStats;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Adds the snoop engines' and the DMA window's counters to `c`.
pub(super) fn add_snoop_counters<M: GuestMemory + Send + Sync + 'static>(
    snoop: &Snoop<M>,
    c: &mut BTreeMap<String, u64>,
) {
    let mut total = SnoopStats::default();
    for (q, slot) in snoop.queues.iter().enumerate() {
        let slot = slot.lock().unwrap();
        let mut s = slot.past.clone();
        if let Some(sq) = &slot.snoop {
            s.add(&sq.stats);
            s.shadow_idx = sq.stats.shadow_idx;
            c.insert(format!("q{q}_inflight"), sq.inflight() as u64);
            // The guest's and the device's positions, to tell a stalled ring's side.
            let l = sq.layout;
            let rd = |a: u64| {
                snoop
                    .mem
                    .read_obj::<u16>(GuestAddress(a))
                    .map_or(u64::MAX, u64::from)
            };
            c.insert(format!("q{q}_avail_idx"), rd(l.avail_ring + 2));
            c.insert(format!("q{q}_used_idx"), rd(l.used_ring + 2));
            c.insert(format!("q{q}_used_flags"), rd(l.used_ring));
        }
        for (k, v) in [
            ("kicks", s.kicks),
            ("chains", s.chains),
            ("descriptors", s.descriptors),
            ("pages_checked", s.pages_checked),
            ("faultins", s.faultins),
            ("faultin_ns_p50", slot.faultin_ns.percentile(50)),
            ("faultin_ns_p99", slot.faultin_ns.percentile(99)),
            ("shadow_idx", u64::from(s.shadow_idx)),
            ("bad_chains", s.bad_chains),
            ("acquire_errors", s.acquire_errors),
            ("device_kicks", s.device_kicks),
            ("device_kicks_suppressed", s.device_kicks_suppressed),
            ("missed_doorbells", s.missed_doorbells),
            ("ring_errors", snoop.ring_errors[q].load(Ordering::Relaxed)),
        ] {
            c.insert(format!("q{q}_{k}"), v);
        }
        total.add(&s);
    }
    let w = &snoop.window.stats;
    for (k, v) in [
        ("kicks", total.kicks),
        ("chains", total.chains),
        ("faultins", total.faultins),
        ("bad_chains", total.bad_chains),
        ("acquire_errors", total.acquire_errors),
        ("missed_doorbells", total.missed_doorbells),
        ("polls", snoop.polls.load(Ordering::Relaxed)),
        ("snoop_cpu_ns", snoop.cpu_ns.load(Ordering::Relaxed)),
        ("passthrough", u64::from(snoop.mode() == Mode::Passthrough)),
        ("switches", snoop.elastic.lock().unwrap().switches),
        ("dma_maps", w.maps.load(Ordering::Relaxed)),
        ("dma_unmaps", w.unmaps.load(Ordering::Relaxed)),
        ("dma_mappings", w.mappings.load(Ordering::Relaxed)),
        ("dma_map_failures", w.map_failures.load(Ordering::Relaxed)),
        ("dma_trims", w.trims.load(Ordering::Relaxed)),
        (
            "dma_window_bytes",
            w.mapped_pages.load(Ordering::Relaxed) * PAGE_SIZE,
        ),
    ] {
        c.insert(k.to_string(), v);
    }
    if let Some(locks) = &snoop.locks {
        let i = locks.info();
        for (k, v) in [
            ("lock_budget_bytes", i.budget_bytes),
            ("locked_bytes", i.locked_bytes),
            ("locked_pages", i.locked_bytes / PAGE_SIZE),
            ("lock_rate_ppm", (i.lock_rate * 1e6) as u64),
            ("locked_runs", i.locked_runs),
            ("locks", i.locks),
            ("unlocks", i.unlocks),
            ("lock_denied", i.denied),
        ] {
            c.insert(k.to_string(), v);
        }
    }
}
