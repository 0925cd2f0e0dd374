//! What the front end must see of the guest's common-configuration accesses: feature
//! negotiation (packed rings have no available index to shadow, so VIRTIO_F_RING_PACKED is
//! masked; EVENT_IDX decides how suppression is stated), queue enables and device resets.

use virtio_devices::transport::pci_common_config::offset;

const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// VIRTIO_F_RING_PACKED (34) in the upper feature word.
const RING_PACKED_HI: u32 = 1 << 2;

/// What to do with a guest's common-configuration write.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum CommonWrite {
    /// Forward it to the device as it is.
    Forward,
    /// Forward this 32-bit value instead.
    ForwardMasked(u32),
    /// Set up snooping of this queue, then forward the write.
    EnableQueue(u16),
    /// Forward the write, then stop snooping every queue.
    Reset,
}

/// The driver state the front end tracks, as the guest wrote it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct CommonCfgView {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
}

impl CommonCfgView {
    pub fn event_idx(&self) -> bool {
        self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// Adjusts what the guest reads at `off` (the device's answer is in `data`).
    pub fn filter_read(&self, off: u64, data: &mut [u8]) {
        if off == offset::DEVICE_FEATURE && self.device_feature_select == 1 {
            if let Ok(b) = <[u8; 4]>::try_from(&*data) {
                let v = u32::from_le_bytes(b) & !RING_PACKED_HI;
                data.copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// Records a guest write at `off` and says how to pass it on.
    pub fn write(&mut self, off: u64, data: &[u8]) -> CommonWrite {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(v);
        match (off, data.len()) {
            (offset::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (offset::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (offset::DRIVER_FEATURE, 4) => {
                let mut w = v as u32;
                if self.driver_feature_select == 1 {
                    w &= !RING_PACKED_HI;
                }
                if self.driver_feature_select < 2 {
                    let shift = 32 * self.driver_feature_select;
                    self.driver_features =
                        (self.driver_features & !(0xffff_ffff << shift)) | u64::from(w) << shift;
                }
                return CommonWrite::ForwardMasked(w);
            }
            (offset::QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (offset::QUEUE_ENABLE, 2) if v == 1 => {
                return CommonWrite::EnableQueue(self.queue_select)
            }
            // The negotiated features stay readable (counters) until the driver negotiates
            // again, which it must before it enables a queue.
            (offset::DEVICE_STATUS, 1) if v == 0 => return CommonWrite::Reset,
            _ => {}
        }
        CommonWrite::Forward
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rings_are_masked_both_ways_and_features_tracked() {
        let mut c = CommonCfgView::default();
        c.write(offset::DEVICE_FEATURE_SELECT, &1u32.to_le_bytes());
        let mut d = 0b101u32.to_le_bytes();
        c.filter_read(offset::DEVICE_FEATURE, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "VERSION_1 offered, PACKED not");
        c.write(offset::DRIVER_FEATURE_SELECT, &0u32.to_le_bytes());
        assert_eq!(
            c.write(offset::DRIVER_FEATURE, &(1u32 << 29).to_le_bytes()),
            CommonWrite::ForwardMasked(1 << 29)
        );
        c.write(offset::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        assert_eq!(
            c.write(offset::DRIVER_FEATURE, &0b101u32.to_le_bytes()),
            CommonWrite::ForwardMasked(1)
        );
        assert!(c.event_idx());
        assert_eq!(c.driver_features, 1 << 32 | 1 << 29);
        c.write(offset::QUEUE_SELECT, &3u16.to_le_bytes());
        assert_eq!(
            c.write(offset::QUEUE_ENABLE, &1u16.to_le_bytes()),
            CommonWrite::EnableQueue(3)
        );
        assert_eq!(c.write(offset::DEVICE_STATUS, &[0]), CommonWrite::Reset);
        assert_eq!(c.write(offset::DEVICE_STATUS, &[1]), CommonWrite::Forward);
    }
}
