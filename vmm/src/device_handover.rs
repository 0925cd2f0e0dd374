//! The devices across a live upgrade. The old process freezes them (no worker runs, no vector
//! reaches KVM, a `vio` front end has published all it will) and saves what it holds of each;
//! the new process builds the same devices in the same order, from that state instead of from
//! scratch. A passthrough device's connection itself moves: the device process sees the same
//! socket, the same interrupt eventfds and the same doorbell fds, and no message at all.

use super::*;
use crate::devices::SerialSnapshot;
use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixStream;
use vfio::handover::{FdsIn, FdsOut, HandoverError};
use vfio::vfio_user::PciFunctionState;
use vfio::vio::{Adoption, VioDescription, VioSetup, VioState};
use virtio_devices::transport::VirtioPciState;

#[derive(Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: Option<SerialSnapshot>,
    pub serial_fd: Option<usize>,
    pub pm_timer_ns: u64,
    pub pci_config_address: u32,
    pub disks: Vec<VirtioPciState>,
    /// The disks' image files (not reopened by path: the image may have moved since).
    pub disk_fds: Vec<usize>,
    /// The network devices, and their TAPs (the interface stays, with its queue of frames).
    #[serde(default)]
    pub nets: Vec<VirtioPciState>,
    #[serde(default)]
    pub tap_fds: Vec<usize>,
    pub user: Vec<UserDeviceState>,
}

#[derive(Serialize, Deserialize)]
pub struct UserDeviceState {
    pub id: String,
    pub socket: usize,
    pub next_msg_id: u16,
    pub max_dma_maps: u64,
    /// The MSI-X vectors' eventfds, which the device signals.
    pub irqfds: Vec<usize>,
    pub kind: UserKind,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserKind {
    /// With the device described for a VMM that takes it under VIO, if it offers VIO.
    Passthrough(PciFunctionState, Option<Box<VioDescription>>),
    Vio(Box<VioState>),
}

fn handover_err(id: &str, e: HandoverError) -> DeviceError {
    DeviceError::UserDevice(id.to_string(), UserDeviceError::Handover(e))
}

impl DeviceManager {
    /// Stops every device from touching the guest or KVM: `vio` front ends publish what is
    /// pending and stop, and every vector's irqfd comes off KVM (what devices signal from now
    /// on waits in the eventfds). The vCPUs and device workers must be paused.
    pub fn freeze(&self) -> Result<(), DeviceError> {
        self.each_vio(|v| {
            v.freeze();
            Ok(())
        })?;
        for g in &self.msi_groups {
            g.detach().map_err(DeviceError::Interrupts)?;
        }
        Ok(())
    }

    /// Starts adopted devices once this process owns them (see `VioPciDevice::go`); emulated
    /// devices look at every queue once.
    pub fn go(&self) -> Result<(), DeviceError> {
        self.each_vio(VioPciDevice::go)?;
        for t in &self.transports {
            t.lock().unwrap().kick_all();
        }
        Ok(())
    }

    /// What adopted devices leave until the guest runs (see `VioPciDevice::settle`).
    pub fn settle(&self) -> Result<(), DeviceError> {
        self.each_vio(VioPciDevice::settle)
    }

    /// Runs `f` on every `vio` device, stopping at the first error.
    fn each_vio(
        &self,
        f: impl Fn(&mut VioPciDevice<GuestMemoryMmap>) -> Result<(), vfio::vio::VioDeviceError>,
    ) -> Result<(), DeviceError> {
        for d in &self.user {
            if let UserDevice::Vio(v) = d {
                let r = f(&mut v.lock().unwrap());
                // The id is read after the device's lock is released (it takes it again).
                r.map_err(|e| DeviceError::UserDevice(d.id(), e.into()))?;
            }
        }
        Ok(())
    }

    /// Undoes `freeze` (and `save`): the upgrade did not happen.
    pub fn thaw(&self) -> Result<(), DeviceError> {
        for t in &self.transports {
            t.lock().unwrap().resume_stopped();
        }
        for g in &self.msi_groups {
            g.reattach().map_err(DeviceError::Interrupts)?;
        }
        self.each_vio(VioPciDevice::thaw)
    }

    /// The frozen devices' state. Emulated devices' workers stop here (`thaw` restarts them).
    /// `held` keeps the sockets' descriptors open until the state is sent.
    pub fn save(
        &self,
        fds: &mut FdsOut,
        held: &mut Vec<UnixStream>,
    ) -> Result<DevicesState, DeviceError> {
        let mut user = Vec::new();
        for (d, group) in self.user.iter().zip(&self.user_msi) {
            let id = d.id();
            let client = d.client();
            let (sock, next_msg_id) = client
                .handover()
                .map_err(|e| handover_err(&id, HandoverError::Dup(e)))?;
            let socket = fds.add(&sock);
            held.push(sock);
            let irqfds = group.eventfds().iter().map(|f| fds.add(f)).collect();
            let kind = match d {
                UserDevice::Passthrough(p) => {
                    let p = p.lock().unwrap();
                    if p.has_page_requests() {
                        // Its page-request handler and unpinned window are not handed over.
                        return Err(DeviceError::Restore(format!(
                            "{id}: a device with page requests (pri=on) cannot be live-upgraded"
                        )));
                    }
                    let description = match VioPciDevice::<GuestMemoryMmap>::describe(&p) {
                        Ok(d) => d.map(Box::new),
                        Err(e) => {
                            log::warn!("{id}: describing the device: {}", vio::error_chain(&e));
                            None
                        }
                    };
                    UserKind::Passthrough(p.save(fds), description)
                }
                UserDevice::Vio(v) => UserKind::Vio(Box::new(v.lock().unwrap().save(fds))),
            };
            user.push(UserDeviceState {
                id,
                socket,
                next_msg_id,
                max_dma_maps: client.max_dma_maps(),
                irqfds,
                kind,
            });
        }
        Ok(DevicesState {
            serial: self.serial.as_ref().map(|s| s.lock().unwrap().state()),
            serial_fd: self.serial_file.as_ref().map(|f| fds.add(f)),
            pm_timer_ns: self.pm_timer.lock().unwrap().elapsed().as_nanos() as u64,
            pci_config_address: self.pci_io.lock().unwrap().address(),
            disks: self.transports[..self.disk_files.len()]
                .iter()
                .map(|t| t.lock().unwrap().stop_and_save())
                .collect(),
            disk_fds: self.disk_files.iter().map(|f| fds.add(f)).collect(),
            nets: self.transports[self.disk_files.len()..]
                .iter()
                .map(|t| t.lock().unwrap().stop_and_save())
                .collect(),
            tap_fds: self.tap_files.iter().map(|f| fds.add(f)).collect(),
            user,
        })
    }
}

impl DeviceRestore<'_> {
    pub(super) fn serial_file(&mut self) -> Result<std::fs::File, DeviceError> {
        let k = self.state.serial_fd;
        self.file(k, || "no serial output file was handed over".into())
    }

    pub(crate) fn disk_file(&mut self, i: usize) -> Result<std::fs::File, DeviceError> {
        let k = self.state.disk_fds.get(i).copied();
        self.file(k, || format!("no image file for disk {i}"))
    }

    pub(crate) fn tap_file(&mut self, i: usize) -> Result<std::fs::File, DeviceError> {
        let k = self.state.tap_fds.get(i).copied();
        self.file(k, || format!("no TAP for network device {i}"))
    }

    fn file(
        &mut self,
        k: Option<usize>,
        missing: impl Fn() -> String,
    ) -> Result<std::fs::File, DeviceError> {
        let k = k.ok_or_else(|| DeviceError::Restore(missing()))?;
        self.fds
            .take(k)
            .map(std::fs::File::from)
            .map_err(|e| DeviceError::Restore(e.to_string()))
    }

    pub(crate) fn check_counts(&self, config: &VmConfig) -> Result<(), DeviceError> {
        let (d, n, u) = (&self.state.disks, &self.state.nets, &self.state.user);
        if d.len() != config.disks.len()
            || self.state.disk_fds.len() != d.len()
            || n.len() != config.net.len()
            || self.state.tap_fds.len() != n.len()
            || u.len() != config.user_devices.len()
        {
            return Err(DeviceError::Restore(format!(
                "{} disks, {} network devices and {} user devices saved, {}, {} and {} configured",
                d.len(),
                n.len(),
                u.len(),
                config.disks.len(),
                config.net.len(),
                config.user_devices.len()
            )));
        }
        Ok(())
    }

    /// User device `i` as the old process left it, held as the configuration says: a plain
    /// passthrough device configured as `vio` is taken under VIO (in passthrough mode) if it
    /// offers the extension.
    pub(super) fn adopt_user_device(
        &mut self,
        id: &str,
        i: usize,
        u: &UserDeviceConfig,
        ram: &MemoryManager,
        router: &Arc<GsiRouter>,
        ioevents: &Arc<dyn IoEventRegistrar>,
    ) -> Result<(UserDevice, Arc<KvmMsiGroup>), DeviceError> {
        let st = &self.state.user[i];
        if st.id != id {
            return Err(DeviceError::Restore(format!(
                "user device {i} is {} in the saved state, {id} in the configuration",
                st.id
            )));
        }
        let err = |e: UserDeviceError| DeviceError::UserDevice(id.to_string(), e);
        let fds: &mut FdsIn = self.fds;
        let sock = UnixStream::from(fds.take(st.socket).map_err(|e| handover_err(id, e))?);
        let client = Arc::new(VfioUserClient::adopt(sock, st.next_msg_id, st.max_dma_maps));
        let irqfds = st
            .irqfds
            .iter()
            .map(|&k| fds.take_eventfd(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| handover_err(id, e))?;
        let group = Arc::new(KvmMsiGroup::with_eventfds(router.clone(), irqfds));
        let setup = |vio: &crate::config::VioConfig| VioSetup {
            mem: ram.memory(),
            window: vio_window(ram, &client),
            ram: ram_pages(ram),
            registrar: ioevents.clone(),
            opts: vio_options(vio),
        };
        let adopt_inner = |f: &PciFunctionState, fds: &mut FdsIn| {
            VfioUserPciDevice::adopt(
                id.to_string(),
                client.clone(),
                group.clone(),
                ioevents.clone(),
                f,
                fds,
            )
            .map_err(|e| err(e.into()))
        };
        let dev = match (&st.kind, &u.vio) {
            (UserKind::Vio(v), Some(vio)) => {
                let inner = adopt_inner(&v.function, fds)?;
                let dev = VioPciDevice::adopt(inner, setup(vio), Adoption::Vio(v), fds)
                    .map_err(|e| err(e.into()))?;
                UserDevice::Vio(Arc::new(Mutex::new(dev)))
            }
            (UserKind::Passthrough(f, Some(desc)), Some(vio)) => {
                // The front end owns the doorbells; they go to the device's fds again, as the
                // device starts in passthrough mode.
                let mut f = f.clone();
                f.registered = false;
                let inner = adopt_inner(&f, fds)?;
                let dev = VioPciDevice::adopt(inner, setup(vio), Adoption::Passthrough(desc), fds)
                    .map_err(|e| err(e.into()))?;
                UserDevice::Vio(Arc::new(Mutex::new(dev)))
            }
            (UserKind::Passthrough(f, None), Some(_)) => {
                log::warn!("{id}: the device does not offer VIO; it stays plain passthrough");
                let inner = adopt_inner(f, fds)?;
                pin_for_passthrough(ram, id, &client);
                self.kept_passthrough.push(id.to_string());
                UserDevice::Passthrough(Arc::new(Mutex::new(inner)))
            }
            (UserKind::Passthrough(f, _), None) => {
                let inner = adopt_inner(f, fds)?;
                pin_for_passthrough(ram, id, &client);
                UserDevice::Passthrough(Arc::new(Mutex::new(inner)))
            }
            (UserKind::Vio(_), None) => {
                return Err(DeviceError::Restore(format!(
                    "{id} was a vio device; the configuration has it plain passthrough"
                )))
            }
        };
        Ok((dev, group))
    }
}
