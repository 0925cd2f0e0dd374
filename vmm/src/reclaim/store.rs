//! Where reclaimed pages go: a file in a configurable directory. Pages are optionally
//! compressed (lz4) and kept in 512-byte size classes with free lists, so a restored page's space
//! is reused; zero pages take no space (a flag).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use thiserror::Error;

/// A page in the store: `vio::spec::PAGE_SIZE` as a buffer length.
pub const PAGE_SIZE: usize = vio::spec::PAGE_SIZE as usize;
const UNIT: usize = 512;
const CLASSES: usize = PAGE_SIZE / UNIT;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("Failed to create the page store in {0}")]
    Create(PathBuf, #[source] io::Error),
    #[error("The page store is full ({0} bytes)")]
    Full(u64),
    #[error("Page store I/O failed")]
    Io(#[source] io::Error),
    #[error("Page {0} is not in the store")]
    Missing(u64),
    #[error("Page {0} in the store is corrupt")]
    Corrupt(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Zero,
    Data {
        offset: u64,
        class: usize,
        len: u32,
        compressed: bool,
    },
}

#[derive(Default)]
struct Index {
    entries: HashMap<u64, Entry>,
    free: [Vec<u64>; CLASSES],
    end: u64,
    used: u64,
}

impl Index {
    fn remove(&mut self, page: u64) {
        if let Some(Entry::Data { offset, class, .. }) = self.entries.remove(&page) {
            self.free[class].push(offset);
            self.used -= ((class + 1) * UNIT) as u64;
        }
    }
}

/// A page's contents from its entry and the bytes the entry points at.
fn unpack(
    page: u64,
    entry: Entry,
    bytes: &[u8],
    out: &mut [u8; PAGE_SIZE],
) -> Result<(), StoreError> {
    match entry {
        Entry::Zero => out.fill(0),
        Entry::Data {
            compressed: true, ..
        } => {
            let n = lz4_flex::block::decompress_into(bytes, out)
                .map_err(|_| StoreError::Corrupt(page))?;
            if n != PAGE_SIZE {
                return Err(StoreError::Corrupt(page));
            }
        }
        Entry::Data { .. } => out.copy_from_slice(bytes),
    }
    Ok(())
}

pub struct Store {
    file: File,
    dir: PathBuf,
    compress: bool,
    max_bytes: u64,
    index: Mutex<Index>,
    /// Tests make the file fail after this many more writes or reads.
    #[cfg(test)]
    pub(crate) ok_writes: std::sync::atomic::AtomicU64,
    #[cfg(test)]
    pub(crate) ok_reads: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
fn injected(left: &std::sync::atomic::AtomicU64) -> Result<(), StoreError> {
    use std::sync::atomic::Ordering;
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .map(|_| ())
        .map_err(|_| StoreError::Io(io::Error::from_raw_os_error(libc::EIO)))
}

impl Store {
    /// A new, empty store file in `dir`. The file has no name (O_TMPFILE, or unlinked at once
    /// where the filesystem lacks it): a VMM that is killed, or exits without unwinding, leaves
    /// nothing behind, and a live upgrade hands the file over as a descriptor.
    pub fn create(dir: &Path, compress: bool, max_bytes: u64) -> Result<Self, StoreError> {
        let err = |e| StoreError::Create(dir.to_path_buf(), e);
        let tmpfile = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(dir);
        let file = match tmpfile {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let path = dir.join(format!(
                    "vio-pages-{}-{:x}",
                    std::process::id(),
                    rand_suffix()
                ));
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(err)?;
                std::fs::remove_file(&path).map_err(err)?;
                f
            }
            Err(e) => return Err(err(e)),
        };
        Ok(Store {
            file,
            dir: dir.to_path_buf(),
            compress,
            max_bytes,
            index: Mutex::default(),
            #[cfg(test)]
            ok_writes: u64::MAX.into(),
            #[cfg(test)]
            ok_reads: u64::MAX.into(),
        })
    }

    /// Saves a page's content. On error nothing is stored.
    pub fn save(&self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), StoreError> {
        #[cfg(test)]
        injected(&self.ok_writes)?;
        if data.iter().all(|&b| b == 0) {
            self.forget(page);
            self.index.lock().unwrap().entries.insert(page, Entry::Zero);
            return Ok(());
        }
        let packed = if self.compress {
            lz4_flex::block::compress(data)
        } else {
            Vec::new()
        };
        let (bytes, compressed): (&[u8], bool) = if self.compress && packed.len() < PAGE_SIZE - UNIT
        {
            (&packed, true)
        } else {
            (data, false)
        };
        let class = bytes.len().div_ceil(UNIT) - 1;
        let offset = {
            let mut ix = self.index.lock().unwrap();
            let size = ((class + 1) * UNIT) as u64;
            match ix.free[class].pop() {
                Some(o) => o,
                None => {
                    if ix.end + size > self.max_bytes {
                        return Err(StoreError::Full(self.max_bytes));
                    }
                    ix.end += size;
                    ix.end - size
                }
            }
        };
        if let Err(e) = self.file.write_all_at(bytes, offset) {
            self.index.lock().unwrap().free[class].push(offset);
            return Err(StoreError::Io(e));
        }
        let mut ix = self.index.lock().unwrap();
        ix.used += ((class + 1) * UNIT) as u64;
        if let Some(Entry::Data { offset, class, .. }) = ix.entries.insert(
            page,
            Entry::Data {
                offset,
                class,
                len: bytes.len() as u32,
                compressed,
            },
        ) {
            ix.free[class].push(offset);
            ix.used -= ((class + 1) * UNIT) as u64;
        }
        Ok(())
    }

    /// Reads a page back into `out` and forgets it.
    pub fn take(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        #[cfg(test)]
        injected(&self.ok_reads)?;
        let entry = self.entry(page)?;
        if let Entry::Data { offset, len, .. } = entry {
            let mut buf = vec![0u8; len as usize];
            self.file
                .read_exact_at(&mut buf, offset)
                .map_err(StoreError::Io)?;
            unpack(page, entry, &buf, out)?;
        } else {
            unpack(page, entry, &[], out)?;
        }
        self.forget(page);
        Ok(())
    }

    /// `take` for the pages from `first` on, one per `PAGE_SIZE` of `out`, with one read for
    /// each run of them that lie back to back in the file (a reclaim pass writes a run of
    /// pages that way). A page that cannot be read is handed to `failed`, its part of `out`
    /// zeroed, and it stays in the store.
    pub fn take_run(&self, first: u64, out: &mut [u8], mut failed: impl FnMut(u64, StoreError)) {
        let n = out.len() / PAGE_SIZE;
        let entries: Vec<Option<Entry>> = {
            let ix = self.index.lock().unwrap();
            (0..n as u64)
                .map(|i| ix.entries.get(&(first + i)).copied())
                .collect()
        };
        let mut done = vec![false; n];
        let mut scratch = Vec::new();
        let mut i = 0;
        while i < n {
            let page = first + i as u64;
            let Some(entry) = entries[i] else {
                failed(page, StoreError::Missing(page));
                out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill(0);
                i += 1;
                continue;
            };
            let Entry::Data { offset, .. } = entry else {
                out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill(0);
                done[i] = true;
                i += 1;
                continue;
            };
            // The run: the entries after this one, each starting where the one before ends.
            // The file may end inside the last one's slot: read up to its bytes, not its slot.
            let (mut next, mut end) = (offset, offset);
            let mut j = i;
            let mut packed = false;
            while let Some(Some(Entry::Data {
                offset: o,
                class,
                len,
                compressed,
            })) = entries.get(j)
            {
                if *o != next {
                    break;
                }
                next += ((class + 1) * UNIT) as u64;
                end = o + u64::from(*len);
                packed |= *compressed || (class + 1) * UNIT != PAGE_SIZE;
                j += 1;
            }
            let span = (end - offset) as usize;
            let read = if packed {
                scratch.resize(span, 0);
                self.file.read_exact_at(&mut scratch, offset)
            } else {
                // Whole uncompressed pages: straight into place.
                self.file
                    .read_exact_at(&mut out[i * PAGE_SIZE..j * PAGE_SIZE], offset)
            };
            for k in i..j {
                let page = first + k as u64;
                let dst: &mut [u8; PAGE_SIZE] = (&mut out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
                    .try_into()
                    .unwrap();
                let unpacked = match (&read, entries[k]) {
                    (Err(e), _) => Err(StoreError::Io(io::Error::new(e.kind(), e.to_string()))),
                    (Ok(()), _) if !packed => Ok(()),
                    (Ok(()), Some(e @ Entry::Data { offset: o, len, .. })) => {
                        let at = (o - offset) as usize;
                        unpack(page, e, &scratch[at..at + len as usize], dst)
                    }
                    (Ok(()), _) => unreachable!("a run holds data entries only"),
                };
                match unpacked {
                    Ok(()) => done[k] = true,
                    Err(e) => {
                        dst.fill(0);
                        failed(page, e);
                    }
                }
            }
            i = j;
        }
        let mut ix = self.index.lock().unwrap();
        for (k, _) in done.iter().enumerate().filter(|(_, &d)| d) {
            ix.remove(first + k as u64);
        }
    }

    fn entry(&self, page: u64) -> Result<Entry, StoreError> {
        self.index
            .lock()
            .unwrap()
            .entries
            .get(&page)
            .copied()
            .ok_or(StoreError::Missing(page))
    }

    pub fn forget(&self, page: u64) {
        self.index.lock().unwrap().remove(page);
    }

    pub fn contains(&self, page: u64) -> bool {
        self.index.lock().unwrap().entries.contains_key(&page)
    }

    /// Bytes of the store file holding pages now.
    pub fn used_bytes(&self) -> u64 {
        self.index.lock().unwrap().used
    }

    pub fn pages(&self) -> usize {
        self.index.lock().unwrap().entries.len()
    }
}

/// A store handed to another process (a live upgrade): the file travels as a descriptor, the
/// index as two tables of fixed-size records.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StoreState {
    /// Where the (nameless) file lives: for messages.
    pub dir: PathBuf,
    pub compress: bool,
    pub max_bytes: u64,
    pub end: u64,
    pub used: u64,
}

const INDEX_RECORD: usize = 24;
const FREE_RECORD: usize = 16;
const REC_ZERO: u8 = 1;
const REC_COMPRESSED: u8 = 2;

impl Store {
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The store's state, its index records and its free-list records.
    pub fn export(&self) -> (StoreState, Vec<u8>, Vec<u8>) {
        let ix = self.index.lock().unwrap();
        let mut index = Vec::with_capacity(ix.entries.len() * INDEX_RECORD);
        for (&page, e) in &ix.entries {
            let (offset, len, class, flags) = match *e {
                Entry::Zero => (0, 0, 0, REC_ZERO),
                Entry::Data {
                    offset,
                    class,
                    len,
                    compressed,
                } => (
                    offset,
                    len,
                    class as u8,
                    if compressed { REC_COMPRESSED } else { 0 },
                ),
            };
            index.extend_from_slice(&page.to_le_bytes());
            index.extend_from_slice(&offset.to_le_bytes());
            index.extend_from_slice(&len.to_le_bytes());
            index.extend_from_slice(&[class, flags, 0, 0]);
        }
        let mut free = Vec::new();
        for (class, offsets) in ix.free.iter().enumerate() {
            for o in offsets {
                free.extend_from_slice(&(class as u64).to_le_bytes());
                free.extend_from_slice(&o.to_le_bytes());
            }
        }
        let state = StoreState {
            dir: self.dir.clone(),
            compress: self.compress,
            max_bytes: self.max_bytes,
            end: ix.end,
            used: ix.used,
        };
        (state, index, free)
    }

    /// Takes over a store another process exported; every record is checked against the file.
    pub fn adopt(
        file: File,
        s: &StoreState,
        index: &[u8],
        free: &[u8],
    ) -> Result<Self, StoreError> {
        let bad = || StoreError::Io(io::Error::other("Invalid page store records"));
        if !index.len().is_multiple_of(INDEX_RECORD) || !free.len().is_multiple_of(FREE_RECORD) {
            return Err(bad());
        }
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let mut ix = Index {
            end: s.end,
            used: s.used,
            ..Default::default()
        };
        for r in index.chunks_exact(INDEX_RECORD) {
            let (page, offset) = (u64_at(r, 0), u64_at(r, 8));
            let len = u32::from_le_bytes(r[16..20].try_into().unwrap());
            let (class, flags) = (usize::from(r[20]), r[21]);
            let e = if flags & REC_ZERO != 0 {
                Entry::Zero
            } else {
                let size = ((class + 1) * UNIT) as u64;
                if class >= CLASSES
                    || len as usize > size as usize
                    || offset.checked_add(size).is_none_or(|end| end > s.end)
                {
                    return Err(bad());
                }
                Entry::Data {
                    offset,
                    class,
                    len,
                    compressed: flags & REC_COMPRESSED != 0,
                }
            };
            ix.entries.insert(page, e);
        }
        for r in free.chunks_exact(FREE_RECORD) {
            let class = u64_at(r, 0) as usize;
            if class >= CLASSES {
                return Err(bad());
            }
            ix.free[class].push(u64_at(r, 8));
        }
        Ok(Store {
            file,
            dir: s.dir.clone(),
            compress: s.compress,
            max_bytes: s.max_bytes,
            index: Mutex::new(ix),
            #[cfg(test)]
            ok_writes: u64::MAX.into(),
            #[cfg(test)]
            ok_reads: u64::MAX.into(),
        })
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8, random: bool) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        let mut x = seed as u64 | 1;
        for (i, b) in p.iter_mut().enumerate() {
            *b = if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                (i / 64) as u8 ^ seed
            };
        }
        p
    }

    #[test]
    fn round_trip_compression_and_zero_pages() {
        let dir = std::env::temp_dir();
        let s = Store::create(&dir, true, 1 << 30).unwrap();
        let compressible = page(3, false);
        let random = page(9, true);
        s.save(1, &compressible).unwrap();
        let after_one = s.used_bytes();
        assert!(after_one < PAGE_SIZE as u64, "compressed: {after_one}");
        s.save(2, &random).unwrap();
        assert_eq!(
            s.used_bytes() - after_one,
            PAGE_SIZE as u64,
            "incompressible pages are stored raw"
        );
        s.save(3, &[0u8; PAGE_SIZE]).unwrap();
        assert_eq!(s.pages(), 3);
        assert_eq!(
            s.used_bytes() - after_one,
            PAGE_SIZE as u64,
            "zero pages take no space"
        );
        let mut out = [1u8; PAGE_SIZE];
        s.take(1, &mut out).unwrap();
        assert_eq!(out, compressible);
        s.take(2, &mut out).unwrap();
        assert_eq!(out, random);
        s.take(3, &mut out).unwrap();
        assert_eq!(out, [0u8; PAGE_SIZE]);
        assert_eq!(s.used_bytes(), 0);
        assert!(matches!(s.take(1, &mut out), Err(StoreError::Missing(1))));
        // Freed space is reused.
        s.save(4, &random).unwrap();
        let end = s.index.lock().unwrap().end;
        s.forget(4);
        s.save(5, &random).unwrap();
        assert_eq!(s.index.lock().unwrap().end, end);
    }

    #[test]
    fn an_exported_store_is_adopted_whole() {
        let dir = std::env::temp_dir();
        let s = Store::create(&dir, true, 1 << 20).unwrap();
        s.save(1, &page(1, true)).unwrap();
        s.save(2, &page(2, false)).unwrap();
        s.save(3, &[0; PAGE_SIZE]).unwrap();
        s.save(4, &page(4, true)).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        s.take(4, &mut out).unwrap();
        let (state, index, free) = s.export();
        let t = Store::adopt(s.file().try_clone().unwrap(), &state, &index, &free).unwrap();
        assert_eq!(t.pages(), 3);
        assert_eq!(t.used_bytes(), s.used_bytes());
        for (p, want) in [(1, page(1, true)), (2, page(2, false)), (3, [0; PAGE_SIZE])] {
            t.take(p, &mut out).unwrap();
            assert_eq!(out, want, "page {p}");
        }
        // The freed slot of page 4 is reused, not the end of the file.
        let end = t.index.lock().unwrap().end;
        t.save(5, &page(4, true)).unwrap();
        assert_eq!(t.index.lock().unwrap().end, end);
        // Records pointing past the file are refused.
        let mut lying = index.clone();
        let data = lying
            .chunks_exact_mut(INDEX_RECORD)
            .find(|r| r[21] & REC_ZERO == 0)
            .unwrap();
        data[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(Store::adopt(s.file().try_clone().unwrap(), &state, &lying, &free).is_err());
        assert!(Store::adopt(s.file().try_clone().unwrap(), &state, &index[1..], &free).is_err());
    }

    #[test]
    fn uncompressed_store() {
        let s = Store::create(&std::env::temp_dir(), false, 1 << 30).unwrap();
        s.save(7, &page(1, false)).unwrap();
        assert_eq!(s.used_bytes(), PAGE_SIZE as u64);
        let mut out = [0u8; PAGE_SIZE];
        s.take(7, &mut out).unwrap();
        assert_eq!(out, page(1, false));
    }

    #[test]
    fn full_and_unwritable_stores() {
        let s = Store::create(&std::env::temp_dir(), false, 2 * PAGE_SIZE as u64).unwrap();
        s.save(1, &page(1, true)).unwrap();
        s.save(2, &page(2, true)).unwrap();
        assert!(matches!(
            s.save(3, &page(3, true)),
            Err(StoreError::Full(_))
        ));
        assert!(!s.contains(3), "nothing stored on failure");
        // A "directory" that is a file.
        let f = std::env::temp_dir().join(format!("vio-not-a-dir-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        let e = Store::create(&f, false, 1 << 20).err().unwrap();
        assert!(
            e.to_string().contains("Failed to create the page store"),
            "{e}"
        );
        std::fs::remove_file(&f).unwrap();
    }

    /// A run mixing every kind of entry: back-to-back raw pages (one read straight into
    /// place), compressed pages, a zero page, a page not in the store, a page stored out of
    /// order (its own read), a compressed page at the end of the file; every page comes back
    /// as `take` would give it.
    #[test]
    fn a_run_is_taken_whole() {
        let s = Store::create(&std::env::temp_dir(), true, 1 << 30).unwrap();
        let want: Vec<Option<[u8; PAGE_SIZE]>> = vec![
            Some(page(1, true)),
            Some(page(2, true)),
            Some(page(3, true)),
            Some(page(4, false)),
            Some(page(5, false)),
            Some([0; PAGE_SIZE]),
            None,
            Some(page(8, false)), // last in the file: it ends inside its slot
            Some(page(9, true)),
        ];
        // Page 18 first: the file holds it before the rest of its neighbours.
        s.save(18, want[8].as_ref().unwrap()).unwrap();
        for (i, w) in want.iter().enumerate().take(8) {
            if let Some(w) = w {
                s.save(10 + i as u64, w).unwrap();
            }
        }
        let mut out = vec![7u8; want.len() * PAGE_SIZE];
        let mut failed = Vec::new();
        s.take_run(10, &mut out, |p, e| failed.push((p, e.to_string())));
        assert_eq!(failed, [(16, "Page 16 is not in the store".to_string())]);
        for (i, w) in want.iter().enumerate() {
            let got = &out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            assert_eq!(got, &w.unwrap_or([0; PAGE_SIZE])[..], "page {}", 10 + i);
        }
        assert_eq!(s.pages(), 0);
        assert_eq!(s.used_bytes(), 0);
    }

    /// A read that fails (the file is write-only here) fails every page of its run, zeroes
    /// them, and leaves them in the store.
    #[test]
    fn a_failed_run_read_keeps_the_pages() {
        let dir = std::env::temp_dir().join(format!("vio-store-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = Store::create(&dir, false, 1 << 30).unwrap();
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the store file has no name"
        );
        s.save(1, &page(1, true)).unwrap();
        s.save(2, &page(2, true)).unwrap();
        let write_only = OpenOptions::new()
            .write(true)
            .open(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&s.file)
            ))
            .unwrap();
        let (state, index, free) = s.export();
        let t = Store::adopt(write_only, &state, &index, &free).unwrap();
        let mut out = vec![7u8; 2 * PAGE_SIZE];
        let mut failed = Vec::new();
        t.take_run(1, &mut out, |p, _| failed.push(p));
        assert_eq!(failed, [1, 2]);
        assert!(out.iter().all(|&b| b == 0));
        assert_eq!(t.pages(), 2);
        std::fs::remove_dir(&dir).unwrap();
    }
}
