//! VM configuration and its command-line syntax (Cloud Hypervisor's: `--flag key=value,...`).

use std::collections::BTreeMap;
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
    #[error("Disk image {0} does not exist")]
    DiskMissing(PathBuf),
    #[error("--user-device requires --memory shared=on (the device maps guest RAM)")]
    UserDeviceNeedsSharedMemory,
    #[error("Invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("Invalid VM configuration: {0}")]
    Json(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadConfig {
    pub kernel: PathBuf,
    pub cmdline: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: u64,
    pub shared: bool,
    /// Guest memory reclaim (VIO); needs `shared`.
    pub reclaim: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub id: Option<String>,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// A passthrough device served by another process over vfio-user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserDeviceConfig {
    pub socket: PathBuf,
    pub id: Option<String>,
    /// Register the device's doorbell fds as KVM ioeventfds (off: doorbells go through the
    /// VMM as region writes, as with a client that only speaks the base protocol).
    pub io_fds: bool,
    /// Put VIO in front of the device (`--vio`); plain passthrough when absent.
    pub vio: Option<VioConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VioMode {
    /// IOPA-Snoop: the device reads a shadow available index the VMM advances once every page
    /// of a request is resident and DMA-mapped; guest memory stays reclaimable.
    Snoop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VioConfig {
    pub mode: VioMode,
    /// How often queues with requests in flight are re-checked, in microseconds.
    #[serde(default = "VioConfig::default_poll_us")]
    pub poll_us: u64,
}

impl VioConfig {
    pub const DEFAULT_POLL_US: u64 = 1000;

    fn default_poll_us() -> u64 {
        Self::DEFAULT_POLL_US
    }

    /// `--vio socket=<path>[,id=<name>][,mode=snoop][,poll_us=<us>]`
    pub fn parse_device(raw: &str) -> Result<UserDeviceConfig, ConfigError> {
        let p = OptionParser::parse("vio", raw, &["socket", "id", "mode", "poll_us"])?;
        let socket = PathBuf::from(
            p.get("socket")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| p.error("socket is required"))?,
        );
        let mode = match p.get("mode").unwrap_or("snoop") {
            "snoop" => VioMode::Snoop,
            _ => return Err(p.error("mode must be snoop")),
        };
        let poll_us = p.number("poll_us")?.unwrap_or(Self::DEFAULT_POLL_US);
        if !(1..=1_000_000).contains(&poll_us) {
            return Err(p.error("poll_us must be 1..1000000"));
        }
        Ok(UserDeviceConfig {
            socket,
            id: p.get("id").map(str::to_string),
            io_fds: false,
            vio: Some(VioConfig { mode, poll_us }),
        })
    }
}

impl UserDeviceConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("user-device", raw, &["socket", "id", "io_fds"])?;
        let socket = PathBuf::from(
            p.get("socket")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| p.error("socket is required"))?,
        );
        Ok(UserDeviceConfig {
            socket,
            id: p.get("id").map(str::to_string),
            io_fds: p.toggle("io_fds", true)?,
            vio: None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    Off,
    Tty,
    Null,
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    pub memory: MemoryConfig,
    pub cpus: CpusConfig,
    pub disks: Vec<DiskConfig>,
    pub user_devices: Vec<UserDeviceConfig>,
    pub serial: ConsoleMode,
    pub console: ConsoleMode,
    /// Reclaim settings; used when `memory.reclaim` is on.
    pub reclaim: crate::reclaim::ReclaimConfig,
}

/// `key=value,key=value` with a fixed set of keys.
pub struct OptionParser {
    flag: &'static str,
    raw: String,
    values: BTreeMap<String, String>,
}

impl OptionParser {
    pub fn parse(flag: &'static str, raw: &str, known: &[&str]) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        let p = OptionParser {
            flag,
            raw: raw.to_string(),
            values: BTreeMap::new(),
        };
        if raw.is_empty() {
            return Err(p.error("empty value"));
        }
        for item in raw.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| p.error(&format!("expected key=value, got \"{item}\"")))?;
            if !known.contains(&k) {
                return Err(p.error(&format!("unknown key \"{k}\"")));
            }
            if values.insert(k.to_string(), v.to_string()).is_some() {
                return Err(p.error(&format!("key \"{k}\" given twice")));
            }
        }
        Ok(OptionParser { values, ..p })
    }

    pub fn error(&self, reason: &str) -> ConfigError {
        ConfigError::Parse {
            flag: self.flag,
            value: self.raw.clone(),
            reason: reason.to_string(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn toggle(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some("on") | Some("true") => Ok(true),
            Some("off") | Some("false") => Ok(false),
            Some(v) => Err(self.error(&format!("{key} must be on or off, got \"{v}\""))),
        }
    }

    pub fn size(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.get(key)
            .map(|v| parse_size(v).map_err(|r| self.error(&format!("{key}: {r}"))))
            .transpose()
    }

    pub fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| self.error(&format!("{key} must be a number, got \"{v}\"")))
            })
            .transpose()
    }
}

/// "512M", "2G", "4096K", "1048576".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.chars().last() {
        Some('K') | Some('k') => (&s[..s.len() - 1], 10),
        Some('M') | Some('m') => (&s[..s.len() - 1], 20),
        Some('G') | Some('g') => (&s[..s.len() - 1], 30),
        Some('T') | Some('t') => (&s[..s.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (s, 0),
        _ => {
            return Err(format!(
                "invalid size \"{s}\" (use a number with an optional K, M, G or T suffix)"
            ))
        }
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid size \"{s}\" (use a number with an optional K, M, G or T suffix)")
    })?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size \"{s}\" is too large"))
}

fn check_memory_size(size: u64) -> Result<(), String> {
    if size < (16 << 20) || !size.is_multiple_of(4096) {
        return Err("size must be at least 16M and a multiple of 4K".into());
    }
    if size > (1 << 40) {
        return Err("size must be at most 1T".into());
    }
    Ok(())
}

fn check_cpus(boot: u8, max: u8) -> Result<(), String> {
    if boot == 0 {
        return Err("boot must be at least 1".into());
    }
    if max < boot {
        return Err("max must not be below boot".into());
    }
    Ok(())
}

fn check_disk_queues(num_queues: u16, queue_size: u16) -> Result<(), String> {
    if num_queues == 0 || num_queues > 16 {
        return Err("num_queues must be 1..16".into());
    }
    if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
        return Err("queue_size must be a power of two, 2..32768".into());
    }
    Ok(())
}

impl MemoryConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("memory", raw, &["size", "shared", "reclaim"])?;
        let size = p.size("size")?.unwrap_or(512 << 20);
        check_memory_size(size).map_err(|r| p.error(&r))?;
        let shared = p.toggle("shared", false)?;
        let reclaim = p.toggle("reclaim", false)?;
        if reclaim && !shared {
            return Err(
                p.error("reclaim=on needs shared=on (reclaim frees pages of the shared memfd)")
            );
        }
        Ok(MemoryConfig {
            size,
            shared,
            reclaim,
        })
    }
}

/// `--reclaim interval_ms=..,idle_ms=..,target_pct=..,store=DIR,compress=lz4|none,store_max=SIZE,fault_latency_us=N`
pub fn parse_reclaim(raw: &str) -> Result<crate::reclaim::ReclaimConfig, ConfigError> {
    let p = OptionParser::parse(
        "reclaim",
        raw,
        &[
            "interval_ms",
            "idle_ms",
            "target_pct",
            "store",
            "compress",
            "store_max",
            "fault_latency_us",
        ],
    )?;
    let d = crate::reclaim::ReclaimConfig::default();
    let target_pct: u8 = p.number("target_pct")?.unwrap_or(d.target_pct);
    if target_pct > 100 {
        return Err(p.error("target_pct must be 0..100"));
    }
    let compress = match p.get("compress") {
        None | Some("lz4") => true,
        Some("none") => false,
        Some(v) => return Err(p.error(&format!("compress must be lz4 or none, got \"{v}\""))),
    };
    let store_dir = p.get("store").map(PathBuf::from).unwrap_or(d.store_dir);
    if !store_dir.is_dir() {
        return Err(p.error(&format!(
            "store directory {} does not exist",
            store_dir.display()
        )));
    }
    Ok(crate::reclaim::ReclaimConfig {
        interval_ms: p.number("interval_ms")?.unwrap_or(d.interval_ms),
        idle_ms: p.number("idle_ms")?.unwrap_or(d.idle_ms),
        target_pct,
        store_dir,
        compress,
        store_max_bytes: p.size("store_max")?.unwrap_or(d.store_max_bytes),
        fault_latency_us: p.number("fault_latency_us")?.unwrap_or(d.fault_latency_us),
    })
}

impl CpusConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("cpus", raw, &["boot", "max"])?;
        let boot: u8 = p.number("boot")?.unwrap_or(1);
        let max: u8 = p.number("max")?.unwrap_or(boot);
        check_cpus(boot, max).map_err(|r| p.error(&r))?;
        Ok(CpusConfig {
            boot_vcpus: boot,
            max_vcpus: max,
        })
    }
}

impl DiskConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            "disk",
            raw,
            &["path", "readonly", "id", "num_queues", "queue_size"],
        )?;
        let path = PathBuf::from(p.get("path").ok_or_else(|| p.error("path is required"))?);
        let num_queues: u16 = p.number("num_queues")?.unwrap_or(1);
        let queue_size: u16 = p
            .number("queue_size")?
            .unwrap_or(virtio_devices::block::DEFAULT_QUEUE_SIZE);
        check_disk_queues(num_queues, queue_size).map_err(|r| p.error(&r))?;
        Ok(DiskConfig {
            path,
            readonly: p.toggle("readonly", false)?,
            id: p.get("id").map(str::to_string),
            num_queues,
            queue_size,
        })
    }
}

impl ConsoleMode {
    pub fn parse(flag: &'static str, raw: &str) -> Result<Self, ConfigError> {
        match raw {
            "off" => Ok(ConsoleMode::Off),
            "tty" => Ok(ConsoleMode::Tty),
            "null" => Ok(ConsoleMode::Null),
            _ => {
                let p = OptionParser::parse(flag, raw, &["file"])?;
                let f = p
                    .get("file")
                    .filter(|f| !f.is_empty())
                    .ok_or_else(|| p.error("expected off, tty, null or file=PATH"))?;
                Ok(ConsoleMode::File(PathBuf::from(f)))
            }
        }
    }
}

impl VmConfig {
    /// Checks what can only be checked against the host (files exist).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.payload.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.payload.kernel.clone()));
        }
        for d in &self.disks {
            if !d.path.exists() {
                return Err(ConfigError::DiskMissing(d.path.clone()));
            }
        }
        if !self.user_devices.is_empty() && !self.memory.shared {
            return Err(ConfigError::UserDeviceNeedsSharedMemory);
        }
        Ok(())
    }
}

/// The JSON form of a VM configuration: Cloud Hypervisor's `VmConfig` schema, for the fields
/// this VMM provides. Fields of Cloud Hypervisor devices this VMM does not have are accepted
/// only when absent, null, false or empty, so a configuration is never half-applied.
mod json {
    use super::*;
    use serde::{Deserialize, Serialize};
    use serde_json::Value;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Payload {
        pub kernel: Option<PathBuf>,
        #[serde(default)]
        pub cmdline: Option<String>,
        #[serde(default, skip_serializing)]
        pub firmware: Option<Value>,
        #[serde(default, skip_serializing)]
        pub initramfs: Option<Value>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Cpus {
        pub boot_vcpus: u8,
        #[serde(default)]
        pub max_vcpus: Option<u8>,
    }

    fn default_memory_size() -> u64 {
        512 << 20
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Memory {
        #[serde(default = "default_memory_size")]
        pub size: u64,
        #[serde(default)]
        pub shared: bool,
        #[serde(default)]
        pub reclaim: bool,
        #[serde(default, skip_serializing)]
        pub mergeable: Option<Value>,
        #[serde(default, skip_serializing)]
        pub hugepages: Option<Value>,
        #[serde(default, skip_serializing)]
        pub hotplug_size: Option<Value>,
        #[serde(default, skip_serializing)]
        pub zones: Option<Value>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Disk {
        pub path: PathBuf,
        #[serde(default)]
        pub readonly: bool,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub num_queues: Option<u16>,
        #[serde(default)]
        pub queue_size: Option<u16>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct UserDevice {
        pub socket: PathBuf,
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub io_fds: Option<bool>,
        /// VIO extension: present for a `vio` device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub vio: Option<super::VioConfig>,
        #[serde(default, skip_serializing)]
        pub pci_segment: Option<Value>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Console {
        pub mode: String,
        #[serde(default)]
        pub file: Option<PathBuf>,
        #[serde(default, skip_serializing)]
        pub iommu: Option<Value>,
        #[serde(default, skip_serializing)]
        pub socket: Option<Value>,
    }

    /// Unknown top-level keys land in `unsupported` and are checked by hand (serde cannot
    /// combine `flatten` with `deny_unknown_fields`).
    #[derive(Serialize, Deserialize)]
    pub struct Config {
        pub payload: Payload,
        #[serde(default)]
        pub cpus: Option<Cpus>,
        #[serde(default)]
        pub memory: Option<Memory>,
        #[serde(default)]
        pub disks: Option<Vec<Disk>>,
        #[serde(default)]
        pub user_devices: Option<Vec<UserDevice>>,
        #[serde(default)]
        pub serial: Option<Console>,
        #[serde(default)]
        pub console: Option<Console>,
        /// Cloud Hypervisor always reports an entropy device; there is none to configure here.
        #[serde(default, skip_serializing, rename = "rng")]
        pub _rng: Option<Value>,
        #[serde(flatten)]
        pub unsupported: BTreeMap<String, Value>,
    }

    /// Cloud Hypervisor fields for devices and features this VMM does not provide.
    pub const UNSUPPORTED: &[&str] = &[
        "net",
        "fs",
        "pmem",
        "devices",
        "user_devices",
        "vdpa",
        "vsock",
        "numa",
        "iommu",
        "watchdog",
        "pvpanic",
        "platform",
        "tpm",
        "balloon",
        "sgx_epc",
        "pci_segments",
        "landlock_enable",
        "landlock_rules",
        "rate_limit_groups",
        "debug_console",
        "preserved_fds",
        "igvm",
        "host_data",
    ];

    pub fn is_empty(v: &Value) -> bool {
        match v {
            Value::Null | Value::Bool(false) => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn console_from_json(
    field: &str,
    c: Option<json::Console>,
    default: ConsoleMode,
) -> Result<ConsoleMode, ConfigError> {
    let Some(c) = c else { return Ok(default) };
    for (k, v) in [("iommu", &c.iommu), ("socket", &c.socket)] {
        if v.as_ref().is_some_and(|v| !json::is_empty(v)) {
            return Err(invalid(&format!("{field}.{k}"), "not supported"));
        }
    }
    match c.mode.as_str() {
        "Off" => Ok(ConsoleMode::Off),
        "Tty" => Ok(ConsoleMode::Tty),
        "Null" => Ok(ConsoleMode::Null),
        "File" => c
            .file
            .filter(|f| !f.as_os_str().is_empty())
            .map(ConsoleMode::File)
            .ok_or_else(|| invalid(&format!("{field}.file"), "required with mode File")),
        m => Err(invalid(
            &format!("{field}.mode"),
            format!("\"{m}\" is not supported (Off, Tty, Null, File)"),
        )),
    }
}

fn console_to_json(m: &ConsoleMode) -> json::Console {
    let (mode, file) = match m {
        ConsoleMode::Off => ("Off", None),
        ConsoleMode::Tty => ("Tty", None),
        ConsoleMode::Null => ("Null", None),
        ConsoleMode::File(p) => ("File", Some(p.clone())),
    };
    json::Console {
        mode: mode.into(),
        file,
        iommu: None,
        socket: None,
    }
}

impl VmConfig {
    /// Parses and checks a `vm.create` body.
    pub fn from_json(body: &str) -> Result<Self, ConfigError> {
        let c: json::Config =
            serde_json::from_str(body).map_err(|e| ConfigError::Json(e.to_string()))?;
        for (k, v) in &c.unsupported {
            if !json::UNSUPPORTED.contains(&k.as_str()) {
                return Err(ConfigError::Json(format!("unknown field `{k}`")));
            }
            if !json::is_empty(v) {
                return Err(invalid(k, "not supported by this VMM"));
            }
        }
        for (k, v) in [
            ("payload.firmware", &c.payload.firmware),
            ("payload.initramfs", &c.payload.initramfs),
        ] {
            if v.as_ref().is_some_and(|v| !json::is_empty(v)) {
                return Err(invalid(k, "not supported (PVH kernels only)"));
            }
        }
        let kernel = c
            .payload
            .kernel
            .ok_or_else(|| invalid("payload.kernel", "required"))?;
        let cpus = match c.cpus {
            Some(cp) => {
                let max = cp.max_vcpus.unwrap_or(cp.boot_vcpus);
                check_cpus(cp.boot_vcpus, max).map_err(|r| invalid("cpus", r))?;
                CpusConfig {
                    boot_vcpus: cp.boot_vcpus,
                    max_vcpus: max,
                }
            }
            None => CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
            },
        };
        let memory = match c.memory {
            Some(m) => {
                for (k, v) in [
                    ("mergeable", &m.mergeable),
                    ("hugepages", &m.hugepages),
                    ("hotplug_size", &m.hotplug_size),
                    ("zones", &m.zones),
                ] {
                    if v.as_ref().is_some_and(|v| !json::is_empty(v)) {
                        return Err(invalid(&format!("memory.{k}"), "not supported"));
                    }
                }
                check_memory_size(m.size).map_err(|r| invalid("memory.size", r))?;
                if m.reclaim && !m.shared {
                    return Err(invalid("memory.reclaim", "needs memory.shared"));
                }
                MemoryConfig {
                    size: m.size,
                    shared: m.shared,
                    reclaim: m.reclaim,
                }
            }
            None => MemoryConfig {
                size: 512 << 20,
                shared: false,
                reclaim: false,
            },
        };
        let mut disks = Vec::new();
        for (i, d) in c.disks.unwrap_or_default().into_iter().enumerate() {
            let num_queues = d.num_queues.unwrap_or(1);
            let queue_size = d
                .queue_size
                .unwrap_or(virtio_devices::block::DEFAULT_QUEUE_SIZE);
            check_disk_queues(num_queues, queue_size)
                .map_err(|r| invalid(&format!("disks[{i}]"), r))?;
            disks.push(DiskConfig {
                path: d.path,
                readonly: d.readonly,
                id: d.id,
                num_queues,
                queue_size,
            });
        }
        let mut user_devices = Vec::new();
        for (i, u) in c.user_devices.unwrap_or_default().into_iter().enumerate() {
            if u.pci_segment.as_ref().is_some_and(|v| !json::is_empty(v)) {
                return Err(invalid(
                    &format!("user_devices[{i}].pci_segment"),
                    "only segment 0 exists",
                ));
            }
            if let Some(v) = &u.vio {
                if !(1..=1_000_000).contains(&v.poll_us) {
                    return Err(invalid(
                        &format!("user_devices[{i}].vio.poll_us"),
                        "must be 1..1000000",
                    ));
                }
            }
            user_devices.push(UserDeviceConfig {
                socket: u.socket,
                id: u.id,
                io_fds: u.io_fds.unwrap_or(u.vio.is_none()),
                vio: u.vio,
            });
        }
        let config = VmConfig {
            reclaim: Default::default(),
            user_devices,
            payload: PayloadConfig {
                kernel,
                cmdline: c.payload.cmdline.unwrap_or_default(),
            },
            memory,
            cpus,
            disks,
            serial: console_from_json("serial", c.serial, ConsoleMode::Null)?,
            console: console_from_json("console", c.console, ConsoleMode::Off)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// The configuration in Cloud Hypervisor's JSON schema (as `vm.info` reports it).
    pub fn to_json(&self) -> serde_json::Value {
        let c = json::Config {
            payload: json::Payload {
                kernel: Some(self.payload.kernel.clone()),
                cmdline: Some(self.payload.cmdline.clone()),
                firmware: None,
                initramfs: None,
            },
            cpus: Some(json::Cpus {
                boot_vcpus: self.cpus.boot_vcpus,
                max_vcpus: Some(self.cpus.max_vcpus),
            }),
            memory: Some(json::Memory {
                size: self.memory.size,
                shared: self.memory.shared,
                reclaim: self.memory.reclaim,
                mergeable: None,
                hugepages: None,
                hotplug_size: None,
                zones: None,
            }),
            disks: Some(
                self.disks
                    .iter()
                    .map(|d| json::Disk {
                        path: d.path.clone(),
                        readonly: d.readonly,
                        id: d.id.clone(),
                        num_queues: Some(d.num_queues),
                        queue_size: Some(d.queue_size),
                    })
                    .collect(),
            ),
            user_devices: Some(
                self.user_devices
                    .iter()
                    .map(|u| json::UserDevice {
                        socket: u.socket.clone(),
                        id: u.id.clone(),
                        io_fds: (!u.io_fds && u.vio.is_none()).then_some(false),
                        vio: u.vio,
                        pci_segment: None,
                    })
                    .collect(),
            ),
            serial: Some(console_to_json(&self.serial)),
            console: Some(console_to_json(&self.console)),
            _rng: None,
            unsupported: BTreeMap::new(),
        };
        serde_json::to_value(c).expect("config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(e: ConfigError) -> String {
        e.to_string()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(
            MemoryConfig::parse("size=1G,shared=on").unwrap(),
            MemoryConfig {
                size: 1 << 30,
                shared: true,
                reclaim: false
            }
        );
        assert!(
            MemoryConfig::parse("size=1G,shared=on,reclaim=on")
                .unwrap()
                .reclaim
        );
        assert!(
            reason(MemoryConfig::parse("size=1G,reclaim=on").unwrap_err())
                .contains("needs shared=on")
        );
        assert!(!MemoryConfig::parse("size=64M").unwrap().shared);
        let e = reason(MemoryConfig::parse("size=12X").unwrap_err());
        assert!(
            e.contains("--memory") && e.contains("size=12X") && e.contains("invalid size"),
            "{e}"
        );
        assert!(reason(MemoryConfig::parse("size=1M").unwrap_err()).contains("at least 16M"));
        assert!(
            reason(MemoryConfig::parse("size=64M,shared=maybe").unwrap_err()).contains("on or off")
        );
        assert!(
            reason(MemoryConfig::parse("sise=64M").unwrap_err()).contains("unknown key \"sise\"")
        );
        assert!(reason(MemoryConfig::parse("64M").unwrap_err()).contains("expected key=value"));
    }

    #[test]
    fn cpus() {
        assert_eq!(
            CpusConfig::parse("boot=2").unwrap(),
            CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2
            }
        );
        let e = reason(CpusConfig::parse("boot=0").unwrap_err());
        assert!(
            e.contains("--cpus") && e.contains("boot must be at least 1"),
            "{e}"
        );
        assert!(reason(CpusConfig::parse("boot=x").unwrap_err()).contains("must be a number"));
        assert!(reason(CpusConfig::parse("boot=4,max=2").unwrap_err())
            .contains("max must not be below"));
        assert!(CpusConfig::parse("boot=300").is_err());
    }

    #[test]
    fn disks() {
        let d = DiskConfig::parse("path=/tmp/x.img,readonly=on,id=disk0").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/x.img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("disk0"));
        assert!(reason(DiskConfig::parse("readonly=on").unwrap_err()).contains("path is required"));
        assert!(
            reason(DiskConfig::parse("path=a,queue_size=100").unwrap_err())
                .contains("power of two")
        );
        assert!(reason(DiskConfig::parse("path=a,path=b").unwrap_err()).contains("given twice"));
        assert!(reason(DiskConfig::parse("path=a,colour=red").unwrap_err()).contains("unknown key"));
    }

    #[test]
    fn reclaim_options() {
        let r = parse_reclaim("interval_ms=100,idle_ms=200,target_pct=60,compress=none,store_max=1G,fault_latency_us=5000").unwrap();
        assert_eq!(
            (r.interval_ms, r.idle_ms, r.target_pct, r.compress),
            (100, 200, 60, false)
        );
        assert_eq!((r.store_max_bytes, r.fault_latency_us), (1 << 30, 5000));
        for (bad, want) in [
            ("target_pct=101", "0..100"),
            ("compress=zip", "lz4 or none"),
            ("store=/nonexistent/dir", "does not exist"),
            ("interval=5", "unknown key"),
        ] {
            assert!(
                reason(parse_reclaim(bad).unwrap_err()).contains(want),
                "{bad}"
            );
        }
    }

    #[test]
    fn user_devices() {
        let u = UserDeviceConfig::parse("socket=/tmp/v.sock,id=dpu0").unwrap();
        assert_eq!(
            u,
            UserDeviceConfig {
                socket: "/tmp/v.sock".into(),
                id: Some("dpu0".into()),
                io_fds: true,
                vio: None,
            }
        );
        let v = VioConfig::parse_device("socket=/tmp/v.sock,id=v0,poll_us=50").unwrap();
        assert_eq!(
            v.vio,
            Some(VioConfig {
                mode: VioMode::Snoop,
                poll_us: 50
            })
        );
        assert_eq!(v.id.as_deref(), Some("v0"));
        for (bad, want) in [
            ("socket=/s,mode=elastic", "mode must be snoop"),
            ("socket=/s,poll_us=0", "1..1000000"),
            ("socket=/s,poll_us=x", "poll_us"),
            ("mode=snoop", "socket is required"),
        ] {
            assert!(
                reason(VioConfig::parse_device(bad).unwrap_err()).contains(want),
                "{bad}"
            );
        }
        let cfg = VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size":67108864,"shared":true}},"user_devices":[{{"socket":"/tmp/x.sock","vio":{{"mode":"snoop"}}}}]}}"#, kernel())).unwrap();
        assert_eq!(
            cfg.user_devices[0].vio.unwrap().poll_us,
            VioConfig::DEFAULT_POLL_US
        );
        assert_eq!(cfg.to_json()["user_devices"][0]["vio"]["mode"], "snoop");
        assert!(VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size":67108864,"shared":true}},"user_devices":[{{"socket":"/tmp/x.sock","vio":{{"mode":"fast"}}}}]}}"#, kernel())).is_err());
        assert!(
            !UserDeviceConfig::parse("socket=/s,io_fds=off")
                .unwrap()
                .io_fds
        );
        assert!(reason(UserDeviceConfig::parse("id=x").unwrap_err()).contains("socket is required"));
        assert!(
            reason(UserDeviceConfig::parse("socket=/s,bus=1").unwrap_err()).contains("unknown key")
        );
        let mut cfg = VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size":67108864,"shared":true}},"user_devices":[{{"socket":"/tmp/x.sock"}}]}}"#, kernel())).unwrap();
        assert_eq!(cfg.user_devices.len(), 1);
        cfg.memory.shared = false;
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::UserDeviceNeedsSharedMemory)
        );
    }

    #[test]
    fn serial() {
        assert_eq!(
            ConsoleMode::parse("serial", "tty").unwrap(),
            ConsoleMode::Tty
        );
        assert_eq!(
            ConsoleMode::parse("serial", "off").unwrap(),
            ConsoleMode::Off
        );
        assert_eq!(
            ConsoleMode::parse("serial", "file=/tmp/s").unwrap(),
            ConsoleMode::File("/tmp/s".into())
        );
        assert!(
            reason(ConsoleMode::parse("serial", "pty").unwrap_err()).contains("expected key=value")
        );
        assert!(ConsoleMode::parse("serial", "file=").is_err());
    }

    fn kernel() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn json_round_trip() {
        let body = format!(
            r#"{{"payload":{{"kernel":"{}","cmdline":"a=b"}},"cpus":{{"boot_vcpus":2,"max_vcpus":2}},
                "memory":{{"size":268435456,"shared":true}},"serial":{{"mode":"Tty"}},"console":{{"mode":"Off"}},
                "rng":{{"src":"/dev/urandom"}},"net":null,"devices":[]}}"#,
            kernel()
        );
        let c = VmConfig::from_json(&body).unwrap();
        assert_eq!(c.cpus.boot_vcpus, 2);
        assert_eq!(
            c.memory,
            MemoryConfig {
                size: 256 << 20,
                shared: true,
                reclaim: false
            }
        );
        assert_eq!(c.serial, ConsoleMode::Tty);
        let again = VmConfig::from_json(&c.to_json().to_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn json_errors() {
        let k = kernel();
        let bad = [
            ("{", "Invalid VM configuration"),
            (r#"{"payload":{}}"#, "payload.kernel"),
            (
                &format!(r#"{{"payload":{{"kernel":"{k}"}},"colour":1}}"#),
                "unknown field `colour`",
            ),
            (
                &format!(r#"{{"payload":{{"kernel":"{k}","bogus":1}}}}"#),
                "unknown field `bogus`",
            ),
            (
                &format!(r#"{{"payload":{{"kernel":"{k}"}},"net":[{{"tap":"t0"}}]}}"#),
                "net: not supported",
            ),
            (
                &format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":1024}}}}"#),
                "at least 16M",
            ),
            (
                &format!(r#"{{"payload":{{"kernel":"{k}"}},"cpus":{{"boot_vcpus":0}}}}"#),
                "at least 1",
            ),
            (
                &format!(r#"{{"payload":{{"kernel":"{k}"}},"serial":{{"mode":"Pty"}}}}"#),
                "serial.mode",
            ),
            (
                &format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":"big"}}}}"#),
                "Invalid VM configuration",
            ),
            (r#"{"payload":{"kernel":"/nonexistent"}}"#, "does not exist"),
        ];
        for (body, want) in bad {
            let e = VmConfig::from_json(body).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn missing_files() {
        let cfg = VmConfig {
            payload: PayloadConfig {
                kernel: "/nonexistent/kernel".into(),
                cmdline: String::new(),
            },
            memory: MemoryConfig {
                size: 64 << 20,
                shared: false,
                reclaim: false,
            },
            cpus: CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
            },
            disks: vec![],
            user_devices: vec![],
            reclaim: Default::default(),
            serial: ConsoleMode::Tty,
            console: ConsoleMode::Off,
        };
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::KernelMissing("/nonexistent/kernel".into()))
        );
    }
}
