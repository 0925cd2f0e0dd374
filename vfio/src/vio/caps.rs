//! Finding the capabilities the front end needs in the device's config space, and hiding the
//! VIO one from the guest.

use super::VioDeviceError;
use crate::vfio_user::ClientError;
use virtio_devices::transport::pci_common_config::cap_type;

const PCI_CAP_ID_VNDR: u8 = 0x09;
const PCI_CAPABILITY_LIST: usize = 0x34;
/// More capabilities than config space can hold: a longer list loops.
const MAX_CAPS: usize = 48;

/// A capability's window into a BAR.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct CapRegion {
    pub bar: usize,
    pub offset: u64,
    pub len: u64,
}

impl CapRegion {
    pub fn contains(&self, bar: usize, offset: u64, len: usize) -> bool {
        bar == self.bar && offset >= self.offset && offset + len as u64 <= self.offset + self.len
    }
}

/// The virtio capabilities the front end needs, and how to unlink the VIO one.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Caps {
    pub common: CapRegion,
    pub notify: CapRegion,
    pub notify_mult: u32,
    pub vio: CapRegion,
    /// The hidden capability's config-space bytes [start, end).
    pub hidden: (usize, usize),
    /// Where the pointer to the hidden capability lives (byte offset), and what the guest reads
    /// there instead.
    link: (usize, u8),
}

impl Caps {
    /// Walks the capability list through `cfg` (config register number -> value).
    pub fn parse(cfg: &dyn Fn(usize) -> Result<u32, ClientError>) -> Result<Caps, VioDeviceError> {
        let mut caps = Caps::default();
        let (mut common, mut notify, mut vio) = (false, false, false);
        let mut link_at = PCI_CAPABILITY_LIST;
        let mut ptr = (cfg(PCI_CAPABILITY_LIST / 4)? & 0xfc) as usize;
        for _ in 0..MAX_CAPS {
            if ptr < 0x40 {
                break;
            }
            let head = cfg(ptr / 4)?;
            let next = ((head >> 8) & 0xfc) as u8;
            if head as u8 == PCI_CAP_ID_VNDR {
                let cap_len = ((head >> 16) & 0xff) as usize;
                let cfg_type = (head >> 24) as u8;
                let region = CapRegion {
                    bar: (cfg(ptr / 4 + 1)? & 0xff) as usize,
                    offset: u64::from(cfg(ptr / 4 + 2)?),
                    len: u64::from(cfg(ptr / 4 + 3)?),
                };
                match cfg_type {
                    cap_type::COMMON_CFG if !common => {
                        caps.common = region;
                        common = true;
                    }
                    cap_type::NOTIFY_CFG if !notify => {
                        caps.notify = region;
                        caps.notify_mult = cfg(ptr / 4 + 4)?;
                        notify = true;
                    }
                    vio::spec::CAP_CFG_TYPE if !vio => {
                        caps.vio = region;
                        caps.hidden = (ptr, ptr + cap_len.max(16));
                        caps.link = (link_at, next);
                        vio = true;
                    }
                    _ => {}
                }
            }
            link_at = ptr + 1;
            ptr = next as usize;
        }
        if !common {
            return Err(VioDeviceError::MissingCap("common configuration"));
        }
        if !notify {
            return Err(VioDeviceError::MissingCap("notification"));
        }
        if !vio {
            return Err(VioDeviceError::NoShadowIndex);
        }
        Ok(caps)
    }

    /// The guest's view of config register `reg`: the VIO capability unlinked and blanked.
    pub fn filter(&self, reg: usize, v: u32) -> u32 {
        let (start, end) = self.hidden;
        let mut b = v.to_le_bytes();
        for (i, byte) in b.iter_mut().enumerate() {
            let at = reg * 4 + i;
            if at == self.link.0 {
                *byte = self.link.1;
            } else if (start..end).contains(&at) {
                *byte = 0;
            }
        }
        u32::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vio_capability_is_unlinked_and_blanked() {
        // Caps at 0x40 (MSI-X) -> 0x50 (VIO, 16 bytes) -> 0x60 (common).
        let caps = Caps {
            hidden: (0x50, 0x60),
            link: (0x41, 0x60),
            ..Default::default()
        };
        assert_eq!(caps.filter(0x40 / 4, 0x0000_5011), 0x0000_6011);
        assert_eq!(caps.filter(0x50 / 4, 0x8010_6009), 0);
        assert_eq!(caps.filter(0x5c / 4, 0xdead_beef), 0);
        assert_eq!(caps.filter(0x60 / 4, 0x0100_0009), 0x0100_0009);
        // First in the list: the header's capability pointer skips it.
        let caps = Caps {
            hidden: (0x40, 0x50),
            link: (0x34, 0x50),
            ..Default::default()
        };
        assert_eq!(caps.filter(0x34 / 4, 0x40), 0x50);
    }
}
