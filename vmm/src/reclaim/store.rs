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
