//! A VMM-emulated virtio-pci device across a live upgrade: the transport's registers, its
//! MSI-X table, the queues the driver set up, and where the device's worker was in each.

use super::*;
use crate::QueuePosition;
use pci::{BarReprogram, MsixState};
use serde::{Deserialize, Serialize};

/// One queue as the driver configured it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub config: Vec<u32>,
    pub common: CommonConfig,
    pub queues: Vec<QueueConfig>,
    pub positions: Vec<QueuePosition>,
    pub msix: MsixState,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub isr: u8,
}

impl VirtioPciDevice {
    /// Stops the device (its worker must be paused) and returns the transport's state. The
    /// device stays stopped until `resume_stopped` (the upgrade failed) or it is dropped.
    pub fn stop_and_save(&mut self) -> VirtioPciState {
        let positions = self.device.lock().unwrap().stop_for_handover();
        let v = &self.vectors;
        VirtioPciState {
            config: self.config.registers(),
            common: self.common.clone(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueConfig {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                })
                .collect(),
            positions,
            msix: v.msix.lock().unwrap().state(),
            config_vector: v.selection.config.load(Ordering::Acquire),
            queue_vectors: v
                .selection
                .queues
                .iter()
                .map(|q| q.load(Ordering::Acquire))
                .collect(),
            isr: v.isr.load(Ordering::Acquire),
        }
    }

    /// Kicks every queue: after a restore, a doorbell the old process's worker had not read
    /// yet is in its eventfd, not in ours.
    pub fn kick_all(&self) {
        if self.common.activated {
            for k in &self.kicks {
                let _ = k.write(1);
            }
        }
    }

    pub fn resume_stopped(&mut self) {
        self.device.lock().unwrap().resume_stopped();
    }

    /// Takes the state of the same device saved in another process: registers, queues,
    /// vectors, and, if the driver had it running, the device restarted where it was.
    /// Returns the BAR moves the guest had made (the caller moves the bus ranges).
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<Vec<BarReprogram>, VirtioPciError> {
        let bad = |what: String| VirtioPciError::Restore(what);
        if s.queues.len() != self.queues.len() || s.queue_vectors.len() != self.queues.len() {
            return Err(bad(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let moves = self.config.restore_registers(&s.config);
        for mv in &moves {
            if mv.old_base == self.bar {
                PciDevice::move_bar(self, mv.old_base, mv.new_base)
                    .map_err(VirtioPciError::Doorbell)?;
            }
        }
        for (q, c) in self.queues.iter_mut().zip(&s.queues) {
            q.reset();
            q.set_size(c.size);
            q.set_desc_table_address(Some(c.desc_table as u32), Some((c.desc_table >> 32) as u32));
            q.set_avail_ring_address(Some(c.avail_ring as u32), Some((c.avail_ring >> 32) as u32));
            q.set_used_ring_address(Some(c.used_ring as u32), Some((c.used_ring >> 32) as u32));
            q.set_ready(c.ready);
        }
        let v = &self.vectors;
        v.msix
            .lock()
            .unwrap()
            .restore(&s.msix)
            .map_err(|e| bad(e.to_string()))?;
        v.selection.config.store(s.config_vector, Ordering::Release);
        for (slot, &x) in v.selection.queues.iter().zip(&s.queue_vectors) {
            slot.store(x, Ordering::Release);
        }
        v.isr.store(s.isr, Ordering::Release);
        // Activation below sets `activated` once the device runs.
        self.common = CommonConfig {
            activated: false,
            ..s.common.clone()
        };
        if s.common.status & DEVICE_FEATURES_OK != 0 {
            self.device
                .lock()
                .unwrap()
                .ack_features(s.common.driver_features);
        }
        if s.common.activated {
            for p in &s.positions {
                let q = self
                    .queues
                    .get_mut(usize::from(p.index))
                    .ok_or_else(|| bad(format!("position for queue {}", p.index)))?;
                q.set_next_avail(p.next_avail);
                q.set_next_used(p.next_used);
            }
            self.activate();
            if !self.common.activated {
                return Err(bad("the device did not start".into()));
            }
        }
        Ok(moves)
    }
}
