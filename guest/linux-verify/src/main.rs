//! blk-verify for the Linux test guest, with the bare-metal guest's contract: random reads and
//! writes of stamped 4 KiB blocks on a block device (O_DIRECT, so every request reaches the
//! device), every read checked against the block's last written stamp, queue depth from one
//! thread per slot, a bounded stall timeout, and `VIO-GUEST-*` lines on stdout (the console).
//!
//! Parameters come from the kernel command line (`/proc/cmdline`), as for the bare-metal guest:
//! `vio.ops`, `vio.qd`, `vio.seed`, `vio.write_pct`, `vio.stall_s`, `vio.dev` (default
//! `/dev/vda`), `vio.blocks` (default: the whole device).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: usize = 4096;
const MAGIC: u64 = 0x5649_4f2d_4c4e_5831; // "VIO-LNX1"
/// linux/fcntl.h, x86_64.
const O_DIRECT: i32 = 0o40000;

struct Params {
    ops: u64,
    qd: u64,
    seed: u64,
    write_pct: u64,
    stall_s: u64,
    dev: String,
    blocks: u64,
}

fn param(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

fn params() -> Result<Params, String> {
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
    let num = |key: &str, default: u64| -> Result<u64, String> {
        param(&cmdline, key).map_or(Ok(default), |v| {
            v.parse().map_err(|_| format!("{key} must be a number"))
        })
    };
    let dev = param(&cmdline, "vio.dev").unwrap_or_else(|| "/dev/vda".into());
    let name = dev.rsplit('/').next().unwrap_or("vda").to_string();
    let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .map_err(|e| format!("{dev}: {e}"))?
        .trim()
        .parse()
        .map_err(|_| "bad device size".to_string())?;
    let p = Params {
        ops: num("vio.ops", 1000)?,
        qd: num("vio.qd", 1)?,
        seed: num("vio.seed", 1)?,
        write_pct: num("vio.write_pct", 50)?,
        stall_s: num("vio.stall_s", 60)?,
        blocks: num("vio.blocks", sectors * 512 / BS as u64)?.min(sectors * 512 / BS as u64),
        dev,
    };
    if p.qd == 0 || p.qd > 256 || p.write_pct > 100 || p.blocks < p.qd {
        return Err("vio.qd must be 1..256 and below the block count, vio.write_pct <= 100".into());
    }
    Ok(p)
}

/// splitmix64
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(lba: u64, gen: u32, seed: u64, i: u64) -> u64 {
    match i {
        0 => MAGIC,
        1 => lba,
        2 => gen as u64,
        3 => seed,
        _ => mix(lba.wrapping_mul(0x1_0000_0001) ^ (gen as u64) << 40 ^ seed.rotate_left(29) ^ i),
    }
}

/// A page-aligned block buffer, as O_DIRECT needs.
struct Block(*mut u8);

// SAFETY: the buffer is owned by one thread at a time.
unsafe impl Send for Block {}

impl Block {
    const LAYOUT: Layout = match Layout::from_size_align(BS, BS) {
        Ok(l) => l,
        Err(_) => panic!("block layout"),
    };

    fn new() -> Block {
        // SAFETY: a non-zero-sized layout; checked for null.
        let p = unsafe { alloc_zeroed(Self::LAYOUT) };
        assert!(!p.is_null(), "out of memory");
        Block(p)
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: BS bytes owned by this Block.
        unsafe { std::slice::from_raw_parts_mut(self.0, BS) }
    }

    fn fill(&mut self, lba: u64, gen: u32, seed: u64) {
        for (i, c) in self.bytes().chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&word(lba, gen, seed, i as u64).to_le_bytes());
        }
    }

    fn check(&mut self, lba: u64, gen: u32, seed: u64) -> bool {
        self.bytes().chunks_exact(8).enumerate().all(|(i, c)| {
            u64::from_le_bytes(c.try_into().unwrap()) == word(lba, gen, seed, i as u64)
        })
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.0, Self::LAYOUT) }
    }
}

#[derive(Default)]
struct Counts {
    ops: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    io_errors: AtomicU64,
    mismatches: AtomicU64,
}

/// One slot of the queue: its own blocks (lba ≡ slot mod qd), so no two requests in flight
/// touch the same block, and the generation each was last written with.
fn worker(
    slot: u64,
    p: Arc<Params>,
    dev: Arc<File>,
    c: Arc<Counts>,
    quit: Arc<AtomicBool>,
) -> Vec<u64> {
    let mut lat = Vec::new();
    let mine = (p.blocks - slot).div_ceil(p.qd);
    let mut gens = vec![0u32; mine as usize];
    let mut rng = mix(p.seed ^ (slot + 1).wrapping_mul(0x5851_f42d_4c95_7f2d));
    let mut buf = Block::new();
    let share = p.ops / p.qd + u64::from(slot < p.ops % p.qd);
    for _ in 0..share {
        if quit.load(Ordering::Relaxed) {
            break;
        }
        rng = mix(rng);
        let k = rng % mine;
        let lba = slot + k * p.qd;
        let write = (rng >> 32) % 100 < p.write_pct;
        let off = lba * BS as u64;
        let t0 = Instant::now();
        if write {
            let gen = gens[k as usize].wrapping_add(1).max(1);
            buf.fill(lba, gen, p.seed);
            let ok = dev.write_all_at(buf.bytes(), off).is_ok();
            // A failed write leaves the block's content unknown.
            gens[k as usize] = if ok { gen } else { 0 };
            c.writes.fetch_add(1, Ordering::Relaxed);
            if !ok {
                c.io_errors.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            let ok = dev.read_exact_at(buf.bytes(), off).is_ok();
            c.reads.fetch_add(1, Ordering::Relaxed);
            let gen = gens[k as usize];
            if !ok {
                c.io_errors.fetch_add(1, Ordering::Relaxed);
            } else if gen != 0
                && !buf.check(lba, gen, p.seed)
                && c.mismatches.fetch_add(1, Ordering::Relaxed) < 5
            {
                println!("VIO-GUEST-MISMATCH {{\"lba\":{lba},\"gen\":{gen}}}");
            }
        }
        lat.push(t0.elapsed().as_nanos() as u64);
        c.ops.fetch_add(1, Ordering::Relaxed);
    }
    lat
}

fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)]
}

fn run() -> Result<(), String> {
    let p = Arc::new(params()?);
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(&p.dev)
        .map_err(|e| format!("{}: {e}", p.dev))?;
    println!(
        "VIO-GUEST-INFO {{\"guest\":\"linux\",\"device\":\"{}\",\"blocks\":{},\"qd\":{}}}",
        p.dev, p.blocks, p.qd
    );
    let dev = Arc::new(dev);
    let c = Arc::new(Counts::default());
    let quit = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..p.qd)
        .map(|slot| {
            let (p, dev, c, quit) = (p.clone(), dev.clone(), c.clone(), quit.clone());
            std::thread::spawn(move || worker(slot, p, dev, c, quit))
        })
        .collect();
    let (mut last_ops, mut last_change) = (0, Instant::now());
    // About once a second, as the bare-metal guest does: the console is /dev/kmsg, whose
    // writers are rate-limited unless the kernel is told otherwise.
    let mut last_print = Instant::now();
    while c.ops.load(Ordering::Relaxed) < p.ops {
        std::thread::sleep(Duration::from_millis(200).min(Duration::from_secs(p.stall_s)));
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
        let ops = c.ops.load(Ordering::Relaxed);
        if ops != last_ops {
            (last_ops, last_change) = (ops, Instant::now());
            if last_print.elapsed() < Duration::from_secs(1) {
                continue;
            }
            last_print = Instant::now();
            let ns = start.elapsed().as_nanos() as u64;
            println!(
                "VIO-GUEST-PROGRESS {{\"workload\":\"blk-verify\",\"ops\":{ops},\"io_errors\":{},\"mismatches\":{},\"elapsed_ns\":{ns},\"iops\":{}}}",
                c.io_errors.load(Ordering::Relaxed),
                c.mismatches.load(Ordering::Relaxed),
                ops * 1_000_000_000 / ns.max(1)
            );
        } else if last_change.elapsed() > Duration::from_secs(p.stall_s) {
            quit.store(true, Ordering::Relaxed);
            return Err("requests stalled (vio.stall_s)".into());
        }
    }
    let mut lat: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .collect();
    dev.sync_all().map_err(|e| format!("flush: {e}"))?;
    let ns = start.elapsed().as_nanos() as u64;
    lat.sort_unstable();
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let ops = ld(&c.ops);
    println!(
        "VIO-GUEST-RESULT {{\"workload\":\"blk-verify\",\"guest\":\"linux\",\"ops\":{ops},\"reads\":{},\"writes\":{},\"io_errors\":{},\"mismatches\":{},\"bad_failed\":0,\"bad_succeeded\":0,\"elapsed_ns\":{ns},\"iops\":{},\"lat_p50_ns\":{},\"lat_p99_ns\":{},\"lat_max_ns\":{}}}",
        ld(&c.reads),
        ld(&c.writes),
        ld(&c.io_errors),
        ld(&c.mismatches),
        ops * 1_000_000_000 / ns.max(1),
        percentile(&lat, 50),
        percentile(&lat, 99),
        lat.last().copied().unwrap_or(0),
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        println!("VIO-GUEST-ERROR {{\"error\":\"{e}\"}}");
        std::process::exit(1);
    }
}
