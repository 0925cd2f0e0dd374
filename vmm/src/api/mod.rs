//! The VMM's REST API: Cloud Hypervisor's endpoints under `/api/v1/`, served over HTTP/1.1 on
//! a Unix socket by its own thread, and carried to the VMM thread as `ApiRequest`s.

pub mod http;

use crate::config::{ConfigError, VioMode, VmConfig};
use crate::device_manager::DeviceError;
use crate::error::VmmError;
use crate::migration::MigrationError;
use std::sync::mpsc::Sender;
use thiserror::Error;
use vfio::vio::SwitchError;

pub const API_PREFIX: &str = "/api/v1/";

#[derive(Debug)]
pub enum ApiRequest {
    VmmPing,
    VmmShutdown,
    VmCreate(Box<VmConfig>),
    VmBoot,
    VmShutdown,
    VmDelete,
    VmReboot,
    VmPause,
    VmResume,
    VmInfo,
    VmCounters,
    /// Revokes a passthrough device's DMA access to guest memory (a test hook: the device then
    /// faults on those pages, which is what VIO prevents).
    VmDmaUnmap {
        id: String,
        iova: u64,
        size: u64,
    },
    /// Sets how a `vio` device runs: snoop, passthrough (switched now) or auto.
    VmVioMode {
        id: String,
        mode: VioMode,
    },
    /// Every `vio` device's mode, thresholds, rate, queues and last switch.
    VmVioInfo,
    /// Reclaims up to `bytes` of the coldest reclaimable guest memory now.
    VmReclaim {
        bytes: u64,
        unsafe_unmap_dma: bool,
        /// Only pages a `vio` device has DMA-mapped and is not using (fault experiments).
        dma_only: bool,
    },
    /// Hands the VM to the VMM listening at `url` (a live upgrade), then exits.
    VmSendMigration {
        url: String,
        local: bool,
    },
    /// Waits at `url` for a VMM to hand its VM over.
    VmReceiveMigration {
        url: String,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("Unknown endpoint {0}")]
    NotFound(String),
    #[error("Method {method} not allowed on {path} (allowed: {allowed})")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("Request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Conflict(_) => 409,
            ApiError::TooLarge(_) => 413,
            ApiError::Internal(_) => 500,
        }
    }
}

impl From<VmmError> for ApiError {
    fn from(e: VmmError) -> Self {
        let text = vio::error_chain(&e);
        match e {
            VmmError::VmAlreadyCreated
            | VmmError::VmNotCreated
            | VmmError::VmAlreadyBooted
            | VmmError::VmNotBooted
            | VmmError::VmNotRunning
            | VmmError::VmNotPaused
            | VmmError::ReclaimDisabled => ApiError::Conflict(text),
            VmmError::Device(DeviceError::NoSuchDevice(_) | DeviceError::NotVio(_)) => {
                ApiError::BadRequest(text)
            }
            VmmError::Device(DeviceError::Switch(_, SwitchError::InProgress)) => {
                ApiError::Conflict(text)
            }
            VmmError::Device(DeviceError::Switch(_, SwitchError::Unsupported(_))) => {
                ApiError::BadRequest(text)
            }
            VmmError::Migration(
                MigrationError::Url(_)
                | MigrationError::NotLocal
                | MigrationError::NotShared
                | MigrationError::Version(_),
            ) => ApiError::BadRequest(text),
            VmmError::Vm(_) | VmmError::Device(_) | VmmError::Reply(_) | VmmError::Migration(_) => {
                ApiError::Internal(text)
            }
        }
    }
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

/// A reply: a JSON body (200) or none (204).
pub type ApiResponse = Result<Option<serde_json::Value>, ApiError>;

/// What the API thread sends to the VMM thread.
pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: Sender<ApiResponse>,
    /// Signalled once the reply is on the wire (the VMM waits for it before it exits after a
    /// live upgrade).
    pub written: std::sync::mpsc::Receiver<()>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// Every served endpoint and its method; the OpenAPI description must list each.
pub const ROUTES: &[(&str, Method)] = &[
    ("vmm.ping", Method::Get),
    ("vmm.shutdown", Method::Put),
    ("vm.create", Method::Put),
    ("vm.boot", Method::Put),
    ("vm.shutdown", Method::Put),
    ("vm.delete", Method::Put),
    ("vm.reboot", Method::Put),
    ("vm.pause", Method::Put),
    ("vm.resume", Method::Put),
    ("vm.info", Method::Get),
    ("vm.counters", Method::Get),
    ("vm.dma-unmap", Method::Put),
    ("vm.reclaim", Method::Put),
    ("vm.vio-mode", Method::Put),
    ("vm.vio-info", Method::Get),
    ("vm.send-migration", Method::Put),
    ("vm.receive-migration", Method::Put),
];

/// Maps an HTTP request onto an `ApiRequest`.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let path = path.split('?').next().unwrap_or(path);
    let name = path
        .strip_prefix(API_PREFIX)
        .ok_or_else(|| ApiError::NotFound(path.to_string()))?;
    let &(_, want) = ROUTES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| ApiError::NotFound(path.to_string()))?;
    if method != want.as_str() {
        return Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allowed: want.as_str(),
        });
    }
    Ok(match name {
        "vmm.ping" => ApiRequest::VmmPing,
        "vmm.shutdown" => ApiRequest::VmmShutdown,
        "vm.create" => {
            let body = std::str::from_utf8(body)
                .map_err(|_| ApiError::BadRequest("Body is not UTF-8".into()))?;
            if body.trim().is_empty() {
                return Err(ApiError::BadRequest(
                    "vm.create needs a VmConfig body".into(),
                ));
            }
            ApiRequest::VmCreate(Box::new(VmConfig::from_json(body)?))
        }
        "vm.boot" => ApiRequest::VmBoot,
        "vm.shutdown" => ApiRequest::VmShutdown,
        "vm.delete" => ApiRequest::VmDelete,
        "vm.reboot" => ApiRequest::VmReboot,
        "vm.pause" => ApiRequest::VmPause,
        "vm.resume" => ApiRequest::VmResume,
        "vm.info" => ApiRequest::VmInfo,
        "vm.counters" => ApiRequest::VmCounters,
        "vm.reclaim" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                bytes: u64,
                #[serde(default)]
                unsafe_unmap_dma: bool,
                #[serde(default)]
                dma_only: bool,
            }
            let b: Body = serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("Invalid body: {e}")))?;
            if b.dma_only && b.unsafe_unmap_dma {
                return Err(ApiError::BadRequest(
                    "dma_only and unsafe_unmap_dma exclude each other".into(),
                ));
            }
            ApiRequest::VmReclaim {
                bytes: b.bytes,
                unsafe_unmap_dma: b.unsafe_unmap_dma,
                dma_only: b.dma_only,
            }
        }
        "vm.vio-info" => ApiRequest::VmVioInfo,
        "vm.send-migration" => {
            // Cloud Hypervisor's VmSendMigrationData.
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                destination_url: String,
                #[serde(default)]
                local: bool,
            }
            let b: Body = serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("Invalid body: {e}")))?;
            ApiRequest::VmSendMigration {
                url: b.destination_url,
                local: b.local,
            }
        }
        "vm.receive-migration" => {
            // Cloud Hypervisor's VmReceiveMigrationData.
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                receiver_url: String,
            }
            let b: Body = serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("Invalid body: {e}")))?;
            ApiRequest::VmReceiveMigration {
                url: b.receiver_url,
            }
        }
        "vm.vio-mode" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                id: String,
                mode: String,
            }
            let b: Body = serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("Invalid body: {e}")))?;
            let mode = VioMode::parse(&b.mode).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "Invalid mode \"{}\": expected snoop, passthrough or auto",
                    b.mode
                ))
            })?;
            ApiRequest::VmVioMode { id: b.id, mode }
        }
        "vm.dma-unmap" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                id: String,
                iova: u64,
                size: u64,
            }
            let b: Body = serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("Invalid body: {e}")))?;
            if b.size == 0 || !b.iova.is_multiple_of(4096) || !b.size.is_multiple_of(4096) {
                return Err(ApiError::BadRequest(
                    "iova and size must be non-zero multiples of 4096".into(),
                ));
            }
            ApiRequest::VmDmaUnmap {
                id: b.id,
                iova: b.iova,
                size: b.size,
            }
        }
        _ => unreachable!("ROUTES and this match list the same endpoints"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        assert!(matches!(
            route("GET", "/api/v1/vmm.ping", b""),
            Ok(ApiRequest::VmmPing)
        ));
        assert!(matches!(
            route("PUT", "/api/v1/vm.pause", b""),
            Ok(ApiRequest::VmPause)
        ));
        assert_eq!(
            route("GET", "/api/v1/vm.nope", b"").unwrap_err().status(),
            404
        );
        assert_eq!(route("GET", "/other", b"").unwrap_err().status(), 404);
        assert_eq!(
            route("PUT", "/api/v1/vm.info", b"").unwrap_err().status(),
            405
        );
        assert_eq!(
            route("DELETE", "/api/v1/vm.boot", b"")
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.create", b"{oops")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.create", b"").unwrap_err().status(),
            400
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.create", &[0xff, 0xfe])
                .unwrap_err()
                .status(),
            400
        );
    }

    /// Every served route is described in the OpenAPI document, with its method.
    #[test]
    fn openapi_lists_every_route() {
        let doc = include_str!("openapi/vio-hypervisor.yaml");
        for (name, method) in ROUTES {
            let key = format!("  /{name}:");
            let start = doc
                .find(&key)
                .unwrap_or_else(|| panic!("/{name} missing from the OpenAPI document"));
            let section: String = doc[start + key.len()..]
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with("    ") || l.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            let m = format!("    {}:", method.as_str().to_lowercase());
            assert!(
                section.lines().any(|l| l == m),
                "/{name} lacks {m} in the OpenAPI document"
            );
        }
    }
}
