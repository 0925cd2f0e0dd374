//! Pages DMA-mapped to a plain passthrough device. Such a device cannot fault, so its whole
//! mapping is pinned: reclaim skips these pages unless told to take them anyway (the unsafe
//! switch, which DMA-unmaps them first; the device then takes I/O page faults).

use super::*;

/// A device that can reach guest memory by DMA at any time, and so pins what it has mapped.
pub struct PassthroughMapping {
    pub id: String,
    pub mapping: Arc<dyn DmaMapping>,
    /// Page indices [start, end) the device has mapped.
    pub pages: Vec<(u64, u64)>,
}

impl Reclaimer {
    pub fn add_passthrough(&self, mapping: PassthroughMapping) {
        self.passthrough.lock().unwrap().push(mapping);
    }

    pub(super) fn passthrough_owner(&self, page: u64) -> Option<String> {
        self.passthrough
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.pages.iter().any(|&(s, e)| page >= s && page < e))
            .map(|p| p.id.clone())
    }

    /// DMA-unmaps `page` from every device that had it (the unsafe path).
    pub(super) fn revoke_passthrough(&self, page: u64) {
        let Some(gpa) = self.guest_addr(page) else {
            return;
        };
        for pin in self.passthrough.lock().unwrap().iter_mut() {
            if let Err(e) = pin.mapping.unmap(gpa, PAGE) {
                debug!("{}: {e}", pin.id);
            }
            let mut next = Vec::new();
            for &(s, e) in &pin.pages {
                if page >= s && page < e {
                    if s < page {
                        next.push((s, page));
                    }
                    if page + 1 < e {
                        next.push((page + 1, e));
                    }
                } else {
                    next.push((s, e));
                }
            }
            pin.pages = next;
        }
    }
}
