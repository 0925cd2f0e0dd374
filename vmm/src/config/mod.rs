//! The VM configuration: one model for the command line and the REST API, as in Cloud
//! Hypervisor. The types serialise to (and parse from) Cloud Hypervisor's JSON `VmConfig`
//! schema, with VIO's additions (`memory.reclaim`, `reclaim`, `user_devices[].vio`); the CLI's
//! `--flag key=value,...` options are parsed into the same types (`cli`). Defaults and value
//! checks are written once, here, and both paths use them.

mod cli;
mod compat;

pub use cli::{parse_size, OptionParser};

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("Error parsing --{flag} \"{value}\": {reason}")]
    Parse {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("--kernel is required")]
    NoKernel,
    #[error("Kernel {0} does not exist")]
    KernelMissing(PathBuf),
    #[error("Initramfs {0} does not exist")]
    InitramfsMissing(PathBuf),
    #[error("Disk image {0} does not exist")]
    DiskMissing(PathBuf),
    #[error("--user-device requires --memory shared=on (the device maps guest RAM)")]
    UserDeviceNeedsSharedMemory,
    #[error("Invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("Invalid VM configuration: {0}")]
    Json(String),
}

/// A value a check refused: the field (within its part of the configuration) and why.
#[derive(Debug)]
pub(crate) struct Refused {
    field: &'static str,
    reason: String,
}

fn refuse(field: &'static str, reason: impl Into<String>) -> Result<(), Refused> {
    Err(Refused {
        field,
        reason: reason.into(),
    })
}

impl Refused {
    /// As an error about `part.field` of the JSON configuration.
    fn at(self, part: &str) -> ConfigError {
        invalid(&format!("{part}.{}", self.field), self.reason)
    }
}

pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    /// Handed to the kernel as the PVH start info's first module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    pub size: u64,
    pub shared: bool,
    /// Guest memory reclaim (VIO); needs `shared`.
    pub reclaim: bool,
}

impl MemoryConfig {
    pub const DEFAULT_SIZE: u64 = 512 << 20;

    fn check(&self) -> Result<(), Refused> {
        if self.size < (16 << 20) || !self.size.is_multiple_of(4096) {
            return refuse("size", "size must be at least 16M and a multiple of 4K");
        }
        if self.size > (1 << 40) {
            return refuse("size", "size must be at most 1T");
        }
        if self.reclaim && !self.shared {
            return refuse(
                "reclaim",
                "reclaim needs shared=on (reclaim frees pages of the shared memfd)",
            );
        }
        Ok(())
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: Self::DEFAULT_SIZE,
            shared: false,
            reclaim: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    /// 0 while unset: then as many as `boot_vcpus` (`normalize`).
    pub max_vcpus: u8,
}

impl CpusConfig {
    fn normalize(&mut self) {
        if self.max_vcpus == 0 {
            self.max_vcpus = self.boot_vcpus;
        }
    }

    fn check(&self) -> Result<(), Refused> {
        if self.boot_vcpus == 0 {
            return refuse("boot_vcpus", "boot must be at least 1");
        }
        if self.max_vcpus != 0 && self.max_vcpus < self.boot_vcpus {
            return refuse("max_vcpus", "max must not be below boot");
        }
        Ok(())
    }
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default = "DiskConfig::default_num_queues")]
    pub num_queues: u16,
    #[serde(default = "DiskConfig::default_queue_size")]
    pub queue_size: u16,
}

impl DiskConfig {
    fn default_num_queues() -> u16 {
        1
    }

    fn default_queue_size() -> u16 {
        virtio_devices::block::DEFAULT_QUEUE_SIZE
    }

    fn check(&self) -> Result<(), Refused> {
        if self.num_queues == 0 || self.num_queues > 16 {
            return refuse("num_queues", "num_queues must be 1..16");
        }
        check_queue_size(self.queue_size)
    }
}

fn check_queue_size(size: u16) -> Result<(), Refused> {
    if !size.is_power_of_two() || !(2..=32768).contains(&size) {
        return refuse("queue_size", "queue_size must be a power of two, 2..32768");
    }
    Ok(())
}

/// A virtio-net device emulated by the VMM over a TAP interface (Cloud Hypervisor's `--net`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP interface: created if missing, attached to if there; unset: the kernel names a
    /// new one `vmtap<n>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The host side's address and netmask.
    #[serde(default = "NetConfig::default_ip")]
    pub ip: Ipv4Addr,
    #[serde(default = "NetConfig::default_mask")]
    pub mask: Ipv4Addr,
    /// The guest's MAC address; unset: a random locally administered one, fixed at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    /// Receive and transmit queues together.
    #[serde(default = "NetConfig::default_num_queues")]
    pub num_queues: u16,
    #[serde(default = "NetConfig::default_queue_size")]
    pub queue_size: u16,
}

impl NetConfig {
    pub(crate) fn default_ip() -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 249, 1)
    }

    pub(crate) fn default_mask() -> Ipv4Addr {
        Ipv4Addr::new(255, 255, 255, 0)
    }

    pub(crate) fn default_num_queues() -> u16 {
        2
    }

    pub(crate) fn default_queue_size() -> u16 {
        virtio_devices::net::DEFAULT_QUEUE_SIZE
    }

    pub(crate) fn check(&self) -> Result<(), Refused> {
        if let Some(t) = &self.tap {
            if t.is_empty() || t.len() > 15 || t.contains(['/', ' ', '\0']) {
                return refuse("tap", "tap must be an interface name of 1..15 bytes");
            }
        }
        if let Some(m) = &self.mac {
            if let Err(e) = virtio_devices::net::parse_mac(m) {
                return refuse("mac", e);
            }
        }
        if self.num_queues != 2 {
            return refuse(
                "num_queues",
                "num_queues must be 2: one receive and one transmit queue (multiqueue is not \
                 supported)",
            );
        }
        check_queue_size(self.queue_size)
    }

    /// The guest's MAC address (`normalize` has set it).
    pub fn mac_bytes(&self) -> [u8; 6] {
        self.mac
            .as_deref()
            .and_then(|m| virtio_devices::net::parse_mac(m).ok())
            .unwrap_or_else(random_mac)
    }
}

/// A random unicast, locally administered MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        // No entropy to be had: a fixed address, still locally administered.
        mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// A passthrough device served by another process over vfio-user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceConfig {
    pub socket: PathBuf,
    #[serde(default)]
    pub id: Option<String>,
    /// Register the device's doorbell fds as KVM ioeventfds (off: doorbells go through the
    /// VMM as region writes, as with a client that only speaks the base protocol). Unset: on
    /// for plain passthrough; a `vio` device owns its doorbells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_fds: Option<bool>,
    /// Put VIO in front of the device (`--vio`); plain passthrough when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vio: Option<VioConfig>,
    /// The device raises page requests (PRI): guest RAM is mapped for it without pins, reclaim
    /// may unmap it, and the VMM resolves the device's requests (the PRI baseline).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pri: bool,
}

impl UserDeviceConfig {
    pub fn io_fds(&self) -> bool {
        self.io_fds.unwrap_or(self.vio.is_none())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VioMode {
    /// IOPA-Snoop: the device reads a shadow available index the VMM advances once every page
    /// of a request is resident and DMA-mapped; guest memory stays reclaimable.
    Snoop,
    /// Plain passthrough behind the same front end: all of guest RAM mapped, the VMM off the
    /// data path; can be switched to snoop live.
    Passthrough,
    /// Elastic: snoop at low request rates, passthrough at high ones (`iops_high`,
    /// `iops_low`, `dwell_ms`).
    Auto,
}

impl VioMode {
    pub fn parse(v: &str) -> Option<Self> {
        match v {
            "snoop" => Some(VioMode::Snoop),
            "passthrough" => Some(VioMode::Passthrough),
            "auto" => Some(VioMode::Auto),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VioConfig {
    pub mode: VioMode,
    /// How often queues with requests in flight are re-checked, in microseconds.
    #[serde(default = "VioConfig::default_poll_us")]
    pub poll_us: u64,
    /// Auto mode: passthrough once the rate has stayed at or above `iops_high` requests/s for
    /// `dwell_ms`, snoop again once it has stayed at or below `iops_low` for `dwell_ms`.
    #[serde(default = "VioConfig::default_iops_high")]
    pub iops_high: u64,
    #[serde(default = "VioConfig::default_iops_low")]
    pub iops_low: u64,
    #[serde(default = "VioConfig::default_dwell_ms")]
    pub dwell_ms: u64,
    /// Lockpage: keep the pages DMA keeps hitting locked (resident, mapped, not reclaimed), at
    /// most `lock_budget_pct` percent of guest RAM.
    #[serde(default)]
    pub lockpage: bool,
    #[serde(default = "VioConfig::default_lock_budget_pct")]
    pub lock_budget_pct: u8,
}

impl VioConfig {
    pub const DEFAULT_POLL_US: u64 = 1000;
    /// Defaults from docs/performance.md ("Elastic passthrough"): the rate at which snooping
    /// costs the VMM a noticeable share of a core here, and a low mark far enough below it that
    /// a workload near the line does not flap.
    pub const DEFAULT_IOPS_HIGH: u64 = 20_000;
    pub const DEFAULT_IOPS_LOW: u64 = 5_000;
    pub const DEFAULT_DWELL_MS: u64 = 1_000;
    /// Production's P90 locked share (the Lockpage issue): most VMs lock less, and a driver
    /// with poor locality cannot pin more than this by default.
    pub const DEFAULT_LOCK_BUDGET_PCT: u8 = 10;

    fn default_poll_us() -> u64 {
        Self::DEFAULT_POLL_US
    }
    fn default_iops_high() -> u64 {
        Self::DEFAULT_IOPS_HIGH
    }
    fn default_iops_low() -> u64 {
        Self::DEFAULT_IOPS_LOW
    }
    fn default_dwell_ms() -> u64 {
        Self::DEFAULT_DWELL_MS
    }
    fn default_lock_budget_pct() -> u8 {
        Self::DEFAULT_LOCK_BUDGET_PCT
    }

    pub fn new(mode: VioMode) -> Self {
        VioConfig {
            mode,
            poll_us: Self::DEFAULT_POLL_US,
            iops_high: Self::DEFAULT_IOPS_HIGH,
            iops_low: Self::DEFAULT_IOPS_LOW,
            dwell_ms: Self::DEFAULT_DWELL_MS,
            lockpage: false,
            lock_budget_pct: Self::DEFAULT_LOCK_BUDGET_PCT,
        }
    }

    fn check(&self) -> Result<(), Refused> {
        if !(1..=1_000_000).contains(&self.poll_us) {
            return refuse("poll_us", "poll_us must be 1..1000000");
        }
        if self.iops_low >= self.iops_high {
            return refuse("iops_low", "iops_low must be below iops_high");
        }
        if !(1..=3_600_000).contains(&self.dwell_ms) {
            return refuse("dwell_ms", "dwell_ms must be 1..3600000");
        }
        if !(1..=100).contains(&self.lock_budget_pct) {
            return refuse("lock_budget_pct", "lock_budget_pct must be 1..100");
        }
        Ok(())
    }
}

/// How reclaimed pages are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Lz4,
    None,
}

/// The reclaim policy and its page store (`--reclaim`, JSON `reclaim`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReclaimConfig {
    /// Policy period; 0 disables the background reclaimer (only `vm.reclaim` reclaims).
    pub interval_ms: u64,
    /// A page is cold when it was not accessed for this long.
    pub idle_ms: u64,
    /// The policy reclaims until this share of guest RAM is reclaimed.
    pub target_pct: u8,
    /// The directory the page store's file goes in.
    #[serde(rename = "store")]
    pub store_dir: PathBuf,
    pub compress: Compression,
    /// The store's capacity in bytes.
    #[serde(rename = "store_max")]
    pub store_max_bytes: u64,
    /// Added to every restore (fault-latency experiments).
    pub fault_latency_us: u64,
}

impl ReclaimConfig {
    fn check(&self) -> Result<(), Refused> {
        if self.target_pct > 100 {
            return refuse("target_pct", "target_pct must be 0..100");
        }
        if !self.store_dir.is_dir() {
            return refuse(
                "store",
                format!(
                    "store directory {} does not exist",
                    self.store_dir.display()
                ),
            );
        }
        Ok(())
    }
}

impl Default for ReclaimConfig {
    fn default() -> Self {
        ReclaimConfig {
            interval_ms: 0,
            idle_ms: 1000,
            target_pct: 50,
            store_dir: std::env::temp_dir(),
            compress: Compression::Lz4,
            store_max_bytes: u64::MAX,
            fault_latency_us: 0,
        }
    }
}

/// Where a console's output goes. In JSON, Cloud Hypervisor's `{"mode": "Off|Tty|Null|File",
/// "file": PATH}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "compat::Console", into = "compat::Console")]
pub enum ConsoleMode {
    Off,
    Tty,
    Null,
    File(PathBuf),
}

impl ConsoleMode {
    fn default_serial() -> Self {
        ConsoleMode::Null
    }

    fn default_console() -> Self {
        ConsoleMode::Off
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub user_devices: Vec<UserDeviceConfig>,
    #[serde(default = "ConsoleMode::default_serial")]
    pub serial: ConsoleMode,
    #[serde(default = "ConsoleMode::default_console")]
    pub console: ConsoleMode,
    /// The reclaim policy; used when `memory.reclaim` is on.
    #[serde(default)]
    pub reclaim: ReclaimConfig,
}

impl VmConfig {
    /// A configuration booting `kernel` with every default.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            payload: PayloadConfig {
                kernel,
                cmdline: String::new(),
                initramfs: None,
            },
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            disks: Vec::new(),
            net: Vec::new(),
            user_devices: Vec::new(),
            serial: ConsoleMode::default_serial(),
            console: ConsoleMode::default_console(),
            reclaim: ReclaimConfig::default(),
        }
    }

    /// Fills in what defaults to another field.
    pub fn normalize(&mut self) {
        self.cpus.normalize();
        // Devices the user did not name get Cloud Hypervisor's ids: a prefix and one counter
        // for all devices, in creation order, skipping names the user took.
        let taken: std::collections::HashSet<String> = self
            .disks
            .iter()
            .filter_map(|d| d.id.clone())
            .chain(self.net.iter().filter_map(|n| n.id.clone()))
            .chain(self.user_devices.iter().filter_map(|u| u.id.clone()))
            .collect();
        let mut next = 0;
        let mut name = |prefix: &str| loop {
            let id = format!("{prefix}{next}");
            next += 1;
            if !taken.contains(&id) {
                return id;
            }
        };
        for d in self.disks.iter_mut().filter(|d| d.id.is_none()) {
            d.id = Some(name("_disk"));
        }
        for n in self.net.iter_mut() {
            if n.id.is_none() {
                n.id = Some(name("_net"));
            }
            if n.mac.is_none() {
                let m = random_mac();
                n.mac = Some(
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            }
        }
        for u in self.user_devices.iter_mut().filter(|u| u.id.is_none()) {
            u.id = Some(name("_vfio_user"));
        }
    }

    /// Checks every value, and what can only be checked against the host (files exist).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(true)
    }

    /// `files`: also check that the files the configuration names are there.
    fn validate_with(&self, files: bool) -> Result<(), ConfigError> {
        self.cpus.check().map_err(|r| r.at("cpus"))?;
        self.memory.check().map_err(|r| r.at("memory"))?;
        for (i, d) in self.disks.iter().enumerate() {
            d.check().map_err(|r| r.at(&format!("disks[{i}]")))?;
        }
        for (i, n) in self.net.iter().enumerate() {
            n.check().map_err(|r| r.at(&format!("net[{i}]")))?;
        }
        for (i, u) in self.user_devices.iter().enumerate() {
            if let Some(v) = &u.vio {
                v.check()
                    .map_err(|r| r.at(&format!("user_devices[{i}].vio")))?;
            }
            if u.pri && u.vio.is_some() {
                return Err(ConfigError::Invalid {
                    field: format!("user_devices[{i}].pri"),
                    reason: "page requests are for plain passthrough; vio needs none".into(),
                });
            }
        }
        self.reclaim.check().map_err(|r| r.at("reclaim"))?;
        if files {
            self.check_files()?;
        }
        if !self.user_devices.is_empty() && !self.memory.shared {
            return Err(ConfigError::UserDeviceNeedsSharedMemory);
        }
        Ok(())
    }

    fn check_files(&self) -> Result<(), ConfigError> {
        if !self.payload.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.payload.kernel.clone()));
        }
        if let Some(i) = self.payload.initramfs.as_ref().filter(|i| !i.is_file()) {
            return Err(ConfigError::InitramfsMissing(i.clone()));
        }
        for d in &self.disks {
            if !d.path.exists() {
                return Err(ConfigError::DiskMissing(d.path.clone()));
            }
        }
        Ok(())
    }

    /// Parses and checks a `vm.create` body.
    pub fn from_json(body: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_json(body)?;
        config.validate()?;
        Ok(config)
    }

    /// A running VM's configuration handed over by a live upgrade: checked like `vm.create`'s
    /// except that the files it names need not be there (the VM is booted, and its disks'
    /// descriptors come with it).
    pub fn from_migration_json(body: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_json(body)?;
        config.validate_with(false)?;
        Ok(config)
    }

    fn parse_json(body: &str) -> Result<Self, ConfigError> {
        let mut v: serde_json::Value =
            serde_json::from_str(body).map_err(|e| ConfigError::Json(e.to_string()))?;
        compat::strip_unsupported(&mut v)?;
        let mut config: VmConfig =
            serde_json::from_value(v).map_err(|e| ConfigError::Json(e.to_string()))?;
        config.normalize();
        Ok(config)
    }

    /// The configuration in Cloud Hypervisor's JSON schema (as `vm.info` reports it).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("config serializes")
    }
}

#[cfg(test)]
mod tests;
