//! Cloud Hypervisor's JSON schema, where it differs from the model: its fields for devices and
//! features this VMM does not have are accepted only when absent, null, false or empty (so a
//! configuration is never half-applied), and its console representation.

use super::{invalid, ConfigError, ConsoleMode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// Top-level fields for devices and features this VMM does not provide.
const UNSUPPORTED: &[&str] = &[
    "fs",
    "pmem",
    "devices",
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

/// Fields inside an object (`*` for each element of an array), and why they cannot be set.
const UNSUPPORTED_NESTED: &[(&str, &str, &str)] = &[
    ("payload", "firmware", "not supported (PVH kernels only)"),
    ("memory", "mergeable", "not supported"),
    ("memory", "hugepages", "not supported"),
    ("memory", "hotplug_size", "not supported"),
    ("memory", "zones", "not supported"),
    ("serial", "iommu", "not supported"),
    ("serial", "socket", "not supported"),
    ("console", "iommu", "not supported"),
    ("console", "socket", "not supported"),
    ("user_devices*", "pci_segment", "only segment 0 exists"),
    ("net*", "pci_segment", "only segment 0 exists"),
    ("net*", "host_mac", "not supported"),
    ("net*", "mtu", "not supported (the TAP's MTU, 1500)"),
    ("net*", "iommu", "not supported"),
    ("net*", "vhost_user", "not supported"),
    ("net*", "vhost_socket", "not supported"),
    ("net*", "fds", "not supported (the VMM opens the TAP)"),
    ("net*", "rate_limiter_config", "not supported"),
];

/// Fields Cloud Hypervisor always writes that ask for nothing here whatever their value: the
/// offloads are what a device may offer (this one offers none), the vhost mode matters only
/// with vhost-user.
const IGNORED_NESTED: &[(&str, &str)] = &[
    ("net*", "offload_tso"),
    ("net*", "offload_ufo"),
    ("net*", "offload_csum"),
    ("net*", "vhost_mode"),
];

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_u64() == Some(0),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Takes the unsupported fields out of a `vm.create` body, or says which one is set.
pub(super) fn strip_unsupported(v: &mut Value) -> Result<(), ConfigError> {
    let Some(top) = v.as_object_mut() else {
        return Ok(()); // the model's parser says what is wrong
    };
    // Cloud Hypervisor always reports an entropy device; there is none to configure here.
    top.remove("rng");
    // It writes an absent device list as null.
    for k in ["disks", "net", "user_devices"] {
        if top.get(k).is_some_and(Value::is_null) {
            top.remove(k);
        }
    }
    for &k in UNSUPPORTED {
        if let Some(v) = top.remove(k) {
            if !is_empty(&v) {
                return Err(invalid(k, "not supported by this VMM"));
            }
        }
    }
    let ignored = IGNORED_NESTED.iter().map(|&(p, f)| (p, f, ""));
    for (parent, field, why) in UNSUPPORTED_NESTED.iter().copied().chain(ignored) {
        let (name, each) = match parent.strip_suffix('*') {
            Some(name) => (name, true),
            None => (parent, false),
        };
        let objects: Vec<(String, &mut Value)> = match top.get_mut(name) {
            Some(Value::Array(items)) if each => items
                .iter_mut()
                .enumerate()
                .map(|(i, o)| (format!("{name}[{i}]"), o))
                .collect(),
            Some(o) if !each => vec![(name.to_string(), o)],
            _ => continue,
        };
        for (path, o) in objects {
            if let Some(v) = o.as_object_mut().and_then(|o| o.remove(field)) {
                if !why.is_empty() && !is_empty(&v) {
                    return Err(invalid(&format!("{path}.{field}"), why));
                }
            }
        }
    }
    Ok(())
}

/// A console as Cloud Hypervisor writes it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Console {
    mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
}

impl TryFrom<Console> for ConsoleMode {
    type Error = String;

    fn try_from(c: Console) -> Result<Self, String> {
        match c.mode.as_str() {
            "Off" => Ok(ConsoleMode::Off),
            "Tty" => Ok(ConsoleMode::Tty),
            "Null" => Ok(ConsoleMode::Null),
            "File" => c
                .file
                .filter(|f| !f.as_os_str().is_empty())
                .map(ConsoleMode::File)
                .ok_or_else(|| "console mode File needs a file".to_string()),
            m => Err(format!(
                "console mode \"{m}\" is not supported (Off, Tty, Null, File)"
            )),
        }
    }
}

impl From<ConsoleMode> for Console {
    fn from(m: ConsoleMode) -> Self {
        let (mode, file) = match m {
            ConsoleMode::Off => ("Off", None),
            ConsoleMode::Tty => ("Tty", None),
            ConsoleMode::Null => ("Null", None),
            ConsoleMode::File(p) => ("File", Some(p)),
        };
        Console {
            mode: mode.into(),
            file,
        }
    }
}
