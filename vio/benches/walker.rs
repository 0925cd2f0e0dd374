//! ns per chain walked, for chains of 1, 3 and 16 descriptors (direct) and 16 (indirect).
//! Run with `cargo bench -p vio --bench walker`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use vio::{ChainWalker, QueueLayout, WalkLimits, WalkReport};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const Q: QueueLayout = QueueLayout {
    size: 256,
    desc_table: 0x10000,
    avail_ring: 0x20000,
    used_ring: 0x30000,
};
const CHAINS: u16 = 16;

fn desc(m: &GuestMemoryMmap<()>, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let at = table + 16 * i;
    m.write_obj(addr, GuestAddress(at)).unwrap();
    m.write_obj(len, GuestAddress(at + 8)).unwrap();
    m.write_obj(flags, GuestAddress(at + 12)).unwrap();
    m.write_obj(next, GuestAddress(at + 14)).unwrap();
}

/// `CHAINS` chains of `n` descriptors each, buffers 4 KiB apart.
fn ring(n: u16, indirect: bool) -> GuestMemoryMmap<()> {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    for c in 0..CHAINS {
        let buf = |k: u16| 0x100_0000 + 0x1000 * u64::from(c * n + k);
        if indirect {
            let table = 0x80_0000 + 0x1000 * u64::from(c);
            for k in 0..n {
                let next = k + 1 < n;
                desc(
                    &m,
                    table,
                    u64::from(k),
                    buf(k),
                    512,
                    if next { 1 } else { 0 },
                    k + 1,
                );
            }
            desc(
                &m,
                Q.desc_table,
                u64::from(c),
                table,
                16 * u32::from(n),
                4,
                0,
            );
            m.write_obj(c, GuestAddress(Q.avail_ring + 4 + 2 * u64::from(c)))
                .unwrap();
        } else {
            let head = c * n;
            for k in 0..n {
                let next = k + 1 < n;
                desc(
                    &m,
                    Q.desc_table,
                    u64::from(head + k),
                    buf(k),
                    512,
                    if next { 1 } else { 0 },
                    head + k + 1,
                );
            }
            m.write_obj(head, GuestAddress(Q.avail_ring + 4 + 2 * u64::from(c)))
                .unwrap();
        }
    }
    m
}

fn bench(c: &mut Criterion) {
    let w = ChainWalker::new(WalkLimits::default());
    let mut g = c.benchmark_group("walk");
    g.throughput(Throughput::Elements(u64::from(CHAINS)));
    for (n, indirect) in [(1u16, false), (3, false), (16, false), (16, true)] {
        let m = ring(n, indirect);
        let name = if indirect { "indirect" } else { "direct" };
        // One report reused, as the snoop engine does.
        let mut r = WalkReport::default();
        g.bench_with_input(BenchmarkId::new(name, n), &m, |b, m| {
            b.iter(|| {
                w.walk_into(m, &Q, 0, CHAINS, &mut r);
                assert_eq!(r.bad_chains, 0);
                black_box(r.pages.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
