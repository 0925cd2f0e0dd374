//! The command line's syntax for the configuration model: Cloud Hypervisor's
//! `--flag key=value,...` options, each parsed into its part of `VmConfig` and checked with the
//! model's own checks (errors name the flag and its value).

use super::{
    Compression, ConfigError, ConsoleMode, CpusConfig, DiskConfig, MemoryConfig, NetConfig,
    ReclaimConfig, Refused, UserDeviceConfig, VioConfig, VioMode,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

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

    /// The model's check of a parsed value, as an error about this option.
    fn checked<T>(
        &self,
        v: T,
        check: impl Fn(&T) -> Result<(), Refused>,
    ) -> Result<T, ConfigError> {
        check(&v).map_err(|r| self.error(&r.reason))?;
        Ok(v)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// A required, non-empty path.
    fn path(&self, key: &str) -> Result<PathBuf, ConfigError> {
        self.get(key)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| self.error(&format!("{key} is required")))
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
    let bad =
        || format!("invalid size \"{s}\" (use a number with an optional K, M, G or T suffix)");
    let (digits, shift) = match s.chars().last() {
        Some('K') | Some('k') => (&s[..s.len() - 1], 10),
        Some('M') | Some('m') => (&s[..s.len() - 1], 20),
        Some('G') | Some('g') => (&s[..s.len() - 1], 30),
        Some('T') | Some('t') => (&s[..s.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (s, 0),
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size \"{s}\" is too large"))
}

impl MemoryConfig {
    /// `--memory size=<size>,shared=on|off,reclaim=on|off`
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("memory", raw, &["size", "shared", "reclaim"])?;
        let d = MemoryConfig::default();
        let m = MemoryConfig {
            size: p.size("size")?.unwrap_or(d.size),
            shared: p.toggle("shared", d.shared)?,
            reclaim: p.toggle("reclaim", d.reclaim)?,
        };
        p.checked(m, MemoryConfig::check)
    }
}

impl ReclaimConfig {
    /// `--reclaim interval_ms=..,idle_ms=..,target_pct=..,store=DIR,compress=lz4|none,store_max=SIZE,fault_latency_us=N`
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
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
        let d = ReclaimConfig::default();
        let compress = match p.get("compress") {
            None => d.compress,
            Some("lz4") => Compression::Lz4,
            Some("none") => Compression::None,
            Some(v) => return Err(p.error(&format!("compress must be lz4 or none, got \"{v}\""))),
        };
        let r = ReclaimConfig {
            interval_ms: p.number("interval_ms")?.unwrap_or(d.interval_ms),
            idle_ms: p.number("idle_ms")?.unwrap_or(d.idle_ms),
            target_pct: p.number("target_pct")?.unwrap_or(d.target_pct),
            store_dir: p.get("store").map(PathBuf::from).unwrap_or(d.store_dir),
            compress,
            store_max_bytes: p.size("store_max")?.unwrap_or(d.store_max_bytes),
            fault_latency_us: p.number("fault_latency_us")?.unwrap_or(d.fault_latency_us),
        };
        p.checked(r, ReclaimConfig::check)
    }
}

impl CpusConfig {
    /// `--cpus boot=<n>,max=<n>`
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("cpus", raw, &["boot", "max"])?;
        let d = CpusConfig::default();
        let mut c = CpusConfig {
            boot_vcpus: p.number("boot")?.unwrap_or(d.boot_vcpus),
            max_vcpus: p.number("max")?.unwrap_or(d.max_vcpus),
        };
        c.normalize();
        p.checked(c, CpusConfig::check)
    }
}

impl DiskConfig {
    /// `--disk path=<file>,readonly=on|off,id=<name>,num_queues=<n>,queue_size=<n>`
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            "disk",
            raw,
            &["path", "readonly", "id", "num_queues", "queue_size"],
        )?;
        let d = DiskConfig {
            path: p.path("path")?,
            readonly: p.toggle("readonly", false)?,
            id: p.get("id").map(str::to_string),
            num_queues: p
                .number("num_queues")?
                .unwrap_or_else(DiskConfig::default_num_queues),
            queue_size: p
                .number("queue_size")?
                .unwrap_or_else(DiskConfig::default_queue_size),
        };
        p.checked(d, DiskConfig::check)
    }
}

impl NetConfig {
    /// `--net tap=<name>,ip=<ipv4>,mask=<ipv4>,mac=<mac>,id=<name>,num_queues=<n>,queue_size=<n>`
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            "net",
            raw,
            &["tap", "ip", "mask", "mac", "id", "num_queues", "queue_size"],
        )?;
        let addr = |key: &str, default: std::net::Ipv4Addr| match p.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| p.error(&format!("{key} must be an IPv4 address, got \"{v}\""))),
        };
        let n = NetConfig {
            tap: p.get("tap").map(str::to_string),
            ip: addr("ip", NetConfig::default_ip())?,
            mask: addr("mask", NetConfig::default_mask())?,
            mac: p.get("mac").map(str::to_string),
            id: p.get("id").map(str::to_string),
            num_queues: p
                .number("num_queues")?
                .unwrap_or_else(NetConfig::default_num_queues),
            queue_size: p
                .number("queue_size")?
                .unwrap_or_else(NetConfig::default_queue_size),
        };
        p.checked(n, NetConfig::check)
    }
}

impl UserDeviceConfig {
    /// `--user-device socket=<path>,id=<name>,io_fds=on|off,pri=on|off`
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("user-device", raw, &["socket", "id", "io_fds", "pri"])?;
        Ok(UserDeviceConfig {
            socket: p.path("socket")?,
            id: p.get("id").map(str::to_string),
            io_fds: p
                .get("io_fds")
                .map(|_| p.toggle("io_fds", true))
                .transpose()?,
            vio: None,
            pri: p.toggle("pri", false)?,
        })
    }

    /// `--vio socket=<path>[,id=<name>][,mode=snoop|passthrough|auto][,poll_us=<us>]
    /// [,iops_high=<n>,iops_low=<n>,dwell_ms=<ms>][,lockpage=on|off,lock_budget_pct=<n>]`
    pub fn parse_vio(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            "vio",
            raw,
            &[
                "socket",
                "id",
                "mode",
                "poll_us",
                "iops_high",
                "iops_low",
                "dwell_ms",
                "lockpage",
                "lock_budget_pct",
            ],
        )?;
        let socket = p.path("socket")?;
        let mode = VioMode::parse(p.get("mode").unwrap_or("snoop"))
            .ok_or_else(|| p.error("mode must be snoop, passthrough or auto"))?;
        let d = VioConfig::new(mode);
        let vio = VioConfig {
            mode,
            poll_us: p.number("poll_us")?.unwrap_or(d.poll_us),
            iops_high: p.number("iops_high")?.unwrap_or(d.iops_high),
            iops_low: p.number("iops_low")?.unwrap_or(d.iops_low),
            dwell_ms: p.number("dwell_ms")?.unwrap_or(d.dwell_ms),
            lockpage: p.toggle("lockpage", d.lockpage)?,
            lock_budget_pct: p.number("lock_budget_pct")?.unwrap_or(d.lock_budget_pct),
        };
        Ok(UserDeviceConfig {
            socket,
            id: p.get("id").map(str::to_string),
            io_fds: None,
            vio: Some(p.checked(vio, VioConfig::check)?),
            pri: false,
        })
    }
}

impl ConsoleMode {
    /// `--serial` / `--console`: `off|tty|null|file=<path>`
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
