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

pub struct Store {
    file: File,
    path: PathBuf,
    compress: bool,
    max_bytes: u64,
    index: Mutex<Index>,
}

impl Store {
    /// A new, empty store file in `dir` (removed when the store is dropped).
    pub fn create(dir: &Path, compress: bool, max_bytes: u64) -> Result<Self, StoreError> {
        let path = dir.join(format!(
            "vio-pages-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::Create(dir.to_path_buf(), e))?;
        Ok(Store {
            file,
            path,
            compress,
            max_bytes,
            index: Mutex::default(),
        })
    }

    /// Saves a page's content. On error nothing is stored.
    pub fn save(&self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), StoreError> {
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
        let entry = *self
            .index
            .lock()
            .unwrap()
            .entries
            .get(&page)
            .ok_or(StoreError::Missing(page))?;
        match entry {
            Entry::Zero => out.fill(0),
            Entry::Data {
                offset,
                len,
                compressed,
                ..
            } => {
                let mut buf = vec![0u8; len as usize];
                self.file
                    .read_exact_at(&mut buf, offset)
                    .map_err(StoreError::Io)?;
                if compressed {
                    let n = lz4_flex::block::decompress_into(&buf, out)
                        .map_err(|_| StoreError::Corrupt(page))?;
                    if n != PAGE_SIZE {
                        return Err(StoreError::Corrupt(page));
                    }
                } else {
                    out.copy_from_slice(&buf);
                }
            }
        }
        self.forget(page);
        Ok(())
    }

    pub fn forget(&self, page: u64) {
        let mut ix = self.index.lock().unwrap();
        if let Some(Entry::Data { offset, class, .. }) = ix.entries.remove(&page) {
            ix.free[class].push(offset);
            ix.used -= ((class + 1) * UNIT) as u64;
        }
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
    pub path: PathBuf,
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
            path: self.path.clone(),
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
            path: s.path.clone(),
            compress: s.compress,
            max_bytes: s.max_bytes,
            index: Mutex::new(ix),
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
        std::mem::forget(t); // one of the two removes the file
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
}
