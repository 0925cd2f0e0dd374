//! Reclaim across a live upgrade: which pages are reclaimed (and where they are in the store),
//! which are sampled and how old they are. The memfd and the store file travel as descriptors;
//! the new process registers its own mapping of the memfd with its own userfaultfd, so a
//! reclaimed page (a hole in the memfd) faults there and is restored from the same store.
//! Pins are not carried: each device takes its own again in the new process before reclaim
//! runs there.

use super::store::StoreState;
use super::*;
use vfio::handover::{BlobIn, BlobOut, FdsIn, FdsOut, HandoverError, Section};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ReclaimState {
    pub store: StoreState,
    pub store_fd: usize,
    /// Two bytes a page: its state (reclaimed, sampled, accessed) and its age.
    pub pages: Section,
    pub index: Section,
    pub free: Section,
    pub reclaimed_pages: u64,
    pub sample_runs: u64,
}

impl Reclaimer {
    /// Stops reclaim and sampling passes; a pass under way finishes first.
    pub fn freeze(&self) {
        let _g = self.pass.lock().unwrap();
        self.frozen.store(true, Ordering::Release);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::Release);
    }

    /// The frozen reclaimer's state.
    pub fn save(&self, fds: &mut FdsOut, blob: &mut BlobOut) -> std::io::Result<ReclaimState> {
        let mut pages = Vec::with_capacity(self.pages.len() * 2);
        for (s, a) in self.pages.iter().zip(&self.ages) {
            pages.push(s.load(Ordering::Acquire) & !BUSY);
            pages.push(a.load(Ordering::Relaxed));
        }
        let (store, index, free) = self.store.export();
        Ok(ReclaimState {
            store,
            store_fd: fds.add(self.store.file()),
            pages: blob.put(&pages)?,
            index: blob.put(&index)?,
            free: blob.put(&free)?,
            reclaimed_pages: self.stats.reclaimed_pages.load(Ordering::Relaxed),
            sample_runs: self.stats.sample_runs.load(Ordering::Relaxed),
        })
    }

    /// Reclaim over `ranges` of the memfd another process reclaimed from, as it left it.
    pub fn adopt(
        memfd: Arc<File>,
        ranges: Vec<HostRange>,
        cfg: ReclaimConfig,
        s: &ReclaimState,
        fds: &mut FdsIn,
        blob: &BlobIn,
    ) -> Result<Arc<Self>, ReclaimError> {
        let invalid = |e: HandoverError| ReclaimError::Adopt(e.to_string());
        let total = total_pages(&ranges);
        let pages = blob.get(s.pages, total * 2).map_err(invalid)?;
        if pages.len() as u64 != total * 2 {
            return Err(ReclaimError::Adopt(format!(
                "page table for {} pages, guest RAM has {total}",
                pages.len() / 2
            )));
        }
        let index = blob.get(s.index, 64 << 20).map_err(invalid)?;
        let free = blob.get(s.free, 64 << 20).map_err(invalid)?;
        let file = File::from(fds.take(s.store_fd).map_err(invalid)?);
        let store = Store::adopt(file, &s.store, &index, &free)?;
        let uffd = Self::uffd_for(&ranges)?;
        let r = Self::build(memfd, ranges, cfg, store, uffd)?;
        for (i, pair) in pages.chunks_exact(2).enumerate() {
            r.pages[i].store(
                pair[0] & (RECLAIMED | SAMPLED | ACCESSED),
                Ordering::Relaxed,
            );
            r.ages[i].store(pair[1], Ordering::Relaxed);
        }
        r.stats
            .reclaimed_pages
            .store(s.reclaimed_pages, Ordering::Relaxed);
        r.stats.sample_runs.store(s.sample_runs, Ordering::Relaxed);
        Ok(r)
    }
}
