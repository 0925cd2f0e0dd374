//! Elastic passthrough: switching a running `vio` device between snoop and plain passthrough,
//! on the snoop thread (which owns the engines), with no request lost, duplicated or reordered
//! and no page unmapped under the device. docs/vio.md ("Elastic passthrough") has the state
//! machine and the reason for every step's place in it.
//!
//! snoop -> passthrough:
//! 1. all guest RAM resident, pinned and DMA-mapped in runs (the device is still served
//!    meanwhile; this is the slow part, outside the pause);
//! 2. per queue: publish what the guest has made available, then hand the device the guest's
//!    ring (control 0); drop the engine (its pins are covered by step 1);
//! 3. doorbells to the device's own fds; one kick per queue (a doorbell rung during the switch
//!    may have reached the VMM's fd, and the device may be asleep on the shadow's suppression).
//!
//! passthrough -> snoop:
//! 1. doorbells back to the VMM first, so no entry reaches the device unsnooped from now on;
//! 2. per queue: shadow with capture (the device copies `avail->idx` and its suppression into
//!    the slot, atomically with its own reads, and acknowledges); an engine adopts the queue at
//!    the captured index, pinning the requests the device still holds; it states the guest's
//!    suppression and publishes whatever came after the capture; one kick;
//! 3. only now, with every device acknowledgement in, the whole-RAM pins go: reclaim may take
//!    pages again.

use super::snoop::{QueueSlot, Snoop};
use log::info;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use thiserror::Error;
use vio::elastic::{AutoPolicy, Mode, Setting, Thresholds};
use vio::spec::{self, PAGE_SIZE};
use vio::{PageError, SnoopHost, SnoopQueue, WalkLimits};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

#[derive(Debug, Error)]
pub enum SwitchError {
    #[error("The device does not support mode switches (VIO extension version {0}, 2 needed)")]
    Unsupported(u32),
    #[error("A mode switch is in progress")]
    InProgress,
    #[error("Failed to make guest RAM resident and mapped")]
    Map(#[source] PageError),
    #[error("Failed to move the doorbells")]
    Doorbells(#[source] std::io::Error),
    #[error("The device's snoop thread has stopped")]
    Stopped,
}

pub(super) type SwitchReply = mpsc::Sender<Result<SwitchReport, SwitchError>>;

/// What a switch did and what it cost.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SwitchReport {
    pub from: &'static str,
    pub to: &'static str,
    /// Chosen by auto mode (not asked for through the API).
    pub auto: bool,
    /// Time the device was not serviced: from taking the doorbell lock to the last kick.
    pub pause_us: u64,
    /// Of the pause: moving the doorbells (KVM ioeventfds), and the device's control writes
    /// (vfio-user round trips, the capture included).
    pub doorbells_us: u64,
    pub device_us: u64,
    /// Bytes brought back from the reclaim store, and DMA-mapped, to enter passthrough.
    pub faultin_bytes: u64,
    pub mapped_bytes: u64,
    pub took_us: u64,
}

/// A device's elastic state.
pub struct Elastic {
    pub setting: Setting,
    pub policy: AutoPolicy,
    /// The VIO extension's version the device offers (2 and up can switch).
    pub version: u32,
    /// All of guest RAM is pinned (passthrough, or on the way to it or back).
    ram_pinned: bool,
    pub switches: u64,
    pub last: Option<SwitchReport>,
    /// Requests counted for the rate: chains snooped, or used-ring progress while passed
    /// through (sampled from guest memory, no doorbell trapped).
    ops: u64,
    last_used: Vec<Option<u16>>,
    busy: bool,
}

impl Elastic {
    pub fn new(setting: Setting, thresholds: Thresholds, version: u32, queues: usize) -> Self {
        Elastic {
            setting,
            policy: AutoPolicy::new(thresholds),
            version,
            ram_pinned: false,
            switches: 0,
            last: None,
            ops: 0,
            last_used: vec![None; queues],
            busy: false,
        }
    }
}

impl Elastic {
    /// An adopted passthrough device's RAM is not pinned yet: no switch until it is.
    pub(super) fn claim_for_settle(&mut self) {
        self.busy = true;
    }

    pub(super) fn settled(&mut self) {
        self.busy = false;
    }
}

/// A snoop host whose doorbells to the device are left for later.
struct Quiet<'a>(&'a dyn SnoopHost);

impl SnoopHost for Quiet<'_> {
    fn acquire(&self, gfn: u64) -> Result<bool, PageError> {
        self.0.acquire(gfn)
    }
    fn release(&self, gfn: u64) {
        self.0.release(gfn)
    }
    fn publish(&self, idx: u16, then: &dyn Fn()) -> bool {
        self.0.publish(idx, then)
    }
    fn kick(&self) {}
    fn device_suppression(&self) -> Option<(u16, u16)> {
        self.0.device_suppression()
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl<M: GuestMemory + Send + Sync + 'static> Snoop<M> {
    /// API side: claims the right to switch (one switch at a time), before the switch is
    /// posted to the snoop thread.
    pub(super) fn claim_switch(&self) -> Result<(), SwitchError> {
        let mut el = self.elastic.lock().unwrap();
        if el.version < 2 {
            return Err(SwitchError::Unsupported(el.version));
        }
        if el.busy {
            return Err(SwitchError::InProgress);
        }
        el.busy = true;
        Ok(())
    }

    /// Snoop thread: the switch the API claimed and posted; a no-op report if the device is in
    /// `to` already.
    pub(super) fn switch(&self, to: Mode) -> Result<SwitchReport, SwitchError> {
        self.switch_as(to, false)
    }

    fn switch_as(&self, to: Mode, auto: bool) -> Result<SwitchReport, SwitchError> {
        let from = self.mode();
        let t0 = Instant::now();
        let r = match (from, to) {
            (a, b) if a == b => Ok(SwitchReport::default()),
            (_, Mode::Passthrough) => self.to_passthrough(),
            (_, Mode::Snoop) => self.to_snoop(),
        };
        let mut el = self.elastic.lock().unwrap();
        el.busy = false;
        let mut r = r?;
        if from != to {
            r.from = from.name();
            r.to = to.name();
            r.auto = auto;
            r.took_us = us(t0.elapsed());
            el.switches += 1;
            el.last = Some(r.clone());
            el.policy.restart();
            el.last_used.iter_mut().for_each(|u| *u = None);
            info!(
                "{}: {} -> {}{}: pause {} us, {} bytes faulted in, {} bytes mapped, {} us in all",
                self.id,
                r.from,
                r.to,
                if auto { " (auto)" } else { "" },
                r.pause_us,
                r.faultin_bytes,
                r.mapped_bytes,
                r.took_us
            );
        }
        Ok(r)
    }

    /// Pins, faults in and maps all of guest RAM, and (`populate`) backs the never-used pages
    /// with memory. Returns (faulted, newly mapped) pages.
    pub(super) fn pin_ram(&self, populate: bool) -> Result<(u64, u64), SwitchError> {
        let mapped = self.window.stats.mapped_pages.load(Ordering::Relaxed);
        let mut faulted = 0;
        for (i, &(first, n)) in self.ram.iter().enumerate() {
            match self.window.acquire_range(first, n) {
                Ok(f) => faulted += f,
                Err(e) => {
                    self.ram[..i].iter().for_each(|&r| self.unpin_run(r));
                    return Err(SwitchError::Map(e));
                }
            }
        }
        for &(first, n) in self.ram.iter().filter(|_| populate) {
            if let Err(e) = self.window.populate(first, n) {
                self.ram.iter().for_each(|&r| self.unpin_run(r));
                return Err(SwitchError::Map(e));
            }
        }
        self.elastic.lock().unwrap().ram_pinned = true;
        let now = self.window.stats.mapped_pages.load(Ordering::Relaxed);
        Ok((faulted, now.saturating_sub(mapped)))
    }

    fn unpin_run(&self, (first, n): (u64, u64)) {
        (first..first + n).for_each(|p| self.window.release(p));
    }

    fn write_control(&self, q: u16, field: u64, v: &[u8]) {
        let (bar, off) = self.control;
        let reg = off + spec::queue_reg(q);
        if let Err(e) = self.client.region_write(bar, reg + field, v) {
            log::warn!("{}: queue {q}: VIO register {field:#x}: {e}", self.id);
        }
    }

    fn set_control(&self, q: u16, control: u32) {
        self.write_control(q, spec::QUEUE_CONTROL, &control.to_le_bytes());
    }

    fn to_passthrough(&self) -> Result<SwitchReport, SwitchError> {
        let (faulted, mapped) = self.pin_ram(true)?;
        let paused = Instant::now();
        let mut doorbells = self.doorbells.lock().unwrap();
        self.apply_queue_commands(Mode::Snoop);
        let mut device = Duration::ZERO;
        for q in 0..self.queue_count() {
            let mut slot = self.queues[usize::from(q)].lock().unwrap();
            let Some(mut sq) = slot.snoop.take() else {
                continue;
            };
            let host = self.host(q, &slot);
            // No doorbell for what this last poll publishes: the kick after the doorbells
            // move wakes the device for it, and a device woken now would only compete, on a
            // busy host, with the thread that must answer the control write.
            sq.poll(&*self.mem, &Quiet(&host));
            let t = Instant::now();
            self.set_control(q, 0);
            device += t.elapsed();
            sq.release_all(&host);
            slot.past.add(&sq.stats);
            slot.past.shadow_idx = sq.stats.shadow_idx;
        }
        let t = Instant::now();
        let moved = doorbells.switch(Mode::Passthrough);
        let doorbells_us = us(t.elapsed());
        for q in 0..self.queue_count() {
            if self.queues[usize::from(q)].lock().unwrap().ring.is_some() {
                self.kick(q);
            }
        }
        drop(doorbells);
        moved.map_err(SwitchError::Doorbells)?;
        Ok(SwitchReport {
            pause_us: us(paused.elapsed()),
            doorbells_us,
            device_us: us(device),
            faultin_bytes: faulted * PAGE_SIZE,
            mapped_bytes: mapped * PAGE_SIZE,
            ..Default::default()
        })
    }

    fn to_snoop(&self) -> Result<SwitchReport, SwitchError> {
        // The slot addresses first, outside the pause: without control bits they change
        // nothing for the device (a queue enabled in passthrough never had them written). A
        // reset clears them, so a queue re-enabled meanwhile (a new generation) gets them again
        // inside: a capture must never write through an address the VMM did not give.
        let slot_iova = |q: u16| {
            let iova = super::SHADOW_IOVA + spec::SLOT_STRIDE * u64::from(q);
            self.write_control(q, spec::QUEUE_SHADOW_IOVA, &iova.to_le_bytes());
        };
        let written: Vec<u64> = (0..self.queue_count())
            .map(|q| {
                let generation = self.queues[usize::from(q)].lock().unwrap().generation;
                slot_iova(q);
                generation
            })
            .collect();
        let paused = Instant::now();
        let mut doorbells = self.doorbells.lock().unwrap();
        self.apply_queue_commands(Mode::Passthrough);
        let t = Instant::now();
        doorbells
            .switch(Mode::Snoop)
            .map_err(SwitchError::Doorbells)?;
        let doorbells_us = us(t.elapsed());
        let mut device = Duration::ZERO;
        for q in 0..self.queue_count() {
            let mut slot = self.queues[usize::from(q)].lock().unwrap();
            if slot.ring.is_none() {
                continue;
            }
            let t = Instant::now();
            if slot.generation != written[usize::from(q)] {
                slot_iova(q);
            }
            self.set_control(
                q,
                spec::CTRL_SHADOW_INDEX | spec::CTRL_SUPPRESSION | spec::CTRL_CAPTURE,
            );
            device += t.elapsed();
            // The write's reply is the device's acknowledgement: the slot holds its index.
            self.adopt_engine(q, &mut slot);
        }
        drop(doorbells);
        let pause_us = us(paused.elapsed());
        let mut el = self.elastic.lock().unwrap();
        if std::mem::take(&mut el.ram_pinned) {
            drop(el);
            self.ram.iter().for_each(|&r| self.unpin_run(r));
        }
        Ok(SwitchReport {
            pause_us,
            doorbells_us,
            device_us: us(device),
            ..Default::default()
        })
    }

    /// Snoops enabled queue `q` from the index its shadow slot holds, the last the device was
    /// shown: an engine adopts the queue there (pinning the requests the device still holds),
    /// states the guest's suppression, publishes what came after, and kicks the device.
    pub(super) fn adopt_engine(&self, q: u16, slot: &mut QueueSlot) {
        let Some((layout, event_idx)) = slot.ring else {
            return;
        };
        let exposed = self
            .shadow
            .field(q, spec::SLOT_AVAIL_IDX)
            .load(Ordering::Acquire);
        let used = self
            .mem
            .read_obj::<u16>(GuestAddress(layout.used_ring + 2))
            .unwrap_or(exposed);
        let host = self.host(q, slot);
        let mut sq = SnoopQueue::adopt(
            layout,
            used,
            exposed,
            WalkLimits::default(),
            &*self.mem,
            &host,
        )
        .with_event_idx(event_idx);
        if !self.publish(q, slot.generation, exposed, &|| {
            sq.state_suppression(&*self.mem)
        }) {
            // Retired by the guest meanwhile: its next enable starts afresh.
            sq.release_all(&host);
            return;
        }
        sq.poll(&*self.mem, &host);
        self.kick(q);
        slot.snoop = Some(sq);
    }

    /// The sampling timer: counts requests without trapping anything, and lets auto mode
    /// decide.
    pub(super) fn sample(&self) {
        let mode = self.mode();
        let mut el = self.elastic.lock().unwrap();
        let mut chains = 0;
        for (q, slot) in self.queues.iter().enumerate() {
            let slot = slot.lock().unwrap();
            match (mode, &slot.snoop, slot.ring) {
                // Earlier engines' counts included, so a reset is not a drop in the rate.
                (Mode::Snoop, sq, _) => {
                    chains += slot.past.chains + sq.as_ref().map_or(0, |sq| sq.stats.chains)
                }
                (Mode::Passthrough, _, Some((layout, _))) => {
                    if let Ok(used) = self.mem.read_obj::<u16>(GuestAddress(layout.used_ring + 2)) {
                        if let Some(prev) = el.last_used[q].replace(used) {
                            el.ops += u64::from(used.wrapping_sub(prev));
                        }
                    }
                }
                _ => {}
            }
        }
        let ops = match mode {
            Mode::Snoop => chains,
            Mode::Passthrough => el.ops,
        };
        let want = el.policy.sample(Instant::now(), ops, mode);
        let auto = el.setting == Setting::Auto && el.version >= 2 && !el.busy;
        if let (true, Some(to)) = (auto, want) {
            el.busy = true;
            drop(el);
            if let Err(e) = self.switch_as(to, true) {
                log::warn!("{}: auto switch to {}: {e}", self.id, to.name());
            }
        }
    }
}

/// The API's handle on a `vio` device's mode: usable without holding the device (a switch can
/// take a while, and the guest's accesses to the device must not wait for it).
pub struct VioHandle<M>(pub(super) std::sync::Arc<Snoop<M>>);

/// `vm.vio-info` for one device.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VioInfo {
    pub id: String,
    pub mode: &'static str,
    pub configured: &'static str,
    pub iops_high: u64,
    pub iops_low: u64,
    pub dwell_ms: u64,
    /// Requests per second over the last sample.
    pub iops: u64,
    pub queues: Vec<QueueInfo>,
    pub switches: u64,
    pub last_switch: Option<SwitchReport>,
    /// Pages faulted back in for requests (snoop), over the device's life.
    pub faultins: u64,
    /// DMA mappings in use, and the device's limit.
    pub dma_mappings: u64,
    pub max_dma_maps: u64,
    /// Lockpage's state, if on.
    pub lockpage: Option<super::LockInfo>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueInfo {
    pub index: u16,
    /// The index the VMM last published (snoop), or the device's view (the guest's) otherwise.
    pub shadow_idx: u16,
    pub guest_avail_idx: u16,
    pub used_idx: u16,
}

impl<M: GuestMemory + Send + Sync + 'static> VioHandle<M> {
    /// Sets how the device runs. A fixed mode switches now and returns the switch's report;
    /// auto lets the rate decide from the next sample on.
    pub fn set(&self, setting: Setting) -> Result<Option<SwitchReport>, SwitchError> {
        let snoop = &self.0;
        let Setting::Fixed(to) = setting else {
            let mut el = snoop.elastic.lock().unwrap();
            if el.version < 2 {
                return Err(SwitchError::Unsupported(el.version));
            }
            el.setting = Setting::Auto;
            el.policy.restart();
            return Ok(None);
        };
        snoop.claim_switch()?;
        snoop.elastic.lock().unwrap().setting = setting;
        let (tx, rx) = mpsc::channel();
        snoop.post(super::snoop::Command::Switch { to, reply: tx });
        rx.recv().map_err(|_| SwitchError::Stopped)?.map(Some)
    }

    pub fn info(&self) -> VioInfo {
        let snoop = &self.0;
        let mode = snoop.mode();
        let el = snoop.elastic.lock().unwrap();
        let th = el.policy.thresholds;
        let rd = |a: u64| snoop.mem.read_obj::<u16>(GuestAddress(a)).unwrap_or(0);
        let queues = snoop
            .queues
            .iter()
            .enumerate()
            .filter_map(|(q, slot)| {
                let slot = slot.lock().unwrap();
                let (layout, _) = slot.ring?;
                let guest_avail_idx = rd(layout.avail_ring + 2);
                Some(QueueInfo {
                    index: q as u16,
                    shadow_idx: slot
                        .snoop
                        .as_ref()
                        .map_or(guest_avail_idx, |sq| sq.published()),
                    guest_avail_idx,
                    used_idx: rd(layout.used_ring + 2),
                })
            })
            .collect();
        VioInfo {
            id: snoop.id.clone(),
            mode: mode.name(),
            configured: el.setting.name(),
            iops_high: th.iops_high,
            iops_low: th.iops_low,
            dwell_ms: th.dwell.as_millis() as u64,
            iops: el.policy.iops,
            queues,
            switches: el.switches,
            last_switch: el.last.clone(),
            faultins: snoop
                .queues
                .iter()
                .map(|slot| {
                    let slot = slot.lock().unwrap();
                    slot.past.faultins + slot.snoop.as_ref().map_or(0, |sq| sq.stats.faultins)
                })
                .sum(),
            dma_mappings: snoop.window.stats.mappings.load(Ordering::Relaxed),
            max_dma_maps: snoop.window.max_maps(),
            lockpage: snoop.locks.as_ref().map(|l| l.info()),
        }
    }
}
