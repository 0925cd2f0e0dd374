//! Builds the PCI function vdpu serves (virtio-blk over a file, or virtio-net over a TAP): the
//! same virtio device and virtio-pci transport as the VMM-emulated ones, reaching guest memory through the IOMMU and raising
//! interrupts on the client's eventfds.

use crate::iommu::Iommu;
use crate::irq::ClientIrqs;
use crate::pri::PageRequests;
use crate::server::Device;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use virtio_devices::block::{Block, BlockConfig, RawFile, DEFAULT_QUEUE_SIZE};
use virtio_devices::net::{
    parse_mac, Net, NetConfig, Tap, TapError, DEFAULT_QUEUE_SIZE as NET_QUEUE_SIZE,
};
use virtio_devices::transport::{InterruptDelivery, IoEventRegistrar, VirtioPciDevice};
use virtio_devices::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("Error parsing --blk \"{0}\": {1}")]
    Parse(String, String),
    #[error("Error parsing --net \"{0}\": {1}")]
    ParseNet(String, String),
    #[error("Failed to open {0}")]
    Open(String, #[source] io::Error),
    #[error("Failed to open the TAP")]
    Tap(#[from] TapError),
    #[error("Failed to set up the PCI function")]
    Pci(#[from] virtio_devices::transport::VirtioPciError),
    #[error("Failed to set up doorbells")]
    Doorbell(#[source] io::Error),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub id: String,
    /// Service time per request (0: as fast as the backing file).
    pub latency_us: u64,
    /// A DMA to an unmapped page becomes a page request (the PRI baseline, `vio::pri`).
    pub pri: bool,
    /// How long a queue waits for a page request's answer before failing the access.
    pub pri_timeout_ms: u64,
}

/// The default page-request timeout: far above a fault-in from a slow store (5 ms), far below
/// the guest's own patience.
pub const DEFAULT_PRI_TIMEOUT_MS: u64 = 1000;

impl BlkConfig {
    /// `path=FILE[,readonly=on,num_queues=N,queue_size=N,id=NAME,latency_us=N,pri=on,
    /// pri_timeout_ms=N]`
    pub fn parse(raw: &str) -> Result<Self, DeviceError> {
        let err = |m: &str| DeviceError::Parse(raw.to_string(), m.to_string());
        let mut c = BlkConfig {
            path: PathBuf::new(),
            readonly: false,
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            id: "vdpu-blk".into(),
            latency_us: 0,
            pri: false,
            pri_timeout_ms: DEFAULT_PRI_TIMEOUT_MS,
        };
        let mut have_path = false;
        for item in raw.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| err(&format!("expected key=value, got \"{item}\"")))?;
            match k {
                "path" => {
                    c.path = PathBuf::from(v);
                    have_path = !v.is_empty();
                }
                "readonly" => {
                    c.readonly = toggle(v).ok_or_else(|| err("readonly must be on or off"))?
                }
                "pri" => c.pri = toggle(v).ok_or_else(|| err("pri must be on or off"))?,
                "pri_timeout_ms" => {
                    c.pri_timeout_ms = v
                        .parse()
                        .map_err(|_| err("pri_timeout_ms must be a number"))?;
                    if !(1..=60_000).contains(&c.pri_timeout_ms) {
                        return Err(err("pri_timeout_ms must be 1..60000"));
                    }
                }
                "num_queues" => {
                    c.num_queues = v.parse().map_err(|_| err("num_queues must be a number"))?
                }
                "queue_size" => {
                    c.queue_size = v.parse().map_err(|_| err("queue_size must be a number"))?
                }
                "id" => c.id = v.to_string(),
                "latency_us" => {
                    c.latency_us = v.parse().map_err(|_| err("latency_us must be a number"))?;
                    if c.latency_us > 10_000_000 {
                        return Err(err("latency_us must be at most 10000000"));
                    }
                }
                _ => return Err(err(&format!("unknown key \"{k}\""))),
            }
        }
        if !have_path {
            return Err(err("path is required"));
        }
        if c.num_queues == 0 || c.num_queues > 16 {
            return Err(err("num_queues must be 1..16"));
        }
        if !c.queue_size.is_power_of_two() || !(2..=32768).contains(&c.queue_size) {
            return Err(err("queue_size must be a power of two, 2..32768"));
        }
        Ok(c)
    }
}

/// The network function's `--net` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetFunctionConfig {
    pub tap: String,
    pub mac: [u8; 6],
    pub queue_size: u16,
    pub id: String,
}

impl NetFunctionConfig {
    /// `tap=NAME[,mac=MAC,queue_size=N,id=NAME]`
    pub fn parse(raw: &str) -> Result<Self, DeviceError> {
        let err = |m: &str| DeviceError::ParseNet(raw.to_string(), m.to_string());
        let mut c = NetFunctionConfig {
            tap: String::new(),
            mac: [0x52, 0x54, 0x00, 0x76, 0x64, 0x70],
            queue_size: NET_QUEUE_SIZE,
            id: "vdpu-net".into(),
        };
        for item in raw.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| err(&format!("expected key=value, got \"{item}\"")))?;
            match k {
                "tap" => c.tap = v.to_string(),
                "mac" => c.mac = parse_mac(v).map_err(|e| err(&e))?,
                "queue_size" => {
                    c.queue_size = v.parse().map_err(|_| err("queue_size must be a number"))?
                }
                "id" => c.id = v.to_string(),
                _ => return Err(err(&format!("unknown key \"{k}\""))),
            }
        }
        if c.tap.is_empty() || c.tap.len() > 15 {
            return Err(err("tap must be an interface name of 1..15 bytes"));
        }
        if !c.queue_size.is_power_of_two() || !(2..=32768).contains(&c.queue_size) {
            return Err(err("queue_size must be a power of two, 2..32768"));
        }
        Ok(c)
    }
}

fn toggle(v: &str) -> Option<bool> {
    match v {
        "on" | "true" => Some(true),
        "off" | "false" => Some(false),
        _ => None,
    }
}

/// The client registers the doorbells with its hypervisor; vdpu reads them directly.
struct ClientDoorbells;

impl IoEventRegistrar for ClientDoorbells {
    fn register(&self, _fd: &EventFd, _addr: u64) -> io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _fd: &EventFd, _addr: u64) -> io::Result<()> {
        Ok(())
    }
}

pub fn build_blk(cfg: &BlkConfig) -> Result<Device, DeviceError> {
    let disk = RawFile::open(&cfg.path, cfg.readonly)
        .map_err(|e| DeviceError::Open(cfg.path.display().to_string(), e))?;
    let iommu = Arc::new(Iommu::new());
    let pri = if cfg.pri {
        iommu.enable_page_requests();
        let timeout = std::time::Duration::from_millis(cfg.pri_timeout_ms);
        Some(Arc::new(
            PageRequests::new(cfg.num_queues, timeout).map_err(DeviceError::Doorbell)?,
        ))
    } else {
        None
    };
    let mut block = Block::new(
        disk,
        &BlockConfig {
            id: cfg.id.clone(),
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            latency: (cfg.latency_us > 0).then(|| std::time::Duration::from_micros(cfg.latency_us)),
        },
        iommu.clone(),
    );
    if let Some(p) = &pri {
        block = block.with_pri(p.clone());
    }
    pci_function(&cfg.id, Arc::new(Mutex::new(block)), iommu, pri)
}

/// The network function: virtio-net over the TAP, DMA through the IOMMU.
pub fn build_net(cfg: &NetFunctionConfig) -> Result<Device, DeviceError> {
    let tap = Tap::open(&cfg.tap, None, None)?;
    let iommu = Arc::new(Iommu::new());
    let net = Net::new(
        tap,
        &NetConfig {
            id: cfg.id.clone(),
            mac: cfg.mac,
            queue_size: cfg.queue_size,
        },
        iommu.clone(),
    );
    pci_function(&cfg.id, Arc::new(Mutex::new(net)), iommu, None)
}

/// `virtio` behind the virtio-pci transport with the VIO extension, as a vfio-user function.
fn pci_function(
    id: &str,
    virtio: Arc<Mutex<dyn VirtioDevice>>,
    iommu: Arc<Iommu>,
    pri: Option<Arc<PageRequests>>,
) -> Result<Device, DeviceError> {
    let queues = virtio.lock().unwrap().queue_max_sizes().len() as u16;
    let irqs = Arc::new(ClientIrqs::new(queues + 1));
    let pci = VirtioPciDevice::new(
        id.to_string(),
        virtio.clone(),
        irqs.clone(),
        Arc::new(ClientDoorbells),
        0,
        InterruptDelivery::Direct,
    )
    .and_then(|p| p.with_shadow_index(iommu.clone()))
    .map_err(DeviceError::Pci)?;
    let notifiers = pci.queue_notifiers().map_err(DeviceError::Doorbell)?;
    Ok(Device {
        pci,
        virtio,
        iommu,
        irqs,
        notifiers,
        pri,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_option_parsing() {
        let c =
            BlkConfig::parse("path=/x.img,readonly=on,num_queues=2,queue_size=128,latency_us=50")
                .unwrap();
        assert_eq!(
            (c.readonly, c.num_queues, c.queue_size, c.latency_us, c.pri),
            (true, 2, 128, 50, false)
        );
        let c = BlkConfig::parse("path=/x.img,pri=on,pri_timeout_ms=20").unwrap();
        assert_eq!((c.pri, c.pri_timeout_ms), (true, 20));
        for (bad, want) in [
            ("readonly=on", "path is required"),
            ("path=/x,speed=9", "unknown key"),
            ("path=/x,queue_size=100", "power of two"),
            ("path=/x,num_queues=0", "1..16"),
            ("path=/x,readonly=maybe", "on or off"),
            ("path=/x,latency_us=fast", "must be a number"),
            ("path=/x,pri=maybe", "pri must be on or off"),
            ("path=/x,pri=on,pri_timeout_ms=0", "1..60000"),
            ("/x", "expected key=value"),
        ] {
            let e = BlkConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn net_option_parsing() {
        let c =
            NetFunctionConfig::parse("tap=vt0,mac=02:00:00:00:00:07,queue_size=64,id=n").unwrap();
        assert_eq!(
            (c.tap.as_str(), c.mac, c.queue_size, c.id.as_str()),
            ("vt0", [2, 0, 0, 0, 0, 7], 64, "n")
        );
        for (bad, want) in [
            ("mac=02:00:00:00:00:07", "tap must be"),
            ("tap=a-name-far-too-long", "tap must be"),
            ("tap=t,mac=01:00:00:00:00:07", "multicast"),
            ("tap=t,mac=zz", "not a MAC"),
            ("tap=t,queue_size=3", "power of two"),
            ("tap=t,speed=9", "unknown key"),
        ] {
            let e = NetFunctionConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
