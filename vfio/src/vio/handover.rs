//! A live upgrade of a `vio` device: the old VMM process freezes the front end and saves what
//! the device does not hold itself; the new one adopts the running device without resetting
//! it, in the mode it was in. A device that was plain passthrough (a VMM without VIO) is
//! adopted in passthrough mode, learning its queues from the device: from then on it can be
//! switched to snoop like any other.
//!
//! Why this is safe for the device, in snoop mode: the vCPUs are stopped before the freeze,
//! whose last pass publishes everything the guest made available; the device keeps working on
//! what it was shown (its pages stay resident: reclaim is frozen too, and the new process
//! pins them again before reclaim starts there), reading its index from the same shadow page.
//! The new process's engines adopt each queue at the published index, pinning whatever the
//! device has not completed, exactly as a passthrough -> snoop switch does.

use super::common_cfg::CommonCfgView;
use super::snoop::Snoop;
use super::{DeviceLayout, Parts, ShadowPage, VioDeviceError, VioOptions, VioPciDevice};
use crate::handover::{FdsIn, FdsOut, HandoverError};
use crate::vfio_user::{PciFunctionState, VfioUserPciDevice};
use pci::IoEventRegistrar;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vio::elastic::Mode;
use vio::spec;
use vio::{DmaWindow, QueueLayout};
use virtio_devices::transport::pci_common_config::offset;
use vm_memory::GuestMemory;

/// VIRTIO_F_RING_PACKED: a packed ring has no available index to shadow.
const RING_PACKED: u64 = 1 << 34;

/// An enabled queue's ring, as the guest set it up.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct RingState {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub event_idx: bool,
}

impl RingState {
    fn layout(&self) -> QueueLayout {
        QueueLayout {
            size: self.size,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        }
    }
}

/// What the front end needs to know of a virtio device and its driver: the device's layout,
/// the driver's selectors and features, and each enabled queue's ring.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VioDescription {
    layout: DeviceLayout,
    common: CommonCfgView,
    rings: Vec<Option<RingState>>,
}

/// A frozen `vio` front end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VioState {
    pub function: PciFunctionState,
    description: VioDescription,
    /// The shadow page's descriptor (the device has it mapped at `SHADOW_IOVA`).
    shadow: usize,
    passthrough: bool,
    /// Guest page runs the device has mapped.
    mapped: Vec<(u64, u64)>,
    guest_vio_accesses: u64,
}

/// Where an adopted front end comes from.
pub enum Adoption<'a> {
    /// A `vio` front end in another process.
    Vio(&'a VioState),
    /// A plain passthrough VMM, which mapped all of guest RAM; the device was described
    /// before that VMM let go of it.
    Passthrough(&'a VioDescription),
}

/// What `go` still has to do for an adopted front end.
pub(super) struct PendingStart {
    map_shadow: bool,
    rings: Vec<Option<RingState>>,
}

/// What a front end needs besides the device.
pub struct VioSetup<M> {
    pub mem: Arc<M>,
    pub window: Arc<DmaWindow>,
    /// Guest RAM as page runs (first page frame, count).
    pub ram: Vec<(u64, u64)>,
    pub registrar: Arc<dyn IoEventRegistrar>,
    pub opts: VioOptions,
}

impl<M: GuestMemory + Send + Sync + 'static> VioPciDevice<M> {
    /// Stops the snoop thread after one last pass that publishes everything available. The
    /// vCPUs must be stopped (nothing new can become available). `thaw` undoes it.
    pub fn freeze(&mut self) {
        self.snoop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snoop.apply_commands();
        let all = vec![true; usize::from(self.snoop.queue_count())];
        self.snoop.service(&all, true);
    }

    /// Runs the snoop thread (again).
    pub fn thaw(&mut self) -> Result<(), VioDeviceError> {
        if self.thread.is_some() {
            return Ok(());
        }
        self.snoop.unstop();
        let snoop = self.snoop.clone();
        self.thread = Some(
            std::thread::Builder::new()
                .name(format!("{}-snoop", self.id()))
                .spawn(move || {
                    virtio_devices::seccomp::narrow("snoop");
                    snoop.run()
                })
                .map_err(VioDeviceError::Thread)?,
        );
        Ok(())
    }

    /// The frozen front end's state; its descriptors are added to `fds`.
    pub fn save(&self, fds: &mut FdsOut) -> VioState {
        let snoop = &self.snoop;
        let rings = snoop
            .queues
            .iter()
            .map(|slot| {
                slot.lock().unwrap().ring.map(|(l, event_idx)| RingState {
                    size: l.size,
                    desc_table: l.desc_table,
                    avail_ring: l.avail_ring,
                    used_ring: l.used_ring,
                    event_idx,
                })
            })
            .collect();
        VioState {
            function: self.inner.save(fds),
            description: VioDescription {
                layout: DeviceLayout {
                    caps: self.caps.clone(),
                    version: snoop.elastic.lock().unwrap().version,
                    notify: self.notify.clone(),
                },
                common: self.common.clone(),
                rings,
            },
            shadow: fds.add(snoop.shadow.file()),
            passthrough: snoop.mode() == Mode::Passthrough,
            mapped: snoop.window.mapped_runs(),
            guest_vio_accesses: self.guest_vio_accesses,
        }
    }

    /// Describes a device a plain passthrough VMM holds, for a VMM that will take it under
    /// VIO: `None` if it does not offer the shadow-index extension (or its driver uses packed
    /// rings). Only register reads, and selector writes put back as they were.
    pub fn describe(inner: &VfioUserPciDevice) -> Result<Option<VioDescription>, VioDeviceError> {
        let layout = match Self::probe(inner) {
            Ok(l) => l,
            Err(VioDeviceError::NoShadowIndex | VioDeviceError::MissingCap(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (common, rings) = Self::read_driver_state(inner, &layout)?;
        if common.driver_features & RING_PACKED != 0 {
            return Ok(None);
        }
        Ok(Some(VioDescription {
            layout,
            common,
            rings,
        }))
    }

    /// Takes over a running device without a word to it: nothing is sent on its socket and no
    /// thread runs until `go` (so the old process can still take it back). `inner` must have
    /// been adopted without registering its doorbells.
    pub fn adopt(
        inner: VfioUserPciDevice,
        setup: VioSetup<M>,
        from: Adoption,
        fds: &mut FdsIn,
    ) -> Result<Self, VioDeviceError> {
        let invalid = |e: String| VioDeviceError::Adopt(HandoverError::Invalid(e));
        let (description, shadow, mode, map_shadow) = match from {
            Adoption::Vio(s) => {
                let file = File::from(fds.take(s.shadow).map_err(VioDeviceError::Adopt)?);
                let shadow = ShadowPage::adopt(file).map_err(VioDeviceError::ShadowPage)?;
                setup
                    .window
                    .adopt_mapped(&s.mapped)
                    .map_err(|e| invalid(e.to_string()))?;
                let mode = if s.passthrough {
                    Mode::Passthrough
                } else {
                    Mode::Snoop
                };
                (&s.description, shadow, mode, false)
            }
            Adoption::Passthrough(d) => {
                // The plain passthrough VMM mapped all of guest RAM at IOVA = guest-physical.
                setup
                    .window
                    .adopt_mapped(&setup.ram)
                    .map_err(|e| invalid(e.to_string()))?;
                let shadow = ShadowPage::new().map_err(VioDeviceError::ShadowPage)?;
                (d, shadow, Mode::Passthrough, true)
            }
        };
        let d = description;
        if d.rings.len() != d.layout.notify.len() || d.layout.notify.len() > spec::MAX_QUEUES.into()
        {
            return Err(invalid(format!(
                "{} rings for {} queues",
                d.rings.len(),
                d.layout.notify.len()
            )));
        }
        let setting = setup.opts.setting;
        let mut dev = Self::assemble(
            inner,
            d.layout.clone(),
            Parts {
                mem: setup.mem,
                window: setup.window,
                ram: setup.ram,
                registrar: setup.registrar,
                opts: setup.opts,
                shadow,
                mode,
                common: d.common.clone(),
            },
        )?;
        dev.snoop.elastic.lock().unwrap().setting = setting;
        if let Adoption::Vio(s) = from {
            dev.guest_vio_accesses = s.guest_vio_accesses;
        }
        dev.pending = Some(PendingStart {
            map_shadow,
            rings: d.rings.clone(),
        });
        Ok(dev)
    }

    /// Starts an adopted front end, once this process owns the device: the shadow page mapped
    /// (a device that was plain passthrough), all of RAM pinned in passthrough, every queue
    /// taken over, the snoop thread running.
    pub fn go(&mut self) -> Result<(), VioDeviceError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if p.map_shadow {
            Self::map_shadow(&self.inner, &self.snoop.shadow)?;
        }
        let mode = self.snoop.mode();
        if mode == Mode::Passthrough {
            // All of RAM is mapped already; its pins come in `settle`, with the guest running
            // and reclaim held off. No switch meanwhile: it would find RAM not pinned yet.
            self.snoop.elastic.lock().unwrap().claim_for_settle();
            self.unpinned = true;
        }
        for (q, ring) in p.rings.iter().enumerate() {
            if let Some(r) = ring {
                self.adopt_queue(q as u16, r, mode);
            }
        }
        self.thaw()
    }

    /// Pins all of guest RAM for an adopted passthrough front end: O(pages), so it runs after
    /// the vCPUs do. Reclaim must not run before it is done. As the old process left RAM:
    /// pages never used stay unbacked (backing them would only cost memory).
    pub fn settle(&mut self) -> Result<(), VioDeviceError> {
        if !std::mem::take(&mut self.unpinned) {
            return Ok(());
        }
        let r = self.snoop.pin_ram(false).map(|_| ());
        self.snoop.elastic.lock().unwrap().settled();
        r.map_err(VioDeviceError::Switch)
    }

    /// Queue `q` runs on `r`: hold its vring and, snooped, adopt it at the index the device
    /// was last shown (the shadow slot), pinning what the device still holds.
    fn adopt_queue(&self, q: u16, r: &RingState, mode: Mode) {
        let layout = r.layout();
        if layout.size == 0 || !layout.size.is_power_of_two() {
            self.snoop.ring_errors[usize::from(q)].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let ring_pages = self.acquire_ring(q, &layout);
        let snoop: &Snoop<M> = &self.snoop;
        let mut slot = snoop.queues[usize::from(q)].lock().unwrap();
        slot.ring_pages = ring_pages;
        slot.ring = Some((layout, r.event_idx));
        if mode == Mode::Passthrough {
            return;
        }
        snoop.adopt_engine(q, &mut slot);
    }

    /// What a driver set up on a device the VMM did not watch it set up (a plain passthrough
    /// VMM's): the selectors, the negotiated features and each enabled queue's ring. Every
    /// selector is put back as the driver left it.
    #[allow(clippy::type_complexity)]
    fn read_driver_state(
        inner: &VfioUserPciDevice,
        layout: &DeviceLayout,
    ) -> Result<(CommonCfgView, Vec<Option<RingState>>), VioDeviceError> {
        let client = inner.client();
        let c = layout.caps.common;
        let read = |off: u64, n: usize| -> Result<u64, crate::vfio_user::ClientError> {
            let mut v = 0u64;
            for half in 0..n.div_ceil(4) {
                let mut b = [0u8; 4];
                client.region_read(
                    c.bar as u32,
                    c.offset + off + 4 * half as u64,
                    &mut b[..n.min(4)],
                )?;
                v |= u64::from(u32::from_le_bytes(b)) << (32 * half);
            }
            Ok(v)
        };
        let write = |off: u64, v: &[u8]| client.region_write(c.bar as u32, c.offset + off, v);
        let mut common = CommonCfgView {
            device_feature_select: read(offset::DEVICE_FEATURE_SELECT, 4)? as u32,
            driver_feature_select: read(offset::DRIVER_FEATURE_SELECT, 4)? as u32,
            queue_select: read(offset::QUEUE_SELECT, 2)? as u16,
            driver_features: 0,
        };
        for sel in 0..2u32 {
            write(offset::DRIVER_FEATURE_SELECT, &sel.to_le_bytes())?;
            common.driver_features |= read(offset::DRIVER_FEATURE, 4)? << (32 * sel);
        }
        write(
            offset::DRIVER_FEATURE_SELECT,
            &common.driver_feature_select.to_le_bytes(),
        )?;
        let event_idx = common.event_idx();
        let mut rings = Vec::new();
        for q in 0..layout.notify.len() as u16 {
            write(offset::QUEUE_SELECT, &q.to_le_bytes())?;
            let ring = (read(offset::QUEUE_ENABLE, 2)? == 1)
                .then(|| -> Result<RingState, crate::vfio_user::ClientError> {
                    Ok(RingState {
                        size: read(offset::QUEUE_SIZE, 2)? as u16,
                        desc_table: read(offset::QUEUE_DESC, 8)?,
                        avail_ring: read(offset::QUEUE_DRIVER, 8)?,
                        used_ring: read(offset::QUEUE_DEVICE, 8)?,
                        event_idx,
                    })
                })
                .transpose()?;
            rings.push(ring);
        }
        write(offset::QUEUE_SELECT, &common.queue_select.to_le_bytes())?;
        Ok((common, rings))
    }
}
