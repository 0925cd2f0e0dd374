//! Local live migration, as Cloud Hypervisor's `send-migration --local` / `receive-migration`
//! name it: a live upgrade of the VMM process. Guest RAM is not copied: the memfd, like every
//! other descriptor the new process needs (passthrough devices' sockets, interrupt and doorbell
//! eventfds, the reclaim store, the serial output), travels over the Unix socket.
//!
//! The exchange (docs/vio.md, "Live upgrade", has the reasons):
//!
//! ```text
//! sender                               receiver
//! Hello {version}            ->
//!                            <-        Accept | Refuse
//! (freeze the VM: vCPUs, devices, reclaim; vectors off KVM)
//! State {config, snapshot} + fds ->
//!                                      rebuild the VM, silently (no word to any device)
//!                            <-        Ready | Refuse
//! Go                         ->        (commit point)
//!                                      start devices, run the vCPUs
//!                            <-        Running
//! exit 0
//! ```
//!
//! Until the sender has sent Go, any failure (a refusal, the receiver dying or closing the
//! socket) leaves the VM with the sender, which thaws it and runs on. The receiver neither
//! writes to a device nor runs anything before Go, so nothing it did needs undoing.

mod channel;

pub use channel::{Channel, ChannelError};

use crate::config::{VioConfig, VioMode, VmConfig};
use crate::devices::ExitNotifier;
use crate::vm::handover::{HandoverError, VmSnapshot};
use crate::vm::{Vm, VmError};
use serde::{Deserialize, Serialize};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thiserror::Error;
use vfio::handover::FdsIn;

/// The migration format's version; a receiver refuses any other.
pub const VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("Invalid migration URL {0}: only local migration (unix:PATH) is supported")]
    Url(String),
    #[error("Local migration needs \"local\": true (guest RAM is handed over, not copied)")]
    NotLocal,
    #[error("Local migration needs shared guest RAM (--memory ...,shared=on): private pages cannot be handed over")]
    NotShared,
    #[error("Failed to connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("Failed to listen on {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("Migration channel")]
    Channel(#[from] ChannelError),
    #[error("The receiver refused: {0}")]
    Refused(String),
    #[error("Migration format version {0} is not supported (this VMM speaks version {VERSION})")]
    Version(u32),
    #[error("Unexpected message: {0}")]
    Protocol(&'static str),
    #[error("Failed to freeze the VM")]
    Freeze(#[source] HandoverError),
    #[error("Failed to save the VM")]
    Save(#[source] HandoverError),
    #[error("Invalid VM configuration")]
    Config(#[source] crate::config::ConfigError),
    #[error("Failed to take the VM over")]
    Restore(#[source] VmError),
    #[error("The VM is not running")]
    NotRunning,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        version: u32,
        build: String,
    },
    Accept,
    Refuse {
        reason: String,
    },
    State {
        config: serde_json::Value,
        vm: Box<VmSnapshot>,
        /// The VM was paused: it arrives paused.
        #[serde(default)]
        paused: bool,
    },
    Ready,
    Go,
    Running,
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Accept => "accept",
            Message::Refuse { .. } => "refuse",
            Message::State { .. } => "state",
            Message::Ready => "ready",
            Message::Go => "go",
            Message::Running => "running",
        }
    }
}

/// The socket path of a `unix:PATH` URL.
pub fn unix_path(url: &str) -> Result<PathBuf, MigrationError> {
    match url.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(MigrationError::Url(url.to_string())),
    }
}

/// What a completed send measured.
#[derive(Clone, Debug, Serialize)]
pub struct SendReport {
    /// vCPUs stopped here until the receiver said they run there.
    pub downtime_us: u64,
    /// Of it: freezing and saving, and the receiver's rebuilding.
    pub save_us: u64,
    pub restore_us: u64,
    pub fds: usize,
    pub state_bytes: usize,
}

/// Hands `vm` to the VMM listening at `url`. On `Ok` the VM runs there and this process must
/// exit without touching it; on `Err` it runs here, as before.
pub fn send(
    vm: &mut Vm,
    config: &VmConfig,
    url: &str,
    paused: bool,
) -> Result<SendReport, MigrationError> {
    let path = unix_path(url)?;
    if !config.memory.shared {
        return Err(MigrationError::NotShared);
    }
    let sock = UnixStream::connect(&path)
        .map_err(|e| MigrationError::Connect(path.display().to_string(), e))?;
    let mut ch = Channel::new(sock);
    ch.send(
        &Message::Hello {
            version: VERSION,
            build: env!("CARGO_PKG_VERSION").into(),
        },
        &[],
    )?;
    match ch.recv::<Message>()?.0 {
        Message::Accept => {}
        Message::Refuse { reason } => return Err(MigrationError::Refused(reason)),
        m => return Err(MigrationError::Protocol(m.name())),
    }
    let t0 = Instant::now();
    let moved = vm
        .freeze()
        .map_err(MigrationError::Freeze)
        .and_then(|()| transfer(vm, config, &mut ch, t0, paused));
    match moved {
        Ok(r) => Ok(r),
        Err(e) => {
            log::warn!(
                "Live upgrade failed, the VM runs on here: {}",
                vio::error_chain(&e)
            );
            if let Err(t) = vm.thaw(paused) {
                log::error!("Resuming the VM: {}", vio::error_chain(&t));
            }
            Err(e)
        }
    }
}

fn transfer(
    vm: &mut Vm,
    config: &VmConfig,
    ch: &mut Channel,
    t0: Instant,
    paused: bool,
) -> Result<SendReport, MigrationError> {
    let (snapshot, held) = vm.save().map_err(MigrationError::Save)?;
    let msg = Message::State {
        config: config.to_json(),
        vm: Box::new(snapshot),
        paused,
    };
    let save_us = t0.elapsed().as_micros() as u64;
    let state_bytes = ch.send(&msg, held.fds.raw())?;
    let t1 = Instant::now();
    match ch.recv::<Message>()?.0 {
        Message::Ready => {}
        Message::Refuse { reason } => return Err(MigrationError::Refused(reason)),
        m => return Err(MigrationError::Protocol(m.name())),
    }
    let restore_us = t1.elapsed().as_micros() as u64;
    // The commit point: from here the VM is the receiver's, whatever happens.
    ch.send(&Message::Go, &[])?;
    match ch.recv::<Message>() {
        Ok((Message::Running, _)) => {}
        Ok((m, _)) => log::error!("Live upgrade: the receiver sent {} after go", m.name()),
        Err(e) => log::error!(
            "Live upgrade: no word from the receiver after go: {}",
            vio::error_chain(&e)
        ),
    }
    Ok(SendReport {
        downtime_us: t0.elapsed().as_micros() as u64,
        save_us,
        restore_us,
        fds: held.fds.raw().len(),
        state_bytes,
    })
}

/// A VM received and running, with its configuration as this VMM holds it.
pub struct Received {
    pub config: VmConfig,
    pub vm: Vm,
    pub restore_us: u64,
    /// The VM was paused, and is so here.
    pub paused: bool,
}

/// Test hook: the receiver sleeps this long before rebuilding the VM (so a test can kill it
/// mid-way).
const STALL_ENV: &str = "VIO_TEST_RECEIVE_STALL_MS";

/// Waits at `url` for one VMM to hand its VM over, then runs it.
pub fn receive(url: &str, start: Instant, exit: ExitNotifier) -> Result<Received, MigrationError> {
    let path = unix_path(url)?;
    let listener = UnixListener::bind(&path)
        .map_err(|e| MigrationError::Listen(path.display().to_string(), e))?;
    let accepted = listener.accept();
    let _ = std::fs::remove_file(&path);
    let (sock, _) = accepted.map_err(|e| MigrationError::Listen(path.display().to_string(), e))?;
    let mut ch = Channel::new(sock);
    match ch.recv::<Message>()?.0 {
        Message::Hello { version, .. } if version == VERSION => {
            ch.send(&Message::Accept, &[])?;
        }
        Message::Hello { version, .. } => {
            let e = MigrationError::Version(version);
            let _ = ch.send(
                &Message::Refuse {
                    reason: e.to_string(),
                },
                &[],
            );
            return Err(e);
        }
        m => return Err(MigrationError::Protocol(m.name())),
    }
    let (msg, fds) = ch.recv::<Message>()?;
    let t0 = Instant::now();
    let Message::State { config, vm, paused } = msg else {
        return Err(MigrationError::Protocol(msg.name()));
    };
    if let Some(ms) = std::env::var(STALL_ENV).ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let mut fds = FdsIn::new(fds);
    let built = take_config(config).and_then(|config| {
        Vm::adopt(&config, &vm, &mut fds, start, exit)
            .map(|(vm, kept)| (config, vm, kept))
            .map_err(MigrationError::Restore)
    });
    let (mut config, mut vm, kept) = match built {
        Ok(b) => b,
        Err(e) => {
            let _ = ch.send(
                &Message::Refuse {
                    reason: vio::error_chain(&e),
                },
                &[],
            );
            return Err(e);
        }
    };
    if fds.left() > 0 {
        log::warn!("Live upgrade: {} descriptors were not used", fds.left());
    }
    for u in config.user_devices.iter_mut() {
        if u.id.as_ref().is_some_and(|id| kept.contains(id)) {
            u.vio = None;
        }
    }
    ch.send(&Message::Ready, &[])?;
    match ch.recv::<Message>()?.0 {
        Message::Go => {}
        m => return Err(MigrationError::Protocol(m.name())),
    }
    vm.start_adopted(paused).map_err(MigrationError::Restore)?;
    let restore_us = t0.elapsed().as_micros() as u64;
    let _ = ch.send(&Message::Running, &[]);
    vm.settle_adopted();
    log::info!("VM received and running ({restore_us} us after its state arrived)");
    Ok(Received {
        config,
        vm,
        restore_us,
        paused,
    })
}

/// The sender's configuration as this VMM runs it: a plain passthrough device is taken under
/// VIO (in passthrough mode, switchable to snoop), and shared guest RAM becomes reclaimable
/// (on demand: no background policy unless configured).
fn take_config(json: serde_json::Value) -> Result<VmConfig, MigrationError> {
    let mut config =
        VmConfig::from_migration_json(&json.to_string()).map_err(MigrationError::Config)?;
    for u in config.user_devices.iter_mut() {
        if u.vio.is_none() {
            u.vio = Some(VioConfig::new(VioMode::Passthrough));
            u.io_fds = None;
        }
    }
    if config.memory.shared {
        config.memory.reclaim = true;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unix_urls() {
        assert_eq!(
            unix_path("unix:/run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        for bad in ["unix:", "tcp:1.2.3.4:5", "/run/x.sock", ""] {
            assert!(
                matches!(unix_path(bad), Err(MigrationError::Url(_))),
                "{bad}"
            );
        }
    }

    /// A plain passthrough VMM's configuration arrives with its devices under VIO, passed
    /// through, and shared RAM reclaimable; a `vio` device keeps its settings.
    #[test]
    fn a_legacy_configuration_enters_vio() {
        let mut c = VmConfig::new(std::env::current_exe().unwrap());
        c.memory.shared = true;
        c.user_devices = vec![
            crate::config::UserDeviceConfig::parse("socket=/tmp/a.sock").unwrap(),
            crate::config::UserDeviceConfig::parse_vio("socket=/tmp/b.sock,id=v,mode=snoop")
                .unwrap(),
        ];
        let t = take_config(c.to_json()).unwrap();
        assert!(t.memory.reclaim);
        assert_eq!(t.user_devices[0].id.as_deref(), Some("_vfio_user0"));
        assert_eq!(
            t.user_devices[0].vio.as_ref().map(|v| v.mode),
            Some(VioMode::Passthrough)
        );
        assert_eq!(
            t.user_devices[1].vio.as_ref().map(|v| v.mode),
            Some(VioMode::Snoop)
        );
        assert!(take_config(serde_json::json!({"payload": 3})).is_err());
        // The files need not be there: the VM runs, its disks' descriptors come with it.
        let mut gone = VmConfig::new(PathBuf::from("/nonexistent/kernel"));
        gone.memory.shared = true;
        assert!(take_config(gone.to_json()).is_ok());
    }
}
