use super::*;
use std::io::Write;

fn memfd(pages: u64) -> Arc<File> {
    let mut f = tempfile();
    for p in 0..pages {
        f.write_all(&[p as u8; PAGE_SIZE as usize]).unwrap();
    }
    Arc::new(f)
}

fn tempfile() -> File {
    let name = std::ffi::CString::new("iommu-test").unwrap();
    // SAFETY: valid name; the fd is owned by the returned File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    unsafe { std::os::unix::io::FromRawFd::from_raw_fd(fd) }
}

#[test]
fn map_access_and_fault() {
    let iommu = Iommu::new();
    let f = memfd(8);
    iommu
        .map(f.clone(), 0, 0x10000, 4 * PAGE_SIZE, true)
        .unwrap();
    let v = iommu.view();
    assert_eq!(
        v.read_obj::<u8>(GuestAddress(0x10000 + PAGE_SIZE)).unwrap(),
        1
    );
    v.write_obj(0xaau8, GuestAddress(0x10000)).unwrap();
    assert!(v
        .read_obj::<u8>(GuestAddress(0x10000 + 4 * PAGE_SIZE))
        .is_err());
    assert_eq!(iommu.stats().iopf.load(Ordering::Relaxed), 1);
    assert_eq!(
        iommu.stats().last_iopf_iova.load(Ordering::Relaxed),
        0x10000 + 4 * PAGE_SIZE
    );
    // A range straddling the end of a mapping faults as a whole.
    let mut buf = [0u8; 16];
    assert!(v
        .read_slice(&mut buf, GuestAddress(0x10000 + 4 * PAGE_SIZE - 8))
        .is_err());
    drop(v);
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_at(f.as_ref(), &mut b, 0).unwrap();
    assert_eq!(b[0], 0xaa, "writes land in the client's memory");
}

#[test]
fn partial_unmap_splits_and_read_only_mappings() {
    let iommu = Iommu::new();
    let f = memfd(8);
    iommu.map(f.clone(), 0, 0, 8 * PAGE_SIZE, true).unwrap();
    assert_eq!(iommu.unmap(3 * PAGE_SIZE, PAGE_SIZE), Ok(PAGE_SIZE));
    let v = iommu.view();
    assert_eq!(v.read_obj::<u8>(GuestAddress(2 * PAGE_SIZE)).unwrap(), 2);
    assert!(v.read_obj::<u8>(GuestAddress(3 * PAGE_SIZE)).is_err());
    assert_eq!(
        v.read_obj::<u8>(GuestAddress(4 * PAGE_SIZE)).unwrap(),
        4,
        "the right part keeps its file offset"
    );
    drop(v);
    assert_eq!(iommu.mapped_bytes(), 7 * PAGE_SIZE);
    assert_eq!(
        iommu.map(f.clone(), 0, 2 * PAGE_SIZE, 2 * PAGE_SIZE, true),
        Err(IommuError::Exists {
            iova: 2 * PAGE_SIZE,
            len: 2 * PAGE_SIZE
        })
    );
    iommu
        .map(f.clone(), 3 * PAGE_SIZE, 3 * PAGE_SIZE, PAGE_SIZE, false)
        .unwrap();
    let v = iommu.view();
    assert_eq!(v.read_obj::<u8>(GuestAddress(3 * PAGE_SIZE)).unwrap(), 3);
    assert!(
        v.write_obj(1u8, GuestAddress(3 * PAGE_SIZE)).is_err(),
        "read-only mapping"
    );
    assert!(
        v.read_slice(&mut [0u8; 3 * 4096], GuestAddress(2 * PAGE_SIZE))
            .is_ok(),
        "reads across runs"
    );
    drop(v);
    assert_eq!(
        iommu.unmap(16 * PAGE_SIZE, PAGE_SIZE),
        Err(IommuError::NotMapped {
            iova: 16 * PAGE_SIZE,
            len: PAGE_SIZE
        })
    );
    assert!(matches!(
        iommu.map(f.clone(), 0, 100, PAGE_SIZE, true),
        Err(IommuError::Unaligned { .. })
    ));
    assert!(matches!(
        iommu.map(f, 0, u64::MAX - 4095, PAGE_SIZE, true),
        Err(IommuError::Unaligned { .. })
    ));
    iommu.unmap_all();
    assert_eq!(iommu.mapped_bytes(), 0);
    assert!(iommu.view().read_obj::<u8>(GuestAddress(0)).is_err());
}

/// Page-by-page mappings share one mmap of the file; a range beyond its end is refused
/// (an access there would kill the process with SIGBUS).
#[test]
fn mappings_share_one_mmap_and_stay_inside_the_file() {
    let vmas = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count()
    };
    let iommu = Iommu::new();
    let f = memfd(2048);
    let before = vmas();
    for p in (0..2048).step_by(2) {
        iommu
            .map(f.clone(), p * PAGE_SIZE, p * PAGE_SIZE, PAGE_SIZE, true)
            .unwrap();
    }
    assert!(vmas() < before + 16, "{} -> {}", before, vmas());
    let mut b = [0u8; 1];
    iommu
        .view()
        .read_slice(&mut b, GuestAddress(6 * PAGE_SIZE))
        .unwrap();
    assert_eq!(b[0], 6);
    assert!(matches!(
        iommu.map(f.clone(), 2047 * PAGE_SIZE, 1 << 30, 2 * PAGE_SIZE, true),
        Err(IommuError::Mmap(_))
    ));
    assert_eq!(iommu.unmap(0, 2048 * PAGE_SIZE), Ok(1024 * PAGE_SIZE));
}

#[test]
fn one_handle_per_client_file() {
    let iommu = Iommu::new();
    let f = memfd(2);
    let a = iommu.intern(f.try_clone().unwrap());
    let b = iommu.intern(f.try_clone().unwrap());
    assert!(
        Arc::ptr_eq(&a, &b),
        "a second fd of the same memory is not kept"
    );
    let other = iommu.intern(tempfile());
    assert!(!Arc::ptr_eq(&a, &other));
}

/// Adjacent mappings of contiguous file offsets become one run; unmapping a page in the
/// middle splits it again; a mapping of another file, or at a gap in the offsets, stays apart.
#[test]
fn contiguous_mappings_join() {
    let iommu = Iommu::new();
    let f = memfd(8);
    for p in [0u64, 2, 1, 3] {
        iommu
            .map(f.clone(), p * PAGE_SIZE, p * PAGE_SIZE, PAGE_SIZE, true)
            .unwrap();
    }
    assert_eq!(iommu.current.read().unwrap().runs.len(), 1);
    assert_eq!(iommu.mapped_bytes(), 4 * PAGE_SIZE);
    iommu
        .map(f.clone(), 6 * PAGE_SIZE, 4 * PAGE_SIZE, PAGE_SIZE, true)
        .unwrap();
    iommu
        .map(memfd(8), 5 * PAGE_SIZE, 5 * PAGE_SIZE, PAGE_SIZE, true)
        .unwrap();
    assert_eq!(iommu.current.read().unwrap().runs.len(), 3);
    let v = iommu.view();
    v.write_obj(0x55u8, GuestAddress(3 * PAGE_SIZE + 7))
        .unwrap();
    drop(v);
    iommu.unmap(PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(iommu.current.read().unwrap().runs.len(), 4);
    assert_eq!(
        iommu
            .view()
            .read_obj::<u8>(GuestAddress(3 * PAGE_SIZE + 7))
            .unwrap(),
        0x55,
        "the split keeps each page at its offset"
    );
    assert!(iommu
        .view()
        .read_obj::<u8>(GuestAddress(PAGE_SIZE))
        .is_err());
}

/// Random maps and unmaps (joins and splits) against a model of which file page backs each
/// IOVA page.
#[test]
fn joins_and_splits_agree_with_a_model() {
    const PAGES: u64 = 48;
    let files = [memfd(PAGES), memfd(PAGES)];
    let iommu = Iommu::new();
    let mut model: Vec<Option<(usize, u64)>> = vec![None; PAGES as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..4000 {
        let at = rnd(PAGES);
        let len = 1 + rnd((PAGES - at).min(6));
        if rnd(3) == 0 {
            let r = iommu.unmap(at * PAGE_SIZE, len * PAGE_SIZE);
            let any = (at..at + len).any(|p| model[p as usize].is_some());
            assert_eq!(r.is_ok(), any, "unmap {at}+{len}");
            (at..at + len).for_each(|p| model[p as usize] = None);
        } else {
            let f = rnd(2) as usize;
            // Mostly identity offsets (joinable), sometimes shifted.
            let off = if rnd(4) == 0 {
                rnd(PAGES - len + 1)
            } else {
                at
            };
            let r = iommu.map(
                files[f].clone(),
                off * PAGE_SIZE,
                at * PAGE_SIZE,
                len * PAGE_SIZE,
                true,
            );
            let free = (at..at + len).all(|p| model[p as usize].is_none());
            assert_eq!(r.is_ok(), free, "map {at}+{len}");
            if free {
                for i in 0..len {
                    model[(at + i) as usize] = Some((f, off + i));
                }
            }
        }
        let v = iommu.view();
        for (p, m) in model.iter().enumerate() {
            let got = v
                .read_obj::<u8>(GuestAddress(p as u64 * PAGE_SIZE + 9))
                .ok();
            assert_eq!(got, m.map(|(_, o)| o as u8), "page {p}");
        }
    }
}

#[test]
fn shadow_index_redirect() {
    let iommu = Iommu::new();
    iommu.map(memfd(2), 0, 0, 2 * PAGE_SIZE, true).unwrap();
    let v = iommu.view();
    v.write_obj(7u16, GuestAddress(0x102)).unwrap();
    v.write_obj(3u16, GuestAddress(PAGE_SIZE)).unwrap();
    drop(v);
    iommu.redirect(0x102, Some(PAGE_SIZE), false);
    let v = iommu.view();
    assert_eq!(
        v.read_obj::<u16>(GuestAddress(0x102)).unwrap(),
        3,
        "the index comes from the shadow"
    );
    assert_eq!(
        v.read_obj::<u32>(GuestAddress(0x100)).unwrap() >> 16,
        7,
        "other accesses are not redirected"
    );
    drop(v);
    iommu
        .map(memfd(1), 0, 4 * PAGE_SIZE, PAGE_SIZE, true)
        .unwrap();
    assert_eq!(
        iommu.view().read_obj::<u16>(GuestAddress(0x102)).unwrap(),
        3,
        "redirects survive DMA maps"
    );
    iommu.redirect(0x102, Some(8 * PAGE_SIZE), false);
    assert!(
        iommu.view().read_obj::<u16>(GuestAddress(0x102)).is_err(),
        "an unmapped shadow is an IOPF"
    );
    iommu.redirect(0x102, None, false);
    assert_eq!(
        iommu.view().read_obj::<u16>(GuestAddress(0x102)).unwrap(),
        7,
        "switched back"
    );
    iommu.redirect(0x102, Some(PAGE_SIZE), true);
    assert_eq!(
        iommu.view().read_obj::<u16>(GuestAddress(0x102)).unwrap(),
        7,
        "a capture carries the guest's index over to the shadow"
    );
    assert_eq!(
        iommu
            .view()
            .read_obj::<u16>(GuestAddress(PAGE_SIZE))
            .unwrap(),
        7
    );
}

#[test]
fn unmap_waits_for_accesses_in_progress() {
    let iommu = Arc::new(Iommu::new());
    iommu.map(memfd(1), 0, 0, PAGE_SIZE, true).unwrap();
    let guard = iommu.view();
    let i2 = iommu.clone();
    let t = std::thread::spawn(move || i2.unmap(0, PAGE_SIZE));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !t.is_finished(),
        "unmap must wait for the access in progress"
    );
    assert_eq!(guard.read_obj::<u8>(GuestAddress(0)).unwrap(), 0);
    drop(guard);
    assert_eq!(t.join().unwrap(), Ok(PAGE_SIZE));
}
