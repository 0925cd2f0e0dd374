//! A whole VM across a live upgrade: what the old process saves once everything is stopped,
//! and the order the new process rebuilds it in.
//!
//! The order matters for interrupts. The old process takes every device vector off KVM
//! before it saves the interrupt controllers, so each interrupt a device raises is either in
//! the saved state or still counted in its eventfd. The new process restores the vCPUs (their
//! local APICs) and the interrupt controllers first and only then assigns the eventfds, at
//! which point KVM injects what they hold.

use super::*;
use crate::device_manager::handover::DevicesState;
use crate::device_manager::DeviceRestore;
use crate::reclaim::ReclaimState;
use crate::vcpu_state::{self, StateError, VcpuState, VmKvmState};
use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixStream;
use vfio::handover::{BlobIn, BlobOut, FdsIn, FdsOut};

#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pub kvm: VmKvmState,
    pub vcpus: Vec<VcpuState>,
    pub memfd: usize,
    pub reclaim: Option<ReclaimState>,
    pub devices: DevicesState,
    /// The memfd holding the binary sections (`vfio::handover::BlobOut`).
    pub blob: usize,
}

/// What a save keeps open until the snapshot is sent.
pub struct Held {
    pub fds: FdsOut,
    pub sockets: Vec<UnixStream>,
    pub blob: BlobOut,
}

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("KVM state")]
    State(#[from] StateError),
    #[error("Devices")]
    Devices(#[from] DeviceError),
    #[error("Failed to write the state")]
    Io(#[source] std::io::Error),
    #[error("Descriptor")]
    Fd(#[from] vfio::handover::HandoverError),
    #[error("vCPUs")]
    Cpu(#[from] CpuError),
    #[error("The VM is not running")]
    NotRunning,
}

impl Vm {
    /// Stops everything (vCPUs, device workers, `vio` front ends, reclaim) and takes the
    /// vCPUs off their threads. Until `thaw` or the process exits nothing touches the guest,
    /// the device or KVM on the VM's behalf.
    pub fn freeze(&mut self) -> Result<(), HandoverError> {
        let Some(mut set) = self.vcpus.take() else {
            return Err(HandoverError::NotRunning);
        };
        self.parked = Some(set.take());
        self.devices.pause();
        if let Some(r) = self.memory.reclaimer() {
            r.freeze();
        }
        self.devices.freeze()?;
        Ok(())
    }

    /// Undoes `freeze` (and `save`): the VM runs on here (or stays paused if it was).
    pub fn thaw(&mut self, paused: bool) -> Result<(), HandoverError> {
        self.devices.thaw()?;
        if let Some(r) = self.memory.reclaimer() {
            r.thaw();
        }
        // Workers stopped for the save were started again, unpaused.
        if paused {
            self.devices.pause();
        } else {
            self.devices.resume();
        }
        self.start_parked(paused)
    }

    fn start_parked(&mut self, paused: bool) -> Result<(), HandoverError> {
        if let Some(vcpus) = self.parked.take() {
            self.vcpus = Some(VcpuSet::start_as(
                vcpus,
                self.devices.pio_bus(),
                self.devices.mmio_bus(),
                self.exit.clone(),
                paused,
            )?);
        }
        Ok(())
    }

    /// The frozen VM's state, and the descriptors it names.
    pub fn save(&self) -> Result<(VmSnapshot, Held), HandoverError> {
        let vcpus = self.parked.as_ref().ok_or(HandoverError::NotRunning)?;
        let mut fds = FdsOut::default();
        let mut blob = BlobOut::new().map_err(HandoverError::Io)?;
        let mut sockets = Vec::new();
        let msrs = match vcpus.first() {
            Some((_, fd)) => vcpu_state::saveable_msrs(&self.kvm, fd)?,
            None => Vec::new(),
        };
        let vcpus = vcpus
            .iter()
            .map(|(id, fd)| vcpu_state::save_vcpu(fd, *id, &msrs))
            .collect::<Result<Vec<_>, _>>()?;
        let kvm = vcpu_state::save_vm(&self.vm_fd)?;
        let reclaim = match self.memory.reclaimer() {
            Some(r) => Some(r.save(&mut fds, &mut blob).map_err(HandoverError::Io)?),
            None => None,
        };
        let devices = self.devices.save(&mut fds, &mut sockets)?;
        let snapshot = VmSnapshot {
            kvm,
            vcpus,
            memfd: fds.add(self.memory.memfd().as_ref()),
            reclaim,
            devices,
            blob: fds.add(blob.file()),
        };
        Ok((snapshot, Held { fds, sockets, blob }))
    }

    /// The VM another process saved, rebuilt here with its vCPUs parked (`start_adopted`
    /// runs them). Returns the VM and the plain passthrough devices that stayed plain.
    pub fn adopt(
        config: &VmConfig,
        s: &VmSnapshot,
        fds: &mut FdsIn,
        start: Instant,
        exit: ExitNotifier,
    ) -> Result<(Self, Vec<String>), VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
        Self::setup_vm(&vm_fd)?;
        let handover = |e| VmError::Handover(Box::new(e));
        let memfd = std::fs::File::from(fds.take(s.memfd).map_err(|e| handover(e.into()))?);
        let mut memory = MemoryManager::adopt(memfd, config.memory.size, config.memory.shared)?;
        let blob = BlobIn::new(fds.take(s.blob).map_err(|e| handover(e.into()))?)
            .map_err(|e| handover(e.into()))?;
        match (&s.reclaim, config.memory.reclaim) {
            (Some(r), true) => memory.adopt_reclaim(config.reclaim.clone(), r, fds, &blob)?,
            // Nothing was reclaimed by a VMM without reclaim: it starts here.
            (None, true) => memory.enable_reclaim(config.reclaim.clone())?,
            (_, false) => {}
        }
        if let Some(r) = memory.reclaimer() {
            r.freeze();
        }
        memory.register_with_kvm(&vm_fd)?;
        cpu::register_kick_signal()?;
        let mut parked = Vec::new();
        for v in &s.vcpus {
            let fd = cpu::create_vcpu(&vm_fd, v.id)?;
            vcpu_state::restore_vcpu(&fd, v).map_err(|e| handover(e.into()))?;
            parked.push((v.id, fd));
        }
        vcpu_state::restore_vm(&vm_fd, &s.kvm).map_err(|e| handover(e.into()))?;
        let mut restore = DeviceRestore {
            state: &s.devices,
            fds,
            kept_passthrough: Vec::new(),
        };
        let devices = DeviceManager::new(
            vm_fd.clone(),
            config,
            &memory,
            exit.clone(),
            start,
            Some(&mut restore),
        )?;
        let kept = restore.kept_passthrough;
        Ok((
            Vm {
                config: config.clone(),
                kvm,
                vm_fd,
                memory,
                devices,
                vcpus: None,
                parked: Some(parked),
                exit,
            },
            kept,
        ))
    }

    /// Starts an adopted VM once this process owns it: its devices, then its vCPUs (parked,
    /// and the device workers paused, if the VM was paused).
    pub fn start_adopted(&mut self, paused: bool) -> Result<(), VmError> {
        if paused {
            self.devices.pause();
        }
        self.devices.go()?;
        self.start_parked(paused)
            .map_err(|e| VmError::Handover(Box::new(e)))
    }

    /// With the guest running: what the devices left for later (a passthrough device's pins
    /// on all of RAM, O(pages), kept out of the downtime), then reclaim, which waited for it.
    /// The VM is this process's by now: if a device cannot settle, reclaim stays off (it could
    /// take a page from under that device) and the VM runs on.
    pub fn settle_adopted(&mut self) {
        if let Err(e) = self.devices.settle() {
            log::error!(
                "Live upgrade: {}; reclaim stays off for this VM",
                vio::error_chain(&e)
            );
            return;
        }
        if let Some(r) = self.memory.reclaimer() {
            r.thaw();
        }
    }
}
