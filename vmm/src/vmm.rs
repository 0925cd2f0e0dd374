//! The VMM thread: owns the VM and its configuration, and serialises everything that changes
//! them — API requests and the VM's own exits — through one event channel.

use crate::api::{ApiMessage, ApiRequest};
use crate::config::VmConfig;
use crate::devices::{ExitNotifier, ExitReason};
use crate::error::{VmmError, VmmResult};
use crate::migration;
use crate::vm::Vm;
use serde_json::json;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

/// Cloud Hypervisor's VM states, as `vm.info` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl VmState {
    fn name(&self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
        }
    }
}

pub enum VmmEvent {
    Api(ApiMessage),
    /// A VM exit, tagged with the generation of the VM it came from.
    Exit(u64, ExitReason),
}

/// How the VMM process ends.
#[derive(Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// Guest power-off or `vmm.shutdown`.
    Clean,
    /// The guest crashed.
    GuestCrash(String),
    /// The VM went to another VMM process (a live upgrade).
    Migrated,
}

pub struct Vmm {
    config: Option<VmConfig>,
    vm: Option<Vm>,
    state: VmState,
    generation: u64,
    start: Instant,
    tx: Sender<VmmEvent>,
    rx: Receiver<VmmEvent>,
}

impl Vmm {
    pub fn new(start: Instant) -> Self {
        let (tx, rx) = channel();
        Vmm {
            config: None,
            vm: None,
            state: VmState::Created,
            generation: 0,
            start,
            tx,
            rx,
        }
    }

    /// Where the API server sends requests.
    pub fn api_sender(&self) -> Sender<ApiMessage> {
        let (api_tx, api_rx) = channel::<ApiMessage>();
        let tx = self.tx.clone();
        // Forwarding keeps the API server independent of the VMM's event type.
        std::thread::Builder::new()
            .name("api-forward".into())
            .spawn(move || {
                virtio_devices::seccomp::narrow("api-forward");
                for m in api_rx {
                    if tx.send(VmmEvent::Api(m)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the API forwarder");
        api_tx
    }

    pub fn create(&mut self, config: VmConfig) -> Result<(), VmmError> {
        if self.config.is_some() {
            return Err(VmmError::VmAlreadyCreated);
        }
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(())
    }

    /// A notifier for the next VM's exits.
    fn next_exit_notifier(&mut self) -> ExitNotifier {
        self.generation += 1;
        let (tx, generation) = (std::sync::Mutex::new(self.tx.clone()), self.generation);
        ExitNotifier::new(move |r| {
            let _ = tx.lock().unwrap().send(VmmEvent::Exit(generation, r));
        })
    }

    pub fn boot(&mut self) -> Result<(), VmmError> {
        let config = self.config.clone().ok_or(VmmError::VmNotCreated)?;
        if matches!(self.state, VmState::Running | VmState::Paused) {
            return Err(VmmError::VmAlreadyBooted);
        }
        let exit = self.next_exit_notifier();
        let mut vm = Vm::new(&config, self.start, exit)?;
        vm.boot()?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        Ok(())
    }

    fn stop_vm(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            for (id, c) in vm.counters() {
                log::info!(
                    "Device {id} counters: {}",
                    serde_json::to_string(&c).unwrap_or_default()
                );
            }
            vm.shutdown();
        }
    }

    fn handle(&mut self, req: ApiRequest) -> VmmResult {
        match req {
            ApiRequest::VmmPing => Ok(Some(json!({
                "build_version": env!("CARGO_PKG_VERSION"),
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "features": ["kvm", "vio"],
            }))),
            ApiRequest::VmmShutdown => unreachable!("handled by the control loop"),
            ApiRequest::VmCreate(c) => self.create(*c).map(|_| None),
            ApiRequest::VmBoot => self.boot().map(|_| None),
            ApiRequest::VmShutdown => {
                if !matches!(self.state, VmState::Running | VmState::Paused)
                    || self.config.is_none()
                {
                    return Err(VmmError::VmNotRunning);
                }
                self.stop_vm();
                self.state = VmState::Shutdown;
                Ok(None)
            }
            ApiRequest::VmDelete => {
                if self.config.is_none() {
                    return Err(VmmError::VmNotCreated);
                }
                self.stop_vm();
                self.config = None;
                self.state = VmState::Created;
                Ok(None)
            }
            ApiRequest::VmReboot => {
                if !matches!(self.state, VmState::Running | VmState::Paused) {
                    return Err(VmmError::VmNotRunning);
                }
                self.stop_vm();
                self.state = VmState::Shutdown;
                self.boot().map(|_| None)
            }
            ApiRequest::VmPause => {
                if self.state != VmState::Running {
                    return Err(VmmError::VmNotRunning);
                }
                self.vm.as_ref().expect("running VM").pause();
                self.state = VmState::Paused;
                Ok(None)
            }
            ApiRequest::VmResume => {
                if self.state != VmState::Paused {
                    return Err(VmmError::VmNotPaused);
                }
                self.vm.as_ref().expect("paused VM").resume();
                self.state = VmState::Running;
                Ok(None)
            }
            ApiRequest::VmInfo => {
                let config = self.config.as_ref().ok_or(VmmError::VmNotCreated)?;
                Ok(Some(json!({
                    "config": config.to_json(),
                    "state": self.state.name(),
                    "memory_actual_size": config.memory.size,
                })))
            }
            ApiRequest::VmReclaim {
                bytes,
                unsafe_unmap_dma,
                dma_only,
            } => {
                let vm = self.vm.as_ref().ok_or(VmmError::VmNotBooted)?;
                let report = vm
                    .reclaim(bytes, unsafe_unmap_dma, dma_only)
                    .ok_or(VmmError::ReclaimDisabled)?;
                Ok(Some(serde_json::to_value(report).map_err(VmmError::Reply)?))
            }
            ApiRequest::VmDmaUnmap { id, iova, size } => {
                let vm = self.vm.as_ref().ok_or(VmmError::VmNotBooted)?;
                vm.dma_unmap(&id, iova, size)?;
                Ok(None)
            }
            ApiRequest::VmVioMode { id, mode } => {
                let vm = self.vm.as_ref().ok_or(VmmError::VmNotBooted)?;
                let report = vm.vio_mode(&id, mode)?;
                Ok(Some(json!({ "id": id, "mode": mode, "switch": report })))
            }
            ApiRequest::VmVioInfo => {
                let vm = self.vm.as_ref().ok_or(VmmError::VmNotBooted)?;
                Ok(Some(
                    serde_json::to_value(vm.vio_info()).map_err(VmmError::Reply)?,
                ))
            }
            ApiRequest::VmSendMigration { .. } => unreachable!("handled by the control loop"),
            ApiRequest::VmReceiveMigration { url } => {
                if self.config.is_some() {
                    return Err(VmmError::VmAlreadyCreated);
                }
                let exit = self.next_exit_notifier();
                let r = migration::receive(&url, self.start, exit)?;
                self.config = Some(r.config);
                self.vm = Some(r.vm);
                self.state = if r.paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                Ok(Some(json!({ "restore_us": r.restore_us })))
            }
            ApiRequest::VmCounters => {
                let vm = self.vm.as_ref().ok_or(VmmError::VmNotBooted)?;
                Ok(Some(
                    serde_json::to_value(vm.counters()).map_err(VmmError::Reply)?,
                ))
            }
        }
    }

    /// Hands the VM over; on success it is no longer this process's.
    fn send_migration(
        &mut self,
        url: &str,
        local: bool,
    ) -> Result<migration::SendReport, VmmError> {
        if !local {
            return Err(migration::MigrationError::NotLocal.into());
        }
        if !matches!(self.state, VmState::Running | VmState::Paused) {
            return Err(VmmError::VmNotRunning);
        }
        let (Some(vm), Some(config)) = (self.vm.as_mut(), self.config.as_ref()) else {
            return Err(VmmError::VmNotRunning);
        };
        let paused = self.state == VmState::Paused;
        Ok(migration::send(vm, config, url, paused)?)
    }

    /// Serves events until the VMM should exit.
    pub fn control_loop(mut self) -> VmmExit {
        while let Ok(ev) = self.rx.recv() {
            match ev {
                VmmEvent::Api(ApiMessage {
                    request: ApiRequest::VmSendMigration { url, local },
                    reply,
                    written,
                }) => match self.send_migration(&url, local) {
                    Ok(report) => {
                        log::info!(
                            "VM handed over to {url}: {} us downtime",
                            report.downtime_us
                        );
                        let _ = reply.send(Ok(serde_json::to_value(report).ok()));
                        let _ = written.recv_timeout(std::time::Duration::from_secs(5));
                        // The VM, its devices and its memory are the new process's now:
                        // nothing of them may be torn down from here.
                        std::mem::forget(self.vm.take());
                        return VmmExit::Migrated;
                    }
                    Err(e) => {
                        log::info!("API request failed: {}", vio::error_chain(&e));
                        let _ = reply.send(Err(e.into()));
                    }
                },
                VmmEvent::Api(ApiMessage {
                    request: ApiRequest::VmmShutdown,
                    reply,
                    ..
                }) => {
                    self.stop_vm();
                    let _ = reply.send(Ok(None));
                    return VmmExit::Clean;
                }
                VmmEvent::Api(m) => {
                    let res = self.handle(m.request);
                    if let Err(e) = &res {
                        log::info!("API request failed: {}", vio::error_chain(e));
                    }
                    let _ = m.reply.send(res.map_err(Into::into));
                }
                VmmEvent::Exit(generation, _)
                    if generation != self.generation || self.vm.is_none() => {}
                VmmEvent::Exit(_, ExitReason::Reset) => {
                    log::info!("Rebooting the VM");
                    self.stop_vm();
                    self.state = VmState::Shutdown;
                    if let Err(e) = self.boot() {
                        let e = vio::error_chain(&e);
                        log::error!("Reboot failed: {e}");
                        return VmmExit::GuestCrash(format!("reboot failed: {e}"));
                    }
                }
                // As in Cloud Hypervisor, a guest power-off ends the VMM.
                VmmEvent::Exit(_, ExitReason::PowerOff)
                | VmmEvent::Exit(_, ExitReason::Stopped) => {
                    self.stop_vm();
                    log::info!("VM powered off");
                    return VmmExit::Clean;
                }
                VmmEvent::Exit(_, ExitReason::Crash(msg)) => {
                    self.stop_vm();
                    return VmmExit::GuestCrash(msg);
                }
            }
        }
        VmmExit::Clean
    }
}
