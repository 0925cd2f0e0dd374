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
    pub serial: ConsoleMode,
    pub console: ConsoleMode,
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

impl MemoryConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("memory", raw, &["size", "shared"])?;
        let size = p.size("size")?.unwrap_or(512 << 20);
        if size < (16 << 20) || size % 4096 != 0 {
            return Err(p.error("size must be at least 16M and a multiple of 4K"));
        }
        if size > (1 << 40) {
            return Err(p.error("size must be at most 1T"));
        }
        Ok(MemoryConfig {
            size,
            shared: p.toggle("shared", false)?,
        })
    }
}

impl CpusConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("cpus", raw, &["boot", "max"])?;
        let boot: u8 = p.number("boot")?.unwrap_or(1);
        let max: u8 = p.number("max")?.unwrap_or(boot);
        if boot == 0 {
            return Err(p.error("boot must be at least 1"));
        }
        if max < boot {
            return Err(p.error("max must not be below boot"));
        }
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
        if num_queues == 0 || num_queues > 16 {
            return Err(p.error("num_queues must be 1..16"));
        }
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(p.error("queue_size must be a power of two, 2..32768"));
        }
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
        Ok(())
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
                shared: true
            }
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
            },
            cpus: CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
            },
            disks: vec![],
            serial: ConsoleMode::Tty,
            console: ConsoleMode::Off,
        };
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::KernelMissing("/nonexistent/kernel".into()))
        );
    }
}
