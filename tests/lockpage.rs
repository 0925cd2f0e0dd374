//! Lockpage end to end on KVM: vdpu under `--vio` with `lockpage=on`, blk-verify reusing a
//! buffer pool while `vm.reclaim` churns guest RAM; the pages DMA keeps hitting stay locked
//! (resident, mapped, skipped by reclaim) within the budget, and go when they cool.

mod common;

use common::*;
use serde_json::Value;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(240);
const RAM: u64 = 512 << 20;

/// One test at a time: they compare fault-in counts between runs, and a neighbour's VM on two
/// cores changes how many churn passes land in a run.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

struct Run {
    result: Value,
    device: Value,
    /// `vm.vio-info` samples taken while the guest ran.
    infos: Vec<Value>,
    /// Churn passes: (reclaimed, memfd allocated after, skipped as locked).
    passes: Vec<(u64, u64, u64)>,
    stderr: String,
}

impl Run {
    fn lock(&self, key: &str) -> u64 {
        u(&self.device, key)
    }

    fn max_locked(&self) -> u64 {
        self.infos
            .iter()
            .filter_map(|i| i["lockpage"]["locked_bytes"].as_u64())
            .max()
            .unwrap_or(0)
    }

    fn describe(&self) -> String {
        format!(
            "result {}\ndevice {}\nlast info {}\n{}",
            self.result,
            self.device,
            self.infos.last().cloned().unwrap_or_default(),
            self.stderr
        )
    }
}

/// blk-verify on vdpu under `--vio` (`extra` options), reclaim churn of half of RAM every 100 ms
/// if `churn`, `vm.vio-info` sampled every 100 ms.
fn run(name: &str, memory: &str, extra: &str, cmdline: &str, churn: bool) -> Run {
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start(name, &disk);
    let mut vm = VmBuilder::new(name)
        .memory(memory)
        .cmdline(&format!("vio.workload=blk-verify {cmdline}"))
        .device("--vio", &vdpu, extra)
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    let churn = churn.then(|| Churn::start(vm.api_path(), vm.pid(), RAM / 2, false));
    let mut infos = Vec::new();
    loop {
        let (status, body) = vm.api("GET", "vm.vio-info", "");
        if status != 200 {
            break; // powered off
        }
        infos.push(serde_json::from_str::<Value>(&body).unwrap()[0].clone());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = vm.finish(TIMEOUT);
    let passes = churn.map(Churn::finish).unwrap_or_default();
    assert!(out.status.success(), "{}\n{}", out.describe(), vdpu.log());
    Run {
        result: out.line_json("VIO-GUEST-RESULT").unwrap_or_default(),
        device: logged_counters(&out.stderr, "dpu0"),
        infos,
        passes,
        stderr: out.stderr,
    }
}

fn assert_clean(r: &Run, ops: u64) {
    let res = &r.result;
    assert_eq!(u(res, "ops"), ops, "{}", r.describe());
    assert_eq!(u(res, "mismatches"), 0, "{res}");
    assert_eq!(u(res, "io_errors"), 0, "{res}");
    for k in ["iopf", "failed", "acquire_errors", "dma_map_failures"] {
        assert_eq!(r.device[k].as_u64(), Some(0), "{k}: {}", r.device);
    }
}

/// The headline: the same small reused pool under the same churn, lockpage off then
/// on. With it on, the pool is locked after a few touches, so churn stops taking it and the
/// requests stop faulting it back: at least 10x fewer fault-ins, within the budget.
#[test]
fn lockpage_cuts_faultins_of_a_reused_pool_under_churn() {
    if !kvm_available("lockpage_cuts_faultins_of_a_reused_pool_under_churn") {
        return;
    }
    let _one = one_at_a_time();
    let ops = 40_000;
    let cmdline = format!("vio.ops={ops} vio.qd=4 vio.pool_pages=256 vio.rate=8000");
    let memory = "size=512M,shared=on,reclaim=on";
    let off = run("lock-off", memory, "", &cmdline, true);
    let on = run("lock-on", memory, ",lockpage=on", &cmdline, true);
    assert_clean(&off, ops);
    assert_clean(&on, ops);
    let (f_off, f_on) = (u(&off.device, "faultins"), u(&on.device, "faultins"));
    eprintln!("fault-ins: off {f_off}, on {f_on}; on: {}", on.device);
    assert!(
        f_off >= 1000,
        "without lockpage churn keeps taking the pool: {f_off} fault-ins\n{}",
        off.describe()
    );
    assert!(
        f_on * 10 <= f_off,
        "fault-ins: off {f_off}, on {f_on}\n{}",
        on.describe()
    );
    assert!(
        off.device.get("locked_bytes").is_none(),
        "off means off: {}",
        off.device
    );
    // Locked: the pool and the pages every request uses (headers, status, rings), far below
    // the default budget (10% of RAM).
    let budget = on.lock("lock_budget_bytes");
    assert_eq!(budget, RAM / 10 / 4096 * 4096);
    let max = on.max_locked();
    assert!(
        (256 << 12..=budget).contains(&max),
        "locked at most {max} bytes"
    );
    let skipped: u64 = on.passes.iter().map(|p| p.2).sum();
    assert!(skipped > 0, "reclaim reports locked pages: {:?}", on.passes);
    // The highest share of RAM locked while the pool was in use: the last sample may come
    // after the guest's final device reset, which drops every lock.
    let rate = on
        .infos
        .iter()
        .filter_map(|i| i["lockpage"]["lock_rate"].as_f64())
        .fold(0.0, f64::max);
    assert!(rate > 0.0 && rate <= 0.1, "lock rate {rate}");
    // Lockpage keeps what VIO won: the VM's memory under churn stays within the locked bytes
    // of the run without it.
    let low = |r: &Run| r.passes.iter().map(|p| p.1).min().unwrap();
    assert!(
        low(&on) <= low(&off) + max + (8 << 20),
        "memfd low: off {}, on {}",
        low(&off),
        low(&on)
    );
}

/// A hot set that moves: the buffers switch to a disjoint pool part-way; the first pool cools,
/// is unlocked within seconds, and churn takes it again.
#[test]
fn lockpage_follows_a_hot_set_that_moves() {
    if !kvm_available("lockpage_follows_a_hot_set_that_moves") {
        return;
    }
    let _one = one_at_a_time();
    // 4 s on the first pool, then 10 s on the second: five lock periods for the first to cool.
    let ops = 56_000;
    let cmdline =
        format!("vio.ops={ops} vio.qd=4 vio.pool_pages=256 vio.pool_switch=16000 vio.rate=4000");
    let r = run(
        "lock-moves",
        "size=512M,shared=on,reclaim=on",
        ",lockpage=on",
        &cmdline,
        true,
    );
    assert_clean(&r, ops);
    let (locks, unlocks) = (r.lock("locks"), r.lock("unlocks"));
    assert!(locks >= 2 * 256, "both pools were locked: {locks} locks");
    assert!(
        unlocks >= 256,
        "the first pool was unlocked: {unlocks} unlocks"
    );
    // At the end only the second pool (and the per-request pages) is locked.
    let last = r.infos.last().unwrap()["lockpage"]["locked_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        last < (2 * 256) << 12,
        "still locked at the end: {last} bytes\n{}",
        r.describe()
    );
    // Once the first pool was unlocked, churn took it again.
    let reclaimed_late: u64 = r.passes[r.passes.len() / 2..].iter().map(|p| p.0).sum();
    assert!(reclaimed_late > 0, "{:?}", r.passes);
}

/// A pool larger than the budget: locked memory never exceeds it, the hottest part is locked,
/// and the lock rate is reported.
#[test]
fn lockpage_stays_within_its_budget() {
    if !kvm_available("lockpage_stays_within_its_budget") {
        return;
    }
    let _one = one_at_a_time();
    let ops = 40_000;
    // 2048 pool pages (8 MiB); a 1% budget is 5.1 MiB.
    let cmdline = format!("vio.ops={ops} vio.qd=4 vio.pool_pages=2048 vio.rate=8000");
    let r = run(
        "lock-budget",
        "size=512M,shared=on,reclaim=on",
        ",lockpage=on,lock_budget_pct=1",
        &cmdline,
        true,
    );
    assert_clean(&r, ops);
    let budget = r.lock("lock_budget_bytes");
    assert_eq!(budget, RAM / 100 / 4096 * 4096);
    let max = r.max_locked();
    assert!(max <= budget, "locked {max} > budget {budget}");
    assert!(max >= budget / 2, "the budget was used: {max} of {budget}");
    assert!(r.lock("lock_denied") > 0, "{}", r.device);
    for i in &r.infos {
        let l = &i["lockpage"];
        let rate = l["lock_rate"].as_f64().unwrap();
        let bytes = l["locked_bytes"].as_u64().unwrap();
        assert!(rate <= 0.01 + 1e-9, "lock rate {rate}");
        assert!((rate * RAM as f64 - bytes as f64).abs() < 4096.0, "{l}");
    }
}

/// More scattered pages than the device has mappings (65,535): every request's pages are
/// mapped when it is published (no failed map, no IOPF), idle mappings are trimmed as the
/// limit nears, and the count in use stays below it. No churn: reclaim would unmap pages and
/// keep the count down by itself.
#[test]
fn lockpage_scattered_working_set_beyond_the_mapping_limit() {
    if !kvm_available("lockpage_scattered_working_set_beyond_the_mapping_limit") {
        return;
    }
    let _one = one_at_a_time();
    // 120,000 pool pages spread over 1 GiB: every other page, none adjacent.
    let ops = 150_000;
    let cmdline = format!("vio.ops={ops} vio.qd=4 vio.pool_pages=120000");
    let r = run(
        "lock-scattered",
        "size=1G,shared=on,reclaim=on",
        ",lockpage=on",
        &cmdline,
        false,
    );
    assert_clean(&r, ops);
    let max_maps = r.infos[0]["max_dma_maps"].as_u64().unwrap();
    assert_eq!(max_maps, 65535, "vdpu's limit, from its VERSION reply");
    assert!(
        r.lock("dma_trims") > 0,
        "the limit was reached: {}",
        r.device
    );
    let most = r
        .infos
        .iter()
        .map(|i| i["dma_mappings"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(most < max_maps, "{most} mappings in use");
    assert!(r.lock("dma_maps") > max_maps, "{}", r.device);
}

/// A device reset (here a VM reboot) drops every lock: the driver's buffers went with it. The
/// pool stays hot all run, so nothing else would unlock it within the reboot's second or two.
#[test]
fn lockpage_drops_its_locks_at_a_device_reset() {
    if !kvm_available("lockpage_drops_its_locks_at_a_device_reset") {
        return;
    }
    let _one = one_at_a_time();
    let disk = TmpDisk::new("lock-reset", 64 << 20);
    let vdpu = Vdpu::start("lock-reset", &disk);
    let mut vm = VmBuilder::new("lock-reset")
        .memory("size=512M,shared=on,reclaim=on")
        .cmdline("vio.workload=blk-verify vio.ops=40000 vio.qd=4 vio.pool_pages=256 vio.rate=8000")
        .device("--vio", &vdpu, ",lockpage=on")
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let locked = loop {
        let (status, body) = vm.api("GET", "vm.vio-info", "");
        assert_eq!(status, 200, "{body}");
        let l = serde_json::from_str::<Value>(&body).unwrap()[0]["lockpage"].clone();
        if u(&l, "locked_bytes") >= 256 << 12 {
            assert_eq!(u(&l, "unlocks"), 0, "a hot pool stays locked: {l}");
            break u(&l, "locked_bytes") >> 12;
        }
        assert!(std::time::Instant::now() < deadline, "never locked: {l}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (status, body) = vm.api("PUT", "vm.reboot", "");
    assert_eq!(status, 204, "{body}");
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    let dev = logged_counters(&out.stderr, "dpu0");
    assert!(
        u(&dev, "unlocks") >= locked,
        "{locked} pages locked before the reset: {dev}"
    );
    assert_eq!(dev["iopf"].as_u64(), Some(0), "{dev}");
}
